#include "memory/host_backend.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>
#include <string>

namespace vattn {
namespace memory {

namespace {

std::string errno_text(const char* what, int err) {
  return std::string("vattn host backend: ") + what + " failed: " + std::strerror(err);
}

// ENOMEM / ENOSPC mean the machine is out of memory: a MemoryError, not a RuntimeError.
[[noreturn]] void throw_errno(const char* what, int err) {
  if (err == ENOMEM || err == ENOSPC) throw OutOfMemory(errno_text(what, err));
  throw std::runtime_error(errno_text(what, err));
}

constexpr int kReserveFlags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
// Unmapped parts of a reservation are private anonymous memory that may only be read: every read
// lands on the kernel's shared zero page, so reading any element of a kv() view (print(view),
// view.sum()) gives zeros instead of a segmentation fault, and it costs no physical memory.
// Writes there still fault, which is why the library's own ops check the mapping first.
constexpr int kUnmappedProt = PROT_READ;

}  // namespace

size_t HostBackend::os_page_bytes() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

HostBackend::HostBackend(size_t page_bytes, bool commit) : PhysicalBackend(0), commit_(commit) {
  const size_t os_page = os_page_bytes();
  if (page_bytes == 0) page_bytes = size_t(2) << 20;
  if (page_bytes % os_page != 0) {
    throw std::invalid_argument("vattn: page_bytes=" + std::to_string(page_bytes) +
                                " must be a positive multiple of the OS page size (" + std::to_string(os_page) + ")");
  }
  set_page_bytes(page_bytes);
  fd_ = memfd_create("vattn-kv", MFD_CLOEXEC);
  if (fd_ < 0) throw_errno("memfd_create", errno);
}

HostBackend::~HostBackend() {
  if (fd_ >= 0) close(fd_);
}

size_t HostBackend::resident_bytes() const {
  struct stat st;
  if (fstat(fd_, &st) != 0) return 0;
  return static_cast<size_t>(st.st_blocks) * 512;
}

uintptr_t HostBackend::do_reserve(size_t bytes) {
  if (bytes == 0 || bytes % page_bytes() != 0) {
    throw std::invalid_argument("vattn: reservation size must be a positive multiple of the page size");
  }
  // Over-reserve by one page so the range can be aligned to the page size (like CUDA's
  // alignment argument); the unaligned head and tail are given back right away.
  const size_t page = page_bytes();
  void* p = mmap(nullptr, bytes + page, kUnmappedProt, kReserveFlags, -1, 0);
  if (p == MAP_FAILED) throw_errno("mmap (reserve)", errno);
  const uintptr_t raw = reinterpret_cast<uintptr_t>(p);
  const uintptr_t aligned = (raw + page - 1) / page * page;
  if (aligned > raw) munmap(p, aligned - raw);
  const uintptr_t end = raw + bytes + page;
  if (end > aligned + bytes) munmap(reinterpret_cast<void*>(aligned + bytes), end - (aligned + bytes));
  return aligned;
}

void HostBackend::do_release(uintptr_t addr, size_t bytes) noexcept { munmap(reinterpret_cast<void*>(addr), bytes); }

PageHandle HostBackend::do_create_page() {
  std::lock_guard<std::mutex> lk(mu_);
  size_t index;
  if (!free_offsets_.empty()) {
    index = free_offsets_.back();
  } else {
    index = next_offset_;
    if (index >= file_pages_) {
      // Grow the (sparse) file geometrically; existing mappings are unaffected.
      const size_t want = file_pages_ < 16 ? 16 : file_pages_ * 2;
      if (ftruncate(fd_, static_cast<off_t>(want * page_bytes())) != 0) throw_errno("ftruncate", errno);
      file_pages_ = want;
    }
  }
  if (commit_) {
    const int rc = fallocate(fd_, 0, static_cast<off_t>(index * page_bytes()), static_cast<off_t>(page_bytes()));
    if (rc != 0) throw_errno("fallocate (create page)", errno);
  }
  // Commit the choice only now that nothing can fail.
  if (!free_offsets_.empty())
    free_offsets_.pop_back();
  else
    ++next_offset_;
  return index;
}

void HostBackend::do_destroy_page(PageHandle h) noexcept {
  std::lock_guard<std::mutex> lk(mu_);
  // Punching the hole frees the memory; the file keeps its size (and stays sparse).
  fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(h * page_bytes()),
            static_cast<off_t>(page_bytes()));
  free_offsets_.push_back(h);
}

void HostBackend::do_map(uintptr_t addr, const PageHandle* pages, size_t n) {
  // One mmap per run of pages that are also consecutive in the file. With committed pages (their
  // memory exists since fallocate) MAP_POPULATE fills the page table in the same call: otherwise the
  // first write to each 4 KiB of a page is a fault of its own, which on the 2-core VM cost 35-37 ms
  // per 64 MiB against 7 ms populated (/tmp/popul.py), paid by the append kernel. Uncommitted pages
  // keep faulting in at first touch (populating them would allocate them at map time).
  const size_t page = page_bytes();
  const int flags = MAP_SHARED | MAP_FIXED | (commit_ ? MAP_POPULATE : 0);
  size_t i = 0;
  while (i < n) {
    size_t j = i + 1;
    while (j < n && pages[j] == pages[j - 1] + 1) ++j;
    void* p = mmap(reinterpret_cast<void*>(addr + i * page), (j - i) * page, PROT_READ | PROT_WRITE, flags, fd_,
                   static_cast<off_t>(pages[i] * page));
    if (p == MAP_FAILED) {
      const int err = errno;
      if (i > 0) {  // all or nothing: put the zero memory back over what this call mapped
        mmap(reinterpret_cast<void*>(addr), i * page, kUnmappedProt, kReserveFlags | MAP_FIXED, -1, 0);
      }
      throw_errno("mmap (map page)", err);
    }
    i = j;
  }
}

void HostBackend::zero(uintptr_t addr, size_t bytes, uintptr_t, bool) {
  std::memset(reinterpret_cast<void*>(addr), 0, bytes);
}

void HostBackend::copy(uintptr_t dst, uintptr_t src, size_t bytes, uintptr_t) {
  std::memcpy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
}

void HostBackend::do_unmap(uintptr_t addr, size_t bytes) {
  // Mapping the reservation's read-only zero memory back (instead of munmap) keeps the address
  // range ours, so no other allocation can land inside the cache, and reads there stay safe.
  void* p = mmap(reinterpret_cast<void*>(addr), bytes, kUnmappedProt, kReserveFlags | MAP_FIXED, -1, 0);
  if (p == MAP_FAILED) throw_errno("mmap (unmap)", errno);
}

}  // namespace memory
}  // namespace vattn
