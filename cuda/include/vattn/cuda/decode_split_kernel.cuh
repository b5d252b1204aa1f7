#pragma once
// The split-KV (flash-decoding) decode kernel.
//
// Grid (split, batch row, kv head x head chunk). A CTA handles the keys [start, end) of one
// split of one (row, kv head) for GB q heads of the GQA group at once, so each K/V tile is
// read from memory once for all of them (a group larger than 8 is spread over
// ceil(group / 8) CTAs). K/V tiles stream into shared memory through a kStages-deep cp.async
// pipeline (16-byte copies, zero-filled past the end, so no slot past the row's length is
// ever read). Compute: kLanesPerKey lanes own one 8-element piece of a key each, hold q for the
// GB heads in registers (pre-scaled into the log2 domain), reduce the partial dot products
// with xor shuffles (all lanes end with bitwise the same logit), and keep an online-softmax
// state and an fp32 partial output per key group; the key groups are merged in shared memory
// at the end (merge_partials). The CTA writes out / lse directly when there is one split,
// else an fp32 normalised partial and its LSE into the workspace for decode_split_merge_kernel.
// T: q/out element type (f16_t or bf16_t); KF / VF: the kv_format.h storage formats of K and V
// (the plain format of T on both sides, or any pair of quantized formats), read through their
// device traits (kv_device_format.cuh). Quantized K/V: each lane decodes its 8-element piece
// from shared memory in registers; the per-token scale words of the tile travel with it
// (4-byte cp.async into the same stage); the scales apply per key, never per element: logit =
// scale_k * (q . code) (+ zero_k * sum(q) for int4), and V accumulates (p * scale_v) * code
// (+ p * zero_v into one scalar per head, added to every dim before the merge).
// int4_ch keys (a scale s_c and zero z_c per channel over groups of G = HD / 2 tokens): the
// group's parameters fold into q instead, logit = sum_c (q_c s_c) code_c + sum_c q_c z_c, which is
// q . (code * s + z) up to the rounding of the stored value's product and sum (reference.py
// rounds code * s, then + z, in fp32; the fold rounds q_c s_c instead). Each lane keeps q_c s_c
// for its 8 channels and its part of sum q_c z_c for the group of the key it last read, and
// refolds (the group's 2 x 8 parameters of its channels, read from the cache, and q from shared
// memory) when its next key lies in another group: once per G / kKeysPerIter keys of a lane.
// The partial sums of q z join the dot product before the reduction over the key's lanes, so
// they cost no shuffle.
// KV views (kPaged, chosen at launch): contiguous, or paged (a block table per row). A paged
// instance forms each key's address from its block (kv_paged.cuh: one table lookup per key and
// side, only for keys inside the split), so block boundaries may fall anywhere in a tile or a
// split; int4_ch groups never cross a block (check_grouped_kv), so a group's words are addressed
// from its first token. The contiguous instance is the kernel as it was before paged views.
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "vattn/cuda/check.cuh"
#include "vattn/cuda/cp_async.cuh"
#include "vattn/cuda/decode_args.cuh"
#include "vattn/cuda/kv_device_format.cuh"
#include "vattn/cuda/kv_paged.cuh"
#include "vattn/cuda/vec.cuh"
#include "vattn/dtypes.h"
#include "vattn/key_range.h"
#include "vattn/kv_format.h"
#include "vattn/params.h"
#include "vattn/softmax_state.h"

