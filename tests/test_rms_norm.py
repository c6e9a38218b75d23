"""rms_norm and fused_add_rms_norm: every backend against reference.py, over dtypes and shapes.

The reference always runs on the CPU (it is the spec); kernels run on the device of the case.
Besides the tolerance table, 16-bit outputs must be bit-identical to the reference in almost all
elements: the kernels round at the reference's points, and only the fp32 order of the sum of
squares differs, which moves an element across a rounding boundary very rarely. A kernel that
skipped the rounding of the normalised value would still pass the tolerance, not this.
"""
from __future__ import annotations

import pytest
import torch

from qwen_fast import ops, reference
from kernel_cases import DTYPES, case_generator, devices, kernel_op, tensor_device
from tolerances import assert_close

EPS = 1e-6
# Share of 16-bit output elements allowed to differ in any bit from the reference (see above).
MAX_INEXACT_FRACTION = 0.01

CUDA_READY = ops.HAVE_C and ops.build_info()["cuda"] and torch.cuda.is_available()
CUDA_SKIP_REASON = ("needs a CUDA GPU, a CUDA build of torch and qwen_fast._C built with nvcc "
                    f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
                    f"_C cuda={ops.build_info()['cuda']})")

pytestmark = pytest.mark.usefixtures("require_extension")

DEVICES = devices(CUDA_READY, CUDA_SKIP_REASON, simt=True)

# (id, shape of x, how x is laid out in memory). Qwen-1.8B's hidden size is 2048.
LAYOUTS = [
    ("1x2048", (1, 2048), "contiguous"),        # decode step
    ("7x2048", (7, 2048), "contiguous"),        # short prefill
    ("83x769", (83, 769), "contiguous"),        # odd hidden: no vector path on the GPU
    ("3x5125", (3, 5125), "contiguous"),        # hidden > 1024 threads x 1 element
    ("1x1", (1, 1), "contiguous"),
    ("2x3x2048", (2, 3, 2048), "contiguous"),   # [batch, seq, hidden]
    ("strided_5x2048_of_2560", (5, 2048), "strided"),         # x[:, :2048] of a wider buffer
    ("strided_7x769_of_1000_at_1", (7, 769), "strided_offset"),  # unaligned start and stride
    ("transposed_2x3x2048", (2, 3, 2048), "transposed"),      # leading dims do not collapse
]
SHAPES = [pytest.param(shape, layout, id=name) for name, shape, layout in LAYOUTS]


def _make(shape, layout, dtype, device, gen) -> torch.Tensor:
    """A tensor of `shape` (values ~ N(0, 2^2)) in the requested memory layout."""
    def randn(*size):
        return (2 * torch.randn(*size, generator=gen)).to(dtype)

    if layout == "contiguous":
        t = randn(*shape)
    elif layout == "strided":
        t = randn(*shape[:-1], shape[-1] + 512)[..., : shape[-1]]
    elif layout == "strided_offset":
        t = randn(*shape[:-1], 1000)[..., 1: 1 + shape[-1]]
    elif layout == "transposed":
        t = randn(shape[1], shape[0], shape[2]).transpose(0, 1)
    else:
        raise ValueError(layout)
    assert tuple(t.shape) == tuple(shape)
    return t.to(tensor_device(device))


