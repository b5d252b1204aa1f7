#include "memory/cache_manager.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

namespace vattn {
namespace memory {

namespace {

size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

void require_positive(int64_t v, const char* name) {
  if (v <= 0)
    throw std::invalid_argument(std::string("vattn: ") + name + " must be positive, got " + std::to_string(v));
}

}  // namespace

// ---------------------------------------------------------------- construction / teardown

CacheManager::CacheManager(std::unique_ptr<PhysicalBackend> backend, const Geometry& g, Layout layout,
                           const ManagerOptions& opt)
    : backend_(std::move(backend)), geom_(g), layout_(layout), opt_(opt) {
  if (!backend_) throw std::invalid_argument("vattn: no backend");
  require_positive(g.num_layers, "num_layers");
  require_positive(g.k_record_bytes, "K record bytes");
  require_positive(g.v_record_bytes, "V record bytes");
  require_positive(g.max_batch, "max_batch");
  require_positive(g.max_seq_len, "max_seq_len");
  if (g.max_batch > std::numeric_limits<int32_t>::max() || g.max_seq_len > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("vattn: max_batch and max_seq_len must fit in int32");
  }
  if (opt.lookahead_tokens < 0) throw std::invalid_argument("vattn: lookahead_tokens must be >= 0");
  page_ = backend_->page_bytes();
  region_token_bytes_ = g.region_token_bytes(layout == Layout::kTokenMajor);
  const long double slot_bytes = static_cast<long double>(g.max_seq_len) * region_token_bytes_;
  require_positive(g.head_regions, "head_regions");
  if (layout != Layout::kHeadMajor && g.head_regions != 1) {
    throw std::invalid_argument("vattn: head_regions must be 1 outside head_major");
  }
  const size_t nregions = layout == Layout::kTokenMajor ? 1 : static_cast<size_t>(2 * g.num_layers * g.head_regions);
  if (slot_bytes * g.max_batch * nregions > static_cast<long double>(size_t(1) << 62)) {
    throw std::invalid_argument("vattn: the cache geometry needs more virtual address space than exists");
  }
  slot_stride_ = round_up(static_cast<size_t>(g.max_seq_len) * region_token_bytes_, page_);

  const size_t cap_pages = opt.max_physical_bytes / page_;
  if (opt.max_physical_bytes > 0 && cap_pages < nregions) {
    throw std::invalid_argument("vattn: max_physical_bytes=" + std::to_string(opt.max_physical_bytes) +
                                " is smaller than one page group (" + std::to_string(nregions) + " x " +
                                std::to_string(page_) + " bytes)");
  }
  const size_t prealloc_pages = (opt.prealloc_bytes + page_ - 1) / page_;
  if (opt.max_physical_bytes > 0 && prealloc_pages > cap_pages) {
    throw std::invalid_argument("vattn: prealloc_bytes exceeds max_physical_bytes");
  }

  const size_t region_bytes = static_cast<size_t>(g.max_batch) * slot_stride_;
  if (layout == Layout::kHeadMajor) {
    region_spacing_ = page_ + region_bytes;
    arena_ = std::make_unique<VirtualBuffer>(*backend_, nregions * region_spacing_);
    for (size_t r = 0; r < nregions; ++r) {
      const uintptr_t base = arena_->base() + r * region_spacing_ + page_;
      regions_.push_back(
          std::make_unique<VirtualBuffer>(*backend_, VirtualBuffer::Borrowed{}, base, region_bytes, page_));
    }
  } else {
    for (size_t r = 0; r < nregions; ++r) {
      regions_.push_back(std::make_unique<VirtualBuffer>(*backend_, region_bytes, page_));
    }
  }
  const bool map_guard = opt.map_guard < 0 ? backend_->is_device() : opt.map_guard != 0;
  if (map_guard) {
    guard_page_ = backend_->create_page();
    size_t r = 0;
    try {
      for (; r < nregions; ++r) backend_->map(regions_[r]->lead_base(), guard_page_);
      backend_->zero(regions_[0]->lead_base(), page_, 0, /*wait=*/true);  // reads of it give zeros
    } catch (...) {
      std::vector<PhysicalBackend::Range> ranges;
      for (size_t j = 0; j < r; ++j) ranges.push_back({regions_[j]->lead_base(), page_});
      try {
        backend_->unmap(ranges.data(), ranges.size());
      } catch (...) {}
      backend_->destroy_page(guard_page_);
      throw;
    }
    guard_page_mapped_ = true;
  }
  pool_ = std::make_unique<PagePool>(*backend_, cap_pages);
  if (!pool_->fill(prealloc_pages)) throw OutOfMemory("vattn: cannot pre-create prealloc_bytes of pages");
  slots_.resize(static_cast<size_t>(g.max_batch));
  for (Slot& s : slots_) {
    s.pages.resize(nregions);
    s.deficit.assign(nregions, 0);
  }
  if (opt.background) worker_ = std::thread([this] { worker_main(); });
}

CacheManager::~CacheManager() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  idle_cv_.notify_all();
  created_cv_.notify_all();
  if (worker_.joinable()) worker_.join();
  // Unmap everything (after one synchronize), then destroy the pages, then the reservations.
  // The cache is going away, so the whole device is drained once (kernels on a stream the cache
  // was never told about may still read it); where that is refused (a graph being captured),
  // the recorded stream uses are waited for instead (unmap does that anyway).
  std::vector<PhysicalBackend::Range> ranges;
  for (size_t i = 0; i < slots_.size(); ++i) {
    for (size_t r = 0; r < regions_.size(); ++r) {
      const size_t k = slots_[i].pages[r].size();
      if (k > 0) ranges.push_back({page_addr(r, static_cast<int64_t>(i), 0), k * page_});
    }
  }
  if (guard_page_mapped_) {
    for (const auto& r : regions_) ranges.push_back({r->lead_base(), page_});
  }
  try {
    backend_->synchronize();
  } catch (...) {}
  try {
    backend_->unmap(ranges.data(), ranges.size());
  } catch (...) {  // nothing to report to from a destructor; the pages are destroyed regardless
  }
  for (Slot& s : slots_) {
    for (auto& region_pages : s.pages) {
      for (PageHandle h : region_pages) {
        if (drop_ref(h)) pool_->destroy(h);  // a shared page once, with its last mapping
      }
    }
  }
  if (guard_page_mapped_) backend_->destroy_page(guard_page_);
  pool_.reset();
  regions_.clear();
  arena_.reset();
}

// ---------------------------------------------------------------- helpers

void CacheManager::check_slot(int64_t slot) const {
  if (slot < 0 || slot >= geom_.max_batch) {
    throw std::out_of_range("vattn: slot " + std::to_string(slot) + " out of range [0, " +
                            std::to_string(geom_.max_batch) + ")");
  }
}

CacheManager::Slot& CacheManager::live_slot(int64_t slot) {
  check_slot(slot);
  Slot& s = slots_[static_cast<size_t>(slot)];
  if (!s.live) {
    throw std::invalid_argument("vattn: slot " + std::to_string(slot) +
                                " is not allocated (never allocated or already freed)");
  }
  return s;
}

size_t CacheManager::pages_for(int64_t tokens) const {
  const int64_t a = geom_.align_tokens;
  if (a > 1) tokens = (tokens + a - 1) / a * a;  // whole groups (Geometry::align_tokens)
  const size_t bytes = static_cast<size_t>(tokens) * static_cast<size_t>(region_token_bytes_);
  return (bytes + page_ - 1) / page_;
}

size_t CacheManager::region_need(const Slot& s, size_t r, int64_t tokens) const {
  return pages_for(std::max<int64_t>(0, tokens - s.deficit[r]));
}

int64_t CacheManager::capacity(const Slot& s) const {
  int64_t cap = geom_.max_seq_len;
  for (size_t r = 0; r < regions_.size(); ++r) {
    const int64_t held = static_cast<int64_t>(s.pages[r].size() * page_ / static_cast<size_t>(region_token_bytes_));
    cap = std::min(cap, held + s.deficit[r]);
  }
  return cap;
}

uintptr_t CacheManager::page_addr(size_t region, int64_t slot, size_t index) const {
  return regions_[region]->base() + static_cast<size_t>(slot) * slot_stride_ + index * page_;
}

size_t CacheManager::surplus_pages(const Slot& s) const {
  if (!s.live) return s.mapped;
  size_t surplus = 0;
  for (size_t r = 0; r < regions_.size(); ++r) {
    const size_t need = need_pages(s, r);
    if (s.pages[r].size() > need) surplus += s.pages[r].size() - need;
  }
  return surplus;
}

size_t CacheManager::available_pages(size_t need, const std::vector<char>& protect, size_t own) const {
  size_t available = pool_->pooled() + std::min(pool_->creatable(), need) + own;
  for (size_t i = 0; i < slots_.size() && available < need; ++i) {
    if (!protect[i]) available += surplus_pages(slots_[i]);
  }
  return available;
}

OutOfMemory CacheManager::out_of_memory(size_t need, size_t available) const {
  return OutOfMemory("vattn: out of KV-cache memory: " + std::to_string(need) + " pages of " + std::to_string(page_) +
                     " bytes needed, " + std::to_string(available) + " available" +
                     (pool_->max_pages() ? " (max_physical_bytes=" + std::to_string(pool_->max_pages() * page_) + ")"
                                         : std::string()));
}

std::vector<size_t> CacheManager::plan_drop(const Slot& s, size_t count) const {
  const size_t R = regions_.size();
  std::vector<size_t> spare(R), drop(R, 0);
  if (count == 0) return drop;
  for (size_t r = 0; r < R; ++r) {
    const size_t need = need_pages(s, r);
    spare[r] = s.pages[r].size() > need ? s.pages[r].size() - need : 0;
  }
  size_t total = 0, top = 0;
  for (size_t x : spare) {
    total += x;
    top = std::max(top, x);
  }
  if (count >= total) return spare;
  // Water-filling: above(h) = pages beyond level h over the regions. Find the largest h with
  // above(h) >= count (above(0) = total > count), lower every region to h + 1, then take the rest
  // one page each from regions still above h.
  auto above = [&](size_t h) {
    size_t n = 0;
    for (size_t x : spare) n += x > h ? x - h : 0;
    return n;
  };
  size_t lo = 0, hi = top;  // above(lo) >= count > above(hi)
  while (hi - lo > 1) {
    const size_t mid = lo + (hi - lo) / 2;
    (above(mid) >= count ? lo : hi) = mid;
  }
  size_t taken = 0;
  for (size_t r = 0; r < R; ++r) {
    drop[r] = spare[r] > lo + 1 ? spare[r] - (lo + 1) : 0;
    taken += drop[r];
  }
  for (size_t r = 0; r < R && taken < count; ++r) {
    if (spare[r] > lo) {
      ++drop[r];
      ++taken;
    }
  }
  return drop;
}

size_t CacheManager::idle_pages() const {
  size_t pages = 0;
  for (const Slot& s : slots_) {
    if (!s.live) pages += s.mapped;
  }
  return pool_->pooled() + pages;
}

void CacheManager::note_change() {
  ++epoch_;
  if (worker_.joinable()) work_cv_.notify_one();
}

void CacheManager::update_peak() {
  peak_mapped_bytes_ = std::max<uint64_t>(peak_mapped_bytes_, (mapped_pages_ - shared_extra_) * page_);
}

size_t CacheManager::first_written_page(int64_t tokens) const {
  const int64_t a = geom_.align_tokens;
  const int64_t start = tokens / a * a;  // a write re-encodes its whole group (int4_ch keys)
  return static_cast<size_t>(start) * static_cast<size_t>(region_token_bytes_) / page_;
}

size_t CacheManager::slot_shared_pages(const Slot& s) const {
  if (refs_.empty()) return 0;
  size_t n = 0;
  for (const auto& region_pages : s.pages) {
    for (PageHandle h : region_pages) n += is_shared(h) ? 1 : 0;
  }
  return n;
}

bool CacheManager::drop_ref(PageHandle h) {
  auto it = refs_.find(h);
  if (it == refs_.end()) return true;
  --shared_extra_;
  if (--it->second == 1) refs_.erase(it);
  return false;
}

void CacheManager::scrub(const std::vector<PhysicalBackend::Range>& ranges, uintptr_t stream, bool wait) {
  for (const auto& r : ranges) {
    backend_->zero(r.addr, r.bytes, stream, wait);
    scrubbed_bytes_ += r.bytes;
  }
}

void CacheManager::unmap_pages(int64_t slot, const std::vector<size_t>& drop, std::vector<PageHandle>* out,
                               std::vector<Taken>* stolen) {
  Slot& s = slots_[static_cast<size_t>(slot)];
  std::vector<PhysicalBackend::Range> ranges;
  for (size_t r = 0; r < regions_.size(); ++r) {
    if (drop[r] > 0) ranges.push_back({page_addr(r, slot, s.pages[r].size() - drop[r]), drop[r] * page_});
  }
  if (ranges.empty()) return;
  backend_->unmap(ranges.data(), ranges.size());
  for (size_t r = 0; r < regions_.size(); ++r) {
    const size_t first = s.pages[r].size() - drop[r];
    for (size_t j = first; j < s.pages[r].size(); ++j) {
      if (!drop_ref(s.pages[r][j])) continue;  // still mapped in another slot
      if (out) out->push_back(s.pages[r][j]);
      if (stolen) stolen->push_back(Taken{s.pages[r][j], 2, slot, r, j, true});
    }
    s.pages[r].resize(first);
    s.mapped -= drop[r];
    mapped_pages_ -= drop[r];
  }
}

void CacheManager::unmap_all(int64_t slot) {
  const Slot& s = slots_[static_cast<size_t>(slot)];
  std::vector<size_t> drop(regions_.size());
  for (size_t r = 0; r < drop.size(); ++r) drop[r] = s.pages[r].size();
  std::vector<PageHandle> pages;
  unmap_pages(slot, drop, &pages, nullptr);
  for (PageHandle h : pages) pool_->release(h, true);
}

// Collects `count` unmapped pages: pool first, then new pages under the cap, then (when allowed)
// pages of free slots and the mapped-ahead surplus of live slots not in `protect`. On failure the
// caller undoes `taken`.
void CacheManager::take_pages(size_t count, std::vector<Taken>& taken, bool allow_steal,
                              const std::vector<char>& protect) {
  while (count > 0 && pool_->pooled() > 0) {
    bool dirty = false;
    const PageHandle h = pool_->acquire(&dirty);
    taken.push_back(Taken{h, 0});
    taken.back().dirty = dirty;
    --count;
  }
  while (count > 0 && pool_->creatable() > 0) {
    PageHandle h;
    try {
      h = pool_->create();
    } catch (const OutOfMemory&) {
      if (!allow_steal) throw;
      break;  // the device is full: try the pages idle in free slots below
    }
    taken.push_back(Taken{h, 1});
    taken.back().dirty = !backend_->created_pages_are_zero();
    --count;
  }
  if (count > 0 && allow_steal) {
    std::vector<std::pair<size_t, int64_t>> victims;  // free slots (fewest pages first), then live surplus
    for (size_t i = 0; i < slots_.size(); ++i) {
      const Slot& s = slots_[i];
      const bool is_protected = !protect.empty() && protect[i];
      if (is_protected || surplus_pages(s) == 0) continue;
      victims.push_back({(s.live ? (size_t(1) << 60) : 0) + s.mapped, static_cast<int64_t>(i)});
    }
    std::sort(victims.begin(), victims.end());
    for (const auto& v : victims) {
      if (count == 0) break;
      const std::vector<size_t> drop = plan_drop(slots_[static_cast<size_t>(v.second)], count);
      const size_t before = taken.size();
      unmap_pages(v.second, drop, nullptr, &taken);
      count -= std::min(count, taken.size() - before);
    }
  }
  if (count > 0) {
    throw OutOfMemory("vattn: out of KV-cache memory: " + std::to_string(count) + " more pages of " +
                      std::to_string(page_) + " bytes needed" +
                      (pool_->max_pages() ? " (max_physical_bytes=" + std::to_string(pool_->max_pages() * page_) + ")"
                                          : std::string()));
  }
}

// Gives back what take_pages collected: pooled pages to the pool, new pages destroyed, stolen
// pages mapped back where they were (so the call leaves no trace).
void CacheManager::undo(std::vector<Taken>& taken) noexcept {
  std::vector<Taken> stolen;
  for (const Taken& t : taken) {
    if (t.source == 0)
      pool_->release(t.page, t.dirty);
    else if (t.source == 1)
      pool_->destroy(t.page);
    else
      stolen.push_back(t);
  }
  taken.clear();
  std::sort(stolen.begin(), stolen.end(), [](const Taken& a, const Taken& b) {
    return std::make_tuple(a.victim, a.region, a.index) < std::make_tuple(b.victim, b.region, b.index);
  });
  int64_t broken = -1;  // a victim whose restore failed: the rest of its pages go to the pool
  for (const Taken& t : stolen) {
    Slot& s = slots_[static_cast<size_t>(t.victim)];
    if (t.victim == broken || s.pages[t.region].size() != t.index) {
      pool_->release(t.page, true);
      continue;
    }
    try {
      backend_->map(page_addr(t.region, t.victim, t.index), t.page);
    } catch (...) {
      broken = t.victim;
      pool_->release(t.page, true);
      continue;
    }
    s.pages[t.region].push_back(t.page);
    ++s.mapped;
    ++mapped_pages_;
  }
}

void CacheManager::enforce_watermark() {
  const size_t limit = std::max(opt_.reclaim_watermark_bytes, opt_.prealloc_bytes) / page_;
  size_t idle = idle_pages();
  if (idle <= limit) return;
  size_t excess = idle - limit;
  const size_t from_pool = std::min(excess, pool_->pooled());
  pool_->trim(pool_->pooled() - from_pool);
  excess -= from_pool;
  if (excess == 0) return;
  std::vector<std::pair<size_t, int64_t>> victims;
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (!slots_[i].live && slots_[i].mapped > 0) victims.push_back({slots_[i].mapped, static_cast<int64_t>(i)});
  }
  std::sort(victims.begin(), victims.end());
  for (const auto& v : victims) {
    if (excess == 0) break;
    std::vector<PageHandle> pages;
    unmap_pages(v.second, plan_drop(slots_[static_cast<size_t>(v.second)], excess), &pages, nullptr);
    for (PageHandle h : pages) pool_->destroy(h);
    excess -= std::min(excess, pages.size());
  }
}

