#include "memory/page_pool.h"

#include <string>
#include <utility>

namespace vattn {
namespace memory {

size_t PagePool::creatable() const {
  if (max_pages_ == 0) return static_cast<size_t>(-1) / 2;
  return created_ + pending_ >= max_pages_ ? 0 : max_pages_ - created_ - pending_;
}

PageHandle PagePool::create() {
  if (creatable() == 0) {
    throw OutOfMemory("vattn: max_physical_bytes reached (" + std::to_string(max_pages_) + " pages of " +
                      std::to_string(backend_.page_bytes()) + " bytes)");
  }
  const PageHandle h = backend_.create_page();
  ++created_;
  return h;
}

PageHandle PagePool::acquire(bool* dirty) {
  if (!free_.empty()) {
    PageHandle h;
    if (clean_ > 0) {  // the last clean page; the last dirty one takes its place
      h = free_[clean_ - 1];
      free_[clean_ - 1] = free_.back();
      --clean_;
      if (dirty) *dirty = false;
    } else {
      h = free_.back();
      if (dirty) *dirty = true;
    }
    free_.pop_back();
    return h;
  }
  if (dirty) *dirty = !backend_.created_pages_are_zero();
  return create();
}

void PagePool::release(PageHandle h, bool dirty) {
  free_.push_back(h);
  if (!dirty) {  // move it into the clean prefix
    std::swap(free_[clean_], free_.back());
    ++clean_;
  }
}

bool PagePool::begin_create() {
  if (creatable() == 0) return false;
  ++pending_;
  return true;
}

void PagePool::finish_create(PageHandle h, bool dirty) {
  --pending_;
  ++created_;
  release(h, dirty);
}

void PagePool::abort_create() { --pending_; }

void PagePool::destroy(PageHandle h) noexcept {
  backend_.destroy_page(h);
  --created_;
}

void PagePool::trim(size_t keep) noexcept {
  while (free_.size() > keep) {  // dirty pages go first (the back)
    destroy(free_.back());
    free_.pop_back();
    if (clean_ > free_.size()) clean_ = free_.size();
  }
}

bool PagePool::fill(size_t target) {
  while (free_.size() < target) {
    if (creatable() == 0) return false;
    release(create(), !backend_.created_pages_are_zero());
  }
  return true;
}

}  // namespace memory
}  // namespace vattn
