// Bindings of the Quest block-sparse decode ops (block_minmax, quest_select,
// sparse_decode_attention): their parameter structs (pointers as integers), one-call
// constructors and the cpu / cuda entry points. Tensor checks live in python/vattn/quest_ops.py;
// the C++ functions check what needs the data and throw, which pybind11 maps to ValueError
// (std::invalid_argument) / RuntimeError (std::runtime_error).
#include <cstdint>

#include "bindings.h"
#include "vattn/ops.h"
#include "vattn/params.h"

namespace py = pybind11;

namespace vattn {
namespace {

using bindings::as_ptr;
using bindings::nogil;

BlockMetaView make_block_meta(uintptr_t data, int64_t stride_row, int64_t stride_block, int64_t stride_head,
                              int64_t stride_side, int32_t num_rows, int32_t max_blocks) {
  BlockMetaView m;
  m.data = as_ptr<float>(data);
  m.stride_row = stride_row;
  m.stride_block = stride_block;
  m.stride_head = stride_head;
  m.stride_side = stride_side;
  m.num_rows = num_rows;
  m.max_blocks = max_blocks;
  return m;
}

BlockMinmaxParams make_block_minmax_params(const KVCacheView& cache, const BlockMetaView& meta, uintptr_t row_ids,
                                           uintptr_t lengths, uintptr_t head_lengths, uintptr_t first_block, int32_t n,
                                           int32_t num_kv_heads, int32_t head_dim, int32_t block) {
  BlockMinmaxParams p;
  p.cache = cache;
  p.meta = meta;
  p.row_ids = as_ptr<const int32_t>(row_ids);
  p.lengths = as_ptr<const int32_t>(lengths);
  p.head_lengths = as_ptr<const int32_t>(head_lengths);
  p.first_block = as_ptr<const int32_t>(first_block);
  p.n = n;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.block = block;
  return p;
}

QuestSelectParams make_quest_select_params(uintptr_t q, int64_t q_stride_tok, int64_t q_stride_head, int32_t dtype,
                                           const BlockMetaView& meta, uintptr_t row_ids, uintptr_t lengths,
                                           uintptr_t head_lengths, uintptr_t block_ids, uintptr_t block_counts,
                                           int32_t n, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
                                           int32_t block, int32_t token_budget, int32_t max_sel) {
  QuestSelectParams p;
  p.q = as_ptr<const void>(q);
  p.q_stride_tok = q_stride_tok;
  p.q_stride_head = q_stride_head;
  p.dtype = dtype;
  p.meta = meta;
  p.row_ids = as_ptr<const int32_t>(row_ids);
  p.lengths = as_ptr<const int32_t>(lengths);
  p.head_lengths = as_ptr<const int32_t>(head_lengths);
  p.block_ids = as_ptr<int32_t>(block_ids);
  p.block_counts = as_ptr<int32_t>(block_counts);
  p.n = n;
  p.num_q_heads = num_q_heads;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.block = block;
  p.token_budget = token_budget;
  p.max_sel = max_sel;
  return p;
}

SparseDecodeParams make_sparse_decode_params(const AttentionParams& attn, uintptr_t block_ids, uintptr_t block_counts,
                                             int32_t max_sel, int32_t block) {
  SparseDecodeParams p;
  p.attn = attn;
  p.block_ids = as_ptr<const int32_t>(block_ids);
  p.block_counts = as_ptr<const int32_t>(block_counts);
  p.max_sel = max_sel;
  p.block = block;
  return p;
}

}  // namespace

void bind_quest(py::module_& m) {
  py::class_<BlockMetaView>(m, "BlockMetaView", "Quest block metadata view (see cuda/include/vattn/params.h)")
      .def(py::init<>())
      .VATTN_PTR(BlockMetaView, data)
      .VATTN_RW(BlockMetaView, stride_row)
      .VATTN_RW(BlockMetaView, stride_block)
      .VATTN_RW(BlockMetaView, stride_head)
      .VATTN_RW(BlockMetaView, stride_side)
      .VATTN_RW(BlockMetaView, num_rows)
      .VATTN_RW(BlockMetaView, max_blocks);
  py::class_<BlockMinmaxParams>(m, "BlockMinmaxParams", "Parameters of block_minmax (see params.h)")
      .def(py::init<>())
      .VATTN_RW(BlockMinmaxParams, cache)
      .VATTN_RW(BlockMinmaxParams, meta)
      .VATTN_PTR(BlockMinmaxParams, row_ids)
      .VATTN_PTR(BlockMinmaxParams, lengths)
      .VATTN_PTR(BlockMinmaxParams, head_lengths)
      .VATTN_PTR(BlockMinmaxParams, first_block)
      .VATTN_RW(BlockMinmaxParams, n)
      .VATTN_RW(BlockMinmaxParams, num_kv_heads)
      .VATTN_RW(BlockMinmaxParams, head_dim)
      .VATTN_RW(BlockMinmaxParams, block)
      .VATTN_PTR(BlockMinmaxParams, stream);
  py::class_<QuestSelectParams>(m, "QuestSelectParams", "Parameters of quest_select (see params.h)")
      .def(py::init<>())
      .VATTN_PTR(QuestSelectParams, q)
      .VATTN_RW(QuestSelectParams, q_stride_tok)
      .VATTN_RW(QuestSelectParams, q_stride_head)
      .VATTN_RW(QuestSelectParams, dtype)
      .VATTN_RW(QuestSelectParams, meta)
      .VATTN_PTR(QuestSelectParams, row_ids)
      .VATTN_PTR(QuestSelectParams, lengths)
      .VATTN_PTR(QuestSelectParams, head_lengths)
      .VATTN_PTR(QuestSelectParams, block_ids)
      .VATTN_PTR(QuestSelectParams, block_counts)
      .VATTN_RW(QuestSelectParams, n)
      .VATTN_RW(QuestSelectParams, num_q_heads)
      .VATTN_RW(QuestSelectParams, num_kv_heads)
      .VATTN_RW(QuestSelectParams, head_dim)
      .VATTN_RW(QuestSelectParams, block)
      .VATTN_RW(QuestSelectParams, token_budget)
      .VATTN_RW(QuestSelectParams, max_sel)
      .VATTN_PTR(QuestSelectParams, workspace)
      .VATTN_RW(QuestSelectParams, workspace_bytes)
      .VATTN_PTR(QuestSelectParams, stream);
  py::class_<SparseDecodeParams>(m, "SparseDecodeParams", "Parameters of sparse_decode_attention (see params.h)")
      .def(py::init<>())
      .VATTN_RW(SparseDecodeParams, attn)
      .VATTN_PTR(SparseDecodeParams, block_ids)
      .VATTN_PTR(SparseDecodeParams, block_counts)
      .VATTN_RW(SparseDecodeParams, max_sel)
      .VATTN_RW(SparseDecodeParams, block);
  m.def("make_block_meta", &make_block_meta,
        "BlockMetaView(data, stride_row, stride_block, stride_head, stride_side, num_rows, max_blocks)");
  m.def("make_block_minmax_params", &make_block_minmax_params,
        "BlockMinmaxParams(cache, meta, row_ids, lengths, head_lengths, first_block, n, num_kv_heads, head_dim, "
        "block) in one call (0 for an absent pointer; stream left null)");
  m.def("make_quest_select_params", &make_quest_select_params,
        "QuestSelectParams(q, q_stride_tok, q_stride_head, dtype, meta, row_ids, lengths, head_lengths, block_ids, "
        "block_counts, n, num_q_heads, num_kv_heads, head_dim, block, token_budget, max_sel) in one call (workspace "
        "and stream left null)");
  m.def("make_sparse_decode_params", &make_sparse_decode_params,
        "SparseDecodeParams(attn, block_ids, block_counts, max_sel, block) in one call");
  m.def("block_minmax_cpu", &block_minmax_cpu, py::arg("params"), nogil(),
        "Recompute the per-block key min / max of a CPU cache");
  m.def("quest_select_cpu", &quest_select_cpu, py::arg("params"), nogil(),
        "Select the Quest blocks of each (row, kv head) on CPU");
  m.def("sparse_decode_attention_cpu", &sparse_decode_attention_cpu, py::arg("params"), nogil(),
        "Decode attention over the selected blocks of a CPU cache");
#if defined(VATTN_WITH_CUDA)
  m.def("block_minmax_cuda", &block_minmax_cuda, py::arg("params"), nogil(),
        "Recompute the per-block key min / max of a CUDA cache");
  m.def("quest_select_workspace_bytes", &quest_select_workspace_bytes, py::arg("params"),
        "Scratch bytes quest_select_cuda needs for these parameters");
  m.def("quest_select_cuda", &quest_select_cuda, py::arg("params"), nogil(),
        "Select the Quest blocks of each (row, kv head) on CUDA");
  m.def("sparse_decode_workspace_bytes", &sparse_decode_workspace_bytes, py::arg("params"),
        "Scratch bytes sparse_decode_attention_cuda needs for these parameters");
  m.def("sparse_decode_attention_cuda", &sparse_decode_attention_cuda, py::arg("params"), nogil(),
        "Decode attention over the selected blocks of a CUDA cache");
#endif
}

}  // namespace vattn
