// The fast path of a value schema: does every value of a [rows, width] float batch lie within
// its column's bounds? One pass, no temporary arrays; a NaN is outside every bound.
#ifndef FASTSERVE_BOUNDS_H_
#define FASTSERVE_BOUNDS_H_

#include <cstdint>

namespace fastserve {

// True when lower[c] <= x <= upper[c] for every element x of column c of the row-major
// batch (`rows` x `width`); false at the first element outside (or NaN). Columns with no
// bound have -inf / +inf there.
template <typename T>
bool WithinBounds(const T* batch, int64_t rows, int64_t width, const T* lower, const T* upper);

extern template bool WithinBounds<float>(const float*, int64_t, int64_t, const float*,
                                         const float*);
extern template bool WithinBounds<double>(const double*, int64_t, int64_t, const double*,
                                          const double*);

}  // namespace fastserve

#endif  // FASTSERVE_BOUNDS_H_
