#include "fastserve/preprocess.h"

#include <gtest/gtest.h>

#include <stdexcept>
#include <vector>

#include "fastserve/tensor.h"

namespace fastserve {
namespace {

ImageSpec Gray(int64_t h, int64_t w, Aspect aspect = Aspect::kStretch) {
  ImageSpec spec;
  spec.out_h = h;
  spec.out_w = w;
  spec.channels = 1;
  spec.aspect = aspect;
  spec.mean = {0.0f};
  spec.std = {1.0f};
  return spec;
}

TEST(PreprocessTest, HalvingAveragesEachTwoByTwoBlock) {
  const uint8_t pixels[] = {0,   255, 0, 0,  //
                            255, 0,   0, 0};
  ImageView image{pixels, 2, 4, 4};
  std::vector<float> out(2);
  PreprocessImage(image, Gray(1, 2), out.data());
  EXPECT_FLOAT_EQ(out[0], 0.5f);  // (0 + 255 + 255 + 0) / 4 / 255
  EXPECT_FLOAT_EQ(out[1], 0.0f);
}

TEST(PreprocessTest, NormalizesPerChannelAndLaysOutPlanes) {
  const uint8_t pixel[] = {255, 0, 51};
  ImageView image{pixel, 1, 1, 3};
  ImageSpec spec;
  spec.out_h = 2;
  spec.out_w = 1;
  spec.mean = {0.5f, 0.0f, 0.1f};
  spec.std = {0.5f, 1.0f, 0.1f};
  std::vector<float> out(6);
  PreprocessImage(image, spec, out.data());
  // planar: channel 0 for both rows, then channel 1, then channel 2
  EXPECT_FLOAT_EQ(out[0], 1.0f);
  EXPECT_FLOAT_EQ(out[1], 1.0f);
  EXPECT_FLOAT_EQ(out[2], 0.0f);
  EXPECT_NEAR(out[4], 1.0f, 1e-6);  // (0.2 - 0.1) / 0.1
}

TEST(PreprocessTest, ManyImagesOnManyThreadsMatchOneAtATime) {
  std::vector<std::vector<uint8_t>> data;
  std::vector<ImageView> images;
  for (int i = 0; i < 9; ++i) {
    data.emplace_back(static_cast<size_t>(33 * (20 + i)));
    for (size_t k = 0; k < data.back().size(); ++k) data.back()[k] = (k * 7 + i) % 256;
  }
  for (int i = 0; i < 9; ++i) images.push_back({data[i].data(), 33, 20 + i, 20 + i});
  ImageSpec spec = Gray(40, 17, Aspect::kShorterSide);
  std::vector<float> batch(9 * 40 * 17), one(40 * 17);
  PreprocessImages(images, spec, batch.data(), 4);
  for (int i = 0; i < 9; ++i) {
    PreprocessImage(images[i], spec, one.data());
    for (size_t k = 0; k < one.size(); ++k) ASSERT_EQ(batch[i * one.size() + k], one[k]);
  }
}

TEST(PreprocessTest, Fp16OutputIsTheRoundedFp32Output) {
  std::vector<uint8_t> pixels(7 * 5);
  for (size_t k = 0; k < pixels.size(); ++k) pixels[k] = static_cast<uint8_t>(k * 37 % 256);
  ImageView image{pixels.data(), 7, 5, 5};
  ImageSpec spec = Gray(3, 4);
  spec.mean = {0.4f};
  spec.std = {0.3f};
  std::vector<float> wide(12);
  PreprocessImage(image, spec, wide.data());
  spec.fp16 = true;
  EXPECT_EQ(ImageSlotBytes(spec), 12 * 2);
  std::vector<uint16_t> narrow(12);
  PreprocessImage(image, spec, narrow.data());
  for (size_t k = 0; k < wide.size(); ++k) EXPECT_EQ(narrow[k], FloatToHalf(wide[k]));
}

TEST(PreprocessTest, RefusesBadSpecs) {
  ImageSpec spec = Gray(0, 4);
  EXPECT_THROW(CheckImageSpec(spec), std::invalid_argument);
  spec = Gray(4, 4);
  spec.std = {0.0f};
  EXPECT_THROW(CheckImageSpec(spec), std::invalid_argument);
  spec = Gray(4, 4);
  spec.channels = 3;
  EXPECT_THROW(CheckImageSpec(spec), std::invalid_argument);
}

}  // namespace
}  // namespace fastserve
