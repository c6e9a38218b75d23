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


def test_every_op_of_a_cuda_decode_step_is_ours(tiny_ckpt):
    from qwen_fast.model import OP_NAMES
    e = Engine.from_pretrained(tiny_ckpt, device="cuda", dtype="bfloat16", backend="auto")
    for name in OP_NAMES:
        assert e.model.ops[name] is getattr(ops, name), name
    assert e.model._fused_layers() is not None          # decode steps run _C.DecodeLayer
    fused = e.generate(list(range(1000, 1040)), max_new_tokens=12, temperature=0, ignore_eos=True)
    e.model.fused_decode = False
    loop = e.generate(list(range(1000, 1040)), max_new_tokens=12, temperature=0, ignore_eos=True)
    assert fused.token_ids == loop.token_ids             # the same kernels in the same order


@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_gptq_model_matches_the_dense_reference_on_its_weights(tiny_ckpt, tmp_path, bits):
    """int4/int8 on the GPU: fp32 maths on the exact dequantized weights, so within fp32
    reordering of the CPU reference backend (which dequantizes them), and the same greedy
    tokens; batched decoding as well."""
    from qwen_fast.quant import quantize_checkpoint
    q = tmp_path / f"int{bits}"
    quantize_checkpoint(tiny_ckpt, q, bits=bits, group_size=-1)    # tiny K = 64: one group
    ids = list(range(1000, 1040))
    ref = Engine.from_pretrained(q, dtype="float32", backend="reference")
    gpu = Engine.from_pretrained(q, device="cuda", dtype="float32", backend="auto",
                                 lm_head_quant=None)
    assert gpu.model.layers[0]["mlp.w1.weight"].device.type == "cuda"
    torch.testing.assert_close(gpu.logits(ids).cpu(), ref.logits(ids), rtol=1e-3, atol=1e-3)
    kw = dict(max_new_tokens=10, temperature=0, ignore_eos=True)
    assert gpu.generate(ids, **kw).token_ids == ref.generate(ids, **kw).token_ids
    batch = gpu.generate([ids, ids[:17], ids[5:30]], **kw)
    assert [r.token_ids for r in batch] == [r.token_ids for r in ref.generate([ids, ids[:17], ids[5:30]], **kw)]
    lm = Engine.from_pretrained(q, device="cuda", dtype="bfloat16", lm_head_quant="int8")
    assert lm.generate(ids, **kw).completion_tokens == 10
