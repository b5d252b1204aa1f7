// CPU Quest block-sparse decode (params.h BlockMinmaxParams, QuestSelectParams,
// SparseDecodeParams; python/vattn/reference.py block_minmax, quest_select and
// sparse_decode_attention are the definitions):
//   block_minmax             per-channel min / max of the dequantized keys of each block, OpenMP
//                            over (entry, kv head);
//   quest_select             per (entry, kv head): the upper-bound score of every block but the
//                            last, a partial sort for the top ones, the last block added, ascending;
//   sparse_decode_attention  per (entry, kv head): the GQA group's queries walk the selected blocks
//                            with an online softmax (SoftmaxState), so each K/V row is read once
//                            for the whole group.
// Every index is checked before the first write or read of the cache, so a bad call throws
// std::invalid_argument (ValueError) and changes nothing.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "cpu_util.h"
#include "vattn/ops.h"
#include "vattn/softmax_state.h"

namespace vattn {
namespace {

using cpu::fail;
using cpu::require;
using std::to_string;

int64_t blocks_of(int64_t len, int64_t block) { return (len + block - 1) / block; }

int32_t length_of(const int32_t* lengths, const int32_t* head_lengths, int64_t i, int64_t h, int64_t heads) {
  return head_lengths != nullptr ? head_lengths[i * heads + h] : lengths[i];
}

// Rows in [0, num_rows) (distinct when asked), lengths in [0, max_len] with at most max_blocks
// blocks each.
void check_rows_and_lengths(const char* op, const int32_t* row_ids, const int32_t* lengths, const int32_t* head_lengths,
                            int64_t n, int64_t heads, int32_t num_rows, int64_t max_len, int64_t block,
                            int64_t max_blocks, bool distinct) {
  std::vector<char> seen(distinct ? size_t(num_rows) : 0, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t row = row_ids[i];
    if (row < 0 || row >= num_rows)
      fail(std::string(op) + ": row id " + to_string(row) + " of entry " + to_string(i) + " is outside [0, " +
           to_string(num_rows) + ")");
    if (distinct) {
      if (seen[size_t(row)]) fail(std::string(op) + ": row id " + to_string(row) + " appears twice in row_ids");
      seen[size_t(row)] = 1;
    }
    for (int64_t h = 0; h < (head_lengths ? heads : 1); ++h) {
      const int32_t len = length_of(lengths, head_lengths, i, h, heads);
      const std::string where =
          head_lengths ? "head_lengths[" + to_string(i) + ", " + to_string(h) + "]" : "lengths[" + to_string(i) + "]";
      if (len < 0 || len > max_len)
        fail(std::string(op) + ": " + where + " = " + to_string(len) + " is outside [0, " + to_string(max_len) + "]");
      if (blocks_of(len, block) > max_blocks)
        fail(std::string(op) + ": " + where + " = " + to_string(len) + " needs " + to_string(blocks_of(len, block)) +
             " blocks but the metadata holds " + to_string(max_blocks));
    }
  }
}

void check_meta(const char* op, const BlockMetaView& m) {
  require(m.data != nullptr, "quest: null metadata pointer");
  if (m.num_rows < 0 || m.max_blocks < 0 || m.stride_row < 0 || m.stride_block < 0 || m.stride_head < 0 ||
      m.stride_side < 0)
    fail(std::string(op) + ": negative metadata shape or stride");
}

float* meta_at(const BlockMetaView& m, int64_t row, int64_t blk, int64_t h, int side) {
  return m.data + row * m.stride_row + blk * m.stride_block + h * m.stride_head + side * m.stride_side;
}

// Runs f(idx) for idx < total, in parallel when the work is worth a team.
template <typename F>
void for_each_item(int64_t total, int64_t work, F&& f) {
  if (total <= 1 || work <= (int64_t(1) << 16)) {
    for (int64_t i = 0; i < total; ++i) f(i);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < total; ++i) f(i);
}

}  // namespace

// ----------------------------------------------------------------------------- block_minmax

void block_minmax_cpu(const BlockMinmaxParams& p) {
  require(p.n >= 0, "block_minmax: n must be >= 0");
  if (p.n == 0) return;
  require(p.num_kv_heads > 0 && p.head_dim > 0 && p.block > 0,
          "block_minmax: num_kv_heads, head_dim and block must be positive");
  const KVCacheView& c = p.cache;
  require(c.k && p.row_ids && p.first_block && (p.lengths || p.head_lengths),
          "block_minmax: null pointer in the parameters");
  check_meta("block_minmax", p.meta);
  require(c.num_rows >= 0 && c.max_seq >= 0, "block_minmax: negative cache shape");
  require(p.meta.num_rows >= c.num_rows, "block_minmax: the metadata has fewer rows than the cache");
  dispatch_kv_format(c.k_format, "block_minmax", [&](auto fmt) {
    using Format = decltype(fmt);
    using S = typename Format::storage_t;
    if (!dim_ok<Format>(p.head_dim)) fail("block_minmax: head_dim does not fit the storage format");
    if (Format::kScaleWords > 0 && c.k_scale == nullptr) fail("block_minmax: a quantized cache needs its scales");
    const int64_t heads = p.num_kv_heads, B = p.block, dim = p.head_dim;
    // ---- checks, before any write
    check_rows_and_lengths("block_minmax", p.row_ids, p.lengths, p.head_lengths, p.n, heads, c.num_rows, c.max_seq, B,
                           p.meta.max_blocks, true);
    for (int64_t i = 0; i < p.n; ++i)
      if (p.first_block[i] < 0)
        fail("block_minmax: first_block[" + to_string(i) + "] = " + to_string(p.first_block[i]) + " is negative");

    int64_t work = 0;
    for (int64_t i = 0; i < p.n; ++i)
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t len = length_of(p.lengths, p.head_lengths, i, h, heads);
        work += std::max<int64_t>(len - int64_t(p.first_block[i]) * B, 0) * dim;
      }
    for_each_item(p.n * heads, work, [&](int64_t ih) {
      const int64_t i = ih / heads, h = ih % heads;
      const int64_t row = p.row_ids[i];
      const int64_t len = length_of(p.lengths, p.head_lengths, i, h, heads);
      const S* base = static_cast<const S*>(c.k) + row * c.k_stride_row + h * c.k_stride_head;
      const float* sbase = Format::kScaleWords > 0 ? c.k_scale + row * c.ks_stride_row + h * c.ks_stride_head : nullptr;
      for (int64_t blk = p.first_block[i]; blk < blocks_of(len, B); ++blk) {
        float* mn = meta_at(p.meta, row, blk, h, 0);
        float* mx = meta_at(p.meta, row, blk, h, 1);
        const int64_t t0 = blk * B, t1 = std::min(t0 + B, len);
        for (int64_t d = 0; d < dim; ++d) {
          mn[d] = INFINITY;
          mx[d] = -INFINITY;
        }
        for (int64_t t = t0; t < t1; ++t) {
          const S* kr = base + t * c.k_stride_tok;
          const float* w = sbase ? sbase + t * c.ks_stride_tok : nullptr;
          for (int64_t d = 0; d < dim; ++d) {
            const float x = Format::dequant(kr, w, int(d));
            if (x < mn[d]) mn[d] = x;
            if (x > mx[d]) mx[d] = x;
          }
        }
      }
    });
  });
}

