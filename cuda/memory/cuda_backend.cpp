// CUDA driver VMM backend. Compiled only with VATTN_WITH_CUDA.
#if defined(VATTN_WITH_CUDA)
#include "memory/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>

#if !defined(CUDART_VERSION) || CUDART_VERSION < 12050
#error "vattn's CUDA backend needs the CUDA 12.5+ runtime (cudaGetDriverEntryPointByVersion)"
#endif

namespace vattn {
namespace memory {

// Function pointer types come from the prototypes in cuda.h (decltype is unevaluated, so nothing
// is linked). The names are cuda.h's macros, e.g. cuCtxPushCurrent is cuCtxPushCurrent_v2, and
// the lookup below asks for the same ABI version.
struct DriverApi {
  decltype(&::cuInit) init = nullptr;
  decltype(&::cuGetErrorName) get_error_name = nullptr;
  decltype(&::cuDeviceGet) device_get = nullptr;
  decltype(&::cuDeviceGetAttribute) device_get_attribute = nullptr;
  decltype(&::cuDevicePrimaryCtxRetain) primary_ctx_retain = nullptr;
  decltype(&::cuDevicePrimaryCtxRelease) primary_ctx_release = nullptr;
  decltype(&::cuCtxPushCurrent) ctx_push = nullptr;
  decltype(&::cuCtxPopCurrent) ctx_pop = nullptr;
  decltype(&::cuCtxSynchronize) ctx_synchronize = nullptr;
  decltype(&::cuMemGetAllocationGranularity) mem_get_granularity = nullptr;
  decltype(&::cuMemAddressReserve) mem_address_reserve = nullptr;
  decltype(&::cuMemAddressFree) mem_address_free = nullptr;
  decltype(&::cuMemCreate) mem_create = nullptr;
  decltype(&::cuMemRelease) mem_release = nullptr;
  decltype(&::cuMemMap) mem_map = nullptr;
  decltype(&::cuMemUnmap) mem_unmap = nullptr;
  decltype(&::cuMemSetAccess) mem_set_access = nullptr;
  decltype(&::cuMemsetD8Async) memset_d8_async = nullptr;
  decltype(&::cuMemcpyDtoDAsync) memcpy_dtod_async = nullptr;
  decltype(&::cuEventCreate) event_create = nullptr;
  decltype(&::cuEventRecord) event_record = nullptr;
  decltype(&::cuEventSynchronize) event_synchronize = nullptr;
  decltype(&::cuEventDestroy) event_destroy = nullptr;
  decltype(&::cuStreamCreate) stream_create = nullptr;
  decltype(&::cuStreamSynchronize) stream_synchronize = nullptr;
  decltype(&::cuStreamDestroy) stream_destroy = nullptr;
  decltype(&::cuStreamIsCapturing) stream_is_capturing = nullptr;
  decltype(&::cuThreadExchangeStreamCaptureMode) thread_exchange_capture_mode = nullptr;
};

namespace {

// ABI version requested for every symbol: the CUDA 12.0 definitions, which the CUDA 13 headers'
// default names match (checked for the _v2 names above).
constexpr unsigned kDriverAbiVersion = 12000;

// The first driver API version a runtime of this major version runs on (CUDA minor version
// compatibility: a 13.x runtime needs a driver of the 13.0 API or newer), and the Linux driver
// branch that first shipped it.
constexpr int kRequiredDriverVersion = CUDART_VERSION / 1000 * 1000;

const char* linux_driver_branch(int cuda_major) {
  switch (cuda_major) {
    case 11: return "450";
    case 12: return "525";
    case 13: return "580";
    default: return nullptr;
  }
}

std::string version_text(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

std::string driver_problem() {
  const CudaBackend::DriverStatus st = CudaBackend::driver_status();
  return st.ok ? std::string() : " (" + st.message + ")";
}

template <typename Fn>
void resolve(const char* symbol, Fn& fn) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t err = cudaGetDriverEntryPointByVersion(symbol, &p, kDriverAbiVersion, cudaEnableDefault, &status);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("vattn: CUDA driver not available (looking up ") + symbol + ": " +
                             cudaGetErrorName(err) + ")" + driver_problem());
  }
  if (status != cudaDriverEntryPointSuccess || p == nullptr) {
    throw std::runtime_error(std::string("vattn: the CUDA driver lacks ") + symbol +
                             (status == cudaDriverEntryPointVersionNotSufficent ? " (driver too old)" : "") +
                             driver_problem());
  }
  fn = reinterpret_cast<Fn>(p);
}

DriverApi load_api() {
  DriverApi a;
  resolve("cuInit", a.init);
  resolve("cuGetErrorName", a.get_error_name);
  resolve("cuDeviceGet", a.device_get);
  resolve("cuDeviceGetAttribute", a.device_get_attribute);
  resolve("cuDevicePrimaryCtxRetain", a.primary_ctx_retain);
  resolve("cuDevicePrimaryCtxRelease", a.primary_ctx_release);
  resolve("cuCtxPushCurrent", a.ctx_push);
  resolve("cuCtxPopCurrent", a.ctx_pop);
  resolve("cuCtxSynchronize", a.ctx_synchronize);
  resolve("cuMemGetAllocationGranularity", a.mem_get_granularity);
  resolve("cuMemAddressReserve", a.mem_address_reserve);
  resolve("cuMemAddressFree", a.mem_address_free);
  resolve("cuMemCreate", a.mem_create);
  resolve("cuMemRelease", a.mem_release);
  resolve("cuMemMap", a.mem_map);
  resolve("cuMemUnmap", a.mem_unmap);
  resolve("cuMemSetAccess", a.mem_set_access);
  resolve("cuMemsetD8Async", a.memset_d8_async);
  resolve("cuMemcpyDtoDAsync", a.memcpy_dtod_async);
  resolve("cuEventCreate", a.event_create);
  resolve("cuEventRecord", a.event_record);
  resolve("cuEventSynchronize", a.event_synchronize);
  resolve("cuEventDestroy", a.event_destroy);
  resolve("cuStreamCreate", a.stream_create);
  resolve("cuStreamSynchronize", a.stream_synchronize);
  resolve("cuStreamDestroy", a.stream_destroy);
  resolve("cuStreamIsCapturing", a.stream_is_capturing);
  resolve("cuThreadExchangeStreamCaptureMode", a.thread_exchange_capture_mode);
  return a;
}

// Resolved once per process (the table is immutable afterwards); a failed load is retried.
const DriverApi& driver_api() {
  static std::mutex mu;
  static bool loaded = false;
  static DriverApi api;
  std::lock_guard<std::mutex> lock(mu);
  if (!loaded) {
    DriverApi a = load_api();
    const CUresult rc = a.init(0);
    if (rc != CUDA_SUCCESS) {
      const char* name = nullptr;
      a.get_error_name(rc, &name);
      throw std::runtime_error(std::string("vattn: cuInit failed: ") + (name ? name : "unknown error"));
    }
    api = a;
    loaded = true;
  }
  return api;
}

void check(const DriverApi& api, CUresult rc, const char* what) {
  if (rc == CUDA_SUCCESS) return;
  const char* name = nullptr;
  if (api.get_error_name(rc, &name) != CUDA_SUCCESS || name == nullptr) name = "unknown CUDA error";
  const std::string msg = std::string("vattn: ") + what + " failed: " + name;
  if (rc == CUDA_ERROR_OUT_OF_MEMORY) throw OutOfMemory(msg);
  throw std::runtime_error(msg);
}

// Makes the backend's primary context current for the scope of a driver call sequence, in the
// relaxed stream-capture mode: another thread (or this one, on a stream the cache does not use)
// may be capturing a CUDA graph in the global mode, which otherwise forbids "potentially unsafe"
// calls such as cuMemCreate / cuMemMap / cuEventSynchronize on every thread of the process. The
// background thread's calls all run in such a scope. The previous mode comes back at the end.
class CtxScope {
 public:
  CtxScope(const DriverApi& api, CUcontext ctx) : api_(api) {
    check(api_, api_.thread_exchange_capture_mode(&mode_), "cuThreadExchangeStreamCaptureMode");
    const CUresult rc = api_.ctx_push(ctx);
    if (rc != CUDA_SUCCESS) {
      api_.thread_exchange_capture_mode(&mode_);
      check(api_, rc, "cuCtxPushCurrent");
    }
  }
  ~CtxScope() {
    CUcontext popped = nullptr;
    api_.ctx_pop(&popped);
    api_.thread_exchange_capture_mode(&mode_);
  }
  CtxScope(const CtxScope&) = delete;
  CtxScope& operator=(const CtxScope&) = delete;

