// decode_attention on CUDA: validation, the split plan, and the launches.
//   impl 0: split-KV kernel (decode_split_kernel.cuh, instantiated per head dim in
//           decode_hd*.cu) + decode_split_merge_kernel when there is more than one split;
//           falls back to the plain kernel for head dims, dtypes or alignments it does not cover.
//   impl 1: the plain kernel (decode_plain_kernel.cuh).
// Per-token attention scores (p.scores, score_mode): after either kernel, the score kernel of
// scores.cuh (attention_scores.cu) turns the final LSE into per-key probabilities.
// K/V formats (both kernels): the plain format of the q dtype, or any pair of quantized formats
// (fp8_e4m3 / int8 / int4, K and V apart) with their fp32 scale words, and int4_ch keys
// (parameters per channel over groups of tokens; the split kernel folds them into q).
// KV views (both kernels): contiguous, or paged (a block table per row; kv_paged.cuh), every
// format pair.
// No host synchronization and no allocation: split partials live in the caller's workspace,
// sized by decode_workspace_bytes() with the same plan.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "vattn/cuda/check.cuh"
#include "vattn/cuda/decode_args.cuh"
#include "vattn/cuda/split_merge.cuh"
#include "vattn/cuda/decode_plain_kernel.cuh"
#include "vattn/cuda/kv_paged.cuh"
#include "vattn/cuda/scores.cuh"
#include "vattn/cuda/vec.cuh"
#include "vattn/dtypes.h"
#include "vattn/kv_format.h"
#include "vattn/ops.h"
#include "vattn/softmax_state.h"

