"""swiglu: the compiled kernels against reference.py, over dtypes, shapes and layouts.

reference.swiglu is torch's up * silu(gate). Torch's CPU silu computes g / (1 + exp(-g)) in fp32
with its vectorised exp (SLEEF's expf_u10 on AVX2 / AVX-512) but handles the last few elements
of each contiguous run (n mod 2 x vector width, per thread chunk) with libm's scalar expf, which
differs from SLEEF by up to an fp32 ulp in a few per cent of inputs. The CPU kernel uses
SLEEF's algorithm everywhere, so:
  * against the reference it is within the default tolerance table (fp32 silu off by a few ulp
    where torch used libm, 16-bit outputs rarely off by one ulp), and
  * against torch's vector path applied to every element (_silu_vector_path) it is bit-exact.

The CUDA kernel (device "cuda", and run by the SIMT emulator: device "simt") rounds at the same
points but takes exp from CUDA's expf, within 2 fp32 ulp of exp (CUDA's documented bound; the
emulator uses the host's libm expf). It is compared with the default tolerance of
tests/tolerances.py, which that difference fits: the fp32 silu g / (1 + e) then differs by at
most ~3 fp32 ulp and an fp32 output, up * silu, by ~4 ulp (4 * 2^-23 relative, under the
4e-6 rtol); a 16-bit silu at worst rounds to the neighbouring value (1 ulp of the dtype), which
moves the rounded product by at most 2 ulp = 2 * eps relative, the rtol. So no override.
(Checked by moving exp(-g) 2 ulp either way over 4M random inputs per dtype: the worst element
used 29% of the fp16 tolerance, 9% of fp32's, 1% of bf16's.)
The CUDA kernel moves 16-byte vectors when the row length, the row strides and the pointers
allow, else single elements: the 5504-wide layouts take the vector path, the 3x1, 7x7, 5x83,
3x769, 2x5125, strided-at-offset and transposed (83) ones the scalar path.
"""
from __future__ import annotations

import pytest
import torch

from qwen_fast import ops, reference
from kernel_cases import DTYPES, case_generator, devices, kernel_op, tensor_device
from tolerances import assert_close

CUDA_READY = ops.HAVE_C and ops.build_info()["cuda"] and torch.cuda.is_available()
CUDA_SKIP_REASON = ("needs a CUDA GPU, a CUDA build of torch and qwen_fast._C built with nvcc "
                    f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
                    f"_C cuda={ops.build_info()['cuda']})")
DEVICES = devices(CUDA_READY, CUDA_SKIP_REASON, simt=True)
GPU_DEVICES = [d for d in DEVICES if d.values[0] != "cpu"]   # the CUDA kernel: cuda, simt
# Where torch's Vectorized<float>::exp is SLEEF's expf_u10 (elsewhere it may be libm's expf).
CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()
SLEEF_EXP = CPU_CAPABILITY.startswith(("AVX2", "AVX512"))
NO_SLEEF_REASON = (f"torch's CPU capability here is {CPU_CAPABILITY}, whose vectorised exp may "
                   "not be SLEEF's expf_u10")

# (id, shape of up/gate, layout). Qwen-1.8B's intermediate size (per half of the MLP) is 5504.
LAYOUTS = [
    ("1x5504", (1, 5504), "contiguous"),                  # decode step
    ("16x5504", (16, 5504), "contiguous"),                # batch of decode steps
    ("128x5504", (128, 5504), "contiguous"),              # prefill
    ("2x3x5504", (2, 3, 5504), "contiguous"),             # [batch, seq, F]
    ("3x1", (3, 1), "contiguous"),
    ("7x7", (7, 7), "contiguous"),
    ("5x83", (5, 83), "contiguous"),
    ("3x769", (3, 769), "contiguous"),
    ("2x5125", (2, 5125), "contiguous"),
    ("halves_of_7x11008", (7, 5504), "halves"),          # up, gate = two halves of one buffer
    ("strided_5x769_of_1000_at_1", (5, 769), "strided_offset"),  # unaligned start and stride
    ("transposed_2x3x83", (2, 3, 83), "transposed"),      # leading dims do not collapse
]
SHAPES = [pytest.param(shape, layout, id=name) for name, shape, layout in LAYOUTS]


