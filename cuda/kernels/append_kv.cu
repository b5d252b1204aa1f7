// append_kv on CUDA: write the K and V vectors of each new token into the cache at
// (row_ids[i], positions[i]), or per kv head at head_positions[i, h] when given (the kernels take
// it as a template flag, so the common path is the same code as without), each side in its
// storage format.
//   Both sides plain (cache and input share the element type): a pure byte copy, one thread
//   moves one 16-byte chunk of K and the matching chunk of V; a narrower word is used when some
//   pointer or stride is not 16-byte aligned.
//   Otherwise one launch per side (append_side_kernel): one warp per (token, kv_head) vector.
//   A quantized side is encoded with quant.h's functions, split as quant.h describes: the
//   reduction (max |x|, or min and max) folds each lane's elements and then the warp's lanes with
//   xor shuffles (fmaxf / fminf are exact, so the order does not matter), every lane derives the
//   same parameters, and each element's code comes from the same per-element function as on the
//   CPU, so the bytes are bit-identical to append_kv_cpu. A plain side of a mixed pair is an
//   element copy.
//   A grouped side (int4_ch keys: parameters per channel over groups of G = head_dim / 2 tokens;
//   reference.py _append_int4_ch) re-encodes every group the call writes into, whole:
//   append_grouped_kernel, one block per group (its leading entry, below), stages the group's old
//   tokens (their exact values, int4_ch_value) and the call's new tokens as fp32 in shared memory, a
//   channel slice at a time, and its threads encode channel pairs with quant.h's
//   encode_int4_ch_pair, the CPU's function: bit-identical bytes again.
// Out-of-range rows or positions are skipped: the kernels never write outside the cache
// whatever the indices hold (the CPU op rejects them; checking here would need a host sync).
// Paged views (a block table per row): every kernel locates its token once (kv_paged.cuh
// kv_locate: the physical block and the offset in it; a block id outside [0, num_blocks) writes
// block 0, never outside the storage) and forms the K, V and scale-word addresses from it; rows
// are block-table rows and positions < max_seq = blocks per row x block_size.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "vattn/cuda/check.cuh"
#include "vattn/cuda/kv_device_format.cuh"
#include "vattn/cuda/kv_paged.cuh"
#include "vattn/cuda/vec.cuh"
#include "vattn/dtypes.h"
#include "vattn/kv_format.h"
#include "vattn/ops.h"
#include "vattn/quant.h"