namespace vattn {
namespace cuda {

// 4-byte cp.async (scale words; .ca is the only cache mode for 4 bytes). Zero-fills dst and
// reads nothing when !valid (src must still be a mapped address: cp_async_zero_src()).
__device__ __forceinline__ void cp_async_4_zfill(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
#else
  *static_cast<float*>(smem) = valid ? *static_cast<const float*>(gmem) : 0.f;
#endif
}

// Minimum resident CTAs per SM the kernel's registers are sized for: 0 (ptxas's own choice) for
// contiguous views of every format but int4_ch keys, where ptxas's occupancy-driven register
// target (80 at GB = 2 with int8 V on sm_90a) spilled; 1 lets it take the registers it needs (122
// there). Paged instances take 1 too (ptxas aimed at 64 registers for fp8 K / int4 V at GB = 1
// and spilled 8 B). The decode plan reads the real occupancy of each instance, so the split
// count follows.
template <typename KF, bool kPaged>
constexpr int decode_split_min_blocks() {
  return (is_grouped_format<KF>::value || kPaged) ? 1 : 0;
}

// kPaged: the view has a block table (p.kv.block_table set; the launcher picks the instance), so
// the contiguous instance is the code it was before paged views existed (its registers and
// occupancy unchanged) and the paged one pays for its table lookups alone.
template <int HD, typename T, typename KF, typename VF, int GB, bool kPaged>
__global__ void __launch_bounds__(DecodeSplitConfigFor<HD, KF, VF>::kThreads, decode_split_min_blocks<KF, kPaged>())
    decode_split_kernel(const AttentionParams p, const DecodePlanArgs a) {
  using KD = DeviceKvFormat<KF>;
  using VD = DeviceKvFormat<VF>;
  using Cfg = DecodeSplitConfigFor<HD, KF, VF>;
  using KS = typename KD::storage_t;
  using VS = typename VD::storage_t;
  constexpr int LE = kLaneElems;      // head_dim elements per lane and key
  constexpr int NP = Cfg::kPieces;    // active lanes per key
  constexpr int CHK = Cfg::kChunksK;  // 16-byte chunks of one K vector
  constexpr int CHV = Cfg::kChunksV;
  constexpr int TD = Cfg::kLanesPerKey;
  constexpr int KPW = Cfg::kKeysPerWarp;
  constexpr int KPI = Cfg::kKeysPerIter;
  constexpr int NK = Cfg::kItersPerTile;
  constexpr int SUB = Cfg::kSubTiles;
  constexpr int TILE = Cfg::kTile;
  constexpr int STAGES = Cfg::kStages;
  constexpr int NT = Cfg::kThreads;
  constexpr bool KG = is_grouped_format<KF>::value;  // int4_ch keys: parameters folded into q
  constexpr int KW = KD::kScaleWords;                // scale words per K / V vector
  constexpr int VW = VD::kScaleWords;
  constexpr int NGRP = KPI;        // independent key groups (softmax states)
  constexpr int kRowK = CHK * 16;  // bytes of one K (V) vector
  constexpr int kRowV = CHV * 16;
  constexpr int kTileK = TILE * kRowK;  // stage layout: K tile, V tile, K words, V words
  constexpr int kTileV = TILE * kRowV;
  constexpr int kWordsK = TILE * KW * 4;
  constexpr int kWordsV = TILE * VW * 4;
  constexpr int kStageBytes = (kTileK + kTileV + kWordsK + kWordsV + 15) / 16 * 16;
  constexpr int kPipeBytes = STAGES * kStageBytes;
  constexpr int kRedO = NGRP * GB * TD * LE;  // floats: per group partial outputs
  constexpr int kRedBytes = (kRedO + NGRP * GB * 2) * 4;
  constexpr int kSmemBytes = kPipeBytes > kRedBytes ? kPipeBytes : kRedBytes;
  static_assert(sizeof(T) == 2 && LE == 8, "q pieces are one 16-byte chunk of T");
  static_assert(KD::kPieceBytes * NP == kRowK && VD::kPieceBytes * NP == kRowV, "pieces tile the vector");
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
  const int dl = lane % TD;                // piece (dims dl*LE ..) of this lane
  const int grp = warp * KPW + lane / TD;  // key group of this lane
  const bool dim_active = dl < NP;

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

  // q of the GB heads, this lane's dims, scaled into the log2 (or softcap) domain; and, for a
  // K zero point, sum(q) over all dims of each head (the same value in every lane of the key).
  float q[GB][LE];
  float qsum[GB];
#pragma unroll
  for (int g = 0; g < GB; ++g) {
    qsum[g] = 0.f;
#pragma unroll
    for (int i = 0; i < LE; ++i) q[g][i] = 0.f;
    if (g < gcount && dim_active) {
      const T* qp =
          static_cast<const T*>(p.q) + int64_t(b) * p.q_stride_tok + int64_t(qh0 + g) * p.q_stride_head + dl * LE;
      float x[8];
      chunk_to_float<T>(ld_global_16_nc(qp), x);
#pragma unroll
      for (int i = 0; i < LE; ++i) {
        q[g][i] = x[i] * a.q_scale;
        qsum[g] += q[g][i];
      }
    }
  }
  if constexpr (KD::kZero) {
#pragma unroll
    for (int off = TD / 2; off > 0; off >>= 1)
#pragma unroll
      for (int g = 0; g < GB; ++g) qsum[g] += __shfl_xor_sync(0xffffffffu, qsum[g], off);
  }

  // int4_ch keys: q[g][] becomes q * s of the lane's channels for the group before knext, qz[g]
  // this lane's part of q . z (both 0 until the lane's first key in range folds a group). The
  // scaled q of the CTA's heads waits in shared memory (q_sm, written once by the lanes of key
  // group 0) so a fold holds only one parameter pair and one q value beyond the kernel's own
  // registers.
  constexpr int kQsm = KG ? GB * HD : 1;
  static_assert(kSmemBytes + kQsm * 4 <= 48 * 1024, "static shared memory limit");
  __shared__ float q_sm[kQsm];
  float qz[GB];
#pragma unroll
  for (int g = 0; g < GB; ++g) qz[g] = 0.f;
  int knext = 0;  // first key past the folded group (a lane's keys only grow)
  // Head bases and token offsets (kv_paged.cuh): the row term in the base when contiguous; when
  // paged, each key's block from the table (one lookup per key and side, keys in range only; a
  // block boundary may fall anywhere in a tile or split).
  auto head = [&](auto* data, int64_t s_row, int64_t s_head) {
    return kv_head_base_as<kPaged>(data, row, kvh, s_row, s_head);
  };
  auto tok_off = [&](int j, int64_t s_row, int64_t s_tok) {
    return kv_head_tok_as<kPaged>(p.kv, row, j, s_row, s_tok);
  };
  const float* kgw_head = KG ? head(p.kv.k_scale, p.kv.ks_stride_row, p.kv.ks_stride_head) : nullptr;
  if constexpr (KG) {
    if (grp == 0 && dim_active) {
#pragma unroll
      for (int g = 0; g < GB; ++g)
#pragma unroll
        for (int i = 0; i < LE; ++i) q_sm[g * HD + dl * LE + i] = q[g][i];  // 0 for padded heads
    }
    __syncthreads();
  }
  auto fold_group = [&](int gi) {
    constexpr int G = KG ? Int4ChannelFormat::group(HD) : 1;
    const int32_t ws = int32_t(p.kv.ks_stride_tok);  // check_grouped_kv: offsets fit 32 bits
    // The group's words from its first token on: a paged view holds whole groups in each block
    // (check_grouped_kv: block_size % G == 0), so all G tokens of the group share that block.
    const float* gw = kgw_head + tok_off(gi * G, p.kv.ks_stride_row, p.kv.ks_stride_tok);
#pragma unroll
    for (int g = 0; g < GB; ++g) qz[g] = 0.f;
#pragma unroll
    for (int i = 0; i < LE; ++i) {
      const int c = dl * LE + i, cz = HD + c;
      const float sc = __ldg(gw + (c >> 2) * ws + (c & 3));
      const float ze = __ldg(gw + (cz >> 2) * ws + (cz & 3));
#pragma unroll
      for (int g = 0; g < GB; ++g) {
        const float qi = q_sm[g * HD + c];
        q[g][i] = qi * sc;
        qz[g] = fmaf(qi, ze, qz[g]);
      }
    }
  };

  const KS* kbase = head(static_cast<const KS*>(p.kv.k), p.kv.k_stride_row, p.kv.k_stride_head);
  const VS* vbase = head(static_cast<const VS*>(p.kv.v), p.kv.v_stride_row, p.kv.v_stride_head);

  // Issues the cp.async copies of tile t into pipeline stage st (keys past end: zero fill, so
  // bytes and scale words of those slots read as 0 and nothing past the row is touched; a paged
  // view looks up blocks of keys in range only).
  auto load_tile = [&](int t, int st) {
    unsigned char* sk = smem + st * kStageBytes;
    unsigned char* sv = sk + kTileK;
    const int tstart = start + t * TILE;
#pragma unroll
    for (int c = tid; c < TILE * CHK; c += NT) {
      const int r = c / CHK;
      const int cc = c - r * CHK;
      const int j = tstart + r;
      const bool valid = j < end;
      const char* src = static_cast<const char*>(cp_async_zero_src());
      if (valid)
        src = reinterpret_cast<const char*>(kbase + tok_off(j, p.kv.k_stride_row, p.kv.k_stride_tok)) + cc * 16;
      cp_async_16_zfill(sk + c * 16, src, valid);
    }
#pragma unroll
    for (int c = tid; c < TILE * CHV; c += NT) {
      const int r = c / CHV;
      const int cc = c - r * CHV;
      const int j = tstart + r;
      const bool valid = j < end;
      const char* src = static_cast<const char*>(cp_async_zero_src());
      if (valid)
        src = reinterpret_cast<const char*>(vbase + tok_off(j, p.kv.v_stride_row, p.kv.v_stride_tok)) + cc * 16;
      cp_async_16_zfill(sv + c * 16, src, valid);
    }
    if constexpr (KW > 0) {
      float* wk = reinterpret_cast<float*>(sv + kTileV);
      const float* kw0 = head(p.kv.k_scale, p.kv.ks_stride_row, p.kv.ks_stride_head);
#pragma unroll
      for (int c = tid; c < TILE * KW; c += NT) {
        const int r = c / KW;
        const int j = tstart + r;
        const bool valid = j < end;
        const float* src = static_cast<const float*>(cp_async_zero_src());
        if (valid) src = kw0 + tok_off(j, p.kv.ks_stride_row, p.kv.ks_stride_tok) + (c - r * KW);
        cp_async_4_zfill(wk + c, src, valid);
      }
    }
    if constexpr (VW > 0) {
      float* wv = reinterpret_cast<float*>(sv + kTileV + kWordsK);
      const float* vw0 = head(p.kv.v_scale, p.kv.vs_stride_row, p.kv.vs_stride_head);
#pragma unroll
      for (int c = tid; c < TILE * VW; c += NT) {
        const int r = c / VW;
        const int j = tstart + r;
        const bool valid = j < end;
        const float* src = static_cast<const float*>(cp_async_zero_src());
        if (valid) src = vw0 + tok_off(j, p.kv.vs_stride_row, p.kv.vs_stride_tok) + (c - r * VW);
        cp_async_4_zfill(wv + c, src, valid);
      }
    }
  };

  SoftmaxState st[GB];
  float o[GB][LE];
  float zacc[GB];  // V zero point: sum_j p_j z_j per head (unnormalised, rescaled with o)
#pragma unroll
  for (int g = 0; g < GB; ++g) {
    zacc[g] = 0.f;
#pragma unroll
    for (int i = 0; i < LE; ++i) o[g][i] = 0.f;
  }

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
    const unsigned char* sk = smem + (t % STAGES) * kStageBytes;
    const unsigned char* sv = sk + kTileK;
    const float* wk = reinterpret_cast<const float*>(sv + kTileV);
    const float* wv = reinterpret_cast<const float*>(sv + kTileV + kWordsK);
    const int tstart = start + t * TILE;

#pragma unroll 1
    for (int u = 0; u < SUB; ++u) {
      // Logits of this lane's NK keys of sub-tile u for the GB heads (log2 units; -inf past
      // the end): scale * (q . raw) (+ zero * sum(q)).
      float s[NK][GB];
#pragma unroll
      for (int kk = 0; kk < NK; ++kk) {
        const int r = (u * NK + kk) * KPI + grp;
        const int j = tstart + r;
        if constexpr (KG) {
          // Every lane of the key takes the same branch (same j); a key past the end keeps the
          // lane's last group (its logit is masked below), so nothing past the row is read. A
          // lane's keys grow (sub-tiles, then tiles), so a key at or past knext is a new group.
          if (dim_active && j < end && j >= knext) {
            const int gi = j / Int4ChannelFormat::group(HD);
            fold_group(gi);
            knext = (gi + 1) * Int4ChannelFormat::group(HD);
          }
        }
        float dot[GB];
#pragma unroll
        for (int g = 0; g < GB; ++g) dot[g] = KG ? qz[g] : 0.f;
        if (dim_active) {
          float kf[LE];
          KD::decode(sk + r * kRowK + dl * KD::kPieceBytes, kf);
#pragma unroll
          for (int g = 0; g < GB; ++g)
#pragma unroll
            for (int i = 0; i < LE; ++i) dot[g] = fmaf(q[g][i], kf[i], dot[g]);
        }
#pragma unroll
        for (int off = TD / 2; off > 0; off >>= 1)
#pragma unroll
          for (int g = 0; g < GB; ++g) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], off);
        const bool valid = j < end;
        const float ks = KD::scale(wk + r * KW);
        const float kz = KD::zero(wk + r * KW);
#pragma unroll
        for (int g = 0; g < GB; ++g) {
          float x = dot[g] * ks;
          if constexpr (KD::kZero) x = fmaf(kz, qsum[g], x);
          if (a.cap2 > 0.f) x = a.cap2 * softcap_tanh(x);
          s[kk][g] = valid ? x : -INFINITY;
        }
      }

