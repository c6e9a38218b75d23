// The only C++ that sees at::Tensor. For each op it validates the arguments (device, dtype,
// shape, contiguity of the last dim) with messages that name the argument and the expected
// shape, allocates the outputs, and calls the CPU or CUDA launcher with raw pointers.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <utility>
#include <string>

#include "common/float16.h"
#include "common/simd.h"
#include "common/status.h"
#include "cpu/kernels.h"
#ifdef QF_WITH_CUDA
#include <cuda_runtime_api.h>

#include "cuda/kernels.cuh"
#endif

namespace qf {
namespace {

std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

// Python spelling of a dtype, as users write it.
std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return c10::toString(t);
  }
}

bool is_float_storage(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Calls f(T{}) with the storage type of a float tensor (float, qf::bf16 or qf::fp16).
template <typename F>
void dispatch_float_storage(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(bf16{}); break;
    case at::kHalf: f(fp16{}); break;
    default: TORCH_CHECK(false, "qwen_fast: no kernel for dtype ", dtype_str(t));
  }
}

template <typename T>
T* data(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// x (named `name`; and any tensor checked against it) must be a bf16/fp16/fp32 [..., hidden]
// tensor on the CPU, or on a CUDA device when the CUDA kernels were compiled in.
void check_x(const char* op, const at::Tensor& x, const char* name = "x") {
  TORCH_CHECK(x.dim() >= 1, op, ": ", name, " must have shape [..., hidden], got a 0-dim tensor");
  TORCH_CHECK(is_float_storage(x.scalar_type()), op, ": ", name,
              " must have dtype torch.bfloat16, torch.float16 or torch.float32, got ",
              dtype_str(x.scalar_type()));
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), op, ": ", name,
              " must be a CPU or CUDA tensor, got device ", x.device());
#ifndef QF_WITH_CUDA
  TORCH_CHECK(!x.is_cuda(), "qwen_fast was built without CUDA (nvcc was not found at build time, ",
              "or QWEN_FAST_CUDA=0), so ", op, " cannot run on ", x.device(),
              "; rebuild with nvcc available, or pass backend=\"reference\"");
#endif
  TORCH_CHECK(x.size(-1) <= 1 || x.stride(-1) == 1, op, ": ", name,
              " must have a contiguous last dim (stride 1), got stride ", x.stride(-1),
              " for shape ", shape_str(x.sizes()), "; call .contiguous() first");
}

// For ops that have no CUDA kernel yet (qwen_fast.ops runs the reference for CUDA tensors).
void check_no_cuda_kernel(const char* op, const at::Tensor& x) {
  TORCH_CHECK(!x.is_cuda(), op, ": no CUDA kernel yet (got a tensor on ", x.device(),
              "); qwen_fast.ops.", op, " runs the PyTorch reference for CUDA tensors");
}

// `t` (named `name`) must have the dtype and device of x (named `x_name`).
void check_dtype_device_as_x(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& x, const char* x_name = "x") {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ",
              dtype_str(x.scalar_type()), " (the dtype of ", x_name, "), got ",
              dtype_str(t.scalar_type()));
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(),
              " (the device of ", x_name, "), got ", t.device());
}

// `t` (named `name`) must match x (named `x_name`) in shape, dtype and device, with a contiguous
// last dim.
void check_same_as_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                     const char* x_name = "x") {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have shape ", shape_str(x.sizes()),
              " (the shape of ", x_name, "), got ", shape_str(t.sizes()));
  check_dtype_device_as_x(op, name, t, x, x_name);
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must have a contiguous last dim (stride 1), got stride ", t.stride(-1),
              "; call .contiguous() first");
}

using Named = std::pair<const char*, const at::Tensor*>;

