#pragma once
// The plain decode kernel: one CTA per (batch row, q head), an obviously-right loop over the
// keys. Each warp takes every kWarps-th key, its lanes split the head dim, a warp all-reduce
// gives the logit, and each warp keeps its own online-softmax state (vattn::SoftmaxState)
// and fp32 output; the warps are merged in shared memory at the end. Scalar loads through the
// same storage-format type (vattn::PlainFormat) and conversions (dtypes.h) as the CPU code.
// It is the reference for the fast kernel (impl = 1) and the fallback for head dims or
// alignments the fast kernel does not cover; any head_dim <= kMaxHeadDim works.
#include <cstdint>

#include "vattn/cuda/decode_args.cuh"
#include "vattn/dtypes.h"
#include "vattn/kv_format.h"
#include "vattn/softmax_state.h"

namespace vattn {
namespace cuda {

constexpr int kPlainDecodeThreads = 128;
constexpr int kPlainDecodeMaxHeadDim = 256;

// Q: q/out element type (f16_t, bf16_t or float); Fmt: K/V storage format (vattn::PlainFormat<...>).
template <typename Q, typename Fmt>
__global__ void __launch_bounds__(kPlainDecodeThreads) decode_plain_kernel(const DecodeKernelArgs a) {
  constexpr int kWarps = kPlainDecodeThreads / 32;
  constexpr int kPerLane = kPlainDecodeMaxHeadDim / 32;  // dims lane, lane + 32, ...
  using S = typename Fmt::storage_t;
  __shared__ float q_s[kPlainDecodeMaxHeadDim];
  __shared__ float red_m[kWarps], red_d[kWarps];
  __shared__ float red_o[kWarps][kPlainDecodeMaxHeadDim];

  const int h = blockIdx.x;
  const int b = blockIdx.y;
  const int kvh = h / a.group;
  const int HD = a.head_dim;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  int64_t row;
  int lo, L;
  decode_key_range(a, b, kvh, &row, &lo, &L);

  const Q* qp = static_cast<const Q*>(a.q) + int64_t(b) * a.q_stride_tok + int64_t(h) * a.q_stride_head;
  for (int d = tid; d < HD; d += kPlainDecodeThreads) q_s[d] = to_float(qp[d]) * a.q_scale;
  __syncthreads();

  const S* kbase = static_cast<const S*>(a.k) + row * a.k_stride_row + int64_t(kvh) * a.k_stride_head;
  const S* vbase = static_cast<const S*>(a.v) + row * a.v_stride_row + int64_t(kvh) * a.v_stride_head;

  SoftmaxState st;
  float o[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) o[i] = 0.f;

  for (int j = lo + warp; j < L; j += kWarps) {
    const S* kp = kbase + int64_t(j) * a.k_stride_tok;
    float dot = 0.f;
    for (int d = lane; d < HD; d += 32) dot = fmaf(q_s[d], Fmt::load(kp, d), dot);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float s = a.cap2 > 0.f ? a.cap2 * softcap_tanh(dot) : dot;  // log2 units
    const float f = st.rescale_to(s);
    const float w = st.weight(s);
    st.add(w);
    const S* vp = vbase + int64_t(j) * a.v_stride_tok;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < HD) o[i] = fmaf(w, Fmt::load(vp, d), o[i] * f);
    }
  }

  if (lane == 0) {
    red_m[warp] = st.m;
    red_d[warp] = st.d;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < HD) red_o[warp][d] = o[i];
  }
  __syncthreads();

  float M = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) M = fmaxf(M, red_m[w]);
  float D = 0.f;
  float scale_w[kWarps];
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    scale_w[w] = red_m[w] == -INFINITY ? 0.f : exp2f(red_m[w] - M);  // M finite when any is
    D = fmaf(red_d[w], scale_w[w], D);
  }
  const float inv = D > 0.f ? 1.f / D : 0.f;
  Q* op = static_cast<Q*>(a.out) + int64_t(b) * a.o_stride_tok + int64_t(h) * a.o_stride_head;
  for (int d = tid; d < HD; d += kPlainDecodeThreads) {
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w)
      if (scale_w[w] > 0.f) acc = fmaf(red_o[w][d], scale_w[w], acc);
    op[d] = from_float<Q>(acc * inv);
  }
  if (a.lse != nullptr && tid == 0)
    a.lse[int64_t(b) * a.num_q_heads + h] = D > 0.f ? (M + log2f(D)) * kLn2 : -INFINITY;
}

}  // namespace cuda
}  // namespace vattn
