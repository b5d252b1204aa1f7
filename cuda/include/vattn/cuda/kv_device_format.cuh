#pragma once
// Device side of the KV storage formats of kv_format.h: how the CUDA kernels read K/V stored in
// a format. DeviceKvFormat is specialized on the kv_format.h format types themselves, so a new
// format is one more specialization here; the kernels never look at the stored bytes. (The
// prefill tile loader, KVTileLoader in prefill_tile.cuh, is keyed on the same types.)
//
// Every DeviceKvFormat<Format> provides
//   storage_t                   element type of the cache strides (= Format::storage_t)
//   kChunked                    whether the chunk interface below exists
//   dequant(const storage_t* v, const float* w, i)
//                               element i of one vector v with its scale words w, the value
//                               kv_format.h's Format::dequant defines (scalar kernels: the
//                               plain decode kernel; w is ignored by plain formats, may be null)
//   load(const storage_t*, i)   element i of a plain (unscaled) format (scalar kernels)
// and, when kChunked (the split decode kernel):
//   kElemsPerChunk              head_dim elements held in one 16-byte chunk (the cp.async unit
//                               of the K/V tiles): 8 for 16-bit, 16 for 8-bit, 32 for int4
//   kPieceBytes                 bytes of one lane's piece: kLaneElems = 8 consecutive elements
//                               (16, 8, 4); a piece is kPieceBytes-aligned inside a chunk
//   kScaleWords                 fp32 words per vector (0, 1 or 2), copied to shared memory
//   kZero                       whether the format has an additive zero point (int4)
//   decode(const void* piece, float (&)[8])
//                               one lane's piece (in shared memory) -> 8 raw values r_i
//   scale(const float* w)       multiplier m of the vector: element i = r_i * m (+ zero(w))
//   zero(const float* w)        additive zero point (kZero formats only)
//   The kernels never multiply element by element: the key's scale multiplies the dot product
//   q.r and the value's scale multiplies the softmax weight; a zero point z adds z * sum(q) to
//   the logit and p * z to a per-head scalar added to every output dim at the end.
// Grouped formats (int4_ch: parameters per channel over groups of G tokens, kv_format.h) have no
// per-vector dequant; their chunk interface leaves the parameters to the kernel (see the
// specialization below: the split decode kernel folds them into q). Scalar kernels read every
// format through
//   words_token<F>(j, head_dim)      the token whose scale words a reader of token j passes:
//                                    j, or j - j % G for a grouped format
//   dequant_elem<F>(v, w, ws_tok, i, head_dim)
//                                    element i of vector v, w = the words of words_token(j),
//                                    ws_tok = the word stride of one token (floats)
// and the launchers check check_grouped_kv (whole groups in the cache) on the host. The attention
// kernels take a grouped format as K only (dispatch_attention_kv_pair).
#include <cuda_fp8.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "vattn/cuda/vec.cuh"
#include "vattn/dtypes.h"
#include "vattn/kv_format.h"
#include "vattn/params.h"
#include "vattn/quant.h"