// Whether a and b may share memory: the same storage and intersecting byte ranges (from each
// one's first to its last element). Conservative for interleaved strided views, which is what
// the callers want: an output must lie apart from what is read.
bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  auto span = [](const at::Tensor& t) {
    const char* lo = static_cast<const char*>(t.data_ptr());
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    return std::pair<const char*, const char*>{lo, lo + (last + 1) * t.element_size()};
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

// The result of `op`: a new tensor of `sizes` with the dtype and device of `like` (named
// `like_name`), or `out` (named `name`) checked to be one: that shape, dtype and device,
// contiguous, and sharing no memory with `inputs` (so that no kernel reads what it has written).
at::Tensor output(const char* op, const OptTensor& out, at::IntArrayRef sizes, const at::Tensor& like,
                  const char* like_name, std::initializer_list<Named> inputs,
                  const char* name = "out") {
  if (!out.has_value()) return at::empty(sizes, like.options());
  const at::Tensor& o = *out;
  TORCH_CHECK(o.sizes() == sizes, op, ": ", name, " must have shape ", shape_str(sizes),
              " (the result's), got ", shape_str(o.sizes()));
  check_dtype_device_as_x(op, name, o, like, like_name);
  TORCH_CHECK(o.is_contiguous(), op, ": ", name, " must be contiguous, got strides ",
              shape_str(o.strides()));
  for (const auto& [in_name, t] : inputs)
    TORCH_CHECK(!may_overlap(o, *t), op, ": ", name,
                " shares memory with ", in_name, "; pass a separate buffer");
  return o;
}

void check_weight(const char* op, const at::Tensor& weight, const at::Tensor& x) {
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden, op, ": weight must have shape [",
              hidden, "] (hidden size of x), got ", shape_str(weight.sizes()));
  check_dtype_device_as_x(op, "weight", weight, x);
  TORCH_CHECK(hidden <= 1 || weight.stride(0) == 1, op,
              ": weight must be contiguous (stride 1), got stride ", weight.stride(0));
}

// A [..., hidden] tensor seen as `rows` rows of `hidden` contiguous elements, `ld` apart.
struct Rows {
  at::Tensor t;  // the tensor itself, or a contiguous copy when its leading dims cannot collapse
  int64_t rows;
  int64_t ld;
};

Rows as_rows(const at::Tensor& t) {
  const int64_t hidden = t.size(-1);
  const int64_t rows = t.numel() / hidden;
  // The leading dims collapse into one row stride when each (ignoring size-1 dims) steps over
  // exactly the dims inside it, as in x[:, :hidden] or a [b, s, hidden] slice of a wider buffer.
  int64_t ld = -1;
  int64_t span = 0;
  for (int64_t d = t.dim() - 2; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (ld < 0) {
      ld = t.stride(d);
      span = ld * t.size(d);
    } else if (t.stride(d) == span) {
      span *= t.size(d);
    } else {
      return {t.contiguous(), rows, hidden};
    }
  }
  return {t, rows, ld < 0 ? hidden : ld};
}

void check_status(Status s, const char* op) {
  if (ok(s)) return;
#ifdef QF_WITH_CUDA
  TORCH_CHECK(!is_cuda_error(s), op, ": CUDA error: ",
              cudaGetErrorString(static_cast<cudaError_t>(cuda_error_code(s))));
#endif
  TORCH_CHECK(false, op, ": the kernel rejected its arguments (", status_name(s), ")");
}

