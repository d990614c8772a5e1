#include "fastserve/batch_policy.h"

#include <gtest/gtest.h>

#include <stdexcept>
#include <vector>

namespace fastserve {
namespace {

BatchPolicy Policy(int64_t max, std::vector<int64_t> preferred = {}, int64_t delay_us = 0) {
  BatchPolicy p;
  p.max_batch_size = max;
  p.preferred_batch_sizes = std::move(preferred);
  p.max_queue_delay_us = delay_us;
  return p;
}

TEST(BatchPolicyTest, ValidatesFields) {
  EXPECT_NO_THROW(Policy(4, {1, 4}).Validate());
  EXPECT_THROW(Policy(0).Validate(), std::invalid_argument);
  EXPECT_THROW(Policy(4, {5}).Validate(), std::invalid_argument);
  EXPECT_THROW(Policy(4, {0}).Validate(), std::invalid_argument);
  EXPECT_THROW(Policy(4, {}, -1).Validate(), std::invalid_argument);
  BatchPolicy p = Policy(4);
  p.max_queue_size = 0;
  EXPECT_THROW(p.Validate(), std::invalid_argument);
  p = Policy(4);
  p.default_timeout_us = -5;
  EXPECT_THROW(p.Validate(), std::invalid_argument);
  p = Policy(4);
  p.priority_levels = 0;
  EXPECT_THROW(p.Validate(), std::invalid_argument);
  EXPECT_THROW(ReleaseRule(Policy(-3)), std::invalid_argument);
}

TEST(ReleaseRuleTest, FullWhenRowsReachMax) {
  ReleaseRule rule(Policy(4, {}, 1000));
  const int64_t rows[] = {1, 1, 1, 1, 1};
  ReleaseDecision d = rule.Decide(rows, 5, 0, false);
  EXPECT_EQ(d.reason, ReleaseReason::kFull);
  EXPECT_EQ(d.count, 4u);
  EXPECT_EQ(d.rows, 4);
}

TEST(ReleaseRuleTest, FullWhenNextDoesNotFit) {
  ReleaseRule rule(Policy(4, {}, 1000));
  const int64_t rows[] = {2, 1, 2};
  ReleaseDecision d = rule.Decide(rows, 3, 0, false);
  EXPECT_EQ(d.reason, ReleaseReason::kFull);
  EXPECT_EQ(d.count, 2u);
  EXPECT_EQ(d.rows, 3);
}

TEST(ReleaseRuleTest, LargestPreferredPrefix) {
  ReleaseRule rule(Policy(8, {2, 3, 7}, 1000));
  const int64_t rows[] = {1, 1, 1, 1, 1};  // prefixes 1..5: 2 and 3 are preferred
  ReleaseDecision d = rule.Decide(rows, 5, 0, false);
  EXPECT_EQ(d.reason, ReleaseReason::kPreferred);
  EXPECT_EQ(d.count, 3u);
  EXPECT_EQ(d.rows, 3);
}

TEST(ReleaseRuleTest, PreferredSizeSkippedByMultiRowRequest) {
  ReleaseRule rule(Policy(8, {2}, 1000));
  const int64_t rows[] = {1, 3};  // prefix sums 1, 4: never 2
  ReleaseDecision d = rule.Decide(rows, 2, 0, false);
  EXPECT_EQ(d.reason, ReleaseReason::kNone);
  EXPECT_EQ(d.wait_ns, 1000 * 1000);
}

TEST(ReleaseRuleTest, DelayThenWait) {
  ReleaseRule rule(Policy(8, {}, 100));
  const int64_t rows[] = {1, 2};
  ReleaseDecision waiting = rule.Decide(rows, 2, 40'000, false);
  EXPECT_EQ(waiting.reason, ReleaseReason::kNone);
  EXPECT_EQ(waiting.wait_ns, 60'000);
  ReleaseDecision d = rule.Decide(rows, 2, 100'000, false);
  EXPECT_EQ(d.reason, ReleaseReason::kDelay);
  EXPECT_EQ(d.count, 2u);
  EXPECT_EQ(d.rows, 3);
}

TEST(ReleaseRuleTest, DrainReleasesWithoutWaiting) {
  ReleaseRule rule(Policy(8, {}, 1'000'000));
  const int64_t rows[] = {1, 2};
  ReleaseDecision d = rule.Decide(rows, 2, 0, true);
  EXPECT_EQ(d.reason, ReleaseReason::kDrain);
  EXPECT_EQ(d.rows, 3);
}

TEST(ReleaseRuleTest, ZeroDelayReleasesAtOnceAndNothingGivesNothing) {
  ReleaseRule rule(Policy(8));
  const int64_t rows[] = {1};
  EXPECT_EQ(rule.Decide(rows, 1, 0, false).reason, ReleaseReason::kDelay);
  ReleaseDecision none = rule.Decide(nullptr, 0, 0, false);
  EXPECT_EQ(none.reason, ReleaseReason::kNone);
  EXPECT_EQ(none.wait_ns, -1);
}

TEST(ReleaseRuleTest, ReasonNames) {
  EXPECT_STREQ(ReleaseReasonName(ReleaseReason::kFull), "full");
  EXPECT_STREQ(ReleaseReasonName(ReleaseReason::kPreferred), "preferred");
  EXPECT_STREQ(ReleaseReasonName(ReleaseReason::kDelay), "delay");
  EXPECT_STREQ(ReleaseReasonName(ReleaseReason::kDrain), "drain");
}

}  // namespace
}  // namespace fastserve
