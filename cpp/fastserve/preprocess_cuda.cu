#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "fastserve/preprocess_cuda.h"

namespace fastserve {
namespace {

void Check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error state where it is not fatal
    throw std::runtime_error(std::string("CUDA: ") + what + ": " + cudaGetErrorString(status));
  }
}

// One source image as the kernel reads it: where its pixels start in the device copy, and
// the window of it the output covers (all of it, or the shorter side's centered crop).
struct ImageMeta {
  int64_t offset;  // bytes into the device source buffer
  int64_t h, w;
  double y0, x0, hh, ww;
};

struct Params {
  int64_t out_h, out_w, channels;
  bool chw, fp16;
  float scale[4], shift[4];
};

// The source index pair and weight of output position i, as MakeTaps in preprocess.cc
// computes them (double positions, float weight), so both kernels sample alike.
__device__ void Tap(int64_t i, int64_t out, int64_t src, double offset, double extent, int64_t* lo,
                    int64_t* hi, float* weight) {
  double pos = (static_cast<double>(i) + 0.5) * (extent / static_cast<double>(out)) - 0.5 + offset;
  pos = fmax(pos, 0.0);
  int64_t l = static_cast<int64_t>(floor(pos));
  double frac = pos - static_cast<double>(l);
  if (l >= src - 1) {
    l = src - 1;
    frac = 0.0;
  }
  *lo = l;
  *hi = l + 1 < src - 1 ? l + 1 : src - 1;
  *weight = static_cast<float>(frac);
}

// One thread per output pixel (x, y) of image blockIdx.z: every channel of it.
__global__ void ImageKernel(const uint8_t* src, const ImageMeta* metas, Params p, void* out) {
  const int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t y = blockIdx.y * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (x >= p.out_w || y >= p.out_h) return;
  const ImageMeta m = metas[blockIdx.z];
  int64_t ylo, yhi, xlo, xhi;
  float wy, wx;
  Tap(y, p.out_h, m.h, m.y0, m.hh, &ylo, &yhi, &wy);
  Tap(x, p.out_w, m.w, m.x0, m.ww, &xlo, &xhi, &wx);
  const int64_t c_count = p.channels;
  const uint8_t* image = src + m.offset;
  const uint8_t* top = image + ylo * m.w * c_count;
  const uint8_t* bottom = image + yhi * m.w * c_count;
  const int64_t plane = p.out_h * p.out_w;
  const int64_t slot = plane * c_count * static_cast<int64_t>(blockIdx.z);
  for (int64_t c = 0; c < c_count; ++c) {
    const float a = top[xlo * c_count + c], b = top[xhi * c_count + c];
    const float d = bottom[xlo * c_count + c], e = bottom[xhi * c_count + c];
    // __fmul_rn/__fadd_rn: no fused multiply-add, the CPU kernel's roundings
    const float upper = __fadd_rn(a, __fmul_rn(__fsub_rn(b, a), wx));
    const float lower = __fadd_rn(d, __fmul_rn(__fsub_rn(e, d), wx));
    const float v = __fadd_rn(upper, __fmul_rn(__fsub_rn(lower, upper), wy));
    const float normalized = __fadd_rn(__fmul_rn(v, p.scale[c]), p.shift[c]);
    const int64_t index =
        slot + (p.chw ? c * plane + y * p.out_w + x : (y * p.out_w + x) * c_count + c);
    if (p.fp16) {
      static_cast<__half*>(out)[index] = __float2half_rn(normalized);
    } else {
      static_cast<float*>(out)[index] = normalized;
    }
  }
}

// A buffer that grows to the largest size asked for and is reused.
template <bool kPinned>
struct Buffer {
  void* ptr = nullptr;
  size_t size = 0;
  void Reserve(size_t bytes) {
    if (bytes <= size) return;
    Release();
    const size_t want = std::max<size_t>(bytes, 2 * size);
    Check(kPinned ? cudaMallocHost(&ptr, want) : cudaMalloc(&ptr, want),
          kPinned ? "cudaMallocHost" : "cudaMalloc");
    size = want;
  }
  void Release() {
    if (ptr != nullptr) (kPinned ? cudaFreeHost(ptr) : cudaFree(ptr));
    ptr = nullptr;
    size = 0;
  }
};

}  // namespace

struct CudaImagePipeline::State {
  cudaStream_t stream = nullptr;
  Buffer<true> staging;     // pinned: source pixels, then the image table
  Buffer<false> source;     // device copy of staging
  Buffer<false> output;     // the batch
  size_t output_bytes = 0;  // of the last Run
};

CudaImagePipeline::CudaImagePipeline(ImageSpec spec, int device)
    : spec_(std::move(spec)), device_(device), state_(std::make_unique<State>()) {
  CheckImageSpec(spec_);
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count) {
    cudaGetLastError();
    throw std::runtime_error("CUDA device " + std::to_string(device) + " is not available");
  }
  Check(cudaSetDevice(device), "cudaSetDevice");
  Check(cudaStreamCreateWithFlags(&state_->stream, cudaStreamNonBlocking), "cudaStreamCreate");
}

