// The one place where a runtime dtype code becomes a C++ element type.
#pragma once

#include <stdexcept>
#include <string>

#include "eplib/dtype.h"

namespace eplib::cpu {

// Calls body(T{}) with T the element type of `dtype`.
template <typename Body>
void visit_dtype(DType dtype, const Body& body) {
  switch (dtype) {
    case DType::kFloat32: return body(float{});
    case DType::kBFloat16: return body(bf16_t{});
    case DType::kFloat16: return body(fp16_t{});
    case DType::kFloat64: return body(double{});
  }
  throw std::invalid_argument("unsupported dtype code " + std::to_string(static_cast<int>(dtype)));
}

}  // namespace eplib::cpu
