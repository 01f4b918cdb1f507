// The hand-written vector kernels compiled for AVX-512 (AVX-512F); cpu_features.h picks them at run
// time on CPUs that have it (the extension itself is built for baseline x86-64).
#define CONDKERNELS_VECTOR_TARGET "avx512f"
#define CONDKERNELS_VECTOR_HEADER "cpu/simd_avx512.h"
#define CONDKERNELS_VECTOR_ISA Avx512
#define CONDKERNELS_VECTOR_NAME avx512
#include "cpu/vector_kernels.inc"
