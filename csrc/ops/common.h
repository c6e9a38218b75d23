// Shared by the ops/*.cpp files, the only C++ that sees at::Tensor: argument checks with
// messages that name the argument and the expected shape, output allocation, and `launch`, the
// one dispatch of an op to its CPU or CUDA launcher.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "../common/float16.h"
#include "../common/simd.h"
#include "../common/status.h"
#include "../cpu/kernels.h"
#include "../ops.h"
#ifdef QF_WITH_CUDA
#include <cuda_runtime_api.h>

#include "../cuda/kernels.cuh"
#endif

namespace qf::detail {

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

// Python spelling of a dtype, as users write it.
inline std::string dtype_str(at::ScalarType t) {
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

inline bool is_float_storage(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Calls f(T{}) with the storage type of a float tensor (float, qf::bf16 or qf::fp16).
template <typename F>
inline void dispatch_float_storage(at::ScalarType t, F&& f) {
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
inline void check_x(const char* op, const at::Tensor& x, const char* name = "x") {
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

// `t` (named `name`) must have the dtype and device of x (named `x_name`).
inline void check_dtype_device_as_x(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& x, const char* x_name = "x") {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ",
              dtype_str(x.scalar_type()), " (the dtype of ", x_name, "), got ",
              dtype_str(t.scalar_type()));
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(),
              " (the device of ", x_name, "), got ", t.device());
}

// `t` (named `name`) must match x (named `x_name`) in shape, dtype and device, with a contiguous
// last dim.
inline void check_same_as_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
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
inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
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
inline at::Tensor output(const char* op, const OptTensor& out, at::IntArrayRef sizes, const at::Tensor& like,
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

inline void check_weight(const char* op, const at::Tensor& weight, const at::Tensor& x) {
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

inline Rows as_rows(const at::Tensor& t) {
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

inline void check_status(Status s, const char* op) {
  if (ok(s)) return;
#ifdef QF_WITH_CUDA
  TORCH_CHECK(!is_cuda_error(s), op, ": CUDA error: ",
              cudaGetErrorString(static_cast<cudaError_t>(cuda_error_code(s))));
#endif
  TORCH_CHECK(false, op, ": the kernel rejected its arguments (", status_name(s), ")");
}

#ifdef QF_WITH_CUDA
// Our static CUDA runtime keeps its own current device: select x's before every launch.
inline cudaStream_t cuda_prepare(const char* op, const at::Tensor& x, int64_t stream) {
  const cudaError_t err = cudaSetDevice(x.get_device());
  TORCH_CHECK(err == cudaSuccess, op, ": cudaSetDevice(", x.get_device(),
              ") failed: ", cudaGetErrorString(err));
  return reinterpret_cast<cudaStream_t>(stream);
}
#endif

// The paged KV cache arguments of rotary_kv_cache and attention, checked against q [N, H, D]:
// k_pages / v_pages [pages, H, P, D] contiguous in q's dtype (torch.int8 with scales, below);
// page_table [seqs, max_pages] and token_seq / token_pos [N], contiguous torch.int32 on q's
// device. On the CPU the contents are checked too: each token's sequence and position, and the
// page ids of every position that the op touches (the token's own position when `history` is
// false, positions 0 .. its own when it is true), against the pool. CUDA metadata stay on the
// device unread (a check would sync).
// An int8 cache (k_scales / v_scales given): k_pages / v_pages hold torch.int8 codes, and
// k_scales / v_scales [pages, H, P, G] contiguous torch.float32 on q's device, G dividing D (G
// scales a position and head, each for D / G consecutive codes); Paged.G is that G (0 for a
// 16/32-bit cache). The scales share memory with no pages and not with each other.
struct Paged {
  int64_t pages, P, ld_pt;
  int64_t G = 0;
};

inline Paged check_paged(const char* op, const at::Tensor& q, const at::Tensor& k_pages,
                         const at::Tensor& v_pages, const at::Tensor& page_table,
                         const at::Tensor& token_seq, const at::Tensor& token_pos, bool history,
                         const OptTensor& k_scales = std::nullopt,
                         const OptTensor& v_scales = std::nullopt) {
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  const bool int8 = k_scales.has_value() || v_scales.has_value();
  TORCH_CHECK(k_scales.has_value() == v_scales.has_value(), op,
              ": an int8 KV cache needs both k_scales and v_scales, got only ",
              k_scales.has_value() ? "k_scales" : "v_scales");
  TORCH_CHECK(int8 || k_pages.scalar_type() != at::kChar, op,
              ": k_pages has dtype torch.int8 (an int8 KV cache), which needs k_scales and "
              "v_scales [pages, heads, page_size, G] torch.float32; none were given");
  for (const auto& [name, t] : {Named{"k_pages", &k_pages}, Named{"v_pages", &v_pages}}) {
    TORCH_CHECK(t->dim() == 4 && t->size(1) == H && t->size(3) == D && t->size(2) >= 1, op, ": ",
                name, " must have shape [pages, ", H, ", page_size, ", D,
                "] (heads and head_dim of q), got ", shape_str(t->sizes()));
    if (int8) {
      TORCH_CHECK(t->scalar_type() == at::kChar, op, ": ", name,
                  " must have dtype torch.int8 (k_scales and v_scales were given: an int8 KV "
                  "cache), got ", dtype_str(t->scalar_type()));
      TORCH_CHECK(t->device() == q.device(), op, ": ", name, " must be on ", q.device(),
                  " (the device of q), got ", t->device());
    } else {
      check_dtype_device_as_x(op, name, *t, q, "q");
    }
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
  }
  TORCH_CHECK(v_pages.sizes() == k_pages.sizes(), op, ": v_pages must have the shape of k_pages ",
              shape_str(k_pages.sizes()), ", got ", shape_str(v_pages.sizes()));
  TORCH_CHECK(!may_overlap(k_pages, v_pages), op, ": k_pages and v_pages share memory");
  int64_t G = 0;
  if (int8) {
    const at::Tensor& ks = *k_scales;
    const at::Tensor& vs = *v_scales;
    TORCH_CHECK(ks.dim() == 4 && ks.size(0) == k_pages.size(0) && ks.size(1) == H &&
                    ks.size(2) == k_pages.size(2) && ks.size(3) >= 1 && D % ks.size(3) == 0,
                op, ": k_scales must have shape [", k_pages.size(0), ", ", H, ", ",
                k_pages.size(2), ", G] (pages, heads and page size of k_pages; G scales a "
                "position, G dividing head_dim ", D, "), got ", shape_str(ks.sizes()));
    TORCH_CHECK(vs.sizes() == ks.sizes(), op, ": v_scales must have the shape of k_scales ",
                shape_str(ks.sizes()), ", got ", shape_str(vs.sizes()));
    for (const auto& [name, t] : {Named{"k_scales", &ks}, Named{"v_scales", &vs}}) {
      TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name,
                  " must have dtype torch.float32, got ", dtype_str(t->scalar_type()));
      TORCH_CHECK(t->device() == q.device(), op, ": ", name, " must be on ", q.device(),
                  " (the device of q), got ", t->device());
      TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
      TORCH_CHECK(!may_overlap(*t, k_pages) && !may_overlap(*t, v_pages), op, ": ", name,
                  " shares memory with the pages");
    }
    TORCH_CHECK(!may_overlap(ks, vs), op, ": k_scales and v_scales share memory");
    G = ks.size(3);
  }
  TORCH_CHECK(page_table.dim() == 2 && page_table.scalar_type() == at::kInt &&
                  page_table.is_contiguous() && page_table.device() == q.device(),
              op, ": page_table must be a contiguous torch.int32 tensor [sequences, max_pages] on ",
              q.device(), ", got ", dtype_str(page_table.scalar_type()), " ",
              shape_str(page_table.sizes()), " on ", page_table.device());
  for (const auto& [name, t] : {Named{"token_seq", &token_seq}, Named{"token_pos", &token_pos}})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == N && t->scalar_type() == at::kInt &&
                    t->is_contiguous() && t->device() == q.device(),
                op, ": ", name, " must be a contiguous torch.int32 tensor [", N,
                "] (one value per token of q) on ", q.device(), ", got ", dtype_str(t->scalar_type()),
                " ", shape_str(t->sizes()), " on ", t->device());
  const Paged p{k_pages.size(0), k_pages.size(2), page_table.size(1), G};
  if (q.is_cuda()) return p;
  const int64_t seqs = page_table.size(0);
  const int32_t* pt = page_table.data_ptr<int32_t>();
  const int32_t* ts = token_seq.data_ptr<int32_t>();
  const int32_t* tp = token_pos.data_ptr<int32_t>();
  std::vector<int64_t> last(static_cast<size_t>(history ? seqs : 0), -1);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(0 <= ts[i] && ts[i] < seqs, op, ": token_seq[", i, "] = ", ts[i],
                " is not a row of page_table (it has ", seqs, ")");
    TORCH_CHECK(0 <= tp[i] && tp[i] / p.P < p.ld_pt, op, ": token_pos[", i, "] = ", tp[i],
                " is outside the ", p.ld_pt, " pages of ", p.P, " positions a page_table row holds");
    if (history) {
      last[ts[i]] = std::max<int64_t>(last[ts[i]], tp[i] / p.P);
    } else {
      const int32_t page = pt[ts[i] * p.ld_pt + tp[i] / p.P];
      TORCH_CHECK(0 <= page && page < p.pages, op, ": token ", i, " (sequence ", ts[i],
                  ", position ", tp[i], ") maps to page ", page, ", not a page of the pool (",
                  p.pages, ")");
    }
  }
  for (int64_t s = 0; s < static_cast<int64_t>(last.size()); ++s)
    for (int64_t j = 0; j <= last[s]; ++j) {
      const int32_t page = pt[s * p.ld_pt + j];
      TORCH_CHECK(0 <= page && page < p.pages, op, ": page_table[", s, ", ", j, "] = ", page,
                  " is not a page of the pool (", p.pages, "), and a token of sequence ", s,
                  " reads it");
    }
  return p;
}

// Runs an op's launcher for x's device and checks its status: cpu() on the CPU; on a CUDA tensor
// (when the CUDA kernels are compiled in) cuda(stream) after selecting x's device. Write the CUDA
// call as QF_CUDA(expression using stream_): without nvcc it compiles to nothing.
template <typename Cpu, typename Cuda>
void launch(const char* op, const at::Tensor& x, int64_t stream, Cpu&& cpu, Cuda&& cuda) {
#ifdef QF_WITH_CUDA
  if (x.is_cuda()) {
    check_status(cuda(cuda_prepare(op, x, stream)), op);
    return;
  }
#endif
  (void)cuda;
  (void)stream;
  check_status(cpu(), op);
}

#ifdef QF_WITH_CUDA
#define QF_CUDA(...) [&](cudaStream_t stream_) { return __VA_ARGS__; }
#else
#define QF_CUDA(...) nullptr
#endif

}  // namespace qf::detail
