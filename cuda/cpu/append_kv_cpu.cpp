// CPU append_kv: writes new K/V tokens into the cache at (row_ids[i], positions[i]) (or per kv
// head at head_positions[i, h] when given), in each side's storage format (a quantized side is
// encoded with quant.h, the same code as on CUDA, so both store the same bytes). Every index is
// checked before the first write, so a failed call leaves the cache unchanged.
//
// int4_ch (keys per channel over groups of G = head_dim / 2 tokens, kv_format.h) is not written
// token by token: each (row, kv head, group) the call writes into is re-encoded whole, from the
// exact values of its tokens before the call's first one (quant::int4_ch_value) and the call's
// tokens, which must be consecutive positions (python/vattn/reference.py _append_int4_ch).
#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_util.h"
#include "row_reader.h"
#include "vattn/kv_paging.h"
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

// The (row, kv head, group) units of an int4_ch append: tokens[begin, end) of `order` are the
// call's (token, head) entries th = i * heads + h of the unit, by position (consecutive, checked).
struct GroupUnit {
  int32_t row, head, group, first, last;  // first / last: positions of the unit's new tokens
  int64_t begin, end;                     // range in GroupPlan::order
};
struct GroupPlan {
  bool built = false;
  std::vector<int64_t> order;  // (token, head) entries sorted by (row, head, position)
  std::vector<GroupUnit> units;
};

int32_t position_of(const AppendParams& p, int64_t th) {
  return p.head_positions ? p.head_positions[th] : p.positions[th / p.num_kv_heads];
}

// Where entry th (token th / heads, kv head th % heads) is stored: its cache row and position, or
// for a paged view (kv_paging.h) the physical block and the offset in it. A paged append is the
// contiguous append into the physical cache [num_blocks, block_size, ...] at these coordinates
// (python/vattn/reference.py append_kv), int4_ch groups included: a group never crosses a block.
struct Slot {
  int32_t row, pos;
};
Slot slot_of(const AppendParams& p, int64_t th) {
  const int32_t row = p.row_ids[th / p.num_kv_heads], pos = position_of(p, th);
  if (!kv_paged(p.cache)) return Slot{row, pos};
  return Slot{int32_t(kv_block_of(p.cache, row, pos)), pos % p.cache.block_size};
}

// Groups the call's entries into units and checks them (positions are already inside [0, seq)).
void build_group_plan(const AppendParams& p, GroupPlan* plan) {
  if (plan->built) return;
  const int64_t heads = p.num_kv_heads, n = int64_t(p.num_tokens) * heads;
  const int32_t G = Int4ChannelFormat::group(p.head_dim);
  plan->order.resize(size_t(n));
  for (int64_t th = 0; th < n; ++th) plan->order[size_t(th)] = th;
  auto key = [&](int64_t th) {
    const Slot sl = slot_of(p, th);
    return std::make_tuple(sl.row, int32_t(th % heads), sl.pos);
  };
  std::sort(plan->order.begin(), plan->order.end(), [&](int64_t a, int64_t b) { return key(a) < key(b); });
  plan->units.clear();
  const char* row_name = kv_paged(p.cache) ? "(physical block " : "(row ";
  for (int64_t a = 0; a < n;) {
    const int64_t th = plan->order[size_t(a)];
    const Slot sl = slot_of(p, th);
    const int32_t row = sl.row, h = int32_t(th % heads), pos = sl.pos, g = pos / G;
    int64_t e = a + 1;
    int32_t prev = pos;
    for (; e < n; ++e) {
      const int64_t te = plan->order[size_t(e)];
      const Slot se = slot_of(p, te);
      const int32_t pe = se.pos;
      if (se.row != row || int32_t(te % heads) != h || pe / G != g) break;
      if (pe != prev + 1)
        cpu::fail("append_kv: int4_ch keys: the new tokens of a group " + std::string(row_name) + std::to_string(row) +
                  ", kv head " + std::to_string(h) + ", tokens " + std::to_string(int64_t(g) * G) + ".." +
                  std::to_string(int64_t(g) * G + G - 1) + ") must be consecutive positions, got " +
                  std::to_string(prev) + (pe == prev ? " twice" : " then " + std::to_string(pe)));
      prev = pe;
    }
    plan->units.push_back(GroupUnit{row, h, g, pos, prev, a, e});
    a = e;
  }
  plan->built = true;
}

