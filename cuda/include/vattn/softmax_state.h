#pragma once
// Online-softmax state and the merge of two states: the one exact building block that the
// CPU code, the decode kernels (per split, then across splits) and prefill all share.
// Logits are kept in the exp2 domain (logit * log2(e)); the exported LSE is in natural log.
#include <cmath>

#include "vattn/macros.h"

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
    if (m_new == -INFINITY) return 1.f;          // still nothing visible
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
  if (m == -INFINITY) { *w_a = 0.f; *w_b = 0.f; return -INFINITY; }
  const float ea = expf(lse_a - m), eb = expf(lse_b - m);
  const float s = ea + eb;
  *w_a = ea / s;
  *w_b = eb / s;
  return m + logf(s);
}

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
VATTN_HD float apply_softcap(float x, float softcap) {
  return softcap > 0.f ? softcap * softcap_tanh(x / softcap) : x;
}

}  // namespace vattn
