// attention over the paged KV cache (16/32-bit, or int8 with k_scales / v_scales): checks,
// output, dispatch (ops/common.h).
#include "common.h"

namespace qf {
using namespace detail;

#ifdef QF_WITH_CUDA
namespace {
// The CUDA launch with its split partials' workspace from torch's caching allocator (the
// launcher allocates nothing).
template <typename T>
Status cuda_attention(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_pages,
                      const at::Tensor& v_pages, const at::Tensor& page_table,
                      const at::Tensor& token_seq, const at::Tensor& token_pos, const Paged& p,
                      int64_t max_keys, float scale, cudaStream_t stream) {
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t ws_bytes = cuda::attention_workspace_bytes(N, H, D, max_keys);
  const at::Tensor ws = at::empty({ws_bytes}, q.options().dtype(at::kByte));
  return cuda::attention<T>(data<T>(out), data<T>(q), data<T>(k_pages), data<T>(v_pages),
                            page_table.data_ptr<int32_t>(), token_seq.data_ptr<int32_t>(),
                            token_pos.data_ptr<int32_t>(), N, H, D, p.P, p.ld_pt, max_keys,
                            q.stride(0), q.stride(1), scale, ws.data_ptr(), ws_bytes, stream);
}

// The same for an int8 cache (k_scales / v_scales [pages, H, P, G]).
template <typename T>
Status cuda_attention_int8(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_pages,
                           const at::Tensor& v_pages, const at::Tensor& k_scales,
                           const at::Tensor& v_scales, const at::Tensor& page_table,
                           const at::Tensor& token_seq, const at::Tensor& token_pos,
                           const Paged& p, int64_t max_keys, float scale, cudaStream_t stream) {
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t ws_bytes = cuda::attention_workspace_bytes(N, H, D, max_keys);
  const at::Tensor ws = at::empty({ws_bytes}, q.options().dtype(at::kByte));
  return cuda::attention_int8<T>(data<T>(out), data<T>(q), data<int8_t>(k_pages),
                                 data<int8_t>(v_pages), data<float>(k_scales),
                                 data<float>(v_scales), page_table.data_ptr<int32_t>(),
                                 token_seq.data_ptr<int32_t>(), token_pos.data_ptr<int32_t>(), N,
                                 H, D, p.P, p.ld_pt, max_keys, q.stride(0), q.stride(1), scale,
                                 p.G, ws.data_ptr(), ws_bytes, stream);
}
}  // namespace
#endif

at::Tensor attention(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                     const at::Tensor& page_table, const at::Tensor& token_seq,
                     const at::Tensor& token_pos, int64_t max_keys, double scale, int64_t stream,
                     const OptTensor& out_arg, const OptTensor& k_scales,
                     const OptTensor& v_scales) {
  const char* op = "attention";
  TORCH_CHECK(q.dim() == 3, op, ": q must have shape [tokens, heads, head_dim], got ",
              shape_str(q.sizes()));
  check_x(op, q, "q");
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(D <= 256, op, ": head_dim must be at most 256, got ", D);
  const Paged p = check_paged(op, q, k_pages, v_pages, page_table, token_seq, token_pos, true,
                              k_scales, v_scales);
  TORCH_CHECK(max_keys >= 1, op, ": max_keys must be >= 1 (the most keys a token reads), got ",
              max_keys);
  if (q.is_cpu() && N > 0) {
    const int32_t* tp = token_pos.data_ptr<int32_t>();
    TORCH_CHECK(*std::max_element(tp, tp + N) < max_keys, op,
                ": max_keys = ", max_keys, " is below a token's position + 1");
  }
  const at::Tensor none;
  const at::Tensor& ks = k_scales.has_value() ? *k_scales : none;
  const at::Tensor& vs = v_scales.has_value() ? *v_scales : none;
  at::Tensor out = output(op, out_arg, {N, H, D}, q, "q",
                          {{"q", &q}, {"k_pages", &k_pages}, {"v_pages", &v_pages},
                           {"k_scales", &ks}, {"v_scales", &vs}});
  if (out.numel() == 0) return out;
  const float sc = static_cast<float>(scale);
  dispatch_float_storage(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (p.G > 0) {  // an int8 cache
      launch(op, q, stream,
             [&] { return cpu::attention_int8<T>(data<T>(out), data<T>(q), data<int8_t>(k_pages),
                                                 data<int8_t>(v_pages), data<float>(ks),
                                                 data<float>(vs), page_table.data_ptr<int32_t>(),
                                                 token_seq.data_ptr<int32_t>(),
                                                 token_pos.data_ptr<int32_t>(), N, H, D, p.P,
                                                 p.ld_pt, q.stride(0), q.stride(1), sc, p.G); },
             QF_CUDA(cuda_attention_int8<T>(out, q, k_pages, v_pages, ks, vs, page_table,
                                            token_seq, token_pos, p, max_keys, sc, stream_)));
      return;
    }
    launch(op, q, stream,
           [&] { return cpu::attention<T>(data<T>(out), data<T>(q), data<T>(k_pages),
                                          data<T>(v_pages), page_table.data_ptr<int32_t>(),
                                          token_seq.data_ptr<int32_t>(),
                                          token_pos.data_ptr<int32_t>(), N, H, D, p.P, p.ld_pt,
                                          q.stride(0), q.stride(1), sc); },
           QF_CUDA(cuda_attention<T>(out, q, k_pages, v_pages, page_table, token_seq, token_pos,
                                     p, max_keys, sc, stream_)));
  });
  return out;
}

}  // namespace qf
