#pragma once
// CacheManager: one KV-cache in contiguous virtual memory (one object per vattn.KVCache, no
// global state). It owns the backend, the reservations (regions), the page pool and the slots,
// and maps / unmaps physical pages as slots grow and shrink.
//
// The manager knows bytes, not formats: a token of one layer is a K record and a V record of
// a given number of bytes (all kv heads, data and any scales; python/vattn/formats.py lays out
// what is inside a record). Every region stores the same bytes per token; each (slot, region)
// holds its own number of pages from the start of the slot's part of the region:
//   token_major: 1 region  [slot, token, layer, K record | V record]
//   layer_major: 2L regions, K and V of each layer: [slot, token, record] (region 2l: K of layer
//                l, 2l + 1: V); both regions of a layer use the larger of the two record sizes (K
//                and V in different formats waste the difference there; token_major wastes nothing).
// Usually every region of a slot holding n tokens stores n tokens and needs pages_for(n) pages.
// After eviction (shrink_regions) a region may store fewer tokens than the slot's length: its
// deficit (length - tokens it stores), fixed until the next shrink or free, since appends grow
// every region alike. Region r of a slot asked to hold n tokens then needs pages_for(n - deficit_r)
// pages, and growth (reserve, the background thread) maps exactly the missing pages of each region.
// Other areas (per-block metadata, per-head lengths) are planned as regions of their own with
// their own bytes per token, beside these.
// Each slot's part of a region is padded to whole pages, so slots never share a page.
//
// Thread safety: every public method takes the manager's mutex. The optional background thread
// keeps the page pool filled ahead of demand and maps ahead for live slots: it creates pages
// (the slow part: cuMemCreate, or fallocate on the host) outside the mutex, the created page
// counting against max_physical_bytes from the moment its creation starts, and maps pooled pages
// into slots under the mutex (fast; per round one page in each region of one slot that lacks
// one), so a step's begin_step only maps from the pool or finds its pages already mapped. It sleeps on a condition
// variable when there is nothing to do. A foreground call that would run out of pages while the thread is creating some
// waits for those (a condition variable too) instead of failing.
//
// Guard pages: each region is reserved with one page in front of it (VirtualBuffer's lead).
// With map_guard (the default on device backends) one physical page, outside the pool and the
// cap, is mapped at every region's guard, so a tensor view built from the guard address starts
// at mapped memory whatever slot 0 holds (torch asks the CUDA driver about a view's first
// address). On the host the guard is the reservation's read-only zero memory, which suffices.
//
// Prefix sharing (share, make_private): one physical page may be mapped into several slots at the
// same offset (fork, share_prefix: the full pages of a request's prefix are mapped again, not
// copied). Such pages are reference-counted by their mappings: unmapping one mapping (shrink,
// eviction, free) releases the page only when it was the last. Nothing the manager or the library
// writes goes into a shared page: the page the next token lands in is always private (share copies
// the partly filled page), and the caller asks make_private before any write below a slot's end
// (a shrink followed by appends, compaction). A freed slot unmaps every page it shared, so idle
// slots hold only private pages and page reuse (alloc, stealing) never reaches a shared one.
//
// Scrubbing (scrub_freed): pages that held a request's tokens are zeroed before another request
// can see them: a freed slot's pages when alloc hands the slot out again, and pooled or stolen
// pages when they are mapped into a slot (on CUDA also fresh pages: cuMemCreate does not zero).
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "memory/backend.h"
#include "memory/page_pool.h"
#include "memory/virtual_buffer.h"

