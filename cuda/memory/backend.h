#pragma once
// PhysicalBackend: the few operations the cache manager needs from a virtual-memory system.
// Two implementations: HostBackend (Linux memfd, always built, makes the whole manager testable
// without a GPU) and CudaBackend (CUDA driver VMM, only with VATTN_WITH_CUDA).
//
// The public methods are non-virtual wrappers (NVI) so that call counting and fault injection
// for tests live in one place instead of in every backend.
#include <cstddef>
#include <cstdint>
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
  uint64_t creates = 0, destroys = 0, maps = 0, unmaps = 0;  // successful calls
};

class PhysicalBackend {
 public:
  virtual ~PhysicalBackend() = default;
  PhysicalBackend(const PhysicalBackend&) = delete;
  PhysicalBackend& operator=(const PhysicalBackend&) = delete;

  // Bytes of one physical page: the granularity of every map / unmap.
  size_t page_bytes() const { return page_bytes_; }
  virtual bool is_device() const = 0;
  virtual std::string name() const = 0;

  // Virtual ranges: page-aligned, size a multiple of page_bytes(); nothing is mapped.
  uintptr_t reserve(size_t bytes) { return do_reserve(bytes); }
  void release(uintptr_t addr, size_t bytes) noexcept { do_release(addr, bytes); }

  // Physical pages. create_page throws OutOfMemory when the memory is exhausted.
  PageHandle create_page() {
    consume_fault(FaultKind::kCreate, "create_page");
    PageHandle h = do_create_page();
    ++counters_.creates;
    return h;
  }
  void destroy_page(PageHandle h) noexcept {
    do_destroy_page(h);
    ++counters_.destroys;
  }

  // Map one page at addr (page aligned, inside a reservation, currently unmapped).
  void map(uintptr_t addr, PageHandle h) {
    consume_fault(FaultKind::kMap, "map");
    do_map(addr, h);
    ++counters_.maps;
  }
  // Unmaps whole pages, each range [addr, addr + bytes). Synchronizes once first: work still
  // in flight (kernels on any stream) may read the pages, so they go only once it is done.
  struct Range {
    uintptr_t addr;
    size_t bytes;
  };
  void unmap(const Range* ranges, size_t n) {
    if (n == 0) return;
    synchronize();
    for (size_t i = 0; i < n; ++i) {
      do_unmap(ranges[i].addr, ranges[i].bytes);
      counters_.unmaps += ranges[i].bytes / page_bytes_;
    }
  }

  // Bytes of physical memory really held (measured where the backend can, e.g. memfd blocks).
  virtual size_t resident_bytes() const = 0;
  // Waits until all work that may touch the mapped memory is done.
  virtual void synchronize() = 0;

  // Test hook: the n-th (1-based) next call of that kind fails (n <= 0 clears it).
  void inject_failure(FaultKind kind, int64_t n) {
    fault_kind_ = n > 0 ? kind : FaultKind::kNone;
    fault_countdown_ = n;
  }
  const BackendCounters& counters() const { return counters_; }

 protected:
  explicit PhysicalBackend(size_t page_bytes) : page_bytes_(page_bytes) {}
  void set_page_bytes(size_t b) { page_bytes_ = b; }

  virtual uintptr_t do_reserve(size_t bytes) = 0;
  virtual void do_release(uintptr_t addr, size_t bytes) noexcept = 0;
  virtual PageHandle do_create_page() = 0;
  virtual void do_destroy_page(PageHandle h) noexcept = 0;
  virtual void do_map(uintptr_t addr, PageHandle h) = 0;
  // Called only after synchronize().
  virtual void do_unmap(uintptr_t addr, size_t bytes) = 0;

 private:
  void consume_fault(FaultKind kind, const char* what) {
    if (fault_kind_ != kind) return;
    if (--fault_countdown_ == 0) {
      fault_kind_ = FaultKind::kNone;
      throw InjectedFailure(std::string("vattn: injected failure of ") + what);
    }
  }

  size_t page_bytes_;
  BackendCounters counters_;
  FaultKind fault_kind_ = FaultKind::kNone;
  int64_t fault_countdown_ = 0;
};

}  // namespace memory
}  // namespace vattn
