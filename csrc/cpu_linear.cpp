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
                      LinearEpilogue epilogue) {
  // _linear_pointwise(Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars, str? algorithm)
  const char* attr = "none";
  c10::IValue algorithm;  // GELU's approximation: "none" (erf) or "tanh"
  switch (epilogue) {
    case LinearEpilogue::kNone: break;
    case LinearEpilogue::kGelu: attr = "gelu"; algorithm = std::string("none"); break;
    case LinearEpilogue::kGeluTanh: attr = "gelu"; algorithm = std::string("tanh"); break;
    case LinearEpilogue::kSilu: attr = "swish"; break;
  }
  torch::jit::Stack stack{contiguous(x), contiguous(w), b, std::string(attr),
                          c10::List<std::optional<at::Scalar>>(), algorithm};
  pointwise_op()->callBoxed(&stack);
  return stack.back().toTensor();
}

namespace {

// _linear_pointwise.binary(Tensor X, Tensor other, Tensor W, Tensor? B, str attr)
at::Tensor linear_binary(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                         const at::Tensor& other, const char* attr) {
  torch::jit::Stack stack{contiguous(x), contiguous(other), contiguous(w), b, std::string(attr)};
  binary_op()->callBoxed(&stack);
  return stack.back().toTensor();
}

}  // namespace

at::Tensor cpu_linear_add(const at::Tensor& x, const at::Tensor& w,
                          const std::optional<at::Tensor>& b, const at::Tensor& residual) {
  return linear_binary(x, w, b, residual, "add");
}

at::Tensor cpu_linear_mul(const at::Tensor& x, const at::Tensor& w,
                          const std::optional<at::Tensor>& b, const at::Tensor& other) {
  return linear_binary(x, w, b, other, "mul");
}

}  // namespace dcvit
