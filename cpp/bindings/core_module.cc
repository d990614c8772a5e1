// fastserve._core: the Python face of the C++ batcher (see notes/core_api.md for the contract).
//
// Boundary rules: numpy buffers are read with the GIL held; waiting, gathering and large copies
// run with it released. C++ worker paths never touch a Python object: the arrays of each
// request are kept alive by a side table in PyBatcher, touched only with the GIL held (in
// submit and poll), until poll() has returned that request's completion.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "fastserve/batch_policy.h"
#include "fastserve/batcher.h"
#include "fastserve/bounds.h"
#include "fastserve/cuda_info.h"
#include "fastserve/drift.h"
#include "fastserve/preprocess.h"
#include "fastserve/preprocess_cuda.h"
#include "fastserve/tabular.h"
#include "fastserve/tensor.h"
#include "v2_json.h"

namespace py = pybind11;

namespace fastserve {
namespace {

// Thrown in the binding, translated to the Python exceptions of the same names.
struct BatcherError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct QueueFullError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct StoppedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// complete() copies with the GIL held below this: a short copy is cheaper than handing the GIL
// to the event loop and waiting (up to the switch interval) to get it back.
constexpr size_t kReleaseGilCopyBytes = size_t{1} << 20;

// Interned Python objects created once at import and never freed (safe at interpreter exit).
PyObject* g_dtypes[kNumDTypes];
PyObject* g_status_names[kNumCompletionStatuses];  // by CompletionStatus
PyObject* g_reason_names[kNumReleaseReasons];      // by ReleaseReason

py::handle DTypeObject(DType dtype) { return g_dtypes[static_cast<size_t>(dtype)]; }

constexpr bool kLittleEndian = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;

// Maps a numpy dtype to a DType; returns an error message when it has none.
const char* FromNumpyDType(const py::dtype& dt, DType* out) {
  const char byteorder = dt.byteorder();
  if ((kLittleEndian && byteorder == '>') || (!kLittleEndian && byteorder == '<')) {
    return "has non-native byte order";
  }
  const py::ssize_t size = dt.itemsize();
  switch (dt.kind()) {
    case 'b':
      if (size == 1) return *out = DType::kBool, nullptr;
      break;
    case 'i':
      if (size == 1) return *out = DType::kInt8, nullptr;
      if (size == 2) return *out = DType::kInt16, nullptr;
      if (size == 4) return *out = DType::kInt32, nullptr;
      if (size == 8) return *out = DType::kInt64, nullptr;
      break;
    case 'u':
      if (size == 1) return *out = DType::kUInt8, nullptr;
      if (size == 2) return *out = DType::kUInt16, nullptr;
      if (size == 4) return *out = DType::kUInt32, nullptr;
      if (size == 8) return *out = DType::kUInt64, nullptr;
      break;
    case 'f':
      if (size == 2) return *out = DType::kFloat16, nullptr;
      if (size == 4) return *out = DType::kFloat32, nullptr;
      if (size == 8) return *out = DType::kFloat64, nullptr;
      break;
    case 'c':
      if (size == 8) return *out = DType::kComplex64, nullptr;
      if (size == 16) return *out = DType::kComplex128, nullptr;
      break;
    default:
      break;
  }
  return "has an unsupported dtype (numeric or bool only)";
}

std::string DTypeStr(const py::dtype& dt) { return py::str(static_cast<const py::handle&>(dt)); }

// numpy's shape type is Py_ssize_t; the core uses int64_t. They are one type on LP64 Linux.
const int64_t* DimsOf(const py::array& arr, std::vector<int64_t>* storage) {
  if constexpr (std::is_same_v<py::ssize_t, int64_t>) {
    (void)storage;
    return arr.shape();
  } else {
    storage->assign(arr.shape(), arr.shape() + arr.ndim());
    return storage->data();
  }
}

// A borrowed list or tuple as a fast sequence.
py::sequence AsListOrTuple(py::handle obj, const char* what) {
  if (!PyList_Check(obj.ptr()) && !PyTuple_Check(obj.ptr())) {
    throw py::value_error(std::string(what) + " must be a list (or tuple) of numpy arrays, got " +
                          std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
  return py::reinterpret_borrow<py::sequence>(obj);
}

py::capsule OwnerCapsule(std::shared_ptr<uint8_t> buffer) {
  auto* holder = new std::shared_ptr<uint8_t>(std::move(buffer));
  return py::capsule(holder, [](void* p) { delete static_cast<std::shared_ptr<uint8_t>*>(p); });
}

// ---------------------------------------------------------------------------------------------

class PyBatch {
 public:
  explicit PyBatch(std::unique_ptr<Batch> batch) : batch_(std::move(batch)) {}

  uint64_t id() const { return batch_->id(); }
  int64_t rows() const { return batch_->rows(); }
  py::object reason() const {
    return py::reinterpret_borrow<py::object>(g_reason_names[static_cast<int>(batch_->reason())]);
  }
  py::list request_ids() const {
    return Column([](const BatchRequest& r) { return r.id; });
  }
  py::list request_rows() const {
    return Column([](const BatchRequest& r) { return r.rows; });
  }
  py::list queue_wait_ns() const {
    return Column([](const BatchRequest& r) { return r.queue_wait_ns; });
  }

  py::list inputs() {
    if (!inputs_) {
      py::capsule owner = OwnerCapsule(batch_->input_buffer());
      py::list list(batch_->inputs().size());
      size_t i = 0;
      for (const Tensor& t : batch_->inputs()) {
        std::vector<py::ssize_t> shape(t.shape.begin(), t.shape.end());
        list[i++] = py::array(py::reinterpret_borrow<py::dtype>(DTypeObject(t.dtype)),
                              std::move(shape), t.data, owner);
      }
      inputs_ = std::move(list);
    }
    return py::reinterpret_borrow<py::list>(inputs_);
  }

  void Complete(py::handle outputs_obj) {
    if (batch_->finished()) throw BatcherError(AlreadyFinished());
    std::vector<py::array> arrays;
    std::vector<TensorView> views;
    std::vector<std::vector<int64_t>> dims;
    try {
      py::sequence outputs = AsListOrTuple(outputs_obj, "outputs");
      const size_t n = py::len(outputs);
      arrays.reserve(n);
      views.resize(n);
      dims.resize(n);
      for (size_t k = 0; k < n; ++k) {
        py::handle item = outputs[k];
        // Copies (contiguity, casts) are fine here: they are done before this call returns.
        py::array arr = py::array::ensure(item, py::array::c_style);
        if (!arr) {
          throw py::value_error("output " + std::to_string(k) + " is not convertible to an array");
        }
        DType dtype;
        if (const char* problem = FromNumpyDType(arr.dtype(), &dtype)) {
          if (std::string(problem) == "has non-native byte order") {
            arr = py::array::ensure(arr.attr("astype")(arr.dtype().attr("newbyteorder")("=")),
                                    py::array::c_style);
            problem = arr ? FromNumpyDType(arr.dtype(), &dtype) : problem;
          }
          if (problem != nullptr) {
            throw py::value_error("output " + std::to_string(k) + " " + problem + " (" +
                                  DTypeStr(arr.dtype()) + ")");
          }
        }
        dims[k].assign(arr.shape(), arr.shape() + arr.ndim());
        views[k] = TensorView{arr.data(), dtype, dims[k].data(), dims[k].size()};
        arrays.push_back(std::move(arr));
      }
    } catch (py::value_error& e) {
      batch_->Fail(e.what());
      throw;
    } catch (py::error_already_set& e) {
      // e.g. astype failing: the batch must not stay pending.
      batch_->Fail(e.what());
      throw;
    }
    std::string error;
    Batch::Result result;
    if (Batch::OutputBytes(views.data(), views.size()) >= kReleaseGilCopyBytes) {
      py::gil_scoped_release nogil;
      result = batch_->Complete(views.data(), views.size(), &error);
    } else {
      result = batch_->Complete(views.data(), views.size(), &error);
    }
    switch (result) {
      case Batch::Result::kOk:
        return;
      case Batch::Result::kInvalid:
        throw py::value_error(error);
      case Batch::Result::kFinished:
        throw BatcherError(AlreadyFinished());
      case Batch::Result::kFailed:
        throw BatcherError(error);
    }
  }

  // A no-op when the batch is already finished, so that `except: batch.fail(...)` is safe.
  void Fail(const std::string& message) { batch_->Fail(message); }

  std::string Repr() const {
    return "<Batch id=" + std::to_string(batch_->id()) + " rows=" + std::to_string(batch_->rows()) +
           " requests=" + std::to_string(batch_->requests().size()) +
           " reason=" + ReleaseReasonName(batch_->reason()) + ">";
  }

 private:
  template <typename F>
  py::list Column(F f) const {
    const auto& requests = batch_->requests();
    py::list list(requests.size());
    for (size_t j = 0; j < requests.size(); ++j) {
      list[j] = py::reinterpret_steal<py::object>(PyLong_FromLongLong(f(requests[j])));
    }
    return list;
  }
  std::string AlreadyFinished() const {
    return "batch " + std::to_string(batch_->id()) + " was already completed or failed";
  }

  std::unique_ptr<Batch> batch_;
  py::object inputs_;  // cached Batch.inputs
};

struct PyCompletion {
  uint64_t id = 0;
  py::object status;
  std::string error;
  py::list outputs;
  int64_t queue_ns = 0;
  int64_t compute_ns = 0;
  uint64_t batch_id = 0;
  int64_t batch_rows = 0;

  std::string Repr() const {
    return "<Completion id=" + std::to_string(id) + " status=" + std::string(py::str(status)) +
           " outputs=" + std::to_string(py::len(outputs)) + ">";
  }
};

// Transforms by input index, as the core takes them (nullptr where none).
InputTransforms ByIndex(const std::map<int64_t, std::shared_ptr<ImageTransform>>& transforms) {
  InputTransforms out;
  for (const auto& [index, transform] : transforms) {
    if (index < 0 || index > 1024) throw py::value_error("transforms are keyed by input index");
    if (transform == nullptr) throw py::value_error("a transform is None");
    if (out.size() <= static_cast<size_t>(index)) out.resize(static_cast<size_t>(index) + 1);
    out[static_cast<size_t>(index)] = transform;
  }
  return out;
}

class PyBatcher {
 public:
  PyBatcher(const BatchPolicy& policy, const std::optional<RaggedSpec>& ragged,
            const std::map<int64_t, std::shared_ptr<ImageTransform>>& transforms)
      : core_(Batcher::Create(policy, ragged.value_or(RaggedSpec{}), ByIndex(transforms))),
        transformed_(!transforms.empty()) {
    keep_.reserve(static_cast<size_t>(std::min<int64_t>(policy.max_queue_size, 1 << 16)));
  }
  PyBatcher(const PyBatcher&) = delete;
  PyBatcher& operator=(const PyBatcher&) = delete;
  ~PyBatcher() {
    // Runs with the GIL held (from the Python object's deallocation).
    for (auto& entry : keep_) Py_DECREF(entry.second);
  }

  uint64_t Submit(py::handle inputs_obj, int64_t priority, int64_t timeout_us,
                  bool release_queued) {
    py::sequence inputs = AsListOrTuple(inputs_obj, "inputs");
    PyObject* seq = inputs.ptr();
    const bool is_list = PyList_Check(seq);
    const size_t n = static_cast<size_t>(is_list ? PyList_GET_SIZE(seq) : PyTuple_GET_SIZE(seq));
    thread_local std::vector<TensorView> views;
    thread_local std::vector<std::vector<int64_t>> dims_storage;
    views.resize(n);
    if (dims_storage.size() < n) dims_storage.resize(n);
    for (size_t i = 0; i < n; ++i) {
      PyObject* item = is_list ? PyList_GET_ITEM(seq, i) : PyTuple_GET_ITEM(seq, i);
      if (!py::isinstance<py::array>(item)) {
        throw py::value_error("input " + std::to_string(i) + " must be a numpy.ndarray, got " +
                              std::string(py::str(Py_TYPE(item)->tp_name)));
      }
      py::array arr = py::reinterpret_borrow<py::array>(item);
      // No copy is made: the core reads this memory later, so it must be usable as it is.
      if (!(arr.flags() & py::array::c_style)) {
        throw py::value_error("input " + std::to_string(i) +
                              " is not C-contiguous (use numpy.ascontiguousarray)");
      }
      DType dtype;
      if (const char* problem = FromNumpyDType(arr.dtype(), &dtype)) {
        throw py::value_error("input " + std::to_string(i) + " " + problem + " (" +
                              DTypeStr(arr.dtype()) + ")");
      }
      if (arr.ndim() < 1) {
        throw py::value_error("input " + std::to_string(i) + " needs rank >= 1 (rows first)");
      }
      views[i] = TensorView{arr.data(), dtype, DimsOf(arr, &dims_storage[i]),
                            static_cast<size_t>(arr.ndim())};
    }
    // Keep the arrays (not a list the caller may still mutate) until poll() returns this id.
    // Made before submitting so that nothing can fail once the request is queued.
    PyObject* keep;
    if (n == 1) {
      keep = is_list ? PyList_GET_ITEM(seq, 0) : PyTuple_GET_ITEM(seq, 0);
      Py_INCREF(keep);
    } else if (!is_list) {
      keep = seq;
      Py_INCREF(keep);
    } else {
      keep = PyList_AsTuple(seq);
      if (keep == nullptr) throw py::error_already_set();
    }
    SubmitResult r = core_->Submit(views.data(), n, priority, timeout_us, release_queued);
    if (r.code != SubmitCode::kOk) Py_DECREF(keep);
    switch (r.code) {
      case SubmitCode::kOk:
        break;
      case SubmitCode::kQueueFull:
        throw QueueFullError(
            "queue full (max_queue_size=" + std::to_string(core_->policy().max_queue_size) + ")");
      case SubmitCode::kStopped:
        throw StoppedError("batcher is stopped");
      case SubmitCode::kInvalid:
        throw py::value_error(r.error);
    }
    try {
      keep_.emplace(r.id, keep);
    } catch (...) {
      // Out of memory: the request is queued, so its arrays must never be freed; leak them.
    }
    return r.id;
  }

  py::object NextBatch() {
    std::unique_ptr<Batch> batch;
    {
      py::gil_scoped_release nogil;
      batch = core_->NextBatch();
    }
    return Wrap(std::move(batch));
  }

  // The event loop is the worker: the GIL stays held (nothing else would run meanwhile).
  py::object TryNextBatch() {
    if (!transformed_) return Wrap(core_->TryNextBatch());
    // Gathering may transform images: let the other threads (decoders) run meanwhile.
    std::unique_ptr<Batch> batch;
    {
      py::gil_scoped_release release;
      batch = core_->TryNextBatch();
    }
    return Wrap(std::move(batch));
  }

  py::list Poll(int64_t timeout_ms) {
    std::vector<Completion> items;
    if (!carry_.empty()) {
      items.swap(carry_);  // left over from a poll that failed half-way
    } else if (timeout_ms > 0) {
      py::gil_scoped_release nogil;
      core_->Poll(&items, timeout_ms);
    } else {
      core_->Poll(&items, 0);
    }
    py::list result(items.size());
    size_t i = 0;
    try {
      for (; i < items.size(); ++i) {
        result[i] = MakeCompletion(&items[i]);
        auto keep = keep_.find(items[i].id);
        if (keep != keep_.end()) {
          Py_DECREF(keep->second);
          keep_.erase(keep);
        }
      }
    } catch (...) {
      // Each completion is returned exactly once: keep the rest for the next poll.
      carry_.assign(std::make_move_iterator(items.begin() + i),
                    std::make_move_iterator(items.end()));
      throw;
    }
    return result;
  }

  int notify_fd() const { return core_->notify_fd(); }
  int ready_fd() const { return core_->ready_fd(); }
  void Stop() { core_->Stop(); }
  void Hold(int64_t n) {
    if (n < 0) throw py::value_error("hold(n) needs n >= 0");
    core_->Hold(n);
  }
  int64_t queue_depth() const { return core_->queue_depth(); }
  const BatchPolicy& policy() const { return core_->policy(); }

  py::dict Stats() const {
    BatcherStats s = core_->stats();
    py::dict d;
    d["submitted"] = s.submitted;
    d["rejected_full"] = s.rejected_full;
    d["rejected_stopped"] = s.rejected_stopped;
    d["timed_out"] = s.timed_out;
    d["completed"] = s.completed;
    d["failed"] = s.failed;
    d["batches"] = s.batches;
    d["rows"] = s.rows;
    d["batches_full"] = s.batches_full;
    d["batches_preferred"] = s.batches_preferred;
    d["batches_delay"] = s.batches_delay;
    d["batches_drain"] = s.batches_drain;
    d["batches_idle"] = s.batches_idle;
    return d;
  }

 private:
  std::shared_ptr<Batcher> core_;
  bool transformed_ = false;  // it has input transforms: gathering may take a while
  // request id -> strong reference to its input arrays; GIL must be held.
  std::unordered_map<uint64_t, PyObject*> keep_;
  std::vector<Completion> carry_;  // GIL must be held

  static py::object Wrap(std::unique_ptr<Batch> batch) {
    if (!batch) return py::none();
    return py::cast(new PyBatch(std::move(batch)), py::return_value_policy::take_ownership);
  }

  static py::object MakeCompletion(Completion* c) {
    if (c->num_outputs() > 0 && !c->data) {
      // Its buffer went to a capsule in a poll that then failed (out of memory).
      c->status = CompletionStatus::kError;
      c->error = "out of memory while returning the outputs";
      c->layout.reset();
    }
    auto* pc = new PyCompletion();
    py::object obj = py::cast(pc, py::return_value_policy::take_ownership);
    pc->id = c->id;
    pc->status = py::reinterpret_borrow<py::object>(g_status_names[static_cast<int>(c->status)]);
    pc->error = c->error;
    pc->queue_ns = c->queue_ns;
    pc->compute_ns = c->compute_ns;
    pc->batch_id = c->batch_id;
    pc->batch_rows = c->batch_rows;
    const size_t n_out = c->num_outputs();
    pc->outputs = py::list(n_out);
    if (n_out > 0) {
      const OutputLayout& layout = *c->layout;
      uint8_t* base = c->data.get();
      py::capsule owner(base, [](void* p) { std::free(p); });
      c->data.release();  // the capsule frees it now
      size_t offset = 0;
      for (size_t k = 0; k < n_out; ++k) {
        const RowSignature& sig = layout.outputs[k];
        std::vector<py::ssize_t> shape;
        shape.reserve(sig.trailing_dims.size() + 1);
        shape.push_back(c->rows);
        shape.insert(shape.end(), sig.trailing_dims.begin(), sig.trailing_dims.end());
        pc->outputs[k] = py::array(py::reinterpret_borrow<py::dtype>(DTypeObject(sig.dtype)),
                                   std::move(shape), base + offset, owner);
        offset += AlignUp(c->output_bytes(k));
      }
    }
    return obj;
  }
};

// DriftSketch.update: a 2-D float32/float64 array whose rows may be strided (a column slice
// of a wider tensor) but whose elements within a row are contiguous.
template <typename T>
void UpdateSketch(DriftSketch& sketch, const py::array& arr) {
  const int64_t rows = arr.shape(0), cols = arr.shape(1);
  if (cols > 1 && arr.strides(1) != static_cast<py::ssize_t>(sizeof(T))) {
    throw py::value_error("drift sketch: a row's values must be contiguous");
  }
  if (arr.strides(0) % static_cast<py::ssize_t>(sizeof(T)) != 0) {
    throw py::value_error("drift sketch: rows must be aligned to the element size");
  }
  const int64_t stride = rows > 1 ? arr.strides(0) / static_cast<py::ssize_t>(sizeof(T)) : cols;
  const T* data = static_cast<const T*>(arr.data());
  if (rows * cols > 4096) {
    py::gil_scoped_release release;
    sketch.Update(data, rows, cols, stride);
  } else {
    sketch.Update(data, rows, cols, stride);
  }
}

}  // namespace
// The checked ImageSpec of the binding's arguments (ValueError naming what is wrong).
ImageSpec MakeImageSpec(int64_t out_h, int64_t out_w, std::vector<float> mean,
                        std::vector<float> std, const std::string& aspect,
                        const std::string& layout, const std::string& dtype) {
  ImageSpec spec;
  spec.out_h = out_h;
  spec.out_w = out_w;
  spec.mean = std::move(mean);
  spec.std = std::move(std);
  spec.channels = static_cast<int64_t>(spec.mean.size());
  if (aspect == "stretch") {
    spec.aspect = Aspect::kStretch;
  } else if (aspect == "shorter_side") {
    spec.aspect = Aspect::kShorterSide;
  } else {
    throw py::value_error("aspect must be 'stretch' or 'shorter_side'");
  }
  if (layout != "chw" && layout != "hwc") throw py::value_error("layout must be chw or hwc");
  spec.chw = layout == "chw";
  if (dtype != "float32" && dtype != "float16") {
    throw py::value_error("dtype must be float32 or float16");
  }
  spec.fp16 = dtype == "float16";
  CheckImageSpec(spec);
  return spec;
}

// Images from Python as the kernels read them: C-contiguous uint8 [h, w(, channels)] views,
// each array held (copied only when it is not one already).
struct HeldImages {
  HeldImages(const py::list& images, int64_t channels_wanted) {
    arrays.reserve(images.size());
    views.reserve(images.size());
    for (const py::handle& item : images) {
      py::array arr = py::array::ensure(item);
      if (!arr || !arr.dtype().equal(py::dtype::of<uint8_t>())) {
        throw py::value_error("images must be uint8 arrays");
      }
      const int64_t channels = arr.ndim() == 2 ? 1 : (arr.ndim() == 3 ? arr.shape(2) : -1);
      if (channels != channels_wanted) {
        throw py::value_error(
            "each image must be [height, width, channels] with one mean and std per channel");
      }
      arrays.emplace_back(py::array_t<uint8_t, py::array::c_style>::ensure(arr));
      const auto& image = arrays.back();
      views.push_back({image.data(), image.shape(0), image.shape(1), image.shape(1) * channels});
    }
  }
  std::vector<py::array_t<uint8_t, py::array::c_style>> arrays;
  std::vector<ImageView> views;
};

// An empty batch array for `count` images of `spec`: [N, C, H, W] or [N, H, W, C].
py::array BatchArray(const ImageSpec& spec, size_t count, const std::string& dtype) {
  std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(count)};
  if (spec.chw) {
    shape.insert(shape.end(), {spec.channels, spec.out_h, spec.out_w});
  } else {
    shape.insert(shape.end(), {spec.out_h, spec.out_w, spec.channels});
  }
  return py::array(py::dtype(dtype), shape);
}

// The CUDA image pipeline for Python: a device batch (its pointer), or a host copy of it.
class PyCudaImagePipeline {
 public:
  PyCudaImagePipeline(ImageSpec spec, std::string dtype, int device)
      : pipeline_(std::move(spec), device), dtype_(std::move(dtype)) {}

