// append_kv on CUDA: copy the K and V vectors of each new token into the cache at
// (row_ids[i], positions[i]). A pure byte copy (cache and input share the element type), so
// one thread moves one 16-byte chunk of K and the matching chunk of V; a narrower word is used
// when some pointer or stride is not 16-byte aligned. Out-of-range rows or positions are
// skipped: the kernel never writes outside the cache whatever the indices hold.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "vattn/cuda/check.cuh"
#include "vattn/cuda/vec.cuh"
#include "vattn/dtypes.h"
#include "vattn/ops.h"

namespace vattn {
namespace {

// Word = the unit one thread copies (uint4: 16 bytes, or uint32_t / uint16_t). All strides
// here are in words (the host checked they divide exactly).
template <typename Word>
__global__ void append_kv_kernel(Word* __restrict__ ck, Word* __restrict__ cv, const Word* __restrict__ k,
                                 const Word* __restrict__ v, const int32_t* __restrict__ row_ids,
                                 const int32_t* __restrict__ positions, int64_t c_k_row, int64_t c_k_tok,
                                 int64_t c_k_head, int64_t c_v_row, int64_t c_v_tok, int64_t c_v_head,
                                 int64_t k_tok, int64_t k_head, int64_t v_tok, int64_t v_head, int32_t num_rows,
                                 int32_t max_seq, int32_t num_heads, int32_t words_per_vec, int64_t total) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t w = idx % words_per_vec;
    const int64_t th = idx / words_per_vec;  // token * num_heads + head
    const int64_t h = th % num_heads;
    const int64_t t = th / num_heads;
    const int32_t row = row_ids[t];
    const int32_t pos = positions[t];
    if (row < 0 || row >= num_rows || pos < 0 || pos >= max_seq) continue;
    ck[row * c_k_row + pos * c_k_tok + h * c_k_head + w] = k[t * k_tok + h * k_head + w];
    cv[row * c_v_row + pos * c_v_tok + h * c_v_head + w] = v[t * v_tok + h * v_head + w];
  }
}

bool divisible(int64_t stride_elems, int esize, int word) { return (stride_elems * esize) % word == 0; }

template <typename Word>
void launch(const AppendParams& p, int esize) {
  const int wsz = int(sizeof(Word));
  const int64_t s = wsz / esize;  // elements per word (>= 1)
  const KVCacheView& c = p.cache;
  const int32_t words_per_vec = int32_t(int64_t(p.head_dim) * esize / wsz);
  const int64_t total = int64_t(p.num_tokens) * p.num_kv_heads * words_per_vec;
  const int threads = 256;
  // Grid-stride loop: cap the grid, no 32-bit overflow for huge appends.
  const int64_t blocks_needed = (total + threads - 1) / threads;
  const int blocks = int(blocks_needed < 65535 * 8 ? blocks_needed : 65535 * 8);
  append_kv_kernel<Word><<<blocks, threads, 0, as_stream(p.stream)>>>(
      static_cast<Word*>(c.k), static_cast<Word*>(c.v), static_cast<const Word*>(p.k), static_cast<const Word*>(p.v),
      p.row_ids, p.positions, c.k_stride_row / s, c.k_stride_tok / s, c.k_stride_head / s, c.v_stride_row / s,
      c.v_stride_tok / s, c.v_stride_head / s, p.k_stride_tok / s, p.k_stride_head / s, p.v_stride_tok / s,
      p.v_stride_head / s, c.num_rows, c.max_seq, p.num_kv_heads, words_per_vec, total);
  cuda_check_launch("append_kv_kernel");
}

bool all_aligned(const AppendParams& p, int esize, int word) {
  const KVCacheView& c = p.cache;
  const int64_t strides[] = {c.k_stride_row, c.k_stride_tok, c.k_stride_head, c.v_stride_row, c.v_stride_tok,
                             c.v_stride_head, p.k_stride_tok, p.k_stride_head, p.v_stride_tok, p.v_stride_head};
  for (int64_t st : strides)
    if (!divisible(st, esize, word)) return false;
  const void* ptrs[] = {c.k, c.v, p.k, p.v};
  for (const void* q : ptrs)
    if (reinterpret_cast<uintptr_t>(q) % word != 0) return false;
  return (int64_t(p.head_dim) * esize) % word == 0;
}

}  // namespace

void append_kv_cuda(const AppendParams& p) {
  if (p.num_tokens < 0 || p.num_kv_heads <= 0 || p.head_dim <= 0)
    throw std::invalid_argument("append_kv: num_tokens must be >= 0, num_kv_heads and head_dim > 0");
  if (p.dtype != kFloat16 && p.dtype != kBFloat16 && p.dtype != kFloat32)
    throw std::invalid_argument("append_kv: dtype must be float16, bfloat16 or float32 (code " +
                                std::to_string(p.dtype) + ")");
  if (p.cache.k_format != p.dtype || p.cache.v_format != p.dtype)
    throw std::invalid_argument("append_kv: k/v dtype must equal the cache dtype (quantized formats come later)");
  if (p.num_tokens == 0) return;
  if (!p.cache.k || !p.cache.v || !p.k || !p.v || !p.row_ids || !p.positions)
    throw std::invalid_argument("append_kv: null pointer");
  const int esize = dtype_size(p.dtype);
  if (all_aligned(p, esize, 16)) return launch<uint4>(p, esize);
  if (all_aligned(p, esize, 4)) return launch<uint32_t>(p, esize);
  if (esize == 2) return launch<uint16_t>(p, esize);
  throw std::invalid_argument("append_kv: pointers or strides are not aligned to the element size");
}

}  // namespace vattn
