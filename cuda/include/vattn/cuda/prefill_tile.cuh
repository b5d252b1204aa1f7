#pragma once
// Shared-memory tiles of the tensor-core prefill kernel and the loaders that fill them.
//
// A tile is ROWS x D 16-bit elements, row major, stored in 16-byte chunks (8 elements). Chunk c
// of row r lives at chunk slot (c ^ (r & 7)) of that row: the eight rows an ldmatrix phase reads
// (same logical chunk, rows r..r+7) then hit eight different 16-byte bank groups, so ldmatrix and
// the 16-byte cp.async writes are free of bank conflicts. Needs D / 8 to be a multiple of 8.
//
// Loaders are chosen by the KV storage format (kv_format.h) and the q dtype T (the tile's
// element type): the plain 16-bit format copies rows with cp.async (kAsync = true); a quantized
// format (fp8_e4m3, int8, int4) loads its codes with ordinary 16-byte global loads and
// dequantizes them into the same swizzled tile with ordinary shared stores (kAsync = false: the
// data is in shared memory when load() returns; the kernel's __syncthreads publishes it).
//
// Every loader: load<D, ROWS, NT>(smem, base, stride, scale, scale_stride, row0, lo, hi, tid)
//   base, stride       the (row, kv head) vector of token 0 and the token stride, in storage
//                      elements of the format
//   scale, scale_stride  the scale words of token 0 (same row / head) and their token stride,
//                      in floats (unused, may be null, for plain formats)
//   tile row r is token row0 + r; only rows lo <= r < hi are read, the others are zero-filled.
#include <cuda_runtime.h>

#include <cstdint>

