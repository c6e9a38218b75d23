// DecodeLayer (decode_layer.h): QwenModel.forward's layer loop for one new token per row, in C++.
#include "decode_layer.h"

#include <cmath>

#include "ops.h"

namespace qf {

DecodeLayer::DecodeLayer(at::Tensor ln_1, LinearWeight c_attn, std::optional<at::Tensor> c_attn_bias,
                         LinearWeight c_proj, at::Tensor ln_2, LinearWeight w1, LinearWeight w2,
                         LinearWeight mlp_c_proj, int64_t heads, int64_t head_dim, double eps)
    : ln_1_(std::move(ln_1)),
      ln_2_(std::move(ln_2)),
      c_attn_(std::move(c_attn)),
      c_proj_(std::move(c_proj)),
      w1_(std::move(w1)),
      w2_(std::move(w2)),
      mlp_c_proj_(std::move(mlp_c_proj)),
      c_attn_bias_(std::move(c_attn_bias)),
      heads_(heads),
      head_dim_(head_dim),
      eps_(eps) {
  TORCH_CHECK(heads >= 1 && head_dim >= 1, "DecodeLayer: heads and head_dim must be >= 1");
}

void DecodeLayer::project(const LinearWeight& w, const std::optional<at::Tensor>& bias,
                          const at::Tensor& x, const at::Tensor& out, int64_t stream) const {
  if (w.bits == 0)
    linear(x, w.weight, bias, stream, "auto", out);
  else
    quant_linear(x, w.weight, w.bits, w.in_features, w.out_features, bias, w.perm, stream, "auto",
                 out);
}

void DecodeLayer::step(at::Tensor& h, at::Tensor& x, const std::vector<at::Tensor>& bufs,
                       const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& cos,
                       const at::Tensor& sin, const at::Tensor& page_table,
                       const at::Tensor& token_seq, const at::Tensor& token_pos, int64_t max_keys,
                       const std::optional<at::Tensor>& logn, const at::Tensor& next_norm,
                       int64_t stream, const std::optional<at::Tensor>& k_scales,
                       const std::optional<at::Tensor>& v_scales) const {
  TORCH_CHECK(bufs.size() == 7, "DecodeLayer.step: bufs must be [qkv, q, a, o, up, gate, act]");
  const at::Tensor &qkv = bufs[0], &q = bufs[1], &a = bufs[2], &o = bufs[3], &up = bufs[4],
                   &gate = bufs[5], &act = bufs[6];
  const int64_t N = h.size(0), H = heads_, D = head_dim_;
  project(c_attn_, c_attn_bias_, x, qkv, stream);
  const at::Tensor parts = qkv.view({N, 3, H, D});
  rotary_kv_cache(parts.select(1, 0), parts.select(1, 1), parts.select(1, 2), cos, sin, k_pages,
                  v_pages, page_table, token_seq, token_pos, stream, q, k_scales, v_scales);
  if (logn.has_value()) q.mul_(*logn);
  const double scale = std::pow(static_cast<double>(D), -0.5);  // Python's D ** -0.5 (ops.attention)
  attention(q, k_pages, v_pages, page_table, token_seq, token_pos, max_keys, scale, stream, a,
            k_scales, v_scales);
  project(c_proj_, std::nullopt, a.view({N, H * D}), o, stream);
  fused_add_rms_norm(o, h, ln_2_, eps_, stream, x, h);
  if (x.is_cpu() && w1_.bits != 0 && w1_.bits == w2_.bits && !w1_.perm && !w2_.perm &&
      w1_.in_features == w2_.in_features) {
    // One pass for both (ops.h quant_linear_pair): a fork/join, a quantization of x and a ramp
    // of the memory streams fewer; the same bits as the two calls.
    quant_linear_pair(x, w1_.weight, w2_.weight, w1_.bits, w1_.out_features, w2_.out_features,
                      up, gate);
  } else {
    project(w1_, std::nullopt, x, up, stream);
    project(w2_, std::nullopt, x, gate, stream);
  }
  swiglu(up, gate, stream, act);
  project(mlp_c_proj_, std::nullopt, act, o, stream);
  fused_add_rms_norm(o, h, next_norm, eps_, stream, x, h);
}

}  // namespace qf
