// compact_kv on CUDA: moves the kept tokens of each (row, kv_head) to the front of that row, in
// order (params.h CompactParams; python/vattn/reference.py compact_kv is the definition).
//   In place in parallel is not safe (a thread may overwrite a record another thread has yet to
//   read), so each part that moves with a token (K data, V data, their scale words, the score) is
//   first gathered into the workspace, one record per (i, h, j) slot, and then scattered back to
//   position j: two launches per part on p.stream, which orders them. A slot whose token already
//   sits at its place (keep[j] == j) is skipped by both.
//   One thread moves one word of a record; the word (16, 8, 4, 2 or 1 bytes) is the widest that
//   divides the part's base pointer, strides and record bytes.
//   A grouped side (int4_ch keys: parameters per channel over groups of G = head_dim / 2 tokens)
//   is re-encoded instead (reference.compact_kv(..., k_format="int4_ch")): its kept tokens are
//   first dequantized (exact values, quant::int4_ch_value, with the words of each source token's
//   group) into fp32 workspace records, one per slot; then one thread per (i, h, destination
//   group, channel pair) encodes the group's records with quant::encode_int4_ch_pair (the CPU's
//   function, so bit-identical bytes): codes of [0, n), words of the tokens of those groups,
//   [0, ceil(n / G) * G). The two launches are ordered on p.stream, so no read sees a write.
// Out-of-range rows, keep_lens or token indices are skipped: the kernels never touch memory
// outside the cache whatever the index tensors hold (the CPU op rejects them; checking here
// would need a host sync). Nothing is allocated here: the workspace comes sized by
// compact_workspace_bytes().
#include <cstdint>
#include <stdexcept>
#include <string>

#include "vattn/cuda/check.cuh"
#include "vattn/cuda/kv_device_format.cuh"
#include "vattn/cuda/kv_paged.cuh"
#include "vattn/kv_format.h"
#include "vattn/ops.h"
#include "vattn/quant.h"

namespace vattn {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535 * 8;

// The index tensors, as every part's kernels read them.
struct IndexArgs {
  const int32_t* row_ids;
  const int32_t* keep;
  const int32_t* keep_lens;
  int32_t num_heads, max_keep, num_rows, max_seq;
};

// One strided part of the cache and its section of the workspace. Strides in bytes.
struct PartArgs {
  char* base;
  int64_t s_row, s_tok, s_head;
  char* ws;
  int32_t words;  // words per record
};

// Grid-stride over (slot, word), slot = (i * num_heads + h) * max_keep + j.
// kGather: workspace[slot] = cache[row, keep[slot], h]; else cache[row, j, h] = workspace[slot].
template <typename Word, bool kGather>
__global__ void __launch_bounds__(kThreads) compact_part_kernel(const IndexArgs ix, const PartArgs a, int64_t total) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t slot = idx / a.words;
    const int64_t w = idx - slot * a.words;
    const int64_t ih = slot / ix.max_keep;
    const int64_t j = slot - ih * ix.max_keep;
    const int32_t len = ix.keep_lens[ih];
    if (len < 0 || len > ix.max_keep || j >= len) continue;
    const int64_t i = ih / ix.num_heads;
    const int64_t h = ih - i * ix.num_heads;
    const int32_t row = ix.row_ids[i];
    const int32_t src = ix.keep[slot];
    if (row < 0 || row >= ix.num_rows || src < 0 || src >= ix.max_seq || src == j) continue;
    char* head = a.base + row * a.s_row + h * a.s_head;
    Word* ws = reinterpret_cast<Word*>(a.ws) + slot * a.words + w;
    if constexpr (kGather) {
      *ws = reinterpret_cast<const Word*>(head + src * a.s_tok)[w];
    } else {
      reinterpret_cast<Word*>(head + j * a.s_tok)[w] = *ws;
    }
  }
}

// ---- a grouped side (int4_ch): dequantize the kept tokens, then re-encode their new groups ----

// One grouped side of the cache and its fp32 workspace section [slots][head_dim].
struct GroupedArgs {
  uint8_t* codes;
  int64_t c_row, c_tok, c_head;  // bytes
  float* words;
  int64_t w_row, w_tok, w_head;  // floats
  float* ws;
  int32_t head_dim;
};

