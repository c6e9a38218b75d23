// swiglu: checks, output, dispatch (ops/common.h).
#include "common.h"

namespace qf {
using namespace detail;

at::Tensor swiglu(const at::Tensor& up, const at::Tensor& gate, int64_t stream,
                  const OptTensor& out_arg) {
  const char* op = "swiglu";
  check_x(op, up, "up");
  check_same_as_x(op, "gate", gate, up, "up");
  at::Tensor out = output(op, out_arg, up.sizes(), up, "up", {{"up", &up}, {"gate", &gate}});
  if (out.numel() == 0) return out;
  const int64_t cols = up.size(-1);
  const Rows u = as_rows(up);
  const Rows g = as_rows(gate);
  dispatch_float_storage(up.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch(op, up, stream,
           [&] { return cpu::swiglu<T>(data<T>(out), data<T>(u.t), data<T>(g.t), u.rows, cols,
                                       cols, u.ld, g.ld); },
           QF_CUDA(cuda::swiglu<T>(data<T>(out), data<T>(u.t), data<T>(g.t), u.rows, cols, cols,
                                   u.ld, g.ld, stream_)));
  });
  return out;
}

}  // namespace qf
