#include "fastserve/batch_policy.h"

#include <algorithm>
#include <stdexcept>

namespace fastserve {
namespace {

[[noreturn]] void Invalid(const std::string& message) { throw std::invalid_argument(message); }

}  // namespace

void BatchPolicy::Validate() const {
  if (max_batch_size < 1 || max_batch_size > kMaxBatchSizeLimit) {
    Invalid("max_batch_size must be in 1.." + std::to_string(kMaxBatchSizeLimit) + ", got " +
            std::to_string(max_batch_size));
  }
  for (int64_t size : preferred_batch_sizes) {
    if (size < 1 || size > max_batch_size) {
      Invalid("preferred_batch_sizes must be in 1..max_batch_size (" +
              std::to_string(max_batch_size) + "), got " + std::to_string(size));
    }
  }
  if (max_queue_delay_us < 0 || max_queue_delay_us > kMaxMicros) {
    Invalid("max_queue_delay_us must be >= 0 and sane, got " + std::to_string(max_queue_delay_us));
  }
  if (max_queue_size < 1 || max_queue_size > kMaxQueueSizeLimit) {
    Invalid("max_queue_size must be in 1.." + std::to_string(kMaxQueueSizeLimit) + ", got " +
            std::to_string(max_queue_size));
  }
  if (default_timeout_us < 0 || default_timeout_us > kMaxMicros) {
    Invalid("default_timeout_us must be >= 0 (0 = none) and sane, got " +
            std::to_string(default_timeout_us));
  }
  if (priority_levels < 1 || priority_levels > kMaxPriorityLevels) {
    Invalid("priority_levels must be in 1.." + std::to_string(kMaxPriorityLevels) + ", got " +
            std::to_string(priority_levels));
  }
}

std::string BatchPolicy::ToString() const {
  std::string preferred = "[";
  for (size_t i = 0; i < preferred_batch_sizes.size(); ++i) {
    if (i > 0) preferred += ", ";
    preferred += std::to_string(preferred_batch_sizes[i]);
  }
  preferred += "]";
  return "BatchPolicy(max_batch_size=" + std::to_string(max_batch_size) +
         ", preferred_batch_sizes=" + preferred +
         ", max_queue_delay_us=" + std::to_string(max_queue_delay_us) +
         ", max_queue_size=" + std::to_string(max_queue_size) +
         ", default_timeout_us=" + std::to_string(default_timeout_us) +
         ", priority_levels=" + std::to_string(priority_levels) + ")";
}

const char* ReleaseReasonName(ReleaseReason reason) {
  switch (reason) {
    case ReleaseReason::kFull:
      return "full";
    case ReleaseReason::kPreferred:
      return "preferred";
    case ReleaseReason::kDelay:
      return "delay";
    case ReleaseReason::kDrain:
      return "drain";
    case ReleaseReason::kIdle:
      return "idle";
    case ReleaseReason::kNone:
      break;
  }
  return "none";
}

ReleaseRule::ReleaseRule(const BatchPolicy& policy) {
  policy.Validate();
  max_batch_size_ = policy.max_batch_size;
  max_queue_delay_ns_ = policy.max_queue_delay_us * 1000;
  preferred_ = policy.preferred_batch_sizes;
  std::sort(preferred_.begin(), preferred_.end());
  preferred_.erase(std::unique(preferred_.begin(), preferred_.end()), preferred_.end());
}

ReleaseDecision ReleaseRule::Decide(const int64_t* candidate_rows, size_t n, int64_t head_waited_ns,
                                    bool draining) const {
  ReleaseDecision d;
  if (n == 0) return d;
  int64_t rows = 0;
  size_t count = 0;
  size_t best_preferred = 0;
  int64_t best_preferred_rows = 0;
  size_t p = 0;  // preferred_[p] is the smallest preferred size >= rows
  bool full = false;
  for (size_t i = 0; i < n; ++i) {
    int64_t r = candidate_rows[i];
    if (rows + r > max_batch_size_) {
      full = true;
      break;
    }
    rows += r;
    ++count;
    while (p < preferred_.size() && preferred_[p] < rows) ++p;
    if (p < preferred_.size() && preferred_[p] == rows) {
      best_preferred = count;
      best_preferred_rows = rows;
    }
    if (rows == max_batch_size_) {
      full = true;
      break;
    }
  }
  if (count == 0) return d;  // only an oversized candidate: never admitted by the batcher
  if (full) {
    d.reason = ReleaseReason::kFull;
  } else if (best_preferred > 0) {
    d.reason = ReleaseReason::kPreferred;
    count = best_preferred;
    rows = best_preferred_rows;
  } else if (head_waited_ns >= max_queue_delay_ns_) {
    d.reason = ReleaseReason::kDelay;
  } else if (draining) {
    d.reason = ReleaseReason::kDrain;
  } else {
    d.wait_ns = max_queue_delay_ns_ - head_waited_ns;
    return d;
  }
  d.count = count;
  d.rows = rows;
  return d;
}

}  // namespace fastserve
