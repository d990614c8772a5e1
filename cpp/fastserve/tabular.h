// Fused tabular preprocessing: feature columns (numbers, or category codes) -> the rows of a
// model's 2-D float input, scaled, filled and one-hot encoded in one pass per row, written
// straight into the output.
#ifndef FASTSERVE_TABULAR_H_
#define FASTSERVE_TABULAR_H_

#include <cstdint>
#include <vector>

namespace fastserve {

// Codes of a categorical column: a category's position in the vocabulary, or one of these.
constexpr int64_t kUnknownCode = -1;  // a value not in the vocabulary
constexpr int64_t kMissingCode = -2;  // no value

struct TabularColumn {
  enum class Kind : uint8_t {
    kNumber = 0,  // one output column: ((value, or fill when NaN) - shift) * scale
    kIndex = 1,   // one output column: the code (unknown: unknown_value)
    kOneHot = 2   // `width` output columns: 1 at the code, 0 elsewhere (unknown: all 0)
  };
  Kind kind = Kind::kNumber;
  double shift = 0.0;
  double scale = 1.0;
  double fill = 0.0;                 // kNumber: the value a NaN becomes
  int64_t width = 1;                 // output columns: kOneHot, the vocabulary's size; otherwise 1
  int64_t fill_code = kUnknownCode;  // categorical: the code a missing value becomes
  double unknown_value = -1.0;       // kIndex: what an unknown value is written as
};

struct TabularSpec {
  std::vector<TabularColumn> columns;  // in output order
  bool fp64 = false;                   // float64 output; false: float32
};

// Checks `spec` (widths >= 1, finite scales, fill codes within the vocabulary) and returns
// the output row's width; throws std::invalid_argument naming what is wrong.
int64_t CheckTabularSpec(const TabularSpec& spec);

// One input per column, `rows` values each: doubles for kNumber, int64 codes otherwise.
struct TabularInput {
  const double* numbers = nullptr;
  const int64_t* codes = nullptr;
};

// Writes rows x width values (float or double, as spec.fp64) into `out`, row-major, rows
// spread over `threads` threads (<= 0: the hardware's count) when there are enough.
void PreprocessTabular(const std::vector<TabularInput>& inputs, int64_t rows,
                       const TabularSpec& spec, void* out, int threads = 0);

}  // namespace fastserve

#endif  // FASTSERVE_TABULAR_H_