namespace vattn {
namespace cuda {

constexpr int kLaneElems = 8;  // head_dim elements one lane of the split kernel decodes per key

// Any format: scalar loads through the format's own (portable) functions; no chunk interface.
template <typename Format>
struct DeviceKvFormat {
  using storage_t = typename Format::storage_t;
  static constexpr bool kChunked = false;
  __device__ __forceinline__ static float load(const storage_t* p, int i) { return Format::load(p, i); }
  __device__ __forceinline__ static float dequant(const storage_t* p, const float* w, int i) {
    return Format::dequant(p, w, i);
  }
};

// Plain 16-bit storage (f16_t / bf16_t), no scales: intrinsic conversions, 8 elements a chunk.
template <typename T>
struct DevicePlain16Format {
  static_assert(sizeof(T) == 2, "16-bit storage types only");
  using storage_t = T;
  static constexpr bool kChunked = true;
  static constexpr int kElemsPerChunk = 8;
  static constexpr int kPieceBytes = 16;
  static constexpr int kScaleWords = 0;
  static constexpr bool kZero = false;
  __device__ __forceinline__ static float load(const storage_t* p, int i) { return elem_to_float(p[i]); }
  __device__ __forceinline__ static float dequant(const storage_t* p, const float*, int i) {
    return elem_to_float(p[i]);
  }
  __device__ __forceinline__ static void decode(const void* piece, float (&x)[kLaneElems]) {
    chunk_to_float<T>(ld_shared_16(piece), x);
  }
  __device__ __forceinline__ static float scale(const float*) { return 1.f; }
  __device__ __forceinline__ static float zero(const float*) { return 0.f; }
};
template <>
struct DeviceKvFormat<PlainFormat<f16_t>> : DevicePlain16Format<f16_t> {};
template <>
struct DeviceKvFormat<PlainFormat<bf16_t>> : DevicePlain16Format<bf16_t> {};

// Two e4m3 codes (low byte = first element) -> two floats. sm_89+: the hardware conversion
// (exact: every e4m3 value is an fp16 value). Below: the bit trick of quant.h
// (fp8_e4m3_to_half_bits: value * 2^-8 as fp16, on both halves at once); kFp8DecodeMul undoes
// the 2^-8 and is folded into the vector's scale.
__device__ __forceinline__ float2 fp8x2_to_float2(uint32_t two_codes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(two_codes & 0xffffu), __NV_E4M3);
  return pair_to_float2(uint32_t(h.x) | (uint32_t(h.y) << 16), f16_t{});
#else
  const uint32_t t = __byte_perm(two_codes, 0u, 0x1404);            // bytes [0, b0, 0, b1]: b << 8 per half
  const uint32_t h = (t & 0x80008000u) | ((t & 0x7f007f00u) >> 1);  // sign | magnitude << 7
  return pair_to_float2(h, f16_t{});
#endif
}
__device__ __forceinline__ float fp8_decode_mul() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  return 1.f;
#else
  return quant::kFp8HalfScale;
#endif
}

// fp8 e4m3 with one scale per vector: 16 elements a chunk, 8 bytes a piece.
template <>
struct DeviceKvFormat<Fp8E4M3Format> {
  using storage_t = uint8_t;
  static constexpr bool kChunked = true;
  static constexpr int kElemsPerChunk = 16;
  static constexpr int kPieceBytes = 8;
  static constexpr int kScaleWords = 1;
  static constexpr bool kZero = false;
  // kv_format.h's value (quant::fp8_e4m3_to_float(p[i]) * w[0]): the same fp16 bits, converted
  // by the (exact) intrinsic instead of the portable branchy conversion.
  __device__ __forceinline__ static float dequant(const storage_t* p, const float* w, int i) {
    return elem_to_float(f16_t{quant::fp8_e4m3_to_half_bits(p[i])}) * quant::kFp8HalfScale * w[0];
  }
  // The 8 codes of two words (element k in byte k) -> their values (times 2^-8 below sm_89).
  __device__ __forceinline__ static void decode_words(const uint32_t* w, float (&x)[kLaneElems]) {
    const float2 a = fp8x2_to_float2(w[0]), b = fp8x2_to_float2(w[0] >> 16);
    const float2 e = fp8x2_to_float2(w[1]), f = fp8x2_to_float2(w[1] >> 16);
    x[0] = a.x;
    x[1] = a.y;
    x[2] = b.x;
    x[3] = b.y;
    x[4] = e.x;
    x[5] = e.y;
    x[6] = f.x;
    x[7] = f.y;
  }
  __device__ __forceinline__ static void decode(const void* piece, float (&x)[kLaneElems]) {
    const uint2 c = *static_cast<const uint2*>(piece);
    const uint32_t w[2] = {c.x, c.y};
    decode_words(w, x);
  }
  __device__ __forceinline__ static float scale(const float* w) { return w[0] * fp8_decode_mul(); }
  __device__ __forceinline__ static float zero(const float*) { return 0.f; }
};

// Byte i (0..3) of a word of int8 codes -> float, exactly: the biased code (s + 128) becomes the
// low mantissa byte of 2^23 (one PRMT), then one subtraction of 2^23 + 128.
__device__ __forceinline__ float int8_byte_to_float(uint32_t biased_word, int i) {
  return __uint_as_float(__byte_perm(biased_word, 0x4b000000u, 0x7540u | uint32_t(i))) - 8388736.f;
}

