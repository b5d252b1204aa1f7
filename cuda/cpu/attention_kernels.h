#pragma once
// The inner loops of CPU attention, on fp32 tiles. They are compiled once per instruction set
// (plain x86-64 and AVX2+FMA, picked at load time) because the wheel is built without -march.
#include <cstdint>

#include "vattn/softmax_state.h"

namespace vattn {
namespace cpu {

// Software prefetch of the cache line holding p into L1 (kLocality 3), L2 (2), L3 (1) or with the
// non-temporal hint (0). Every prefetch of the CPU loops goes through here, as an asm statement with
// a side effect, because GCC's model gives __builtin_prefetch none: a helper whose only effect is
// prefetching is found "looping const" or "pure", and a call to it that was not inlined early is
// deleted. GCC 12 at -O1 and up removed every call of the decode walk's piece prefetch that way,
// and prefetch_span compiled to nothing (found in the assembly; both are now kept).
template <int kLocality = 3>
inline void prefetch(const void* p) {
  static_assert(kLocality >= 0 && kLocality <= 3, "locality 0-3, as __builtin_prefetch");
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  if constexpr (kLocality == 3)
    asm volatile("prefetcht0 %0" : : "m"(*c));
  else if constexpr (kLocality == 2)
    asm volatile("prefetcht1 %0" : : "m"(*c));
  else if constexpr (kLocality == 1)
    asm volatile("prefetcht2 %0" : : "m"(*c));
  else
    asm volatile("prefetchnta %0" : : "m"(*c));
#else
  __builtin_prefetch(p, 0, kLocality);
#endif
}

// s[i * lds + j] = dot(q[i], k[j]) for i < nq, j < nk; q rows are contiguous [nq][dim],
// k row j starts at k + j * k_stride.
// nk_avail >= nk: rows readable from k (the walk goes on past this block), for prefetching.
void qk_block(const float* q, int nq, const float* k, int64_t k_stride, int nk, int nk_avail, int dim, float* s,
              int lds);

// Query tiles from this many rows on take the GEMM path (prefill: K and V packed into panels, then
// register tiles; AVX-512 where the CPU has it); decode tiles (one GQA group) keep dot-product
// tiles, for which packing would cost as much as the products.
constexpr int kGemmMinRows = 12;

// Prefill on K and V packed once per kv head and block of kPackKeys keys, shared by every query tile
// of the head (attention_cpu.cpp prefill_impl): only the AVX2 copy (packed_prefill() says whether it
// runs here; the AVX-512 GEMM tiles pack per tile as before).
//   pack_k_panels / pack_v_panels: kPackKeys rows of fp32 keys / values, row j at k + j * ks, into
//     kt (kPackKeys * dim floats) / vp (kPackKeys * packed_v_lanes(dim) floats);
//   qk_packed: s[r * lds + c] = q[r] . k_c for r < nq and at least row r's columns [ca[r], ce[r])
//     of the block (0 <= ca, ce <= kPackKeys; ca >= ce: none); other columns may or may not be
//     written, so the caller reads only [ca[r], ce[r]);
//   pv_packed: acc[r][:] += sum_c p[r * ldp + c] * v_c[:] over a range of columns that holds every
//     [ca[r'], ce[r']) of nearby rows r': p must be 0 in each row outside its own [ca[r], ce[r]) on
//     the block's kPackKeys columns.
constexpr int kPackKeys = 64;
inline int packed_v_lanes(int dim) { return (dim + 15) / 16 * 16; }
bool packed_prefill();
void pack_k_panels(const float* k, int64_t ks, int dim, float* kt);
void pack_v_panels(const float* v, int64_t vs, int dim, float* vp);
void qk_packed(const float* q, int nq, const float* kt, const int* ca, const int* ce, int dim, float* s, int lds);
void pv_packed(const float* p, int ldp, int nq, const float* vp, const int* ca, const int* ce, int dim, float* acc);

// Which copy of these loops runs: "avx512" (AVX2 + the AVX-512 GEMM tiles), "avx2" or "generic".
const char* simd_copy();

// acc[i][:] += sum_j p[i * ldp + j] * v[j][:]; zero weights are skipped (masked keys may hold NaN
// in a converted buffer only if the cache does, and never past a length: those are not read).
void pv_block(const float* p, int ldp, int nq, const float* v, int64_t v_stride, int nk, int nk_avail, int dim,
              float* acc);

// Decode over the kv heads of one token at a time (attention_cpu.cpp says why): for the tokens t of
// [jb, jb + nk) in order, and within a token the heads h < nh in order, if lo[h] <= t < hi[h]:
//   qk_tokens: s[(h * rows + r) * lds + (t - jb)] = dot(q[h * rows + r], k(t, h)) for r < rows;
//   pv_tokens: acc[h * rows + r][:] += p[(h * rows + r) * ldp + (t - jb)] * v(t, h)[:] for r < rows,
// where k(t, h) = k + t * k_tok + h * k_head (fp32 rows of dim), and v alike. Tokens outside a
// head's [lo, hi) are not read (a head's rows may end before another's).
// Where token_pieces says so the walk goes in pieces of a few tokens (8 in the AVX2 copy,
// kTokenPiece in the AVX-512 one), the heads of a piece in order, each head's tokens of the piece
// together. Both walks prefetch the rows a few tokens ahead (attention_kernels_avx2.h): past the block, the first rows
// of `next`, the rows the caller walks after this block (V of the same block after K, the next block's K after V).
// Prefetches never fault, so `next` only has to say where the walk goes, not that the rows exist.
struct NextRows {
  const float* p = nullptr;  // token 0's row of the first head
  int64_t tok = 0;           // floats from token to token
  int n = 0;                 // tokens the walk reads there
};
constexpr int kTokenPiece = 4;  // the AVX-512 copy's pieces (decode_pieces_avx512.h)
// Whether qk_tokens / pv_tokens walk in pieces for this many rows per head and head dim (the AVX2
// copy: 3 rows or more, head dims that are a multiple of 16); elsewhere they go one token at a time.
bool token_pieces(int rows, int dim);
// Whether the pieces have an AVX-512 copy for this shape (the CPU has AVX-512F, rows >= 4, head dims
// a multiple of 16): `wide` below takes it (attention_cpu.cpp says where it pays).
bool wide_token_pieces(int rows, int dim);
void qk_tokens(const float* q, int rows, int nh, const float* k, int64_t k_tok, int64_t k_head, int jb, int nk,
               const int* lo, const int* hi, int dim, float* s, int lds, NextRows next, bool wide);
void pv_tokens(const float* p, int ldp, int rows, int nh, const float* v, int64_t v_tok, int64_t v_head, int jb, int nk,
               const int* lo, const int* hi, int dim, float* acc, NextRows next, bool wide);

// dst[j][:] = fp32 of n rows of dim 16-bit values (IEEE half or bfloat16) starting every
// `stride` elements; dst rows are contiguous.
void f16_rows_to_float(const uint16_t* src, int64_t stride, int n, int n_avail, int dim, float* dst);
void bf16_rows_to_float(const uint16_t* src, int64_t stride, int n, int n_avail, int dim, float* dst);

// dst[j][:] = the dequantized values of n quantized rows (kv_format.h): row j's codes start at
// src + j * stride (storage elements, i.e. bytes), its scale words at scale + j * scale_stride
// (floats). Each equals Format::dequant element for element:
//   int8      code * w[0]
//   fp8_e4m3  half(fp8_e4m3_to_half_bits(code)) * (w[0] * 256)  (= e4m3(code) * w[0]: both
//             products are exact before the one rounding; 256 * w[0] is exact for any scale
//             append_kv stores, which is at most FLT_MAX / 448)
//   int4      code * w[0] + w[1], two codes per byte (element 2i in the low nibble), the
//             product and the sum rounded apart (no FMA), as the reference does; dim even.
// n_avail >= n: rows of the walk readable from src, for prefetching the codes ahead.
void int8_rows_to_float(const int8_t* src, int64_t stride, const float* scale, int64_t scale_stride, int n, int n_avail,
                        int dim, float* dst);
void fp8_e4m3_rows_to_float(const uint8_t* src, int64_t stride, const float* scale, int64_t scale_stride, int n,
                            int n_avail, int dim, float* dst);
void int4_rows_to_float(const uint8_t* src, int64_t stride, const float* scale, int64_t scale_stride, int n,
                        int n_avail, int dim, float* dst);
// int4_ch (keys per channel, kv_format.h Int4ChannelFormat): n rows of packed codes sharing one
// group's per-channel parameters, element d = code * scale[d] + zero[d], product and sum rounded
// apart (= quant::int4_ch_value, exact); dim even.
void int4_ch_rows_to_float(const uint8_t* src, int64_t stride, const float* scale, const float* zero, int n,
                           int n_avail, int dim, float* dst);
// The codes of n int4 rows as floats centred on the code range, code - 7.5 (exact; element 2i in
// the low nibble): the int4_ch key path of attention folds the group's scales into q instead of
// dequantizing every element (row_reader.h int4_ch_qk says why centred).
constexpr float kInt4CodeCentre = 7.5f;
void int4_centred_codes_to_float(const uint8_t* src, int64_t stride, int n, int n_avail, int dim, float* dst);

// Max of s[a:e).
float max_of(const float* s, int a, int e);
// Softmax weights of one row of a block in the exp2 domain: s[j] = 2^(s[j] - m) for j in [a, e),
// 0 for the other j < n (masked keys); returns the sum of the weights. Requires s[j] <= m.
float exp2_weights(float* s, int n, int a, int e, float m);
// The online-softmax step of `rows` rows of a block (row r: s + r * lds, its keys [ca[r], ce[r])):
// the block max moves st[r], acc row r (dim floats) takes the rescale factor, and s row r becomes
// its weights (exp2_weights; a row with no key, or only -inf logits so far, becomes all 0).
void softmax_rows(float* s, int lds, int n, int rows, const int* ca, const int* ce, SoftmaxState* st, float* acc,
                  int dim);

// How far ahead (in rows) the loops prefetch.
constexpr int kPrefetchRows = 6;
// The same for quantized rows: a row is one or two cache lines and converts in a few dozen cycles,
// so the prefetch has to run more rows ahead to cover the memory latency.
constexpr int kPrefetchRowsQuant = 16;

}  // namespace cpu
}  // namespace vattn
