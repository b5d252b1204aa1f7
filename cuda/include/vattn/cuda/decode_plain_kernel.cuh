#pragma once
// The plain decode kernel: one CTA per (batch row, q head), an obviously-right loop over the
// keys. Each warp takes every kWarps-th key, its lanes split the head dim, a warp all-reduce
// gives the logit, and each warp keeps its own online-softmax state (vattn::SoftmaxState)
// and fp32 output; the warps are merged in shared memory at the end (merge_partials). Every
// element is read through the format's scalar dequant with the vector's scale words, for any
// format (dequant_elem<F> of kv_device_format.cuh: kv_format.h's definition, the CPU's values,
// with the intrinsic fp16 -> fp32 conversion where one is needed; int4_ch with the words of the
// key's group).
// It is the reference for the fast kernel (impl = 1) and the fallback for head dims or
// alignments the fast kernel does not cover; any head_dim <= kMaxHeadDim works.
#include <cstdint>

#include "vattn/cuda/decode_args.cuh"
#include "vattn/cuda/kv_device_format.cuh"
#include "vattn/cuda/kv_paged.cuh"
#include "vattn/dtypes.h"
#include "vattn/key_range.h"
#include "vattn/kv_format.h"
#include "vattn/params.h"
#include "vattn/softmax_state.h"

namespace vattn {
namespace cuda {

constexpr int kPlainDecodeThreads = 128;
constexpr int kPlainDecodeMaxHeadDim = 256;

// Scale words a reader of vector (row, tok, head) of one side of view c passes to dequant_elem:
// those of the token itself, or of its group's first token for a grouped format (int4_ch; a
// paged view holds whole groups in each block, check_grouped_kv, so the words of the group's
// other tokens that dequant_elem reads lie in the same block at s_tok steps); null for a format
// without scales. base: the side's scale tensor (k_scale / v_scale); the address is
// kv_paging.h's rule.
template <typename Fmt>
__device__ __forceinline__ const float* plain_scale_words(const KVCacheView& c, const float* base, int64_t row,
                                                          int64_t tok, int64_t head, int64_t s_row, int64_t s_tok,
                                                          int64_t s_head, int head_dim) {
  if constexpr (Fmt::kScaleWords == 0) {
    return nullptr;
  } else {
    return kv_head_base(base, c, row, int(head), s_row, s_head) +
           kv_head_tok(c, row, int(words_token<Fmt>(tok, head_dim)), s_row, s_tok);
  }
}

// Q: q/out element type (f16_t, bf16_t or float); KF / VF: K / V storage formats (kv_format.h:
// the plain format of Q, or any quantized format, int4_ch included; the launcher validated the
// pair, the scale pointers and, for int4_ch, whole groups in the cache).
template <typename Q, typename KF, typename VF>
__global__ void __launch_bounds__(kPlainDecodeThreads)
    decode_plain_kernel(const AttentionParams p, const DecodePlanArgs a) {
  constexpr int kWarps = kPlainDecodeThreads / 32;
  constexpr int kPerLane = kPlainDecodeMaxHeadDim / 32;  // dims lane, lane + 32, ...
  using KS = typename KF::storage_t;
  using VS = typename VF::storage_t;
  __shared__ float q_s[kPlainDecodeMaxHeadDim];
  __shared__ float red_m[kWarps], red_d[kWarps];
  __shared__ float red_o[kWarps * kPlainDecodeMaxHeadDim];  // [warp][dim]

  const int h = blockIdx.x;
  const int b = blockIdx.y;
  const int kvh = h / (p.num_q_heads / p.num_kv_heads);
  const int HD = p.head_dim;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  const RowKeys rk = row_keys(p, b, kvh);
  const KeySpan keys = decode_keys(rk, p.window_left);
  const int64_t row = rk.row;
  const int lo = keys.first, L = keys.end();

  const Q* qp = static_cast<const Q*>(p.q) + int64_t(b) * p.q_stride_tok + int64_t(h) * p.q_stride_head;
  for (int d = tid; d < HD; d += kPlainDecodeThreads) q_s[d] = to_float(qp[d]) * a.q_scale;
  __syncthreads();

  const KVCacheView& c = p.kv;
  // Head bases and per-key token offsets: kv_paged.cuh (contiguous or paged).
  const KS* kbase = kv_head_base(static_cast<const KS*>(c.k), c, row, kvh, c.k_stride_row, c.k_stride_head);
  const VS* vbase = kv_head_base(static_cast<const VS*>(c.v), c, row, kvh, c.v_stride_row, c.v_stride_head);

  SoftmaxState st;
  float o[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) o[i] = 0.f;

  for (int j = lo + warp; j < L; j += kWarps) {
    const KS* kp = kbase + kv_head_tok(c, row, j, c.k_stride_row, c.k_stride_tok);
    const float* kw =
        plain_scale_words<KF>(c, c.k_scale, row, j, kvh, c.ks_stride_row, c.ks_stride_tok, c.ks_stride_head, HD);
    float dot = 0.f;
    for (int d = lane; d < HD; d += 32) dot = fmaf(q_s[d], dequant_elem<KF>(kp, kw, c.ks_stride_tok, d, HD), dot);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float s = a.cap2 > 0.f ? a.cap2 * softcap_tanh(dot) : dot;  // log2 units
    const float f = st.rescale_to(s);
    const float w = st.weight(s);
    st.add(w);
    const VS* vp = vbase + kv_head_tok(c, row, j, c.v_stride_row, c.v_stride_tok);
    const float* vw =
        plain_scale_words<VF>(c, c.v_scale, row, j, kvh, c.vs_stride_row, c.vs_stride_tok, c.vs_stride_head, HD);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < HD) o[i] = fmaf(w, dequant_elem<VF>(vp, vw, c.vs_stride_tok, d, HD), o[i] * f);
    }
  }

  if (lane == 0) {
    red_m[warp] = st.m;
    red_d[warp] = st.d;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < HD) red_o[warp * kPlainDecodeMaxHeadDim + d] = o[i];
  }
  __syncthreads();

  float scale_w[kWarps];
  const SoftmaxState merged = merge_partials(red_m, red_d, 1, scale_w);
  const float inv = merged.inv_sum();
  Q* op = static_cast<Q*>(p.out) + int64_t(b) * p.o_stride_tok + int64_t(h) * p.o_stride_head;
  for (int d = tid; d < HD; d += kPlainDecodeThreads)
    op[d] = from_float<Q>(merge_output(scale_w, red_o + d, kPlainDecodeMaxHeadDim) * inv);
  if (p.lse != nullptr && tid == 0) p.lse[int64_t(b) * p.num_q_heads + h] = merged.lse();
}

}  // namespace cuda
}  // namespace vattn
