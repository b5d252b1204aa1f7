// CPU Quest block-sparse decode (params.h BlockMinmaxParams, QuestSelectParams,
// SparseDecodeParams; python/vattn/reference.py block_minmax, quest_select and
// sparse_decode_attention are the definitions):
//   block_minmax             per-channel min / max of the dequantized keys of each block, OpenMP
//                            over (entry, kv head);
//   quest_select             per (entry, kv head): the upper-bound score of every block but the
//                            last (a vectorized channel loop, AVX2 where the CPU has it), the top
//                            ones by nth_element on integer rank keys, the last block added, ascending;
//   sparse_decode_attention  per (entry, kv head): the GQA group's queries, pre-scaled as the dense
//                            engine's, walk the selected blocks in stretches of up to kKeyRun keys
//                            (adjacent blocks joined) with the dense engine's pieces: RowReader
//                            (row_reader.h: fp32 read in place, other formats converted), qk_block,
//                            online softmax in the exp2 domain (SoftmaxState, exp2_weights),
//                            pv_block; each K/V row is read once for the whole group, and the next
//                            stretch is prefetched while one runs.
// Every index is checked before the first write or read of the cache, so a bad call throws
// std::invalid_argument (ValueError) and changes nothing.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "attention_kernels.h"
#include "cpu_util.h"
#include "row_reader.h"
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

// Running min / max that propagate NaN as the reference's amin / amax do: a NaN x replaces acc, and
// a NaN acc stays (both compares are false). Branch-free selects on the NaN-free path.
inline float nan_min(float acc, float x) { return (x < acc || x != x) ? x : acc; }
inline float nan_max(float acc, float x) { return (x > acc || x != x) ? x : acc; }

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
  require(c.block_table == nullptr, "block_minmax: paged KV views (a block table) are not supported");
  require(p.meta.num_rows >= c.num_rows, "block_minmax: the metadata has fewer rows than the cache");
  dispatch_kv_format(c.k_format, "block_minmax", [&](auto fmt) {
    using Format = decltype(fmt);
    using S = typename Format::storage_t;
    if (!dim_ok<Format>(p.head_dim)) fail("block_minmax: head_dim does not fit the storage format");
    if (Format::kScaleWords > 0 && c.k_scale == nullptr) fail("block_minmax: a quantized cache needs its scales");
    cpu::check_groups(c.k_format, p.head_dim, c.max_seq, "block_minmax");
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
        if constexpr (is_grouped_format<Format>::value) {
          // int4_ch: the row reader's exact values (the group's parameters loaded once), in runs.
          constexpr int kRun = 64;
          thread_local std::vector<float> vals;
          vals.resize(size_t(kRun) * dim);
          const cpu::HeadRows<Format> hr{base, c.k_stride_tok, sbase, c.ks_stride_tok};
          for (int64_t ta = t0; ta < t1; ta += kRun) {
            const int nk = int(std::min<int64_t>(kRun, t1 - ta));
            int64_t st;
            const float* x = cpu::RowReader<Format>::rows(hr, int(ta), nk, int(t1 - ta), int(dim), vals.data(), &st);
            for (int j = 0; j < nk; ++j)
              for (int64_t d = 0; d < dim; ++d) {
                const float v = x[j * st + d];
                mn[d] = nan_min(mn[d], v);
                mx[d] = nan_max(mx[d], v);
              }
          }
        } else {
          for (int64_t t = t0; t < t1; ++t) {
            const S* kr = base + t * c.k_stride_tok;
            const float* w = sbase ? sbase + t * c.ks_stride_tok : nullptr;
            for (int64_t d = 0; d < dim; ++d) {
              const float x = Format::dequant(kr, w, int(d));
              mn[d] = nan_min(mn[d], x);
              mx[d] = nan_max(mx[d], x);
            }
          }
        }
      }
    });
  });
}

// ----------------------------------------------------------------------------- quest_select

