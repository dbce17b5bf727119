"""Kernel benchmark of the fused attention block with pruned heads and channels.

For DeiT-S (D=384, 6 heads of 64) and DeiT-B (D=768, 12 heads of 64) widths, batch 256,
197 tokens, bf16, it times five pruning cases, each without and with a key bias (ToMe's
proportional attention):
  dense          every head at 64/64
  half_channels  every head's q/k and v widths halved (32/32), as CAIT's CDCP prunes
  half_heads     half the heads removed
  ragged         per-head widths cycling 64/64, 17/5, 40/33, 25/26 (as UVC prunes)
Implementations: the whole block -- the unfused torch sequence (LayerNorm, qkv linear, one
F.scaled_dot_product_attention per equal-width head group, proj linear, residual; what timm
runs eagerly) and the op's cuda / triton / cpu backends -- and the attention core alone --
F.scaled_dot_product_attention per head group against the Triton flash kernel, both on the
same packed qkv.

The op's backends and the Triton core get the weights as build_engine prepares them: every
head zero-padded to a multiple of 16 (kernels/head_padding.py), and for the triton backend
the LayerNorm folded into the qkv weights once (`qkv_folded`, as the engine does at build
time; without it the op would refold per timed call); the unfused torch baseline and SDPA
run the real widths. MACs always count the real widths.

realized speedup = (time of the dense case / time of the case, same implementation and key
bias) / (dense MACs / case MACs): 1.0 means the removed MACs came back in full as time.
TFLOP/s counts 2 FLOPs per MAC (every matmul, QK^T and A.V included). floor_ms is the time
those FLOPs take at the measured dense-GEMM peak in the same dtype (2 * MACs / peak), shown
next to each timing; frac_of_peak = floor_ms / median_ms.

  python benchmarks/bench_attention.py --out bench_out                  # GPU, bf16
  python benchmarks/bench_attention.py --device cpu --out bench_out     # CPU smoke (small shapes)
Prints a table and writes attention.csv into --out.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dcvit_engine import ops  # noqa: E402
from dcvit_engine.dtypes import SHORT_DTYPES, device_default  # noqa: E402
from dcvit_engine.kernels.attention import flash_attention_triton  # noqa: E402
from dcvit_engine.kernels.fused_linear import fold_layer_norm  # noqa: E402
from dcvit_engine.kernels.head_padding import pad_heads  # noqa: E402
from dcvit_engine.macs import attention_macs  # noqa: E402
from dcvit_engine.ops.attention import attention_block_backends  # noqa: E402
from dcvit_engine.spec import AttentionSpec  # noqa: E402
from timing import device_name, matmul_peak_tflops, median_ms, report_table  # noqa: E402

MODELS = {"deit_s": (384, 6), "deit_b": (768, 12)}  # embed dim, heads (head_dim 64)
HEAD_DIM = 64
RAGGED_CYCLE = [(64, 64), (17, 5), (40, 33), (25, 26)]
FIELDS = ["model", "case", "key_bias", "heads", "qk_total", "v_total", "scope", "impl", "median_ms",
          "floor_ms", "tflops", "frac_of_peak", "macs_reduction", "speedup", "realized_speedup",
          "speedup_vs_torch", "key_bias_overhead"]


def case_widths(case: str, heads: int) -> tuple[list[int], list[int]]:
    if case == "dense":
        return [HEAD_DIM] * heads, [HEAD_DIM] * heads
    if case == "half_channels":
        return [HEAD_DIM // 2] * heads, [HEAD_DIM // 2] * heads
    if case == "half_heads":
        return [HEAD_DIM] * (heads // 2), [HEAD_DIM] * (heads // 2)
    if case == "ragged":
        widths = [RAGGED_CYCLE[h % len(RAGGED_CYCLE)] for h in range(heads)]
        return [qk for qk, _ in widths], [v for _, v in widths]
    raise ValueError(f"unknown case {case!r}")


def width_groups(qk_dims, v_dims):
    """Runs of adjacent heads with equal widths: (heads, qk width, v width), in order."""
    groups = []
    for qk, v in zip(qk_dims, v_dims):
        if groups and groups[-1][1:] == (qk, v):
            groups[-1] = (groups[-1][0] + 1, qk, v)
        else:
            groups.append((1, qk, v))
    return groups


def sdpa_core(qkv, qk_dims, v_dims, scale, mask):
    """The attention core as eager PyTorch runs it: one SDPA call per equal-width head group
    on views of the packed qkv (B, N, C), contexts concatenated."""
    qk_total = sum(qk_dims)
    q, k, v = qkv.split([qk_total, qk_total, sum(v_dims)], dim=-1)
    outputs, qk_start, v_start = [], 0, 0
    for heads, qk_w, v_w in width_groups(qk_dims, v_dims):
        qg, kg = (t[..., qk_start:qk_start + heads * qk_w].unflatten(-1, (heads, qk_w)).transpose(1, 2)
                  for t in (q, k))
        vg = v[..., v_start:v_start + heads * v_w].unflatten(-1, (heads, v_w)).transpose(1, 2)
        outputs.append(F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)
                       .transpose(1, 2).flatten(2))
        qk_start += heads * qk_w
        v_start += heads * v_w
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


def unfused_block(x, nw, nb, w_qkv, b_qkv, w_proj, b_proj, gamma, qk_dims, v_dims, scale, key_bias):
    """What a timm Block's attention branch runs in eager PyTorch."""
    h = F.layer_norm(x, (x.shape[-1],), nw, nb, 1e-6)
    qkv = F.linear(h, w_qkv, b_qkv)
    mask = None if key_bias is None else key_bias[:, None, None, :]
    y = F.linear(sdpa_core(qkv, qk_dims, v_dims, scale, mask), w_proj, b_proj)
    return x + y * gamma