// ---------------------------------------------------------------- slots

int64_t CacheManager::alloc(uintptr_t stream) {
  std::lock_guard<std::mutex> lk(mu_);
  int64_t best = -1;
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i].live) continue;
    // The free slot holding the most pages: its mapping is reused as is.
    if (best < 0 || slots_[i].mapped > slots_[static_cast<size_t>(best)].mapped) best = static_cast<int64_t>(i);
  }
  if (best < 0) {
    throw std::runtime_error("vattn: all " + std::to_string(geom_.max_batch) +
                             " slots are in use (max_batch); free a slot first");
  }
  Slot& s = slots_[static_cast<size_t>(best)];
  if (opt_.scrub_freed && s.dirty && s.mapped > 0) {
    // The previous request's bytes go before the slot is handed out (a failure leaves it free).
    std::vector<PhysicalBackend::Range> ranges;
    for (size_t r = 0; r < regions_.size(); ++r) {
      if (!s.pages[r].empty()) ranges.push_back({page_addr(r, best, 0), s.pages[r].size() * page_});
    }
    scrub(ranges, stream, /*wait=*/false);
  }
  s.dirty = false;
  s.live = true;
  s.length = 0;
  s.target = 0;
  std::fill(s.deficit.begin(), s.deficit.end(), 0);
  note_change();
  return best;
}

