// What the extension's own CUDA runtime sees.
#include "common.h"

namespace qf {

int64_t cuda_device_count() {
#ifdef QF_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the error, report none
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

}  // namespace qf
