#include "fastserve/drift.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <utility>

namespace fastserve {

DriftSketch::DriftSketch(std::vector<FeatureBins> features, int64_t window_rows)
    : features_(std::move(features)), window_rows_(window_rows) {
  if (window_rows_ < 1) throw std::invalid_argument("window_rows must be at least 1");
  for (const FeatureBins& f : features_) {
    if (!std::is_sorted(f.edges.begin(), f.edges.end()) ||
        std::adjacent_find(f.edges.begin(), f.edges.end()) != f.edges.end()) {
      throw std::invalid_argument("bin edges must be strictly increasing");
    }
  }
  ClearCurrent();
  last_ = current_;
}

void DriftSketch::ClearCurrent() {
  current_.rows = 0;
  current_.counts.resize(features_.size());
  current_.nulls.assign(features_.size(), 0);
  for (size_t f = 0; f < features_.size(); ++f) {
    current_.counts[f].assign(features_[f].edges.size() + 1, 0);
  }
}

int64_t DriftSketch::BinOf(size_t feature, double value) const {
  const std::vector<double>& edges = features_[feature].edges;
  // the number of edges below the value: (e_i, e_i+1] semantics
  auto it = std::lower_bound(edges.begin(), edges.end(), value);
  int64_t bin = it - edges.begin();
  if (features_[feature].discrete && (it == edges.end() || *it != value)) {
    return static_cast<int64_t>(edges.size());  // a value the reference never had
  }
  return bin;
}

template <typename T>
void DriftSketch::UpdateImpl(const T* data, int64_t rows, int64_t cols, int64_t row_stride) {
  if (cols != static_cast<int64_t>(features_.size())) {
    throw std::invalid_argument("column count does not match the sketch's features");
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = data + r * row_stride;
    for (int64_t c = 0; c < cols; ++c) {
      const double value = static_cast<double>(row[c]);
      if (std::isnan(value)) {
        ++current_.nulls[c];
      } else {
        ++current_.counts[c][BinOf(static_cast<size_t>(c), value)];
      }
    }
    ++current_.rows;
    ++total_rows_;
    if (current_.rows >= window_rows_) {
      std::swap(last_, current_);
      has_last_ = true;
      ClearCurrent();
    }
  }
}

void DriftSketch::Update(const float* data, int64_t rows, int64_t cols, int64_t row_stride) {
  UpdateImpl(data, rows, cols, row_stride);
}

void DriftSketch::Update(const double* data, int64_t rows, int64_t cols, int64_t row_stride) {
  UpdateImpl(data, rows, cols, row_stride);
}

DriftSketch::Window DriftSketch::Snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  return has_last_ ? last_ : current_;
}

int64_t DriftSketch::total_rows() const {
  std::lock_guard<std::mutex> lock(mu_);
  return total_rows_;
}

}  // namespace fastserve
