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

void qk_block(const float* q, int nq, const float* k, int64_t k_stride, int nk, int nk_avail, int dim, float* s,
              int lds) {
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
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) {
      const float* src = acc + (int64_t)r * dim + d0 + 8 * w;
      a[r][w] = (kMask && w == W - 1) ? _mm256_maskload_ps(src, m) : _mm256_loadu_ps(src);
    }
  for (int j = 0; j < nk; ++j) {
    const float* vj = v + j * vs + d0;
    if (prefetch && j + kPrefetchRows < nk_avail) prefetch_row(v + (j + kPrefetchRows) * vs, dim);
    // Registers: R broadcast weights + one V vector + R * W accumulators <= 16.
    __m256 pw[R];
    for (int r = 0; r < R; ++r) pw[r] = _mm256_broadcast_ss(p + (int64_t)r * ldp + j);
    for (int w = 0; w < W; ++w) {
      const __m256 vv = (kMask && w == W - 1) ? _mm256_maskload_ps(vj + 8 * w, m) : _mm256_loadu_ps(vj + 8 * w);
      for (int r = 0; r < R; ++r) a[r][w] = _mm256_fmadd_ps(pw[r], vv, a[r][w]);
    }
  }
  for (int r = 0; r < R; ++r)
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

// 2^x for x <= 0, eight lanes: the same clamp, rounding and degree-7 polynomial as the portable
// exp2_nonpositive, so both copies give the same weights.
static inline __m256 exp2_nonpositive8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-126.f));
  const __m256 r = _mm256_floor_ps(_mm256_add_ps(x, _mm256_set1_ps(0.5f)));
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(x, r), _mm256_set1_ps(0.6931471805599453f));
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(r), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
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

void int4_codes_to_float(const uint8_t* src, int64_t stride, int n, int n_avail, int dim, float* dst) {
  for (int j = 0; j < n; ++j) {
    const uint8_t* r = src + j * stride;
    if (j + kPrefetchRowsQuant < n_avail) prefetch_bytes(r + kPrefetchRowsQuant * stride, dim / 2);
    float* o = dst + (int64_t)j * dim;
    int d = 0;
    for (; d + 8 <= dim; d += 8) _mm256_storeu_ps(o + d, int4_codes8(r + d / 2));
    for (; d < dim; ++d) o[d] = float(quant::int4_code(r, d));
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
