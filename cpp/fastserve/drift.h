// Streaming per-feature histograms of live inputs, for drift against a reference profile.
#ifndef FASTSERVE_DRIFT_H_
#define FASTSERVE_DRIFT_H_

#include <cstdint>
#include <mutex>
#include <vector>

namespace fastserve {

// One feature's bins, as the reference profile (fastserve profile) defines them.
struct FeatureBins {
  // Continuous: the interior edges e1 < ... < ek; bin i holds (e_i, e_i+1], with
  // (-inf, e1] first and (ek, inf) last: k + 1 bins.
  // Discrete: the reference's distinct values; bin i holds exactly edges[i], and one more
  // bin holds every value the reference never had: k + 1 bins too.
  std::vector<double> edges;
  bool discrete = false;
};

// Counts of a [rows, features] float stream in each feature's bins, over windows of
// `window_rows` rows: when the current window fills, it becomes the last complete one
// and a new one starts. NaN is counted apart (as nulls), in no bin. Thread-safe.
class DriftSketch {
 public:
  DriftSketch(std::vector<FeatureBins> features, int64_t window_rows);

  // Count `rows` rows of `cols` features (row-major, `row_stride` elements apart); `cols`
  // must be the number of features. Takes float32 or float64.
  void Update(const float* data, int64_t rows, int64_t cols, int64_t row_stride);
  void Update(const double* data, int64_t rows, int64_t cols, int64_t row_stride);

  struct Window {
    int64_t rows = 0;
    std::vector<std::vector<int64_t>> counts;  // [feature][bin]
    std::vector<int64_t> nulls;                // [feature]
  };
  // The last complete window when there is one, else the current (partial) one.
  Window Snapshot() const;
  // Rows counted since the sketch was made.
  int64_t total_rows() const;
  int64_t window_rows() const { return window_rows_; }
  size_t num_features() const { return features_.size(); }

 private:
  template <typename T>
  void UpdateImpl(const T* data, int64_t rows, int64_t cols, int64_t row_stride);
  int64_t BinOf(size_t feature, double value) const;
  void ClearCurrent();

  std::vector<FeatureBins> features_;
  int64_t window_rows_;
  mutable std::mutex mu_;
  Window current_;
  Window last_;
  bool has_last_ = false;
  int64_t total_rows_ = 0;
};

}  // namespace fastserve

#endif  // FASTSERVE_DRIFT_H_
