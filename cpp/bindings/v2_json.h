// The common shape of an Open Inference Protocol (KServe V2) JSON request, read natively from
// the document orjson parsed: tensor `data` lists, and the plan that takes a whole plain
// request to the batcher's arrays (see v2_json.cc).
#pragma once

#include <pybind11/pybind11.h>

namespace fastserve {

// Registers numbers_from_list and JsonRequestPlan on the module.
void BindV2Json(pybind11::module_& m);

}  // namespace fastserve
