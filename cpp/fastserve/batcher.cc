#include "fastserve/batcher.h"

#include <fcntl.h>
#include <sys/epoll.h>  // Linux: ready_fd; pipe2 makes this file Linux-only already
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <system_error>
#include <utility>

namespace fastserve {
namespace batcher_internal {

// A queued request. Lives in the batcher's pool; every field is guarded by Batcher::mu_.
struct Request {
  uint64_t id = 0;  // 0 while free: stale deadline entries compare ids
  int64_t rows = 0;
  int64_t submit_ns = 0;
  int64_t deadline_ns = 0;  // 0 = none
  uint32_t level = 0;
  Group* group = nullptr;
  Request* level_prev = nullptr;  // in Batcher::levels_[level]; level_next links the free list
  Request* level_next = nullptr;
  Request* group_prev = nullptr;  // in group->levels[level]
  Request* group_next = nullptr;
  int64_t length = 0;                          // the ragged inputs' dimension 1 (0 without any)
  std::vector<const void*> inputs;             // keeps its capacity across reuse
  std::vector<std::vector<int64_t>> raw_dims;  // per input: dims of a transformed one
};

// Requests with one shape key: same number of inputs, dtypes and dims after the first (but
// for the length of ragged inputs, which is -1 in the signature; their row_bytes is then the
// bytes of one position).
struct Group {
  std::vector<RowSignature> signature;
  std::vector<RequestList> levels;  // arrival order per priority level
  int64_t queued = 0;
  int64_t queued_rows = 0;
};

}  // namespace batcher_internal

namespace {

using batcher_internal::Group;
using batcher_internal::Request;
using batcher_internal::RequestList;

constexpr int64_t kNever = std::numeric_limits<int64_t>::max();
constexpr size_t kPoolChunk = 256;
constexpr size_t kMaxIdleGroups = 64;

template <Request* Request::* Prev, Request* Request::* Next>
void ListPushBack(RequestList* list, Request* r) {
  r->*Prev = list->tail;
  r->*Next = nullptr;
  if (list->tail != nullptr) {
    list->tail->*Next = r;
  } else {
    list->head = r;
  }
  list->tail = r;
}

template <Request* Request::* Prev, Request* Request::* Next>
void ListRemove(RequestList* list, Request* r) {
  if (r->*Prev != nullptr) {
    r->*Prev->*Next = r->*Next;
  } else {
    list->head = r->*Next;
  }
  if (r->*Next != nullptr) {
    r->*Next->*Prev = r->*Prev;
  } else {
    list->tail = r->*Prev;
  }
  r->*Prev = nullptr;
  r->*Next = nullptr;
}

// Orders the deadline heap so that the earliest deadline is on top.
struct LaterDeadline {
  template <typename Entry>
  bool operator()(const Entry& a, const Entry& b) const {
    return a.deadline_ns > b.deadline_ns;
  }
};

std::string InputError(size_t i, const std::string& what) {
  return "input " + std::to_string(i) + ": " + what;
}

template <typename T>
void AppendRaw(std::string* s, T v) {
  s->append(reinterpret_cast<const char*>(&v), sizeof(v));
}

// The wake-up pipes are non-blocking: one byte means "look again".
void WritePipe(int fd) {
  const char byte = 1;
  ssize_t rc;
  do {
    rc = ::write(fd, &byte, 1);
  } while (rc < 0 && errno == EINTR);
  // EAGAIN: the pipe is full of unread wake-ups already, which is as good as this one.
}

void DrainPipe(int fd) {
  char buf[64];
  for (;;) {
    ssize_t rc = ::read(fd, buf, sizeof(buf));
    if (rc > 0) continue;
    if (rc < 0 && errno == EINTR) continue;
    return;  // empty (EAGAIN) or closed
  }
}

// Linux lets a sleeping thread's timer fire up to 50 us late by default (timer slack) so that
// wake-ups coalesce; a batch delay of a few hundred microseconds cannot afford that.
void TightenTimerSlack() {
#ifdef __linux__
  thread_local bool done = false;
  if (!done) {
    ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
    done = true;
  }
#endif
}

void ClosePipe(const int (&fds)[2]) {
  ::close(fds[0]);
  ::close(fds[1]);
}

// Owns a file descriptor until release(): Create's error paths close what they opened.
class UniqueFd {
 public:
  // fd from a call that returns -1 and sets errno on failure, which this throws with `what`.
  UniqueFd(int fd, const char* what) : fd_(fd) {
    if (fd_ < 0) throw std::system_error(errno, std::generic_category(), what);
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

// The puller's ready_fd: an epoll set of the timerfd (the head's delay) and the eventfd (a
// batch releasable now), readable when either is.
void WatchReadable(int epoll_fd, int fd) {
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.fd = fd;
  if (::epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event) != 0) {
    throw std::system_error(errno, std::generic_category(), "fastserve: cannot watch ready fd");
  }
}

}  // namespace

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

const char* CompletionStatusName(CompletionStatus status) {
  switch (status) {
    case CompletionStatus::kOk:
      return "ok";
    case CompletionStatus::kTimeout:
      return "timeout";
    case CompletionStatus::kError:
      break;
  }
  return "error";
}

size_t Completion::output_offset(size_t i) const {
  size_t offset = 0;
  for (size_t k = 0; k < i; ++k) offset += AlignUp(rows * layout->outputs[k].row_bytes);
  return offset;
}

// ---------------------------------------------------------------------------------------------
// Batch

Batch::Batch(std::shared_ptr<Batcher> owner) : owner_(std::move(owner)) {}

Batch::~Batch() {
  if (!finished_.exchange(true, std::memory_order_acq_rel)) {
    try {
      FailLocked("batch abandoned");
    } catch (...) {
      // Out of memory while failing: nothing more can be done from a destructor.
    }
  }
}

void Batch::Gather() {
  const size_t n = signature_.size();
  const RaggedSpec& ragged = owner_->ragged_;
  int64_t length = 0;  // of the ragged inputs in this batch
  if (ragged.enabled()) {
    if (ragged.fixed_length > 0) {
      length = ragged.fixed_length;
    } else {
      for (int64_t l : lengths_) length = std::max(length, l);
      if (ragged.max_length > 0) length = std::min(length, ragged.max_length);
    }
  }
  const bool mask = ragged.enabled() && ragged.mask;
  const size_t mask_row_bytes = mask ? length * ItemSize(ragged.mask_dtype) : 0;
  auto row_bytes = [&](size_t i) {
    return owner_->RaggedSlot(i) >= 0 ? length * signature_[i].row_bytes : signature_[i].row_bytes;
  };
  size_t total = AlignUp(rows_ * mask_row_bytes);
  for (size_t i = 0; i < n; ++i) total += AlignUp(rows_ * row_bytes(i));
  UniqueBuffer owned = AllocateBuffer(total);
  buffer_ = std::shared_ptr<uint8_t>(owned.release(), FreeDeleter());
  inputs_.resize(n + (mask ? 1 : 0));
  size_t offset = 0;
  for (size_t i = 0; i < n; ++i) {
    const RowSignature& sig = signature_[i];
    const int slot = owner_->RaggedSlot(i);
    Tensor& t = inputs_[i];
    t.dtype = sig.dtype;
    t.shape.clear();
    t.shape.reserve(sig.trailing_dims.size() + 1);
    t.shape.push_back(rows_);
    t.shape.insert(t.shape.end(), sig.trailing_dims.begin(), sig.trailing_dims.end());
    if (slot >= 0) t.shape[1] = length;
    t.data = buffer_.get() + offset;
    t.bytes = rows_ * row_bytes(i);
    offset += AlignUp(t.bytes);
    uint8_t* dst = t.data;
    for (size_t j = 0; j < requests_.size(); ++j) {
      const auto* src = static_cast<const uint8_t*>(sources_[j * n + i]);
      if (slot < 0) {
        const size_t bytes = requests_[j].rows * sig.row_bytes;
        const std::vector<int64_t>* raw = raw_dims_.empty() ? nullptr : &raw_dims_[j * n + i];
        if (raw != nullptr && !raw->empty()) {
          const InputTransform& transform = *owner_->transforms_[i];
          transform.Apply({src, transform.source_dtype(), raw->data(), raw->size()}, dst);
        } else if (bytes > 0) {
          std::memcpy(dst, src, bytes);
        }
        dst += bytes;
        continue;
      }
      // each row: the request's values up to the batch's length, then the pad value
      const size_t unit = sig.row_bytes, item = ItemSize(sig.dtype);
      const int64_t keep = std::min(lengths_[j], length);
      const double pad = ragged.pad_values[static_cast<size_t>(slot)];
      for (int64_t r = 0; r < requests_[j].rows; ++r) {
        if (keep > 0) std::memcpy(dst, src + r * lengths_[j] * unit, keep * unit);
        FillElements(sig.dtype, pad, dst + keep * unit,
                     static_cast<int64_t>((length - keep) * unit / item));
        dst += length * unit;
      }
    }
  }
  if (mask) {
    Tensor& t = inputs_[n];
    t.dtype = ragged.mask_dtype;
    t.shape = {rows_, length};
    t.data = buffer_.get() + offset;
    t.bytes = rows_ * mask_row_bytes;
    uint8_t* dst = t.data;
    const size_t item = ItemSize(ragged.mask_dtype);
    for (size_t j = 0; j < requests_.size(); ++j) {
      const int64_t keep = std::min(lengths_[j], length);
      for (int64_t r = 0; r < requests_[j].rows; ++r) {
        FillElements(ragged.mask_dtype, 1.0, dst, keep);
        FillElements(ragged.mask_dtype, 0.0, dst + keep * item, length - keep);
        dst += mask_row_bytes;
      }
    }
  }
  sources_.clear();
  lengths_.clear();
  raw_dims_.clear();
  sources_.shrink_to_fit();
}

size_t Batch::OutputBytes(const TensorView* outputs, size_t n) {
  size_t total = 0;
  for (size_t k = 0; k < n; ++k) {
    int64_t count = ElementCount(outputs[k].dims, outputs[k].rank);
    if (count > 0) total += count * ItemSize(outputs[k].dtype);
  }
  return total;
}

Batch::Result Batch::Complete(const TensorView* outputs, size_t n, std::string* error) {
  if (finished_.exchange(true, std::memory_order_acq_rel)) {
    *error = "batch " + std::to_string(id_) + " was already completed or failed";
    return Result::kFinished;
  }
  auto layout = std::make_shared<OutputLayout>();
  layout->outputs.resize(n);
  for (size_t k = 0; k < n; ++k) {
    const TensorView& o = outputs[k];
    std::string problem;
    int64_t row_bytes = RowBytes(o.dtype, o.dims, o.rank);
    if (o.rank == 0) {
      problem = "is a scalar; outputs need a first dimension of " + std::to_string(rows_) + " rows";
    } else if (o.dims[0] != rows_) {
      problem = "has shape " + ShapeToString(o.dims, o.rank) + " but the batch has " +
                std::to_string(rows_) + " rows";
    } else if (row_bytes < 0) {
      problem = "has an invalid shape " + ShapeToString(o.dims, o.rank);
    } else if (o.data == nullptr && row_bytes > 0 && rows_ > 0) {
      problem = "has no data";
    }
    if (!problem.empty()) {
      *error = "output " + std::to_string(k) + " " + problem;
      FailLocked(*error);
      return Result::kInvalid;
    }
    RowSignature& sig = layout->outputs[k];
    sig.dtype = o.dtype;
    sig.trailing_dims.assign(o.dims + 1, o.dims + o.rank);
    sig.row_bytes = static_cast<size_t>(row_bytes);
  }
  const int64_t now = NowNs();
  std::vector<Completion> done;
  try {
    done.resize(requests_.size());
    std::shared_ptr<const OutputLayout> shared = std::move(layout);
    for (size_t j = 0; j < requests_.size(); ++j) {
      const BatchRequest& req = requests_[j];
      Completion& c = done[j];
      c.id = req.id;
      c.status = CompletionStatus::kOk;
      c.queue_ns = req.queue_wait_ns;
      c.compute_ns = now - release_ns_;
      c.batch_id = id_;
      c.batch_rows = rows_;
      c.rows = req.rows;
      c.layout = shared;
      size_t total = 0;
      for (const RowSignature& sig : shared->outputs) total += AlignUp(req.rows * sig.row_bytes);
      c.data = AllocateBuffer(total);
      size_t offset = 0;
      for (size_t k = 0; k < n; ++k) {
        size_t row_bytes = shared->outputs[k].row_bytes;
        size_t bytes = req.rows * row_bytes;
        if (bytes > 0) {
          std::memcpy(c.data.get() + offset,
                      static_cast<const uint8_t*>(outputs[k].data) + req.row_offset * row_bytes,
                      bytes);
        }
        offset += AlignUp(bytes);
      }
    }
  } catch (const std::bad_alloc&) {
    done.clear();
    *error = "out of memory while scattering the outputs of batch " + std::to_string(id_);
    FailLocked(*error);
    return Result::kFailed;
  }
  owner_->PushCompletions(&done);
  return Result::kOk;
}

bool Batch::Fail(std::string_view message) {
  if (finished_.exchange(true, std::memory_order_acq_rel)) return false;
  FailLocked(message);
  return true;
}

void Batch::FailLocked(std::string_view message) {
  const int64_t now = NowNs();
  std::vector<Completion> done(requests_.size());
  for (size_t j = 0; j < requests_.size(); ++j) {
    Completion& c = done[j];
    c.id = requests_[j].id;
    c.status = CompletionStatus::kError;
    c.error.assign(message.data(), message.size());
    c.queue_ns = requests_[j].queue_wait_ns;
    c.compute_ns = now - release_ns_;
    c.batch_id = id_;
    c.batch_rows = rows_;
    c.rows = requests_[j].rows;
  }
  owner_->PushCompletions(&done);
}

// ---------------------------------------------------------------------------------------------
// Batcher

void RaggedSpec::Validate() const {
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i] < 0) throw std::invalid_argument("ragged inputs are input indexes (>= 0)");
    if (std::find(inputs.begin(), inputs.begin() + i, inputs[i]) != inputs.begin() + i) {
      throw std::invalid_argument("ragged input " + std::to_string(inputs[i]) + " is listed twice");
    }
  }
  if (pad_values.size() != inputs.size()) {
    throw std::invalid_argument("ragged inputs need one pad value each");
  }
  if (fixed_length < 0 || max_length < 0 || fixed_length > kMaxBatchSizeLimit ||
      max_length > kMaxBatchSizeLimit) {
    throw std::invalid_argument("ragged lengths must be >= 0 (0: none) and sane");
  }
  if (mask && inputs.empty()) throw std::invalid_argument("a mask needs a ragged input");
  if (mask && !FitsDType(mask_dtype, 1.0)) {
    throw std::invalid_argument(std::string("a mask cannot be ") + DTypeName(mask_dtype));
  }
}

