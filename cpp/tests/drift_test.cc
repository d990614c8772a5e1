#include "fastserve/drift.h"

#include <gtest/gtest.h>

#include <cmath>
#include <stdexcept>
#include <thread>
#include <vector>

namespace fastserve {
namespace {

DriftSketch TwoFeatures(int64_t window) {
  FeatureBins continuous{{1.0, 2.0, 3.0}, false};  // (-inf,1] (1,2] (2,3] (3,inf)
  FeatureBins discrete{{0.0, 1.0}, true};          // 0, 1, anything else
  return DriftSketch({continuous, discrete}, window);
}

TEST(DriftSketchTest, BinsFollowTheReferenceEdges) {
  DriftSketch sketch = TwoFeatures(100);
  const float rows[] = {0.5f, 0.0f, 1.0f, 1.0f, 1.5f, 2.0f, 3.0f, 0.5f, 9.0f, NAN, NAN, 1.0f};
  sketch.Update(rows, 6, 2, 2);
  DriftSketch::Window w = sketch.Snapshot();
  EXPECT_EQ(w.rows, 6);
  // continuous: 0.5 and 1.0 in the first bin (edges are upper-inclusive), 1.5, 3.0, 9.0
  EXPECT_EQ(w.counts[0], (std::vector<int64_t>{2, 1, 1, 1}));
  // discrete: 0 once, 1 twice; 2.0 and 0.5 were never in the reference
  EXPECT_EQ(w.counts[1], (std::vector<int64_t>{1, 2, 2}));
  EXPECT_EQ(w.nulls, (std::vector<int64_t>{1, 1}));
}

TEST(DriftSketchTest, AFullWindowBecomesTheLastOneAndANewOneStarts) {
  DriftSketch sketch = TwoFeatures(3);
  const double low[] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  const double high[] = {5.0, 1.0, 5.0, 1.0};
  sketch.Update(low, 2, 2, 2);
  EXPECT_EQ(sketch.Snapshot().rows, 2);  // no complete window yet: the current one
  sketch.Update(low, 1, 2, 2);
  sketch.Update(high, 2, 2, 2);  // the low window is complete; two high rows are current
  DriftSketch::Window w = sketch.Snapshot();
  EXPECT_EQ(w.rows, 3);
  EXPECT_EQ(w.counts[0], (std::vector<int64_t>{3, 0, 0, 0}));
  sketch.Update(high, 1, 2, 2);
  w = sketch.Snapshot();
  EXPECT_EQ(w.counts[0], (std::vector<int64_t>{0, 0, 0, 3}));
  EXPECT_EQ(sketch.total_rows(), 6);
}

TEST(DriftSketchTest, RowStrideSkipsColumnsThatAreNotFeatures) {
  DriftSketch sketch({FeatureBins{{0.0}, false}}, 10);
  const float rows[] = {-1.0f, 99.0f, 1.0f, 99.0f};  // feature, then a column to skip
  sketch.Update(rows, 2, 1, 2);
  EXPECT_EQ(sketch.Snapshot().counts[0], (std::vector<int64_t>{1, 1}));
}

TEST(DriftSketchTest, RefusesBadEdgesAndWidths) {
  EXPECT_THROW(DriftSketch({FeatureBins{{2.0, 1.0}, false}}, 10), std::invalid_argument);
  EXPECT_THROW(DriftSketch({FeatureBins{{1.0, 1.0}, true}}, 10), std::invalid_argument);
  EXPECT_THROW(DriftSketch({FeatureBins{{1.0}, false}}, 0), std::invalid_argument);
  DriftSketch sketch = TwoFeatures(10);
  const float row[] = {1.0f, 2.0f, 3.0f};
  EXPECT_THROW(sketch.Update(row, 1, 3, 3), std::invalid_argument);
}

TEST(DriftSketchTest, ConcurrentUpdatesLoseNoRow) {
  DriftSketch sketch({FeatureBins{{0.0}, false}}, 1 << 30);
  std::vector<std::thread> threads;
  const float one = 1.0f;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) sketch.Update(&one, 1, 1, 1);
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(sketch.Snapshot().counts[0][1], 40000);
}

}  // namespace
}  // namespace fastserve
