#include "fastserve/preprocess_cuda.h"

// With CUDA the definitions live in preprocess_cuda.cu; this file keeps the library complete
// when it is built without.
#ifndef FASTSERVE_WITH_CUDA

#include <stdexcept>
#include <utility>

namespace fastserve {

struct CudaImagePipeline::State {};

CudaImagePipeline::CudaImagePipeline(ImageSpec spec, int device)
    : spec_(std::move(spec)), device_(device) {
  CheckImageSpec(spec_);
  throw std::runtime_error("this build of fastserve has no CUDA");
}

CudaImagePipeline::~CudaImagePipeline() = default;

const void* CudaImagePipeline::Run(const std::vector<ImageView>&) {
  throw std::runtime_error("this build of fastserve has no CUDA");
}

void CudaImagePipeline::CopyOut(void*, size_t) {
  throw std::runtime_error("this build of fastserve has no CUDA");
}

}  // namespace fastserve

#endif  // FASTSERVE_WITH_CUDA
