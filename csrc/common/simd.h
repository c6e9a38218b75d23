// Runtime SIMD dispatch for the CPU kernels, with no -march at build time: QF_CPU_CLONES on a
// function makes GCC emit an x86-64-v4 (AVX-512), an x86-64-v3 (AVX2, FMA) and a baseline copy
// of it and pick one when the library loads (GNU ifunc). Put it on the per-row worker that the
// OpenMP loop calls (the loop body and its inlined helpers are then compiled for that ISA).
// Elsewhere (other compilers, other architectures) it is empty and the baseline build runs.
#pragma once

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define QF_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define QF_CPU_CLONES_ENABLED 1
#else
#define QF_CPU_CLONES
#define QF_CPU_CLONES_ENABLED 0
#endif

// Kernels written with x86 intrinsics per ISA level (function target attributes; GCC or clang).
#if defined(__x86_64__) && defined(__GNUC__)
#define QF_X86_INTRINSICS 1
#else
#define QF_X86_INTRINSICS 0
#endif

#if defined(__GNUC__)
#define QF_INLINE inline __attribute__((always_inline))
#else
#define QF_INLINE inline
#endif

namespace qf {

// Instruction-set levels of the kernels that are written with explicit intrinsics per level
// (linear); kAuto picks the best one the CPU has. Forcing a lower level lets the tests run every
// path on one machine.
enum class CpuIsa : int {
  kAuto = 0,
  kScalar = 1,      // plain C++, any CPU
  kAvx2 = 2,        // AVX2 + FMA + F16C
  kAvx512 = 3,      // AVX-512 F/BW/VL/DQ
  kAvx512Bf16 = 4,  // kAvx512 + AVX512_BF16 (vdpbf16ps)
  kAvx512Vnni = 5,  // kAvx512 + AVX512_VNNI (vpdpbusd): the int4/int8 kernels' level
};

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAuto: return "auto";
    case CpuIsa::kScalar: return "scalar";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx512Bf16: return "avx512_bf16";
    case CpuIsa::kAvx512Vnni: return "avx512_vnni";
  }
  return "unknown";
}

// Whether this CPU (and OS: __builtin_cpu_supports checks XCR0) runs `isa`; kAuto always.
inline bool cpu_isa_supported(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAuto:
    case CpuIsa::kScalar: return true;
#if QF_X86_INTRINSICS
    case CpuIsa::kAvx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case CpuIsa::kAvx512:
      __builtin_cpu_init();
      return cpu_isa_supported(CpuIsa::kAvx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq");
    case CpuIsa::kAvx512Bf16:
      __builtin_cpu_init();
      return cpu_isa_supported(CpuIsa::kAvx512) && __builtin_cpu_supports("avx512bf16");
    case CpuIsa::kAvx512Vnni:
      __builtin_cpu_init();
      return cpu_isa_supported(CpuIsa::kAvx512) && __builtin_cpu_supports("avx512vnni");
#endif
    default: return false;
  }
}

// The best level of the floating-point kernels this CPU runs (what kAuto means for linear).
inline CpuIsa best_cpu_isa() {
  if (cpu_isa_supported(CpuIsa::kAvx512Bf16)) return CpuIsa::kAvx512Bf16;
  if (cpu_isa_supported(CpuIsa::kAvx512)) return CpuIsa::kAvx512;
  if (cpu_isa_supported(CpuIsa::kAvx2)) return CpuIsa::kAvx2;
  return CpuIsa::kScalar;
}

// The instruction set that QF_CPU_CLONES functions run with on this machine.
inline const char* cpu_simd_level() {
#if QF_CPU_CLONES_ENABLED
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512f";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
#if defined(__AVX512F__)
  return "avx512f";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__SSE2__)
  return "sse2";
#elif defined(__ARM_FEATURE_SVE)
  return "sve";
#elif defined(__ARM_NEON)
  return "neon";
#else
  return "none";
#endif
}

}  // namespace qf
