// AVX2+FMA register-tiled versions of qk_block and pv_block, included by attention_kernels_body.h
// only in the copy compiled under `#pragma GCC target("avx2,fma,f16c")`. No include guard, no headers.
//
// Why: the portable loops reduce every (query, key) dot product horizontally and stream the PV
// accumulators through memory once per key, so at head_dim 64 with a GQA group of 3 the loads,
// stores and shuffles, not the FMAs, set the pace. Here a tile of R query rows x C keys (QK) or
// R rows x W vectors of head_dim (PV) lives in registers: QK does R + C loads per R * C FMAs and
// one transpose-reduce per tile; PV loads and stores each accumulator once per key block.
// Any head_dim: the last partial vector of a row is read with a masked load (never past the row).

// Mask of the first n (0 < n <= 8) lanes.
static inline __m256i lane_mask(int n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
}

// Four 8-lane sums at once: lane c of the result is the sum of the lanes of a[c].
static inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// Eight 8-lane sums at once: lane c of the result is the sum of the lanes of a[c].
static inline __m256 hsum8(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// s[r * lds + c] = dot(q[r], k[c]) for a tile of R rows x C keys.
template <int R, int C>
static inline void qk_tile(const float* q, int dim, const float* k, int64_t ks, float* s, int lds) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  // Registers: R query vectors + one K vector + R * C accumulators <= 16 (no spills).
  int d = 0;
  for (; d + 8 <= dim; d += 8) {
    __m256 qv[R];
    for (int r = 0; r < R; ++r) qv[r] = _mm256_loadu_ps(q + (int64_t)r * dim + d);
    for (int c = 0; c < C; ++c) {
      const __m256 kv = _mm256_loadu_ps(k + c * ks + d);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(qv[r], kv, acc[r][c]);
    }
  }
  if (d < dim) {
    const __m256i m = lane_mask(dim - d);
    __m256 qv[R];
    for (int r = 0; r < R; ++r) qv[r] = _mm256_maskload_ps(q + (int64_t)r * dim + d, m);
    for (int c = 0; c < C; ++c) {
      const __m256 kv = _mm256_maskload_ps(k + c * ks + d, m);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(qv[r], kv, acc[r][c]);
    }
  }
  const __m256 z = _mm256_setzero_ps();
  for (int r = 0; r < R; ++r) {
    const __m128 v = hsum4(acc[r][0], C > 1 ? acc[r][C > 1 ? 1 : 0] : z, C > 2 ? acc[r][C > 2 ? 2 : 0] : z,
                           C > 3 ? acc[r][C > 3 ? 3 : 0] : z);
    float* o = s + (int64_t)r * lds;
    if (C == 4) {
      _mm_storeu_ps(o, v);
    } else {
      alignas(16) float t[4];
      _mm_store_ps(t, v);
      for (int c = 0; c < C; ++c) o[c] = t[c];
    }
  }
}

// All keys of the block for R rows, C keys at a time.
template <int R, int C>
static inline void qk_rows(const float* q, int dim, const float* k, int64_t ks, int nk, int nk_avail, bool prefetch,
                           float* s, int lds) {
  int j = 0;
  for (; j + C <= nk; j += C) {
    if (prefetch)
      for (int c = 0; c < C; ++c)
        if (j + c + kPrefetchRows < nk_avail) prefetch_row(k + (j + c + kPrefetchRows) * ks, dim);
    qk_tile<R, C>(q, dim, k + j * ks, ks, s + j, lds);
  }
  for (; j < nk; ++j) qk_tile<R, 1>(q, dim, k + j * ks, ks, s + j, lds);
}

// ---- GEMM-style QK and PV for query tiles of many rows (prefill) -------------------------------
// S = Q K^T and O += P V as matrix products over chunks of up to kGemmKeys keys. Each chunk is
// first packed into panels of 16 columns (K^T: 16 keys x head_dim; V: head_dim in slices of 16
// lanes x the keys), contiguous, zero-padded: the cache's rows are a power of two of bytes apart
// (heads, layers), so reading the same slice of many rows directly would fall into a few L1 sets.
// Then a 6 x 16 register tile (12 accumulators) walks the panel with one broadcast element of q
// (or of P) and two panel vectors per step: 12 FMAs per 8 loads and no horizontal sums. Packing
// is one pass over the chunk, shared by every row of the tile.
constexpr int kGemmKeys = 64;
constexpr int kPanel = 16;

static inline int round_panel(int n) { return (n + kPanel - 1) / kPanel * kPanel; }

#include "transpose8.h"

// K^T panels of nk keys: panel c holds keys [16c, 16c + 16) as kt[(c * dim + d) * 16 + j % 16];
// keys past nk are 0. Rows past nk and lanes past dim are never read.
static inline void pack_kt(const float* k, int64_t ks, int nk, int dim, float* kt) {
  for (int j0 = 0; j0 < round_panel(nk); j0 += 8) {
    const int rows = nk - j0 >= 8 ? 8 : (nk - j0 > 0 ? nk - j0 : 0);
    float* panel = kt + (int64_t)(j0 / kPanel) * dim * kPanel + j0 % kPanel;
    for (int d0 = 0; d0 < dim; d0 += 8) {
      const int w = dim - d0 < 8 ? dim - d0 : 8;
      const __m256i m = lane_mask(w);
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        const float* src = k + (j0 + i) * ks + d0;
        r[i] = i >= rows ? _mm256_setzero_ps() : (w == 8 ? _mm256_loadu_ps(src) : _mm256_maskload_ps(src, m));
      }
      transpose8(r);
      for (int i = 0; i < w; ++i) _mm256_storeu_ps(panel + (int64_t)(d0 + i) * kPanel, r[i]);
    }
  }
}

// V panels of n keys: panel c holds lanes [16c, 16c + 16) of every key, vp[(c * n + j) * 16 + l];
// lanes past dim are 0.
static inline void pack_v(const float* v, int64_t vs, int n, int dim, float* vp) {
  for (int j = 0; j < n; ++j) {
    const float* src = v + j * vs;
    for (int d0 = 0; d0 < dim; d0 += kPanel) {
      float* dst = vp + ((int64_t)(d0 / kPanel) * n + j) * kPanel;
      const int w = dim - d0;
      if (w >= 16) {
        _mm256_storeu_ps(dst, _mm256_loadu_ps(src + d0));
        _mm256_storeu_ps(dst + 8, _mm256_loadu_ps(src + d0 + 8));
      } else {
        _mm256_storeu_ps(dst, _mm256_maskload_ps(src + d0, lane_mask(w < 8 ? w : 8)));
        _mm256_storeu_ps(dst + 8, _mm256_maskload_ps(src + d0 + 8, lane_mask(w > 8 ? w - 8 : 0)));
      }
    }
  }
}

