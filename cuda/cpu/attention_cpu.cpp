// CPU decode and prefill attention (semantics: cuda/include/vattn/params.h, python/vattn/reference.py).
//
// One engine serves both: a work item is (batch row, a run of kv heads, a block of query positions,
// a key range). Its query tile holds all q heads of those GQA groups for those positions, so every
// K/V row read from memory feeds the whole group. Keys are walked in blocks of kKeyBlock with an
// online softmax in the exp2 domain (SoftmaxState). Decode has one query position per row, takes all
// kv heads of the row in one item (in the usual layouts the heads of a token are adjacent, so a key
// block is one contiguous stretch of memory instead of one row per page per head) and splits long
// rows into several key ranges (flash-decoding on CPU) whose partial states are merged with
// merge_weights; prefill takes one head per item, blocks the queries, and skips key blocks no query
// of the tile sees.
#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

#include "attention_kernels.h"
#include "cpu_util.h"
#include "row_reader.h"
#include "vattn/key_range.h"
#include "vattn/ops.h"
#include "vattn/scores.h"
#include "vattn/softmax_state.h"

namespace vattn {
namespace {

using cpu::fail;
using cpu::require;

constexpr int kKeyBlock = 64;    // keys per online-softmax step (K and V blocks stay in L1/L2)
constexpr int kQueryRows = 128;  // target rows (positions x group heads) of a prefill tile
// ... and of a chunk whose queries sit on a cached prefix at least as long as the chunk: its tiles
// walk mostly unmasked keys, so a taller tile (each K / V block packed once for more rows) pays,
// where on a causal diagonal the masked part of the taller tile would cost more.
constexpr int kQueryRowsLong = 256;
constexpr int kMinSplitKeys = 512;  // decode: never split a row into ranges shorter than this
// Calls with less work (multiply-adds of QK) run on the calling thread (run_items).
constexpr int64_t kParallelWork = 1 << 18;

// HeadRows, RowReader, head_rows_of: row_reader.h.
using cpu::head_rows_of;
using cpu::HeadRows;
using cpu::RowReader;

// One unit of parallel work.
struct Item {
  int b;       // batch row
  int h0, nh;  // kv heads [h0, h0 + nh)
  int q0, nq;  // query positions [q0, q0 + nq) within the row (decode: 0, 1)
  int k0, k1;  // key range walked (each head reads only the part its queries see)
  int part;    // -1: write the output; else index of a decode partial slot
};

// Per-thread scratch.
struct Scratch {
  std::vector<float> q, acc, s, kbuf, vbuf;
  std::vector<SoftmaxState> st;
  std::vector<int> lo, hi;
  std::vector<int> ca, ce;            // per row: its columns [ca, ce) of the current key block
  std::vector<int> head_lo, head_hi;  // per head of the item: union of its rows' visible keys
  void reserve(int rows, int heads, int dim) {
    head_lo.resize(heads);
    head_hi.resize(heads);
    q.resize((size_t)rows * dim);
    acc.resize((size_t)rows * dim);
    s.resize((size_t)rows * kKeyBlock);
    kbuf.resize((size_t)kKeyBlock * dim);
    vbuf.resize((size_t)kKeyBlock * dim);
    st.resize(rows);
    lo.resize(rows);
    hi.resize(rows);
    ca.resize(rows);
    ce.resize(rows);
  }
};

int first_query(const AttentionParams& p, int b) { return p.cu_seqlens_q ? p.cu_seqlens_q[b] : b; }
int queries_of(const AttentionParams& p, int b) {
  return p.cu_seqlens_q ? p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b] : 1;
}
// Visible keys [lo, hi) of the query at position pos in a row of length len (key_range.h;
// validate() has checked 0 <= len <= max_seq and the row ids, so every key below len is
// readable), as a half-open range with lo <= hi.
void visible_range(const AttentionParams& p, int pos, int len, int* lo, int* hi) {
  const KeySpan keys = visible_keys(pos, len, p.window_left);
  *hi = std::max(keys.end(), 0);
  *lo = std::min(keys.first, *hi);
}

// A paged view (kv_paging.h): its shape, and every block id a row's lengths reach (the kernels
// read no key at or past a length, so ids of blocks past it are never used and may be anything).
// Runs after the row ids and lengths are checked.
void validate_paged(const AttentionParams& p) {
  const KVCacheView& c = p.kv;
  require(c.num_blocks >= 0 && c.bt_stride_row >= 0,
          "attention: a paged view needs num_blocks >= 0 and a "
          "block-table row stride >= 0");
  require(p.score_mode == kScoreOff, "attention: scores are not supported on a paged view");
  for (int b = 0; b < p.batch; ++b) {
    int reach = 0;
    for (int h = 0; h < p.num_kv_heads; ++h) reach = std::max(reach, kv_length(p, b, h));
    cpu::check_blocks(c, cache_row(p, b), reach, "attention");
  }
}

// Checks everything the Python layer cannot check without reading the index tensors.
void validate(const AttentionParams& p, bool decode) {
  // No query at all (an empty q tensor has no storage): nothing reads q or writes out, but the
  // call still checks the rows and lengths, and "replace" scores zero every row's [0, L).
  // A cache with no positions (or no rows) has no storage either: every length must then be 0 (or
  // no row be named), which the checks below enforce, and no key is read.
  const bool no_cache = !kv_paged(p.kv) && (p.kv.max_seq == 0 || p.kv.num_rows == 0);
  require((p.total_q == 0 || (p.q && p.out)) && (no_cache || (p.kv.k && p.kv.v)) && p.seqlens_k,
          "attention: null pointer in the parameters");
  require(p.batch >= 0 && p.total_q >= 0, "attention: negative batch or total_q");
  require(p.num_q_heads > 0 && p.num_kv_heads > 0 && p.head_dim > 0,
          "attention: head counts and head_dim must be positive");
  require(p.num_q_heads % p.num_kv_heads == 0, "attention: num_q_heads must be a multiple of num_kv_heads");
  require(p.kv.num_rows >= 0 && p.kv.max_seq >= 0, "attention: negative cache shape");
  require(kv_format_is_quantized(p.kv.k_format) == kv_format_is_quantized(p.kv.v_format),
          "attention: K and V must be both plain or both quantized");
  if (!kv_format_is_quantized(p.kv.k_format))
    require(p.kv.k_format == p.dtype && p.kv.v_format == p.dtype, "attention: a plain cache must store the q dtype");
  else
    require(no_cache || (p.kv.k_scale && p.kv.v_scale), "attention: a quantized cache needs its scales");
  if (kv_paged(p.kv)) {  // groups within blocks (validate_paged checks the rest of the view)
    require(p.kv.block_size > 0, "attention: a paged view needs block_size > 0");
    cpu::check_paged_groups(p.kv.k_format, p.head_dim, p.kv.block_size, "attention (K)");
    cpu::check_paged_groups(p.kv.v_format, p.head_dim, p.kv.block_size, "attention (V)");
  } else {
    cpu::check_groups(p.kv.k_format, p.head_dim, p.kv.max_seq, "attention (K)");
    cpu::check_groups(p.kv.v_format, p.head_dim, p.kv.max_seq, "attention (V)");
  }
  if (decode) {
    require(p.cu_seqlens_q == nullptr, "decode_attention: cu_seqlens_q must be null");
    require(p.total_q == p.batch, "decode_attention: total_q must equal batch (one query per row)");
  } else {
    require(p.cu_seqlens_q != nullptr, "prefill_attention: cu_seqlens_q is required");
    require(p.batch == 0 ? true : p.cu_seqlens_q[0] == 0, "prefill_attention: cu_seqlens_q[0] must be 0");
    for (int b = 0; b < p.batch; ++b)
      if (p.cu_seqlens_q[b + 1] < p.cu_seqlens_q[b]) fail("prefill_attention: cu_seqlens_q must be non-decreasing");
    if (p.cu_seqlens_q[p.batch] != p.total_q)
      fail("prefill_attention: cu_seqlens_q[batch] must equal the number of queries");
  }
  if (p.score_mode != kScoreOff) {
    require(p.score_mode == kScoreAdd || p.score_mode == kScoreReplace,
            "attention: score_mode must be 0 (off), 1 (add) or 2 (replace)");
    require(p.scores != nullptr, "attention: score_mode is set but scores is null");
    require(p.sc_stride_row >= 0 && p.sc_stride_head >= 0, "attention: negative score strides");
    // Each (cache row, kv head) must have one writer: two batch rows on one cache row would race.
    std::vector<char> seen((size_t)p.kv.num_rows, 0);
    for (int b = 0; b < p.batch; ++b) {
      const int row = cache_row(p, b);
      if (row < 0 || row >= p.kv.num_rows) continue;  // reported below
      if (seen[(size_t)row]) fail("attention: row_ids must be distinct when scores are emitted");
      seen[(size_t)row] = 1;
    }
  }
  for (int b = 0; b < p.batch; ++b) {
    const int row = cache_row(p, b);
    if (row < 0 || row >= p.kv.num_rows)
      fail("attention: row id " + std::to_string(row) + " of batch row " + std::to_string(b) + " is outside [0, " +
           std::to_string(p.kv.num_rows) + ")");
    const int len = p.seqlens_k[b];
    if (len < 0 || len > p.kv.max_seq)
      fail("attention: seqlens_k[" + std::to_string(b) + "] = " + std::to_string(len) + " is outside [0, " +
           std::to_string(p.kv.max_seq) + "]");
    if (p.head_seqlens_k) {
      for (int h = 0; h < p.num_kv_heads; ++h) {
        const int hl = p.head_seqlens_k[(int64_t)b * p.num_kv_heads + h];
        if (hl < 0 || hl > p.kv.max_seq)
          fail("attention: head_seqlens_k[" + std::to_string(b) + ", " + std::to_string(h) +
               "] = " + std::to_string(hl) + " is outside [0, " + std::to_string(p.kv.max_seq) + "]");
      }
    }
  }
  if (kv_paged(p.kv)) validate_paged(p);
}

// Logits of one key block of one head: s[r * kKeyBlock + (j - ja)] = q_r . k_j for the nq rows
// of q and the keys ja..je-1 of (row, h); avail rows of the walk are readable from ja on. Runs of
// keys that share a base pointer (the whole range when contiguous, one physical block each when
// paged: cpu::for_each_run) go to the reader in one piece: a direct (fp32) reader's rows feed
// qk_block run by run, a converting reader fills its buffer run by run for one qk_block.
template <class KF>
void block_logits(const KVCacheView& kv, const cpu::KvSide& side, int row, int h, int ja, int je, int avail,
                  const float* q, int nq, int dim, float* kbuf, float* s) {
  if constexpr (std::is_same<KF, Int4ChannelFormat>::value) {
    cpu::for_each_run<KF>(kv, side, row, h, ja, je, avail, [&](const HeadRows<KF>& r, int j0, int n, int av, int off) {
      int4_ch_qk(r, q, nq, j0, j0 + n, av, dim, kbuf, s + off, kKeyBlock);
    });
  } else if constexpr (RowReader<KF>::kDirect) {
    cpu::for_each_run<KF>(kv, side, row, h, ja, je, avail, [&](const HeadRows<KF>& r, int j0, int n, int av, int off) {
      int64_t ks;
      const float* kp = RowReader<KF>::rows(r, j0, n, av, dim, kbuf, &ks);
      cpu::qk_block(q, nq, kp, ks, n, av, dim, s + off, kKeyBlock);
    });
  } else {
    cpu::for_each_run<KF>(kv, side, row, h, ja, je, avail, [&](const HeadRows<KF>& r, int j0, int n, int av, int off) {
      int64_t ks;
      RowReader<KF>::rows(r, j0, n, av, dim, kbuf + (size_t)off * dim, &ks);
    });
    cpu::qk_block(q, nq, kbuf, dim, je - ja, je - ja, dim, s, kKeyBlock);
  }
}

// acc[r] += sum_j w[r * kKeyBlock + (j - ja)] * v_j over the values ja..je-1 of (row, h), in runs
// as block_logits.
template <class VF>
void block_values(const KVCacheView& kv, const cpu::KvSide& side, int row, int h, int ja, int je, int avail,
                  const float* w, int nq, int dim, float* vbuf, float* acc) {
  if constexpr (RowReader<VF>::kDirect) {
    cpu::for_each_run<VF>(kv, side, row, h, ja, je, avail, [&](const HeadRows<VF>& r, int j0, int n, int av, int off) {
      int64_t vs;
      const float* vp = RowReader<VF>::rows(r, j0, n, av, dim, vbuf, &vs);
      cpu::pv_block(w + off, kKeyBlock, nq, vp, vs, n, av, dim, acc);
    });
  } else {
    cpu::for_each_run<VF>(kv, side, row, h, ja, je, avail, [&](const HeadRows<VF>& r, int j0, int n, int av, int off) {
      int64_t vs;
      RowReader<VF>::rows(r, j0, n, av, dim, vbuf + (size_t)off * dim, &vs);
    });
    cpu::pv_block(w, kKeyBlock, nq, vbuf, dim, je - ja, je - ja, dim, acc);
  }
}

// Token-order decode. A decode item covers every kv head of its row; by default it walks a key
// block one head at a time, reading a dim-long piece of every token row, which leaves the hardware
// prefetcher behind. qk_tokens / pv_tokens walk the block token after token instead, all heads of a
// token before the next: where the heads of a token and consecutive tokens are back to back, that
// reads K and V front to back, which the prefetcher follows. Measured on the 2-core Zen 5 VM, fp32,
// K / V [rows, tokens, heads, dim], both walks timed in turn in one process:
// - a 50 MB read, no arithmetic, one thread: head by head in blocks of 64 keys 6-10 GB/s, front to
//   back 22-30 GB/s;
// - decode, 2 threads, token order / head order: SmolLM2 heads (3 x 64, group 3) b=16 x 2K
//   1.38-1.47x, group 1 (32 x 128) b=8 x 512 1.31-1.56x, Llama-3-8B heads (group 4) 0.93-1.13x,
//   Llama-3-70B heads (group 8) 0.66-0.70x: with many query rows per head the head walk's register
//   tiles (a q vector used for several keys, the PV accumulators held over a run of keys) save more
//   than the order gains, so one token at a time is for groups of at most kTokenOrderMaxGroup.
//   Larger groups walk in pieces of a few tokens where the AVX2 copy has them (head dims a multiple
//   of 16, cpu::token_pieces; attention_kernels_avx2.h has the measurements; since 2026-12-07 group 3
//   goes in pieces too, inside the token order's gate): 1.52-1.55x
//   the head walk with Llama-3-8B heads at 268-537 MB, 1.28x with Llama-3-70B heads, 1.10-1.26x at
//   head dims 96 and 256 (bench/decode_walks.py, 2 threads). Elsewhere they keep the head walk, in
//   pieces of kPrefetchPiece keys, each preceded by a prefetch of the piece's rows of every head
//   front to back (prefetch_span): 1.06x at head dim 96 (measured before the AVX2 pieces took those
//   dims; until cpu::prefetch, GCC compiled prefetch_span's loop to nothing, and the 1.03-1.08x once
//   quoted here for it was the plain head walk timed against itself);
// - by the bytes of K and V the call reads (SmolLM2 heads, the same rows decoded over and over):
//   12.6 MB 0.64-0.79x, 25 MB 0.98-1.63x, 50 MB 1.15-1.47x. Where K and V fit in the cache, the
//   token order's reloads of the accumulators for every key cost more than it saves, so it starts
//   at kTokenOrderMinBytes, as does the prefetched head walk. (A model's decode step meets each layer's K and V cold,
//   where the token order paid at 1.5-24 MB too, layer_major, 1.24-1.34x on one thread; the gate gives that up rather
//   than slow down calls whose K and V are hot.)
// - layout: only where a cache row's K (and V) is one [tokens, kv heads, dim] block (layer_major,
//   plain tensors). In token_major a token's heads of one layer sit between other layers' (46 KB
//   from token to token with SmolLM2's 30 layers), every token starts a new page, and the token
//   order measured 0.46-0.78x the head walk, whose software prefetch runs rows ahead in each head.
// Below the gate, GQA groups of 4+ at head dims a multiple of 16 take the same pieces with AVX-512
// where the CPU has it (cpu::wide_token_pieces), not the head walk. Measured on the 2-core Zen 5 VM,
// fp32, head walk time / pieces time, 1 thread (the solo calls of a busy machine):
// - hot, the same K and V decoded over and over (bench/decode_walks.py --threads 1): Llama-3-8B
//   heads b=1 x 512-2K 1.21-1.28 (AVX2 pieces: 0.93-0.97), Llama-3-70B heads b=1 x 512 1.20-1.43,
//   32 / 8 x 64 b=2 x 1K 1.29-1.39;
// - cold, 12-24 distinct caches decoded in turn like a model's layers: Llama-3-8B b=1 x 512 1.29-1.43
//   (AVX2 pieces 1.56-1.59), 70B 1.18-1.35 (AVX2 1.19-1.20), 32 / 8 x 64 1.36-1.59 (AVX2 1.63-1.64).
// With 2 threads the b=1 x 512 calls split by head and take the head walk either way; at 2K, hot,
// 1.16-1.24 (AVX2 pieces 0.95). Above the gate the AVX2 pieces stay: streaming, 2 threads, the AVX-512
// copy measured slower with group 4 (bench/run.py Llama-3-8B b=64 x 512: 7.4-8.0 ms vs 5.1-7.0 ms)
// and even with group 8 (Llama-3-70B b=8 x 2K: 4.13-4.15 vs 4.11-4.44 ms).
// On the 2-core Zen 3 VM (AVX2 only), after the AVX2 pieces changed (8 tokens, prefetches spread,
// 2026-12-07), head walk time / AVX2 pieces time below the gate, same-process pairs:
// - hot, 1 thread: Llama-3-8B heads b=1 x 512 1.06, x 2K 1.24, Llama-3-70B b=1 x 512 1.19, 32 / 8 x 64
//   b=2 x 1K 1.07; 2 threads 1.04-1.13;
// - hot, 2 threads, batched: b=16 x 128 1.08, b=8 x 256 1.01, b=4 x 512 0.93, 70B b=2 x 512 0.93,
//   16 / 4 x 128 b=4 x 256 0.96, 32 / 4 x 64 b=8 x 512 1.07;
// - cold (16-24 distinct caches in turn), 1 thread: 1.24-1.42; 2 threads: 1.18-1.36, b=1 x 512
//   0.96-0.99 (split by head there), 70B b=2 x 512 0.91 (the one clear loss), b=4 x 512 1.03;
// - group 3 (SmolLM2 heads) in pieces: hot 0.90-0.93 at b=1 x 2K and b=4 x 1K, 1.10 at b=1 x 8K; cold
//   1.26-1.46. It loses on hot calls, so groups below 4 keep the head walk in cache.
constexpr int kInCachePiecesMinGroup = 4;
constexpr int kTokenOrderMaxGroup = 3;
constexpr int64_t kTokenOrderMinBytes = int64_t(24) << 20;
// kTokenOrderMinBytes, or VATTN_CPU_TOKEN_ORDER_MIN_BYTES when set to an integer (0: the token order
// wherever it applies, as the tests use it; negative: never). Read per call, so a test can set it.
inline int64_t token_order_min_bytes() {
  const char* e = std::getenv("VATTN_CPU_TOKEN_ORDER_MIN_BYTES");
  if (e == nullptr || *e == 0) return kTokenOrderMinBytes;
  char* end = nullptr;
  const long long v = std::strtoll(e, &end, 10);
  if (end == e || *end != 0) return kTokenOrderMinBytes;
  return v < 0 ? INT64_MAX : (int64_t)v;
}
// Prefetch into L1 of the rows of tokens [ta, te) of a row stored as one block (token stride s_tok
// floats, the heads of a token back to back), front to back. Prefetches never fault.
constexpr int kPrefetchPiece = 32;
inline void prefetch_span(const float* base, int64_t s_tok, int ta, int te) {
  if (ta >= te) return;
  const char* a = reinterpret_cast<const char*>(base + (int64_t)ta * s_tok);
  const char* e = reinterpret_cast<const char*>(base + (int64_t)te * s_tok);
  for (const char* x = a; x < e; x += 64) cpu::prefetch<3>(x);
}
inline bool rows_back_to_back(const cpu::KvSide& side, int heads, int dim) {
  return side.s_head == dim && side.s_tok == (int64_t)heads * dim;
}
template <class KF, class VF>
constexpr bool kTokenOrderFormats =
    std::is_same<KF, PlainFormat<float>>::value && std::is_same<VF, PlainFormat<float>>::value;

// A kv head's K and V packed once for all its query tiles (prefill_impl): block g (keys
// [g * kKeyBlock, (g + 1) * kKeyBlock)) at kt + (g - g0) * kKeyBlock * head_dim and
// vp + (g - g0) * kKeyBlock * packed_v_lanes(head_dim); keys outside the head's walk are zero.
struct PackedHead {
  float* kt = nullptr;  // nullptr: not packed
  float* vp = nullptr;
  int g0 = 0;
};
static_assert(kKeyBlock == cpu::kPackKeys, "a packed block is one key block");
template <class F>
struct TypeTag {
  using type = F;
};

template <class KF, class VF, typename T>
void run_items(const AttentionParams& p, const std::vector<Item>& items, int max_rows, int max_heads, float* part_o,
               float* part_lse, float* stage = nullptr, int64_t stage_ld = 0, const PackedHead* packs = nullptr) {
  const int dim = p.head_dim;
  const int group = p.num_q_heads / p.num_kv_heads;
  const bool capped = p.softcap > 0.f;
  // Without soft-cap the exp2-domain factor folds into q; with it, tanh needs the plain logit.
  const float qscale = capped ? p.scale : p.scale * kLog2e;
  const int64_t n_items = (int64_t)items.size();
  // Small problems run on the calling thread: waking a team costs more than they take, and on a
  // busy machine a sleeping worker can take a whole scheduler tick to start.
  int64_t work = 0, kv_bytes = 0;  // kv_bytes: K and V the call walks (every item's keys of its heads)
  for (const Item& w : items) {
    work += (int64_t)std::max(w.k1 - w.k0, 1) * w.nh * w.nq * group * dim;
    kv_bytes += (int64_t)std::max(w.k1 - w.k0, 0) * w.nh * dim * 2 * (int64_t)sizeof(float);
  }
  const bool parallel = n_items > 1 && work > kParallelWork;
  // Too many for the cache? Only fp32 decode calls (no cu_seqlens_q) can take the streaming walks,
  // so only they read the gate's environment variable.
  bool streams = false;
  if constexpr (kTokenOrderFormats<KF, VF>) streams = p.cu_seqlens_q == nullptr && kv_bytes >= token_order_min_bytes();

  cpu::parallel_items(
      n_items, parallel,
      [&] {
        Scratch sc;
        sc.reserve(max_rows, max_heads, dim);
        return sc;
      },
      [&](Scratch& sc, int64_t it) {
        const Item& w = items[it];
        const int head_rows = w.nq * group;  // rows of one kv head: position i, q head g -> i * group + g
        const int rows = w.nh * head_rows;
        const int nq_row = queries_of(p, w.b);
        const int t0 = first_query(p, w.b) + w.q0;
        // Load and pre-scale the query tile.
        for (int hh = 0; hh < w.nh; ++hh) {
          const int h = w.h0 + hh;
          const int len = kv_length(p, w.b, h);
          sc.head_lo[hh] = INT32_MAX;
          sc.head_hi[hh] = 0;
          for (int i = 0; i < w.nq; ++i) {
            int lo, hi;
            visible_range(p, len - nq_row + w.q0 + i, len, &lo, &hi);
            if (lo < hi) {
              sc.head_lo[hh] = std::min(sc.head_lo[hh], lo);
              sc.head_hi[hh] = std::max(sc.head_hi[hh], hi);
            }
            for (int g = 0; g < group; ++g) {
              const int r = hh * head_rows + i * group + g;
              const T* qr = static_cast<const T*>(p.q) + (int64_t)(t0 + i) * p.q_stride_tok +
                            (int64_t)(h * group + g) * p.q_stride_head;
              float* dst = &sc.q[(size_t)r * dim];
              for (int d = 0; d < dim; ++d) dst[d] = to_float(qr[d]) * qscale;
              sc.lo[r] = lo;
              sc.hi[r] = hi;
              sc.st[r] = SoftmaxState{};
            }
          }
          // Keys this head reads: what its queries see, within the item's range.
          sc.head_lo[hh] = std::max(sc.head_lo[hh], w.k0);
          sc.head_hi[hh] = std::min(sc.head_hi[hh], w.k1);
        }
        std::fill(sc.acc.begin(), sc.acc.begin() + (size_t)rows * dim, 0.f);

        const int row = cache_row(p, w.b);
        const cpu::KvSide kside = cpu::k_side(p.kv), vside = cpu::v_side(p.kv);
        // Prefill tiles (many rows per key block): the next block's K and V rows of the head are
        // prefetched into L2 while this block's products run (tens of microseconds), so packing the
        // next block does not wait on L3 / DRAM. Decode tiles do too little per block for that to
        // pay (measured: no gain). Until cpu::prefetch these L2 prefetches were compiled out (no
        // prefetcht1 in the library); kept, bench/run.py's CPU prefill rows measured 0.96-1.09x the
        // build without them (2 rounds each, quiet), so this is kept for what it costs: nothing.
        // This head's blocks packed once for all its tiles (prefill_impl), if they are: the walk then
        // follows the packing's grid of blocks, and reads no cache row.
        const PackedHead* pk = packs != nullptr && w.nh == 1 && head_rows >= cpu::kGemmMinRows
                                   ? &packs[(size_t)w.b * p.num_kv_heads + w.h0]
                                   : nullptr;
        if (pk != nullptr && pk->kt == nullptr) pk = nullptr;
        const bool prefetch_next = pk == nullptr && w.nh == 1 && head_rows >= 12;
        // The decode walks over a row stored as one [tokens, heads, dim] block (see kTokenOrderMaxGroup
        // and kTokenOrderMinBytes).
        bool block_row = false;
        if constexpr (kTokenOrderFormats<KF, VF>)
          block_row = w.nq == 1 && w.nh > 1 && !kv_paged(p.kv) && rows_back_to_back(kside, p.num_kv_heads, dim) &&
                      rows_back_to_back(vside, p.num_kv_heads, dim);
        // Below the gate, groups of 4+ take the pieces too: the AVX-512 copy where the CPU has it,
        // else the AVX2 one (kInCachePiecesMinGroup says why).
        const bool cache_pieces =
            block_row && !streams && group >= kInCachePiecesMinGroup && cpu::token_pieces(group, dim);
        const bool wide_pieces = cache_pieces && cpu::wide_token_pieces(group, dim);
        const bool stream_walk = block_row && streams;
        const bool token_order =
            cache_pieces || (stream_walk && (group <= kTokenOrderMaxGroup || cpu::token_pieces(group, dim)));
        const bool prefetched_heads = stream_walk && !token_order;
        const bool row_walk = token_order || prefetched_heads;  // else the head walk, block by block
        // fp32 rows of the item's first head in this cache row (those walks only: contiguous view).
        const float* k_row =
            row_walk ? static_cast<const float*>(kside.data) + (int64_t)row * kside.s_row + (int64_t)w.h0 * kside.s_head
                     : nullptr;
        const float* v_row =
            row_walk ? static_cast<const float*>(vside.data) + (int64_t)row * vside.s_row + (int64_t)w.h0 * vside.s_head
                     : nullptr;
        int reach_lo = INT32_MAX, reach_hi = 0;  // keys any head of the item reads (prefetched_heads)
        for (int hh = 0; prefetched_heads && hh < w.nh; ++hh)
          if (sc.head_lo[hh] < sc.head_hi[hh]) {
            reach_lo = std::min(reach_lo, sc.head_lo[hh]);
            reach_hi = std::max(reach_hi, sc.head_hi[hh]);
          }
        // The token order's prefetch target after a block's V: the next block's K, if any.
        auto next_block_k = [&](int jn) {
          return jn < w.k1
                     ? cpu::NextRows{k_row + (int64_t)jn * kside.s_tok, kside.s_tok, std::min(kKeyBlock, w.k1 - jn)}
                     : cpu::NextRows{};
        };
        // prefetched_heads: the head walk over the block in pieces of kPrefetchPiece keys, each
        // preceded by a prefetch of its K (or V) rows of every head, front to back.
        auto heads_prefetched = [&](const float* base, int64_t s_tok, int jb, int nk, auto&& per_head) {
          for (int ta = jb; ta < jb + nk; ta += kPrefetchPiece) {
            const int te = std::min(ta + kPrefetchPiece, jb + nk);
            prefetch_span(base, s_tok, std::max(ta, reach_lo), std::min(te, reach_hi));
            for (int hh = 0; hh < w.nh; ++hh) {
              const int ja = std::max(ta, sc.head_lo[hh]), je = std::min(te, sc.head_hi[hh]);
              if (ja < je) per_head(hh, ja, je);
            }
          }
        };
        for (int jb = pk != nullptr ? w.k0 / kKeyBlock * kKeyBlock : w.k0; jb < w.k1; jb += kKeyBlock) {
          const int nk = std::min(kKeyBlock, w.k1 - jb);
          if (prefetch_next) {
            const int na = std::max(jb + kKeyBlock, sc.head_lo[0]);
            const int ne = std::min({jb + 2 * kKeyBlock, w.k1, sc.head_hi[0]});
            if (na < ne) {
              cpu::for_each_run<KF>(
                  p.kv, kside, row, w.h0, na, ne, ne - na,
                  [&](const HeadRows<KF>& r, int j0, int n, int, int) { cpu::prefetch_rows<KF, 2>(r, j0, n, dim); });
              cpu::for_each_run<VF>(
                  p.kv, vside, row, w.h0, na, ne, ne - na,
                  [&](const HeadRows<VF>& r, int j0, int n, int, int) { cpu::prefetch_rows<VF, 2>(r, j0, n, dim); });
            }
          }
          if (token_order)
            cpu::qk_tokens(sc.q.data(), head_rows, w.nh, k_row, kside.s_tok, kside.s_head, jb, nk, sc.head_lo.data(),
                           sc.head_hi.data(), dim, sc.s.data(), kKeyBlock,
                           cpu::NextRows{v_row + (int64_t)jb * vside.s_tok, vside.s_tok, nk}, wide_pieces);
          if (prefetched_heads)
            heads_prefetched(k_row, kside.s_tok, jb, nk, [&](int hh, int ja, int je) {
              block_logits<KF>(p.kv, kside, row, w.h0 + hh, ja, je, je - ja, &sc.q[(size_t)hh * head_rows * dim],
                               head_rows, dim, sc.kbuf.data(), &sc.s[(size_t)hh * head_rows * kKeyBlock] + (ja - jb));
            });
          for (int hh = 0; hh < w.nh; ++hh) {
            // This head's part of the block; its rows' other columns stay masked (weight 0).
            const int ja = std::max(jb, sc.head_lo[hh]), je = std::min(jb + nk, sc.head_hi[hh]);
            float* s_head = &sc.s[(size_t)hh * head_rows * kKeyBlock];
            if (ja >= je) {
              std::fill(s_head, s_head + (size_t)head_rows * kKeyBlock, 0.f);
              continue;
            }
            const int h = w.h0 + hh;
            const int avail = sc.head_hi[hh] - ja;  // rows of this head's walk from ja on, for prefetching
            // Each row's columns [a, e) of the block.
            int* ca = &sc.ca[(size_t)hh * head_rows];
            int* ce = &sc.ce[(size_t)hh * head_rows];
            for (int r = 0; r < head_rows; ++r) {
              ca[r] = std::max(sc.lo[hh * head_rows + r], ja) - jb;
              ce[r] = std::min(sc.hi[hh * head_rows + r], je) - jb;
            }
            // Packed: the products run on whole 16-key panels, each six-row tile over the panels
            // its rows read; the softmax reads only each row's [a, e) and zeroes the rest.
            const float* vp = nullptr;
            if (pk != nullptr) {
              const int64_t blk = jb / kKeyBlock - pk->g0;
              vp = pk->vp + blk * kKeyBlock * cpu::packed_v_lanes(dim);
              cpu::qk_packed(&sc.q[(size_t)hh * head_rows * dim], head_rows, pk->kt + blk * kKeyBlock * dim, ca, ce,
                             dim, s_head, kKeyBlock);
            } else if (!row_walk) {
              block_logits<KF>(p.kv, kside, row, h, ja, je, avail, &sc.q[(size_t)hh * head_rows * dim], head_rows, dim,
                               sc.kbuf.data(), s_head + (ja - jb));
            }
            const bool keep_logits = stage != nullptr && w.nq == 1;  // decode scores: the exp2-domain logits
            if (capped || keep_logits)
              for (int r = hh * head_rows; r < (hh + 1) * head_rows; ++r) {
                float* s = &sc.s[(size_t)r * kKeyBlock];
                const int a = sc.ca[r], e = sc.ce[r];
                if (capped)
                  for (int j = a; j < e; ++j) s[j] = p.softcap * std::tanh(s[j] / p.softcap) * kLog2e;
                if (keep_logits) {
                  float* st = stage + ((int64_t)w.b * p.num_q_heads + (int64_t)w.h0 * group + r) * stage_ld + jb;
                  for (int j = a; j < e; ++j) st[j] = s[j];
                }
              }
            // Each row's block max, the rescale of its output and its weights, in one call per head.
            cpu::softmax_rows(s_head, kKeyBlock, nk, head_rows, ca, ce, &sc.st[(size_t)hh * head_rows],
                              &sc.acc[(size_t)hh * head_rows * dim], dim);
            if (pk != nullptr)
              cpu::pv_packed(s_head, kKeyBlock, head_rows, vp, ca, ce, dim, &sc.acc[(size_t)hh * head_rows * dim]);
            else if (!row_walk)
              block_values<VF>(p.kv, vside, row, h, ja, je, avail, s_head + (ja - jb), head_rows, dim, sc.vbuf.data(),
                               &sc.acc[(size_t)hh * head_rows * dim]);
          }
          if (token_order)
            cpu::pv_tokens(sc.s.data(), kKeyBlock, head_rows, w.nh, v_row, vside.s_tok, vside.s_head, jb, nk,
                           sc.head_lo.data(), sc.head_hi.data(), dim, sc.acc.data(), next_block_k(jb + nk),
                           wide_pieces);
          if (prefetched_heads)
            heads_prefetched(v_row, vside.s_tok, jb, nk, [&](int hh, int ja, int je) {
              block_values<VF>(p.kv, vside, row, w.h0 + hh, ja, je, je - ja,
                               &sc.s[(size_t)hh * head_rows * kKeyBlock] + (ja - jb), head_rows, dim, sc.vbuf.data(),
                               &sc.acc[(size_t)hh * head_rows * dim]);
            });
        }

        for (int r = 0; r < rows; ++r) {
          const float inv = sc.st[r].inv_sum();
          const float* ar = &sc.acc[(size_t)r * dim];
          const float lse = sc.st[r].lse();
          if (w.part >= 0) {
            float* o = part_o + ((size_t)w.part * max_rows + r) * dim;
            for (int d = 0; d < dim; ++d) o[d] = ar[d] * inv;
            part_lse[(size_t)w.part * max_rows + r] = lse;
          } else {
            const int hh = r / head_rows, i = (r % head_rows) / group, g = r % group;
            const int hq = (w.h0 + hh) * group + g;
            T* o = static_cast<T*>(p.out) + (int64_t)(t0 + i) * p.o_stride_tok + (int64_t)hq * p.o_stride_head;
            for (int d = 0; d < dim; ++d) o[d] = from_float<T>(ar[d] * inv);
            if (p.lse) p.lse[(int64_t)(t0 + i) * p.num_q_heads + hq] = lse;
          }
        }
      });
}

// Combines the split partials of decode rows: items [first, first + n) hold one row's splits, all
// heads (partial row r is q head r).
template <typename T>
void merge_splits(const AttentionParams& p, const std::vector<Item>& items,
                  const std::vector<std::pair<int, int>>& groups, int max_rows, const float* part_o,
                  const float* part_lse) {
  const int dim = p.head_dim;
  const int64_t ng = (int64_t)groups.size();
  cpu::parallel_items(
      ng, ng > 1 && ng * p.num_q_heads * dim > (1 << 14), [&] { return std::vector<float>(dim); },
      [&](std::vector<float>& o, int64_t gi) {
        const int first = groups[gi].first, n = groups[gi].second;
        const int b = items[first].b;
        for (int hq = 0; hq < p.num_q_heads; ++hq) {
          float lse = -INFINITY;
          std::fill(o.begin(), o.end(), 0.f);
          for (int s = 0; s < n; ++s) {
            const int slot = items[first + s].part;
            const float* po = part_o + ((size_t)slot * max_rows + hq) * dim;
            float wa, wb;
            const float merged = merge_weights(lse, part_lse[(size_t)slot * max_rows + hq], &wa, &wb);
            merge_vectors(wa, o.data(), wb, po, o.data(), dim);
            lse = merged;
          }
          T* out = static_cast<T*>(p.out) + (int64_t)b * p.o_stride_tok + (int64_t)hq * p.o_stride_head;
          for (int d = 0; d < dim; ++d) out[d] = from_float<T>(o[d]);
          if (p.lse) p.lse[(int64_t)b * p.num_q_heads + hq] = lse;
        }
      });
}

// Per-token scores (params.h scores / score_mode), after the attention pass. The probability
// p = 2^(x - lse2) needs the query's final LSE, which exists only once every key range of the
// query is merged (a decode row's splits, on other threads), so it cannot be taken from the
// engine's blocks while they run. This second pass recomputes x = q.k for the scoring queries
// only (the last score_last_queries of each row; one per decode row), with the very same
// pre-scaled q tile, row reader and qk_block as the attention pass, so its logits are the ones
// the attention used (exact, no [q, k] buffer); the cost is one more read of K, and the QK
// products of the scoring queries. Work items are (batch row, kv head, key chunk): each owns a
// disjoint piece scores[row, h, c0:c1) (row ids are distinct, validate()), so no write races,
// and every key in [0, L) belongs to exactly one chunk ("replace" writes the chunk's sums, zero
// for keys no scoring query sees). Keys at or past L are never written.
constexpr int kScoreChunk = 4 * kKeyBlock;

struct ScoreItem {
  int b, h, c0, c1;
};

template <class KF, typename T>
void emit_scores(const AttentionParams& p, const float* lse) {
  const int dim = p.head_dim;
  const int group = p.num_q_heads / p.num_kv_heads;
  const bool capped = p.softcap > 0.f;
  const float qscale = capped ? p.scale : p.scale * kLog2e;  // as run_items
  const int block_q = std::max(1, kQueryRows / group);
  std::vector<ScoreItem> items;
  int64_t work = 0;
  for (int b = 0; b < p.batch; ++b) {
    const int n = queries_of(p, b);
    const int scoring = n - first_scoring_query(p, n);
    for (int h = 0; h < p.num_kv_heads; ++h) {
      const int len = kv_length(p, b, h);
      for (int c0 = 0; c0 < len; c0 += kScoreChunk)
        items.push_back(ScoreItem{b, h, c0, std::min(len, c0 + kScoreChunk)});
      work += (int64_t)len * std::max(scoring, 1) * group * dim;
    }
  }
  const int64_t n_items = (int64_t)items.size();
  const bool parallel = n_items > 1 && work > kParallelWork;
#pragma omp parallel if (parallel)
  {
    const int max_rows = block_q * group;
    std::vector<float> q((size_t)max_rows * dim), s((size_t)max_rows * kKeyBlock), kbuf((size_t)kKeyBlock * dim);
    std::vector<float> lse2(max_rows), col(kScoreChunk);
    std::vector<int> lo(max_rows), hi(max_rows);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const ScoreItem& w = items[it];
      const int n = queries_of(p, w.b), len = kv_length(p, w.b, w.h), row = cache_row(p, w.b);
      const int t0 = first_query(p, w.b);
      std::fill(col.begin(), col.end(), 0.f);
      // Scoring queries i in [i0, n) whose keys reach into the chunk: position len - n + i >= c0
      // (causal) and, with a window, pos - window_left <= c1 - 1.
      int i0 = std::max(first_scoring_query(p, n), w.c0 - len + n);
      int i1 = n;
      if (p.window_left >= 0) i1 = (int)std::min<int64_t>(n, (int64_t)w.c1 - 1 + p.window_left - len + n + 1);
      const HeadRows<KF> kh =
          head_rows_of<KF>(p.kv.k, p.kv.k_stride_row, p.kv.k_stride_tok, p.kv.k_stride_head, p.kv.k_scale,
                           p.kv.ks_stride_row, p.kv.ks_stride_tok, p.kv.ks_stride_head, row, w.h);
      for (int qa = i0; qa < i1; qa += block_q) {
        const int nq = std::min(block_q, i1 - qa);
        const int rows = nq * group;
        int klo = INT32_MAX, khi = 0;  // keys of the chunk any row of the tile sees
        for (int i = 0; i < nq; ++i) {
          int l, e;
          visible_range(p, len - n + qa + i, len, &l, &e);
          l = std::max(l, w.c0);
          e = std::min(e, w.c1);
          for (int g = 0; g < group; ++g) {
            const int r = i * group + g;
            const int hq = w.h * group + g;
            const float lq = lse[(int64_t)(t0 + qa + i) * p.num_q_heads + hq];
            lse2[r] = lq * kLog2e;
            const bool empty = !(lq > -INFINITY) || l >= e;
            lo[r] = empty ? 0 : l;
            hi[r] = empty ? 0 : e;
            if (!empty) {
              klo = std::min(klo, l);
              khi = std::max(khi, e);
            }
            const T* qr =
                static_cast<const T*>(p.q) + (int64_t)(t0 + qa + i) * p.q_stride_tok + (int64_t)hq * p.q_stride_head;
            float* dst = &q[(size_t)r * dim];
            for (int d = 0; d < dim; ++d) dst[d] = to_float(qr[d]) * qscale;
          }
        }
        for (int ja = klo; ja < khi; ja += kKeyBlock) {
          const int nk = std::min(kKeyBlock, khi - ja);
          int64_t ks;
          const float* kp = RowReader<KF>::rows(kh, ja, nk, khi - ja, dim, kbuf.data(), &ks);
          cpu::qk_block(q.data(), rows, kp, ks, nk, RowReader<KF>::kDirect ? khi - ja : nk, dim, s.data(), kKeyBlock);
          for (int r = 0; r < rows; ++r) {
            float* sr = &s[(size_t)r * kKeyBlock];
            const int a = std::max(lo[r], ja) - ja, e = std::min(hi[r], ja + nk) - ja;
            if (a >= e) continue;
            if (capped)
              for (int j = a; j < e; ++j) sr[j] = p.softcap * std::tanh(sr[j] / p.softcap) * kLog2e;
            cpu::exp2_weights(sr, e, a, e, lse2[r]);  // sr[j] = 2^(x - lse2) on [a, e)
            float* c = &col[(size_t)(ja - w.c0)];
            for (int j = a; j < e; ++j) c[j] += sr[j];
          }
        }
      }
      float* dst = score_row(p, row, w.h);
      if (p.score_mode == kScoreReplace)
        for (int j = w.c0; j < w.c1; ++j) dst[j] = col[(size_t)(j - w.c0)];
      else
        for (int j = w.c0; j < w.c1; ++j) dst[j] += col[(size_t)(j - w.c0)];
    }
  }
}

