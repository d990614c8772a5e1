#include "fastserve/preprocess.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "fastserve/parallel.h"
#include "fastserve/tensor.h"

namespace fastserve {
namespace {

// For one output axis: the two source indexes and the weight of the second, per output
// position, over the source window [offset, offset + extent) scaled to `out` positions.
struct Taps {
  std::vector<int64_t> lo, hi;
  std::vector<float> weight;
};

Taps MakeTaps(int64_t out, int64_t src, double offset, double extent) {
  Taps t;
  t.lo.resize(out);
  t.hi.resize(out);
  t.weight.resize(out);
  const double scale = extent / static_cast<double>(out);
  for (int64_t i = 0; i < out; ++i) {
    double pos = (static_cast<double>(i) + 0.5) * scale - 0.5 + offset;
    pos = std::max(pos, 0.0);
    int64_t lo = static_cast<int64_t>(std::floor(pos));
    double frac = pos - static_cast<double>(lo);
    if (lo >= src - 1) {
      lo = src - 1;
      frac = 0.0;
    }
    t.lo[i] = lo;
    t.hi[i] = std::min(lo + 1, src - 1);
    t.weight[i] = static_cast<float>(frac);
  }
  return t;
}

// The source window the output covers: all of it (stretch), or the centered crop of the
// aspect ratio of the output after scaling the shorter side (as torchvision's Resize +
// CenterCrop do).
void Window(const ImageView& image, const ImageSpec& spec, double* y0, double* hh, double* x0,
            double* ww) {
  *y0 = 0.0;
  *x0 = 0.0;
  *hh = static_cast<double>(image.h);
  *ww = static_cast<double>(image.w);
  if (spec.aspect == Aspect::kShorterSide) {
    const double scale = std::max(static_cast<double>(spec.out_h) / image.h,
                                  static_cast<double>(spec.out_w) / image.w);
    *hh = spec.out_h / scale;
    *ww = spec.out_w / scale;
    *y0 = (image.h - *hh) / 2.0;
    *x0 = (image.w - *ww) / 2.0;
  }
}

inline void Store(float value, float* out) { *out = value; }
inline void Store(float value, uint16_t* out) { *out = FloatToHalf(value); }

template <typename T>
void RowRange(const ImageView& image, const ImageSpec& spec, const Taps& ys, const Taps& xs,
              int64_t row_begin, int64_t row_end, T* out) {
  const int64_t c_count = spec.channels;
  const int64_t plane = spec.out_h * spec.out_w;
  float scale[4], shift[4];
  for (int64_t c = 0; c < c_count; ++c) {
    scale[c] = 1.0f / (255.0f * spec.std[c]);
    shift[c] = -spec.mean[c] / spec.std[c];
  }
  for (int64_t y = row_begin; y < row_end; ++y) {
    const uint8_t* top = image.data + ys.lo[y] * image.row_stride;
    const uint8_t* bottom = image.data + ys.hi[y] * image.row_stride;
    const float wy = ys.weight[y];
    for (int64_t x = 0; x < spec.out_w; ++x) {
      const int64_t left = xs.lo[x] * c_count, right = xs.hi[x] * c_count;
      const float wx = xs.weight[x];
      for (int64_t c = 0; c < c_count; ++c) {
        const float a = top[left + c], b = top[right + c];
        const float d = bottom[left + c], e = bottom[right + c];
        const float upper = a + (b - a) * wx;
        const float lower = d + (e - d) * wx;
        const float v = upper + (lower - upper) * wy;
        const float normalized = v * scale[c] + shift[c];
        if (spec.chw) {
          Store(normalized, &out[c * plane + y * spec.out_w + x]);
        } else {
          Store(normalized, &out[(y * spec.out_w + x) * c_count + c]);
        }
      }
    }
  }
}

struct Prepared {
  Taps ys, xs;
};

Prepared Prepare(const ImageView& image, const ImageSpec& spec) {
  if (image.h < 1 || image.w < 1) throw std::invalid_argument("an image has no pixels");
  if (image.row_stride < image.w * spec.channels) {
    throw std::invalid_argument("an image's rows overlap (row stride below its width)");
  }
  double y0, hh, x0, ww;
  Window(image, spec, &y0, &hh, &x0, &ww);
  return {MakeTaps(spec.out_h, image.h, y0, hh), MakeTaps(spec.out_w, image.w, x0, ww)};
}

// One block of output rows of one image into `out`, the image's slot.
void Rows(const ImageView& image, const ImageSpec& spec, const Prepared& p, int64_t begin,
          int64_t end, void* out) {
  if (spec.fp16) {
    RowRange(image, spec, p.ys, p.xs, begin, end, static_cast<uint16_t*>(out));
  } else {
    RowRange(image, spec, p.ys, p.xs, begin, end, static_cast<float*>(out));
  }
}

}  // namespace

int64_t ImageSlotBytes(const ImageSpec& spec) {
  const int64_t item = spec.fp16 ? 2 : 4;
  return spec.out_h * spec.out_w * spec.channels * item;
}

void CheckImageSpec(const ImageSpec& spec) {
  if (spec.out_h < 1 || spec.out_w < 1) throw std::invalid_argument("output size must be >= 1");
  if (spec.channels < 1 || spec.channels > 4) {
    throw std::invalid_argument("images have 1 to 4 channels");
  }
  if (static_cast<int64_t>(spec.mean.size()) != spec.channels ||
      static_cast<int64_t>(spec.std.size()) != spec.channels) {
    throw std::invalid_argument("mean and std need one value per channel");
  }
  for (float s : spec.std) {
    if (!(s > 0.0f) || !std::isfinite(s)) throw std::invalid_argument("std must be positive");
  }
}

void PreprocessImage(const ImageView& image, const ImageSpec& spec, void* out) {
  CheckImageSpec(spec);
  Rows(image, spec, Prepare(image, spec), 0, spec.out_h, out);
}

void PreprocessImages(const std::vector<ImageView>& images, const ImageSpec& spec, void* out,
                      int threads) {
  CheckImageSpec(spec);
  if (images.empty()) return;
  std::vector<Prepared> prepared;
  prepared.reserve(images.size());
  for (const ImageView& image : images) prepared.push_back(Prepare(image, spec));
  const int64_t slot = ImageSlotBytes(spec);
  // work items: (image, block of rows); threads take the next one until none is left
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(spec.out_h, 32));
  const int64_t blocks_per_image = (spec.out_h + block - 1) / block;
  const int64_t items = static_cast<int64_t>(images.size()) * blocks_per_image;
  ParallelFor(items, threads, [&](int64_t item) {
    const int64_t i = item / blocks_per_image;
    const int64_t begin = (item % blocks_per_image) * block;
    const int64_t end = std::min(begin + block, spec.out_h);
    Rows(images[i], spec, prepared[i], begin, end, static_cast<uint8_t*>(out) + i * slot);
  });
}

