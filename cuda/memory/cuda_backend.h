#pragma once
// CudaBackend: the CUDA driver's virtual-memory management (cuMemAddressReserve, cuMemCreate,
// cuMemMap, cuMemSetAccess, cuMemUnmap). Only built with VATTN_WITH_CUDA. The driver library is
// never linked: every entry point is looked up at run time through the (statically linked)
// runtime, so the module still imports on machines without a driver.
#if defined(VATTN_WITH_CUDA)
#include <cuda.h>

#include <cstddef>
#include <string>

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
  size_t resident_bytes() const override { return live_pages_ * page_bytes(); }
  void synchronize() override;
  int device() const { return ordinal_; }
  size_t granularity() const { return granularity_; }

  // Granularity of a device without building a backend (vattn.info()).
  static size_t query_granularity(int device);

 protected:
  uintptr_t do_reserve(size_t bytes) override;
  void do_release(uintptr_t addr, size_t bytes) noexcept override;
  PageHandle do_create_page() override;
  void do_destroy_page(PageHandle h) noexcept override;
  void do_map(uintptr_t addr, PageHandle h) override;
  void do_unmap(uintptr_t addr, size_t bytes) override;

 private:
  const DriverApi& api_;
  int ordinal_;
  CUdevice dev_ = 0;
  CUcontext ctx_ = nullptr;
  size_t granularity_ = 0;
  size_t live_pages_ = 0;
};

}  // namespace memory
}  // namespace vattn
#endif  // VATTN_WITH_CUDA
