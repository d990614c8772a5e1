// V2 JSON requests read natively from the document orjson parsed.
//
// Both functions here only ever accept: anything they do not recognise as the plain case
// returns None, and the Python decoder (fastserve.http.codecs) then decodes the request and
// explains what is wrong with it. So neither needs error messages of its own, and each must
// accept nothing the Python path would refuse, nor read anything differently
// (tests/test_json_plan.py holds them to that over a corpus of good and bad requests).

#include "v2_json.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace fastserve {
namespace {

// 2**53: every integer up to this converts to a double exactly (and so rounds to a float
// as numpy rounds an int64).
constexpr long long kExactIntLimit = 1LL << 53;

// The decoder's bounds (fastserve.http.codecs: MAX_ID_LENGTH, MAX_NAME_LENGTH, MAX_RANK).
constexpr Py_ssize_t kMaxIdLength = 256;
constexpr Py_ssize_t kMaxNameLength = 256;
constexpr size_t kMaxRank = 64;

// One element of a tensor's `data` list as a double, when it is the clear case: an exact
// Python float or int (not bool), finite, an int within kExactIntLimit, and within `limit`
// in magnitude. False otherwise: the caller leaves the whole list to the Python decoder.
bool PlainNumber(PyObject* item, double limit, double* out) {
  double value;
  if (PyFloat_CheckExact(item)) {
    value = PyFloat_AS_DOUBLE(item);
  } else if (PyLong_CheckExact(item)) {
    int overflow = 0;
    const long long whole = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow != 0 || whole > kExactIntLimit || whole < -kExactIntLimit) {
      return false;
    }
    value = static_cast<double>(whole);
  } else {
    return false;
  }
  if (!(std::fabs(value) <= limit)) {  // (NaN and infinities fail)
    return false;
  }
  *out = value;
  return true;
}

// Writes the numbers of `list`, nested exactly along dims[depth..] (flat data is walked with
// dims = {count}), into out[*at...]; false at the first length or element that does not fit.
template <typename T>
bool FillNumbers(PyObject* list, const std::vector<Py_ssize_t>& dims, size_t depth, double limit,
                 T* out, Py_ssize_t* at) {
  const Py_ssize_t n = PyList_GET_SIZE(list);
  if (n != dims[depth]) {
    return false;
  }
  if (depth + 1 < dims.size()) {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* inner = PyList_GET_ITEM(list, i);
      if (!PyList_CheckExact(inner) || !FillNumbers(inner, dims, depth + 1, limit, out, at)) {
        return false;
      }
    }
    return true;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    double value;
    if (!PlainNumber(PyList_GET_ITEM(list, i), limit, &value)) {
      return false;
    }
    out[(*at)++] = static_cast<T>(value);
  }
  return true;
}

// The float32 or float64 array of `shape` that a V2 `data` list holds, flat or nested exactly
// along `shape`, or None when the list is anything but plain numbers that fit (the Python
// decoder then converts it, or explains what is wrong with it). One pass, no intermediate
// float64 array and no per-element Python call.
template <typename T>
py::object NumbersFromList(PyObject* data, const std::vector<Py_ssize_t>& shape, double limit) {
  Py_ssize_t count = 1;
  for (const Py_ssize_t dim : shape) {
    count *= dim;
  }
  const Py_ssize_t n = PyList_GET_SIZE(data);
  if (count == 0 || n == 0) {
    return py::none();
  }
  const bool nested = PyList_CheckExact(PyList_GET_ITEM(data, 0));
  if (nested && shape.empty()) {
    return py::none();  // a scalar sent as a list of lists
  }
  const std::vector<Py_ssize_t> walk = nested ? shape : std::vector<Py_ssize_t>{count};
  py::array_t<T> out(std::vector<py::ssize_t>(shape.begin(), shape.end()));
  Py_ssize_t at = 0;
  if (!FillNumbers(data, walk, 0, limit, out.mutable_data(), &at)) {
    return py::none();
  }
  return std::move(out);
}

py::object NumbersOf(PyObject* data, const std::vector<Py_ssize_t>& shape, bool fp64) {
  if (fp64) {
    return NumbersFromList<double>(data, shape, std::numeric_limits<double>::max());
  }
  return NumbersFromList<float>(data, shape, std::numeric_limits<float>::max());
}

