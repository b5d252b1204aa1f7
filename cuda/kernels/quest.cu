// Quest block-sparse decode on CUDA (params.h BlockMinmaxParams, QuestSelectParams,
// SparseDecodeParams; python/vattn/reference.py block_minmax, quest_select and
// sparse_decode_attention are the definitions).
//   block_minmax            grid (entry * kv head, y): threads over (block, channel) of the blocks
//                           to recompute; each reads the block's tokens through the format's scalar
//                           dequant (dequant_elem<F>: the CPU's values; int4_ch keys with the words of
//                           each token's group).
//   quest_select            one CTA per (entry, kv head): a warp per block computes the upper-bound
//                           score (lanes over head_dim, the GQA group's q in shared memory) into the
//                           workspace as an order-preserving uint32 key; a 4-pass 8-bit radix select
//                           finds the (c-1)-th largest key among the blocks before the last; a
//                           block-wide scan writes the chosen blocks in ascending order (ties at the
//                           threshold: lower index first), then the last block.
//   sparse_decode_attention impl 1 (plain): one CTA per (entry, q head), warps over the selected
//                           tokens, every element through the scalar dequant: obviously right.
//                           impl 0 (split, 16-bit q): CTA = (split, kv head x chunk of up to 4 q heads
//                           of its GQA group, entry); each K/V element a lane loads serves all the
//                           chunk's q heads; the selected blocks are split over CTAs from the host's
//                           max_sel (no device lengths needed), fp32 partials + LSE in the workspace,
//                           merged by quest_split_merge_kernel (softmax_state.h's lse_weight /
//                           merge_output / merged_lse, as decode_split_merge_kernel).
// Nothing here reads outside the tensors whatever the index tensors hold: rows outside the cache,
// lengths past max_seq, blocks past max_blocks, block ids outside the row are clamped or skipped
// (the CPU ops reject them; the Python wrappers can check them with one host sync). No launcher
// allocates or synchronizes: the workspaces come sized by *_workspace_bytes().
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "vattn/cuda/check.cuh"
#include "vattn/cuda/decode_args.cuh"
#include "vattn/cuda/split_merge.cuh"
#include "vattn/cuda/decode_plain_kernel.cuh"
#include "vattn/cuda/kv_device_format.cuh"
#include "vattn/cuda/kv_paged.cuh"
#include "vattn/dtypes.h"
#include "vattn/key_range.h"
#include "vattn/kv_format.h"
#include "vattn/ops.h"
#include "vattn/softmax_state.h"

