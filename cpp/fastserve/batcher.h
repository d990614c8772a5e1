// The dynamic batcher: a bounded queue of requests per priority level, released as batches by
// policy to worker threads, and a completion queue that wakes an event loop once per batch.
//
// Threads: any number of submitters, workers (NextBatch, then Batch::Complete/Fail) and pollers;
// or, instead of workers, one puller (an event loop) that calls TryNextBatch when ready_fd is
// readable. ready_fd is a Linux timerfd aimed at when the next batch can be released (now, or
// when the head's delay passes), so the kernel wakes the puller itself. One internal timer
// thread expires deadlines. No call throws across threads: a worker's error
// reaches the requests of its batch as a Completion with status kError.
#ifndef FASTSERVE_BATCHER_H_
#define FASTSERVE_BATCHER_H_

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "fastserve/batch_policy.h"
#include "fastserve/tensor.h"
#include "fastserve/transform.h"

namespace fastserve {

class Batcher;

namespace batcher_internal {
struct Request;
struct Group;
struct RequestList {
  Request* head = nullptr;
  Request* tail = nullptr;
};
}  // namespace batcher_internal

// Monotonic clock in nanoseconds (std::chrono::steady_clock).
int64_t NowNs();

enum class SubmitCode : uint8_t { kOk = 0, kQueueFull, kStopped, kInvalid };

struct SubmitResult {
  SubmitCode code = SubmitCode::kOk;
  uint64_t id = 0;    // with kOk: the request id, unique per Batcher, from 1 upward
  std::string error;  // with kInvalid: what is wrong with the arguments
};

// kLast names the last status: tables by status are sized by kNumCompletionStatuses.
enum class CompletionStatus : uint8_t { kOk = 0, kTimeout, kError, kLast = kError };
constexpr int kNumCompletionStatuses = static_cast<int>(CompletionStatus::kLast) + 1;
const char* CompletionStatusName(CompletionStatus status);  // "ok", "timeout", "error"

// Inputs whose dimension 1 (a sequence's length) may differ between the requests of one
// batch. At gather, every row of them is padded (or truncated) to the batch's length, and a
// mask input may be appended after the request's inputs. The rows of one request share its
// length (a request is a dense tensor); requests of other lengths share the batch.
struct RaggedSpec {
  std::vector<int64_t> inputs;     // indexes of the ragged inputs (rank >= 2); empty: none
  std::vector<double> pad_values;  // one per ragged input, written past a row's end
  int64_t fixed_length = 0;        // > 0: every row padded or truncated to this length
  int64_t max_length = 0;          // > 0 (fixed_length 0): longer rows truncated to this
  bool mask = false;               // append [rows, length]: 1 at a position with a value, else 0
  DType mask_dtype = DType::kInt64;

  bool enabled() const { return !inputs.empty(); }
  // Throws std::invalid_argument naming the first bad field.
  void Validate() const;
};

// Per input index, the transform its raw requests get at gather (nullptr: none).
using InputTransforms = std::vector<std::shared_ptr<const InputTransform>>;

// Dtype and trailing dims of each output; shared by the completions of one batch.
struct OutputLayout {
  std::vector<RowSignature> outputs;
};

// The outcome of one request, delivered exactly once by Batcher::Poll.
struct Completion {
  uint64_t id = 0;
  CompletionStatus status = CompletionStatus::kOk;
  std::string error;                           // empty when ok
  int64_t queue_ns = 0;                        // submit to release (to expiry for timeouts)
  int64_t compute_ns = 0;                      // release to Complete/Fail
  uint64_t batch_id = 0;                       // 0 for timeouts
  int64_t batch_rows = 0;                      // 0 for timeouts
  int64_t rows = 0;                            // this request's rows
  std::shared_ptr<const OutputLayout> layout;  // set when ok
  UniqueBuffer data;  // this request's rows of every output, each at an aligned offset

