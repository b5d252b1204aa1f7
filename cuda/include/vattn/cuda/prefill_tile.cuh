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
// format (fp8_e4m3, int8, int4, int4_ch keys) loads its codes with ordinary 16-byte global loads and
// dequantizes them into the same swizzled tile with ordinary shared stores (kAsync = false: the
// data is in shared memory when load() returns; the kernel's __syncthreads publishes it).
//
// Every loader: load<D, ROWS, NT>(smem, c, row, side, row0, lo, hi, tid)
//   c, row             the KV view and the cache row (its block-table row when paged)
//   side               KvTileSide: head bases (kv_paged.cuh kv_head_base) of the codes / elements
//                      and of the scale words (unused, may be null, for plain formats), with their
//                      row (block) and token strides
//   tile row r is token row0 + r; only rows lo <= r < hi are read, the others are zero-filled.
// Token addresses follow kv_paging.h's rule: a contiguous view adds tok * token stride to the head
// base (the row term is in the base); a paged view looks up each tile row's block once (a block
// boundary may fall anywhere inside a tile) and uses that one location for the row's codes and
// its scale words. Each loader branches once per tile on the kind of view (uniform over the CTA),
// so the contiguous loop is the same code as without paging.
#include <cuda_runtime.h>

#include <cstdint>

#include "vattn/cuda/cp_async.cuh"
#include "vattn/cuda/kv_device_format.cuh"
#include "vattn/cuda/kv_paged.cuh"
#include "vattn/cuda/vec.cuh"
#include "vattn/kv_format.h"

