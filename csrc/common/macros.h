// Macros that let one function body serve both the host (CPU kernels) and the device (CUDA kernels).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CK_HOST_DEVICE __host__ __device__
#define CK_INLINE __host__ __device__ __forceinline__
#else
#define CK_HOST_DEVICE
#define CK_INLINE inline
#endif
