"""`define_op`: one op from its parts, so an op module holds only the op's own code.

The parts: the schema (written once here, in the op module; the C++ `m.def` in csrc/<op>.cpp
must say the same, tests/test_dispatch.py checks it), the plain-PyTorch reference, the fake
impl, the Triton launcher, each backend's extra refusal reasons, and a small example input
(`dcvit doctor` checks every backend of every op on it). From them this module makes:

- the `torch` backend: the reference, called with the schema's arguments;
- the `cpu` and `cuda` backends: `torch.ops.dcvit.<op>` from dcvit_engine._C (its fake impl
  registered here, so torch.compile traces around it);
- the `triton` backend: the launcher registered as `dcvit::_triton_<op>`, a
  `torch.library.triton_op` whose kernels torch.compile sees and can fuse around (an opaque
  `custom_op` under the CPU interpreter, whose kernels cannot be traced with fake tensors).
  It is an implementation detail of the public op, not a second public op: its schema is the
  public one plus the Triton-only hints (`triton_options`, e.g. LayerNorm-folded weights),
  derived here, never written again.

Options are keyword inputs outside the schema: hints that only some backends use (the
others ignore them) or inputs only some backends implement (the op's `why_not` refuses
them on the others, e.g. q/k-norm in attention_block).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.library import custom_op, triton_op, wrap_triton

from dcvit_engine import _native
from dcvit_engine.ops.dispatch import (
    Impl,
    OpDispatcher,
    native_why_not,
    torch_why_not,
    triton_gemm_why_not,
    triton_interpreting,
    triton_why_not,
)

_INTERPRETING = triton_interpreting()


def _launch_directly(kernel):
    return kernel


# What a Triton launcher wraps each kernel with before `kernel[grid](...)`: wrap_triton
# inside a triton_op on the GPU; under the interpreter the kernels launch directly.
KERNEL_LAUNCHER = _launch_directly if _INTERPRETING else wrap_triton


def schema_arguments(schema: str) -> list[str]:
    """The argument names of a schema '(Tensor x, int r, ...) -> ...', in order."""
    parsed = torch._C.parse_schema("dcvit::_parse" + schema)
    return [arg.name for arg in parsed.arguments]


def _append_arguments(schema: str, extra: str) -> str:
    head, _, returns = schema.partition(") ->")
    return f"{head}, {extra}) ->{returns}" if extra else schema


@dataclass
class OpDef:
    """An op's parts; see the module docstring. `why_not[backend](*args, **options)` adds a
    refusal reason to that backend's shared ones (device, dtype, not built); `gemm`: the
    Triton impl runs GEMMs, so it refuses fp32 on CUDA (dispatch.triton_gemm_why_not)."""

    name: str
    schema: str
    reference: Callable
    fake: Callable
    triton: Callable | None = None
    # option name -> (its Python type, the schema arguments its fields become on the Triton op)
    triton_options: dict[str, tuple[type, str]] = field(default_factory=dict)
    # options the reference takes as keywords (the others are hints it ignores)
    reference_options: Sequence[str] = ()
    why_not: dict[str, Callable] = field(default_factory=dict)
    gemm: bool = False
    # example(generator) -> (float64 schema arguments, options): dcvit doctor's inputs
    example: Callable | None = None
    # more named examples for the op's optional variants (dcvit doctor checks each too)
    variants: dict[str, Callable] = field(default_factory=dict)


class Op:
    """A defined op: `op(*schema_args, backend=None, **options)` runs it on the chosen
    backend; `op.reasons(...)` says why each backend would refuse these inputs."""

    def __init__(self, spec: OpDef):
        self.spec = spec
        self.name = spec.name
        self.arguments = schema_arguments(spec.schema)
        # option -> (type, number of schema arguments it spreads over on the Triton op)
        self.triton_slots = {key: (kind, len(schema_arguments(f"({args}) -> ()")))
                             for key, (kind, args) in spec.triton_options.items()}
        # the Triton launcher, looked up per call (tests replace it to watch its inputs)
        self.triton_launcher = spec.triton
        self.triton_op = self._register_triton() if spec.triton is not None else None
        loaded = _native.LOAD_ERROR is None and hasattr(torch.ops.dcvit, spec.name)
        self.native_op = getattr(torch.ops.dcvit, spec.name) if loaded else None
        if loaded:
            torch.library.register_fake(f"dcvit::{spec.name}")(spec.fake)
        for key in ("CPU", "CUDA"):  # resolved now, outside any torch.compile trace
            _native.native_unavailable(spec.name, key)
        self.dispatcher = OpDispatcher(spec.name, self._impls(), arg_names=self.arguments)

    # ---- registration ------------------------------------------------------------------
    def _register_triton(self):
        spec, count = self.spec, len(self.arguments)
        schema = _append_arguments(spec.schema, ", ".join(a for _, a in spec.triton_options.values()))
        names = schema_arguments(schema)
        parsed = torch._C.parse_schema("dcvit::_parse" + schema)
        defaults = {arg.name: arg.default_value for arg in parsed.arguments}

        def positional(args, kwargs):
            # the op's arguments in schema order, however the dispatcher passed them (it
            # leaves out trailing arguments that equal their schema default)
            return (*args, *(kwargs.get(n, defaults[n]) for n in names[len(args):]))

        def body(*args, **kwargs):
            args = positional(args, kwargs)
            options, rest = {}, args[count:]
            for key, (kind, width) in self.triton_slots.items():
                part, rest = rest[:width], rest[width:]
                options[key] = None if all(t is None for t in part) else kind(*part)
            return self.triton_launcher(*args[:count], launch=KERNEL_LAUNCHER, **options)

        define = custom_op if _INTERPRETING else triton_op
        op = define(f"dcvit::_triton_{spec.name}", body, mutates_args=(), schema=schema)
        op.register_fake(lambda *args, **kwargs: spec.fake(*positional(args, kwargs)[:count]))
        return op

    def _impls(self) -> list[Impl]:
        spec, name = self.spec, self.spec.name
        extra = spec.why_not

        def reasons(backend, shared):
            def why_not(*args, **options):
                return shared(args[0]) or (extra[backend](*args, **options) if backend in extra else None)
            return why_not

        triton_shared = triton_gemm_why_not if spec.gemm else triton_why_not
        impls = [
            Impl("torch", reasons("torch", lambda x: torch_why_not([x])), self._run_reference),
            Impl("cpu", reasons("cpu", lambda x: native_why_not(name, "cpu", [x])), self._run_native),
            Impl("cuda", reasons("cuda", lambda x: native_why_not(name, "cuda", [x])), self._run_native),
        ]
        if spec.triton is not None:
            impls.append(Impl("triton", reasons("triton", lambda x: triton_shared([x])), self._run_triton))
        return impls

    # ---- backends ------------------------------------------------------------------------
    def _run_reference(self, *args, **options):
        used = {k: v for k, v in options.items() if k in self.spec.reference_options}
        return self.spec.reference(*args, **used)

    def _run_native(self, *args, **options):
        return self.native_op(*args)

    def _run_triton(self, *args, **options):
        extra = []
        for key, (_, width) in self.triton_slots.items():
            value = options.get(key)
            extra.extend(value if value is not None else (None,) * width)
        return self.triton_op(*args, *extra)

    # ---- calls -------------------------------------------------------------------------------
    def __call__(self, *args, backend: str | None = None, **options):
        return self.dispatcher(args[0].device, *args, backend=backend, **options)

    def reasons(self, *args, **options) -> dict[str, str | None]:
        """Each backend's reason for refusing these inputs (None: it can run them)."""
        return self.dispatcher.reasons(*args, **options)

    def run_backend(self, backend: str, *args, **options):
        """Run exactly `backend` (refused with every reason when it cannot take the inputs)."""
        return self.dispatcher(args[0].device, *args, backend=backend, **options)


# Every defined op in definition order (dcvit doctor walks it).
OPS: dict[str, Op] = {}


def define_op(spec: OpDef) -> Op:
    """Register the op's parts and return the dispatching Op (see the module docstring)."""
    if spec.name in OPS:
        raise ValueError(f"op {spec.name!r} is already defined")
    op = Op(spec)
    OPS[spec.name] = op
    return op
