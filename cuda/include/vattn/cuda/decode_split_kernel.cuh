#pragma once
// The split-KV (flash-decoding) decode kernel.
//
// Grid (split, batch row, kv head x head chunk). A CTA handles the keys [start, end) of one
// split of one (row, kv head) for GB q heads of the GQA group at once, so each K/V tile is
// read from memory once for all of them (a group larger than 8 is spread over
// ceil(group / 8) CTAs). K/V tiles stream into shared memory through a kStages-deep cp.async
// pipeline (16-byte copies, zero-filled past the end, so no slot past the row's length is
// ever read). Compute: kLanesPerKey lanes own one 16-byte chunk of a key each, hold q for the
// GB heads in registers (pre-scaled into the log2 domain), reduce the partial dot products
// with xor shuffles (all lanes end with bitwise the same logit), and keep an online-softmax
// state and an fp32 partial output per key group; the key groups are merged in shared memory
// at the end (merge_partials). The CTA writes out / lse directly when there is one split,
// else an fp32 normalised partial and its LSE into the workspace for decode_split_merge_kernel.
// T: q/out element type (f16_t or bf16_t); Format: the kv_format.h storage format of K/V, read
// through its device trait (kv_device_format.cuh).
#include <cstdint>
#include <type_traits>

#include "vattn/cuda/check.cuh"
#include "vattn/cuda/cp_async.cuh"
#include "vattn/cuda/decode_args.cuh"
#include "vattn/cuda/kv_device_format.cuh"
#include "vattn/cuda/vec.cuh"
#include "vattn/dtypes.h"
#include "vattn/key_range.h"
#include "vattn/kv_format.h"
#include "vattn/params.h"
#include "vattn/softmax_state.h"

namespace vattn {
namespace cuda {

template <int HD, typename T, typename Format, int GB>
__global__ void __launch_bounds__(DecodeSplitConfigFor<HD, Format>::kThreads)
    decode_split_kernel(const AttentionParams p, const DecodePlanArgs a,
                        const typename DeviceKvFormat<Format>::Args fa) {
  using Fmt = DeviceKvFormat<Format>;
  using Cfg = DecodeSplitConfigFor<HD, Format>;
  using S = typename Fmt::storage_t;
  constexpr int EPC = Fmt::kElemsPerChunk;  // head_dim elements per lane
  constexpr int CH = Cfg::kChunks;
  constexpr int TD = Cfg::kLanesPerKey;
  constexpr int KPW = Cfg::kKeysPerWarp;
  constexpr int KPI = Cfg::kKeysPerIter;
  constexpr int NK = Cfg::kItersPerTile;
  constexpr int TILE = Cfg::kTile;
  constexpr int STAGES = Cfg::kStages;
  constexpr int NT = Cfg::kThreads;
  constexpr int NGRP = KPI;                       // independent key groups (softmax states)
  constexpr int kTileBytes = TILE * CH * 16;      // K (or V) bytes of one tile
  constexpr int kPipeBytes = STAGES * 2 * kTileBytes;
  constexpr int kRedO = NGRP * GB * TD * EPC;     // floats: per group partial outputs
  constexpr int kRedBytes = (kRedO + NGRP * GB * 2) * 4;
  constexpr int kSmemBytes = kPipeBytes > kRedBytes ? kPipeBytes : kRedBytes;
  static_assert(EPC % 8 == 0 || sizeof(T) != 2, "q chunks are 8 elements of T");
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");
  __shared__ __align__(16) unsigned char smem[kSmemBytes];

  const int split = blockIdx.x;
  const int b = blockIdx.y;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int kvh = int(blockIdx.z) / a.head_chunks;
  const int g0 = (int(blockIdx.z) % a.head_chunks) * GB;  // first group member handled here
  const int gcount = min(GB, group - g0);
  const int qh0 = kvh * group + g0;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int dl = lane % TD;               // chunk (dims dl*EPC ..) of this lane
  const int grp = warp * KPW + lane / TD;  // key group of this lane
  const bool dim_active = dl < CH;

  const RowKeys rk = row_keys(p, b, kvh);
  const KeySpan keys = decode_keys(rk, p.window_left);
  const int64_t row = rk.row;
  const int lo = keys.first, L = keys.end();
  // This split's keys, from the real length: the chunk grows when L exceeds the host hint.
  const int n = L - lo;
  const int ns = int(gridDim.x);
  const int64_t need = ((int64_t(n) + ns - 1) / ns + TILE - 1) / TILE * TILE;
  const int64_t chunk = a.chunk_host > need ? int64_t(a.chunk_host) : need;
  const int64_t start64 = int64_t(lo) + int64_t(split) * chunk;
  const int start = start64 < L ? int(start64) : L;
  const int end = start64 + chunk < L ? int(start64 + chunk) : L;
  const int ntiles = ceil_div_i(end - start, TILE);

  // q of the GB heads, this lane's dims, scaled into the log2 (or softcap) domain.
  float q[GB][EPC];
#pragma unroll
  for (int g = 0; g < GB; ++g) {
#pragma unroll
    for (int i = 0; i < EPC; ++i) q[g][i] = 0.f;
    if (g < gcount && dim_active) {
      const T* qp = static_cast<const T*>(p.q) + int64_t(b) * p.q_stride_tok + int64_t(qh0 + g) * p.q_stride_head +
                    dl * EPC;
#pragma unroll
      for (int c = 0; c < EPC / 8; ++c) {
        float x[8];
        chunk_to_float<T>(ld_global_16_nc(qp + c * 8), x);
#pragma unroll
        for (int i = 0; i < 8; ++i) q[g][c * 8 + i] = x[i] * a.q_scale;
      }
    }
  }

  const S* kbase = static_cast<const S*>(p.kv.k) + row * p.kv.k_stride_row + int64_t(kvh) * p.kv.k_stride_head;
  const S* vbase = static_cast<const S*>(p.kv.v) + row * p.kv.v_stride_row + int64_t(kvh) * p.kv.v_stride_head;

  // Issues the cp.async copies of tile t into pipeline stage st (keys past end: zero fill).
  auto load_tile = [&](int t, int st) {
    unsigned char* sk = smem + st * 2 * kTileBytes;
    unsigned char* sv = sk + kTileBytes;
    const int tstart = start + t * TILE;
#pragma unroll
    for (int c = tid; c < TILE * CH; c += NT) {
      const int r = c / CH;
      const int cc = c - r * CH;
      const int j = tstart + r;
      const bool valid = j < end;
      const char* ks = valid ? reinterpret_cast<const char*>(kbase + int64_t(j) * p.kv.k_stride_tok) + cc * 16
                             : static_cast<const char*>(p.kv.k);
      const char* vs = valid ? reinterpret_cast<const char*>(vbase + int64_t(j) * p.kv.v_stride_tok) + cc * 16
                             : static_cast<const char*>(p.kv.v);
      cp_async_16_zfill(sk + c * 16, ks, valid);
      cp_async_16_zfill(sv + c * 16, vs, valid);
    }
  };

  SoftmaxState st[GB];
  float o[GB][EPC];
#pragma unroll
  for (int g = 0; g < GB; ++g)
#pragma unroll
    for (int i = 0; i < EPC; ++i) o[g][i] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ntiles) load_tile(s, s);
    cp_async_commit();
  }

  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<STAGES - 2>();  // this thread's copies of tile t have landed
    __syncthreads();              // everyone's have, and everyone is done with tile t-1
    {
      const int tn = t + STAGES - 1;
      if (tn < ntiles) load_tile(tn, tn % STAGES);  // refills the stage tile t-1 used
      cp_async_commit();
    }
    const unsigned char* sk = smem + (t % STAGES) * 2 * kTileBytes;
    const unsigned char* sv = sk + kTileBytes;
    const int tstart = start + t * TILE;