// s[r * lds + c] = q[r] . K^T[:, c] for R <= 6 rows and the 16 columns of one K^T panel; only the
// first ncols (<= 16) columns are stored.
template <int R>
static inline void qk_gemm_tile(const float* q, int dim, const float* panel, float* s, int lds, int ncols) {
  __m256 c0[R], c1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  for (int d = 0; d < dim; ++d) {
    const __m256 b0 = _mm256_loadu_ps(panel + d * kPanel), b1 = _mm256_loadu_ps(panel + d * kPanel + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(q + (int64_t)r * dim + d);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
  if (ncols == kPanel) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(s + (int64_t)r * lds, c0[r]);
      _mm256_storeu_ps(s + (int64_t)r * lds + 8, c1[r]);
    }
    return;
  }
  const __m256i m0 = lane_mask(ncols < 8 ? ncols : 8), m1 = lane_mask(ncols > 8 ? ncols - 8 : 0);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_maskstore_ps(s + (int64_t)r * lds, m0, c0[r]);
    _mm256_maskstore_ps(s + (int64_t)r * lds + 8, m1, c1[r]);
  }
}

// acc[r][0:w) += sum_j p[r * ldp + j] * panel[j][0:w) for R <= 6 rows, n keys and one V panel
// (w <= 16 valid lanes; kFull: w == 16).
template <int R, bool kFull>
static inline void pv_gemm_tile(const float* p, int ldp, const float* panel, int n, float* acc, int dim, int w) {
  const __m256i m0 = lane_mask(w < 8 ? w : 8), m1 = lane_mask(w > 8 ? w - 8 : 0);
  __m256 c0[R], c1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float* a = acc + (int64_t)r * dim;
    c0[r] = kFull ? _mm256_loadu_ps(a) : _mm256_maskload_ps(a, m0);
    c1[r] = kFull ? _mm256_loadu_ps(a + 8) : _mm256_maskload_ps(a + 8, m1);
  }
  for (int j = 0; j < n; ++j) {
    const __m256 v0 = _mm256_loadu_ps(panel + j * kPanel), v1 = _mm256_loadu_ps(panel + j * kPanel + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(p + (int64_t)r * ldp + j);
      c0[r] = _mm256_fmadd_ps(a, v0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, v1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* a = acc + (int64_t)r * dim;
    if (kFull) {
      _mm256_storeu_ps(a, c0[r]);
      _mm256_storeu_ps(a + 8, c1[r]);
    } else {
      _mm256_maskstore_ps(a, m0, c0[r]);
      _mm256_maskstore_ps(a + 8, m1, c1[r]);
    }
  }
}

// Calls tile(std::integral_constant<int, R>{}, i) for row tiles [i, i + R) covering [0, nq): sixes,
// then one tile of the rest.
template <class Tile>
static inline void row_tiles(int nq, Tile&& tile) {
  int i = 0;
  for (; i + 6 <= nq; i += 6) tile(std::integral_constant<int, 6>{}, i);
  switch (nq - i) {
    case 5: tile(std::integral_constant<int, 5>{}, i); break;
    case 4: tile(std::integral_constant<int, 4>{}, i); break;
    case 3: tile(std::integral_constant<int, 3>{}, i); break;
    case 2: tile(std::integral_constant<int, 2>{}, i); break;
    case 1: tile(std::integral_constant<int, 1>{}, i); break;
    default: break;
  }
}

// Scratch of the packed panels, per thread.
static inline float* gemm_scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

static void qk_gemm(const float* q, int nq, const float* k, int64_t k_stride, int nk, int dim, float* s, int lds) {
  float* kt = gemm_scratch((size_t)kGemmKeys * dim);
  for (int j0 = 0; j0 < nk; j0 += kGemmKeys) {
    const int n = nk - j0 < kGemmKeys ? nk - j0 : kGemmKeys;
    pack_kt(k + j0 * k_stride, k_stride, n, dim, kt);
    // Panels outer (one panel, 16 x head_dim floats, stays in L1), row tiles inner.
    for (int c0 = 0; c0 < n; c0 += kPanel) {
      const float* panel = kt + (int64_t)(c0 / kPanel) * dim * kPanel;
      const int ncols = n - c0 < kPanel ? n - c0 : kPanel;
      row_tiles(nq, [&](auto R, int i) {
        qk_gemm_tile<R>(q + (int64_t)i * dim, dim, panel, s + (int64_t)i * lds + j0 + c0, lds, ncols);
      });
    }
  }
}

static void pv_gemm(const float* p, int ldp, int nq, const float* v, int64_t v_stride, int nk, int dim, float* acc) {
  float* vp = gemm_scratch((size_t)kGemmKeys * round_panel(dim));
  for (int j0 = 0; j0 < nk; j0 += kGemmKeys) {
    const int n = nk - j0 < kGemmKeys ? nk - j0 : kGemmKeys;
    pack_v(v + j0 * v_stride, v_stride, n, dim, vp);
    // Panels outer (kGemmKeys x 16 floats stay in L1), row tiles inner.
    for (int d0 = 0; d0 < dim; d0 += kPanel) {
      const float* panel = vp + (int64_t)(d0 / kPanel) * n * kPanel;
      const int w = dim - d0 < kPanel ? dim - d0 : kPanel;
      row_tiles(nq, [&](auto R, int i) {
        const float* pi = p + (int64_t)i * ldp + j0;
        float* ai = acc + (int64_t)i * dim + d0;
        if (w == kPanel)
          pv_gemm_tile<R, true>(pi, ldp, panel, n, ai, dim, w);
        else
          pv_gemm_tile<R, false>(pi, ldp, panel, n, ai, dim, w);
      });
    }
  }
}

// ---- The same products on blocks packed once per head (prefill with several query tiles) -------
// A block is kPackKeys keys in the layouts above: K^T in 16-key panels of head_dim (pack_kt), V in
// 16-lane panels of the block's keys (pack_v), zero-padded. The query tiles of a head then share one
// packing of its keys instead of each packing (and reading from the cache) its own copy.
static_assert(kGemmKeys == kPackKeys, "a packed block is one GEMM chunk");

static void pack_k_panels(const float* k, int64_t ks, int dim, float* kt) { pack_kt(k, ks, kPackKeys, dim, kt); }
static void pack_v_panels(const float* v, int64_t vs, int dim, float* vp) { pack_v(v, vs, kPackKeys, dim, vp); }

// Columns [lo, hi) of the block that rows [i, i + R) read (ca / ce: each row's [a, e), a >= e for
// a row that reads none of it); lo >= hi when no row does. On a causal diagonal block the rows of a
// six-row tile read a few columns more each, so a tile skips what none of its rows reads.
static inline void tile_cols(const int* ca, const int* ce, int i, int R, int* lo, int* hi) {
  int l = kPackKeys, h = 0;
  for (int r = i; r < i + R; ++r)
    if (ca[r] < ce[r]) {
      l = ca[r] < l ? ca[r] : l;
      h = ce[r] > h ? ce[r] : h;
    }
  *lo = l;
  *hi = h;
}

// s[r * lds + c] = q[r] . k_c for each row r's columns [ca[r], ce[r]), computed on whole 16-key
// panels (the padding columns on zero keys); what no row of a six-row tile reads is skipped.
static void qk_packed(const float* q, int nq, const float* kt, const int* ca, const int* ce, int dim, float* s,
                      int lds) {
  for (int c = 0; c < kPackKeys; c += kPanel) {
    const float* panel = kt + (int64_t)(c / kPanel) * dim * kPanel;
    row_tiles(nq, [&](auto R, int i) {
      int lo, hi;
      tile_cols(ca, ce, i, R, &lo, &hi);
      if (lo < c + kPanel && c < hi)
        qk_gemm_tile<R>(q + (int64_t)i * dim, dim, panel, s + (int64_t)i * lds + c, lds, kPanel);
    });
  }
}

// acc[r] += sum_c p[r * ldp + c] * v_c over the columns the rows of each six-row tile read (the
// others have weight 0 in every row of the tile).
static void pv_packed(const float* p, int ldp, int nq, const float* vp, const int* ca, const int* ce, int dim,
                      float* acc) {
  for (int d0 = 0; d0 < dim; d0 += kPanel) {
    const float* panel = vp + (int64_t)(d0 / kPanel) * kPackKeys * kPanel;
    const int w = dim - d0 < kPanel ? dim - d0 : kPanel;
    row_tiles(nq, [&](auto R, int i) {
      int lo, hi;
      tile_cols(ca, ce, i, R, &lo, &hi);
      if (lo >= hi) return;
      const float* pi = p + (int64_t)i * ldp + lo;
      float* ai = acc + (int64_t)i * dim + d0;
      if (w == kPanel)
        pv_gemm_tile<R, true>(pi, ldp, panel + (int64_t)lo * kPanel, hi - lo, ai, dim, w);
      else
        pv_gemm_tile<R, false>(pi, ldp, panel + (int64_t)lo * kPanel, hi - lo, ai, dim, w);
    });
  }
}

void qk_block(const float* q, int nq, const float* k, int64_t k_stride, int nk, int nk_avail, int dim, float* s,
              int lds) {
  if (nq >= kGemmMinRows) {
    qk_gemm(q, nq, k, k_stride, nk, dim, s, lds);
    return;
  }
  // Row tiles of 3 rows x 4 keys (GQA groups of 3, 6, ...) or 4 rows x 2 keys (groups of 4, 8,
  // and prefill tiles): at most 16 live registers. The first row tile walks the block first and
  // prefetches ahead of it.
  int i = 0;
  const bool threes = nq % 3 == 0 && nq % 4 != 0;
  while (i < nq) {
    const int left = nq - i;
    const float* qi = q + (int64_t)i * dim;
    float* si = s + (int64_t)i * lds;
    const bool pf = i == 0;
    if (!threes && left >= 4) {
      qk_rows<4, 2>(qi, dim, k, k_stride, nk, nk_avail, pf, si, lds);
      i += 4;
    } else if (left >= 3) {
      qk_rows<3, 4>(qi, dim, k, k_stride, nk, nk_avail, pf, si, lds);
      i += 3;
    } else if (left == 2) {
      qk_rows<2, 4>(qi, dim, k, k_stride, nk, nk_avail, pf, si, lds);
      i += 2;
    } else {
      qk_rows<1, 4>(qi, dim, k, k_stride, nk, nk_avail, pf, si, lds);
      i += 1;
    }
  }
}

// acc[r][d0 : d0 + 8W) += sum_j p[r * ldp + j] * v[j][d0 : ...] for R rows; kMask: the last of
// the W vectors is partial (mask m).
template <int R, int W, bool kMask>
static inline void pv_tile(const float* p, int ldp, const float* v, int64_t vs, int nk, int nk_avail, bool prefetch,
                           int dim, float* acc, int d0, __m256i m) {
  __m256 a[R][W];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int w = 0; w < W; ++w) {
      const float* src = acc + (int64_t)r * dim + d0 + 8 * w;
      a[r][w] = (kMask && w == W - 1) ? _mm256_maskload_ps(src, m) : _mm256_loadu_ps(src);
    }
  for (int j = 0; j < nk; ++j) {
    const float* vj = v + j * vs + d0;
    if (prefetch && j + kPrefetchRows < nk_avail) prefetch_row(v + (j + kPrefetchRows) * vs, dim);
    if constexpr (W <= 2) {
      // Registers: W V vectors + one broadcast weight + R * W accumulators <= 16 (R <= 6).
      __m256 vv[W];
#pragma GCC unroll 8
      for (int w = 0; w < W; ++w)
        vv[w] = (kMask && w == W - 1) ? _mm256_maskload_ps(vj + 8 * w, m) : _mm256_loadu_ps(vj + 8 * w);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 pw = _mm256_broadcast_ss(p + (int64_t)r * ldp + j);
#pragma GCC unroll 8
        for (int w = 0; w < W; ++w) a[r][w] = _mm256_fmadd_ps(pw, vv[w], a[r][w]);
      }
    } else {
      // Registers: R broadcast weights + one V vector + R * W accumulators <= 16.
      __m256 pw[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) pw[r] = _mm256_broadcast_ss(p + (int64_t)r * ldp + j);
#pragma GCC unroll 8
      for (int w = 0; w < W; ++w) {
        const __m256 vv = (kMask && w == W - 1) ? _mm256_maskload_ps(vj + 8 * w, m) : _mm256_loadu_ps(vj + 8 * w);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) a[r][w] = _mm256_fmadd_ps(pw[r], vv, a[r][w]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int w = 0; w < W; ++w) {
      float* dst = acc + (int64_t)r * dim + d0 + 8 * w;
      if (kMask && w == W - 1)
        _mm256_maskstore_ps(dst, m, a[r][w]);
      else
        _mm256_storeu_ps(dst, a[r][w]);
    }
}

// One row tile over all of head_dim: chunks of 8W lanes, then single vectors, then a masked one.
template <int R, int W>
static inline void pv_rows(const float* p, int ldp, const float* v, int64_t vs, int nk, int nk_avail, bool prefetch,
                           int dim, float* acc) {
  const __m256i none = _mm256_setzero_si256();
  int d0 = 0;
  for (; d0 + 8 * W <= dim; d0 += 8 * W) {
    pv_tile<R, W, false>(p, ldp, v, vs, nk, nk_avail, prefetch, dim, acc, d0, none);
    prefetch = false;
  }
  for (; d0 + 8 <= dim; d0 += 8) {
    pv_tile<R, 1, false>(p, ldp, v, vs, nk, nk_avail, prefetch, dim, acc, d0, none);
    prefetch = false;
  }
  if (d0 < dim) pv_tile<R, 1, true>(p, ldp, v, vs, nk, nk_avail, prefetch, dim, acc, d0, lane_mask(dim - d0));
}

void pv_block(const float* p, int ldp, int nq, const float* v, int64_t v_stride, int nk, int nk_avail, int dim,
              float* acc) {
  // Rows in tiles of 4 (two vectors of head_dim each) or 3 (four vectors): at most 16 live
  // registers. Masked keys have weight 0 and finite values (they lie inside the head's visible
  // range), so they are multiplied through instead of branched around.
  // Keys go in runs of kRun: a tile makes one pass per slice of head_dim, and a run's V rows stay
  // in L1 (and its pages in the TLB: rows can be a page apart) across those passes; the
  // accumulators are loaded and stored once per run.
  if (nq >= kGemmMinRows) {
    pv_gemm(p, ldp, nq, v, v_stride, nk, dim, acc);
    return;
  }
  constexpr int kRun = 16;
  const bool threes = nq % 3 == 0 && nq % 4 != 0;
  for (int j0 = 0; j0 < nk; j0 += kRun) {
    const int n = nk - j0 < kRun ? nk - j0 : kRun;
    const float* vr = v + j0 * v_stride;
    const int avail = nk_avail - j0;
    int i = 0;
    while (i < nq) {
      const int left = nq - i;
      const float* pi = p + (int64_t)i * ldp + j0;
      float* ai = acc + (int64_t)i * dim;
      const bool pf = i == 0;
      if (!threes && left >= 4) {
        pv_rows<4, 2>(pi, ldp, vr, v_stride, n, avail, pf, dim, ai);
        i += 4;
      } else if (left >= 3) {
        pv_rows<3, 4>(pi, ldp, vr, v_stride, n, avail, pf, dim, ai);
        i += 3;
      } else if (left == 2) {
        pv_rows<2, 4>(pi, ldp, vr, v_stride, n, avail, pf, dim, ai);
        i += 2;
      } else {
        pv_rows<1, 4>(pi, ldp, vr, v_stride, n, avail, pf, dim, ai);
        i += 1;
      }
    }
  }
}

// Max of s[a:e).
float max_of(const float* s, int a, int e) {
  __m256 m8 = _mm256_set1_ps(-INFINITY);
  int j = a;
  for (; j + 8 <= e; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + j));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  float m = _mm_cvtss_f32(m4);
  for (; j < e; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// 2^x for x <= 0, eight lanes: the same clamp, rounding and polynomial as the portable
// exp2_nonpositive, so both copies give the same weights.
static inline __m256 exp2_nonpositive8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-126.f));
  const __m256 t = _mm256_add_ps(x, _mm256_set1_ps(kExp2Round));
  const __m256 f = _mm256_sub_ps(x, _mm256_sub_ps(t, _mm256_set1_ps(kExp2Round)));
  __m256 p = _mm256_set1_ps(kExp2C[6]);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C[5]));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C[4]));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C[3]));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C[2]));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C[1]));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C[0]));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)));
}