py::object PyNumbersFromList(const py::list& data, const std::vector<Py_ssize_t>& shape,
                             const std::string& datatype) {
  for (const Py_ssize_t dim : shape) {
    if (dim < 0) {
      throw py::value_error("numbers_from_list: dimensions must be non-negative");
    }
  }
  if (datatype != "FP32" && datatype != "FP64") {
    throw py::value_error("numbers_from_list: datatype must be FP32 or FP64");
  }
  return NumbersOf(data.ptr(), shape, datatype == "FP64");
}

bool KeyIs(PyObject* key, const char* name) {
  return PyUnicode_CheckExact(key) && PyUnicode_CompareWithASCIIString(key, name) == 0;
}

// The plain V2 JSON request of one model version: an object of "inputs" and, optionally,
// "id" (a string or null) and "parameters" (at most "binary_data_output", a boolean), nothing
// else; "inputs" lists every input of the signature once, each an object of exactly "name",
// "datatype" (the signature's), "shape" (the signature's, with its batch dimension in
// 1..max_batch_size, the same for every input) and either "data" (plain numbers, flat or
// nested along "shape") or, with Triton's binary tensor extension, "parameters" of exactly
// "binary_data_size" (the input's bytes, in order, in the blob after the JSON). A msgpack
// body's document is read alike, its "data" also raw little-endian bytes. Such a
// request needs none of the decoder's and validator's Python: Decode turns it into the
// batcher's arrays in one native walk.
class JsonRequestPlan {
 public:
  struct Input {
    py::str name;
    std::string datatype;        // FP32 or FP64
    std::vector<int64_t> shape;  // -1: any size
  };

  JsonRequestPlan(
      const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>>& inputs,
      int64_t max_batch_size)
      : max_batch_size_(max_batch_size) {
    if (inputs.empty() || max_batch_size < 1) {
      throw py::value_error("JsonRequestPlan: at least one input, and a max batch size of 1+");
    }
    for (const auto& [name, datatype, shape] : inputs) {
      py::str text(name);
      if (name.empty() || PyUnicode_GET_LENGTH(text.ptr()) > kMaxNameLength) {
        throw py::value_error("JsonRequestPlan: input names of 1 to 256 characters");
      }
      if (datatype != "FP32" && datatype != "FP64") {
        throw py::value_error("JsonRequestPlan: FP32 and FP64 inputs only");
      }
      if (shape.size() > kMaxRank) {
        throw py::value_error("JsonRequestPlan: at most 64 dimensions");
      }
      inputs_.push_back(Input{std::move(text), datatype, shape});
    }
  }

