"""The Engine on a GPU: the CUDA kernels inside the whole model (skipped without a GPU)."""
import pytest
import torch

from qwen_fast import Engine, ops

CUDA_READY = ops.HAVE_C and ops.build_info()["cuda"] and torch.cuda.is_available()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and qwen_fast._C built with nvcc")]


def test_cuda_engine_matches_cpu_reference(tiny_ckpt):
    ids = list(range(1000, 1040))
    cpu = Engine.from_pretrained(tiny_ckpt, dtype="float32", backend="reference")
    gpu = Engine.from_pretrained(tiny_ckpt, device="cuda", dtype="float32", backend="auto")
    assert gpu.model.ops["rms_norm"] is ops.rms_norm
    # fp32 GEMMs on the GPU sum in another order than on the CPU: small differences only.
    torch.testing.assert_close(gpu.logits(ids).cpu(), cpu.logits(ids), rtol=1e-3, atol=1e-3)
    bf = Engine.from_pretrained(tiny_ckpt, device="cuda", dtype="bfloat16", backend="auto")
    ref = Engine.from_pretrained(tiny_ckpt, device="cuda", dtype="bfloat16", backend="reference")
    a = bf.generate(ids, max_new_tokens=8, temperature=0, ignore_eos=True)
    b = ref.generate(ids, max_new_tokens=8, temperature=0, ignore_eos=True)
    assert a.completion_tokens == 8
    assert a.token_ids[:4] == b.token_ids[:4]
    s = bf.generate(ids, max_new_tokens=8, seed=3, ignore_eos=True)
    assert s.token_ids == bf.generate(ids, max_new_tokens=8, seed=3, ignore_eos=True).token_ids
