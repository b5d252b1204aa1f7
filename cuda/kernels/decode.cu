// decode_attention on CUDA: validation, the split plan, and the launches.
//   impl 0: split-KV kernel (decode_split_kernel.cuh, instantiated per head dim in
//           decode_hd*.cu) + decode_split_merge_kernel when there is more than one split;
//           falls back to the plain kernel for head dims, dtypes or alignments it does not cover.
//   impl 1: the plain kernel (decode_plain_kernel.cuh).
// No host synchronization and no allocation: split partials live in the caller's workspace,
// sized by decode_workspace_bytes() with the same plan.
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "vattn/cuda/check.cuh"
#include "vattn/cuda/decode_args.cuh"
#include "vattn/cuda/decode_plain_kernel.cuh"
#include "vattn/cuda/vec.cuh"
#include "vattn/dtypes.h"
#include "vattn/kv_format.h"
#include "vattn/ops.h"
#include "vattn/softmax_state.h"

namespace vattn {
namespace cuda {

// Combines the split partials of decode_split_kernel: out = sum_s w_s o_s with
// w_s = exp(lse_s - M) / sum exp(lse_i - M) (vattn::merge_weights generalised to n states;
// empty splits have weight 0 and are never read). Grid (num_q_heads, batch).
template <typename T>
__global__ void __launch_bounds__(128) decode_split_merge_kernel(const DecodeKernelArgs a, int num_splits) {
  __shared__ float w_s[kDecodeMaxSplits];
  __shared__ float m_s;
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int64_t plane = int64_t(a.batch) * a.num_q_heads;  // one split's states
  const int64_t slot = int64_t(b) * a.num_q_heads + h;
  for (int s = tid; s < num_splits; s += blockDim.x) w_s[s] = a.lse_part[s * plane + slot];
  __syncthreads();
  if (tid == 0) {
    float M = -INFINITY;
    for (int s = 0; s < num_splits; ++s) M = fmaxf(M, w_s[s]);
    m_s = M;
  }
  __syncthreads();
  const float M = m_s;
  for (int s = tid; s < num_splits; s += blockDim.x) {
    const float l = w_s[s];
    w_s[s] = (M == -INFINITY || l == -INFINITY) ? 0.f : expf(l - M);
  }
  __syncthreads();
  float W = 0.f;
  for (int s = 0; s < num_splits; ++s) W += w_s[s];
  const float inv = W > 0.f ? 1.f / W : 0.f;
  T* op = static_cast<T*>(a.out) + int64_t(b) * a.o_stride_tok + int64_t(h) * a.o_stride_head;
  for (int d = tid; d < a.head_dim; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float w = w_s[s];
      if (w > 0.f) acc = fmaf(w, a.o_part[(s * plane + slot) * a.head_dim + d], acc);
    }
    op[d] = float_to_elem<T>(acc * inv);
  }
  if (a.lse != nullptr && tid == 0) a.lse[slot] = W > 0.f ? M + logf(W) : -INFINITY;
}

}  // namespace cuda

namespace {

using cuda::DecodeKernelArgs;

constexpr int kCtasPerSm = 4;        // split target: about this many CTAs per SM in the grid
constexpr int kMinSplitKeys = 256;   // a split smaller than this is not worth its merge
constexpr int kMaxGridYZ = 65535;

struct DecodePlan {
  bool fast = false;
  int group_block = 1;   // q heads per CTA
  int head_chunks = 1;   // CTAs per kv head
  int num_splits = 1;
  int chunk_host = 0;    // keys per split for the host's length hint (multiple of the tile)
  int64_t lse_offset = 0;   // byte offset of lse_part in the workspace
  int64_t bytes = 0;        // workspace bytes
};

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("decode_attention: " + msg); }

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
  if (p.kv.k_format != p.dtype || p.kv.v_format != p.dtype) bad("the K/V cache dtype must equal the q dtype (quantized formats come later)");
  if (p.kv.num_rows < 0 || p.kv.max_seq < 0) bad("cache num_rows and max_seq must be >= 0");
  if (!std::isfinite(p.scale)) bad("scale must be finite");
  if (!std::isfinite(p.softcap)) bad("softcap must be finite");
  if (p.impl != 0 && p.impl != 1) bad("impl must be 0 (fast) or 1 (plain)");
  if (p.batch == 0) return;
  if (!p.q || !p.out || !p.kv.k || !p.kv.v) bad("null q, out, k or v pointer");
  if (!p.seqlens_k && !p.head_seqlens_k) bad("seqlens_k (or head_seqlens_k) is required");
}