def _check_mostly_exact(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if expected.dtype == torch.float32:
        return  # an fp32 output carries the reduction-order difference in its last bits
    inexact = (actual.cpu() != expected).float().mean().item()
    assert inexact <= MAX_INEXACT_FRACTION, (
        f"{what}: {inexact:.2%} of elements differ from the reference in some bit "
        f"(at most {MAX_INEXACT_FRACTION:.0%} expected from a different sum order)")


@pytest.mark.parametrize("shape,layout", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_matches_reference(device, dtype, shape, layout, request):
    gen = case_generator(request)
    x = _make(shape, layout, dtype, device, gen)
    weight = _make(shape[-1:], "contiguous", dtype, device, gen)

    out = kernel_op(device, "rms_norm")(x, weight, EPS)

    expected = reference.rms_norm(x.cpu(), weight.cpu(), EPS)
    assert out.device == x.device and out.is_contiguous()
    assert_close(out, expected, "rms_norm", msg=request.node.name)
    _check_mostly_exact(out, expected, request.node.name)


@pytest.mark.parametrize("shape,layout", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_add_rms_norm_matches_reference(device, dtype, shape, layout, request):
    gen = case_generator(request)
    x = _make(shape, layout, dtype, device, gen)
    # The residual stream has its own layout: contiguous, so that x and residual differ.
    residual = _make(shape, "contiguous", dtype, device, gen)
    weight = _make(shape[-1:], "contiguous", dtype, device, gen)

    out, residual_out = kernel_op(device, "fused_add_rms_norm")(x, residual, weight, EPS)

    expected_out, expected_residual = reference.fused_add_rms_norm(
        x.cpu(), residual.cpu(), weight.cpu(), EPS)
    # residual + x is one fp32 add and one rounding: exact whatever the backend.
    assert torch.equal(residual_out.cpu(), expected_residual), request.node.name
    assert residual_out.device == x.device and out.device == x.device
    assert_close(out, expected_out, "fused_add_rms_norm", msg=request.node.name)
    _check_mostly_exact(out, expected_out, request.node.name)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_READY, reason=CUDA_SKIP_REASON)
def test_cuda_kernels_run_on_the_current_stream():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2048, generator=gen).to(torch.bfloat16).cuda()
    w = torch.randn(2048, generator=gen).to(torch.bfloat16).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ops.rms_norm(x, w, EPS)
        out2, h = ops.fused_add_rms_norm(x, x, w, EPS)
    stream.synchronize()
    assert_close(out, reference.rms_norm(x.cpu(), w.cpu(), EPS), "rms_norm", msg="side stream")
    expected_out2, expected_h = reference.fused_add_rms_norm(x.cpu(), x.cpu(), w.cpu(), EPS)
    assert torch.equal(h.cpu(), expected_h)
    assert_close(out2, expected_out2, "fused_add_rms_norm", msg="side stream")


@pytest.mark.parametrize("backend", ["reference", None])
def test_backend_argument_routes(backend):
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    out = ops.rms_norm(x, w, EPS, backend=backend)
    out2, h = ops.fused_add_rms_norm(x, x, w, EPS, backend=backend)
    ref_out2, ref_h = reference.fused_add_rms_norm(x, x, w, EPS)
    if backend == "reference":  # the wrapper must call the reference itself
        assert torch.equal(out, reference.rms_norm(x, w, EPS)) and torch.equal(out2, ref_out2)
    assert torch.equal(h, ref_h)
    with pytest.raises(ValueError, match="backend must be None"):
        ops.rms_norm(x, w, EPS, backend="cuda")


def test_empty_inputs():
    w = torch.randn(2048, dtype=torch.bfloat16)
    x = torch.empty(0, 2048, dtype=torch.bfloat16)
    assert ops.rms_norm(x, w).shape == (0, 2048)
    out, h = ops.fused_add_rms_norm(x, x, w)
    assert out.shape == h.shape == (0, 2048)


def _x(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("call,error", [
    pytest.param(lambda: ops.rms_norm(_x(7, 2048), _x(1024)),
                 r"rms_norm: weight must have shape \[2048\] \(hidden size of x\), got \[1024\]",
                 id="weight_shape"),
    pytest.param(lambda: ops.rms_norm(_x(7, 2048), _x(1, 2048)),
                 r"rms_norm: weight must have shape \[2048\] \(hidden size of x\), got \[1, 2048\]",
                 id="weight_2d"),
    pytest.param(lambda: ops.rms_norm(_x(7, 2048), _x(2048, dtype=torch.float32)),
                 r"rms_norm: weight must have dtype torch.bfloat16 \(the dtype of x\), "
                 r"got torch.float32", id="weight_dtype"),
    pytest.param(lambda: ops.rms_norm(_x(7, 2048), _x(4096)[::2]),
                 r"rms_norm: weight must be contiguous", id="weight_strided"),
    pytest.param(lambda: ops.rms_norm(_x(7, 4096)[:, ::2], _x(2048)),
                 r"rms_norm: x must have a contiguous last dim \(stride 1\), got stride 2",
                 id="x_last_dim_strided"),
    pytest.param(lambda: ops.rms_norm(_x(7, 2048, dtype=torch.float64),
                                      _x(2048, dtype=torch.float64)),
                 r"rms_norm: x must have dtype torch.bfloat16, torch.float16 or torch.float32, "
                 r"got torch.float64", id="x_dtype"),
    pytest.param(lambda: ops.rms_norm(torch.tensor(1.0), _x(1, dtype=torch.float32)),
                 r"rms_norm: x must have shape \[\.\.\., hidden\], got a 0-dim tensor",
                 id="x_0d"),
    pytest.param(lambda: ops.rms_norm(_x(7, 2048).to("meta"), _x(2048).to("meta")),
                 r"rms_norm: x must be a CPU or CUDA tensor, got device meta", id="x_device"),
    pytest.param(lambda: ops.fused_add_rms_norm(_x(7, 2048), _x(6, 2048), _x(2048)),
                 r"fused_add_rms_norm: residual must have shape \[7, 2048\] \(the shape of x\), "
                 r"got \[6, 2048\]", id="fused_residual_shape"),
    pytest.param(lambda: ops.fused_add_rms_norm(_x(7, 2048), _x(7, 2048, dtype=torch.float16),
                                                _x(2048)),
                 r"fused_add_rms_norm: residual must have dtype torch.bfloat16 \(the dtype of x\), "
                 r"got torch.float16", id="fused_residual_dtype"),
    pytest.param(lambda: ops.fused_add_rms_norm(_x(7, 2048), _x(7, 4096)[:, ::2], _x(2048)),
                 r"fused_add_rms_norm: residual must have a contiguous last dim",
                 id="fused_residual_strided"),
    pytest.param(lambda: ops.fused_add_rms_norm(_x(7, 2048), _x(7, 2048), _x(2047)),
                 r"fused_add_rms_norm: weight must have shape \[2048\] \(hidden size of x\), "
                 r"got \[2047\]", id="fused_weight_shape"),
])
def test_bad_arguments_are_named(call, error):
    with pytest.raises(RuntimeError, match=error):
        call()
