#include "fastserve/tensor.h"

#include <gtest/gtest.h>

#include <cstdint>
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

}  // namespace
}  // namespace fastserve
