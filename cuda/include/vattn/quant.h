#pragma once
// KV quantization arithmetic shared by the CPU and CUDA code (__host__ __device__): fp8 e4m3
// conversion, and the encoders that turn one (token, kv_head) vector into codes and fp32 scale
// words. python/vattn/reference.py defines the same formats in PyTorch; the CPU and CUDA
// append_kv both call these functions, so they store bit-identical bytes.
//
// Exactness: every rounding step of an encoder is an explicit IEEE op (__fmul_rn and friends on
// the device, where the build uses --use_fast_math), so neither contraction into FMA nor
// approximate division changes a bit. Two rules make the result independent of flush-to-zero:
// fp32 subnormal inputs are read as zero, and a vector whose largest magnitude (or range, for
// int4) is below kQuantTiny is stored as all zeros (int4: as its constant value).
// Non-finite inputs never poison the cache: NaN is stored as 0, +-inf as the largest code of
// its sign, and the scale comes from the finite elements.
#include <cmath>
#include <cstdint>

#include "vattn/dtypes.h"
#include "vattn/macros.h"

namespace vattn {
namespace quant {

constexpr float kFp8Max = 448.f;        // OCP e4m3fn largest finite value
constexpr float kInt8Max = 127.f;       // symmetric int8: codes -127..127
constexpr float kInt4Levels = 15.f;     // asymmetric int4: codes 0..15
constexpr float kQuantTiny = 1.0e-18f;  // ~2^-60: below this a vector is stored as zeros

VATTN_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
VATTN_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
VATTN_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
VATTN_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Round to nearest, ties to even, of a finite float with |x| < 2^22 (exact integer arithmetic
// on the bits, independent of the rounding mode and of any flags).
VATTN_HD float round_even(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t a = u & 0x7fffffffu;
  const int e = int(a >> 23) - 127;                // unbiased exponent
  if (e >= 23) return x;                           // already an integer
  if (e < -1) return bits_float(u & 0x80000000u);  // |x| < 0.5 -> +-0
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;  // value = m * 2^(e - 23)
  const int shift = 23 - e;                        // 1..24
  uint32_t r = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (r & 1u))) ++r;
  const float f = float(r);
  return (u & 0x80000000u) ? -f : f;
}

// Input element as the encoders see it: subnormals and NaN -> 0 (sign kept for subnormals),
// infinities kept (the encoders saturate them).
VATTN_HD float clean(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0.f;                          // NaN
  if (a < 0x00800000u) return bits_float(u & 0x80000000u);  // subnormal -> signed zero
  return x;
}
VATTN_HD bool finite_bits(float x) { return (float_bits(x) & 0x7f800000u) != 0x7f800000u; }

// ---- fp8 e4m3 (OCP e4m3fn: bias 7, no infinities, 0x7f / 0xff NaN, max 448) ----------------

// Round to nearest even, saturating to +-448. NaN input gives 0x7f (encoders never pass NaN).
VATTN_HD uint8_t fp8_e4m3_from_float(float x) {
  const uint32_t u = float_bits(x);
  const uint8_t sign = uint8_t((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint8_t(sign | 0x7fu);
  if (a >= 0x43e00000u) return uint8_t(sign | 0x7eu);  // >= 448 (incl. inf): saturate
  if (a < 0x3c800000u) {                               // < 2^-6: e4m3 subnormal, step 2^-9
    const int e = int(a >> 23) - 127;
    if (e < -11) return sign;                        // < 2^-11 (also fp32 subnormals): 0
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;  // |x| = m * 2^(e - 23)
    const int shift = 14 - e;                        // code = |x| * 2^9 = m * 2^(e - 14)
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;  // r == 8 is the smallest normal: fine
    return uint8_t(sign | r);
  }
  // Normal: rebias the exponent (127 -> 7) and keep 3 mantissa bits, rounding the other 20.
  uint32_t r = (a - (120u << 23)) >> 20;
  const uint32_t rem = a & 0xfffffu;
  if (rem > 0x80000u || (rem == 0x80000u && (r & 1u))) ++r;
  if (r > 0x7eu) r = 0x7eu;  // rounded up past 448
  return uint8_t(sign | r);
}

// e4m3 bits -> the fp16 bits of value * 2^-8 (same mantissa, exponent rebiased by shifting;
// subnormals line up too). The kernels fold the 2^8 into the scale.
VATTN_HD uint16_t fp8_e4m3_to_half_bits(uint8_t b) { return uint16_t(((b & 0x80u) << 8) | ((b & 0x7fu) << 7)); }
constexpr float kFp8HalfScale = 256.f;  // value = half(fp8_e4m3_to_half_bits(b)) * 256
VATTN_HD float fp8_e4m3_to_float(uint8_t b) { return to_float(f16_t{fp8_e4m3_to_half_bits(b)}) * kFp8HalfScale; }

// ---- encoders -------------------------------------------------------------------------------
// Each format is split into (1) a reduction over the vector's cleaned elements (max |x|, or min
// and max; exact, so any order -- one thread's loop or a warp's shuffles -- gives the same
// value), (2) parameters from the reduction, (3) the code of one element. The array encoders
// below run the three steps in one thread (CPU); a CUDA warp runs (1) with shuffles and (3) per
// lane, on the same functions, so both store the same bytes.

// Step 1 contributions of one element (fold with fmaxf / fminf from 0 / +inf / -inf).
VATTN_HD float amax_term(float x) {
  const float c = clean(x);
  return finite_bits(c) ? fabsf(c) : 0.f;
}
VATTN_HD float min_term(float x) {
  const float c = clean(x);
  return finite_bits(c) ? c : INFINITY;
}
VATTN_HD float max_term(float x) {
  const float c = clean(x);
  return finite_bits(c) ? c : -INFINITY;
}

// Step 2: symmetric formats (fp8: qmax 448, int8: 127). inv = 0 marks a vector stored as zeros.
struct SymParams {
  float inv, scale;
};
VATTN_HD SymParams sym_params(float amax, float qmax) {
  if (!(amax >= kQuantTiny)) return SymParams{0.f, 0.f};
  return SymParams{div_rn(qmax, amax), div_rn(amax, qmax)};
}
// Step 2: asymmetric int4 from the finite min / max (lo > hi: no finite element).
struct AsymParams {
  float inv, scale, zero;
};
VATTN_HD AsymParams int4_params(float lo, float hi) {
  if (lo > hi) lo = hi = 0.f;
  lo = add_rn(lo, 0.f);  // -0 -> +0: min / max of signed zeros may return either
  hi = add_rn(hi, 0.f);
  const float range = sub_rn(hi, lo);
  if (!(range >= kQuantTiny)) return AsymParams{0.f, 0.f, lo};
  return AsymParams{div_rn(kInt4Levels, range), div_rn(range, kInt4Levels), lo};
}

// Step 3: the code of one element.
VATTN_HD uint8_t fp8_code(float x, const SymParams& q) {
  const float c = clean(x);
  if (q.inv == 0.f) return 0;
  if (!finite_bits(c)) return uint8_t(c > 0.f ? 0x7eu : 0xfeu);
  return fp8_e4m3_from_float(mul_rn(c, q.inv));
}
VATTN_HD int8_t int8_code(float x, const SymParams& q) {
  const float c = clean(x);
  if (q.inv == 0.f) return 0;
  if (!finite_bits(c)) return int8_t(c > 0.f ? 127 : -127);
  return int8_t(int(fminf(fmaxf(round_even(mul_rn(c, q.inv)), -kInt8Max), kInt8Max)));
}
VATTN_HD uint8_t int4_code_of(float x, const AsymParams& q) {
  const float c = clean(x);
  if (!finite_bits(c)) return c > 0.f ? 15 : 0;
  if (q.inv == 0.f) return 0;
  return uint8_t(int(fminf(fmaxf(round_even(mul_rn(sub_rn(c, q.zero), q.inv)), 0.f), kInt4Levels)));
}

// Array encoders (one thread): n codes and the scale words.
VATTN_HD float encode_fp8(const float* x, int n, uint8_t* q) {
  float amax = 0.f;
  for (int i = 0; i < n; ++i) amax = fmaxf(amax, amax_term(x[i]));
  const SymParams sp = sym_params(amax, kFp8Max);
  for (int i = 0; i < n; ++i) q[i] = fp8_code(x[i], sp);
  return sp.scale;
}
VATTN_HD float encode_int8(const float* x, int n, int8_t* q) {
  float amax = 0.f;
  for (int i = 0; i < n; ++i) amax = fmaxf(amax, amax_term(x[i]));
  const SymParams sp = sym_params(amax, kInt8Max);
  for (int i = 0; i < n; ++i) q[i] = int8_code(x[i], sp);
  return sp.scale;
}
// int4 of one whole (token, kv_head) vector: codes packed two per byte (element 2i in the low
// nibble of byte i, 2i + 1 in the high one); w[0] = scale, w[1] = zero (= min). n even.
VATTN_HD void encode_int4(const float* x, int n, uint8_t* packed, float* w) {
  float lo = INFINITY, hi = -INFINITY;
  for (int i = 0; i < n; ++i) {
    lo = fminf(lo, min_term(x[i]));
    hi = fmaxf(hi, max_term(x[i]));
  }
  const AsymParams ap = int4_params(lo, hi);
  for (int i = 0; i < n; i += 2) packed[i >> 1] = uint8_t(int4_code_of(x[i], ap) | (int4_code_of(x[i + 1], ap) << 4));
  w[0] = ap.scale;
  w[1] = ap.zero;
}

// Code of element i of a packed int4 vector.
VATTN_HD int int4_code(const uint8_t* packed, int i) { return (packed[i >> 1] >> ((i & 1) * 4)) & 0xf; }

// ---- int4_ch: keys per (kv_head, channel) over groups of G = head_dim / 2 tokens (KIVI) ----------
// Same codes, rules and packing as int4, but the min / max run over the group's tokens for each
// channel. The group's 2 * head_dim fp32 parameters (scale of channel c at index c, zero at index
// head_dim + c) are spread over the kInt4ChWords words of its G tokens: parameter i is word i % 4 of
// the group's token i / 4, so every token still carries 16 bytes of scale words and a cache maps
// them with its tokens (whole groups). reference.py holds the definition.
constexpr int kInt4ChWords = 4;
VATTN_HD constexpr int int4_ch_group(int head_dim) { return head_dim / 2; }
// Offset (in floats) of parameter i from the group's first token's words; ws_tok: the word stride
// of one token.
VATTN_HD int64_t int4_ch_param(int i, int64_t ws_tok) { return int64_t(i >> 2) * ws_tok + (i & 3); }
// The value of a code, product and sum rounded apart (the reference's c * scale + zero): the
// re-encoding of a partial group dequantizes its old tokens with this, so CPU and CUDA agree.
VATTN_HD float int4_ch_value(int code, float scale, float zero) { return add_rn(mul_rn(float(code), scale), zero); }

// Encodes one group of m (1..G) tokens: x(t, c) = x[t * x_stride + c], fp32, oldest first; writes
// the packed codes of token t at codes + t * code_stride (head_dim / 2 bytes) and the group's
// parameters at gw (the group's first token's words, token word stride ws_tok). One thread; a
// CUDA kernel runs the same per-channel-pair body (encode_int4_ch_pair) on its threads.
VATTN_HD void encode_int4_ch_pair(const float* x, int64_t x_stride, int m, int head_dim, int c, uint8_t* codes,
                                  int64_t code_stride, float* gw, int64_t ws_tok) {
  float lo0 = INFINITY, hi0 = -INFINITY, lo1 = INFINITY, hi1 = -INFINITY;
  for (int t = 0; t < m; ++t) {
    const float a = x[t * x_stride + c], b = x[t * x_stride + c + 1];
    lo0 = fminf(lo0, min_term(a));
    hi0 = fmaxf(hi0, max_term(a));
    lo1 = fminf(lo1, min_term(b));
    hi1 = fmaxf(hi1, max_term(b));
  }
  const AsymParams p0 = int4_params(lo0, hi0), p1 = int4_params(lo1, hi1);
  for (int t = 0; t < m; ++t)
    codes[t * code_stride + (c >> 1)] =
        uint8_t(int4_code_of(x[t * x_stride + c], p0) | (int4_code_of(x[t * x_stride + c + 1], p1) << 4));
  gw[int4_ch_param(c, ws_tok)] = p0.scale;
  gw[int4_ch_param(c + 1, ws_tok)] = p1.scale;
  gw[int4_ch_param(head_dim + c, ws_tok)] = p0.zero;
  gw[int4_ch_param(head_dim + c + 1, ws_tok)] = p1.zero;
}
VATTN_HD void encode_int4_ch_group(const float* x, int64_t x_stride, int m, int head_dim, uint8_t* codes,
                                   int64_t code_stride, float* gw, int64_t ws_tok) {
  for (int c = 0; c < head_dim; c += 2)
    encode_int4_ch_pair(x, x_stride, m, head_dim, c, codes, code_stride, gw, ws_tok);
}

}  // namespace quant
}  // namespace vattn
