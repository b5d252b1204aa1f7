#pragma once
// Where token t of a cache row lives: the one address rule of KVCacheView (params.h), shared by
// the CUDA kernels and the CPU code. Contiguous views: row * stride_row + t * stride_tok.
// Paged views (block_table set): the row's block table names the physical block of t, and
// stride_row steps between physical blocks. A block id outside [0, num_blocks) addresses block 0
// instead (on CUDA the table lives in device memory and is not checked on the host, so a bad
// table must never fault); the CPU op rejects such a table before it reads anything.
#include <climits>
#include <cstdint>

#include "vattn/macros.h"
#include "vattn/params.h"

namespace vattn {

VATTN_HD bool kv_paged(const KVCacheView& c) { return c.block_table != nullptr; }

// Physical block holding token t of cache row `row` (paged views only), clamped as above.
VATTN_HD int64_t kv_block_of(const KVCacheView& c, int64_t row, int64_t t) {
  const int32_t blk = c.block_table[row * c.bt_stride_row + t / c.block_size];
  return (blk >= 0 && blk < c.num_blocks) ? int64_t(blk) : int64_t(0);
}

// Element offset of token t of cache row `row` for one side (K, V or a scale tensor) whose row
// and token strides are given; add the head offset (head * stride_head) yourself.
VATTN_HD int64_t kv_token_offset(const KVCacheView& c, int64_t row, int64_t t, int64_t stride_row, int64_t stride_tok) {
  if (c.block_table == nullptr) return row * stride_row + t * stride_tok;
  return kv_block_of(c, row, t) * stride_row + (t % c.block_size) * stride_tok;
}

// Tokens from t on that share t's block (contiguous in memory at stride_tok): runs of consecutive
// tokens may be read with one base pointer up to this many. Unbounded (INT32_MAX) when contiguous.
VATTN_HD int32_t kv_run_length(const KVCacheView& c, int64_t t) {
  return c.block_table == nullptr ? INT32_MAX : int32_t(c.block_size - t % c.block_size);
}

}  // namespace vattn