// int4_ch side: re-encodes every unit of the plan (disjoint groups: parallel over units).
template <typename T>
void append_grouped(const AppendParams& p, const Side& s, const GroupPlan& plan) {
  const int dim = p.head_dim;
  const int32_t G = Int4ChannelFormat::group(dim);
  const int64_t heads = p.num_kv_heads;
  auto one = [&](const GroupUnit& u, float* x) {  // x: G * dim values, then 2 * dim parameters
    const int64_t lo = int64_t(u.group) * G;
    uint8_t* codes = static_cast<uint8_t*>(s.data) + u.row * s.stride_row + u.head * s.stride_head;
    float* words = s.scale + u.row * s.ss_row + u.head * s.ss_head;
    float* gw = words + lo * s.ss_tok;
    if (u.first > lo) {                   // the group's old tokens, exactly as stored
      float* prm = x + int64_t(G) * dim;  // scales, then zeros
      cpu::int4_ch_load_params(gw, s.ss_tok, dim, prm, prm + dim);
      for (int64_t t = lo; t < u.first; ++t) {
        const uint8_t* r = codes + t * s.stride_tok;
        float* o = x + (t - lo) * dim;
        for (int d = 0; d < dim; ++d) o[d] = quant::int4_ch_value(quant::int4_code(r, d), prm[d], prm[dim + d]);
      }
    }
    for (int64_t e = u.begin; e < u.end; ++e) {
      const int64_t th = plan.order[size_t(e)];
      const T* src = static_cast<const T*>(s.src) + (th / heads) * s.src_tok + (th % heads) * s.src_head;
      float* o = x + (u.first + (e - u.begin) - lo) * dim;
      for (int d = 0; d < dim; ++d) o[d] = to_float(src[d]);
    }
    quant::encode_int4_ch_group(x, dim, int(u.last + 1 - lo), dim, codes + lo * s.stride_tok, s.stride_tok, gw,
                                s.ss_tok);
  };
  const int64_t nu = int64_t(plan.units.size());
  if (int64_t(p.num_tokens) * heads * dim <= (1 << 16)) {  // small appends (a decode step)
    std::vector<float> x(size_t(G + 2) * dim);
    for (int64_t i = 0; i < nu; ++i) one(plan.units[size_t(i)], x.data());
    return;
  }
#pragma omp parallel
  {
    std::vector<float> x(size_t(G + 2) * dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < nu; ++i) one(plan.units[size_t(i)], x.data());
  }
}