// Symmetric int8 with one scale per vector: 16 elements a chunk, 8 bytes a piece.
template <>
struct DeviceKvFormat<Int8Format> {
  using storage_t = int8_t;
  static constexpr bool kChunked = true;
  static constexpr int kElemsPerChunk = 16;
  static constexpr int kPieceBytes = 8;
  static constexpr int kScaleWords = 1;
  static constexpr bool kZero = false;
  __device__ __forceinline__ static float dequant(const storage_t* p, const float* w, int i) {
    return Int8Format::dequant(p, w, i);
  }
  // The 8 codes of two words (element k in byte k) -> their values.
  __device__ __forceinline__ static void decode_words(const uint32_t* w, float (&x)[kLaneElems]) {
    const uint32_t lo = w[0] ^ 0x80808080u, hi = w[1] ^ 0x80808080u;  // s -> s + 128 per byte
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[i] = int8_byte_to_float(lo, i);
      x[4 + i] = int8_byte_to_float(hi, i);
    }
  }
  __device__ __forceinline__ static void decode(const void* piece, float (&x)[kLaneElems]) {
    const uint2 c = *static_cast<const uint2*>(piece);
    const uint32_t w[2] = {c.x, c.y};
    decode_words(w, x);
  }
  __device__ __forceinline__ static float scale(const float* w) { return w[0]; }
  __device__ __forceinline__ static float zero(const float*) { return 0.f; }
};

// Asymmetric int4 (x = code * w[0] + w[1]), two codes a byte (element 2i in the low nibble of
// byte i): 32 elements a chunk, 4 bytes (8 codes) a piece. Code i of the word is nibble i;
// it becomes the low mantissa bits of 2^23 (shift + mask + or), then one subtraction of 2^23.
template <>
struct DeviceKvFormat<Int4Format> {
  using storage_t = uint8_t;
  static constexpr bool kChunked = true;
  static constexpr int kElemsPerChunk = 32;
  static constexpr int kPieceBytes = 4;
  static constexpr int kScaleWords = 2;
  static constexpr bool kZero = true;
  __device__ __forceinline__ static float dequant(const storage_t* p, const float* w, int i) {
    return Int4Format::dequant(p, w, i);
  }
  // The 8 codes of one word (element k in bits 4k..4k+3) -> their values.
  __device__ __forceinline__ static void decode_words(const uint32_t* w, float (&x)[kLaneElems]) {
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = __uint_as_float(0x4b000000u | ((w[0] >> (4 * i)) & 0xfu)) - 8388608.f;
  }
  __device__ __forceinline__ static void decode(const void* piece, float (&x)[kLaneElems]) {
    decode_words(static_cast<const uint32_t*>(piece), x);
  }
  __device__ __forceinline__ static float scale(const float* w) { return w[0]; }
  __device__ __forceinline__ static float zero(const float* w) { return w[1]; }
};

// int4_ch keys (kv_format.h: the codes and packing of int4, a scale and a zero per channel over
// groups of G = head_dim / 2 tokens). Its chunk interface serves the split decode kernel, which
// folds the group's parameters into q instead of scaling per key: logit = sum_i (q_i s_i) c_i +
// sum_i q_i z_i (decode_split_kernel.cuh). So the pieces decode like int4's, no scale words
// travel with the tiles (kScaleWords 0: the kernel reads each group's parameters when a lane's
// key enters it) and scale / zero are neutral. The prefill tile loader has its own
// specialization (prefill_tile.cuh).
template <>
struct DeviceKvFormat<Int4ChannelFormat> {
  using storage_t = uint8_t;
  static constexpr bool kChunked = true;
  static constexpr int kElemsPerChunk = 32;
  static constexpr int kPieceBytes = 4;
  static constexpr int kScaleWords = 0;
  static constexpr bool kZero = false;
  __device__ __forceinline__ static void decode_words(const uint32_t* w, float (&x)[kLaneElems]) {
    DeviceKvFormat<Int4Format>::decode_words(w, x);
  }
  __device__ __forceinline__ static void decode(const void* piece, float (&x)[kLaneElems]) {
    decode_words(static_cast<const uint32_t*>(piece), x);
  }
  __device__ __forceinline__ static float scale(const float*) { return 1.f; }
  __device__ __forceinline__ static float zero(const float*) { return 0.f; }
};

// ---- scalar reads for every format, grouped ones included -------------------------------------

template <typename Format>
__device__ __forceinline__ int64_t words_token(int64_t j, int head_dim) {
  if constexpr (is_grouped_format<Format>::value) {
    return j - j % Format::group(head_dim);
  } else {
    return j;
  }
}