namespace vattn {
namespace cuda {

// Combines the split partials (split_merge.cuh). Grid (num_q_heads, batch).
template <typename T>
__global__ void __launch_bounds__(128)
    decode_split_merge_kernel(const AttentionParams p, const DecodePlanArgs a, int num_splits) {
  merge_split_row<T>(p, a, num_splits);
}

int decode_split_kernel_occupancy(const void* kernel, int threads, size_t dyn_smem, int hd, int group_block) {
  auto where = [&] {
    return "decode_split_kernel (head_dim " + std::to_string(hd) + ", group block " + std::to_string(group_block) +
           ", " + std::to_string(threads) + " threads, " + std::to_string(dyn_smem) + " B dynamic shared memory)";
  };
  auto check = [&](cudaError_t err, const char* call) {
    if (err == cudaSuccess) return;
    (void)cudaGetLastError();  // not left behind for the next launch check to report
    throw std::runtime_error(std::string("decode_attention: ") + call + " for " + where() + ": " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  };
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, int> cache;  // (device, instance) -> CTAs per SM
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(dev, kernel);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, dyn_smem),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  if (n < 1)
    throw std::runtime_error("decode_attention: " + where() + " fits no CTA on an SM of device " + std::to_string(dev) +
                             " (occupancy 0)");
  cache.emplace(key, n);
  return n;
}

}  // namespace cuda

namespace {

using cuda::DecodePlanArgs;

constexpr int kMinSplitKeys = 256;  // a split smaller than this is not worth its merge
constexpr int kMaxGridYZ = 65535;

struct DecodePlan {
  bool fast = false;
  int group_block = 1;  // q heads per CTA
  int num_splits = 1;
  int sm_count = 0;        // fast path: multiprocessors of the device
  int occupancy = 0;       // fast path: max resident CTAs per SM of the split-kernel instance
  int64_t lse_offset = 0;  // byte offset of lse_part in the workspace
  int64_t bytes = 0;       // workspace bytes
  DecodePlanArgs args;     // what the kernels read beside AttentionParams (o_part / lse_part
                           // are set at launch, from the workspace)
};

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("decode_attention: " + msg); }

// Calls f(T{}) with the q element type of a (validated) dtype code.
template <typename F>
void dispatch_dtype(int32_t dtype, F&& f) {
  switch (dtype) {
    case kFloat16: f(f16_t{}); break;
    case kBFloat16: f(bf16_t{}); break;
    default: f(float{}); break;
  }
}

// A quantized side needs its fp32 scale words (4-byte aligned: the kernels read them as floats).
void check_scales(int32_t format, const float* scale, const char* side) {
  if (!kv_format_is_quantized(format)) return;
  if (scale == nullptr)
    bad(std::string("a quantized ") + side + " cache (" + kv_format_name(format) + ") needs its scale tensor");
  if (reinterpret_cast<uintptr_t>(scale) % alignof(float) != 0)
    bad(std::string(side) + " scale pointer is not 4-byte aligned");
}

void validate(const AttentionParams& p) {
  if (p.cu_seqlens_q != nullptr) bad("cu_seqlens_q must be null for decode (one query per row)");
  if (p.batch < 0) bad("batch must be >= 0");
  if (p.batch > kMaxGridYZ) bad("batch must be <= 65535");
  if (p.num_q_heads <= 0 || p.num_kv_heads <= 0) bad("num_q_heads and num_kv_heads must be > 0");
  if (p.num_q_heads % p.num_kv_heads != 0) bad("num_q_heads must be a multiple of num_kv_heads");
  if (p.head_dim <= 0 || p.head_dim % 8 != 0 || p.head_dim > cuda::kPlainDecodeMaxHeadDim)
    bad("head_dim must be a multiple of 8 in [8, 256], got " + std::to_string(p.head_dim));
  if (p.dtype != kFloat16 && p.dtype != kBFloat16 && p.dtype != kFloat32)
    bad("dtype must be float16, bfloat16 or float32 (code " + std::to_string(p.dtype) + ")");
  // K/V formats: the plain format of the q dtype on both sides, or any pair of quantized
  // formats (dispatch_kv_pair throws std::invalid_argument for anything else).
  dispatch_dtype(p.dtype, [&](auto t) {
    cuda::dispatch_attention_kv_pair<decltype(t)>(p.kv.k_format, p.kv.v_format, "decode_attention", [](auto, auto) {});
  });
  cuda::check_grouped_kv(p.kv, p.head_dim, "decode_attention");  // int4_ch: whole groups, 32-bit offsets
  cuda::check_paged_view(p.kv, "decode_attention");              // block size, blocks, table alignment
  if (p.kv.num_rows < 0 || p.kv.max_seq < 0) bad("cache num_rows and max_seq must be >= 0");
  if (!std::isfinite(p.scale)) bad("scale must be finite");
  if (!std::isfinite(p.softcap)) bad("softcap must be finite");
  if (p.impl != 0 && p.impl != 1) bad("impl must be 0 (fast) or 1 (plain)");
  if (p.batch == 0) return;
  if (!p.q || !p.out || !p.kv.k || !p.kv.v) bad("null q, out, k or v pointer");
  if (!p.seqlens_k && !p.head_seqlens_k) bad("seqlens_k (or head_seqlens_k) is required");
  check_scales(p.kv.k_format, p.kv.k_scale, "K");
  check_scales(p.kv.v_format, p.kv.v_scale, "V");
}

bool aligned_16(const void* ptr, int esize, std::initializer_list<int64_t> strides) {
  if (!cuda::is_aligned_16(ptr)) return false;
  for (int64_t s : strides)
    if ((s * esize) % 16 != 0) return false;
  return true;
}

// Calls f(KF{}, VF{}) with the (validated) K and V format types.
template <typename F>
decltype(auto) dispatch_formats(const AttentionParams& p, F&& f) {
  return dispatch_kv_format(p.kv.k_format, "decode_attention (K)", [&](auto kf) {
    return dispatch_kv_format(p.kv.v_format, "decode_attention (V)", [&](auto vf) { return f(kf, vf); });
  });
}

// Split-kernel tile for this head dim and K/V formats (0: not covered).
int split_tile(const AttentionParams& p) {
  return dispatch_formats(
      p, [&](auto kf, auto vf) { return cuda::decode_split_tile<decltype(kf), decltype(vf)>(p.head_dim); });
}

// Largest group block the split kernel has for these formats.
int split_max_group_block(const AttentionParams& p) {
  return dispatch_formats(
      p, [&](auto kf, auto vf) { return cuda::decode_split_max_group_block<decltype(kf), decltype(vf)>(); });
}

// The split kernel covers 16-bit q, K/V formats with the chunk interface at its instantiated
// head dims (split_tile != 0: the vector bytes head_dim * bits / 8 are whole 16-byte chunks),
// and 16-byte aligned q, K, V vectors (out and lse are written element by element, so they
// need no alignment; scale words are copied 4 bytes at a time). A paged view's vectors are
// aligned when its storage and its block, token and head strides are (k_stride_row is the
// block stride there), so the same check serves both kinds of view.
bool fast_supported(const AttentionParams& p) {
  if (p.impl != 0) return false;
  if (p.dtype != kFloat16 && p.dtype != kBFloat16) return false;
  if (split_tile(p) == 0) return false;
  const int qs = dtype_size(p.dtype);
  auto storage_size = [](int32_t code) {
    return dispatch_kv_format(code, "decode_attention",
                              [](auto fmt) { return int(sizeof(typename decltype(fmt)::storage_t)); });
  };
  const int ks = storage_size(p.kv.k_format), vs = storage_size(p.kv.v_format);
  return aligned_16(p.q, qs, {p.q_stride_tok, p.q_stride_head}) &&
         aligned_16(p.kv.k, ks, {p.kv.k_stride_row, p.kv.k_stride_tok, p.kv.k_stride_head}) &&
         aligned_16(p.kv.v, vs, {p.kv.v_stride_row, p.kv.v_stride_tok, p.kv.v_stride_head});
}

int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Keys per split when s splits share n keys: ceil(n / s) rounded up to whole tiles.
int64_t split_chunk(int64_t n, int64_t s, int tile) { return ceil_div64(ceil_div64(n, s), tile) * tile; }

// The splits that asking for s really gives once the chunk is whole tiles: <= s, none empty.
// It is the largest count reachable with at most s splits (and real_splits(r) == r exactly for
// the reachable counts r).
int64_t real_splits(int64_t n, int64_t s, int tile) { return ceil_div64(n, split_chunk(n, s, tile)); }

struct SplitChoice {
  int64_t splits = 1;
  int64_t chunk = 1;  // keys per split, a multiple of tile; splits == ceil(n / chunk)
};

// Number of KV splits of the split kernel, a pure function of the grid without splits
// (base_ctas = batch * kv heads * head chunks), the planned keys per row n, the kernel's tile,
// the SM count and the occupancy of the launched instance (max resident CTAs per SM), so that
// tools/emulate_decode_split.py can port it line by line. A wave is occupancy * sm_count CTAs:
// all the GPU holds at once. The rule:
//   1. bounds: at most ceil(n / max(kMinSplitKeys, tile)) splits (a shorter split is not worth
//      its merge) and kDecodeMaxSplits; top = the most splits the bounds allow once the chunk is
//      whole tiles. If top splits give at most one wave of CTAs, take top: every split we may
//      add fills a CTA slot that would otherwise idle (e.g. the length bound binds).
//   2. else the smallest reachable count `first` whose CTAs fill one whole wave: every SM then
//      holds as many CTAs as it can (a single long row keeps all SMs streaming K/V).
//   3. more splits shorten every CTA but may leave the last wave partly empty, which costs as
//      much time as a full one: the time of the grid is about waves * chunk, i.e. inversely
//      proportional to the fill base_ctas * r / (waves(r) * wave) of its waves. Among the
//      reachable counts in [first, min(top, 2 * first)] (at most twice the CTAs of `first`, so
//      the merge stays cheap) take the one with the fullest waves, the smaller on a tie. Within a
//      number of waves w the fill grows with r, so the candidates are only, for each w, the most
//      splits whose CTAs fit in w waves.
SplitChoice choose_splits(int64_t base_ctas, int64_t n, int tile, int sm_count, int occupancy) {
  const int64_t wave = int64_t(occupancy > 1 ? occupancy : 1) * (sm_count > 1 ? sm_count : 1);
  int64_t max_s = ceil_div64(n, kMinSplitKeys > tile ? kMinSplitKeys : tile);
  if (max_s > cuda::kDecodeMaxSplits) max_s = cuda::kDecodeMaxSplits;
  if (max_s < 1) max_s = 1;
  const int64_t top = real_splits(n, max_s, tile);
  int64_t best = top;
  if (base_ctas * top > wave) {
    const int64_t full = ceil_div64(wave, base_ctas);  // splits of one full wave (<= top)
    int64_t s = full;
    while (real_splits(n, s, tile) < full) ++s;  // stops at top at the latest
    const int64_t first = real_splits(n, s, tile);
    const int64_t cap = top < 2 * first ? top : 2 * first;
    auto waves = [&](int64_t r) { return ceil_div64(base_ctas * r, wave); };
    best = first;
    for (int64_t w = waves(first);;) {
      const int64_t fit = w * wave / base_ctas;  // most splits within w waves (>= first)
      const int64_t r = real_splits(n, fit < cap ? fit : cap, tile);
      if (r * waves(best) > best * waves(r)) best = r;  // fuller waves: r / waves(r) larger
      if (fit >= cap) break;
      w = waves(fit + 1);  // the next wave count with a new candidate (> w)
    }
  }
  SplitChoice c;
  c.chunk = split_chunk(n, best, tile);
  c.splits = ceil_div64(n, c.chunk);  // == best (a reachable count)
  return c;
}

// VATTN_LOG_DECODE_PLAN=1: every fast-path launch prints its plan to stderr (bench/gpu_check.sh).
bool log_plans() {
  static const bool on = [] {
    const char* v = std::getenv("VATTN_LOG_DECODE_PLAN");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return on;
}

// Real occupancy of the split-kernel instance launch_split will launch for p and group_block.
int split_occupancy(const AttentionParams& p, int group_block) {
  switch (p.head_dim) {
    case 64: return cuda::decode_split_occupancy_hd64(p, group_block);
    case 96: return cuda::decode_split_occupancy_hd96(p, group_block);
    case 128: return cuda::decode_split_occupancy_hd128(p, group_block);
    case 256: return cuda::decode_split_occupancy_hd256(p, group_block);
    default: throw std::logic_error("decode_attention: no split kernel for this head_dim");
  }
}

// The one plan of a call: validates p, then (fast path) splits from the host's length hint, the
// SM count and the real occupancy of the instance to launch (choose_splits: whole waves of CTAs,
// no split shorter than kMinSplitKeys, each split a whole number of tiles). The kernel
// re-derives the real split ranges from the device lengths, so a longer row is still covered
// completely. decode_workspace_bytes() sizes the workspace from this same plan.
DecodePlan make_plan(const AttentionParams& p) {
  validate(p);
  DecodePlan pl;
  // Logits go to the log2 domain through q: scale*log2(e). With a soft-cap the natural-domain
  // value softcap*tanh(scale*q.k/softcap) is needed first, so q carries scale/softcap and the
  // kernel multiplies tanh(.) by softcap*log2(e).
  if (p.softcap > 0.f) {
    pl.args.q_scale = p.scale / p.softcap;
    pl.args.cap2 = p.softcap * kLog2e;
  } else {
    pl.args.q_scale = p.scale * kLog2e;
    pl.args.cap2 = 0.f;
  }
  if (p.batch == 0 || !fast_supported(p)) return pl;
  pl.fast = true;
  const int group = p.num_q_heads / p.num_kv_heads;
  pl.group_block = group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8;
  const int max_gb = split_max_group_block(p);
  if (pl.group_block > max_gb) pl.group_block = max_gb;
  pl.args.head_chunks = int(ceil_div64(group, pl.group_block));
  if (int64_t(p.num_kv_heads) * pl.args.head_chunks > kMaxGridYZ) bad("too many kv heads for one grid");
  const int tile = split_tile(p);

  int64_t n = p.max_seqlen_k > 0 ? p.max_seqlen_k : p.kv.max_seq;
  if (n > p.kv.max_seq) n = p.kv.max_seq;
  if (p.window_left >= 0 && n > int64_t(p.window_left) + 1) n = int64_t(p.window_left) + 1;
  if (n < 1) n = 1;

  const int64_t base_ctas = int64_t(p.batch) * p.num_kv_heads * pl.args.head_chunks;
  pl.sm_count = current_device_sm_count();
  pl.occupancy = split_occupancy(p, pl.group_block);
  const SplitChoice c = choose_splits(base_ctas, n, tile, pl.sm_count, pl.occupancy);
  const int64_t splits = c.splits;
  pl.num_splits = int(splits);
  pl.args.chunk_host = int(c.chunk);
  if (pl.num_splits > 1) {
    const int64_t states = splits * p.batch * p.num_q_heads;
    pl.lse_offset = ceil_div64(states * p.head_dim * int64_t(sizeof(float)), 256) * 256;
    pl.bytes = pl.lse_offset + states * int64_t(sizeof(float));
  }
  return pl;
}

void launch_plain(const AttentionParams& p, const DecodePlanArgs& a) {
  const dim3 grid(unsigned(p.num_q_heads), unsigned(p.batch));
  cudaStream_t s = as_stream(p.stream);
  const int t = cuda::kPlainDecodeThreads;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using Q = decltype(tag);
    cuda::dispatch_attention_kv_pair<Q>(p.kv.k_format, p.kv.v_format, "decode_attention", [&](auto kf, auto vf) {
      cuda::decode_plain_kernel<Q, decltype(kf), decltype(vf)><<<grid, t, 0, s>>>(p, a);
    });
  });
  cuda_check_launch("decode_plain_kernel");
}

