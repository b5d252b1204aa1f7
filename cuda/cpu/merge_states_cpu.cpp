// CPU merge of two attention states (o, lse) over disjoint key sets, via merge_weights and
// merge_vectors (softmax_state.h).
#include <cmath>

#include "cpu_util.h"
#include "vattn/ops.h"
#include "vattn/softmax_state.h"

namespace vattn {
namespace {

template <typename T>
void merge_impl(const MergeParams& p) {
  const int64_t rows = p.n * p.num_heads;
  const int dim = p.head_dim;
  const T* oa = static_cast<const T*>(p.o_a);
  const T* ob = static_cast<const T*>(p.o_b);
  T* out = static_cast<T*>(p.out);
#pragma omp parallel for schedule(static) if (rows * dim > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    float wa, wb;
    const float lse = merge_weights(p.lse_a[r], p.lse_b[r], &wa, &wb);
    // A zero weight also silences whatever an empty state's output holds (even NaN).
    merge_vectors(wa, oa + r * dim, wb, ob + r * dim, out + r * dim, dim);
    if (p.lse_out) p.lse_out[r] = lse;
  }
}

}  // namespace

void merge_states_cpu(const MergeParams& p) {
  cpu::require(p.n >= 0 && p.num_heads >= 0 && p.head_dim >= 0, "merge_states: negative size");
  if (p.n == 0 || p.num_heads == 0) return;
  cpu::require(p.o_a && p.lse_a && p.o_b && p.lse_b && p.out, "merge_states: null pointer in the parameters");
  cpu::dispatch_dtype(p.dtype, "merge_states", [&](auto t) { merge_impl<decltype(t)>(p); });
}

}  // namespace vattn
