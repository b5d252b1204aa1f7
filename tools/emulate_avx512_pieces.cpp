// GPU-less, AVX-512-less check of decode's AVX-512 token pieces (cuda/cpu/decode_pieces_avx512.h):
// SIMDe's portable AVX-512 (Debian: libsimde-dev) stands in for the intrinsics, so the pieces' index
// math, tile shapes, horizontal sums and head ranges are checked on any x86 or ARM machine against a
// float64 walk of the same contract (qk_tokens / pv_tokens in attention_kernels.h). The cache is NaN
// outside each head's [lo, hi), the scores outside it hold a sentinel, and buffers are exactly sized
// (built with -fsanitize=address by tests/test_kernel_emulation.py), so a read past a head's range
// or a write outside it fails. Prints "ALL OK" when every case agrees.
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <type_traits>
#include <vector>
#ifndef _MM_SHUFFLE
#define _MM_SHUFFLE(a, b, c, d) SIMDE_MM_SHUFFLE(a, b, c, d)
#endif

// Two intrinsics whose native names SIMDe 0.7.4 lacks, written from Intel's definitions.
static inline __m512 emu_shuffle_f32x4(__m512 a, __m512 b, int imm) {
  float x[16], y[16], r[16];
  _mm512_storeu_ps(x, a);
  _mm512_storeu_ps(y, b);
  for (int l = 0; l < 4; ++l) {
    const int sel = (imm >> (2 * l)) & 3;
    const float* src = l < 2 ? x : y;
    for (int i = 0; i < 4; ++i) r[4 * l + i] = src[4 * sel + i];
  }
  return _mm512_loadu_ps(r);
}
static inline __m512 emu_permute_ps(__m512 a, int imm) {
  float x[16], r[16];
  _mm512_storeu_ps(x, a);
  for (int l = 0; l < 4; ++l)
    for (int i = 0; i < 4; ++i) r[4 * l + i] = x[4 * l + ((imm >> (2 * i)) & 3)];
  return _mm512_loadu_ps(r);
}
#ifndef _mm512_shuffle_f32x4
#define _mm512_shuffle_f32x4(a, b, imm) emu_shuffle_f32x4(a, b, imm)
#endif
#ifndef _mm512_permute_ps
#define _mm512_permute_ps(a, imm) emu_permute_ps(a, imm)
#endif
struct NextRows {
  const float* p = nullptr;
  int64_t tok = 0;
  int n = 0;
};
constexpr int kTokenPiece = 4;
static long g_prefetch = 0;
// The walks' prefetch<level>(p) (attention_kernels_avx2.h): counted, so a walk that stops
// prefetching shows.
template <int L>
static inline void prefetch(const void* p) {
  (void)p;
  ++g_prefetch;
}
namespace avx512 {
#include "decode_pieces_avx512.h"
}
int main() {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> U(-1, 1);
  int fails = 0, cases = 0;
  double worst = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    const int dims[] = {16, 32, 48, 64, 80, 96, 112, 128, 256};
    const int dim = dims[rng() % 9];
    const int rows = 4 + rng() % 13;  // 4..16
    const int nh = 1 + rng() % 5;
    const int pad = rng() % 3 == 0 ? 16 * (rng() % 3) : 0;
    const int64_t k_head = dim + pad, k_tok = nh * k_head + (rng() % 2) * 16;
    const int tokens = 1 + rng() % 140;
    const int jb = rng() % tokens;
    const int nk = 1 + rng() % (tokens - jb);
    std::vector<int> lo(nh), hi(nh);
    for (int h = 0; h < nh; ++h) {
      int a = rng() % (tokens + 1), b = rng() % (tokens + 1);
      if (a > b) std::swap(a, b);
      if (rng() % 3 == 0) {
        a = 0;
        b = tokens;
      }
      lo[h] = a;
      hi[h] = b;
    }
    const float nan = std::nanf("");
    std::vector<float> K((size_t)tokens * k_tok, nan), V((size_t)tokens * k_tok, nan);
    for (int t = 0; t < tokens; ++t)
      for (int h = 0; h < nh; ++h)
        if (t >= lo[h] && t < hi[h])
          for (int d = 0; d < dim; ++d) {
            K[t * k_tok + h * k_head + d] = U(rng);
            V[t * k_tok + h * k_head + d] = U(rng);
          }
    std::vector<float> q((size_t)nh * rows * dim);
    for (auto& x : q) x = U(rng);
    const int lds = nk + rng() % 5, ldp = lds;
    const float sentinel = 12345.f;
    std::vector<float> s((size_t)nh * rows * lds, sentinel), sref = s;
    std::vector<float> p((size_t)nh * rows * ldp);
    for (auto& x : p) x = U(rng);
    std::vector<float> acc((size_t)nh * rows * dim), aref;
    for (auto& x : acc) x = U(rng);
    aref = acc;
    // Next rows: a second buffer of a few tokens.
    std::vector<float> nxt((size_t)8 * k_tok, 0.f);
    NextRows next{nxt.data(), k_tok, (int)(rng() % 9)};
    avx512::qk_pieces(q.data(), rows, nh, K.data(), k_tok, k_head, jb, nk, lo.data(), hi.data(), dim, s.data(), lds,
                      next);
    avx512::pv_pieces(p.data(), ldp, rows, nh, V.data(), k_tok, k_head, jb, nk, lo.data(), hi.data(), dim, acc.data(),
                      next);
    for (int h = 0; h < nh; ++h)
      for (int u = jb; u < jb + nk; ++u) {
        if (u < lo[h] || u >= hi[h]) continue;
        for (int r = 0; r < rows; ++r) {
          double dot = 0;
          for (int d = 0; d < dim; ++d) dot += (double)q[(h * rows + r) * dim + d] * K[u * k_tok + h * k_head + d];
          sref[(h * rows + r) * lds + (u - jb)] = (float)dot;
          for (int d = 0; d < dim; ++d)
            aref[(h * rows + r) * dim + d] += p[(h * rows + r) * ldp + (u - jb)] * V[u * k_tok + h * k_head + d];
        }
      }
    bool ok = true;
    for (size_t i = 0; i < s.size(); ++i) {
      const double e = std::fabs((double)s[i] - sref[i]);
      if (!(e <= 1e-4)) ok = false;
      if (sref[i] != sentinel && e > worst) worst = e;
    }
    for (size_t i = 0; i < acc.size(); ++i)
      if (!(std::fabs((double)acc[i] - aref[i]) <= 1e-4)) ok = false;
    ++cases;
    if (!ok && fails++ < 5)
      std::printf("FAIL dim=%d rows=%d nh=%d jb=%d nk=%d tokens=%d\n", dim, rows, nh, jb, nk, tokens);
  }
  std::printf("%d cases, %d failed, worst qk error %.3g, prefetches %ld\n", cases, fails, worst, g_prefetch);
  if (fails == 0 && g_prefetch > 0) std::printf("ALL OK\n");
  return fails != 0 || g_prefetch == 0;
}
