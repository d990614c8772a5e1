#include "fastserve/batcher.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "fastserve/preprocess.h"

namespace fastserve {
namespace {

constexpr int64_t kLongDelayUs = 10'000'000;  // 10 s: only full/preferred/drain release

// Input memory that stays put until the test ends (the batcher reads it when gathering).
struct OwnedInput {
  OwnedInput(int64_t rows, int64_t cols, float value)
      : data(rows * cols, value), dims{rows, cols} {}
  std::vector<float> data;
  std::vector<int64_t> dims;
  TensorView view() const { return TensorView{data.data(), DType::kFloat32, dims.data(), 2}; }
};

class Inputs {
 public:
  const OwnedInput& Add(int64_t rows, int64_t cols, float value) {
    std::lock_guard<std::mutex> lock(mu_);
    return items_.emplace_back(rows, cols, value);
  }

 private:
  std::mutex mu_;
  std::deque<OwnedInput> items_;  // deque: references stay valid as it grows
};

BatchPolicy Policy(int64_t max, int64_t delay_us = kLongDelayUs) {
  BatchPolicy p;
  p.max_batch_size = max;
  p.max_queue_delay_us = delay_us;
  return p;
}

SubmitResult Submit(Batcher& b, Inputs& inputs, int64_t rows, float value, int64_t priority = 0,
                    int64_t timeout_us = -1, int64_t cols = 3) {
  TensorView v = inputs.Add(rows, cols, value).view();
  return b.Submit(&v, 1, priority, timeout_us);
}

uint64_t MustSubmit(Batcher& b, Inputs& inputs, int64_t rows, float value, int64_t priority = 0) {
  SubmitResult r = Submit(b, inputs, rows, value, priority);
  EXPECT_EQ(r.code, SubmitCode::kOk) << r.error;
  return r.id;
}

std::vector<Completion> PollFor(Batcher& b, size_t n, int64_t timeout_ms = 5000) {
  std::vector<Completion> all, some;
  auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (all.size() < n && std::chrono::steady_clock::now() < until) {
    b.Poll(&some, 50);
    for (Completion& c : some) all.push_back(std::move(c));
  }
  return all;
}

std::vector<uint64_t> Ids(const Batch& batch) {
  std::vector<uint64_t> ids;
  for (const BatchRequest& r : batch.requests()) ids.push_back(r.id);
  return ids;
}

size_t ReadableBytes(int fd) {
  char buf[256];
  size_t total = 0;
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n <= 0) return total;
    total += static_cast<size_t>(n);
  }
}

bool Readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

TEST(BatcherTest, HoldFormsExactFullBatches) {
  auto b = Batcher::Create(Policy(4));
  b->Hold(12);
  Inputs inputs;
  for (int i = 0; i < 12; ++i) MustSubmit(*b, inputs, 1, static_cast<float>(i));
  EXPECT_EQ(b->queue_depth(), 12);
  uint64_t expected_id = 1;
  for (int k = 0; k < 3; ++k) {
    std::unique_ptr<Batch> batch = b->NextBatch();
    ASSERT_NE(batch, nullptr);
    EXPECT_EQ(batch->rows(), 4);
    EXPECT_EQ(batch->reason(), ReleaseReason::kFull);
    ASSERT_EQ(batch->requests().size(), 4u);
    for (const BatchRequest& r : batch->requests()) EXPECT_EQ(r.id, expected_id++);
    // The gathered buffer holds the rows in order.
    const Tensor& in = batch->inputs()[0];
    ASSERT_EQ(in.shape, (std::vector<int64_t>{4, 3}));
    const float* values = reinterpret_cast<const float*>(in.data);
    for (int row = 0; row < 4; ++row) EXPECT_EQ(values[row * 3], static_cast<float>(k * 4 + row));
    batch->Fail("not run");
  }
  EXPECT_EQ(b->queue_depth(), 0);
  BatcherStats s = b->stats();
  EXPECT_EQ(s.batches, 3u);
  EXPECT_EQ(s.batches_full, 3u);
  EXPECT_EQ(s.rows, 12u);
}

