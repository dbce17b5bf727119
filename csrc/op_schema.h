// One op's schema, written once: `define_with_out` defines the op and its `.out` variant
// from the same string, so the argument list is not repeated in C++.
//
//   TORCH_LIBRARY_FRAGMENT(dcvit, m) {
//     define_with_out(m, "foo(Tensor x, int r) -> Tensor");                       // foo.out: out
//     define_with_out(m, "bar(Tensor x) -> (Tensor, Tensor)", {"out", "size_out"});
//   }
//
// `.out` takes the schema's arguments, then keyword-only one mutable tensor per output
// (named by `out_names`, in order) and returns them: "foo.out(Tensor x, int r, *,
// Tensor(a!) out) -> Tensor(a!)". The same string is the op's schema in Python
// (dcvit_engine/ops/<op>.py; tests/test_dispatch.py checks they agree). The kernels are
// registered with impl_with_out (functional_from_out.h), which implements both.
#pragma once
#include <torch/library.h>

#include <initializer_list>
#include <string>

namespace dcvit {

// The `.out` schema of `schema` (see above); throws when the number of outputs differs
// from out_names'.
inline std::string out_variant_schema(const std::string& schema,
                                      std::initializer_list<const char*> out_names) {
  const auto open = schema.find('(');
  const auto arrow = schema.rfind(") -> ");
  TORCH_CHECK(open != std::string::npos && arrow != std::string::npos && arrow > open,
              "define_with_out: cannot read the schema ", schema);
  const std::string name = schema.substr(0, open);
  const std::string arguments = schema.substr(open + 1, arrow - open - 1);
  const std::string returns = schema.substr(arrow + 5);
  const bool tuple = !returns.empty() && returns.front() == '(';
  size_t count = 1;
  for (char c : returns) count += c == ',';
  TORCH_CHECK(count == out_names.size(), "define_with_out: ", name, " returns ", count,
              " tensor(s) but ", out_names.size(), " out name(s) were given");
  std::string outs, results;
  char alias = 'a';
  for (const char* out : out_names) {
    const std::string sep = outs.empty() ? "" : ", ";
    outs += sep + "Tensor(" + alias + "!) " + out;
    results += sep + "Tensor(" + alias + "!)";
    ++alias;
  }
  const std::string head = arguments.empty() ? "*, " : arguments + ", *, ";
  return name + ".out(" + head + outs + ") -> " + (tuple ? "(" + results + ")" : results);
}

// Defines `schema`'s op and its `.out` variant in the library fragment `m`.
inline void define_with_out(torch::Library& m, const std::string& schema,
                            std::initializer_list<const char*> out_names = {"out"}) {
  m.def(schema.c_str());
  m.def(out_variant_schema(schema, out_names).c_str());
}

}  // namespace dcvit
