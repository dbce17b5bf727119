// See cpu_linear.h. The mkldnn ops are looked up by name through the dispatcher (ATen has no
// public C++ header for them); where they are missing (a torch built without oneDNN) the
// callers keep ATen's addmm path.
#include "cpu_linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

namespace dcvit {

namespace {

std::optional<c10::OperatorHandle> find_op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchema({name, overload});
}

const std::optional<c10::OperatorHandle>& pointwise_op() {
  static const auto op = find_op("mkldnn::_linear_pointwise", "");
  return op;
}

const std::optional<c10::OperatorHandle>& binary_op() {
  static const auto op = find_op("mkldnn::_linear_pointwise", "binary");
  return op;
}

bool native_bf16() {
  static const bool ok = [] {
    const auto op = find_op("mkldnn::_is_mkldnn_bf16_supported", "");
    if (!op) return false;
    torch::jit::Stack stack;
    op->callBoxed(&stack);
    return stack.back().toBool();
  }();
  return ok;
}

at::Tensor contiguous(const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

}  // namespace

bool cpu_fused_linear_ok(at::ScalarType dtype) {
  if (!pointwise_op() || !binary_op()) return false;
  return dtype == at::kFloat || (dtype == at::kBFloat16 && native_bf16());
}

at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                      bool gelu) {
  // _linear_pointwise(Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars, str? algorithm)
  torch::jit::Stack stack{contiguous(x), contiguous(w), b, std::string(gelu ? "gelu" : "none"),
                          c10::List<std::optional<at::Scalar>>(),
                          gelu ? c10::IValue(std::string("none")) : c10::IValue()};
  pointwise_op()->callBoxed(&stack);
  return stack.back().toTensor();
}

at::Tensor cpu_linear_add(const at::Tensor& x, const at::Tensor& w,
                          const std::optional<at::Tensor>& b, const at::Tensor& residual) {
  // _linear_pointwise.binary(Tensor X, Tensor other, Tensor W, Tensor? B, str attr)
  torch::jit::Stack stack{contiguous(x), contiguous(residual), contiguous(w), b,
                          std::string("add")};
  binary_op()->callBoxed(&stack);
  return stack.back().toTensor();
}

}  // namespace dcvit
