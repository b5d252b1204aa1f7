#pragma once
// Tensor-core prefill / chunked-prefill kernel (impl == 0), FlashAttention-2 style.
//
// CTA = (query block of BM rows, q head, batch row); 4 warps, warp w owns query rows
// [w*16*MT, (w+1)*16*MT) of the block (MT m16 tiles). Q is loaded once into registers (mma A
// fragments). Key tiles of BN rows go through shared memory: K(t) is in flight while the
// previous tile's P*V runs, V(t) while S = Q K(t)^T and the softmax run (one buffer each, the
// FA2 schedule). S, the online-softmax state and O stay in registers; P is rounded to 16 bits
// in registers and fed to the second mma directly (the C layout of S is the A layout of P).
//
// KV views: contiguous, or paged (block tables): the tile loaders locate every tile row's token
// (kv_paged.cuh; a block boundary may fall inside a tile), branching once per tile on the kind
// of view, so the contiguous loop is unchanged.
//
// K/V storage: KF / VF are the formats of K and V (kv_format.h): the plain format of T on both
// sides (tiles copied with cp.async), or quantized formats (each tile dequantized into the same
// swizzled 16-bit tile with ordinary loads and shared stores; prefill_tile.cuh). The schedule
// below is correct for both kinds of loader: every write into a tile buffer happens after a
// __syncthreads that follows the last read of the buffer's previous tile, and every read of a
// tile happens after a __syncthreads that follows its writes (for cp.async, after the wait).
// What changes is the overlap: a cp.async tile streams in while the warp computes; a
// quantized tile is loaded, converted and stored where it is issued, so its global latency is
// hidden only by the other warps on the SM (it moves 1/2 or 1/4 of the bytes).
//
// Causal, bottom-right aligned: query i of a row with n_b queries and L keys sits at
// pos = L - n_b + i and sees keys max(0, pos - window_left) <= j <= pos. The block only visits
// key tiles that intersect [k_lo, k_hi] (the union of its rows' ranges); masks are evaluated
// only for tiles not fully visible to every row.
#include <cmath>

#include "vattn/cuda/mma.cuh"
#include "vattn/cuda/prefill_common.cuh"
#include "vattn/cuda/prefill_tile.cuh"
#include "vattn/softmax_state.h"