namespace vattn {
namespace memory {

// head_major: 2 L H regions, one per (layer, K|V, kv head), [slot, token, one head's record], in
// one reservation at a fixed spacing so that a layer's heads are a constant stride apart (the
// kernels see a plain strided view). Pages then follow each head's own length after eviction
// (AdaKV's per-head budgets).
enum class Layout { kTokenMajor = 0, kLayerMajor = 1, kHeadMajor = 2 };

struct Geometry {
  int64_t num_layers = 0;
  // Records per layer and side: 1, or num_kv_heads in head_major (the records are then one head's).
  int64_t head_regions = 1;
  int64_t k_record_bytes = 0;  // one token's K of one layer: all kv heads (head_major: one), data + scales
  int64_t v_record_bytes = 0;  // the same for V
  int64_t max_batch = 0, max_seq_len = 0;
  // Tokens are mapped in whole multiples of this (1: any count). int4_ch keys keep each group's
  // parameters in the scale words of all its tokens, so a slot maps its last group completely;
  // max_seq_len must be a multiple.
  int64_t align_tokens = 1;
  // Bytes of one token over all layers, K and V (what used_bytes counts per stored token).
  int64_t token_bytes() const { return num_layers * head_regions * (k_record_bytes + v_record_bytes); }
  // Bytes of one token in one region of a layout.
  int64_t region_token_bytes(bool token_major) const {
    return token_major ? token_bytes() : (k_record_bytes > v_record_bytes ? k_record_bytes : v_record_bytes);
  }
};

struct ManagerOptions {
  size_t max_physical_bytes = 0;       // cap on pages created (mapped + pooled); 0: none
  size_t prealloc_bytes = 0;           // pages created into the pool up front
  size_t reclaim_watermark_bytes = 0;  // idle pages (free slots + pool) kept beyond this go back
  bool background = false;             // background thread mapping ahead
  int64_t lookahead_tokens = 0;        // tokens mapped ahead of each live slot by that thread
  bool scrub_freed = false;            // zero pages of finished requests before reuse
  int map_guard = -1;                  // map a physical page at each region's guard: 1, 0, -1: device only
};

// Where layer l's K and V records live: region index, byte offset of the record of (slot 0,
// token 0) inside it, and byte strides between slots and tokens (shared by K and V).
struct LayerView {
  int32_t k_region = 0, v_region = 0;  // head_major: the region of kv head 0 (head h: + h)
  int64_t k_offset_bytes = 0, v_offset_bytes = 0;
  int64_t stride_row_bytes = 0, stride_tok_bytes = 0;
  int64_t stride_head_bytes = 0;  // head_major: between the regions of two heads; 0: heads share a record
};

struct Stats {
  uint64_t reserved_bytes = 0;  // virtual ranges
  uint64_t mapped_bytes = 0;    // pages mapped into any slot (live or free)
  uint64_t used_bytes = 0;      // tokens stored in live slots, all layers, K and V
  uint64_t page_bytes = 0;
  uint64_t pages_mapped = 0, pages_pooled = 0;
  uint64_t pages_created = 0;      // mapped + pooled: what counts against max_physical_bytes
  uint64_t physical_bytes = 0;     // pages_created * page_bytes
  uint64_t live_mapped_bytes = 0;  // mapped into live slots
  uint64_t idle_bytes = 0;         // mapped into free slots + pooled (subject to the watermark)
  uint64_t resident_bytes = 0;     // measured by the backend
  uint64_t peak_mapped_bytes = 0;
  uint64_t live_slots = 0;
  uint64_t map_calls = 0, unmap_calls = 0, create_calls = 0, destroy_calls = 0;  // pages
  uint64_t guard_bytes = 0;      // the guard page (mapped at every region's guard), outside the cap
  uint64_t scrubbed_bytes = 0;   // zeroed by scrub_freed so far
  uint64_t pages_pending = 0;    // being created by the background thread
  uint64_t pages_shared = 0;     // physical pages mapped into more than one slot (counted once above)
  uint64_t shared_mappings = 0;  // mappings beyond the first of those pages: memory sharing saves
};

class CacheManager {
 public:
  CacheManager(std::unique_ptr<PhysicalBackend> backend, const Geometry& g, Layout layout, const ManagerOptions& opt);
  ~CacheManager();
  CacheManager(const CacheManager&) = delete;
  CacheManager& operator=(const CacheManager&) = delete;

  // Slots. alloc throws std::runtime_error when all max_batch slots are live. stream: where a
  // device backend enqueues the scrubbing of the slot's old pages (scrub_freed).
  int64_t alloc(uintptr_t stream = 0);
  void free(int64_t slot);
  bool is_live(int64_t slot) const;
  std::vector<int64_t> live_slots() const;

