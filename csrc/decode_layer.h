// One decoder layer of a step in C++: the ops of QwenModel.forward's layer loop over the step's
// packed tokens, in the same order, on the same buffers, through the same ops/*.cpp entry points, so that the
// result is bit-identical to the Python loop while a layer costs one call from Python instead
// of about ten (each with its wrapper, dispatch and argument conversion: ~10 us apiece, 8-12%
// of an int4 decode step on the 2-core CPU).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace qf {

// A projection: a dense weight [N, K] (bits 0) or an int4/int8 one in the kernel layout.
struct __attribute__((visibility("hidden"))) LinearWeight {
  at::Tensor weight;
  int64_t bits = 0;
  int64_t in_features = 0, out_features = 0;
  std::optional<at::Tensor> perm;
};

// Hidden like the pybind11 types that hold it (the extension is built with -fvisibility=hidden).
class __attribute__((visibility("hidden"))) DecodeLayer {
 public:
  DecodeLayer(at::Tensor ln_1, LinearWeight c_attn, std::optional<at::Tensor> c_attn_bias,
              LinearWeight c_proj, at::Tensor ln_2, LinearWeight w1, LinearWeight w2,
              LinearWeight mlp_c_proj, int64_t heads, int64_t head_dim, double eps);

  // h [N, hidden]: the residual stream of the step's N packed tokens, updated in place; x [N,
  // hidden]: this layer's normalised input, overwritten with the next layer's (normalised by
  // next_norm). bufs: qkv [N, 3 * hidden], q and a [N, H, D], o [N, hidden], up, gate and act
  // [N, ffn]. k_pages / v_pages [pages, H, P, D]; page_table, token_seq, token_pos, max_keys:
  // the step's paged metadata (ops.h attention), built once per step for every layer; logn
  // [N, 1, 1] or none. k_scales / v_scales: an int8 cache's scales [pages, H, P, G] (with int8
  // pages), or none.
  void step(at::Tensor& h, at::Tensor& x, const std::vector<at::Tensor>& bufs,
            const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& cos,
            const at::Tensor& sin, const at::Tensor& page_table, const at::Tensor& token_seq,
            const at::Tensor& token_pos, int64_t max_keys, const std::optional<at::Tensor>& logn,
            const at::Tensor& next_norm, int64_t stream,
            const std::optional<at::Tensor>& k_scales = std::nullopt,
            const std::optional<at::Tensor>& v_scales = std::nullopt) const;

 private:
  void project(const LinearWeight& w, const std::optional<at::Tensor>& bias, const at::Tensor& x,
               const at::Tensor& out, int64_t stream) const;

  at::Tensor ln_1_, ln_2_;
  LinearWeight c_attn_, c_proj_, w1_, w2_, mlp_c_proj_;
  std::optional<at::Tensor> c_attn_bias_;
  int64_t heads_, head_dim_;
  double eps_;
};

}  // namespace qf
