// Body of the CPU attention inner loops, included twice by attention_kernels.cpp: once for plain
// x86-64 and once under `#pragma GCC target("avx2,fma,f16c")`, so one wheel runs everywhere and
// uses AVX2+FMA where the CPU has them. No include guard on purpose; no system headers inside (the
// AVX2 copy adds its intrinsics tiles from attention_kernels_avx2.h).

static inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// exp2_nonpositive's constants (shared with the AVX2 copy's exp2_nonpositive8): the rounding bias
// 1.5 * 2^23 + 127 and the degree-6 minimax coefficients of 2^f on [-0.5, 0.5], 2^0 exactly 1.
constexpr float kExp2Round = 12582912.f + 127.f;
constexpr float kExp2C[7] = {
    1.f, 0.6931471825f, 0.2402264625f, 0.05550328642f, 0.009618489072f, 0.001339992392f, 0.0001534577605f};

// Software prefetch of the row `kPrefetchRows` ahead: cache rows of one head are usually a page or
// more apart (other heads and layers sit in between), which the hardware prefetcher does not follow.
static inline void prefetch_row(const float* row, int dim) {
  for (int o = 0; o < dim; o += 16) prefetch<3>(row + o);
}

// Branch-free IEEE half -> float (exact, subnormals included): move exponent and mantissa into
// float position and rescale by 2^112; infinities and NaNs get the all-ones float exponent.
static inline float half_to_float(uint16_t h) {
  const uint32_t em = uint32_t(h & 0x7fffu) << 13;
  uint32_t u = float_to_bits(bits_to_float(em) * 0x1p112f);
  u = ((h & 0x7c00u) == 0x7c00u) ? (em | 0x7f800000u) : u;
  return bits_to_float(u | (uint32_t(h & 0x8000u) << 16));
}

// Prefetch of `bytes` of a quantized row, and (prefetch_quant_row) of its scale words,
// `kPrefetchRowsQuant` rows ahead.
static inline void prefetch_bytes(const void* row, int bytes) {
  for (int o = 0; o < bytes; o += 64) prefetch<3>(static_cast<const char*>(row) + o);
}
static inline void prefetch_quant_row(const void* row, int bytes, const float* scale) {
  prefetch_bytes(row, bytes);
  prefetch<3>(scale);
}

// One element of each quantized format, exactly as Format::dequant (the vector loops' tails).
static inline float int8_elem(int8_t c, float s) { return float(c) * s; }
// s256 = scale * 256 (see attention_kernels.h).
static inline float fp8_elem(uint8_t c, float s256) { return half_to_float(quant::fp8_e4m3_to_half_bits(c)) * s256; }
// int4: product and sum rounded apart, as Format::dequant and the reference compute them. Plain
// x86-64 has no FMA to contract them into; in the AVX2 copy an empty asm keeps them apart.
static inline float int4_elem(int c, float s, float z) {
  float prod = float(c) * s;
#if defined(VATTN_BODY_AVX2)
  __asm__("" : "+x"(prod));
#endif
  return prod + z;
}

#if defined(VATTN_BODY_AVX2)
#include "attention_kernels_avx2.h"
#else
void qk_block(const float* q, int nq, const float* k, int64_t k_stride, int nk, int nk_avail, int dim, float* s,
              int lds) {
  for (int j = 0; j < nk; ++j) {
    const float* kj = k + j * k_stride;
    if (j + kPrefetchRows < nk_avail) prefetch_row(kj + kPrefetchRows * k_stride, dim);
    int i = 0;
    // Four queries per key row: each loaded K element feeds four FMAs.
    for (; i + 4 <= nq; i += 4) {
      const float* q0 = q + (int64_t)i * dim;
      const float* q1 = q0 + dim;
      const float* q2 = q1 + dim;
      const float* q3 = q2 + dim;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int d = 0; d < dim; ++d) {
        const float kv = kj[d];
        a0 += q0[d] * kv;
        a1 += q1[d] * kv;
        a2 += q2[d] * kv;
        a3 += q3[d] * kv;
      }
      s[(int64_t)i * lds + j] = a0;
      s[(int64_t)(i + 1) * lds + j] = a1;
      s[(int64_t)(i + 2) * lds + j] = a2;
      s[(int64_t)(i + 3) * lds + j] = a3;
    }
    for (; i < nq; ++i) {
      const float* qi = q + (int64_t)i * dim;
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int d = 0; d < dim; ++d) a += qi[d] * kj[d];
      s[(int64_t)i * lds + j] = a;
    }
  }
}