bool aligned_16(const void* ptr, int esize, std::initializer_list<int64_t> strides) {
  if (!cuda::is_aligned_16(ptr)) return false;
  for (int64_t s : strides)
    if ((s * esize) % 16 != 0) return false;
  return true;
}

// The split kernel covers 16-bit q/KV, its instantiated head dims, and 16-byte aligned q, K, V
// vectors (out and lse are written element by element, so they need no alignment).
bool fast_supported(const AttentionParams& p) {
  if (p.impl != 0) return false;
  if (p.dtype != kFloat16 && p.dtype != kBFloat16) return false;
  if (cuda::decode_split_tile(p.head_dim) == 0) return false;
  const int es = 2;
  return aligned_16(p.q, es, {p.q_stride_tok, p.q_stride_head}) &&
         aligned_16(p.kv.k, es, {p.kv.k_stride_row, p.kv.k_stride_tok, p.kv.k_stride_head}) &&
         aligned_16(p.kv.v, es, {p.kv.v_stride_row, p.kv.v_stride_tok, p.kv.v_stride_head});
}

int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splits from the host's length hint and the SM count: enough CTAs to fill the GPU, no split
// shorter than kMinSplitKeys, each split a whole number of tiles. The kernel re-derives the
// real split ranges from the device lengths, so a longer row is still covered completely.
DecodePlan make_plan(const AttentionParams& p) {
  DecodePlan pl;
  if (p.batch == 0 || !fast_supported(p)) return pl;
  pl.fast = true;
  const int group = p.num_q_heads / p.num_kv_heads;
  pl.group_block = group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8;
  pl.head_chunks = int(ceil_div64(group, pl.group_block));
  if (int64_t(p.num_kv_heads) * pl.head_chunks > kMaxGridYZ) bad("too many kv heads for one grid");
  const int tile = cuda::decode_split_tile(p.head_dim);

  int64_t n = p.max_seqlen_k > 0 ? p.max_seqlen_k : p.kv.max_seq;
  if (n > p.kv.max_seq) n = p.kv.max_seq;
  if (p.window_left >= 0 && n > int64_t(p.window_left) + 1) n = int64_t(p.window_left) + 1;
  if (n < 1) n = 1;

  const int64_t base_ctas = int64_t(p.batch) * p.num_kv_heads * pl.head_chunks;
  const int64_t target = int64_t(kCtasPerSm) * current_device_sm_count();
  int64_t splits = ceil_div64(target, base_ctas);
  const int64_t by_len = ceil_div64(n, kMinSplitKeys > tile ? kMinSplitKeys : tile);
  if (splits > by_len) splits = by_len;
  if (splits > cuda::kDecodeMaxSplits) splits = cuda::kDecodeMaxSplits;
  if (splits < 1) splits = 1;
  const int64_t chunk = ceil_div64(ceil_div64(n, splits), tile) * tile;
  splits = ceil_div64(n, chunk);  // no split left empty by the rounding
  pl.num_splits = int(splits);
  pl.chunk_host = int(chunk);
  if (pl.num_splits > 1) {
    const int64_t states = splits * p.batch * p.num_q_heads;
    pl.lse_offset = ceil_div64(states * p.head_dim * int64_t(sizeof(float)), 256) * 256;
    pl.bytes = pl.lse_offset + states * int64_t(sizeof(float));
  }
  return pl;
}