// Decode scores from the logits the attention pass kept (stage [batch, q_heads, ld], exp2 domain):
// p = 2^(x - lse2) summed over the group, for the keys the row's query sees. Work items are
// (batch row, kv head, key chunk), each owning scores[row, h, c0:c1): no write races.
inline void emit_decode_scores(const AttentionParams& p, const float* lse, float* stage, int64_t ld) {
  const int group = p.num_q_heads / p.num_kv_heads;
  std::vector<ScoreItem> items;
  int64_t work = 0;
  for (int b = 0; b < p.batch; ++b)
    for (int h = 0; h < p.num_kv_heads; ++h) {
      const int len = kv_length(p, b, h);
      for (int c0 = 0; c0 < len; c0 += kScoreChunk)
        items.push_back(ScoreItem{b, h, c0, std::min(len, c0 + kScoreChunk)});
      work += (int64_t)len * group;
    }
  const int64_t n_items = (int64_t)items.size();
#pragma omp parallel for schedule(dynamic, 1) if (n_items > 1 && work > (1 << 16))
  for (int64_t it = 0; it < n_items; ++it) {
    const ScoreItem& w = items[it];
    const int len = kv_length(p, w.b, w.h), row = cache_row(p, w.b);
    int lo, hi;
    visible_range(p, len - 1, len, &lo, &hi);
    const int a = std::max(lo, w.c0), e = std::min(hi, w.c1);
    float* dst = score_row(p, row, w.h);
    float col[kScoreChunk];
    std::fill(col, col + (w.c1 - w.c0), 0.f);
    for (int g = 0; g < group; ++g) {
      const int hq = w.h * group + g;
      const float lq = lse[(int64_t)w.b * p.num_q_heads + hq];
      if (!(lq > -INFINITY)) continue;
      if (a >= e) continue;
      // The vectorized exp2 of the attention pass, in place on the kept logits (used once).
      float* x = stage + ((int64_t)w.b * p.num_q_heads + hq) * ld + a;
      cpu::exp2_weights(x, e - a, 0, e - a, lq * kLog2e);
      for (int j = a; j < e; ++j) col[j - w.c0] += x[j - a];
    }
    if (p.score_mode == kScoreReplace)
      for (int j = w.c0; j < w.c1; ++j) dst[j] = col[j - w.c0];
    else
      for (int j = w.c0; j < w.c1; ++j) dst[j] += col[j - w.c0];
  }
}

