#pragma once
// The keys a query sees: the one definition of a row's key range, used by the CUDA decode
// kernels, both CUDA prefill kernels and the CPU code. Semantics of params.h
// (AttentionParams): batch row b reads cache row row_ids[b] (b without row_ids); its kv length
// L is seqlens_k[b], or head_seqlens_k[b * num_kv_heads + kvh] when given; query i of its n_b
// queries sits at pos = L - n_b + i and sees keys j with max(0, pos - window_left) <= j <= pos
// (no left bound when window_left < 0).
//
// Safety on the device (lengths and row ids are read from device memory, so they are not
// checked on the host): a negative L counts as 0, a slot id outside [0, num_rows) reads no
// key (and row 0 as a harmless base), and no key at or past max_seq is read, so a kernel never
// reads outside the cache. The CPU code rejects such inputs before it gets here.
#include <cstdint>

#include "vattn/macros.h"
#include "vattn/params.h"

namespace vattn {

// Kv length of (batch row b, kv head kvh) as given (not clamped).
VATTN_HD int kv_length(const AttentionParams& p, int b, int kvh) {
  return p.head_seqlens_k != nullptr ? p.head_seqlens_k[int64_t(b) * p.num_kv_heads + kvh] : p.seqlens_k[b];
}

// Cache row (slot) of batch row b as given (not clamped).
VATTN_HD int cache_row(const AttentionParams& p, int b) { return p.row_ids != nullptr ? p.row_ids[b] : b; }

// What one (batch row, kv head) pair may read of the cache.
struct RowKeys {
  int64_t row;   // cache row; 0 when the slot id is out of range
  int len;       // L, the length positions are measured against (>= 0, not capped)
  int readable;  // keys that may be read: min(L, max_seq); 0 when the slot id is out of range
};

VATTN_HD RowKeys row_keys(const AttentionParams& p, int b, int kvh) {
  const int L = kv_length(p, b, kvh);
  const int slot = cache_row(p, b);
  const bool slot_ok = slot >= 0 && slot < p.kv.num_rows;
  RowKeys r;
  r.len = L > 0 ? L : 0;
  r.row = slot_ok ? slot : 0;
  r.readable = !slot_ok ? 0 : (r.len < p.kv.max_seq ? r.len : p.kv.max_seq);
  return r;
}

// Keys first..last (inclusive; none when last < first).
struct KeySpan {
  int first;
  int last;
  VATTN_HD bool empty() const { return last < first; }
  VATTN_HD int end() const { return last + 1; }  // one past the last key
};

// Keys that any of the consecutive query positions pos_first..pos_last sees, within the
// readable keys: from pos_first's left window edge to pos_last (capped at readable - 1).
VATTN_HD KeySpan visible_keys(int pos_first, int pos_last, int readable, int window_left) {
  KeySpan s;
  const int64_t lo = window_left >= 0 ? int64_t(pos_first) - window_left : 0;
  s.first = lo > 0 ? int(lo) : 0;
  s.last = pos_last < readable - 1 ? pos_last : readable - 1;
  return s;
}

// Keys of the query at position pos.
VATTN_HD KeySpan visible_keys(int pos, int readable, int window_left) {
  return visible_keys(pos, pos, readable, window_left);
}

// Keys of the one decode query of a row: it sits at the row's last readable key (readable - 1,
// which is L - 1 for every valid input), so a length past max_seq is clamped to the capacity
// as a whole, window included, and the span is [first, readable).
VATTN_HD KeySpan decode_keys(const RowKeys& r, int window_left) {
  return visible_keys(r.readable - 1, r.readable, window_left);
}

}  // namespace vattn
