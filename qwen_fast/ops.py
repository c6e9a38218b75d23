"""Public op wrappers: the contract (shapes, dtypes, rounding) of every compiled kernel.

Each op runs the compiled kernel for the tensor's device (qwen_fast._C: CPU, or CUDA when the
extension was built with nvcc), or the PyTorch reference with ``backend="reference"``. If the
extension cannot be imported, every op falls back to the reference with a one-time warning, so
the model still runs; ``HAVE_C`` and ``build_info()`` say which case this is.
"""
from __future__ import annotations

import warnings

import torch

from . import reference
from .qweight import QuantWeight

try:
    from . import _C
except ImportError as exc:  # not built, or built against another torch
    _C = None
    IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    IMPORT_ERROR = None

HAVE_C = _C is not None
BACKENDS = (None, "reference")

__all__ = ["HAVE_C", "IMPORT_ERROR", "build_info", "cuda_device_count", "rms_norm",
           "fused_add_rms_norm", "rotary_embedding", "rotary_kv_cache", "swiglu", "attention",
           "linear", "quant_linear"]

_warned_fallback = False


def build_info() -> dict:
    """How the extension was built (see _C.build_info), or a CPU-less stand-in if it is missing.

    Keys: cuda (bool), cuda_archs (list[str]), nvcc_version (str | None), openmp (bool),
    openmp_threads (int), simd (str), compiler (str), torch_version (str); plus
    import_error (str) when the extension could not be imported.
    """
    if HAVE_C:
        return dict(_C.build_info())
    return {"cuda": False, "cuda_archs": [], "nvcc_version": None, "openmp": False,
            "openmp_threads": 1, "simd": "none", "compiler": "", "torch_version": torch.__version__,
            "import_error": IMPORT_ERROR}


def cuda_device_count() -> int:
    """CUDA devices the extension's own CUDA runtime sees (0 without a CUDA build or a GPU)."""
    return _C.cuda_device_count() if HAVE_C else 0


def _use_kernel(op: str, backend: str | None) -> bool:
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be None (the compiled kernel) or 'reference', "
                         f"got {backend!r}")
    if backend == "reference":
        return False
    if not HAVE_C:
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"qwen_fast._C could not be imported ({IMPORT_ERROR}); using the slow "
                          "PyTorch reference ops. Rebuild with `pip install --no-build-isolation "
                          "-e .`.", RuntimeWarning, stacklevel=3)
        return False
    return True


def _into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """result, or (the reference path given an output buffer) result copied into out."""
    if out is None:
        return result
    if out.shape != result.shape or out.dtype != result.dtype or out.device != result.device:
        raise ValueError(f"out must be a {result.dtype} tensor of shape {list(result.shape)} on "
                         f"{result.device}, got {out.dtype} {list(out.shape)} on {out.device}")
    return out.copy_(result)


def _stream(x: torch.Tensor) -> int:
    """The current CUDA stream of x's device as an integer (0 for CPU tensors)."""
    return torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
             out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Qwen RMSNorm over the last dim: the spec is reference.rms_norm.

    x:      [..., hidden], bfloat16 / float16 / float32, last dim contiguous (rows may be a
            strided view, e.g. ``buf[:, :hidden]``).
    weight: [hidden], same dtype and device as x.
    Returns a new contiguous tensor shaped like x, in x.dtype:
        round(round(x * rsqrt(mean(x^2) + eps)) * weight), fp32 maths; the normalised value is
        rounded to x.dtype before the weight multiply, as in the Qwen release.
    out: write the result there instead (contiguous, x's shape, dtype and device, overlapping
    no input); returned.
    backend: None runs the compiled kernel for x's device; "reference" the PyTorch reference.
    """
    if not _use_kernel("rms_norm", backend):
        return _into(reference.rms_norm(x, weight, eps), out)
    return _C.rms_norm(x, weight, eps, _stream(x), out=out)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-6, *, out: torch.Tensor | None = None,
                       residual_out: torch.Tensor | None = None,
                       backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm in one pass: the spec is reference.fused_add_rms_norm.

    x, residual: [..., hidden], same shape, dtype (bfloat16 / float16 / float32) and device,
                 last dim contiguous.
    weight:      [hidden], same dtype and device.
    Returns (out, residual_out), new contiguous tensors shaped like x:
        residual_out = round(residual + x)      (the updated residual stream)
        out          = rms_norm(residual_out, weight, eps)
    out, residual_out: buffers to write instead (contiguous, x's shape, dtype and device,
    overlapping no input), except that residual_out may be residual itself: the residual
    stream updated in place, as the decode loop does.
    backend: None runs the compiled kernel for x's device; "reference" the PyTorch reference.
    """
    if not _use_kernel("fused_add_rms_norm", backend):
        normed, h = reference.fused_add_rms_norm(x, residual, weight, eps)
        return _into(normed, out), _into(h, residual_out)
    return _C.fused_add_rms_norm(x, residual, weight, eps, _stream(x), out=out,
                                 residual_out=residual_out)


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                     backend: str | None = None) -> torch.Tensor:
    """GPT-NeoX ("rotate half") RoPE of q or k: the spec is reference.rotary_embedding.

    x:        [B, T, H, D], bfloat16 / float16 / float32, last dim contiguous; B, T and H may have
              any strides (the q/k views of ``qkv.view(B, T, 3, H, D).unbind(2)`` are read in
              place, not copied).
    cos, sin: [B, T, R] float32 on x's device, R even and <= D; dims R..D-1 pass through.
    Returns a new contiguous [B, T, H, D] tensor in x.dtype, bit-identical to the reference (on
    the GPU too: no FMA contraction there):
        round(x * cos + rotate_half(x) * sin), rotate_half(x) = cat(-x[..., R/2:R], x[..., :R/2]),
        fp32 maths with each product rounded before the add, one rounding to x.dtype.
    backend: None runs the compiled kernel for x's device; "reference" the PyTorch reference.
    """
    if not _use_kernel("rotary_embedding", backend):
        return reference.rotary_embedding(x, cos, sin)
    return _C.rotary_embedding(x, cos, sin, _stream(x))


