// CPU compact_kv: moves the kept tokens of each (row, kv_head) to the front of that row, in order
// (params.h CompactParams; python/vattn/reference.py compact_kv is the definition). The kept
// indices are strictly increasing, so keep[j] >= j and a forward copy per (row, head) never
// overwrites a record it still has to read: the move is in place, one memmove per token and part
// (K data, V data, their scale words, the score). Different (row, head) pairs touch disjoint
// bytes (distinct rows, distinct head slices), so they run in parallel. Every index is checked
// before the first write, so a failed call leaves the cache unchanged.
//
// An int4_ch side (keys per channel over groups of G = head_dim / 2 tokens) is not moved but
// re-encoded: per (row, head) keeping n > 0 tokens, the kept tokens' exact values are read out
// first (from the old codes and group parameters), then groups of G are encoded at [0, n) (codes
// of [0, n), the words of the groups' tokens, [0, ceil(n / G) * G)).
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_util.h"
#include "row_reader.h"
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
  cpu::require(c.block_table == nullptr, "compact_kv: paged KV views (a block table) are not supported");
  int64_t ke, kb, ve, vb;
  int kw, vw;
  format_sizes(c.k_format, p.head_dim, "compact_kv (K)", &ke, &kb, &kw);
  format_sizes(c.v_format, p.head_dim, "compact_kv (V)", &ve, &vb, &vw);
  if (kw > 0 && c.k_scale == nullptr) fail("compact_kv (K): a quantized cache needs its scales");
  if (vw > 0 && c.v_scale == nullptr) fail("compact_kv (V): a quantized cache needs its scales");
  const bool k_grouped = c.k_format == kKvInt4Channel, v_grouped = c.v_format == kKvInt4Channel;
  const int32_t G = quant::int4_ch_group(p.head_dim);
  if ((k_grouped || v_grouped) && c.max_seq % G != 0)
    fail("compact_kv: an int4_ch cache holds whole groups of " + to_string(G) + " tokens: its seq (" +
         to_string(c.max_seq) + ") must be a multiple");

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
  // (an int4_ch side is re-encoded instead, below)
  Part parts[5];
  int np = 0;
  const int64_t f = int64_t(sizeof(float));
  if (!k_grouped)
    parts[np++] = Part{static_cast<char*>(c.k), c.k_stride_row * ke, c.k_stride_tok * ke, c.k_stride_head * ke, kb};
  if (!v_grouped)
    parts[np++] = Part{static_cast<char*>(c.v), c.v_stride_row * ve, c.v_stride_tok * ve, c.v_stride_head * ve, vb};
  if (kw > 0 && !k_grouped)
    parts[np++] = Part{reinterpret_cast<char*>(c.k_scale), c.ks_stride_row * f, c.ks_stride_tok * f,
                       c.ks_stride_head * f, kw * f};
  if (vw > 0 && !v_grouped)
    parts[np++] = Part{reinterpret_cast<char*>(c.v_scale), c.vs_stride_row * f, c.vs_stride_tok * f,
                       c.vs_stride_head * f, vw * f};
  // The int4_ch sides: (codes, words) with element strides.
  struct GroupedSide {
    uint8_t* codes;
    int64_t s_row, s_tok, s_head;
    float* words;
    int64_t ws_row, ws_tok, ws_head;
  };
  GroupedSide gsides[2];
  int ng = 0;
  if (k_grouped)
    gsides[ng++] = GroupedSide{static_cast<uint8_t*>(c.k),
                               c.k_stride_row,
                               c.k_stride_tok,
                               c.k_stride_head,
                               c.k_scale,
                               c.ks_stride_row,
                               c.ks_stride_tok,
                               c.ks_stride_head};
  if (v_grouped)
    gsides[ng++] = GroupedSide{static_cast<uint8_t*>(c.v),
                               c.v_stride_row,
                               c.v_stride_tok,
                               c.v_stride_head,
                               c.v_scale,
                               c.vs_stride_row,
                               c.vs_stride_tok,
                               c.vs_stride_head};
  const int dim = p.head_dim;
  // Re-encodes one int4_ch side of (row, head): vals holds >= len * dim floats, prm 2 * dim.
  auto regroup = [&](const GroupedSide& gs, int64_t row, int64_t h, const int32_t* kept, int32_t len, float* vals,
                     float* prm) {
    uint8_t* codes = gs.codes + row * gs.s_row + h * gs.s_head;
    float* words = gs.words + row * gs.ws_row + h * gs.ws_head;
    int64_t loaded = -1;
    for (int32_t j = 0; j < len; ++j) {  // the kept tokens' values, from the old codes and parameters
      const int64_t t = kept[j], g = t / G;
      if (g != loaded) {
        cpu::int4_ch_load_params(words + g * G * gs.ws_tok, gs.ws_tok, dim, prm, prm + dim);
        loaded = g;
      }
      const uint8_t* r = codes + t * gs.s_tok;
      float* o = vals + int64_t(j) * dim;
      for (int d = 0; d < dim; ++d) o[d] = quant::int4_ch_value(quant::int4_code(r, d), prm[d], prm[dim + d]);
    }
    for (int32_t lo = 0; lo < len; lo += G)
      quant::encode_int4_ch_group(vals + int64_t(lo) * dim, dim, std::min(G, len - lo), dim, codes + lo * gs.s_tok,
                                  gs.s_tok, words + int64_t(lo) * gs.ws_tok, gs.ws_tok);
  };
  if (p.scores)
    parts[np++] =
        Part{reinterpret_cast<char*>(p.scores), p.sc_stride_row * f, p.sc_stride_tok * f, p.sc_stride_head * f, f};

  auto one = [&](int64_t ih) {
    const int64_t i = ih / heads, h = ih % heads;
    const int32_t len = p.keep_lens[ih];
    const int32_t* kept = p.keep + ih * max_keep;
    const int64_t row = p.row_ids[i];
    if (ng > 0 && len > 0) {
      thread_local std::vector<float> buf;
      buf.resize(size_t(len + 2) * dim);
      for (int k = 0; k < ng; ++k) regroup(gsides[k], row, h, kept, len, buf.data(), buf.data() + int64_t(len) * dim);
    }
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
  work += ng * int64_t(dim) * 16;  // re-encoding: a few dozen operations per element
  work *= total * max_keep;
  if (work <= (int64_t(1) << 18)) {  // small: no parallel region to enter
    for (int64_t ih = 0; ih < total; ++ih) one(ih);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t ih = 0; ih < total; ++ih) one(ih);
}

}  // namespace vattn