std::shared_ptr<Batcher> Batcher::Create(const BatchPolicy& policy, const RaggedSpec& ragged,
                                         InputTransforms transforms) {
  policy.Validate();
  ragged.Validate();
  for (int64_t index : ragged.inputs) {
    if (index < static_cast<int64_t>(transforms.size()) && transforms[index] != nullptr) {
      throw std::invalid_argument("input " + std::to_string(index) +
                                  " cannot be both ragged and transformed");
    }
  }
  int notify[2];
  if (::pipe2(notify, O_NONBLOCK | O_CLOEXEC) != 0) {
    throw std::system_error(errno, std::generic_category(), "fastserve: cannot create notify pipe");
  }
  std::shared_ptr<Batcher> batcher;
  try {
    UniqueFd timer(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC),
                   "fastserve: cannot create ready timer");
    UniqueFd now(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC), "fastserve: cannot create ready event");
    UniqueFd ready(::epoll_create1(EPOLL_CLOEXEC), "fastserve: cannot create ready set");
    WatchReadable(ready.get(), timer.get());
    WatchReadable(ready.get(), now.get());
    batcher = std::shared_ptr<Batcher>(new Batcher(policy, ragged, std::move(transforms), notify,
                                                   ReadyFds{timer.get(), now.get(), ready.get()}));
    timer.release();  // the batcher's now
    now.release();
    ready.release();
  } catch (...) {
    ClosePipe(notify);
    throw;
  }
  // Started after construction so that it only ever sees a complete object; the destructor
  // joins it, which works because the thread holds no reference to the shared_ptr.
  batcher->timer_ = std::thread([b = batcher.get()] { b->TimerLoop(); });
  return batcher;
}

