#include "fastserve/bounds.h"

namespace fastserve {

template <typename T>
bool WithinBounds(const T* batch, int64_t rows, int64_t width, const T* lower, const T* upper) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = batch + r * width;
    // no early exit inside a row, and an integer to collect into, so that the compiler
    // vectorizes the row; `!(a <= b)` is true for a NaN, as every comparison with NaN is false
    unsigned outside = 0;
    for (int64_t c = 0; c < width; ++c) {
      outside |= static_cast<unsigned>(!(lower[c] <= row[c])) |
                 static_cast<unsigned>(!(row[c] <= upper[c]));
    }
    if (outside != 0) {
      return false;
    }
  }
  return true;
}

template bool WithinBounds<float>(const float*, int64_t, int64_t, const float*, const float*);
template bool WithinBounds<double>(const double*, int64_t, int64_t, const double*, const double*);

}  // namespace fastserve
