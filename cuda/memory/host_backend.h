#pragma once
// HostBackend: the virtual-memory model of the CUDA driver rebuilt from Linux primitives, so
// the whole manager runs (and is tested) on any Linux machine.
//   reserve  mmap(PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE)   (address space only)
//   page     a page-sized offset of one memfd                            (physical memory)
//   map      mmap(PROT_READ|PROT_WRITE, MAP_SHARED|MAP_FIXED, memfd, offset)
//   unmap    the same read-only anonymous mapping put back over the range (reads give zeros)
//   destroy  fallocate(PUNCH_HOLE|KEEP_SIZE) on the offset: the memory really goes back
#include <cstddef>
#include <mutex>
#include <vector>

#include "memory/backend.h"

namespace vattn {
namespace memory {

class HostBackend final : public PhysicalBackend {
 public:
  // page_bytes: a multiple of the OS page size (0: 2 MiB, like CUDA's usual granularity).
  // commit: allocate a page's memory when it is created (fallocate), like cuMemCreate does;
  // false leaves it to the first touch (used by the accounting-only benchmark).
  explicit HostBackend(size_t page_bytes = 0, bool commit = true);
  ~HostBackend() override;

  bool is_device() const override { return false; }
  std::string name() const override { return "host"; }
  bool created_pages_are_zero() const override { return true; }  // a new memfd block reads as zeros
  size_t resident_bytes() const override;                        // memfd st_blocks * 512
  void synchronize() override {}                                 // the CPU writes synchronously
  void zero(uintptr_t addr, size_t bytes, uintptr_t stream, bool wait) override;
  void copy(uintptr_t dst, uintptr_t src, size_t bytes, uintptr_t stream) override;

  static size_t os_page_bytes();

 protected:
  uintptr_t do_reserve(size_t bytes) override;
  void do_release(uintptr_t addr, size_t bytes) noexcept override;
  PageHandle do_create_page() override;
  void do_destroy_page(PageHandle h) noexcept override;
  void do_map(uintptr_t addr, const PageHandle* pages, size_t n) override;
  void do_unmap(uintptr_t addr, size_t bytes) override;

 private:
  int fd_ = -1;
  bool commit_;
  // Guards the offset bookkeeping below: pages are created by the background thread while the
  // manager's thread may destroy others.
  std::mutex mu_;
  size_t file_pages_ = 0;                 // memfd size in pages (grows, stays sparse)
  std::vector<PageHandle> free_offsets_;  // page indices of the file not holding a page
  size_t next_offset_ = 0;                // first never-used page index
};

}  // namespace memory
}  // namespace vattn
