"""Ragged heads on the cpu backend: a DeiT-B attention block pruned head by head (UVC) against
the dense block, in time per real MAC.

Cases (D = 768, 12 heads): dense 64/64; `ragged`, every head its own q/k and v widths; and
`ragged_engine`, the same heads zero-padded to multiples of 16 as build_engine prepares them
(kernels/head_padding.py). MACs always count the real widths, so padding shows up as time.
The cases run interleaved (a load change on a shared machine hits all of them alike); the
median of the runs after two warm-ups is reported.

  python benchmarks/bench_attention_ragged_cpu.py --threads 1 --dtype bf16
Target (issue 10): the ragged block within 1.5x of the dense block's time per MAC.
"""
import argparse
import statistics
import time

import torch

from dcvit_engine import ops
from dcvit_engine.dtypes import SHORT_DTYPES
from dcvit_engine.kernels.head_padding import pad_heads
from dcvit_engine.macs import attention_macs
from dcvit_engine.spec import AttentionSpec

DIM = 768
RAGGED_QK = [64, 17, 40, 25, 58, 33, 12, 47, 64, 29, 51, 20]
RAGGED_V = [64, 5, 33, 26, 61, 40, 9, 52, 64, 31, 44, 18]


def block_inputs(batch, tokens, qk_dims, v_dims, dtype):
    rows = 2 * sum(qk_dims) + sum(v_dims)
    x = torch.randn(batch, tokens, DIM)
    w = [torch.ones(DIM), torch.zeros(DIM), torch.randn(rows, DIM) / DIM**0.5, torch.zeros(rows),
         torch.randn(DIM, sum(v_dims)) / sum(v_dims)**0.5, torch.zeros(DIM)]
    return x.to(dtype), [t.to(dtype) for t in w]


def run(batch, tokens, dtype, repeats, log=print):
    """{case: (median seconds, real MACs)}; logs one line per case."""
    cases = {}
    for name, (qk, v) in {"dense": ([64] * 12, [64] * 12), "ragged": (RAGGED_QK, RAGGED_V)}.items():
        x, w = block_inputs(batch, tokens, qk, v, dtype)
        macs = batch * attention_macs(AttentionSpec(qk, v, 0.125), DIM, tokens)
        cases[name] = (x, w, qk, v, macs)
        if name == "ragged":
            padded = pad_heads(qk, v, w[2], w[3], w[4])
            w_pad = [w[0], w[1], padded.qkv_weight, padded.qkv_bias, padded.proj_weight, w[5]]
            cases["ragged_engine"] = (x, w_pad, padded.qk_dims, padded.v_dims, macs)
    times = {name: [] for name in cases}
    for _ in range(repeats + 2):
        for name, (x, w, qk, v, _) in cases.items():
            start = time.perf_counter()
            ops.attention_block(x, *w, qk, v, 0.125, backend="cpu")
            times[name].append(time.perf_counter() - start)
    results = {name: (statistics.median(times[name][2:]), cases[name][4]) for name in cases}
    dense_per_mac = results["dense"][0] / results["dense"][1]
    for name, (seconds, macs) in results.items():
        per_mac = seconds / macs
        log(f"{name:14} {seconds * 1e3:9.2f} ms {macs / 1e9:7.3f} GMAC {per_mac * 1e12:8.2f} ps/MAC "
            f"{per_mac / dense_per_mac:5.2f}x dense per MAC")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = SHORT_DTYPES[args.dtype]
    print(f"cpu backend, {args.threads} thread(s), {dtype}, batch {args.batch}, {args.tokens} tokens, "
          f"median of {args.repeats}")
    run(args.batch, args.tokens, dtype, args.repeats)


if __name__ == "__main__":
    main()
