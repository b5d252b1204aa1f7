// Bindings of the KV-cache memory manager (cuda/memory/). Thin: the Python KVCache
// (python/vattn/cache.py) validates arguments for clear messages and builds the tensor views.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "memory/cache_manager.h"
#include "memory/host_backend.h"
#if defined(VATTN_WITH_CUDA)
#include "memory/cuda_backend.h"
#endif

namespace py = pybind11;
using vattn::memory::CacheManager;

namespace {

// A writable buffer over one reserved region of a host-backend cache, for torch.frombuffer,
// starting at the region's guard page (region_guard_base; the views start guard_bytes in).
// It keeps the manager alive, so views outlive neither the mapping nor the reservation.
// Only the mapped part may be written: the rest of the range is read-only zero memory.
struct RegionBuffer {
  std::shared_ptr<CacheManager> manager;
  size_t region;
  size_t count = 1;  // consecutive regions (head_major spans a layer's heads)
};

std::unique_ptr<vattn::memory::PhysicalBackend> make_backend(const std::string& kind, int device, size_t page_bytes,
                                                             bool host_commit) {
  if (kind == "host") return std::make_unique<vattn::memory::HostBackend>(page_bytes, host_commit);
  if (kind == "cuda") {
#if defined(VATTN_WITH_CUDA)
    return std::make_unique<vattn::memory::CudaBackend>(device, page_bytes);
#else
    (void)device;
    throw std::runtime_error("vattn: this build has no CUDA support (built with VATTN_CUDA=OFF or without nvcc)");
#endif
  }
  throw std::invalid_argument("vattn: backend must be 'host' or 'cuda', got '" + kind + "'");
}

vattn::memory::Layout parse_layout(const std::string& s) {
  if (s == "token_major") return vattn::memory::Layout::kTokenMajor;
  if (s == "layer_major") return vattn::memory::Layout::kLayerMajor;
  if (s == "head_major") return vattn::memory::Layout::kHeadMajor;
  throw std::invalid_argument("vattn: layout must be 'token_major', 'layer_major' or 'head_major', got '" + s + "'");
}

py::dict cuda_driver_status() {
  py::dict d;
#if defined(VATTN_WITH_CUDA)
  const auto st = vattn::memory::CudaBackend::driver_status();
  d["driver_version"] = st.driver_version;
  d["runtime_version"] = st.runtime_version;
  d["required_driver_version"] = st.required_driver_version;
  d["ok"] = st.ok;
  d["message"] = st.message;
#else
  d["driver_version"] = 0;
  d["runtime_version"] = 0;
  d["required_driver_version"] = 0;
  d["ok"] = false;
  d["message"] = std::string("vattn was built without CUDA");
#endif
  return d;
}

py::object page_granularity(int device) {
#if defined(VATTN_WITH_CUDA)
  try {
    return py::int_(vattn::memory::CudaBackend::query_granularity(device));
  } catch (const std::exception&) { return py::none(); }
#else
  (void)device;
  return py::none();
#endif
}

}  // namespace