namespace vattn {
namespace {

// Word = the unit one thread copies (uint4: 16 bytes, or uint32_t / uint16_t). All strides
// here are in words (the host checked they divide exactly).
template <typename Word, bool kHeadPos>
__global__ void append_kv_kernel(Word* __restrict__ ck, Word* __restrict__ cv, const Word* __restrict__ k,
                                 const Word* __restrict__ v, const int32_t* __restrict__ row_ids,
                                 const int32_t* __restrict__ positions, int64_t c_k_row, int64_t c_k_tok,
                                 int64_t c_k_head, int64_t c_v_row, int64_t c_v_tok, int64_t c_v_head, int64_t k_tok,
                                 int64_t k_head, int64_t v_tok, int64_t v_head, int32_t num_rows, int32_t max_seq,
                                 int32_t num_heads, int32_t words_per_vec, int64_t total, const KVCacheView pv) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t w = idx % words_per_vec;
    const int64_t th = idx / words_per_vec;  // token * num_heads + head
    const int64_t h = th % num_heads;
    const int64_t t = th / num_heads;
    const int32_t row = row_ids[t];
    const int32_t pos = kHeadPos ? positions[th] : positions[t];  // positions: head_positions when kHeadPos
    if (row < 0 || row >= num_rows || pos < 0 || pos >= max_seq) continue;
    const cuda::KvLoc l = cuda::kv_locate(pv, row, pos);  // pv: the view's paging (strides here are words)
    ck[l.at(c_k_row, c_k_tok) + h * c_k_head + w] = k[t * k_tok + h * k_head + w];
    cv[l.at(c_v_row, c_v_tok) + h * c_v_head + w] = v[t * v_tok + h * v_head + w];
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
  auto kernel = p.head_positions ? append_kv_kernel<Word, true> : append_kv_kernel<Word, false>;
  kernel<<<blocks, threads, 0, as_stream(p.stream)>>>(
      static_cast<Word*>(c.k), static_cast<Word*>(c.v), static_cast<const Word*>(p.k), static_cast<const Word*>(p.v),
      p.row_ids, p.head_positions ? p.head_positions : p.positions, c.k_stride_row / s, c.k_stride_tok / s,
      c.k_stride_head / s, c.v_stride_row / s, c.v_stride_tok / s, c.v_stride_head / s, p.k_stride_tok / s,
      p.k_stride_head / s, p.v_stride_tok / s, p.v_stride_head / s, c.num_rows, c.max_seq, p.num_kv_heads,
      words_per_vec, total, c);
  cuda_check_launch("append_kv_kernel");
}

bool all_aligned(const AppendParams& p, int esize, int word) {
  const KVCacheView& c = p.cache;
  const int64_t strides[] = {c.k_stride_row,  c.k_stride_tok, c.k_stride_head, c.v_stride_row, c.v_stride_tok,
                             c.v_stride_head, p.k_stride_tok, p.k_stride_head, p.v_stride_tok, p.v_stride_head};
  for (int64_t st : strides)
    if (!divisible(st, esize, word)) return false;
  const void* ptrs[] = {c.k, c.v, p.k, p.v};
  for (const void* q : ptrs)
    if (reinterpret_cast<uintptr_t>(q) % word != 0) return false;
  return (int64_t(p.head_dim) * esize) % word == 0;
}

// ---- one side (K or V) in any format: one warp per vector --------------------------------

constexpr int kSideThreads = 256;
constexpr int kSideMaxHeadDim = 256;  // 8 elements per lane

// One side of the cache and its input, as append_side_kernel sees it.
struct SideArgs {
  void* data;
  int64_t stride_row, stride_tok, stride_head;  // storage elements (int4: bytes)
  float* scale;                                 // scale words, null for a plain side
  int64_t ss_row, ss_tok, ss_head;              // floats
  const void* src;
  int64_t src_tok, src_head;  // elements of the input dtype
};

template <typename T>
__device__ __forceinline__ float in_float(const T* x, int d) {
  return cuda::elem_to_float(x[d]);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Encodes one vector of n <= 256 elements x (input type T) into dst / w; called by a whole warp.
// Lane l holds elements l, l + 32, ... (int4: the pairs (2i, 2i + 1) for i = l, l + 32, ...).
template <typename T, typename Format>
__device__ __forceinline__ void encode_vector(int lane, const T* x, int n, typename Format::storage_t* dst, float* w) {
  if constexpr (Format::kScaleWords == 0) {
    for (int d = lane; d < n; d += 32) dst[d] = x[d];  // plain side: the input's own bits
  } else if constexpr (std::is_same<Format, Int4Format>::value) {
    constexpr int kPairs = kSideMaxHeadDim / 64;  // pairs per lane
    float e0[kPairs], e1[kPairs];
    float lo = INFINITY, hi = -INFINITY;
#pragma unroll
    for (int k = 0; k < kPairs; ++k) {
      const int i = lane + 32 * k;  // pair i: elements 2i, 2i + 1 (n is even)
      e0[k] = 2 * i < n ? in_float(x, 2 * i) : 0.f;
      e1[k] = 2 * i < n ? in_float(x, 2 * i + 1) : 0.f;
      if (2 * i < n) {
        lo = fminf(lo, fminf(quant::min_term(e0[k]), quant::min_term(e1[k])));
        hi = fmaxf(hi, fmaxf(quant::max_term(e0[k]), quant::max_term(e1[k])));
      }
    }
    const quant::AsymParams ap = quant::int4_params(warp_min(lo), warp_max(hi));
#pragma unroll
    for (int k = 0; k < kPairs; ++k) {
      const int i = lane + 32 * k;
      if (2 * i < n) dst[i] = uint8_t(quant::int4_code_of(e0[k], ap) | (quant::int4_code_of(e1[k], ap) << 4));
    }
    if (lane == 0) {
      w[0] = ap.scale;
      w[1] = ap.zero;
    }
  } else {
    static_assert(Format::kScaleWords == 1, "symmetric formats have one scale word");
    constexpr bool kFp8 = std::is_same<Format, Fp8E4M3Format>::value;
    static_assert(kFp8 || std::is_same<Format, Int8Format>::value, "unknown quantized format");
    constexpr int kPer = kSideMaxHeadDim / 32;
    float e[kPer];
    float amax = 0.f;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int d = lane + 32 * k;
      e[k] = d < n ? in_float(x, d) : 0.f;
      amax = fmaxf(amax, quant::amax_term(e[k]));  // 0 for the padding
    }
    const quant::SymParams sp = quant::sym_params(warp_max(amax), kFp8 ? quant::kFp8Max : quant::kInt8Max);
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int d = lane + 32 * k;
      if (d < n) {
        if constexpr (kFp8) {
          dst[d] = quant::fp8_code(e[k], sp);
        } else {
          dst[d] = quant::int8_code(e[k], sp);
        }
      }
    }
    if (lane == 0) w[0] = sp.scale;
  }
}

