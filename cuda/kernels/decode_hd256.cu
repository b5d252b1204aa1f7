// Instantiations of the split-KV decode kernel for head_dim 256 (one file per head dim so
// the instantiations compile in parallel).
#include "vattn/cuda/decode_split_kernel.cuh"

namespace vattn {
namespace cuda {

void launch_decode_split_hd256(const DecodeKernelArgs& a, int group_block, int num_splits, int dtype, void* stream) {
  launch_decode_split<256>(a, group_block, num_splits, dtype, stream);
}

}  // namespace cuda
}  // namespace vattn
