// Work spread over a few threads for the preprocessing kernels.
#ifndef FASTSERVE_PARALLEL_H_
#define FASTSERVE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace fastserve {

// Calls fn(item) once for every item in [0, items), on up to `threads` threads (<= 0: the
// hardware's count; never more threads than items), the calling thread among them. Items
// are handed out one at a time, so uneven items balance. fn must not throw.
template <typename Fn>
void ParallelFor(int64_t items, int threads, Fn&& fn) {
  if (items <= 0) return;
  int count = threads > 0 ? threads : static_cast<int>(std::thread::hardware_concurrency());
  count = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(count, items)));
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t item; (item = next.fetch_add(1, std::memory_order_relaxed)) < items;) fn(item);
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(count - 1));
  for (int t = 1; t < count; ++t) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
}

}  // namespace fastserve

#endif  // FASTSERVE_PARALLEL_H_