DecodeKernelArgs make_args(const AttentionParams& p) {
  DecodeKernelArgs a;
  a.q = p.q;
  a.q_stride_tok = p.q_stride_tok;
  a.q_stride_head = p.q_stride_head;
  a.out = p.out;
  a.o_stride_tok = p.o_stride_tok;
  a.o_stride_head = p.o_stride_head;
  a.lse = p.lse;
  a.k = p.kv.k;
  a.v = p.kv.v;
  a.k_stride_row = p.kv.k_stride_row;
  a.k_stride_tok = p.kv.k_stride_tok;
  a.k_stride_head = p.kv.k_stride_head;
  a.v_stride_row = p.kv.v_stride_row;
  a.v_stride_tok = p.kv.v_stride_tok;
  a.v_stride_head = p.kv.v_stride_head;
  a.num_rows = p.kv.num_rows;
  a.max_seq = p.kv.max_seq;
  a.seqlens_k = p.seqlens_k;
  a.head_seqlens_k = p.head_seqlens_k;
  a.row_ids = p.row_ids;
  a.batch = p.batch;
  a.num_q_heads = p.num_q_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.head_dim = p.head_dim;
  a.group = p.num_q_heads / p.num_kv_heads;
  // Logits go to the log2 domain through q: scale*log2(e). With a soft-cap the natural-domain
  // value softcap*tanh(scale*q.k/softcap) is needed first, so q carries scale/softcap and the
  // kernel multiplies tanh(.) by softcap*log2(e).
  if (p.softcap > 0.f) {
    a.q_scale = p.scale / p.softcap;
    a.cap2 = p.softcap * kLog2e;
  } else {
    a.q_scale = p.scale * kLog2e;
    a.cap2 = 0.f;
  }
  a.window_left = p.window_left;
  return a;
}

void launch_plain(const AttentionParams& p, const DecodeKernelArgs& a) {
  const dim3 grid(unsigned(p.num_q_heads), unsigned(p.batch));
  cudaStream_t s = as_stream(p.stream);
  const int t = cuda::kPlainDecodeThreads;
  switch (p.dtype) {
    case kFloat16: cuda::decode_plain_kernel<f16_t, PlainFormat<f16_t>><<<grid, t, 0, s>>>(a); break;
    case kBFloat16: cuda::decode_plain_kernel<bf16_t, PlainFormat<bf16_t>><<<grid, t, 0, s>>>(a); break;
    default: cuda::decode_plain_kernel<float, PlainFormat<float>><<<grid, t, 0, s>>>(a); break;
  }
  cuda_check_launch("decode_plain_kernel");
}

void launch_split(const AttentionParams& p, const DecodePlan& pl, const DecodeKernelArgs& a) {
  switch (p.head_dim) {
    case 64: cuda::launch_decode_split_hd64(a, pl.group_block, pl.num_splits, p.dtype, p.stream); break;
    case 96: cuda::launch_decode_split_hd96(a, pl.group_block, pl.num_splits, p.dtype, p.stream); break;
    case 128: cuda::launch_decode_split_hd128(a, pl.group_block, pl.num_splits, p.dtype, p.stream); break;
    case 256: cuda::launch_decode_split_hd256(a, pl.group_block, pl.num_splits, p.dtype, p.stream); break;
    default: throw std::logic_error("decode_attention: no split kernel for this head_dim");
  }
  if (pl.num_splits > 1) {
    const dim3 grid(unsigned(p.num_q_heads), unsigned(p.batch));
    cudaStream_t s = as_stream(p.stream);
    if (p.dtype == kBFloat16) {
      cuda::decode_split_merge_kernel<__nv_bfloat16><<<grid, 128, 0, s>>>(a, pl.num_splits);
    } else {
      cuda::decode_split_merge_kernel<half><<<grid, 128, 0, s>>>(a, pl.num_splits);
    }
    cuda_check_launch("decode_split_merge_kernel");
  }
}

}  // namespace

int64_t decode_workspace_bytes(const AttentionParams& p) {
  validate(p);
  return make_plan(p).bytes;
}

void decode_attention_cuda(const AttentionParams& p) {
  validate(p);
  if (p.batch == 0) return;
  const DecodePlan pl = make_plan(p);
  DecodeKernelArgs a = make_args(p);
  if (!pl.fast) return launch_plain(p, a);
  a.head_chunks = pl.head_chunks;
  a.chunk_host = pl.chunk_host;
  if (pl.num_splits > 1) {
    if (p.workspace == nullptr || p.workspace_bytes < pl.bytes)
      bad("workspace too small: need " + std::to_string(pl.bytes) + " bytes (decode_workspace_bytes), got " +
          std::to_string(p.workspace == nullptr ? 0 : p.workspace_bytes));
    if (!cuda::is_aligned_16(p.workspace)) bad("workspace must be 16-byte aligned");
    a.o_part = static_cast<float*>(p.workspace);
    a.lse_part = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + pl.lse_offset);
  }
  launch_split(p, pl, a);
}

}  // namespace vattn
