// Bindings of the KV eviction ops: compact_kv's parameter struct (pointers as integers), its
// one-call constructor and the cpu / cuda entry points. Tensor checks live in
// python/vattn/sparse_ops.py; the C++ functions check what needs the data and throw, which
// pybind11 maps to ValueError (std::invalid_argument) / RuntimeError (std::runtime_error).
#include <cstdint>

#include "bindings.h"
#include "vattn/ops.h"
#include "vattn/params.h"

namespace py = pybind11;

namespace vattn {
namespace {

using bindings::as_ptr;
using bindings::nogil;

CompactParams make_compact_params(const KVCacheView& cache, uintptr_t row_ids, uintptr_t keep, uintptr_t keep_lens,
                                  uintptr_t scores, int64_t sc_stride_row, int64_t sc_stride_head,
                                  int64_t sc_stride_tok, int32_t n, int32_t num_kv_heads, int32_t max_keep,
                                  int32_t head_dim) {
  CompactParams p;
  p.cache = cache;
  p.row_ids = as_ptr<const int32_t>(row_ids);
  p.keep = as_ptr<const int32_t>(keep);
  p.keep_lens = as_ptr<const int32_t>(keep_lens);
  p.scores = as_ptr<float>(scores);
  p.sc_stride_row = sc_stride_row;
  p.sc_stride_head = sc_stride_head;
  p.sc_stride_tok = sc_stride_tok;
  p.n = n;
  p.num_kv_heads = num_kv_heads;
  p.max_keep = max_keep;
  p.head_dim = head_dim;
  return p;
}

}  // namespace

void bind_sparse(py::module_& m) {
  py::class_<CompactParams>(m, "CompactParams", "Parameters of compact_kv (see cuda/include/vattn/params.h)")
      .def(py::init<>())
      .VATTN_RW(CompactParams, cache)
      .VATTN_PTR(CompactParams, row_ids)
      .VATTN_PTR(CompactParams, keep)
      .VATTN_PTR(CompactParams, keep_lens)
      .VATTN_PTR(CompactParams, scores)
      .VATTN_RW(CompactParams, sc_stride_row)
      .VATTN_RW(CompactParams, sc_stride_head)
      .VATTN_RW(CompactParams, sc_stride_tok)
      .VATTN_RW(CompactParams, n)
      .VATTN_RW(CompactParams, num_kv_heads)
      .VATTN_RW(CompactParams, max_keep)
      .VATTN_RW(CompactParams, head_dim)
      .VATTN_PTR(CompactParams, workspace)
      .VATTN_RW(CompactParams, workspace_bytes)
      .VATTN_PTR(CompactParams, stream);
  m.def("make_compact_params", &make_compact_params,
        "CompactParams(cache, row_ids, keep, keep_lens, scores, sc_stride_row, sc_stride_head, sc_stride_tok, n, "
        "num_kv_heads, max_keep, head_dim) in one call (scores 0: none; workspace and stream left null)");
  m.def("compact_kv_cpu", &compact_kv_cpu, py::arg("params"), nogil(),
        "Move the kept tokens of each (row, kv head) of a CPU cache to the front, in order");
#if defined(VATTN_WITH_CUDA)
  m.def("compact_workspace_bytes", &compact_workspace_bytes, py::arg("params"),
        "Scratch bytes compact_kv_cuda needs for these parameters");
  m.def("compact_kv_cuda", &compact_kv_cuda, py::arg("params"), nogil(),
        "Move the kept tokens of each (row, kv head) of a CUDA cache to the front, in order");
#endif
}

}  // namespace vattn
