// CPU append_kv: writes new K/V tokens into the cache at (row_ids[i], positions[i]) (or per kv
// head at head_positions[i, h] when given), in each side's storage format (a quantized side is
// encoded with quant.h, the same code as on CUDA, so both store the same bytes). Every index is
// checked before the first write, so a failed call leaves the cache unchanged.
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_util.h"
#include "vattn/ops.h"

namespace vattn {
namespace {

// One side (K or V) of the cache, as the append loop sees it.
struct Side {
  void* data;
  int64_t stride_row, stride_tok, stride_head;  // storage elements
  float* scale;
  int64_t ss_row, ss_tok, ss_head;  // floats
  const void* src;
  int64_t src_tok, src_head;  // elements of the input dtype
};

template <class Format, typename T>
void append_side(const AppendParams& p, const Side& s) {
  using S = typename Format::storage_t;
  const int dim = p.head_dim;
  constexpr bool kCopy = std::is_same<S, T>::value;  // plain format of the input dtype: a byte copy
  const int64_t n = (int64_t)p.num_tokens * p.num_kv_heads;
  auto one = [&](int64_t th, float* buf) {
    const int64_t i = th / p.num_kv_heads, h = th % p.num_kv_heads;
    const int64_t row = p.row_ids[i];
    const int64_t pos = p.head_positions ? p.head_positions[th] : p.positions[i];
    const T* x = static_cast<const T*>(s.src) + i * s.src_tok + h * s.src_head;
    S* dst = static_cast<S*>(s.data) + row * s.stride_row + pos * s.stride_tok + h * s.stride_head;
    if (kCopy) {
      std::memcpy(dst, x, sizeof(S) * dim);
    } else {
      for (int d = 0; d < dim; ++d) buf[d] = to_float(x[d]);
      float* w = Format::kScaleWords > 0 ? s.scale + row * s.ss_row + pos * s.ss_tok + h * s.ss_head : nullptr;
      Format::encode(buf, dim, dst, w);
    }
  };
  if (n * dim <= (1 << 16)) {  // small appends (a decode step): no parallel region to enter
    std::vector<float> buf(kCopy ? 0 : dim);
    for (int64_t th = 0; th < n; ++th) one(th, buf.data());
    return;
  }
#pragma omp parallel
  {
    std::vector<float> buf(kCopy ? 0 : dim);
#pragma omp for schedule(static)
    for (int64_t th = 0; th < n; ++th) one(th, buf.data());
  }
}

// Checks one side (write == false) or writes it; both sides are checked before either is written.
void append_one(const AppendParams& p, int32_t format, const Side& s, const char* what, bool write) {
  dispatch_kv_format(format, what, [&](auto fmt) {
    using Format = decltype(fmt);
    if (Format::kScaleWords > 0 && s.scale == nullptr)
      cpu::fail(std::string(what) + ": a quantized cache needs its scales");
    if (!dim_ok<Format>(p.head_dim)) cpu::fail(std::string(what) + ": head_dim does not fit the storage format");
    cpu::dispatch_dtype(p.dtype, "append_kv k/v", [&](auto t) {
      using T = decltype(t);
      if (Format::kScaleWords == 0 && !std::is_same<typename Format::storage_t, T>::value)
        cpu::fail(std::string(what) + ": k/v dtype must equal the cache dtype of a plain cache");
      if (write) append_side<Format, T>(p, s);
    });
  });
}

}  // namespace

void append_kv_cpu(const AppendParams& p) {
  using cpu::fail;
  cpu::require(p.num_tokens >= 0, "append_kv: negative num_tokens");
  if (p.num_tokens == 0) return;
  cpu::require(p.cache.k && p.cache.v && p.k && p.v && p.row_ids && p.positions,
               "append_kv: null pointer in the parameters");
  cpu::require(p.num_kv_heads > 0 && p.head_dim > 0, "append_kv: num_kv_heads and head_dim must be positive");
  for (int i = 0; i < p.num_tokens; ++i) {
    if (p.row_ids[i] < 0 || p.row_ids[i] >= p.cache.num_rows)
      fail("append_kv: row id " + std::to_string(p.row_ids[i]) + " of token " + std::to_string(i) + " is outside [0, " +
           std::to_string(p.cache.num_rows) + ")");
    if (p.head_positions == nullptr && (p.positions[i] < 0 || p.positions[i] >= p.cache.max_seq))
      fail("append_kv: position " + std::to_string(p.positions[i]) + " of token " + std::to_string(i) +
           " is outside [0, " + std::to_string(p.cache.max_seq) + ")");
  }
  if (p.head_positions) {
    for (int64_t th = 0; th < (int64_t)p.num_tokens * p.num_kv_heads; ++th) {
      const int32_t pos = p.head_positions[th];
      if (pos < 0 || pos >= p.cache.max_seq)
        fail("append_kv: head position " + std::to_string(pos) + " of token " + std::to_string(th / p.num_kv_heads) +
             ", kv head " + std::to_string(th % p.num_kv_heads) + " is outside [0, " + std::to_string(p.cache.max_seq) +
             ")");
    }
  }
  const KVCacheView& c = p.cache;
  const Side k{c.k,       c.k_stride_row,  c.k_stride_tok,  c.k_stride_head,
               c.k_scale, c.ks_stride_row, c.ks_stride_tok, c.ks_stride_head,
               p.k,       p.k_stride_tok,  p.k_stride_head};
  const Side v{c.v,       c.v_stride_row,  c.v_stride_tok,  c.v_stride_head,
               c.v_scale, c.vs_stride_row, c.vs_stride_tok, c.vs_stride_head,
               p.v,       p.v_stride_tok,  p.v_stride_head};
  if (c.k_format == p.dtype && c.v_format == p.dtype) {  // plain cache of the input dtype: byte copies
    cpu::dispatch_dtype(p.dtype, "append_kv k/v", [&](auto t) {
      using T = decltype(t);
      append_side<PlainFormat<T>, T>(p, k);
      append_side<PlainFormat<T>, T>(p, v);
    });
    return;
  }
  append_one(p, c.k_format, k, "append_kv (K)", false);
  append_one(p, c.v_format, v, "append_kv (V)", false);
  append_one(p, c.k_format, k, "append_kv (K)", true);
  append_one(p, c.v_format, v, "append_kv (V)", true);
}

}  // namespace vattn
