// Inner loops of CPU attention (see attention_kernels.h). Written so GCC/Clang vectorize them:
// contiguous head_dim, fp32 accumulators, `omp simd` reductions (no -ffast-math needed).
#include "attention_kernels.h"

#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
// One copy per ISA, selected by the loader (ifunc); no -march flag in the build.
#define VATTN_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define VATTN_CLONES
#endif

namespace vattn {
namespace cpu {

VATTN_CLONES
void qk_block(const float* q, int nq, const float* k, int64_t k_stride, int nk, int dim, float* s, int lds) {
  for (int j = 0; j < nk; ++j) {
    const float* kj = k + j * k_stride;
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

VATTN_CLONES
void pv_block(const float* p, int ldp, int nq, const float* v, int64_t v_stride, int nk, int dim, float* acc) {
  for (int i = 0; i < nq; ++i) {
    float* ai = acc + (int64_t)i * dim;
    const float* pi = p + (int64_t)i * ldp;
    int j = 0;
    // Two keys per pass halves the loads and stores of the accumulator row.
    for (; j + 2 <= nk; j += 2) {
      const float w0 = pi[j], w1 = pi[j + 1];
      if (w0 == 0.f && w1 == 0.f) continue;
      const float* v0 = v + j * v_stride;
      const float* v1 = v0 + v_stride;
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
    for (; j < nk; ++j) {
      const float w = pi[j];
      if (w == 0.f) continue;
      const float* vj = v + j * v_stride;
#pragma omp simd
      for (int d = 0; d < dim; ++d) ai[d] += w * vj[d];
    }
  }
}

namespace {
inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// Branch-free IEEE half -> float (exact, subnormals included): move exponent and mantissa into
// float position and rescale by 2^112; infinities and NaNs get the all-ones float exponent.
inline float half_to_float(uint16_t h) {
  const uint32_t em = uint32_t(h & 0x7fffu) << 13;
  uint32_t u = float_to_bits(bits_to_float(em) * 0x1p112f);
  u = ((h & 0x7c00u) == 0x7c00u) ? (em | 0x7f800000u) : u;
  return bits_to_float(u | (uint32_t(h & 0x8000u) << 16));
}
}  // namespace

VATTN_CLONES
void f16_rows_to_float(const uint16_t* src, int64_t stride, int n, int dim, float* dst) {
  for (int j = 0; j < n; ++j) {
    const uint16_t* r = src + j * stride;
    float* o = dst + (int64_t)j * dim;
#pragma omp simd
    for (int d = 0; d < dim; ++d) o[d] = half_to_float(r[d]);
  }
}

VATTN_CLONES
void bf16_rows_to_float(const uint16_t* src, int64_t stride, int n, int dim, float* dst) {
  for (int j = 0; j < n; ++j) {
    const uint16_t* r = src + j * stride;
    float* o = dst + (int64_t)j * dim;
#pragma omp simd
    for (int d = 0; d < dim; ++d) o[d] = bits_to_float(uint32_t(r[d]) << 16);
  }
}

}  // namespace cpu
}  // namespace vattn
