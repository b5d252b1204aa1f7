#pragma once
// Device helpers shared by the two prefill kernels (plain and tensor-core): the query-token ->
// batch-row lookup and the scale words of a (cache row, kv head). Element conversions come
// from vec.cuh, K/V element loads from kv_device_format.cuh (plain formats) and the format
// traits of kv_format.h (quantized ones), and a row's key range from vattn/key_range.h.
#include <cstdint>

#include "vattn/cuda/kv_device_format.cuh"
#include "vattn/cuda/kv_paged.cuh"
#include "vattn/cuda/vec.cuh"
#include "vattn/dtypes.h"
#include "vattn/key_range.h"
#include "vattn/kv_format.h"
#include "vattn/params.h"

namespace vattn {
namespace prefill {

// Batch row holding query token t: the largest b with cu[b] <= t (empty rows share their
// cu value with the next row, so "largest" skips them). -1 when t is outside [cu[0], cu[batch]).
__device__ __forceinline__ int find_batch_row(const int32_t* __restrict__ cu, int batch, int t) {
  if (t < cu[0] || t >= cu[batch]) return -1;
  int lo = 0, hi = batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (cu[mid] <= t)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Head base (kv_paged.cuh kv_head_base: contiguous or paged view c) of the scale words of
// (cache row, kv head), or null for a format without them.
template <typename Format>
__device__ __forceinline__ const float* head_scales(const KVCacheView& c, const float* base, int64_t row, int kvh,
                                                    int64_t s_row, int64_t s_head) {
  if constexpr (Format::kScaleWords == 0)
    return nullptr;
  else
    return cuda::kv_head_base(base, c, row, kvh, s_row, s_head);
}

}  // namespace prefill
}  // namespace vattn