#include "vattn/cuda/cp_async.cuh"
#include "vattn/cuda/vec.cuh"
#include "vattn/kv_format.h"
#include "vattn/quant.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#include <cuda_fp8.h>
#define VATTN_HW_FP8_CVT 1
#endif

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
__device__ __forceinline__ void load_tile_16bit(uint32_t smem, const uint16_t* base, int64_t stride, int row0, int lo,
                                                int hi, int tid) {
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

// 16-byte store at a shared-window address.
__device__ __forceinline__ void st_shared_16(uint32_t smem, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(smem), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// ---- dequantization of 8 codes into one 16-byte chunk of T -------------------------------------
// QuantChunk<Format>::to<T>(cw, w): cw are the code words of 8 consecutive elements (8-bit
// formats: two 32-bit words, element k in byte k; int4: one word, element k in bits 4k..4k+3,
// which is the packing of kv_format.h: element 2i in the low nibble of byte i), w the vector's
// scale words. Each value is computed in fp32 exactly as reference.py's dequantize does
// (fp8 / int8: code * scale; int4: code * scale + zero, no fused multiply-add) and rounded to
// T once. Codes become floats with the exponent trick 0x4B000000 | u = 2^23 + u (exact for
// 0 <= u < 2^23), so no int -> float conversion instruction is needed.
constexpr float kTwo23 = 8388608.f;
__device__ __forceinline__ float small_uint_to_float(uint32_t u) { return __uint_as_float(0x4B000000u | u) - kTwo23; }

template <typename Format>
struct QuantChunk;

template <>
struct QuantChunk<Int8Format> {
  static constexpr int kCodeWords = 2;  // 8 one-byte codes
  // Multiplier applied to each code (the scale word).
  static __device__ __forceinline__ float mult(const float* w) { return w[0]; }
  template <typename T>
  static __device__ __forceinline__ uint4 to(const uint32_t* cw, float s) {
    float x[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      // (code + 128) as an unsigned byte: flipping the sign bit of a two's complement byte.
      const uint32_t u = ((cw[k >> 2] >> (8 * (k & 3))) & 0xffu) ^ 0x80u;
      x[k] = (small_uint_to_float(u) - 128.f) * s;  // exact code, one rounding
    }
    return cuda::float_to_chunk<T>(x);
  }
};

template <>
struct QuantChunk<Fp8E4M3Format> {
  static constexpr int kCodeWords = 2;  // 8 one-byte codes
#ifdef VATTN_HW_FP8_CVT
  static __device__ __forceinline__ float mult(const float* w) { return w[0]; }
#else
  // fp8_e4m3_to_half_bits gives the fp16 of value * 2^-8; 2^8 goes into the multiplier
  // (an exact power-of-two scaling: scales are >= kQuantTiny / 448, far from under/overflow).
  static __device__ __forceinline__ float mult(const float* w) { return w[0] * quant::kFp8HalfScale; }
#endif
  // Two codes (element 2j in byte 2j & 3 of word, 2j + 1 in the next byte) -> two floats of the
  // fp16 value (times 2^-8 on the bit-trick path); exact either way.
  template <int kPair>
  static __device__ __forceinline__ float2 pair(uint32_t word) {
#ifdef VATTN_HW_FP8_CVT
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(
        static_cast<__nv_fp8x2_storage_t>(kPair ? (word >> 16) : (word & 0xffffu)), __NV_E4M3);
    return __half22float2(__half2(h));
#else
    // fp8_e4m3_to_half_bits on both halves at once: byte b of the pair placed at bits 8..15 of
    // its 16-bit half (y), then sign = y & 0x8000, exponent and mantissa = (y & 0x7f00) >> 1.
    const uint32_t y = __byte_perm(word, 0u, kPair ? 0x3424u : 0x1404u);
    const uint32_t h = (y & 0x80008000u) | ((y & 0x7f007f00u) >> 1);
    return cuda::pair_to_float2(h, f16_t{});
#endif
  }
  template <typename T>
  static __device__ __forceinline__ uint4 to(const uint32_t* cw, float s) {
    float x[8];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float2 a = pair<0>(cw[j]), b = pair<1>(cw[j]);
      x[4 * j + 0] = a.x * s;
      x[4 * j + 1] = a.y * s;
      x[4 * j + 2] = b.x * s;
      x[4 * j + 3] = b.y * s;
    }
    return cuda::float_to_chunk<T>(x);
  }
};

template <>
struct QuantChunk<Int4Format> {
  static constexpr int kCodeWords = 1;  // 8 four-bit codes
  template <typename T>
  static __device__ __forceinline__ uint4 to(const uint32_t* cw, float s, float z) {
    float x[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float c = small_uint_to_float((cw[0] >> (4 * k)) & 0xfu);
      x[k] = __fadd_rn(__fmul_rn(c, s), z);  // code * scale + zero, two roundings as in reference.py
    }
    return cuda::float_to_chunk<T>(x);
  }
};

// Quantized tile loader. The tile's codes are cut into 16-byte units (16 one-byte codes, or 32
// int4 codes): unit u of tile row r holds elements [u * kElemsPerUnit, (u + 1) * kElemsPerUnit)
// of the row and becomes kChunksPerUnit consecutive 16-byte chunks of the tile. Thread tid takes
// units idx = it * NT + tid (a warp reads consecutive units: whole rows, coalesced). All of a
// thread's global loads (codes and the row's scale words, loaded per unit: lanes of one row
// read the same word, one transaction) are issued before any is used, then each unit is
// converted and stored. A row outside [lo, hi) loads nothing and converts zero codes with zero
// scale words, which gives +0 in every format. Needs the code pointer of every row 16-byte
// aligned (prefill.cu checks the base and the strides); scale words need only float alignment.
template <typename Format, typename T>
struct QuantTileLoader {
  static_assert(sizeof(typename Format::storage_t) == 1, "quantized formats store bytes");
  static_assert(sizeof(T) == 2, "the tile holds 16-bit q dtype elements");
  using Chunk = QuantChunk<Format>;
  static constexpr bool kAsync = false;
  static constexpr int kWords = Format::kScaleWords;
  static constexpr int kUnitBytes = 16;
  static constexpr int kChunksPerUnit = 4 / Chunk::kCodeWords;  // 16 bytes = 4 code words
  static constexpr int kElemsPerUnit = 8 * kChunksPerUnit;

  template <int D, int ROWS, int NT>
  static __device__ __forceinline__ void load(uint32_t smem, const void* base, int64_t stride, const float* scale,
                                              int64_t scale_stride, int row0, int lo, int hi, int tid) {
    using L = TileLayout<D>;
    static_assert(D % kElemsPerUnit == 0, "a row must be whole 16-byte units of codes");
    constexpr int kUnitsPerRow = D / kElemsPerUnit;
    static_assert((ROWS * kUnitsPerRow) % NT == 0, "tile units must split evenly over the threads");
    constexpr int kIters = ROWS * kUnitsPerRow / NT;
    const uint8_t* codes = static_cast<const uint8_t*>(base);

    uint4 raw[kIters];
    float w[kIters][kWords];
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int idx = it * NT + tid;
      const int r = idx / kUnitsPerRow, u = idx % kUnitsPerRow;
      raw[it] = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
      for (int k = 0; k < kWords; ++k) w[it][k] = 0.f;
      if (r >= lo && r < hi) {
        const int64_t tok = int64_t(row0) + r;
        raw[it] = cuda::ld_global_16_nc(codes + tok * stride + u * kUnitBytes);
#pragma unroll
        for (int k = 0; k < kWords; ++k) w[it][k] = __ldg(scale + tok * scale_stride + k);
      }
    }
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int idx = it * NT + tid;
      const int r = idx / kUnitsPerRow, u = idx % kUnitsPerRow;
      const uint32_t cw[4] = {raw[it].x, raw[it].y, raw[it].z, raw[it].w};
#pragma unroll
      for (int c = 0; c < kChunksPerUnit; ++c) {
        st_shared_16(smem + L::offset(r, u * kChunksPerUnit + c), convert(cw + c * Chunk::kCodeWords, w[it]));
      }
    }
  }

 private:
  static __device__ __forceinline__ uint4 convert(const uint32_t* cw, const float (&w)[kWords]) {
    if constexpr (kWords == 2) {
      return Chunk::template to<T>(cw, w[0], w[1]);
    } else {
      return Chunk::template to<T>(cw, Chunk::mult(w));
    }
  }
};

// K/V tile loader by storage format and q dtype T.
template <typename Format, typename T>
struct KVTileLoader : QuantTileLoader<Format, T> {};
template <typename T>
struct KVTileLoader<PlainFormat<T>, T> {
  static_assert(sizeof(T) == 2, "plain tile loader is for 16-bit storage");
  static constexpr bool kAsync = true;
  template <int D, int ROWS, int NT>
  static __device__ __forceinline__ void load(uint32_t smem, const void* base, int64_t stride, const float*, int64_t,
                                              int row0, int lo, int hi, int tid) {
    load_tile_16bit<D, ROWS, NT>(smem, static_cast<const uint16_t*>(base), stride, row0, lo, hi, tid);
  }
};

}  // namespace prefill
}  // namespace vattn