namespace vattn {
namespace cuda {
namespace {

constexpr int kMinmaxThreads = 128;
constexpr int kSelectThreads = 256;
constexpr int kSelectWarps = kSelectThreads / 32;
constexpr int kSelectMaxQ = 8192;  // group * head_dim floats of q in shared memory
constexpr int kSparseThreads = 128;
constexpr int kSparseWarps = kSparseThreads / 32;
constexpr int kSparseMaxHeadDim = 256;
constexpr int kSparsePerLane = kSparseMaxHeadDim / 32;
constexpr int kSparseGroupBlock = 4;  // q heads per CTA of the split kernel

__device__ __forceinline__ int entry_length(const int32_t* lengths, const int32_t* head_lengths, int64_t i, int h,
                                            int heads) {
  return head_lengths != nullptr ? head_lengths[i * heads + h] : lengths[i];
}

__device__ __forceinline__ int64_t ceil_div_dev(int64_t a, int64_t b) { return (a + b - 1) / b; }

// min / max that propagate NaN (a NaN on either side gives NaN) as the reference's amin / amax and
// torch.maximum do; fminf / fmaxf would drop it. With acc a running value: a NaN x replaces it and a
// NaN acc stays (both compares false).
__device__ __forceinline__ float nan_min(float acc, float x) { return (x < acc || x != x) ? x : acc; }
__device__ __forceinline__ float nan_max(float acc, float x) { return (x > acc || x != x) ? x : acc; }

// ----------------------------------------------------------------------------- block_minmax

template <typename KF>
__global__ void __launch_bounds__(kMinmaxThreads) block_minmax_kernel(const BlockMinmaxParams p) {
  using KS = typename KF::storage_t;
  const int heads = p.num_kv_heads;
  const int64_t ih = blockIdx.x;
  const int64_t i = ih / heads;
  const int h = int(ih - i * heads);
  const KVCacheView& c = p.cache;
  const int32_t row = p.row_ids[i];
  if (row < 0 || row >= c.num_rows || row >= p.meta.num_rows) return;
  int64_t len = entry_length(p.lengths, p.head_lengths, i, h, heads);
  len = len < 0 ? 0 : (len > c.max_seq ? c.max_seq : len);
  int64_t nb = ceil_div_dev(len, p.block);
  if (nb > p.meta.max_blocks) nb = p.meta.max_blocks;
  const int64_t first = p.first_block[i] > 0 ? p.first_block[i] : 0;
  if (first >= nb) return;
  const int dim = p.head_dim;
  const KS* base = static_cast<const KS*>(c.k) + int64_t(row) * c.k_stride_row + int64_t(h) * c.k_stride_head;
  const int64_t work = (nb - first) * dim;
  const int64_t stride = int64_t(gridDim.y) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; idx < work; idx += stride) {
    const int64_t blk = first + idx / dim;
    const int d = int(idx % dim);
    const int64_t t0 = blk * p.block;
    const int64_t t1 = t0 + p.block < len ? t0 + p.block : len;
    float mn = INFINITY, mx = -INFINITY;
    for (int64_t t = t0; t < t1; ++t) {
      const float* w =
          plain_scale_words<KF>(c, c.k_scale, row, t, h, c.ks_stride_row, c.ks_stride_tok, c.ks_stride_head, dim);
      const float x = dequant_elem<KF>(base + t * c.k_stride_tok, w, c.ks_stride_tok, d, dim);
      mn = nan_min(mn, x);
      mx = nan_max(mx, x);
    }
    float* m = p.meta.data + int64_t(row) * p.meta.stride_row + blk * p.meta.stride_block +
               int64_t(h) * p.meta.stride_head + d;
    m[0] = mn;
    m[p.meta.stride_side] = mx;
  }
}

// ----------------------------------------------------------------------------- quest_select

// Order-preserving key of a score: larger score, larger key; -0 ranks as +0 and NaN below every
// number, -inf included, as in the reference (its nan_to_num(nan=-inf) also turns a true -inf into
// the lowest finite value): key 0, which no number has.
__device__ __forceinline__ uint32_t score_key(float s) {
  uint32_t u = __float_as_uint(s);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;  // NaN: last
  if ((u << 1) == 0u) u = 0u;                      // -0 -> +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix count of flag over the CTA's threads (in thread order) and the total.
__device__ __forceinline__ int block_exclusive_count(bool flag, int* warp_sums, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned bal = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warp_sums[warp] = __popc(bal);
  __syncthreads();
  int before = 0, all = 0;
#pragma unroll
  for (int w = 0; w < kSelectWarps; ++w) {
    const int x = warp_sums[w];
    before += w < warp ? x : 0;
    all += x;
  }
  __syncthreads();  // warp_sums is reused by the next call
  *total = all;
  return before + __popc(bal & ((1u << lane) - 1u));
}

template <typename Q>
__global__ void __launch_bounds__(kSelectThreads) quest_select_kernel(const QuestSelectParams p) {
  __shared__ float q_s[kSelectMaxQ];
  __shared__ unsigned hist[256];
  __shared__ int warp_sums[kSelectWarps];
  __shared__ uint32_t sh_prefix;
  __shared__ int sh_remaining;
  const int heads = p.num_kv_heads;
  const int64_t ih = blockIdx.x;
  const int64_t i = ih / heads;
  const int h = int(ih - i * heads);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int group = p.num_q_heads / heads, dim = p.head_dim;

  const int32_t row = p.row_ids[i];
  const bool row_ok = row >= 0 && row < p.meta.num_rows;
  int64_t len = entry_length(p.lengths, p.head_lengths, i, h, heads);
  len = len < 0 ? 0 : len;
  int64_t nb = row_ok ? ceil_div_dev(len, p.block) : 0;
  if (nb > p.meta.max_blocks) nb = p.meta.max_blocks;
  int64_t cnt = ceil_div_dev(p.token_budget, p.block);
  cnt = cnt < nb ? cnt : nb;
  cnt = cnt < p.max_sel ? cnt : p.max_sel;
  int32_t* ids = p.block_ids + ih * p.max_sel;
  // Every block, or none (the budget or max_sel leaves no room: the last block, always taken
  // below, would go to ids[-1]).
  if (cnt == nb || cnt == 0) {
    for (int s = tid; s < p.max_sel; s += kSelectThreads) ids[s] = s < cnt ? s : -1;
    if (tid == 0) p.block_counts[ih] = int32_t(cnt);
    return;
  }
  for (int s = tid; s < p.max_sel; s += kSelectThreads) ids[s] = -1;
  if (tid == 0) p.block_counts[ih] = int32_t(cnt);

  for (int x = tid; x < group * dim; x += kSelectThreads) {
    const int g = x / dim, d = x - g * dim;
    q_s[x] = to_float(static_cast<const Q*>(p.q)[i * p.q_stride_tok + int64_t(h * group + g) * p.q_stride_head + d]);
  }
  __syncthreads();

  // Scores of blocks 0 .. nb - 2 as keys.
  const int64_t m = nb - 1;
  uint32_t* keys = static_cast<uint32_t*>(p.workspace) + ih * p.meta.max_blocks;
  for (int64_t b = warp; b < m; b += kSelectWarps) {
    const float* mn =
        p.meta.data + int64_t(row) * p.meta.stride_row + b * p.meta.stride_block + int64_t(h) * p.meta.stride_head;
    const float* mx = mn + p.meta.stride_side;
    float s = 0.f;
    for (int d = lane; d < dim; d += 32) {
      const float lo = mn[d], hi = mx[d];
      for (int g = 0; g < group; ++g) {
        const float x = q_s[g * dim + d];
        s += nan_max(x * lo, x * hi);  // max, NaN if either side is
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) keys[b] = score_key(s);
  }
  __syncthreads();

  // Radix select: the key T of the (cnt - 1)-th largest, and how many keys == T to take.
  const int take = int(cnt - 1);
  if (take > 0) {
    uint32_t prefix = 0u, mask = 0u;
    int remaining = take;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int x = tid; x < 256; x += kSelectThreads) hist[x] = 0u;
      __syncthreads();
      for (int64_t b = tid; b < m; b += kSelectThreads) {
        const uint32_t k = keys[b];
        if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        int cum = 0, digit = 0;
        for (digit = 255; digit > 0; --digit) {
          if (cum + int(hist[digit]) >= remaining) break;
          cum += int(hist[digit]);
        }
        sh_prefix = prefix | (uint32_t(digit) << shift);
        sh_remaining = remaining - cum;
      }
      __syncthreads();
      prefix = sh_prefix;
      remaining = sh_remaining;
      mask |= 255u << shift;
      __syncthreads();
    }
    // Collect in index order: keys above T, then the first `remaining` keys equal to T.
    int ties_before = 0, out_before = 0;
    for (int64_t base = 0; base < m; base += kSelectThreads) {
      const int64_t b = base + tid;
      const uint32_t k = b < m ? keys[b] : 0u;
      const bool gt = b < m && k > prefix, eq = b < m && k == prefix;
      int ties = 0, outs = 0;
      const int tie_rank = ties_before + block_exclusive_count(eq, warp_sums, &ties);
      const bool sel = gt || (eq && tie_rank < remaining);
      const int pos = out_before + block_exclusive_count(sel, warp_sums, &outs);
      if (sel && pos < take) ids[pos] = int32_t(b);
      ties_before += ties;
      out_before += outs;
    }
  }
  if (tid == 0) ids[take] = int32_t(nb - 1);
}

// ----------------------------------------------------------------------------- sparse decode

// What one (entry, kv head) attends over: its cache row, readable length and the clamped count.
struct SparseRow {
  int64_t row;
  int64_t readable;
  int count;
  const int32_t* ids;
};

__device__ __forceinline__ SparseRow sparse_row(const SparseDecodeParams& sp, int b, int kvh) {
  const RowKeys rk = row_keys(sp.attn, b, kvh);
  SparseRow r;
  r.row = rk.row;
  r.readable = rk.readable;
  const int64_t ih = int64_t(b) * sp.attn.num_kv_heads + kvh;
  int c = sp.block_counts[ih];
  c = c < 0 ? 0 : (c > sp.max_sel ? sp.max_sel : c);
  r.count = c;
  r.ids = sp.block_ids + ih * sp.max_sel;
  return r;
}

// Token of slot t (block slot t / B, offset t % B), or -1 when it is outside the row.
__device__ __forceinline__ int64_t slot_token(const SparseRow& r, int64_t t, int block) {
  const int64_t s = t / block;
  const int32_t blk = r.ids[s];
  if (blk < 0) return -1;
  const int64_t j = int64_t(blk) * block + (t - s * block);
  return j < r.readable ? j : -1;
}

template <typename Q, typename KF, typename VF>
__global__ void __launch_bounds__(kSparseThreads)
    sparse_decode_plain_kernel(const SparseDecodeParams sp, const DecodePlanArgs a) {
  using KS = typename KF::storage_t;
  using VS = typename VF::storage_t;
  const AttentionParams& p = sp.attn;
  __shared__ float q_s[kSparseMaxHeadDim];
  __shared__ float red_m[kSparseWarps], red_d[kSparseWarps];
  __shared__ float red_o[kSparseWarps * kSparseMaxHeadDim];
  const int h = blockIdx.x, b = blockIdx.y;
  const int kvh = h / (p.num_q_heads / p.num_kv_heads);
  const int HD = p.head_dim;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const SparseRow r = sparse_row(sp, b, kvh);
  const Q* qp = static_cast<const Q*>(p.q) + int64_t(b) * p.q_stride_tok + int64_t(h) * p.q_stride_head;
  for (int d = tid; d < HD; d += kSparseThreads) q_s[d] = to_float(qp[d]) * a.q_scale;
  __syncthreads();
  const KVCacheView& c = p.kv;
  const KS* kbase = static_cast<const KS*>(c.k) + r.row * c.k_stride_row + int64_t(kvh) * c.k_stride_head;
  const VS* vbase = static_cast<const VS*>(c.v) + r.row * c.v_stride_row + int64_t(kvh) * c.v_stride_head;
  SoftmaxState st;
  float o[kSparsePerLane];
#pragma unroll
  for (int i = 0; i < kSparsePerLane; ++i) o[i] = 0.f;
  const int64_t slots = int64_t(r.count) * sp.block;
  for (int64_t t = warp; t < slots; t += kSparseWarps) {
    const int64_t j = slot_token(r, t, sp.block);  // the same for the whole warp
    if (j < 0) continue;
    const KS* kp = kbase + j * c.k_stride_tok;
    const float* kw =
        plain_scale_words<KF>(c, c.k_scale, r.row, j, kvh, c.ks_stride_row, c.ks_stride_tok, c.ks_stride_head, HD);
    float dot = 0.f;
    for (int d = lane; d < HD; d += 32) dot = fmaf(q_s[d], dequant_elem<KF>(kp, kw, c.ks_stride_tok, d, HD), dot);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float s = a.cap2 > 0.f ? a.cap2 * softcap_tanh(dot) : dot;
    const float f = st.rescale_to(s);
    const float w = st.weight(s);
    st.add(w);
    const VS* vp = vbase + j * c.v_stride_tok;
    const float* vw =
        plain_scale_words<VF>(c, c.v_scale, r.row, j, kvh, c.vs_stride_row, c.vs_stride_tok, c.vs_stride_head, HD);
#pragma unroll
    for (int i = 0; i < kSparsePerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < HD) o[i] = fmaf(w, dequant_elem<VF>(vp, vw, c.vs_stride_tok, d, HD), o[i] * f);
    }
  }
  if (lane == 0) {
    red_m[warp] = st.m;
    red_d[warp] = st.d;
  }
#pragma unroll
  for (int i = 0; i < kSparsePerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < HD) red_o[warp * kSparseMaxHeadDim + d] = o[i];
  }
  __syncthreads();
  float wts[kSparseWarps];
  const SoftmaxState merged = merge_partials(red_m, red_d, 1, wts);
  const float inv = merged.inv_sum();
  Q* op = static_cast<Q*>(p.out) + int64_t(b) * p.o_stride_tok + int64_t(h) * p.o_stride_head;
  for (int d = tid; d < HD; d += kSparseThreads)
    op[d] = from_float<Q>(merge_output(wts, red_o + d, kSparseMaxHeadDim) * inv);
  if (p.lse != nullptr && tid == 0) p.lse[int64_t(b) * p.num_q_heads + h] = merged.lse();
}

