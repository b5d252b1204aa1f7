#pragma once
// Device side of the address rule of kv_paging.h: where the CUDA kernels find token t of a cache
// row, for contiguous and paged (block-table) views alike, and the host checks of a paged view.
//
// A kernel splits each side's address (K, V or a scale tensor) into a head base, formed once per
// CTA, and a token offset, formed once per token of a tile:
//   kv_head_base(data, c, row, kvh, s_row, s_head)   data + kvh * s_head, plus row * s_row when
//                                                    the view is contiguous
//   kv_head_tok(c, row, t, s_row, s_tok)             contiguous: t * s_tok; paged:
//                                                    block * s_row + (t % block_size) * s_tok
// so head base + token offset = data + kvh * s_head + kv_token_offset(c, row, t, s_row, s_tok),
// the rule of kv_paging.h. The contiguous view keeps its old arithmetic (the row term in the
// base, one multiply per token); the paged branch is uniform over the CTA (block_table is a
// kernel parameter). Paged token offsets do their block arithmetic in 32 bits (t is a token
// index < max_seq < 2^31 and block_size > 0: check_paged_view) and clamp a block id outside
// [0, num_blocks) to block 0 as kv_block_of does, so a bad table never faults.
//
// Kernels that address K, V and scale words of the same token locate it once (kv_locate: the
// row and the token when contiguous, the physical block and the offset in it when paged) and form
// every side's full offset (kv_token_offset's value) from the result (KvLoc::at).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "vattn/kv_paging.h"
#include "vattn/params.h"

namespace vattn {
namespace cuda {

// Where token t of a cache row lives: blk * s_row + t * s_tok from the side's storage pointer,
// for any side's strides (K, V, scale words).
struct KvLoc {
  int32_t blk;  // physical block (paged), or the cache row (contiguous)
  int32_t t;    // token inside the block (paged), or the token itself (contiguous)
  __device__ __forceinline__ int64_t at(int64_t s_row, int64_t s_tok) const {
    return int64_t(blk) * s_row + int64_t(t) * s_tok;
  }
};

// Physical block and in-block offset of token t (0 <= t < max_seq) of cache row `row` of a paged
// view: kv_block_of's clamp, in 32-bit arithmetic.
__device__ __forceinline__ KvLoc kv_locate_paged(const KVCacheView& c, int64_t row, int t) {
  const uint32_t bs = uint32_t(c.block_size);
  const uint32_t bi = uint32_t(t) / bs;
  const int32_t id = __ldg(c.block_table + row * c.bt_stride_row + bi);
  KvLoc l;
  l.blk = (id >= 0 && id < c.num_blocks) ? id : 0;
  l.t = int32_t(uint32_t(t) - bi * bs);
  return l;
}

// Token t of cache row `row`, contiguous or paged (see KvLoc).
__device__ __forceinline__ KvLoc kv_locate(const KVCacheView& c, int64_t row, int t) {
  if (c.block_table == nullptr) {
    KvLoc l;
    l.blk = int32_t(row);  // a cache row id (< num_rows, an int32)
    l.t = t;
    return l;
  }
  return kv_locate_paged(c, row, t);
}

// Head base of one side of (cache row, kv head): the start of the row's vectors of that head when
// contiguous, of the side's storage (block 0) when paged.
template <typename S>
__device__ __forceinline__ S* kv_head_base(S* data, const KVCacheView& c, int64_t row, int kvh, int64_t s_row,
                                           int64_t s_head) {
  return data + int64_t(kvh) * s_head + (c.block_table == nullptr ? row * s_row : int64_t(0));
}

// Offset of token t from a head base of kv_head_base (one side's strides).
__device__ __forceinline__ int64_t kv_head_tok(const KVCacheView& c, int64_t row, int t, int64_t s_row, int64_t s_tok) {
  if (c.block_table == nullptr) return int64_t(t) * s_tok;
  return kv_locate_paged(c, row, t).at(s_row, s_tok);
}

// The same two for a kernel instantiated for one kind of view (kPaged: the view has a block
// table; the launcher checked which): no runtime test of block_table.
template <bool kPaged, typename S>
__device__ __forceinline__ S* kv_head_base_as(S* data, int64_t row, int kvh, int64_t s_row, int64_t s_head) {
  return data + int64_t(kvh) * s_head + (kPaged ? int64_t(0) : row * s_row);
}
template <bool kPaged>
__device__ __forceinline__ int64_t kv_head_tok_as(const KVCacheView& c, int64_t row, int t, int64_t s_row,
                                                  int64_t s_tok) {
  if constexpr (kPaged) {
    return kv_locate_paged(c, row, t).at(s_row, s_tok);
  } else {
    return int64_t(t) * s_tok;
  }
}

// ---- host checks -------------------------------------------------------------------------------

// Checks the paged fields of a view before a launch (nothing for a contiguous view); throws
// std::invalid_argument naming `what`. The table itself lives in device memory and is not read
// (ids outside [0, num_blocks) address block 0 on the device).
inline void check_paged_view(const KVCacheView& c, const char* what) {
  if (c.block_table == nullptr) return;
  auto bad = [&](const std::string& m) { throw std::invalid_argument(std::string(what) + ": paged KV view: " + m); };
  if (c.block_size <= 0) bad("block_size must be > 0, got " + std::to_string(c.block_size));
  if (c.num_blocks <= 0) bad("num_blocks must be > 0, got " + std::to_string(c.num_blocks));
  if (c.bt_stride_row < 0) bad("the block-table row stride must be >= 0");
  if (reinterpret_cast<uintptr_t>(c.block_table) % alignof(int32_t) != 0) bad("the block table must be 4-byte aligned");
}

// For ops without a paged kernel: a paged view is rejected before anything is launched.
inline void reject_paged_view(const KVCacheView& c, const char* what) {
  if (c.block_table != nullptr)
    throw std::invalid_argument(std::string(what) + ": paged KV views (a block table) are not supported on CUDA");
}

}  // namespace cuda
}  // namespace vattn
