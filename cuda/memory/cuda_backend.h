#pragma once
// CudaBackend: the CUDA driver's virtual-memory management (cuMemAddressReserve, cuMemCreate,
// cuMemMap, cuMemSetAccess, cuMemUnmap). Only built with VATTN_WITH_CUDA. The driver library is
// never linked: every entry point is looked up at run time through the (statically linked)
// runtime, so the module still imports on machines without a driver.
#if defined(VATTN_WITH_CUDA)
#include <cuda.h>

#include <atomic>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "memory/backend.h"

namespace vattn {
namespace memory {

struct DriverApi;  // the resolved entry points (cuda_backend.cpp)

class CudaBackend final : public PhysicalBackend {
 public:
  // page_bytes: 0 = the device's allocation granularity; otherwise a multiple of it.
  CudaBackend(int device, size_t page_bytes = 0);
  ~CudaBackend() override;

  bool is_device() const override { return true; }
  std::string name() const override { return "cuda"; }
  bool created_pages_are_zero() const override { return false; }
  size_t resident_bytes() const override { return live_pages_.load() * page_bytes(); }
  void synchronize() override;  // cuCtxSynchronize: every stream of the device
  void record_use(uintptr_t stream) override;
  void wait_uses() override;
  void zero(uintptr_t addr, size_t bytes, uintptr_t stream, bool wait) override;
  void copy(uintptr_t dst, uintptr_t src, size_t bytes, uintptr_t stream) override;
  int device() const { return ordinal_; }
  size_t granularity() const { return granularity_; }

  // Granularity of a device without building a backend (vattn.info()).
  static size_t query_granularity(int device);

  // The driver this process sees against the runtime vattn links statically (CUDART_VERSION).
  struct DriverStatus {
    int driver_version = 0;           // cudaDriverGetVersion: 0 without a driver
    int runtime_version = 0;          // CUDART_VERSION vattn was built with
    int required_driver_version = 0;  // the oldest driver API version that runtime runs on
    bool ok = false;
    std::string message;  // empty when ok; else what is wrong and what is needed
  };
  static DriverStatus driver_status();

 protected:
  uintptr_t do_reserve(size_t bytes) override;
  void do_release(uintptr_t addr, size_t bytes) noexcept override;
  PageHandle do_create_page() override;
  void do_destroy_page(PageHandle h) noexcept override;
  void do_map(uintptr_t addr, const PageHandle* pages, size_t n) override;
  void do_unmap(uintptr_t addr, size_t bytes) override;

 private:
  const DriverApi& api_;
  int ordinal_;
  CUdevice dev_ = 0;
  CUcontext ctx_ = nullptr;
  size_t granularity_ = 0;
  std::atomic<size_t> live_pages_{0};  // created by the background thread, destroyed by others
  // The last event recorded on each stream that used the memory (record_use); unmap waits on
  // these. Accessed under the manager's mutex only.
  std::vector<std::pair<uintptr_t, CUevent>> uses_;
  CUstream zero_stream_ = nullptr;  // zero(wait = true): the backend's own non-blocking stream
};

}  // namespace memory
}  // namespace vattn
#endif  // VATTN_WITH_CUDA