def make_inputs(batch, tokens, dim, qk_dims, v_dims, device, dtype):
    qkv_rows = 2 * sum(qk_dims) + sum(v_dims)
    x = torch.randn(batch, tokens, dim)
    w = [torch.ones(dim), torch.zeros(dim), torch.randn(qkv_rows, dim) / dim**0.5,
         torch.zeros(qkv_rows), torch.randn(dim, sum(v_dims)) / sum(v_dims)**0.5,
         torch.zeros(dim), torch.full((dim,), 0.1)]
    key_bias = torch.randint(1, 4, (batch, tokens)).float().log()
    return (x.to(device, dtype), [t.to(device, dtype) for t in w], key_bias.to(device, dtype))


def time_case(model, case, with_bias, args, device, dtype, peak, log):
    """Rows (dicts) for one (model, case, key bias): every available implementation."""
    dim, heads = MODELS[model]
    qk_dims, v_dims = case_widths(case, heads)
    scale = HEAD_DIM ** -0.5
    x, (nw, nb, w_qkv, b_qkv, w_proj, b_proj, gamma), kb = make_inputs(
        args.batch, args.tokens, dim, qk_dims, v_dims, device, dtype)
    key_bias = kb if with_bias else None
    block_args = (x, nw, nb, w_qkv, b_qkv, w_proj, b_proj)
    block_macs = args.batch * attention_macs(AttentionSpec(qk_dims, v_dims, scale), dim, args.tokens)
    core_macs = args.batch * args.tokens**2 * (sum(qk_dims) + sum(v_dims))

    impls = {("block", "torch_unfused"): lambda: unfused_block(
        *block_args, gamma, qk_dims, v_dims, scale, key_bias)}
    # the op as the engine runs it: heads padded to multiples of 16
    padded = pad_heads(qk_dims, v_dims, w_qkv, b_qkv, w_proj)
    op_args = (x, nw, nb, padded.qkv_weight, padded.qkv_bias, padded.proj_weight, b_proj)
    reasons = attention_block_backends(*op_args, padded.qk_dims, padded.v_dims, scale, gamma=gamma,
                                       key_bias=key_bias)
    folded = fold_layer_norm(nw, nb, padded.qkv_weight, padded.qkv_bias)
    for backend in ("cuda", "triton", "cpu"):
        if reasons[backend] is None and not (backend == "triton" and device.type == "cpu"):
            impls[("block", backend)] = (lambda b: lambda: ops.attention_block(
                *op_args, padded.qk_dims, padded.v_dims, scale, gamma=gamma, key_bias=key_bias,
                backend=b, qkv_folded=folded if b == "triton" else None))(backend)
    qkv = F.linear(x, w_qkv, b_qkv)
    mask = None if key_bias is None else key_bias[:, None, None, :]
    impls[("core", "sdpa")] = lambda: sdpa_core(qkv, qk_dims, v_dims, scale, mask)
    if device.type == "cuda" and reasons["triton"] is None:
        qkv_rows = F.linear(x, padded.qkv_weight, padded.qkv_bias).view(args.batch * args.tokens, -1)
        impls[("core", "triton_flash")] = lambda: flash_attention_triton(
            qkv_rows, args.batch, args.tokens, padded.qk_dims, padded.v_dims, scale, key_bias)

    rows = []
    for (scope, impl), fn in impls.items():
        ms = median_ms(fn, device)
        macs = block_macs if scope == "block" else core_macs
        tflops = 2 * macs / ms / 1e9
        floor_ms = 2 * macs / peak / 1e9
        rows.append(dict(model=model, case=case, key_bias=with_bias, heads=len(qk_dims),
                         qk_total=sum(qk_dims), v_total=sum(v_dims), scope=scope, impl=impl,
                         median_ms=ms, floor_ms=floor_ms, tflops=tflops, frac_of_peak=tflops / peak,
                         macs=macs))
        log(f"{model:7} {case:13} key_bias={with_bias!s:5} {scope:5} {impl:14} {ms:9.4f} ms "
            f"(floor {floor_ms:.4f} ms) {tflops:8.2f} TFLOP/s")
    return rows


