#pragma once
// Shared pieces of the CUDA decode kernels: the plan-derived kernel arguments (beside the
// AttentionParams every decode kernel receives as they are), the fast kernel's tile geometry,
// and the launchers of the per-head-dim instantiation files (decode_hd*.cu).
#include <cstddef>
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

// Tile geometry of the split-KV kernel for K chunks of EPC_K and V chunks of EPC_V elements
// (16 bytes each; kv_device_format.cuh). A key is handled by kLanesPerKey lanes, each decoding
// one piece of kLaneElems = 8 consecutive elements (16 bytes of a 16-bit format, 8 of an 8-bit
// one, 4 of int4; lanes past kPieces idle, e.g. head_dim 96), so a warp works on kKeysPerWarp
// keys at once and the CTA on kKeysPerIter. A sub-tile is kItersPerTile such steps; a tile is
// kSubTiles sub-tiles (more for narrower formats, so a tile holds about as many bytes as a
// 16-bit one) and is the unit of the cp.async pipeline: kStages tiles of K, V and their scale
// words are in flight. The cp.async copies move whole 16-byte chunks (kChunksK / kChunksV per
// key), whatever the piece size.
// (tools/emulate_decode_split.py reads these constants from this file.)
template <int HD, int EPC_K, int EPC_V>
struct DecodeSplitConfig {
  static_assert(HD % EPC_K == 0 && HD % EPC_V == 0, "head_dim must be a multiple of the chunk width");
  static_assert(EPC_K % kLaneElems == 0 && EPC_V % kLaneElems == 0, "a chunk is whole lane pieces");
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kPieces = HD / kLaneElems;
  static constexpr int kLanesPerKey = next_pow2_i(kPieces);
  static_assert(kLanesPerKey <= 32, "head_dim too large for one warp per key");
  static constexpr int kChunksK = HD / EPC_K;
  static constexpr int kChunksV = HD / EPC_V;
  static constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  static constexpr int kKeysPerIter = kWarps * kKeysPerWarp;  // = number of key groups
  static constexpr int kItersPerTile = 2;
  static constexpr int kSubTiles = (EPC_K < EPC_V ? EPC_K : EPC_V) / kLaneElems;
  static constexpr int kTile = kKeysPerIter * kItersPerTile * kSubTiles;
  static constexpr int kStages = 4;
};

// The split kernel's geometry for K stored in KF and V in VF: elements per 16-byte chunk from
// the formats' device traits.
template <int HD, typename KF, typename VF>
using DecodeSplitConfigFor =
    DecodeSplitConfig<HD, DeviceKvFormat<KF>::kElemsPerChunk, DeviceKvFormat<VF>::kElemsPerChunk>;

// Whether the split kernel is instantiated for K in KF and V in VF: both with the chunk
// interface, and V not grouped (values are stored per token: dispatch_attention_kv_pair).
template <typename KF, typename VF>
constexpr bool decode_split_formats_ok() {
  return DeviceKvFormat<KF>::kChunked && DeviceKvFormat<VF>::kChunked && !is_grouped_format<VF>::value;
}

// Tile (keys) of the split kernel for a head dim and K/V formats; 0 when not instantiated
// (head dim, or formats outside decode_split_formats_ok).
template <typename KF, typename VF>
constexpr int decode_split_tile(int head_dim) {
  if constexpr (!decode_split_formats_ok<KF, VF>()) {
    return 0;
  } else {
    return head_dim == 64    ? DecodeSplitConfigFor<64, KF, VF>::kTile
           : head_dim == 96  ? DecodeSplitConfigFor<96, KF, VF>::kTile
           : head_dim == 128 ? DecodeSplitConfigFor<128, KF, VF>::kTile
           : head_dim == 256 ? DecodeSplitConfigFor<256, KF, VF>::kTile
                             : 0;
  }
}

// Largest q-head block (GB) the split kernel is instantiated with for K in KF and V in VF; 0 (no
// instance) for a format without the chunk interface.
template <typename KF, typename VF>
constexpr int decode_split_max_group_block() {
  return decode_split_formats_ok<KF, VF>() ? 8 : 0;
}

constexpr int kDecodeMaxSplits = 256;

// Dynamic shared memory of a split-kernel launch: none. The kernel's shared memory is static
// (<= 48 KiB, static_assert in decode_split_kernel), so no cudaFuncAttributeMaxDynamicSharedMemorySize
// is set; the launch and the occupancy query both pass this constant.
constexpr size_t kDecodeSplitDynSmem = 0;

// Launchers of the split kernel, one per head dim (separate files compile in parallel).
// group_block: q heads per CTA (1, 2, 4 or 8, at most decode_split_max_group_block); num_splits:
// gridDim.x. Dtype, K/V formats and stream come from p.
void launch_decode_split_hd64(const AttentionParams& p, const DecodePlanArgs& a, int group_block, int num_splits);
void launch_decode_split_hd96(const AttentionParams& p, const DecodePlanArgs& a, int group_block, int num_splits);
void launch_decode_split_hd128(const AttentionParams& p, const DecodePlanArgs& a, int group_block, int num_splits);
void launch_decode_split_hd256(const AttentionParams& p, const DecodePlanArgs& a, int group_block, int num_splits);

// Max resident CTAs per SM (cudaOccupancyMaxActiveBlocksPerMultiprocessor) of the split-kernel
// instance the launcher of the same head dim would launch for p (dtype, K/V formats) and
// group_block, at its block size and kDecodeSplitDynSmem, on the current device. Cached per
// (device, instance); thread-safe; CUDA errors and an instance that fits no CTA on an SM throw
// std::runtime_error.
int decode_split_occupancy_hd64(const AttentionParams& p, int group_block);
int decode_split_occupancy_hd96(const AttentionParams& p, int group_block);
int decode_split_occupancy_hd128(const AttentionParams& p, int group_block);
int decode_split_occupancy_hd256(const AttentionParams& p, int group_block);

// The cached query behind decode_split_occupancy_hd*: kernel is the instance's address; hd and
// group_block only name it in error messages (decode.cu).
int decode_split_kernel_occupancy(const void* kernel, int threads, size_t dyn_smem, int hd, int group_block);

}  // namespace cuda
}  // namespace vattn