void pv_block(const float* p, int ldp, int nq, const float* v, int64_t v_stride, int nk, int nk_avail, int dim,
              float* acc) {
  // Keys outer, query rows inner: each V row is read from memory once and used by every row (the
  // accumulators, nq x dim floats, stay in L1/L2). Two keys per pass halve the accumulator traffic.
  int j = 0;
  for (; j + 2 <= nk; j += 2) {
    const float* v0 = v + j * v_stride;
    const float* v1 = v0 + v_stride;
    if (j + kPrefetchRows < nk_avail) prefetch_row(v0 + kPrefetchRows * v_stride, dim);
    if (j + 1 + kPrefetchRows < nk_avail) prefetch_row(v1 + kPrefetchRows * v_stride, dim);
    for (int i = 0; i < nq; ++i) {
      const float w0 = p[(int64_t)i * ldp + j], w1 = p[(int64_t)i * ldp + j + 1];
      if (w0 == 0.f && w1 == 0.f) continue;
      float* ai = acc + (int64_t)i * dim;
      if (w0 != 0.f && w1 != 0.f) {
#pragma omp simd
        for (int d = 0; d < dim; ++d) ai[d] += w0 * v0[d] + w1 * v1[d];
      } else {
        const float w = w0 != 0.f ? w0 : w1;
        const float* vv = w0 != 0.f ? v0 : v1;
#pragma omp simd
        for (int d = 0; d < dim; ++d) ai[d] += w * vv[d];
      }
    }
  }
  for (; j < nk; ++j) {
    const float* vj = v + j * v_stride;
    for (int i = 0; i < nq; ++i) {
      const float w = p[(int64_t)i * ldp + j];
      if (w == 0.f) continue;
      float* ai = acc + (int64_t)i * dim;
#pragma omp simd
      for (int d = 0; d < dim; ++d) ai[d] += w * vj[d];
    }
  }
}
#endif  // VATTN_BODY_AVX2

#if !defined(VATTN_BODY_AVX2)  // the AVX2 copy has register-tiled versions of these
// Token-order decode (attention_kernels.h): plain loops, vectorized along head_dim, one token at a
// time for every group size, no prefetch.
void qk_tokens(const float* q, int rows, int nh, const float* k, int64_t k_tok, int64_t k_head, int jb, int nk,
               const int* lo, const int* hi, int dim, float* s, int lds, NextRows) {
  for (int t = jb; t < jb + nk; ++t) {
    const float* kt = k + (int64_t)t * k_tok;
    for (int h = 0; h < nh; ++h) {
      if (t < lo[h] || t >= hi[h]) continue;
      const float* kr = kt + (int64_t)h * k_head;
      const float* qh = q + (int64_t)h * rows * dim;
      float* sh = s + (int64_t)h * rows * lds + (t - jb);
      int r = 0;
      for (; r + 3 <= rows; r += 3) {  // three query rows per pass over the key row
        const float* q0 = qh + (int64_t)r * dim;
        const float* q1 = q0 + dim;
        const float* q2 = q1 + dim;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2)
        for (int d = 0; d < dim; ++d) {
          const float kv = kr[d];
          a0 += q0[d] * kv;
          a1 += q1[d] * kv;
          a2 += q2[d] * kv;
        }
        sh[(int64_t)r * lds] = a0;
        sh[(int64_t)(r + 1) * lds] = a1;
        sh[(int64_t)(r + 2) * lds] = a2;
      }
      for (; r < rows; ++r) {
        const float* qr = qh + (int64_t)r * dim;
        float a = 0.f;
#pragma omp simd reduction(+ : a)
        for (int d = 0; d < dim; ++d) a += qr[d] * kr[d];
        sh[(int64_t)r * lds] = a;
      }
    }
  }
}