template <class KF, class VF, typename T>
void decode_impl(const AttentionParams& p, float* stage = nullptr, int64_t stage_ld = 0) {
  const int rows = p.num_q_heads;  // one item covers every head of its batch row
  const int threads = cpu::max_threads();
  // Enough items to keep every thread busy even when a few rows are much longer than the rest.
  const int64_t want_items = 4LL * threads;
  std::vector<Item> items;
  std::vector<std::pair<int, int>> split_groups;
  int parts = 0;
  items.reserve(p.batch);
  // Keys any head of a row sees (heads differ only with per-head lengths), and the call's work as
  // run_items counts it.
  std::vector<std::pair<int, int>> seen((size_t)p.batch);
  int64_t work = 0;
  for (int b = 0; b < p.batch; ++b) {
    int lo = INT32_MAX, hi = 0;
    for (int h = 0; h < p.num_kv_heads; ++h) {
      const int len = kv_length(p, b, h);
      int l, e;
      visible_range(p, len - 1, len, &l, &e);
      if (l < e) {
        lo = std::min(lo, l);
        hi = std::max(hi, e);
      }
    }
    if (lo >= hi) lo = hi = 0;
    seen[(size_t)b] = {lo, hi};
    work += (int64_t)std::max(hi - lo, 1) * p.num_q_heads * p.head_dim;
  }
  const bool parallel = threads > 1 && work > kParallelWork;
  for (int b = 0; b < p.batch; ++b) {
    const int lo = seen[(size_t)b].first, hi = seen[(size_t)b].second;
    const int vis = hi - lo;
    int splits = 1;
    if (p.batch < want_items && vis > kMinSplitKeys) {
      const int64_t by_threads = (want_items + p.batch - 1) / p.batch;
      const int64_t by_length = (vis + kMinSplitKeys - 1) / kMinSplitKeys;
      splits = (int)std::max<int64_t>(1, std::min(by_threads, by_length));
    }
    if (splits == 1) {
      // A row too short to split by keys, on a call with few rows: its kv heads in chunks instead
      // (each writes its own heads, nothing to merge), so a single 512-key row still feeds every
      // thread. Rows of a large batch stay whole (their heads side by side are one stretch of memory).
      int chunks = 1;
      if (parallel && p.batch < want_items && vis > 0)
        chunks = (int)std::min<int64_t>(p.num_kv_heads, (want_items + p.batch - 1) / p.batch);
      const int per = (p.num_kv_heads + chunks - 1) / chunks;
      for (int h0 = 0; h0 < p.num_kv_heads; h0 += per)
        items.push_back(Item{b, h0, std::min(per, p.num_kv_heads - h0), 0, 1, lo, hi, -1});
      continue;
    }
    // Split boundaries on key-block multiples so every range but the last walks whole blocks.
    const int blocks = (vis + kKeyBlock - 1) / kKeyBlock;
    split_groups.emplace_back((int)items.size(), splits);
    for (int s = 0; s < splits; ++s) {
      const int k0 = lo + (int)((int64_t)blocks * s / splits) * kKeyBlock;
      const int k1 = std::min(hi, lo + (int)((int64_t)blocks * (s + 1) / splits) * kKeyBlock);
      items.push_back(Item{b, 0, p.num_kv_heads, 0, 1, k0, k1, parts++});
    }
  }
  std::vector<float> part_o((size_t)parts * rows * p.head_dim), part_lse((size_t)parts * rows);
  run_items<KF, VF, T>(p, items, rows, p.num_kv_heads, part_o.data(), part_lse.data(), stage, stage_ld);
  if (!split_groups.empty()) merge_splits<T>(p, items, split_groups, rows, part_o.data(), part_lse.data());
}

