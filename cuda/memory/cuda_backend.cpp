// CUDA driver VMM backend. Compiled only with VATTN_WITH_CUDA.
#if defined(VATTN_WITH_CUDA)
#include "memory/cuda_backend.h"

#include <cuda_runtime.h>

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
};

namespace {

// ABI version requested for every symbol: the CUDA 12.0 definitions, which the CUDA 13 headers'
// default names match (checked for the _v2 names above).
constexpr unsigned kDriverAbiVersion = 12000;

template <typename Fn>
void resolve(const char* symbol, Fn& fn) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t err = cudaGetDriverEntryPointByVersion(symbol, &p, kDriverAbiVersion, cudaEnableDefault, &status);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("vattn: CUDA driver not available (looking up ") + symbol + ": " +
                             cudaGetErrorName(err) + ")");
  }
  if (status != cudaDriverEntryPointSuccess || p == nullptr) {
    throw std::runtime_error(std::string("vattn: the CUDA driver lacks ") + symbol +
                             (status == cudaDriverEntryPointVersionNotSufficent ? " (driver too old)" : ""));
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

// Makes the backend's primary context current for the scope of a driver call sequence.
class CtxScope {
 public:
  CtxScope(const DriverApi& api, CUcontext ctx) : api_(api) { check(api_, api_.ctx_push(ctx), "cuCtxPushCurrent"); }
  ~CtxScope() {
    CUcontext popped = nullptr;
    api_.ctx_pop(&popped);
  }
  CtxScope(const CtxScope&) = delete;
  CtxScope& operator=(const CtxScope&) = delete;

 private:
  const DriverApi& api_;
};

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
  if (ctx_ != nullptr) api_.primary_ctx_release(dev_);
}

void CudaBackend::synchronize() {
  CtxScope scope(api_, ctx_);
  check(api_, api_.ctx_synchronize(), "cuCtxSynchronize");
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

void CudaBackend::do_map(uintptr_t addr, PageHandle h) {
  CtxScope scope(api_, ctx_);
  const CUdeviceptr ptr = static_cast<CUdeviceptr>(addr);
  check(api_, api_.mem_map(ptr, page_bytes(), 0, static_cast<CUmemGenericAllocationHandle>(h), 0), "cuMemMap");
  CUmemAccessDesc access = {};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = static_cast<int>(dev_);
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  const CUresult rc = api_.mem_set_access(ptr, page_bytes(), &access, 1);
  if (rc != CUDA_SUCCESS) {
    api_.mem_unmap(ptr, page_bytes());  // leave the range as it was
    check(api_, rc, "cuMemSetAccess");
  }
}

void CudaBackend::do_unmap(uintptr_t addr, size_t bytes) {
  // PhysicalBackend::unmap synchronized the context (cuCtxSynchronize) just before this call.
  CtxScope scope(api_, ctx_);
  // One call per page: cuMemUnmap must cover exactly what one cuMemMap mapped.
  for (size_t off = 0; off < bytes; off += page_bytes()) {
    check(api_, api_.mem_unmap(static_cast<CUdeviceptr>(addr + off), page_bytes()), "cuMemUnmap");
  }
}

}  // namespace memory
}  // namespace vattn
#endif  // VATTN_WITH_CUDA
