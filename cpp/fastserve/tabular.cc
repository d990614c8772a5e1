#include "fastserve/tabular.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "fastserve/parallel.h"

namespace fastserve {
namespace {

// Rows per work item: below this many a thread costs more than it saves.
constexpr int64_t kRowsPerItem = 4096;

template <typename T>
void Rows(const std::vector<TabularInput>& inputs, const TabularSpec& spec, int64_t width,
          int64_t begin, int64_t end, T* out) {
  const size_t count = spec.columns.size();
  for (int64_t r = begin; r < end; ++r) {
    T* row = out + r * width;
    for (size_t c = 0; c < count; ++c) {
      const TabularColumn& column = spec.columns[c];
      if (column.kind == TabularColumn::Kind::kNumber) {
        double value = inputs[c].numbers[r];
        if (std::isnan(value)) value = column.fill;
        *row++ = static_cast<T>((value - column.shift) * column.scale);
        continue;
      }
      int64_t code = inputs[c].codes[r];
      if (code == kMissingCode) code = column.fill_code;
      if (column.kind == TabularColumn::Kind::kIndex) {
        *row++ = static_cast<T>(code >= 0 ? static_cast<double>(code) : column.unknown_value);
        continue;
      }
      std::fill(row, row + column.width, T{0});
      if (code >= 0 && code < column.width) row[code] = T{1};
      row += column.width;
    }
  }
}

}  // namespace

int64_t CheckTabularSpec(const TabularSpec& spec) {
  if (spec.columns.empty()) throw std::invalid_argument("a tabular pipeline needs a column");
  int64_t width = 0;
  for (size_t c = 0; c < spec.columns.size(); ++c) {
    const TabularColumn& column = spec.columns[c];
    const std::string where = "column " + std::to_string(c) + ": ";
    if (column.width < 1) throw std::invalid_argument(where + "width must be >= 1");
    if (column.kind != TabularColumn::Kind::kOneHot && column.width != 1) {
      throw std::invalid_argument(where + "only one-hot columns are wider than 1");
    }
    if (!std::isfinite(column.shift) || !std::isfinite(column.scale)) {
      throw std::invalid_argument(where + "shift and scale must be finite");
    }
    if (column.kind == TabularColumn::Kind::kOneHot && column.fill_code >= column.width) {
      throw std::invalid_argument(where + "the fill code is outside the vocabulary");
    }
    width += column.width;
  }
  return width;
}

void PreprocessTabular(const std::vector<TabularInput>& inputs, int64_t rows,
                       const TabularSpec& spec, void* out, int threads) {
  const int64_t width = CheckTabularSpec(spec);
  if (inputs.size() != spec.columns.size()) {
    throw std::invalid_argument("one input per column is needed");
  }
  for (size_t c = 0; c < inputs.size(); ++c) {
    const bool number = spec.columns[c].kind == TabularColumn::Kind::kNumber;
    if (rows > 0 && (number ? inputs[c].numbers == nullptr : inputs[c].codes == nullptr)) {
      throw std::invalid_argument("column " + std::to_string(c) + " has no values");
    }
  }
  const int64_t items = (rows + kRowsPerItem - 1) / kRowsPerItem;
  ParallelFor(items, threads, [&](int64_t item) {
    const int64_t begin = item * kRowsPerItem;
    const int64_t end = std::min(begin + kRowsPerItem, rows);
    if (spec.fp64) {
      Rows(inputs, spec, width, begin, end, static_cast<double*>(out));
    } else {
      Rows(inputs, spec, width, begin, end, static_cast<float*>(out));
    }
  });
}

}  // namespace fastserve
