// See cpu_linear.h. The mkldnn ops are looked up by name through the dispatcher (ATen has no
// public C++ header for them); where they are missing (a torch built without oneDNN) the
// callers keep ATen's addmm path.
#include "cpu_linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/intrusive_ptr.h>

#include <mutex>
#include <unordered_map>

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

const std::optional<c10::OperatorHandle>& reorder_op() {
  static const auto op = find_op("mkldnn::_reorder_linear_weight", "");
  return op;
}

// One weight in oneDNN's blocked layout, valid while its source tensor lives unchanged: the
// weak pointer tells a dead source (whose address a new tensor may reuse) from a live one,
// the version counter an in-place change (inference tensors have none and cannot change
// outside inference mode).
struct PackedWeight {
  c10::weak_intrusive_ptr<c10::TensorImpl> source;
  const void* data;
  int64_t version;
  at::Tensor packed;
};

int64_t version_of(const at::Tensor& w) { return w.is_inference() ? -1 : w._version(); }

// Whole tensors only (no view of a larger one): a view is a new TensorImpl on every call
// (e.g. a gated fc1's halves), which would pack each time.
bool packable(const at::Tensor& w) {
  return reorder_op() && w.dim() == 2 && w.layout() == at::kStrided && w.is_contiguous() &&
         w.storage_offset() == 0 &&
         w.numel() * static_cast<int64_t>(w.element_size()) ==
             static_cast<int64_t>(w.storage().nbytes());
}

// The weight as _linear_pointwise runs it fastest: packed once per weight tensor (the engine's
// weights live as long as the engine, so its warm-up call packs them and later calls reuse
// them; about 5-10% of each GEMM at DeiT-S shapes, benchmarks/RESULTS.md). Leaked on purpose:
// no tensor may be freed after torch's allocators at process exit.
at::Tensor packed(const at::Tensor& w) {
  if (!packable(w)) return contiguous(w);
  static auto* cache = new std::unordered_map<const c10::TensorImpl*, PackedWeight>();
  static std::mutex mutex;
  const c10::TensorImpl* impl = w.unsafeGetTensorImpl();
  std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache->find(impl);
  if (found != cache->end()) {
    const PackedWeight& entry = found->second;
    if (entry.source.lock().get() == impl && entry.data == w.data_ptr() &&
        entry.version == version_of(w))
      return entry.packed;
  }
  for (auto it = cache->begin(); it != cache->end();)  // drop the weights that died
    it = it->second.source.expired() ? cache->erase(it) : std::next(it);
  torch::jit::Stack stack{w, c10::IValue()};
  reorder_op()->callBoxed(&stack);
  at::Tensor result = stack.back().toTensor();
  PackedWeight entry{c10::weak_intrusive_ptr<c10::TensorImpl>(w.getIntrusivePtr()), w.data_ptr(),
                     version_of(w), result};
  cache->erase(impl);
  cache->emplace(impl, std::move(entry));
  return result;
}

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
  torch::jit::Stack stack{contiguous(x), packed(w), b, std::string(attr),
                          c10::List<std::optional<at::Scalar>>(), algorithm};
  pointwise_op()->callBoxed(&stack);
  return stack.back().toTensor();
}

namespace {

// _linear_pointwise.binary(Tensor X, Tensor other, Tensor W, Tensor? B, str attr)
at::Tensor linear_binary(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                         const at::Tensor& other, const char* attr) {
  torch::jit::Stack stack{contiguous(x), contiguous(other), packed(w), b, std::string(attr)};
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