// Grid-stride over vectors (token, kv_head), one warp each; the loop bound and the skip are
// warp-uniform, so the shuffles always see the full warp.
template <typename T, typename Format, bool kHeadPos>
__global__ void __launch_bounds__(kSideThreads)
    append_side_kernel(const SideArgs s, const int32_t* __restrict__ row_ids, const int32_t* __restrict__ positions,
                       int32_t num_rows, int32_t max_seq, int32_t num_heads, int32_t head_dim, int64_t num_vecs,
                       const KVCacheView pv) {
  using S = typename Format::storage_t;
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (kSideThreads / 32);
  for (int64_t vec = int64_t(blockIdx.x) * (kSideThreads / 32) + (threadIdx.x >> 5); vec < num_vecs; vec += warps) {
    const int64_t t = vec / num_heads;
    const int64_t h = vec - t * num_heads;
    const int32_t row = row_ids[t];
    const int32_t pos = kHeadPos ? positions[vec] : positions[t];  // positions: head_positions when kHeadPos
    if (row < 0 || row >= num_rows || pos < 0 || pos >= max_seq) continue;
    const T* x = static_cast<const T*>(s.src) + t * s.src_tok + h * s.src_head;
    const cuda::KvLoc l = cuda::kv_locate(pv, row, pos);
    S* dst = static_cast<S*>(s.data) + l.at(s.stride_row, s.stride_tok) + h * s.stride_head;
    float* w = nullptr;
    if constexpr (Format::kScaleWords > 0) w = s.scale + l.at(s.ss_row, s.ss_tok) + h * s.ss_head;
    encode_vector<T, Format>(lane, x, head_dim, dst, w);
  }
}

// ---- a grouped side (int4_ch): one block per group the call writes into --------------------

constexpr int kGroupThreads = 128;
constexpr int kGroupStageFloats = 8192;               // 32 KiB of fp32: G (<= 128) tokens x a channel slice
constexpr int kGroupMaxTokens = kSideMaxHeadDim / 2;  // G of the largest head_dim (checked on the host)