 private:
  const DriverApi& api_;
  CUstreamCaptureMode mode_ = CU_STREAM_CAPTURE_MODE_RELAXED;  // exchanged: holds the previous mode
};

// Whether work enqueued on stream now would be captured into a graph instead of running (or the
// query itself is refused because a capture in progress forbids the legacy stream).
bool capturing(const DriverApi& api, CUstream stream) {
  CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
  return api.stream_is_capturing(stream, &st) != CUDA_SUCCESS || st != CU_STREAM_CAPTURE_STATUS_NONE;
}

constexpr size_t kMaxRecordedStreams = 32;

CUmemAllocationProp page_prop(CUdevice dev) {
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = static_cast<int>(dev);
  return prop;
}

CUdevice get_vmm_device(const DriverApi& api, int ordinal) {
  CUdevice dev = 0;
  check(api, api.device_get(&dev, ordinal), "cuDeviceGet");
  int vmm = 0;
  check(api, api.device_get_attribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev),
        "cuDeviceGetAttribute(VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)");
  if (!vmm) {
    throw std::runtime_error("vattn: CUDA device " + std::to_string(ordinal) +
                             " does not support virtual memory management");
  }
  return dev;
}

size_t granularity_of(const DriverApi& api, CUdevice dev) {
  CUmemAllocationProp prop = page_prop(dev);
  size_t g = 0;
  check(api, api.mem_get_granularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM), "cuMemGetAllocationGranularity");
  return g;
}

}  // namespace

