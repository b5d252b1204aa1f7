#pragma once
// Private helpers of the CPU ops: dtype dispatch, thread count, and argument checks that throw
// std::invalid_argument (the bindings turn it into ValueError).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <stdexcept>
#include <string>
#include <thread>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "vattn/dtypes.h"
#include "vattn/kv_format.h"
#include "vattn/params.h"

namespace vattn {
namespace cpu {

[[noreturn]] inline void fail(const std::string& what) { throw std::invalid_argument("vattn: " + what); }
inline void require(bool ok, const char* what) {
  if (!ok) fail(what);
}

// Asks Linux to back [p, p + bytes) with transparent huge pages (its whole 2 MiB pages) before an
// op writes its fresh output there for the first time. In 4 KiB pages each first write is a page
// fault (in a VM, the host's too): on the 2-core VM filling a fresh 32 MiB tensor (a Llama-3-8B
// q=2048 prefill output) took 20.7 ms, with this advice 4.6 ms. Advice only: where THP is off or
// the kernel declines, nothing changes. Small outputs (under 8 MiB) are left alone.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (p == nullptr || bytes < 4 * kHuge) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (a + kHuge - 1) & ~(kHuge - 1), hi = (a + bytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// ---- parallel loops that behave on a shared machine ---------------------------------------------
// parallel_items(n, parallel, make, body) runs body(state, i) for i in [0, n) on the OpenMP team
// (the process's one runtime, so torch.set_num_threads holds), each thread claiming the next item
// from a shared counter and keeping its own state = make(). What it adds over `omp for dynamic`
// is the end: a thread that runs out of items does not go straight to the runtime's barrier,
// where libgomp spins (by default ~300k iterations, milliseconds) on its core; it spins for at
// most kJoinSpin and then sleeps on a futex until the last item is done. On a machine where
// another process holds one of the cores, that sleep is what lets the scheduler move a preempted
// teammate (still holding an item) onto the freed core at once, instead of the spinning waiter
// keeping it off for whole scheduler ticks (measured on 2 cores with one busy: decode calls
// quantized to 4 ms ticks, 16 ms for 4 ms of work). Then the team meets at the barrier together.
constexpr std::chrono::microseconds kJoinSpin{50};

inline void futex_wait_while(std::atomic<int>& word, int value) {
#if defined(__linux__)
  static_assert(sizeof(std::atomic<int>) == sizeof(int), "futex on std::atomic<int>");
  syscall(SYS_futex, reinterpret_cast<int*>(&word), FUTEX_WAIT_PRIVATE, value, nullptr, nullptr, 0);
#else
  (void)word;
  (void)value;
  std::this_thread::yield();
#endif
}
inline void futex_wake_all(std::atomic<int>& word) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<int*>(&word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
#else
  (void)word;
#endif
}

// Until count >= target: a short spin, then sleeps (woken by the thread that brings it there).
inline void wait_until(std::atomic<int>& count, int target) {
  const auto until = std::chrono::steady_clock::now() + kJoinSpin;
  for (int i = 0;; ++i) {
    if (count.load(std::memory_order_acquire) >= target) return;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) break;
  }
  for (;;) {
    const int v = count.load(std::memory_order_acquire);
    if (v >= target) return;
    futex_wait_while(count, v);
  }
}
// Adds one; the thread that brings count to target wakes the sleepers and gets true.
inline bool count_up(std::atomic<int>& count, int target) {
  if (count.fetch_add(1, std::memory_order_acq_rel) + 1 != target) return false;
  futex_wake_all(count);
  return true;
}

// Contention: when a teammate lost its core during a call (it reached the region late, or the
// scheduler took its core away while it held items), the calls of the next solo window run on the
// calling thread alone; one core's worth of work then takes one core's time, instead of the others
// waiting, at the region's end, for a teammate that holds a share of a busy core. Then a call tries
// the team again. This holds for short calls too: on 2 cores with one busy, Llama-3-8B heads b=1,
// keeping the team for calls under 1 ms gave the best median (103 us at 512 keys against 172 us
// alone) but a mean of 626 us against 173 us, because one call in ten waited a whole scheduler
// slice (4-12 ms) for its teammate. A server's throughput is the mean.
// The window doubles, up to kSoloWindowMax, when the next loss comes within kSoloWindowMax of the
// last window's end, and halves, down to kSoloWindowMin, when it comes later: a lasting contention
// soon tries the team only every 100 ms, while sparse losses (a quiet VM showed about one in two
// seconds: late starts and preemptions of 0.5-8 ms) cost 10 ms of single-thread calls each, not 100.
// Long calls keep the team even then: a call site whose previous call took kLongCall or more. A
// teammate on a shared core still does its share of the items (claimed one at a time), and the
// slice it may make the others wait at the end is small against the call. Measured with one core
// busy, mean per call, alone / always the team: Llama-3-8B prefill q=2048 260-265 / 191-201 ms;
// decode b=1 x 32K and b=64 x 512 17.8-19.7 / 17.7-20.8 ms (even); decode b=1 x 8K 4.3-4.8 / 8.0-8.2 ms.
// (A call site is one instantiation of parallel_items, so decode and prefill of one format share it.)
constexpr std::chrono::milliseconds kLongCall{20};
constexpr std::chrono::milliseconds kSoloWindowMin{10};
constexpr std::chrono::milliseconds kSoloWindowMax{100};
constexpr std::chrono::microseconds kLateStart{200};

struct SoloState {
  std::atomic<int64_t> until_ns{0};  // calls before this run alone
  // Length of the last window; a process's first loss gets half the longest, not the shortest,
  // so a contention that is there from the start does not cost the whole doubling ramp.
  std::atomic<int64_t> window_ns{std::chrono::nanoseconds(kSoloWindowMax).count()};
};
inline SoloState& solo_state() {
  static SoloState s;
  return s;
}
inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
// CPU time of the calling thread; wall time minus it is the time the scheduler gave its core to
// someone else. -1 where the clock is missing.
inline int64_t thread_cpu_ns() {
#if defined(__linux__)
  timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0) return -1;
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
#else
  return -1;
#endif
}
inline void store_max(std::atomic<int64_t>& a, int64_t v) {
  int64_t cur = a.load(std::memory_order_relaxed);
  while (v > cur && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {}
}

template <class Make, class Body>
void parallel_items(int64_t n, bool parallel, Make&& make, Body&& body) {
  if (n <= 0) return;
  if (n >= INT32_MAX) fail("parallel_items: too many work items");
  const int total = (int)n;
  const int64_t t0 = now_ns();
  SoloState& solo = solo_state();
  static std::atomic<int64_t> last_call_ns{0};  // this call site's previous call, wall time
  if (parallel && t0 < solo.until_ns.load(std::memory_order_relaxed) &&
      last_call_ns.load(std::memory_order_relaxed) < std::chrono::nanoseconds(kLongCall).count())
    parallel = false;
  std::atomic<int> next{0}, done{0}, started{0};
  std::atomic<int64_t> last_start{t0};
  std::atomic<int64_t> max_stolen{0};  // the longest a teammate (not the caller) was off its core
  int64_t ready_ns = t0;               // when the caller had seen every item done and every teammate in
#pragma omp parallel if (parallel)
  {
#if defined(_OPENMP)
    const int team = omp_get_num_threads();
    const bool worker = omp_get_thread_num() != 0;
#else
    const int team = 1;
    const bool worker = false;
#endif
    if (count_up(started, team)) last_start.store(now_ns(), std::memory_order_relaxed);
    const int64_t wall0 = worker ? now_ns() : 0, cpu0 = worker ? thread_cpu_ns() : -1;
    auto state = make();
    for (;;) {
      const int it = next.fetch_add(1, std::memory_order_relaxed);
      if (it >= total) break;
      body(state, it);
      count_up(done, total);
    }
    if (cpu0 >= 0) {
      const int64_t cpu1 = thread_cpu_ns();
      if (cpu1 >= 0) store_max(max_stolen, (now_ns() - wall0) - (cpu1 - cpu0));
    }
    // Every item done, and every teammate inside the region (one the scheduler has not run yet
    // would keep the others spinning at the runtime's barrier until it gets a core).
    wait_until(done, total);
    wait_until(started, team);
    if (!worker) ready_ns = now_ns();
  }
  const int64_t took = now_ns() - t0;
  last_call_ns.store(took, std::memory_order_relaxed);
  if (parallel) {
    // Time the call lost to a teammate's core being elsewhere: a late start, a preemption while it
    // held items, or the caller's wait at the runtime's closing barrier once everything was done
    // (a teammate woken there that gets no core); in absolute terms and against the call's length.
    const int64_t lost = (last_start.load(std::memory_order_relaxed) - t0) +
                         max_stolen.load(std::memory_order_relaxed) + (now_ns() - ready_ns);
    if (lost > std::chrono::nanoseconds(kLateStart).count() && 4 * lost > took) {
      // (relaxed and unlocked: two calls that end together pick one of their windows)
      const int64_t now = now_ns(), lo = std::chrono::nanoseconds(kSoloWindowMin).count(),
                    hi = std::chrono::nanoseconds(kSoloWindowMax).count();
      const int64_t prev_end = solo.until_ns.load(std::memory_order_relaxed);
      const int64_t last = solo.window_ns.load(std::memory_order_relaxed);
      const int64_t window = std::max(lo, now - prev_end < hi ? std::min(hi, 2 * last) : last / 2);
      solo.window_ns.store(window, std::memory_order_relaxed);
      solo.until_ns.store(now + window, std::memory_order_relaxed);
    }
  }
}

// A side stored as int4_ch keeps each group's parameters in the words of the group's G tokens, so
// a cache of it holds whole groups: its seq must be a multiple of G = head_dim / 2.
inline void check_groups(int32_t format, int32_t head_dim, int64_t max_seq, const char* what) {
  if (format != kKvInt4Channel) return;
  if (head_dim <= 0 || head_dim % 2) fail(std::string(what) + ": int4_ch needs an even head_dim");
  const int32_t G = quant::int4_ch_group(head_dim);
  if (max_seq % G != 0)
    fail(std::string(what) + ": an int4_ch cache holds whole groups of " + std::to_string(G) + " tokens: its seq (" +
         std::to_string(max_seq) + ") must be a multiple");
}

// Paged views (kv_paging.h): an int4_ch group must not cross a block, so the block size must be a
// multiple of G.
inline void check_paged_groups(int32_t format, int32_t head_dim, int32_t block_size, const char* what) {
  if (format != kKvInt4Channel) return;
  if (head_dim <= 0 || head_dim % 2) fail(std::string(what) + ": int4_ch needs an even head_dim");
  const int32_t G = quant::int4_ch_group(head_dim);
  if (block_size % G != 0)
    fail(std::string(what) + ": int4_ch keys are quantized over groups of " + std::to_string(G) +
         " tokens, which must not cross a block: the block size (" + std::to_string(block_size) +
         ") must be a multiple of " + std::to_string(G));
}

// Paged views: the block ids of tokens [0, reach) of cache row `row` (a valid row) must name
// physical blocks; the kernels would read block 0 instead of an id out of range (kv_block_of),
// the CPU ops refuse it before they read or write anything.
inline void check_blocks(const KVCacheView& c, int64_t row, int64_t reach, const char* what) {
  const int32_t* ids = c.block_table + row * c.bt_stride_row;
  for (int64_t i = 0, n = (reach + c.block_size - 1) / c.block_size; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= c.num_blocks)
      fail(std::string(what) + ": block_table[" + std::to_string(row) + ", " + std::to_string(i) +
           "] = " + std::to_string(ids[i]) + " (holding tokens " + std::to_string(i * c.block_size) + ".." +
           std::to_string((i + 1) * c.block_size - 1) + " of the row) is outside [0, " + std::to_string(c.num_blocks) +
           ")");
}

// Calls f(T{}) with the storage type of a dtype code.
template <typename F>
decltype(auto) dispatch_dtype(int32_t code, const char* what, F&& f) {
  switch (code) {
    case kFloat32: return f(float{});
    case kFloat16: return f(f16_t{});
    case kBFloat16: return f(bf16_t{});
    default: fail(std::string(what) + ": unknown dtype code " + std::to_string(code));
  }
}

}  // namespace cpu
}  // namespace vattn