// Split kernel. Grid (splits, kv heads * head_chunks, batch); a.chunk_host = block slots per split.
template <typename Q, typename KF, typename VF>
__global__ void __launch_bounds__(kSparseThreads)
    sparse_decode_split_kernel(const SparseDecodeParams sp, const DecodePlanArgs a, int num_splits) {
  using KS = typename KF::storage_t;
  using VS = typename VF::storage_t;
  constexpr int GB = kSparseGroupBlock;
  const AttentionParams& p = sp.attn;
  __shared__ float q_s[GB * kSparseMaxHeadDim];
  __shared__ float red_m[kSparseWarps * GB], red_d[kSparseWarps * GB];
  __shared__ float red_o[kSparseWarps * GB * kSparseMaxHeadDim];
  const int split = blockIdx.x, b = blockIdx.z;
  const int kvh = blockIdx.y / a.head_chunks;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int g0 = (blockIdx.y - kvh * a.head_chunks) * GB;
  const int gb = group - g0 < GB ? group - g0 : GB;
  const int HD = p.head_dim;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const SparseRow r = sparse_row(sp, b, kvh);
  for (int x = tid; x < GB * kSparseMaxHeadDim; x += kSparseThreads) {
    const int g = x / kSparseMaxHeadDim, d = x - g * kSparseMaxHeadDim;
    float v = 0.f;
    if (g < gb && d < HD)
      v = to_float(static_cast<const Q*>(
              p.q)[int64_t(b) * p.q_stride_tok + int64_t(kvh * group + g0 + g) * p.q_stride_head + d]) *
          a.q_scale;
    q_s[x] = v;
  }
  __syncthreads();
  const KVCacheView& c = p.kv;
  const KS* kbase = static_cast<const KS*>(c.k) + r.row * c.k_stride_row + int64_t(kvh) * c.k_stride_head;
  const VS* vbase = static_cast<const VS*>(c.v) + r.row * c.v_stride_row + int64_t(kvh) * c.v_stride_head;
  SoftmaxState st[GB];
  float o[GB][kSparsePerLane];
#pragma unroll
  for (int g = 0; g < GB; ++g)
#pragma unroll
    for (int i = 0; i < kSparsePerLane; ++i) o[g][i] = 0.f;
  const int64_t s_lo = int64_t(split) * a.chunk_host;
  const int64_t s_hi = s_lo + a.chunk_host < r.count ? s_lo + a.chunk_host : r.count;
  for (int64_t t = s_lo * sp.block + warp; t < s_hi * sp.block; t += kSparseWarps) {
    const int64_t j = slot_token(r, t, sp.block);  // warp-uniform
    if (j < 0) continue;
    const KS* kp = kbase + j * c.k_stride_tok;
    const float* kw =
        plain_scale_words<KF>(c, c.k_scale, r.row, j, kvh, c.ks_stride_row, c.ks_stride_tok, c.ks_stride_head, HD);
    float kx[kSparsePerLane];
#pragma unroll
    for (int i = 0; i < kSparsePerLane; ++i) {
      const int d = lane + 32 * i;
      kx[i] = d < HD ? dequant_elem<KF>(kp, kw, c.ks_stride_tok, d, HD) : 0.f;
    }
    float dot[GB];
#pragma unroll
    for (int g = 0; g < GB; ++g) {
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < kSparsePerLane; ++i) acc = fmaf(q_s[g * kSparseMaxHeadDim + lane + 32 * i], kx[i], acc);
      dot[g] = acc;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
#pragma unroll
      for (int g = 0; g < GB; ++g) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], off);
    const VS* vp = vbase + j * c.v_stride_tok;
    const float* vw =
        plain_scale_words<VF>(c, c.v_scale, r.row, j, kvh, c.vs_stride_row, c.vs_stride_tok, c.vs_stride_head, HD);
    float vx[kSparsePerLane];