float exp2_weights(float* s, int n, int a, int e, float m) {
  for (int j = 0; j < a; ++j) s[j] = 0.f;
  const __m256 m8 = _mm256_set1_ps(m);
  __m256 sum8 = _mm256_setzero_ps();
  int j = a;
  for (; j + 8 <= e; j += 8) {
    const __m256 w = exp2_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m8));
    _mm256_storeu_ps(s + j, w);
    sum8 = _mm256_add_ps(sum8, w);
  }
  if (j < e) {
    const __m256i msk = lane_mask(e - j);
    // Masked-off lanes read 0 and would give 2^-m: zero them before summing.
    const __m256 w =
        _mm256_and_ps(exp2_nonpositive8(_mm256_sub_ps(_mm256_maskload_ps(s + j, msk), m8)), _mm256_castsi256_ps(msk));
    _mm256_maskstore_ps(s + j, msk, w);
    sum8 = _mm256_add_ps(sum8, w);
  }
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  for (j = e; j < n; ++j) s[j] = 0.f;
  return _mm_cvtss_f32(s4);
}

// ---- quantized rows -> fp32 (attention_kernels.h) -------------------------------------------
// Eight codes per step, widened to 32-bit lanes, converted and scaled in registers; the last
// dim % 8 (fp8: % 16 then % 8) elements go through the scalar element functions of the body,
// which give the same bits.

