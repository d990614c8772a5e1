#include "fastserve/bounds.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

namespace fastserve {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

TEST(WithinBounds, InsideEveryColumnPasses) {
  // columns: [0, 10], [-inf, 5], [1, +inf]
  const std::vector<double> lower = {0.0, -kInf, 1.0};
  const std::vector<double> upper = {10.0, 5.0, kInf};
  const std::vector<double> batch = {0.0, -1e300, 1.0, 10.0, 5.0, 1e300};
  EXPECT_TRUE(WithinBounds(batch.data(), 2, 3, lower.data(), upper.data()));
  EXPECT_TRUE(WithinBounds(batch.data(), 0, 3, lower.data(), upper.data()));  // no rows
}

TEST(WithinBounds, OneValueOutsideOrNaNFails) {
  const std::vector<float> lower = {0.0F, 0.0F};
  const std::vector<float> upper = {1.0F, 1.0F};
  for (int at = 0; at < 6; ++at) {
    for (float bad : {-0.5F, 1.5F, std::nanf("")}) {
      std::vector<float> batch(6, 0.5F);
      batch[static_cast<size_t>(at)] = bad;
      EXPECT_FALSE(WithinBounds(batch.data(), 3, 2, lower.data(), upper.data()))
          << "value " << bad << " at " << at;
    }
  }
}

TEST(WithinBounds, AnInfiniteBoundStillRefusesNaN) {
  const std::vector<double> lower = {-kInf};
  const std::vector<double> upper = {kInf};
  const std::vector<double> inf_ok = {kInf, -kInf};
  EXPECT_TRUE(WithinBounds(inf_ok.data(), 2, 1, lower.data(), upper.data()));
  const std::vector<double> nan = {std::nan("")};
  EXPECT_FALSE(WithinBounds(nan.data(), 1, 1, lower.data(), upper.data()));
}

}  // namespace
}  // namespace fastserve
