#pragma once
// PagePool: the physical pages of one cache that are not mapped anywhere, plus the cap on all
// pages the cache may create (mapped + pooled + being created). Reusing pooled pages keeps
// cuMemCreate (slow, may fail) off the hot path; pre-creating them (prealloc, or the background
// thread) makes growth map-only.
// Not thread-safe: the cache manager serializes access under its mutex. The background thread
// creates pages outside that mutex through begin_create / finish_create: the page counts against
// the cap from begin_create on, so the cap holds while the creation runs unlocked.
// With scrubbing (CacheManager's scrub_freed) a pooled page carries whether it may hold another
// request's bytes (dirty) or reads as zeros (clean); acquire prefers clean pages.
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
  size_t pooled_clean() const { return clean_; }
  size_t created() const { return created_; }  // pages alive: mapped + pooled
  size_t pending() const { return pending_; }  // being created outside the manager's mutex
  size_t max_pages() const { return max_pages_; }
  // Pages that could still be created under the cap.
  size_t creatable() const;

  // A pooled page if there is one (clean ones first; *dirty tells which it was), else a new
  // page. Throws OutOfMemory at the cap (nothing changes then) or passes on the backend's failure.
  PageHandle acquire(bool* dirty = nullptr);
  // A page created fresh (never from the pool); same failures as acquire.
  PageHandle create();
  // Takes back a page that is no longer mapped (dirty: it may hold a request's bytes).
  void release(PageHandle h, bool dirty = false);
  // Background creation: begin_create claims one page of the cap (false at the cap); then
  // exactly one of finish_create (the page joins the pool, clean or not) or abort_create.
  bool begin_create();
  void finish_create(PageHandle h, bool dirty);
  void abort_create();
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
  size_t pending_ = 0;
  size_t clean_ = 0;  // free_[0, clean_) are clean, the rest dirty
  std::vector<PageHandle> free_;
};

}  // namespace memory
}  // namespace vattn
