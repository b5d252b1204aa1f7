#pragma once
// KV storage formats: the one format-trait family of vattn. The storage format of K (and of V,
// chosen apart) is a type given to every kernel as a template parameter; the CPU row reader,
// the CUDA split-decode chunk loader and the CUDA prefill tile loader specialize on these types,
// so a new format is a new trait here plus one specialization per loader.
//
// A format provides:
//   kCode                          its KvFormatCode (python/vattn/formats.py holds the same table)
//   storage_t                      the element type the cache strides count
//   kElemsPerStorage               head_dim elements held in one storage_t (2 for packed int4)
//   kScaleWords                    fp32 scale words per (token, kv_head) vector (0: none)
//   load(const storage_t*, i)      element i of one [head_dim] vector, as float (scales aside)
//   store(storage_t*, i, x)        write element i from float (plain formats only)
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "vattn/dtypes.h"

namespace vattn {

// Codes shared with python/vattn/formats.py. Never renumber. The plain codes equal the DType
// codes of dtypes.h, so "auto" (store the q dtype) is the same number.
enum KvFormatCode : int32_t {
  kKvFloat32 = kFloat32,
  kKvFloat16 = kFloat16,
  kKvBFloat16 = kBFloat16,
};

template <typename Storage>
struct PlainFormat {
  using storage_t = Storage;
  static constexpr int32_t kCode = sizeof(Storage) == 4 ? kKvFloat32
                                   : std::is_same<Storage, f16_t>::value ? kKvFloat16
                                                                          : kKvBFloat16;
  static constexpr int kElemsPerStorage = 1;
  static constexpr int kScaleWords = 0;
  VATTN_HD static float load(const storage_t* p, int i) { return to_float(p[i]); }
  VATTN_HD static void store(storage_t* p, int i, float x) { p[i] = from_float<storage_t>(x); }
};

inline const char* kv_format_name(int32_t code) {
  switch (code) {
    case kKvFloat32: return "float32";
    case kKvFloat16: return "float16";
    case kKvBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

// Calls f(Format{}) with the format type of a KvFormatCode; throws std::invalid_argument (a
// Python ValueError) for an unknown code. Serves the CPU ops and the CUDA launchers alike.
template <typename F>
decltype(auto) dispatch_kv_format(int32_t code, const char* what, F&& f) {
  switch (code) {
    case kKvFloat32: return f(PlainFormat<float>{});
    case kKvFloat16: return f(PlainFormat<f16_t>{});
    case kKvBFloat16: return f(PlainFormat<bf16_t>{});
    default: throw std::invalid_argument(std::string("vattn: ") + what + ": unknown KV format code " + std::to_string(code));
  }
}

}  // namespace vattn