namespace vattn {

void bind_memory(py::module_& m) {
  using memory::Stats;
  using release = py::call_guard<py::gil_scoped_release>;

  // Raised when physical memory (max_physical_bytes or the device) is exhausted.
  py::register_exception<memory::OutOfMemory>(m, "OutOfMemoryError", PyExc_MemoryError);

  m.def("page_granularity", &page_granularity, py::arg("device") = 0,
        "CUDA VMM allocation granularity of a device in bytes (None without a CUDA device)");
  m.def("cuda_driver_status", &cuda_driver_status,
        "driver_version (cudaDriverGetVersion, 0 without a driver), runtime_version (the CUDA runtime vattn "
        "links statically), required_driver_version, ok, message (what is wrong and what is needed)");
  m.def("host_page_bytes", &memory::HostBackend::os_page_bytes, "The OS page size (host backend granularity)");

  py::class_<RegionBuffer>(m, "RegionBuffer", py::buffer_protocol()).def_buffer([](RegionBuffer& b) -> py::buffer_info {
    const uintptr_t base = b.manager->region_guard_base(b.region);
    const size_t bytes = b.manager->region_span_bytes(b.region, b.count);
    return py::buffer_info(reinterpret_cast<void*>(base), 1, py::format_descriptor<uint8_t>::format(), 1,
                           {static_cast<py::ssize_t>(bytes)}, {static_cast<py::ssize_t>(1)}, /*readonly=*/false);
  });

  py::class_<CacheManager, std::shared_ptr<CacheManager>>(
      m, "CacheManager", "One KV-cache in contiguous virtual memory; see python/vattn/cache.py for the user API")
      .def(py::init([](const std::string& backend, int device, int64_t num_layers, int64_t k_record_bytes,
                       int64_t v_record_bytes, int64_t max_batch, int64_t max_seq_len, const std::string& layout,
                       size_t page_bytes, size_t max_physical_bytes, size_t prealloc_bytes,
                       size_t reclaim_watermark_bytes, bool background, int64_t lookahead_tokens, bool host_commit,
                       bool scrub_freed, int map_guard, int64_t align_tokens, int64_t head_regions) {
             memory::Geometry g;
             g.num_layers = num_layers;
             g.head_regions = head_regions;
             g.k_record_bytes = k_record_bytes;
             g.v_record_bytes = v_record_bytes;
             g.max_batch = max_batch;
             g.max_seq_len = max_seq_len;
             if (align_tokens < 1 || max_seq_len % align_tokens != 0)
               throw std::invalid_argument("vattn: align_tokens must be >= 1 and divide max_seq_len");
             g.align_tokens = align_tokens;
             memory::ManagerOptions o;
             o.max_physical_bytes = max_physical_bytes;
             o.prealloc_bytes = prealloc_bytes;
             o.reclaim_watermark_bytes = reclaim_watermark_bytes;
             o.background = background;
             o.lookahead_tokens = lookahead_tokens;
             o.scrub_freed = scrub_freed;
             o.map_guard = map_guard;
             const memory::Layout l = parse_layout(layout);
             return std::make_shared<CacheManager>(make_backend(backend, device, page_bytes, host_commit), g, l, o);
           }),
           py::arg("backend"), py::arg("device"), py::arg("num_layers"), py::arg("k_record_bytes"),
           py::arg("v_record_bytes"), py::arg("max_batch"), py::arg("max_seq_len"), py::arg("layout") = "token_major",
           py::arg("page_bytes") = 0, py::arg("max_physical_bytes") = 0, py::arg("prealloc_bytes") = 0,
           py::arg("reclaim_watermark_bytes") = 0, py::arg("background") = false, py::arg("lookahead_tokens") = 0,
           py::arg("host_commit") = true, py::arg("scrub_freed") = false, py::arg("map_guard") = -1,
           py::arg("align_tokens") = 1, py::arg("head_regions") = 1)
      .def("alloc", &CacheManager::alloc, py::arg("stream") = 0, release())
      .def("free", &CacheManager::free, py::arg("slot"), release())
      .def("is_live", &CacheManager::is_live, py::arg("slot"), release())
      .def("live_slots", &CacheManager::live_slots, release())
      .def("reserve", &CacheManager::reserve, py::arg("slots"), py::arg("tokens"), py::arg("stream") = 0,
           py::arg("private_from") = std::vector<std::vector<int64_t>>{}, release())
      .def("record_stream", &CacheManager::record_stream, py::arg("stream"), release(),
           "Work on the cache's memory was enqueued on this CUstream: unmapping waits for it (an event)")
      .def("commit", &CacheManager::commit, py::arg("slots"), py::arg("new_tokens"), release())
      .def("shrink", &CacheManager::shrink, py::arg("slot"), py::arg("n"), release())
      .def("shrink_regions", &CacheManager::shrink_regions, py::arg("slot"), py::arg("n"), py::arg("region_tokens"),
           release(),
           "Eviction: length becomes n and region r keeps its first region_tokens[r] tokens; unmaps every page "
           "beyond what each region needs (later growth maps only each region's missing pages)")
      .def("region_pages", &CacheManager::region_pages, py::arg("slot"), release(),
           "Pages mapped in each region for slot")
      .def("region_tokens", &CacheManager::region_tokens, py::arg("slot"), release(),
           "Tokens each region stores for slot (length minus the region's eviction deficit)")
      .def("length", &CacheManager::length, py::arg("slot"), release())
      .def("lengths", &CacheManager::lengths, release())
      .def("mapped_tokens", &CacheManager::mapped_tokens, py::arg("slot"), release())
      .def(
          "first_unmapped",
          [](const CacheManager& self, uintptr_t addrs, int64_t n, int64_t span) {
            return self.first_unmapped(reinterpret_cast<const int64_t*>(addrs), n, span);
          },
          py::arg("addrs_ptr"), py::arg("n"), py::arg("span"), release(),
          "first i whose [addrs[i], addrs[i] + span) (addrs: int64 host array) is not mapped, or -1")
      .def("share", &CacheManager::share, py::arg("src"), py::arg("dst"), py::arg("length"), py::arg("region_tokens"),
           py::arg("share_tokens"), py::arg("stream") = 0, release(),
           "Prefix sharing: empty dst gets length tokens (region_tokens[r] in region r) of src; the pages wholly "
           "inside share_tokens[r] are src's pages mapped again, the rest private copies")
      .def("make_private", &CacheManager::make_private, py::arg("slot"), py::arg("from_tokens"), py::arg("stream") = 0,
           py::arg("to_tokens") = std::vector<int64_t>{}, release(),
           "Copy-on-write: shared pages of slot from token from_tokens[r] of region r on (below to_tokens[r] "
           "when given) get private copies; returns the shared pages the slot still maps")
      .def("check_room", &CacheManager::check_room, py::arg("slots"), py::arg("tokens"), py::arg("from_tokens"),
           py::arg("to_tokens"), release(),
           "MemoryError, with nothing touched, unless the cap covers make_private(slots[i], from_tokens[i], "
           "to_tokens[i]) for every slot with a from_tokens entry and then reserve(slots, tokens)")
      .def("make_private_slots", &CacheManager::make_private_slots, py::arg("slots"), py::arg("from_tokens"),
           py::arg("to_tokens"), py::arg("stream") = 0, release(),
           "make_private for every slot with a from_tokens entry, all or nothing; the shared pages each still maps")
      .def("shared_pages", &CacheManager::shared_pages, py::arg("slot"), release(),
           "Pages of slot that are mapped in another slot too")
      .def("wait_background_idle", &CacheManager::wait_background_idle, release())
      .def("synchronize", &CacheManager::synchronize, release())
      .def("_inject_failure", &CacheManager::inject_failure, py::arg("kind"), py::arg("n"), release(),
           "Test hook: the n-th next page creation ('create') or map ('map') fails ('none' clears)")
      .def("stats",
           [](CacheManager& self) {
             Stats s;
             {
               py::gil_scoped_release r;
               s = self.stats();
             }
             py::dict d;
             d["reserved_bytes"] = s.reserved_bytes;
             d["mapped_bytes"] = s.mapped_bytes;
             d["used_bytes"] = s.used_bytes;
             d["page_bytes"] = s.page_bytes;
             d["pages_mapped"] = s.pages_mapped;
             d["pages_pooled"] = s.pages_pooled;
             d["pages_created"] = s.pages_created;
             d["physical_bytes"] = s.physical_bytes;
             d["live_mapped_bytes"] = s.live_mapped_bytes;
             d["idle_bytes"] = s.idle_bytes;
             d["resident_bytes"] = s.resident_bytes;
             d["peak_mapped_bytes"] = s.peak_mapped_bytes;
             d["live_slots"] = s.live_slots;
             d["map_calls"] = s.map_calls;
             d["unmap_calls"] = s.unmap_calls;
             d["create_calls"] = s.create_calls;
             d["destroy_calls"] = s.destroy_calls;
             d["guard_bytes"] = s.guard_bytes;
             d["scrubbed_bytes"] = s.scrubbed_bytes;
             d["pages_pending"] = s.pages_pending;
             d["pages_shared"] = s.pages_shared;
             d["shared_mappings"] = s.shared_mappings;
             return d;
           })
      .def_property_readonly("page_bytes", &CacheManager::page_bytes)
      .def_property_readonly(
          "token_bytes", [](const CacheManager& self) { return self.geometry().token_bytes(); },
          "Bytes of one stored token over all layers, K and V (data and scales)")
      .def_property_readonly("num_regions", &CacheManager::num_regions)
      .def("region_base", &CacheManager::region_base, py::arg("region"))
      .def("region_bytes", &CacheManager::region_bytes, py::arg("region"))
      .def("region_guard_base", &CacheManager::region_guard_base, py::arg("region"),
           "Address of region's guard page (region_base - guard_bytes): mapped on device backends")
      .def_property_readonly("guard_bytes", &CacheManager::guard_bytes)
      .def_property_readonly("guard_mapped", &CacheManager::guard_mapped)
      .def(
          "layer_view",
          [](const CacheManager& self, int64_t layer) {
            const memory::LayerView v = self.layer_view(layer);
            py::dict d;
            d["k_region"] = v.k_region;
            d["v_region"] = v.v_region;
            d["k_offset_bytes"] = v.k_offset_bytes;
            d["v_offset_bytes"] = v.v_offset_bytes;
            d["stride_row_bytes"] = v.stride_row_bytes;
            d["stride_tok_bytes"] = v.stride_tok_bytes;
            d["stride_head_bytes"] = v.stride_head_bytes;
            return d;
          },
          py::arg("layer"))
      .def(
          "region_buffer",
          [](std::shared_ptr<CacheManager> self, size_t region, size_t count) {
            if (self->is_device()) throw std::invalid_argument("vattn: region_buffer is for host-backend caches");
            self->region_span_bytes(region, count);  // range check
            return RegionBuffer{std::move(self), region, count};
          },
          py::arg("region"), py::arg("count") = 1,
          "Regions region .. region + count - 1 (count > 1: head_major) from the first one's guard page")
      .def("region_span_bytes", &CacheManager::region_span_bytes, py::arg("region"), py::arg("count"));
}

}  // namespace vattn
