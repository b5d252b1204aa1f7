#pragma once
// Online-softmax state and the merges of partial states over disjoint key sets: the one
// exact building block that the CPU code, the decode kernels (per split, then across splits),
// the merge kernels and prefill share (FlashInfer's state.cuh keeps o, m and d together too).
// Logits are kept in the exp2 domain (logit * log2(e)); the exported LSE is in natural log.
//
// Merges, by the form of the partials:
//   unnormalised (o, m, d), log2 domain, n at once   merge_partials + merge_output
//       (the plain decode kernel's warps, the split decode kernel's key groups)
//   normalised (o, lse), natural log, n at once      lse_weight + merge_output + merged_lse
//       (decode_split_merge_kernel across splits)
//   normalised (o, lse), two at a time               merge_weights + merge_pair / merge_vectors
//       (merge_states on CPU and CUDA, the CPU decode's split partials)
#include <cmath>
#include <cstdint>

#include "vattn/dtypes.h"
#include "vattn/macros.h"

#if defined(__CUDA_ARCH__)
#define VATTN_UNROLL _Pragma("unroll")
#else
#define VATTN_UNROLL
#endif

namespace vattn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct SoftmaxState {
  float m = -INFINITY;  // running max of the logits seen, log2 units
  float d = 0.f;        // sum of exp2(logit - m) over them

  // Moves the reference max to cover a new block whose max is block_max (log2 units).
  // Returns the factor the caller multiplies its accumulated output by (0 when nothing was
  // accumulated yet, so a -inf max never produces inf - inf = NaN).
  VATTN_HD float rescale_to(float block_max) {
    const float m_new = fmaxf(m, block_max);
    if (m_new == -INFINITY) return 1.f;  // still nothing visible
    const float f = (m == -INFINITY) ? 0.f : exp2f(m - m_new);
    d *= f;
    m = m_new;
    return f;
  }
  // Weight of one logit (log2 units) against the current max; m must be finite.
  VATTN_HD float weight(float logit2) const { return exp2f(logit2 - m); }
  VATTN_HD void add(float w) { d += w; }
  // 1/d, or 0 when no key was visible (the output is then all zeros).
  VATTN_HD float inv_sum() const { return d > 0.f ? 1.f / d : 0.f; }
  // Natural-log log-sum-exp of the logits seen; -inf when none.
  VATTN_HD float lse() const { return d > 0.f ? (m + log2f(d)) * kLn2 : -INFINITY; }
};

// Weights for merging two normalised partial outputs o = w_a * o_a + w_b * o_b, given their
// natural-log LSEs. Returns the merged LSE. Two empty states give w_a = w_b = 0, lse = -inf.
VATTN_HD float merge_weights(float lse_a, float lse_b, float* w_a, float* w_b) {
  const float m = fmaxf(lse_a, lse_b);
  if (m == -INFINITY) {
    *w_a = 0.f;
    *w_b = 0.f;
    return -INFINITY;
  }
  const float ea = expf(lse_a - m), eb = expf(lse_b - m);
  const float s = ea + eb;
  *w_a = ea / s;
  *w_b = eb / s;
  return m + logf(s);
}

// One output element of a pairwise merge: w_a * a + w_b * b, where a zero weight also silences
// whatever an empty state's output holds (even NaN).
VATTN_HD float merge_pair(float w_a, float a, float w_b, float b) {
  return (w_a > 0.f ? w_a * a : 0.f) + (w_b > 0.f ? w_b * b : 0.f);
}

// out[d] = merge_pair(w_a, a[d], w_b, b[d]) for d < dim, element types A, B, O of dtypes.h
// (float, f16_t, bf16_t); out may be a or b.
template <typename A, typename B, typename O>
VATTN_HD void merge_vectors(float w_a, const A* a, float w_b, const B* b, O* out, int dim) {
  for (int d = 0; d < dim; ++d) out[d] = from_float<O>(merge_pair(w_a, to_float(a[d]), w_b, to_float(b[d])));
}

// Merge of N unnormalised partial states (log2 units): partial k has max m_k = m[k * stride]
// and sum d_k = d[k * stride]. Returns the merged state (M, D) = (max_k m_k, sum_k d_k w_k) and
// sets w[k] = exp2(m_k - M), 0 for a partial that saw no key (so -inf - -inf never appears).
// The merged unnormalised output is merge_output(w, o_k...); then inv_sum() and lse() as usual.
template <int N>
VATTN_HD SoftmaxState merge_partials(const float* m, const float* d, int stride, float (&w)[N]) {
  SoftmaxState st;
  VATTN_UNROLL
  for (int k = 0; k < N; ++k) st.m = fmaxf(st.m, m[k * stride]);
  VATTN_UNROLL
  for (int k = 0; k < N; ++k) {
    const float mk = m[k * stride];
    w[k] = mk == -INFINITY ? 0.f : exp2f(mk - st.m);  // st.m is finite when any m_k is
    st.d = fmaf(d[k * stride], w[k], st.d);
  }
  return st;
}

// sum_k w[k] * o[k * stride] over the partials with w[k] > 0 (an empty or vanishing partial is
// never read). The first form for a fixed N (registers), the second for n weights in memory.
template <int N>
VATTN_HD float merge_output(const float (&w)[N], const float* o, int64_t stride) {
  float acc = 0.f;
  VATTN_UNROLL
  for (int k = 0; k < N; ++k)
    if (w[k] > 0.f) acc = fmaf(o[k * stride], w[k], acc);
  return acc;
}
VATTN_HD float merge_output(const float* w, int n, const float* o, int64_t stride) {
  float acc = 0.f;
  for (int k = 0; k < n; ++k)
    if (w[k] > 0.f) acc = fmaf(o[k * stride], w[k], acc);
  return acc;
}

// Unnormalised weight exp(lse_k - M) of a normalised partial against the common max M of the
// LSEs being merged (natural log); 0 for an empty partial or when all are empty.
VATTN_HD float lse_weight(float lse_k, float M) {
  return (M == -INFINITY || lse_k == -INFINITY) ? 0.f : expf(lse_k - M);
}
// LSE of the merge: M + log(W) for W = sum of the lse_weight values; -inf when W is 0.
VATTN_HD float merged_lse(float M, float W) { return W > 0.f ? M + logf(W) : -INFINITY; }

// tanh for the logit soft-cap. On the device not tanhf: under --use_fast_math that becomes
// tanh.approx (about 2^-11 relative error, ~0.025 on a logit capped at 50). This form has an
// absolute error of a few 1e-7; |x| >= 10 saturates (tanh(10) rounds to 1 in fp32), which also
// keeps exp() finite.
VATTN_HD float softcap_tanh(float x) {
#if defined(__CUDA_ARCH__)
  const float c = fminf(fmaxf(x, -10.f), 10.f);
  const float e = __expf(2.f * c);
  return 1.f - 2.f / (e + 1.f);
#else
  return std::tanh(x);
#endif
}

// Soft-cap of a logit: softcap * tanh(x / softcap); identity when softcap <= 0.
VATTN_HD float apply_softcap(float x, float softcap) { return softcap > 0.f ? softcap * softcap_tanh(x / softcap) : x; }

}  // namespace vattn