  // (arrays in signature order, id or None, binary_data_output) of a plain request, None
  // for any other document. `blob`: the bytes after the JSON (the binary extension), or None.
  // `msgpack`: the document is a msgpack body's, whose "data" may also be raw bytes.
  // `max_elements` bounds each input's declared shape as the decoder does (the body's size).
  py::object Decode(py::handle doc, Py_ssize_t max_elements, py::object blob, bool msgpack) const {
    PyObject* id = Py_None;
    PyObject* inputs = nullptr;
    bool binary_output = false;
    if (!PyDict_CheckExact(doc.ptr())) {
      return py::none();
    }
    Py_ssize_t pos = 0;
    PyObject* key;
    PyObject* value;
    while (PyDict_Next(doc.ptr(), &pos, &key, &value)) {
      if (KeyIs(key, "inputs")) {
        inputs = value;
      } else if (KeyIs(key, "id")) {
        id = value;
      } else if (!KeyIs(key, "parameters") || !BinaryOutput(value, &binary_output)) {
        return py::none();
      }
    }
    if (id != Py_None && (!PyUnicode_CheckExact(id) || PyUnicode_GET_LENGTH(id) > kMaxIdLength)) {
      return py::none();
    }
    const auto n = static_cast<Py_ssize_t>(inputs_.size());
    if (inputs == nullptr || !PyList_CheckExact(inputs) || PyList_GET_SIZE(inputs) != n) {
      return py::none();
    }
    Blob raw;
    if (!blob.is_none()) {
      if (PyObject_GetBuffer(blob.ptr(), &raw.view, PyBUF_SIMPLE) != 0) {
        throw py::error_already_set();
      }
      raw.held = true;
      raw.owner = blob;
    }
    py::list arrays(n);
    std::vector<bool> seen(inputs_.size(), false);
    int64_t batch = -1;
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* entry = PyList_GET_ITEM(inputs, i);
      const Py_ssize_t k = Find(entry, seen);
      if (k < 0) {
        return py::none();
      }
      seen[k] = true;
      py::object array = Tensor(entry, inputs_[k], max_elements, &batch, &raw, msgpack);
      if (array.is_none()) {
        return py::none();
      }
      PyList_SET_ITEM(arrays.ptr(), k, array.release().ptr());
    }
    if (raw.held && raw.used != raw.view.len) {
      return py::none();  // bytes that no input claims
    }
    return py::make_tuple(std::move(arrays), py::reinterpret_borrow<py::object>(id), binary_output);
  }

 private:
  // The index of the signature input `entry` names, when it is an object of a name not seen
  // yet and nothing but the four fields; -1 otherwise.
  Py_ssize_t Find(PyObject* entry, const std::vector<bool>& seen) const {
    if (!PyDict_CheckExact(entry) || PyDict_GET_SIZE(entry) != 4) {
      return -1;
    }
    PyObject* name = PyDict_GetItem(entry, name_key_.ptr());  // (borrowed)
    if (name == nullptr || !PyUnicode_CheckExact(name)) {
      return -1;
    }
    for (size_t k = 0; k < inputs_.size(); ++k) {
      if (!seen[k] && PyUnicode_Compare(name, inputs_[k].name.ptr()) == 0) {
        return static_cast<Py_ssize_t>(k);
      }
    }
    return -1;
  }

  // The blob of the binary extension while Decode reads it: how much of it the inputs took.
  struct Blob {
    py::handle owner;  // what the arrays read in place keep alive
    Py_buffer view{};
    bool held = false;
    Py_ssize_t used = 0;
    Blob() = default;
    Blob(const Blob&) = delete;
    Blob& operator=(const Blob&) = delete;
    ~Blob() {
      if (held) {
        PyBuffer_Release(&view);
      }
    }
  };

  // The request's "parameters", when they are none or only a boolean "binary_data_output".
  static bool BinaryOutput(PyObject* parameters, bool* binary_output) {
    if (parameters == Py_None) {
      return true;
    }
    if (!PyDict_CheckExact(parameters) || PyDict_GET_SIZE(parameters) > 1) {
      return false;
    }
    Py_ssize_t pos = 0;
    PyObject* key;
    PyObject* value;
    while (PyDict_Next(parameters, &pos, &key, &value)) {
      if (!KeyIs(key, "binary_data_output") || (value != Py_True && value != Py_False)) {
        return false;
      }
      *binary_output = value == Py_True;
    }
    return true;
  }

  // The array of one input entry (its name already matched `spec`), or None.
  py::object Tensor(PyObject* entry, const Input& spec, Py_ssize_t max_elements, int64_t* batch,
                    Blob* blob, bool msgpack) const {
    PyObject* datatype = PyDict_GetItem(entry, datatype_key_.ptr());
    PyObject* shape = PyDict_GetItem(entry, shape_key_.ptr());
    if (datatype == nullptr || shape == nullptr || !PyUnicode_CheckExact(datatype) ||
        PyUnicode_CompareWithASCIIString(datatype, spec.datatype.c_str()) != 0 ||
        !PyList_CheckExact(shape) ||
        PyList_GET_SIZE(shape) != static_cast<Py_ssize_t>(spec.shape.size())) {
      return py::none();
    }
    std::vector<Py_ssize_t> dims;
    dims.reserve(spec.shape.size());
    Py_ssize_t bound = 1;  // as the decoder counts it: empty dimensions taken as 1
    for (size_t axis = 0; axis < spec.shape.size(); ++axis) {
      PyObject* item = PyList_GET_ITEM(shape, axis);
      if (!PyLong_CheckExact(item)) {
        return py::none();
      }
      int overflow = 0;
      const long long dim = PyLong_AsLongLongAndOverflow(item, &overflow);
      if (overflow != 0 || dim < 0 || dim > max_elements ||
          (spec.shape[axis] >= 0 && dim != spec.shape[axis])) {
        return py::none();
      }
      bound *= dim == 0 ? 1 : static_cast<Py_ssize_t>(dim);
      if (bound > max_elements) {
        return py::none();
      }
      dims.push_back(static_cast<Py_ssize_t>(dim));
    }
    if (!dims.empty()) {  // the batch dimension
      if (dims[0] < 1 || dims[0] > max_batch_size_ || (*batch >= 0 && dims[0] != *batch)) {
        return py::none();
      }
      *batch = dims[0];
    }
    const bool fp64 = spec.datatype == "FP64";
    PyObject* data = PyDict_GetItem(entry, data_key_.ptr());
    if (data != nullptr) {
      if (PyList_CheckExact(data)) {
        return NumbersOf(data, dims, fp64);
      }
      if (msgpack && PyBytes_CheckExact(data)) {  // a msgpack body's raw values
        return FromBytes(data, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), dims, fp64);
      }
      return py::none();
    }
    return FromBlob(PyDict_GetItem(entry, parameters_key_.ptr()), dims, fp64, blob);
  }

  // An input's tensor from the binary extension's blob: its "parameters" exactly
  // {"binary_data_size": its bytes}, the next that many bytes of the blob.
  py::object FromBlob(PyObject* parameters, const std::vector<Py_ssize_t>& dims, bool fp64,
                      Blob* blob) const {
    if (parameters == nullptr || !blob->held || !PyDict_CheckExact(parameters) ||
        PyDict_GET_SIZE(parameters) != 1) {
      return py::none();
    }
    PyObject* size = PyDict_GetItem(parameters, binary_data_size_key_.ptr());
    if (size == nullptr || !PyLong_CheckExact(size)) {
      return py::none();
    }
    int overflow = 0;
    const long long bytes = PyLong_AsLongLongAndOverflow(size, &overflow);
    if (overflow != 0 || bytes < 0 || bytes > blob->view.len - blob->used) {
      return py::none();
    }
    const char* start = static_cast<const char*>(blob->view.buf) + blob->used;
    py::object array = FromBytes(blob->owner, start, static_cast<Py_ssize_t>(bytes), dims, fp64);
    if (!array.is_none()) {
      blob->used += static_cast<Py_ssize_t>(bytes);
    }
    return array;
  }

  // The tensor of `dims` whose raw little-endian values are the `size` bytes at `start` (held
  // by `owner`), when that is exactly as many as it needs; None otherwise. Read in place, as
  // the Python decoder reads it (a read-only view that keeps `owner` alive), unless the bytes
  // are not aligned for the datatype: then copied, as ``validate_inputs`` would copy them.
  // This host must be little-endian (on another, the decoder swaps the bytes).
  static py::object FromBytes(py::handle owner, const char* start, Py_ssize_t size,
                              const std::vector<Py_ssize_t>& dims, bool fp64) {
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    return py::none();
#endif
    Py_ssize_t count = 1;
    for (const Py_ssize_t dim : dims) {
      count *= dim;
    }
    const Py_ssize_t itemsize = fp64 ? 8 : 4;
    if (size != count * itemsize) {
      return py::none();
    }
    const py::dtype dtype = fp64 ? py::dtype::of<double>() : py::dtype::of<float>();
    const std::vector<py::ssize_t> shape(dims.begin(), dims.end());
    if (reinterpret_cast<uintptr_t>(start) % static_cast<uintptr_t>(itemsize) == 0) {
      py::array view(dtype, shape, start, owner);
      py::detail::array_proxy(view.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
      return std::move(view);
    }
    py::array out(dtype, shape);
    std::memcpy(out.mutable_data(), start, static_cast<size_t>(size));
    return std::move(out);
  }

  std::vector<Input> inputs_;
  int64_t max_batch_size_;
  // An entry's keys, made once (a str keeps its hash, so each lookup only compares)
  py::str name_key_{"name"};
  py::str datatype_key_{"datatype"};
  py::str shape_key_{"shape"};
  py::str data_key_{"data"};
  py::str parameters_key_{"parameters"};
  py::str binary_data_size_key_{"binary_data_size"};
};

}  // namespace

