#pragma once
// Warp-level tensor-core primitives for the prefill kernel (sm_80+): ldmatrix and
// mma.sync.m16n8k16 with fp32 accumulation, for fp16 and bf16 operands.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"),
// with g = lane >> 2 (groupID) and t = lane & 3 (threadID_in_group):
//   A (16x16, row major), four 32-bit regs of two 16-bit elements (low half = lower column):
//     a[0]: row g,   cols 2t, 2t+1        a[1]: row g+8, cols 2t, 2t+1
//     a[2]: row g,   cols 2t+8, 2t+9      a[3]: row g+8, cols 2t+8, 2t+9
//   B (16x8, "col": element (k, n)), two regs:
//     b[0]: k = 2t, 2t+1, n = g           b[1]: k = 2t+8, 2t+9, n = g
//   C/D (16x8 fp32), four floats:
//     c[0], c[1]: row g, cols 2t, 2t+1    c[2], c[3]: row g+8, cols 2t, 2t+1
// ldmatrix.m8n8.x4: lanes 8i..8i+7 give the row addresses (16 contiguous bytes each) of
// matrix i, which lands in register i; each lane receives row g, elements 2t and 2t+1 of every
// matrix. With .trans it receives elements (rows 2t and 2t+1, column g) instead.
#include <cstdint>

#include "vattn/cuda/cp_async.cuh"
#include "vattn/dtypes.h"

namespace vattn {
namespace mma {

using cuda::smem_addr;  // shared-window address of a shared-memory pointer (cp_async.cuh)

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a * b for one 16x8x16 tile; T selects the operand type (f16_t or bf16_t).
template <typename T>
struct Mma16816;
#define VATTN_MMA16816(T, PTX_TYPE)                                                                               \
  template <>                                                                                                     \
  struct Mma16816<T> {                                                                                            \
    static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { \
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE                                 \
                   ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                       \
                   : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                               \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                               \
    }                                                                                                             \
  };
VATTN_MMA16816(f16_t, "f16")
VATTN_MMA16816(bf16_t, "bf16")
#undef VATTN_MMA16816

}  // namespace mma
}  // namespace vattn
