#include "memory/page_pool.h"

#include <string>

namespace vattn {
namespace memory {

size_t PagePool::creatable() const {
  if (max_pages_ == 0) return static_cast<size_t>(-1) / 2;
  return created_ >= max_pages_ ? 0 : max_pages_ - created_;
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

PageHandle PagePool::acquire() {
  if (!free_.empty()) {
    const PageHandle h = free_.back();
    free_.pop_back();
    return h;
  }
  return create();
}

void PagePool::destroy(PageHandle h) noexcept {
  backend_.destroy_page(h);
  --created_;
}

void PagePool::trim(size_t keep) noexcept {
  while (free_.size() > keep) {
    destroy(free_.back());
    free_.pop_back();
  }
}

bool PagePool::fill(size_t target) {
  while (free_.size() < target) {
    if (creatable() == 0) return false;
    free_.push_back(create());
  }
  return true;
}

}  // namespace memory
}  // namespace vattn