void pv_tokens(const float* p, int ldp, int rows, int nh, const float* v, int64_t v_tok, int64_t v_head, int jb, int nk,
               const int* lo, const int* hi, int dim, float* acc, NextRows) {
  for (int t = jb; t < jb + nk; ++t) {
    const float* vt = v + (int64_t)t * v_tok;
    for (int h = 0; h < nh; ++h) {
      if (t < lo[h] || t >= hi[h]) continue;
      const float* vr = vt + (int64_t)h * v_head;
      for (int r = h * rows; r < (h + 1) * rows; ++r) {
        const float w = p[(int64_t)r * ldp + (t - jb)];
        if (w == 0.f) continue;
        float* ar = acc + (int64_t)r * dim;
#pragma omp simd
        for (int d = 0; d < dim; ++d) ar[d] += w * vr[d];
      }
    }
  }
}
#endif  // !VATTN_BODY_AVX2

static inline void prefetch_row16(const uint16_t* row, int dim) {
  for (int o = 0; o < dim; o += 32) prefetch<3>(row + o);
}

// Rows of 16-bit values through an element conversion (inlined, so the inner loop vectorizes).
template <typename Convert>
static inline void rows16_to_float(const uint16_t* src, int64_t stride, int n, int n_avail, int dim, float* dst,
                                   Convert convert) {
  for (int j = 0; j < n; ++j) {
    const uint16_t* r = src + j * stride;
    if (j + kPrefetchRows < n_avail) prefetch_row16(r + kPrefetchRows * stride, dim);
    float* o = dst + (int64_t)j * dim;
#pragma omp simd
    for (int d = 0; d < dim; ++d) o[d] = convert(r[d]);
  }
}

void f16_rows_to_float(const uint16_t* src, int64_t stride, int n, int n_avail, int dim, float* dst) {
  rows16_to_float(src, stride, n, n_avail, dim, dst, [](uint16_t h) { return half_to_float(h); });
}

void bf16_rows_to_float(const uint16_t* src, int64_t stride, int n, int n_avail, int dim, float* dst) {
  rows16_to_float(src, stride, n, n_avail, dim, dst, [](uint16_t b) { return bits_to_float(uint32_t(b) << 16); });
}

#if !defined(VATTN_BODY_AVX2)  // the AVX2 copy has intrinsics versions of these
// Quantized rows (attention_kernels.h), loops the compiler vectorizes with what plain x86-64 has.
void int8_rows_to_float(const int8_t* src, int64_t stride, const float* scale, int64_t scale_stride, int n, int n_avail,
                        int dim, float* dst) {
  for (int j = 0; j < n; ++j) {
    const int8_t* r = src + j * stride;
    if (j + kPrefetchRowsQuant < n_avail)
      prefetch_quant_row(r + kPrefetchRowsQuant * stride, dim, scale + (j + kPrefetchRowsQuant) * scale_stride);
    const float s = scale[j * scale_stride];
    float* o = dst + (int64_t)j * dim;
#pragma omp simd
    for (int d = 0; d < dim; ++d) o[d] = int8_elem(r[d], s);
  }
}

void fp8_e4m3_rows_to_float(const uint8_t* src, int64_t stride, const float* scale, int64_t scale_stride, int n,
                            int n_avail, int dim, float* dst) {
  for (int j = 0; j < n; ++j) {
    const uint8_t* r = src + j * stride;
    if (j + kPrefetchRowsQuant < n_avail)
      prefetch_quant_row(r + kPrefetchRowsQuant * stride, dim, scale + (j + kPrefetchRowsQuant) * scale_stride);
    const float s256 = scale[j * scale_stride] * quant::kFp8HalfScale;
    float* o = dst + (int64_t)j * dim;
#pragma omp simd
    for (int d = 0; d < dim; ++d) o[d] = fp8_elem(r[d], s256);
  }
}

void int4_rows_to_float(const uint8_t* src, int64_t stride, const float* scale, int64_t scale_stride, int n,
                        int n_avail, int dim, float* dst) {
  for (int j = 0; j < n; ++j) {
    const uint8_t* r = src + j * stride;
    if (j + kPrefetchRowsQuant < n_avail)
      prefetch_quant_row(r + kPrefetchRowsQuant * stride, dim / 2, scale + (j + kPrefetchRowsQuant) * scale_stride);
    const float* w = scale + j * scale_stride;
    const float s = w[0], z = w[1];
    float* o = dst + (int64_t)j * dim;
#pragma omp simd
    for (int i = 0; i < dim / 2; ++i) {
      o[2 * i] = int4_elem(r[i] & 0xf, s, z);
      o[2 * i + 1] = int4_elem(r[i] >> 4, s, z);
    }
  }
}