// ----------------------------------------------------------------------------- quest_select

void quest_select_cpu(const QuestSelectParams& p) {
  require(p.n >= 0 && p.max_sel >= 0, "quest_select: n and max_sel must be >= 0");
  if (p.n == 0) return;
  require(p.num_q_heads > 0 && p.num_kv_heads > 0 && p.head_dim > 0 && p.block > 0,
          "quest_select: head counts, head_dim and block must be positive");
  require(p.num_q_heads % p.num_kv_heads == 0, "quest_select: num_q_heads must be a multiple of num_kv_heads");
  require(p.token_budget > 0, "quest_select: token_budget must be positive");
  require(p.q && p.row_ids && (p.lengths || p.head_lengths) && p.block_counts && (p.block_ids || p.max_sel == 0),
          "quest_select: null pointer in the parameters");
  check_meta("quest_select", p.meta);
  const int64_t heads = p.num_kv_heads, B = p.block, dim = p.head_dim;
  const int64_t group = p.num_q_heads / p.num_kv_heads;
  check_rows_and_lengths("quest_select", p.row_ids, p.lengths, p.head_lengths, p.n, heads, p.meta.num_rows,
                         int64_t(p.meta.max_blocks) * B, B, p.meta.max_blocks, false);
  const int64_t want = blocks_of(p.token_budget, B);
  cpu::dispatch_dtype(p.dtype, "quest_select", [&](auto tag) {
    using T = decltype(tag);
    int64_t work = 0;
    for (int64_t i = 0; i < p.n; ++i)
      for (int64_t h = 0; h < heads; ++h) work += blocks_of(length_of(p.lengths, p.head_lengths, i, h, heads), B);
    work *= group * dim;
    for_each_item(p.n * heads, work, [&](int64_t ih) {
      const int64_t i = ih / heads, h = ih % heads;
      const int64_t row = p.row_ids[i];
      const int64_t nb = blocks_of(length_of(p.lengths, p.head_lengths, i, h, heads), B);
      const int64_t cnt = std::min<int64_t>(std::min(want, nb), p.max_sel);
      int32_t* ids = p.block_ids + ih * p.max_sel;
      std::fill(ids, ids + p.max_sel, -1);
      p.block_counts[ih] = int32_t(cnt);
      if (cnt == 0) return;
      if (cnt == nb) {
        std::iota(ids, ids + cnt, 0);
        return;
      }
      // Scores of blocks 0 .. nb - 2 (the last one is always taken).
      std::vector<float> q(size_t(group * dim)), score(size_t(nb - 1));
      for (int64_t g = 0; g < group; ++g) {
        const T* qr = static_cast<const T*>(p.q) + i * p.q_stride_tok + (h * group + g) * p.q_stride_head;
        for (int64_t d = 0; d < dim; ++d) q[size_t(g * dim + d)] = to_float(qr[d]);
      }
      for (int64_t blk = 0; blk + 1 < nb; ++blk) {
        const float* mn = meta_at(p.meta, row, blk, h, 0);
        const float* mx = meta_at(p.meta, row, blk, h, 1);
        float s = 0.f;
        for (int64_t g = 0; g < group; ++g)
          for (int64_t d = 0; d < dim; ++d) {
            const float x = q[size_t(g * dim + d)];
            s += std::max(x * mn[d], x * mx[d]);
          }
        score[size_t(blk)] = std::isnan(s) ? -INFINITY : s;
      }
      std::vector<int32_t> order(static_cast<size_t>(nb - 1));
      std::iota(order.begin(), order.end(), 0);
      const int64_t take = cnt - 1;
      std::partial_sort(order.begin(), order.begin() + take, order.end(), [&](int32_t a, int32_t b) {
        const float sa = score[size_t(a)], sb = score[size_t(b)];
        return sa > sb || (sa == sb && a < b);
      });
      std::sort(order.begin(), order.begin() + take);
      std::copy(order.begin(), order.begin() + take, ids);
      ids[take] = int32_t(nb - 1);
    });
  });
}