// Grid-stride over (slot, channel): workspace[slot][c] = value of channel c of the kept token
// keep[slot] (0 for a source outside the cache, which the CPU op rejects).
__global__ void __launch_bounds__(kThreads)
    compact_grouped_gather_kernel(const IndexArgs ix, const GroupedArgs a, int64_t total) {
  using F = Int4ChannelFormat;
  const int D = a.head_dim;
  const int G = F::group(D);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t slot = idx / D;
    const int c = int(idx - slot * D);
    const int64_t ih = slot / ix.max_keep;
    const int64_t j = slot - ih * ix.max_keep;
    const int32_t len = ix.keep_lens[ih];
    if (len < 0 || len > ix.max_keep || j >= len) continue;
    const int64_t i = ih / ix.num_heads;
    const int64_t h = ih - i * ix.num_heads;
    const int32_t row = ix.row_ids[i];
    if (row < 0 || row >= ix.num_rows) continue;
    const int32_t src = ix.keep[slot];
    float x = 0.f;
    if (src >= 0 && src < ix.max_seq && int64_t(src - src % G) + G <= ix.max_seq) {
      const uint8_t* v = a.codes + row * a.c_row + int64_t(src) * a.c_tok + h * a.c_head;
      const float* gw = a.words + row * a.w_row + int64_t(src - src % G) * a.w_tok + h * a.w_head;
      x = F::dequant_grouped(v, gw, a.w_tok, c, D);
    }
    a.ws[slot * D + c] = x;
  }
}

// Grid-stride over (i * num_heads + h, destination group g, channel pair pr): encodes the
// records of slots g * G .. min(g * G + G, n) - 1 of (i, h) into the codes of those tokens and
// the words of tokens g * G .. g * G + G - 1 (skipped when the group would pass max_seq).
__global__ void __launch_bounds__(kThreads)
    compact_grouped_encode_kernel(const IndexArgs ix, const GroupedArgs a, int64_t groups, int64_t total) {
  const int D = a.head_dim;
  const int G = Int4ChannelFormat::group(D);
  const int pairs = D / 2;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t ihg = idx / pairs;
    const int pr = int(idx - ihg * pairs);
    const int64_t ih = ihg / groups;
    const int64_t lo = (ihg - ih * groups) * G;  // first destination token of the group
    const int32_t len = ix.keep_lens[ih];
    if (len < 0 || len > ix.max_keep || lo >= len || lo + G > ix.max_seq) continue;
    const int64_t i = ih / ix.num_heads;
    const int64_t h = ih - i * ix.num_heads;
    const int32_t row = ix.row_ids[i];
    if (row < 0 || row >= ix.num_rows) continue;
    const int m = int(len - lo < G ? len - lo : G);
    quant::encode_int4_ch_pair(a.ws + (ih * ix.max_keep + lo) * D, D, m, D, 2 * pr,
                               a.codes + row * a.c_row + lo * a.c_tok + h * a.c_head, a.c_tok,
                               a.words + row * a.w_row + lo * a.w_tok + h * a.w_head, a.w_tok);
  }
}

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("compact_kv: " + msg); }

// A part before its word size and workspace section are chosen.
struct Part {
  char* base;
  int64_t s_row, s_tok, s_head;  // bytes
  int64_t bytes;                 // per record
  const char* name;
};

// Bytes of one (token, head) data vector of a format (storage element bytes in *elem), and its
// scale words.
int64_t data_bytes(int32_t format, int32_t head_dim, const char* side, int64_t* elem, int* scale_words) {
  int64_t out = 0;
  dispatch_kv_format(format, "compact_kv", [&](auto fmt) {
    using Format = decltype(fmt);
    if (!dim_ok<Format>(head_dim)) bad(std::string(side) + ": head_dim does not fit the storage format");
    *elem = int64_t(sizeof(typename Format::storage_t));
    *scale_words = Format::kScaleWords;
    out = int64_t(head_dim / Format::kElemsPerStorage) * *elem;
  });
  return out;
}

// A grouped side of a call (int4_ch): re-encoded, not moved (GroupedArgs without the workspace).
struct Grouped {
  GroupedArgs args;
  const char* gather_name;  // for the launch checks
  const char* encode_name;
};

