#pragma once
// Plain prefill kernel (impl == 1, and the fallback for cases the tensor-core kernel does not
// cover: other head dims, unaligned tensors, huge grids). One CTA per (query token, q head):
// fp32 throughout, straightforward loops, meant to be obviously right rather than fast.
// K and V may be stored in any format pair (KF, VF) of kv_format.h: plain 16-bit formats are
// read with the device conversions of kv_device_format.cuh, quantized ones element by element
// through DeviceKvFormat<F>::dequant with the vector's scale words (kv_format.h's values, the
// CPU's; fp8 through the exact intrinsic conversion, which also keeps every instantiation
// spill-free on sm_90a where the portable branchy one spilled 8 B with fp32 q, int8 K, fp8 V);
// a grouped format (int4_ch keys) with the words of the key's group (Format::dequant_grouped).
// (The tensor-core kernel reads int4_ch keys too, through its Int4ChTileLoader.)
//
// Keys of one query form one contiguous range [lo, hi], so no per-key mask is needed: the
// loop only ever touches keys inside the range (never a slot >= the row's length).
#include <cmath>

#include "vattn/cuda/prefill_common.cuh"
#include "vattn/softmax_state.h"

namespace vattn {
namespace prefill {

constexpr int kPlainThreads = 128;  // 4 warps
constexpr int kPlainTile = 64;      // keys scored per pass (16 per warp)
constexpr int kPlainMaxDim = 256;   // 2 output dims per thread

// Element i of one stored vector v with its scale words w (vec_scales: null for plain formats,
// the group's first token's words for a grouped one; s_tok their token stride), as fp32.
template <typename Format>
__device__ __forceinline__ float kv_elem(const typename Format::storage_t* v, const float* w, int64_t s_tok, int i,
                                         int D) {
  if constexpr (Format::kScaleWords == 0)
    return cuda::DeviceKvFormat<Format>::load(v, i);
  else if constexpr (is_grouped_format<Format>::value)
    return Format::dequant_grouped(v, w, s_tok, i, D);
  else
    return cuda::DeviceKvFormat<Format>::dequant(v, w, i);  // Format::dequant's value (fp8: the exact intrinsic)
}

// Scale words a reader of a token located at l (kv_paged.cuh kv_locate) passes to kv_elem, given
// the side's words of the kv head (scale + kvh * s_head, no row term): the token's own, or those
// of its group's first token for a grouped format (int4_ch, kv_device_format.cuh words_token: the
// in-block offset rounded down to a multiple of G -- a paged view holds whole groups in each
// block, check_grouped_kv, so the group's first token and the words kv_elem reads at s_tok
// steps lie in the token's block); null for a format without scale words.
template <typename Format>
__device__ __forceinline__ const float* vec_scales(const float* head, cuda::KvLoc l, int64_t s_row, int64_t s_tok,
                                                   int D) {
  if constexpr (Format::kScaleWords == 0) {
    return nullptr;
  } else {
    if constexpr (is_grouped_format<Format>::value) l.t -= l.t % Format::group(D);
    return head + l.at(s_row, s_tok);
  }
}

// Min blocks 1: with ptxas's own occupancy target (48 registers) the paged-view key lookups made
// int4-V instances spill 4 B on sm_80; at 1 it takes 44-56 registers and spills nothing.
template <typename T, typename KF, typename VF>
__global__ void __launch_bounds__(kPlainThreads, 1) prefill_plain_kernel(const AttentionParams p) {
  using KS = typename KF::storage_t;
  using VS = typename VF::storage_t;
  __shared__ float q_s[kPlainMaxDim];
  __shared__ float s_s[kPlainTile];

  const int t = blockIdx.x;  // query token (row of q / out)
  const int h = blockIdx.y;  // q head
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int D = p.head_dim;

  const int b = find_batch_row(p.cu_seqlens_q, p.batch, t);
  if (b < 0) return;  // token belongs to no batch row: nothing defines its output
  const int n_b = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
  const int i = t - p.cu_seqlens_q[b];
  const int kvh = h / (p.num_q_heads / p.num_kv_heads);
  const RowKeys rk = row_keys(p, b, kvh);

  // Visible keys: [lo, hi] with hi = pos (pos <= L - 1 always), capped to what may be read.
  const KeySpan keys = visible_keys(rk.len - n_b + i, rk.readable, p.window_left);
  const int lo = keys.first, hi = keys.last;

  const T* q = static_cast<const T*>(p.q) + int64_t(t) * p.q_stride_tok + int64_t(h) * p.q_stride_head;
  for (int d = tid; d < D; d += kPlainThreads) q_s[d] = cuda::elem_to_float(q[d]);

  // The kv head's K / V and scale words (the launcher checks the scale pointers of quantized
  // formats are set); each key is located once (kv_paged.cuh kv_locate: its row and token, or its
  // physical block and the offset in it) and every side's address formed from that.
  const KVCacheView& c = p.kv;
  const int64_t row = rk.row;
  const KS* kbase = static_cast<const KS*>(c.k) + int64_t(kvh) * c.k_stride_head;
  const VS* vbase = static_cast<const VS*>(c.v) + int64_t(kvh) * c.v_stride_head;
  const float* ks_head = KF::kScaleWords > 0 ? c.k_scale + int64_t(kvh) * c.ks_stride_head : nullptr;
  const float* vs_head = VF::kScaleWords > 0 ? c.v_scale + int64_t(kvh) * c.vs_stride_head : nullptr;
  const float scale_log2 = p.scale * kLog2e;
  const bool capped = p.softcap > 0.f;

  SoftmaxState st;               // every thread keeps an identical copy
  float acc0 = 0.f, acc1 = 0.f;  // output dims tid and tid + 128
  __syncthreads();               // q_s ready

  for (int j0 = lo; j0 <= hi; j0 += kPlainTile) {
    const int cnt = min(kPlainTile, hi - j0 + 1);
    // Scores: warp w handles keys w, w+4, ...; lanes split the head dim, then reduce.
    for (int jj = warp; jj < cnt; jj += kPlainThreads / 32) {
      const cuda::KvLoc l = cuda::kv_locate(c, row, j0 + jj);
      const KS* krow = kbase + l.at(c.k_stride_row, c.k_stride_tok);
      const float* kw = vec_scales<KF>(ks_head, l, c.ks_stride_row, c.ks_stride_tok, D);
      float dot = 0.f;
      // Unroll factors of this loop (1) and of the V loop below (4): with the default unrolling
      // ptxas spills a few bytes for some quantized pairs (int4 K: 16 B on sm_80, int4 K with
      // fp8 V: 4 B on sm_90a); these keep every instantiation spill-free on sm_80 and sm_90a.
#pragma unroll 1
      for (int d = lane; d < D; d += 32) dot += q_s[d] * kv_elem<KF>(krow, kw, p.kv.ks_stride_tok, d, D);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      if (lane == 0) {
        const float x = capped ? p.softcap * softcap_tanh(dot * p.scale / p.softcap) * kLog2e : dot * scale_log2;
        s_s[jj] = x;
      }
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int jj = 0; jj < cnt; ++jj) mx = fmaxf(mx, s_s[jj]);
    const float f = st.rescale_to(mx);
    acc0 *= f;
    acc1 *= f;
#pragma unroll 4
    for (int jj = 0; jj < cnt; ++jj) {
      const float w = st.weight(s_s[jj]);
      st.add(w);
      const cuda::KvLoc l = cuda::kv_locate(c, row, j0 + jj);
      const VS* vrow = vbase + l.at(c.v_stride_row, c.v_stride_tok);
      const float* vw = vec_scales<VF>(vs_head, l, c.vs_stride_row, c.vs_stride_tok, D);
      if (tid < D) acc0 += w * kv_elem<VF>(vrow, vw, p.kv.vs_stride_tok, tid, D);
      if (tid + kPlainThreads < D) acc1 += w * kv_elem<VF>(vrow, vw, p.kv.vs_stride_tok, tid + kPlainThreads, D);
    }
    __syncthreads();  // s_s is rewritten by the next pass
  }

  const float inv = st.inv_sum();  // 0 when nothing was visible: zero output
  T* o = static_cast<T*>(p.out) + int64_t(t) * p.o_stride_tok + int64_t(h) * p.o_stride_head;
  if (tid < D) o[tid] = cuda::float_to_elem<T>(acc0 * inv);
  if (tid + kPlainThreads < D) o[tid + kPlainThreads] = cuda::float_to_elem<T>(acc1 * inv);
  if (p.lse != nullptr && tid == 0) p.lse[int64_t(t) * p.num_q_heads + h] = st.lse();
}

}  // namespace prefill
}  // namespace vattn