namespace {

// Scores of blocks [blk0, blk1) of one entry, all kv heads: score[h * ld + blk] = sum over g < group,
// d < dim of max(q[h][g][d] * mn[d], q[h][g][d] * mx[d]) with mn, mx the metadata of (blk, h), for
// the blocks blk < lim[h] (the others are not written). The max propagates NaN (a NaN on either side,
// as torch.maximum in the reference), so a block with NaN metadata scores NaN, which rank_key puts
// last. A row's metadata is one stretch of memory walked in order (blocks outer, heads inner), which
// the hardware prefetcher follows; the channel loop is contiguous and vectorized (lanes of partial
// sums: the order of the additions is the vector one, within rounding of the plain sum). Compiled
// twice (plain x86-64 and AVX2+FMA), picked at run time like attention_kernels.cpp.
#if defined(__GNUC__)
#define VATTN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define VATTN_ALWAYS_INLINE inline
#endif

struct ScoreArgs {
  const float* q;  // [heads][group][dim]
  int heads, group, dim;
  const float* meta;  // (block 0, head 0, min) of the row
  int64_t stride_block, stride_head, stride_side;
  const int64_t* lim;  // [heads]
  float* score;        // [heads][ld]
  int64_t ld;
};

VATTN_ALWAYS_INLINE void score_blocks_body(const ScoreArgs& a, int64_t blk0, int64_t blk1) {
  for (int64_t blk = blk0; blk < blk1; ++blk)
    for (int h = 0; h < a.heads; ++h) {
      if (blk >= a.lim[h]) continue;
      const float* mn = a.meta + blk * a.stride_block + h * a.stride_head;
      const float* mx = mn + a.stride_side;
      float s = 0.f;
      for (int g = 0; g < a.group; ++g) {
        const float* qg = a.q + (int64_t(h) * a.group + g) * a.dim;
#pragma omp simd reduction(+ : s)
        for (int d = 0; d < a.dim; ++d) {
          const float lo = qg[d] * mn[d], hi = qg[d] * mx[d];
          s += (lo < hi || hi != hi) ? hi : lo;  // max(lo, hi), NaN if either is
        }
      }
      a.score[h * a.ld + blk] = s;
    }
}

void score_blocks_generic(const ScoreArgs& a, int64_t blk0, int64_t blk1) { score_blocks_body(a, blk0, blk1); }

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) void score_blocks_avx2(const ScoreArgs& a, int64_t blk0, int64_t blk1) {
  score_blocks_body(a, blk0, blk1);
}
bool use_avx2() {
  static const bool yes =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !std::getenv("VATTN_CPU_GENERIC");
  return yes;
}
#endif

void score_blocks(const ScoreArgs& a, int64_t blk0, int64_t blk1) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  if (use_avx2()) return score_blocks_avx2(a, blk0, blk1);
#endif
  score_blocks_generic(a, blk0, blk1);
}

constexpr int64_t kScoreChunk = 256;  // blocks per scoring item

// A key that orders (score descending, block ascending) as an unsigned integer ascending: the
// score's bits made monotonic (after -0 -> +0, so the two zeros tie as in float compares), inverted,
// above the block index. NaN ranks below every number, -inf included, as in the reference (its
// nan_to_num(nan=-inf) also turns a true -inf into the lowest finite value): the monotonic bits 0,
// which no number has.
uint64_t rank_key(float score, int64_t blk) {
  const float z = score + 0.f;  // -0 -> +0
  uint32_t u;
  std::memcpy(&u, &z, 4);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // ascending with the float value
  if (z != z) u = 0u;                              // NaN: last
  return (uint64_t(~u) << 32) | uint64_t(uint32_t(blk));
}

}  // namespace

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
  const int64_t items = p.n * heads;
  // Per (entry, kv head): how many blocks get chosen, and how many are scored (every block but the
  // last when some are left out, else none).
  std::vector<int64_t> count(static_cast<size_t>(items)), lim(static_cast<size_t>(items));
  int64_t ld = 0;
  for (int64_t ih = 0; ih < items; ++ih) {
    const int64_t nb = blocks_of(length_of(p.lengths, p.head_lengths, ih / heads, ih % heads, heads), B);
    count[size_t(ih)] = std::min<int64_t>(std::min(want, nb), p.max_sel);
    lim[size_t(ih)] = count[size_t(ih)] > 0 && count[size_t(ih)] < nb ? nb - 1 : 0;
    ld = std::max(ld, lim[size_t(ih)]);
  }
  // Scores, in items of (entry, chunk of kScoreChunk blocks) over all the entry's heads.
  std::vector<float> qf(size_t(p.n * group * heads * dim)), score(size_t(items * ld));
  cpu::dispatch_dtype(p.dtype, "quest_select", [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = 0; i < p.n; ++i)
      for (int64_t hq = 0; hq < heads * group; ++hq) {
        const T* qr = static_cast<const T*>(p.q) + i * p.q_stride_tok + hq * p.q_stride_head;
        for (int64_t d = 0; d < dim; ++d) qf[size_t((i * heads * group + hq) * dim + d)] = to_float(qr[d]);
      }
  });
  const int64_t chunks = blocks_of(ld, kScoreChunk);
  for_each_item(p.n * chunks, items * ld * group * dim, [&](int64_t ic) {
    const int64_t i = ic / chunks, c = ic % chunks;
    const ScoreArgs a{&qf[size_t(i * heads * group * dim)],
                      int(heads),
                      int(group),
                      int(dim),
                      meta_at(p.meta, p.row_ids[i], 0, 0, 0),
                      p.meta.stride_block,
                      p.meta.stride_head,
                      p.meta.stride_side,
                      &lim[size_t(i * heads)],
                      &score[size_t(i * heads * ld)],
                      ld};
    score_blocks(a, c * kScoreChunk, std::min(ld, (c + 1) * kScoreChunk));
  });
  // The choice, per (entry, kv head).
  for_each_item(items, items * ld * 8, [&](int64_t ih) {
    const int64_t cnt = count[size_t(ih)], nb_scored = lim[size_t(ih)];
    int32_t* ids = p.block_ids + ih * p.max_sel;
    std::fill(ids, ids + p.max_sel, -1);
    p.block_counts[ih] = int32_t(cnt);
    if (cnt == 0) return;
    if (nb_scored == 0) {  // all blocks
      std::iota(ids, ids + cnt, 0);
      return;
    }
    // The take best by (score descending, block ascending), a strict total order, so the chosen set
    // is exactly a partial sort's: the keys up to the take-th smallest; listed ascending, then the
    // last block (nb - 1 = nb_scored).
    const float* sc = &score[size_t(ih * ld)];
    const int64_t take = cnt - 1;
    if (take > 0) {
      thread_local std::vector<uint64_t> keys;
      keys.resize(size_t(nb_scored));
      for (int64_t blk = 0; blk < nb_scored; ++blk) keys[size_t(blk)] = rank_key(sc[blk], blk);
      std::nth_element(keys.begin(), keys.begin() + (take - 1), keys.end());
      const uint64_t last = keys[size_t(take - 1)];
      int64_t c = 0;
      for (int64_t blk = 0; blk < nb_scored; ++blk)
        if (rank_key(sc[blk], blk) <= last) ids[c++] = int32_t(blk);
    }
    ids[take] = int32_t(nb_scored);
  });
}

