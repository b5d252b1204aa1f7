#pragma once
// Device side of the KV storage formats of kv_format.h: how the CUDA kernels read K/V stored in
// a format. DeviceKvFormat is specialized on the kv_format.h format types themselves, so a new
// format (fp8 / int8 / int4 with scales) is one more specialization here; the kernels never look
// at the stored bytes. (The prefill tile loader, KVTileLoader in prefill_tile.cuh, is keyed on
// the same types.)
//
// Every DeviceKvFormat<Format> provides
//   storage_t                   element type of the cache strides (= Format::storage_t)
//   kChunked                    whether the 16-byte chunk interface below exists
//   load(const storage_t*, i)   element i of one vector as float (scalar kernels)
// and, when kChunked (the split decode kernel's loads),
//   kElemsPerChunk              logical head_dim elements held in one 16-byte chunk
//   Args                        extra kernel arguments of the format (scale pointers, strides)
//   decode(uint4, float(&)[kElemsPerChunk])          one chunk -> floats
//   k_scale(args, row, tok, head) / v_scale(...)     multiplier of one whole K / V vector
//       (1 for unscaled formats). Kernels apply k_scale to the logit q.k and v_scale to the
//       softmax weight of the key, so a per-token-head scale costs one multiply per key.
#include <cstdint>

#include "vattn/cuda/vec.cuh"
#include "vattn/dtypes.h"
#include "vattn/kv_format.h"

namespace vattn {
namespace cuda {

// Any format: scalar loads through the format's own (portable) load; no chunk interface.
template <typename Format>
struct DeviceKvFormat {
  using storage_t = typename Format::storage_t;
  static constexpr bool kChunked = false;
  __device__ __forceinline__ static float load(const storage_t* p, int i) { return Format::load(p, i); }
};

// Plain 16-bit storage (f16_t / bf16_t), no scales: intrinsic conversions, 8 elements a chunk.
template <typename T>
struct DevicePlain16Format {
  static_assert(sizeof(T) == 2, "16-bit storage types only");
  using storage_t = T;
  static constexpr bool kChunked = true;
  static constexpr int kElemsPerChunk = kChunkBytes / int(sizeof(T)) * PlainFormat<T>::kElemsPerStorage;
  struct Args {};
  __device__ __forceinline__ static float load(const storage_t* p, int i) { return elem_to_float(p[i]); }
  __device__ __forceinline__ static void decode(uint4 c, float (&x)[kElemsPerChunk]) { chunk_to_float<T>(c, x); }
  __device__ __forceinline__ static float k_scale(const Args&, int64_t, int32_t, int32_t) { return 1.f; }
  __device__ __forceinline__ static float v_scale(const Args&, int64_t, int32_t, int32_t) { return 1.f; }
};
template <> struct DeviceKvFormat<PlainFormat<f16_t>> : DevicePlain16Format<f16_t> {};
template <> struct DeviceKvFormat<PlainFormat<bf16_t>> : DevicePlain16Format<bf16_t> {};

}  // namespace cuda
}  // namespace vattn
