// Prefill / chunked-prefill attention on CUDA: parameter checks, the choice between the
// tensor-core kernel (impl 0) and the plain kernel (impl 1, and the fallback), and launches.
// K/V formats: the plain format of the q dtype on both sides, or any pair of quantized formats
// (fp8_e4m3, int8, int4; dispatch_kv_pair in kv_format.h), and int4_ch keys (parameters per
// channel over groups of tokens: their own tile loader), in both kernels.
// KV views: contiguous, or paged (a block table per row; kv_paged.cuh), in both kernels.
// No host synchronization and no allocation: everything runs on p.stream.
// Per-token attention scores (p.scores, score_mode): after either kernel, the score kernel of
// scores.cuh (attention_scores.cu) turns the final LSE into per-key probabilities ("replace"
// also writes the zeros of rows without queries).
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "vattn/cuda/check.cuh"
#include "vattn/cuda/prefill_fa2.cuh"
#include "vattn/cuda/prefill_plain.cuh"
#include "vattn/cuda/scores.cuh"
#include "vattn/ops.h"

namespace vattn {
namespace {

using prefill::Fa2Config;

// Tensor-core instantiations: D = 64 with two m tiles per warp (BM = 128), D = 128 with one
// (BM = 64) so O, S and the Q fragments fit in registers without spills. Short query chunks
// (chunked prefill, one-token rows) at D = 64 use BM = 64 so less of each block is padding.
using Cfg64 = Fa2Config<64, 2, 64, 2>;
using Cfg64Short = Fa2Config<64, 1, 64, 3>;
using Cfg128 = Fa2Config<128, 1, 64, 2>;
// Quantized K/V (any pair of fp8_e4m3 / int8 / int4) at D = 64: BM = 64 for every query count,
// sized for 2 CTAs per SM. The dequantizing tile loaders hold a tile's codes, scale words and
// scale pointers in registers: BM = 128 (already at 255 registers with cp.async) spills, and so
// does BM = 64 at 3 CTAs per SM (a 168-register cap); at 2 CTAs it takes 170-205 registers.
// D = 128 quantized runs Cfg128 (up to 255 registers, no spills).
using CfgQ64 = Fa2Config<64, 1, 64, 2>;

// Host bound on n_b: max_seqlen_q when given, never more than total_q (no row holds more).
int query_bound(const AttentionParams& p) {
  return p.max_seqlen_q > 0 ? (p.max_seqlen_q < p.total_q ? p.max_seqlen_q : p.total_q) : p.total_q;
}

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("vattn.prefill_attention: " + msg); }

void validate(const AttentionParams& p) {
  if (p.dtype != kFloat16 && p.dtype != kBFloat16 && p.dtype != kFloat32)
    bad("dtype must be float16, bfloat16 or float32 (code " + std::to_string(p.dtype) + ")");
  const bool kq = kv_format_is_quantized(p.kv.k_format), vq = kv_format_is_quantized(p.kv.v_format);
  if (kq != vq) bad("K and V must be both plain or both quantized");
  if (!kq && (p.kv.k_format != p.dtype || p.kv.v_format != p.dtype))
    bad("a plain K/V cache must store the query dtype (K format " + std::to_string(p.kv.k_format) + ", V format " +
        std::to_string(p.kv.v_format) + ", dtype " + std::to_string(p.dtype) + ")");
  if (p.impl != 0 && p.impl != 1) bad("impl must be 0 (fast) or 1 (plain), got " + std::to_string(p.impl));
  if (p.batch < 0 || p.total_q < 0) bad("batch and total_q must be >= 0");
  if (p.num_q_heads <= 0 || p.num_kv_heads <= 0) bad("head counts must be positive");
  if (p.num_q_heads % p.num_kv_heads != 0) bad("num_q_heads must be a multiple of num_kv_heads");
  if (p.num_q_heads > 65535) bad("at most 65535 query heads");
  // A multiple of 8 is also whole bytes for int4 (two codes per byte).
  if (p.head_dim <= 0 || p.head_dim > prefill::kPlainMaxDim || p.head_dim % 8 != 0)
    bad("head_dim must be a multiple of 8 in [8, 256], got " + std::to_string(p.head_dim));
  if (p.batch == 0 || p.total_q == 0) return;
  if (!p.q || !p.out) bad("q and out must not be null");
  if (!p.kv.k || !p.kv.v) bad("K/V cache pointers must not be null");
  if (kq && (!p.kv.k_scale || !p.kv.v_scale)) bad("a quantized K/V cache needs its scale pointers (k_scale, v_scale)");
  if (!p.cu_seqlens_q) bad("cu_seqlens_q must not be null");
  if (!p.seqlens_k && !p.head_seqlens_k) bad("seqlens_k (or head_seqlens_k) must not be null");
  if (p.kv.num_rows <= 0 || p.kv.max_seq <= 0) bad("the K/V view needs num_rows > 0 and max_seq > 0");
  if (!(p.scale == p.scale)) bad("scale is NaN");
  cuda::check_grouped_kv(p.kv, p.head_dim, "vattn.prefill_attention");
  cuda::check_paged_view(p.kv, "vattn.prefill_attention");
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }
// A stride of s elements of elem_bytes bytes keeps 16-byte alignment.
bool stride_ok(int64_t s, int elem_bytes) { return (s * elem_bytes) % 16 == 0; }

// Alignment rules of the tensor-core kernel. q and out: 16-byte chunks copied with cp.async and
// 32-bit pair stores, so 16-byte aligned pointers and strides. K and V, per side:
//  - plain 16-bit formats: 16-byte chunks with cp.async;
//  - quantized formats: 16-byte loads of codes (16 one-byte codes or 32 int4 codes), so the
//    code pointer and the row / token / head strides (bytes: all quantized formats store one
//    byte per storage element) must be multiples of 16 bytes. A vector's codes are
//    head_dim * bits / 8 bytes, 32..128 for the head dims of the fast path (64, 128): always
//    whole 16-byte units, so no load crosses a vector's end. vattn.KVCache records are padded
//    to 16 bytes, so its views always qualify.
//  - scale words are read one float at a time: any float-aligned scale tensor works; except
//    int4_ch keys, whose loader reads a group's words 4 at a time (16-byte aligned k_scale and
//    scale strides).
// Paged views (a block table): the same rules hold per block. k_stride_row / v_stride_row (and the
// scale row strides) are the block strides there, so checking the storage pointers and all three
// strides of each side makes every token of every block aligned; the tile loaders form each tile
// row's address from its block, so nothing else is needed.
// Anything else (8- or 4-byte aligned user tensors, other head dims) runs the plain kernel,
// which reads element by element: slower, but no 8- / 4-byte variants of the tile loader to
// instantiate and test.
template <typename KF, typename VF>
bool fast_path_ok(const AttentionParams& p) {
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (p.batch > 65535) return false;
  if (!aligned16(p.q) || !aligned16(p.out) || !aligned16(p.kv.k) || !aligned16(p.kv.v)) return false;
  const int64_t q_strides[] = {p.q_stride_tok, p.q_stride_head, p.o_stride_tok, p.o_stride_head};
  for (int64_t s : q_strides)
    if (!stride_ok(s, 2)) return false;
  constexpr int kb = sizeof(typename KF::storage_t), vb = sizeof(typename VF::storage_t);
  const int64_t k_strides[] = {p.kv.k_stride_row, p.kv.k_stride_tok, p.kv.k_stride_head};
  const int64_t v_strides[] = {p.kv.v_stride_row, p.kv.v_stride_tok, p.kv.v_stride_head};
  for (int64_t s : k_strides)
    if (!stride_ok(s, kb)) return false;
  for (int64_t s : v_strides)
    if (!stride_ok(s, vb)) return false;
  if constexpr (is_grouped_format<KF>::value) {  // int4_ch keys: float4 loads of the group's words
    if (!aligned16(p.kv.k_scale)) return false;
    const int64_t ks_strides[] = {p.kv.ks_stride_row, p.kv.ks_stride_tok, p.kv.ks_stride_head};
    for (int64_t s : ks_strides)
      if (!stride_ok(s, 4)) return false;
  }
  return true;
}

template <typename T, typename KF, typename VF, typename Cfg>
void launch_fa2(const AttentionParams& p) {
  auto kernel = prefill::prefill_fa2_kernel<T, KF, VF, Cfg>;
  constexpr int smem = Cfg::kSmemBytes;
  if (smem > 48 * 1024) {
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
               "cudaFuncSetAttribute(prefill)");
  }
  const int bound = query_bound(p);
  const dim3 grid((bound + Cfg::BM - 1) / Cfg::BM, p.num_q_heads, p.batch);
  kernel<<<grid, Cfg::kThreads, smem, as_stream(p.stream)>>>(p);
  cuda_check_launch("prefill_fa2_kernel");
}