// ----------------------------------------------------------------------------- sparse_decode_attention

namespace {

constexpr int kKeyRun = 64;  // keys per online-softmax step: adjacent chosen blocks are walked together

// Keys [begin, end) of one online-softmax step.
struct Stretch {
  int64_t begin, end;
};

// Walks the chosen blocks ids[0 .. count) (strictly increasing, each holding at least one of the
// len keys) in stretches of at most kKeyRun keys; a stretch joins adjacent blocks and a block longer
// than kKeyRun spans several stretches. next() returns an empty stretch at the end.
struct Walk {
  const int32_t* ids;
  int32_t count;
  int64_t block, len;
  int32_t s = 0;  // the chosen block holding the next key
  int64_t t = 0;  // the next key (within block s once the walk has reached it)
  Stretch next() {
    if (s >= count) return Stretch{t, t};
    t = std::max(t, int64_t(ids[s]) * block);
    const int64_t begin = t;
    for (;;) {
      const int64_t end = std::min((int64_t(ids[s]) + 1) * block, len);
      if (end - begin > kKeyRun) {  // block s goes on in the next stretch
        t = begin + kKeyRun;
        break;
      }
      t = end;
      ++s;
      if (s >= count || int64_t(ids[s]) * block != t) break;  // a gap ends the stretch
    }
    return Stretch{begin, t};
  }
};

// Per-thread scratch of the sparse decode.
struct SparseScratch {
  std::vector<float> q, acc, s, kbuf, vbuf;
  std::vector<SoftmaxState> st;
};

template <typename T, class KF, class VF>
void sparse_decode_run(const SparseDecodeParams& sp) {
  const AttentionParams& p = sp.attn;
  const KVCacheView& c = p.kv;
  const int64_t heads = p.num_kv_heads, B = sp.block;
  const int dim = p.head_dim;
  const int group = p.num_q_heads / p.num_kv_heads;
  const bool capped = p.softcap > 0.f;
  // As the dense engine: without soft-cap the exp2-domain factor folds into q; with it, tanh needs
  // the plain logit.
  const float qscale = capped ? p.scale : p.scale * kLog2e;
  int64_t work = 0;
  for (int64_t ih = 0; ih < int64_t(p.batch) * heads; ++ih) work += sp.block_counts[ih];
  work *= B * group * dim;
  for_each_item(int64_t(p.batch) * heads, work, [&](int64_t ih) {
    const int64_t b = ih / heads, h = ih % heads;
    const int64_t row = p.row_ids ? p.row_ids[b] : b;
    const int64_t len = length_of(p.seqlens_k, p.head_seqlens_k, b, h, heads);
    thread_local SparseScratch sc;
    sc.q.resize(size_t(group) * dim);
    sc.acc.assign(size_t(group) * dim, 0.f);
    sc.s.resize(size_t(group) * kKeyRun);
    sc.kbuf.resize(size_t(kKeyRun) * dim);
    sc.vbuf.resize(size_t(kKeyRun) * dim);
    sc.st.assign(size_t(group), SoftmaxState{});
    for (int g = 0; g < group; ++g) {
      const T* qr = static_cast<const T*>(p.q) + b * p.q_stride_tok + (h * group + g) * p.q_stride_head;
      float* dst = &sc.q[size_t(g) * dim];
      for (int d = 0; d < dim; ++d) dst[d] = to_float(qr[d]) * qscale;
    }
    const cpu::HeadRows<KF> kh = cpu::head_rows_of<KF>(c.k, c.k_stride_row, c.k_stride_tok, c.k_stride_head, c.k_scale,
                                                       c.ks_stride_row, c.ks_stride_tok, c.ks_stride_head, row, h);
    const cpu::HeadRows<VF> vh = cpu::head_rows_of<VF>(c.v, c.v_stride_row, c.v_stride_tok, c.v_stride_head, c.v_scale,
                                                       c.vs_stride_row, c.vs_stride_tok, c.vs_stride_head, row, h);
    const int32_t* ids = sp.block_ids + ih * sp.max_sel;
    // The chosen keys in stretches of at most kKeyRun, adjacent blocks joined.
    Walk cur{ids, sp.block_counts[ih], B, len}, ahead = cur;
    Stretch st = cur.next();
    for (; st.begin < st.end; st = cur.next()) {
      // Prefetch the next stretch (all of it: measured faster than its first kPrefetchRows rows,
      // 3.9 vs 4.1-4.6 ms at 32K keys, 1/8 chosen) while this one runs.
      const Stretch nx = (ahead = cur).next();
      if (nx.begin < nx.end) {
        cpu::prefetch_rows(kh, nx.begin, int(nx.end - nx.begin), dim);
        cpu::prefetch_rows(vh, nx.begin, int(nx.end - nx.begin), dim);
      }
      const int64_t ja = st.begin, je = st.end;
      const int nk = int(je - ja);
      int64_t ks, vs;
      const float* kp = cpu::RowReader<KF>::rows(kh, int(ja), nk, nk, dim, sc.kbuf.data(), &ks);
      cpu::qk_block(sc.q.data(), group, kp, ks, nk, nk, dim, sc.s.data(), kKeyRun);
      for (int g = 0; g < group; ++g) {
        float* sg = &sc.s[size_t(g) * kKeyRun];
        if (capped)
          for (int j = 0; j < nk; ++j) sg[j] = p.softcap * std::tanh(sg[j] / p.softcap) * kLog2e;
        SoftmaxState& sm = sc.st[size_t(g)];
        const float f = sm.rescale_to(cpu::max_of(sg, 0, nk));
        if (f != 1.f) {
          float* ag = &sc.acc[size_t(g) * dim];
          for (int d = 0; d < dim; ++d) ag[d] *= f;
        }
        if (sm.m == -INFINITY) {  // only -inf logits so far
          std::fill(sg, sg + nk, 0.f);
          continue;
        }
        sm.add(cpu::exp2_weights(sg, nk, 0, nk, sm.m));
      }
      const float* vp = cpu::RowReader<VF>::rows(vh, int(ja), nk, nk, dim, sc.vbuf.data(), &vs);
      cpu::pv_block(sc.s.data(), kKeyRun, group, vp, vs, nk, nk, dim, sc.acc.data());
    }
    for (int g = 0; g < group; ++g) {
      const int64_t qh = h * group + g;
      T* out = static_cast<T*>(p.out) + b * p.o_stride_tok + qh * p.o_stride_head;
      const float inv = sc.st[size_t(g)].inv_sum();
      const float* ag = &sc.acc[size_t(g) * dim];
      for (int d = 0; d < dim; ++d) out[d] = from_float<T>(ag[d] * inv);
      if (p.lse) p.lse[b * p.num_q_heads + qh] = sc.st[size_t(g)].lse();
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
  require(p.kv.block_table == nullptr, "sparse_decode_attention: paged KV views (a block table) are not supported");
  require(std::isfinite(p.scale) && std::isfinite(p.softcap),
          "sparse_decode_attention: scale and softcap must be finite");
  require(p.kv.num_rows >= 0 && p.kv.max_seq >= 0, "sparse_decode_attention: negative cache shape");
  if (kv_format_is_quantized(p.kv.k_format) || kv_format_is_quantized(p.kv.v_format))
    require(p.kv.k_scale && p.kv.v_scale, "sparse_decode_attention: a quantized cache needs its scales");
  cpu::check_groups(p.kv.k_format, p.head_dim, p.kv.max_seq, "sparse_decode_attention (K)");
  cpu::check_groups(p.kv.v_format, p.head_dim, p.kv.max_seq, "sparse_decode_attention (V)");
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