  uintptr_t Run(const py::list& images) {
    HeldImages held(images, pipeline_.spec().channels);
    py::gil_scoped_release release;
    return reinterpret_cast<uintptr_t>(pipeline_.Run(held.views));
  }

  py::array RunToHost(const py::list& images) {
    HeldImages held(images, pipeline_.spec().channels);
    py::array out = BatchArray(pipeline_.spec(), held.views.size(), dtype_);
    void* dst = out.mutable_data();
    const size_t bytes = static_cast<size_t>(out.nbytes());
    {
      py::gil_scoped_release release;
      pipeline_.Run(held.views);
      if (bytes > 0) pipeline_.CopyOut(dst, bytes);
    }
    return out;
  }

 private:
  CudaImagePipeline pipeline_;
  std::string dtype_;
};

// A float array of `size`-byte elements in the machine's byte order (numpy may describe the
// same type by several dtype objects: '<f4' and float32, say).
bool IsNativeFloat(const py::array& a, py::ssize_t size) {
  const py::dtype dtype = a.dtype();
  return dtype.kind() == 'f' && dtype.itemsize() == size && dtype.attr("isnative").cast<bool>();
}

// WithinBounds on a C-contiguous [rows, width] float32 or float64 batch, with bound rows of
// its dtype; the GIL is released for a large batch.
template <typename T>
bool BatchWithinBounds(const py::array& batch, const py::array& lower, const py::array& upper) {
  const auto width = static_cast<int64_t>(batch.shape(1));
  const auto size = static_cast<py::ssize_t>(sizeof(T));
  if (lower.ndim() != 1 || upper.ndim() != 1 || lower.shape(0) != width ||
      upper.shape(0) != width || !IsNativeFloat(lower, size) || !IsNativeFloat(upper, size)) {
    throw py::value_error(
        "within_bounds: lower and upper need one value per column, in the batch's dtype");
  }
  const auto rows = static_cast<int64_t>(batch.shape(0));
  const auto* data = static_cast<const T*>(batch.data());
  const auto* lo = static_cast<const T*>(lower.data());
  const auto* hi = static_cast<const T*>(upper.data());
  if (static_cast<size_t>(batch.nbytes()) >= kReleaseGilCopyBytes) {
    py::gil_scoped_release nogil;
    return WithinBounds(data, rows, width, lo, hi);
  }
  return WithinBounds(data, rows, width, lo, hi);
}

bool PyWithinBounds(const py::array& batch, const py::array& lower, const py::array& upper) {
  if (batch.ndim() != 2 || !(batch.flags() & py::array::c_style) ||
      !(lower.flags() & py::array::c_style) || !(upper.flags() & py::array::c_style)) {
    throw py::value_error("within_bounds: a C-contiguous 2-D batch and 1-D bounds");
  }
  if (IsNativeFloat(batch, 4)) {
    return BatchWithinBounds<float>(batch, lower, upper);
  }
  if (IsNativeFloat(batch, 8)) {
    return BatchWithinBounds<double>(batch, lower, upper);
  }
  throw py::value_error("within_bounds: the batch must be float32 or float64, native order");
}

// A checked TabularSpec and its output width, built once per model version.
class PyTabularKernel {
 public:
  PyTabularKernel(const std::vector<std::string>& kinds, const std::vector<double>& shifts,
                  const std::vector<double>& scales, const std::vector<double>& fills,
                  const std::vector<int64_t>& widths, const std::vector<int64_t>& fill_codes,
                  const std::vector<double>& unknown_values, const std::string& dtype) {
    const size_t n = kinds.size();
    if (shifts.size() != n || scales.size() != n || fills.size() != n || widths.size() != n ||
        fill_codes.size() != n || unknown_values.size() != n) {
      throw py::value_error("tabular kernel: every setting needs one value per column");
    }
    if (dtype != "float32" && dtype != "float64") {
      throw py::value_error("dtype must be float32 or float64");
    }
    spec_.fp64 = dtype == "float64";
    for (size_t c = 0; c < n; ++c) {
      TabularColumn column;
      if (kinds[c] == "number") {
        column.kind = TabularColumn::Kind::kNumber;
      } else if (kinds[c] == "index") {
        column.kind = TabularColumn::Kind::kIndex;
      } else if (kinds[c] == "onehot") {
        column.kind = TabularColumn::Kind::kOneHot;
      } else {
        throw py::value_error("column kinds are number, index or onehot");
      }
      column.shift = shifts[c];
      column.scale = scales[c];
      column.fill = fills[c];
      column.width = widths[c];
      column.fill_code = fill_codes[c];
      column.unknown_value = unknown_values[c];
      spec_.columns.push_back(column);
    }
    try {
      width_ = CheckTabularSpec(spec_);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }

  int64_t width() const { return width_; }

  py::array Run(const py::list& columns, int64_t rows, int threads) const {
    if (columns.size() != spec_.columns.size()) {
      throw py::value_error("tabular kernel: one array per column is needed");
    }
    if (rows < 0) throw py::value_error("rows must be >= 0");
    std::vector<py::array> held;
    std::vector<TabularInput> inputs(columns.size());
    held.reserve(columns.size());
    for (size_t c = 0; c < columns.size(); ++c) {
      const bool number = spec_.columns[c].kind == TabularColumn::Kind::kNumber;
      py::array arr = number
                          ? py::array(py::array_t<double, py::array::c_style>::ensure(columns[c]))
                          : py::array(py::array_t<int64_t, py::array::c_style>::ensure(columns[c]));
      if (!arr || arr.ndim() != 1 || arr.shape(0) != rows) {
        throw py::value_error("tabular kernel: column " + std::to_string(c) + " must be " +
                              (number ? "float64" : "int64") + " [rows]");
      }
      held.push_back(arr);
      if (number) {
        inputs[c].numbers = static_cast<const double*>(arr.data());
      } else {
        inputs[c].codes = static_cast<const int64_t*>(arr.data());
      }
    }
    py::array out(py::dtype(spec_.fp64 ? "float64" : "float32"),
                  std::vector<py::ssize_t>{static_cast<py::ssize_t>(rows), width_});
    void* dst = out.mutable_data();
    {
      py::gil_scoped_release release;
      PreprocessTabular(inputs, rows, spec_, dst, threads);
    }
    return out;
  }

 private:
  TabularSpec spec_;
  int64_t width_ = 0;
};

}  // namespace fastserve

PYBIND11_MODULE(_core, m) {
  using namespace fastserve;
  m.doc() = "fastserve native core: dynamic batcher (private; use the fastserve package)";

  for (size_t i = 0; i < kNumDTypes; ++i) {
    g_dtypes[i] = py::dtype(std::string(DTypeName(static_cast<DType>(i)))).release().ptr();
  }
  for (int i = 0; i < kNumCompletionStatuses; ++i) {
    const auto status = static_cast<CompletionStatus>(i);
    g_status_names[i] = py::str(CompletionStatusName(status)).release().ptr();
    PyUnicode_InternInPlace(&g_status_names[i]);
  }
  for (int r = 0; r < kNumReleaseReasons; ++r) {
    g_reason_names[r] = py::str(ReleaseReasonName(static_cast<ReleaseReason>(r))).release().ptr();
    PyUnicode_InternInPlace(&g_reason_names[r]);
  }

  auto& root = py::register_exception<BatcherError>(m, "BatcherError", PyExc_RuntimeError);
  py::register_exception<QueueFullError>(m, "QueueFull", root.ptr());
  py::register_exception<StoppedError>(m, "Stopped", root.ptr());

  m.def("cuda_built", &CudaBuilt, "True when compiled with CUDA.");
  m.def(
      "cuda_available", [] { return CudaBuilt() && CudaDeviceCount() > 0; },
      "True when compiled with CUDA and at least one CUDA device is visible now.");
  m.def("cuda_device_count", &CudaDeviceCount,
        "Visible CUDA devices (0 when not built with CUDA or without a driver/device).");

  py::class_<BatchPolicy>(m, "BatchPolicy")
      .def(py::init([](int64_t max_batch_size, std::vector<int64_t> preferred_batch_sizes,
                       int64_t max_queue_delay_us, int64_t max_queue_size,
                       int64_t default_timeout_us, int64_t priority_levels) {
             BatchPolicy p;
             p.max_batch_size = max_batch_size;
             p.preferred_batch_sizes = std::move(preferred_batch_sizes);
             p.max_queue_delay_us = max_queue_delay_us;
             p.max_queue_size = max_queue_size;
             p.default_timeout_us = default_timeout_us;
             p.priority_levels = priority_levels;
             p.Validate();  // std::invalid_argument -> ValueError
             return p;
           }),
           py::kw_only(), py::arg("max_batch_size"),
           py::arg("preferred_batch_sizes") = std::vector<int64_t>{},
           py::arg("max_queue_delay_us") = 0, py::arg("max_queue_size") = 1024,
           py::arg("default_timeout_us") = 0, py::arg("priority_levels") = 1)
      .def_readonly("max_batch_size", &BatchPolicy::max_batch_size)
      .def_readonly("preferred_batch_sizes", &BatchPolicy::preferred_batch_sizes)
      .def_readonly("max_queue_delay_us", &BatchPolicy::max_queue_delay_us)
      .def_readonly("max_queue_size", &BatchPolicy::max_queue_size)
      .def_readonly("default_timeout_us", &BatchPolicy::default_timeout_us)
      .def_readonly("priority_levels", &BatchPolicy::priority_levels)
      .def("__repr__", &BatchPolicy::ToString);

  py::class_<ImageTransform, std::shared_ptr<ImageTransform>>(m, "ImageTransform")
      .def(
          py::init([](int64_t out_h, int64_t out_w, std::vector<float> mean, std::vector<float> std,
                      const std::string& aspect, const std::string& layout,
                      const std::string& dtype, int threads) {
            return std::make_shared<ImageTransform>(
                MakeImageSpec(out_h, out_w, std::move(mean), std::move(std), aspect, layout, dtype),
                threads);
          }),
          py::arg("out_h"), py::arg("out_w"), py::arg("mean"), py::arg("std"),
          py::arg("aspect") = "stretch", py::arg("layout") = "chw", py::arg("dtype") = "float32",
          py::arg("threads") = 0,
          "The image pipeline of preprocess_images as a batcher transform: uint8 "
          "[n, h, w, channels] requests become the model's rows while a batch is gathered.");

  py::class_<PyCudaImagePipeline>(m, "CudaImagePipeline")
      .def(
          py::init([](int64_t out_h, int64_t out_w, std::vector<float> mean, std::vector<float> std,
                      const std::string& aspect, const std::string& layout,
                      const std::string& dtype, int device) {
            return std::make_unique<PyCudaImagePipeline>(
                MakeImageSpec(out_h, out_w, std::move(mean), std::move(std), aspect, layout, dtype),
                dtype, device);
          }),
          py::arg("out_h"), py::arg("out_w"), py::arg("mean"), py::arg("std"),
          py::arg("aspect") = "stretch", py::arg("layout") = "chw", py::arg("dtype") = "float32",
          py::arg("device") = 0,
          "The image pipeline on a CUDA device (RuntimeError without CUDA or a device).")
      .def("run", &PyCudaImagePipeline::Run, py::arg("images"),
           "Preprocess into a device batch; returns its device pointer (valid until the next "
           "run), for onnxruntime's I/O binding.")
      .def("run_to_host", &PyCudaImagePipeline::RunToHost, py::arg("images"),
           "Preprocess on the device and copy the batch back, as preprocess_images returns it.");

  py::class_<RaggedSpec>(m, "RaggedSpec")
      .def(py::init([](std::vector<int64_t> inputs, std::vector<double> pad_values,
                       int64_t fixed_length, int64_t max_length, const py::object& mask_dtype) {
             RaggedSpec spec;
             spec.inputs = std::move(inputs);
             spec.pad_values = std::move(pad_values);
             spec.fixed_length = fixed_length;
             spec.max_length = max_length;
             if (!mask_dtype.is_none()) {
               spec.mask = true;
               if (const char* problem =
                       FromNumpyDType(py::dtype::from_args(mask_dtype), &spec.mask_dtype)) {
                 throw py::value_error(std::string("mask dtype ") + problem);
               }
             }
             spec.Validate();  // std::invalid_argument -> ValueError
             return spec;
           }),
           py::kw_only(), py::arg("inputs"), py::arg("pad_values"), py::arg("fixed_length") = 0,
           py::arg("max_length") = 0, py::arg("mask_dtype") = py::none(),
           "Inputs (indexes) whose dimension 1 varies between requests: padded per batch "
           "with their pad value to the longest (or fixed_length; truncated past "
           "max_length), and with mask_dtype a mask input appended (1 = value, 0 = pad).")
      .def_readonly("inputs", &RaggedSpec::inputs)
      .def_readonly("pad_values", &RaggedSpec::pad_values)
      .def_readonly("fixed_length", &RaggedSpec::fixed_length)
      .def_readonly("max_length", &RaggedSpec::max_length)
      .def_readonly("mask", &RaggedSpec::mask);

  py::class_<PyBatch>(m, "Batch")
      .def_property_readonly("id", &PyBatch::id)
      .def_property_readonly("rows", &PyBatch::rows)
      .def_property_readonly("reason", &PyBatch::reason)
      .def_property_readonly("request_ids", &PyBatch::request_ids)
      .def_property_readonly("request_rows", &PyBatch::request_rows)
      .def_property_readonly("queue_wait_ns", &PyBatch::queue_wait_ns)
      .def_property_readonly("inputs", &PyBatch::inputs)
      .def("complete", &PyBatch::Complete, py::arg("outputs"),
           "Scatter output rows back to each request; each output needs first dim == rows.")
      .def("fail", &PyBatch::Fail, py::arg("message"),
           "Every request of the batch completes with status 'error' and this message.")
      .def("__repr__", &PyBatch::Repr);

  py::class_<PyCompletion>(m, "Completion")
      .def_readonly("id", &PyCompletion::id)
      .def_readonly("status", &PyCompletion::status)
      .def_readonly("error", &PyCompletion::error)
      .def_readonly("outputs", &PyCompletion::outputs)
      .def_readonly("queue_ns", &PyCompletion::queue_ns)
      .def_readonly("compute_ns", &PyCompletion::compute_ns)
      .def_readonly("batch_id", &PyCompletion::batch_id)
      .def_readonly("batch_rows", &PyCompletion::batch_rows)
      .def("__repr__", &PyCompletion::Repr);

  py::class_<PyBatcher>(m, "Batcher")
      .def(py::init<const BatchPolicy&, const std::optional<RaggedSpec>&,
                    const std::map<int64_t, std::shared_ptr<ImageTransform>>&>(),
           py::arg("policy"), py::arg("ragged") = py::none(),
           py::arg("transforms") = std::map<int64_t, std::shared_ptr<ImageTransform>>{},
           "transforms: input index -> what its raw (uint8) requests become while a batch "
           "is gathered.")
      .def("submit", &PyBatcher::Submit, py::arg("inputs"), py::arg("priority") = 0,
           py::arg("timeout_us") = -1, py::arg("release_queued") = false,
           "Queue one request (no copy); returns its id. release_queued: nothing more can "
           "join what is queued with it: release it all now, without waiting out the delay.")
      .def("next_batch", &PyBatcher::NextBatch,
           "Block (GIL released) until a batch is released; None once stopped and empty.")
      .def("poll", &PyBatcher::Poll, py::arg("timeout_ms") = 0,
           "Completions not yet returned; timeout_ms > 0 waits (GIL released) for one.")
      .def("try_next_batch", &PyBatcher::TryNextBatch,
           "The batch the policy releases now, or None; after None, ready_fd becomes "
           "readable once one can be released. Never blocks.")
      .def_property_readonly("notify_fd", &PyBatcher::notify_fd)
      .def_property_readonly("ready_fd", &PyBatcher::ready_fd)
      .def("stop", &PyBatcher::Stop, "Refuse new work; what is queued is still released.")
      .def("hold", &PyBatcher::Hold, py::arg("n"),
           "Test hook: nothing is released until n requests are queued (0 = no hold).")
      .def_property_readonly("queue_depth", &PyBatcher::queue_depth)
      .def_property_readonly("policy", &PyBatcher::policy)
      .def("stats", &PyBatcher::Stats);

  py::class_<DriftSketch>(m, "DriftSketch")
      .def(py::init([](const std::vector<std::pair<std::vector<double>, bool>>& features,
                       int64_t window_rows) {
             std::vector<FeatureBins> bins;
             bins.reserve(features.size());
             for (const auto& [edges, discrete] : features) bins.push_back({edges, discrete});
             return std::make_unique<DriftSketch>(std::move(bins), window_rows);
           }),
           py::arg("features"), py::arg("window_rows"),
           "Per-feature histograms of a [rows, features] stream: features are (edges, "
           "discrete) pairs as in a reference profile; windows of window_rows rows.")
      .def(
          "update",
          [](DriftSketch& sketch, const py::array& arr) {
            if (arr.ndim() != 2) throw py::value_error("drift sketch: expected [rows, features]");
            if (arr.dtype().equal(py::dtype::of<float>())) {
              UpdateSketch<float>(sketch, arr);
            } else if (arr.dtype().equal(py::dtype::of<double>())) {
              UpdateSketch<double>(sketch, arr);
            } else {
              throw py::value_error("drift sketch: expected float32 or float64 values");
            }
          },
          py::arg("values"), "Count the rows of a [rows, features] float array.")
      .def(
          "snapshot",
          [](const DriftSketch& sketch) {
            DriftSketch::Window w = sketch.Snapshot();
            return py::make_tuple(w.rows, w.counts, w.nulls);
          },
          "(rows, counts[feature][bin], nulls[feature]) of the last complete window, or "
          "of the current one before the first is complete.")
      .def_property_readonly("total_rows", &DriftSketch::total_rows)
      .def_property_readonly("window_rows", &DriftSketch::window_rows)
      .def_property_readonly("num_features", &DriftSketch::num_features);

  BindV2Json(m);

  m.def("within_bounds", &PyWithinBounds, py::arg("batch"), py::arg("lower"), py::arg("upper"),
        "True when every value of the C-contiguous [rows, width] float32/float64 batch is "
        "within [lower[c], upper[c]] of its column (NaN never is), in one pass.");

  py::class_<PyTabularKernel>(m, "TabularKernel")
      .def(py::init<const std::vector<std::string>&, const std::vector<double>&,
                    const std::vector<double>&, const std::vector<double>&,
                    const std::vector<int64_t>&, const std::vector<int64_t>&,
                    const std::vector<double>&, const std::string&>(),
           py::arg("kinds"), py::arg("shifts"), py::arg("scales"), py::arg("fills"),
           py::arg("widths"), py::arg("fill_codes"), py::arg("unknown_values"),
           py::arg("dtype") = "float32",
           "Per output column group: kind (number | index | onehot), shift and scale (number: "
           "(x - shift) * scale), fill (number: what NaN becomes), width (onehot: the "
           "vocabulary's size), fill_code (categorical: what a missing code -2 becomes), "
           "unknown_value (index: what an unknown code -1 is written as).")
      .def_property_readonly("width", &PyTabularKernel::width)
      .def("run", &PyTabularKernel::Run, py::arg("columns"), py::arg("rows"),
           py::arg("threads") = 0,
           "The [rows, width] float batch of the columns (float64 values for number columns, "
           "int64 codes otherwise), in one fused pass per row with the GIL released.");

  m.def(
      "preprocess_images",
      [](const py::list& images, int64_t out_h, int64_t out_w, std::vector<float> mean,
         std::vector<float> std, const std::string& aspect, const std::string& layout,
         const std::string& dtype, int threads) {
        ImageSpec spec =
            MakeImageSpec(out_h, out_w, std::move(mean), std::move(std), aspect, layout, dtype);
        HeldImages held(images, spec.channels);
        py::array out = BatchArray(spec, held.views.size(), dtype);
        void* dst = out.mutable_data();
        const std::vector<ImageView>& views = held.views;
        {
          py::gil_scoped_release release;
          PreprocessImages(views, spec, dst, threads);
        }
        return out;
      },
      py::arg("images"), py::arg("out_h"), py::arg("out_w"), py::arg("mean"), py::arg("std"),
      py::arg("aspect") = "stretch", py::arg("layout") = "chw", py::arg("dtype") = "float32",
      py::arg("threads") = 0,
      "Resize (bilinear, half-pixel centers), normalize ((x / 255 - mean) / std) and lay out "
      "uint8 HWC images into one float32 (or float16) batch [N, C, H, W] (or [N, H, W, C]), "
      "in one fused pass per output row, across threads, with the GIL released.");
}
