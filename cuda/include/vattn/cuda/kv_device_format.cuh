#pragma once
// Device-side KV storage formats for the chunked (16-byte) loaders of the CUDA kernels: the
// kernels are templated on a format and never look at the stored bytes themselves, so fp8 /
// int8 / int4 formats with scales slot in as new format types (the same idea as
// vattn::PlainFormat in kv_format.h, which the CPU code and the plain CUDA kernel use for
// scalar loads).
//
// A chunk format provides:
//   storage_t                 element type of the cache strides (strides count storage_t)
//   kElemsPerChunk            logical head_dim elements held in one 16-byte chunk
//   Args                      extra kernel arguments of the format (scale pointers, strides)
//   decode(uint4, float(&)[kElemsPerChunk])          one chunk -> floats
//   k_scale(args, row, tok, head) / v_scale(...)     multiplier of one whole K / V vector
//       (1 for unscaled formats). Kernels apply k_scale to the logit q.k and v_scale to the
//       softmax weight of the key, so a per-token-head scale costs one multiply per key.
#include <cstdint>

#include "vattn/cuda/vec.cuh"

namespace vattn {
namespace cuda {

// K/V stored as T (half or __nv_bfloat16), no scales.
template <typename T>
struct PlainChunkFormat {
  using storage_t = T;
  static constexpr int kElemsPerChunk = 16 / int(sizeof(T));
  struct Args {};
  __device__ __forceinline__ static void decode(uint4 c, float (&x)[kElemsPerChunk]) { chunk_to_float<T>(c, x); }
  __device__ __forceinline__ static float k_scale(const Args&, int64_t, int32_t, int32_t) { return 1.f; }
  __device__ __forceinline__ static float v_scale(const Args&, int64_t, int32_t, int32_t) { return 1.f; }
};

}  // namespace cuda
}  // namespace vattn
