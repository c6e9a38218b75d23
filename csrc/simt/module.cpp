// qwen_fast._simt: our CUDA kernels' own .cu sources, compiled by the host compiler against the
// SIMT emulator (simt.h), behind a small binding that takes CPU tensors as "device" memory.
// Test infrastructure (tests/test_simt*.py): it checks the kernels' logic, not their speed.
#include <torch/extension.h>

#include <string>

#include "simt.h"
// The kernels, as nvcc compiles them for the GPU (QF_SIMT swaps the CUDA headers for simt.h).
#include "../cuda/rms_norm.cu"
#include "../cuda/rotary_embedding.cu"

#include "../cuda/swiglu.cu"

#include "../cuda/linear.cu"

#include "../cuda/quant_linear.cu"

#include "../cuda/attention.cu"

#include "selftest.cu"

namespace {

void check(qf::Status s, const char* op) {
  if (s == qf::Status::kOk) return;
  const std::string why = qf::is_cuda_error(s) ? cudaGetErrorString(cudaErrorLaunchFailure)
                                               : qf::status_name(s);
  throw std::runtime_error(std::string(op) + ": " + why);
}

void check_launch(const char* op) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string(op) + ": " + cudaGetErrorString(e));
}

template <typename F>
void dispatch(const at::Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(qf::bf16{}); break;
    case at::kHalf: f(qf::fp16{}); break;
    default: throw std::invalid_argument("simt: float32, bfloat16 or float16 tensors only");
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

}  // namespace