      // Online softmax per head over the NK keys, then o = o * f + sum p * v.
      float pw[NK][GB];
#pragma unroll
      for (int g = 0; g < GB; ++g) {
        float bm = s[0][g];
#pragma unroll
        for (int kk = 1; kk < NK; ++kk) bm = fmaxf(bm, s[kk][g]);
        const float f = st[g].rescale_to(bm);
        float sum = 0.f;
#pragma unroll
        for (int kk = 0; kk < NK; ++kk) {
          pw[kk][g] = s[kk][g] == -INFINITY ? 0.f : st[g].weight(s[kk][g]);
          sum += pw[kk][g];
        }
        st[g].add(sum);
#pragma unroll
        for (int i = 0; i < LE; ++i) o[g][i] *= f;
        if constexpr (VD::kZero) zacc[g] *= f;
      }
#pragma unroll
      for (int kk = 0; kk < NK; ++kk) {
        const int r = (u * NK + kk) * KPI + grp;
        const float vsc = VD::scale(wv + r * VW);  // 0 past the end (zero-filled), as is p
        if constexpr (VD::kZero) {
          const float vz = VD::zero(wv + r * VW);
#pragma unroll
          for (int g = 0; g < GB; ++g) zacc[g] = fmaf(pw[kk][g], vz, zacc[g]);
        }
        if (dim_active) {
          float vf[LE];
          VD::decode(sv + r * kRowV + dl * VD::kPieceBytes, vf);
#pragma unroll
          for (int g = 0; g < GB; ++g) {
            const float w = pw[kk][g] * vsc;
#pragma unroll
            for (int i = 0; i < LE; ++i) o[g][i] = fmaf(w, vf[i], o[g][i]);
          }
        }
      }
    }
  }
  cp_async_wait_all();
  __syncthreads();  // pipeline smem is reused below

  // Merge the NGRP key groups: unnormalised outputs (V zero point added to every dim) and
  // (m, d) per group and head.
  float* red_o = reinterpret_cast<float*>(smem);  // [NGRP][GB][TD * LE]
  float* red_md = red_o + kRedO;                  // [NGRP][GB][2]
