#pragma once
// 16-byte vector memory access and the device conversions of vattn's element types (f16_t,
// bf16_t from dtypes.h, and float): the one place where the kernels turn stored 16-bit words
// into floats and back with the CUDA intrinsics (the dtypes.h functions are the portable
// bit-exact versions the CPU code uses; both round to nearest even). A "chunk" is 16 bytes =
// 8 f16_t / 8 bf16_t elements; kernels move chunks (LDG.128 / STG.128 / LDS.128) and convert
// them to 8 floats in registers.
//
// Interface (decode, prefill and merge kernels):
//   uint4 ld_global_16(const void* p)            16-byte global load (p 16-byte aligned)
//   uint4 ld_global_16_nc(const void* p)         same, through the read-only path
//   void  st_global_16(void* p, uint4 v)         16-byte global store
//   uint4 ld_shared_16(const void* p)            16-byte shared load
//   void  st_shared_16(void* p, uint4 v)
//   void  chunk_to_float<T>(uint4, float (&)[8]) T = f16_t or bf16_t
//   uint4 float_to_chunk<T>(const float (&)[8])  round to nearest even
//   float elem_to_float(T) / T float_to_elem<T>(float)   T = f16_t, bf16_t or float
//   float2 pair_to_float2(uint32_t, T)           two packed 16-bit elements (lo = .x)
//   uint32_t pack2<T>(float lo, float hi)        two floats -> packed bits (lo in the low half;
//                                                the lower column of an mma fragment)
//   bool  is_aligned_16(const void*)             host/device helper
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "vattn/dtypes.h"

namespace vattn {
namespace cuda {

constexpr int kChunkBytes = 16;

__host__ __device__ __forceinline__ bool is_aligned_16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

__device__ __forceinline__ uint4 ld_global_16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ uint4 ld_global_16_nc(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ void st_global_16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }
__device__ __forceinline__ uint4 ld_shared_16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void st_shared_16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

// ---- scalar conversions -------------------------------------------------------------------
__device__ __forceinline__ float elem_to_float(f16_t x) { return __half2float(__ushort_as_half(x.bits)); }
__device__ __forceinline__ float elem_to_float(bf16_t x) { return __bfloat162float(__ushort_as_bfloat16(x.bits)); }
__device__ __forceinline__ float elem_to_float(float x) { return x; }

template <typename T>
__device__ __forceinline__ T float_to_elem(float x);
template <>
__device__ __forceinline__ f16_t float_to_elem<f16_t>(float x) {
  return f16_t{__half_as_ushort(__float2half_rn(x))};
}
template <>
__device__ __forceinline__ bf16_t float_to_elem<bf16_t>(float x) {
  return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
}
template <>
__device__ __forceinline__ float float_to_elem<float>(float x) {
  return x;
}

// ---- pairs ---------------------------------------------------------------------------------
__device__ __forceinline__ float2 pair_to_float2(uint32_t bits, f16_t) {
  __half2 h;
  *reinterpret_cast<uint32_t*>(&h) = bits;
  return __half22float2(h);
}
__device__ __forceinline__ float2 pair_to_float2(uint32_t bits, bf16_t) {
  // bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32 bits.
  return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xffff0000u));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<f16_t>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<bf16_t>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// ---- whole chunks (8 x 16-bit) -------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void chunk_to_float(uint4 c, float (&x)[8]) {
  static_assert(sizeof(T) == 2, "chunk_to_float: 16-bit element types only");
  const float2 a = pair_to_float2(c.x, T{}), b = pair_to_float2(c.y, T{});
  const float2 e = pair_to_float2(c.z, T{}), f = pair_to_float2(c.w, T{});
  x[0] = a.x;
  x[1] = a.y;
  x[2] = b.x;
  x[3] = b.y;
  x[4] = e.x;
  x[5] = e.y;
  x[6] = f.x;
  x[7] = f.y;
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