// Blocks stride over the call's (entry t, kv head h) pairs (block-uniform, so the barriers are
// safe). The unit of work is a (row, h, group) the call writes into; its leader is the call's
// entry of the smallest position in the group (the lowest entry among equal ones), so exactly one
// block writes each group. Entry t is found not to lead in O(1) when entry t - 1 holds position
// pos - 1 of the same row and group (the step layout: a row's new tokens are consecutive entries
// at consecutive positions); otherwise the block scans the call once, which also collects the
// group's entries by position (any order of the call, like the CPU op). The leader re-encodes the
// group [lo, lo + G), lo = pos - pos % G: tokens lo .. pos - 1 from the cache (exact values) and
// the call's tokens pos, pos + 1, ... (consecutive positions: the CPU op rejects gaps, here the
// run stops at the first one); it writes their codes and the words of the whole group. A row,
// position or group outside the cache is skipped (never read, never written).
template <typename T, bool kHeadPos>
__global__ void __launch_bounds__(kGroupThreads)
    append_grouped_kernel(const SideArgs s, const int32_t* __restrict__ row_ids, const int32_t* __restrict__ positions,
                          int32_t num_rows, int32_t max_seq, int32_t num_heads, int32_t head_dim, int32_t num_tokens,
                          const KVCacheView pv) {
  using F = Int4ChannelFormat;
  __shared__ float x_s[kGroupStageFloats];  // [token of the group][channel of the slice]
  __shared__ int entry_s[kGroupMaxTokens];  // call entry of group position k (-1: none)
  __shared__ int lead_s, run_s;
  const int G = F::group(head_dim);
  const int slice = min(head_dim, (kGroupStageFloats / G) & ~3);  // whole slices start at multiples of 4
  const int tid = threadIdx.x;
  const int64_t num_vecs = int64_t(num_tokens) * num_heads;
  for (int64_t vec = blockIdx.x; vec < num_vecs; vec += gridDim.x) {
    const int64_t t = vec / num_heads;
    const int h = int(vec - t * num_heads);
    auto pos_of = [&](int64_t i) -> int32_t { return kHeadPos ? positions[i * num_heads + h] : positions[i]; };
    const int32_t row = row_ids[t];
    const int32_t pos = pos_of(t);
    if (row < 0 || row >= num_rows || pos < 0 || pos >= max_seq || int64_t(pos - pos % G) + G > max_seq) continue;
    if (t > 0 && pos % G != 0 && row_ids[t - 1] == row && pos_of(t - 1) == pos - 1) continue;  // not the leader
    const int32_t lo = pos - pos % G;
    const int old = pos - lo;
    __syncthreads();  // the shared arrays of the previous pair are consumed
    for (int k = tid; k < G; k += kGroupThreads) entry_s[k] = -1;
    if (tid == 0) lead_s = 1;
    __syncthreads();
    for (int64_t j = tid; j < num_tokens; j += kGroupThreads) {
      if (row_ids[j] != row) continue;
      const int32_t pj = pos_of(j);
      if (pj < lo || pj - lo >= G) continue;
      if (pj < pos || (pj == pos && j < t)) {
        lead_s = 0;  // an earlier entry leads the group
      } else {
        entry_s[pj - lo] = int(j);  // (a repeated position: any of its entries)
      }
    }
    __syncthreads();
    if (tid == 0) {
      int run = 0;
      if (lead_s)
        while (old + run < G && entry_s[old + run] >= 0) ++run;
      run_s = run;
    }
    __syncthreads();
    const int run = run_s;
    if (run == 0) continue;   // block-uniform
    const int m = old + run;  // tokens of the group once the call is done (<= G)
    // The group from its first token on. A paged view holds whole groups in each block
    // (check_grouped_paged: block_size % G == 0), so the group's G tokens -- their codes and the
    // words of its parameters -- follow its first token in one block at the token strides.
    const cuda::KvLoc l = cuda::kv_locate(pv, row, lo);
    uint8_t* codes = static_cast<uint8_t*>(s.data) + l.at(s.stride_row, s.stride_tok) + h * s.stride_head;
    float* gw = s.scale + l.at(s.ss_row, s.ss_tok) + h * s.ss_head;  // the group's first token's words
    const T* src = static_cast<const T*>(s.src) + h * s.src_head;
    for (int c0 = 0; c0 < head_dim; c0 += slice) {
      const int cw = min(slice, head_dim - c0);  // even: head_dim and c0 are
      if (c0 > 0) __syncthreads();               // x_s of the previous slice is consumed
      for (int e = tid; e < m * cw; e += kGroupThreads) {
        const int k = e / cw, c = c0 + (e - k * cw);
        x_s[e] = k < old ? F::dequant_grouped(codes + int64_t(k) * s.stride_tok, gw, s.ss_tok, c, head_dim)
                         : in_float(src + int64_t(entry_s[k]) * s.src_tok, c);
      }
      __syncthreads();
      // Channel pairs c0 + 2 * pr of the slice. Parameter i of the group is word i % 4 of token
      // i / 4, so with c0 a multiple of 4 the slice's parameters are those of channel 2 * pr
      // relative to the words of token c0 / 4 (and its codes bytes start at c0 / 2).
      for (int pr = tid; 2 * pr < cw; pr += kGroupThreads)
        quant::encode_int4_ch_pair(x_s, cw, m, head_dim, 2 * pr, codes + c0 / 2, s.stride_tok,
                                   gw + int64_t(c0 / 4) * s.ss_tok, s.ss_tok);
    }
  }
}

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("append_kv: " + msg); }

// Checks one side's format against the parameters (before anything is launched).
void check_side(const AppendParams& p, int32_t format, const float* scale, int64_t ss_tok, const char* side) {
  dispatch_kv_format(format, "append_kv", [&](auto fmt) {
    using Format = decltype(fmt);
    if constexpr (Format::kScaleWords == 0) {
      if (Format::kCode != p.dtype) bad(std::string(side) + ": k/v dtype must equal the cache dtype of a plain cache");
    } else {
      if (scale == nullptr)
        bad(std::string(side) + ": a quantized cache (" + kv_format_name(format) + ") needs its scales");
      if (reinterpret_cast<uintptr_t>(scale) % alignof(float) != 0)
        bad(std::string(side) + ": scale pointer is not 4-byte aligned");
      if (p.head_dim > kSideMaxHeadDim) bad(std::string(side) + ": head_dim must be <= 256 for a quantized cache");
    }
    if (!dim_ok<Format>(p.head_dim)) bad(std::string(side) + ": head_dim does not fit the storage format");
  });
  cuda::check_grouped_side(format, p.cache.max_seq, p.head_dim, ss_tok, "append_kv", side);
  cuda::check_grouped_paged(format, p.cache, p.head_dim, "append_kv", side);
}