void CacheManager::free(int64_t slot) {
  std::lock_guard<std::mutex> lk(mu_);
  Slot& s = live_slot(slot);
  // Idle slots hold only private pages (their pages are handed to the next request as they are):
  // a slot that shares pages gives back all of its mappings now (shared ones lose a reference).
  if (slot_shared_pages(s) > 0) unmap_all(slot);
  s.live = false;
  s.length = 0;
  s.target = 0;
  s.dirty = true;
  std::fill(s.deficit.begin(), s.deficit.end(), 0);
  // The pages stay mapped for the next alloc while idle pages stay under the watermark.
  try {
    enforce_watermark();
  } catch (...) {  // the slot is free either way; the pages are reclaimed on a later call
  }
  note_change();
}

bool CacheManager::is_live(int64_t slot) const {
  std::lock_guard<std::mutex> lk(mu_);
  check_slot(slot);
  return slots_[static_cast<size_t>(slot)].live;
}

std::vector<int64_t> CacheManager::live_slots() const {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<int64_t> out;
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i].live) out.push_back(static_cast<int64_t>(i));
  }
  return out;
}

// ---------------------------------------------------------------- growth / shrink

void CacheManager::reserve(const std::vector<int64_t>& slots, const std::vector<int64_t>& tokens, uintptr_t stream,
                           const std::vector<std::vector<int64_t>>& private_from) {
  std::unique_lock<std::mutex> lk(mu_);
  if (slots.size() != tokens.size()) {
    throw std::invalid_argument("vattn: reserve got " + std::to_string(slots.size()) + " slots and " +
                                std::to_string(tokens.size()) + " token counts");
  }
  if (!private_from.empty() && private_from.size() != slots.size()) {
    throw std::invalid_argument("vattn: reserve: private_from needs one entry per slot");
  }
  // Validate everything before touching anything; a slot given twice keeps its largest request.
  // O(slots): a per-slot index into req instead of searching it.
  std::vector<std::pair<int64_t, int64_t>> req;
  req.reserve(slots.size());
  std::vector<int32_t> where(slots_.size(), -1);
  for (size_t i = 0; i < slots.size(); ++i) {
    live_slot(slots[i]);
    if (tokens[i] < 0 || tokens[i] > geom_.max_seq_len) {
      throw std::invalid_argument("vattn: cannot reserve " + std::to_string(tokens[i]) + " tokens for slot " +
                                  std::to_string(slots[i]) +
                                  ": must be in [0, max_seq_len=" + std::to_string(geom_.max_seq_len) + "]");
    }
    int32_t& w = where[static_cast<size_t>(slots[i])];
    if (w < 0) {
      w = static_cast<int32_t>(req.size());
      req.push_back({slots[i], tokens[i]});
    } else {
      req[static_cast<size_t>(w)].second = std::max(req[static_cast<size_t>(w)].second, tokens[i]);
    }
  }
  const size_t R = regions_.size();
  size_t total = 0;
  std::vector<char> protect;  // built only when pages must be found
  for (;;) {
    total = 0;
    for (const auto& p : req) {
      const Slot& s = slots_[static_cast<size_t>(p.first)];
      for (size_t r = 0; r < R; ++r) {
        const size_t want = region_need(s, r, p.second);
        if (want > s.pages[r].size()) total += want - s.pages[r].size();
      }
    }
    if (total == 0) break;
    protect.assign(slots_.size(), 0);
    for (const auto& p : req) protect[static_cast<size_t>(p.first)] = 1;
    // Fail early, with nothing touched, when even the idle pages of other slots cannot cover it.
    const size_t available = available_pages(total, protect);
    if (available >= total) break;
    if (pool_->pending() == 0) throw out_of_memory(total, available);
    // Pages the background thread is creating right now count against the cap but are not in
    // the pool yet. Only when the call cannot be covered without them, wait for them (the thread
    // starts no new ones meanwhile), then plan again: with the mutex released, the thread may
    // have mapped them ahead into any slot, and other calls may have run (liveness is rechecked).
    ++foreground_waiting_;
    created_cv_.wait(lk, [&] { return stop_ || pool_->pending() == 0; });
    --foreground_waiting_;
    if (foreground_waiting_ == 0) work_cv_.notify_one();
    for (const auto& p : req) live_slot(p.first);
  }

  std::vector<Taken> taken;
  std::vector<size_t> before(req.size() * R);  // [slot][region] pages held before this call
  for (size_t i = 0; i < req.size(); ++i) {
    const Slot& s = slots_[static_cast<size_t>(req[i].first)];
    for (size_t r = 0; r < R; ++r) before[i * R + r] = s.pages[r].size();
  }
  // Copy-on-write first (a copy swaps pages, so the growth planned above stays what it is).
  // The copies take no page of the step's slots: the growth counted those as theirs.
  std::vector<PrivateCopy> copies;
  try {
    if (!private_from.empty()) {
      std::vector<char> step_slots(slots_.size(), 0);
      for (const auto& p : req) step_slots[static_cast<size_t>(p.first)] = 1;
      for (size_t i = 0; i < private_from.size(); ++i) {
        if (!private_from[i].empty()) make_private_locked(slots[i], private_from[i], stream, {}, step_slots, &copies);
      }
    }
  } catch (...) {
    revert_private(copies);
    throw;
  }
  std::vector<PhysicalBackend::Range> dirty;  // pages this call mapped that must be zeroed
  try {
    if (total > 0) {
      take_pages(total, taken, /*allow_steal=*/true, protect);
      // taken is consumed slot by slot, region by region: each (slot, region) gets one
      // contiguous run of pages, mapped with one backend call.
      size_t next = 0;
      std::vector<PageHandle> run;
      for (const auto& p : req) {
        Slot& s = slots_[static_cast<size_t>(p.first)];
        for (size_t r = 0; r < R; ++r) {
          const size_t want = region_need(s, r, p.second), have = s.pages[r].size();
          if (want <= have) continue;
          const size_t k = want - have;
          run.clear();
          for (size_t j = 0; j < k; ++j) {
            const Taken& t = taken[next + j];
            run.push_back(t.page);
            if (opt_.scrub_freed && t.dirty) dirty.push_back({page_addr(r, p.first, have + j), page_});
          }
          backend_->map(page_addr(r, p.first, have), run.data(), k);
          s.pages[r].insert(s.pages[r].end(), run.begin(), run.end());
          s.mapped += k;
          mapped_pages_ += k;
          next += k;
        }
      }
      if (!dirty.empty()) scrub(dirty, stream, /*wait=*/false);
      // Anything taken beyond what was mapped (none: stealing is exact) goes to the pool.
      for (; next < taken.size(); ++next) pool_->release(taken[next].page, true);
      taken.clear();
    }
  } catch (...) {
    // Undo: unmap what this call mapped (whole runs of each slot and region), then give back
    // every page taken (taken still lists them all, mapped or not).
    std::vector<PhysicalBackend::Range> ranges;
    for (size_t i = 0; i < req.size(); ++i) {
      Slot& s = slots_[static_cast<size_t>(req[i].first)];
      for (size_t r = 0; r < R; ++r) {
        const size_t had = before[i * R + r], extra = s.pages[r].size() - had;
        if (extra > 0) ranges.push_back({page_addr(r, req[i].first, had), extra * page_});
        s.pages[r].resize(had);
        s.mapped -= extra;
        mapped_pages_ -= extra;
      }
    }
    try {
      backend_->unmap(ranges.data(), ranges.size());
    } catch (...) {}
    undo(taken);
    revert_private(copies);  // after the growth's pages: pages stolen later go back first
    throw;
  }
  for (const auto& p : req) {
    Slot& s = slots_[static_cast<size_t>(p.first)];
    s.target = std::max(s.target, p.second);
  }
  update_peak();
  note_change();
}

