"""`dcvit doctor`: what was built, which backend serves each op here, and a numeric check
of every available backend against a float64 reference on fresh random inputs."""
import os
import time

import torch

from dcvit_engine import _native
from dcvit_engine.ops import BACKENDS
from dcvit_engine.ops.mlp_block import mlp_block, mlp_block_backends


def register(subparsers):
    parser = subparsers.add_parser("doctor", help="show the build and check every backend of every op")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.set_defaults(func=run)


def _mlp_inputs(device, dtype):
    # DeiT-Tiny-like widths with an odd token count and hidden width.
    dim, hidden, tokens = 192, 700, 197
    g = torch.Generator().manual_seed(int(time.time()))
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    x = rnd(2, tokens, dim)
    weights = [1 + rnd(dim, scale=0.2), rnd(dim, scale=0.1), rnd(hidden, dim, scale=dim**-0.5),
               rnd(hidden, scale=0.1), rnd(dim, hidden, scale=hidden**-0.5), rnd(dim, scale=0.1)]
    gamma = rnd(dim).abs() + 0.1
    return x, weights, gamma


def run(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), device {device}")
    print(f"compiled ops (dcvit_engine._C): {'loaded' if _native.LOAD_ERROR is None else _native.LOAD_ERROR}")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
          f"DCVIT_BACKEND={os.environ.get('DCVIT_BACKEND', 'auto')}")
    x64, w64, g64 = _mlp_inputs(device, torch.float64)
    ref = mlp_block(x64, *w64, gamma=g64, backend="torch")
    dtype = torch.float32
    x, w, g = x64.to(device, dtype), [t.to(device, dtype) for t in w64], g64.to(device, dtype)
    reasons = mlp_block_backends(x, *w, gamma=g)
    print(f"\nmlp_block on {device}, {dtype}, x {tuple(x.shape)}, hidden {w[2].shape[0]}:")
    print(f"  {'backend':8} {'status':10} {'rel. error vs fp64':>20} {'ms':>9}")
    wrong = 0
    for backend in BACKENDS:
        if reasons[backend] is not None:
            print(f"  {backend:8} {'off':10} {reasons[backend]}")
            continue
        start = time.perf_counter()
        out = mlp_block(x, *w, gamma=g, backend=backend)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        err = ((out.double().cpu() - ref.cpu()).norm() / ref.cpu().norm()).item()
        wrong += err >= 1e-4
        print(f"  {backend:8} {'ok' if err < 1e-4 else 'WRONG':10} {err:20.2e} {ms:9.2f}")
    return 1 if wrong else 0
