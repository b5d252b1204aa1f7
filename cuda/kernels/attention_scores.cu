// The per-token attention score kernel (vattn/cuda/scores.cuh has the design).
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "vattn/cuda/check.cuh"
#include "vattn/cuda/kv_device_format.cuh"
#include "vattn/cuda/kv_paged.cuh"
#include "vattn/cuda/scores.cuh"
#include "vattn/dtypes.h"
#include "vattn/key_range.h"
#include "vattn/kv_format.h"
#include "vattn/softmax_state.h"

namespace vattn {
namespace cuda {
namespace {

constexpr int kScoreTile = 32;        // keys per CTA pass: lane l of every warp scores key c0 + l
constexpr int kScoreWarps = 4;        // warps split the (query, q head) pairs
constexpr int kScoreMaxDim = 256;     // head_dim bound (checked by the launcher)
constexpr int kScoreMaxTiles = 1024;  // grid.x cap; CTAs stride over the tiles of longer rows

// Grid (key tiles, num_kv_heads, batch). For batch row b and kv head h, CTA x walks the key
// tiles x, x + gridDim.x, ... of [0, L) and writes scores[row, h, tile] (add or replace).
template <typename Q, typename KF>
__global__ void __launch_bounds__(kScoreWarps * 32) attention_scores_kernel(const AttentionParams p) {
  using KS = typename KF::storage_t;
  __shared__ float k_s[kScoreTile][kScoreMaxDim + 1];  // +1: lanes read rows without bank conflicts
  __shared__ float q_s[kScoreWarps][kScoreMaxDim];
  __shared__ float red[kScoreWarps][kScoreTile];
  __shared__ int64_t koff_s[kScoreTile], kwoff_s[kScoreTile];  // the tile's key / word offsets
  const int h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int D = p.head_dim;
  const int group = p.num_q_heads / p.num_kv_heads;
  const RowKeys rk = row_keys(p, b, h);  // readable: 0 for a bad slot id; never past max_seq
  const int L = rk.readable;
  int t0 = b, n = 1;  // decode: query b
  if (p.cu_seqlens_q != nullptr) {
    t0 = p.cu_seqlens_q[b];
    n = p.cu_seqlens_q[b + 1] - t0;
    if (t0 < 0 || n < 0 || int64_t(t0) + n > p.total_q) n = 0;  // malformed: score nothing
  }
  const int first = first_scoring_query(p, n);
  // K of (row, kv head) through kv_paged.cuh (contiguous or paged view): head bases, then each
  // key's offset (paged: its block) once per staged key.
  const KVCacheView& c = p.kv;
  const KS* kbase = kv_head_base(static_cast<const KS*>(c.k), c, rk.row, h, c.k_stride_row, c.k_stride_head);
  const float* kwbase = KF::kScaleWords > 0 ? kv_head_base(c.k_scale, c, rk.row, h, c.ks_stride_row, c.ks_stride_head)
                                            : static_cast<const float*>(nullptr);
  float* out = score_row(p, rk.row, h);

  for (int c0 = blockIdx.x * kScoreTile; c0 < L; c0 += gridDim.x * kScoreTile) {
    const int cnt = min(kScoreTile, L - c0);
    __syncthreads();  // k_s, red and the offsets of the previous tile are consumed
    // Each key's offsets once (paged: one block lookup per key): its vector's, and its scale
    // words' (quantized formats; int4_ch: its group's, from the group's first token -- a paged
    // view holds whole groups in each block, check_grouped_paged, so the words dequant_elem reads
    // at ks_stride_tok steps lie in that block).
    if (tid < cnt) {
      koff_s[tid] = kv_head_tok(c, rk.row, c0 + tid, c.k_stride_row, c.k_stride_tok);
      if constexpr (KF::kScaleWords > 0)
        kwoff_s[tid] = kv_head_tok(c, rk.row, int(words_token<KF>(c0 + tid, D)), c.ks_stride_row, c.ks_stride_tok);
    }
    __syncthreads();
    for (int e = tid; e < cnt * D; e += blockDim.x) {
      const int jj = e / D, d = e % D;
      const float* kw = nullptr;
      if constexpr (KF::kScaleWords > 0) kw = kwbase + kwoff_s[jj];
      k_s[jj][d] = dequant_elem<KF>(kbase + koff_s[jj], kw, c.ks_stride_tok, d, D);
    }
    __syncthreads();
    // Scoring queries whose keys reach into the tile: position L_b - n + i >= c0 (causal) and,
    // with a window, pos - window_left <= c0 + cnt - 1. Positions use the row's length as given.
    const int len = rk.len;
    const int i_lo = max(max(first, c0 - len + n), 0);
    int i_hi = n;
    if (p.window_left >= 0) {
      const int64_t last = int64_t(c0) + cnt - 1 + p.window_left - len + n + 1;  // one past the last query
      i_hi = last < n ? int(last) : n;
    }
    float acc = 0.f;  // lane's key c0 + lane, summed over this warp's pairs
    for (int pair = i_lo * group + warp; pair < i_hi * group; pair += kScoreWarps) {
      const int i = pair / group, g = pair % group;
      const int t = t0 + i, hq = h * group + g;
      const float lse = p.lse[int64_t(t) * p.num_q_heads + hq];
      const Q* qp = static_cast<const Q*>(p.q) + int64_t(t) * p.q_stride_tok + int64_t(hq) * p.q_stride_head;
      for (int d = lane; d < D; d += 32) q_s[warp][d] = to_float(qp[d]);
      __syncwarp();
      const int pos = len - n + i;
      const int j = c0 + lane;
      const KeySpan vis = visible_keys(pos, L, p.window_left);
      if (lane < cnt && j >= vis.first && j <= vis.last && lse > -INFINITY) {
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot = fmaf(q_s[warp][d], k_s[lane][d], dot);
        const float x = apply_softcap(dot * p.scale, p.softcap);
        acc += exp2f((x - lse) * kLog2e);
      }
      __syncwarp();  // q_s[warp] is rewritten by the next pair
    }
    red[warp][lane] = acc;
    __syncthreads();
    if (tid < cnt) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kScoreWarps; ++w) s += red[w][tid];
      if (p.score_mode == kScoreReplace)
        out[c0 + tid] = s;
      else
        out[c0 + tid] += s;
    }
  }
}

}  // namespace
}  // namespace cuda