#ifdef QF_WITH_CUDA
// Our static CUDA runtime keeps its own current device: select x's before every launch.
cudaStream_t cuda_prepare(const char* op, const at::Tensor& x, int64_t stream) {
  const cudaError_t err = cudaSetDevice(x.get_device());
  TORCH_CHECK(err == cudaSuccess, op, ": cudaSetDevice(", x.get_device(),
              ") failed: ", cudaGetErrorString(err));
  return reinterpret_cast<cudaStream_t>(stream);
}
#endif

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, int64_t stream,
                    const OptTensor& out_arg) {
  const char* op = "rms_norm";
  check_x(op, x);
  check_weight(op, weight, x);
  at::Tensor out = output(op, out_arg, x.sizes(), x, "x", {{"x", &x}, {"weight", &weight}});
  if (out.numel() == 0) return out;
  const int64_t hidden = x.size(-1);
  const Rows in = as_rows(x);
  dispatch_float_storage(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    Status s;
#ifdef QF_WITH_CUDA
    if (x.is_cuda()) {
      s = cuda::rms_norm<T>(data<T>(out), data<T>(in.t), data<T>(weight), in.rows, hidden, hidden,
                            in.ld, static_cast<float>(eps), cuda_prepare(op, x, stream));
    } else
#endif
    {
      s = cpu::rms_norm<T>(data<T>(out), data<T>(in.t), data<T>(weight), in.rows, hidden, hidden,
                           in.ld, static_cast<float>(eps));
    }
    check_status(s, op);
  });
  (void)stream;
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x,
                                                      const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps,
                                                      int64_t stream, const OptTensor& out_arg,
                                                      const OptTensor& residual_out_arg) {
  const char* op = "fused_add_rms_norm";
  check_x(op, x);
  check_same_as_x(op, "residual", residual, x);
  check_weight(op, weight, x);
  // residual_out may be residual itself (each element is read before it is written), nothing
  // else that is read; out may not overlap anything.
  const bool in_place = residual_out_arg.has_value() && residual_out_arg->is_same(residual) &&
                        residual.is_contiguous();
  at::Tensor residual_out =
      in_place ? residual
               : output(op, residual_out_arg, x.sizes(), x, "x",
                        {{"x", &x}, {"residual", &residual}, {"weight", &weight}}, "residual_out");
  at::Tensor out = output(op, out_arg, x.sizes(), x, "x",
                          {{"x", &x}, {"residual", &residual}, {"weight", &weight},
                           {"residual_out", &residual_out}});
  if (out.numel() == 0) return {out, residual_out};
  const int64_t hidden = x.size(-1);
  const Rows in = as_rows(x);
  const Rows res = as_rows(residual);
  dispatch_float_storage(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    Status s;
#ifdef QF_WITH_CUDA
    if (x.is_cuda()) {
      s = cuda::fused_add_rms_norm<T>(data<T>(out), data<T>(residual_out), data<T>(in.t),
                                      data<T>(res.t), data<T>(weight), in.rows, hidden, hidden,
                                      hidden, in.ld, res.ld, static_cast<float>(eps),
                                      cuda_prepare(op, x, stream));
    } else
#endif
    {
      s = cpu::fused_add_rms_norm<T>(data<T>(out), data<T>(residual_out), data<T>(in.t),
                                     data<T>(res.t), data<T>(weight), in.rows, hidden, hidden,
                                     hidden, in.ld, res.ld, static_cast<float>(eps));
    }
    check_status(s, op);
  });
  (void)stream;
  return {out, residual_out};
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& start, double scale, int64_t stream,
                     const OptTensor& out_arg) {
  const char* op = "attention";
  TORCH_CHECK(q.dim() == 4, op, ": q must have shape [batch, tokens, heads, head_dim], got ",
              shape_str(q.sizes()));
  check_x(op, q);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(2) == H && t.size(3) == D && t.size(1) >= 1,
                op, ": ", name, " must have shape [", B, ", cached, ", H, ", ", D,
                "] (batch, heads and head_dim of q), got ", shape_str(t.sizes()));
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have dtype ",
                dtype_str(q.scalar_type()), " (the dtype of q), got ", dtype_str(t.scalar_type()));
    TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on ", q.device(), ", got ",
                t.device());
    TORCH_CHECK(D <= 1 || t.stride(3) == 1, op, ": ", name,
                " must have a contiguous head dim (stride 1), got stride ", t.stride(3));
  }
  TORCH_CHECK(k.size(1) == v.size(1), op, ": k and v must hold the same number of positions, got ",
              k.size(1), " and ", v.size(1));
  TORCH_CHECK(start.dim() == 1 && start.size(0) == B && start.scalar_type() == at::kLong &&
                  start.is_cpu(),
              op, ": start must be a CPU torch.int64 tensor of shape [", B, "], got ",
              dtype_str(start.scalar_type()), " ", shape_str(start.sizes()), " on ",
              start.device());
  TORCH_CHECK(D <= 256, op, ": head_dim must be at most 256, got ", D);
  const at::Tensor st = start.contiguous();
  TORCH_CHECK(st.numel() == 0 || st.min().item<int64_t>() >= 0, op,
              ": start must be >= 0 (cached positions per sequence)");
  at::Tensor out = output(op, out_arg, {B, T, H, D}, q, "q", {{"q", &q}, {"k", &k}, {"v", &v}});
  if (out.numel() == 0) return out;
  const int64_t S = k.size(1);
  dispatch_float_storage(q.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    Status s;
#ifdef QF_WITH_CUDA
    if (q.is_cuda()) {
      // start comes from the CPU (checked there): copied to q's device on torch's current
      // stream, which is `stream` (qwen_fast.ops passes it), so the kernel reads it in order; a
      // pageable host -> device copy is staged before it returns, so non_blocking is safe. The
      // split partials' workspace comes from torch's caching allocator, the launcher allocating
      // nothing.
      const at::Tensor st_dev = st.to(q.device(), /*non_blocking=*/true);
      const int64_t ws_bytes = cuda::attention_workspace_bytes(B, T, H, D, S);
      const at::Tensor ws = at::empty({ws_bytes}, q.options().dtype(at::kByte));
      s = cuda::attention<T_>(data<T_>(out), data<T_>(q), data<T_>(k), data<T_>(v),
                              st_dev.data_ptr<int64_t>(), B, T, H, D, S, q.stride(0),
                              q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                              v.stride(0), v.stride(1), v.stride(2), static_cast<float>(scale),
                              ws.data_ptr(), ws_bytes, cuda_prepare(op, q, stream));
    } else
#endif
    {
      s = cpu::attention<T_>(data<T_>(out), data<T_>(q), data<T_>(k), data<T_>(v),
                             st.data_ptr<int64_t>(), B, T, H, D, S, q.stride(0), q.stride(1),
                             q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
                             v.stride(1), v.stride(2), static_cast<float>(scale));
    }
    check_status(s, op);
  });
  (void)stream;
  return out;
}

