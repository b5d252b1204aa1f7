#pragma once
// Shared pieces of the CUDA decode kernels: the kernel argument block, the per-(row, kv head)
// key range, the fast kernel's tile geometry, and the host-side launch plan that
// decode.cu computes once and the per-head-dim instantiation files (decode_hd*.cu) use.
#include <cstdint>

#include "vattn/params.h"
#include "vattn/softmax_state.h"

namespace vattn {
namespace cuda {

// Everything a decode kernel reads, in elements (of the q type, or of the K/V storage type).
struct DecodeKernelArgs {
  const void* q = nullptr;
  int64_t q_stride_tok = 0, q_stride_head = 0;
  void* out = nullptr;
  int64_t o_stride_tok = 0, o_stride_head = 0;
  float* lse = nullptr;  // [batch, num_q_heads] natural log, optional
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_stride_row = 0, k_stride_tok = 0, k_stride_head = 0;
  int64_t v_stride_row = 0, v_stride_tok = 0, v_stride_head = 0;
  int32_t num_rows = 0, max_seq = 0;
  const int32_t* seqlens_k = nullptr;
  const int32_t* head_seqlens_k = nullptr;
  const int32_t* row_ids = nullptr;
  int32_t batch = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0;
  int32_t group = 1;         // q heads per kv head
  int32_t head_chunks = 1;   // CTAs sharing one kv head (fast kernel: ceil(group / GB))
  int32_t chunk_host = 0;    // keys per split planned on the host (multiple of the tile)
  float q_scale = 1.f;       // q multiplier: scale*log2(e), or scale/softcap when soft-capping
  float cap2 = 0.f;          // softcap*log2(e) when soft-capping, else 0
  int32_t window_left = -1;
  float* o_part = nullptr;   // [splits, batch, num_q_heads, head_dim] fp32, normalised
  float* lse_part = nullptr; // [splits, batch, num_q_heads] natural log, -inf when empty
};

#if defined(__CUDACC__)
// Cache row, and the visible keys [lo, len) of batch row b, kv head kvh, read from device
// memory (so a captured graph follows changing lengths). An out-of-range row id or length is
// clamped to "nothing / capacity", so no kernel ever reads outside the cache.
__device__ __forceinline__ void decode_key_range(const DecodeKernelArgs& a, int b, int kvh, int64_t* row,
                                                 int* lo, int* len) {
  int64_t r = a.row_ids != nullptr ? int64_t(a.row_ids[b]) : int64_t(b);
  int64_t L = a.head_seqlens_k != nullptr ? int64_t(a.head_seqlens_k[int64_t(b) * a.num_kv_heads + kvh])
                                          : int64_t(a.seqlens_k[b]);
  if (r < 0 || r >= a.num_rows) {  // bad slot id: no keys, and a harmless base pointer
    r = 0;
    L = 0;
  }
  L = L < 0 ? 0 : (L > a.max_seq ? int64_t(a.max_seq) : L);
  int64_t first = 0;
  if (a.window_left >= 0) first = L - 1 - int64_t(a.window_left);
  if (first < 0) first = 0;
  *row = r;
  *lo = int(first);
  *len = int(L);
}

// softcap_tanh (accurate under --use_fast_math) comes from vattn/softmax_state.h.
#endif

constexpr int ceil_div_i(int a, int b) { return (a + b - 1) / b; }
constexpr int next_pow2_i(int x) { return x <= 1 ? 1 : 2 * next_pow2_i((x + 1) / 2); }

// Tile geometry of the split-KV kernel. Each K/V vector is kChunks 16-byte chunks; a key is
// handled by kLanesPerKey lanes (one chunk each; lanes past kChunks idle, e.g. head_dim 96),
// so a warp works on kKeysPerWarp keys at once and the CTA on kKeysPerIter. A tile is
// kItersPerTile such steps; kStages tiles of K and V are in flight through cp.async.
template <int HD, int EPC>
struct DecodeSplitConfig {
  static_assert(HD % EPC == 0, "head_dim must be a multiple of the chunk width");
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kChunks = HD / EPC;
  static constexpr int kLanesPerKey = next_pow2_i(kChunks);
  static_assert(kLanesPerKey <= 32, "head_dim too large for one warp per key");
  static constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  static constexpr int kKeysPerIter = kWarps * kKeysPerWarp;  // = number of key groups
  static constexpr int kItersPerTile = 2;
  static constexpr int kTile = kKeysPerIter * kItersPerTile;
  static constexpr int kStages = 4;
};

// Tile (keys) of the split kernel for a head dim with 16-bit K/V; 0 when not instantiated.
constexpr int decode_split_tile(int head_dim) {
  return head_dim == 64    ? DecodeSplitConfig<64, 8>::kTile
         : head_dim == 96  ? DecodeSplitConfig<96, 8>::kTile
         : head_dim == 128 ? DecodeSplitConfig<128, 8>::kTile
         : head_dim == 256 ? DecodeSplitConfig<256, 8>::kTile
                           : 0;
}

constexpr int kDecodeMaxSplits = 256;

// Launchers of the split kernel, one per head dim (separate files compile in parallel).
// group_block: q heads per CTA (1, 2, 4 or 8); num_splits: gridDim.x; dtype: kFloat16/kBFloat16.
void launch_decode_split_hd64(const DecodeKernelArgs& a, int group_block, int num_splits, int dtype, void* stream);
void launch_decode_split_hd96(const DecodeKernelArgs& a, int group_block, int num_splits, int dtype, void* stream);
void launch_decode_split_hd128(const DecodeKernelArgs& a, int group_block, int num_splits, int dtype, void* stream);
void launch_decode_split_hd256(const DecodeKernelArgs& a, int group_block, int num_splits, int dtype, void* stream);

}  // namespace cuda
}  // namespace vattn
