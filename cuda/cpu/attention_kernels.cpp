// Inner loops of CPU attention (see attention_kernels.h). Written so GCC/Clang vectorize them:
// contiguous head_dim, fp32 accumulators, `omp simd` reductions (no -ffast-math needed). The build
// has no -march flag (wheels must run on any x86-64), so the loops are compiled twice and the AVX2 +
// FMA copy is picked at run time from the CPU's features (not its model name, so AMD CPUs get it).
#include "attention_kernels.h"

#include "vattn/quant.h"  // fp8_e4m3_to_half_bits: the one definition of the e4m3 decoding

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>  // the intrinsics are used only inside the AVX2 copy below
#endif

namespace vattn {
namespace cpu {

namespace generic {
#include "attention_kernels_body.h"
}  // namespace generic

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define VATTN_HAVE_AVX2_COPY 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define VATTN_BODY_AVX2 1
namespace avx2 {
#include "attention_kernels_body.h"
}  // namespace avx2
#undef VATTN_BODY_AVX2
#pragma GCC pop_options
// The prefill GEMM tiles and decode's token pieces once more for AVX-512F (+VL for the 8-lane masked loads of packing).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma")
namespace avx512 {
#include "attention_kernels_avx512.h"
#include "decode_pieces_avx512.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

namespace {
bool cpu_has_avx2() {
#if defined(VATTN_HAVE_AVX2_COPY)
  // VATTN_CPU_GENERIC=1 forces the portable copy (to test it on a machine with AVX2).
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && !std::getenv("VATTN_CPU_GENERIC");
  return yes;
#else
  return false;
#endif
}
// AVX-512 for the prefill GEMM tiles and the decode pieces, on top of the AVX2 copy; VATTN_CPU_NO_AVX512=1 keeps the
// AVX2 tiles (to test them, and to compare, on a machine with AVX-512).
bool cpu_has_avx512() {
#if defined(VATTN_HAVE_AVX2_COPY)
  static const bool yes = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          !std::getenv("VATTN_CPU_NO_AVX512");
  return yes;
#else
  return false;
#endif
}
}  // namespace

#if defined(VATTN_HAVE_AVX2_COPY)
#define VATTN_DISPATCH(fn, ...) (cpu_has_avx2() ? avx2::fn(__VA_ARGS__) : generic::fn(__VA_ARGS__))
#else
#define VATTN_DISPATCH(fn, ...) generic::fn(__VA_ARGS__)
#endif

void qk_block(const float* q, int nq, const float* k, int64_t k_stride, int nk, int nk_avail, int dim, float* s,
              int lds) {
#if defined(VATTN_HAVE_AVX2_COPY)
  if (nq >= kGemmMinRows && cpu_has_avx512()) return avx512::qk_gemm(q, nq, k, k_stride, nk, dim, s, lds);
#endif
  VATTN_DISPATCH(qk_block, q, nq, k, k_stride, nk, nk_avail, dim, s, lds);
}
void pv_block(const float* p, int ldp, int nq, const float* v, int64_t v_stride, int nk, int nk_avail, int dim,
              float* acc) {
#if defined(VATTN_HAVE_AVX2_COPY)
  if (nq >= kGemmMinRows && cpu_has_avx512()) return avx512::pv_gemm(p, ldp, nq, v, v_stride, nk, dim, acc);
#endif
  VATTN_DISPATCH(pv_block, p, ldp, nq, v, v_stride, nk, nk_avail, dim, acc);
}
#if defined(VATTN_HAVE_AVX2_COPY)
bool packed_prefill() { return cpu_has_avx2() && !cpu_has_avx512(); }
void pack_k_panels(const float* k, int64_t ks, int dim, float* kt) { avx2::pack_k_panels(k, ks, dim, kt); }
void pack_v_panels(const float* v, int64_t vs, int dim, float* vp) { avx2::pack_v_panels(v, vs, dim, vp); }
void qk_packed(const float* q, int nq, const float* kt, const int* ca, const int* ce, int dim, float* s, int lds) {
  avx2::qk_packed(q, nq, kt, ca, ce, dim, s, lds);
}
void pv_packed(const float* p, int ldp, int nq, const float* vp, const int* ca, const int* ce, int dim, float* acc) {
  avx2::pv_packed(p, ldp, nq, vp, ca, ce, dim, acc);
}
#else
// No AVX2 copy: packed_prefill() is false and prefill never calls the others.
bool packed_prefill() { return false; }
void pack_k_panels(const float*, int64_t, int, float*) { throw std::logic_error("pack_k_panels: no AVX2 copy"); }
void pack_v_panels(const float*, int64_t, int, float*) { throw std::logic_error("pack_v_panels: no AVX2 copy"); }
void qk_packed(const float*, int, const float*, const int*, const int*, int, float*, int) {
  throw std::logic_error("qk_packed: no AVX2 copy");
}
void pv_packed(const float*, int, int, const float*, const int*, const int*, int, float*) {
  throw std::logic_error("pv_packed: no AVX2 copy");
}
#endif
const char* simd_copy() {
  if (cpu_has_avx512()) return "avx512";
  return cpu_has_avx2() ? "avx2" : "generic";
}
bool token_pieces(int rows, int dim) {
#if defined(VATTN_HAVE_AVX2_COPY)
  return cpu_has_avx2() && rows >= 3 && dim % 16 == 0;
#else
  (void)rows;
  (void)dim;
  return false;
#endif
}
bool wide_token_pieces(int rows, int dim) { return token_pieces(rows, dim) && rows >= 4 && cpu_has_avx512(); }
void qk_tokens(const float* q, int rows, int nh, const float* k, int64_t k_tok, int64_t k_head, int jb, int nk,
               const int* lo, const int* hi, int dim, float* s, int lds, NextRows next, bool wide) {
#if defined(VATTN_HAVE_AVX2_COPY)
  if (wide && wide_token_pieces(rows, dim))
    return avx512::qk_pieces(q, rows, nh, k, k_tok, k_head, jb, nk, lo, hi, dim, s, lds, next);
#endif
  VATTN_DISPATCH(qk_tokens, q, rows, nh, k, k_tok, k_head, jb, nk, lo, hi, dim, s, lds, next);
}
void pv_tokens(const float* p, int ldp, int rows, int nh, const float* v, int64_t v_tok, int64_t v_head, int jb, int nk,
               const int* lo, const int* hi, int dim, float* acc, NextRows next, bool wide) {
#if defined(VATTN_HAVE_AVX2_COPY)
  if (wide && wide_token_pieces(rows, dim))
    return avx512::pv_pieces(p, ldp, rows, nh, v, v_tok, v_head, jb, nk, lo, hi, dim, acc, next);
#endif
  VATTN_DISPATCH(pv_tokens, p, ldp, rows, nh, v, v_tok, v_head, jb, nk, lo, hi, dim, acc, next);
}
void f16_rows_to_float(const uint16_t* src, int64_t stride, int n, int n_avail, int dim, float* dst) {
  VATTN_DISPATCH(f16_rows_to_float, src, stride, n, n_avail, dim, dst);
}
void bf16_rows_to_float(const uint16_t* src, int64_t stride, int n, int n_avail, int dim, float* dst) {
  VATTN_DISPATCH(bf16_rows_to_float, src, stride, n, n_avail, dim, dst);
}

void int8_rows_to_float(const int8_t* src, int64_t stride, const float* scale, int64_t scale_stride, int n, int n_avail,
                        int dim, float* dst) {
  VATTN_DISPATCH(int8_rows_to_float, src, stride, scale, scale_stride, n, n_avail, dim, dst);
}
void fp8_e4m3_rows_to_float(const uint8_t* src, int64_t stride, const float* scale, int64_t scale_stride, int n,
                            int n_avail, int dim, float* dst) {
  VATTN_DISPATCH(fp8_e4m3_rows_to_float, src, stride, scale, scale_stride, n, n_avail, dim, dst);
}
void int4_rows_to_float(const uint8_t* src, int64_t stride, const float* scale, int64_t scale_stride, int n,
                        int n_avail, int dim, float* dst) {
  VATTN_DISPATCH(int4_rows_to_float, src, stride, scale, scale_stride, n, n_avail, dim, dst);
}

void int4_ch_rows_to_float(const uint8_t* src, int64_t stride, const float* scale, const float* zero, int n,
                           int n_avail, int dim, float* dst) {
  VATTN_DISPATCH(int4_ch_rows_to_float, src, stride, scale, zero, n, n_avail, dim, dst);
}

void int4_centred_codes_to_float(const uint8_t* src, int64_t stride, int n, int n_avail, int dim, float* dst) {
  VATTN_DISPATCH(int4_centred_codes_to_float, src, stride, n, n_avail, dim, dst);
}

float max_of(const float* s, int a, int e) { return VATTN_DISPATCH(max_of, s, a, e); }
float exp2_weights(float* s, int n, int a, int e, float m) { return VATTN_DISPATCH(exp2_weights, s, n, a, e, m); }
void softmax_rows(float* s, int lds, int n, int rows, const int* ca, const int* ce, SoftmaxState* st, float* acc,
                  int dim) {
  VATTN_DISPATCH(softmax_rows, s, lds, n, rows, ca, ce, st, acc, dim);
}

}  // namespace cpu
}  // namespace vattn