// serial: write the entries in call order (a paged append whose tokens share a physical slot, so
// that the last of them wins as in the reference).
template <class Format, typename T>
void append_side(const AppendParams& p, const Side& s, bool serial) {
  using S = typename Format::storage_t;
  const int dim = p.head_dim;
  constexpr bool kCopy = std::is_same<S, T>::value;  // plain format of the input dtype: a byte copy
  const int64_t n = (int64_t)p.num_tokens * p.num_kv_heads;
  const KVCacheView& c = p.cache;
  auto one = [&](int64_t th, float* buf) {
    const int64_t i = th / p.num_kv_heads, h = th % p.num_kv_heads;
    const int64_t row = p.row_ids[i];
    const int64_t pos = p.head_positions ? p.head_positions[th] : p.positions[i];
    const T* x = static_cast<const T*>(s.src) + i * s.src_tok + h * s.src_head;
    S* dst = static_cast<S*>(s.data) + kv_token_offset(c, row, pos, s.stride_row, s.stride_tok) + h * s.stride_head;
    if (kCopy) {
      std::memcpy(dst, x, sizeof(S) * dim);
    } else {
      for (int d = 0; d < dim; ++d) buf[d] = to_float(x[d]);
      float* w = Format::kScaleWords > 0 ? s.scale + kv_token_offset(c, row, pos, s.ss_row, s.ss_tok) + h * s.ss_head
                                         : nullptr;
      Format::encode(buf, dim, dst, w);
    }
  };
  if (serial || n * dim <= (1 << 16)) {  // small appends (a decode step): no parallel region to enter
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
// An int4_ch side also checks (and builds once for both sides) the plan of its groups.
void append_one(const AppendParams& p, int32_t format, const Side& s, const char* what, bool write, GroupPlan* plan,
                bool serial) {
  dispatch_kv_format(format, what, [&](auto fmt) {
    using Format = decltype(fmt);
    constexpr bool kGrouped = is_grouped_format<Format>::value;
    if (Format::kScaleWords > 0 && s.scale == nullptr)
      cpu::fail(std::string(what) + ": a quantized cache needs its scales");
    if (!dim_ok<Format>(p.head_dim)) cpu::fail(std::string(what) + ": head_dim does not fit the storage format");
    if (kGrouped) {
      const int32_t G = Int4ChannelFormat::group(p.head_dim);
      if (kv_paged(p.cache))
        cpu::check_paged_groups(format, p.head_dim, p.cache.block_size, what);
      else if (p.cache.max_seq % G != 0)
        cpu::fail(std::string(what) + ": an int4_ch cache holds whole groups of " + std::to_string(G) +
                  " tokens: its seq (" + std::to_string(p.cache.max_seq) + ") must be a multiple");
      build_group_plan(p, plan);
    }
    cpu::dispatch_dtype(p.dtype, "append_kv k/v", [&](auto t) {
      using T = decltype(t);
      if (Format::kScaleWords == 0 && !std::is_same<typename Format::storage_t, T>::value)
        cpu::fail(std::string(what) + ": k/v dtype must equal the cache dtype of a plain cache");
      if (write) {
        if constexpr (kGrouped)
          append_grouped<T>(p, s, *plan);
        else
          append_side<Format, T>(p, s, serial);
      }
    });
  });
}

// Paged view (kv_paging.h): checks the view and the block id of every written position (before
// any write); returns whether two entries of the call land on one physical slot (rows sharing a
// block), which the writes must then take in call order. Only appends large enough to run in
// parallel pay for that test: smaller ones are written in order anyway.
bool check_paged(const AppendParams& p) {
  const KVCacheView& c = p.cache;
  cpu::require(c.block_table != nullptr && c.block_size > 0 && c.num_blocks >= 0 && c.bt_stride_row >= 0,
               "append_kv: a paged view needs block_size > 0, num_blocks >= 0 and a block-table row stride >= 0");
  const int64_t heads = p.num_kv_heads, n = p.head_positions ? int64_t(p.num_tokens) * heads : p.num_tokens;
  for (int64_t e = 0; e < n; ++e) {
    const int64_t th = p.head_positions ? e : e * heads;
    const int32_t row = p.row_ids[th / heads], pos = position_of(p, th);
    const int32_t id = c.block_table[row * c.bt_stride_row + pos / c.block_size];
    if (id < 0 || id >= c.num_blocks)
      cpu::fail("append_kv: token " + std::to_string(th / heads) + " (row " + std::to_string(row) + ", position " +
                std::to_string(pos) + ") lies in block_table[" + std::to_string(row) + ", " +
                std::to_string(pos / c.block_size) + "] = " + std::to_string(id) + ", outside [0, " +
                std::to_string(c.num_blocks) + ")");
  }
  if (int64_t(p.num_tokens) * heads * p.head_dim <= (1 << 16)) return false;
  std::vector<int64_t> slots(static_cast<size_t>(n));
  for (int64_t e = 0; e < n; ++e) {
    const int64_t th = p.head_positions ? e : e * heads;
    const Slot sl = slot_of(p, th);
    const int64_t phys = int64_t(sl.row) * c.block_size + sl.pos;
    slots[size_t(e)] = p.head_positions ? phys * heads + th % heads : phys;
  }
  std::sort(slots.begin(), slots.end());
  return std::adjacent_find(slots.begin(), slots.end()) != slots.end();
}

}  // namespace

void append_kv_cpu(const AppendParams& p) {
  using cpu::fail;
  cpu::require(p.num_tokens >= 0, "append_kv: negative num_tokens");
  if (p.num_tokens == 0) return;
  // The cache's pointers after the indices: a cache with no positions (no storage) then fails on
  // the first position, with its range in the message.
  cpu::require(p.k && p.v && p.row_ids && p.positions, "append_kv: null pointer in the parameters");
  cpu::require(p.num_kv_heads > 0 && p.head_dim > 0, "append_kv: num_kv_heads and head_dim must be positive");
  for (int i = 0; i < p.num_tokens; ++i) {
    if (p.row_ids[i] < 0 || p.row_ids[i] >= p.cache.num_rows)
      fail("append_kv: row id " + std::to_string(p.row_ids[i]) + " of token " + std::to_string(i) + " is outside [0, " +
           std::to_string(p.cache.num_rows) + ")");
    if (p.head_positions == nullptr && (p.positions[i] < 0 || p.positions[i] >= p.cache.max_seq))
      fail("append_kv: position " + std::to_string(p.positions[i]) + " of token " + std::to_string(i) +
           " is outside [0, " + std::to_string(p.cache.max_seq) + ")");
  }
  cpu::require(p.cache.k && p.cache.v, "append_kv: null pointer in the parameters");
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
  const bool serial = kv_paged(c) && check_paged(p);
  const Side k{c.k,       c.k_stride_row,  c.k_stride_tok,  c.k_stride_head,
               c.k_scale, c.ks_stride_row, c.ks_stride_tok, c.ks_stride_head,
               p.k,       p.k_stride_tok,  p.k_stride_head};
  const Side v{c.v,       c.v_stride_row,  c.v_stride_tok,  c.v_stride_head,
               c.v_scale, c.vs_stride_row, c.vs_stride_tok, c.vs_stride_head,
               p.v,       p.v_stride_tok,  p.v_stride_head};
  if (c.k_format == p.dtype && c.v_format == p.dtype) {  // plain cache of the input dtype: byte copies
    cpu::dispatch_dtype(p.dtype, "append_kv k/v", [&](auto t) {
      using T = decltype(t);
      append_side<PlainFormat<T>, T>(p, k, serial);
      append_side<PlainFormat<T>, T>(p, v, serial);
    });
    return;
  }
  GroupPlan plan;
  append_one(p, c.k_format, k, "append_kv (K)", false, &plan, serial);
  append_one(p, c.v_format, v, "append_kv (V)", false, &plan, serial);
  append_one(p, c.k_format, k, "append_kv (K)", true, &plan, serial);
  append_one(p, c.v_format, v, "append_kv (V)", true, &plan, serial);
}

}  // namespace vattn
