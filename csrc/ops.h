// Tensor-level entry points, implemented in ops/*.cpp (one file per op family) and exposed by bindings.cpp.
// `stream` is a cudaStream_t passed as an integer (torch.cuda.current_stream().cuda_stream);
// it is ignored for CPU tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace qf {

// Every op that takes `out` (and fused_add_rms_norm's `residual_out`) writes its result there
// instead of allocating: a contiguous tensor of the result's shape, dtype and device that does not
// overlap the inputs (residual_out may be `residual` itself: the residual stream updated in
// place). The decode loop passes buffers allocated once per request.
using OptTensor = std::optional<at::Tensor>;

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, int64_t stream,
                    const OptTensor& out);

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x,
                                                      const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps,
                                                      int64_t stream, const OptTensor& out,
                                                      const OptTensor& residual_out);

// Causal attention over a paged KV cache (CPU or CUDA): q [N, H, D] (the packed tokens of a step,
// head dim contiguous), k_pages / v_pages [pages, H, P, D], page_table [sequences, max_pages] and
// token_seq / token_pos [N] int32 on q's device; token i sees keys 0 .. token_pos[i] of sequence
// token_seq[i]. max_keys: an upper bound on token_pos + 1 (the CUDA kernel plans its key splits
// by it without reading the device). Returns [N, H, D] in q's dtype. An int8 cache: k_pages /
// v_pages torch.int8 with k_scales / v_scales [pages, H, P, G] torch.float32 (G scales a
// position and head, each for D / G codes; reference.attention); both or neither.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                     const at::Tensor& page_table, const at::Tensor& token_seq,
                     const at::Tensor& token_pos, int64_t max_keys, double scale, int64_t stream,
                     const OptTensor& out, const OptTensor& k_scales = std::nullopt,
                     const OptTensor& v_scales = std::nullopt);

// GPT-NeoX RoPE of x [B, T, H, D] (any B, T, H strides) with cos/sin [B, T, R] fp32, CPU or
// CUDA; stream: the CUDA stream to launch on (ignored for CPU tensors).
at::Tensor rotary_embedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            int64_t stream);

// RoPE of q and k, with the rotated keys and the values written straight into a paged KV cache
// (CPU or CUDA): q, k, v [N, H, D] views sharing their strides (of the fused qkv output); cos/sin
// [N, R] fp32; token i writes its key and value at position token_pos[i] of sequence
// token_seq[i] (page page_table[s, pos / P], offset pos % P). Returns the rotated q ([N, H, D],
// contiguous; into `out` if given). An int8 cache (int8 pages, k_scales / v_scales as for
// attention) gets reference.quantize_kv's codes and scales of the rotated key and the value.
at::Tensor rotary_kv_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_pages,
                           const at::Tensor& v_pages, const at::Tensor& page_table,
                           const at::Tensor& token_seq, const at::Tensor& token_pos,
                           int64_t stream, const OptTensor& out,
                           const OptTensor& k_scales = std::nullopt,
                           const OptTensor& v_scales = std::nullopt);

at::Tensor swiglu(const at::Tensor& up, const at::Tensor& gate, int64_t stream,
                  const OptTensor& out);

// y = x . weight^T + bias. isa: "auto" (decode sizes run our kernel at the best level this CPU
// has; prefill sizes go wherever is fastest, see ops/linear.cpp) or one of linear_isas(), which forces
// our kernel at that level for every size (the tests use it to reach each path). CUDA: our GEMV
// up to 16 rows of x, torch's at::linear (cuBLAS) beyond; isa must be "auto".
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, int64_t stream, const std::string& isa,
                  const OptTensor& out);

// The ISA levels of the linear kernel this CPU runs, best first ("avx512_bf16", "avx512",
// "avx2", "scalar").
std::vector<std::string> linear_isas();

// y = x . W^T + bias with int4/int8 weights in our kernel layout ([ceil(N / 16),
// quant_tile_bytes] uint8; qwen_fast/qweight.py), CPU or CUDA (weight, bias, perm on x's
// device). perm: [K] int64, the act-order permutation of the inputs, or none. isa: "auto",
// "avx512_vnni", "avx2" or "scalar" (the portable loop; CPU only). CUDA: our GEMV up to 16 rows
// of x; beyond, the weight dequantized into a dense scratch tensor, then at::linear.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& weight, int64_t bits,
                        int64_t in_features, int64_t out_features,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& perm, int64_t stream,
                        const std::string& isa, const OptTensor& out);
// Two int4/int8 weights without bias or perm against the same x on the CPU (the MLP's w1 and
// w2 in a decode step): x quantized once, one parallel region for both; out1 / out2 (contiguous,
// [..., n1] / [..., n2], x's dtype) get what quant_linear gives, bit for bit.
void quant_linear_pair(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                       int64_t bits, int64_t n1, int64_t n2, const at::Tensor& out1,
                       const at::Tensor& out2);
int64_t quant_tile_bytes(int64_t bits, int64_t in_features);
std::vector<std::string> quant_linear_isas();

// Number of CUDA devices our (static) CUDA runtime sees; 0 without a CUDA build or a device.
int64_t cuda_device_count();

}  // namespace qf