Batcher::Batcher(const BatchPolicy& policy, const RaggedSpec& ragged, InputTransforms transforms,
                 const int (&notify)[2], ReadyFds ready)
    : policy_(policy),
      ragged_(ragged),
      transforms_(std::move(transforms)),
      rule_(policy),
      notify_read_fd_(notify[0]),
      notify_write_fd_(notify[1]),
      ready_timer_fd_(ready.timer),
      ready_now_fd_(ready.now),
      ready_fd_(ready.set),
      levels_(static_cast<size_t>(policy.priority_levels)) {
  timer_wake_ns_ = kNever;
  ready_at_ns_ = kNever;
}

Batcher::~Batcher() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    shutdown_ = true;
    stopped_ = true;
  }
  timer_cv_.notify_all();
  cv_.notify_all();
  if (timer_.joinable()) timer_.join();
  ::close(notify_read_fd_);
  ::close(notify_write_fd_);
  ::close(ready_fd_);
  ::close(ready_timer_fd_);
  ::close(ready_now_fd_);
}

const InputTransform* Batcher::TransformFor(size_t i, const TensorView& input) const {
  if (i >= transforms_.size() || transforms_[i] == nullptr) return nullptr;
  const InputTransform* t = transforms_[i].get();
  return input.dtype == t->source_dtype() ? t : nullptr;
}

