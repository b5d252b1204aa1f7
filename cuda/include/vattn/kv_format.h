#pragma once
// KV storage formats: the one format-trait family of vattn. The storage format of K (and of V,
// chosen apart) is a type given to every kernel as a template parameter; the CPU row reader,
// the CUDA split-decode chunk loader and the CUDA prefill tile loader specialize on these types,
// so a new format is a new trait here plus one specialization per loader.
//
// A format provides:
//   kCode                          its KvFormatCode (python/vattn/formats.py holds the same table)
//   storage_t                      the element type the cache strides count
//   kElemsPerStorage               head_dim elements held in one storage_t (2 for packed int4)
//   kScaleWords                    fp32 scale words per (token, kv_head) vector (0: none)
//   dequant(const storage_t* v, const float* w, i)
//                                  element i of one [head_dim] vector v with its scale words w
//   encode(const float* x, n, storage_t* v, float* w)
//                                  stores one vector of n values (quantized formats: quant.h)
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "vattn/dtypes.h"
#include "vattn/quant.h"

namespace vattn {

// Codes shared with python/vattn/formats.py. Never renumber. The plain codes equal the DType
// codes of dtypes.h, so "auto" (store the q dtype) is the same number.
enum KvFormatCode : int32_t {
  kKvFloat32 = kFloat32,
  kKvFloat16 = kFloat16,
  kKvBFloat16 = kBFloat16,
  kKvFp8E4M3 = 3,
  kKvInt8 = 4,
  kKvInt4 = 5,
  kKvInt4Channel = 6,
};

template <typename Storage>
struct PlainFormat {
  using storage_t = Storage;
  static constexpr int32_t kCode = sizeof(Storage) == 4                  ? kKvFloat32
                                   : std::is_same<Storage, f16_t>::value ? kKvFloat16
                                                                         : kKvBFloat16;
  static constexpr int kElemsPerStorage = 1;
  static constexpr int kScaleWords = 0;
  VATTN_HD static float load(const storage_t* p, int i) { return to_float(p[i]); }
  VATTN_HD static void store(storage_t* p, int i, float x) { p[i] = from_float<storage_t>(x); }
  VATTN_HD static float dequant(const storage_t* p, const float*, int i) { return load(p, i); }
  VATTN_HD static void encode(const float* x, int n, storage_t* p, float*) {
    for (int i = 0; i < n; ++i) store(p, i, x[i]);
  }
};

// fp8 e4m3 codes with one fp32 scale per (token, kv_head): x = e4m3(code) * w[0].
struct Fp8E4M3Format {
  using storage_t = uint8_t;
  static constexpr int32_t kCode = kKvFp8E4M3;
  static constexpr int kElemsPerStorage = 1;
  static constexpr int kScaleWords = 1;
  VATTN_HD static float dequant(const storage_t* p, const float* w, int i) {
    return quant::fp8_e4m3_to_float(p[i]) * w[0];
  }
  VATTN_HD static void encode(const float* x, int n, storage_t* p, float* w) { w[0] = quant::encode_fp8(x, n, p); }
};

// Symmetric int8 codes with one fp32 scale per (token, kv_head): x = code * w[0].
struct Int8Format {
  using storage_t = int8_t;
  static constexpr int32_t kCode = kKvInt8;
  static constexpr int kElemsPerStorage = 1;
  static constexpr int kScaleWords = 1;
  VATTN_HD static float dequant(const storage_t* p, const float* w, int i) { return float(p[i]) * w[0]; }
  VATTN_HD static void encode(const float* x, int n, storage_t* p, float* w) { w[0] = quant::encode_int8(x, n, p); }
};

// Asymmetric int4, two codes per byte, with an fp32 (scale, zero) pair per (token, kv_head):
// x = code * w[0] + w[1].
struct Int4Format {
  using storage_t = uint8_t;
  static constexpr int32_t kCode = kKvInt4;
  static constexpr int kElemsPerStorage = 2;
  static constexpr int kScaleWords = 2;
  VATTN_HD static float dequant(const storage_t* p, const float* w, int i) {
    return float(quant::int4_code(p, i)) * w[0] + w[1];
  }
  VATTN_HD static void encode(const float* x, int n, storage_t* p, float* w) { quant::encode_int4(x, n, p, w); }
};

// int4_ch: asymmetric int4 keys per (kv_head, channel) over groups of G = head_dim / 2 tokens
// (KIVI; quant.h has the layout). Not a per-vector format: it has no dequant(p, w, i). A reader
// finds the parameters of token t's group from the words of the group's first token, t - t % G:
//   dequant_grouped(p, gw, ws_tok, i, head_dim)   element i of the token with codes p, gw = words
//                                                 of its group's first token, ws_tok = word stride
// and append / compaction re-encode whole groups (quant::encode_int4_ch_group).
struct Int4ChannelFormat {
  using storage_t = uint8_t;
  static constexpr int32_t kCode = kKvInt4Channel;
  static constexpr int kElemsPerStorage = 2;
  static constexpr int kScaleWords = quant::kInt4ChWords;
  VATTN_HD static constexpr int group(int head_dim) { return quant::int4_ch_group(head_dim); }
  VATTN_HD static float dequant_grouped(const storage_t* p, const float* gw, int64_t ws_tok, int i, int head_dim) {
    return quant::int4_ch_value(quant::int4_code(p, i), gw[quant::int4_ch_param(i, ws_tok)],
                                gw[quant::int4_ch_param(head_dim + i, ws_tok)]);
  }
};

// Whether a format's parameters are per group of tokens (int4_ch) rather than per vector.
template <class Format>
struct is_grouped_format : std::false_type {};
template <>
struct is_grouped_format<Int4ChannelFormat> : std::true_type {};

constexpr bool kv_format_is_quantized(int32_t code) {
  return code == kKvFp8E4M3 || code == kKvInt8 || code == kKvInt4 || code == kKvInt4Channel;
}

// Calls f(Format{}) for a quantized KvFormatCode only (throws for any other).
template <typename F>
decltype(auto) dispatch_quantized_format(int32_t code, const char* what, F&& f) {
  switch (code) {
    case kKvFp8E4M3: return f(Fp8E4M3Format{});
    case kKvInt8: return f(Int8Format{});
    case kKvInt4: return f(Int4Format{});
    case kKvInt4Channel: return f(Int4ChannelFormat{});
    default:
      throw std::invalid_argument(std::string("vattn: ") + what + ": not a quantized KV format code " +
                                  std::to_string(code));
  }
}

// The (K, V) format pairs an attention kernel is instantiated for, given the q dtype T: the
// plain format of T on both sides, or any pair of quantized formats. Calls f(KF{}, VF{}).
template <typename T, typename F>
void dispatch_kv_pair(int32_t k_code, int32_t v_code, const char* what, F&& f) {
  if (!kv_format_is_quantized(k_code) && !kv_format_is_quantized(v_code)) {
    if (k_code != PlainFormat<T>::kCode || v_code != PlainFormat<T>::kCode)
      throw std::invalid_argument(std::string("vattn: ") + what + ": a plain K/V cache must store the q dtype");
    f(PlainFormat<T>{}, PlainFormat<T>{});
    return;
  }
  dispatch_quantized_format(k_code, what,
                            [&](auto kf) { dispatch_quantized_format(v_code, what, [&](auto vf) { f(kf, vf); }); });
}

// Whether head_dim elements make whole storage elements of the format.
template <typename Format>
constexpr bool dim_ok(int head_dim) {
  return head_dim > 0 && head_dim % Format::kElemsPerStorage == 0;
}

inline const char* kv_format_name(int32_t code) {
  switch (code) {
    case kKvFloat32: return "float32";
    case kKvFloat16: return "float16";
    case kKvBFloat16: return "bfloat16";
    case kKvFp8E4M3: return "fp8_e4m3";
    case kKvInt8: return "int8";
    case kKvInt4: return "int4";
    case kKvInt4Channel: return "int4_ch";
    default: return "unknown";
  }
}

// Calls f(Format{}) with the format type of a KvFormatCode; throws std::invalid_argument (a
// Python ValueError) for an unknown code. Serves the CPU ops and the CUDA launchers alike.
template <typename F>
decltype(auto) dispatch_kv_format(int32_t code, const char* what, F&& f) {
  switch (code) {
    case kKvFloat32: return f(PlainFormat<float>{});
    case kKvFloat16: return f(PlainFormat<f16_t>{});
    case kKvBFloat16: return f(PlainFormat<bf16_t>{});
    case kKvFp8E4M3: return f(Fp8E4M3Format{});
    case kKvInt8: return f(Int8Format{});
    case kKvInt4: return f(Int4Format{});
    case kKvInt4Channel: return f(Int4ChannelFormat{});
    default:
      throw std::invalid_argument(std::string("vattn: ") + what + ": unknown KV format code " + std::to_string(code));
  }
}

}  // namespace vattn
