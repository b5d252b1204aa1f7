#pragma once
// PagePool: the physical pages of one cache that are not mapped anywhere, plus the cap on all
// pages the cache may create (mapped + pooled). Reusing pooled pages keeps cuMemCreate (slow,
// may fail) off the hot path; pre-creating them (prealloc) makes growth map-only.
// Not thread-safe: the cache manager serializes access under its mutex.
#include <cstddef>
#include <vector>

#include "memory/backend.h"

namespace vattn {
namespace memory {

class PagePool {
 public:
  // max_pages == 0: no cap.
  PagePool(PhysicalBackend& backend, size_t max_pages) : backend_(backend), max_pages_(max_pages) {}
  ~PagePool() { trim(0); }
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  size_t pooled() const { return free_.size(); }
  size_t created() const { return created_; }  // pages alive: mapped + pooled
  size_t max_pages() const { return max_pages_; }
  // Pages that could still be created under the cap.
  size_t creatable() const;

  // A pooled page if there is one, else a new page. Throws OutOfMemory at the cap (nothing
  // changes then) or passes on the backend's failure.
  PageHandle acquire();
  // A page created fresh (never from the pool); same failures as acquire.
  PageHandle create();
  // Takes back a page that is no longer mapped.
  void release(PageHandle h) { free_.push_back(h); }
  // Destroys a page that is no longer mapped (its memory goes back to the system).
  void destroy(PageHandle h) noexcept;
  // Destroys pooled pages until at most keep remain.
  void trim(size_t keep) noexcept;
  // Creates pages into the pool until it holds target (bounded by the cap). Returns whether the
  // target was reached; on failure the pages made so far stay pooled.
  bool fill(size_t target);

 private:
  PhysicalBackend& backend_;
  size_t max_pages_;
  size_t created_ = 0;
  std::vector<PageHandle> free_;
};

}  // namespace memory
}  // namespace vattn