static inline void int8_row(const int8_t* r, float s, int dim, float* o) {
  const __m256 sv = _mm256_set1_ps(s);
  int d = 0;
  for (; d + 8 <= dim; d += 8) {
    const __m256i c = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + d)));
    _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_cvtepi32_ps(c), sv));
  }
  for (; d < dim; ++d) o[d] = int8_elem(r[d], s);
}

void int8_rows_to_float(const int8_t* src, int64_t stride, const float* scale, int64_t scale_stride, int n, int n_avail,
                        int dim, float* dst) {
  for (int j = 0; j < n; ++j) {
    const int8_t* r = src + j * stride;
    if (j + kPrefetchRowsQuant < n_avail)
      prefetch_quant_row(r + kPrefetchRowsQuant * stride, dim, scale + (j + kPrefetchRowsQuant) * scale_stride);
    int8_row(r, scale[j * scale_stride], dim, dst + (int64_t)j * dim);
  }
}

// e4m3 -> the fp16 bits of value * 2^-8 (quant::fp8_e4m3_to_half_bits) on 16-bit lanes holding the
// sign-extended code: shifted left by 7 the sign lands in bit 15 (and a copy in bit 14, masked
// off), exponent and mantissa in bits 7..13. F16C then converts exactly.
static inline void fp8_row(const uint8_t* r, float s256, int dim, float* o) {
  const __m256 sv = _mm256_set1_ps(s256);
  int d = 0;
  for (; d + 16 <= dim; d += 16) {
    const __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + d)));
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(x, 7), _mm256_set1_epi16(short(0xbf80)));
    _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), sv));
    _mm256_storeu_ps(o + d + 8, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), sv));
  }
  if (d + 8 <= dim) {
    const __m128i x = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + d)));
    const __m128i h = _mm_and_si128(_mm_slli_epi16(x, 7), _mm_set1_epi16(short(0xbf80)));
    _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_cvtph_ps(h), sv));
    d += 8;
  }
  for (; d < dim; ++d) o[d] = fp8_elem(r[d], s256);
}

void fp8_e4m3_rows_to_float(const uint8_t* src, int64_t stride, const float* scale, int64_t scale_stride, int n,
                            int n_avail, int dim, float* dst) {
  for (int j = 0; j < n; ++j) {
    const uint8_t* r = src + j * stride;
    if (j + kPrefetchRowsQuant < n_avail)
      prefetch_quant_row(r + kPrefetchRowsQuant * stride, dim, scale + (j + kPrefetchRowsQuant) * scale_stride);
    fp8_row(r, scale[j * scale_stride] * quant::kFp8HalfScale, dim, dst + (int64_t)j * dim);
  }
}