int Batcher::RaggedSlot(size_t input) const {
  const auto& list = ragged_.inputs;
  for (size_t k = 0; k < list.size(); ++k) {
    if (list[k] == static_cast<int64_t>(input)) return static_cast<int>(k);
  }
  return -1;
}

SubmitResult Batcher::Submit(const TensorView* inputs, size_t n, int64_t priority,
                             int64_t timeout_us, bool release_queued) {
  SubmitResult result;
  auto invalid = [&result](std::string message) {
    result.code = SubmitCode::kInvalid;
    result.error = std::move(message);
    return std::move(result);
  };
  if (n == 0) return invalid("a request needs at least one input");
  if (priority < 0 || priority >= policy_.priority_levels) {
    return invalid("priority must be in 0.." + std::to_string(policy_.priority_levels - 1) +
                   ", got " + std::to_string(priority));
  }
  if (timeout_us < -1 || timeout_us > kMaxMicros) {
    return invalid("timeout_us must be -1 (policy default), 0 (none) or > 0, got " +
                   std::to_string(timeout_us));
  }
  if (inputs[0].rank == 0) return invalid(InputError(0, "needs rank >= 1 (rows first)"));
  const int64_t rows = inputs[0].dims[0];
  if (rows < 1 || rows > policy_.max_batch_size) {
    return invalid("a request must have 1.." + std::to_string(policy_.max_batch_size) +
                   " rows (max_batch_size), got " + std::to_string(rows));
  }
  // The shape key: number of inputs, then each input's dtype, rank and dims after the first.
  // thread_local so that building it does not allocate once warm.
  thread_local std::string key;
  key.clear();
  AppendRaw(&key, static_cast<uint32_t>(n));
  int64_t length = -1;  // of the ragged inputs
  thread_local std::vector<char> transformed;
  transformed.assign(n, 0);
  for (size_t i = 0; i < n; ++i) {
    const TensorView& in = inputs[i];
    if (in.rank == 0) return invalid(InputError(i, "needs rank >= 1 (rows first)"));
    if (in.dims[0] != rows) {
      return invalid(InputError(i, "has " + std::to_string(in.dims[0]) + " rows but input 0 has " +
                                       std::to_string(rows) +
                                       "; all inputs need the same first dimension"));
    }
    int64_t row_bytes = RowBytes(in.dtype, in.dims, in.rank);
    if (row_bytes < 0) {
      return invalid(InputError(i, "has an invalid shape " + ShapeToString(in.dims, in.rank)));
    }
    if (in.data == nullptr && row_bytes > 0) return invalid(InputError(i, "has no data"));
    if (const InputTransform* t = TransformFor(i, in)) {
      // keyed by what it becomes: it batches with requests that send those rows themselves
      std::string problem = t->Check(in);
      if (!problem.empty()) return invalid(InputError(i, problem));
      transformed[i] = 1;
      const RowSignature& out = t->output();
      AppendRaw(&key, static_cast<uint8_t>(out.dtype));
      AppendRaw(&key, static_cast<uint32_t>(out.trailing_dims.size() + 1));
      key.append(reinterpret_cast<const char*>(out.trailing_dims.data()),
                 out.trailing_dims.size() * sizeof(int64_t));
      continue;
    }
    AppendRaw(&key, static_cast<uint8_t>(in.dtype));
    AppendRaw(&key, static_cast<uint32_t>(in.rank));
    const int slot = RaggedSlot(i);
    if (slot < 0) {
      key.append(reinterpret_cast<const char*>(in.dims + 1), (in.rank - 1) * sizeof(int64_t));
      continue;
    }
    // ragged: the length is not part of the key; every ragged input of a request shares it
    if (in.rank < 2) return invalid(InputError(i, "is ragged and needs rank >= 2 (rows, length)"));
    if (length < 0) {
      length = in.dims[1];
    } else if (in.dims[1] != length) {
      return invalid(InputError(i, "has length " + std::to_string(in.dims[1]) +
                                       " but the request's other ragged inputs have " +
                                       std::to_string(length)));
    }
    if (!FitsDType(in.dtype, ragged_.pad_values[static_cast<size_t>(slot)])) {
      return invalid(InputError(
          i, std::string("cannot be padded: the pad value is not a ") + DTypeName(in.dtype)));
    }
    key.append(reinterpret_cast<const char*>(in.dims + 2), (in.rank - 2) * sizeof(int64_t));
  }
  for (int64_t index : ragged_.inputs) {
    if (index >= static_cast<int64_t>(n)) {
      return invalid("ragged input " + std::to_string(index) + " is missing (the request has " +
                     std::to_string(n) + " inputs)");
    }
  }

  const int64_t now = NowNs();
  int64_t timeout = timeout_us < 0 ? policy_.default_timeout_us : timeout_us;
  const int64_t deadline = timeout > 0 ? now + timeout * 1000 : 0;

  std::vector<Completion> expired;
  std::unique_lock<std::mutex> lock(mu_);
  ExpireLocked(now, &expired);
  if (!expired.empty()) {
    if (waiters_ > 0) cv_.notify_one();
    PushCompletions(&expired);
  }
  if (stopped_) {
    ++rejected_stopped_;
    result.code = SubmitCode::kStopped;
    return result;
  }
  if (depth_ >= policy_.max_queue_size) {
    ++rejected_full_;
    result.code = SubmitCode::kQueueFull;
    return result;
  }
  Group* group = FindOrCreateGroupLocked(key, inputs, n, transformed);
  const int head_level = HeadLevelLocked();
  Request* r = AllocRequestLocked();
  try {
    r->inputs.resize(n);
    r->raw_dims.resize(transforms_.empty() ? 0 : n);
    for (size_t i = 0; i < r->raw_dims.size(); ++i) {
      if (transformed[i]) {
        r->raw_dims[i].assign(inputs[i].dims, inputs[i].dims + inputs[i].rank);
      } else {
        r->raw_dims[i].clear();
      }
    }
    if (deadline != 0) deadlines_.reserve(deadlines_.size() + 1);
  } catch (...) {
    FreeRequestLocked(r);  // out of memory: nothing was queued
    throw;
  }
  // Nothing below allocates: the request is queued whole or not at all.
  r->id = next_request_id_++;
  r->rows = rows;
  r->submit_ns = now;
  r->deadline_ns = deadline;
  r->level = static_cast<uint32_t>(priority);
  r->group = group;
  r->length = std::max<int64_t>(length, 0);
  for (size_t i = 0; i < n; ++i) r->inputs[i] = inputs[i].data;
  ListPushBack<&Request::level_prev, &Request::level_next>(&levels_[r->level], r);
  ListPushBack<&Request::group_prev, &Request::group_next>(&group->levels[r->level], r);
  ++depth_;
  ++group->queued;
  group->queued_rows += rows;
  ++submitted_;
  result.id = r->id;
  if (deadline != 0) {
    deadlines_.push_back(DeadlineEntry{deadline, r->id, r});
    std::push_heap(deadlines_.begin(), deadlines_.end(), LaterDeadline());
    if (deadlines_.size() > 2 * static_cast<size_t>(depth_) + 1024) CompactDeadlinesLocked();
    if (deadline < timer_wake_ns_) {
      timer_wake_ns_ = deadline;
      timer_cv_.notify_one();
    }
  }
  if (release_queued) released_before_ns_ = now;
  SignalIfReadyLocked(now);
  if (waiters_ > 0) {
    // Wake a worker only when it has something new to do: a batch can be released now, or the
    // head changed (its delay timer starts). Otherwise the sleeping workers' timers stand.
    ReleaseDecision decision;
    if (head_level < 0 || static_cast<int>(r->level) < head_level || DecideLocked(now, &decision)) {
      cv_.notify_one();
    }
  }
  return result;
}