CudaImagePipeline::~CudaImagePipeline() {
  if (!state_) return;
  cudaSetDevice(device_);
  if (state_->stream != nullptr) cudaStreamDestroy(state_->stream);
  state_->staging.Release();
  state_->source.Release();
  state_->output.Release();
}

const void* CudaImagePipeline::Run(const std::vector<ImageView>& images) {
  Check(cudaSetDevice(device_), "cudaSetDevice");
  State& s = *state_;
  const size_t count = images.size();
  const size_t slot = static_cast<size_t>(ImageSlotBytes(spec_));
  s.output.Reserve(std::max<size_t>(1, count * slot));
  s.output_bytes = count * slot;
  if (count == 0) return s.output.ptr;
  // stage every image's pixels, rows packed, then the table of images after them
  std::vector<ImageMeta> metas(count);
  size_t pixels = 0;
  for (size_t i = 0; i < count; ++i) {
    const ImageView& image = images[i];
    if (image.h < 1 || image.w < 1) throw std::invalid_argument("an image has no pixels");
    if (image.row_stride < image.w * spec_.channels) {
      throw std::invalid_argument("an image's rows overlap (row stride below its width)");
    }
    ImageMeta& m = metas[i];
    m.offset = static_cast<int64_t>(pixels);
    m.h = image.h;
    m.w = image.w;
    m.y0 = 0.0;
    m.x0 = 0.0;
    m.hh = static_cast<double>(image.h);
    m.ww = static_cast<double>(image.w);
    if (spec_.aspect == Aspect::kShorterSide) {
      const double scale = std::max(static_cast<double>(spec_.out_h) / image.h,
                                    static_cast<double>(spec_.out_w) / image.w);
      m.hh = spec_.out_h / scale;
      m.ww = spec_.out_w / scale;
      m.y0 = (image.h - m.hh) / 2.0;
      m.x0 = (image.w - m.ww) / 2.0;
    }
    pixels += static_cast<size_t>(image.h * image.w * spec_.channels);
  }
  const size_t table = (pixels + alignof(ImageMeta) - 1) / alignof(ImageMeta) * alignof(ImageMeta);
  const size_t staged = table + count * sizeof(ImageMeta);
  Check(cudaStreamSynchronize(s.stream), "cudaStreamSynchronize");  // staging is free again
  s.staging.Reserve(staged);
  s.source.Reserve(staged);
  auto* host = static_cast<uint8_t*>(s.staging.ptr);
  for (size_t i = 0; i < count; ++i) {
    const ImageView& image = images[i];
    const size_t row = static_cast<size_t>(image.w * spec_.channels);
    uint8_t* dst = host + metas[i].offset;
    for (int64_t y = 0; y < image.h; ++y) {
      std::memcpy(dst + y * row, image.data + y * image.row_stride, row);
    }
  }
  std::memcpy(host + table, metas.data(), count * sizeof(ImageMeta));
  Check(cudaMemcpyAsync(s.source.ptr, host, staged, cudaMemcpyHostToDevice, s.stream),
        "cudaMemcpyAsync");
  Params p{};
  p.out_h = spec_.out_h;
  p.out_w = spec_.out_w;
  p.channels = spec_.channels;
  p.chw = spec_.chw;
  p.fp16 = spec_.fp16;
  for (int64_t c = 0; c < spec_.channels; ++c) {
    p.scale[c] = 1.0f / (255.0f * spec_.std[c]);
    p.shift[c] = -spec_.mean[c] / spec_.std[c];
  }
  const dim3 block(32, 8);
  const dim3 grid(static_cast<unsigned>((spec_.out_w + block.x - 1) / block.x),
                  static_cast<unsigned>((spec_.out_h + block.y - 1) / block.y),
                  static_cast<unsigned>(count));
  const auto* device_source = static_cast<const uint8_t*>(s.source.ptr);
  ImageKernel<<<grid, block, 0, s.stream>>>(
      device_source, reinterpret_cast<const ImageMeta*>(device_source + table), p, s.output.ptr);
  Check(cudaGetLastError(), "kernel launch");
  Check(cudaStreamSynchronize(s.stream), "cudaStreamSynchronize");
  return s.output.ptr;
}

void CudaImagePipeline::CopyOut(void* out, size_t bytes) {
  if (bytes > state_->output_bytes) throw std::invalid_argument("more bytes than the batch has");
  Check(cudaSetDevice(device_), "cudaSetDevice");
  Check(cudaMemcpyAsync(out, state_->output.ptr, bytes, cudaMemcpyDeviceToHost, state_->stream),
        "cudaMemcpyAsync");
  Check(cudaStreamSynchronize(state_->stream), "cudaStreamSynchronize");
}

}  // namespace fastserve