  size_t num_outputs() const { return layout ? layout->outputs.size() : 0; }
  // Output i: data + offset, shape (rows, *trailing_dims).
  size_t output_offset(size_t i) const;
  size_t output_bytes(size_t i) const { return rows * layout->outputs[i].row_bytes; }
};

struct BatcherStats {
  uint64_t submitted = 0;
  uint64_t rejected_full = 0;
  uint64_t rejected_stopped = 0;
  uint64_t timed_out = 0;
  uint64_t completed = 0;  // requests completed with status ok
  uint64_t failed = 0;     // requests completed with status error
  uint64_t batches = 0;
  uint64_t rows = 0;
  uint64_t batches_full = 0;
  uint64_t batches_preferred = 0;
  uint64_t batches_delay = 0;
  uint64_t batches_drain = 0;
  uint64_t batches_idle = 0;
};

struct BatchRequest {
  uint64_t id = 0;
  int64_t rows = 0;
  int64_t row_offset = 0;  // first row of this request in the batch
  int64_t queue_wait_ns = 0;
};

// One released batch. Owned by the worker that received it; use from one thread at a time.
class Batch {
 public:
  Batch(const Batch&) = delete;
  Batch& operator=(const Batch&) = delete;
  // Fails requests not yet completed with "batch abandoned": none is lost.
  ~Batch();

  uint64_t id() const { return id_; }
  ReleaseReason reason() const { return reason_; }
  int64_t rows() const { return rows_; }
  const std::vector<BatchRequest>& requests() const { return requests_; }
  // One contiguous tensor per input, shape (rows, *dims), all in input_buffer(); ragged inputs
  // have the batch's length as dims[0], and the mask (when the spec asks) comes last.
  const std::vector<Tensor>& inputs() const { return inputs_; }
  const std::shared_ptr<uint8_t>& input_buffer() const { return buffer_; }
  bool finished() const { return finished_.load(std::memory_order_acquire); }

  enum class Result : uint8_t { kOk = 0, kInvalid, kFinished, kFailed };
  // Copies each request's rows of every output into a buffer the request owns and queues the
  // completions. Each output must have rank >= 1 and dims[0] == rows(); otherwise the batch is
  // failed with the reason and kInvalid is returned (message in *error). kFinished: already
  // completed or failed (nothing changes). kFailed: out of memory (the batch is failed).
  Result Complete(const TensorView* outputs, size_t n, std::string* error);
  // Every request completes with status kError and `message`. False if already finished.
  bool Fail(std::string_view message);

  // Total bytes Complete would copy for these outputs (for callers that choose how to wait).
  static size_t OutputBytes(const TensorView* outputs, size_t n);

 private:
  friend class Batcher;
  explicit Batch(std::shared_ptr<Batcher> owner);
  void Gather();  // fills buffer_/inputs_ from sources_; throws std::bad_alloc
  void FailLocked(std::string_view message);  // finished_ must already be set by the caller

  std::shared_ptr<Batcher> owner_;
  uint64_t id_ = 0;
  ReleaseReason reason_ = ReleaseReason::kNone;
  int64_t rows_ = 0;
  int64_t release_ns_ = 0;
  std::vector<BatchRequest> requests_;
  std::vector<RowSignature> signature_;  // per input
  std::vector<const void*> sources_;     // [request * num_inputs + input], until gathered
  std::vector<int64_t> lengths_;         // per request: its ragged inputs' length
  // [request * num_inputs + input]: the raw dims of a transformed input; empty otherwise
  std::vector<std::vector<int64_t>> raw_dims_;
  std::shared_ptr<uint8_t> buffer_;
  std::vector<Tensor> inputs_;
  std::atomic<bool> finished_{false};
};

class Batcher : public std::enable_shared_from_this<Batcher> {
 public:
  // Throws std::invalid_argument for a bad policy, std::system_error when the notify pipe or
  // the timer thread cannot be created.
  // `ragged`: inputs of variable length, padded per batch (default: none); `transforms`: per
  // input, what its raw requests become at gather. Throws std::invalid_argument for a bad
  // spec too (a ragged input cannot be transformed).
  static std::shared_ptr<Batcher> Create(const BatchPolicy& policy, const RaggedSpec& ragged = {},
                                         InputTransforms transforms = {});
  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;
  ~Batcher();

