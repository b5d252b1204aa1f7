#pragma once
// Parameter structs of the op families, one per family (FlashAttention style). They hold raw
// pointers, sizes and element strides only, so the native module never sees a torch type.
// The Python layer (python/vattn/ops.py) validates tensors and fills these.
#include <cstdint>

namespace vattn {

// A strided cache [rows, seq, kv_heads, head_dim] for K and one for V; the last dimension is
// contiguous. Strides are in elements of each side's storage type (kv_format.h: a packed int4
// byte holds two head_dim elements). Quantized formats also carry per-vector scale words (fp32)
// with their own strides, in floats; plain formats leave them null. Both vattn.KVCache layouts
// and ordinary user tensors are described by this.
struct KVCacheView {
  void* k = nullptr;
  void* v = nullptr;
  int64_t k_stride_row = 0, k_stride_tok = 0, k_stride_head = 0;
  int64_t v_stride_row = 0, v_stride_tok = 0, v_stride_head = 0;
  float* k_scale = nullptr;  // [rows, seq, kv_heads, scale words of the format] or null
  float* v_scale = nullptr;  // (written by append_kv, read by attention)
  int64_t ks_stride_row = 0, ks_stride_tok = 0, ks_stride_head = 0;
  int64_t vs_stride_row = 0, vs_stride_tok = 0, vs_stride_head = 0;
  int32_t num_rows = 0;  // cache rows (slots)
  int32_t max_seq = 0;   // capacity in tokens per row
  int32_t k_format = 0;  // storage format codes (kv_format.h KvFormatCode), K and V apart
  int32_t v_format = 0;
  // Paged view (vLLM's block tables), or null for the contiguous view. When block_table is set,
  // the k / v / scale tensors are [num_blocks, block_size, kv_heads, ...] (the *_stride_row
  // strides step from one physical block to the next, *_stride_tok within a block) and token t
  // of cache row r lives in physical block block_table[r * bt_stride_row + t / block_size] at
  // offset t % block_size. num_rows is then the number of block-table rows and max_seq the
  // tokens a row can address (blocks per row x block_size). kv_paging.h is the one address rule.
  const int32_t* block_table = nullptr;
  int64_t bt_stride_row = 0;
  int32_t block_size = 0;  // tokens per block, > 0 when paged
  int32_t num_blocks = 0;  // physical blocks; ids outside [0, num_blocks) never address memory
};

// append_kv: write num_tokens new tokens into the cache at (row_ids[i], positions[i]).
struct AppendParams {
  KVCacheView cache;
  const void* k = nullptr;  // [num_tokens, num_kv_heads, head_dim]
  const void* v = nullptr;
  int64_t k_stride_tok = 0, k_stride_head = 0;
  int64_t v_stride_tok = 0, v_stride_head = 0;
  const int32_t* row_ids = nullptr;    // [num_tokens] cache row of each token
  const int32_t* positions = nullptr;  // [num_tokens] position inside the row
  // [num_tokens, num_kv_heads] contiguous, or null: when given, token i of kv head h goes to
  // position head_positions[i * num_kv_heads + h] (its scale words too) and positions is unused
  // (after eviction the heads of a row may hold different numbers of tokens).
  const int32_t* head_positions = nullptr;
  int32_t num_tokens = 0, num_kv_heads = 0, head_dim = 0;
  int32_t dtype = 0;       // dtype of k and v
  void* stream = nullptr;  // cudaStream_t on CUDA
};

// Attention over the cache, for decode (one query per batch row, cu_seqlens_q == nullptr) and
// prefill / chunked prefill (ragged queries given by cu_seqlens_q).
//
// Semantics (python/vattn/reference.py is the definition): batch row b reads cache row
// row_ids[b] (b when row_ids is null). Its kv length is L = seqlens_k[b], or
// head_seqlens_k[b * num_kv_heads + h] per kv head when that is given; the L tokens already
// include this step's new tokens. Row b has n_b = cu_seqlens_q[b+1] - cu_seqlens_q[b] queries
// (1 for decode); query i sits at position L - n_b + i and sees keys j with
// pos - window_left <= j <= pos (window_left < 0: no left bound). A query that sees no key
// gets a zero output and lse = -inf.
// Logits are scale * q.k, then softcap * tanh(logit / softcap) when softcap > 0.
struct AttentionParams {
  const void* q = nullptr;  // [total_q, num_q_heads, head_dim]
  int64_t q_stride_tok = 0, q_stride_head = 0;
  void* out = nullptr;  // [total_q, num_q_heads, head_dim], dtype of q
  int64_t o_stride_tok = 0, o_stride_head = 0;
  float* lse = nullptr;  // [total_q, num_q_heads] contiguous, natural log; optional
  KVCacheView kv;
  const int32_t* cu_seqlens_q = nullptr;    // [batch + 1]; null for decode
  const int32_t* seqlens_k = nullptr;       // [batch]
  const int32_t* head_seqlens_k = nullptr;  // [batch, num_kv_heads] or null
  const int32_t* row_ids = nullptr;         // [batch] or null
  int32_t batch = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0;
  int32_t total_q = 0;       // rows of q
  int32_t max_seqlen_q = 0;  // host bound on n_b (prefill grid size)
  int32_t max_seqlen_k = 0;  // host bound on L (decode split choice; kernels stay correct if L exceeds it)
  float scale = 1.f;
  float softcap = 0.f;       // <= 0: off
  int32_t window_left = -1;  // < 0: off
  int32_t dtype = 0;         // q / out dtype
  int32_t impl = 0;          // 0: optimized kernel, 1: plain reference kernel (CUDA)
  // Optional per-token attention scores (eviction statistics: H2O, TOVA, SnapKV; definition:
  // reference.attention's `scores`). scores [cache rows, num_kv_heads, >= max_seq] fp32, token
  // stride 1, indexed by the cache row row_ids[b]. For each batch row b, kv head h and key
  // j < L(b, h): S = sum of the final softmax probabilities p[i, g, j] over the q heads g of h's
  // GQA group and the row's last score_last_queries queries i (all of them when <= 0);
  // score_mode 1 adds S to scores[row, h, j], 2 stores it; entries j >= L(b, h) are never
  // touched. The row ids of a call must be distinct when scores are emitted.
  float* scores = nullptr;
  int64_t sc_stride_row = 0, sc_stride_head = 0;
  int32_t score_mode = 0;  // 0 off, 1 add, 2 replace
  int32_t score_last_queries = 0;
  // Split-KV scratch for CUDA decode, sized by decode_workspace_bytes(); may be null on CPU.
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
  void* stream = nullptr;
};

// compact_kv: order-preserving in-place gather of the kept tokens of each (row, kv_head) to the
// front (python/vattn/reference.py compact_kv is the definition). For i < n, h < num_kv_heads and
// j < keep_lens[i, h]: cache[row_ids[i], j, h] = old cache[row_ids[i], keep[i, h, j], h], for the
// K and V data, their scale words (quantized formats) and scores[row, h, j] when scores is given.
// Positions >= keep_lens[i, h] and all other (row, head) pairs are left unchanged. The kept indices
// of each (i, h) are strictly increasing and in [0, max_seq); the row ids are distinct. The CPU op
// checks all of this before writing; the CUDA op skips what is out of range (no host sync).
struct CompactParams {
  KVCacheView cache;
  const int32_t* row_ids = nullptr;    // [n] cache rows
  const int32_t* keep = nullptr;       // [n, num_kv_heads, max_keep] contiguous, token indices
  const int32_t* keep_lens = nullptr;  // [n, num_kv_heads] contiguous, in [0, max_keep]
  float* scores = nullptr;             // [num_rows, num_kv_heads, max_seq] per-token scores, or null
  int64_t sc_stride_row = 0, sc_stride_head = 0, sc_stride_tok = 0;  // floats
  int32_t n = 0, num_kv_heads = 0, max_keep = 0;
  int32_t head_dim = 0;  // logical head_dim (a packed int4 vector holds head_dim / 2 bytes)
  // CUDA scratch (gather, then scatter back), sized by compact_workspace_bytes(); null on CPU.
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
  void* stream = nullptr;
};

// Quest block-sparse decode (python/vattn/reference.py block_minmax, quest_select and
// sparse_decode_attention are the definitions). The stored tokens of a (row, kv head) of length L
// form blocks of `block` consecutive tokens: block b covers [b * block, min((b + 1) * block, L)),
// so there are ceil(L / block) blocks, the last possibly partial. Entry i of a call reads cache row
// row_ids[i]; its length is lengths[i], or head_lengths[i * num_kv_heads + h] when that is given.
//
// Per-block key metadata meta [num_rows, max_blocks, kv_heads, 2, head_dim] float32, head_dim
// contiguous: [..., 0, :] the per-channel min, [..., 1, :] the max of the block's (dequantized) keys.
struct BlockMetaView {
  float* data = nullptr;
  int64_t stride_row = 0, stride_block = 0, stride_head = 0, stride_side = 0;  // floats
  int32_t num_rows = 0, max_blocks = 0;
};

// block_minmax: for i < n and h < num_kv_heads, recomputes the metadata of blocks
// first_block[i] .. ceil(L / block) - 1 of (row_ids[i], h) from the K side of `cache` (k, its
// strides, k_scale, k_format; the V fields are unused). Other blocks are left unchanged. The CPU op
// checks every index before writing (rows in range and distinct, 0 <= L <= max_seq,
// ceil(L / block) <= max_blocks, first_block >= 0); the CUDA op clamps instead (no host sync).
struct BlockMinmaxParams {
  KVCacheView cache;
  BlockMetaView meta;
  const int32_t* row_ids = nullptr;       // [n]
  const int32_t* lengths = nullptr;       // [n], or null when head_lengths is given
  const int32_t* head_lengths = nullptr;  // [n, num_kv_heads] or null
  const int32_t* first_block = nullptr;   // [n]
  int32_t n = 0, num_kv_heads = 0, head_dim = 0, block = 0;
  void* stream = nullptr;
};

// quest_select: for each (i, kv head h), block_counts[i, h] = c = min(ceil(token_budget / block),
// ceil(L / block), max_sel) and block_ids[i, h, :c] the selected blocks in ascending order: all
// blocks when c = ceil(L / block), else the last block plus the c - 1 other blocks of highest
// score (ties: lower block index; a NaN score ranks as -inf), where
// score(b) = sum over the q heads g of h's GQA group, d < head_dim of max(q[i, g, d] * min[b, h, d],
// q[i, g, d] * max[b, h, d]). block_ids[i, h, c:] = -1.
struct QuestSelectParams {
  const void* q = nullptr;  // [n, num_q_heads, head_dim], head_dim contiguous
  int64_t q_stride_tok = 0, q_stride_head = 0;
  int32_t dtype = 0;  // q dtype
  BlockMetaView meta;
  const int32_t* row_ids = nullptr;
  const int32_t* lengths = nullptr;
  const int32_t* head_lengths = nullptr;
  int32_t* block_ids = nullptr;     // [n, num_kv_heads, max_sel] contiguous
  int32_t* block_counts = nullptr;  // [n, num_kv_heads] contiguous
  int32_t n = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0, block = 0;
  int32_t token_budget = 0, max_sel = 0;
  // CUDA scratch (block scores), sized by quest_select_workspace_bytes(); null on CPU.
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
  void* stream = nullptr;
};

// sparse_decode_attention: decode attention (attn: one query per row, cu_seqlens_q null,
// seqlens_k / head_seqlens_k the lengths, row_ids, scale, softcap, impl, out, lse, workspace,
// stream; window_left < 0 and no scores) over only the tokens < L of the blocks
// block_ids[b, h, :block_counts[b, h]] (strictly increasing block indices < ceil(L / block)),
// exact softmax over their union. The CPU op checks the block lists; the CUDA kernels skip
// entries out of range (a repeated entry would count twice there).
struct SparseDecodeParams {
  AttentionParams attn;
  const int32_t* block_ids = nullptr;     // [batch, num_kv_heads, max_sel] contiguous
  const int32_t* block_counts = nullptr;  // [batch, num_kv_heads] contiguous, in [0, max_sel]
  int32_t max_sel = 0, block = 0;
};

// Merge of two attention states over disjoint key sets: (o_a, lse_a) + (o_b, lse_b).
// All contiguous: o [n, num_heads, head_dim] in dtype, lse [n, num_heads] float32 natural log.
struct MergeParams {
  const void* o_a = nullptr;
  const float* lse_a = nullptr;
  const void* o_b = nullptr;
  const float* lse_b = nullptr;
  void* out = nullptr;
  float* lse_out = nullptr;
  int64_t n = 0;
  int32_t num_heads = 0, head_dim = 0;
  int32_t dtype = 0;
  void* stream = nullptr;
};

}  // namespace vattn
