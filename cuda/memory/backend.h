#pragma once
// PhysicalBackend: the few operations the cache manager needs from a virtual-memory system.
// Two implementations: HostBackend (Linux memfd, always built, makes the whole manager testable
// without a GPU) and CudaBackend (CUDA driver VMM, only with VATTN_WITH_CUDA).
//
// The public methods are non-virtual wrappers (NVI) so that call counting and fault injection
// for tests live in one place instead of in every backend.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>

namespace vattn {
namespace memory {

// Physical memory is exhausted (the cap or the device). Bound to a Python MemoryError subclass.
class OutOfMemory : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A failure injected by a test (see PhysicalBackend::inject_failure). A RuntimeError in Python.
class InjectedFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

using PageHandle = uint64_t;

enum class FaultKind { kNone = 0, kCreate = 1, kMap = 2 };

struct BackendCounters {
  uint64_t creates = 0, destroys = 0, maps = 0, unmaps = 0;  // successful calls (pages)
};

// Thread safety: create_page / destroy_page may run on one thread (the manager's background
// worker, outside the manager's mutex) while another thread maps, unmaps or records stream uses
// under the manager's mutex; implementations keep their own bookkeeping of pages safe for that.
// Everything else is called under the manager's mutex.
class PhysicalBackend {
 public:
  virtual ~PhysicalBackend() = default;
  PhysicalBackend(const PhysicalBackend&) = delete;
  PhysicalBackend& operator=(const PhysicalBackend&) = delete;

  // Bytes of one physical page: the granularity of every map / unmap.
  size_t page_bytes() const { return page_bytes_; }
  virtual bool is_device() const = 0;
  virtual std::string name() const = 0;
  // Whether a page fresh from create_page reads as zeros (memfd: yes; cuMemCreate: unspecified,
  // it may hand back memory another allocation of this process released).
  virtual bool created_pages_are_zero() const = 0;

  // Virtual ranges: page-aligned, size a multiple of page_bytes(); nothing is mapped.
  uintptr_t reserve(size_t bytes) { return do_reserve(bytes); }
  void release(uintptr_t addr, size_t bytes) noexcept { do_release(addr, bytes); }

  // Physical pages. create_page throws OutOfMemory when the memory is exhausted.
  PageHandle create_page() {
    consume_fault(FaultKind::kCreate, "create_page");
    PageHandle h = do_create_page();
    creates_.fetch_add(1, std::memory_order_relaxed);
    return h;
  }
  void destroy_page(PageHandle h) noexcept {
    do_destroy_page(h);
    destroys_.fetch_add(1, std::memory_order_relaxed);
  }

  // Maps n pages at addr, addr + page, ... (page aligned, inside one reservation, currently
  // unmapped); pages[i] goes to addr + i * page. All or nothing: on failure no page of the call
  // stays mapped. (A contiguous range lets the CUDA backend set access once for all of it.)
  void map(uintptr_t addr, const PageHandle* pages, size_t n) {
    if (n == 0) return;
    for (size_t i = 0; i < n; ++i) consume_fault(FaultKind::kMap, "map");
    do_map(addr, pages, n);
    maps_.fetch_add(n, std::memory_order_relaxed);
  }
  void map(uintptr_t addr, PageHandle h) { map(addr, &h, 1); }

  // Unmaps whole pages, each range [addr, addr + bytes). Waits first for the work recorded with
  // record_use (kernels still in flight may read the pages), then unmaps.
  struct Range {
    uintptr_t addr;
    size_t bytes;
  };
  void unmap(const Range* ranges, size_t n) {
    if (n == 0) return;
    wait_uses();
    for (size_t i = 0; i < n; ++i) {
      do_unmap(ranges[i].addr, ranges[i].bytes);
      unmaps_.fetch_add(ranges[i].bytes / page_bytes_, std::memory_order_relaxed);
    }
  }

  // Device work that may touch the mapped memory was enqueued on `stream` (a CUstream as an
  // integer; 0 is the legacy default stream): the next unmap waits for it (an event recorded on
  // that stream now), instead of draining every stream of the device. No-op on the host.
  virtual void record_use(uintptr_t stream) { (void)stream; }
  // Waits for everything record_use recorded (no-op on the host).
  virtual void wait_uses() {}
  // Zeroes [addr, addr + bytes) of mapped memory. stream: where the device backend enqueues it
  // (ordered before later work on that stream, no host wait), or, with wait = true, done on the
  // backend's own stream and waited for (the background thread). The host writes synchronously.
  virtual void zero(uintptr_t addr, size_t bytes, uintptr_t stream, bool wait) = 0;
  // Copies [src, src + bytes) to [dst, dst + bytes), both mapped, not overlapping: the private copy
  // of a shared page (prefix sharing). The device backend enqueues it on `stream` (after the writes
  // of src there, before later work; no host wait) and refuses while a graph is being captured. The
  // host copies at once.
  virtual void copy(uintptr_t dst, uintptr_t src, size_t bytes, uintptr_t stream) = 0;

  // Bytes of physical memory really held (measured where the backend can, e.g. memfd blocks).
  virtual size_t resident_bytes() const = 0;
  // Waits until all work that may touch the mapped memory is done (whole device on CUDA).
  virtual void synchronize() = 0;

  // Test hook: the n-th (1-based) next call of that kind fails (n <= 0 clears it). Map faults
  // count pages.
  void inject_failure(FaultKind kind, int64_t n) {
    std::lock_guard<std::mutex> lk(fault_mu_);
    fault_kind_ = n > 0 ? kind : FaultKind::kNone;
    fault_countdown_ = n;
  }
  BackendCounters counters() const {
    BackendCounters c;
    c.creates = creates_.load(std::memory_order_relaxed);
    c.destroys = destroys_.load(std::memory_order_relaxed);
    c.maps = maps_.load(std::memory_order_relaxed);
    c.unmaps = unmaps_.load(std::memory_order_relaxed);
    return c;
  }

 protected:
  explicit PhysicalBackend(size_t page_bytes) : page_bytes_(page_bytes) {}
  void set_page_bytes(size_t b) { page_bytes_ = b; }

  virtual uintptr_t do_reserve(size_t bytes) = 0;
  virtual void do_release(uintptr_t addr, size_t bytes) noexcept = 0;
  virtual PageHandle do_create_page() = 0;
  virtual void do_destroy_page(PageHandle h) noexcept = 0;
  // n >= 1 pages at addr; all or nothing (see map).
  virtual void do_map(uintptr_t addr, const PageHandle* pages, size_t n) = 0;
  // Called only after wait_uses().
  virtual void do_unmap(uintptr_t addr, size_t bytes) = 0;

 private:
  void consume_fault(FaultKind kind, const char* what) {
    std::lock_guard<std::mutex> lk(fault_mu_);
    if (fault_kind_ != kind) return;
    if (--fault_countdown_ == 0) {
      fault_kind_ = FaultKind::kNone;
      throw InjectedFailure(std::string("vattn: injected failure of ") + what);
    }
  }

  size_t page_bytes_;
  std::atomic<uint64_t> creates_{0}, destroys_{0}, maps_{0}, unmaps_{0};
  std::mutex fault_mu_;
  FaultKind fault_kind_ = FaultKind::kNone;
  int64_t fault_countdown_ = 0;
};

}  // namespace memory
}  // namespace vattn