namespace vattn {
namespace prefill {

// One side (K or V) of one (cache row, kv head) as the tile loaders read it.
struct KvTileSide {
  const void* base;      // kv_head_base of the codes / elements
  int64_t s_row, s_tok;  // their row (paged: block) and token strides, storage elements
  const float* scale;    // kv_head_base of the scale words, or null (plain formats)
  int64_t ss_row, ss_tok;
};

// Element offsets of tile token tok from the side's head bases: the codes' and the scale words'.
template <bool kPaged>
__device__ __forceinline__ void tile_token_offsets(const KVCacheView& c, int64_t row, const KvTileSide& s, int tok,
                                                   int64_t& off, int64_t& soff) {
  if constexpr (kPaged) {
    const cuda::KvLoc l = cuda::kv_locate_paged(c, row, tok);
    off = l.at(s.s_row, s.s_tok);
    soff = l.at(s.ss_row, s.ss_tok);
  } else {
    off = int64_t(tok) * s.s_tok;
    soff = int64_t(tok) * s.ss_tok;
  }
}

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

// The same copy for K / V rows of a view (KvTileSide, contiguous or paged).
template <int D, int ROWS, int NT, bool kPaged>
__device__ __forceinline__ void load_kv_tile_16bit_impl(uint32_t smem, const KVCacheView& c, int64_t row,
                                                        const KvTileSide& side, int row0, int lo, int hi, int tid) {
  using L = TileLayout<D>;
  static_assert((ROWS * L::kChunks) % NT == 0, "tile chunks must split evenly over the threads");
  const uint16_t* base = static_cast<const uint16_t*>(side.base);
#pragma unroll
  for (int it = 0; it < ROWS * L::kChunks / NT; ++it) {
    const int idx = it * NT + tid;
    const int r = idx / L::kChunks, c8 = idx % L::kChunks;
    const uint32_t dst = smem + L::offset(r, c8);
    if (r >= lo && r < hi) {
      int64_t off, soff;
      tile_token_offsets<kPaged>(c, row, side, row0 + r, off, soff);
      cuda::cp_async_16(dst, base + off + c8 * 8);
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
// scale words. The codes are decoded by the split-decode kernel's own decoder
// (DeviceKvFormat::decode_words, exact), then each value is computed in fp32 exactly as
// reference.py's dequantize does (fp8 / int8: code * scale; int4: code * scale + zero, no fused
// multiply-add) and rounded to T once.
template <typename Format>
struct QuantChunk {
  using Dev = cuda::DeviceKvFormat<Format>;
  static constexpr int kCodeWords = Dev::kPieceBytes / 4;
  template <typename T>
  static __device__ __forceinline__ uint4 to(const uint32_t* cw, const float* w) {
    float x[8];
    Dev::decode_words(cw, x);
    const float s = Dev::scale(w);  // fp8 below sm_89: times 2^8, undoing the decoder's 2^-8
    if constexpr (Dev::kZero) {
      const float z = Dev::zero(w);
#pragma unroll
      for (int k = 0; k < 8; ++k) x[k] = __fadd_rn(__fmul_rn(x[k], s), z);  // two roundings, as in reference.py
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) x[k] *= s;
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
  static __device__ __forceinline__ void load(uint32_t smem, const KVCacheView& c, int64_t row, const KvTileSide& side,
                                              int row0, int lo, int hi, int tid) {
    if (c.block_table == nullptr)
      load_impl<D, ROWS, NT, false>(smem, c, row, side, row0, lo, hi, tid);
    else
      load_impl<D, ROWS, NT, true>(smem, c, row, side, row0, lo, hi, tid);
  }

 private:
  template <int D, int ROWS, int NT, bool kPaged>
  static __device__ __forceinline__ void load_impl(uint32_t smem, const KVCacheView& c, int64_t row,
                                                   const KvTileSide& side, int row0, int lo, int hi, int tid) {
    using L = TileLayout<D>;
    static_assert(D % kElemsPerUnit == 0, "a row must be whole 16-byte units of codes");
    constexpr int kUnitsPerRow = D / kElemsPerUnit;
    static_assert((ROWS * kUnitsPerRow) % NT == 0, "tile units must split evenly over the threads");
    constexpr int kIters = ROWS * kUnitsPerRow / NT;
    const uint8_t* codes = static_cast<const uint8_t*>(side.base);

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
        int64_t off, soff;
        tile_token_offsets<kPaged>(c, row, side, row0 + r, off, soff);
        raw[it] = cuda::ld_global_16_nc(codes + off + u * kUnitBytes);
#pragma unroll
        for (int k = 0; k < kWords; ++k) w[it][k] = __ldg(side.scale + soff + k);
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

  static __device__ __forceinline__ uint4 convert(const uint32_t* cw, const float (&w)[kWords]) {
    return Chunk::template to<T>(cw, w);
  }
};

// int4_ch tile loader (keys; kv_format.h: int4 codes, a scale and a zero per channel over groups
// of G = D / 2 tokens). Like QuantTileLoader it issues all code loads of a thread first, then
// converts unit by unit; each tile row reads its group's parameters (the words of the group's
// first token and the ones after it: parameter i is word i % 4 of token i / 4) with float4 loads
// -- 4 channels' scales or zeros each -- straight from the cache, and computes every value as
// reference.py does (quant::int4_ch_value: code * scale rounded, + zero rounded), rounded to T
// once. Needs, beyond QuantTileLoader's code alignment, a 16-byte aligned scale pointer and token
// stride (prefill.cu's fast_path_ok checks them; vattn.KVCache's records always qualify). Rows
// outside [lo, hi) read nothing and store +0.
template <typename T>
struct Int4ChTileLoader {
  static_assert(sizeof(T) == 2, "the tile holds 16-bit q dtype elements");
  static constexpr bool kAsync = false;
  static constexpr int kUnitBytes = 16;
  static constexpr int kElemsPerUnit = 32;

  template <int D, int ROWS, int NT>
  static __device__ __forceinline__ void load(uint32_t smem, const KVCacheView& c, int64_t row, const KvTileSide& side,
                                              int row0, int lo, int hi, int tid) {
    if (c.block_table == nullptr)
      load_impl<D, ROWS, NT, false>(smem, c, row, side, row0, lo, hi, tid);
    else
      load_impl<D, ROWS, NT, true>(smem, c, row, side, row0, lo, hi, tid);
  }

 private:
  template <int D, int ROWS, int NT, bool kPaged>
  static __device__ __forceinline__ void load_impl(uint32_t smem, const KVCacheView& c, int64_t row,
                                                   const KvTileSide& side, int row0, int lo, int hi, int tid) {
    using L = TileLayout<D>;
    constexpr int G = Int4ChannelFormat::group(D);
    static_assert(D % kElemsPerUnit == 0, "a row must be whole 16-byte units of codes");
    constexpr int kUnitsPerRow = D / kElemsPerUnit;
    static_assert((ROWS * kUnitsPerRow) % NT == 0, "tile units must split evenly over the threads");
    constexpr int kIters = ROWS * kUnitsPerRow / NT;
    const uint8_t* codes = static_cast<const uint8_t*>(side.base);

    uint4 raw[kIters];
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int idx = it * NT + tid;
      const int r = idx / kUnitsPerRow, u = idx % kUnitsPerRow;
      raw[it] = make_uint4(0u, 0u, 0u, 0u);
      if (r >= lo && r < hi) {
        int64_t off, soff;
        tile_token_offsets<kPaged>(c, row, side, row0 + r, off, soff);
        raw[it] = cuda::ld_global_16_nc(codes + off + u * kUnitBytes);
      }
    }
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int idx = it * NT + tid;
      const int r = idx / kUnitsPerRow, u = idx % kUnitsPerRow;
      const uint32_t cw[4] = {raw[it].x, raw[it].y, raw[it].z, raw[it].w};
      const bool live = r >= lo && r < hi;
      // The words of the row's group from its first token on. A paged view holds whole groups in
      // each block (check_grouped_kv: block_size % G == 0), so the group's first token is in the
      // row's block, at the row's in-block offset rounded down to a multiple of G, and the group's
      // other tokens follow it in that block at ss_tok steps (ld_param4).
      const float* gw = nullptr;
      if (live) {
        const int tok = row0 + r;
        if constexpr (kPaged) {
          const cuda::KvLoc l = cuda::kv_locate_paged(c, row, tok);
          gw = side.scale + int64_t(l.blk) * side.ss_row + int64_t(l.t - l.t % G) * side.ss_tok;
        } else {
          gw = side.scale + int64_t(tok - tok % G) * side.ss_tok;
        }
      }
      const int32_t ss = int32_t(side.ss_tok);
      // One chunk at a time (not unrolled): the loop runs between the two matrix products of
      // the kernel, where all 255 registers are taken, so at most one chunk's 16 parameters
      // may be in flight (unrolled, ptxas hoisted all 64 and spilled).
#pragma unroll 1
      for (int c = 0; c < 4; ++c) {  // 8 channels e0 .. e0 + 7 a chunk, 4 at a time
        const uint32_t word = c == 0 ? cw[0] : c == 1 ? cw[1] : c == 2 ? cw[2] : cw[3];
        uint32_t packed[4] = {0u, 0u, 0u, 0u};
        if (live) {
          const int e0 = u * kElemsPerUnit + c * 8;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float4 s4 = ld_param4(gw, e0 + 4 * h, ss);
            const float4 z4 = ld_param4(gw, D + e0 + 4 * h, ss);
            const float sc[4] = {s4.x, s4.y, s4.z, s4.w}, ze[4] = {z4.x, z4.y, z4.z, z4.w};
#pragma unroll
            for (int pr = 0; pr < 2; ++pr) {
              const int k = 4 * h + 2 * pr;  // elements k, k + 1 of the chunk: nibbles k, k + 1 of its word
              const float lo_v = quant::int4_ch_value(int((word >> (4 * k)) & 0xfu), sc[2 * pr], ze[2 * pr]);
              const float hi_v =
                  quant::int4_ch_value(int((word >> (4 * k + 4)) & 0xfu), sc[2 * pr + 1], ze[2 * pr + 1]);
              packed[2 * h + pr] = cuda::pack2<T>(lo_v, hi_v);
            }
          }
        }
        st_shared_16(smem + L::offset(r, u * 4 + c), make_uint4(packed[0], packed[1], packed[2], packed[3]));
      }
    }
  }

  // Parameters i .. i + 3 (i a multiple of 4): the 4 words of token i / 4 of the group (32-bit
  // offsets: check_grouped_kv bounds the stride).
  static __device__ __forceinline__ float4 ld_param4(const float* gw, int i, int32_t ss) {
    return __ldg(reinterpret_cast<const float4*>(gw + (i >> 2) * ss));
  }
};

// K/V tile loader by storage format and q dtype T.
template <typename Format, typename T>
struct KVTileLoader : QuantTileLoader<Format, T> {};
template <typename T>
struct KVTileLoader<Int4ChannelFormat, T> : Int4ChTileLoader<T> {};
template <typename T>
struct KVTileLoader<PlainFormat<T>, T> {
  static_assert(sizeof(T) == 2, "plain tile loader is for 16-bit storage");
  static constexpr bool kAsync = true;
  template <int D, int ROWS, int NT>
  static __device__ __forceinline__ void load(uint32_t smem, const KVCacheView& c, int64_t row, const KvTileSide& side,
                                              int row0, int lo, int hi, int tid) {
    if (c.block_table == nullptr)
      load_kv_tile_16bit_impl<D, ROWS, NT, false>(smem, c, row, side, row0, lo, hi, tid);
    else
      load_kv_tile_16bit_impl<D, ROWS, NT, true>(smem, c, row, side, row0, lo, hi, tid);
  }
};

}  // namespace prefill
}  // namespace vattn
