"""The GPTQ solver (qwen_fast/gptq_solver.py): round-to-nearest exactly when the inputs are
uncorrelated, less output error than round-to-nearest when they are not, act-order g_idx, dead
inputs, and files the loader reads."""
import pytest
import torch

from qwen_fast.gptq import dequantize_gptq, quantize_rtn, unpack_gptq
from qwen_fast.gptq_solver import accumulate_hessian, quantize_gptq
from qwen_fast.qweight import QuantWeight


def _correlated_inputs(n, k, seed=0):
    """Inputs with a few strong directions and uneven scales, like a layer's activations: one
    distribution (a fixed basis), samples drawn with `seed`."""
    basis = torch.randn(k, k, generator=torch.Generator().manual_seed(1234))
    scale = torch.logspace(1, -2, k)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * scale) @ basis / k ** 0.5


def _out_err(x, w, packed, bits):
    wq = dequantize_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits)
    return float((x @ (w - wq).T).pow(2).mean())


def test_identity_hessian_is_round_to_nearest():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    for bits, gs, sym in ((4, 128, True), (8, 128, False), (4, -1, True)):
        got = quantize_gptq(w, torch.eye(256, dtype=torch.float64), bits, gs, sym, damp=0.01)
        want = quantize_rtn(w, bits, gs, sym)
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(got[key], want[key]), (bits, gs, sym, key)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_less_output_error_than_rtn(bits, act_order):
    k, n = 256, 96
    x = _correlated_inputs(2048, k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2)) * 0.05
    h, count = accumulate_hessian(x[:1024])
    h, count = accumulate_hessian(x[1024:], h, count)
    assert count == 2048
    want = 2 * x.double().T @ x.double() / 2048
    # x^T x in float32 (accumulate_hessian's choice): within float32's rounding of the sums
    assert float((h - want).abs().max()) <= 1e-6 * float(want.abs().max())
    held = _correlated_inputs(512, k, seed=7)          # error measured on other inputs too
    rtn = quantize_rtn(w, bits, 128, True)
    gq = quantize_gptq(w, h, bits, 128, True, act_order=act_order)
    assert _out_err(x, w, gq, bits) < 0.7 * _out_err(x, w, rtn, bits)
    assert _out_err(held, w, gq, bits) < 0.8 * _out_err(held, w, rtn, bits)
    gi = gq["g_idx"]
    if act_order:
        assert not torch.equal(gi, torch.arange(k, dtype=torch.int32) // 128)
        assert sorted(torch.bincount(gi).tolist()) == [128, 128]
    else:
        assert torch.equal(gi, torch.arange(k, dtype=torch.int32) // 128)
    # The loader's kernel layout reads it (act-order inputs sorted by group), to the same weights.
    qw = QuantWeight.from_components(*unpack_gptq(gq["qweight"], gq["qzeros"], gq["scales"],
                                                  gq["g_idx"], bits), bits)
    assert torch.equal(qw.dequantize(torch.float32), dequantize_gptq(
        gq["qweight"], gq["qzeros"], gq["scales"], gq["g_idx"], bits))


def test_dead_inputs_and_bad_arguments():
    k, n = 128, 32
    x = _correlated_inputs(256, k)
    x[:, 5] = 0                                         # an input never active
    w = torch.randn(n, k)
    h, _ = accumulate_hessian(x)
    out = quantize_gptq(w, h, 4, 128)
    wq = dequantize_gptq(out["qweight"], out["qzeros"], out["scales"], out["g_idx"], 4)
    assert torch.isfinite(wq).all() and torch.all(wq[:, 5] == 0)
    with pytest.raises(ValueError, match=r"h must be the \[K, K\] = \[128, 128\]"):
        quantize_gptq(w, h[:64, :64], 4, 128)
    with pytest.raises(ValueError, match="damp must be"):
        quantize_gptq(w, h, 4, 128, damp=0.0)
    with pytest.raises(ValueError, match="finite"):
        quantize_gptq(w, h * float("nan"), 4, 128)