  // Maps pages so that slot i holds >= tokens[i] tokens in every region. All or nothing.
  // stream: as for alloc (scrubbing of reused pages).
  // private_from (optional, one entry per slot): before growing, slots[i] with a non-empty
  // private_from[i] gets make_private(slots[i], private_from[i]) on stream, all in this call:
  // when anything fails, the copies are undone too.
  void reserve(const std::vector<int64_t>& slots, const std::vector<int64_t>& tokens, uintptr_t stream = 0,
               const std::vector<std::vector<int64_t>>& private_from = {});
  // Work touching the cache's memory was enqueued on stream (device backends): unmapping waits
  // for it (an event) instead of synchronizing the whole device.
  void record_stream(uintptr_t stream);
  // Commits new tokens (length += n) after a step; they must already be mapped.
  void commit(const std::vector<int64_t>& slots, const std::vector<int64_t>& new_tokens);
  // Drops tokens beyond n (n <= length) and unmaps the pages no longer needed: region r keeps
  // min(tokens it stores, n) tokens (a region with a deficit keeps its shorter content).
  void shrink(int64_t slot, int64_t n);
  // Eviction: the slot's length becomes n (n <= length) and region r keeps its first
  // region_tokens[r] tokens (<= n and <= the tokens it stores now; one entry per region); every
  // page beyond what each region's tokens need is unmapped. Later growth maps for region r only
  // the tokens beyond region_tokens[r]. All checks first: a bad call throws and changes nothing.
  void shrink_regions(int64_t slot, int64_t n, const std::vector<int64_t>& region_tokens);
  // Pages mapped in each region for slot ([num_regions]), and the tokens each region stores
  // (length - deficit).
  std::vector<int64_t> region_pages(int64_t slot) const;
  std::vector<int64_t> region_tokens(int64_t slot) const;
  int64_t length(int64_t slot) const;
  std::vector<int64_t> lengths() const;  // [max_batch], 0 for free slots
  // Tokens slot can hold without mapping more (capacity of its mapped pages; the least over its
  // regions, each counted with its deficit).
  int64_t mapped_tokens(int64_t slot) const;
  // Index of the first i whose byte range [addrs[i], addrs[i] + span) is not entirely inside the
  // mapped pages of one slot of one region, or -1 when all are. Lets the raw ops refuse a write
  // into an unmapped (read-only) part of the cache instead of faulting.
  int64_t first_unmapped(const int64_t* addrs, int64_t n, int64_t span) const;

  // Prefix sharing. dst (live, storing nothing) becomes a slot of `length` tokens whose region r
  // stores region_tokens[r] tokens (<= length and <= what src stores there). The pages of region
  // r wholly inside its first share_tokens[r] tokens (<= region_tokens[r]; rounded down to whole
  // groups of align_tokens) are src's physical pages mapped again; the rest, up to the pages
  // region_tokens[r] needs, are private copies of src's pages (copied on `stream`). dst's idle
  // pages are unmapped first. All checks first; on failure dst stores nothing and src is untouched.
  void share(int64_t src, int64_t dst, int64_t length, const std::vector<int64_t>& region_tokens,
             const std::vector<int64_t>& share_tokens, uintptr_t stream);
  // Copy-on-write before writing into a slot below its end: every page of region r from the one
  // holding token from_tokens[r] (rounded down to a whole group) on that is shared with another
  // slot is replaced by a private copy. Returns how many shared pages the slot still maps (those
  // below from_tokens). All or nothing: a failure maps the shared pages back.
  // to_tokens (empty: to the slot's end): writes stop below to_tokens[r] in region r, so the shared
  // pages wholly past it (which a compaction drops right after) are not copied.
  int64_t make_private(int64_t slot, const std::vector<int64_t>& from_tokens, uintptr_t stream,
                       const std::vector<int64_t>& to_tokens = {});
  // make_private for each slots[i] with a non-empty from_tokens[i] (to_tokens[i] as to_tokens), all
  // or nothing: a failure undoes every copy. Returns the shared pages each slot still maps.
  std::vector<int64_t> make_private_slots(const std::vector<int64_t>& slots,
                                          const std::vector<std::vector<int64_t>>& from_tokens,
                                          const std::vector<std::vector<int64_t>>& to_tokens, uintptr_t stream);
  // Pages of slot that are mapped in some other slot too.
  int64_t shared_pages(int64_t slot) const;
  // One call that copies pages (make_private, slot by slot) and then maps more (reserve) is all or
  // nothing only if the pages for both are there before the first copy: otherwise the copies stay
  // made when the growth fails. Counts what they will take, exactly as they will take it, and
  // throws OutOfMemory (nothing touched) when the cap cannot cover it. from_tokens[i] / to_tokens[i]
  // are make_private's arguments for slots[i] (empty from: no copy for that slot); tokens[i] what
  // reserve will be asked for slots[i] (tokens empty: no growth).
  void check_room(const std::vector<int64_t>& slots, const std::vector<int64_t>& tokens,
                  const std::vector<std::vector<int64_t>>& from_tokens,
                  const std::vector<std::vector<int64_t>>& to_tokens) const;

