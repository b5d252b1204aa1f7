// The ISA-neutral parts of the token-order decode walks (prefetch distance, the prefetch of a part
// of the rows ahead, the loop over token pieces), included by the AVX2 and the AVX-512 copies of the
// walks into their own namespaces: the loops take the copies' tile lambdas, which inline only into
// a function compiled for the same target. No include guard on purpose, like the other bodies.

// The token-order walks prefetch into L2 the rows about kAheadBytes ahead of the token they are at,
// a part per head (or chunk of heads) as they go, so the prefetches trickle out with the
// arithmetic. Measured with bench/decode_walks.py, 2 threads, builds or distances alternated:
// - SmolLM2 heads (group 3, 768 B a token): 35-39 GB/s with the hardware prefetcher alone, 44-49
//   with this (1.14-1.27x, b=32 x 1K and b=8 x 4K; 6-48 KB ahead the same within noise); group 2
//   (16 / 8 x 64) 1.02-1.15x;
// - Llama-2-7B heads (group 1's token pairs, 16 KB a token), head walk / token order, distances
//   alternated in one build: 1.23-1.29 without, 1.36-1.48 at 4 tokens (64 KB) ahead, 1.38-1.54 at 2;
//   0.96-0.97x the plain order at 16 (256 KB). Builds alternated later, in a slower phase of the VM,
//   showed no difference in that ratio, but bench/run.py's b=8 x 512 row took 2.10-2.21 ms with it
//   and 2.24-2.30 without (three runs each, alternated);
// - Llama-3-8B / -70B heads in pieces (4 KB a token): 8 tokens ahead 0.92-0.97x of 16 (4 of 4 runs
//   with group 8), 32 ahead 0.9x, 64 ahead 0.75x.
constexpr int64_t kAheadBytes = int64_t(64) << 10;
// Tokens ahead for rows of tok floats a token, walked `step` tokens at a time: a whole number of
// steps, at least one, at most 16 tokens.
static inline int tokens_ahead(int64_t tok, int step) {
  int64_t a = kAheadBytes / (tok * (int64_t)sizeof(float));
  a = a / step * step;
  if (a > 16) a = 16 / step * step;
  return a < step ? step : (int)a;
}

// Prefetch into L2 part h of nh of the rows of tokens [a, a + n): within the block [jb, jb + nk)
// while it lasts, then the first rows of next.
static inline void prefetch_ahead_part(const float* base, int64_t tok, int a, int n, int jb, int nk,
                                       const NextRows& next, int h, int nh) {
  const char* x;
  int64_t len;
  if (a + n <= jb + nk) {
    x = reinterpret_cast<const char*>(base + (int64_t)a * tok);
    len = (int64_t)n * tok * (int64_t)sizeof(float);
  } else {
    const int u = a - (jb + nk);
    if (u < 0 || u >= next.n) return;
    x = reinterpret_cast<const char*>(next.p + (int64_t)u * next.tok);
    len = (int64_t)(next.n - u < n ? next.n - u : n) * next.tok * (int64_t)sizeof(float);
  }
  const int64_t lo = len * h / nh / 64 * 64, hi = len * (h + 1) / nh / 64 * 64;
  for (int64_t o = lo; o < hi; o += 64) prefetch<2>(x + o);
}

// The walk both piece loops share, over the rows at base (token stride tok), in pieces of P tokens:
// piece(h, t, ahead) where all P tokens from t lie in head h's [lo, hi), else one(h, u) for each
// token u of the piece in the head's range. ahead(i, n) prefetches sub-part i of n of part h of nh
// of the piece tokens_ahead() tokens on: a piece calls it for every i < n as it goes, so the
// prefetches go out between its tiles, not in one burst.
template <int P, class Piece, class One>
static inline void for_token_pieces(const float* base, int64_t tok, const NextRows& next, int nh, int jb, int nk,
                                    const int* lo, const int* hi, Piece&& piece, One&& one) {
  const int dist = tokens_ahead(tok, P);
  for (int t = jb; t < jb + nk; t += P) {
    const int e = t + P < jb + nk ? t + P : jb + nk;
    for (int h = 0; h < nh; ++h) {
      if (e - t == P && t >= lo[h] && e <= hi[h]) {
        auto ahead = [&, t, h](int i, int n) {
          prefetch_ahead_part(base, tok, t + dist, P, jb, nk, next, h * n + i, nh * n);
        };
        piece(h, t, ahead);
        continue;
      }
      for (int u = t; u < e; ++u)
        if (u >= lo[h] && u < hi[h]) one(h, u);
    }
  }
}