CudaBackend::DriverStatus CudaBackend::driver_status() {
  DriverStatus st;
  st.runtime_version = CUDART_VERSION;
  st.required_driver_version = kRequiredDriverVersion;
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    cudaGetLastError();
    v = 0;
  }
  st.driver_version = v;
  st.ok = v >= kRequiredDriverVersion;
  if (!st.ok) {
    const char* branch = linux_driver_branch(kRequiredDriverVersion / 1000);
    st.message = "vattn was built with the CUDA " + version_text(CUDART_VERSION) +
                 " runtime (linked statically), which needs an NVIDIA driver supporting CUDA " +
                 version_text(kRequiredDriverVersion) + " or newer" +
                 (branch ? std::string(" (Linux driver ") + branch + " or newer)" : std::string()) + "; " +
                 (v == 0 ? std::string("no NVIDIA driver was found (cudaDriverGetVersion = 0)")
                         : "this machine's driver supports CUDA " + version_text(v) +
                               " (cudaDriverGetVersion = " + std::to_string(v) + ")") +
                 ". Install a newer NVIDIA driver, or build vattn from source with a CUDA toolkit no newer than "
                 "the driver supports";
  }
  return st;
}

size_t CudaBackend::query_granularity(int device) {
  const DriverApi& api = driver_api();
  return granularity_of(api, get_vmm_device(api, device));
}