void launch_split(const AttentionParams& p, const DecodePlan& pl, const DecodePlanArgs& a) {
  switch (p.head_dim) {
    case 64: cuda::launch_decode_split_hd64(p, a, pl.group_block, pl.num_splits); break;
    case 96: cuda::launch_decode_split_hd96(p, a, pl.group_block, pl.num_splits); break;
    case 128: cuda::launch_decode_split_hd128(p, a, pl.group_block, pl.num_splits); break;
    case 256: cuda::launch_decode_split_hd256(p, a, pl.group_block, pl.num_splits); break;
    default: throw std::logic_error("decode_attention: no split kernel for this head_dim");
  }
  if (pl.num_splits > 1) {
    const dim3 grid(unsigned(p.num_q_heads), unsigned(p.batch));
    cudaStream_t s = as_stream(p.stream);
    if (p.dtype == kBFloat16) {
      cuda::decode_split_merge_kernel<bf16_t><<<grid, 128, 0, s>>>(p, a, pl.num_splits);
    } else {
      cuda::decode_split_merge_kernel<f16_t><<<grid, 128, 0, s>>>(p, a, pl.num_splits);
    }
    cuda_check_launch("decode_split_merge_kernel");
  }
}

}  // namespace

int64_t decode_workspace_bytes(const AttentionParams& p) { return make_plan(p).bytes; }

