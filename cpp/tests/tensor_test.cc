#include "fastserve/tensor.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace fastserve {
namespace {

TEST(TensorTest, ItemSizesAndNamesRoundTrip) {
  EXPECT_EQ(ItemSize(DType::kBool), 1u);
  EXPECT_EQ(ItemSize(DType::kFloat16), 2u);
  EXPECT_EQ(ItemSize(DType::kFloat32), 4u);
  EXPECT_EQ(ItemSize(DType::kInt64), 8u);
  EXPECT_EQ(ItemSize(DType::kComplex128), 16u);
  for (size_t i = 0; i < kNumDTypes; ++i) {
    DType d = static_cast<DType>(i);
    DType parsed;
    ASSERT_TRUE(ParseDType(DTypeName(d), &parsed)) << DTypeName(d);
    EXPECT_EQ(parsed, d);
  }
  DType unused;
  EXPECT_FALSE(ParseDType("object", &unused));
}

TEST(TensorTest, RowBytesAndOverflow) {
  const int64_t dims[] = {5, 3, 2};
  EXPECT_EQ(ElementCount(dims, 3), 30);
  EXPECT_EQ(RowBytes(DType::kFloat32, dims, 3), 24);
  EXPECT_EQ(RowBytes(DType::kFloat32, dims, 1), 4);  // rank 1: one element per row
  const int64_t huge[] = {1, std::numeric_limits<int64_t>::max() / 2, 4};
  EXPECT_EQ(RowBytes(DType::kFloat32, huge, 3), -1);
  const int64_t negative[] = {1, -1};
  EXPECT_EQ(ElementCount(negative, 2), -1);
}

TEST(TensorTest, BuffersAreAligned) {
  UniqueBuffer b = AllocateBuffer(3);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b.get()) % kBufferAlignment, 0u);
  UniqueBuffer empty = AllocateBuffer(0);
  EXPECT_NE(empty, nullptr);
  EXPECT_EQ(AlignUp(1), kBufferAlignment);
  EXPECT_EQ(AlignUp(64), 64u);
}

TEST(TensorTest, HalfConversionRoundsToNearestEven) {
  EXPECT_EQ(FloatToHalf(0.0f), 0x0000);
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  EXPECT_EQ(FloatToHalf(1.0f), 0x3c00);
  EXPECT_EQ(FloatToHalf(-2.0f), 0xc000);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);         // the largest half
  EXPECT_EQ(FloatToHalf(65519.99f), 0x7bff);        // below the midpoint to 65536
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);         // the midpoint rounds to even: infinity
  EXPECT_EQ(FloatToHalf(1.0f + 0x1p-11f), 0x3c00);  // tie between 1 and 1 + 2^-10: even
  EXPECT_EQ(FloatToHalf(1.0f + 0x3p-11f), 0x3c02);  // tie: up to the even neighbour
  EXPECT_EQ(FloatToHalf(0x1p-24f), 0x0001);         // the smallest subnormal
  EXPECT_EQ(FloatToHalf(0x1p-25f), 0x0000);         // half of it: a tie, to even (zero)
  EXPECT_EQ(FloatToHalf(0x1.8p-25f), 0x0001);
  EXPECT_EQ(FloatToHalf(0x1.ff8p-15f), 0x03ff);  // the largest subnormal
  EXPECT_EQ(FloatToHalf(0x1.ffcp-15f), 0x0400);  // a tie: to even, the smallest normal
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(FloatToHalf(-std::numeric_limits<float>::infinity()), 0xfc00);
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::quiet_NaN()) & 0x7e00, 0x7e00);
  EXPECT_EQ(FloatToHalf(1e30f), 0x7c00);
}

#ifdef __FLT16_MAX__
// Where the compiler has a half type, it is the reference for a sweep of float patterns.
TEST(TensorTest, HalfConversionMatchesTheCompilersHalfType) {
  for (uint64_t bits = 0; bits <= 0xffffffffu; bits += 997) {
    const auto pattern = static_cast<uint32_t>(bits);
    float value;
    std::memcpy(&value, &pattern, sizeof value);
    if (std::isnan(value)) continue;
    const _Float16 half = static_cast<_Float16>(value);
    uint16_t expected;
    std::memcpy(&expected, &half, sizeof expected);
    ASSERT_EQ(FloatToHalf(value), expected) << "float bits " << std::hex << pattern;
  }
}
#endif

TEST(TensorTest, FillsAndChecksElementsOfEachType) {
  EXPECT_TRUE(FitsDType(DType::kInt8, -128.0));
  EXPECT_FALSE(FitsDType(DType::kInt8, 128.0));
  EXPECT_FALSE(FitsDType(DType::kInt64, 0.5));
  EXPECT_FALSE(FitsDType(DType::kInt64, 9223372036854775808.0));  // 2^63
  EXPECT_TRUE(FitsDType(DType::kUInt64, 0.0));
  EXPECT_FALSE(FitsDType(DType::kUInt32, -1.0));
  EXPECT_FALSE(FitsDType(DType::kBool, 2.0));
  EXPECT_TRUE(FitsDType(DType::kFloat16, 0.1));
  EXPECT_FALSE(FitsDType(DType::kComplex64, 0.0));
  int32_t ints[3] = {0, 0, 9};
  FillElements(DType::kInt32, -7.0, ints, 2);
  EXPECT_EQ(ints[0], -7);
  EXPECT_EQ(ints[1], -7);
  EXPECT_EQ(ints[2], 9);
  uint16_t halves[2];
  FillElements(DType::kFloat16, 1.0, halves, 2);
  EXPECT_EQ(halves[1], 0x3c00);
  double doubles[1];
  FillElements(DType::kFloat64, 0.25, doubles, 1);
  EXPECT_EQ(doubles[0], 0.25);
}

}  // namespace
}  // namespace fastserve