// int4 elements d..d+7 of a packed row (p = row + d / 2) as floats 0..15: the four bytes of eight
// codes broadcast to every lane; lane k shifts right by 4k, so nibble k (element k: bytes hold
// elements 2i, 2i + 1 in their low, high nibbles) ends in its low bits.
static inline __m256 int4_codes8(const uint8_t* p) {
  int32_t w;
  std::memcpy(&w, p, 4);
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w), shifts), _mm256_set1_epi32(0xf)));
}
// int4: product and sum are rounded apart, as in Format::dequant: the empty asm keeps the compiler
// from fusing them into an FMA (the build contracts a * b + c by default).
static inline void int4_row(const uint8_t* r, float s, float z, int dim, float* o) {
  const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z);
  int d = 0;
  for (; d + 8 <= dim; d += 8) {
    __m256 prod = _mm256_mul_ps(int4_codes8(r + d / 2), sv);
    __asm__("" : "+x"(prod));
    _mm256_storeu_ps(o + d, _mm256_add_ps(prod, zv));
  }
  for (; d < dim; ++d) o[d] = int4_elem(quant::int4_code(r, d), s, z);
}

void int4_rows_to_float(const uint8_t* src, int64_t stride, const float* scale, int64_t scale_stride, int n,
                        int n_avail, int dim, float* dst) {
  for (int j = 0; j < n; ++j) {
    const uint8_t* r = src + j * stride;
    if (j + kPrefetchRowsQuant < n_avail)
      prefetch_quant_row(r + kPrefetchRowsQuant * stride, dim / 2, scale + (j + kPrefetchRowsQuant) * scale_stride);
    const float* w = scale + j * scale_stride;
    int4_row(r, w[0], w[1], dim, dst + (int64_t)j * dim);
  }
}

// int4_ch: as int4_row, with the group's per-channel scale and zero vectors instead of one pair.
static inline void int4_ch_row(const uint8_t* r, const float* scale, const float* zero, int dim, float* o) {
  int d = 0;
  for (; d + 8 <= dim; d += 8) {
    __m256 prod = _mm256_mul_ps(int4_codes8(r + d / 2), _mm256_loadu_ps(scale + d));
    __asm__("" : "+x"(prod));
    _mm256_storeu_ps(o + d, _mm256_add_ps(prod, _mm256_loadu_ps(zero + d)));
  }
  for (; d < dim; ++d) o[d] = int4_elem(quant::int4_code(r, d), scale[d], zero[d]);
}

void int4_centred_codes_to_float(const uint8_t* src, int64_t stride, int n, int n_avail, int dim, float* dst) {
  const __m256 centre = _mm256_set1_ps(kInt4CodeCentre);
  for (int j = 0; j < n; ++j) {
    const uint8_t* r = src + j * stride;
    if (j + kPrefetchRowsQuant < n_avail) prefetch_bytes(r + kPrefetchRowsQuant * stride, dim / 2);
    float* o = dst + (int64_t)j * dim;
    int d = 0;
    for (; d + 8 <= dim; d += 8) _mm256_storeu_ps(o + d, _mm256_sub_ps(int4_codes8(r + d / 2), centre));
    for (; d < dim; ++d) o[d] = float(quant::int4_code(r, d)) - kInt4CodeCentre;
  }
}

void int4_ch_rows_to_float(const uint8_t* src, int64_t stride, const float* scale, const float* zero, int n,
                           int n_avail, int dim, float* dst) {
  for (int j = 0; j < n; ++j) {
    const uint8_t* r = src + j * stride;
    if (j + kPrefetchRowsQuant < n_avail) prefetch_quant_row(r + kPrefetchRowsQuant * stride, dim / 2, scale);
    int4_ch_row(r, scale, zero, dim, dst + (int64_t)j * dim);
  }
}

// ---- Token-order decode (attention_kernels.h) ------------------------------------------------
// One query row per head (no GQA): tokens go in pairs where both lie in the head's range, so each q
// vector (QK) or accumulator (PV) loaded serves two keys (measured, group 1, 32 x 128 heads, b=8 x
// 512: 1.41-1.56x the head walk in pairs, 1.29-1.31x one token at a time). With several rows per
// head the pair costs more than it saves: a pair reads two tokens' rows of one head in turn, which
// within one token's span of heads is no longer front to back (SmolLM2 heads, 3 rows per head: in
// pairs 0.83-0.92x the head walk, one token at a time 1.19-1.49x).

// s[r * lds + c] = dot(q[r], k_c) for R rows and the C (1 or 2) key rows k0, k1.
// kDim > 0: the head dim known at compile time (64, 128), so the slices unroll and the call inlines.
template <int R, int C, int kDim = 0>
static inline void qk_tok_tile(const float* q, int dim_arg, const float* k0, const float* k1, float* s, int lds) {
  const int dim = kDim > 0 ? kDim : dim_arg;
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  // Registers: R * C accumulators + R q vectors + C key vectors <= 14.
  int d = 0;
  for (; d + 8 <= dim; d += 8) {
    const __m256 ka = _mm256_loadu_ps(k0 + d);
    const __m256 kb = C > 1 ? _mm256_loadu_ps(k1 + d) : ka;
    for (int r = 0; r < R; ++r) {
      __m256 qv = _mm256_loadu_ps(q + (int64_t)r * dim + d);
      // Two keys: one load of the q slice for both FMAs. GCC 12 folds it into each FMA instead,
      // ten loads for eight FMAs, more than Zen 3's two 256-bit loads a cycle can feed.
      if (C > 1) __asm__("" : "+x"(qv));
      acc[r][0] = _mm256_fmadd_ps(qv, ka, acc[r][0]);
      if (C > 1) acc[r][C - 1] = _mm256_fmadd_ps(qv, kb, acc[r][C - 1]);
    }
  }
  if (d < dim) {
    const __m256i m = lane_mask(dim - d);
    const __m256 ka = _mm256_maskload_ps(k0 + d, m);
    const __m256 kb = C > 1 ? _mm256_maskload_ps(k1 + d, m) : ka;
    for (int r = 0; r < R; ++r) {
      const __m256 qv = _mm256_maskload_ps(q + (int64_t)r * dim + d, m);
      acc[r][0] = _mm256_fmadd_ps(qv, ka, acc[r][0]);
      if (C > 1) acc[r][C - 1] = _mm256_fmadd_ps(qv, kb, acc[r][C - 1]);
    }
  }
  // Four sums per horizontal reduction: rows r, r + 1 (both columns when C == 2) or four rows.
  alignas(16) float t[4];
  if (C == 2) {
    int r = 0;
    for (; r + 2 <= R; r += 2) {
      _mm_store_ps(t,
                   hsum4(acc[r][0], acc[r][C - 1], acc[r + 1 < R ? r + 1 : r][0], acc[r + 1 < R ? r + 1 : r][C - 1]));
      s[(int64_t)r * lds] = t[0];
      s[(int64_t)r * lds + 1] = t[1];
      s[(int64_t)(r + 1) * lds] = t[2];
      s[(int64_t)(r + 1) * lds + 1] = t[3];
    }
    if (r < R) {
      _mm_store_ps(t, hsum4(acc[r][0], acc[r][C - 1], acc[r][0], acc[r][0]));
      s[(int64_t)r * lds] = t[0];
      s[(int64_t)r * lds + 1] = t[1];
    }
  } else {
    const __m256 z = _mm256_setzero_ps();
    for (int r = 0; r < R; r += 4) {
      _mm_store_ps(t,
                   hsum4(acc[r][0], r + 1 < R ? acc[r + 1 < R ? r + 1 : r][0] : z,
                         r + 2 < R ? acc[r + 2 < R ? r + 2 : r][0] : z, r + 3 < R ? acc[r + 3 < R ? r + 3 : r][0] : z));
      for (int i = 0; i < 4 && r + i < R; ++i) s[(int64_t)(r + i) * lds] = t[i];
    }
  }
}