std::unique_ptr<Batch> Batcher::NextBatch() {
  TightenTimerSlack();  // this worker sleeps toward the head's delay
  for (;;) {
    std::unique_ptr<Batch> batch;
    {
      std::unique_lock<std::mutex> lock(mu_);
      ++waiters_;
      // Undone on every exit, including std::bad_alloc from ExpireLocked or ExtractLocked.
      struct WaiterGuard {
        int* waiters;
        ~WaiterGuard() { --*waiters; }
      } guard{&waiters_};
      for (;;) {
        ReleaseDecision decision;
        batch = ReleaseLocked(NowNs(), &decision);
        if (batch) break;
        if (stopped_ && depth_ == 0) break;
        if (decision.wait_ns > 0) {
          cv_.wait_for(lock, std::chrono::nanoseconds(decision.wait_ns));
        } else {
          cv_.wait(lock);
        }
      }
      if (waiters_ > 1) {
        // Others may be able to take the next batch, recompute the head's timer, or see that
        // the stopped queue is now empty.
        if (stopped_) {
          cv_.notify_all();
        } else if (depth_ > 0) {
          cv_.notify_one();
        }
      }
    }
    if (!batch) return nullptr;
    if (GatherOrFail(batch.get())) return batch;
  }
}

std::unique_ptr<Batch> Batcher::TryNextBatch() {
  for (;;) {
    std::unique_ptr<Batch> batch;
    {
      std::lock_guard<std::mutex> lock(mu_);
      puller_ = true;
      if (ready_now_) {  // this call looks at the queue anew: the signal has done its job
        uint64_t count;
        while (::read(ready_now_fd_, &count, sizeof(count)) < 0 && errno == EINTR) {
        }
        ready_now_ = false;
      }
      const int64_t now = NowNs();
      ReleaseDecision decision;
      batch = ReleaseLocked(now, &decision);
      AimReadyLocked(now);  // what is left: readable again now, its head's delay, or nothing
      if (!batch) return nullptr;
    }
    if (GatherOrFail(batch.get())) return batch;
  }
}