template <typename T, typename KF, typename VF>
void launch_plain(const AttentionParams& p) {
  const dim3 grid(p.total_q, p.num_q_heads);
  prefill::prefill_plain_kernel<T, KF, VF><<<grid, prefill::kPlainThreads, 0, as_stream(p.stream)>>>(p);
  cuda_check_launch("prefill_plain_kernel");
}

template <typename T, typename KF, typename VF>
void dispatch(const AttentionParams& p) {
  constexpr bool kQuant = KF::kScaleWords > 0 || VF::kScaleWords > 0;
  if (p.impl == 0 && fast_path_ok<KF, VF>(p)) {
    if (p.head_dim == 64) {
      // Quantized K/V at D = 64 always use BM = 64 (see CfgQ64 above).
      if constexpr (kQuant)
        return launch_fa2<T, KF, VF, CfgQ64>(p);
      else {
        if (query_bound(p) <= Cfg64Short::BM) return launch_fa2<T, KF, VF, Cfg64Short>(p);
        return launch_fa2<T, KF, VF, Cfg64>(p);
      }
    }
    if (p.head_dim == 128) return launch_fa2<T, KF, VF, Cfg128>(p);
  }
  launch_plain<T, KF, VF>(p);
}

template <typename T>
void dispatch_formats(const AttentionParams& p) {
  cuda::dispatch_attention_kv_pair<T>(p.kv.k_format, p.kv.v_format, "prefill_attention", [&](auto kf, auto vf) {
    // float32 q / out run the plain kernel only (mma.sync takes 16-bit operands).
    if constexpr (std::is_same<T, float>::value)
      launch_plain<T, decltype(kf), decltype(vf)>(p);
    else
      dispatch<T, decltype(kf), decltype(vf)>(p);
  });
}

}  // namespace

void prefill_attention_cuda(const AttentionParams& p) {
  validate(p);
  validate_attention_scores(p);  // before anything is launched
  if (p.batch == 0) return;
  if (p.total_q > 0) {
    if (p.dtype == kFloat16)
      dispatch_formats<f16_t>(p);
    else if (p.dtype == kBFloat16)
      dispatch_formats<bf16_t>(p);
    else
      dispatch_formats<float>(p);
  }
  launch_attention_scores(p);
}

}  // namespace vattn