void launch_side(const AppendParams& p, int32_t format, const SideArgs& s, const char* what) {
  const int64_t num_vecs = int64_t(p.num_tokens) * p.num_kv_heads;
  const int64_t warps_per_block = kSideThreads / 32;
  const int64_t blocks_needed = (num_vecs + warps_per_block - 1) / warps_per_block;
  const int blocks = int(blocks_needed < 65535 * 8 ? blocks_needed : 65535 * 8);
  cudaStream_t st = as_stream(p.stream);
  auto go = [&](auto tag) {
    using T = decltype(tag);
    dispatch_kv_format(format, "append_kv", [&](auto fmt) {
      using Format = decltype(fmt);
      if constexpr (is_grouped_format<Format>::value) {
        const int64_t gblocks = num_vecs < 65535 * 8 ? num_vecs : 65535 * 8;
        auto kernel = p.head_positions ? append_grouped_kernel<T, true> : append_grouped_kernel<T, false>;
        kernel<<<unsigned(gblocks), kGroupThreads, 0, st>>>(
            s, p.row_ids, p.head_positions ? p.head_positions : p.positions, p.cache.num_rows, p.cache.max_seq,
            p.num_kv_heads, p.head_dim, p.num_tokens, p.cache);
      } else if constexpr (Format::kScaleWords == 0 && !std::is_same<typename Format::storage_t, T>::value) {
        throw std::logic_error("append_kv: plain side of another dtype (checked before)");
      } else {
        auto kernel = p.head_positions ? append_side_kernel<T, Format, true> : append_side_kernel<T, Format, false>;
        kernel<<<blocks, kSideThreads, 0, st>>>(s, p.row_ids, p.head_positions ? p.head_positions : p.positions,
                                                p.cache.num_rows, p.cache.max_seq, p.num_kv_heads, p.head_dim, num_vecs,
                                                p.cache);
      }
    });
  };
  switch (p.dtype) {
    case kFloat16: go(f16_t{}); break;
    case kBFloat16: go(bf16_t{}); break;
    default: go(float{}); break;
  }
  cuda_check_launch(what);
}

}  // namespace

void append_kv_cuda(const AppendParams& p) {
  if (p.num_tokens < 0 || p.num_kv_heads <= 0 || p.head_dim <= 0)
    throw std::invalid_argument("append_kv: num_tokens must be >= 0, num_kv_heads and head_dim > 0");
  if (p.dtype != kFloat16 && p.dtype != kBFloat16 && p.dtype != kFloat32)
    throw std::invalid_argument("append_kv: dtype must be float16, bfloat16 or float32 (code " +
                                std::to_string(p.dtype) + ")");
  cuda::check_paged_view(p.cache, "append_kv");
  check_side(p, p.cache.k_format, p.cache.k_scale, p.cache.ks_stride_tok, "K");
  check_side(p, p.cache.v_format, p.cache.v_scale, p.cache.vs_stride_tok, "V");
  if (p.num_tokens == 0) return;
  if (!p.cache.k || !p.cache.v || !p.k || !p.v || !p.row_ids || (!p.positions && !p.head_positions))
    throw std::invalid_argument("append_kv: null pointer");
  const KVCacheView& c = p.cache;
  if (kv_format_is_quantized(c.k_format) || kv_format_is_quantized(c.v_format)) {
    const SideArgs k{c.k,       c.k_stride_row,  c.k_stride_tok,  c.k_stride_head,
                     c.k_scale, c.ks_stride_row, c.ks_stride_tok, c.ks_stride_head,
                     p.k,       p.k_stride_tok,  p.k_stride_head};
    const SideArgs v{c.v,       c.v_stride_row,  c.v_stride_tok,  c.v_stride_head,
                     c.v_scale, c.vs_stride_row, c.vs_stride_tok, c.vs_stride_head,
                     p.v,       p.v_stride_tok,  p.v_stride_head};
    launch_side(p, c.k_format, k, "append_side_kernel (K)");
    launch_side(p, c.v_format, v, "append_side_kernel (V)");
    return;
  }
  const int esize = dtype_size(p.dtype);
  if (all_aligned(p, esize, 16)) return launch<uint4>(p, esize);
  if (all_aligned(p, esize, 4)) return launch<uint32_t>(p, esize);
  if (esize == 2) return launch<uint16_t>(p, esize);
  throw std::invalid_argument("append_kv: pointers or strides are not aligned to the element size");
}

}  // namespace vattn
