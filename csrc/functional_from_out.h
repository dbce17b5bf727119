// The functional form of an op from its `.out` form, one definition for every op and device:
// allocate the outputs with the op's `<op>_outputs` (declared in its header and shared by the
// CPU and CUDA impls), then run the device's out kernel into them.
//
//   impl_with_out<&foo_outputs, &foo_out_cpu>(m, "foo");   // registers foo and foo.out
//
// `<op>_outputs` takes exactly the schema's arguments and returns the output (a Tensor) or
// outputs (a std::tuple of Tensors); the out kernel takes the same arguments followed by a
// reference to each output.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <type_traits>

namespace dcvit {

template <auto Outputs, auto OutKernel>
struct FunctionalFromOut;

template <typename Result, typename... Args, Result (*Outputs)(Args...), auto OutKernel>
struct FunctionalFromOut<Outputs, OutKernel> {
  static Result call(Args... args) {
    Result result = Outputs(args...);
    if constexpr (std::is_same_v<Result, at::Tensor>) {
      OutKernel(args..., result);
    } else {
      std::apply([&](auto&... out) { OutKernel(args..., out...); }, result);
    }
    return result;
  }
};

// Registers `op` (allocate, then the out kernel) and `op.out` (the out kernel) for the
// device of the TORCH_LIBRARY_IMPL block `m` belongs to.
template <auto Outputs, auto OutKernel>
void impl_with_out(torch::Library& m, const char* op) {
  m.impl(op, &FunctionalFromOut<Outputs, OutKernel>::call);
  m.impl((std::string(op) + ".out").c_str(), OutKernel);
}

}  // namespace dcvit