bool Batcher::GatherOrFail(Batch* batch) {
  try {
    batch->Gather();
    return true;
  } catch (const std::bad_alloc&) {
    batch->Fail("out of memory while gathering batch " + std::to_string(batch->id()));
    return false;
  } catch (const std::exception& e) {  // a transform's error: this batch's alone
    batch->Fail("gathering batch " + std::to_string(batch->id()) + " failed: " + e.what());
    return false;
  }
}

std::unique_ptr<Batch> Batcher::ReleaseLocked(int64_t now, ReleaseDecision* decision) {
  std::vector<Completion> expired;
  ExpireLocked(now, &expired);
  if (!expired.empty()) PushCompletions(&expired);
  if (!DecideLocked(now, decision)) return nullptr;
  return ExtractLocked(*decision, now);
}

void Batcher::SignalIfReadyLocked(int64_t now) {
  // Readable already (or about to be): the puller's next TryNextBatch looks at the queue anew.
  if (!puller_ || ready_now_ || ready_at_ns_ <= now) return;
  AimReadyLocked(now);
}

void Batcher::AimReadyLocked(int64_t now) {
  ReleaseDecision decision;
  if (DecideLocked(now, &decision)) {
    if (ready_now_ || ready_at_ns_ <= now) return;  // readable already: it stays so
    // A batch releasable now is told through the eventfd, not by aiming the timer at now:
    // arming a timer reprograms the CPU's timer and, due at once, takes its interrupt too
    // (~40 us a time on this project's VM, where each is a trip to the hypervisor, against
    // ~1 us for the eventfd). A timer left aimed at a later head fires, if it does, into a
    // TryNextBatch that re-aims it.
    const uint64_t one = 1;
    while (::write(ready_now_fd_, &one, sizeof(one)) < 0 && errno == EINTR) {
    }
    ready_now_ = true;
    return;
  }
  const int64_t at_ns = decision.wait_ns > 0 ? now + decision.wait_ns : kNever;
  if (at_ns == ready_at_ns_) return;  // the head has not changed
  // A time already passed fires at once; an it_value of zero disarms. Setting the timer also
  // clears a past expiry, so a fired timer aimed later is no longer readable. It cannot fail:
  // the fd is ours and the values are in range.
  itimerspec spec{};
  if (at_ns != kNever) {
    spec.it_value.tv_sec = static_cast<time_t>(at_ns / 1'000'000'000);
    spec.it_value.tv_nsec = static_cast<long>(at_ns % 1'000'000'000);
  }
  ::timerfd_settime(ready_timer_fd_, TFD_TIMER_ABSTIME, &spec, nullptr);
  ready_at_ns_ = at_ns;
}

void Batcher::Poll(std::vector<Completion>* out, int64_t timeout_ms) {
  out->clear();
  const auto until = std::chrono::steady_clock::now() +
                     std::chrono::milliseconds(std::max<int64_t>(timeout_ms, 0));
  for (;;) {
    // Drain before swapping: a push after the swap re-arms and writes a fresh byte.
    DrainPipe(notify_read_fd_);
    std::unique_lock<std::mutex> lock(cmu_);
    if (!pending_.empty() || timeout_ms <= 0) {
      armed_ = false;
      out->swap(pending_);
      return;
    }
    ++poll_waiters_;
    bool got = ccv_.wait_until(lock, until, [this] { return !pending_.empty(); });
    --poll_waiters_;
    if (!got) return;
  }
}

void Batcher::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopped_ = true;
    SignalIfReadyLocked(NowNs());
  }
  cv_.notify_all();
}

void Batcher::Hold(int64_t n) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    hold_ = std::max<int64_t>(n, 0);
    SignalIfReadyLocked(NowNs());
  }
  cv_.notify_all();
}

int64_t Batcher::queue_depth() const {
  std::lock_guard<std::mutex> lock(mu_);
  return depth_;
}

bool Batcher::stopped() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stopped_;
}

