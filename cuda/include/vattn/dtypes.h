#pragma once
// Element types shared by the CPU and CUDA code. The storage types are plain 16-bit words
// so the CPU build needs no CUDA headers; conversions are bit-exact with the CUDA
// intrinsics (round to nearest even, NaN kept a NaN).
#include <cstdint>
#include <cstring>

#include "vattn/macros.h"

namespace vattn {

// Codes shared with the Python layer (python/vattn/_dtypes.py). Never renumber.
enum DType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

VATTN_HD int dtype_size(int32_t code) { return code == kFloat32 ? 4 : 2; }

struct f16_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

VATTN_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
VATTN_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

VATTN_HD float to_float(float x) { return x; }
VATTN_HD float to_float(bf16_t x) { return bits_float(uint32_t(x.bits) << 16); }

VATTN_HD float to_float(f16_t x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bits_float(sign);
    // subnormal: normalise
    int e = -1;
    do {
      mant <<= 1;
      ++e;
    } while ((mant & 0x400u) == 0);
    mant &= 0x3ffu;
    return bits_float(sign | (uint32_t(127 - 15 - e) << 23) | (mant << 13));
  }
  return bits_float(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

template <typename T>
VATTN_HD T from_float(float f);
template <>
VATTN_HD float from_float<float>(float f) {
  return f;
}

template <>
VATTN_HD bf16_t from_float<bf16_t>(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t((u + rounding) >> 16)};
}

template <>
VATTN_HD f16_t from_float<f16_t>(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16_t{uint16_t(sign | 0x7e00u)};   // NaN
  if (a >= 0x477ff000u) return f16_t{uint16_t(sign | 0x7c00u)};  // overflow -> inf
  if (a < 0x38800000u) {                                         // subnormal or zero
    if (a < 0x33000000u) return f16_t{sign};                     // < half of min subnormal
    const uint32_t exp = a >> 23;
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // 14..24
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return f16_t{uint16_t(sign | r)};
  }
  // normal: rebias exponent, round mantissa to 10 bits (nearest even); a carry rolls into the exponent
  uint32_t r = ((a - 0x38000000u) >> 13);
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return f16_t{uint16_t(sign | r)};
}

}  // namespace vattn
