// rotary_embedding and rotary_kv_cache (RoPE, and RoPE with the paged KV cache write, 16/32-bit
// or int8 with k_scales / v_scales): checks, outputs, dispatch (ops/common.h).
#include "common.h"

namespace qf {
using namespace detail;
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
    launch(op, x, stream,
           [&] { return cpu::rotary_embedding<T>(data<T>(out), data<T>(x), data<float>(c),
                                                 data<float>(s), x.size(0), x.size(1), x.size(2),
                                                 x.size(3), cos.size(2), x.stride(0), x.stride(1),
                                                 x.stride(2)); },
           QF_CUDA(cuda::rotary_embedding<T>(data<T>(out), data<T>(x), data<float>(c),
                                             data<float>(s), x.size(0), x.size(1), x.size(2),
                                             x.size(3), cos.size(2), x.stride(0), x.stride(1),
                                             x.stride(2), stream_)));
  });
  return out;
}

at::Tensor rotary_kv_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_pages,
                           const at::Tensor& v_pages, const at::Tensor& page_table,
                           const at::Tensor& token_seq, const at::Tensor& token_pos,
                           int64_t stream, const OptTensor& out_arg, const OptTensor& k_scales,
                           const OptTensor& v_scales) {
  const char* op = "rotary_kv_cache";
  TORCH_CHECK(q.dim() == 3, op, ": q must have shape [tokens, heads, head_dim], got ",
              shape_str(q.sizes()));
  check_x(op, q, "q");
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  for (const auto& [name, t] : {Named{"k", &k}, Named{"v", &v}}) {
    TORCH_CHECK(t->sizes() == q.sizes(), op, ": ", name, " must have shape ", shape_str(q.sizes()),
                " (the shape of q), got ", shape_str(t->sizes()));
    check_dtype_device_as_x(op, name, *t, q, "q");
    TORCH_CHECK(t->strides() == q.strides(), op, ": ", name, " must have the strides of q ",
                shape_str(q.strides()), " (q, k, v are views of one qkv buffer), got ",
                shape_str(t->strides()));
  }
  // cos / sin: [N, R] fp32 (the table rows of each token), checked as [1, N, R] against q[None].
  const at::Tensor q4 = q.unsqueeze(0);
  TORCH_CHECK(cos.dim() == 2, op, ": cos must have shape [", N, ", R], got ", shape_str(cos.sizes()));
  check_rope_table(op, "cos", cos.unsqueeze(0), q4);
  TORCH_CHECK(sin.sizes() == cos.sizes(), op, ": sin must have shape ", shape_str(cos.sizes()),
              " (the shape of cos), got ", shape_str(sin.sizes()));
  check_rope_table(op, "sin", sin.unsqueeze(0), q4);
  const Paged p = check_paged(op, q, k_pages, v_pages, page_table, token_seq, token_pos, false,
                              k_scales, v_scales);
  const at::Tensor none;
  const at::Tensor& ks = k_scales.has_value() ? *k_scales : none;
  const at::Tensor& vs = v_scales.has_value() ? *v_scales : none;
  for (const auto& [name, t] : {Named{"q", &q}, Named{"k", &k}, Named{"v", &v}})
    TORCH_CHECK(!may_overlap(k_pages, *t) && !may_overlap(v_pages, *t) && !may_overlap(ks, *t) &&
                    !may_overlap(vs, *t),
                op, ": the pages (or scales) share memory with ", name, "; they must be separate");
  at::Tensor out = output(op, out_arg, q.sizes(), q, "q",
                          {{"q", &q}, {"k", &k}, {"v", &v}, {"k_pages", &k_pages},
                           {"v_pages", &v_pages}, {"k_scales", &ks}, {"v_scales", &vs}});
  if (out.numel() == 0) return out;
  const at::Tensor c = cos.contiguous();
  const at::Tensor s = sin.contiguous();
  const int64_t R = cos.size(1);
  const int32_t* pt = page_table.data_ptr<int32_t>();
  const int32_t* ts = token_seq.data_ptr<int32_t>();
  const int32_t* tp = token_pos.data_ptr<int32_t>();
  dispatch_float_storage(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (p.G > 0) {  // an int8 cache: codes and scales
      launch(op, q, stream,
             [&] { return cpu::rotary_kv_cache_int8<T>(
                       data<T>(out), data<int8_t>(k_pages), data<int8_t>(v_pages),
                       data<float>(ks), data<float>(vs), data<T>(q), data<T>(k), data<T>(v),
                       data<float>(c), data<float>(s), pt, ts, tp, N, H, D, R, p.P, p.ld_pt,
                       q.stride(0), q.stride(1), p.G); },
             QF_CUDA(cuda::rotary_kv_cache_int8<T>(
                 data<T>(out), data<int8_t>(k_pages), data<int8_t>(v_pages), data<float>(ks),
                 data<float>(vs), data<T>(q), data<T>(k), data<T>(v), data<float>(c),
                 data<float>(s), pt, ts, tp, N, H, D, R, p.P, p.ld_pt, q.stride(0), q.stride(1),
                 p.G, stream_)));
      return;
    }
    launch(op, q, stream,
           [&] { return cpu::rotary_kv_cache<T>(data<T>(out), data<T>(k_pages), data<T>(v_pages),
                                                data<T>(q), data<T>(k), data<T>(v), data<float>(c),
                                                data<float>(s), pt, ts, tp, N, H, D, R, p.P,
                                                p.ld_pt, q.stride(0), q.stride(1)); },
           QF_CUDA(cuda::rotary_kv_cache<T>(data<T>(out), data<T>(k_pages), data<T>(v_pages),
                                            data<T>(q), data<T>(k), data<T>(v), data<float>(c),
                                            data<float>(s), pt, ts, tp, N, H, D, R, p.P, p.ld_pt,
                                            q.stride(0), q.stride(1), stream_)));
  });
  return out;
}

}  // namespace qf
