"""The lean decode loop: a decode step writes its activations into buffers made once per model
(model.StepBuffers, for steps of up to its rows tokens), the ops' out= arguments that it
uses, and the in-place residual stream; the fused layers (_C.DecodeLayer) equal the Python loop
on decode steps and on steps that pack a prefill chunk with decode tokens."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from qwen_fast import Engine, ops
from qwen_fast.testing import PagedBatch

pytestmark = pytest.mark.usefixtures("require_extension")


def _allocations(fn) -> list:
    """(op name, bytes) of every CPU allocation that fn makes, as torch's profiler records it
    (torch's allocator: at::empty in our extension included)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [(ev.name, ev.cpu_memory_usage) for ev in prof.events() if ev.cpu_memory_usage > 0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_decode_step_allocates_only_its_logits(tiny_ckpt, dtype):
    """After the first step made the buffers, a step over 2 of 3 sequences allocates the
    logits it returns and bookkeeping smaller than one activation (positions, rotary angles:
    batch x rotary dim fp32 values), nothing the size of an activation (batch x hidden). The prefill, which has
    no buffers, is the control: it does allocate activations."""
    m = Engine.from_pretrained(tiny_ckpt, dtype=dtype, backend="auto").model
    act_bytes = 2 * m.cfg.hidden_size * torch.empty((), dtype=m.dtype).element_size()     # 2 rows decode
    from qwen_fast.model import StepBuffers
    m.step_buffers = StepBuffers(3)
    batch = PagedBatch(m, 3, 64)
    prefill = _allocations(lambda: batch.forward([[1, 2, 3]] * 3))     # 9 tokens > 3 rows
    assert any(n >= act_bytes for _, n in prefill)
    batch.forward([[4], [5]], rows=[0, 2])
    made = {k: t.data_ptr() for k, t in m.step_buffers.bufs.items()}
    step = _allocations(lambda: batch.forward([[6], [7]], rows=[0, 2]))
    logits_bytes = 2 * m.cfg.vocab_size * torch.empty((), dtype=m.dtype).element_size()
    big = [(name, n) for name, n in step if n >= act_bytes]
    assert [n for _, n in big] == [logits_bytes], big
    assert {k: t.data_ptr() for k, t in m.step_buffers.bufs.items()} == made


def test_decode_with_buffers_equals_the_reference_step(tiny_ckpt):
    """fp32: the buffered native step gives the reference backend's logits (which allocates
    everything) within the fp32 reordering tolerance of test_model, over rows run in two runs."""
    nat = Engine.from_pretrained(tiny_ckpt, dtype="float32", backend="auto").model
    ref = Engine.from_pretrained(tiny_ckpt, dtype="float32", backend="reference").model
    outs = []
    for m in (nat, ref):
        batch = PagedBatch(m, 4, 64)
        batch.forward([[1, 2, 3, 4], [1, 2], [1, 2, 3], [1]])
        steps = [batch.forward([[5], [6], [7]], rows=[0, 2, 3]) for _ in range(3)]
        outs.append(torch.stack(steps))
    got, want = outs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("kind", ["bfloat16", "float32", "int4"])
def test_the_fused_decode_layers_equal_the_python_loop(tiny_ckpt, kind):
    """_C.DecodeLayer runs a layer's ops in one call: bit-identical to the Python loop, over
    decode steps of some of the sequences, past seq_length (logn scaling on), a step that packs
    a prefill chunk with decode tokens, with int4 weights."""
    from qwen_fast.testing import tiny_config
    if kind == "int4":
        m = Engine.from_pretrained(load_format="dummy", config=tiny_config(), dtype="bfloat16",
                                   quant="int4", lm_head_quant="int8", backend="auto").model
    else:
        m = Engine.from_pretrained(tiny_ckpt, dtype=kind, backend="auto").model
    outs = []
    for fused in (True, False):
        m.fused_decode = fused
        batch = PagedBatch(m, 5, 128)
        prompt = list(range(1, 41))                      # 40 tokens: past seq_length 32
        batch.forward([prompt, prompt[:20], prompt[:33], prompt[:5]])
        steps = [batch.forward([[5 + i], [6 + i], [7 + i]], rows=[0, 2, 3]) for i in range(3)]
        steps.append(batch.forward([[9], prompt[:17], [8]], rows=[0, 4, 1]))   # mixed step
        outs.append(torch.cat(steps))
    assert m._decode_layers is not None
    assert torch.equal(outs[0], outs[1])


def test_the_reference_backend_never_takes_the_fused_path(tiny_ckpt):
    m = Engine.from_pretrained(tiny_ckpt, dtype="float32", backend="reference").model
    assert m._fused_layers() is None


# ---- out= of each op ---------------------------------------------------------------------------

def _bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


def _op_cases():
    x, w, b = _bf16(3, 64), _bf16(48, 64), _bf16(48)
    res, nw = _bf16(3, 64), _bf16(64)
    up, gate = _bf16(3, 40), _bf16(3, 40)
    q, kp, vp = _bf16(2, 4, 16), _bf16(3, 4, 8, 16), _bf16(3, 4, 8, 16)
    table = torch.tensor([[2, -1], [0, 1]], dtype=torch.int32)
    seq, pos = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([5, 12], dtype=torch.int32)
    return [
        ("linear", lambda **o: ops.linear(x, w, b, **o), (3, 48)),
        ("rms_norm", lambda **o: ops.rms_norm(x, nw, 1e-6, **o), (3, 64)),
        ("swiglu", lambda **o: ops.swiglu(up, gate, **o), (3, 40)),
        ("attention", lambda **o: ops.attention(q, kp, vp, table, seq, pos, **o), (2, 4, 16)),
        ("fused_add_rms_norm", lambda **o: ops.fused_add_rms_norm(x, res, nw, 1e-6, **o)[0],
         (3, 64)),
    ]


OP_CASES = [pytest.param(name, id=name) for name, _, _ in _op_cases()]


def _case(name):
    return next((fn, shape) for n, fn, shape in _op_cases() if n == name)


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("name", OP_CASES)
def test_out_receives_the_same_result(name, backend):
    fn, shape = _case(name)
    out = torch.full(shape, float("nan"), dtype=torch.bfloat16)
    got = fn(out=out, backend=backend)
    assert got is out or got.data_ptr() == out.data_ptr()
    assert torch.equal(out, fn(backend=backend))


@pytest.mark.parametrize("name", OP_CASES)
def test_bad_out_is_named(name):
    fn, shape = _case(name)
    with pytest.raises(RuntimeError, match=rf"{name}: out must have shape \[{', '.join(map(str, shape))}\]"):
        fn(out=torch.empty(*shape[:-1], shape[-1] + 1, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=rf"{name}: out must have dtype torch.bfloat16 .*got torch.float32"):
        fn(out=torch.empty(shape))
    wide = torch.empty(*shape[:-1], shape[-1] * 2, dtype=torch.bfloat16)[..., :shape[-1]]
    with pytest.raises(RuntimeError, match=rf"{name}: out must be contiguous"):
        fn(out=wide)


def test_out_may_not_overlap_an_input():
    x, w = _bf16(2, 64), _bf16(64, 64)
    with pytest.raises(RuntimeError, match="linear: out shares memory with x; pass a separate buffer"):
        ops.linear(x, w, out=x)
    up = _bf16(2, 40)
    with pytest.raises(RuntimeError, match="swiglu: out shares memory with gate"):
        ops.swiglu(_bf16(2, 40), up, out=up)


def test_fused_add_rms_norm_updates_the_residual_in_place():
    """residual_out=residual: the residual stream updated in place (what the model does every
    layer); any other buffer that overlaps an input is refused."""
    x, res, w = _bf16(3, 64), _bf16(3, 64), _bf16(64)
    want_out, want_res = ops.fused_add_rms_norm(x, res, w, 1e-6)
    out = torch.empty_like(x)
    got_out, got_res = ops.fused_add_rms_norm(x, res, w, 1e-6, out=out, residual_out=res)
    assert got_out.data_ptr() == out.data_ptr() and got_res.data_ptr() == res.data_ptr()
    assert torch.equal(out, want_out) and torch.equal(res, want_res)
    with pytest.raises(RuntimeError, match="fused_add_rms_norm: residual_out shares memory with x"):
        ops.fused_add_rms_norm(x, res, w, 1e-6, residual_out=x)
    with pytest.raises(RuntimeError, match="fused_add_rms_norm: out shares memory with residual_out"):
        r2 = torch.empty_like(x)
        ops.fused_add_rms_norm(x, res, w, 1e-6, out=r2, residual_out=r2)