  Stats stats() const;
  const Geometry& geometry() const { return geom_; }
  Layout layout() const { return layout_; }
  size_t page_bytes() const { return page_; }
  size_t num_regions() const { return regions_.size(); }
  uintptr_t region_base(size_t r) const;
  size_t region_bytes(size_t r) const;
  // The guard page just before region r's base (region_base(r) - guard_bytes()): always mapped
  // on device backends (see above), where views start.
  uintptr_t region_guard_base(size_t r) const;
  // Bytes from region r's guard to the end of region r + count - 1: one span over count
  // consecutive regions (head_major keeps them a fixed spacing apart; other layouts: count 1).
  size_t region_span_bytes(size_t r, size_t count) const;
  size_t guard_bytes() const { return page_; }
  bool guard_mapped() const { return guard_page_mapped_; }
  size_t slot_stride_bytes() const { return slot_stride_; }
  int64_t region_token_bytes() const { return region_token_bytes_; }
  LayerView layer_view(int64_t layer) const;
  bool is_device() const { return backend_->is_device(); }
  std::string backend_name() const { return backend_->name(); }

  // Waits until the background thread has nothing left to do (returns at once without it).
  void wait_background_idle();
  // Test hook: the n-th next page creation ("create") or map ("map") fails.
  void inject_failure(const std::string& kind, int64_t n);
  void synchronize();

 private:
  struct Slot {
    bool live = false;
    int64_t length = 0;
    int64_t target = 0;                          // tokens the user asked to keep mapped (>= length)
    size_t mapped = 0;                           // pages mapped over all regions
    bool dirty = false;                          // (free slot) its pages hold a finished request's bytes
    std::vector<std::vector<PageHandle>> pages;  // [region][page]: region r holds pages[r].size()
    std::vector<int64_t> deficit;                // [region] tokens it stores fewer than length (<= length)
  };
  // Where a page of this call came from, to undo the call exactly.
  struct Taken {
    PageHandle page;
    int source;                    // 0: pool, 1: created, 2: stolen
    int64_t victim = -1;           // stolen from slot...
    size_t region = 0, index = 0;  // ... region, page index there
    bool dirty = false;            // may hold another request's bytes (scrubbed once mapped, with scrub_freed)
  };

  // One page a copy-on-write replaced: slots_[slot].pages[region][index] was `shared`, is now
  // fresh.page (where fresh says the page came from). revert_private swaps it back.
  struct PrivateCopy {
    int64_t slot;
    size_t region, index;
    PageHandle shared;
    Taken fresh;
  };
  // (mu_ held) make_private's work, appending every page it replaced to *log; on failure the
  // caller reverts *log (this call's part included) with revert_private.
  // protect: slots whose pages the copies may not take (the slot itself at least).
  void make_private_locked(int64_t slot, const std::vector<int64_t>& from_tokens, uintptr_t stream,
                           const std::vector<int64_t>& to_tokens, const std::vector<char>& protect,
                           std::vector<PrivateCopy>* log);
  // (mu_ held) Maps the shared pages of *log back (last first) and gives each private copy back
  // where it came from; a page whose swap back fails stays private (same bytes).
  void revert_private(std::vector<PrivateCopy>& log) noexcept;

