#pragma once
// VirtualBuffer: one reserved virtual range (no memory behind it until pages are mapped),
// given back when the buffer dies. Its address never changes, which is what keeps the views
// handed to kernels (and captured CUDA graphs) valid while the cache grows and shrinks.
// An optional lead (guard) of `lead` bytes is reserved just before base(): the cache manager
// keeps a page mapped there so that tensor views can start at an always-mapped address.
#include <cstddef>
#include <cstdint>

#include "memory/backend.h"

namespace vattn {
namespace memory {

class VirtualBuffer {
 public:
  VirtualBuffer(PhysicalBackend& backend, size_t bytes, size_t lead = 0)
      : backend_(backend), bytes_(bytes), lead_(lead), base_(backend.reserve(bytes + lead) + lead), owner_(true) {}
  // A part of a range reserved by another VirtualBuffer (which must outlive this one): base is
  // where its bytes begin, the lead lies just before it. Releases nothing.
  struct Borrowed {};
  VirtualBuffer(PhysicalBackend& backend, Borrowed, uintptr_t base, size_t bytes, size_t lead)
      : backend_(backend), bytes_(bytes), lead_(lead), base_(base), owner_(false) {}
  ~VirtualBuffer() {
    if (owner_) backend_.release(base_ - lead_, bytes_ + lead_);
  }
  VirtualBuffer(const VirtualBuffer&) = delete;
  VirtualBuffer& operator=(const VirtualBuffer&) = delete;

  uintptr_t base() const { return base_; }
  size_t bytes() const { return bytes_; }
  uintptr_t lead_base() const { return base_ - lead_; }  // start of the guard
  size_t lead() const { return lead_; }

 private:
  PhysicalBackend& backend_;
  size_t bytes_;
  size_t lead_;
  uintptr_t base_;
  bool owner_;
};

}  // namespace memory
}  // namespace vattn
