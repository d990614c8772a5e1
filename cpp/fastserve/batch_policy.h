// Batching policy, its validation, and the pure release decision the batcher applies.
#ifndef FASTSERVE_BATCH_POLICY_H_
#define FASTSERVE_BATCH_POLICY_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace fastserve {

// Limits that keep row sums and timers far from overflow.
inline constexpr int64_t kMaxBatchSizeLimit = int64_t{1} << 30;
inline constexpr int64_t kMaxQueueSizeLimit = int64_t{1} << 30;
inline constexpr int64_t kMaxPriorityLevels = 256;
inline constexpr int64_t kMaxMicros = int64_t{1} << 50;  // ~35 years

struct BatchPolicy {
  int64_t max_batch_size = 1;                  // rows (first dim) per batch
  std::vector<int64_t> preferred_batch_sizes;  // each in 1..max_batch_size
  int64_t max_queue_delay_us = 0;              // how long the head may wait for company
  int64_t max_queue_size = 1024;               // queued requests before QueueFull
  int64_t default_timeout_us = 0;              // deadline when submit passes -1; 0 = none
  int64_t priority_levels = 1;                 // level 0 is served first

  // Throws std::invalid_argument naming the first bad field.
  void Validate() const;
  std::string ToString() const;
};

// kIdle is the batcher's own: what the rule would release at the delay, taken early because
// nothing more can join it (Batcher::Submit's release_queued).
// kLast names the last reason: tables by reason (the stats, the binding's names) are sized by
// kNumReleaseReasons, which follows it.
enum class ReleaseReason : uint8_t {
  kNone = 0,
  kFull,
  kPreferred,
  kDelay,
  kDrain,
  kIdle,
  kLast = kIdle,
};
constexpr int kNumReleaseReasons = static_cast<int>(ReleaseReason::kLast) + 1;
const char* ReleaseReasonName(ReleaseReason reason);  // "none", "full", "preferred", ...

struct ReleaseDecision {
  ReleaseReason reason = ReleaseReason::kNone;
  size_t count = 0;  // release this many candidates (a prefix of those given)
  int64_t rows = 0;  // their row sum
  // With kNone and at least one candidate: ns until the head's delay expires (> 0).
  // -1 when no candidate was given.
  int64_t wait_ns = -1;
};

// The release rule of a validated policy, as a pure function of the candidates.
class ReleaseRule {
 public:
  // Validates the policy (std::invalid_argument).
  explicit ReleaseRule(const BatchPolicy& policy);

  // candidate_rows: rows of the candidates in the order they would be taken (head first).
  // The rule takes candidates while they fit into max_batch_size, then releases:
  //   kFull      the taken rows == max_batch_size, or the next candidate would not fit;
  //   kPreferred the largest prefix whose row sum is a preferred size;
  //   kDelay     the head has waited >= max_queue_delay: everything taken;
  //   kDrain     draining (after stop): everything taken;
  //   kNone      otherwise (wait_ns says how long until the delay fires).
  ReleaseDecision Decide(const int64_t* candidate_rows, size_t n, int64_t head_waited_ns,
                         bool draining) const;

  int64_t max_batch_size() const { return max_batch_size_; }
  int64_t max_queue_delay_ns() const { return max_queue_delay_ns_; }

 private:
  int64_t max_batch_size_;
  int64_t max_queue_delay_ns_;
  std::vector<int64_t> preferred_;  // sorted, unique
};

}  // namespace fastserve

#endif  // FASTSERVE_BATCH_POLICY_H_