// All rows of one head against key rows k0 (and k1 when C == 2), in row tiles of at most 4.
template <int C, int kDim = 0>
static inline void qk_tok_rows(const float* q, int rows, int dim, const float* k0, const float* k1, float* s, int lds) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) qk_tok_tile<4, C, kDim>(q + (int64_t)r * dim, dim, k0, k1, s + (int64_t)r * lds, lds);
  const int left = rows - r;
  if (left == 3) qk_tok_tile<3, C, kDim>(q + (int64_t)r * dim, dim, k0, k1, s + (int64_t)r * lds, lds);
  if (left == 2) qk_tok_tile<2, C, kDim>(q + (int64_t)r * dim, dim, k0, k1, s + (int64_t)r * lds, lds);
  if (left == 1) qk_tok_tile<1, C, kDim>(q + (int64_t)r * dim, dim, k0, k1, s + (int64_t)r * lds, lds);
}

#include "token_walk.h"

// The walk both loops share: f(h, t, n) for each run of n (2 or 1) consecutive tokens from t that
// lie in head h's [lo, hi), tokens in order and within a token the heads in order; runs of two only
// for one row per head (pairs, above).
template <class F>
static inline void for_token_runs(const float* base, int64_t tok, const NextRows& next, int rows, int nh, int jb,
                                  int nk, const int* lo, const int* hi, F&& f) {
  const bool pairs = rows == 1;
  const int step = pairs ? 2 : 1, ahead = tokens_ahead(tok, step);
  for (int t = jb; t < jb + nk; t += step) {
    const bool two = pairs && t + 1 < jb + nk;
    for (int h = 0; h < nh; ++h) {
      prefetch_ahead_part(base, tok, t + ahead, step, jb, nk, next, h, nh);
      const bool in0 = t >= lo[h] && t < hi[h], in1 = two && t + 1 >= lo[h] && t + 1 < hi[h];
      if (in0 && in1)
        f(h, t, 2);
      else if (in0)
        f(h, t, 1);
      else if (in1)
        f(h, t + 1, 1);
    }
  }
}

// The R rows of each of H heads (H * R <= 8) against one token's rows of those heads, one
// reduction for all H * R sums: s[(h * R + r) * lds] = dot(q[h * R + r], k + h * k_head). With the
// heads of a token side by side this reads the token's K front to back, and with 3 rows per head
// (SmolLM2) it does one horizontal reduction per two heads where a tile per head did one each (the
// reductions were the largest cost of the walk, measured with perf).
template <int kDim, int H, int R>
static inline void qk_tok_heads(const float* q, const float* k, int64_t k_head, float* s, int lds) {
  static_assert(H * R <= 8, "one reduction of eight sums");
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  for (int d = 0; d < kDim; d += 8)
    for (int h = 0; h < H; ++h) {
      const __m256 kv = _mm256_loadu_ps(k + h * k_head + d);
      for (int r = 0; r < R; ++r)
        acc[h * R + r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (int64_t)(h * R + r) * kDim + d), kv, acc[h * R + r]);
    }
  alignas(32) float t[8];
  _mm256_store_ps(t, hsum8(acc));
  for (int i = 0; i < H * R; ++i) s[(int64_t)i * lds] = t[i];
}

// Token order for R = 2..4 rows per head (taken for group 2; groups of 3+ go in pieces), head dim kDim: each token's
// heads in chunks of 8 / R through qk_tok_heads where the whole chunk sees the token, else one head at a time.
template <int kDim, int R>
static inline void qk_tokens_grouped(const float* q, int nh, const float* k, int64_t k_tok, int64_t k_head, int jb,
                                     int nk, const int* lo, const int* hi, float* s, int lds, const NextRows& next) {
  constexpr int H = 8 / R;
  const int chunks = (nh + H - 1) / H, ahead = tokens_ahead(k_tok, 1);
  for (int t = jb; t < jb + nk; ++t) {
    const float* kt = k + (int64_t)t * k_tok;
    for (int h = 0; h < nh; h += H) {
      prefetch_ahead_part(k, k_tok, t + ahead, 1, jb, nk, next, h / H, chunks);
      const int end = h + H < nh ? h + H : nh;
      bool all = end - h == H;
      for (int i = h; all && i < end; ++i) all = t >= lo[i] && t < hi[i];
      if (all) {
        qk_tok_heads<kDim, H, R>(q + (int64_t)h * R * kDim, kt + (int64_t)h * k_head, k_head,
                                 s + (int64_t)h * R * lds + (t - jb), lds);
        continue;
      }
      for (int i = h; i < end; ++i)
        if (t >= lo[i] && t < hi[i])
          qk_tok_tile<R, 1, kDim>(q + (int64_t)i * R * kDim, kDim, kt + (int64_t)i * k_head, nullptr,
                                  s + (int64_t)i * R * lds + (t - jb), lds);
    }
  }
}

// f(std::integral_constant<int, D>{}) with D the head dim where it has an unrolled copy (64, 128),
// else D = 0 (the runtime dim).
template <class F>
static inline void with_head_dim(int dim, F&& f) {
  if (dim == 64)
    f(std::integral_constant<int, 64>{});
  else if (dim == 128)
    f(std::integral_constant<int, 128>{});
  else
    f(std::integral_constant<int, 0>{});
}

template <int kDim>
static inline void qk_tokens_dim(const float* q, int rows, int nh, const float* k, int64_t k_tok, int64_t k_head,
                                 int jb, int nk, const int* lo, const int* hi, int dim, float* s, int lds,
                                 const NextRows& next) {
  for_token_runs(k, k_tok, next, rows, nh, jb, nk, lo, hi, [&](int h, int t, int n) {
    const float* k0 = k + (int64_t)t * k_tok + (int64_t)h * k_head;
    const float* qh = q + (int64_t)h * rows * dim;
    float* sh = s + (int64_t)h * rows * lds + (t - jb);
    if (n == 2)
      qk_tok_rows<2, kDim>(qh, rows, dim, k0, k0 + k_tok, sh, lds);
    else
      qk_tok_rows<1, kDim>(qh, rows, dim, k0, k0, sh, lds);
  });
}

