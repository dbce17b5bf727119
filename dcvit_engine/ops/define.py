"""`define_op`: one op from its parts, so an op module holds only the op's own code.

The parts: the schema (written once here, in the op module; an op with compiled kernels
defines the same string once in csrc/<op>.cpp with `define_with_out` (csrc/op_schema.h),
tests/test_dispatch.py checks they agree), the backends it has, the plain-PyTorch reference,
the fake impl, the Triton launcher, the argument check, each backend's extra refusal
reasons, and a small example input (`dcvit doctor` checks every declared backend of every op
on it). From them this module makes:

- the public op function (`Op.function`: check, then dispatch) and `<op>_backends`
  (`Op.backends_function`: each backend's reason to refuse), with the signature of the
  schema or of the op's `public` function (which maps its arguments to the schema's);
- the `torch` backend: the reference, called with the schema's arguments;
- the `cpu` and `cuda` backends, when declared: `torch.ops.dcvit.<op>` from dcvit_engine._C
  (its fake impl registered here, so torch.compile traces around it); a Triton-only or
  torch-only op declares neither and has none;
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

import inspect
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.library import custom_op, triton_op, wrap_triton

from dcvit_engine import _native
from dcvit_engine.ops.dispatch import (
    BACKENDS,
    Impl,
    OpDispatcher,
    default_priority,
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


def _reference_mismatch(schema: str, reference: Callable) -> str | None:
    """Why `reference` cannot take the schema's arguments in order, or None: its leading
    parameters must carry the schema's names (the dispatcher passes them positionally)."""
    wanted = schema_arguments(schema)
    params = [p for p in inspect.signature(reference).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    got = [p.name for p in params[:len(wanted)]]
    return None if got == wanted else f"the schema's arguments are {wanted}, the reference's {got}"


@dataclass
class OpDef:
    """An op's parts; see the module docstring. `backends`: the ones it has, out of
    dispatch.BACKENDS ("torch" always; "cpu"/"cuda" only with kernels in dcvit_engine._C;
    "triton" only with a launcher). `check(*schema_args, **options)` raises ValueError naming
    the argument that is off. `public(*args, **kwargs)` returns the schema's arguments from
    the public function's (its signature and docstring become the op function's; None: the
    schema's own), `result(out, *schema_args)` the public result from the schema's (None: as
    it is). `why_not[backend](*args, **options)` adds a refusal reason to that backend's
    shared ones (device, dtype, not built); `gemm`: the Triton impl runs GEMMs, so it
    refuses fp32 on CUDA (dispatch.triton_gemm_why_not). The backend order is the op's row
    of dispatch.PRIORITY, else dispatch.default_priority over its backends."""

    name: str
    schema: str
    reference: Callable
    fake: Callable
    backends: Sequence[str] = ()
    triton: Callable | None = None
    check: Callable | None = None
    public: Callable | None = None
    result: Callable | None = None
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


def _definition_errors(definition: OpDef) -> list[str]:
    name, backends = definition.name, tuple(definition.backends)
    errors = []
    if "torch" not in backends or any(b not in BACKENDS for b in backends):
        errors.append(f"backends must be a subset of {BACKENDS} with 'torch' (the reference), "
                      f"got {backends}")
    if ("triton" in backends) != (definition.triton is not None):
        errors.append("declare the 'triton' backend exactly when a Triton launcher is given")
    mismatch = _reference_mismatch(definition.schema, definition.reference)
    if mismatch:
        errors.append(f"{mismatch} ({definition.reference.__module__}."
                      f"{definition.reference.__qualname__})")
    return [f"op {name!r}: {e}" for e in errors]


class Op:
    """A defined op: `op(*schema_args, backend=None, **options)` runs it on the chosen
    backend; `op.reasons(...)` says why each backend would refuse these inputs;
    `op.function` and `op.backends_function` are the public op and its `<op>_backends`."""

    def __init__(self, definition: OpDef, defined_in: str = "?"):
        self.definition = definition
        self.defined_in = defined_in
        self.name = definition.name
        self.backends = tuple(b for b in BACKENDS if b in definition.backends)
        self.arguments = schema_arguments(definition.schema)
        # option -> (type, number of schema arguments it spreads over on the Triton op)
        self.triton_slots = {key: (kind, len(schema_arguments(f"({args}) -> ()")))
                             for key, (kind, args) in definition.triton_options.items()}
        # the Triton launcher, looked up per call (tests replace it to watch its inputs)
        self.triton_launcher = definition.triton
        self.triton_op = self._register_triton() if "triton" in self.backends else None
        self.native_op = None
        if "cpu" in self.backends or "cuda" in self.backends:
            if _native.LOAD_ERROR is None and hasattr(torch.ops.dcvit, self.name):
                self.native_op = getattr(torch.ops.dcvit, self.name)
                torch.library.register_fake(f"dcvit::{self.name}")(definition.fake)
            for key in ("CPU", "CUDA"):  # resolved now, outside any torch.compile trace
                _native.native_unavailable(self.name, key)
        self.dispatcher = OpDispatcher(self.name, self._impls(), arg_names=self.arguments,
                                       priority=default_priority(self.name, self.backends))
        self.function = self._public_function()
        self.backends_function = self._backends_function()

    @property
    def spec(self) -> OpDef:
        """The OpDef under its old name (until the next release; `definition` now), kept
        because it read like a ViTSpec."""
        return self.definition

    # ---- registration ------------------------------------------------------------------
    def _register_triton(self):
        definition, count = self.definition, len(self.arguments)
        schema = _append_arguments(definition.schema,
                                   ", ".join(a for _, a in definition.triton_options.values()))
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
        op = define(f"dcvit::_triton_{self.name}", body, mutates_args=(), schema=schema)
        op.register_fake(lambda *args, **kwargs: definition.fake(*positional(args, kwargs)[:count]))
        return op

    def _impls(self) -> list[Impl]:
        definition, name = self.definition, self.name
        extra = definition.why_not

        def reasons(backend, shared):
            def why_not(*args, **options):
                return shared(args[0]) or (extra[backend](*args, **options) if backend in extra else None)
            return why_not

        triton_shared = triton_gemm_why_not if definition.gemm else triton_why_not
        shared = {
            "torch": (lambda x: torch_why_not([x]), self._run_reference),
            "cpu": (lambda x: native_why_not(name, "cpu", [x]), self._run_native),
            "cuda": (lambda x: native_why_not(name, "cuda", [x]), self._run_native),
            "triton": (lambda x: triton_shared([x]), self._run_triton),
        }
        return [Impl(b, reasons(b, shared[b][0]), shared[b][1]) for b in self.backends]

    # ---- the public functions ------------------------------------------------------------
    def _to_schema(self, args, kwargs) -> tuple:
        public = self.definition.public
        if public is not None:
            return tuple(public(*args, **kwargs))
        bound = self._schema_signature().bind(*args, **kwargs)
        bound.apply_defaults()
        return tuple(bound.args)

    def _schema_signature(self) -> inspect.Signature:
        parsed = torch._C.parse_schema("dcvit::_parse" + self.definition.schema)
        return inspect.Signature([
            inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              default=a.default_value if a.has_default_value() else inspect.Parameter.empty)
            for a in parsed.arguments])

    def _public_signature(self) -> inspect.Signature:
        public = self.definition.public
        return inspect.signature(public) if public is not None else self._schema_signature()

    def _public_function(self):
        # keyword options outside the schema: the Triton hints and the reference's options
        options = tuple(dict.fromkeys([*self.definition.triton_options, *self.definition.reference_options]))

        def function(*args, backend=None, **kwargs):
            given = {k: kwargs.pop(k) for k in options if k in kwargs}
            schema_args = self._to_schema(args, kwargs)
            if self.definition.check is not None:
                self.definition.check(*schema_args, **given)
            out = self(*schema_args, backend=backend, **given)
            return out if self.definition.result is None else self.definition.result(out, *schema_args)

        keyword = inspect.Parameter.KEYWORD_ONLY
        params = list(self._public_signature().parameters.values())
        params += [inspect.Parameter("backend", keyword, default=None)]
        params += [inspect.Parameter(k, keyword, default=None) for k in options]
        return self._describe(function, self.name, inspect.Signature(params),
                              getattr(self.definition.public, "__doc__", None))

    def _backends_function(self):
        def backends(*args, **kwargs) -> dict[str, str | None]:
            return self.reasons(*self._to_schema(args, kwargs))

        return self._describe(backends, f"{self.name}_backends", self._public_signature(),
                              "Each backend's reason for refusing these inputs (None: available).")

    def _describe(self, function, name, signature, doc):
        function.__name__ = function.__qualname__ = name
        function.__module__ = self.defined_in
        function.__signature__ = signature
        function.__doc__ = doc
        return function

    # ---- backends ------------------------------------------------------------------------
    def _run_reference(self, *args, **options):
        used = {k: v for k, v in options.items() if k in self.definition.reference_options}
        return self.definition.reference(*args, **used)

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

    def bind(self, *args, backend: str | None = None, **options) -> Callable:
        """The implementation these schema arguments run on, chosen once: the op's check and
        the backend choice run here, and the returned `run(*args, **options)` skips both per
        call (about 40 us of Python each, which counts at batch 1; the compiled kernels still
        check shapes). For callers whose inputs keep their shapes, dtypes and device from call
        to call (the engine's blocks); public calls go through the checked function."""
        if self.definition.check is not None:
            self.definition.check(*args, **options)
        return self.dispatcher.choose(args[0].device, *args, backend=backend, **options).run

    def reasons(self, *args, **options) -> dict[str, str | None]:
        """Each declared backend's reason for refusing these inputs (None: it can run them)."""
        return self.dispatcher.reasons(*args, **options)

    def run_backend(self, backend: str, *args, **options):
        """Run exactly `backend` (refused with every reason when it cannot take the inputs)."""
        return self.dispatcher(args[0].device, *args, backend=backend, **options)


# Every defined op in definition order (dcvit doctor walks it).
OPS: dict[str, Op] = {}


def define_op(definition: OpDef) -> Op:
    """Register the op's parts and return the dispatching Op (see the module docstring).
    A name already taken, or a definition that contradicts itself (a schema that is not its
    reference's signature, backends without their parts), fails here, at import."""
    caller = sys._getframe(1).f_globals.get("__name__", "?")
    if definition.name in OPS:
        raise ValueError(f"op {definition.name!r} is defined twice: in {OPS[definition.name].defined_in} "
                         f"and in {caller}; give the new op another name")
    errors = _definition_errors(definition)
    if errors:
        raise ValueError(f"{caller}: " + "; ".join(errors))
    op = Op(definition, defined_in=caller)
    OPS[definition.name] = op
    return op