void CacheManager::record_stream(uintptr_t stream) {
  std::lock_guard<std::mutex> lk(mu_);
  backend_->record_use(stream);
}

void CacheManager::commit(const std::vector<int64_t>& slots, const std::vector<int64_t>& new_tokens) {
  std::lock_guard<std::mutex> lk(mu_);
  if (slots.size() != new_tokens.size())
    throw std::invalid_argument("vattn: commit: slots and new_tokens differ in length");
  std::vector<char> seen(slots_.size(), 0);
  for (size_t i = 0; i < slots.size(); ++i) {
    Slot& s = live_slot(slots[i]);
    char& once = seen[static_cast<size_t>(slots[i])];
    if (once) throw std::invalid_argument("vattn: slot " + std::to_string(slots[i]) + " given twice");
    once = 1;
    const int64_t n = s.length + new_tokens[i];
    const int64_t cap = capacity(s);
    if (new_tokens[i] < 0 || n > cap) {
      throw std::invalid_argument("vattn: cannot commit " + std::to_string(new_tokens[i]) + " tokens to slot " +
                                  std::to_string(slots[i]) + " (length " + std::to_string(s.length) + ", " +
                                  std::to_string(cap) + " tokens mapped)");
    }
  }
  for (size_t i = 0; i < slots.size(); ++i) {
    Slot& s = slots_[static_cast<size_t>(slots[i])];
    s.length += new_tokens[i];
    s.target = std::max(s.target, s.length);
  }
  note_change();
}

void CacheManager::shrink(int64_t slot, int64_t n) {
  std::lock_guard<std::mutex> lk(mu_);
  Slot& s = live_slot(slot);
  if (n < 0 || n > s.length) {
    throw std::invalid_argument("vattn: cannot shrink slot " + std::to_string(slot) + " to " + std::to_string(n) +
                                " tokens: must be in [0, length=" + std::to_string(s.length) + "]");
  }
  std::vector<int64_t> keep(regions_.size());
  for (size_t r = 0; r < keep.size(); ++r) keep[r] = std::min(s.length - s.deficit[r], n);
  shrink_locked(slot, n, keep);
}

