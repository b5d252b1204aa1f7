// merge_states on CUDA: out = w_a * o_a + w_b * o_b with (w_a, w_b, lse) from
// vattn::merge_weights (exact, -inf safe; the same function the CPU code uses). A state with
// zero weight is never read into the sum, so an empty state's output cannot inject NaN.
// One thread handles 8 consecutive elements of one (token, head) vector with 16-byte loads
// when everything is 16-byte aligned, else one element.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "vattn/cuda/check.cuh"
#include "vattn/cuda/vec.cuh"
#include "vattn/dtypes.h"
#include "vattn/ops.h"
#include "vattn/softmax_state.h"

namespace vattn {
namespace {

using cuda::chunk_to_float;
using cuda::elem_to_float;
using cuda::float_to_chunk;
using cuda::float_to_elem;

template <typename T, int VE>
__device__ __forceinline__ void load_vec(const T* p, float (&x)[VE]) {
  if constexpr (VE == 8 && sizeof(T) == 2) {
    chunk_to_float<T>(cuda::ld_global_16(p), x);
  } else {
#pragma unroll
    for (int i = 0; i < VE; ++i) x[i] = elem_to_float(p[i]);
  }
}

template <typename T, int VE>
__device__ __forceinline__ void store_vec(T* p, const float (&x)[VE]) {
  if constexpr (VE == 8 && sizeof(T) == 2) {
    cuda::st_global_16(p, float_to_chunk<T>(x));
  } else {
#pragma unroll
    for (int i = 0; i < VE; ++i) p[i] = float_to_elem<T>(x[i]);
  }
}

// VE elements per thread; head_dim % VE == 0 (host-checked).
template <typename T, int VE>
__global__ void merge_states_kernel(const T* __restrict__ o_a, const float* __restrict__ lse_a,
                                    const T* __restrict__ o_b, const float* __restrict__ lse_b, T* __restrict__ out,
                                    float* __restrict__ lse_out, int64_t num_vecs, int32_t head_dim) {
  const int32_t per_vec = head_dim / VE;
  const int64_t total = num_vecs * per_vec;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t vec = idx / per_vec;  // token * num_heads + head
    const int64_t off = vec * head_dim + (idx - vec * per_vec) * VE;
    float wa, wb;
    const float lse = merge_weights(lse_a[vec], lse_b[vec], &wa, &wb);
    float acc[VE];
#pragma unroll
    for (int i = 0; i < VE; ++i) acc[i] = 0.f;
    if (wa > 0.f) {
      float x[VE];
      load_vec<T, VE>(o_a + off, x);
#pragma unroll
      for (int i = 0; i < VE; ++i) acc[i] = wa * x[i];
    }
    if (wb > 0.f) {
      float x[VE];
      load_vec<T, VE>(o_b + off, x);
#pragma unroll
      for (int i = 0; i < VE; ++i) acc[i] = fmaf(wb, x[i], acc[i]);
    }
    store_vec<T, VE>(out + off, acc);
    if (lse_out != nullptr && off == vec * head_dim) lse_out[vec] = lse;
  }
}

template <typename T>
void launch(const MergeParams& p) {
  const int64_t num_vecs = p.n * p.num_heads;
  const bool vec8 = sizeof(T) == 2 && p.head_dim % 8 == 0 && cuda::is_aligned_16(p.o_a) && cuda::is_aligned_16(p.o_b) &&
                    cuda::is_aligned_16(p.out);
  const int ve = vec8 ? 8 : 1;
  const int64_t total = num_vecs * (p.head_dim / ve);
  const int threads = 256;
  const int64_t need = (total + threads - 1) / threads;
  const int blocks = int(need < 65535 * 8 ? need : 65535 * 8);
  cudaStream_t s = as_stream(p.stream);
  const T* a = static_cast<const T*>(p.o_a);
  const T* b = static_cast<const T*>(p.o_b);
  T* o = static_cast<T*>(p.out);
  if constexpr (sizeof(T) == 2) {
    if (vec8) {
      merge_states_kernel<T, 8><<<blocks, threads, 0, s>>>(a, p.lse_a, b, p.lse_b, o, p.lse_out, num_vecs, p.head_dim);
      return cuda_check_launch("merge_states_kernel");
    }
  }
  { merge_states_kernel<T, 1><<<blocks, threads, 0, s>>>(a, p.lse_a, b, p.lse_b, o, p.lse_out, num_vecs, p.head_dim); }
  cuda_check_launch("merge_states_kernel");
}

}  // namespace

void merge_states_cuda(const MergeParams& p) {
  if (p.n < 0 || p.num_heads <= 0 || p.head_dim <= 0)
    throw std::invalid_argument("merge_states: n must be >= 0, num_heads and head_dim > 0");
  if (p.n == 0) return;
  if (!p.o_a || !p.lse_a || !p.o_b || !p.lse_b || !p.out)
    throw std::invalid_argument("merge_states: null pointer (o_a, lse_a, o_b, lse_b and out are required)");
  switch (p.dtype) {
    case kFloat16: return launch<f16_t>(p);
    case kBFloat16: return launch<bf16_t>(p);
    case kFloat32: return launch<float>(p);
    default:
      throw std::invalid_argument("merge_states: dtype must be float16, bfloat16 or float32 (code " +
                                  std::to_string(p.dtype) + ")");
  }
}

}  // namespace vattn