  // Queues one request. inputs[i].data must stay valid and unchanged until the request's
  // completion has been returned by Poll (the batcher reads it when it gathers the batch).
  // priority: 0 = highest. timeout_us: -1 = policy default, 0 = none, > 0 = relative deadline.
  // release_queued: nothing more can join what is queued with this request (every client that
  // could send is waiting in it): release it all without waiting out the delay (reason idle;
  // a held queue stays held). No timer is armed for it (ready_fd turns readable through its
  // eventfd): a caller that runs batches itself takes it with TryNextBatch right away. Requests
  // submitted later wait as usual.
  SubmitResult Submit(const TensorView* inputs, size_t n, int64_t priority, int64_t timeout_us,
                      bool release_queued = false);

  // Blocks until a batch is released by policy; nullptr once stopped and the queue is empty.
  std::unique_ptr<Batch> NextBatch();

  // For an event loop that runs batches itself, with no worker thread: the batch the policy
  // releases now, or nullptr. Never blocks. From the first call on, ready_fd() turns readable
  // whenever a batch can be released (a Submit fills one, the head's delay passes, Stop or
  // Hold opens the queue) and stays so until the next call, which re-aims it at what is left.
  std::unique_ptr<Batch> TryNextBatch();
  // Readable when TryNextBatch has a batch to give (an epoll set of a timerfd aimed at the
  // head's delay and an eventfd for a batch releasable now); poll it, never read it
  // (TryNextBatch clears it).
  int ready_fd() const { return ready_fd_; }

  // Moves the completions not yet returned into *out (cleared first). timeout_ms > 0: waits up
  // to that long for at least one. Drains the notify pipe first.
  void Poll(std::vector<Completion>* out, int64_t timeout_ms);

  // Read end of a non-blocking pipe, readable while completions wait (one byte per wake-up).
  int notify_fd() const { return notify_read_fd_; }

  // Refuses new work; what is queued is still released (reason drain, no delay wait, no hold).
  void Stop();
  // Test hook: nothing is released until n requests are queued; the gate then opens for good
  // (0 = no hold). Deadlines still expire while held; Stop() overrides it.
  void Hold(int64_t n);

  int64_t queue_depth() const;
  bool stopped() const;
  BatcherStats stats() const;
  const BatchPolicy& policy() const { return policy_; }
  const RaggedSpec& ragged() const { return ragged_; }

 private:
  friend class Batch;
  using Request = batcher_internal::Request;
  using Group = batcher_internal::Group;

  struct DeadlineEntry {
    int64_t deadline_ns;
    uint64_t id;
    Request* request;
  };

  struct ReadyFds {
    int timer;  // timerfd
    int now;    // eventfd
    int set;    // epoll set of the two
  };

  Batcher(const BatchPolicy& policy, const RaggedSpec& ragged, InputTransforms transforms,
          const int (&notify)[2], ReadyFds ready);
  // The transform a request's input i gets, or nullptr (none declared, or another dtype).
  const InputTransform* TransformFor(size_t i, const TensorView& input) const;
  // Position of input i in ragged_.inputs, or -1 when it is not ragged.
  int RaggedSlot(size_t input) const;
  void TimerLoop();
  // Gathers a released batch (outside mu_); out of memory fails its requests instead (none
  // is lost) and returns false, and the caller takes the next batch.
  static bool GatherOrFail(Batch* batch);
  // Extracts the batch the policy releases now, if any, after expiring deadlines.
  std::unique_ptr<Batch> ReleaseLocked(int64_t now, ReleaseDecision* decision);
  // For a puller, after the queue changed: unless ready_fd is readable already, aim it.
  void SignalIfReadyLocked(int64_t now);
  // Aims ready_fd at when the queue as it is can release a batch: now, when the head's delay
  // passes, or never (disarmed). A timer that has fired stays readable only if a batch can
  // be released now.
  void AimReadyLocked(int64_t now);

