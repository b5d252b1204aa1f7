#pragma once
// The op families and their backends (bitsandbytes style: one op, a cpu and a cuda version).
// Every function throws std::invalid_argument / std::runtime_error on bad parameters or a
// failed launch; the bindings turn those into Python ValueError / RuntimeError.
#include <cstdint>

#include "vattn/params.h"

namespace vattn {

void append_kv_cpu(const AppendParams& p);
void decode_attention_cpu(const AttentionParams& p);
void prefill_attention_cpu(const AttentionParams& p);
void merge_states_cpu(const MergeParams& p);
void compact_kv_cpu(const CompactParams& p);
void block_minmax_cpu(const BlockMinmaxParams& p);
void quest_select_cpu(const QuestSelectParams& p);
void sparse_decode_attention_cpu(const SparseDecodeParams& p);

#if defined(VATTN_WITH_CUDA)
void append_kv_cuda(const AppendParams& p);
// Bytes of scratch decode_attention_cuda needs for these parameters (split-KV partials).
int64_t decode_workspace_bytes(const AttentionParams& p);
void decode_attention_cuda(const AttentionParams& p);
void prefill_attention_cuda(const AttentionParams& p);
void merge_states_cuda(const MergeParams& p);
// Bytes of scratch compact_kv_cuda needs for these parameters (the gathered records).
int64_t compact_workspace_bytes(const CompactParams& p);
void compact_kv_cuda(const CompactParams& p);
void block_minmax_cuda(const BlockMinmaxParams& p);
// Bytes of scratch quest_select_cuda needs for these parameters (the block scores).
int64_t quest_select_workspace_bytes(const QuestSelectParams& p);
void quest_select_cuda(const QuestSelectParams& p);
// Bytes of scratch sparse_decode_attention_cuda needs for these parameters (split-KV partials).
int64_t sparse_decode_workspace_bytes(const SparseDecodeParams& p);
void sparse_decode_attention_cuda(const SparseDecodeParams& p);
#endif

}  // namespace vattn
