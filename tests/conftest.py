import pytest
import torch

from qwen_fast.testing import time_limit, tiny_config, write_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A 2-layer random-weight checkpoint in the release layout: 2 bf16 shards + index."""
    cfg = tiny_config()
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "Qwen-tiny-Chat", cfg,
                            dtype=torch.bfloat16, shards=2)


@pytest.fixture(scope="session")
def tiny_engine_fp32(tiny_ckpt):
    from qwen_fast import Engine
    return Engine.from_pretrained(tiny_ckpt, dtype="float32", backend="reference")


@pytest.fixture(scope="session")
def tiny_engine(tiny_ckpt):
    from qwen_fast import Engine
    return Engine.from_pretrained(tiny_ckpt, dtype="bfloat16", backend="reference")


@pytest.fixture()
def require_extension():
    """Fails (does not skip) a kernel test when qwen_fast._C did not build: the kernels are the
    point of it. Use with `pytestmark = pytest.mark.usefixtures("require_extension")`."""
    from qwen_fast import ops
    assert ops.HAVE_C, f"qwen_fast._C is not built: {ops.IMPORT_ERROR}"


@pytest.fixture()
def alarm():
    """Fail instead of hanging forever if a FIFO is ever opened for reading (20 s)."""
    with time_limit(20):
        yield