def add_ratios(rows):
    """speedup / realized speedup against the dense case, speedup against the unfused torch
    block (or SDPA for the core), and the key bias' cost against the plain case."""
    def find(model, case, key_bias, scope, impl):
        for r in rows:
            key = (r["model"], r["case"], r["key_bias"], r["scope"], r["impl"])
            if key == (model, case, key_bias, scope, impl):
                return r
        return None

    for r in rows:
        dense = find(r["model"], "dense", r["key_bias"], r["scope"], r["impl"])
        baseline = find(r["model"], r["case"], r["key_bias"], r["scope"],
                        "torch_unfused" if r["scope"] == "block" else "sdpa")
        plain = find(r["model"], r["case"], False, r["scope"], r["impl"]) if r["key_bias"] else None
        r["macs_reduction"] = dense["macs"] / r["macs"]
        r["speedup"] = dense["median_ms"] / r["median_ms"]
        r["realized_speedup"] = r["speedup"] / r["macs_reduction"]
        r["speedup_vs_torch"] = baseline["median_ms"] / r["median_ms"]
        r["key_bias_overhead"] = r["median_ms"] / plain["median_ms"] if plain else ""


def format_row(r):
    def fmt(value, digits):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return [r["model"], r["case"], str(r["key_bias"]), str(r["heads"]), str(r["qk_total"]),
            str(r["v_total"]), r["scope"], r["impl"], fmt(r["median_ms"], 4), fmt(r["floor_ms"], 4),
            fmt(r["tflops"], 2),
            fmt(r["frac_of_peak"], 3), fmt(r["macs_reduction"], 2), fmt(r["speedup"], 2),
            fmt(r["realized_speedup"], 2), fmt(r["speedup_vs_torch"], 2), fmt(r["key_bias_overhead"], 2)]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=list(SHORT_DTYPES),
                        help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default 256 on GPU, 2 on CPU")
    parser.add_argument("--tokens", type=int, default=None, help="default 197 on GPU, 65 on CPU")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--cases", nargs="+", default=["dense", "half_channels", "half_heads", "ragged"],
                        choices=["dense", "half_channels", "half_heads", "ragged"])
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    if "dense" not in args.cases:
        parser.error("--cases must include dense: every ratio is taken against it")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = SHORT_DTYPES[args.dtype or device_default("cuda" if gpu else "cpu")]
    args.batch = args.batch or (256 if gpu else 2)
    args.tokens = args.tokens or (197 if gpu else 65)

    peak = matmul_peak_tflops(device, dtype)
    print(f"device: {device_name(device)}; dtype {dtype}; batch {args.batch}; tokens {args.tokens}; "
          f"measured matmul peak {peak:.3g} TFLOP/s")
    rows = []
    for model in args.models:
        for case in args.cases:
            for with_bias in (False, True):
                rows += time_case(model, case, with_bias, args, device, dtype, peak, print)
    add_ratios(rows)

    report_table(FIELDS, [format_row(r) for r in rows], args.out, "attention")


if __name__ == "__main__":
    main()
