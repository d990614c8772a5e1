// Fused image preprocessing: uint8 HWC (any size) -> resized, normalized FP32 or FP16, CHW or
// HWC, written straight into its slot of a batch buffer in one pass per output row.
#ifndef FASTSERVE_PREPROCESS_H_
#define FASTSERVE_PREPROCESS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "fastserve/transform.h"

namespace fastserve {

enum class Aspect : uint8_t {
  kStretch = 0,     // resize to exactly out_h x out_w
  kShorterSide = 1  // scale the shorter side to the output's, then crop the center
};

struct ImageSpec {
  int64_t out_h = 0;
  int64_t out_w = 0;
  int64_t channels = 3;
  Aspect aspect = Aspect::kStretch;
  bool chw = true;    // planar output (C, H, W); false: interleaved (H, W, C)
  bool fp16 = false;  // IEEE binary16 output (round to nearest even); false: float32
  // out = (pixel / 255 - mean[c]) / std[c]
  std::vector<float> mean;
  std::vector<float> std;
};

// A source image: `h` rows of `w` pixels of `spec.channels` uint8 values, rows
// `row_stride` bytes apart (pixels within a row are contiguous).
struct ImageView {
  const uint8_t* data = nullptr;
  int64_t h = 0;
  int64_t w = 0;
  int64_t row_stride = 0;
};

// Checks `spec` (sizes, channels 1..4, one mean and one positive std per channel);
// throws std::invalid_argument naming what is wrong.
void CheckImageSpec(const ImageSpec& spec);

// Bytes of one image's output: out_h * out_w * channels values of 4 (or 2, fp16) bytes.
int64_t ImageSlotBytes(const ImageSpec& spec);

// Bilinear resize with half-pixel centers (OpenCV's INTER_LINEAR: src = (dst + 0.5) *
// scale - 0.5, clamped to the edge), then normalize and lay out, for one image into `out`
// (ImageSlotBytes(spec) bytes, float or binary16 values).
void PreprocessImage(const ImageView& image, const ImageSpec& spec, void* out);

// Every image into its slot of `out` (images.size() slots, one after the other), rows
// spread over `threads` threads (<= 0: the hardware's count).
void PreprocessImages(const std::vector<ImageView>& images, const ImageSpec& spec, void* out,
                      int threads = 0);

// The image pipeline as a batcher input transform: a request's UINT8 [n, h, w, channels]
// (or [n, h, w] for one channel), any h and w, becomes n rows of the model's tensor in the
// batch buffer, with no array in between.
class ImageTransform : public InputTransform {
 public:
  // Checks the spec (std::invalid_argument). threads: as PreprocessImages.
  explicit ImageTransform(ImageSpec spec, int threads = 0);
  DType source_dtype() const override { return DType::kUInt8; }
  const RowSignature& output() const override { return output_; }
  std::string Check(const TensorView& input) const override;
  void Apply(const TensorView& input, void* out) const override;
  const ImageSpec& spec() const { return spec_; }

 private:
  ImageSpec spec_;
  int threads_;
  RowSignature output_;
};

}  // namespace fastserve

#endif  // FASTSERVE_PREPROCESS_H_