void CacheManager::shrink_regions(int64_t slot, int64_t n, const std::vector<int64_t>& region_tokens) {
  std::lock_guard<std::mutex> lk(mu_);
  Slot& s = live_slot(slot);
  if (n < 0 || n > s.length) {
    throw std::invalid_argument("vattn: cannot shrink slot " + std::to_string(slot) + " to " + std::to_string(n) +
                                " tokens: must be in [0, length=" + std::to_string(s.length) + "]");
  }
  if (region_tokens.size() != regions_.size()) {
    throw std::invalid_argument("vattn: shrink_regions got " + std::to_string(region_tokens.size()) +
                                " token counts for " + std::to_string(regions_.size()) + " regions");
  }
  for (size_t r = 0; r < regions_.size(); ++r) {
    const int64_t stored = s.length - s.deficit[r];
    if (region_tokens[r] < 0 || region_tokens[r] > std::min(stored, n)) {
      throw std::invalid_argument("vattn: shrink_regions: region " + std::to_string(r) + " of slot " +
                                  std::to_string(slot) + " cannot keep " + std::to_string(region_tokens[r]) +
                                  " tokens: must be in [0, min(n=" + std::to_string(n) +
                                  ", stored=" + std::to_string(stored) + ")]");
    }
  }
  shrink_locked(slot, n, region_tokens);
}

// Validated: n <= length, region_tokens[r] <= min(n, stored in r). Unmaps first (one backend call;
// a failure there changes nothing), then sets the length and the deficits.
void CacheManager::shrink_locked(int64_t slot, int64_t n, const std::vector<int64_t>& region_tokens) {
  Slot& s = slots_[static_cast<size_t>(slot)];
  std::vector<size_t> drop(regions_.size(), 0);
  for (size_t r = 0; r < regions_.size(); ++r) {
    const size_t want = pages_for(region_tokens[r]);
    if (s.pages[r].size() > want) drop[r] = s.pages[r].size() - want;
  }
  std::vector<PageHandle> pages;
  unmap_pages(slot, drop, &pages, nullptr);
  for (PageHandle h : pages) pool_->release(h, true);
  s.length = n;
  s.target = n;
  for (size_t r = 0; r < regions_.size(); ++r) s.deficit[r] = n - region_tokens[r];
  try {
    enforce_watermark();
  } catch (...) {}
  note_change();
}

int64_t CacheManager::length(int64_t slot) const {
  std::lock_guard<std::mutex> lk(mu_);
  check_slot(slot);
  return slots_[static_cast<size_t>(slot)].length;
}

std::vector<int64_t> CacheManager::lengths() const {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<int64_t> out(slots_.size());
  for (size_t i = 0; i < slots_.size(); ++i) out[i] = slots_[i].live ? slots_[i].length : 0;
  return out;
}

int64_t CacheManager::mapped_tokens(int64_t slot) const {
  std::lock_guard<std::mutex> lk(mu_);
  check_slot(slot);
  return capacity(slots_[static_cast<size_t>(slot)]);
}

std::vector<int64_t> CacheManager::region_pages(int64_t slot) const {
  std::lock_guard<std::mutex> lk(mu_);
  check_slot(slot);
  const Slot& s = slots_[static_cast<size_t>(slot)];
  std::vector<int64_t> out(regions_.size());
  for (size_t r = 0; r < out.size(); ++r) out[r] = static_cast<int64_t>(s.pages[r].size());
  return out;
}

std::vector<int64_t> CacheManager::region_tokens(int64_t slot) const {
  std::lock_guard<std::mutex> lk(mu_);
  check_slot(slot);
  const Slot& s = slots_[static_cast<size_t>(slot)];
  std::vector<int64_t> out(regions_.size());
  for (size_t r = 0; r < out.size(); ++r) out[r] = s.live ? s.length - s.deficit[r] : 0;
  return out;
}

int64_t CacheManager::first_unmapped(const int64_t* addrs, int64_t n, int64_t span) const {
  std::lock_guard<std::mutex> lk(mu_);
  if (span <= 0) return n > 0 ? 0 : -1;
  for (int64_t i = 0; i < n; ++i) {
    const uintptr_t a = static_cast<uintptr_t>(addrs[i]);
    bool ok = false;
    for (size_t r = 0; r < regions_.size(); ++r) {
      const VirtualBuffer& b = *regions_[r];
      if (a < b.base() || a - b.base() >= b.bytes()) continue;
      const size_t off = a - b.base();
      const size_t slot = off / slot_stride_;
      const size_t end = off - slot * slot_stride_ + static_cast<size_t>(span);  // within the slot
      ok = slot < slots_.size() && end <= slots_[slot].pages[r].size() * page_;
      break;
    }
    if (!ok) return i;
  }
  return -1;
}

// ---------------------------------------------------------------- prefix sharing