#pragma unroll
    for (int i = 0; i < kSparsePerLane; ++i) {
      const int d = lane + 32 * i;
      vx[i] = d < HD ? dequant_elem<VF>(vp, vw, c.vs_stride_tok, d, HD) : 0.f;
    }
#pragma unroll
    for (int g = 0; g < GB; ++g) {
      const float s = a.cap2 > 0.f ? a.cap2 * softcap_tanh(dot[g]) : dot[g];
      const float f = st[g].rescale_to(s);
      const float w = st[g].weight(s);
      st[g].add(w);
#pragma unroll
      for (int i = 0; i < kSparsePerLane; ++i) o[g][i] = fmaf(w, vx[i], o[g][i] * f);
    }
  }
#pragma unroll
  for (int g = 0; g < GB; ++g) {
    if (lane == 0) {
      red_m[warp * GB + g] = st[g].m;
      red_d[warp * GB + g] = st[g].d;
    }
#pragma unroll
    for (int i = 0; i < kSparsePerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < HD) red_o[(warp * GB + g) * kSparseMaxHeadDim + d] = o[g][i];
    }
  }
  __syncthreads();
  const int64_t plane = int64_t(p.batch) * p.num_q_heads;
  for (int g = 0; g < gb; ++g) {
    float wts[kSparseWarps];
    const SoftmaxState merged = merge_partials(red_m + g, red_d + g, GB, wts);
    const float inv = merged.inv_sum();
    const int h = kvh * group + g0 + g;
    const int64_t slot = int64_t(b) * p.num_q_heads + h;
    const float* ro = red_o + g * kSparseMaxHeadDim;
    if (num_splits == 1) {
      Q* op = static_cast<Q*>(p.out) + int64_t(b) * p.o_stride_tok + int64_t(h) * p.o_stride_head;
      for (int d = tid; d < HD; d += kSparseThreads)
        op[d] = from_float<Q>(merge_output(wts, ro + d, int64_t(GB) * kSparseMaxHeadDim) * inv);
      if (p.lse != nullptr && tid == 0) p.lse[slot] = merged.lse();
    } else {
      float* op = a.o_part + (int64_t(split) * plane + slot) * HD;
      for (int d = tid; d < HD; d += kSparseThreads)
        op[d] = merge_output(wts, ro + d, int64_t(GB) * kSparseMaxHeadDim) * inv;
      if (tid == 0) a.lse_part[int64_t(split) * plane + slot] = merged.lse();
    }
  }
}