// ----------------------------------------------------------------------------- sparse_decode_attention

namespace {

template <typename T, class KF, class VF>
void sparse_decode_run(const SparseDecodeParams& sp) {
  const AttentionParams& p = sp.attn;
  const KVCacheView& c = p.kv;
  using KS = typename KF::storage_t;
  using VS = typename VF::storage_t;
  const int64_t heads = p.num_kv_heads, dim = p.head_dim, B = sp.block;
  const int64_t group = p.num_q_heads / p.num_kv_heads;
  const bool capped = p.softcap > 0.f;
  int64_t work = 0;
  for (int64_t ih = 0; ih < int64_t(p.batch) * heads; ++ih) work += sp.block_counts[ih];
  work *= B * group * dim;
  for_each_item(int64_t(p.batch) * heads, work, [&](int64_t ih) {
    const int64_t b = ih / heads, h = ih % heads;
    const int64_t row = p.row_ids ? p.row_ids[b] : b;
    const int64_t len = length_of(p.seqlens_k, p.head_seqlens_k, b, h, heads);
    std::vector<float> q(size_t(group * dim)), acc(size_t(group * dim), 0.f);
    std::vector<float> kb(static_cast<size_t>(B * dim)), vb(static_cast<size_t>(B * dim)),
        logit(static_cast<size_t>(B));
    std::vector<SoftmaxState> st(static_cast<size_t>(group));
    for (int64_t g = 0; g < group; ++g) {
      const T* qr = static_cast<const T*>(p.q) + b * p.q_stride_tok + (h * group + g) * p.q_stride_head;
      for (int64_t d = 0; d < dim; ++d) q[size_t(g * dim + d)] = to_float(qr[d]);
    }
    const KS* kbase = static_cast<const KS*>(c.k) + row * c.k_stride_row + h * c.k_stride_head;
    const VS* vbase = static_cast<const VS*>(c.v) + row * c.v_stride_row + h * c.v_stride_head;
    const float* ksb = KF::kScaleWords > 0 ? c.k_scale + row * c.ks_stride_row + h * c.ks_stride_head : nullptr;
    const float* vsb = VF::kScaleWords > 0 ? c.v_scale + row * c.vs_stride_row + h * c.vs_stride_head : nullptr;
    const int32_t* ids = sp.block_ids + ih * sp.max_sel;
    for (int32_t s = 0; s < sp.block_counts[ih]; ++s) {
      const int64_t t0 = int64_t(ids[s]) * B, t1 = std::min(t0 + B, len);
      const int64_t nk = t1 - t0;
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t t = t0 + j;
        const KS* kr = kbase + t * c.k_stride_tok;
        const VS* vr = vbase + t * c.v_stride_tok;
        const float* kw = ksb ? ksb + t * c.ks_stride_tok : nullptr;
        const float* vw = vsb ? vsb + t * c.vs_stride_tok : nullptr;
        for (int64_t d = 0; d < dim; ++d) {
          kb[size_t(j * dim + d)] = KF::dequant(kr, kw, int(d));
          vb[size_t(j * dim + d)] = VF::dequant(vr, vw, int(d));
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const float* qg = &q[size_t(g * dim)];
        float mx = -INFINITY;
        for (int64_t j = 0; j < nk; ++j) {
          float x = 0.f;
          for (int64_t d = 0; d < dim; ++d) x += qg[d] * kb[size_t(j * dim + d)];
          x *= p.scale;
          if (capped) x = apply_softcap(x, p.softcap);
          x *= kLog2e;
          logit[size_t(j)] = x;
          mx = std::max(mx, x);
        }
        SoftmaxState& sg = st[size_t(g)];
        const float f = sg.rescale_to(mx);
        float* ag = &acc[size_t(g * dim)];
        if (f != 1.f)
          for (int64_t d = 0; d < dim; ++d) ag[d] *= f;
        for (int64_t j = 0; j < nk; ++j) {
          const float w = sg.weight(logit[size_t(j)]);
          sg.add(w);
          for (int64_t d = 0; d < dim; ++d) ag[d] += w * vb[size_t(j * dim + d)];
        }
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      const int64_t qh = h * group + g;
      T* out = static_cast<T*>(p.out) + b * p.o_stride_tok + qh * p.o_stride_head;
      const float inv = st[size_t(g)].inv_sum();
      for (int64_t d = 0; d < dim; ++d) out[d] = from_float<T>(acc[size_t(g * dim + d)] * inv);
      if (p.lse) p.lse[b * p.num_q_heads + qh] = st[size_t(g)].lse();
    }
  });
}

}  // namespace

void sparse_decode_attention_cpu(const SparseDecodeParams& sp) {
  const AttentionParams& p = sp.attn;
  require(p.batch >= 0 && sp.max_sel >= 0, "sparse_decode_attention: batch and max_sel must be >= 0");
  if (p.batch == 0) return;
  require(p.q && p.out && p.kv.k && p.kv.v && (p.seqlens_k || p.head_seqlens_k) && sp.block_counts &&
              (sp.block_ids || sp.max_sel == 0),
          "sparse_decode_attention: null pointer in the parameters");
  require(p.num_q_heads > 0 && p.num_kv_heads > 0 && p.head_dim > 0 && sp.block > 0,
          "sparse_decode_attention: head counts, head_dim and block must be positive");
  require(p.num_q_heads % p.num_kv_heads == 0,
          "sparse_decode_attention: num_q_heads must be a multiple of num_kv_heads");
  require(p.cu_seqlens_q == nullptr && p.total_q == p.batch,
          "sparse_decode_attention: one query per row (cu_seqlens_q null, total_q == batch)");
  require(p.window_left < 0 && p.score_mode == 0, "sparse_decode_attention: no window and no scores");
  require(std::isfinite(p.scale) && std::isfinite(p.softcap),
          "sparse_decode_attention: scale and softcap must be finite");
  require(p.kv.num_rows >= 0 && p.kv.max_seq >= 0, "sparse_decode_attention: negative cache shape");
  if (kv_format_is_quantized(p.kv.k_format) || kv_format_is_quantized(p.kv.v_format))
    require(p.kv.k_scale && p.kv.v_scale, "sparse_decode_attention: a quantized cache needs its scales");
  const int64_t heads = p.num_kv_heads, B = sp.block;
  const int32_t* rows = p.row_ids;
  std::vector<int32_t> identity;
  if (rows == nullptr) {
    identity.resize(size_t(p.batch));
    std::iota(identity.begin(), identity.end(), 0);
    rows = identity.data();
  }
  check_rows_and_lengths("sparse_decode_attention", rows, p.seqlens_k, p.head_seqlens_k, p.batch, heads, p.kv.num_rows,
                         p.kv.max_seq, B, INT32_MAX, false);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t ih = b * heads + h;
      const int32_t cnt = sp.block_counts[ih];
      if (cnt < 0 || cnt > sp.max_sel)
        fail("sparse_decode_attention: block_counts[" + to_string(b) + ", " + to_string(h) + "] = " + to_string(cnt) +
             " is outside [0, " + to_string(sp.max_sel) + "]");
      const int64_t nb = blocks_of(length_of(p.seqlens_k, p.head_seqlens_k, b, h, heads), B);
      const int32_t* ids = sp.block_ids + ih * sp.max_sel;
      for (int32_t s = 0; s < cnt; ++s) {
        if (ids[s] < 0 || ids[s] >= nb)
          fail("sparse_decode_attention: block_ids[" + to_string(b) + ", " + to_string(h) + ", " + to_string(s) +
               "] = " + to_string(ids[s]) + " is outside [0, " + to_string(nb) + ") (the row's blocks)");
        if (s > 0 && ids[s] <= ids[s - 1])
          fail("sparse_decode_attention: block_ids[" + to_string(b) + ", " + to_string(h) +
               "] is not strictly increasing at " + to_string(s));
      }
    }
  cpu::dispatch_dtype(p.dtype, "sparse_decode_attention", [&](auto tag) {
    using T = decltype(tag);
    dispatch_kv_pair<T>(p.kv.k_format, p.kv.v_format, "sparse_decode_attention",
                        [&](auto kf, auto vf) { sparse_decode_run<T, decltype(kf), decltype(vf)>(sp); });
  });
}

}  // namespace vattn
