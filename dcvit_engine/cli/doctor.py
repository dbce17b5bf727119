"""`dcvit doctor`: what was built, the backend order of every op (the one PRIORITY table),
and a numeric check of every op on every backend available here against the float64
reference, with the op tests' tolerance rule (dcvit_engine.ops.tolerance).

Each op's inputs are its own small example (ops.define.OpDef.example), and one more per
optional variant (OpDef.variants, e.g. attention_block's EvaAttention parts), drawn with a fixed
seed; the reference runs in float64 on the inputs as rounded to the checked dtype, so a
backend is judged on its arithmetic, not on the rounding of its inputs. Exit status 1 when
a backend that says it can run the inputs is wrong or fails.
"""
import os
import time

import torch

from dcvit_engine import _native
from dcvit_engine.devices import resolve_device
from dcvit_engine.dtypes import device_default, parse_dtype
from dcvit_engine.errors import InputError
from dcvit_engine.ops import OPS
from dcvit_engine.ops.dispatch import OTHER_DEVICE_ORDER, triton_interpreting
from dcvit_engine.ops.tolerance import error_budget, rel_err


def register(subparsers):
    parser = subparsers.add_parser("doctor", help="show the build and check every backend of every op")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated dtypes to check, e.g. fp32,bf16 (default: bf16 on CUDA, "
                             "fp32 on the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example inputs (default 0)")
    parser.set_defaults(func=run)


def _cast(values, dtype, device):
    """Floating-point tensors to dtype/device; everything else as it is."""
    def one(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(device=device, dtype=dtype)
        if isinstance(v, tuple):
            return tuple(one(t) for t in v)
        return v
    return [one(v) for v in values]


def _flat(out) -> torch.Tensor:
    """One float64 CPU vector of an op's output (a tensor or a tuple of tensors)."""
    parts = out if isinstance(out, (tuple, list)) else (out,)
    return torch.cat([p.detach().double().cpu().flatten() for p in parts])


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compiled_ops() -> str:
    """Whether _C loaded, and which kernels it holds: the CPU ones always, CUDA per arch."""
    if _native.LOAD_ERROR is not None:
        return f"not loaded ({_native.LOAD_ERROR}); the cpu and cuda backends are off"
    archs = _native.compiled_cuda_archs()
    if archs is None:
        cuda = "unknown (built before the build recorded its archs; rebuild to see them)"
    else:
        cuda = ", ".join(archs) if archs else "not built (no CUDA toolkit or torch CPU build at build time)"
    return f"loaded; C++ CPU kernels: built; CUDA kernels: {cuda}"


def print_priority(device: torch.device) -> None:
    print(f"\nbackend order (dcvit_engine/ops/dispatch.py PRIORITY; '*': this device, {device.type}):")
    devices = sorted({d for op in OPS.values() for d in op.dispatcher.priority})
    for name, op in OPS.items():
        row = op.dispatcher.priority
        cells = [f"{'*' if d == device.type else ' '}{d}: {' > '.join(row[d])}" for d in devices]
        print(f"  {name:16} " + "   ".join(f"{c:34}" for c in cells).rstrip())
    print(f"  other devices: {' > '.join(OTHER_DEVICE_ORDER)}")


def check_op(op, device, dtype, seed, example=None, variant="") -> int:
    """Prints one op's table for one dtype on its example (or the named variant's); returns
    the number of wrong or failing backends."""
    args64, options = (example or op.definition.example)(torch.Generator().manual_seed(seed))
    args = _cast(args64, dtype, device)
    options = dict(zip(options, _cast(options.values(), dtype, device)))
    ref_args = _cast(args, torch.float64, torch.device("cpu"))
    ref_options = dict(zip(options, _cast(options.values(), torch.float64, torch.device("cpu"))))
    ref = _flat(op.run_backend("torch", *ref_args, **ref_options))
    same_precision = _flat(op.run_backend("torch", *args, **options))
    reasons = op.reasons(*args, **options)
    order = op.dispatcher.order(device.type)
    chosen = next((b for b in order if reasons.get(b) is None), None)
    shape = tuple(args[0].shape)
    label = f"{op.name} ({variant})" if variant else op.name
    print(f"\n{label} on {device}, {str(dtype).replace('torch.', '')}, x {shape} "
          f"(auto picks {chosen or 'none'}: the first of the order above that takes these inputs; "
          "ms is one call with first-use costs, not a ranking):")
    print(f"  {'backend':8} {'status':8} {'rel. error':>11} {'budget':>10} {'ms':>9}")
    wrong = 0
    for backend in op.backends:  # only those the op declares (OpDef.backends)
        if reasons[backend] is not None:
            print(f"  {backend:8} {'off':8} {reasons[backend]}")
            continue
        interpreter_bf16 = backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16
        budget = error_budget(same_precision, ref, dtype, interpreter_bf16=interpreter_bf16)
        start = time.perf_counter()
        try:
            out = op.run_backend(backend, *args, **options)
            _synchronize(device)
        except Exception as exc:  # an available backend that fails is a finding, not a crash
            wrong += 1
            print(f"  {backend:8} {'FAILED':8} {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        ms = (time.perf_counter() - start) * 1e3
        flat = _flat(out)
        ok = flat.shape == ref.shape and bool(torch.isfinite(flat).all())
        err = rel_err(flat, ref) if flat.shape == ref.shape else float("inf")
        ok = ok and err <= budget
        wrong += not ok
        print(f"  {backend:8} {'ok' if ok else 'WRONG':8} {err:11.2e} {budget:10.2e} {ms:9.2f}")
    return wrong


def run(args):
    try:
        device = resolve_device(args.device)
    except InputError as err:
        print(f"dcvit doctor: {err}")
        return 2
    # one dtype by default, the device's usual run dtype: on CUDA every Triton kernel is
    # compiled (and its GEMMs autotuned) on first use, which a second dtype doubles
    names = args.dtype or device_default(device.type)
    dtypes = [parse_dtype(name.strip()) for name in names.split(",") if name.strip()]
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), device {device}")
    print(f"compiled ops (dcvit_engine._C): {_compiled_ops()}")
    print(f"TRITON_INTERPRET={'1' if triton_interpreting() else os.environ.get('TRITON_INTERPRET', '0')}, "
          f"DCVIT_BACKEND={os.environ.get('DCVIT_BACKEND', 'auto')}")
    print_priority(device)
    wrong = sum(check_op(op, device, dtype, args.seed, example, variant)
                for op in OPS.values()
                for variant, example in [("", None), *op.definition.variants.items()]
                for dtype in dtypes)
    verdict = f"{wrong} wrong or failing" if wrong else "every available backend matches the reference"
    print(f"\n{verdict}")
    return 1 if wrong else 0