  // mu_ must be held by the callers of these.
  void ExpireLocked(int64_t now, std::vector<Completion>* expired);
  int64_t NextDeadlineLocked();  // drops stale heap entries; INT64_MAX when none
  int HeadLevelLocked() const;   // -1 when empty
  bool DecideLocked(int64_t now, ReleaseDecision* decision);  // fills candidates_
  std::unique_ptr<Batch> ExtractLocked(const ReleaseDecision& decision, int64_t now);
  // transformed[i]: input i is raw and takes its transform's output signature.
  Group* FindOrCreateGroupLocked(const std::string& key, const TensorView* inputs, size_t n,
                                 const std::vector<char>& transformed);
  Request* AllocRequestLocked();
  void FreeRequestLocked(Request* r);
  void UnlinkLocked(Request* r);
  void CompactDeadlinesLocked();

  // Takes cmu_; may be called with or without mu_ held (lock order: mu_ before cmu_).
  void PushCompletions(std::vector<Completion>* items);

  const BatchPolicy policy_;
  const RaggedSpec ragged_;
  const InputTransforms transforms_;
  const ReleaseRule rule_;
  const int notify_read_fd_;
  const int notify_write_fd_;
  const int ready_timer_fd_;  // timerfd on CLOCK_MONOTONIC, which is NowNs()'s clock
  const int ready_now_fd_;    // eventfd: a batch can be released now
  const int ready_fd_;        // epoll set of the two: what the puller watches

  mutable std::mutex mu_;
  std::condition_variable cv_;        // workers in NextBatch wait here
  std::condition_variable timer_cv_;  // the timer thread waits here
  // --- mu_ must be held for everything below, up to cmu_ ---
  bool stopped_ = false;
  bool shutdown_ = false;
  int64_t hold_ = 0;
  int64_t released_before_ns_ = 0;  // release_queued: requests submitted by then need not wait
  int64_t depth_ = 0;
  int waiters_ = 0;  // workers blocked in NextBatch
  uint64_t next_request_id_ = 1;
  uint64_t next_batch_id_ = 1;
  int64_t timer_wake_ns_ = 0;  // deadline the timer thread sleeps toward
  bool puller_ = false;        // TryNextBatch was called: keep ready_fd up to date
  int64_t ready_at_ns_ = 0;    // when the ready timer fires (kNever: disarmed; <= now: fired)
  bool ready_now_ = false;     // the ready eventfd is signalled
  std::vector<batcher_internal::RequestList> levels_;  // arrival order per priority level
  std::unordered_map<std::string, std::unique_ptr<Group>> groups_;  // by shape key
  std::vector<DeadlineEntry> deadlines_;  // min-heap; entries of released requests are stale
  std::vector<std::unique_ptr<Request[]>> pool_chunks_;
  Request* free_requests_ = nullptr;
  std::vector<Request*> candidates_;     // scratch of DecideLocked
  std::vector<int64_t> candidate_rows_;  // scratch of DecideLocked
  uint64_t submitted_ = 0;
  uint64_t rejected_full_ = 0;
  uint64_t rejected_stopped_ = 0;
  uint64_t batches_ = 0;
  uint64_t batched_rows_ = 0;
  uint64_t batches_by_reason_[kNumReleaseReasons] = {};

  mutable std::mutex cmu_;
  std::condition_variable ccv_;  // pollers wait here
  // --- cmu_ must be held for everything below ---
  std::vector<Completion> pending_;
  bool armed_ = false;  // a byte is in the pipe for pending_ (one wake-up per push, coalesced)
  int poll_waiters_ = 0;
  uint64_t timed_out_ = 0;
  uint64_t completed_ = 0;
  uint64_t failed_ = 0;

  std::thread timer_;  // started by Create, joined by the destructor
};

}  // namespace fastserve

#endif  // FASTSERVE_BATCHER_H_
