// The hand-written vector kernels compiled for AVX2 + FMA; cpu_features.h picks them at run time on
// CPUs that have them but not AVX-512 (the extension itself is built for baseline x86-64).
#define CONDKERNELS_VECTOR_TARGET "avx2,fma"
#define CONDKERNELS_VECTOR_HEADER "cpu/simd_avx2.h"
#define CONDKERNELS_VECTOR_ISA Avx2
#define CONDKERNELS_VECTOR_NAME avx2
#include "cpu/vector_kernels.inc"