TEST(BatcherTest, HoldBlocksReleaseUntilReached) {
  auto b = Batcher::Create(Policy(2, 0));
  b->Hold(3);
  Inputs inputs;
  std::atomic<int> released{0};
  std::thread worker([&] {
    while (auto batch = b->NextBatch()) {
      released += static_cast<int>(batch->rows());
      batch->Fail("not run");
    }
  });
  MustSubmit(*b, inputs, 1, 0);
  MustSubmit(*b, inputs, 1, 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  EXPECT_EQ(released.load(), 0);
  MustSubmit(*b, inputs, 1, 2);
  PollFor(*b, 3);
  EXPECT_EQ(released.load(), 3);
  b->Stop();
  worker.join();
}

TEST(BatcherTest, PreferredSizesReleaseLargestPrefix) {
  BatchPolicy p = Policy(8);
  p.preferred_batch_sizes = {3, 2};
  auto b = Batcher::Create(p);
  b->Hold(7);
  Inputs inputs;
  for (int i = 0; i < 7; ++i) MustSubmit(*b, inputs, 1, 0);
  for (int k = 0; k < 2; ++k) {
    auto batch = b->NextBatch();
    ASSERT_NE(batch, nullptr);
    EXPECT_EQ(batch->reason(), ReleaseReason::kPreferred);
    EXPECT_EQ(batch->rows(), 3);
  }
  // One left: it waits for its delay (10 s), so only stop() releases it now.
  b->Stop();
  auto last = b->NextBatch();
  ASSERT_NE(last, nullptr);
  EXPECT_EQ(last->reason(), ReleaseReason::kDrain);
  EXPECT_EQ(last->rows(), 1);
  EXPECT_EQ(b->stats().batches_preferred, 2u);
}

TEST(BatcherTest, DelayReleasesNoEarlierThanTheDelay) {
  constexpr int64_t kDelayUs = 50'000;
  auto b = Batcher::Create(Policy(8, kDelayUs));
  Inputs inputs;
  std::unique_ptr<Batch> batch;
  std::thread worker([&] { batch = b->NextBatch(); });
  auto start = std::chrono::steady_clock::now();
  MustSubmit(*b, inputs, 1, 0);
  MustSubmit(*b, inputs, 2, 0);
  worker.join();
  auto elapsed = std::chrono::steady_clock::now() - start;
  ASSERT_NE(batch, nullptr);
  EXPECT_EQ(batch->reason(), ReleaseReason::kDelay);
  EXPECT_EQ(batch->rows(), 3);
  EXPECT_GE(elapsed, std::chrono::microseconds(kDelayUs));
  EXPECT_GE(batch->requests()[0].queue_wait_ns, kDelayUs * 1000);
  EXPECT_LT(elapsed, std::chrono::seconds(2));
}

TEST(BatcherTest, ExpiredRequestsTimeOutAndAreNeverBatched) {
  auto b = Batcher::Create(Policy(4));
  Inputs inputs;
  SubmitResult doomed = Submit(*b, inputs, 1, 0, 0, 20'000);  // 20 ms
  ASSERT_EQ(doomed.code, SubmitCode::kOk);
  uint64_t kept = MustSubmit(*b, inputs, 1, 1);
  // No worker is waiting: the timer thread expires it.
  std::vector<Completion> done = PollFor(*b, 1, 2000);
  ASSERT_EQ(done.size(), 1u);
  EXPECT_EQ(done[0].id, doomed.id);
  EXPECT_EQ(done[0].status, CompletionStatus::kTimeout);
  EXPECT_EQ(done[0].batch_id, 0u);
  EXPECT_EQ(done[0].batch_rows, 0);
  EXPECT_GE(done[0].queue_ns, 20'000'000);
  EXPECT_EQ(b->queue_depth(), 1);
  b->Stop();
  auto batch = b->NextBatch();
  ASSERT_NE(batch, nullptr);
  EXPECT_EQ(Ids(*batch), std::vector<uint64_t>{kept});
  EXPECT_EQ(b->stats().timed_out, 1u);
}

TEST(BatcherTest, DefaultTimeoutAppliesAndDeadlinesExpireWhileHeld) {
  BatchPolicy p = Policy(4);
  p.default_timeout_us = 10'000;
  auto b = Batcher::Create(p);
  b->Hold(100);
  Inputs inputs;
  MustSubmit(*b, inputs, 1, 0);
  SubmitResult no_deadline = Submit(*b, inputs, 1, 0, 0, 0);
  std::vector<Completion> done = PollFor(*b, 1, 2000);
  ASSERT_EQ(done.size(), 1u);
  EXPECT_EQ(done[0].status, CompletionStatus::kTimeout);
  EXPECT_NE(done[0].id, no_deadline.id);
  EXPECT_EQ(b->queue_depth(), 1);
}

TEST(BatcherTest, QueueFullRejectsBeyondTheBound) {
  BatchPolicy p = Policy(4);
  p.max_queue_size = 8;
  auto b = Batcher::Create(p);
  b->Hold(100);
  Inputs inputs;
  int full = 0;
  for (int i = 0; i < 10; ++i) {
    SubmitResult r = Submit(*b, inputs, 1, 0);
    if (r.code == SubmitCode::kQueueFull) ++full;
  }
  EXPECT_EQ(full, 2);
  EXPECT_EQ(b->queue_depth(), 8);
  EXPECT_EQ(b->stats().rejected_full, 2u);
  EXPECT_EQ(b->stats().submitted, 8u);
}

TEST(BatcherTest, HigherPriorityLevelIsReleasedFirst) {
  BatchPolicy p = Policy(2);
  p.priority_levels = 3;
  auto b = Batcher::Create(p);
  b->Hold(6);
  Inputs inputs;
  uint64_t low1 = MustSubmit(*b, inputs, 1, 0, 2);
  uint64_t mid1 = MustSubmit(*b, inputs, 1, 0, 1);
  uint64_t low2 = MustSubmit(*b, inputs, 1, 0, 2);
  uint64_t high1 = MustSubmit(*b, inputs, 1, 0, 0);
  uint64_t mid2 = MustSubmit(*b, inputs, 1, 0, 1);
  uint64_t high2 = MustSubmit(*b, inputs, 1, 0, 0);
  EXPECT_EQ(Ids(*b->NextBatch()), (std::vector<uint64_t>{high1, high2}));
  EXPECT_EQ(Ids(*b->NextBatch()), (std::vector<uint64_t>{mid1, mid2}));
  EXPECT_EQ(Ids(*b->NextBatch()), (std::vector<uint64_t>{low1, low2}));
}

TEST(BatcherTest, CandidatesSpanLevelsInPriorityOrder) {
  BatchPolicy p = Policy(3);
  p.priority_levels = 2;
  auto b = Batcher::Create(p);
  b->Hold(3);
  Inputs inputs;
  uint64_t low = MustSubmit(*b, inputs, 1, 0, 1);
  uint64_t high1 = MustSubmit(*b, inputs, 1, 0, 0);
  uint64_t high2 = MustSubmit(*b, inputs, 1, 0, 0);
  auto batch = b->NextBatch();
  EXPECT_EQ(Ids(*batch), (std::vector<uint64_t>{high1, high2, low}));
  EXPECT_EQ(batch->reason(), ReleaseReason::kFull);
}

TEST(BatcherTest, DifferentShapesAreNotMixed) {
  auto b = Batcher::Create(Policy(8));
  b->Hold(6);
  Inputs inputs;
  uint64_t a1 = Submit(*b, inputs, 1, 0, 0, -1, 3).id;
  uint64_t c1 = Submit(*b, inputs, 1, 0, 0, -1, 4).id;
  uint64_t a2 = Submit(*b, inputs, 2, 0, 0, -1, 3).id;
  uint64_t c2 = Submit(*b, inputs, 1, 0, 0, -1, 4).id;
  // Same dims, other dtype: another shape key.
  std::vector<int32_t> ints(3, 7);
  int64_t int_dims[] = {1, 3};
  TensorView iv{ints.data(), DType::kInt32, int_dims, 2};
  uint64_t i1 = b->Submit(&iv, 1, 0, -1).id;
  uint64_t a3 = Submit(*b, inputs, 1, 0, 0, -1, 3).id;
  b->Stop();
  auto first = b->NextBatch();
  EXPECT_EQ(Ids(*first), (std::vector<uint64_t>{a1, a2, a3}));
  EXPECT_EQ(first->inputs()[0].shape, (std::vector<int64_t>{4, 3}));
  auto second = b->NextBatch();
  EXPECT_EQ(Ids(*second), (std::vector<uint64_t>{c1, c2}));
  EXPECT_EQ(second->inputs()[0].shape, (std::vector<int64_t>{2, 4}));
  auto third = b->NextBatch();
  EXPECT_EQ(Ids(*third), (std::vector<uint64_t>{i1}));
  EXPECT_EQ(third->inputs()[0].dtype, DType::kInt32);
  EXPECT_EQ(b->NextBatch(), nullptr);
}

TEST(BatcherTest, StopDrainsQueuedWorkAndRejectsNewWork) {
  auto b = Batcher::Create(Policy(8));
  Inputs inputs;
  for (int i = 0; i < 3; ++i) MustSubmit(*b, inputs, 1, 0);
  b->Stop();
  EXPECT_EQ(Submit(*b, inputs, 1, 0).code, SubmitCode::kStopped);
  auto batch = b->NextBatch();
  ASSERT_NE(batch, nullptr);
  EXPECT_EQ(batch->reason(), ReleaseReason::kDrain);
  EXPECT_EQ(batch->rows(), 3);
  EXPECT_EQ(b->NextBatch(), nullptr);
  BatcherStats s = b->stats();
  EXPECT_EQ(s.rejected_stopped, 1u);
  EXPECT_EQ(s.batches_drain, 1u);
}

TEST(BatcherTest, StopWakesBlockedWorkers) {
  auto b = Batcher::Create(Policy(8));
  std::atomic<int> done{0};
  std::vector<std::thread> workers;
  for (int i = 0; i < 3; ++i) {
    workers.emplace_back([&] {
      EXPECT_EQ(b->NextBatch(), nullptr);
      ++done;
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  b->Stop();
  for (auto& t : workers) t.join();
  EXPECT_EQ(done.load(), 3);
}

TEST(BatcherTest, CompleteScattersRowsToTheirRequests) {
  auto b = Batcher::Create(Policy(8, 0));
  b->Hold(3);
  Inputs inputs;
  uint64_t a = MustSubmit(*b, inputs, 2, 1.0f);
  uint64_t c = MustSubmit(*b, inputs, 1, 2.0f);
  uint64_t d = MustSubmit(*b, inputs, 3, 3.0f);
  auto batch = b->NextBatch();
  ASSERT_EQ(batch->rows(), 6);
  // Two outputs: float32 (rows, 2) = 10 * input[:, :2], and int64 (rows,) = row index.
  const float* in = reinterpret_cast<const float*>(batch->inputs()[0].data);
  std::vector<float> out0(12);
  std::vector<int64_t> out1(6);
  for (int row = 0; row < 6; ++row) {
    out0[row * 2] = out0[row * 2 + 1] = in[row * 3] * 10;
    out1[row] = row;
  }
  int64_t dims0[] = {6, 2};
  int64_t dims1[] = {6};
  TensorView outs[] = {{out0.data(), DType::kFloat32, dims0, 2},
                       {out1.data(), DType::kInt64, dims1, 1}};
  std::string error;
  ASSERT_EQ(batch->Complete(outs, 2, &error), Batch::Result::kOk) << error;
  EXPECT_EQ(batch->Complete(outs, 2, &error), Batch::Result::kFinished);
  std::vector<Completion> done = PollFor(*b, 3);
  ASSERT_EQ(done.size(), 3u);
  std::unordered_map<uint64_t, const Completion*> by_id;
  for (const Completion& comp : done) by_id[comp.id] = &comp;
  struct Want {
    uint64_t id;
    int64_t rows;
    float value;
    int64_t first_row;
  };
  for (Want w : {Want{a, 2, 10.0f, 0}, Want{c, 1, 20.0f, 2}, Want{d, 3, 30.0f, 3}}) {
    const Completion& comp = *by_id.at(w.id);
    EXPECT_EQ(comp.status, CompletionStatus::kOk);
    EXPECT_EQ(comp.rows, w.rows);
    EXPECT_EQ(comp.batch_rows, 6);
    EXPECT_EQ(comp.batch_id, batch->id());
    ASSERT_EQ(comp.num_outputs(), 2u);
    const float* f = reinterpret_cast<const float*>(comp.data.get() + comp.output_offset(0));
    for (int64_t i = 0; i < w.rows * 2; ++i) EXPECT_EQ(f[i], w.value);
    const int64_t* idx = reinterpret_cast<const int64_t*>(comp.data.get() + comp.output_offset(1));
    for (int64_t i = 0; i < w.rows; ++i) EXPECT_EQ(idx[i], w.first_row + i);
    EXPECT_EQ(comp.layout->outputs[1].dtype, DType::kInt64);
  }
  EXPECT_EQ(b->stats().completed, 3u);
}

TEST(BatcherTest, WrongOutputRowsFailTheBatch) {
  auto b = Batcher::Create(Policy(8, 0));
  b->Hold(2);
  Inputs inputs;
  MustSubmit(*b, inputs, 1, 0);
  MustSubmit(*b, inputs, 1, 0);
  auto batch = b->NextBatch();
  std::vector<float> out(3);
  int64_t dims[] = {3};
  TensorView v{out.data(), DType::kFloat32, dims, 1};
  std::string error;
  EXPECT_EQ(batch->Complete(&v, 1, &error), Batch::Result::kInvalid);
  EXPECT_NE(error.find("2 rows"), std::string::npos) << error;
  std::vector<Completion> done = PollFor(*b, 2);
  ASSERT_EQ(done.size(), 2u);
  for (const Completion& c : done) {
    EXPECT_EQ(c.status, CompletionStatus::kError);
    EXPECT_EQ(c.error, error);
  }
  EXPECT_EQ(b->stats().failed, 2u);
}

TEST(BatcherTest, AbandonedBatchFailsItsRequests) {
  auto b = Batcher::Create(Policy(8, 0));
  b->Hold(2);
  Inputs inputs;
  MustSubmit(*b, inputs, 1, 0);
  MustSubmit(*b, inputs, 1, 0);
  b->NextBatch().reset();  // dropped without Complete/Fail
  std::vector<Completion> done = PollFor(*b, 2);
  ASSERT_EQ(done.size(), 2u);
  for (const Completion& c : done) {
    EXPECT_EQ(c.status, CompletionStatus::kError);
    EXPECT_EQ(c.error, "batch abandoned");
  }
  std::vector<Completion> none;
  b->Poll(&none, 0);
  EXPECT_TRUE(none.empty());
}

TEST(BatcherTest, NotifyFdIsWrittenAtMostOncePerBatch) {
  auto b = Batcher::Create(Policy(4));
  const int fd = b->notify_fd();
  EXPECT_FALSE(Readable(fd));
  b->Hold(8);
  Inputs inputs;
  for (int i = 0; i < 8; ++i) MustSubmit(*b, inputs, 1, 0);
  auto first = b->NextBatch();
  auto second = b->NextBatch();
  first->Fail("x");
  EXPECT_TRUE(Readable(fd));
  second->Fail("y");  // coalesced with the first: no poll in between
  EXPECT_EQ(ReadableBytes(fd), 1u);

  std::vector<Completion> done;
  b->Poll(&done, 0);
  EXPECT_EQ(done.size(), 8u);
  EXPECT_FALSE(Readable(fd));

  // After a poll, the next batch writes one byte again.
  for (int i = 0; i < 4; ++i) MustSubmit(*b, inputs, 1, 0);
  b->NextBatch()->Fail("z");
  EXPECT_TRUE(Readable(fd));
  b->Poll(&done, 0);
  EXPECT_EQ(done.size(), 4u);
  EXPECT_FALSE(Readable(fd));  // poll drained the pipe
}

// --- an event loop as the only worker (TryNextBatch + ready_fd) ---

bool ReadableWithin(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, timeout_ms) == 1 && (p.revents & POLLIN);
}

TEST(BatcherTest, TryNextBatchNeverBlocksAndReadyFdSaysWhenABatchFills) {
  auto b = Batcher::Create(Policy(4));
  const int ready = b->ready_fd();
  Inputs inputs;
  EXPECT_EQ(b->TryNextBatch(), nullptr);  // empty queue
  MustSubmit(*b, inputs, 1, 1);
  MustSubmit(*b, inputs, 2, 2);
  EXPECT_EQ(b->TryNextBatch(), nullptr);  // 3 of 4 rows, delay far away
  EXPECT_FALSE(Readable(ready));
  MustSubmit(*b, inputs, 1, 3);  // full: the submitter tells the puller
  EXPECT_TRUE(Readable(ready));
  auto batch = b->TryNextBatch();
  ASSERT_NE(batch, nullptr);
  EXPECT_EQ(batch->reason(), ReleaseReason::kFull);
  EXPECT_EQ(batch->rows(), 4);
  EXPECT_EQ(batch->inputs().size(), 1u);
  EXPECT_FALSE(Readable(ready));  // the call that found the batch re-aimed it: nothing left
  EXPECT_EQ(b->TryNextBatch(), nullptr);
  batch->Fail("done");
}

TEST(BatcherTest, ReadyFdFiresOnceTheHeadDelayPasses) {
  constexpr int64_t kDelayUs = 30'000;
  auto b = Batcher::Create(Policy(8, kDelayUs));
  const int ready = b->ready_fd();
  Inputs inputs;
  EXPECT_EQ(b->TryNextBatch(), nullptr);
  const auto start = std::chrono::steady_clock::now();
  MustSubmit(*b, inputs, 1, 0);
  EXPECT_FALSE(Readable(ready));
  ASSERT_TRUE(ReadableWithin(ready, 2000));  // the timer thread, not a submit, wrote it
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::microseconds(kDelayUs));
  auto batch = b->TryNextBatch();
  ASSERT_NE(batch, nullptr);
  EXPECT_EQ(batch->reason(), ReleaseReason::kDelay);
  EXPECT_EQ(batch->rows(), 1);
  EXPECT_GE(batch->requests()[0].queue_wait_ns, kDelayUs * 1000);
  batch->Fail("done");
}

TEST(BatcherTest, ReadyFdStaysQuietUntilAPullerAsks) {
  auto b = Batcher::Create(Policy(2));
  Inputs inputs;
  MustSubmit(*b, inputs, 2, 0);  // releasable, but nobody pulls: worker threads may be in use
  EXPECT_FALSE(Readable(b->ready_fd()));
  auto batch = b->TryNextBatch();
  ASSERT_NE(batch, nullptr);
  batch->Fail("done");
}

TEST(BatcherTest, APullerThatTakesOneBatchPerWakeUpIsToldOfTheNext) {
  auto b = Batcher::Create(Policy(2));
  const int ready = b->ready_fd();
  Inputs inputs;
  EXPECT_EQ(b->TryNextBatch(), nullptr);
  for (int i = 0; i < 4; ++i) MustSubmit(*b, inputs, 1, static_cast<float>(i));
  ASSERT_TRUE(Readable(ready));
  auto first = b->TryNextBatch();
  ASSERT_NE(first, nullptr);
  EXPECT_TRUE(Readable(ready));  // two more rows make another full batch
  auto second = b->TryNextBatch();
  ASSERT_NE(second, nullptr);
  EXPECT_FALSE(Readable(ready));
  first->Fail("done");
  second->Fail("done");
}

TEST(BatcherTest, StopTellsThePullerToDrainTheQueue) {
  auto b = Batcher::Create(Policy(8));
  const int ready = b->ready_fd();
  Inputs inputs;
  MustSubmit(*b, inputs, 2, 0);
  MustSubmit(*b, inputs, 1, 0);
  EXPECT_EQ(b->TryNextBatch(), nullptr);
  b->Stop();
  EXPECT_TRUE(Readable(ready));
  auto batch = b->TryNextBatch();
  ASSERT_NE(batch, nullptr);
  EXPECT_EQ(batch->reason(), ReleaseReason::kDrain);
  EXPECT_EQ(batch->rows(), 3);
  EXPECT_EQ(b->TryNextBatch(), nullptr);
  batch->Fail("done");
}

TEST(BatcherTest, AnExpiredHeadMovesThePullersTimerToTheNextHead) {
  constexpr int64_t kDelayUs = 200'000;
  auto b = Batcher::Create(Policy(8, kDelayUs));
  const int ready = b->ready_fd();
  Inputs inputs;
  SubmitResult doomed = Submit(*b, inputs, 1, 0, /*priority=*/0, /*timeout_us=*/10'000);
  ASSERT_EQ(doomed.code, SubmitCode::kOk);
  EXPECT_EQ(b->TryNextBatch(), nullptr);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const auto second_submitted = std::chrono::steady_clock::now();
  MustSubmit(*b, inputs, 1, 0);
  ASSERT_TRUE(ReadableWithin(ready, 3000));
  // Released by the delay of the second request, which started when it was queued.
  EXPECT_GE(std::chrono::steady_clock::now() - second_submitted,
            std::chrono::microseconds(kDelayUs));
  auto batch = b->TryNextBatch();
  ASSERT_NE(batch, nullptr);
  ASSERT_EQ(batch->requests().size(), 1u);
  EXPECT_NE(batch->requests()[0].id, doomed.id);
  batch->Fail("done");
  std::vector<Completion> done;
  b->Poll(&done, 0);
  ASSERT_EQ(done.size(), 2u);
  EXPECT_EQ(done[0].id, doomed.id);
  EXPECT_EQ(done[0].status, CompletionStatus::kTimeout);
}

TEST(BatcherTest, AfterAFullBatchOnlyTheNextHeadsDelayWakesThePuller) {
  constexpr int64_t kDelayUs = 200'000;
  auto b = Batcher::Create(Policy(2, kDelayUs));
  const int ready = b->ready_fd();
  Inputs inputs;
  EXPECT_EQ(b->TryNextBatch(), nullptr);
  MustSubmit(*b, inputs, 1, 0);  // ready_fd aimed at its delay
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  MustSubmit(*b, inputs, 1, 1);  // full: released long before that delay
  auto full = b->TryNextBatch();
  ASSERT_NE(full, nullptr);
  EXPECT_EQ(full->reason(), ReleaseReason::kFull);
  full->Fail("done");
  const auto next_submitted = std::chrono::steady_clock::now();
  MustSubmit(*b, inputs, 1, 2);
  // The first request's delay passes ~100 ms from now: the puller must not be woken for it.
  const auto quiet_until = next_submitted + std::chrono::microseconds(kDelayUs - 50'000);
  const auto quiet_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                            quiet_until - std::chrono::steady_clock::now())
                            .count();
  EXPECT_FALSE(ReadableWithin(ready, static_cast<int>(std::max<int64_t>(quiet_ms, 0))));
  ASSERT_TRUE(ReadableWithin(ready, 3000));
  EXPECT_GE(std::chrono::steady_clock::now() - next_submitted, std::chrono::microseconds(kDelayUs));
  auto batch = b->TryNextBatch();
  ASSERT_NE(batch, nullptr);
  EXPECT_EQ(batch->reason(), ReleaseReason::kDelay);
  EXPECT_FALSE(Readable(ready));  // nothing left: disarmed
  EXPECT_EQ(b->TryNextBatch(), nullptr);
  batch->Fail("done");
}

TEST(BatcherTest, ACallThatFindsNoBatchLeavesReadyFdAimedAtTheHead) {
  constexpr int64_t kDelayUs = 50'000;
  auto b = Batcher::Create(Policy(8, kDelayUs));
  const int ready = b->ready_fd();
  Inputs inputs;
  MustSubmit(*b, inputs, 1, 0);
  EXPECT_EQ(b->TryNextBatch(), nullptr);  // the first call aims it
  EXPECT_EQ(b->TryNextBatch(), nullptr);  // and a second, early, one keeps it aimed
  EXPECT_FALSE(Readable(ready));
  ASSERT_TRUE(ReadableWithin(ready, 3000));
  EXPECT_TRUE(Readable(ready));  // stays readable until the batch is taken
  auto batch = b->TryNextBatch();
  ASSERT_NE(batch, nullptr);
  EXPECT_EQ(batch->reason(), ReleaseReason::kDelay);
  EXPECT_FALSE(Readable(ready));
  batch->Fail("done");
}

// How many times this process's one timerfd has fired unread (the ticks of its fdinfo); -1
// when there is no timerfd or more than one (then it would not be this batcher's).
int64_t ReadyTimerTicks() {
  int64_t ticks = -1;
  int found = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code error;
    const auto target = std::filesystem::read_symlink(entry.path(), error);
    if (error || target.string() != "anon_inode:[timerfd]") continue;
    std::ifstream info("/proc/self/fdinfo/" + entry.path().filename().string());
    for (std::string line; std::getline(info, line);) {
      if (line.rfind("ticks:", 0) == 0) ticks = std::stoll(line.substr(6));
    }
    ++found;
  }
  return found == 1 ? ticks : -1;
}

TEST(BatcherTest, ABatchReleasableNowIsToldWithoutFiringTheDelayTimer) {
  // Aiming the timer at now would reprogram the CPU's timer and take its interrupt: a trip
  // to the hypervisor each on a VM. The eventfd beside it in ready_fd says it instead.
  auto b = Batcher::Create(Policy(4));  // a 10 s delay
  const int ready = b->ready_fd();
  Inputs inputs;
  EXPECT_EQ(b->TryNextBatch(), nullptr);  // a puller
  ASSERT_EQ(ReadyTimerTicks(), 0) << "cannot find the batcher's timerfd in /proc/self/fd";
  MustSubmit(*b, inputs, 4, 0);  // full at once
  EXPECT_TRUE(Readable(ready));
  EXPECT_EQ(ReadyTimerTicks(), 0);
  auto batch = b->TryNextBatch();
  ASSERT_NE(batch, nullptr);
  EXPECT_EQ(batch->reason(), ReleaseReason::kFull);
  EXPECT_FALSE(Readable(ready));  // the eventfd was read
  batch->Fail("done");
  // So is a queue that release_queued opens (every client waits in it).
  MustSubmit(*b, inputs, 1, 1);  // the head: the timer is aimed at its delay, far away
  EXPECT_FALSE(Readable(ready));
  TensorView last = inputs.Add(1, 3, 2.0f).view();
  ASSERT_EQ(b->Submit(&last, 1, 0, -1, /*release_queued=*/true).code, SubmitCode::kOk);
  EXPECT_TRUE(Readable(ready));
  EXPECT_EQ(ReadyTimerTicks(), 0);
  batch = b->TryNextBatch();
  ASSERT_NE(batch, nullptr);
  EXPECT_EQ(batch->reason(), ReleaseReason::kIdle);
  EXPECT_FALSE(Readable(ready));
  batch->Fail("done");
}

// How many times the batcher's timer thread has been put on a CPU (the third field of its
// /proc schedstat); -1 when no thread of this process is named fastserve-timer, or more than
// one is (then the count would not be this batcher's).
int64_t TimerThreadRuns() {
  int64_t runs = -1;
  int found = 0;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(task.path() / "comm");
    std::string name;
    std::getline(comm, name);
    if (name != "fastserve-timer") continue;
    std::ifstream stat(task.path() / "schedstat");
    int64_t ran_ns = 0, waited_ns = 0;
    stat >> ran_ns >> waited_ns >> runs;
    ++found;
  }
  return found == 1 ? runs : -1;
}

TEST(BatcherTest, ThePullersDelayReleasesLeaveTheTimerThreadAsleep) {
  // The kernel wakes the puller when a head's delay passes (ready_fd is a timerfd): the
  // timer thread, there for deadlines, has no part in it and never runs.
  auto b = Batcher::Create(Policy(8, /*delay_us=*/1'000));
  const int ready = b->ready_fd();
  Inputs inputs;
  EXPECT_EQ(b->TryNextBatch(), nullptr);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // it has started and waits
  const int64_t before = TimerThreadRuns();
  ASSERT_GE(before, 0) << "cannot find the timer thread in /proc/self/task";
  constexpr int kBatches = 20;
  for (int i = 0; i < kBatches; ++i) {
    MustSubmit(*b, inputs, 1, static_cast<float>(i));
    ASSERT_TRUE(ReadableWithin(ready, 3000));
    auto batch = b->TryNextBatch();
    ASSERT_NE(batch, nullptr);
    EXPECT_EQ(batch->reason(), ReleaseReason::kDelay);
    batch->Fail("done");
  }
  EXPECT_EQ(TimerThreadRuns(), before);
}

TEST(BatcherTest, InvalidSubmitsAreRejected) {
  BatchPolicy p = Policy(4);
  p.priority_levels = 2;
  auto b = Batcher::Create(p);
  Inputs inputs;
  EXPECT_EQ(Submit(*b, inputs, 5, 0).code, SubmitCode::kInvalid);     // rows > max_batch_size
  EXPECT_EQ(Submit(*b, inputs, 0, 0).code, SubmitCode::kInvalid);     // no rows
  EXPECT_EQ(Submit(*b, inputs, 1, 0, 2).code, SubmitCode::kInvalid);  // no such level
  EXPECT_EQ(Submit(*b, inputs, 1, 0, 0, -2).code, SubmitCode::kInvalid);
  EXPECT_EQ(b->Submit(nullptr, 0, 0, -1).code, SubmitCode::kInvalid);
  const OwnedInput& x = inputs.Add(2, 3, 0);
  const OwnedInput& y = inputs.Add(3, 3, 0);
  TensorView two[] = {x.view(), y.view()};
  SubmitResult r = b->Submit(two, 2, 0, -1);
  EXPECT_EQ(r.code, SubmitCode::kInvalid);
  EXPECT_NE(r.error.find("same first dimension"), std::string::npos) << r.error;
  EXPECT_EQ(b->queue_depth(), 0);
  EXPECT_EQ(b->stats().submitted, 0u);
}

TEST(BatcherTest, ConcurrentRequestsAreDeliveredExactlyOnceToTheRightId) {
  constexpr int kRequests = 10'000;
  constexpr int kSubmitters = 4;
  constexpr int kWorkers = 3;
  BatchPolicy p = Policy(16, 200);
  p.max_queue_size = kRequests;
  auto b = Batcher::Create(p);

  // Each request: rows 1..3, two inputs (float32 (rows, 2) and int32 (rows,)), values derived
  // from a per-request tag. The worker's output is 2 * input0 + input1 per element, in float64.
  struct Sent {
    std::vector<float> x;
    std::vector<int32_t> y;
    int64_t dims_x[2];
    int64_t dims_y[1];
  };
  std::vector<Sent> sent(kRequests);
  std::vector<uint64_t> id_of(kRequests);
  std::atomic<int> next{0};

  std::vector<std::thread> workers;
  for (int w = 0; w < kWorkers; ++w) {
    workers.emplace_back([&] {
      while (auto batch = b->NextBatch()) {
        const int64_t rows = batch->rows();
        const float* x = reinterpret_cast<const float*>(batch->inputs()[0].data);
        const int32_t* y = reinterpret_cast<const int32_t*>(batch->inputs()[1].data);
        std::vector<double> out(rows * 2);
        for (int64_t r = 0; r < rows; ++r) {
          out[r * 2] = 2.0 * x[r * 2] + y[r];
          out[r * 2 + 1] = 2.0 * x[r * 2 + 1] + y[r];
        }
        int64_t dims[] = {rows, 2};
        TensorView v{out.data(), DType::kFloat64, dims, 2};
        std::string error;
        EXPECT_EQ(batch->Complete(&v, 1, &error), Batch::Result::kOk) << error;
      }
    });
  }
  std::vector<std::thread> submitters;
  for (int s = 0; s < kSubmitters; ++s) {
    submitters.emplace_back([&] {
      for (int i = next++; i < kRequests; i = next++) {
        Sent& req = sent[i];
        const int64_t rows = 1 + i % 3;
        req.x.resize(rows * 2);
        req.y.resize(rows);
        for (int64_t r = 0; r < rows; ++r) {
          req.x[r * 2] = static_cast<float>(i);
          req.x[r * 2 + 1] = static_cast<float>(r);
          req.y[r] = i % 1000;
        }
        req.dims_x[0] = req.dims_y[0] = rows;
        req.dims_x[1] = 2;
        TensorView v[] = {{req.x.data(), DType::kFloat32, req.dims_x, 2},
                          {req.y.data(), DType::kInt32, req.dims_y, 1}};
        SubmitResult res = b->Submit(v, 2, 0, 0);
        ASSERT_EQ(res.code, SubmitCode::kOk) << res.error;
        id_of[i] = res.id;
      }
    });
  }
  for (auto& t : submitters) t.join();
  std::vector<Completion> done = PollFor(*b, kRequests, 30'000);
  b->Stop();
  for (auto& t : workers) t.join();

  ASSERT_EQ(done.size(), static_cast<size_t>(kRequests));
  std::unordered_map<uint64_t, int> index_of_id;
  for (int i = 0; i < kRequests; ++i) index_of_id[id_of[i]] = i;
  ASSERT_EQ(index_of_id.size(), static_cast<size_t>(kRequests));  // ids unique
  std::vector<int> seen(kRequests, 0);
  for (const Completion& c : done) {
    ASSERT_EQ(c.status, CompletionStatus::kOk) << c.error;
    int i = index_of_id.at(c.id);
    ++seen[i];
    const int64_t rows = 1 + i % 3;
    ASSERT_EQ(c.rows, rows);
    ASSERT_EQ(c.layout->outputs[0].trailing_dims, std::vector<int64_t>{2});
    const double* out = reinterpret_cast<const double*>(c.data.get() + c.output_offset(0));
    for (int64_t r = 0; r < rows; ++r) {
      ASSERT_EQ(out[r * 2], 2.0 * i + i % 1000);
      ASSERT_EQ(out[r * 2 + 1], 2.0 * r + i % 1000);
    }
  }
  for (int i = 0; i < kRequests; ++i) ASSERT_EQ(seen[i], 1) << "request " << i;
  BatcherStats s = b->stats();
  EXPECT_EQ(s.submitted, static_cast<uint64_t>(kRequests));
  EXPECT_EQ(s.completed, static_cast<uint64_t>(kRequests));
  EXPECT_EQ(s.rows, static_cast<uint64_t>(kRequests / 3 * 6 + 1));
  std::vector<Completion> extra;
  b->Poll(&extra, 0);
  EXPECT_TRUE(extra.empty());
}

// Int64 sequences, [rows, length] each row filled with `first, first + 1, ...`.
struct Sequence {
  Sequence(int64_t rows, int64_t length, int64_t first) : dims{rows, length} {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t p = 0; p < length; ++p) data.push_back(first + r * 100 + p);
    }
  }
  std::vector<int64_t> data;
  std::vector<int64_t> dims;
  TensorView view() const { return TensorView{data.data(), DType::kInt64, dims.data(), 2}; }
};

RaggedSpec Ragged(int64_t fixed = 0, int64_t max = 0) {
  RaggedSpec spec;
  spec.inputs = {0};
  spec.pad_values = {-1.0};
  spec.fixed_length = fixed;
  spec.max_length = max;
  spec.mask = true;
  spec.mask_dtype = DType::kInt32;
  return spec;
}

std::vector<int64_t> Values(const Tensor& t) {
  const auto* p = reinterpret_cast<const int64_t*>(t.data);
  return std::vector<int64_t>(p, p + t.bytes / sizeof(int64_t));
}

std::vector<int32_t> Mask(const Tensor& t) {
  const auto* p = reinterpret_cast<const int32_t*>(t.data);
  return std::vector<int32_t>(p, p + t.bytes / sizeof(int32_t));
}

TEST(BatcherRaggedTest, RequestsOfOtherLengthsShareABatchPaddedToTheLongest) {
  auto b = Batcher::Create(Policy(4), Ragged());
  const Sequence a(1, 2, 10), c(2, 3, 20), d(1, 1, 30);
  for (const Sequence* s : {&a, &c, &d}) {
    TensorView v = s->view();
    ASSERT_EQ(b->Submit(&v, 1, 0, -1).code, SubmitCode::kOk);
  }
  std::unique_ptr<Batch> batch = b->NextBatch();  // 4 rows: full
  ASSERT_NE(batch, nullptr);
  ASSERT_EQ(batch->rows(), 4);
  ASSERT_EQ(batch->inputs().size(), 2u);  // the sequences, then the mask
  const Tensor& ids = batch->inputs()[0];
  EXPECT_EQ(ids.shape, (std::vector<int64_t>{4, 3}));
  EXPECT_EQ(Values(ids), (std::vector<int64_t>{10, 11, -1,  //
                                               20, 21, 22,  //
                                               120, 121, 122, 30, -1, -1}));
  const Tensor& mask = batch->inputs()[1];
  EXPECT_EQ(mask.dtype, DType::kInt32);
  EXPECT_EQ(mask.shape, (std::vector<int64_t>{4, 3}));
  EXPECT_EQ(Mask(mask), (std::vector<int32_t>{1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0}));
}

TEST(BatcherRaggedTest, FixedAndMaximumLengthsTruncate) {
  for (auto [spec, expected_length] : {std::pair{Ragged(4), int64_t{4}}, {Ragged(0, 2), 2}}) {
    auto b = Batcher::Create(Policy(2), spec);
    const Sequence a(1, 3, 0), c(1, 5, 50);
    for (const Sequence* s : {&a, &c}) {
      TensorView v = s->view();
      ASSERT_EQ(b->Submit(&v, 1, 0, -1).code, SubmitCode::kOk);
    }
    std::unique_ptr<Batch> batch = b->NextBatch();
    ASSERT_NE(batch, nullptr);
    const Tensor& ids = batch->inputs()[0];
    ASSERT_EQ(ids.shape, (std::vector<int64_t>{2, expected_length}));
    if (expected_length == 4) {
      EXPECT_EQ(Values(ids), (std::vector<int64_t>{0, 1, 2, -1, 50, 51, 52, 53}));
      EXPECT_EQ(Mask(batch->inputs()[1]), (std::vector<int32_t>{1, 1, 1, 0, 1, 1, 1, 1}));
    } else {
      EXPECT_EQ(Values(ids), (std::vector<int64_t>{0, 1, 50, 51}));
    }
  }
}

TEST(BatcherRaggedTest, OtherInputsStillSplitBatchesByShape) {
  RaggedSpec spec = Ragged();
  spec.mask = false;
  auto b = Batcher::Create(Policy(2), spec);
  const Sequence a(1, 2, 0), c(1, 4, 0);
  OwnedInput narrow(1, 3, 1.0f), wide(1, 5, 1.0f);
  TensorView first[2] = {a.view(), narrow.view()};
  TensorView second[2] = {c.view(), wide.view()};
  ASSERT_EQ(b->Submit(first, 2, 0, -1).code, SubmitCode::kOk);
  ASSERT_EQ(b->Submit(second, 2, 0, -1).code, SubmitCode::kOk);
  b->Stop();  // drain: each shape its own batch
  std::unique_ptr<Batch> one = b->NextBatch(), two = b->NextBatch();
  ASSERT_NE(one, nullptr);
  ASSERT_NE(two, nullptr);
  EXPECT_EQ(one->rows(), 1);
  EXPECT_EQ(two->rows(), 1);
  EXPECT_EQ(one->inputs().size(), 2u);  // no mask asked for
  EXPECT_EQ(one->inputs()[0].shape, (std::vector<int64_t>{1, 2}));
}

TEST(BatcherRaggedTest, RefusesBadSpecsAndRequests) {
  RaggedSpec spec = Ragged();
  spec.pad_values = {};
  EXPECT_THROW(Batcher::Create(Policy(2), spec), std::invalid_argument);
  spec = Ragged();
  spec.inputs = {0, 0};
  spec.pad_values = {0, 0};
  EXPECT_THROW(Batcher::Create(Policy(2), spec), std::invalid_argument);
  spec = Ragged();
  spec.mask_dtype = DType::kComplex64;
  EXPECT_THROW(Batcher::Create(Policy(2), spec), std::invalid_argument);

  spec = Ragged();
  spec.inputs = {0, 1};
  spec.pad_values = {0.0, 0.5};  // 0.5 is no int64
  auto b = Batcher::Create(Policy(2), spec);
  const Sequence a(1, 2, 0), c(1, 3, 0);
  TensorView pair[2] = {a.view(), c.view()};
  SubmitResult r = b->Submit(pair, 2, 0, -1);
  EXPECT_EQ(r.code, SubmitCode::kInvalid);
  EXPECT_NE(r.error.find("has length 3 but"), std::string::npos) << r.error;
  TensorView same[2] = {a.view(), a.view()};
  r = b->Submit(same, 2, 0, -1);
  EXPECT_NE(r.error.find("cannot be padded"), std::string::npos) << r.error;
  r = b->Submit(same, 1, 0, -1);
  EXPECT_NE(r.error.find("ragged input 1 is missing"), std::string::npos) << r.error;
}

std::shared_ptr<const InputTransform> GrayTo3x3() {
  ImageSpec spec;
  spec.out_h = 3;
  spec.out_w = 3;
  spec.channels = 1;
  spec.mean = {0.0f};
  spec.std = {1.0f};
  return std::make_shared<ImageTransform>(spec, 1);
}

TEST(BatcherTransformTest, RawImagesAreTransformedWhileGatheredBesideReadyTensors) {
  auto b = Batcher::Create(Policy(3), {}, {GrayTo3x3()});
  std::vector<uint8_t> pixels(6 * 5);
  for (size_t k = 0; k < pixels.size(); ++k) pixels[k] = static_cast<uint8_t>(k * 8);
  const int64_t raw_dims[3] = {1, 6, 5};  // [n, h, w]: one channel
  const TensorView raw{pixels.data(), DType::kUInt8, raw_dims, 3};
  OwnedInput ready(1, 9, 0.25f);  // [1, 9] is not [1, 1, 3, 3]: its own batch
  std::vector<float> tensor(9, 0.5f);
  const int64_t tensor_dims[4] = {1, 1, 3, 3};
  const TensorView same{tensor.data(), DType::kFloat32, tensor_dims, 4};
  ASSERT_EQ(b->Submit(&raw, 1, 0, -1).code, SubmitCode::kOk);
  ASSERT_EQ(b->Submit(&same, 1, 0, -1).code, SubmitCode::kOk);
  TensorView other = ready.view();
  ASSERT_EQ(b->Submit(&other, 1, 0, -1).code, SubmitCode::kOk);
  b->Stop();
  std::unique_ptr<Batch> batch = b->NextBatch();
  ASSERT_NE(batch, nullptr);
  ASSERT_EQ(batch->rows(), 2);  // the raw image and the ready tensor of its shape
  const Tensor& images = batch->inputs()[0];
  EXPECT_EQ(images.dtype, DType::kFloat32);
  EXPECT_EQ(images.shape, (std::vector<int64_t>{2, 1, 3, 3}));
  std::vector<float> expected(9);
  ImageView view{pixels.data(), 6, 5, 5};
  ImageSpec spec = static_cast<const ImageTransform&>(*GrayTo3x3()).spec();
  PreprocessImage(view, spec, expected.data());
  const auto* got = reinterpret_cast<const float*>(images.data);
  for (size_t k = 0; k < 9; ++k) {
    EXPECT_FLOAT_EQ(got[k], expected[k]) << k;
    EXPECT_FLOAT_EQ(got[9 + k], 0.5f) << k;
  }
  std::unique_ptr<Batch> rest = b->NextBatch();
  ASSERT_NE(rest, nullptr);
  EXPECT_EQ(rest->inputs()[0].shape, (std::vector<int64_t>{1, 9}));
}

TEST(BatcherTransformTest, RefusesRawInputsItCannotTransform) {
  auto b = Batcher::Create(Policy(3), {}, {GrayTo3x3()});
  std::vector<uint8_t> pixels(2 * 2 * 3);
  const int64_t color[4] = {1, 2, 2, 3};
  const TensorView rgb{pixels.data(), DType::kUInt8, color, 4};
  SubmitResult r = b->Submit(&rgb, 1, 0, -1);
  EXPECT_EQ(r.code, SubmitCode::kInvalid);
  EXPECT_NE(r.error.find("must be uint8 images [n, height, width, 1]"), std::string::npos)
      << r.error;
  RaggedSpec ragged = Ragged();
  EXPECT_THROW(Batcher::Create(Policy(3), ragged, {GrayTo3x3()}), std::invalid_argument);
}

TEST(BatcherTest, ReleaseQueuedCutsTheDelayShortForWhatIsQueued) {
  auto b = Batcher::Create(Policy(8));  // a 10 s delay
  Inputs inputs;
  MustSubmit(*b, inputs, 1, 1.0f);
  EXPECT_EQ(b->TryNextBatch(), nullptr);  // waiting for company
  TensorView last = inputs.Add(2, 3, 2.0f).view();
  ASSERT_EQ(b->Submit(&last, 1, 0, -1, /*release_queued=*/true).code, SubmitCode::kOk);
  std::unique_ptr<Batch> batch = b->TryNextBatch();
  ASSERT_NE(batch, nullptr);
  EXPECT_EQ(batch->rows(), 3);
  EXPECT_EQ(batch->reason(), ReleaseReason::kIdle);
  EXPECT_EQ(b->stats().batches_idle, 1u);
  EXPECT_EQ(b->stats().batches_delay, 0u);
  MustSubmit(*b, inputs, 1, 3.0f);  // after the release: waits as usual
  EXPECT_EQ(b->TryNextBatch(), nullptr);
  b->Hold(5);
  TensorView held = inputs.Add(1, 3, 4.0f).view();
  ASSERT_EQ(b->Submit(&held, 1, 0, -1, /*release_queued=*/true).code, SubmitCode::kOk);
  EXPECT_EQ(b->TryNextBatch(), nullptr);  // held stays held
}

TEST(BatcherTest, ReleaseQueuedWakesAWaitingWorker) {
  auto b = Batcher::Create(Policy(8));  // a 10 s delay
  Inputs inputs;
  std::unique_ptr<Batch> taken;
  std::thread worker([&] { taken = b->NextBatch(); });
  MustSubmit(*b, inputs, 1, 1.0f);
  TensorView last = inputs.Add(1, 3, 2.0f).view();
  ASSERT_EQ(b->Submit(&last, 1, 0, -1, /*release_queued=*/true).code, SubmitCode::kOk);
  worker.join();  // would sleep out the 10 s delay if it were not woken
  ASSERT_NE(taken, nullptr);
  EXPECT_EQ(taken->rows(), 2);
  EXPECT_EQ(taken->reason(), ReleaseReason::kIdle);
}

}  // namespace
}  // namespace fastserve
