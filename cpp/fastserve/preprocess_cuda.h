// The image pipeline on a CUDA device: the same resize, normalization, layout and cast as
// PreprocessImages (preprocess.h), one thread per output pixel. Source pixels are staged in
// pinned host memory and copied asynchronously on the pipeline's own stream, then the kernel
// writes the batch into device memory, where a model on the CUDA execution provider can read
// it in place.
//
// Always declared; without CUDA in the build (or without a device) the constructor throws.
#ifndef FASTSERVE_PREPROCESS_CUDA_H_
#define FASTSERVE_PREPROCESS_CUDA_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "fastserve/preprocess.h"

namespace fastserve {

class CudaImagePipeline {
 public:
  // Checks the spec (std::invalid_argument); std::runtime_error when this build has no CUDA
  // or the device cannot be used.
  explicit CudaImagePipeline(ImageSpec spec, int device = 0);
  ~CudaImagePipeline();
  CudaImagePipeline(const CudaImagePipeline&) = delete;
  CudaImagePipeline& operator=(const CudaImagePipeline&) = delete;

  // Preprocesses `images` into one device batch (images.size() slots of ImageSlotBytes) and
  // returns its device pointer, valid until the next Run or the pipeline's end. Returns once
  // the batch is complete on the device. std::runtime_error on a CUDA error.
  const void* Run(const std::vector<ImageView>& images);
  // Copies `bytes` of the last Run's batch into host memory `out`.
  void CopyOut(void* out, size_t bytes);
  const ImageSpec& spec() const { return spec_; }
  int device() const { return device_; }

 private:
  struct State;  // CUDA stream and buffers, defined where CUDA is
  ImageSpec spec_;
  int device_;
  std::unique_ptr<State> state_;
};

}  // namespace fastserve

#endif  // FASTSERVE_PREPROCESS_CUDA_H_
