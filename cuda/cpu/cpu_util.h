#pragma once
// Private helpers of the CPU ops: dtype dispatch, thread count, and argument checks that throw
// std::invalid_argument (the bindings turn it into ValueError).
#include <atomic>
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__linux__)
#include <linux/futex.h>
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

// Contention: when a teammate reaches a region late (the scheduler gave its core to another
// process), the calls of the next kSoloWindow run on the calling thread alone; one core's worth of
// work then takes one core's time, instead of the others waiting for a teammate that holds a share
// of a busy core (and its items). Then a call tries the team again.
constexpr std::chrono::milliseconds kSoloWindow{100};
constexpr std::chrono::microseconds kLateStart{200};
// ... except calls expected to be short: a call site whose previous call took less than kShortCall
// keeps the team. A woken teammate gets a slice of its busy core at once (the scheduler credits a
// sleeper) and a short call ends inside it, so the team still halves the time; what makes long
// calls slow on the team is a teammate preempted while it holds an item, for a whole tick.
// Measured on 2 cores, one busy, Llama-3-8B heads b=1: the team took 86-101 / 155-160 / 331-364 us
// at 512 / 1K / 2K keys where alone took 152 / 280-300 / 585-620 us, but 4.6-6.8 ms at 4K keys where
// alone took 2.0 ms.
constexpr std::chrono::microseconds kShortCall{1000};

inline std::atomic<int64_t>& solo_until_ns() {
  static std::atomic<int64_t> t{0};
  return t;
}
inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

template <class Make, class Body>
void parallel_items(int64_t n, bool parallel, Make&& make, Body&& body) {
  if (n <= 0) return;
  if (n >= INT32_MAX) fail("parallel_items: too many work items");
  const int total = (int)n;
  const int64_t t0 = now_ns();
  static std::atomic<int64_t> last_call_ns{0};  // this call site's previous call, wall time
  if (parallel && t0 < solo_until_ns().load(std::memory_order_relaxed) &&
      last_call_ns.load(std::memory_order_relaxed) >= std::chrono::nanoseconds(kShortCall).count())
    parallel = false;
  std::atomic<int> next{0}, done{0}, started{0};
  std::atomic<int64_t> last_start{t0};
#pragma omp parallel if (parallel)
  {
#if defined(_OPENMP)
    const int team = omp_get_num_threads();
#else
    const int team = 1;
#endif
    if (count_up(started, team)) last_start.store(now_ns(), std::memory_order_relaxed);
    auto state = make();
    for (;;) {
      const int it = next.fetch_add(1, std::memory_order_relaxed);
      if (it >= total) break;
      body(state, it);
      count_up(done, total);
    }
    // Every item done, and every teammate inside the region (one the scheduler has not run yet
    // would keep the others spinning at the runtime's barrier until it gets a core).
    wait_until(done, total);
    wait_until(started, team);
  }
  const int64_t took = now_ns() - t0;
  last_call_ns.store(took, std::memory_order_relaxed);
  if (parallel) {
    // A teammate that arrived late, both in absolute terms and against the call's length.
    const int64_t late = last_start.load(std::memory_order_relaxed) - t0;
    if (late > std::chrono::nanoseconds(kLateStart).count() && 4 * late > took)
      solo_until_ns().store(now_ns() + std::chrono::nanoseconds(kSoloWindow).count(), std::memory_order_relaxed);
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
