// CPU compact_kv: moves the kept tokens of each (row, kv_head) to the front of that row, in order
// (params.h CompactParams; python/vattn/reference.py compact_kv is the definition). The kept
// indices are strictly increasing, so keep[j] >= j and a forward copy per (row, head) never
// overwrites a record it still has to read: the move is in place, one memmove per token and part
// (K data, V data, their scale words, the score). Different (row, head) pairs touch disjoint
// bytes (distinct rows, distinct head slices), so they run in parallel. Every index is checked
// before the first write, so a failed call leaves the cache unchanged.
#include <cstring>
#include <string>
#include <vector>

#include "cpu_util.h"
#include "vattn/ops.h"

namespace vattn {
namespace {

// One strided part of the cache moved with its tokens (byte strides).
struct Part {
  char* base;
  int64_t s_row, s_tok, s_head;
  int64_t bytes;  // per (token, head)
};

// Bytes of one (token, head) data vector of a format, and its scale words.
void format_sizes(int32_t format, int32_t head_dim, const char* what, int64_t* elem_bytes, int64_t* vec_bytes,
                  int* scale_words) {
  dispatch_kv_format(format, what, [&](auto fmt) {
    using Format = decltype(fmt);
    if (!dim_ok<Format>(head_dim)) cpu::fail(std::string(what) + ": head_dim does not fit the storage format");
    *elem_bytes = int64_t(sizeof(typename Format::storage_t));
    *vec_bytes = int64_t(head_dim / Format::kElemsPerStorage) * *elem_bytes;
    *scale_words = Format::kScaleWords;
  });
}

}  // namespace

void compact_kv_cpu(const CompactParams& p) {
  using cpu::fail;
  using std::to_string;
  cpu::require(p.n >= 0 && p.max_keep >= 0, "compact_kv: n and max_keep must be >= 0");
  if (p.n == 0) return;
  cpu::require(p.num_kv_heads > 0 && p.head_dim > 0, "compact_kv: num_kv_heads and head_dim must be positive");
  const KVCacheView& c = p.cache;
  cpu::require(c.k && c.v && p.row_ids && p.keep_lens && (p.keep || p.max_keep == 0),
               "compact_kv: null pointer in the parameters");
  int64_t ke, kb, ve, vb;
  int kw, vw;
  format_sizes(c.k_format, p.head_dim, "compact_kv (K)", &ke, &kb, &kw);
  format_sizes(c.v_format, p.head_dim, "compact_kv (V)", &ve, &vb, &vw);
  if (kw > 0 && c.k_scale == nullptr) fail("compact_kv (K): a quantized cache needs its scales");
  if (vw > 0 && c.v_scale == nullptr) fail("compact_kv (V): a quantized cache needs its scales");

  // ---- checks, before any write
  const int64_t heads = p.num_kv_heads, max_keep = p.max_keep;
  std::vector<char> seen(size_t(c.num_rows), 0);
  for (int64_t i = 0; i < p.n; ++i) {
    const int32_t row = p.row_ids[i];
    if (row < 0 || row >= c.num_rows)
      fail("compact_kv: row id " + to_string(row) + " of entry " + to_string(i) + " is outside [0, " +
           to_string(c.num_rows) + ")");
    if (seen[size_t(row)]) fail("compact_kv: row id " + to_string(row) + " appears twice in row_ids");
    seen[size_t(row)] = 1;
    for (int64_t h = 0; h < heads; ++h) {
      const int32_t len = p.keep_lens[i * heads + h];
      if (len < 0 || len > p.max_keep)
        fail("compact_kv: keep_lens[" + to_string(i) + ", " + to_string(h) + "] = " + to_string(len) +
             " is outside [0, " + to_string(p.max_keep) + "]");
      const int32_t* kept = p.keep + (i * heads + h) * max_keep;
      for (int32_t j = 0; j < len; ++j) {
        if (kept[j] < 0 || kept[j] >= c.max_seq)
          fail("compact_kv: keep[" + to_string(i) + ", " + to_string(h) + ", " + to_string(j) +
               "] = " + to_string(kept[j]) + " is outside [0, " + to_string(c.max_seq) + ")");
        if (j > 0 && kept[j] <= kept[j - 1])
          fail("compact_kv: keep[" + to_string(i) + ", " + to_string(h) + "] is not strictly increasing at " +
               to_string(j) + " (" + to_string(kept[j - 1]) + ", " + to_string(kept[j]) + ")");
      }
    }
  }

  // ---- the parts that move with a token
  Part parts[5];
  int np = 0;
  parts[np++] = Part{static_cast<char*>(c.k), c.k_stride_row * ke, c.k_stride_tok * ke, c.k_stride_head * ke, kb};
  parts[np++] = Part{static_cast<char*>(c.v), c.v_stride_row * ve, c.v_stride_tok * ve, c.v_stride_head * ve, vb};
  const int64_t f = int64_t(sizeof(float));
  if (kw > 0)
    parts[np++] = Part{reinterpret_cast<char*>(c.k_scale), c.ks_stride_row * f, c.ks_stride_tok * f,
                       c.ks_stride_head * f, kw * f};
  if (vw > 0)
    parts[np++] = Part{reinterpret_cast<char*>(c.v_scale), c.vs_stride_row * f, c.vs_stride_tok * f,
                       c.vs_stride_head * f, vw * f};
  if (p.scores)
    parts[np++] =
        Part{reinterpret_cast<char*>(p.scores), p.sc_stride_row * f, p.sc_stride_tok * f, p.sc_stride_head * f, f};

  auto one = [&](int64_t ih) {
    const int64_t i = ih / heads, h = ih % heads;
    const int32_t len = p.keep_lens[ih];
    const int32_t* kept = p.keep + ih * max_keep;
    const int64_t row = p.row_ids[i];
    for (int k = 0; k < np; ++k) {
      const Part& q = parts[k];
      char* head = q.base + row * q.s_row + h * q.s_head;
      for (int32_t j = 0; j < len; ++j) {
        const int64_t src = kept[j];
        if (src != j) std::memmove(head + j * q.s_tok, head + src * q.s_tok, size_t(q.bytes));
      }
    }
  };
  const int64_t total = p.n * heads;
  int64_t work = 0;  // bytes to move, roughly
  for (int k = 0; k < np; ++k) work += parts[k].bytes;
  work *= total * max_keep;
  if (work <= (int64_t(1) << 18)) {  // small: no parallel region to enter
    for (int64_t ih = 0; ih < total; ++ih) one(ih);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t ih = 0; ih < total; ++ih) one(ih);
}

}  // namespace vattn