// The parts of a call: K and V data, then the scale words of quantized sides, then the scores;
// a grouped side (int4_ch) is no part (neither its data nor its words): it goes to *grouped.
int collect_parts(const CompactParams& p, Part* parts, Grouped* grouped, int* num_grouped) {
  if (p.num_kv_heads <= 0 || p.head_dim <= 0) bad("num_kv_heads and head_dim must be positive");
  const KVCacheView& c = p.cache;
  int64_t ke = 0, ve = 0;
  int kw = 0, vw = 0;
  const int64_t kb = data_bytes(c.k_format, p.head_dim, "K", &ke, &kw);
  const int64_t vb = data_bytes(c.v_format, p.head_dim, "V", &ve, &vw);
  const bool kg = c.k_format == kKvInt4Channel, vg = c.v_format == kKvInt4Channel;
  cuda::check_grouped_kv(c, p.head_dim, "compact_kv");
  const int64_t f = int64_t(sizeof(float));
  int n = 0;
  *num_grouped = 0;
  if (kw > 0 && c.k_scale == nullptr)
    bad(std::string("K: a quantized cache (") + kv_format_name(c.k_format) + ") needs its scales");
  if (vw > 0 && c.v_scale == nullptr)
    bad(std::string("V: a quantized cache (") + kv_format_name(c.v_format) + ") needs its scales");
  if (kg)
    grouped[(*num_grouped)++] =
        Grouped{GroupedArgs{static_cast<uint8_t*>(c.k), c.k_stride_row, c.k_stride_tok, c.k_stride_head, c.k_scale,
                            c.ks_stride_row, c.ks_stride_tok, c.ks_stride_head, nullptr, p.head_dim},
                "compact_grouped_gather_kernel (K)", "compact_grouped_encode_kernel (K)"};
  if (vg)
    grouped[(*num_grouped)++] =
        Grouped{GroupedArgs{static_cast<uint8_t*>(c.v), c.v_stride_row, c.v_stride_tok, c.v_stride_head, c.v_scale,
                            c.vs_stride_row, c.vs_stride_tok, c.vs_stride_head, nullptr, p.head_dim},
                "compact_grouped_gather_kernel (V)", "compact_grouped_encode_kernel (V)"};
  if (!kg)
    parts[n++] = Part{static_cast<char*>(c.k), c.k_stride_row * ke, c.k_stride_tok * ke, c.k_stride_head * ke, kb, "K"};
  if (!vg)
    parts[n++] = Part{static_cast<char*>(c.v), c.v_stride_row * ve, c.v_stride_tok * ve, c.v_stride_head * ve, vb, "V"};
  if (kw > 0 && !kg)
    parts[n++] = Part{reinterpret_cast<char*>(c.k_scale),
                      c.ks_stride_row * f,
                      c.ks_stride_tok * f,
                      c.ks_stride_head * f,
                      kw * f,
                      "K scales"};
  if (vw > 0 && !vg)
    parts[n++] = Part{reinterpret_cast<char*>(c.v_scale),
                      c.vs_stride_row * f,
                      c.vs_stride_tok * f,
                      c.vs_stride_head * f,
                      vw * f,
                      "V scales"};
  if (p.scores)
    parts[n++] = Part{
        reinterpret_cast<char*>(p.scores), p.sc_stride_row * f, p.sc_stride_tok * f, p.sc_stride_head * f, f, "scores"};
  return n;
}

constexpr int64_t align16(int64_t b) { return (b + 15) / 16 * 16; }

int64_t slots_of(const CompactParams& p) { return int64_t(p.n) * p.num_kv_heads * p.max_keep; }

// The widest word that divides the part's pointer, strides and record bytes.
int word_of(const Part& q) {
  const int64_t vals[] = {int64_t(reinterpret_cast<uintptr_t>(q.base)), q.s_row, q.s_tok, q.s_head, q.bytes};
  for (int w = 16; w > 1; w /= 2) {
    bool ok = true;
    for (int64_t x : vals) ok = ok && x % w == 0;
    if (ok) return w;
  }
  return 1;
}