def _make(shape, layout, dtype, gen, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(up, gate) of `shape` in the requested layout, views of buffers on `device` (a kernel
    test device: "simt" tensors live on the CPU); gate ~ N(0, 4^2) spans silu's bend and tails."""
    def randn(*size, scale):
        return (scale * torch.randn(*size, generator=gen)).to(dtype).to(tensor_device(device))

    F = shape[-1]
    if layout == "contiguous":
        up, gate = randn(*shape, scale=2), randn(*shape, scale=4)
    elif layout == "halves":
        buf = randn(*shape[:-1], 2 * F, scale=4)
        up, gate = buf[..., :F], buf[..., F:]
    elif layout == "strided_offset":
        up = randn(*shape[:-1], 1000, scale=2)[..., 1:1 + F]
        gate = randn(*shape[:-1], 1000, scale=4)[..., 3:3 + F]
    elif layout == "transposed":
        up = randn(shape[1], shape[0], F, scale=2).transpose(0, 1)
        gate = randn(shape[1], shape[0], F, scale=4).transpose(0, 1)
    else:
        raise ValueError(layout)
    assert tuple(up.shape) == tuple(gate.shape) == tuple(shape)
    return up, gate


def _silu_vector_path(gate: torch.Tensor) -> torch.Tensor:
    """torch's CPU silu with every element on its vectorised path: flat chunks of 16384 elements
    (a multiple of 2 x any vector width, and below torch's 32768-element grain, so one thread
    takes a whole chunk and no scalar tail is left)."""
    chunk = 16384
    flat = gate.reshape(-1)
    n = flat.numel()
    padded = torch.cat((flat, flat.new_zeros(-n % chunk)))
    silu = torch.cat([torch.nn.functional.silu(c) for c in padded.split(chunk)])
    return silu[:n].view(gate.shape)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place between finite a and b (same dtype)."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    ia, ib = a.view(bits[a.dtype]).long(), b.view(bits[b.dtype]).long()
    # Map sign-magnitude bit patterns onto a monotonic integer line.
    top = 1 << (8 * a.element_size() - 1)
    ia = torch.where(ia < 0, -(ia + top), ia)
    ib = torch.where(ib < 0, -(ib + top), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


@pytest.fixture(autouse=True)
def _require_extension():
    assert ops.HAVE_C, f"qwen_fast._C is not built: {ops.IMPORT_ERROR}"


@pytest.mark.parametrize("shape,layout", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_matches_reference(device, dtype, shape, layout, request):
    gen = case_generator(request)
    up, gate = _make(shape, layout, dtype, gen, device)

    out = kernel_op(device, "swiglu")(up, gate)

    assert out.is_contiguous() and out.device == up.device and out.shape == up.shape
    assert_close(out, reference.swiglu(up.cpu(), gate.cpu()), "swiglu", msg=request.node.name)


@pytest.mark.skipif(not SLEEF_EXP, reason=NO_SLEEF_REASON)
@pytest.mark.parametrize("shape,layout", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_is_bit_exact_with_torch_vector_path(dtype, shape, layout, request):
    gen = case_generator(request)
    up, gate = _make(shape, layout, dtype, gen)

    out = ops.swiglu(up, gate)

    exact = up * _silu_vector_path(gate)
    assert torch.equal(out, exact), (
        f"{request.node.name}: {(out != exact).sum().item()} elements differ from torch's "
        f"vectorised silu, by up to {_ulps(out, exact)} ulp")


@pytest.mark.skipif(not SLEEF_EXP, reason=NO_SLEEF_REASON)
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype):
    """exp's overflow / underflow edges (|g| near 88, 100, 104), signed zeros, subnormals,
    infinities and NaN, as torch's vectorised silu gives them."""
    edges = [-200.0, -104.5, -104.0, -103.9, -100.0, -88.8, -88.7, -87.3, -20.0, -1e-40, -0.0,
             0.0, 1e-40, 20.0, 87.3, 88.7, 88.8, 100.0, 100.1, 104.0, 200.0, float("inf"),
             float("-inf"), float("nan")]
    gate = torch.tensor(edges).to(dtype)
    up = torch.full_like(gate, 1.5)
    out = ops.swiglu(up, gate)
    expected = up * _silu_vector_path(gate)
    assert torch.equal(out.isnan(), expected.isnan())
    same = out.nan_to_num(0.0).view(-1) == expected.nan_to_num(0.0).view(-1)
    assert same.all(), f"differ at gate = {gate[~same].tolist()}: {out[~same]} vs {expected[~same]}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", GPU_DEVICES)
def test_special_values_on_the_gpu(device, dtype):
    """The CUDA kernel at exp's overflow / underflow edges, signed zeros, subnormals, infinities
    and NaN: the reference's NaN pattern, and its values within the tolerance (expf may put
    an edge such as exp(88.72) on the other side of the overflow: -0.0 against -3e-37)."""
    edges = [-200.0, -104.5, -104.0, -103.9, -100.0, -88.8, -88.7, -87.3, -20.0, -1e-40, -0.0,
             0.0, 1e-40, 20.0, 87.3, 88.7, 88.8, 100.0, 100.1, 104.0, 200.0, float("inf"),
             float("-inf"), float("nan")]
    gate = torch.tensor(edges).to(dtype)
    up = torch.full_like(gate, 1.5)
    dev = tensor_device(device)
    out = kernel_op(device, "swiglu")(up.to(dev), gate.to(dev)).cpu()
    expected = reference.swiglu(up, gate)
    assert torch.equal(out.isnan(), expected.isnan())
    assert_close(out.nan_to_num(0.0), expected.nan_to_num(0.0), "swiglu", msg=str(dtype))


@pytest.mark.parametrize("backend", ["reference", None])
def test_backend_argument_routes(backend):
    gen = torch.Generator().manual_seed(2)
    up, gate = (torch.randn(3, 64, generator=gen).to(torch.bfloat16) for _ in range(2))
    out = ops.swiglu(up, gate, backend=backend)
    if backend == "reference":  # the wrapper must call the reference itself
        assert torch.equal(out, reference.swiglu(up, gate))
    assert_close(out, reference.swiglu(up, gate), "swiglu")
    with pytest.raises(ValueError, match="backend must be None"):
        ops.swiglu(up, gate, backend="cuda")


def test_empty_inputs():
    up = torch.empty(0, 5504, dtype=torch.bfloat16)
    assert ops.swiglu(up, up).shape == (0, 5504)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_READY, reason=CUDA_SKIP_REASON)
def test_cuda_kernel_runs_on_the_current_stream_and_writes_out():
    gen = torch.Generator().manual_seed(3)
    up, gate = (torch.randn(4, 5504, generator=gen).to(torch.bfloat16) for _ in range(2))
    gup, ggate = up.cuda(), gate.cuda()
    buf = torch.empty_like(gup)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ops.swiglu(gup, ggate)
        got = ops.swiglu(gup, ggate, out=buf)
    stream.synchronize()
    assert out.is_cuda and got is buf
    assert_close(out, reference.swiglu(up, gate), "swiglu", msg="side stream")
    assert torch.equal(out, buf)


def _x(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("call,error", [
    pytest.param(lambda: ops.swiglu(_x(7, 5504), _x(7, 5503)),
                 r"swiglu: gate must have shape \[7, 5504\] \(the shape of up\), got \[7, 5503\]",
                 id="gate_shape"),
    pytest.param(lambda: ops.swiglu(_x(7, 5504), _x(7, 5504, dtype=torch.float16)),
                 r"swiglu: gate must have dtype torch.bfloat16 \(the dtype of up\), "
                 r"got torch.float16", id="gate_dtype"),
    pytest.param(lambda: ops.swiglu(_x(7, 5504), _x(7, 11008)[:, ::2]),
                 r"swiglu: gate must have a contiguous last dim \(stride 1\), got stride 2",
                 id="gate_last_dim_strided"),
    pytest.param(lambda: ops.swiglu(_x(7, 11008)[:, ::2], _x(7, 5504)),
                 r"swiglu: up must have a contiguous last dim \(stride 1\), got stride 2",
                 id="up_last_dim_strided"),
    pytest.param(lambda: ops.swiglu(_x(7, 5504, dtype=torch.float64),
                                    _x(7, 5504, dtype=torch.float64)),
                 r"swiglu: up must have dtype torch.bfloat16, torch.float16 or torch.float32, "
                 r"got torch.float64", id="up_dtype"),
    pytest.param(lambda: ops.swiglu(torch.tensor(1.0), torch.tensor(1.0)),
                 r"swiglu: up must have shape \[\.\.\., hidden\], got a 0-dim tensor", id="up_0d"),
    pytest.param(lambda: ops.swiglu(_x(7, 5504).to("meta"), _x(7, 5504).to("meta")),
                 r"swiglu: up must be a CPU or CUDA tensor, got device meta", id="up_device"),
])
def test_bad_arguments_are_named(call, error):
    with pytest.raises(RuntimeError, match=error):
        call()
