#include "fastserve/tabular.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

namespace fastserve {
namespace {

using Kind = TabularColumn::Kind;

TabularColumn Number(double shift, double scale, double fill) {
  TabularColumn c;
  c.shift = shift;
  c.scale = scale;
  c.fill = fill;
  return c;
}

TabularColumn Category(Kind kind, int64_t vocabulary, int64_t fill_code = kUnknownCode) {
  TabularColumn c;
  c.kind = kind;
  c.width = kind == Kind::kOneHot ? vocabulary : 1;
  c.fill_code = fill_code;
  c.unknown_value = -1.0;
  return c;
}

TEST(TabularTest, ScalesFillsAndEncodesEachRow) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<double> age{30.0, nan, 50.0};
  const std::vector<int64_t> colour{2, kUnknownCode, kMissingCode};  // vocabulary of 3
  const std::vector<int64_t> size{0, kMissingCode, kUnknownCode};
  TabularSpec spec;
  spec.columns = {Number(40.0, 0.1, 45.0), Category(Kind::kOneHot, 3, 0),
                  Category(Kind::kIndex, 4, 3)};
  ASSERT_EQ(CheckTabularSpec(spec), 5);
  std::vector<float> out(3 * 5, 99.0f);
  PreprocessTabular({{age.data(), nullptr}, {nullptr, colour.data()}, {nullptr, size.data()}}, 3,
                    spec, out.data());
  const std::vector<float> expected{
      -1.0f, 0, 0, 1, 0,   // 30 scaled; colour 2; size 0
      0.5f,  0, 0, 0, 3,   // NaN filled with 45; unknown colour: all 0; missing size: 3
      1.0f,  1, 0, 0, -1,  // missing colour: fill code 0; unknown size: -1
  };
  for (size_t k = 0; k < expected.size(); ++k) EXPECT_FLOAT_EQ(out[k], expected[k]) << k;
}

TEST(TabularTest, ManyRowsOnManyThreadsMatchOneThreadInFloat64) {
  const int64_t rows = 10000;
  std::vector<double> x(rows);
  std::vector<int64_t> codes(rows);
  for (int64_t r = 0; r < rows; ++r) {
    x[r] = r % 7 == 0 ? std::nan("") : static_cast<double>(r) / 3.0;
    codes[r] = r % 5 - 1;  // -1 (unknown) .. 3
  }
  TabularSpec spec;
  spec.fp64 = true;
  spec.columns = {Number(1.0, 2.0, 0.0), Category(Kind::kOneHot, 4)};
  std::vector<double> one(rows * 5), many(rows * 5);
  const std::vector<TabularInput> inputs{{x.data(), nullptr}, {nullptr, codes.data()}};
  PreprocessTabular(inputs, rows, spec, one.data(), 1);
  PreprocessTabular(inputs, rows, spec, many.data(), 4);
  EXPECT_EQ(one, many);
  EXPECT_DOUBLE_EQ(one[5 * 3], (1.0 - 1.0) * 2.0);  // row 3: x = 1
  EXPECT_DOUBLE_EQ(one[0], -2.0);                   // row 0: NaN filled with 0
}

TEST(TabularTest, RefusesBadSpecsAndMissingInputs) {
  TabularSpec spec;
  EXPECT_THROW(CheckTabularSpec(spec), std::invalid_argument);  // no column
  spec.columns = {Number(0.0, std::numeric_limits<double>::infinity(), 0.0)};
  EXPECT_THROW(CheckTabularSpec(spec), std::invalid_argument);
  spec.columns = {Category(Kind::kOneHot, 3, 3)};  // fill code past the vocabulary
  EXPECT_THROW(CheckTabularSpec(spec), std::invalid_argument);
  spec.columns = {Category(Kind::kOneHot, 3)};
  std::vector<float> out(3);
  EXPECT_THROW(PreprocessTabular({{nullptr, nullptr}}, 1, spec, out.data()), std::invalid_argument);
  EXPECT_THROW(PreprocessTabular({}, 1, spec, out.data()), std::invalid_argument);
  PreprocessTabular({{nullptr, nullptr}}, 0, spec, out.data());  // no rows: nothing to read
}

}  // namespace
}  // namespace fastserve
