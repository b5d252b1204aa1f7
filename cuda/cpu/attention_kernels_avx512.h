// AVX-512 GEMM tiles for query tiles of many rows (prefill): qk_gemm and pv_gemm with the layout
// of the AVX2 copy's (attention_kernels_avx2.h says why K and V are packed into panels), in panels
// of 32 keys (QK) or 32 lanes of V (PV) and a 12 x 32 register tile: 24 accumulators, 2 panel
// vectors and one broadcast live, 24 FMAs per 14 loads. Included by attention_kernels.cpp under
// `#pragma GCC target("avx512f,...")` into namespace avx512, and used only where the CPU has
// AVX-512F: on Zen 5 a 512-bit FMA has the throughput of a 256-bit one, so the same products take
// half the instructions (measured: 245 vs 75 GFLOP/s per core on independent FMA chains).
// No include guard on purpose, like the other bodies.

namespace gemm512 {

constexpr int kGemmKeys = 64;  // keys per packed chunk (two panels)
constexpr int kPanel = 32;
constexpr int kTileRows = 12;

static inline int round_panel(int n) { return (n + kPanel - 1) / kPanel * kPanel; }

// The first n lanes (clamped to [0, 16]) of a 16-lane vector.
static inline __mmask16 lanes(int n) {
  return n <= 0 ? (__mmask16)0 : n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

#include "transpose8.h"

// K^T panels of nk <= kGemmKeys keys: panel c holds keys [32c, 32c + 32) as
// kt[(c * dim + d) * 32 + j % 32]; keys past nk are 0 (their logits are computed and not stored).
static inline void pack_kt(const float* k, int64_t ks, int nk, int dim, float* kt) {
  for (int j0 = 0; j0 < round_panel(nk); j0 += 8) {
    const int rows = nk - j0 >= 8 ? 8 : (nk - j0 > 0 ? nk - j0 : 0);
    float* panel = kt + (int64_t)(j0 / kPanel) * dim * kPanel + j0 % kPanel;
    for (int d0 = 0; d0 < dim; d0 += 8) {
      const int w = dim - d0 < 8 ? dim - d0 : 8;
      const __mmask8 m = (__mmask8)lanes(w);
      __m256 r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = i >= rows ? _mm256_setzero_ps() : _mm256_maskz_loadu_ps(m, k + (j0 + i) * ks + d0);
      transpose8(r);
      for (int i = 0; i < w; ++i) _mm256_storeu_ps(panel + (int64_t)(d0 + i) * kPanel, r[i]);
    }
  }
}

// V panels of n keys: panel c holds lanes [32c, 32c + 32) of every key, vp[(c * n + j) * 32 + l];
// lanes past dim are 0.
static inline void pack_v(const float* v, int64_t vs, int n, int dim, float* vp) {
  for (int j = 0; j < n; ++j) {
    const float* src = v + j * vs;
    for (int d0 = 0; d0 < dim; d0 += kPanel) {
      float* dst = vp + ((int64_t)(d0 / kPanel) * n + j) * kPanel;
      const int w = dim - d0;
      _mm512_storeu_ps(dst, _mm512_maskz_loadu_ps(lanes(w), src + d0));
      _mm512_storeu_ps(dst + 16, _mm512_maskz_loadu_ps(lanes(w - 16), src + d0 + 16));
    }
  }
}

// s[r * lds + c] = q[r] . K^T[:, c] for R <= 12 rows and the 32 columns of one K^T panel; only the
// first ncols (<= 32) columns are stored.
template <int R>
static inline void qk_tile(const float* q, int dim, const float* panel, float* s, int lds, int ncols) {
  __m512 c0[R], c1[R];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int d = 0; d < dim; ++d) {
    const __m512 b0 = _mm512_loadu_ps(panel + d * kPanel), b1 = _mm512_loadu_ps(panel + d * kPanel + 16);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(q[(int64_t)r * dim + d]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
  const __mmask16 m0 = lanes(ncols), m1 = lanes(ncols - 16);
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(s + (int64_t)r * lds, m0, c0[r]);
    _mm512_mask_storeu_ps(s + (int64_t)r * lds + 16, m1, c1[r]);
  }
}

// acc[r][0:w) += sum_j p[r * ldp + j] * panel[j][0:w) for R <= 12 rows, n keys and one V panel
// (w: the valid lanes of the panel, at most 32; acc rows are dim apart).
template <int R>
static inline void pv_tile(const float* p, int ldp, const float* panel, int n, float* acc, int dim, int w) {
  const __mmask16 m0 = lanes(w), m1 = lanes(w - 16);
  __m512 c0[R], c1[R];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    c0[r] = _mm512_maskz_loadu_ps(m0, acc + (int64_t)r * dim);
    c1[r] = _mm512_maskz_loadu_ps(m1, acc + (int64_t)r * dim + 16);
  }
  for (int j = 0; j < n; ++j) {
    const __m512 v0 = _mm512_loadu_ps(panel + j * kPanel), v1 = _mm512_loadu_ps(panel + j * kPanel + 16);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(p[(int64_t)r * ldp + j]);
      c0[r] = _mm512_fmadd_ps(a, v0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, v1, c1[r]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(acc + (int64_t)r * dim, m0, c0[r]);
    _mm512_mask_storeu_ps(acc + (int64_t)r * dim + 16, m1, c1[r]);
  }
}

// Calls tile(std::integral_constant<int, R>{}, i) for row tiles [i, i + R) covering [0, nq): twelves,
// then one tile of the rest.
template <class Tile>
static inline void row_tiles(int nq, Tile&& tile) {
  int i = 0;
  for (; i + kTileRows <= nq; i += kTileRows) tile(std::integral_constant<int, kTileRows>{}, i);
  switch (nq - i) {
    case 11: tile(std::integral_constant<int, 11>{}, i); break;
    case 10: tile(std::integral_constant<int, 10>{}, i); break;
    case 9: tile(std::integral_constant<int, 9>{}, i); break;
    case 8: tile(std::integral_constant<int, 8>{}, i); break;
    case 7: tile(std::integral_constant<int, 7>{}, i); break;
    case 6: tile(std::integral_constant<int, 6>{}, i); break;
    case 5: tile(std::integral_constant<int, 5>{}, i); break;
    case 4: tile(std::integral_constant<int, 4>{}, i); break;
    case 3: tile(std::integral_constant<int, 3>{}, i); break;
    case 2: tile(std::integral_constant<int, 2>{}, i); break;
    case 1: tile(std::integral_constant<int, 1>{}, i); break;
    default: break;
  }
}

// Scratch of the packed panels, per thread.
static inline float* scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace gemm512

// The contracts of qk_block and pv_block (attention_kernels.h), for tiles of many rows.
static void qk_gemm(const float* q, int nq, const float* k, int64_t k_stride, int nk, int dim, float* s, int lds) {
  using namespace gemm512;
  float* kt = scratch((size_t)kGemmKeys * dim);
  for (int j0 = 0; j0 < nk; j0 += kGemmKeys) {
    const int n = nk - j0 < kGemmKeys ? nk - j0 : kGemmKeys;
    pack_kt(k + j0 * k_stride, k_stride, n, dim, kt);
    // Panels outer (one panel, 32 x head_dim floats, stays in L1), row tiles inner.
    for (int c0 = 0; c0 < n; c0 += kPanel) {
      const float* panel = kt + (int64_t)(c0 / kPanel) * dim * kPanel;
      const int ncols = n - c0 < kPanel ? n - c0 : kPanel;
      row_tiles(nq, [&](auto R, int i) {
        qk_tile<R>(q + (int64_t)i * dim, dim, panel, s + (int64_t)i * lds + j0 + c0, lds, ncols);
      });
    }
  }
}

static void pv_gemm(const float* p, int ldp, int nq, const float* v, int64_t v_stride, int nk, int dim, float* acc) {
  using namespace gemm512;
  float* vp = scratch((size_t)kGemmKeys * round_panel(dim));
  for (int j0 = 0; j0 < nk; j0 += kGemmKeys) {
    const int n = nk - j0 < kGemmKeys ? nk - j0 : kGemmKeys;
    pack_v(v + j0 * v_stride, v_stride, n, dim, vp);
    // Panels outer (kGemmKeys x 32 floats stay in L1), row tiles inner.
    for (int d0 = 0; d0 < dim; d0 += kPanel) {
      const float* panel = vp + (int64_t)(d0 / kPanel) * n * kPanel;
      const int w = dim - d0 < kPanel ? dim - d0 : kPanel;
      row_tiles(nq, [&](auto R, int i) {
        pv_tile<R>(p + (int64_t)i * ldp + j0, ldp, panel, n, acc + (int64_t)i * dim + d0, dim, w);
      });
    }
  }
}
