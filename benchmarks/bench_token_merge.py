"""Kernel benchmark of the token merging ops against their plain-PyTorch references.

Cases at DeiT-S (D=384) and DeiT-B (D=768) widths, batch 256, 197 tokens (1 + 14x14),
bf16, the metric being the keys averaged over heads (64 wide), sizes given (as after an
earlier merge, which is the common case):
  tome_r13   ToMe removing 13 tokens (ToMe's DeiT setting)
  tome_r98   ToMe at its limit, half of the patch tokens merged
  atme_w     ATME along rows (14x14 -> 14x7)
  atme_h     ATME along columns (14x14 -> 7x14)
  unmerge_w  ATME unmerge back to 14x14
The ops are memory bound: GB/s counts the bytes each op must move at least (x, metric and
size read once, the outputs written once); floor_ms = those bytes / the measured
device-to-device copy bandwidth is the time no implementation can beat, printed next to each
timing, and frac_of_peak = floor_ms / median_ms (target on the GPU: >= 0.6 for the fused
backends). On the CPU the smoke sizes fit in cache while the copy bandwidth is measured on
64 MB, so frac_of_peak can exceed 1 there; the floor is meant for the GPU sizes.
speedup_vs_torch is against the torch reference backend (ToMe's own unfused sequence for
tome: normalize, bmm, max, argsort, gather, scatter_reduce).
On the GPU each op is captured in a CUDA graph once and the graph's replays are timed (as the
engine runs merges inside its graph): eagerly, host dispatch (~50-100 us for ToMe's four
launches) would exceed the GPU work (~50 us) and the benchmark would time the host.

  python benchmarks/bench_token_merge.py --out bench_out               # GPU, bf16
  python benchmarks/bench_token_merge.py --device cpu --out bench_out  # CPU smoke (small shapes)
Prints a table and writes token_merge.csv into --out.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dcvit_engine import ops  # noqa: E402
from dcvit_engine.dtypes import SHORT_DTYPES, device_default  # noqa: E402
from dcvit_engine.ops.token_merge import token_merge_backends  # noqa: E402
from timing import copy_bandwidth_gbs, device_name, median_ms, report_table  # noqa: E402


def graph_ms(fn, device) -> float:
    """Median ms of `fn` as the engine runs it: on CUDA, replays of a CUDA graph of one call
    (warmed up on a side stream first: compilation and allocations stay out of the graph)."""
    if device.type != "cuda":
        return median_ms(fn, device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, device)

MODELS = {"deit_s": 384, "deit_b": 768}  # embed dim; the metric is one head's key width
METRIC_DIM = 64
CASES = ("tome_r13", "tome_r98", "atme_w", "atme_h", "unmerge_w")
FIELDS = ["model", "case", "tokens_in", "tokens_out", "impl", "median_ms", "floor_ms", "gb_per_s",
          "frac_of_peak", "speedup_vs_torch"]
OP_OF_CASE = {"tome": "tome_merge", "atme": "atme_merge", "unmerge": "atme_unmerge"}


def case_call(case, x, metric, size, grid, prefix):
    """(function of backend, tokens out, bytes moved at least) for one case."""
    batch, tokens, dim = x.shape
    elem = x.element_size()
    kind, _, param = case.partition("_")
    if kind == "tome":
        r = min(int(param[1:]), (tokens - prefix) // 2)
        n_out = tokens - r
        moved = elem * batch * (tokens * (dim + metric.shape[2] + 1) + n_out * (dim + 1))
        return (lambda b: ops.tome_merge(x, metric, r, size, backend=b)), n_out, moved
    if kind == "atme":
        rows, cols = grid
        merged = (rows, math.ceil(cols / 2)) if param == "w" else (math.ceil(rows / 2), cols)
        n_out = prefix + merged[0] * merged[1]
        moved = elem * batch * (tokens * (dim + metric.shape[2] + 1) + n_out * (dim + 1))
        return (lambda b: ops.atme_merge(x, metric, grid, param, prefix, size, backend=b)), n_out, moved
    merged_x = ops.atme_merge(x, metric, grid, param, prefix, size, backend="torch")[0]
    moved = elem * batch * dim * (merged_x.shape[1] + tokens)
    return (lambda b: ops.atme_unmerge(merged_x, grid, param, prefix, backend=b)), tokens, moved


def time_case(model, case, args, device, dtype, peak_gbs, log):
    dim = MODELS[model]
    grid, prefix = (args.grid, args.grid), 1
    tokens = prefix + args.grid**2
    x = torch.randn(args.batch, tokens, dim, device=device, dtype=dtype)
    metric = torch.randn(args.batch, tokens, METRIC_DIM, device=device, dtype=dtype)
    size = torch.randint(1, 4, (args.batch, tokens, 1), device=device).to(dtype)
    run, n_out, moved = case_call(case, x, metric, size, grid, prefix)
    reasons = token_merge_backends(x)[OP_OF_CASE[case.split("_")[0]]]
    impls = ["torch"] + [b for b in ("cuda", "triton", "cpu") if reasons[b] is None
                         and not (b == "triton" and device.type == "cpu")]
    floor_ms = moved / peak_gbs / 1e6
    rows = []
    for impl in impls:
        ms = graph_ms(lambda: run(impl), device)
        gbs = moved / ms / 1e6
        rows.append(dict(model=model, case=case, tokens_in=tokens, tokens_out=n_out, impl=impl,
                         median_ms=ms, floor_ms=floor_ms, gb_per_s=gbs, frac_of_peak=floor_ms / ms))
        log(f"{model:7} {case:10} {impl:7} {ms:9.4f} ms (floor {floor_ms:.4f} ms) {gbs:9.1f} GB/s")
    torch_ms = rows[0]["median_ms"]
    for r in rows:
        r["speedup_vs_torch"] = torch_ms / r["median_ms"]
    return rows


def format_row(r):
    return [r["model"], r["case"], str(r["tokens_in"]), str(r["tokens_out"]), r["impl"],
            f"{r['median_ms']:.4f}", f"{r['floor_ms']:.4g}", f"{r['gb_per_s']:.1f}",
            f"{r['frac_of_peak']:.3f}", f"{r['speedup_vs_torch']:.2f}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=list(SHORT_DTYPES),
                        help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default 256 on GPU, 2 on CPU")
    parser.add_argument("--grid", type=int, default=None,
                        help="patch grid side; default 14 on GPU, 8 on CPU")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = SHORT_DTYPES[args.dtype or device_default("cuda" if gpu else "cpu")]
    args.batch = args.batch or (256 if gpu else 2)
    args.grid = args.grid or (14 if gpu else 8)
    if args.batch < 1 or args.grid < 2:
        parser.error("--batch must be >= 1 and --grid >= 2")

    peak = copy_bandwidth_gbs(device)
    print(f"device: {device_name(device)}; dtype {dtype}; batch {args.batch}; "
          f"tokens {1 + args.grid**2}; measured copy bandwidth {peak:.4g} GB/s")
    rows = []
    for model in args.models:
        for case in args.cases:
            rows += time_case(model, case, args, device, dtype, peak, print)

    report_table(FIELDS, [format_row(r) for r in rows], args.out, "token_merge")


if __name__ == "__main__":
    main()