// Combines the split partials (split_merge.cuh). Grid (num_q_heads, batch).
template <typename Q>
__global__ void __launch_bounds__(128)
    quest_split_merge_kernel(const SparseDecodeParams sp, const DecodePlanArgs a, int num_splits) {
  merge_split_row<Q>(sp.attn, a, num_splits);
}

}  // namespace
}  // namespace cuda

namespace {

constexpr int kMaxGridYZ = 65535;
constexpr int kCtasPerSm = 4;
constexpr int kMinSplitTokens = 256;

int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename F>
void dispatch_q_dtype(int32_t dtype, const char* what, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(f16_t{}); break;
    case kBFloat16: f(bf16_t{}); break;
    default:
      throw std::invalid_argument(std::string("vattn: ") + what + ": unknown dtype code " + std::to_string(dtype));
  }
}

void check_meta(const BlockMetaView& m, const char* what) {
  if (m.data == nullptr) throw std::invalid_argument(std::string(what) + ": null metadata pointer");
  if (m.num_rows < 0 || m.max_blocks < 0 || m.stride_row < 0 || m.stride_block < 0 || m.stride_head < 0 ||
      m.stride_side < 0)
    throw std::invalid_argument(std::string(what) + ": negative metadata shape or stride");
}

// ---- block_minmax

