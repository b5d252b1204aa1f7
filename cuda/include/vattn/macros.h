#pragma once
// Lets one header serve the CUDA kernels and the C++ CPU code.
#if defined(__CUDACC__)
#define VATTN_HD __host__ __device__ __forceinline__
#define VATTN_DEVICE __device__ __forceinline__
#else
#define VATTN_HD inline
#define VATTN_DEVICE inline
#endif