    // Logits of this lane's NK keys for the GB heads (log2 units; -inf past the end).
    float s[NK][GB];
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
      const int r = kk * KPI + grp;
      const int j = tstart + r;
      float dot[GB];
#pragma unroll
      for (int g = 0; g < GB; ++g) dot[g] = 0.f;
      if (dim_active) {
        float kf[EPC];
        Fmt::decode(ld_shared_16(sk + (r * CH + dl) * 16), kf);
#pragma unroll
        for (int g = 0; g < GB; ++g)
#pragma unroll
          for (int i = 0; i < EPC; ++i) dot[g] = fmaf(q[g][i], kf[i], dot[g]);
      }
#pragma unroll
      for (int off = TD / 2; off > 0; off >>= 1)
#pragma unroll
        for (int g = 0; g < GB; ++g) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], off);
      const bool valid = j < end;
      const float ks = valid ? Fmt::k_scale(fa, row, j, kvh) : 0.f;
#pragma unroll
      for (int g = 0; g < GB; ++g) {
        float x = dot[g] * ks;
        if (a.cap2 > 0.f) x = a.cap2 * softcap_tanh(x);
        s[kk][g] = valid ? x : -INFINITY;
      }
    }

    // Online softmax per head over the NK keys, then o = o * f + sum p * v.
    float p[NK][GB];
