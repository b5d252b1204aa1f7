#pragma once
// VirtualBuffer: one reserved virtual range (no memory behind it until pages are mapped),
// given back when the buffer dies. Its address never changes, which is what keeps the views
// handed to kernels (and captured CUDA graphs) valid while the cache grows and shrinks.
#include <cstddef>
#include <cstdint>

#include "memory/backend.h"

namespace vattn {
namespace memory {

class VirtualBuffer {
 public:
  VirtualBuffer(PhysicalBackend& backend, size_t bytes)
      : backend_(backend), bytes_(bytes), base_(backend.reserve(bytes)) {}
  ~VirtualBuffer() { backend_.release(base_, bytes_); }
  VirtualBuffer(const VirtualBuffer&) = delete;
  VirtualBuffer& operator=(const VirtualBuffer&) = delete;

  uintptr_t base() const { return base_; }
  size_t bytes() const { return bytes_; }

 private:
  PhysicalBackend& backend_;
  size_t bytes_;
  uintptr_t base_;
};

}  // namespace memory
}  // namespace vattn
