// Instruction sets of the CPU kernels' hot loops.
//
// A function marked FGK_CPU_KERNEL is compiled three times, for x86-64's baseline (SSE2), for
// x86-64-v3 (AVX2, FMA) and for x86-64-v4 (AVX-512), and the loader binds each call to the
// widest version the CPU runs (GCC's function multiversioning, an ELF ifunc): one binary that
// runs on any x86-64 CPU at the speed of a build for it. A build with FGKERNELS_NATIVE_ARCH=1
// (-march=native, FGK_NATIVE_ARCH) or for another architecture or compiler compiles one version.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__) && \
    !defined(FGK_NATIVE_ARCH)
#define FGK_CPU_KERNEL \
  __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FGK_CPU_KERNEL
#endif
