// rms_norm and fused_add_rms_norm: checks, outputs, dispatch (ops/common.h).
#include "common.h"

namespace qf {
using namespace detail;

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, int64_t stream,
                    const OptTensor& out_arg) {
  const char* op = "rms_norm";
  check_x(op, x);
  check_weight(op, weight, x);
  at::Tensor out = output(op, out_arg, x.sizes(), x, "x", {{"x", &x}, {"weight", &weight}});
  if (out.numel() == 0) return out;
  const int64_t hidden = x.size(-1);
  const Rows in = as_rows(x);
  const float e = static_cast<float>(eps);
  dispatch_float_storage(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch(op, x, stream,
           [&] { return cpu::rms_norm<T>(data<T>(out), data<T>(in.t), data<T>(weight), in.rows,
                                         hidden, hidden, in.ld, e); },
           QF_CUDA(cuda::rms_norm<T>(data<T>(out), data<T>(in.t), data<T>(weight), in.rows, hidden,
                                     hidden, in.ld, e, stream_)));
  });
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
  const float e = static_cast<float>(eps);
  dispatch_float_storage(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch(op, x, stream,
           [&] { return cpu::fused_add_rms_norm<T>(data<T>(out), data<T>(residual_out),
                                                   data<T>(in.t), data<T>(res.t), data<T>(weight),
                                                   in.rows, hidden, hidden, hidden, in.ld, res.ld,
                                                   e); },
           QF_CUDA(cuda::fused_add_rms_norm<T>(data<T>(out), data<T>(residual_out), data<T>(in.t),
                                               data<T>(res.t), data<T>(weight), in.rows, hidden,
                                               hidden, hidden, in.ld, res.ld, e, stream_)));
  });
  return {out, residual_out};
}

}  // namespace qf
