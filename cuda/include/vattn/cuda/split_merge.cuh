#pragma once
// The second pass of split-KV decode (dense and Quest): one CTA per (q head, batch row) combines
// the fp32 partial outputs of the splits, out = sum_s w_s o_s / sum_s w_s with
// w_s = exp(lse_s - M) (lse_weight; an empty split has lse -inf, weight 0, and is never read).
#include <cstdint>

#include "vattn/cuda/decode_args.cuh"
#include "vattn/cuda/vec.cuh"
#include "vattn/params.h"
#include "vattn/softmax_state.h"

namespace vattn {
namespace cuda {

// Call from a kernel with grid (num_q_heads, batch); p.out / p.lse receive the merged row.
template <typename T>
__device__ __forceinline__ void merge_split_row(const AttentionParams& p, const DecodePlanArgs& a, int num_splits) {
  __shared__ float w_s[kDecodeMaxSplits];
  __shared__ float m_s;
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int64_t plane = int64_t(p.batch) * p.num_q_heads;  // one split's states
  const int64_t slot = int64_t(b) * p.num_q_heads + h;
  for (int s = tid; s < num_splits; s += blockDim.x) w_s[s] = a.lse_part[s * plane + slot];
  __syncthreads();
  if (tid == 0) {
    float M = -INFINITY;
    for (int s = 0; s < num_splits; ++s) M = fmaxf(M, w_s[s]);
    m_s = M;
  }
  __syncthreads();
  const float M = m_s;
  for (int s = tid; s < num_splits; s += blockDim.x) w_s[s] = lse_weight(w_s[s], M);
  __syncthreads();
  float W = 0.f;
  for (int s = 0; s < num_splits; ++s) W += w_s[s];
  const float inv = W > 0.f ? 1.f / W : 0.f;
  T* op = static_cast<T*>(p.out) + int64_t(b) * p.o_stride_tok + int64_t(h) * p.o_stride_head;
  for (int d = tid; d < p.head_dim; d += blockDim.x)
    op[d] = float_to_elem<T>(merge_output(w_s, num_splits, a.o_part + slot * p.head_dim + d, plane * p.head_dim) * inv);
  if (p.lse != nullptr && tid == 0) p.lse[slot] = merged_lse(M, W);
}

}  // namespace cuda
}  // namespace vattn