def rotary_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                    page_table: torch.Tensor, token_seq: torch.Tensor, token_pos: torch.Tensor, *,
                    out: torch.Tensor | None = None, backend: str | None = None,
                    k_scales: torch.Tensor | None = None,
                    v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE of q and k, the rotated keys and the values written straight into a paged KV cache:
    the spec is reference.rotary_kv_cache (one pass instead of two rotations and two copies).

    q, k, v:          [N, H, D], the step's N packed tokens: views with the same strides (of the
                      fused qkv output: ``qkv.view(N, 3, H, D).unbind(1)``), head dim contiguous.
    cos, sin:         [N, R] float32, each token's table row (R even, <= D).
    k_pages, v_pages: [pages, H, P, D] contiguous, the layer's page pool.
    page_table:       [sequences, max_pages] int32; token_seq, token_pos: [N] int32, each
                      token's sequence (a page_table row) and absolute position, all on q's device.
                      Token i's key and value go to page page_table[token_seq[i], token_pos[i] // P]
                      at offset token_pos[i] % P. On the CPU every page written is checked.
    Returns rotary_embedding(q, cos, sin), bit-identical, new or written into out.
    backend: None runs the compiled kernel for q's device; "reference" the PyTorch reference.
    An int8 cache: k_pages/v_pages int8 with k_scales/v_scales [pages, H, P, G] float32 (both,
    contiguous; G scales a position and head, each for D // G elements): the kernel writes
    reference.quantize_kv's codes and scales of the rotated key (rounded to q.dtype first) and
    of the value, bit-identical to reference.rotary_kv_cache.
    """
    if not _use_kernel("rotary_kv_cache", backend):
        return _into(reference.rotary_kv_cache(q, k, v, cos, sin, k_pages, v_pages, page_table,
                                               token_seq, token_pos, k_scales, v_scales), out)
    return _C.rotary_kv_cache(q, k, v, cos, sin, k_pages, v_pages, page_table, token_seq,
                              token_pos, _stream(q), out=out, k_scales=k_scales,
                              v_scales=v_scales)


def swiglu(up: torch.Tensor, gate: torch.Tensor, *, out: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """Qwen MLP activation up * silu(gate): the spec is reference.swiglu.

    up, gate: [..., F] (F = 5504 for Qwen-1.8B; up = w1(x), gate = w2(x)), same shape and dtype
              (bfloat16 / float16 / float32), last dim contiguous (rows may be strided, e.g. a
              column slice of a wider tensor).
    Returns a new contiguous tensor shaped like up, in up.dtype:
        round(up * round(gate / (1 + exp(-gate)))), fp32 maths rounded where torch's CPU silu
        and mul round in that dtype (no rounding for float32). On the CPU exp is SLEEF's
        expf_u10, torch's vectorised CPU exp, so the result equals torch's vector path bit for
        bit; elements that torch computes in its scalar tail (libm expf) may differ by an fp32
        ulp before rounding. On the GPU exp is CUDA's expf (within 2 fp32 ulp): an fp32 result
        may differ from the reference by a few ulp, a 16-bit one by one ulp in rare elements.
    out: write the result there instead (contiguous, up's shape, dtype and device, overlapping
    neither input).
    backend: None runs the compiled kernel for up's device; "reference" the PyTorch reference.
    """
    if not _use_kernel("swiglu", backend):
        return _into(reference.swiglu(up, gate), out)
    return _C.swiglu(up, gate, _stream(up), out=out)


def attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
              page_table: torch.Tensor, token_seq: torch.Tensor, token_pos: torch.Tensor,
              scale: float | None = None, *, max_keys: int | None = None,
              out: torch.Tensor | None = None, backend: str | None = None,
              k_scales: torch.Tensor | None = None,
              v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Causal multi-head attention over a paged KV cache: the spec is reference.attention.

    q:                [N, H, D] the queries of the step's N packed tokens, bfloat16 / float16 /
                      float32, head dim contiguous.
    k_pages, v_pages: [pages, H, P, D] contiguous, the layer's page pool, already holding this
                      step's keys and values.
    page_table:       [sequences, max_pages] int32; token_seq, token_pos: [N] int32, on q's device.
    Token i sees the keys 0 .. token_pos[i] of sequence token_seq[i] (so one token per sequence
    is a decode step, consecutive tokens a prefill chunk, and a step may pack both). Scores,
    softmax and the weighted sum in fp32; returns a new [N, H, D] tensor in q.dtype. max_keys:
    at least max(token_pos) + 1 (computed when omitted, a device sync on CUDA); the CUDA kernel
    splits long rows' keys over several blocks (flash-decoding) by it. On the CPU every page id
    read is checked.
    backend: None runs the compiled kernel for q's device (CPU or CUDA); "reference" the
    PyTorch reference. An int8 cache: k_pages/v_pages int8 with k_scales/v_scales [pages, H, P,
    G] float32 (see rotary_kv_cache), read as code * scale in fp32; the CPU kernel applies each
    scale once per group of a key (fp32 sums in another order than the reference's, within the
    attention tolerance) and gives a token the same bits however the step is chunked. bf16 q
    with head dim 128 and G = 1 (the default cache) runs integer dot products on AVX-512 VNNI:
    q split into two int16 parts (within max|q| * 2^-31) and each key block's softmax weights
    rounded to 16 bits, far below bf16's rounding of the output (csrc/cpu/attention.cpp).
    """
    if not _use_kernel("attention", backend):
        return _into(reference.attention(q, k_pages, v_pages, page_table, token_seq, token_pos,
                                         scale, k_scales, v_scales), out)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if max_keys is None:
        max_keys = int(token_pos.max()) + 1 if token_pos.numel() else 1
    return _C.attention(q, k_pages, v_pages, page_table, token_seq, token_pos, max_keys, scale,
                        _stream(q), out=out, k_scales=k_scales, v_scales=v_scales)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias: the spec is reference.linear.

    x:      [..., K], bfloat16 / float16 / float32, last dim contiguous (rows may be a strided
            view, e.g. ``buf[:, :K]``; leading dims are flattened, copied only if they must be).
    weight: [N, K] contiguous, same dtype and device as x.
    bias:   [N] or None, same dtype and device.
    Returns a new contiguous [..., N] tensor in x.dtype: products and sums in fp32, the bias
    added in fp32, rounded once. On the CPU our kernel streams the weights once (decode,
    small batches); above 48-128 rows of x (by dtype and K) torch's blocked GEMM is faster in
    bf16 and fp32 and runs instead; fp16 always runs ours (measurements in csrc/ops/linear.cpp).
    CUDA tensors run our weight-streaming GEMV (csrc/cuda/linear.cu) up to 16 rows of x, torch's
    GEMM (cuBLAS) beyond, on the current stream.
    out: write the result there instead (contiguous, [..., N], x's dtype, overlapping no input).
    weight may also be a qwen_fast.qweight.QuantWeight (int4/int8): then this is quant_linear.
    backend: None runs the compiled kernel; "reference" the PyTorch reference.
    """
    if isinstance(weight, QuantWeight):
        return quant_linear(x, weight, bias, out=out, backend=backend)
    if not _use_kernel("linear", backend):
        return _into(reference.linear(x, weight, bias), out)
    return _C.linear(x, weight, bias, _stream(x), out=out)


def quant_linear(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None, *,
                 out: torch.Tensor | None = None, isa: str = "auto",
                 backend: str | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for an int4/int8 weight (int4_gemm / int8_gemm): the spec is
    reference.linear on weight.dequantize() (the dense weight).

    x:      [..., K] bfloat16 / float16 / float32 on the CPU or a CUDA device, last dim
            contiguous.
    weight: a QuantWeight [N, K] (qwen_fast/qweight.py: the kernel layout) on x's device
            (move it with weight.to(device)).
    bias:   [N] in x's dtype, or None.
    Returns a new contiguous [..., N] tensor in x.dtype (or writes out). The CPU kernel quantizes
    x to int8 per row and 128-input chunk (sx = max|x| / 127; |x - sx * x8| <= sx / 2), sums
    the products exactly in int32 and scales them in fp32: each output differs from the
    reference on the dequantized weight by at most sum_k |W[n, k]| * sx(k) / 2, plus fp32
    rounding (tests/test_quant_linear.py checks that bound). The CUDA kernel (up to 16 rows of
    x) does fp32 maths on the exactly dequantized weights, as reference.linear on
    weight.dequantize() (fp32) does, rounded once; beyond 16 rows it dequantizes the weight to
    x.dtype and runs torch's GEMM (as the reference backend does). isa: "auto", "avx512_vnni",
    "avx2" or "scalar" (the CPU's portable loop), to test each CPU path.
    backend: None runs the compiled CPU kernel; "reference" the dense reference (it builds the
    dequantized weight for the call).
    """
    if not _use_kernel("quant_linear", backend):
        return _into(reference.linear(x, weight.dequantize(x.dtype).to(x.device), bias), out)
    return _C.quant_linear(x, weight.data, weight.bits, weight.in_features,
                           weight.out_features, bias, weight.perm, _stream(x), isa, out=out)