void validate_attention_scores(const AttentionParams& p) {
  if (p.score_mode == kScoreOff) return;
  auto bad = [](const std::string& m) { throw std::invalid_argument("attention scores: " + m); };
  if (p.score_mode != kScoreAdd && p.score_mode != kScoreReplace) bad("score_mode must be 0, 1 or 2");
  if (p.scores == nullptr) bad("score_mode is set but scores is null");
  if (reinterpret_cast<uintptr_t>(p.scores) % alignof(float) != 0) bad("scores must be 4-byte aligned");
  if (p.batch <= 0) return;
  if (p.batch > 65535 || p.num_kv_heads > 65535) bad("at most 65535 batch rows and kv heads");
  if (p.head_dim <= 0 || p.head_dim > cuda::kScoreMaxDim) bad("head_dim must be in [1, 256]");
  if (p.total_q > 0 && (p.lse == nullptr || p.q == nullptr)) bad("the score pass needs q and the lse output");
  if (!p.seqlens_k && !p.head_seqlens_k) bad("seqlens_k (or head_seqlens_k) is required");
  if (p.dtype != kFloat16 && p.dtype != kBFloat16 && p.dtype != kFloat32)
    bad("dtype must be float16, bfloat16 or float32");
  cuda::check_grouped_side(p.kv.k_format, p.kv.max_seq, p.head_dim, p.kv.ks_stride_tok, "attention scores", "K");
  cuda::check_grouped_paged(p.kv.k_format, p.kv, p.head_dim, "attention scores", "K");
  cuda::check_paged_view(p.kv, "attention scores");
}

void launch_attention_scores(const AttentionParams& p) {
  if (p.score_mode == kScoreOff) return;
  validate_attention_scores(p);
  auto bad = [](const std::string& m) { throw std::invalid_argument("attention scores: " + m); };
  if (p.batch <= 0) return;
  if (!p.kv.k || p.kv.max_seq <= 0 || p.kv.num_rows <= 0) return;  // no key to score
  int64_t tiles = (int64_t(p.kv.max_seq) + cuda::kScoreTile - 1) / cuda::kScoreTile;
  if (tiles > cuda::kScoreMaxTiles) tiles = cuda::kScoreMaxTiles;
  const dim3 grid(unsigned(tiles), unsigned(p.num_kv_heads), unsigned(p.batch));
  cudaStream_t s = as_stream(p.stream);
  auto launch = [&](auto qtag) {
    using Q = decltype(qtag);
    dispatch_kv_format(p.kv.k_format, "attention scores (K)", [&](auto kf) {
      using KF = decltype(kf);
      if constexpr (KF::kScaleWords == 0 && !std::is_same_v<typename KF::storage_t, Q>) {
        bad("a plain K cache must store the q dtype");
      } else {
        cuda::attention_scores_kernel<Q, KF><<<grid, cuda::kScoreWarps * 32, 0, s>>>(p);
      }
    });
  };
  switch (p.dtype) {
    case kFloat16: launch(f16_t{}); break;
    case kBFloat16: launch(bf16_t{}); break;
    case kFloat32: launch(float{}); break;
    default: bad("dtype must be float16, bfloat16 or float32");
  }
  cuda_check_launch("attention_scores_kernel");
}

}  // namespace vattn
