#pragma once
// Device helpers shared by the two prefill kernels (plain and tensor-core): 16-bit element
// traits, the query-token -> batch-row lookup, and the per-(row, kv head) key range.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "vattn/dtypes.h"
#include "vattn/kv_format.h"
#include "vattn/params.h"

namespace vattn {
namespace prefill {

// 16-bit element traits on the device: fast intrinsic conversions (the dtypes.h versions are
// the portable bit-exact ones the CPU uses; both round to nearest even).
template <typename T> struct Elem;
template <> struct Elem<f16_t> {
  static __device__ __forceinline__ float to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ uint16_t from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
  // Two floats -> one 32-bit word, lo in the low 16 bits (the lower column of an mma fragment).
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};
template <> struct Elem<bf16_t> {
  static __device__ __forceinline__ float to_float(uint16_t b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
  static __device__ __forceinline__ uint16_t from_float(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

// Element load of a KV storage format on the device. Plain 16-bit formats use the intrinsic
// conversions; any other format (quantized ones, later) goes through its own Format::load.
template <typename Format> struct DeviceLoad {
  static __device__ __forceinline__ float load(const typename Format::storage_t* p, int i) { return Format::load(p, i); }
};
template <> struct DeviceLoad<PlainFormat<f16_t>> {
  static __device__ __forceinline__ float load(const f16_t* p, int i) { return Elem<f16_t>::to_float(p[i].bits); }
};
template <> struct DeviceLoad<PlainFormat<bf16_t>> {
  static __device__ __forceinline__ float load(const bf16_t* p, int i) { return Elem<bf16_t>::to_float(p[i].bits); }
};

// Batch row holding query token t: the largest b with cu[b] <= t (empty rows share their
// cu value with the next row, so "largest" skips them). -1 when t is outside [cu[0], cu[batch]).
__device__ __forceinline__ int find_batch_row(const int32_t* __restrict__ cu, int batch, int t) {
  if (t < cu[0] || t >= cu[batch]) return -1;
  int lo = 0, hi = batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (cu[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// What one (batch row, kv head) pair sees of the cache.
struct RowKV {
  int64_t row;   // cache row (slot)
  int len;       // kv length L that positions are measured against (>= 0)
  int len_eff;   // keys that may be read: min(L, max_seq); 0 when the slot id is out of range
};

// Reads L for (b, kvh) and the cache row. Bad device data (negative length, slot id out of
// range, L beyond the capacity) never leads to an out-of-bounds read: such keys are not read.
__device__ __forceinline__ RowKV row_kv(const AttentionParams& p, int b, int kvh) {
  RowKV r;
  const int L = p.head_seqlens_k ? p.head_seqlens_k[int64_t(b) * p.num_kv_heads + kvh] : p.seqlens_k[b];
  r.len = L > 0 ? L : 0;
  const int slot = p.row_ids ? p.row_ids[b] : b;
  const bool slot_ok = slot >= 0 && slot < p.kv.num_rows;
  r.row = slot_ok ? slot : 0;
  r.len_eff = slot_ok ? min(r.len, p.kv.max_seq) : 0;
  return r;
}

}  // namespace prefill
}  // namespace vattn
