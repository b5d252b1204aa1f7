// Prefill / chunked-prefill attention on CUDA: parameter checks, the choice between the
// tensor-core kernel (impl 0) and the plain kernel (impl 1, and the fallback), and launches.
// No host synchronization and no allocation: everything runs on p.stream.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "vattn/cuda/check.cuh"
#include "vattn/cuda/prefill_fa2.cuh"
#include "vattn/cuda/prefill_plain.cuh"
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

// Host bound on n_b: max_seqlen_q when given, never more than total_q (no row holds more).
int query_bound(const AttentionParams& p) {
  return p.max_seqlen_q > 0 ? (p.max_seqlen_q < p.total_q ? p.max_seqlen_q : p.total_q) : p.total_q;
}

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("vattn.prefill_attention: " + msg); }

void validate(const AttentionParams& p) {
  if (p.dtype != kFloat16 && p.dtype != kBFloat16) bad("CUDA supports float16 and bfloat16 only (dtype code " + std::to_string(p.dtype) + ")");
  if (p.kv.k_format != p.dtype || p.kv.v_format != p.dtype) bad("K/V storage format must match the query dtype (quantized formats are not supported yet)");
  if (p.impl != 0 && p.impl != 1) bad("impl must be 0 (fast) or 1 (plain), got " + std::to_string(p.impl));
  if (p.batch < 0 || p.total_q < 0) bad("batch and total_q must be >= 0");
  if (p.num_q_heads <= 0 || p.num_kv_heads <= 0) bad("head counts must be positive");
  if (p.num_q_heads % p.num_kv_heads != 0) bad("num_q_heads must be a multiple of num_kv_heads");
  if (p.num_q_heads > 65535) bad("at most 65535 query heads");
  if (p.head_dim <= 0 || p.head_dim > prefill::kPlainMaxDim || p.head_dim % 8 != 0)
    bad("head_dim must be a multiple of 8 in [8, 256], got " + std::to_string(p.head_dim));
  if (p.batch == 0 || p.total_q == 0) return;
  if (!p.q || !p.out) bad("q and out must not be null");
  if (!p.kv.k || !p.kv.v) bad("K/V cache pointers must not be null");
  if (!p.cu_seqlens_q) bad("cu_seqlens_q must not be null");
  if (!p.seqlens_k && !p.head_seqlens_k) bad("seqlens_k (or head_seqlens_k) must not be null");
  if (p.kv.num_rows <= 0 || p.kv.max_seq <= 0) bad("the K/V view needs num_rows > 0 and max_seq > 0");
  if (!(p.scale == p.scale)) bad("scale is NaN");
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }
bool stride_ok(int64_t s) { return s % 8 == 0; }  // 8 16-bit elements = 16 bytes

// The tensor-core kernel copies 16-byte chunks with cp.async and stores 32-bit pairs.
bool fast_path_ok(const AttentionParams& p) {
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (p.batch > 65535) return false;
  if (!aligned16(p.q) || !aligned16(p.out) || !aligned16(p.kv.k) || !aligned16(p.kv.v)) return false;
  const int64_t strides[] = {p.q_stride_tok, p.q_stride_head, p.o_stride_tok, p.o_stride_head,
                             p.kv.k_stride_row, p.kv.k_stride_tok, p.kv.k_stride_head,
                             p.kv.v_stride_row, p.kv.v_stride_tok, p.kv.v_stride_head};
  for (int64_t s : strides) if (!stride_ok(s)) return false;
  return true;
}

template <typename T, typename Cfg>
void launch_fa2(const AttentionParams& p) {
  using Format = PlainFormat<T>;
  auto kernel = prefill::prefill_fa2_kernel<T, Format, Cfg>;
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

template <typename T>
void launch_plain(const AttentionParams& p) {
  const dim3 grid(p.total_q, p.num_q_heads);
  prefill::prefill_plain_kernel<T, PlainFormat<T>><<<grid, prefill::kPlainThreads, 0, as_stream(p.stream)>>>(p);
  cuda_check_launch("prefill_plain_kernel");
}

template <typename T>
void dispatch(const AttentionParams& p) {
  if (p.impl == 0 && fast_path_ok(p)) {
    if (p.head_dim == 64) {
      if (query_bound(p) <= Cfg64Short::BM) return launch_fa2<T, Cfg64Short>(p);
      return launch_fa2<T, Cfg64>(p);
    }
    if (p.head_dim == 128) return launch_fa2<T, Cfg128>(p);
  }
  launch_plain<T>(p);
}

}  // namespace

void prefill_attention_cuda(const AttentionParams& p) {
  validate(p);
  if (p.batch == 0 || p.total_q == 0) return;
  if (p.dtype == kFloat16) dispatch<f16_t>(p);
  else dispatch<bf16_t>(p);
}

}  // namespace vattn
