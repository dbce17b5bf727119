"""Kernel benchmark of the fused MLP-only block against the unfused torch sequence.

Floor: the two GEMMs, 4*M*D*H FLOPs (M = B*N rows). At DeiT-B shapes (M = 256*197 = 50432,
D = 768, H = 3072) that is 476 GFLOP: about 0.60 ms at an H100's ~790 dense bf16 TFLOP/s.
The op's own bytes (read x and the weights, write out: 0.16 GB at bf16) take ~0.05 ms at
~3.3 TB/s, so it is compute-bound. The unfused sequence also writes and reads its
intermediate activations (LN out, fc1 out, GELU out, fc2 out, the scaled branch: ~1.7 GB at
bf16, ~0.5 ms at ~3.3 TB/s); fusing removes most of that, so the fused op should approach the
GEMM floor. Each row reports both floors, from this machine's measured matmul peak and copy
bandwidth, and the fraction of the larger one the timing reaches. The Triton op gets fc1's
LayerNorm-folded weights made once, as the engine does. Prints a table, writes mlp_block.csv.

  python benchmarks/bench_mlp_block.py --out bench_out            # GPU, bf16, DeiT-B shapes
  python benchmarks/bench_mlp_block.py --device cpu --out bench_out  # CPU smoke (small shapes)
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dcvit_engine import ops  # noqa: E402
from dcvit_engine.dtypes import SHORT_DTYPES, device_default  # noqa: E402
from dcvit_engine.kernels.fused_linear import fold_layer_norm  # noqa: E402
from dcvit_engine.ops.mlp_block import mlp_block_backends  # noqa: E402
from timing import copy_bandwidth_gbs, device_name, matmul_peak_tflops, median_ms, report_table  # noqa: E402


def unfused(x, nw, nb, w1, b1, w2, b2, gamma):
    """What a timm Block's MLP branch runs in eager PyTorch: six separate kernels."""
    h = F.layer_norm(x, (x.shape[-1],), nw, nb, 1e-6)
    h = F.gelu(F.linear(h, w1, b1))
    return x + F.linear(h, w2, b2) * gamma


def make(rows, dim, hidden, device, dtype):
    x = torch.randn(rows, dim, device=device, dtype=dtype)
    w = [torch.ones(dim), torch.zeros(dim), torch.randn(hidden, dim) / dim**0.5, torch.zeros(hidden),
         torch.randn(dim, hidden) / hidden**0.5, torch.zeros(dim), torch.full((dim,), 0.1)]
    return x, [t.to(device, dtype) for t in w]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=list(SHORT_DTYPES),
                        help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--rows", type=int, default=None, help="B*N (default 256*197 on GPU, 8*197 on CPU)")
    parser.add_argument("--dim", type=int, default=None, help="D (default 768 on GPU, 384 on CPU)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None, help="H values (default D, 2D, 4D)")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = SHORT_DTYPES[args.dtype or device_default("cuda" if gpu else "cpu")]
    rows = args.rows or (256 * 197 if gpu else 8 * 197)
    dim = args.dim or (768 if gpu else 384)
    hiddens = args.hidden or [dim, 2 * dim, 4 * dim]

    peak = matmul_peak_tflops(device, dtype)
    bandwidth = copy_bandwidth_gbs(device)
    print(f"device: {device_name(device)}; dtype {dtype}; measured matmul peak {peak:.1f} TFLOP/s, "
          f"copy bandwidth {bandwidth:.0f} GB/s")
    header = ["rows", "dim", "hidden", "impl", "median_ms", "flop_floor_ms", "byte_floor_ms",
              "frac_of_floor", "tflops", "frac_of_peak", "speedup_vs_unfused"]
    rows_out = []
    for hidden in hiddens:
        x, (nw, nb, w1, b1, w2, b2, gamma) = make(rows, dim, hidden, device, dtype)
        flops = 4 * rows * dim * hidden
        # the op's own traffic: x in, out back, both weight matrices once
        op_bytes = (2 * rows * dim + 2 * dim * hidden) * x.element_size()
        flop_floor_ms = flops / peak / 1e9
        byte_floor_ms = op_bytes / bandwidth / 1e6
        impls = {"torch_unfused": lambda: unfused(x, nw, nb, w1, b1, w2, b2, gamma)}
        reasons = mlp_block_backends(x, nw, nb, w1, b1, w2, b2, gamma=gamma)
        folded = fold_layer_norm(nw, nb, w1, b1)
        for backend in ("cuda", "triton", "cpu"):
            if reasons[backend] is None:
                impls[backend] = (lambda b: lambda: ops.mlp_block(
                    x, nw, nb, w1, b1, w2, b2, gamma=gamma, backend=b,
                    fc1_folded=folded if b == "triton" else None))(backend)
        base_ms = None
        for name, fn in impls.items():
            ms = median_ms(fn, device)
            base_ms = base_ms or ms
            tflops = flops / ms / 1e9
            rows_out.append([rows, dim, hidden, name, f"{ms:.4f}", f"{flop_floor_ms:.4f}",
                             f"{byte_floor_ms:.4f}", f"{max(flop_floor_ms, byte_floor_ms) / ms:.3f}",
                             f"{tflops:.2f}", f"{tflops / peak:.3f}", f"{base_ms / ms:.2f}"])
    report_table(header, rows_out, args.out, "mlp_block")


if __name__ == "__main__":
    main()
