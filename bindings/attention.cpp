// Bindings of the attention op families: the parameter structs (pointers as integers) and the
// cpu / cuda entry points. Validation of tensors lives in python/vattn/ops.py; the C++ functions
// check what needs the data (indices, lengths) and throw, which pybind11 maps to
// ValueError (std::invalid_argument) / RuntimeError (std::runtime_error).
#include <cstdint>
#include <stdexcept>

#include "bindings.h"
#include "vattn/kv_format.h"
#include "vattn/ops.h"
#include "vattn/params.h"
#include "vattn/support.h"

namespace py = pybind11;

namespace vattn {
namespace {

using bindings::as_ptr;
using bindings::nogil;

// One-call constructors of the parameter structs, for the per-layer per-token hot path: filling a
// struct attribute by attribute from Python costs one pybind11 call per field (~30 for attention).
KVCacheView make_kv_view(uintptr_t k, uintptr_t v, int64_t k_stride_row, int64_t k_stride_tok, int64_t k_stride_head,
                         int64_t v_stride_row, int64_t v_stride_tok, int64_t v_stride_head, int32_t num_rows,
                         int32_t max_seq, int32_t k_format, int32_t v_format, uintptr_t k_scale, int64_t ks_stride_row,
                         int64_t ks_stride_tok, int64_t ks_stride_head, uintptr_t v_scale, int64_t vs_stride_row,
                         int64_t vs_stride_tok, int64_t vs_stride_head) {
  KVCacheView view;
  view.k = as_ptr<void>(k);
  view.v = as_ptr<void>(v);
  view.k_stride_row = k_stride_row;
  view.k_stride_tok = k_stride_tok;
  view.k_stride_head = k_stride_head;
  view.v_stride_row = v_stride_row;
  view.v_stride_tok = v_stride_tok;
  view.v_stride_head = v_stride_head;
  view.num_rows = num_rows;
  view.max_seq = max_seq;
  view.k_format = k_format;
  view.v_format = v_format;
  view.k_scale = as_ptr<float>(k_scale);
  view.v_scale = as_ptr<float>(v_scale);
  view.ks_stride_row = ks_stride_row;
  view.ks_stride_tok = ks_stride_tok;
  view.ks_stride_head = ks_stride_head;
  view.vs_stride_row = vs_stride_row;
  view.vs_stride_tok = vs_stride_tok;
  view.vs_stride_head = vs_stride_head;
  return view;
}

// The paged fields of a view (kv_paging.h) in one call: a block table [rows, blocks per row] int32
// with row stride bt_stride_row, blocks of block_size tokens, num_blocks physical blocks.
void set_kv_view_paging(KVCacheView& view, uintptr_t block_table, int64_t bt_stride_row, int32_t block_size,
                        int32_t num_blocks) {
  view.block_table = as_ptr<const int32_t>(block_table);
  view.bt_stride_row = bt_stride_row;
  view.block_size = block_size;
  view.num_blocks = num_blocks;
}

AppendParams make_append_params(const KVCacheView& cache, uintptr_t k, uintptr_t v, int64_t k_stride_tok,
                                int64_t k_stride_head, int64_t v_stride_tok, int64_t v_stride_head, uintptr_t row_ids,
                                uintptr_t positions, int32_t num_tokens, int32_t num_kv_heads, int32_t head_dim,
                                int32_t dtype, uintptr_t head_positions) {
  AppendParams p;
  p.cache = cache;
  p.k = as_ptr<const void>(k);
  p.v = as_ptr<const void>(v);
  p.k_stride_tok = k_stride_tok;
  p.k_stride_head = k_stride_head;
  p.v_stride_tok = v_stride_tok;
  p.v_stride_head = v_stride_head;
  p.row_ids = as_ptr<const int32_t>(row_ids);
  p.positions = as_ptr<const int32_t>(positions);
  p.head_positions = as_ptr<const int32_t>(head_positions);
  p.num_tokens = num_tokens;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.dtype = dtype;
  return p;
}

AttentionParams make_attention_params(uintptr_t q, int64_t q_stride_tok, int64_t q_stride_head, uintptr_t out,
                                      int64_t o_stride_tok, int64_t o_stride_head, uintptr_t lse, const KVCacheView& kv,
                                      uintptr_t cu_seqlens_q, uintptr_t seqlens_k, uintptr_t head_seqlens_k,
                                      uintptr_t row_ids, int32_t batch, int32_t num_q_heads, int32_t num_kv_heads,
                                      int32_t head_dim, int32_t total_q, int32_t max_seqlen_q, int32_t max_seqlen_k,
                                      float scale, float softcap, int32_t window_left, int32_t dtype, int32_t impl,
                                      uintptr_t scores, int64_t sc_stride_row, int64_t sc_stride_head,
                                      int32_t score_mode, int32_t score_last_queries) {
  AttentionParams p;
  p.q = as_ptr<const void>(q);
  p.q_stride_tok = q_stride_tok;
  p.q_stride_head = q_stride_head;
  p.out = as_ptr<void>(out);
  p.o_stride_tok = o_stride_tok;
  p.o_stride_head = o_stride_head;
  p.lse = as_ptr<float>(lse);
  p.kv = kv;
  p.cu_seqlens_q = as_ptr<const int32_t>(cu_seqlens_q);
  p.seqlens_k = as_ptr<const int32_t>(seqlens_k);
  p.head_seqlens_k = as_ptr<const int32_t>(head_seqlens_k);
  p.row_ids = as_ptr<const int32_t>(row_ids);
  p.batch = batch;
  p.num_q_heads = num_q_heads;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.total_q = total_q;
  p.max_seqlen_q = max_seqlen_q;
  p.max_seqlen_k = max_seqlen_k;
  p.scale = scale;
  p.softcap = softcap;
  p.window_left = window_left;
  p.dtype = dtype;
  p.impl = impl;
  p.scores = as_ptr<float>(scores);
  p.sc_stride_row = sc_stride_row;
  p.sc_stride_head = sc_stride_head;
  p.score_mode = score_mode;
  p.score_last_queries = score_last_queries;
  return p;
}

}  // namespace

// {"cpu": {"append_kv": {"dtypes": [codes], "kv_formats": [codes], "head_dim_multiple": n,
// "max_head_dim": n}, "decode": ..., "prefill": ..., "merge_states": ..., "compact_kv": ...},
// "cuda": {...}}
py::dict support_table() {
  const char* ops[support::kNumOps] = {"append_kv", "decode", "prefill", "merge_states", "compact_kv", "sparse_decode"};
  const char* devices[] = {"cpu", "cuda"};
  auto codes = [](uint32_t mask) {
    py::list l;
    for (int32_t c = 0; c < 32; ++c)
      if (mask & (1u << c)) l.append(c);
    return l;
  };
  py::dict table;
  for (int d = 0; d < 2; ++d) {
    py::dict per_op;
    for (int o = 0; o < support::kNumOps; ++o) {
      const support::Entry e = support::entry(support::Device(d), support::Op(o));
      py::dict x;
      x["dtypes"] = codes(e.dtypes);
      x["kv_formats"] = codes(e.kv_formats);
      x["head_dim_multiple"] = e.head_dim_multiple;
      x["max_head_dim"] = e.max_head_dim;
      per_op[ops[o]] = x;
    }
    table[devices[d]] = per_op;
  }
  return table;
}

// The C++ format traits (kv_format.h), for the test that keeps python/vattn/formats.py in step.
py::list kv_format_traits() {
  py::list out;
  for (int32_t code = 0; code < 32; ++code) {
    try {
      dispatch_kv_format(code, "kv_format_traits", [&](auto fmt) {
        using F = decltype(fmt);
        py::dict d;
        d["code"] = F::kCode;
        d["name"] = kv_format_name(code);
        d["storage_bytes"] = int(sizeof(typename F::storage_t));
        d["elems_per_storage"] = F::kElemsPerStorage;
        d["scale_words"] = F::kScaleWords;
        d["quantized"] = kv_format_is_quantized(code);
        out.append(d);
      });
    } catch (const std::invalid_argument&) {  // not a format code
    }
  }
  return out;
}

void bind_attention(py::module_& m) {
  m.def("kv_format_traits", &kv_format_traits, "The KV format traits of kv_format.h (code, name, sizes)");
  m.def("support_table", &support_table, "dtypes, KV formats and head dims each op runs per device (vattn/support.h)");
  py::class_<KVCacheView>(m, "KVCacheView", "Strided K and V caches [rows, seq, kv_heads, head_dim] (element strides)")
      .def(py::init<>())
      .VATTN_PTR(KVCacheView, k)
      .VATTN_PTR(KVCacheView, v)
      .VATTN_RW(KVCacheView, k_stride_row)
      .VATTN_RW(KVCacheView, k_stride_tok)
      .VATTN_RW(KVCacheView, k_stride_head)
      .VATTN_RW(KVCacheView, v_stride_row)
      .VATTN_RW(KVCacheView, v_stride_tok)
      .VATTN_RW(KVCacheView, v_stride_head)
      .VATTN_RW(KVCacheView, num_rows)
      .VATTN_RW(KVCacheView, max_seq)
      .VATTN_RW(KVCacheView, k_format)
      .VATTN_RW(KVCacheView, v_format)
      .VATTN_PTR(KVCacheView, k_scale)
      .VATTN_PTR(KVCacheView, v_scale)
      .VATTN_PTR(KVCacheView, block_table)
      .VATTN_RW(KVCacheView, bt_stride_row)
      .VATTN_RW(KVCacheView, block_size)
      .VATTN_RW(KVCacheView, num_blocks);

  py::class_<AppendParams>(m, "AppendParams", "Parameters of append_kv (see cuda/include/vattn/params.h)")
      .def(py::init<>())
      .VATTN_RW(AppendParams, cache)
      .VATTN_PTR(AppendParams, k)
      .VATTN_PTR(AppendParams, v)
      .VATTN_RW(AppendParams, k_stride_tok)
      .VATTN_RW(AppendParams, k_stride_head)
      .VATTN_RW(AppendParams, v_stride_tok)
      .VATTN_RW(AppendParams, v_stride_head)
      .VATTN_PTR(AppendParams, row_ids)
      .VATTN_PTR(AppendParams, positions)
      .VATTN_PTR(AppendParams, head_positions)
      .VATTN_RW(AppendParams, num_tokens)
      .VATTN_RW(AppendParams, num_kv_heads)
      .VATTN_RW(AppendParams, head_dim)
      .VATTN_RW(AppendParams, dtype)
      .VATTN_PTR(AppendParams, stream);

  py::class_<AttentionParams>(m, "AttentionParams", "Parameters of decode / prefill attention (see params.h)")
      .def(py::init<>())
      .VATTN_PTR(AttentionParams, q)
      .VATTN_RW(AttentionParams, q_stride_tok)
      .VATTN_RW(AttentionParams, q_stride_head)
      .VATTN_PTR(AttentionParams, out)
      .VATTN_RW(AttentionParams, o_stride_tok)
      .VATTN_RW(AttentionParams, o_stride_head)
      .VATTN_PTR(AttentionParams, lse)
      .VATTN_RW(AttentionParams, kv)
      .VATTN_PTR(AttentionParams, cu_seqlens_q)
      .VATTN_PTR(AttentionParams, seqlens_k)
      .VATTN_PTR(AttentionParams, head_seqlens_k)
      .VATTN_PTR(AttentionParams, row_ids)
      .VATTN_RW(AttentionParams, batch)
      .VATTN_RW(AttentionParams, num_q_heads)
      .VATTN_RW(AttentionParams, num_kv_heads)
      .VATTN_RW(AttentionParams, head_dim)
      .VATTN_RW(AttentionParams, total_q)
      .VATTN_RW(AttentionParams, max_seqlen_q)
      .VATTN_RW(AttentionParams, max_seqlen_k)
      .VATTN_RW(AttentionParams, scale)
      .VATTN_RW(AttentionParams, softcap)
      .VATTN_RW(AttentionParams, window_left)
      .VATTN_RW(AttentionParams, dtype)
      .VATTN_RW(AttentionParams, impl)
      .VATTN_PTR(AttentionParams, scores)
      .VATTN_RW(AttentionParams, sc_stride_row)
      .VATTN_RW(AttentionParams, sc_stride_head)
      .VATTN_RW(AttentionParams, score_mode)
      .VATTN_RW(AttentionParams, score_last_queries)
      .VATTN_PTR(AttentionParams, workspace)
      .VATTN_RW(AttentionParams, workspace_bytes)
      .VATTN_PTR(AttentionParams, stream);

  py::class_<MergeParams>(m, "MergeParams", "Parameters of merge_states (see params.h)")
      .def(py::init<>())
      .VATTN_PTR(MergeParams, o_a)
      .VATTN_PTR(MergeParams, lse_a)
      .VATTN_PTR(MergeParams, o_b)
      .VATTN_PTR(MergeParams, lse_b)
      .VATTN_PTR(MergeParams, out)
      .VATTN_PTR(MergeParams, lse_out)
      .VATTN_RW(MergeParams, n)
      .VATTN_RW(MergeParams, num_heads)
      .VATTN_RW(MergeParams, head_dim)
      .VATTN_RW(MergeParams, dtype)
      .VATTN_PTR(MergeParams, stream);

  // Positional only: these run per layer per token, keyword matching would cost more than the call.
  m.def("make_kv_view", &make_kv_view,
        "KVCacheView(k, v, k_stride_row, k_stride_tok, k_stride_head, v_stride_row, v_stride_tok, v_stride_head, "
        "num_rows, max_seq, k_format, v_format, k_scale, ks_stride_row, ks_stride_tok, ks_stride_head, v_scale, "
        "vs_stride_row, vs_stride_tok, vs_stride_head) in one call (scale pointers 0 for plain formats)");
  m.def("set_kv_view_paging", &set_kv_view_paging,
        "Sets a KVCacheView's paged fields (block_table, bt_stride_row, block_size, num_blocks) in one call");
  m.def("make_append_params", &make_append_params,
        "AppendParams(cache, k, v, k_stride_tok, k_stride_head, v_stride_tok, v_stride_head, row_ids, positions, "
        "num_tokens, num_kv_heads, head_dim, dtype, head_positions) in one call (head_positions 0: none; stream left "
        "null)");
  m.def("make_attention_params", &make_attention_params,
        "AttentionParams(q, q_stride_tok, q_stride_head, out, o_stride_tok, o_stride_head, lse, kv, cu_seqlens_q, "
        "seqlens_k, head_seqlens_k, row_ids, batch, num_q_heads, num_kv_heads, head_dim, total_q, max_seqlen_q, "
        "max_seqlen_k, scale, softcap, window_left, dtype, impl, scores, sc_stride_row, sc_stride_head, score_mode, "
        "score_last_queries) in one call (workspace and stream left null; scores 0 and score_mode 0: no scores)");

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
