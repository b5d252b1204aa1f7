#pragma once
// Private helpers of the CPU ops: dtype dispatch, thread count, and argument checks that throw
// std::invalid_argument (the bindings turn it into ValueError).
#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "vattn/dtypes.h"
#include "vattn/kv_format.h"

namespace vattn {
namespace cpu {

[[noreturn]] inline void fail(const std::string& what) { throw std::invalid_argument("vattn: " + what); }
inline void require(bool ok, const char* what) {
  if (!ok) fail(what);
}

inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// A side stored as int4_ch keeps each group's parameters in the words of the group's G tokens, so
// a cache of it holds whole groups: its seq must be a multiple of G = head_dim / 2.
inline void check_groups(int32_t format, int32_t head_dim, int64_t max_seq, const char* what) {
  if (format != kKvInt4Channel) return;
  if (head_dim <= 0 || head_dim % 2) fail(std::string(what) + ": int4_ch needs an even head_dim");
  const int32_t G = quant::int4_ch_group(head_dim);
  if (max_seq % G != 0)
    fail(std::string(what) + ": an int4_ch cache holds whole groups of " + std::to_string(G) + " tokens: its seq (" +
         std::to_string(max_seq) + ") must be a multiple");
}

// Calls f(T{}) with the storage type of a dtype code.
template <typename F>
decltype(auto) dispatch_dtype(int32_t code, const char* what, F&& f) {
  switch (code) {
    case kFloat32: return f(float{});
    case kFloat16: return f(f16_t{});
    case kBFloat16: return f(bf16_t{});
    default: fail(std::string(what) + ": unknown dtype code " + std::to_string(code));
  }
}

}  // namespace cpu
}  // namespace vattn