BatcherStats Batcher::stats() const {
  BatcherStats s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    s.submitted = submitted_;
    s.rejected_full = rejected_full_;
    s.rejected_stopped = rejected_stopped_;
    s.batches = batches_;
    s.rows = batched_rows_;
    s.batches_full = batches_by_reason_[static_cast<int>(ReleaseReason::kFull)];
    s.batches_preferred = batches_by_reason_[static_cast<int>(ReleaseReason::kPreferred)];
    s.batches_delay = batches_by_reason_[static_cast<int>(ReleaseReason::kDelay)];
    s.batches_drain = batches_by_reason_[static_cast<int>(ReleaseReason::kDrain)];
    s.batches_idle = batches_by_reason_[static_cast<int>(ReleaseReason::kIdle)];
  }
  std::lock_guard<std::mutex> lock(cmu_);
  s.timed_out = timed_out_;
  s.completed = completed_;
  s.failed = failed_;
  return s;
}

void Batcher::TimerLoop() {
  TightenTimerSlack();
#ifdef __linux__
  ::prctl(PR_SET_NAME, "fastserve-timer", 0UL, 0UL, 0UL);  // for top -H, py-spy, bench/ab.py
#endif
  std::vector<Completion> expired;
  std::unique_lock<std::mutex> lock(mu_);
  while (!shutdown_) {
    const int64_t next = NextDeadlineLocked();
    timer_wake_ns_ = next;
    if (next == kNever) {
      timer_cv_.wait(lock);
    } else {
      const int64_t now = NowNs();
      if (next > now) timer_cv_.wait_for(lock, std::chrono::nanoseconds(next - now));
    }
    if (shutdown_) break;
    const int64_t now = NowNs();
    ExpireLocked(now, &expired);
    if (!expired.empty()) {
      // The head may have changed, and with it what a waiting worker or the puller should do.
      if (waiters_ > 0) cv_.notify_one();
      SignalIfReadyLocked(now);
      try {
        PushCompletions(&expired);
      } catch (...) {
        // Out of memory: the expired requests are lost to the poller, but the timer lives on.
      }
      expired.clear();
    }
  }
}

void Batcher::ExpireLocked(int64_t now, std::vector<Completion>* expired) {
  while (!deadlines_.empty() && deadlines_.front().deadline_ns <= now) {
    const DeadlineEntry e = deadlines_.front();
    Request* r = e.request;
    if (r->id == e.id) {  // else: released into a batch (and maybe reused) since
      Completion c;
      c.id = r->id;
      c.status = CompletionStatus::kTimeout;
      c.error = "deadline expired in the queue";
      c.queue_ns = now - r->submit_ns;
      c.rows = r->rows;
      expired->push_back(std::move(c));  // may throw: then nothing has changed yet
      UnlinkLocked(r);
      FreeRequestLocked(r);
    }
    std::pop_heap(deadlines_.begin(), deadlines_.end(), LaterDeadline());
    deadlines_.pop_back();
  }
}

int64_t Batcher::NextDeadlineLocked() {
  while (!deadlines_.empty() && deadlines_.front().request->id != deadlines_.front().id) {
    std::pop_heap(deadlines_.begin(), deadlines_.end(), LaterDeadline());
    deadlines_.pop_back();
  }
  return deadlines_.empty() ? kNever : deadlines_.front().deadline_ns;
}

void Batcher::CompactDeadlinesLocked() {
  deadlines_.erase(std::remove_if(deadlines_.begin(), deadlines_.end(),
                                  [](const DeadlineEntry& e) { return e.request->id != e.id; }),
                   deadlines_.end());
  std::make_heap(deadlines_.begin(), deadlines_.end(), LaterDeadline());
}

int Batcher::HeadLevelLocked() const {
  if (depth_ == 0) return -1;
  for (size_t level = 0; level < levels_.size(); ++level) {
    if (levels_[level].head != nullptr) return static_cast<int>(level);
  }
  return -1;
}

bool Batcher::DecideLocked(int64_t now, ReleaseDecision* decision) {
  *decision = ReleaseDecision();
  const int head_level = HeadLevelLocked();
  if (head_level < 0) return false;
  if (hold_ > 0 && !stopped_) {
    if (depth_ < hold_) return false;  // held: wait for submits (wait_ns = -1)
    hold_ = 0;                         // the gate opens once, then batching is normal
  }
  const Request* head = levels_[head_level].head;
  Group* group = head->group;
  const int64_t head_waited = now - head->submit_ns;
  int64_t waited = head_waited;
  if (head->submit_ns <= released_before_ns_) waited = std::max(waited, rule_.max_queue_delay_ns());
  const int64_t max_rows = rule_.max_batch_size();
  if (!stopped_ && group->queued_rows < max_rows && waited < rule_.max_queue_delay_ns() &&
      policy_.preferred_batch_sizes.empty()) {
    // Cannot be full, no preferred size, delay not reached: skip walking the candidates.
    decision->wait_ns = rule_.max_queue_delay_ns() - waited;
    return false;
  }
  candidates_.clear();
  candidate_rows_.clear();
  int64_t rows = 0;
  for (size_t level = static_cast<size_t>(head_level); level < levels_.size() && rows < max_rows;
       ++level) {
    for (Request* r = group->levels[level].head; r != nullptr; r = r->group_next) {
      candidates_.push_back(r);
      candidate_rows_.push_back(r->rows);
      rows += r->rows;
      if (rows >= max_rows) break;  // full, or the last one does not fit: no need to look further
    }
  }
  *decision = rule_.Decide(candidate_rows_.data(), candidate_rows_.size(), waited, stopped_);
  if (decision->reason == ReleaseReason::kDelay && head_waited < rule_.max_queue_delay_ns()) {
    decision->reason = ReleaseReason::kIdle;  // released early: nothing more could join
  }
  return decision->reason != ReleaseReason::kNone;
}