#pragma unroll
  for (int g = 0; g < GB; ++g) {
    if (dim_active) {
      if constexpr (VD::kZero) {
#pragma unroll
        for (int i = 0; i < LE; ++i) o[g][i] += zacc[g];
      }
      float* dst = red_o + ((grp * GB + g) * TD + dl) * LE;
#pragma unroll
      for (int i = 0; i < LE; i += 4)
        *reinterpret_cast<float4*>(dst + i) = make_float4(o[g][i], o[g][i + 1], o[g][i + 2], o[g][i + 3]);
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
    // Group k's state of head g: red_md[(k * GB + g) * 2 + {0, 1}], output red_o[(k * GB + g) * TD * LE + d].
    float w[NGRP];
    const SoftmaxState merged = merge_partials(red_md + g * 2, red_md + g * 2 + 1, GB * 2, w);
    const float acc = merge_output(w, red_o + g * TD * LE + d, GB * TD * LE);
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

// Calls f(kernel, threads) with the decode_split_kernel instance that serves p at this head dim
// and group block: the element type, the K/V format pair (dispatch_attention_kv_pair: the plain
// format of the q dtype, or any pair of quantized formats, int4_ch as K only; the caller
// validated them), GB and the kind of view (kPaged). The launch and the occupancy query both go through here, so they
// always see the same instance.
template <int HD, typename F>
void with_decode_split_kernel(const AttentionParams& p, int group_block, F&& f) {
  auto go = [&](auto tag, auto kf, auto vf, auto gb) {
    using T = decltype(tag);
    using KF = decltype(kf);
    using VF = decltype(vf);
    constexpr int GB = decltype(gb)::value;
    if constexpr (GB <= decode_split_max_group_block<KF, VF>()) {
      if (p.kv.block_table != nullptr)
        f(&decode_split_kernel<HD, T, KF, VF, GB, true>, DecodeSplitConfigFor<HD, KF, VF>::kThreads);
      else
        f(&decode_split_kernel<HD, T, KF, VF, GB, false>, DecodeSplitConfigFor<HD, KF, VF>::kThreads);
    } else {
      throw std::logic_error("decode_attention: group block above the split kernel's maximum for these formats");
    }
  };
  auto by_gb = [&](auto tag) {
    using T = decltype(tag);
    dispatch_attention_kv_pair<T>(p.kv.k_format, p.kv.v_format, "decode_attention", [&](auto kf, auto vf) {
      switch (group_block) {
        case 1: go(tag, kf, vf, std::integral_constant<int, 1>{}); break;
        case 2: go(tag, kf, vf, std::integral_constant<int, 2>{}); break;
        case 4: go(tag, kf, vf, std::integral_constant<int, 4>{}); break;
        case 8: go(tag, kf, vf, std::integral_constant<int, 8>{}); break;
        default: throw std::logic_error("decode_attention: group block must be 1, 2, 4 or 8");
      }
    });
  };
  if (p.dtype == kBFloat16) {
    by_gb(bf16_t{});
  } else {
    by_gb(f16_t{});
  }
}

// Launches decode_split_kernel for one head dim: grid (num_splits, batch, kv heads x head chunks),
// kDecodeSplitDynSmem bytes of dynamic shared memory (none: see decode_args.cuh).
template <int HD>
void launch_decode_split(const AttentionParams& p, const DecodePlanArgs& a, int group_block, int num_splits) {
  const dim3 grid(unsigned(num_splits), unsigned(p.batch), unsigned(p.num_kv_heads * a.head_chunks));
  cudaStream_t s = as_stream(p.stream);
  with_decode_split_kernel<HD>(
      p, group_block, [&](auto kernel, int threads) { kernel<<<grid, threads, kDecodeSplitDynSmem, s>>>(p, a); });
  cuda_check_launch("decode_split_kernel");
}

// Max resident CTAs per SM of the instance launch_decode_split<HD> would launch for p and
// group_block, on the current device (cached per device and instance: decode.cu).
template <int HD>
int decode_split_occupancy(const AttentionParams& p, int group_block) {
  int occ = 0;
  with_decode_split_kernel<HD>(p, group_block, [&](auto kernel, int threads) {
    occ = decode_split_kernel_occupancy(reinterpret_cast<const void*>(kernel), threads, kDecodeSplitDynSmem, HD,
                                        group_block);
  });
  return occ;
}

// Body of one decode_hd<HD>.cu file: the launcher and the occupancy query declared in
// decode_args.cuh.
#define VATTN_DECODE_SPLIT_LAUNCHER(HD)                                                               \
  void launch_decode_split_hd##HD(const AttentionParams& p, const DecodePlanArgs& a, int group_block, \
                                  int num_splits) {                                                   \
    launch_decode_split<HD>(p, a, group_block, num_splits);                                           \
  }                                                                                                   \
  int decode_split_occupancy_hd##HD(const AttentionParams& p, int group_block) {                      \
    return decode_split_occupancy<HD>(p, group_block);                                                \
  }

}  // namespace cuda
}  // namespace vattn