namespace {

// cos / sin of rotary_embedding: fp32 [B, T, R] on x's device, R even and <= head_dim.
void check_rope_table(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  const int64_t head_dim = x.size(3);
  TORCH_CHECK(t.dim() == 3 && t.size(0) == x.size(0) && t.size(1) == x.size(1) &&
                  t.size(2) % 2 == 0 && t.size(2) <= head_dim,
              op, ": ", name, " must have shape [B, T, R] = [", x.size(0), ", ", x.size(1),
              ", R] (batch and seq of x, R even and <= head_dim ", head_dim, "), got ",
              shape_str(t.sizes()));
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must have dtype torch.float32, got ",
              dtype_str(t.scalar_type()));
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(),
              " (the device of x), got ", t.device());
}

// Rows of x up to which linear with isa "auto" runs our kernel; above it torch's at::linear (oneDNN
// for bf16, MKL for fp32, both packing the weights into blocks), which is then faster. Our
// kernel streams the weights once and wins at decode sizes; it holds 4 weight rows in L1
// (32 KiB) while it passes over the activation rows, and loses to torch sooner when they do not
// fit (bf16 K > 4096, fp32 K > 2048). Measured with cold weights, Zen 4, 2 threads, torch time /
// ours (best of 9, interleaved) for c_attn 6144x2048, mlp.w1 5504x2048, mlp.c_proj 2048x5504:
//   bf16  M=16: 1.63 1.81 1.53  M=48: 1.31 1.30 1.05  M=96: 1.11 1.10 0.90  M=128: 1.03 1.01 0.91
//         (medians in bench_kernels.py at M=128: 1.00 0.98 0.87)
//   fp32  M=16: 2.82 2.75 2.10  M=48: 1.65 1.79 1.34  M=64: 1.44 1.54 1.19  M=128: 1.31 1.28 1.01
//         (medians in bench_kernels.py at M=128: 1.17 1.20 0.80)
//   fp16  M=16: 4.04 4.16 3.95  M=128: 4.04 3.94 3.86  M=512: 4.02 4.00 3.88: torch's CPU fp16
//         GEMM is slow at every size, so fp16 always runs ours.
int64_t linear_kernel_max_rows(at::ScalarType t, int64_t K) {
  if (t == at::kHalf) return std::numeric_limits<int64_t>::max();
  const bool rows_fit_l1 = 4 * K * static_cast<int64_t>(c10::elementSize(t)) <= 32 * 1024;
  if (!rows_fit_l1) return 48;
  return t == at::kBFloat16 ? 96 : 128;
}

// Rows of x up to which linear and quant_linear run our GEMV on CUDA tensors: it reads the weights
// once per 16 rows with CUDA-core fp32 FMAs; beyond, a tensor-core GEMM (cuBLAS through at::linear)
// is the faster.
constexpr int64_t kCudaGemvMaxRows = 16;

constexpr CpuIsa kLinearIsas[] = {CpuIsa::kAvx512Bf16, CpuIsa::kAvx512, CpuIsa::kAvx2,
                                  CpuIsa::kScalar};

std::string quoted_list(const std::vector<std::string>& names) {
  std::string s;
  for (const std::string& n : names) s += (s.empty() ? "\"" : ", \"") + n + "\"";
  return s;
}

CpuIsa parse_linear_isa(const std::string& name) {
  if (name == cpu_isa_name(CpuIsa::kAuto)) return CpuIsa::kAuto;
  for (CpuIsa isa : kLinearIsas) {
    if (name != cpu_isa_name(isa)) continue;
    TORCH_CHECK(cpu_isa_supported(isa), "linear: isa \"", name,
                "\" is not supported by this CPU; it runs ", quoted_list(linear_isas()));
    return isa;
  }
  std::vector<std::string> all;
  for (CpuIsa isa : kLinearIsas) all.push_back(cpu_isa_name(isa));
  TORCH_CHECK(false, "linear: isa must be \"auto\" or one of ", quoted_list(all), ", got \"", name,
              "\"");
}

}  // namespace