// acc[r][:] += w0[r * ldp] * v0[:] (+ w1[r * ldp] * v1[:] when C == 2) for r < rows.
template <int C>
static inline void pv_tok_rows(const float* w, int ldp, int rows, const float* v0, const float* v1, int dim,
                               float* acc) {
  for (int r = 0; r < rows; ++r) {
    const float x0 = w[(int64_t)r * ldp], x1 = C > 1 ? w[(int64_t)r * ldp + 1] : 0.f;
    if (x0 == 0.f && x1 == 0.f) continue;
    const __m256 b0 = _mm256_set1_ps(x0), b1 = _mm256_set1_ps(x1);
    float* ar = acc + (int64_t)r * dim;
    int d = 0;
    for (; d + 8 <= dim; d += 8) {
      __m256 a = _mm256_loadu_ps(ar + d);
      a = _mm256_fmadd_ps(b0, _mm256_loadu_ps(v0 + d), a);
      if (C > 1) a = _mm256_fmadd_ps(b1, _mm256_loadu_ps(v1 + d), a);
      _mm256_storeu_ps(ar + d, a);
    }
    if (d < dim) {
      const __m256i m = lane_mask(dim - d);
      __m256 a = _mm256_maskload_ps(ar + d, m);
      a = _mm256_fmadd_ps(b0, _mm256_maskload_ps(v0 + d, m), a);
      if (C > 1) a = _mm256_fmadd_ps(b1, _mm256_maskload_ps(v1 + d, m), a);
      _mm256_maskstore_ps(ar + d, m, a);
    }
  }
}

// pv_tok_rows for a compile-time head dim and R rows (GQA groups <= 3 in the token order): each V
// slice is loaded once for all rows of the head, the slices unroll, and the call inlines. Rows of
// weight 0 are not skipped: every token a head walks is in its range, so its V is data.
template <int R, int C, int kDim>
static inline void pv_tok_fixed(const float* w, int ldp, const float* v0, const float* v1, float* acc) {
  __m256 b0[R], b1[R];
  for (int r = 0; r < R; ++r) {
    b0[r] = _mm256_set1_ps(w[(int64_t)r * ldp]);
    b1[r] = _mm256_set1_ps(C > 1 ? w[(int64_t)r * ldp + 1] : 0.f);
  }
  for (int d = 0; d < kDim; d += 8) {
    const __m256 va = _mm256_loadu_ps(v0 + d);
    const __m256 vb = C > 1 ? _mm256_loadu_ps(v1 + d) : va;
    for (int r = 0; r < R; ++r) {
      float* ar = acc + (int64_t)r * kDim + d;
      __m256 a = _mm256_fmadd_ps(b0[r], va, _mm256_loadu_ps(ar));
      if (C > 1) a = _mm256_fmadd_ps(b1[r], vb, a);
      _mm256_storeu_ps(ar, a);
    }
  }
}

// kDim > 0: the head dim known at compile time (64, 128); 0: the runtime dim.
template <int kDim>
static inline void pv_tokens_dim(const float* p, int ldp, int rows, int nh, const float* v, int64_t v_tok,
                                 int64_t v_head, int jb, int nk, const int* lo, const int* hi, int dim_arg, float* acc,
                                 const NextRows& next) {
  const int dim = kDim > 0 ? kDim : dim_arg;
  for_token_runs(v, v_tok, next, rows, nh, jb, nk, lo, hi, [&](int h, int t, int n) {
    const float* v0 = v + (int64_t)t * v_tok + (int64_t)h * v_head;
    const float* wh = p + (int64_t)h * rows * ldp + (t - jb);
    float* ah = acc + (int64_t)h * rows * dim;
    if constexpr (kDim > 0) {
      switch (rows * 2 + (n == 2)) {
        case 3: return pv_tok_fixed<1, 2, kDim>(wh, ldp, v0, v0 + v_tok, ah);
        case 2: return pv_tok_fixed<1, 1, kDim>(wh, ldp, v0, v0, ah);
        case 4: return pv_tok_fixed<2, 1, kDim>(wh, ldp, v0, v0, ah);
        default: break;
      }
    }
    if (n == 2)
      pv_tok_rows<2>(wh, ldp, rows, v0, v0 + v_tok, dim, ah);
    else
      pv_tok_rows<1>(wh, ldp, rows, v0, v0, dim, ah);
  });
}

// ---- Token pieces (GQA groups of 4 and more, attention_kernels.h) ----------------------------
// One token at a time, 4+ rows per head reload their PV accumulators for every token (at dim 128 a
// head's 4 rows are 64 vectors, more than the 16 registers); the head walk keeps them in registers
// over a run of keys but reads each token's 4 KB (8 heads of 128) in eight pieces far apart in
// time, which neither the hardware prefetcher nor a burst of software prefetches before each
// piece turned into a stream. A piece of a few tokens per head keeps a register tile over the
// piece's tokens, reads the piece's rows of all heads (16 KB for 4 tokens) one after the other, and while head
// h of a piece runs, prefetches the h-th part of the piece tokens_ahead() tokens ahead into L2, so the
// prefetches trickle out with the arithmetic instead of queueing up in a burst.
// Measured on the 2-core Zen 5 VM with pieces of 4, fp32, Llama-3-8B heads (8 x 128, group 4), bench/decode_walks.py,
// against the head walk, 2 threads: b=64 x 512 1.54-1.56x (47 GB/s), b=16 x 4K 1.68-1.69x (52-54
// GB/s); Llama-3-70B heads (group 8) 1.28-1.32x. Prefetching into L1 instead: 1.18-1.39x; in one
// burst per piece: 0.92-1.01x; 32 tokens ahead 1.28-1.57x, 64 ahead 1.17-1.18x.

// On the 2-core Zen 3 VM (AVX2 only, 32 KiB L1d) the pieces grew from 4 tokens to kAvx2Piece and
// their prefetch ahead goes out in parts as the piece runs (a part before each pair of keys in QK,
// before each 16-lane slice in PV) instead of one burst at its start, whose instruction took 10-15%
// of each walk's samples in perf. PV runs its slices outer and the row tiles inner, so a slice's V
// of the piece is reused from L1 by every row tile. Old / new, bench/decode_walks.py-style pairs in
// one process, 2 threads, streaming: Llama-3-70B b=8 x 2K 1.24-1.29, Llama-3-8B b=8 x 2K 1.21,
// b=64 x 512 1.14, 32 / 8 x 64 b=16 x 2K 1.13, 40 / 8 x 128 1.20, 14 / 2 x 64 1.03. Pieces of 16
// measured the same within noise, 32 0.85-0.87x of 16.
// Group 3 (SmolLM2 heads, 3 x 64) went one token at a time through qk_tok_heads / pv_tok_fixed until
// then; in these pieces, same pairs, streaming, 2 threads: b=16 x 2K 1.11, b=32 x 1K 1.13, b=8 x 4K
// 1.13, b=64 x 512 1.07, 24 / 8 x 128 1.10; in cache, 1 thread, 1.20-1.21. Group 2 (16 / 8 x 64)
// measured the same either way (0.99) and keeps the token order.
constexpr int kAvx2Piece = 8;
static_assert(kAvx2Piece % 2 == 0, "QK takes the keys of a piece in pairs");