void validate_minmax(const BlockMinmaxParams& p) {
  auto bad = [](const std::string& m) { throw std::invalid_argument("block_minmax: " + m); };
  cuda::reject_paged_view(p.cache, "block_minmax");  // Quest's kernels read contiguous views only
  if (p.n < 0) bad("n must be >= 0");
  if (p.n == 0) return;
  if (p.num_kv_heads <= 0 || p.head_dim <= 0 || p.block <= 0) bad("num_kv_heads, head_dim and block must be positive");
  if (!p.cache.k || !p.row_ids || !p.first_block || (!p.lengths && !p.head_lengths)) bad("null pointer");
  check_meta(p.meta, "block_minmax");
  if (p.meta.num_rows < p.cache.num_rows) bad("the metadata has fewer rows than the cache");
  if (int64_t(p.n) * p.num_kv_heads > INT32_MAX) bad("too many (entry, kv head) pairs");
  dispatch_kv_format(p.cache.k_format, "block_minmax", [&](auto fmt) {
    using F = decltype(fmt);
    if (!dim_ok<F>(p.head_dim)) bad("head_dim does not fit the storage format");
    if (F::kScaleWords > 0 && p.cache.k_scale == nullptr) bad("a quantized cache needs its scales");
  });
  cuda::check_grouped_side(p.cache.k_format, p.cache.max_seq, p.head_dim, p.cache.ks_stride_tok, "block_minmax", "K");
}

// ---- quest_select

void validate_select(const QuestSelectParams& p) {
  auto bad = [](const std::string& m) { throw std::invalid_argument("quest_select: " + m); };
  if (p.n < 0 || p.max_sel < 0) bad("n and max_sel must be >= 0");
  if (p.n == 0) return;
  if (p.num_q_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 || p.block <= 0)
    bad("head counts, head_dim and block must be positive");
  if (p.num_q_heads % p.num_kv_heads != 0) bad("num_q_heads must be a multiple of num_kv_heads");
  if (p.token_budget <= 0) bad("token_budget must be positive");
  if (int64_t(p.num_q_heads / p.num_kv_heads) * p.head_dim > cuda::kSelectMaxQ)
    bad("group * head_dim must be <= " + std::to_string(cuda::kSelectMaxQ));
  if (int64_t(p.n) * p.num_kv_heads > INT32_MAX) bad("too many (entry, kv head) pairs");
  if (!p.q || !p.row_ids || (!p.lengths && !p.head_lengths) || !p.block_counts || (!p.block_ids && p.max_sel > 0))
    bad("null pointer");
  check_meta(p.meta, "quest_select");
  dispatch_q_dtype(p.dtype, "quest_select", [](auto) {});
}

// ---- sparse decode plan

struct SparsePlan {
  bool split = false;
  int num_splits = 1;
  int64_t lse_offset = 0, bytes = 0;
  cuda::DecodePlanArgs args;
};