namespace vattn {
namespace prefill {

template <int D_, int MT_, int BN_, int MinBlocks_>
struct Fa2Config {
  static constexpr int D = D_;
  static constexpr int MT = MT_;  // m16 tiles per warp
  static constexpr int BN = BN_;  // keys per tile
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int BM = 16 * MT * kWarps;
  static constexpr int kSmemBytes = (BM + 2 * BN) * D * 2;  // Q, K, V tiles
  static constexpr int kMinBlocks = MinBlocks_;             // CTAs per SM the register budget is sized for
  static_assert(BN % 16 == 0 && D % 64 == 0, "tile shapes");
};

template <typename T, typename KF, typename VF, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) prefill_fa2_kernel(const AttentionParams p) {
  constexpr int D = Cfg::D, MT = Cfg::MT, BN = Cfg::BN, BM = Cfg::BM, NT = Cfg::kThreads;
  using Layout = TileLayout<D>;
  using KLoader = KVTileLoader<KF, T>;
  using VLoader = KVTileLoader<VF, T>;
  // Tiles in flight as cp.async groups: commits and waits are needed only for those (the Q
  // block in the prologue is always cp.async).
  constexpr bool kAsyncKV = KLoader::kAsync || VLoader::kAsync;
  using Mma = mma::Mma16816<T>;

  // Heaviest query blocks (last in the row: most keys) are scheduled first.
  const int m_block = int(gridDim.x) - 1 - int(blockIdx.x);
  const int h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tg = lane & 3;  // mma groupID / threadID_in_group

  const int q_start = p.cu_seqlens_q[b];
  const int n_b = p.cu_seqlens_q[b + 1] - q_start;
  const int m0 = m_block * BM;
  if (m0 >= n_b) return;                  // uniform over the CTA
  const int m_valid = min(BM, n_b - m0);  // real query rows in this block

  const int kvh = h / (p.num_q_heads / p.num_kv_heads);
  const RowKeys rk = row_keys(p, b, kvh);
  const int shift = rk.len - n_b;  // pos(block row r) = shift + m0 + r
  const int pos_first = shift + m0;
  const int pos_last = shift + m0 + m_valid - 1;
  const int wl = p.window_left;
  const KeySpan keys = visible_keys(pos_first, pos_last, rk.readable, wl);  // union over the rows
  const int k_lo = keys.first, k_hi = keys.last;

  T* out_blk = static_cast<T*>(p.out) + int64_t(q_start + m0) * p.o_stride_tok + int64_t(h) * p.o_stride_head;
  float* lse_blk = p.lse ? p.lse + int64_t(q_start + m0) * p.num_q_heads + h : nullptr;

  if (k_hi < k_lo) {  // no row of the block sees any key: zero output, lse = -inf
    for (int idx = tid; idx < m_valid * D; idx += NT) { out_blk[int64_t(idx / D) * p.o_stride_tok + idx % D] = T{0}; }
    if (lse_blk)
      for (int r = tid; r < m_valid; r += NT) lse_blk[int64_t(r) * p.num_q_heads] = -INFINITY;
    return;
  }

  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t sQ = mma::smem_addr(smem_raw);
  const uint32_t sK = sQ + BM * D * 2;
  const uint32_t sV = sK + BN * D * 2;

  const uint16_t* q_blk =
      static_cast<const uint16_t*>(p.q) + int64_t(q_start + m0) * p.q_stride_tok + int64_t(h) * p.q_stride_head;
  // K / V sides of (row, kv head): head bases (kv_paged.cuh; contiguous or paged views) and the
  // strides the loaders form each tile row's address from.
  const KVCacheView& kv = p.kv;
  const int64_t row = rk.row;
  const KvTileSide kside{cuda::kv_head_base(static_cast<const typename KF::storage_t*>(kv.k), kv, row, kvh,
                                            kv.k_stride_row, kv.k_stride_head),
                         kv.k_stride_row,
                         kv.k_stride_tok,
                         head_scales<KF>(kv, kv.k_scale, row, kvh, kv.ks_stride_row, kv.ks_stride_head),
                         kv.ks_stride_row,
                         kv.ks_stride_tok};
  const KvTileSide vside{cuda::kv_head_base(static_cast<const typename VF::storage_t*>(kv.v), kv, row, kvh,
                                            kv.v_stride_row, kv.v_stride_head),
                         kv.v_stride_row,
                         kv.v_stride_tok,
                         head_scales<VF>(kv, kv.v_scale, row, kvh, kv.vs_stride_row, kv.vs_stride_head),
                         kv.vs_stride_row,
                         kv.vs_stride_tok};

  const int t_first = k_lo / BN, t_last = k_hi / BN;

  // Prologue: Q block (rows >= m_valid zero-filled) and the first K tile.
  load_tile_16bit<D, BM, NT>(sQ, q_blk, p.q_stride_tok, 0, 0, m_valid, tid);
  KLoader::template load<D, BN, NT>(sK, kv, row, kside, t_first * BN, k_lo - t_first * BN, k_hi + 1 - t_first * BN,
                                    tid);
  cuda::cp_async_commit();
  cuda::cp_async_wait<0>();
  __syncthreads();

  // Q fragments, kept for the whole key loop. For m tile mt and k step kk (dims 16kk..16kk+15):
  // lanes 0-15 address rows R+0..15 at chunk 2kk, lanes 16-31 the same rows at chunk 2kk+1,
  // which yields a[0..3] in the A layout (matrix 0: rows R..R+7 / cols lo, 1: R+8.. / lo,
  // 2: R.. / hi, 3: R+8.. / hi).
  uint32_t qf[MT][D / 16][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int r = (warp * MT + mt) * 16 + (lane & 15);
      mma::ldmatrix_x4(qf[mt][kk], sQ + Layout::offset(r, kk * 2 + (lane >> 4)));
    }
  }

