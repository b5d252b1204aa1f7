#pragma once
// The inner loops of CPU attention, on fp32 tiles. They are compiled once per instruction set
// (plain x86-64 and AVX2+FMA, picked at load time) because the wheel is built without -march.
#include <cstdint>

namespace vattn {
namespace cpu {

// s[i * lds + j] = dot(q[i], k[j]) for i < nq, j < nk; q rows are contiguous [nq][dim],
// k row j starts at k + j * k_stride.
// nk_avail >= nk: rows readable from k (the walk goes on past this block), for prefetching.
void qk_block(const float* q, int nq, const float* k, int64_t k_stride, int nk, int nk_avail, int dim, float* s, int lds);

// acc[i][:] += sum_j p[i * ldp + j] * v[j][:]; zero weights are skipped (masked keys may hold NaN
// in a converted buffer only if the cache does, and never past a length: those are not read).
void pv_block(const float* p, int ldp, int nq, const float* v, int64_t v_stride, int nk, int nk_avail, int dim,
              float* acc);

// dst[j][:] = fp32 of n rows of dim 16-bit values (IEEE half or bfloat16) starting every
// `stride` elements; dst rows are contiguous.
void f16_rows_to_float(const uint16_t* src, int64_t stride, int n, int n_avail, int dim, float* dst);
void bf16_rows_to_float(const uint16_t* src, int64_t stride, int n, int n_avail, int dim, float* dst);

// Max of s[a:e).
float max_of(const float* s, int a, int e);
// Softmax weights of one row of a block in the exp2 domain: s[j] = 2^(s[j] - m) for j in [a, e),
// 0 for the other j < n (masked keys); returns the sum of the weights. Requires s[j] <= m.
float exp2_weights(float* s, int n, int a, int e, float m);

// How far ahead (in rows) the loops prefetch.
constexpr int kPrefetchRows = 6;

}  // namespace cpu
}  // namespace vattn