SparsePlan make_sparse_plan(const SparseDecodeParams& sp) {
  const AttentionParams& p = sp.attn;
  auto bad = [](const std::string& m) { throw std::invalid_argument("sparse_decode_attention: " + m); };
  cuda::reject_paged_view(p.kv, "sparse_decode_attention");  // Quest's kernels read contiguous views only
  if (p.batch < 0 || sp.max_sel < 0) bad("batch and max_sel must be >= 0");
  if (p.batch > kMaxGridYZ) bad("batch must be <= 65535");
  if (p.num_q_heads <= 0 || p.num_kv_heads <= 0) bad("num_q_heads and num_kv_heads must be > 0");
  if (p.num_q_heads % p.num_kv_heads != 0) bad("num_q_heads must be a multiple of num_kv_heads");
  if (p.head_dim <= 0 || p.head_dim > cuda::kSparseMaxHeadDim) bad("head_dim must be in [1, 256]");
  if (sp.block <= 0) bad("block must be positive");
  if (p.cu_seqlens_q != nullptr || p.total_q != p.batch) bad("one query per row (cu_seqlens_q null)");
  if (p.window_left >= 0 || p.score_mode != 0) bad("no window and no scores");
  if (!std::isfinite(p.scale) || !std::isfinite(p.softcap)) bad("scale and softcap must be finite");
  if (p.impl != 0 && p.impl != 1) bad("impl must be 0 (fast) or 1 (plain)");
  if (p.kv.num_rows < 0 || p.kv.max_seq < 0) bad("negative cache shape");
  cuda::check_grouped_kv(p.kv, p.head_dim, "sparse_decode_attention");
  dispatch_q_dtype(p.dtype, "sparse_decode_attention", [&](auto t) {
    cuda::dispatch_attention_kv_pair<decltype(t)>(p.kv.k_format, p.kv.v_format, "sparse_decode_attention",
                                                  [](auto, auto) {});
  });
  SparsePlan pl;
  if (p.softcap > 0.f) {
    pl.args.q_scale = p.scale / p.softcap;
    pl.args.cap2 = p.softcap * kLog2e;
  } else {
    pl.args.q_scale = p.scale * kLog2e;
    pl.args.cap2 = 0.f;
  }
  if (p.batch == 0) return pl;
  if (!p.q || !p.out || !p.kv.k || !p.kv.v || (!p.seqlens_k && !p.head_seqlens_k) || !sp.block_counts ||
      (!sp.block_ids && sp.max_sel > 0))
    bad("null pointer");
  for (auto [fmt, scale] : {std::pair<int32_t, const float*>{p.kv.k_format, p.kv.k_scale},
                            std::pair<int32_t, const float*>{p.kv.v_format, p.kv.v_scale}})
    if (kv_format_is_quantized(fmt) && (scale == nullptr || reinterpret_cast<uintptr_t>(scale) % alignof(float) != 0))
      bad("a quantized cache needs its (4-byte aligned) scales");
  if (p.impl != 0 || p.dtype == kFloat32) return pl;
  pl.split = true;
  const int group = p.num_q_heads / p.num_kv_heads;
  pl.args.head_chunks = int(ceil_div64(group, cuda::kSparseGroupBlock));
  if (int64_t(p.num_kv_heads) * pl.args.head_chunks > kMaxGridYZ) bad("too many kv heads for one grid");
  const int64_t base = int64_t(p.batch) * p.num_kv_heads * pl.args.head_chunks;
  int64_t splits = ceil_div64(int64_t(kCtasPerSm) * current_device_sm_count(), base);
  const int64_t by_len = ceil_div64(int64_t(sp.max_sel) * sp.block, kMinSplitTokens);
  if (splits > by_len) splits = by_len;
  if (splits > cuda::kDecodeMaxSplits) splits = cuda::kDecodeMaxSplits;
  if (splits < 1) splits = 1;
  const int64_t slots = ceil_div64(sp.max_sel, splits);
  splits = slots > 0 ? ceil_div64(sp.max_sel, slots) : 1;
  pl.num_splits = int(splits);
  pl.args.chunk_host = int(slots);
  if (pl.num_splits > 1) {
    const int64_t states = splits * p.batch * p.num_q_heads;
    pl.lse_offset = ceil_div64(states * p.head_dim * int64_t(sizeof(float)), 256) * 256;
    pl.bytes = pl.lse_offset + states * int64_t(sizeof(float));
  }
  return pl;
}

}  // namespace