void int4_centred_codes_to_float(const uint8_t* src, int64_t stride, int n, int n_avail, int dim, float* dst) {
  for (int j = 0; j < n; ++j) {
    const uint8_t* r = src + j * stride;
    if (j + kPrefetchRowsQuant < n_avail) prefetch_bytes(r + kPrefetchRowsQuant * stride, dim / 2);
    float* o = dst + (int64_t)j * dim;
#pragma omp simd
    for (int i = 0; i < dim / 2; ++i) {
      o[2 * i] = float(r[i] & 0xf) - kInt4CodeCentre;
      o[2 * i + 1] = float(r[i] >> 4) - kInt4CodeCentre;
    }
  }
}

void int4_ch_rows_to_float(const uint8_t* src, int64_t stride, const float* scale, const float* zero, int n,
                           int n_avail, int dim, float* dst) {
  for (int j = 0; j < n; ++j) {
    const uint8_t* r = src + j * stride;
    if (j + kPrefetchRowsQuant < n_avail) prefetch_quant_row(r + kPrefetchRowsQuant * stride, dim / 2, scale);
    float* o = dst + (int64_t)j * dim;
#pragma omp simd
    for (int i = 0; i < dim / 2; ++i) {
      o[2 * i] = int4_elem(r[i] & 0xf, scale[2 * i], zero[2 * i]);
      o[2 * i + 1] = int4_elem(r[i] >> 4, scale[2 * i + 1], zero[2 * i + 1]);
    }
  }
}

float max_of(const float* s, int a, int e) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int j = a; j < e; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// 2^x for x <= 0 (x >= -126 after clamping), vectorizable. Adding 1.5 * 2^23 + 127 rounds x to the
// nearest integer r in the low mantissa bits, already biased, so shifting those bits up gives the
// float 2^r; 2^f, |f| <= 0.5, is a degree-6 minimax polynomial (relative error 2.6e-9 in exact
// arithmetic, 7.9e-8 in fp32, as the degree-7 Taylor form it replaced) with 2^0 exactly 1.
static inline float exp2_nonpositive(float x) {
  x = x < -126.f ? -126.f : x;
  const float t = x + kExp2Round;
  const float f = x - (t - kExp2Round);
  float p = kExp2C[6];
  p = p * f + kExp2C[5];
  p = p * f + kExp2C[4];
  p = p * f + kExp2C[3];
  p = p * f + kExp2C[2];
  p = p * f + kExp2C[1];
  p = p * f + kExp2C[0];
  return p * bits_to_float(float_to_bits(t) << 23);
}

float exp2_weights(float* s, int n, int a, int e, float m) {
  float sum = 0.f;
  for (int j = 0; j < a; ++j) s[j] = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int j = a; j < e; ++j) {
    const float w = exp2_nonpositive(s[j] - m);
    s[j] = w;
    sum += w;
  }
  for (int j = e; j < n; ++j) s[j] = 0.f;
  return sum;
}
#endif

void softmax_rows(float* s, int lds, int n, int rows, const int* ca, const int* ce, SoftmaxState* st, float* acc,
                  int dim) {
  for (int r = 0; r < rows; ++r) {
    float* sr = s + (int64_t)r * lds;
    const int a = ca[r], e = ce[r];
    if (a >= e) {
      for (int j = 0; j < n; ++j) sr[j] = 0.f;
      continue;
    }
    const float f = st[r].rescale_to(max_of(sr, a, e));
    if (f != 1.f) {
      float* ar = acc + (int64_t)r * dim;
#pragma omp simd
      for (int d = 0; d < dim; ++d) ar[d] *= f;
    }
    if (st[r].m == -INFINITY) {  // only -inf logits so far
      for (int j = 0; j < n; ++j) sr[j] = 0.f;
      continue;
    }
    st[r].add(exp2_weights(sr, n, a, e, st[r].m));
  }
}