at::Tensor rotary_embedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            int64_t stream) {
  const char* op = "rotary_embedding";
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape [B, T, H, D], got ", shape_str(x.sizes()));
  check_x(op, x);
  check_rope_table(op, "cos", cos, x);
  TORCH_CHECK(sin.sizes() == cos.sizes(), op, ": sin must have shape ", shape_str(cos.sizes()),
              " (the shape of cos), got ", shape_str(sin.sizes()));
  check_rope_table(op, "sin", sin, x);
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  // The tables are 1/H of x's size: a contiguous copy of a strided one is cheap (usually a no-op).
  const at::Tensor c = cos.contiguous();
  const at::Tensor s = sin.contiguous();
  dispatch_float_storage(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    Status st;
#ifdef QF_WITH_CUDA
    if (x.is_cuda()) {
      st = cuda::rotary_embedding<T>(data<T>(out), data<T>(x), data<float>(c), data<float>(s),
                                     x.size(0), x.size(1), x.size(2), x.size(3), cos.size(2),
                                     x.stride(0), x.stride(1), x.stride(2),
                                     cuda_prepare(op, x, stream));
    } else
#endif
    {
      st = cpu::rotary_embedding<T>(data<T>(out), data<T>(x), data<float>(c), data<float>(s),
                                    x.size(0), x.size(1), x.size(2), x.size(3), cos.size(2),
                                    x.stride(0), x.stride(1), x.stride(2));
    }
    check_status(st, op);
  });
  (void)stream;
  return out;
}

at::Tensor rotary_kv_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const std::vector<int64_t>& slots,
                           const std::vector<int64_t>& start, const std::vector<int64_t>& n_new,
                           int64_t stream, const OptTensor& out_arg) {
  const char* op = "rotary_kv_cache";
  TORCH_CHECK(q.dim() == 4, op, ": q must have shape [B, T, H, D], got ", shape_str(q.sizes()));
  check_x(op, q, "q");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  for (const auto& [name, t] : {Named{"k", &k}, Named{"v", &v}}) {
    TORCH_CHECK(t->sizes() == q.sizes(), op, ": ", name, " must have shape ", shape_str(q.sizes()),
                " (the shape of q), got ", shape_str(t->sizes()));
    check_dtype_device_as_x(op, name, *t, q, "q");
    TORCH_CHECK(t->strides() == q.strides(), op, ": ", name, " must have the strides of q ",
                shape_str(q.strides()), " (q, k, v are views of one qkv buffer), got ",
                shape_str(t->strides()));
  }
  check_rope_table(op, "cos", cos, q);
  TORCH_CHECK(sin.sizes() == cos.sizes(), op, ": sin must have shape ", shape_str(cos.sizes()),
              " (the shape of cos), got ", shape_str(sin.sizes()));
  check_rope_table(op, "sin", sin, q);
  for (const auto& [name, t] : {Named{"k_cache", &k_cache}, Named{"v_cache", &v_cache}}) {
    TORCH_CHECK(t->dim() == 4 && t->size(1) == H && t->size(3) == D, op, ": ", name,
                " must have shape [slots, ", H, ", positions, ", D, "] (heads and head_dim of q), got ",
                shape_str(t->sizes()));
    check_dtype_device_as_x(op, name, *t, q, "q");
    TORCH_CHECK(D <= 1 || t->stride(3) == 1, op, ": ", name,
                " must have a contiguous head dim (stride 1), got stride ", t->stride(3));
  }
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.strides() == k_cache.strides(), op,
              ": v_cache must have the shape and strides of k_cache ", shape_str(k_cache.sizes()),
              " ", shape_str(k_cache.strides()), ", got ", shape_str(v_cache.sizes()), " ",
              shape_str(v_cache.strides()));
  for (const auto& [name, list] : {std::pair<const char*, const std::vector<int64_t>*>{"slots", &slots},
                                   {"start", &start}, {"n_new", &n_new}})
    TORCH_CHECK(static_cast<int64_t>(list->size()) == B, op, ": ", name, " must give one value for each of the ",
                B, " sequences, got ", list->size());
  const int64_t num_slots = k_cache.size(0), S = k_cache.size(2);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= slots[b] && slots[b] < num_slots, op, ": slots[", b, "] = ", slots[b],
                " is not a cache slot (the cache has ", num_slots, ")");
    TORCH_CHECK(0 <= n_new[b] && n_new[b] <= T, op, ": n_new[", b, "] = ", n_new[b],
                " must be in [0, ", T, "] (the tokens of q)");
    TORCH_CHECK(0 <= start[b] && start[b] + n_new[b] <= S, op, ": sequence ", b, " writes positions ",
                start[b], " .. ", start[b] + n_new[b] - 1, ", outside the cache's ", S, " positions");
    for (int64_t c = 0; c < b; ++c)
      TORCH_CHECK(slots[c] != slots[b], op, ": slots[", c, "] and slots[", b, "] are both ", slots[b],
                  "; each sequence needs its own cache slot");
  }
  for (const auto& [name, t] : {Named{"q", &q}, Named{"k", &k}, Named{"v", &v}, Named{"k_cache", &k_cache}})
    TORCH_CHECK(!may_overlap(v_cache, *t) && (t->is_same(k_cache) || !may_overlap(k_cache, *t)),
                op, ": the caches share memory with ", name, " (or each other); they must be separate");
  at::Tensor out = output(op, out_arg, q.sizes(), q, "q",
                          {{"q", &q}, {"k", &k}, {"v", &v}, {"k_cache", &k_cache}, {"v_cache", &v_cache}});
  if (out.numel() == 0) return out;
  const at::Tensor c = cos.contiguous();
  const at::Tensor s = sin.contiguous();
  dispatch_float_storage(q.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    Status st;
#ifdef QF_WITH_CUDA
    if (q.is_cuda()) {
      // The kernel reads slots, start and n_new on the device: one [3, B] int64 array, staged in
      // pinned memory and copied without a host sync on torch's current stream (the stream the
      // wrapper passes; torch keeps the pinned block until the copy is done).
      at::Tensor host = at::empty({3, B}, at::TensorOptions(at::kLong).pinned_memory(true));
      int64_t* h = host.data_ptr<int64_t>();
      std::copy(slots.begin(), slots.end(), h);
      std::copy(start.begin(), start.end(), h + B);
      std::copy(n_new.begin(), n_new.end(), h + 2 * B);
      const at::Tensor index = host.to(q.device(), /*non_blocking=*/true);
      const int64_t* d = index.data_ptr<int64_t>();
      st = cuda::rotary_kv_cache<T_>(data<T_>(out), data<T_>(k_cache), data<T_>(v_cache),
                                     data<T_>(q), data<T_>(k), data<T_>(v), data<float>(c),
                                     data<float>(s), d, d + B, d + 2 * B, B, T, H, D, cos.size(2),
                                     q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0),
                                     k_cache.stride(1), k_cache.stride(2),
                                     cuda_prepare(op, q, stream));
    } else
