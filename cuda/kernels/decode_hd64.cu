// Instantiations of the split-KV decode kernel for head_dim 64 (one file per head dim so
// the instantiations compile in parallel).
#include "vattn/cuda/decode_split_kernel.cuh"

namespace vattn {
namespace cuda {
VATTN_DECODE_SPLIT_LAUNCHER(64)
}  // namespace cuda
}  // namespace vattn
