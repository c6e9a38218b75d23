// linear and quant_linear (dense and int4/int8 weights): checks, outputs, the choice between our
// kernels and torch's GEMM by size, dispatch (ops/common.h).
#include "common.h"

namespace qf {
using namespace detail;
namespace {


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
// fp32 also always runs ours, so that a row's result never depends on how many rows are computed
// with it (our kernel sums each row the same way at any M; torch's blocked GEMM does not): a
// prompt prefilled in chunks, or from the prefix cache, gives the logits of a one-shot prefill
// bit for bit (tests/test_prefix_cache.py). The cost measured for it (torch time / ours, same run):
//   fp32  M=256: 1.11 1.15 1.22  M=1024: 0.90 0.95 1.03  (c_attn, w1, mlp.c_proj as above)
// bf16 would cost more (M=256: 0.89 0.97 0.87, M=1024: 0.96 0.98 0.82) and keeps torch's GEMM
// past its threshold: bf16 prefill chunks are not row-invariant (README "Prefix caching").
int64_t linear_kernel_max_rows(at::ScalarType t, int64_t K) {
  if (t == at::kHalf || t == at::kFloat) return std::numeric_limits<int64_t>::max();
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


// bias of linear / quant_linear: [N] (out_features), x's dtype and device, contiguous.
void check_bias(const char* op, const at::Tensor& bias, int64_t N, const at::Tensor& x) {
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == N, op, ": bias must have shape [", N,
              "] (out_features = weight.size(0)), got ", shape_str(bias.sizes()));
  check_dtype_device_as_x(op, "bias", bias, x);
  TORCH_CHECK(N <= 1 || bias.stride(0) == 1, op, ": bias must be contiguous (stride 1), got stride ",
              bias.stride(0));
}

}  // namespace

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
  if (bias.has_value()) check_bias(op, *bias, N, x);
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
    launch(op, x, stream,
           [&] { return cpu::linear<T>(data<T>(y), data<T>(in.t), data<T>(weight), b, in.rows, N,
                                       K, N, in.ld, at::get_num_threads(), level); },
           QF_CUDA(cuda::linear<T>(data<T>(y), data<T>(in.t), data<T>(weight), b, in.rows, N, K,
                                   N, in.ld, stream_)));
  });
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

// weight (named `name`): N `bits`-bit outputs of K inputs in the kernel layout, on x's device.
void check_quant_weight(const char* op, const char* name, const at::Tensor& weight, int64_t bits,
                        int64_t K, int64_t N, const at::Tensor& x) {
  const int64_t tiles = (N + 15) / 16;
  const int64_t tile = cpu::quant_tile_bytes(static_cast<int>(bits), K);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == tiles && weight.size(1) == tile &&
                  weight.scalar_type() == at::kByte && weight.is_contiguous(),
              op, ": ", name, " must be a contiguous torch.uint8 tensor [", tiles, ", ", tile,
              "] (the kernel layout of ", N, " ", bits, "-bit outputs in tiles of 16, ", K,
              " inputs), got ", dtype_str(weight.scalar_type()), " ", shape_str(weight.sizes()));
  TORCH_CHECK(weight.device() == x.device(), op, ": ", name, " must be on ", x.device(),
              " (the device of x), got ", weight.device());
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
  check_quant_weight(op, "weight", weight, bits, K, N, x);
  // The GPU kernel reads the layout in 16-byte pieces (its records are multiples of 16 bytes).
  TORCH_CHECK(!x.is_cuda() || reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0, op,
              ": weight must start at a 16-byte aligned address on the GPU");
  if (bias.has_value()) check_bias(op, *bias, N, x);
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

void quant_linear_pair(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                       int64_t bits, int64_t n1, int64_t n2, const at::Tensor& out1,
                       const at::Tensor& out2) {
  const char* op = "quant_linear_pair";
  check_x(op, x);
  TORCH_CHECK(x.is_cpu(), op, ": runs on the CPU only, x is on ", x.device());
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
  TORCH_CHECK(n1 >= 1 && n2 >= 1, op, ": out_features must be >= 1, got ", n1, " and ", n2);
  const int64_t K = x.size(-1);
  check_quant_weight(op, "w1", w1, bits, K, n1, x);
  check_quant_weight(op, "w2", w2, bits, K, n2, x);
  const Rows in = as_rows(x);
  for (const auto& [name, o, n] : {std::tuple{"out1", &out1, n1}, std::tuple{"out2", &out2, n2}}) {
    TORCH_CHECK(o->scalar_type() == x.scalar_type() && o->is_cpu() && o->is_contiguous() &&
                    o->dim() == x.dim() && o->size(-1) == n && o->numel() == in.rows * n,
                op, ": ", name, " must be a contiguous ", dtype_str(x.scalar_type()),
                " CPU tensor [..., ", n, "] with x's leading dims, got ",
                dtype_str(o->scalar_type()), " ", shape_str(o->sizes()), " on ", o->device());
  }
  if (in.rows == 0) return;
  void* ws = quant_workspace(cpu::quant_workspace_bytes(in.rows, 16 * ((n1 + 15) / 16 + (n2 + 15) / 16), K));
  dispatch_float_storage(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    check_status(cpu::quant_linear_pair<T>(data<T>(out1), data<T>(out2), data<T>(in.t),
                                           w1.data_ptr<uint8_t>(), w2.data_ptr<uint8_t>(),
                                           in.rows, n1, n2, K, static_cast<int>(bits), n1, n2,
                                           in.ld, ws, at::get_num_threads(), CpuIsa::kAuto),
                 op);
  });
}

}  // namespace qf
