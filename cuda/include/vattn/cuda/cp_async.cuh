#pragma once
// cp.async (sm_80+) global -> shared copies of 16 bytes, for multi-stage pipelines; the one
// cp.async wrapper of vattn (split decode and the tensor-core prefill both use it). Shared
// memory is named either by a generic pointer or by its 32-bit shared-window address (what
// smem_addr returns; the form ldmatrix and the swizzled prefill tiles compute with).
// Usage: issue copies, cp_async_commit() once per stage (also when a stage issues nothing,
// so group counting stays uniform), cp_async_wait<N>() leaves at most N newest groups in
// flight, then __syncthreads() before other threads read the data.
// Every asm carries a "memory" clobber so the compiler never moves shared-memory reads
// across a wait.
// On architectures below sm_80 (never built by default) the copies fall back to plain
// synchronous loads so the code still compiles and stays correct.
#include <cuda_runtime.h>

#include <cstdint>

namespace vattn {
namespace cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte copy, L1 bypassed (streamed data, read once). Both pointers 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
#else
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}

// Same, with the destination as a shared-window address (smem_addr).
__device__ __forceinline__ void cp_async_16(uint32_t smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(gmem) : "memory");
#else
  const uint4 v = *reinterpret_cast<const uint4*>(gmem);
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(smem), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
#endif
}

// Plain (synchronous) store of 16 zero bytes at a shared-window address: fills the tile slots
// a loader must not read from global memory. Ordered with the copies by the same wait +
// __syncthreads that publishes them.
__device__ __forceinline__ void st_shared_zero_16(uint32_t smem) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(smem), "r"(0) : "memory");
}

// A 16-byte-aligned global address that is always mapped: the source to give a zero-filling
// copy that reads nothing (src-size 0). A cache address (say slot 0, token 0 of a vattn.KVCache
// view) may be unmapped virtual memory; this static buffer never is. One copy per translation
// unit (internal linkage), so no device symbol is shared across them.
static __device__ __align__(16) unsigned char cp_async_zero_src_[16];
__device__ __forceinline__ const void* cp_async_zero_src() { return cp_async_zero_src_; }

// 16-byte copy when valid, else writes 16 zero bytes to smem and reads nothing from gmem
// (src-size 0). gmem must still be a mapped address: pass cp_async_zero_src() when not valid.
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
#else
  *reinterpret_cast<uint4*>(smem) = valid ? *reinterpret_cast<const uint4*>(gmem) : make_uint4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

}  // namespace cuda
}  // namespace vattn
