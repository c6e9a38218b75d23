"""The ops' CUDA kernels run by the SIMT emulator (qwen_fast._simt, csrc/simt) on CPU tensors,
with the signatures of qwen_fast.ops: the per-op tests call them for their "simt" device
(kernel_cases.kernel_op). Each allocates its outputs, lays its inputs out as the CUDA binding
would pass them, and calls the kernel's launcher through the emulator."""
from __future__ import annotations

import torch

try:
    from qwen_fast import _simt
    HAVE_SIMT, SKIP = True, ""
except ImportError as e:  # the package was built before the emulator existed, or without it
    _simt, HAVE_SIMT, SKIP = None, False, f"qwen_fast._simt is not built: {e}"


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D [rows, hidden] view with unit last stride and one row stride, as csrc/ops/
    passes it: a strided view of a wider buffer is kept as it is; leading dims that do not
    collapse are copied."""
    if x.dim() == 1:
        return x[None]
    if x.dim() == 2:
        return x
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.contiguous().view(-1, x.shape[-1])


def rms_norm(x, weight, eps=1e-6):
    out = torch.empty(x.shape, dtype=x.dtype)
    _simt.rms_norm(as_rows(out), as_rows(x), weight, eps)
    return out


def fused_add_rms_norm(x, residual, weight, eps=1e-6):
    out = torch.empty(x.shape, dtype=x.dtype)
    residual_out = torch.empty(x.shape, dtype=x.dtype)
    _simt.fused_add_rms_norm(as_rows(out), as_rows(residual_out), as_rows(x), as_rows(residual),
                             weight, eps)
    return out, residual_out


# ---- rotary_embedding, rotary_kv_cache -------------------------------------------------------
def rotary_embedding(x, cos, sin):
    out = torch.empty(x.shape, dtype=x.dtype)
    _simt.rotary_embedding(out, x, cos.contiguous(), sin.contiguous())
    return out


def rotary_kv_cache(q, k, v, cos, sin, k_pages, v_pages, page_table, token_seq, token_pos, *,
                    out=None):
    # The binding checks nothing: the csrc/ops/ checks (shapes, strides, pages in range) are the
    # CPU path's, tested there. q, k, v must share their strides (views of one qkv buffer).
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype)
    _simt.rotary_kv_cache(out, k_pages, v_pages, q, k, v, cos.contiguous(), sin.contiguous(),
                          page_table, token_seq.contiguous(), token_pos.contiguous())
    return out


# ---- swiglu ----------------------------------------------------------------------------------
def swiglu(up, gate, *, out=None):
    if out is None:
        out = torch.empty(up.shape, dtype=up.dtype)
    _simt.swiglu(as_rows(out), as_rows(up), as_rows(gate))
    return out



# ---- linear ----------------------------------------------------------------------------------
def linear(x, weight, bias=None):
    y = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype)
    _simt.linear(as_rows(y), as_rows(x), weight, bias)
    return y


# ---- quant_linear ----------------------------------------------------------------------------
def quant_linear(x, weight, bias=None):
    """weight: a qwen_fast.qweight.QuantWeight (its data and perm passed as they are)."""
    y = torch.empty(*x.shape[:-1], weight.out_features, dtype=x.dtype)
    _simt.quant_linear(as_rows(y), as_rows(x), weight.data, weight.bits, weight.out_features,
                       bias, weight.perm)
    return y


def quant_linear_dequantize(weight, dtype):
    """The dense [N, K] weight in dtype, as QuantWeight.dequantize(dtype)."""
    out = torch.empty(weight.out_features, weight.in_features, dtype=dtype)
    _simt.quant_linear_dequantize(out, weight.data, weight.bits, weight.perm)
    return out


# ---- attention -------------------------------------------------------------------------------


def _attention(launch, q, cache, page_table, token_seq, token_pos, scale, out):
    """launch(out, q, *cache, page_table, token_seq, token_pos, max_keys, scale, workspace) with
    the workspace the plan needs, NaN-filled (a partial the combine reads before a split block
    wrote it shows)."""
    N, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    max_keys = int(token_pos.max()) + 1 if token_pos.numel() else 1
    if out is None:
        out = torch.empty(N, H, D, dtype=q.dtype)
    ws = torch.full((_simt.attention_workspace_bytes(N, H, D, max_keys) // 4,), float("nan"))
    launch(out, q, *cache, page_table, token_seq.contiguous(), token_pos.contiguous(), max_keys,
           scale, ws.view(torch.uint8))
    return out


def attention(q, k_pages, v_pages, page_table, token_seq, token_pos, scale=None, *, out=None):
    return _attention(_simt.attention, q, (k_pages, v_pages), page_table, token_seq, token_pos,
                      scale, out)


# ---- the int8 KV cache (reference.rotary_kv_cache / attention with k_scales, v_scales) ------
def rotary_kv_cache_int8(q, k, v, cos, sin, k_pages, v_pages, k_scales, v_scales, page_table,
                         token_seq, token_pos, *, out=None):
    """k_pages, v_pages int8 [pages, H, P, D] and k_scales, v_scales fp32 [pages, H, P, G]
    (contiguous), written in place; returns the rotated q. Unchecked, as rotary_kv_cache."""
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype)
    _simt.rotary_kv_cache_int8(out, k_pages, v_pages, k_scales, v_scales, q, k, v,
                               cos.contiguous(), sin.contiguous(), page_table,
                               token_seq.contiguous(), token_pos.contiguous())
    return out


def attention_int8(q, k_pages, v_pages, k_scales, v_scales, page_table, token_seq, token_pos,
                   scale=None, *, out=None):
    """attention over an int8 cache (k_scales, v_scales fp32 [pages, H, P, G], contiguous)."""
    return _attention(_simt.attention_int8, q, (k_pages, v_pages, k_scales, v_scales), page_table,
                      token_seq, token_pos, scale, out)