// Prefill packs the K and V of a kv head once (fp32, in GEMM panels) when several query tiles walk
// it: each tile used to pack (and convert, for 16-bit and quantized formats) its own copy of every
// key block, reading the cache's rows, which sit a token apart (kilobytes), once per tile. Measured
// on the 2-core Zen 3 VM, one thread, a 128-row tile over 2K keys of 8 heads (token stride 4 KB), the
// products alone: 64-74 GFLOP/s packing per tile, 79-89 on blocks packed once (8 of 10 rounds).
// Whole prefill calls, one thread, thread CPU time, the two builds alternated: Llama-3-8B heads
// q=2048 0.85x the time, q=512 0.86-0.92x, 256 queries on a 2K prefix 0.91-0.98x (bench/RESULTS.md).
// The packing is bounded (kPackMaxBytes per call; heads past it keep the per-tile packing) and
// happens only where it runs, on the AVX2 copy (cpu::packed_prefill). int4_ch keys keep their own
// product, which folds the group scales into q.
constexpr int64_t kPackMaxBytes = int64_t(64) << 20;

template <class KF, class VF>
std::vector<PackedHead> pack_heads(const AttentionParams& p, const std::vector<Item>& items, std::vector<float>* mem) {
  std::vector<PackedHead> packs;
  if constexpr (std::is_same<KF, Int4ChannelFormat>::value) {
    return packs;
  } else {
    if (!cpu::packed_prefill() || items.empty()) return packs;
    const int dim = p.head_dim, group = p.num_q_heads / p.num_kv_heads;
    const int nkv = p.num_kv_heads;
    const size_t pairs = (size_t)p.batch * nkv;
    // Per (row, kv head): the GEMM tiles walking it and the union of their key ranges.
    std::vector<int> tiles(pairs, 0), lo(pairs, INT32_MAX), hi(pairs, 0);
    for (const Item& w : items) {
      if (w.nh != 1 || w.nq * group < cpu::kGemmMinRows || w.k0 >= w.k1) continue;
      const size_t i = (size_t)w.b * nkv + w.h0;
      ++tiles[i];
      lo[i] = std::min(lo[i], w.k0);
      hi[i] = std::max(hi[i], w.k1);
    }
    const int64_t block_floats = (int64_t)kKeyBlock * (dim + cpu::packed_v_lanes(dim));
    std::vector<int64_t> offset(pairs, -1);
    std::vector<std::pair<int, int>> tasks;  // (pair, block)
    int64_t total = 0;
    for (size_t i = 0; i < pairs; ++i) {
      if (tiles[i] < 2) continue;  // one tile: nothing to share
      const int g0 = lo[i] / kKeyBlock, g1 = (hi[i] + kKeyBlock - 1) / kKeyBlock;
      const int64_t floats = (int64_t)(g1 - g0) * block_floats;
      if ((total + floats) * (int64_t)sizeof(float) > kPackMaxBytes) continue;
      offset[i] = total;
      total += floats;
      for (int g = g0; g < g1; ++g) tasks.emplace_back((int)i, g);
    }
    if (tasks.empty()) return packs;
    try {
      mem->resize((size_t)total);
      packs.resize(pairs);
    } catch (const std::bad_alloc&) {  // the packing is an optimisation: go on without it
      mem->clear();
      packs.clear();
      return packs;
    }
    for (size_t i = 0; i < pairs; ++i) {
      if (offset[i] < 0) continue;
      const int g0 = lo[i] / kKeyBlock;
      const int64_t nb = (int64_t)((hi[i] + kKeyBlock - 1) / kKeyBlock - g0);
      packs[i].kt = mem->data() + offset[i];
      packs[i].vp = mem->data() + offset[i] + nb * kKeyBlock * dim;
      packs[i].g0 = g0;
    }
    const cpu::KvSide kside = cpu::k_side(p.kv), vside = cpu::v_side(p.kv);
    struct Stage {
      std::vector<float> k, v, conv;  // a block's fp32 rows (zero outside the walk), a reader's buffer
    };
    cpu::parallel_items((int64_t)tasks.size(), tasks.size() > 1,
                        [&] {
                          Stage st;
                          st.k.resize((size_t)kKeyBlock * dim);
                          st.v.resize((size_t)kKeyBlock * dim);
                          st.conv.resize((size_t)kKeyBlock * dim);
                          return st;
                        },
                        [&](Stage& st, int64_t t) {
                          const int i = tasks[t].first, g = tasks[t].second;
                          const int b = i / nkv, h = i % nkv, row = cache_row(p, b);
                          const int jb = g * kKeyBlock, ja = std::max(jb, lo[i]), je = std::min(jb + kKeyBlock, hi[i]);
                          const PackedHead& ph = packs[i];
                          auto gather = [&](auto fmt, const cpu::KvSide& side, std::vector<float>& dst) {
                            using F = typename decltype(fmt)::type;
                            std::fill(dst.begin(), dst.end(), 0.f);
                            cpu::for_each_run<F>(p.kv, side, row, h, ja, je, je - ja,
                                                 [&](const HeadRows<F>& r, int j0, int n, int av, int off) {
                                                   int64_t rs;
                                                   const float* src =
                                                       RowReader<F>::rows(r, j0, n, av, dim, st.conv.data(), &rs);
                                                   float* out = dst.data() + (size_t)(ja - jb + off) * dim;
                                                   for (int j = 0; j < n; ++j)
                                                     std::copy(src + j * rs, src + j * rs + dim, out + (size_t)j * dim);
                                                 });
                          };
                          gather(TypeTag<KF>{}, kside, st.k);
                          gather(TypeTag<VF>{}, vside, st.v);
                          const int64_t blk = g - ph.g0;
                          cpu::pack_k_panels(st.k.data(), dim, dim, ph.kt + blk * kKeyBlock * dim);
                          cpu::pack_v_panels(st.v.data(), dim, dim, ph.vp + blk * kKeyBlock * cpu::packed_v_lanes(dim));
                        });
    return packs;
  }
}

