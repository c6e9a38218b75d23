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

#if defined(__GNUC__)
#define QF_INLINE inline __attribute__((always_inline))
#else
#define QF_INLINE inline
#endif

namespace qf {

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
