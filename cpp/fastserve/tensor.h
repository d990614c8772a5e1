// Element types, shapes and non-owning tensor views shared by the batcher and the binding.
#ifndef FASTSERVE_TENSOR_H_
#define FASTSERVE_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace fastserve {

// Element type codes. The names match numpy's dtype names.
enum class DType : uint8_t {
  kBool = 0,
  kInt8,
  kInt16,
  kInt32,
  kInt64,
  kUInt8,
  kUInt16,
  kUInt32,
  kUInt64,
  kFloat16,
  kFloat32,
  kFloat64,
  kComplex64,
  kComplex128,
};
inline constexpr size_t kNumDTypes = 14;

size_t ItemSize(DType dtype);
const char* DTypeName(DType dtype);
// Returns false for a name that is not one of DTypeName's.
bool ParseDType(std::string_view name, DType* dtype);

// Number of elements of `dims`, or -1 when a dim is negative or the product overflows.
int64_t ElementCount(const int64_t* dims, size_t rank);
// Bytes of one row (the product of dims[1:] times the item size), or -1 as above.
int64_t RowBytes(DType dtype, const int64_t* dims, size_t rank);

// Rounds up to a multiple of kBufferAlignment; every tensor inside a buffer starts aligned.
inline constexpr size_t kBufferAlignment = 64;
inline size_t AlignUp(size_t n) { return (n + kBufferAlignment - 1) & ~(kBufferAlignment - 1); }

// A non-owning view: `data` and `dims` must outlive it. dims[0] is the row count.
struct TensorView {
  const void* data = nullptr;
  DType dtype = DType::kFloat32;
  const int64_t* dims = nullptr;
  size_t rank = 0;

  int64_t rows() const { return rank > 0 ? dims[0] : 1; }
};

// A heap buffer aligned to kBufferAlignment, released with std::free.
struct FreeDeleter {
  void operator()(void* p) const noexcept;
};
using UniqueBuffer = std::unique_ptr<uint8_t[], FreeDeleter>;
// Never returns null (at least kBufferAlignment bytes); throws std::bad_alloc.
UniqueBuffer AllocateBuffer(size_t bytes);

// A tensor whose metadata it owns and whose bytes live in a buffer owned elsewhere.
struct Tensor {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  uint8_t* data = nullptr;
  size_t bytes = 0;

  TensorView view() const { return TensorView{data, dtype, shape.data(), shape.size()}; }
};

// Dtype and dims after the first of one input or output: what rows of it must agree on.
struct RowSignature {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> trailing_dims;
  size_t row_bytes = 0;

  bool operator==(const RowSignature& o) const {
    return dtype == o.dtype && trailing_dims == o.trailing_dims;
  }
};

std::string ShapeToString(const int64_t* dims, size_t rank);

// IEEE binary16 bits of `value`, rounded to nearest even; overflow gives infinity, NaN stays
// NaN (quiet). Portable: compilers without a half type use it too.
uint16_t FloatToHalf(float value);

// Whether `value` is exactly an element of `dtype` (integers: whole and in range; bool: 0 or
// 1; floats: any value, rounded; complex: never).
bool FitsDType(DType dtype, double value);
// Writes `count` elements of `dtype`, each `value` (which FitsDType), from `dst` on.
void FillElements(DType dtype, double value, void* dst, int64_t count);

}  // namespace fastserve

#endif  // FASTSERVE_TENSOR_H_
