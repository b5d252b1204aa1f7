// vattn._C: thin pybind11 module. Takes raw pointers, sizes and strides; no libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings.h"
#include "cpu/attention_kernels.h"

#if defined(VATTN_WITH_CUDA)
#include <cuda_runtime.h>
#endif

#ifndef VATTN_VERSION
#define VATTN_VERSION "0.0.0"
#endif

namespace py = pybind11;

namespace {

std::vector<std::string> split_archs(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == ',') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else
      cur.push_back(c);
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

// Devices the CUDA runtime sees; 0 (never an error) without a driver or GPU.
int cuda_device_count() {
#if defined(VATTN_WITH_CUDA)
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

py::list cuda_devices() {
  py::list out;
#if defined(VATTN_WITH_CUDA)
  const int n = cuda_device_count();
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    py::dict d;
    d["index"] = i;
    d["name"] = std::string(prop.name);
    d["capability"] = py::make_tuple(prop.major, prop.minor);
    d["total_memory"] = static_cast<long long>(prop.totalGlobalMem);
    d["multiprocessors"] = prop.multiProcessorCount;
    out.append(d);
  }
#endif
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vattn native module (no libtorch)";
#if defined(VATTN_WITH_CUDA)
  m.attr("built_with_cuda") = true;
  int rt = 0;
  cudaRuntimeGetVersion(&rt);
  m.attr("cuda_runtime_version") = rt;
#else
  m.attr("built_with_cuda") = false;
  m.attr("cuda_runtime_version") = 0;
#endif
  m.attr("cuda_architectures") = split_archs(VATTN_CUDA_ARCHS);
  m.attr("__version__") = VATTN_VERSION;
  m.def("cuda_device_count", &cuda_device_count, "CUDA devices visible (0 without a driver)");
  m.def("cuda_devices", &cuda_devices, "Name, capability, memory and SM count of each CUDA device");
  m.def(
      "cpu_simd", [] { return std::string(vattn::cpu::simd_copy()); },
      "Which copy of the CPU attention loops runs: avx512, avx2 or generic (VATTN_CPU_NO_AVX512 and "
      "VATTN_CPU_GENERIC, read once, step down)");
  vattn::bind_memory(m);
  vattn::bind_attention(m);
  vattn::bind_sparse(m);
  vattn::bind_quest(m);
}