void decode_attention_cuda(const AttentionParams& p) {
  const DecodePlan pl = make_plan(p);  // validates p; the one plan of this call
  if (p.batch == 0) return;
  validate_attention_scores(p);  // before anything is launched
  if (!pl.fast) {
    launch_plain(p, pl.args);
    return launch_attention_scores(p);
  }
  if (log_plans()) {
    const int64_t ctas = int64_t(pl.num_splits) * p.batch * p.num_kv_heads * pl.args.head_chunks;
    const int64_t wave = int64_t(pl.occupancy) * pl.sm_count;
    const int64_t waves = ceil_div64(ctas, wave);
    std::fprintf(stderr,
                 "vattn decode plan: batch=%d q_heads=%d kv_heads=%d head_dim=%d max_seqlen_k=%lld "
                 "group_block=%d head_chunks=%d sms=%d occupancy=%d wave=%lld splits=%d chunk=%d ctas=%lld "
                 "waves=%lld fill=%.1f%%\n",
                 p.batch, p.num_q_heads, p.num_kv_heads, p.head_dim, (long long)p.max_seqlen_k, pl.group_block,
                 pl.args.head_chunks, pl.sm_count, pl.occupancy, (long long)wave, pl.num_splits, pl.args.chunk_host,
                 (long long)ctas, (long long)waves, 100.0 * double(ctas) / double(waves * wave));
  }
  DecodePlanArgs a = pl.args;
  if (pl.num_splits > 1) {
    if (p.workspace == nullptr || p.workspace_bytes < pl.bytes)
      bad("workspace too small: need " + std::to_string(pl.bytes) + " bytes (decode_workspace_bytes), got " +
          std::to_string(p.workspace == nullptr ? 0 : p.workspace_bytes));
    if (!cuda::is_aligned_16(p.workspace)) bad("workspace must be 16-byte aligned");
    a.o_part = static_cast<float*>(p.workspace);
    a.lse_part = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + pl.lse_offset);
  }
  launch_split(p, pl, a);
  launch_attention_scores(p);
}

}  // namespace vattn