PYBIND11_MODULE(_simt, m) {
  m.doc() = "Our CUDA kernels run by the SIMT emulator on the CPU (test infrastructure).";
  m.def("set_seed", &qf::simt::set_seed, "Seed of the emulator's scheduling order.");

  // ---- the project's kernels: the launchers of csrc/cuda/kernels.cuh on CPU tensors --------
  m.def("rms_norm", [](at::Tensor out, const at::Tensor& x, const at::Tensor& w, double eps) {
    const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
    dispatch(x, [&](auto tag) {
      using T = decltype(tag);
      check(qf::cuda::rms_norm<T>(ptr<T>(out), ptr<T>(x), ptr<T>(w), rows, hidden, out.stride(-2),
                                  x.stride(-2), static_cast<float>(eps), nullptr),
            "rms_norm");
    });
  });
  m.def("fused_add_rms_norm", [](at::Tensor out, at::Tensor residual_out, const at::Tensor& x,
                                 const at::Tensor& residual, const at::Tensor& w, double eps) {
    const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
    dispatch(x, [&](auto tag) {
      using T = decltype(tag);
      check(qf::cuda::fused_add_rms_norm<T>(ptr<T>(out), ptr<T>(residual_out), ptr<T>(x),
                                            ptr<T>(residual), ptr<T>(w), rows, hidden,
                                            out.stride(-2), residual_out.stride(-2), x.stride(-2),
                                            residual.stride(-2), static_cast<float>(eps), nullptr),
            "fused_add_rms_norm");
    });
  });

  // ---- rotary_embedding, rotary_kv_cache ---------------------------------------------------
  // x: [B, T, H, D] at any B, T, H strides; cos, sin: contiguous [B, T, R] fp32.
  m.def("rotary_embedding", [](at::Tensor out, const at::Tensor& x, const at::Tensor& cos,
                               const at::Tensor& sin) {
    dispatch(x, [&](auto tag) {
      using T = decltype(tag);
      check(qf::cuda::rotary_embedding<T>(ptr<T>(out), ptr<T>(x), ptr<float>(cos), ptr<float>(sin),
                                          x.size(0), x.size(1), x.size(2), x.size(3), cos.size(2),
                                          x.stride(0), x.stride(1), x.stride(2), nullptr),
            "rotary_embedding");
    });
  });
  // q_out [N, H, D] contiguous; k_pages, v_pages [pages, H, P, D] contiguous; q, k, v [N, H, D]
  // views with q's strides; cos, sin contiguous [N, R] fp32; page_table [seqs, ld_pt] (rows at
  // stride ld_pt) and token_seq, token_pos [N] contiguous, all int32.
  m.def("rotary_kv_cache", [](at::Tensor q_out, at::Tensor k_pages, at::Tensor v_pages,
                              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& cos, const at::Tensor& sin,
                              const at::Tensor& page_table, const at::Tensor& token_seq,
                              const at::Tensor& token_pos) {
    dispatch(q, [&](auto tag) {
      using T = decltype(tag);
      check(qf::cuda::rotary_kv_cache<T>(
                ptr<T>(q_out), ptr<T>(k_pages), ptr<T>(v_pages), ptr<T>(q), ptr<T>(k), ptr<T>(v),
                ptr<float>(cos), ptr<float>(sin), page_table.data_ptr<int32_t>(),
                token_seq.data_ptr<int32_t>(), token_pos.data_ptr<int32_t>(), q.size(0),
                q.size(1), q.size(2), cos.size(1), k_pages.size(2), page_table.stride(0),
                q.stride(0), q.stride(1), nullptr),
            "rotary_kv_cache");
    });
  });
  // The int8 cache: k_pages, v_pages int8 [pages, H, P, D], k_scales, v_scales fp32
  // [pages, H, P, G], all contiguous; the rest as rotary_kv_cache.
  m.def("rotary_kv_cache_int8", [](at::Tensor q_out, at::Tensor k_pages, at::Tensor v_pages,
                                   at::Tensor k_scales, at::Tensor v_scales, const at::Tensor& q,
                                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                                   const at::Tensor& sin, const at::Tensor& page_table,
                                   const at::Tensor& token_seq, const at::Tensor& token_pos) {
    dispatch(q, [&](auto tag) {
      using T = decltype(tag);
      check(qf::cuda::rotary_kv_cache_int8<T>(
                ptr<T>(q_out), ptr<int8_t>(k_pages), ptr<int8_t>(v_pages), ptr<float>(k_scales),
                ptr<float>(v_scales), ptr<T>(q), ptr<T>(k), ptr<T>(v), ptr<float>(cos),
                ptr<float>(sin), page_table.data_ptr<int32_t>(), token_seq.data_ptr<int32_t>(),
                token_pos.data_ptr<int32_t>(), q.size(0), q.size(1), q.size(2), cos.size(1),
                k_pages.size(2), page_table.stride(0), q.stride(0), q.stride(1),
                k_scales.size(3), nullptr),
            "rotary_kv_cache_int8");
    });
  });

  // ---- swiglu -------------------------------------------------------------------------------
  m.def("swiglu", [](at::Tensor out, const at::Tensor& up, const at::Tensor& gate) {
    const int64_t cols = up.size(-1), rows = up.numel() / cols;
    dispatch(up, [&](auto tag) {
      using T = decltype(tag);
      check(qf::cuda::swiglu<T>(ptr<T>(out), ptr<T>(up), ptr<T>(gate), rows, cols, out.stride(-2),
                                up.stride(-2), gate.stride(-2), nullptr),
            "swiglu");
    });
  });

  // ---- linear -------------------------------------------------------------------------------
  m.def("linear", [](at::Tensor y, const at::Tensor& x, const at::Tensor& w,
                     const std::optional<at::Tensor>& bias) {
    dispatch(x, [&](auto tag) {
      using T = decltype(tag);
      check(qf::cuda::linear<T>(ptr<T>(y), ptr<T>(x), ptr<T>(w), bias ? ptr<T>(*bias) : nullptr,
                                x.size(0), w.size(0), w.size(1), y.stride(0), x.stride(0), nullptr),
            "linear");
    });
  });

  // ---- quant_linear -------------------------------------------------------------------------
  m.def("quant_linear", [](at::Tensor y, const at::Tensor& x, const at::Tensor& w, int64_t bits,
                           int64_t out_features, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& perm) {
    dispatch(x, [&](auto tag) {
      using T = decltype(tag);
      check(qf::cuda::quant_linear<T>(ptr<T>(y), ptr<T>(x), ptr<uint8_t>(w),
                                      bias ? ptr<T>(*bias) : nullptr,
                                      perm ? ptr<int64_t>(*perm) : nullptr, x.size(0),
                                      out_features, x.size(1), static_cast<int>(bits),
                                      y.stride(0), x.stride(0), nullptr),
            "quant_linear");
    });
  });
  m.def("quant_linear_dequantize", [](at::Tensor out, const at::Tensor& w, int64_t bits,
                                      const std::optional<at::Tensor>& perm) {
    dispatch(out, [&](auto tag) {
      using T = decltype(tag);
      check(qf::cuda::quant_linear_dequantize<T>(ptr<T>(out), ptr<uint8_t>(w),
                                                 perm ? ptr<int64_t>(*perm) : nullptr, out.size(0),
                                                 out.size(1), static_cast<int>(bits),
                                                 out.stride(0), nullptr),
            "quant_linear_dequantize");
    });
  });

  // ---- attention ----------------------------------------------------------------------------
  m.def("attention_workspace_bytes", &qf::cuda::attention_workspace_bytes);
  // out [N, H, D] contiguous; q [N, H, D] at any N, H strides; k_pages, v_pages [pages, H, P, D]
  // contiguous; page_table [seqs, ld_pt] (rows at stride ld_pt), token_seq, token_pos [N]
  // contiguous, all int32; workspace a uint8 tensor of at least
  // attention_workspace_bytes(N, H, D, max_keys) bytes.
  m.def("attention", [](at::Tensor out, const at::Tensor& q, const at::Tensor& k_pages,
                        const at::Tensor& v_pages, const at::Tensor& page_table,
                        const at::Tensor& token_seq, const at::Tensor& token_pos,
                        int64_t max_keys, double scale, at::Tensor workspace) {
    dispatch(q, [&](auto tag) {
      using T = decltype(tag);
      check(qf::cuda::attention<T>(ptr<T>(out), ptr<T>(q), ptr<T>(k_pages), ptr<T>(v_pages),
                                   page_table.data_ptr<int32_t>(), token_seq.data_ptr<int32_t>(),
                                   token_pos.data_ptr<int32_t>(), q.size(0), q.size(1), q.size(2),
                                   k_pages.size(2), page_table.stride(0), max_keys, q.stride(0),
                                   q.stride(1), static_cast<float>(scale), workspace.data_ptr(),
                                   workspace.numel(), nullptr),
            "attention");
    });
  });
  // The int8 cache: k_pages, v_pages int8 [pages, H, P, D], k_scales, v_scales fp32
  // [pages, H, P, G], all contiguous; the rest as attention.
  m.def("attention_int8", [](at::Tensor out, const at::Tensor& q, const at::Tensor& k_pages,
                             const at::Tensor& v_pages, const at::Tensor& k_scales,
                             const at::Tensor& v_scales, const at::Tensor& page_table,
                             const at::Tensor& token_seq, const at::Tensor& token_pos,
                             int64_t max_keys, double scale, at::Tensor workspace) {
    dispatch(q, [&](auto tag) {
      using T = decltype(tag);
      check(qf::cuda::attention_int8<T>(
                ptr<T>(out), ptr<T>(q), ptr<int8_t>(k_pages), ptr<int8_t>(v_pages),
                ptr<float>(k_scales), ptr<float>(v_scales), page_table.data_ptr<int32_t>(),
                token_seq.data_ptr<int32_t>(), token_pos.data_ptr<int32_t>(), q.size(0),
                q.size(1), q.size(2), k_pages.size(2), page_table.stride(0), max_keys,
                q.stride(0), q.stride(1), static_cast<float>(scale), k_scales.size(3),
                workspace.data_ptr(), workspace.numel(), nullptr),
            "attention_int8");
    });
  });

  // ---- the emulator's own tests ------------------------------------------------------------
  m.def("selftest_reverse", [](at::Tensor out, int blocks, int threads, bool barrier) {
    auto k = barrier ? qf::simt_selftest::reverse_kernel<true>
                     : qf::simt_selftest::reverse_kernel<false>;
    QF_LAUNCH(blocks, threads, 0, nullptr, k)(ptr<int>(out));
    check_launch("reverse");
  });
  m.def("selftest_block_sum", [](at::Tensor out, const at::Tensor& x, int blocks, int threads) {
    QF_LAUNCH(blocks, threads, 0, nullptr, qf::simt_selftest::block_sum_kernel)(ptr<float>(out),
                                                                               ptr<float>(x));
    check_launch("block_sum");
  });
  m.def("selftest_shuffle", [](at::Tensor out, const at::Tensor& x, int blocks, int threads) {
    QF_LAUNCH(blocks, threads, 0, nullptr, qf::simt_selftest::shuffle_kernel)(ptr<float>(out),
                                                                             ptr<float>(x));
    check_launch("shuffle");
  });
  m.def("selftest_fault", [](at::Tensor out, int threads, int which) {
    QF_LAUNCH(1, threads, 0, nullptr, qf::simt_selftest::fault_kernel)(ptr<int>(out), which);
    check_launch("fault");
  });
  m.def("selftest_dynamic_smem", [](at::Tensor out, int blocks, int threads, int n) {
    QF_LAUNCH(blocks, threads, n, nullptr, qf::simt_selftest::dynamic_smem_kernel)(
        ptr<unsigned char>(out), n);
    check_launch("dynamic_smem");
  });
  m.def("selftest_launch", [](int threads) {
    QF_LAUNCH(1, threads, 0, nullptr, qf::simt_selftest::fault_kernel)(nullptr, 0);
    check_launch("launch");
  });
}