void block_minmax_cuda(const BlockMinmaxParams& p) {
  validate_minmax(p);
  if (p.n == 0) return;
  const int64_t per = int64_t(p.meta.max_blocks) * p.head_dim;
  int64_t ys = ceil_div64(per, int64_t(cuda::kMinmaxThreads) * 8);
  ys = ys < 1 ? 1 : (ys > 64 ? 64 : ys);
  const dim3 grid(unsigned(int64_t(p.n) * p.num_kv_heads), unsigned(ys));
  dispatch_kv_format(p.cache.k_format, "block_minmax", [&](auto fmt) {
    cuda::block_minmax_kernel<decltype(fmt)><<<grid, cuda::kMinmaxThreads, 0, as_stream(p.stream)>>>(p);
  });
  cuda_check_launch("block_minmax_kernel");
}

int64_t quest_select_workspace_bytes(const QuestSelectParams& p) {
  validate_select(p);
  return int64_t(p.n) * p.num_kv_heads * p.meta.max_blocks * int64_t(sizeof(uint32_t));
}

void quest_select_cuda(const QuestSelectParams& p) {
  const int64_t need = quest_select_workspace_bytes(p);  // validates p
  if (p.n == 0) return;
  if (need > 0 && (p.workspace == nullptr || p.workspace_bytes < need))
    throw std::invalid_argument("quest_select: workspace too small: need " + std::to_string(need) +
                                " bytes (quest_select_workspace_bytes)");
  if (reinterpret_cast<uintptr_t>(p.workspace) % 4 != 0)
    throw std::invalid_argument("quest_select: workspace must be 4-byte aligned");
  const dim3 grid(unsigned(int64_t(p.n) * p.num_kv_heads));
  dispatch_q_dtype(p.dtype, "quest_select", [&](auto t) {
    cuda::quest_select_kernel<decltype(t)><<<grid, cuda::kSelectThreads, 0, as_stream(p.stream)>>>(p);
  });
  cuda_check_launch("quest_select_kernel");
}

int64_t sparse_decode_workspace_bytes(const SparseDecodeParams& p) { return make_sparse_plan(p).bytes; }

void sparse_decode_attention_cuda(const SparseDecodeParams& sp) {
  const SparsePlan pl = make_sparse_plan(sp);  // validates sp
  const AttentionParams& p = sp.attn;
  if (p.batch == 0) return;
  cudaStream_t s = as_stream(p.stream);
  cuda::DecodePlanArgs a = pl.args;
  if (!pl.split) {
    const dim3 grid(unsigned(p.num_q_heads), unsigned(p.batch));
    dispatch_q_dtype(p.dtype, "sparse_decode_attention", [&](auto t) {
      using Q = decltype(t);
      cuda::dispatch_attention_kv_pair<Q>(p.kv.k_format, p.kv.v_format, "sparse_decode_attention",
                                          [&](auto kf, auto vf) {
                                            cuda::sparse_decode_plain_kernel<Q, decltype(kf), decltype(vf)>
                                                <<<grid, cuda::kSparseThreads, 0, s>>>(sp, a);
                                          });
    });
    cuda_check_launch("sparse_decode_plain_kernel");
    return;
  }
  if (pl.num_splits > 1) {
    if (p.workspace == nullptr || p.workspace_bytes < pl.bytes)
      throw std::invalid_argument("sparse_decode_attention: workspace too small: need " + std::to_string(pl.bytes) +
                                  " bytes (sparse_decode_workspace_bytes)");
    if (!cuda::is_aligned_16(p.workspace))
      throw std::invalid_argument("sparse_decode_attention: workspace must be 16-byte aligned");
    a.o_part = static_cast<float*>(p.workspace);
    a.lse_part = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + pl.lse_offset);
  }
  const dim3 grid(unsigned(pl.num_splits), unsigned(p.num_kv_heads * a.head_chunks), unsigned(p.batch));
  auto split = [&](auto t) {
    using Q = decltype(t);
    cuda::dispatch_attention_kv_pair<Q>(p.kv.k_format, p.kv.v_format, "sparse_decode_attention", [&](auto kf, auto vf) {
      cuda::sparse_decode_split_kernel<Q, decltype(kf), decltype(vf)>
          <<<grid, cuda::kSparseThreads, 0, s>>>(sp, a, pl.num_splits);
    });
    cuda_check_launch("sparse_decode_split_kernel");
    if (pl.num_splits > 1) {
      cuda::quest_split_merge_kernel<Q>
          <<<dim3(unsigned(p.num_q_heads), unsigned(p.batch)), 128, 0, s>>>(sp, a, pl.num_splits);
      cuda_check_launch("quest_split_merge_kernel");
    }
  };
  if (p.dtype == kBFloat16)
    split(bf16_t{});
  else
    split(f16_t{});
}

}  // namespace vattn