#pragma unroll
    for (int g = 0; g < GB; ++g) {
      float bm = s[0][g];
#pragma unroll
      for (int kk = 1; kk < NK; ++kk) bm = fmaxf(bm, s[kk][g]);
      const float f = st[g].rescale_to(bm);
      float sum = 0.f;
#pragma unroll
      for (int kk = 0; kk < NK; ++kk) {
        p[kk][g] = s[kk][g] == -INFINITY ? 0.f : st[g].weight(s[kk][g]);
        sum += p[kk][g];
      }
      st[g].add(sum);
#pragma unroll
      for (int i = 0; i < EPC; ++i) o[g][i] *= f;
    }
    if (dim_active) {
#pragma unroll
      for (int kk = 0; kk < NK; ++kk) {
        const int r = kk * KPI + grp;
        const int j = tstart + r;
        const float vsc = j < end ? Fmt::v_scale(fa, row, j, kvh) : 0.f;
        float vf[EPC];
        Fmt::decode(ld_shared_16(sv + (r * CH + dl) * 16), vf);
#pragma unroll
        for (int g = 0; g < GB; ++g) {
          const float w = p[kk][g] * vsc;
#pragma unroll
          for (int i = 0; i < EPC; ++i) o[g][i] = fmaf(w, vf[i], o[g][i]);
        }
      }
    }
  }
  cp_async_wait_all();
  __syncthreads();  // pipeline smem is reused below

  // Merge the NGRP key groups: unnormalised outputs and (m, d) per group and head.
  float* red_o = reinterpret_cast<float*>(smem);  // [NGRP][GB][TD * EPC]
  float* red_md = red_o + kRedO;                  // [NGRP][GB][2]
#pragma unroll
  for (int g = 0; g < GB; ++g) {
    if (dim_active) {
      float* dst = red_o + ((grp * GB + g) * TD + dl) * EPC;
#pragma unroll
      for (int i = 0; i < EPC; i += 4) *reinterpret_cast<float4*>(dst + i) = make_float4(o[g][i], o[g][i + 1], o[g][i + 2], o[g][i + 3]);
    }
    if (dl == 0) {
      red_md[(grp * GB + g) * 2] = st[g].m;
      red_md[(grp * GB + g) * 2 + 1] = st[g].d;
    }
  }
  __syncthreads();

  for (int idx = tid; idx < GB * HD; idx += NT) {
    const int g = idx / HD;
    const int d = idx - g * HD;
    if (g >= gcount) break;  // idx grows, so g only grows
    // Group k's state of head g: red_md[(k * GB + g) * 2 + {0, 1}], output red_o[(k * GB + g) * TD * EPC + d].
    float w[NGRP];
    const SoftmaxState merged = merge_partials(red_md + g * 2, red_md + g * 2 + 1, GB * 2, w);
    const float acc = merge_output(w, red_o + g * TD * EPC + d, GB * TD * EPC);
    const float inv = merged.inv_sum();
    const float lse = merged.lse();
    const int qh = qh0 + g;
    if (ns == 1) {
      T* op = static_cast<T*>(p.out) + int64_t(b) * p.o_stride_tok + int64_t(qh) * p.o_stride_head;
      op[d] = float_to_elem<T>(acc * inv);
      if (p.lse != nullptr && d == 0) p.lse[int64_t(b) * p.num_q_heads + qh] = lse;
    } else {
      const int64_t slot = (int64_t(split) * p.batch + b) * p.num_q_heads + qh;
      a.o_part[slot * HD + d] = acc * inv;
      if (d == 0) a.lse_part[slot] = lse;
    }
  }
}

// Launches decode_split_kernel for one head dim: picks the element type and group block.
// K/V are stored in the plain format of the q dtype (validated by the caller); a quantized
// format adds its case here.
template <int HD>
void launch_decode_split(const AttentionParams& p, const DecodePlanArgs& a, int group_block, int num_splits) {
  const dim3 grid(unsigned(num_splits), unsigned(p.batch), unsigned(p.num_kv_heads * a.head_chunks));
  cudaStream_t s = as_stream(p.stream);
  auto go = [&](auto tag, auto gb) {
    using T = decltype(tag);
    using Format = PlainFormat<T>;
    constexpr int GB = decltype(gb)::value;
    decode_split_kernel<HD, T, Format, GB><<<grid, DecodeSplitConfigFor<HD, Format>::kThreads, 0, s>>>(
        p, a, typename DeviceKvFormat<Format>::Args{});
  };
  auto by_gb = [&](auto tag) {
    switch (group_block) {
      case 1: go(tag, std::integral_constant<int, 1>{}); break;
      case 2: go(tag, std::integral_constant<int, 2>{}); break;
      case 4: go(tag, std::integral_constant<int, 4>{}); break;
      default: go(tag, std::integral_constant<int, 8>{}); break;
    }
  };
  if (p.dtype == kBFloat16) {
    by_gb(bf16_t{});
  } else {
    by_gb(f16_t{});
  }
  cuda_check_launch("decode_split_kernel");
}

// Body of one decode_hd<HD>.cu file: the launcher declared in decode_args.cuh.
#define VATTN_DECODE_SPLIT_LAUNCHER(HD)                                                                   \
  void launch_decode_split_hd##HD(const AttentionParams& p, const DecodePlanArgs& a, int group_block, \
                                  int num_splits) {                                                   \
    launch_decode_split<HD>(p, a, group_block, num_splits);                                           \
  }

}  // namespace cuda
}  // namespace vattn