CudaBackend::CudaBackend(int device, size_t page_bytes) : PhysicalBackend(0), api_(driver_api()), ordinal_(device) {
  dev_ = get_vmm_device(api_, device);
  granularity_ = granularity_of(api_, dev_);
  if (page_bytes == 0) page_bytes = granularity_;
  if (page_bytes % granularity_ != 0) {
    throw std::invalid_argument("vattn: page_bytes=" + std::to_string(page_bytes) +
                                " must be a multiple of the device's allocation granularity (" +
                                std::to_string(granularity_) + ")");
  }
  set_page_bytes(page_bytes);
  check(api_, api_.primary_ctx_retain(&ctx_, dev_), "cuDevicePrimaryCtxRetain");
}

CudaBackend::~CudaBackend() {
  if (ctx_ == nullptr) return;
  try {
    CtxScope scope(api_, ctx_);
    for (auto& u : uses_) api_.event_destroy(u.second);
    if (zero_stream_ != nullptr) api_.stream_destroy(zero_stream_);
  } catch (...) {  // a destructor: nothing to report to
  }
  api_.primary_ctx_release(dev_);
}

void CudaBackend::synchronize() {
  CtxScope scope(api_, ctx_);
  check(api_, api_.ctx_synchronize(), "cuCtxSynchronize");
}

void CudaBackend::record_use(uintptr_t stream) {
  CtxScope scope(api_, ctx_);
  const CUstream s = reinterpret_cast<CUstream>(stream);
  // Work being captured into a graph does not run now; a graph replay is the caller's to order
  // (the cache's bookkeeping runs outside graphs). An event cannot be waited on from there.
  if (capturing(api_, s)) return;
  auto it = std::find_if(uses_.begin(), uses_.end(), [&](const auto& u) { return u.first == stream; });
  if (it == uses_.end()) {
    if (uses_.size() >= kMaxRecordedStreams) {
      // Retire the oldest stream: wait for its last use (rare: a cache used from many streams).
      check(api_, api_.event_synchronize(uses_.front().second), "cuEventSynchronize");
      CUevent e = uses_.front().second;
      uses_.erase(uses_.begin());
      uses_.push_back({stream, e});
    } else {
      CUevent e = nullptr;
      check(api_, api_.event_create(&e, CU_EVENT_DISABLE_TIMING), "cuEventCreate");
      uses_.push_back({stream, e});
    }
    it = uses_.end() - 1;
  }
  check(api_, api_.event_record(it->second, s), "cuEventRecord");
}

void CudaBackend::wait_uses() {
  if (uses_.empty()) return;
  CtxScope scope(api_, ctx_);
  // An event not recorded yet, or already passed, returns at once.
  for (const auto& u : uses_) check(api_, api_.event_synchronize(u.second), "cuEventSynchronize");
}

