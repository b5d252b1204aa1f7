// Device properties the launchers need, queried once per device.
#include <mutex>
#include <vector>

#include "vattn/cuda/check.cuh"

namespace vattn {

int current_device_sm_count() {
  static std::mutex mu;
  static std::vector<int> counts;
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  if (dev >= static_cast<int>(counts.size())) counts.resize(dev + 1, 0);
  if (counts[dev] == 0) {
    int n = 0;
    cuda_check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    counts[dev] = n;
  }
  return counts[dev];
}

}  // namespace vattn