template <class KF, class VF, typename T>
void prefill_impl(const AttentionParams& p) {
  const int group = p.num_q_heads / p.num_kv_heads;
  const int block_short = std::max(1, kQueryRows / group), block_long = std::max(1, kQueryRowsLong / group);
  int max_block = 1;
  std::vector<Item> items;
  for (int b = 0; b < p.batch; ++b) {
    const int n = queries_of(p, b);
    for (int h = 0; h < p.num_kv_heads; ++h) {
      const int len = kv_length(p, b, h);
      const int block_q = len - n >= n ? block_long : block_short;
      max_block = std::max(max_block, std::min(block_q, n));
      for (int q0 = 0; q0 < n; q0 += block_q) {
        const int nq = std::min(block_q, n - q0);
        // Keys any query of the tile sees: from the first one's left edge to the last one's position.
        int lo_first, hi_first, lo_last, hi_last;
        visible_range(p, len - n + q0, len, &lo_first, &hi_first);
        visible_range(p, len - n + q0 + nq - 1, len, &lo_last, &hi_last);
        items.push_back(Item{b, h, 1, q0, nq, lo_first, std::max(hi_last, lo_first), -1});
      }
    }
  }
  // Longest key ranges first so the dynamic schedule ends with short items.
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.k1 - x.k0 > y.k1 - y.k0; });
  std::vector<float> pack_mem;
  const std::vector<PackedHead> packs = pack_heads<KF, VF>(p, items, &pack_mem);
  run_items<KF, VF, T>(p, items, max_block * group, 1, nullptr, nullptr, nullptr, 0,
                       packs.empty() ? nullptr : packs.data());
}

