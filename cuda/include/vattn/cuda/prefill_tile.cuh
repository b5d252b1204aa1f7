#pragma once
// Shared-memory tiles of the tensor-core prefill kernel and the loaders that fill them.
//
// A tile is ROWS x D 16-bit elements, row major, stored in 16-byte chunks (8 elements). Chunk c
// of row r lives at chunk slot (c ^ (r & 7)) of that row: the eight rows an ldmatrix phase reads
// (same logical chunk, rows r..r+7) then hit eight different 16-byte bank groups, so ldmatrix and
// the 16-byte cp.async writes are free of bank conflicts. Needs D / 8 to be a multiple of 8.
//
// Loaders are chosen by the KV storage format (kv_format.h): the plain 16-bit format copies
// rows with cp.async; a quantized format would dequantize into the same swizzled tile with
// ordinary shared stores, and the kernel's wait + __syncthreads covers both.
#include <cstdint>

#include "vattn/cuda/cp_async.cuh"
#include "vattn/kv_format.h"

namespace vattn {
namespace prefill {

template <int D>
struct TileLayout {
  static_assert(D % 64 == 0, "the swizzle needs D / 8 to be a multiple of 8");
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  // Byte offset of logical chunk c of row r inside a tile.
  static __device__ __forceinline__ uint32_t offset(int r, int c) {
    return uint32_t(r * kChunks + (c ^ (r & 7))) * 16u;
  }
};

// Copies rows [0, ROWS) of a tile whose row r is global row (row0 + r) at base + (row0 + r) *
// stride (elements). Only rows r with lo <= r < hi are read; the others are zero-filled, so
// a row past a length (NaN or unmapped memory in a cache) is never touched.
template <int D, int ROWS, int NT>
__device__ __forceinline__ void load_tile_16bit(uint32_t smem, const uint16_t* base, int64_t stride, int row0,
                                                int lo, int hi, int tid) {
  using L = TileLayout<D>;
  static_assert((ROWS * L::kChunks) % NT == 0, "tile chunks must split evenly over the threads");
#pragma unroll
  for (int it = 0; it < ROWS * L::kChunks / NT; ++it) {
    const int idx = it * NT + tid;
    const int r = idx / L::kChunks, c = idx % L::kChunks;
    const uint32_t dst = smem + L::offset(r, c);
    if (r >= lo && r < hi) {
      cuda::cp_async_16(dst, base + int64_t(row0 + r) * stride + c * 8);
    } else {
      cuda::st_shared_zero_16(dst);
    }
  }
}

// K/V tile loader by storage format. Only plain 16-bit formats exist so far.
template <typename Format> struct KVTileLoader;
template <typename T> struct KVTileLoader<PlainFormat<T>> {
  static_assert(sizeof(T) == 2, "plain tile loader is for 16-bit storage");
  static constexpr bool kAsync = true;
  template <int D, int ROWS, int NT>
  static __device__ __forceinline__ void load(uint32_t smem, const void* base, int64_t stride, int row0, int lo,
                                              int hi, int tid) {
    load_tile_16bit<D, ROWS, NT>(smem, static_cast<const uint16_t*>(base), stride, row0, lo, hi, tid);
  }
};

}  // namespace prefill
}  // namespace vattn
