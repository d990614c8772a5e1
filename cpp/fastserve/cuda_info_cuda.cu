#include <cuda_runtime_api.h>

#include "fastserve/cuda_info.h"

namespace fastserve {

bool CudaBuilt() { return true; }

int CudaDeviceCount() {
  int count = 0;
  // Without a driver (or with one too old) this fails: that simply means no usable device.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error state of the runtime
    return 0;
  }
  return count;
}

}  // namespace fastserve