template <bool kDecode>
void attention_cpu(const AttentionParams& p_in) {
  validate(p_in, kDecode);
  if (p_in.batch == 0) return;
  const bool scores = scores_on(p_in);
  if (p_in.total_q == 0 && !scores) return;
  // Scores need every query's final LSE: into the caller's lse, else a scratch one.
  AttentionParams p = p_in;
  std::vector<float> lse_scratch;
  if (scores && p.lse == nullptr) {
    lse_scratch.resize((size_t)p.total_q * p.num_q_heads);
    p.lse = lse_scratch.data();
  }
  // Plain caches store the q dtype on both sides; quantized ones any pair of quantized formats.
  cpu::dispatch_dtype(p.dtype, "attention q", [&](auto t) {
    using T = decltype(t);
    if (p.total_q > 0) cpu::advise_huge_pages(p.out, (size_t)p.total_q * (size_t)p.o_stride_tok * sizeof(T));
    dispatch_kv_pair<T>(p.kv.k_format, p.kv.v_format, "attention", [&](auto kf, auto vf) {
      if (kDecode && scores && p.total_q > 0) {
        // Decode scores, fused: the attention pass keeps each visible key's logit, and the
        // probabilities are formed from them once every split is merged (no second read of K).
        int64_t ld = 1;
        for (int b = 0; b < p.batch; ++b)
          for (int h = 0; h < p.num_kv_heads; ++h) ld = std::max<int64_t>(ld, kv_length(p, b, h));
        std::vector<float> stage((size_t)p.batch * p.num_q_heads * ld);
        decode_impl<decltype(kf), decltype(vf), T>(p, stage.data(), ld);
        emit_decode_scores(p, p.lse, stage.data(), ld);
        return;
      }
      if (p.total_q > 0) {
        if (kDecode)
          decode_impl<decltype(kf), decltype(vf), T>(p);
        else
          prefill_impl<decltype(kf), decltype(vf), T>(p);
      }
      if (scores) emit_scores<decltype(kf), T>(p, p.lse);
    });
  });
}

}  // namespace

void decode_attention_cpu(const AttentionParams& p) { attention_cpu<true>(p); }
void prefill_attention_cpu(const AttentionParams& p) { attention_cpu<false>(p); }

}  // namespace vattn