ImageTransform::ImageTransform(ImageSpec spec, int threads)
    : spec_(std::move(spec)), threads_(threads) {
  CheckImageSpec(spec_);
  output_.dtype = spec_.fp16 ? DType::kFloat16 : DType::kFloat32;
  if (spec_.chw) {
    output_.trailing_dims = {spec_.channels, spec_.out_h, spec_.out_w};
  } else {
    output_.trailing_dims = {spec_.out_h, spec_.out_w, spec_.channels};
  }
  output_.row_bytes = static_cast<size_t>(ImageSlotBytes(spec_));
}

std::string ImageTransform::Check(const TensorView& input) const {
  const bool gray = spec_.channels == 1 && input.rank == 3;
  if (!(input.rank == 4 && input.dims[3] == spec_.channels) && !gray) {
    return "must be uint8 images [n, height, width, " + std::to_string(spec_.channels) + "]" +
           (spec_.channels == 1 ? " or [n, height, width]" : "");
  }
  if (input.dims[1] < 1 || input.dims[2] < 1) return "has images with no pixels";
  return "";
}

void ImageTransform::Apply(const TensorView& input, void* out) const {
  const int64_t n = input.dims[0], h = input.dims[1], w = input.dims[2];
  const int64_t row_stride = w * spec_.channels;
  const auto* data = static_cast<const uint8_t*>(input.data);
  std::vector<ImageView> images;
  images.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) images.push_back({data + i * h * row_stride, h, w, row_stride});
  PreprocessImages(images, spec_, out, threads_);
}

}  // namespace fastserve