void CacheManager::share(int64_t src, int64_t dst, int64_t length, const std::vector<int64_t>& region_tokens,
                         const std::vector<int64_t>& share_tokens, uintptr_t stream) {
  std::lock_guard<std::mutex> lk(mu_);
  Slot& a = live_slot(src);
  Slot& b = live_slot(dst);
  if (src == dst) throw std::invalid_argument("vattn: share: source and destination are the same slot");
  if (b.length != 0) {
    throw std::invalid_argument("vattn: share: destination slot " + std::to_string(dst) + " stores " +
                                std::to_string(b.length) + " tokens; it must be empty");
  }
  const size_t R = regions_.size();
  if (region_tokens.size() != R || share_tokens.size() != R) {
    throw std::invalid_argument("vattn: share needs one token count per region (" + std::to_string(R) + ")");
  }
  if (length < 0 || length > a.length) {
    throw std::invalid_argument("vattn: share: length " + std::to_string(length) + " must be in [0, " +
                                std::to_string(a.length) + "] (the tokens of slot " + std::to_string(src) + ")");
  }
  std::vector<size_t> nshare(R), ntotal(R);
  size_t copies = 0;
  for (size_t r = 0; r < R; ++r) {
    const int64_t stored = a.length - a.deficit[r];
    if (region_tokens[r] < 0 || region_tokens[r] > std::min(length, stored)) {
      throw std::invalid_argument(
          "vattn: share: region " + std::to_string(r) + " cannot take " + std::to_string(region_tokens[r]) +
          " tokens: must be in [0, min(length=" + std::to_string(length) + ", stored=" + std::to_string(stored) + ")]");
    }
    if (share_tokens[r] < 0 || share_tokens[r] > region_tokens[r]) {
      throw std::invalid_argument("vattn: share: region " + std::to_string(r) + " cannot share " +
                                  std::to_string(share_tokens[r]) + " of its " + std::to_string(region_tokens[r]) +
                                  " tokens");
    }
    ntotal[r] = pages_for(region_tokens[r]);
    nshare[r] = std::min(first_written_page(share_tokens[r]), ntotal[r]);
    if (a.pages[r].size() < ntotal[r]) throw std::logic_error("vattn: share: source pages missing");
    copies += ntotal[r] - nshare[r];
  }
  std::vector<char> protect(slots_.size(), 0);
  protect[static_cast<size_t>(src)] = protect[static_cast<size_t>(dst)] = 1;
  // Fail early, with nothing touched, when the copies cannot be covered (dst's own idle pages count:
  // they go to the pool below), as reserve does.
  if (copies > 0 && pool_->pending() == 0) {
    const size_t available = available_pages(copies, protect, b.mapped);
    if (available < copies) throw out_of_memory(copies, available);
  }
  // dst stores nothing: its idle pages make way for src's page layout. They are taken as stolen
  // pages of dst, so they serve the copies first and a failure maps them back where they were;
  // the ones the copies do not use go to the pool once the call succeeded.
  std::vector<Taken> taken;
  if (b.mapped > 0) {
    std::vector<size_t> drop(R);
    for (size_t r = 0; r < R; ++r) drop[r] = b.pages[r].size();
    unmap_pages(dst, drop, nullptr, &taken);
  }
  try {
    take_pages(copies > taken.size() ? copies - taken.size() : 0, taken, /*allow_steal=*/true, protect);
    size_t next = 0;
    std::vector<PageHandle> run;
    for (size_t r = 0; r < R; ++r) {
      if (nshare[r] > 0) {
        backend_->map(page_addr(r, dst, 0), a.pages[r].data(), nshare[r]);
        b.pages[r].assign(a.pages[r].begin(), a.pages[r].begin() + static_cast<std::ptrdiff_t>(nshare[r]));
      }
      const size_t k = ntotal[r] - nshare[r];
      if (k == 0) continue;
      run.clear();
      for (size_t j = 0; j < k; ++j) run.push_back(taken[next + j].page);
      backend_->map(page_addr(r, dst, nshare[r]), run.data(), k);
      b.pages[r].insert(b.pages[r].end(), run.begin(), run.end());
      next += k;
    }
    // Whole pages: the partly filled one (and, for a group or an evicted region, what lies past the
    // shared part) holds the same bytes in dst as in src.
    for (size_t r = 0; r < R; ++r) {
      const size_t k = ntotal[r] - nshare[r];
      if (k > 0) backend_->copy(page_addr(r, dst, nshare[r]), page_addr(r, src, nshare[r]), k * page_, stream);
    }
    if (copies > 0) backend_->record_use(stream);  // an unmap of either slot waits for the copies
  } catch (...) {
    std::vector<PhysicalBackend::Range> ranges;
    for (size_t r = 0; r < R; ++r) {
      if (!b.pages[r].empty()) ranges.push_back({page_addr(r, dst, 0), b.pages[r].size() * page_});
      b.pages[r].clear();
    }
    try {
      backend_->unmap(ranges.data(), ranges.size());
    } catch (...) {}
    undo(taken);
    throw;
  }
  size_t total = 0;
  for (size_t r = 0; r < R; ++r) {
    for (size_t j = 0; j < nshare[r]; ++j) {
      auto it = refs_.find(a.pages[r][j]);
      if (it == refs_.end())
        refs_.emplace(a.pages[r][j], 2u);
      else
        ++it->second;
      ++shared_extra_;
    }
    total += b.pages[r].size();
    b.deficit[r] = length - region_tokens[r];
  }
  b.mapped = total;
  mapped_pages_ += total;
  b.length = length;
  b.target = length;
  b.dirty = false;
  for (size_t i = copies; i < taken.size(); ++i) pool_->release(taken[i].page, true);
  try {
    enforce_watermark();  // dst's unused pages count as idle now
  } catch (...) {         // they are reclaimed on a later call
  }
  update_peak();
  note_change();
}

int64_t CacheManager::make_private(int64_t slot, const std::vector<int64_t>& from_tokens, uintptr_t stream,
                                   const std::vector<int64_t>& to_tokens) {
  std::lock_guard<std::mutex> lk(mu_);
  check_slot(slot);
  std::vector<char> protect(slots_.size(), 0);
  protect[static_cast<size_t>(slot)] = 1;
  std::vector<PrivateCopy> log;
  try {
    make_private_locked(slot, from_tokens, stream, to_tokens, protect, &log);
  } catch (...) {
    revert_private(log);
    throw;
  }
  if (!log.empty()) note_change();
  return static_cast<int64_t>(slot_shared_pages(slots_[static_cast<size_t>(slot)]));
}

std::vector<int64_t> CacheManager::make_private_slots(const std::vector<int64_t>& slots,
                                                      const std::vector<std::vector<int64_t>>& from_tokens,
                                                      const std::vector<std::vector<int64_t>>& to_tokens,
                                                      uintptr_t stream) {
  std::lock_guard<std::mutex> lk(mu_);
  if (from_tokens.size() != slots.size() || to_tokens.size() != slots.size()) {
    throw std::invalid_argument("vattn: make_private_slots needs one entry per slot");
  }
  // Every slot checked before any copy; none gives its pages to another's copies (as check_room counts).
  std::vector<char> protect(slots_.size(), 0);
  for (int64_t slot : slots) {
    live_slot(slot);
    protect[static_cast<size_t>(slot)] = 1;
  }
  std::vector<PrivateCopy> log;
  try {
    for (size_t i = 0; i < slots.size(); ++i) {
      if (!from_tokens[i].empty()) {
        make_private_locked(slots[i], from_tokens[i], stream, to_tokens[i], protect, &log);
      }
    }
  } catch (...) {
    revert_private(log);
    throw;
  }
  if (!log.empty()) note_change();
  std::vector<int64_t> left;
  for (int64_t slot : slots) left.push_back(static_cast<int64_t>(slot_shared_pages(slots_[static_cast<size_t>(slot)])));
  return left;
}

void CacheManager::make_private_locked(int64_t slot, const std::vector<int64_t>& from_tokens, uintptr_t stream,
                                       const std::vector<int64_t>& to_tokens, const std::vector<char>& protect,
                                       std::vector<PrivateCopy>* log) {
  Slot& s = live_slot(slot);
  const size_t R = regions_.size();
  if (from_tokens.size() != R || (!to_tokens.empty() && to_tokens.size() != R)) {
    throw std::invalid_argument("vattn: make_private needs one token count per region (" + std::to_string(R) + ")");
  }
  std::vector<std::pair<size_t, size_t>> todo;  // (region, page index)
  for (size_t r = 0; r < R; ++r) {
    if (from_tokens[r] < 0 || (!to_tokens.empty() && to_tokens[r] < 0)) {
      throw std::invalid_argument("vattn: make_private: token counts must be >= 0");
    }
    if (refs_.empty()) break;
    const size_t end = to_tokens.empty() ? s.pages[r].size() : std::min(s.pages[r].size(), pages_for(to_tokens[r]));
    for (size_t j = first_written_page(from_tokens[r]); j < end; ++j) {
      if (is_shared(s.pages[r][j])) todo.push_back({r, j});
    }
  }
  if (todo.empty()) return;
  const size_t n = todo.size();
  // The copies are made in a scratch range first: the slot's own address holds the shared page
  // until the copy is complete.
  VirtualBuffer scratch(*backend_, n * page_);
  std::vector<Taken> taken;
  std::vector<PageHandle> fresh;
  try {
    take_pages(n, taken, /*allow_steal=*/true, protect);
    for (const Taken& t : taken) fresh.push_back(t.page);
    backend_->map(scratch.base(), fresh.data(), n);
  } catch (...) {
    undo(taken);
    throw;
  }
  const PhysicalBackend::Range all{scratch.base(), n * page_};
  size_t done = 0;
  try {
    for (size_t i = 0; i < n; ++i) {
      backend_->copy(scratch.base() + i * page_, page_addr(todo[i].first, slot, todo[i].second), page_, stream);
    }
    backend_->record_use(stream);  // the unmaps below wait for the copies
    for (; done < n; ++done) {
      const size_t r = todo[done].first, j = todo[done].second;
      const PhysicalBackend::Range one{page_addr(r, slot, j), page_};
      backend_->unmap(&one, 1);
      try {
        backend_->map(one.addr, fresh[done]);
      } catch (...) {
        try {
          backend_->map(one.addr, s.pages[r][j]);  // the shared page goes back where it was
        } catch (...) {}
        throw;
      }
      log->push_back(PrivateCopy{slot, r, j, s.pages[r][j], taken[done]});
      drop_ref(s.pages[r][j]);  // still mapped in the slot(s) it was shared with
      s.pages[r][j] = fresh[done];
    }
  } catch (...) {
    try {
      backend_->unmap(&all, 1);
    } catch (...) {}
    std::vector<Taken> unused(taken.begin() + static_cast<std::ptrdiff_t>(done), taken.end());
    undo(unused);
    throw;
  }
  try {
    backend_->unmap(&all, 1);
  } catch (...) {}
  update_peak();
}