// kDim: the head dim where it has an unrolled copy (64, 128), else 0 and dim_arg, a multiple of 16.
template <int kDim>
static inline void qk_pieces(const float* q, int rows, int nh, const float* k, int64_t k_tok, int64_t k_head, int jb,
                             int nk, const int* lo, const int* hi, int dim_arg, float* s, int lds,
                             const NextRows& next) {
  const int dim = kDim > 0 ? kDim : dim_arg;
  for_token_pieces<kAvx2Piece>(
      k, k_tok, next, nh, jb, nk, lo, hi,
      [&](int h, int t, auto&& ahead) {
        const float* k0 = k + (int64_t)t * k_tok + (int64_t)h * k_head;
        const float* qh = q + (int64_t)h * rows * dim;
        float* sh = s + (int64_t)h * rows * lds + (t - jb);
        for (int c = 0; c < kAvx2Piece; c += 2) {
          ahead(c / 2, kAvx2Piece / 2);
          qk_tok_rows<2, kDim>(qh, rows, dim, k0 + c * k_tok, k0 + (c + 1) * k_tok, sh + c, lds);
        }
      },
      [&](int h, int u) {
        qk_tok_rows<1, kDim>(q + (int64_t)h * rows * dim, rows, dim, k + (int64_t)u * k_tok + (int64_t)h * k_head,
                             nullptr, s + (int64_t)h * rows * lds + (u - jb), lds);
      });
}

// acc[r][0:16] += sum_c w[r * ldp + c] * v(c)[0:16] for R <= 4 rows (acc rows dim floats apart) and
// the kAvx2Piece token rows v + c * v_tok, one 16-lane slice: 2R accumulators, two V vectors and one
// weight live. Each element adds the tokens in order with one FMA each, as pv_tok_fixed does token
// by token.
template <int R>
static inline void pv_piece_slice(const float* w, int ldp, const float* v, int64_t v_tok, int dim, float* acc) {
  __m256 a[R][2];
  for (int r = 0; r < R; ++r) {
    a[r][0] = _mm256_loadu_ps(acc + (int64_t)r * dim);
    a[r][1] = _mm256_loadu_ps(acc + (int64_t)r * dim + 8);
  }
  for (int c = 0; c < kAvx2Piece; ++c) {
    const __m256 v0 = _mm256_loadu_ps(v + c * v_tok), v1 = _mm256_loadu_ps(v + c * v_tok + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(w + (int64_t)r * ldp + c);
      a[r][0] = _mm256_fmadd_ps(b, v0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(b, v1, a[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(acc + (int64_t)r * dim, a[r][0]);
    _mm256_storeu_ps(acc + (int64_t)r * dim + 8, a[r][1]);
  }
}

template <int kDim>
static inline void pv_pieces(const float* p, int ldp, int rows, int nh, const float* v, int64_t v_tok, int64_t v_head,
                             int jb, int nk, const int* lo, const int* hi, int dim_arg, float* acc,
                             const NextRows& next) {
  static_assert(kDim % 16 == 0, "slices of 16 lanes");
  const int dim = kDim > 0 ? kDim : dim_arg;
  for_token_pieces<kAvx2Piece>(
      v, v_tok, next, nh, jb, nk, lo, hi,
      [&](int h, int t, auto&& ahead) {
        const float* v0 = v + (int64_t)t * v_tok + (int64_t)h * v_head;
        const float* wh = p + (int64_t)h * rows * ldp + (t - jb);
        float* ah = acc + (int64_t)h * rows * dim;
        for (int d = 0; d < dim; d += 16) {
          ahead(d / 16, dim / 16);
          int r = 0;
          for (; r + 4 <= rows; r += 4)
            pv_piece_slice<4>(wh + (int64_t)r * ldp, ldp, v0 + d, v_tok, dim, ah + (int64_t)r * dim + d);
          float* ar = ah + (int64_t)r * dim + d;
          switch (rows - r) {
            case 3: pv_piece_slice<3>(wh + (int64_t)r * ldp, ldp, v0 + d, v_tok, dim, ar); break;
            case 2: pv_piece_slice<2>(wh + (int64_t)r * ldp, ldp, v0 + d, v_tok, dim, ar); break;
            case 1: pv_piece_slice<1>(wh + (int64_t)r * ldp, ldp, v0 + d, v_tok, dim, ar); break;
            default: break;
          }
        }
      },
      [&](int h, int u) {
        pv_tok_rows<1>(p + (int64_t)h * rows * ldp + (u - jb), ldp, rows, v + (int64_t)u * v_tok + (int64_t)h * v_head,
                       nullptr, dim, acc + (int64_t)h * rows * dim);
      });
}

// The common head dims get their own copies: with the slices unrolled and no call per (token,
// head), SmolLM2 heads (dim 64, 3 rows) ran at 20 GB/s on one thread in cache with a runtime dim.
void qk_tokens(const float* q, int rows, int nh, const float* k, int64_t k_tok, int64_t k_head, int jb, int nk,
               const int* lo, const int* hi, int dim, float* s, int lds, NextRows next) {
  if (rows >= 3 && dim % 16 == 0)
    return with_head_dim(
        dim, [&](auto kDim) { qk_pieces<kDim>(q, rows, nh, k, k_tok, k_head, jb, nk, lo, hi, dim, s, lds, next); });
  if (dim == 64 && rows == 2) return qk_tokens_grouped<64, 2>(q, nh, k, k_tok, k_head, jb, nk, lo, hi, s, lds, next);
  if (dim == 128 && rows == 2) return qk_tokens_grouped<128, 2>(q, nh, k, k_tok, k_head, jb, nk, lo, hi, s, lds, next);
  with_head_dim(
      dim, [&](auto kDim) { qk_tokens_dim<kDim>(q, rows, nh, k, k_tok, k_head, jb, nk, lo, hi, dim, s, lds, next); });
}

void pv_tokens(const float* p, int ldp, int rows, int nh, const float* v, int64_t v_tok, int64_t v_head, int jb, int nk,
               const int* lo, const int* hi, int dim, float* acc, NextRows next) {
  if (rows >= 3 && dim % 16 == 0)
    return with_head_dim(
        dim, [&](auto kDim) { pv_pieces<kDim>(p, ldp, rows, nh, v, v_tok, v_head, jb, nk, lo, hi, dim, acc, next); });
  with_head_dim(
      dim, [&](auto kDim) { pv_tokens_dim<kDim>(p, ldp, rows, nh, v, v_tok, v_head, jb, nk, lo, hi, dim, acc, next); });
}