void CudaBackend::zero(uintptr_t addr, size_t bytes, uintptr_t stream, bool wait) {
  CtxScope scope(api_, ctx_);
  CUstream s = reinterpret_cast<CUstream>(stream);
  if (wait || capturing(api_, s)) {
    // The backend's own stream, waited for: nothing is left ordered against the caller's work.
    if (zero_stream_ == nullptr)
      check(api_, api_.stream_create(&zero_stream_, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
    check(api_, api_.memset_d8_async(static_cast<CUdeviceptr>(addr), 0, bytes, zero_stream_), "cuMemsetD8Async");
    check(api_, api_.stream_synchronize(zero_stream_), "cuStreamSynchronize");
    return;
  }
  // Ordered before every later kernel on the caller's stream: no host wait.
  check(api_, api_.memset_d8_async(static_cast<CUdeviceptr>(addr), 0, bytes, s), "cuMemsetD8Async");
}

void CudaBackend::copy(uintptr_t dst, uintptr_t src, size_t bytes, uintptr_t stream) {
  CtxScope scope(api_, ctx_);
  CUstream s = reinterpret_cast<CUstream>(stream);
  // A copy recorded into a graph would run at replay, long after the mapping it was made for.
  if (capturing(api_, s))
    throw std::runtime_error("vattn: cannot copy a shared page while a CUDA graph is being captured");
  // Ordered after the caller's writes of src and before its later work on the same stream.
  check(api_, api_.memcpy_dtod_async(static_cast<CUdeviceptr>(dst), static_cast<CUdeviceptr>(src), bytes, s),
        "cuMemcpyDtoDAsync");
}

uintptr_t CudaBackend::do_reserve(size_t bytes) {
  CtxScope scope(api_, ctx_);
  CUdeviceptr ptr = 0;
  // cuMemAddressReserve takes only a power-of-two alignment (cuda.h), but page_bytes may be any
  // multiple of the granularity (e.g. 3 x 2 MiB). Its lowest set bit is a power of two that the
  // granularity (itself a power of two) divides, so every page start stays map-aligned.
  const size_t align = page_bytes() & (~page_bytes() + 1);
  check(api_, api_.mem_address_reserve(&ptr, bytes, align, 0, 0), "cuMemAddressReserve");
  return static_cast<uintptr_t>(ptr);
}

void CudaBackend::do_release(uintptr_t addr, size_t bytes) noexcept {
  try {
    CtxScope scope(api_, ctx_);
    api_.mem_address_free(static_cast<CUdeviceptr>(addr), bytes);
  } catch (...) {  // a destructor path: nothing useful to report to
  }
}

PageHandle CudaBackend::do_create_page() {
  CtxScope scope(api_, ctx_);
  CUmemAllocationProp prop = page_prop(dev_);
  CUmemGenericAllocationHandle h = 0;
  check(api_, api_.mem_create(&h, page_bytes(), &prop, 0), "cuMemCreate");
  ++live_pages_;
  return static_cast<PageHandle>(h);
}

void CudaBackend::do_destroy_page(PageHandle h) noexcept {
  try {
    CtxScope scope(api_, ctx_);
    api_.mem_release(static_cast<CUmemGenericAllocationHandle>(h));
  } catch (...) {}
  --live_pages_;
}

void CudaBackend::do_map(uintptr_t addr, const PageHandle* pages, size_t n) {
  CtxScope scope(api_, ctx_);
  const size_t page = page_bytes();
  const CUdeviceptr base = static_cast<CUdeviceptr>(addr);
  size_t i = 0;
  CUresult rc = CUDA_SUCCESS;
  for (; i < n; ++i) {
    rc = api_.mem_map(base + i * page, page, 0, static_cast<CUmemGenericAllocationHandle>(pages[i]), 0);
    if (rc != CUDA_SUCCESS) break;
  }
  const char* what = "cuMemMap";
  if (rc == CUDA_SUCCESS) {
    // One cuMemSetAccess for the whole contiguous range (it may span several cuMemMap mappings,
    // as PyTorch's expandable segments do).
    CUmemAccessDesc access = {};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = static_cast<int>(dev_);
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    rc = api_.mem_set_access(base, n * page, &access, 1);
    what = "cuMemSetAccess";
  }
  if (rc != CUDA_SUCCESS) {
    for (size_t j = 0; j < i; ++j) api_.mem_unmap(base + j * page, page);  // leave the range as it was
    check(api_, rc, what);
  }
}

void CudaBackend::do_unmap(uintptr_t addr, size_t bytes) {
  // PhysicalBackend::unmap waited for the recorded uses of the memory (wait_uses) just before.
  CtxScope scope(api_, ctx_);
  // One call per page: cuMemUnmap must cover exactly what one cuMemMap mapped.
  for (size_t off = 0; off < bytes; off += page_bytes()) {
    check(api_, api_.mem_unmap(static_cast<CUdeviceptr>(addr + off), page_bytes()), "cuMemUnmap");
  }
}

}  // namespace memory
}  // namespace vattn
#endif  // VATTN_WITH_CUDA
