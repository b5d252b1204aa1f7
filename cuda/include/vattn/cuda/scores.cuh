#pragma once
// Per-token attention scores on CUDA (AttentionParams::scores; definition: reference.attention).
//
// They are emitted by a separate kernel that runs after the attention kernel on the same stream,
// whichever attention kernel ran (split-KV or plain decode, tensor-core or plain prefill): a
// probability needs the query's final LSE, which only exists once all of the query's keys are
// merged (across splits, tiles or warps), and adding a second pass to the attention kernels
// themselves changes their register allocation (ptxas spilled in the plain prefill kernel). The
// score kernel reads the LSE the attention wrote (the Python layer always asks for it when scores
// are requested), recomputes q.k in fp32 for the scoring queries only (the row's last
// score_last_queries; one per decode row) and sums the probabilities over those queries and the q
// heads of the GQA group. One CTA owns a tile of keys of one (batch row, kv head), so there are no
// atomics, "replace" needs no zeroing pass, and results are deterministic. Nothing [q, k]-sized
// is stored. Cost: one more read of K of the scored rows and the QK products of the scoring
// queries.
#include <cstdint>

#include "vattn/params.h"
#include "vattn/scores.h"

namespace vattn {

// Launches the score kernel on p.stream when scores_on(p) (nothing otherwise); p.lse must hold
// the final LSE of every query. Validates the score fields, checks its launch; no allocation,
// no synchronization. decode: cu_seqlens_q is null (one query per batch row).
void launch_attention_scores(const AttentionParams& p);

// The checks of launch_attention_scores alone (std::invalid_argument), for a launcher to run
// before it launches anything.
void validate_attention_scores(const AttentionParams& p);

}  // namespace vattn
