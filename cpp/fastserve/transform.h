// Input transforms: what turns a request's raw input into its rows of a batch tensor while
// the batcher gathers the batch (images of any size into a model's normalized tensor).
#ifndef FASTSERVE_TRANSFORM_H_
#define FASTSERVE_TRANSFORM_H_

#include <string>

#include "fastserve/tensor.h"

namespace fastserve {

class InputTransform {
 public:
  virtual ~InputTransform() = default;
  // Requests whose input has this dtype are transformed; others pass as they are, batched
  // with the transformed ones when their rows have output()'s shape.
  virtual DType source_dtype() const = 0;
  // The rows Apply writes: dtype, dims after the first, bytes.
  virtual const RowSignature& output() const = 0;
  // At submit: "" when `input` can be transformed, else what is wrong with it.
  virtual std::string Check(const TensorView& input) const = 0;
  // Writes input.dims[0] rows into `out` (that many output().row_bytes). Called while a batch
  // is gathered, outside the batcher's lock, from one thread at a time per batch.
  virtual void Apply(const TensorView& input, void* out) const = 0;
};

}  // namespace fastserve

#endif  // FASTSERVE_TRANSFORM_H_
