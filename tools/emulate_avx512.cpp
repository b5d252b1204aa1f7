// GPU-less, AVX-512-less check of the CPU's AVX-512 copies: decode's token pieces
// (cuda/cpu/decode_pieces_avx512.h) and prefill's GEMM tiles (cuda/cpu/attention_kernels_avx512.h).
// SIMDe's portable AVX-512 (Debian: libsimde-dev) stands in for the intrinsics, so index math, tile
// shapes, masks, horizontal sums and head ranges are checked on any x86 or ARM machine against a
// float64 version of the same contracts (qk_tokens / pv_tokens, qk_block / pv_block in
// attention_kernels.h). Caches are NaN outside each head's [lo, hi), outputs outside what a call may
// write hold a sentinel, and buffers are exactly sized (built with -fsanitize=address by
// tests/test_kernel_emulation.py), so a read past a range or a write outside it fails. Prints
// "ALL OK" when every case agrees.
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
#ifndef __mmask16
typedef simde__mmask16 __mmask16;
typedef simde__mmask8 __mmask8;
#endif
// Masked loads and stores, which SIMDe 0.7.4 lacks: they touch only the lanes of the mask, as the
// hardware does (so AddressSanitizer sees exactly the reads and writes the kernel makes).
static inline __m512 emu_maskz_loadu_ps(unsigned m, const float* p) {
  float r[16];
  for (int i = 0; i < 16; ++i) r[i] = (m >> i) & 1 ? p[i] : 0.f;
  return _mm512_loadu_ps(r);
}
static inline void emu_mask_storeu_ps(float* p, unsigned m, __m512 a) {
  float x[16];
  _mm512_storeu_ps(x, a);
  for (int i = 0; i < 16; ++i)
    if ((m >> i) & 1) p[i] = x[i];
}
static inline __m256 emu_maskz_loadu_ps256(unsigned m, const float* p) {
  float r[8];
  for (int i = 0; i < 8; ++i) r[i] = (m >> i) & 1 ? p[i] : 0.f;
  return _mm256_loadu_ps(r);
}
#ifndef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps(m, p) emu_maskz_loadu_ps(m, p)
#endif
#ifndef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps(p, m, a) emu_mask_storeu_ps(p, m, a)
#endif
#ifndef _mm256_maskz_loadu_ps
#define _mm256_maskz_loadu_ps(m, p) emu_maskz_loadu_ps256(m, p)
#endif
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
#include "attention_kernels_avx512.h"
#include "decode_pieces_avx512.h"
}  // namespace avx512
static int check_pieces() {
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
  std::printf("token pieces: %d cases, %d failed, worst qk error %.3g, prefetches %ld\n", cases, fails, worst,
              g_prefetch);
  return fails != 0 || g_prefetch == 0;
}

// qk_gemm / pv_gemm (prefill): any row count, key count and head dim (masked last vectors), padded
// strides; the last K / V row ends the buffer exactly where its dim floats do.
static int check_gemm() {
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> U(-1, 1);
  int fails = 0, cases = 0;
  double worst = 0;
  for (int iter = 0; iter < 1500; ++iter) {
    const int dims[] = {1, 7, 8, 16, 31, 36, 48, 64, 72, 80, 96, 100, 128, 130, 256};
    const int dim = dims[rng() % 15];
    const int nq = 1 + rng() % 40, nk = 1 + rng() % 150;
    const int64_t ks = dim + (rng() % 2 ? 0 : 1 + rng() % 40);
    const size_t kv_len = (size_t)(nk - 1) * ks + dim;
    std::vector<float> K(kv_len), V(kv_len), q((size_t)nq * dim);
    for (auto& x : K) x = U(rng);
    for (auto& x : V) x = U(rng);
    for (auto& x : q) x = U(rng);
    const int lds = nk + rng() % 5, ldp = nk + rng() % 5;
    const float sentinel = 12345.f;
    std::vector<float> s((size_t)(nq - 1) * lds + nk, sentinel), p((size_t)(nq - 1) * ldp + nk);
    for (auto& x : p) x = U(rng);
    std::vector<float> acc((size_t)nq * dim), aref;
    for (auto& x : acc) x = U(rng);
    aref = acc;
    avx512::qk_gemm(q.data(), nq, K.data(), ks, nk, dim, s.data(), lds);
    avx512::pv_gemm(p.data(), ldp, nq, V.data(), ks, nk, dim, acc.data());
    bool ok = true;
    for (int r = 0; r < nq; ++r) {
      for (int j = 0; j < lds && (size_t)r * lds + j < s.size(); ++j) {
        const float got = s[(size_t)r * lds + j];
        if (j >= nk) {
          if (got != sentinel) ok = false;  // past the keys: never written
          continue;
        }
        double dot = 0;
        for (int d = 0; d < dim; ++d) dot += (double)q[(size_t)r * dim + d] * K[(size_t)j * ks + d];
        const double e = std::fabs(got - dot);
        if (!(e <= 1e-4)) ok = false;
        if (e > worst) worst = e;
      }
      for (int d = 0; d < dim; ++d) {
        double want = aref[(size_t)r * dim + d];
        for (int j = 0; j < nk; ++j) want += (double)p[(size_t)r * ldp + j] * V[(size_t)j * ks + d];
        if (!(std::fabs(acc[(size_t)r * dim + d] - want) <= 1e-4)) ok = false;
      }
    }
    ++cases;
    if (!ok && fails++ < 5) std::printf("FAIL gemm dim=%d nq=%d nk=%d ks=%lld\n", dim, nq, nk, (long long)ks);
  }
  std::printf("prefill GEMM tiles: %d cases, %d failed, worst qk error %.3g\n", cases, fails, worst);
  return fails != 0;
}

int main() {
  const int bad = check_pieces() + check_gemm();
  if (bad == 0) std::printf("ALL OK\n");
  return bad != 0;
}
