#pragma once
// Per-token attention scores (AttentionParams::scores, score_mode, score_last_queries): the
// small pieces the CPU engine and the CUDA kernels share. Definition: reference.attention's
// `scores` argument (python/vattn/reference.py); params.h says what the fields mean.
#include <cstdint>

#include "vattn/macros.h"
#include "vattn/params.h"

namespace vattn {

enum ScoreMode : int32_t { kScoreOff = 0, kScoreAdd = 1, kScoreReplace = 2 };

VATTN_HD bool scores_on(const AttentionParams& p) { return p.scores != nullptr && p.score_mode != kScoreOff; }

// First query (index within the row's n queries) whose probabilities enter the scores: the
// row's last score_last_queries queries, all of them when that is <= 0.
VATTN_HD int first_scoring_query(const AttentionParams& p, int n) {
  const int w = p.score_last_queries;
  return (w <= 0 || w >= n) ? 0 : n - w;
}

// scores[row, kvh, 0]; tokens are contiguous.
VATTN_HD float* score_row(const AttentionParams& p, int64_t row, int kvh) {
  return p.scores + row * p.sc_stride_row + int64_t(kvh) * p.sc_stride_head;
}

}  // namespace vattn
