"""dtype="auto": the release's choice, except fp16 checkpoints on a CPU with AVX-512 BF16, which
run in bf16 (qwen_fast.engine.auto_dtype says why, and the Engine keeps the reason)."""
import logging

import pytest
import torch

from qwen_fast import Engine, ops
from qwen_fast.engine import auto_dtype
from qwen_fast.testing import tiny_config

needs_c = pytest.mark.skipif(not ops.HAVE_C, reason="needs qwen_fast._C")


def _cfg(**flags):
    c = tiny_config()
    for k, v in flags.items():
        setattr(c, k, v)
    return c


@needs_c
@pytest.mark.parametrize("has_bf16", [True, False])
def test_fp16_checkpoint_on_the_cpu(monkeypatch, has_bf16):
    isas = ["avx512_bf16", "avx512", "avx2", "scalar"] if has_bf16 else ["avx2", "scalar"]
    monkeypatch.setattr(ops._C, "linear_isas", lambda: isas)
    dt, why = auto_dtype(_cfg(fp16=True), "cpu")
    assert dt == (torch.bfloat16 if has_bf16 else torch.float16)
    assert ("AVX-512 BF16" in why) and (("no AVX-512" in why) != has_bf16)
    # the reference backend and a GPU keep the release's fp16
    assert auto_dtype(_cfg(fp16=True), "cpu", "reference")[0] == torch.float16
    assert auto_dtype(_cfg(fp16=True), "cuda")[0] == torch.float16


def test_other_checkpoints_keep_the_release_choice():
    assert auto_dtype(_cfg(fp32=True), "cpu") == (torch.float32, "the checkpoint's (config.json)")
    assert auto_dtype(_cfg(bf16=True), "cpu")[0] == torch.bfloat16
    assert auto_dtype(_cfg(), "cpu") == (torch.bfloat16, "the release's default")


@needs_c
def test_the_engine_says_what_it_chose(monkeypatch, caplog):
    monkeypatch.setattr(ops._C, "linear_isas", lambda: ["avx512_bf16", "scalar"])
    with caplog.at_level(logging.INFO, logger="qwen_fast"):
        e = Engine.from_pretrained(load_format="dummy", config=_cfg(fp16=True))
    try:
        assert e.dtype == torch.bfloat16 and "float16" in e.dtype_reason
        assert any("dtype auto: bfloat16" in r.getMessage() for r in caplog.records)
    finally:
        e.close()
    e = Engine.from_pretrained(load_format="dummy", config=_cfg(fp16=True), dtype="float16")
    try:
        assert e.dtype == torch.float16 and e.dtype_reason == "asked for"
    finally:
        e.close()
