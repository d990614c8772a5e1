#include "fastserve/tensor.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

namespace fastserve {
namespace {

struct DTypeInfo {
  const char* name;
  size_t itemsize;
};

constexpr DTypeInfo kDTypes[kNumDTypes] = {
    {"bool", 1},    {"int8", 1},    {"int16", 2},     {"int32", 4},       {"int64", 8},
    {"uint8", 1},   {"uint16", 2},  {"uint32", 4},    {"uint64", 8},      {"float16", 2},
    {"float32", 4}, {"float64", 8}, {"complex64", 8}, {"complex128", 16},
};

template <typename T>
void Fill(T value, void* dst, int64_t count) {
  T* out = static_cast<T*>(dst);
  std::fill(out, out + count, value);
}

template <typename T>
bool FitsInteger(double value) {
  // The limits as doubles: the upper one of 64-bit types rounds up, hence the strict test.
  return value == std::floor(value) &&
         value >= static_cast<double>(std::numeric_limits<T>::min()) &&
         value < static_cast<double>(std::numeric_limits<T>::max()) + 1.0;
}

}  // namespace

size_t ItemSize(DType dtype) { return kDTypes[static_cast<size_t>(dtype)].itemsize; }

const char* DTypeName(DType dtype) { return kDTypes[static_cast<size_t>(dtype)].name; }

bool ParseDType(std::string_view name, DType* dtype) {
  for (size_t i = 0; i < kNumDTypes; ++i) {
    if (name == kDTypes[i].name) {
      *dtype = static_cast<DType>(i);
      return true;
    }
  }
  return false;
}

int64_t ElementCount(const int64_t* dims, size_t rank) {
  int64_t n = 1;
  for (size_t i = 0; i < rank; ++i) {
    if (dims[i] < 0 || __builtin_mul_overflow(n, dims[i], &n)) return -1;
  }
  return n;
}

int64_t RowBytes(DType dtype, const int64_t* dims, size_t rank) {
  if (rank == 0) return -1;
  int64_t n = ElementCount(dims + 1, rank - 1);
  if (n < 0 || __builtin_mul_overflow(n, static_cast<int64_t>(ItemSize(dtype)), &n)) return -1;
  return n;
}

void FreeDeleter::operator()(void* p) const noexcept { std::free(p); }

UniqueBuffer AllocateBuffer(size_t bytes) {
  size_t size = AlignUp(bytes == 0 ? 1 : bytes);
  void* p = std::aligned_alloc(kBufferAlignment, size);
  if (p == nullptr) throw std::bad_alloc();
  return UniqueBuffer(static_cast<uint8_t*>(p));
}

std::string ShapeToString(const int64_t* dims, size_t rank) {
  std::string s = "(";
  for (size_t i = 0; i < rank; ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(dims[i]);
  }
  if (rank == 1) s += ",";
  s += ")";
  return s;
}

uint16_t FloatToHalf(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const auto sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  uint32_t abs = bits & 0x7fffffffu;
  if (abs >= 0x47800000u) {  // >= 65536 (rounds to infinity), infinity or NaN
    return sign | (abs > 0x7f800000u ? 0x7e00u : 0x7c00u);
  }
  if (abs < 0x38800000u) {  // below 2^-14, the smallest normal half: subnormal or zero
    // Adding 0.5 makes the float unit round the value to a multiple of 2^-24 (a half
    // subnormal's step), to nearest even; the low mantissa bits are then the half's bits.
    constexpr uint32_t kHalf = 0x3f000000u;  // 0.5f
    float magnitude, magic;
    std::memcpy(&magnitude, &abs, sizeof magnitude);
    std::memcpy(&magic, &kHalf, sizeof magic);
    magnitude += magic;
    uint32_t sum;
    std::memcpy(&sum, &magnitude, sizeof sum);
    return sign | static_cast<uint16_t>(sum - kHalf);
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even (a
  // carry into the exponent is right, up to infinity for values from 65520).
  const uint32_t odd = (abs >> 13) & 1u;
  abs += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + odd;
  return sign | static_cast<uint16_t>(abs >> 13);
}

bool FitsDType(DType dtype, double value) {
  switch (dtype) {
    case DType::kBool:
      return value == 0.0 || value == 1.0;
    case DType::kInt8:
      return FitsInteger<int8_t>(value);
    case DType::kInt16:
      return FitsInteger<int16_t>(value);
    case DType::kInt32:
      return FitsInteger<int32_t>(value);
    case DType::kInt64:
      return FitsInteger<int64_t>(value);
    case DType::kUInt8:
      return FitsInteger<uint8_t>(value);
    case DType::kUInt16:
      return FitsInteger<uint16_t>(value);
    case DType::kUInt32:
      return FitsInteger<uint32_t>(value);
    case DType::kUInt64:
      return FitsInteger<uint64_t>(value);
    case DType::kFloat16:
    case DType::kFloat32:
    case DType::kFloat64:
      return true;
    case DType::kComplex64:
    case DType::kComplex128:
      return false;
  }
  return false;
}

void FillElements(DType dtype, double value, void* dst, int64_t count) {
  if (count <= 0) return;
  switch (dtype) {
    case DType::kBool:
    case DType::kUInt8:
      return Fill(static_cast<uint8_t>(value), dst, count);
    case DType::kInt8:
      return Fill(static_cast<int8_t>(value), dst, count);
    case DType::kInt16:
      return Fill(static_cast<int16_t>(value), dst, count);
    case DType::kInt32:
      return Fill(static_cast<int32_t>(value), dst, count);
    case DType::kInt64:
      return Fill(static_cast<int64_t>(value), dst, count);
    case DType::kUInt16:
      return Fill(static_cast<uint16_t>(value), dst, count);
    case DType::kUInt32:
      return Fill(static_cast<uint32_t>(value), dst, count);
    case DType::kUInt64:
      return Fill(static_cast<uint64_t>(value), dst, count);
    case DType::kFloat16:
      return Fill(FloatToHalf(static_cast<float>(value)), dst, count);
    case DType::kFloat32:
      return Fill(static_cast<float>(value), dst, count);
    case DType::kFloat64:
      return Fill(value, dst, count);
    case DType::kComplex64:
    case DType::kComplex128:
      std::memset(dst, 0, static_cast<size_t>(count) * ItemSize(dtype));
      return;
  }
}

}  // namespace fastserve