std::unique_ptr<Batch> Batcher::ExtractLocked(const ReleaseDecision& decision, int64_t now) {
  std::unique_ptr<Batch> batch(new Batch(shared_from_this()));
  Group* group = candidates_[0]->group;
  const size_t n = group->signature.size();
  batch->id_ = next_batch_id_++;
  batch->reason_ = decision.reason;
  batch->rows_ = decision.rows;
  batch->release_ns_ = now;
  batch->signature_ = group->signature;
  batch->requests_.resize(decision.count);
  batch->sources_.resize(decision.count * n);
  if (ragged_.enabled()) batch->lengths_.resize(decision.count);
  if (!transforms_.empty()) batch->raw_dims_.resize(decision.count * n);
  int64_t offset = 0;
  for (size_t j = 0; j < decision.count; ++j) {
    Request* r = candidates_[j];
    batch->requests_[j] = BatchRequest{r->id, r->rows, offset, now - r->submit_ns};
    offset += r->rows;
    std::copy(r->inputs.begin(), r->inputs.end(), batch->sources_.begin() + j * n);
    if (ragged_.enabled()) batch->lengths_[j] = r->length;
    for (size_t i = 0; i < r->raw_dims.size(); ++i) {
      batch->raw_dims_[j * n + i].swap(r->raw_dims[i]);  // no allocation under the lock
    }
    UnlinkLocked(r);
    FreeRequestLocked(r);
  }
  ++batches_;
  batched_rows_ += decision.rows;
  ++batches_by_reason_[static_cast<int>(decision.reason)];
  return batch;
}

Group* Batcher::FindOrCreateGroupLocked(const std::string& key, const TensorView* inputs, size_t n,
                                        const std::vector<char>& transformed) {
  auto it = groups_.find(key);
  if (it != groups_.end()) return it->second.get();
  if (groups_.size() >= kMaxIdleGroups) {
    // Shapes come and go (e.g. sequence lengths): forget the groups nobody waits in.
    for (auto g = groups_.begin(); g != groups_.end();) {
      g = g->second->queued == 0 ? groups_.erase(g) : std::next(g);
    }
  }
  auto group = std::make_unique<Group>();
  group->levels.resize(levels_.size());
  group->signature.resize(n);
  for (size_t i = 0; i < n; ++i) {
    RowSignature& sig = group->signature[i];
    if (transformed[i]) {
      sig = transforms_[i]->output();
      continue;
    }
    sig.dtype = inputs[i].dtype;
    sig.trailing_dims.assign(inputs[i].dims + 1, inputs[i].dims + inputs[i].rank);
    sig.row_bytes = static_cast<size_t>(RowBytes(inputs[i].dtype, inputs[i].dims, inputs[i].rank));
    if (RaggedSlot(i) >= 0) {  // the bytes of one position; the length comes per batch
      sig.trailing_dims[0] = -1;
      sig.row_bytes =
          static_cast<size_t>(RowBytes(inputs[i].dtype, inputs[i].dims + 1, inputs[i].rank - 1));
    }
  }
  Group* raw = group.get();
  groups_.emplace(key, std::move(group));
  return raw;
}

Batcher::Request* Batcher::AllocRequestLocked() {
  if (free_requests_ == nullptr) {
    auto chunk = std::make_unique<Request[]>(kPoolChunk);
    for (size_t i = 0; i < kPoolChunk; ++i) {
      chunk[i].level_next = free_requests_;
      free_requests_ = &chunk[i];
    }
    pool_chunks_.push_back(std::move(chunk));
  }
  Request* r = free_requests_;
  free_requests_ = r->level_next;
  r->level_next = nullptr;
  return r;
}

void Batcher::FreeRequestLocked(Request* r) {
  r->id = 0;
  r->group = nullptr;
  r->level_prev = nullptr;
  r->level_next = free_requests_;
  free_requests_ = r;
}

void Batcher::UnlinkLocked(Request* r) {
  ListRemove<&Request::level_prev, &Request::level_next>(&levels_[r->level], r);
  ListRemove<&Request::group_prev, &Request::group_next>(&r->group->levels[r->level], r);
  --depth_;
  --r->group->queued;
  r->group->queued_rows -= r->rows;
}

void Batcher::PushCompletions(std::vector<Completion>* items) {
  if (items->empty()) return;
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(cmu_);
    for (const Completion& c : *items) {
      switch (c.status) {
        case CompletionStatus::kOk:
          ++completed_;
          break;
        case CompletionStatus::kTimeout:
          ++timed_out_;
          break;
        case CompletionStatus::kError:
          ++failed_;
          break;
      }
    }
    if (pending_.empty()) {
      pending_.swap(*items);
    } else {
      pending_.insert(pending_.end(), std::make_move_iterator(items->begin()),
                      std::make_move_iterator(items->end()));
    }
    if (!armed_) {
      armed_ = true;
      wake = true;
    }
    if (poll_waiters_ > 0) ccv_.notify_all();
  }
  items->clear();
  if (wake) WritePipe(notify_write_fd_);
}

}  // namespace fastserve