template <typename Word>
void launch_part(const CompactParams& p, const IndexArgs& ix, const Part& q, char* ws, cudaStream_t st) {
  const PartArgs a{q.base, q.s_row, q.s_tok, q.s_head, ws, int32_t(q.bytes / int64_t(sizeof(Word)))};
  const int64_t total = slots_of(p) * a.words;
  const int64_t needed = (total + kThreads - 1) / kThreads;
  const int blocks = int(needed < kMaxBlocks ? needed : kMaxBlocks);
  compact_part_kernel<Word, true><<<blocks, kThreads, 0, st>>>(ix, a, total);
  cuda_check_launch("compact_part_kernel (gather)");
  compact_part_kernel<Word, false><<<blocks, kThreads, 0, st>>>(ix, a, total);
  cuda_check_launch("compact_part_kernel (scatter)");
}

}  // namespace

int64_t compact_workspace_bytes(const CompactParams& p) {
  // Compaction gathers tokens within one contiguous row; a paged view has no kernel here.
  cuda::reject_paged_view(p.cache, "compact_kv");
  if (p.n < 0 || p.max_keep < 0) bad("n and max_keep must be >= 0");
  if (p.n == 0 || p.max_keep == 0) return 0;
  Part parts[5];
  Grouped grouped[2];
  int ng = 0;
  const int np = collect_parts(p, parts, grouped, &ng);
  int64_t total = 0;
  for (int k = 0; k < np; ++k) total += align16(slots_of(p) * parts[k].bytes);
  for (int k = 0; k < ng; ++k) total += align16(slots_of(p) * p.head_dim * int64_t(sizeof(float)));
  return total;
}

void compact_kv_cuda(const CompactParams& p) {
  const int64_t need = compact_workspace_bytes(p);  // checks n, max_keep, heads, formats, scales
  if (need == 0) return;
  const KVCacheView& c = p.cache;
  if (!c.k || !c.v || !p.row_ids || !p.keep || !p.keep_lens) bad("null pointer");
  if (p.workspace == nullptr || p.workspace_bytes < need)
    bad("workspace of " + std::to_string(p.workspace_bytes) + " bytes, needs " + std::to_string(need) +
        " (compact_workspace_bytes)");
  if (reinterpret_cast<uintptr_t>(p.workspace) % 16 != 0) bad("workspace is not 16-byte aligned");
  Part parts[5];
  Grouped grouped[2];
  int ng = 0;
  const int np = collect_parts(p, parts, grouped, &ng);
  const IndexArgs ix{p.row_ids, p.keep, p.keep_lens, p.num_kv_heads, p.max_keep, c.num_rows, c.max_seq};
  cudaStream_t st = as_stream(p.stream);
  char* ws = static_cast<char*>(p.workspace);
  for (int k = 0; k < np; ++k) {
    const Part& q = parts[k];
    switch (word_of(q)) {
      case 16: launch_part<uint4>(p, ix, q, ws, st); break;
      case 8: launch_part<uint2>(p, ix, q, ws, st); break;
      case 4: launch_part<uint32_t>(p, ix, q, ws, st); break;
      case 2: launch_part<uint16_t>(p, ix, q, ws, st); break;
      default: launch_part<uint8_t>(p, ix, q, ws, st); break;
    }
    ws += align16(slots_of(p) * q.bytes);
  }
  for (int k = 0; k < ng; ++k) {
    GroupedArgs a = grouped[k].args;
    a.ws = reinterpret_cast<float*>(ws);
    const int64_t gather = slots_of(p) * p.head_dim;
    const int64_t gsize = Int4ChannelFormat::group(p.head_dim);
    const int64_t groups = (int64_t(p.max_keep) + gsize - 1) / gsize;
    const int64_t encode = int64_t(p.n) * p.num_kv_heads * groups * (p.head_dim / 2);
    auto blocks_for = [](int64_t total) {
      const int64_t needed = (total + kThreads - 1) / kThreads;
      return int(needed < kMaxBlocks ? needed : kMaxBlocks);
    };
    compact_grouped_gather_kernel<<<blocks_for(gather), kThreads, 0, st>>>(ix, a, gather);
    cuda_check_launch(grouped[k].gather_name);
    compact_grouped_encode_kernel<<<blocks_for(encode), kThreads, 0, st>>>(ix, a, groups, encode);
    cuda_check_launch(grouped[k].encode_name);
    ws += align16(gather * int64_t(sizeof(float)));
  }
}

}  // namespace vattn
