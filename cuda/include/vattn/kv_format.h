#pragma once
// KV storage formats. Kernels read K/V through a format type given as a template parameter,
// so quantized formats (fp8 e4m3 with per-head scales, int8/int4 with per-token-head scales)
// slot in later as new format types without rewriting the kernels.
//
// A format provides:
//   storage_t                     the element type in memory
//   load(const storage_t*, i)     element i of one [head_dim] vector, as float
//   store(storage_t*, i, x)       write element i from float
#include "vattn/dtypes.h"

namespace vattn {

template <typename Storage>
struct PlainFormat {
  using storage_t = Storage;
  VATTN_HD static float load(const storage_t* p, int i) { return to_float(p[i]); }
  VATTN_HD static void store(storage_t* p, int i, float x) { p[i] = from_float<storage_t>(x); }
};

}  // namespace vattn