void CacheManager::revert_private(std::vector<PrivateCopy>& log) noexcept {
  std::vector<Taken> back;  // the private copies that left their slot
  for (auto it = log.rbegin(); it != log.rend(); ++it) {
    Slot& s = slots_[static_cast<size_t>(it->slot)];
    const PhysicalBackend::Range one{page_addr(it->region, it->slot, it->index), page_};
    try {
      backend_->unmap(&one, 1);
    } catch (...) {
      continue;  // still the private copy there
    }
    try {
      backend_->map(one.addr, it->shared);
    } catch (...) {
      try {
        backend_->map(one.addr, it->fresh.page);  // stays private
      } catch (...) {}
      continue;
    }
    auto ref = refs_.find(it->shared);
    if (ref == refs_.end())
      refs_.emplace(it->shared, 2u);
    else
      ++ref->second;
    ++shared_extra_;
    s.pages[it->region][it->index] = it->shared;
    back.push_back(it->fresh);
  }
  log.clear();
  undo(back);
}

void CacheManager::check_room(const std::vector<int64_t>& slots, const std::vector<int64_t>& tokens,
                              const std::vector<std::vector<int64_t>>& from_tokens,
                              const std::vector<std::vector<int64_t>>& to_tokens) const {
  std::lock_guard<std::mutex> lk(mu_);
  const size_t R = regions_.size();
  if (from_tokens.size() != slots.size() || to_tokens.size() != slots.size() ||
      (!tokens.empty() && tokens.size() != slots.size())) {
    throw std::invalid_argument("vattn: check_room needs one entry per slot");
  }
  std::vector<char> protect(slots_.size(), 0);
  for (int64_t slot : slots) {
    check_slot(slot);
    if (!slots_[static_cast<size_t>(slot)].live) {
      throw std::invalid_argument("vattn: slot " + std::to_string(slot) +
                                  " is not allocated (never allocated or already freed)");
    }
    protect[static_cast<size_t>(slot)] = 1;
  }
  // A shared page written by w of the slots gets min(w, mappings - 1) copies: each copy drops one
  // mapping, and the last mapping left is private already.
  std::unordered_map<PageHandle, size_t> writes;
  size_t grow = 0;
  for (size_t i = 0; i < slots.size(); ++i) {
    const Slot& s = slots_[static_cast<size_t>(slots[i])];
    const std::vector<int64_t>& from = from_tokens[i];
    const std::vector<int64_t>& to = to_tokens[i];
    if (!from.empty() && !refs_.empty()) {
      if (from.size() != R || (!to.empty() && to.size() != R)) {
        throw std::invalid_argument("vattn: check_room needs one token count per region (" + std::to_string(R) + ")");
      }
      for (size_t r = 0; r < R; ++r) {
        if (from[r] < 0 || (!to.empty() && to[r] < 0)) {
          throw std::invalid_argument("vattn: check_room: token counts must be >= 0");
        }
        const size_t end = to.empty() ? s.pages[r].size() : std::min(s.pages[r].size(), pages_for(to[r]));
        for (size_t j = first_written_page(from[r]); j < end; ++j) {
          if (is_shared(s.pages[r][j])) ++writes[s.pages[r][j]];
        }
      }
    }
    if (!tokens.empty()) {
      if (tokens[i] < 0 || tokens[i] > geom_.max_seq_len) continue;  // reserve itself reports it
      for (size_t r = 0; r < R; ++r) {
        const size_t want = region_need(s, r, tokens[i]);
        if (want > s.pages[r].size()) grow += want - s.pages[r].size();
      }
    }
  }
  size_t copies = 0;
  for (const auto& w : writes) copies += std::min<size_t>(w.second, refs_.at(w.first) - 1u);
  const size_t total = copies + grow;
  if (total == 0 || pool_->pending() > 0) return;  // pages being created: reserve waits for them
  const size_t available = available_pages(total, protect);
  if (available < total) throw out_of_memory(total, available);
}

int64_t CacheManager::shared_pages(int64_t slot) const {
  std::lock_guard<std::mutex> lk(mu_);
  check_slot(slot);
  return static_cast<int64_t>(slot_shared_pages(slots_[static_cast<size_t>(slot)]));
}

// ---------------------------------------------------------------- introspection

Stats CacheManager::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  Stats st;
  for (const auto& r : regions_) st.reserved_bytes += r->bytes();
  st.page_bytes = page_;
  st.pages_mapped = mapped_pages_ - shared_extra_;  // physical pages, a shared one once
  st.mapped_bytes = st.pages_mapped * page_;
  st.pages_pooled = pool_->pooled();
  st.pages_created = pool_->created();
  st.physical_bytes = st.pages_created * page_;
  uint64_t tokens = 0, live_pages = 0;
  for (const Slot& s : slots_) {
    if (!s.live) continue;
    tokens += static_cast<uint64_t>(s.length);
    live_pages += s.mapped;
    ++st.live_slots;
  }
  st.used_bytes = tokens * static_cast<uint64_t>(geom_.token_bytes());
  st.live_mapped_bytes = (live_pages - shared_extra_) * page_;  // shared pages are all in live slots
  st.idle_bytes = idle_pages() * page_;
  st.resident_bytes = backend_->resident_bytes();
  st.peak_mapped_bytes = peak_mapped_bytes_;
  const BackendCounters c = backend_->counters();
  st.map_calls = c.maps;
  st.unmap_calls = c.unmaps;
  st.create_calls = c.creates;
  st.destroy_calls = c.destroys;
  st.guard_bytes = guard_page_mapped_ ? page_ : 0;
  st.scrubbed_bytes = scrubbed_bytes_;
  st.pages_pending = pool_->pending();
  st.pages_shared = refs_.size();
  st.shared_mappings = shared_extra_;
  return st;
}

uintptr_t CacheManager::region_base(size_t r) const {
  if (r >= regions_.size()) throw std::out_of_range("vattn: region index out of range");
  return regions_[r]->base();
}

uintptr_t CacheManager::region_guard_base(size_t r) const {
  if (r >= regions_.size()) throw std::out_of_range("vattn: region index out of range");
  return regions_[r]->lead_base();
}

size_t CacheManager::region_bytes(size_t r) const {
  if (r >= regions_.size()) throw std::out_of_range("vattn: region index out of range");
  return regions_[r]->bytes();
}