#endif
    {
      st = cpu::rotary_kv_cache<T_>(data<T_>(out), data<T_>(k_cache), data<T_>(v_cache),
                                    data<T_>(q), data<T_>(k), data<T_>(v), data<float>(c),
                                    data<float>(s), slots.data(), start.data(), n_new.data(), B, T,
                                    H, D, cos.size(2), q.stride(0), q.stride(1), q.stride(2),
                                    k_cache.stride(0), k_cache.stride(1), k_cache.stride(2));
    }
    check_status(st, op);
  });
  (void)stream;
  return out;
}

at::Tensor swiglu(const at::Tensor& up, const at::Tensor& gate, int64_t stream,
                  const OptTensor& out_arg) {
  const char* op = "swiglu";
  check_x(op, up, "up");
  check_same_as_x(op, "gate", gate, up, "up");
  at::Tensor out = output(op, out_arg, up.sizes(), up, "up", {{"up", &up}, {"gate", &gate}});
  if (out.numel() == 0) return out;
  const int64_t cols = up.size(-1);
  const Rows u = as_rows(up);
  const Rows g = as_rows(gate);
  dispatch_float_storage(up.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    Status st;
#ifdef QF_WITH_CUDA
    if (up.is_cuda()) {
      st = cuda::swiglu<T>(data<T>(out), data<T>(u.t), data<T>(g.t), u.rows, cols, cols, u.ld,
                           g.ld, cuda_prepare(op, up, stream));
    } else
#endif
    {
      st = cpu::swiglu<T>(data<T>(out), data<T>(u.t), data<T>(g.t), u.rows, cols, cols, u.ld,
                          g.ld);
    }
    check_status(st, op);
  });
  (void)stream;
  return out;
}