  float o[MT][D / 8][4];             // O accumulator, C layout per 8-dim tile
  float row_m[MT][2], row_d[MT][2];  // per thread: rows g and g+8 of each m tile (log2 units)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    row_m[mt][0] = row_m[mt][1] = -INFINITY;
    row_d[mt][0] = row_d[mt][1] = 0.f;
  }

  // Per-lane ldmatrix offsets for K and V. The rows a lane addresses differ by multiples of 8,
  // so the swizzle term (c ^ (r & 7)) depends only on lane & 7 and the low 3 bits of the chunk:
  // offset(r + 8i, 8j + c3) = offset(r, c3) + 8i * row_bytes + 128j. Four offsets per operand
  // (c3 = 2 * (step & 3) + lane's chunk bit) plus compile-time immediates cover every access.
  constexpr int kRowBytes = D * 2;
  uint32_t koff[4], voff[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    koff[j] = sK + Layout::offset((lane & 7) + ((lane >> 4) << 3), 2 * j + ((lane >> 3) & 1));
    voff[j] = sV + Layout::offset((lane & 7) + (((lane >> 3) & 1) << 3), 2 * j + (lane >> 4));
  }

  const bool capped = p.softcap > 0.f;
  const float scale_log2 = p.scale * kLog2e;
  const float cap_in = capped ? p.scale / p.softcap : 0.f;
  const float cap_out = capped ? p.softcap * kLog2e : 0.f;
  // Conservative bounds over all BM rows (rows >= m_valid only see more keys, and are not stored).
  const int pos_row_last = shift + m0 + BM - 1;

  for (int t = t_first; t <= t_last; ++t) {
    const int n0 = t * BN;
    if (t != t_first) {  // K(t) landed, and every warp finished P*V of tile t-1 (V buffer free)
      if constexpr (kAsyncKV) cuda::cp_async_wait<0>();
      __syncthreads();
    }
    VLoader::template load<D, BN, NT>(sV, kv, row, vside, n0, k_lo - n0, k_hi + 1 - n0, tid);
    if constexpr (kAsyncKV) cuda::cp_async_commit();

    // S = Q K^T. K tile rows are keys. For key pair-tile np (keys 16np..16np+15) and k step kk:
    // matrix 0 = keys +0..7 / dims lo (b0 of n tile 2np), 1 = keys +0..7 / dims hi (b1 of 2np),
    // 2 = keys +8..15 / dims lo (b0 of 2np+1), 3 = keys +8..15 / dims hi (b1 of 2np+1).
    // Non-transposed ldmatrix gives lane (g, t) K[key g][dims 2t, 2t+1] = B(k = 2t.., n = g).
    float s[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t kb[4];  // rows np*16 + (lane & 7) + 8*(lane >> 4), chunk 2kk + ((lane >> 3) & 1)
        mma::ldmatrix_x4(kb, koff[kk & 3] + (kk >> 2) * 128 + np * 16 * kRowBytes);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma::run(s[mt][2 * np], qf[mt][kk], kb[0], kb[1]);
          Mma::run(s[mt][2 * np + 1], qf[mt][kk], kb[2], kb[3]);
        }
      }
    }

    // Logits in log2 units, masked where needed. Element (mt, nt, c) of this thread is block
    // row (warp*MT + mt)*16 + g + 8*(c >> 1) and key n0 + 8*nt + 2*tg + (c & 1).
    const bool full = (n0 + BN - 1 <= min(pos_first, k_hi)) && (wl < 0 || n0 >= pos_row_last - wl);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          float x = capped ? cap_out * softcap_tanh(s[mt][nt][c] * cap_in) : s[mt][nt][c] * scale_log2;
          if (!full) {
            const int pos = shift + m0 + (warp * MT + mt) * 16 + g + 8 * (c >> 1);
            const int key = n0 + 8 * nt + 2 * tg + (c & 1);
            const int hi_r = min(pos, k_hi);
            const int lo_r = wl >= 0 ? pos - wl : 0;
            if (key > hi_r || key < lo_r) x = -INFINITY;
          }
          s[mt][nt][c] = x;
        }
      }
    }

    // Online softmax per row (SoftmaxState semantics). The four lanes of a quad share a row:
    // max over the quad, so all of them rescale by the same factor. Sums stay per lane until
    // the end. A row with nothing visible so far keeps m = -inf and uses 0 as reference, so
    // exp2(-inf - 0) = 0 and no inf - inf appears.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * rh], s[mt][nt][2 * rh + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(row_m[mt][rh], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float f = exp2f(row_m[mt][rh] - m_use);  // 0 while nothing was accumulated
        row_m[mt][rh] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
          const float p0 = exp2f(s[mt][nt][2 * rh] - m_use);
          const float p1 = exp2f(s[mt][nt][2 * rh + 1] - m_use);
          s[mt][nt][2 * rh] = p0;
          s[mt][nt][2 * rh + 1] = p1;
          sum += p0 + p1;
        }
        row_d[mt][rh] = row_d[mt][rh] * f + sum;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          o[mt][dt][2 * rh] *= f;
          o[mt][dt][2 * rh + 1] *= f;
        }
      }
    }

    if constexpr (kAsyncKV) cuda::cp_async_wait<0>();  // V(t) landed
    __syncthreads();                                   // ... for every thread, and every warp is done reading K(t)
    if (t < t_last) {
      const int n1 = n0 + BN;
      KLoader::template load<D, BN, NT>(sK, kv, row, kside, n1, k_lo - n1, k_hi + 1 - n1, tid);
      if constexpr (kAsyncKV) cuda::cp_async_commit();
    }

    // O += P V. P for key step kk (keys 16kk..16kk+15) is S n tiles 2kk and 2kk+1 repacked:
    // a[0] = (row g, keys 2t..) = tile 2kk c0,c1; a[1] = row g+8 = tile 2kk c2,c3;
    // a[2] = tile 2kk+1 c0,c1; a[3] = tile 2kk+1 c2,c3.
    // V tile rows are keys, so B(k = key, n = dim) needs the transposed ldmatrix: for dim pair
    // tile dp, matrix 0 = keys +0..7 / dims lo (b0 of d tile 2dp), 1 = keys +8..15 / dims lo
    // (b1 of 2dp), 2 = keys +0..7 / dims hi (b0 of 2dp+1), 3 = keys +8..15 / dims hi (b1).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = cuda::pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = cuda::pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = cuda::pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = cuda::pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vb[4];  // rows kk*16 + (lane & 7) + 8*((lane >> 3) & 1), chunk 2dp + (lane >> 4)
        mma::ldmatrix_x4_trans(vb, voff[dp & 3] + (dp >> 2) * 128 + kk * 16 * kRowBytes);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma::run(o[mt][2 * dp], pa[mt], vb[0], vb[1]);
          Mma::run(o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
        }
      }
    }
  }

  // Epilogue: full row sums over the quad, normalise, store rows < m_valid. Lane (g, t) holds
  // dims 8dt + 2t, +1 of rows g and g+8: one 32-bit store each (rows are 16-byte aligned).
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      float d = row_d[mt][rh];
      d += __shfl_xor_sync(0xffffffffu, d, 1);
      d += __shfl_xor_sync(0xffffffffu, d, 2);
      const float inv = d > 0.f ? 1.f / d : 0.f;
      const int r = (warp * MT + mt) * 16 + g + 8 * rh;
      if (r < m_valid) {
        uint32_t* orow = reinterpret_cast<uint32_t*>(out_blk + int64_t(r) * p.o_stride_tok);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          orow[(dt * 8 + 2 * tg) >> 1] = cuda::pack2<T>(o[mt][dt][2 * rh] * inv, o[mt][dt][2 * rh + 1] * inv);
        }
        if (lse_blk && tg == 0) {
          lse_blk[int64_t(r) * p.num_q_heads] = d > 0.f ? (row_m[mt][rh] + log2f(d)) * kLn2 : -INFINITY;
        }
      }
    }
  }
}

}  // namespace prefill
}  // namespace vattn
