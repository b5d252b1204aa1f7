#pragma once
// Shared pieces of the CUDA decode kernels: the plan-derived kernel arguments (beside the
// AttentionParams every decode kernel receives as they are), the fast kernel's tile geometry,
// and the launchers of the per-head-dim instantiation files (decode_hd*.cu).
#include <cstdint>

#include "vattn/cuda/kv_device_format.cuh"
#include "vattn/params.h"

namespace vattn {
namespace cuda {

// What the host plan adds to AttentionParams for the decode kernels.
struct DecodePlanArgs {
  int32_t head_chunks = 1;    // CTAs sharing one kv head (split kernel: ceil(group / GB))
  int32_t chunk_host = 0;     // keys per split planned on the host (multiple of the tile)
  float q_scale = 1.f;        // q multiplier: scale*log2(e), or scale/softcap when soft-capping
  float cap2 = 0.f;           // softcap*log2(e) when soft-capping, else 0
  float* o_part = nullptr;    // [splits, batch, num_q_heads, head_dim] fp32, normalised
  float* lse_part = nullptr;  // [splits, batch, num_q_heads] natural log, -inf when empty
};

constexpr int ceil_div_i(int a, int b) { return (a + b - 1) / b; }
constexpr int next_pow2_i(int x) { return x <= 1 ? 1 : 2 * next_pow2_i((x + 1) / 2); }

// Tile geometry of the split-KV kernel. Each K/V vector is kChunks 16-byte chunks of EPC
// elements; a key is handled by kLanesPerKey lanes (one chunk each; lanes past kChunks idle,
// e.g. head_dim 96), so a warp works on kKeysPerWarp keys at once and the CTA on kKeysPerIter.
// A tile is kItersPerTile such steps; kStages tiles of K and V are in flight through cp.async.
// (tools/emulate_decode_split.py reads these constants from this file.)
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

// The split kernel's geometry for K/V stored in Format: elements per 16-byte chunk from the
// format's device trait.
template <int HD, typename Format>
using DecodeSplitConfigFor = DecodeSplitConfig<HD, DeviceKvFormat<Format>::kElemsPerChunk>;

// Tile (keys) of the split kernel for a head dim and K/V format; 0 when not instantiated
// (head dim, or a format without the chunk interface).
template <typename Format>
constexpr int decode_split_tile(int head_dim) {
  if constexpr (!DeviceKvFormat<Format>::kChunked) {
    return 0;
  } else {
    return head_dim == 64    ? DecodeSplitConfigFor<64, Format>::kTile
           : head_dim == 96  ? DecodeSplitConfigFor<96, Format>::kTile
           : head_dim == 128 ? DecodeSplitConfigFor<128, Format>::kTile
           : head_dim == 256 ? DecodeSplitConfigFor<256, Format>::kTile
                             : 0;
  }
}

constexpr int kDecodeMaxSplits = 256;

// Launchers of the split kernel, one per head dim (separate files compile in parallel).
// group_block: q heads per CTA (1, 2, 4 or 8); num_splits: gridDim.x. Dtype, format and stream
// come from p.
void launch_decode_split_hd64(const AttentionParams& p, const DecodePlanArgs& a, int group_block, int num_splits);
void launch_decode_split_hd96(const AttentionParams& p, const DecodePlanArgs& a, int group_block, int num_splits);
void launch_decode_split_hd128(const AttentionParams& p, const DecodePlanArgs& a, int group_block, int num_splits);
void launch_decode_split_hd256(const AttentionParams& p, const DecodePlanArgs& a, int group_block, int num_splits);

}  // namespace cuda
}  // namespace vattn
