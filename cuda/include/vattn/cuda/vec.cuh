#pragma once
// 16-byte vector memory access and fp16/bf16 <-> fp32 conversion of whole 16-byte chunks.
// A "chunk" is 16 bytes = 8 half / 8 bfloat16 elements; kernels move chunks (LDG.128 /
// STG.128 / LDS.128) and convert them to 8 floats in registers.
//
// Stable interface (the prefill kernels include this too):
//   uint4 ld_global_16(const void* p)            16-byte global load (p 16-byte aligned)
//   uint4 ld_global_16_nc(const void* p)         same, through the read-only path
//   void  st_global_16(void* p, uint4 v)         16-byte global store
//   uint4 ld_shared_16(const void* p)            16-byte shared load
//   void  st_shared_16(void* p, uint4 v)
//   void  chunk_to_float<T>(uint4, float (&)[8]) T = half or __nv_bfloat16
//   uint4 float_to_chunk<T>(const float (&)[8])  round to nearest even
//   float elem_to_float(T) / T float_to_elem<T>(float)
//   uint32_t pack2<T>(float lo, float hi)        two floats -> packed T2 bits (lo in the low half)
//   bool  is_aligned_16(const void*)             host/device helper
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace vattn {
namespace cuda {

constexpr int kChunkBytes = 16;

__host__ __device__ __forceinline__ bool is_aligned_16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

__device__ __forceinline__ uint4 ld_global_16(const void* p) {
  return *reinterpret_cast<const uint4*>(p);
}
__device__ __forceinline__ uint4 ld_global_16_nc(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}
__device__ __forceinline__ void st_global_16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }
__device__ __forceinline__ uint4 ld_shared_16(const void* p) {
  return *reinterpret_cast<const uint4*>(p);
}
__device__ __forceinline__ void st_shared_16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

// ---- scalar conversions -------------------------------------------------------------------
__device__ __forceinline__ float elem_to_float(half x) { return __half2float(x); }
__device__ __forceinline__ float elem_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float elem_to_float(float x) { return x; }

template <typename T> __device__ __forceinline__ T float_to_elem(float x);
template <> __device__ __forceinline__ half float_to_elem<half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 float_to_elem<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ float float_to_elem<float>(float x) { return x; }

// ---- pairs ---------------------------------------------------------------------------------
__device__ __forceinline__ float2 pair_to_float2(uint32_t bits, half) {
  __half2 h;
  *reinterpret_cast<uint32_t*>(&h) = bits;
  return __half22float2(h);
}
__device__ __forceinline__ float2 pair_to_float2(uint32_t bits, __nv_bfloat16) {
  // bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32 bits.
  return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xffff0000u));
}

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// ---- whole chunks (8 x 16-bit) -------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void chunk_to_float(uint4 c, float (&x)[8]) {
  static_assert(sizeof(T) == 2, "chunk_to_float: 16-bit element types only");
  const float2 a = pair_to_float2(c.x, T{}), b = pair_to_float2(c.y, T{});
  const float2 e = pair_to_float2(c.z, T{}), f = pair_to_float2(c.w, T{});
  x[0] = a.x; x[1] = a.y; x[2] = b.x; x[3] = b.y;
  x[4] = e.x; x[5] = e.y; x[6] = f.x; x[7] = f.y;
}

template <typename T>
__device__ __forceinline__ uint4 float_to_chunk(const float (&x)[8]) {
  static_assert(sizeof(T) == 2, "float_to_chunk: 16-bit element types only");
  uint4 c;
  c.x = pack2<T>(x[0], x[1]);
  c.y = pack2<T>(x[2], x[3]);
  c.z = pack2<T>(x[4], x[5]);
  c.w = pack2<T>(x[6], x[7]);
  return c;
}

}  // namespace cuda
}  // namespace vattn
