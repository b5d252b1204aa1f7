// Bindings of the attention op families: the parameter structs (pointers as integers) and the
// cpu / cuda entry points. Validation of tensors lives in python/vattn/ops.py; the C++ functions
// check what needs the data (indices, lengths) and throw, which pybind11 maps to
// ValueError (std::invalid_argument) / RuntimeError (std::runtime_error).
#include <cstdint>

#include "bindings.h"
#include "vattn/ops.h"
#include "vattn/params.h"

namespace py = pybind11;

namespace vattn {
namespace {

// A pointer field as a Python int property.
#define VATTN_PTR(Cls, field)                                                                            \
  def_property(                                                                                          \
      #field, [](const Cls& s) { return reinterpret_cast<uintptr_t>(s.field); },                        \
      [](Cls& s, uintptr_t v) { s.field = reinterpret_cast<decltype(Cls::field)>(v); })
#define VATTN_RW(Cls, field) def_readwrite(#field, &Cls::field)

// The compute functions run without the GIL so other Python threads can go on.
using nogil = py::call_guard<py::gil_scoped_release>;

}  // namespace

void bind_attention(py::module_& m) {
  py::class_<KVCacheView>(m, "KVCacheView", "Strided K and V caches [rows, seq, kv_heads, head_dim] (element strides)")
      .def(py::init<>())
      .VATTN_PTR(KVCacheView, k)
      .VATTN_PTR(KVCacheView, v)
      .VATTN_RW(KVCacheView, k_stride_row).VATTN_RW(KVCacheView, k_stride_tok).VATTN_RW(KVCacheView, k_stride_head)
      .VATTN_RW(KVCacheView, v_stride_row).VATTN_RW(KVCacheView, v_stride_tok).VATTN_RW(KVCacheView, v_stride_head)
      .VATTN_RW(KVCacheView, num_rows).VATTN_RW(KVCacheView, max_seq).VATTN_RW(KVCacheView, kv_dtype);

  py::class_<AppendParams>(m, "AppendParams", "Parameters of append_kv (see cuda/include/vattn/params.h)")
      .def(py::init<>())
      .VATTN_RW(AppendParams, cache)
      .VATTN_PTR(AppendParams, k)
      .VATTN_PTR(AppendParams, v)
      .VATTN_RW(AppendParams, k_stride_tok).VATTN_RW(AppendParams, k_stride_head)
      .VATTN_RW(AppendParams, v_stride_tok).VATTN_RW(AppendParams, v_stride_head)
      .VATTN_PTR(AppendParams, row_ids)
      .VATTN_PTR(AppendParams, positions)
      .VATTN_RW(AppendParams, num_tokens).VATTN_RW(AppendParams, num_kv_heads).VATTN_RW(AppendParams, head_dim)
      .VATTN_RW(AppendParams, dtype)
      .VATTN_PTR(AppendParams, stream);

  py::class_<AttentionParams>(m, "AttentionParams", "Parameters of decode / prefill attention (see params.h)")
      .def(py::init<>())
      .VATTN_PTR(AttentionParams, q)
      .VATTN_RW(AttentionParams, q_stride_tok).VATTN_RW(AttentionParams, q_stride_head)
      .VATTN_PTR(AttentionParams, out)
      .VATTN_RW(AttentionParams, o_stride_tok).VATTN_RW(AttentionParams, o_stride_head)
      .VATTN_PTR(AttentionParams, lse)
      .VATTN_RW(AttentionParams, kv)
      .VATTN_PTR(AttentionParams, cu_seqlens_q)
      .VATTN_PTR(AttentionParams, seqlens_k)
      .VATTN_PTR(AttentionParams, head_seqlens_k)
      .VATTN_PTR(AttentionParams, row_ids)
      .VATTN_RW(AttentionParams, batch).VATTN_RW(AttentionParams, num_q_heads).VATTN_RW(AttentionParams, num_kv_heads)
      .VATTN_RW(AttentionParams, head_dim).VATTN_RW(AttentionParams, total_q)
      .VATTN_RW(AttentionParams, max_seqlen_q).VATTN_RW(AttentionParams, max_seqlen_k)
      .VATTN_RW(AttentionParams, scale).VATTN_RW(AttentionParams, softcap).VATTN_RW(AttentionParams, window_left)
      .VATTN_RW(AttentionParams, dtype).VATTN_RW(AttentionParams, impl)
      .VATTN_PTR(AttentionParams, workspace)
      .VATTN_RW(AttentionParams, workspace_bytes)
      .VATTN_PTR(AttentionParams, stream);

  py::class_<MergeParams>(m, "MergeParams", "Parameters of merge_states (see params.h)")
      .def(py::init<>())
      .VATTN_PTR(MergeParams, o_a).VATTN_PTR(MergeParams, lse_a)
      .VATTN_PTR(MergeParams, o_b).VATTN_PTR(MergeParams, lse_b)
      .VATTN_PTR(MergeParams, out).VATTN_PTR(MergeParams, lse_out)
      .VATTN_RW(MergeParams, n).VATTN_RW(MergeParams, num_heads).VATTN_RW(MergeParams, head_dim)
      .VATTN_RW(MergeParams, dtype)
      .VATTN_PTR(MergeParams, stream);

  m.def("append_kv_cpu", &append_kv_cpu, py::arg("params"), nogil(), "Write new K/V tokens into a CPU cache");
  m.def("decode_attention_cpu", &decode_attention_cpu, py::arg("params"), nogil(), "Decode attention on CPU");
  m.def("prefill_attention_cpu", &prefill_attention_cpu, py::arg("params"), nogil(), "Prefill attention on CPU");
  m.def("merge_states_cpu", &merge_states_cpu, py::arg("params"), nogil(), "Merge two attention states on CPU");
#if defined(VATTN_WITH_CUDA)
  m.def("append_kv_cuda", &append_kv_cuda, py::arg("params"), nogil(), "Write new K/V tokens into a CUDA cache");
  m.def("decode_workspace_bytes", &decode_workspace_bytes, py::arg("params"),
        "Scratch bytes decode_attention_cuda needs for these parameters");
  m.def("decode_attention_cuda", &decode_attention_cuda, py::arg("params"), nogil(), "Decode attention on CUDA");
  m.def("prefill_attention_cuda", &prefill_attention_cuda, py::arg("params"), nogil(), "Prefill attention on CUDA");
  m.def("merge_states_cuda", &merge_states_cuda, py::arg("params"), nogil(), "Merge two attention states on CUDA");
#endif
}

}  // namespace vattn
