#include "fastserve/tensor.h"

#include <cstdlib>
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

}  // namespace fastserve
