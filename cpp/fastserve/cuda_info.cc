#include "fastserve/cuda_info.h"

// With CUDA the definitions live in cuda_info_cuda.cu; this file keeps the library complete
// when it is built without.
#ifndef FASTSERVE_WITH_CUDA

namespace fastserve {

bool CudaBuilt() { return false; }

int CudaDeviceCount() { return 0; }

}  // namespace fastserve

#endif  // FASTSERVE_WITH_CUDA
