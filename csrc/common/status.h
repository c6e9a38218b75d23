// Status codes returned by every launcher (CPU and CUDA). Launchers never throw: the binding
// (csrc/ops/common.h) turns a non-ok status into a Python exception. Torch-free and CUDA-free.
#pragma once

namespace qf {

enum class Status : int {
  kOk = 0,
  kInvalidArgument = 1,  // a size, stride or pointer the launcher cannot work with
  kUnsupported = 2,      // a valid request this build does not implement
  // A CUDA runtime error is returned as kCudaErrorBase + cudaError_t, so the caller can still
  // name it (cudaGetErrorString) after the launcher has cleared the runtime's error state.
  kCudaErrorBase = 1000,
};

inline constexpr bool ok(Status s) { return s == Status::kOk; }

inline constexpr Status cuda_error_status(int cuda_error) {
  return static_cast<Status>(static_cast<int>(Status::kCudaErrorBase) + cuda_error);
}

inline constexpr bool is_cuda_error(Status s) {
  return static_cast<int>(s) > static_cast<int>(Status::kCudaErrorBase);
}

// The cudaError_t value carried by a status for which is_cuda_error() holds.
inline constexpr int cuda_error_code(Status s) {
  return static_cast<int>(s) - static_cast<int>(Status::kCudaErrorBase);
}

inline const char* status_name(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kUnsupported: return "unsupported";
    default: return is_cuda_error(s) ? "CUDA error" : "unknown status";
  }
}

}  // namespace qf