size_t CacheManager::region_span_bytes(size_t r, size_t count) const {
  if (count == 0 || r >= regions_.size() || count > regions_.size() - r) {
    throw std::out_of_range("vattn: region span out of range");
  }
  if (count > 1 && layout_ != Layout::kHeadMajor) {
    throw std::invalid_argument("vattn: only head_major regions form spans");
  }
  return (count - 1) * region_spacing_ + page_ + regions_[r]->bytes();
}

LayerView CacheManager::layer_view(int64_t layer) const {
  if (layer < 0 || layer >= geom_.num_layers) {
    throw std::out_of_range("vattn: layer " + std::to_string(layer) + " out of range [0, " +
                            std::to_string(geom_.num_layers) + ")");
  }
  LayerView v;
  v.stride_row_bytes = static_cast<int64_t>(slot_stride_);
  v.stride_tok_bytes = region_token_bytes_;
  if (layout_ == Layout::kTokenMajor) {
    v.k_region = v.v_region = 0;
    v.k_offset_bytes = layer * (geom_.k_record_bytes + geom_.v_record_bytes);
    v.v_offset_bytes = v.k_offset_bytes + geom_.k_record_bytes;
  } else if (layout_ == Layout::kLayerMajor) {
    v.k_region = static_cast<int32_t>(2 * layer);
    v.v_region = static_cast<int32_t>(2 * layer + 1);
  } else {
    v.k_region = static_cast<int32_t>(2 * layer * geom_.head_regions);
    v.v_region = static_cast<int32_t>((2 * layer + 1) * geom_.head_regions);
    v.stride_head_bytes = static_cast<int64_t>(region_spacing_);
  }
  return v;
}

void CacheManager::inject_failure(const std::string& kind, int64_t n) {
  std::lock_guard<std::mutex> lk(mu_);
  if (kind == "create")
    backend_->inject_failure(FaultKind::kCreate, n);
  else if (kind == "map")
    backend_->inject_failure(FaultKind::kMap, n);
  else if (kind == "none")
    backend_->inject_failure(FaultKind::kNone, 0);
  else
    throw std::invalid_argument("vattn: failure kind must be 'create', 'map' or 'none', got '" + kind + "'");
}

void CacheManager::synchronize() {
  std::lock_guard<std::mutex> lk(mu_);
  backend_->synchronize();
}

// ---------------------------------------------------------------- background mapping

void CacheManager::wait_background_idle() {
  std::unique_lock<std::mutex> lk(mu_);
  if (!worker_.joinable()) return;
  idle_cv_.wait(lk, [&] { return stop_ || (worker_idle_ && worker_seen_epoch_ == epoch_); });
}

// Pages the pool should hold (pooled + being created) for the background thread: what mapping
// ahead for every live slot still needs, plus the prealloc reserve while idle pages stay under
// the watermark. Bounded later by the cap (begin_create).
size_t CacheManager::worker_pool_target() const {
  const size_t prealloc_pages = (opt_.prealloc_bytes + page_ - 1) / page_;
  const size_t limit = std::max(opt_.reclaim_watermark_bytes, opt_.prealloc_bytes) / page_;
  size_t target = idle_pages() < limit ? prealloc_pages : 0;
  if (opt_.lookahead_tokens > 0) {
    for (const Slot& s : slots_) {
      if (!s.live) continue;
      const int64_t ahead = std::min<int64_t>(geom_.max_seq_len, std::max(s.length, s.target) + opt_.lookahead_tokens);
      for (size_t r = 0; r < regions_.size(); ++r) {
        const size_t want = region_need(s, r, ahead);
        if (want > s.pages[r].size()) target += want - s.pages[r].size();
      }
    }
  }
  return target;
}

// Maps one page ahead in each region that lacks one, for the first live slot that wants any, from
// pooled pages only (never creates under the mutex, never steals). False when no slot wants one
// or the pool lacks the pages. Never throws.
bool CacheManager::worker_map_ahead() {
  if (opt_.lookahead_tokens <= 0) return false;
  const size_t R = regions_.size();
  std::vector<size_t> lacking;
  for (size_t i = 0; i < slots_.size(); ++i) {
    Slot& s = slots_[i];
    if (!s.live) continue;
    const int64_t ahead = std::min<int64_t>(geom_.max_seq_len, std::max(s.length, s.target) + opt_.lookahead_tokens);
    lacking.clear();
    for (size_t r = 0; r < R; ++r) {
      if (s.pages[r].size() < region_need(s, r, ahead)) lacking.push_back(r);
    }
    if (lacking.empty()) continue;
    if (pool_->pooled() < lacking.size()) return false;
    const int64_t slot = static_cast<int64_t>(i);
    std::vector<Taken> taken;
    size_t j = 0;
    try {
      take_pages(lacking.size(), taken, /*allow_steal=*/false, {});  // from the pool
      for (; j < lacking.size(); ++j) {
        backend_->map(page_addr(lacking[j], slot, s.pages[lacking[j]].size()), taken[j].page);
      }
      if (opt_.scrub_freed) {
        std::vector<PhysicalBackend::Range> dirty;
        for (size_t q = 0; q < lacking.size(); ++q) {
          if (taken[q].dirty) dirty.push_back({page_addr(lacking[q], slot, s.pages[lacking[q]].size()), page_});
        }
        // No caller stream here: the backend's own stream, waited for (this thread only).
        scrub(dirty, 0, /*wait=*/true);
      }
    } catch (...) {
      std::vector<PhysicalBackend::Range> ranges;
      for (size_t q = 0; q < j; ++q) ranges.push_back({page_addr(lacking[q], slot, s.pages[lacking[q]].size()), page_});
      try {
        backend_->unmap(ranges.data(), ranges.size());
      } catch (...) {}
      undo(taken);
      return false;
    }
    for (size_t q = 0; q < lacking.size(); ++q) s.pages[lacking[q]].push_back(taken[q].page);
    s.mapped += lacking.size();
    mapped_pages_ += lacking.size();
    update_peak();
    return true;
  }
  return false;
}

// The background thread. Each round, under the mutex: map one group ahead from the pool if a
// slot wants one (fast); else, if the pool holds fewer pages than worker_pool_target, claim one
// page of the cap and create it with the mutex released (the slow part), then put it in the
// pool. A failed creation (device full, injected failure) is not retried until the state
// changes. Sleeps on work_cv_ when there is nothing to do.
void CacheManager::worker_main() {
  std::unique_lock<std::mutex> lk(mu_);
  while (!stop_) {
    if (worker_map_ahead()) {
      // Let foreground calls in between units of work.
      lk.unlock();
      std::this_thread::yield();
      lk.lock();
      continue;
    }
    const bool may_create = foreground_waiting_ == 0 && create_failed_epoch_ != epoch_;
    if (may_create && pool_->pooled() + pool_->pending() < worker_pool_target() && pool_->begin_create()) {
      lk.unlock();
      PageHandle h = 0;
      bool ok = true;
      try {
        h = backend_->create_page();
      } catch (...) { ok = false; }
      lk.lock();
      if (ok) {
        pool_->finish_create(h, !backend_->created_pages_are_zero());
      } else {
        pool_->abort_create();
        create_failed_epoch_ = epoch_;
      }
      created_cv_.notify_all();
      continue;
    }
    worker_seen_epoch_ = epoch_;
    worker_idle_ = true;
    idle_cv_.notify_all();
    work_cv_.wait(lk, [&] { return stop_ || (epoch_ != worker_seen_epoch_ && foreground_waiting_ == 0); });
    worker_idle_ = false;
  }
}

}  // namespace memory
}  // namespace vattn