// Element i of the stored vector v (a token j); w: the scale words of token words_token<F>(j)
// (null or ignored for plain formats), ws_tok: their token stride.
template <typename Format>
__device__ __forceinline__ float dequant_elem(const typename Format::storage_t* v, const float* w, int64_t ws_tok,
                                              int i, int head_dim) {
  if constexpr (is_grouped_format<Format>::value) {
    // Format::dequant_grouped's value, its parameter offsets (int4_ch_param) in 32 bits, which
    // check_grouped_side guarantees: fewer live 64-bit offsets once the compiler hoists them.
    static_assert(std::is_same<Format, Int4ChannelFormat>::value, "int4_ch is the grouped format");
    const int32_t ws = int32_t(ws_tok);
    const int z = head_dim + i;
    return quant::int4_ch_value(quant::int4_code(v, i), w[(i >> 2) * ws + (i & 3)], w[(z >> 2) * ws + (z & 3)]);
  } else {
    return DeviceKvFormat<Format>::dequant(v, w, i);
  }
}

// Host check of one side of a cache for a grouped format: an even head_dim, whole groups
// (max_seq a multiple of G, so the parameter words of any token < max_seq lie below max_seq) and
// a word stride ws_tok (floats per token) that keeps a group's parameter offsets in 32 bits.
// Throws std::invalid_argument naming `what`; nothing for the other formats.
inline void check_grouped_side(int32_t format, int64_t max_seq, int head_dim, int64_t ws_tok, const char* what,
                               const char* side) {
  if (format != kKvInt4Channel) return;
  auto bad = [&](const std::string& m) { throw std::invalid_argument(std::string(what) + ": " + side + ": " + m); };
  if (head_dim < 2 || head_dim % 2 != 0) bad("int4_ch needs an even head_dim, got " + std::to_string(head_dim));
  const int g = Int4ChannelFormat::group(head_dim);
  if (max_seq % g != 0)
    bad("an int4_ch cache holds whole groups of " + std::to_string(g) + " tokens: its seq (" + std::to_string(max_seq) +
        ") must be a multiple");
  if (ws_tok < 0 || ws_tok > (int64_t(1) << 30) / g) bad("int4_ch scale token stride out of range");
}
// A paged view with a grouped format: whole groups in every block (block_size a multiple of G), so
// a group's tokens -- its codes and the scale words that hold its parameters -- never cross a
// block and the kernels address a group from its first token (the Python layer guarantees it;
// checked here because the kernels rely on it).
inline void check_grouped_paged(int32_t format, const KVCacheView& c, int head_dim, const char* what,
                                const char* side) {
  if (format != kKvInt4Channel || c.block_table == nullptr || head_dim < 2) return;
  const int g = Int4ChannelFormat::group(head_dim);
  if (c.block_size % g != 0)
    throw std::invalid_argument(std::string(what) + ": " + side + ": a paged int4_ch cache needs block_size (" +
                                std::to_string(c.block_size) + ") a multiple of the group of " + std::to_string(g) +
                                " tokens");
}
inline void check_grouped_kv(const KVCacheView& c, int head_dim, const char* what) {
  check_grouped_side(c.k_format, c.max_seq, head_dim, c.ks_stride_tok, what, "K");
  check_grouped_side(c.v_format, c.max_seq, head_dim, c.vs_stride_tok, what, "V");
  check_grouped_paged(c.k_format, c, head_dim, what, "K");
  check_grouped_paged(c.v_format, c, head_dim, what, "V");
}

// dispatch_kv_pair (kv_format.h) for the CUDA attention kernels: a grouped format (int4_ch) as K
// only -- values are stored per token (vattn.formats rejects int4_ch values), so no kernel is
// instantiated for a grouped V and such a call throws std::invalid_argument before any launch.
template <typename T, typename F>
void dispatch_attention_kv_pair(int32_t k_code, int32_t v_code, const char* what, F&& f) {
  dispatch_kv_pair<T>(k_code, v_code, what, [&](auto kf, auto vf) {
    if constexpr (is_grouped_format<decltype(vf)>::value) {
      throw std::invalid_argument(std::string("vattn: ") + what +
                                  ": int4_ch is a key format (values are stored per token) on CUDA");
    } else {
      f(kf, vf);
    }
  });
}

}  // namespace cuda
}  // namespace vattn
