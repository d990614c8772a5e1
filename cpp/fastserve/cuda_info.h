// Whether this build has CUDA and how many devices are visible.
#ifndef FASTSERVE_CUDA_INFO_H_
#define FASTSERVE_CUDA_INFO_H_

namespace fastserve {

// True when the library was compiled with CUDA (FASTSERVE_WITH_CUDA).
bool CudaBuilt();
// Devices visible now; 0 when not built with CUDA, or without a driver or device. Never throws.
int CudaDeviceCount();

}  // namespace fastserve

#endif  // FASTSERVE_CUDA_INFO_H_
