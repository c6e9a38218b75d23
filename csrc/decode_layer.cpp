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
                       const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& cos, const at::Tensor& sin,
                       const std::vector<int64_t>& slots, const std::vector<int64_t>& lengths,
                       const at::Tensor& start, const std::vector<int64_t>& runs, int64_t S,
                       const std::optional<at::Tensor>& logn, const at::Tensor& next_norm,
                       int64_t stream) const {
  TORCH_CHECK(bufs.size() == 7, "DecodeLayer.step: bufs must be [qkv, q, a, o, up, gate, act]");
  TORCH_CHECK(runs.size() % 3 == 0, "DecodeLayer.step: runs must be (i0, i1, r0) triples");
  const at::Tensor &qkv = bufs[0], &q = bufs[1], &a = bufs[2], &o = bufs[3], &up = bufs[4],
                   &gate = bufs[5], &act = bufs[6];
  const int64_t B = h.size(0), H = heads_, D = head_dim_;
  project(c_attn_, c_attn_bias_, x, qkv, stream);
  const at::Tensor parts = qkv.view({B, 1, 3, H, D});
  const std::vector<int64_t> n_new(static_cast<size_t>(B), 1);
  rotary_kv_cache(parts.select(2, 0), parts.select(2, 1), parts.select(2, 2), cos, sin, k_cache,
                  v_cache, slots, lengths, n_new, stream, q);
  if (logn.has_value()) q.mul_(*logn);
  const double scale = std::pow(static_cast<double>(D), -0.5);  // Python's D ** -0.5 (ops.attention)
  for (size_t r = 0; r < runs.size(); r += 3) {
    const int64_t i0 = runs[r], i1 = runs[r + 1], r0 = runs[r + 2];
    attention(q.slice(0, i0, i1), k_cache.slice(0, r0, r0 + i1 - i0).slice(2, 0, S).transpose(1, 2),
              v_cache.slice(0, r0, r0 + i1 - i0).slice(2, 0, S).transpose(1, 2),
              start.slice(0, i0, i1), scale, stream, a.slice(0, i0, i1));
  }
  project(c_proj_, std::nullopt, a.view({B, 1, H * D}), o, stream);
  fused_add_rms_norm(o, h, ln_2_, eps_, stream, x, h);
  project(w1_, std::nullopt, x, up, stream);
  project(w2_, std::nullopt, x, gate, stream);
  swiglu(up, gate, stream, act);
  project(mlp_c_proj_, std::nullopt, act, o, stream);
  fused_add_rms_norm(o, h, next_norm, eps_, stream, x, h);
}

}  // namespace qf