  void check_slot(int64_t slot) const;     // index in range
  Slot& live_slot(int64_t slot);           // in range and live
  size_t pages_for(int64_t tokens) const;  // pages one region needs for tokens
  // Pages region r of s needs to hold `tokens` tokens of the slot (its deficit counted).
  size_t region_need(const Slot& s, size_t r, int64_t tokens) const;
  size_t need_pages(const Slot& s, size_t r) const { return s.live ? region_need(s, r, s.target) : 0; }
  int64_t capacity(const Slot& s) const;  // tokens the slot can hold with its mapped pages
  uintptr_t page_addr(size_t region, int64_t slot, size_t index) const;
  size_t surplus_pages(const Slot& s) const;  // mapped pages nobody asked for (all of a free slot's)
  // Pages a call needing `need` of them can count on (stops counting once it has them): the pool,
  // what may still be created, `own` pages the caller frees itself, the unprotected slots' surplus.
  size_t available_pages(size_t need, const std::vector<char>& protect, size_t own = 0) const;
  // The OutOfMemory of a call that needs `need` pages with `available` to be had.
  OutOfMemory out_of_memory(size_t need, size_t available) const;
  // Pages to unmap from each region of s to free min(count, surplus) pages, from the regions with
  // the most surplus first (a free slot's regions stay balanced).
  std::vector<size_t> plan_drop(const Slot& s, size_t count) const;
  size_t idle_pages() const;
  // protect: one flag per slot (its pages may not be stolen), or empty: none protected.
  void take_pages(size_t count, std::vector<Taken>& taken, bool allow_steal, const std::vector<char>& protect);
  void undo(std::vector<Taken>& taken) noexcept;
  // Unmaps the last drop[r] pages of each region r of a slot (one backend call; on failure nothing
  // changes); the pages are returned in `out` (region-major order) or recorded as stolen.
  void unmap_pages(int64_t slot, const std::vector<size_t>& drop, std::vector<PageHandle>* out,
                   std::vector<Taken>* stolen);
  // Unmaps every page of a slot (one backend call); private pages go to the pool (dirty).
  void unmap_all(int64_t slot);
  void shrink_locked(int64_t slot, int64_t n, const std::vector<int64_t>& region_tokens);
  void enforce_watermark();
  void note_change();
  void update_peak();
  void worker_main();
  bool worker_map_ahead();
  size_t worker_pool_target() const;
  void scrub(const std::vector<PhysicalBackend::Range>& ranges, uintptr_t stream, bool wait);
  // First page index of a region at or after which writes from token `tokens` on may land (the
  // page holding the start of its group).
  size_t first_written_page(int64_t tokens) const;
  bool is_shared(PageHandle h) const { return refs_.find(h) != refs_.end(); }
  size_t slot_shared_pages(const Slot& s) const;
  // One mapping of h went away: false if h is still mapped elsewhere (not to be released).
  bool drop_ref(PageHandle h);

  std::unique_ptr<PhysicalBackend> backend_;
  Geometry geom_;
  Layout layout_;
  ManagerOptions opt_;
  size_t page_ = 0;
  size_t slot_stride_ = 0;
  int64_t region_token_bytes_ = 0;
  std::unique_ptr<VirtualBuffer> arena_;  // head_major: the one reservation its regions are parts of
  size_t region_spacing_ = 0;             // head_major: guard + region bytes, from one region to the next
  std::vector<std::unique_ptr<VirtualBuffer>> regions_;
  std::unique_ptr<PagePool> pool_;
  std::vector<Slot> slots_;
  size_t mapped_pages_ = 0;  // mappings over all slots and regions (a shared page counts per mapping)
  // Mappings of each page mapped into more than one slot (absent: one); shared_extra_ = sum of
  // (count - 1), so physical pages mapped = mapped_pages_ - shared_extra_.
  std::unordered_map<PageHandle, uint32_t> refs_;
  size_t shared_extra_ = 0;
  uint64_t peak_mapped_bytes_ = 0;
  uint64_t scrubbed_bytes_ = 0;
  PageHandle guard_page_ = 0;
  bool guard_page_mapped_ = false;

  mutable std::mutex mu_;
  std::condition_variable work_cv_;              // wakes the worker: state changed or stop
  std::condition_variable idle_cv_;              // wakes wait_background_idle
  std::condition_variable created_cv_;           // wakes a foreground call waiting for pending creations
  int foreground_waiting_ = 0;                   // such calls: the worker starts no new creation meanwhile
  uint64_t create_failed_epoch_ = ~uint64_t(0);  // epoch at the worker's last failed creation
  uint64_t epoch_ = 0;                           // bumped on every change the worker may act on
  uint64_t worker_seen_epoch_ = ~uint64_t(0);
  bool worker_idle_ = false;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace memory
}  // namespace vattn