void BindV2Json(py::module_& m) {
  m.def("numbers_from_list", &PyNumbersFromList, py::arg("data"), py::arg("shape"),
        py::arg("datatype"),
        "The FP32 or FP64 tensor of `shape` that a V2 request's `data` list holds (flat, or "
        "nested exactly along `shape`), or None unless every element is a plain Python float "
        "or int (not bool) that fits: finite, an int within 2**53, and within the datatype's "
        "range. None leaves the list to the Python decoder.");

  py::class_<JsonRequestPlan>(m, "JsonRequestPlan")
      .def(py::init<const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>>&,
                    int64_t>(),
           py::arg("inputs"), py::arg("max_batch_size"),
           "The plain V2 JSON request of a model version whose inputs, (name, datatype, "
           "shape with -1 for any size), are all FP32 or FP64.")
      .def("decode", &JsonRequestPlan::Decode, py::arg("doc"), py::arg("max_elements"),
           py::arg("blob") = py::none(), py::arg("msgpack") = false,
           "(arrays in signature order, id or None, binary_data_output) of a plain request's "
           "parsed document (and `blob`, the bytes after it with the binary extension; with "
           "`msgpack`, a msgpack body's document, whose data may be raw bytes), "
           "checked against the signature; None for any other document, which the Python "
           "decoder then decodes or refuses.");
}

}  // namespace fastserve