std::vector<std::string> linear_isas() {
  std::vector<std::string> out;
  for (CpuIsa isa : kLinearIsas)
    if (cpu_isa_supported(isa)) out.push_back(cpu_isa_name(isa));
  return out;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, int64_t stream, const std::string& isa,
                  const OptTensor& out_arg) {
  const char* op = "linear";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape [..., K], got a 0-dim tensor");
  check_x(op, x);
  TORCH_CHECK(!x.is_cuda() || isa == "auto", op, ": isa chooses a level of the CPU kernel; x is on ",
              x.device(), ", pass isa=\"auto\"");
  const CpuIsa level = x.is_cuda() ? CpuIsa::kAuto : parse_linear_isa(isa);
  const int64_t K = x.size(-1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, op, ": weight must have shape [N, ", K,
              "] (out_features, in_features = last dim of x), got ", shape_str(weight.sizes()));
  check_dtype_device_as_x(op, "weight", weight, x);
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous (row-major [N, K]), got "
              "strides ", shape_str(weight.strides()), "; call .contiguous() first");
  const int64_t N = weight.size(0);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N,
                "] (out_features = weight.size(0)), got ", shape_str(bias->sizes()));
    check_dtype_device_as_x(op, "bias", *bias, x);
    TORCH_CHECK(N <= 1 || bias->stride(0) == 1, op,
                ": bias must be contiguous (stride 1), got stride ", bias->stride(0));
  }
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  const at::Tensor no_bias;
  at::Tensor y = output(op, out_arg, sizes, x, "x",
                        {{"x", &x}, {"weight", &weight}, {"bias", bias ? &*bias : &no_bias}});
  const int64_t max_rows =
      x.is_cuda() ? kCudaGemvMaxRows : linear_kernel_max_rows(x.scalar_type(), K);
  if (level == CpuIsa::kAuto && K > 0 && x.numel() / K > max_rows)
    return out_arg ? y.copy_(at::linear(x, weight, bias)) : at::linear(x, weight, bias).contiguous();
  if (y.numel() == 0) return y;
  if (K == 0) return bias.has_value() ? y.copy_(*bias) : y.zero_();  // an empty sum is 0
  const Rows in = as_rows(x);
  dispatch_float_storage(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* b = bias.has_value() ? data<T>(*bias) : nullptr;
    Status s;
#ifdef QF_WITH_CUDA
    if (x.is_cuda()) {
      s = cuda::linear<T>(data<T>(y), data<T>(in.t), data<T>(weight), b, in.rows, N, K, N, in.ld,
                          cuda_prepare(op, x, stream));
    } else
#endif
    {
      s = cpu::linear<T>(data<T>(y), data<T>(in.t), data<T>(weight), b, in.rows, N, K, N, in.ld,
                         at::get_num_threads(), level);
    }
    check_status(s, op);
  });
  (void)stream;
  return y;
}

namespace {

// Scratch memory of quant_linear: grown when a call needs more, kept for the next (one per
// calling thread), so that a decode step allocates nothing.
void* quant_workspace(int64_t bytes) {
  thread_local std::vector<uint8_t> buf;
  if (static_cast<int64_t>(buf.size()) < bytes + 64) buf.resize(static_cast<size_t>(bytes + 64));
  const auto p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<void*>((p + 63) & ~uintptr_t{63});
}

CpuIsa parse_quant_isa(const std::string& name) {
  for (CpuIsa isa : {CpuIsa::kAuto, CpuIsa::kAvx512Vnni, CpuIsa::kAvx2, CpuIsa::kScalar}) {
    if (name != cpu_isa_name(isa)) continue;
    TORCH_CHECK(cpu_isa_supported(isa), "quant_linear: isa \"", name,
                "\" is not supported by this CPU; it runs ", quoted_list(quant_linear_isas()));
    return isa;
  }
  TORCH_CHECK(false, "quant_linear: isa must be \"auto\", \"avx512_vnni\", \"avx2\" or \"scalar\", got \"",
              name, "\"");
}

}  // namespace

std::vector<std::string> quant_linear_isas() {
  std::vector<std::string> out;
  for (CpuIsa isa : {CpuIsa::kAvx512Vnni, CpuIsa::kAvx2, CpuIsa::kScalar})
    if (cpu_isa_supported(isa)) out.push_back(cpu_isa_name(isa));
  return out;
}

