"""Public op wrappers: the contract (shapes, dtypes, rounding) of every compiled kernel.

Each op runs the compiled kernel for the tensor's device (qwen_fast._C: CPU, or CUDA when the
extension was built with nvcc), or the PyTorch reference with ``backend="reference"``. If the
extension cannot be imported, every op falls back to the reference with a one-time warning, so
the model still runs; ``HAVE_C`` and ``build_info()`` say which case this is.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from . import reference

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
           "fused_add_rms_norm", "linear"]

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


def _stream(x: torch.Tensor) -> int:
    """The current CUDA stream of x's device as an integer (0 for CPU tensors)."""
    return torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
             backend: str | None = None) -> torch.Tensor:
    """Qwen RMSNorm over the last dim: the spec is reference.rms_norm.

    x:      [..., hidden], bfloat16 / float16 / float32, last dim contiguous (rows may be a
            strided view, e.g. ``buf[:, :hidden]``).
    weight: [hidden], same dtype and device as x.
    Returns a new contiguous tensor shaped like x, in x.dtype:
        round(round(x * rsqrt(mean(x^2) + eps)) * weight), fp32 maths; the normalised value is
        rounded to x.dtype before the weight multiply, as in the Qwen release.
    backend: None runs the compiled kernel for x's device; "reference" the PyTorch reference.
    """
    if not _use_kernel("rms_norm", backend):
        return reference.rms_norm(x, weight, eps)
    return _C.rms_norm(x, weight, eps, _stream(x))


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-6, *,
                       backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm in one pass: the spec is reference.fused_add_rms_norm.

    x, residual: [..., hidden], same shape, dtype (bfloat16 / float16 / float32) and device,
                 last dim contiguous.
    weight:      [hidden], same dtype and device.
    Returns (out, residual_out), new contiguous tensors shaped like x:
        residual_out = round(residual + x)      (the updated residual stream)
        out          = rms_norm(residual_out, weight, eps)
    backend: None runs the compiled kernel for x's device; "reference" the PyTorch reference.
    """
    if not _use_kernel("fused_add_rms_norm", backend):
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    return _C.fused_add_rms_norm(x, residual, weight, eps, _stream(x))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           backend: str | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias: the spec is reference.linear.

    x:      [..., K], bfloat16 / float16 / float32, last dim contiguous (rows may be a strided
            view, e.g. ``buf[:, :K]``; leading dims are flattened, copied only if they must be).
    weight: [N, K] contiguous, same dtype and device as x.
    bias:   [N] or None, same dtype and device.
    Returns a new contiguous [..., N] tensor in x.dtype: products and sums in fp32, the bias
    added in fp32, rounded once. On the CPU our kernel streams the weights once (decode,
    small batches); above 48-128 rows of x (by dtype and K) torch's blocked GEMM is faster in
    bf16 and fp32 and runs instead; fp16 always runs ours (measurements in csrc/ops.cpp).
    CUDA tensors run torch.nn.functional.linear (no CUDA kernel yet).
    backend: None runs the compiled kernel; "reference" the PyTorch reference.
    """
    if not _use_kernel("linear", backend):
        return reference.linear(x, weight, bias)
    if x.is_cuda:
        return F.linear(x, weight, bias)
    return _C.linear(x, weight, bias)
