// AVX-512 copy of the token-piece decode walk (GQA groups of 4+, head dims a multiple of 16;
// attention_kernels_avx2.h has the walk): the same pieces of kTokenPiece tokens, the same order and
// the same prefetches ahead, with 16-lane vectors and the QK tiles 4 rows x 4 tokens. Used for calls
// whose K and V the cache can hold (attention_cpu.cpp: wide_pieces, with the measurements); calls
// that stream K and V from memory keep the AVX2 copy, which measured faster there.
// Included by attention_kernels.cpp under `#pragma GCC target("avx512f,...")` into namespace
// avx512, used only where the CPU has AVX-512F (VATTN_CPU_NO_AVX512 keeps the AVX2 copy).
// PV adds each element's tokens in order with one FMA each, as the AVX2 copy does; QK sums a dot
// product in 16 lanes instead of 8, so its rounding differs from the AVX2 copy's (both are checked
// against reference.py). No include guard on purpose, like the other bodies.

namespace pieces512 {

#include "token_walk.h"

static_assert(kTokenPiece == 4, "a QK piece tile reduces its four tokens' sums into one 128-bit store");

// Lane i of the result: the sum of the 16 lanes of the i-th argument.
static inline __m128 hsum4x16(__m512 a, __m512 b, __m512 c, __m512 d) {
  // 128-bit quarters: ab = [a0 + a2, a1 + a3, b0 + b2, b1 + b3], likewise cd.
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  // Quarter i now holds four partial sums of argument i.
  const __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  const __m512 y = _mm512_add_ps(x, _mm512_permute_ps(x, _MM_SHUFFLE(2, 3, 0, 1)));
  const __m512 z = _mm512_add_ps(y, _mm512_permute_ps(y, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m512i first = _mm512_setr_epi32(0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(first, z));
}

// s[r * lds + c] = dot(q[r], k + c * k_tok) for R <= 4 rows and C (kTokenPiece or 1) key rows:
// R * C accumulators, C key vectors and one q vector live (at most 21 of the 32 registers); a
// piece tile reduces each row's four sums into four consecutive scores with one store.
template <int R, int C, int kDim>
static inline void qk_tile(const float* q, int dim_arg, const float* k, int64_t k_tok, float* s, int lds) {
  static_assert(R >= 1 && R <= 4 && (C == 1 || C == kTokenPiece), "tile shape");
  const int dim = kDim > 0 ? kDim : dim_arg;
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int d = 0; d < dim; d += 16) {
    __m512 kv[C];
    for (int c = 0; c < C; ++c) kv[c] = _mm512_loadu_ps(k + c * k_tok + d);
    for (int r = 0; r < R; ++r) {
      const __m512 qv = _mm512_loadu_ps(q + (int64_t)r * dim + d);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(qv, kv[c], acc[r][c]);
    }
  }
  if constexpr (C == kTokenPiece) {
    for (int r = 0; r < R; ++r)
      _mm_storeu_ps(s + (int64_t)r * lds, hsum4x16(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
  } else {
    const __m512 z = _mm512_setzero_ps();
    alignas(16) float t[4];
    _mm_store_ps(t, hsum4x16(acc[0][0], R > 1 ? acc[R > 1 ? 1 : 0][0] : z, R > 2 ? acc[R > 2 ? 2 : 0][0] : z,
                             R > 3 ? acc[R > 3 ? 3 : 0][0] : z));
    for (int r = 0; r < R; ++r) s[(int64_t)r * lds] = t[r];
  }
}

// All rows of one head, in row tiles of at most 4.
template <int C, int kDim>
static inline void qk_rows(const float* q, int rows, int dim, const float* k, int64_t k_tok, float* s, int lds) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) qk_tile<4, C, kDim>(q + (int64_t)r * dim, dim, k, k_tok, s + (int64_t)r * lds, lds);
  switch (rows - r) {
    case 3: qk_tile<3, C, kDim>(q + (int64_t)r * dim, dim, k, k_tok, s + (int64_t)r * lds, lds); break;
    case 2: qk_tile<2, C, kDim>(q + (int64_t)r * dim, dim, k, k_tok, s + (int64_t)r * lds, lds); break;
    case 1: qk_tile<1, C, kDim>(q + (int64_t)r * dim, dim, k, k_tok, s + (int64_t)r * lds, lds); break;
    default: break;
  }
}

// acc[r][:] += sum_c w[r * ldp + c] * (v + c * v_tok)[:] for R <= 8 rows and C (kTokenPiece or 1)
// token rows, in slices of 32 lanes (a last one of 16): 2R accumulators, two V vectors and one
// weight live (at most 19 registers). Each element adds the tokens in order with one FMA each.
template <int R, int C, int kDim>
static inline void pv_tile(const float* w, int ldp, const float* v, int64_t v_tok, int dim_arg, float* acc) {
  static_assert(R >= 1 && R <= 8, "tile rows");
  const int dim = kDim > 0 ? kDim : dim_arg;
  int d = 0;
  for (; d + 32 <= dim; d += 32) {
    __m512 a[R][2];
    for (int r = 0; r < R; ++r) {
      a[r][0] = _mm512_loadu_ps(acc + (int64_t)r * dim + d);
      a[r][1] = _mm512_loadu_ps(acc + (int64_t)r * dim + d + 16);
    }
    for (int c = 0; c < C; ++c) {
      const __m512 v0 = _mm512_loadu_ps(v + c * v_tok + d), v1 = _mm512_loadu_ps(v + c * v_tok + d + 16);
      for (int r = 0; r < R; ++r) {
        const __m512 b = _mm512_set1_ps(w[(int64_t)r * ldp + c]);
        a[r][0] = _mm512_fmadd_ps(b, v0, a[r][0]);
        a[r][1] = _mm512_fmadd_ps(b, v1, a[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(acc + (int64_t)r * dim + d, a[r][0]);
      _mm512_storeu_ps(acc + (int64_t)r * dim + d + 16, a[r][1]);
    }
  }
  if (d < dim) {  // dim is a multiple of 16: one slice of 16 lanes is left
    __m512 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm512_loadu_ps(acc + (int64_t)r * dim + d);
    for (int c = 0; c < C; ++c) {
      const __m512 v0 = _mm512_loadu_ps(v + c * v_tok + d);
      for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(w[(int64_t)r * ldp + c]), v0, a[r]);
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc + (int64_t)r * dim + d, a[r]);
  }
}

// All rows of one head, in row tiles of at most 8.
template <int C, int kDim>
static inline void pv_rows(const float* w, int ldp, int rows, const float* v, int64_t v_tok, int dim, float* acc) {
  int r = 0;
  for (; r + 8 <= rows; r += 8) pv_tile<8, C, kDim>(w + (int64_t)r * ldp, ldp, v, v_tok, dim, acc + (int64_t)r * dim);
  const float* wr = w + (int64_t)r * ldp;
  float* ar = acc + (int64_t)r * dim;
  switch (rows - r) {
    case 7: pv_tile<7, C, kDim>(wr, ldp, v, v_tok, dim, ar); break;
    case 6: pv_tile<6, C, kDim>(wr, ldp, v, v_tok, dim, ar); break;
    case 5: pv_tile<5, C, kDim>(wr, ldp, v, v_tok, dim, ar); break;
    case 4: pv_tile<4, C, kDim>(wr, ldp, v, v_tok, dim, ar); break;
    case 3: pv_tile<3, C, kDim>(wr, ldp, v, v_tok, dim, ar); break;
    case 2: pv_tile<2, C, kDim>(wr, ldp, v, v_tok, dim, ar); break;
    case 1: pv_tile<1, C, kDim>(wr, ldp, v, v_tok, dim, ar); break;
    default: break;
  }
}

template <class F>
static inline void with_head_dim(int dim, F&& f) {
  if (dim == 64)
    f(std::integral_constant<int, 64>{});
  else if (dim == 128)
    f(std::integral_constant<int, 128>{});
  else
    f(std::integral_constant<int, 0>{});
}

}  // namespace pieces512

// qk_tokens / pv_tokens (attention_kernels.h) for rows >= 4 and dim % 16 == 0.
static inline void qk_pieces(const float* q, int rows, int nh, const float* k, int64_t k_tok, int64_t k_head, int jb,
                             int nk, const int* lo, const int* hi, int dim, float* s, int lds, NextRows next) {
  using namespace pieces512;
  with_head_dim(dim, [&](auto kd) {
    constexpr int kDim = decltype(kd)::value;
    for_token_pieces<kTokenPiece>(
        k, k_tok, next, nh, jb, nk, lo, hi,
        [&](int h, int t, auto&& ahead) {
          ahead(0, 1);
          qk_rows<kTokenPiece, kDim>(q + (int64_t)h * rows * dim, rows, dim,
                                     k + (int64_t)t * k_tok + (int64_t)h * k_head, k_tok,
                                     s + (int64_t)h * rows * lds + (t - jb), lds);
        },
        [&](int h, int u) {
          qk_rows<1, kDim>(q + (int64_t)h * rows * dim, rows, dim, k + (int64_t)u * k_tok + (int64_t)h * k_head, k_tok,
                           s + (int64_t)h * rows * lds + (u - jb), lds);
        });
  });
}

static inline void pv_pieces(const float* p, int ldp, int rows, int nh, const float* v, int64_t v_tok, int64_t v_head,
                             int jb, int nk, const int* lo, const int* hi, int dim, float* acc, NextRows next) {
  using namespace pieces512;
  with_head_dim(dim, [&](auto kd) {
    constexpr int kDim = decltype(kd)::value;
    for_token_pieces<kTokenPiece>(
        v, v_tok, next, nh, jb, nk, lo, hi,
        [&](int h, int t, auto&& ahead) {
          ahead(0, 1);
          pv_rows<kTokenPiece, kDim>(p + (int64_t)h * rows * ldp + (t - jb), ldp, rows,
                                     v + (int64_t)t * v_tok + (int64_t)h * v_head, v_tok, dim,
                                     acc + (int64_t)h * rows * dim);
        },
        [&](int h, int u) {
          pv_rows<1, kDim>(p + (int64_t)h * rows * ldp + (u - jb), ldp, rows,
                           v + (int64_t)u * v_tok + (int64_t)h * v_head, v_tok, dim, acc + (int64_t)h * rows * dim);
        });
  });
}