int64_t quant_tile_bytes(int64_t bits, int64_t in_features) {
  TORCH_CHECK(bits == 4 || bits == 8, "quant_tile_bytes: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(in_features >= 1, "quant_tile_bytes: in_features must be >= 1, got ", in_features);
  return cpu::quant_tile_bytes(static_cast<int>(bits), in_features);
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& weight, int64_t bits,
                        int64_t in_features, int64_t out_features,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& perm, int64_t stream,
                        const std::string& isa, const OptTensor& out_arg) {
  const char* op = "quant_linear";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape [..., K], got a 0-dim tensor");
  check_x(op, x);
  TORCH_CHECK(!x.is_cuda() || isa == "auto", op, ": isa chooses a path of the CPU kernel; x is on ",
              x.device(), ", pass isa=\"auto\"");
  const CpuIsa level = x.is_cuda() ? CpuIsa::kAuto : parse_quant_isa(isa);
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
  const int64_t K = x.size(-1);
  TORCH_CHECK(in_features == K, op, ": the weight has in_features = ", in_features,
              ", x has ", K, " features (its last dim)");
  const int64_t N = out_features;
  TORCH_CHECK(N >= 1, op, ": out_features must be >= 1, got ", N);
  const int64_t tiles = (N + 15) / 16;
  const int64_t tile = cpu::quant_tile_bytes(static_cast<int>(bits), K);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == tiles && weight.size(1) == tile &&
                  weight.scalar_type() == at::kByte && weight.is_contiguous(),
              op, ": weight must be a contiguous torch.uint8 tensor [", tiles, ", ", tile,
              "] (the kernel layout of ", N, " ", bits, "-bit outputs in tiles of 16, ", K,
              " inputs), got ", dtype_str(weight.scalar_type()), " ", shape_str(weight.sizes()));
  TORCH_CHECK(weight.device() == x.device(), op, ": weight must be on ", x.device(),
              " (the device of x), got ", weight.device());
  // The GPU kernel reads the layout in 16-byte pieces (its records are multiples of 16 bytes).
  TORCH_CHECK(!x.is_cuda() || reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0, op,
              ": weight must start at a 16-byte aligned address on the GPU");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N,
                "] (out_features), got ", shape_str(bias->sizes()));
    check_dtype_device_as_x(op, "bias", *bias, x);
    TORCH_CHECK(N <= 1 || bias->stride(0) == 1, op, ": bias must be contiguous (stride 1)");
  }
  at::Tensor p;
  if (perm.has_value()) {
    TORCH_CHECK(perm->dim() == 1 && perm->size(0) == K && perm->scalar_type() == at::kLong, op,
                ": perm must be a torch.int64 tensor [", K, "], got ",
                dtype_str(perm->scalar_type()), " ", shape_str(perm->sizes()));
    TORCH_CHECK(perm->device() == x.device(), op, ": perm must be on ", x.device(),
                " (the device of x), got ", perm->device());
    p = perm->contiguous();
    // On the GPU this check would wait for the stream on every call (and break CUDA graph
    // capture); the CUDA kernel reads x as 0 at an out-of-range value instead of faulting.
    TORCH_CHECK(p.is_cuda() || K == 0 ||
                    (p.min().item<int64_t>() >= 0 && p.max().item<int64_t>() < K),
                op, ": perm values must lie in [0, ", K, ")");
  }
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  const at::Tensor no_bias;
  at::Tensor y = output(op, out_arg, sizes, x, "x",
                        {{"x", &x}, {"bias", bias ? &*bias : &no_bias}});
  if (y.numel() == 0) return y;
  const Rows in = as_rows(x);
  const int64_t* perm_ptr = p.defined() ? p.data_ptr<int64_t>() : nullptr;
#ifdef QF_WITH_CUDA
  if (x.is_cuda()) {
    dispatch_float_storage(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* b = bias.has_value() ? data<T>(*bias) : nullptr;
      const cudaStream_t s = cuda_prepare(op, x, stream);
      if (in.rows <= kCudaGemvMaxRows) {
        check_status(cuda::quant_linear<T>(data<T>(y), data<T>(in.t), weight.data_ptr<uint8_t>(),
                                           b, perm_ptr, in.rows, N, K, static_cast<int>(bits), N,
                                           in.ld, s),
                     op);
        return;
      }
      // Prefill: the dense weight in x's dtype (a scratch tensor, in the original input order),
      // then torch's GEMM on it (the spec of this path is reference.linear on
      // QuantWeight.dequantize(x.dtype)). A tensor-core GEMM (mma.sync) dequantizing tiles of
      // the packed weights in shared memory would skip the scratch and is the faster
      // alternative; it is not written yet.
      at::Tensor dense = at::empty({N, K}, x.options());
      check_status(cuda::quant_linear_dequantize<T>(data<T>(dense), weight.data_ptr<uint8_t>(),
                                                    perm_ptr, N, K, static_cast<int>(bits), K, s),
                   op);
      at::Tensor r = at::linear(x, dense, bias);
      y = out_arg ? y.copy_(r) : r.contiguous();
    });
    return y;
  }
#endif
  (void)stream;
  void* ws = quant_workspace(cpu::quant_workspace_bytes(in.rows, N, K));
  dispatch_float_storage(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* b = bias.has_value() ? data<T>(*bias) : nullptr;
    check_status(cpu::quant_linear<T>(data<T>(y), data<T>(in.t), weight.data_ptr<uint8_t>(), b,
                                      perm_ptr, in.rows, N,
                                      K, static_cast<int>(bits), N, in.ld, ws,
                                      at::get_num_threads(), level),
                 op);
  });
  return y;
}

int64_t cuda_device_count() {
#ifdef QF_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the error, report none
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

}  // namespace qf
