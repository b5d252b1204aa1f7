// CPU append_kv: writes new K/V tokens into the cache at (row_ids[i], positions[i]).
// Every index is checked before the first write, so a failed call leaves the cache unchanged.
#include <cstring>
#include <string>

#include "cpu_util.h"
#include "vattn/ops.h"

namespace vattn {
namespace {

template <class Format, typename T>
void append_impl(const AppendParams& p) {
  using S = typename Format::storage_t;
  const int dim = p.head_dim;
  const bool same = std::is_same<S, T>::value;  // plain copy when no conversion is needed
#pragma omp parallel for schedule(static) if ((int64_t)p.num_tokens * p.num_kv_heads * dim > (1 << 16))
  for (int i = 0; i < p.num_tokens; ++i) {
    const int64_t row = p.row_ids[i], pos = p.positions[i];
    for (int h = 0; h < p.num_kv_heads; ++h) {
      const T* ks = static_cast<const T*>(p.k) + (int64_t)i * p.k_stride_tok + (int64_t)h * p.k_stride_head;
      const T* vs = static_cast<const T*>(p.v) + (int64_t)i * p.v_stride_tok + (int64_t)h * p.v_stride_head;
      S* kd = static_cast<S*>(p.cache.k) + row * p.cache.k_stride_row + pos * p.cache.k_stride_tok + h * p.cache.k_stride_head;
      S* vd = static_cast<S*>(p.cache.v) + row * p.cache.v_stride_row + pos * p.cache.v_stride_tok + h * p.cache.v_stride_head;
      if (same) {
        std::memcpy(kd, ks, sizeof(S) * dim);
        std::memcpy(vd, vs, sizeof(S) * dim);
      } else {
        for (int d = 0; d < dim; ++d) Format::store(kd, d, to_float(ks[d]));
        for (int d = 0; d < dim; ++d) Format::store(vd, d, to_float(vs[d]));
      }
    }
  }
}

}  // namespace

void append_kv_cpu(const AppendParams& p) {
  using cpu::fail;
  cpu::require(p.num_tokens >= 0, "append_kv: negative num_tokens");
  if (p.num_tokens == 0) return;
  cpu::require(p.cache.k && p.cache.v && p.k && p.v && p.row_ids && p.positions, "append_kv: null pointer in the parameters");
  cpu::require(p.num_kv_heads > 0 && p.head_dim > 0, "append_kv: num_kv_heads and head_dim must be positive");
  cpu::require(p.cache.k_format == p.cache.v_format, "append_kv: K and V in different storage formats are not supported yet");
  for (int i = 0; i < p.num_tokens; ++i) {
    if (p.row_ids[i] < 0 || p.row_ids[i] >= p.cache.num_rows)
      fail("append_kv: row id " + std::to_string(p.row_ids[i]) + " of token " + std::to_string(i) + " is outside [0, " +
           std::to_string(p.cache.num_rows) + ")");
    if (p.positions[i] < 0 || p.positions[i] >= p.cache.max_seq)
      fail("append_kv: position " + std::to_string(p.positions[i]) + " of token " + std::to_string(i) + " is outside [0, " +
           std::to_string(p.cache.max_seq) + ")");
  }
  dispatch_kv_format(p.cache.k_format, "append_kv", [&](auto fmt) {
    using Format = decltype(fmt);
    cpu::dispatch_dtype(p.dtype, "append_kv k/v", [&](auto t) { append_impl<Format, decltype(t)>(p); });
  });
}

}  // namespace vattn
