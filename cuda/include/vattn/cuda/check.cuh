#pragma once
// Launch and runtime error checks for the CUDA launchers: errors become exceptions that the
// bindings turn into Python RuntimeError, never exit().
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace vattn {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("vattn: ") + what + ": " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
}

// Call right after a <<<...>>> launch: reports bad configurations without synchronizing.
inline void cuda_check_launch(const char* kernel) { cuda_check(cudaGetLastError(), kernel); }

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// Multiprocessors of the current device (cached per device; used to size split-KV grids).
int current_device_sm_count();

}  // namespace vattn
