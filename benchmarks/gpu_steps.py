"""The measuring steps of benchmarks/gpu_check.py that no other benchmark script does, one
subcommand each. Every row goes to its CSV the moment it is measured (a step killed at its
timeout keeps what it measured), and every row says whether its implementation is the one the
engine runs by default (`default` = 1), so targets are judged on that, best-of beside it.

  smoke     one eager call of each Triton op at DeiT-B bf16 against the reference, with the
            first call's wall time (compile + autotune) and the second call's
  headline  DeiT-B batch 256 bf16: the engine with its default backends and CUDA graphs vs timm
            eager, interleaved; the engine's max logit error against the fp32 reference; a
            DC-ViT-shaped variant's realized speedup in the same run
  gemms     qkv, proj, fc1, fc2 at DeiT-B shapes and fc1/fc2 at hidden 176, 416, 800: the Triton
            GEMM (autotuner's pick) vs torch.mm
  backends  the backend order: MLP block triton vs cuda per hidden width, attention block triton
            vs cuda (qkv_folded), flash core vs SDPA, dense and with a key bias
  merges    ToMe (r=13) and ATME merge / unmerge at DeiT-B, each backend replayed from a CUDA
            graph (bench_token_merge.graph_ms), GB/s against the measured copy bandwidth
  compile   timm + torch.compile (CUDA graphs) vs timm eager vs the engine, interleaved

  python benchmarks/gpu_steps.py STEP --out DIR [--dry-run]
--dry-run: the CPU with tiny shapes (fp32; Triton under the interpreter): control flow only.
"""
import argparse
import csv
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dcvit_engine import ops  # noqa: E402
from dcvit_engine.kernels import fused_linear  # noqa: E402
from dcvit_engine.kernels.launching import launch_directly  # noqa: E402
from dcvit_engine.ops.dispatch import PRIORITY  # noqa: E402
from timing import matmul_peak_tflops, median_ms, time_interleaved  # noqa: E402

DEIT_B = dict(batch=256, tokens=197, dim=768, heads=12, hidden=3072)
TINY = dict(batch=2, tokens=17, dim=64, heads=2, hidden=128)
PRUNED_HIDDEN = (176, 416, 800)  # DC-ViT-resized MLP widths (multiples of 16)


class Rows:
    """Appends dict rows to a CSV, flushed per row; the header is the first row's keys."""

    def __init__(self, path):
        self.path, self.fields = path, None

    def add(self, **row):
        new = self.fields is None
        if new:
            self.fields = list(row)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new and f.tell() == 0:
                writer.writeheader()
            writer.writerow({k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in row.items()})
        print(", ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)


def default_backend(op, reasons, device):
    """The backend the dispatcher picks for these inputs (the first available in PRIORITY)."""
    order = PRIORITY[op].get(device.type, ("torch",))
    return next((b for b in order if reasons.get(b) is None), None)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(out, ref):
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30)), float((out - ref).abs().max())


def _block_weights(shape, hidden, device, dtype, gen):
    dim = shape["dim"]

    def rand(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(device, dtype)
    mlp = [1 + rand(dim, scale=0.1), rand(dim, scale=0.1), rand(hidden, dim, scale=dim**-0.5), rand(hidden),
           rand(dim, hidden, scale=hidden**-0.5), rand(dim), rand(dim, scale=0.1)]
    attn = [1 + rand(dim, scale=0.1), rand(dim, scale=0.1), rand(3 * dim, dim, scale=dim**-0.5),
            rand(3 * dim), rand(dim, dim, scale=dim**-0.5), rand(dim), rand(dim, scale=0.1)]
    return mlp, attn


# ---- smoke ------------------------------------------------------------------------------

def smoke(args, device, dtype, shape, rows):
    gen = torch.Generator().manual_seed(0)
    b, n, d, heads = shape["batch"], shape["tokens"], shape["dim"], shape["heads"]
    x = torch.randn(b, n, d, generator=gen).to(device, dtype)
    (nw, nb, w1, b1, w2, b2, gm), (anw, anb, wqkv, bqkv, wp, bp, ag) = _block_weights(
        shape, shape["hidden"], device, dtype, gen)
    metric = torch.randn(b, n, 64, generator=gen).to(device, dtype)
    key_bias = torch.randint(1, 4, (b, n), generator=gen).float().log().to(device, dtype)
    grid = int((n - 1) ** 0.5)
    dims = [d // heads] * heads
    folded_fc1 = fused_linear.fold_layer_norm(nw, nb, w1, b1)
    folded_qkv = fused_linear.fold_layer_norm(anw, anb, wqkv, bqkv)
    calls = {
        "mlp_block": lambda be: ops.mlp_block(x, nw, nb, w1, b1, w2, b2, gamma=gm, backend=be,
                                              fc1_folded=folded_fc1 if be == "triton" else None),
        "attention_block": lambda be: ops.attention_block(
            x, anw, anb, wqkv, bqkv, wp, bp, dims, dims, (d // heads) ** -0.5, gamma=ag, key_bias=key_bias,
            backend=be, qkv_folded=folded_qkv if be == "triton" else None),
        "tome_merge": lambda be: ops.tome_merge(x, metric, 13, None, backend=be)[0],
        "atme_merge": lambda be: ops.atme_merge(x[:, :1 + grid * grid], metric[:, :1 + grid * grid],
                                                (grid, grid), "w", 1, backend=be)[0],
    }
    for op, call in calls.items():
        ref = call("torch")
        began = time.perf_counter()
        out = call("triton")
        _sync(device)
        first_s = time.perf_counter() - began
        began = time.perf_counter()
        call("triton")
        _sync(device)
        second_ms = (time.perf_counter() - began) * 1e3
        rel, worst = _rel(out, ref)
        rows.add(op=op, backend="triton", dtype=str(dtype).removeprefix("torch."), shape=f"{b}x{n}x{d}",
                 first_call_s=first_s, second_call_ms=second_ms, rel_err_vs_torch=rel, max_abs_err=worst)


# ---- headline and compile: whole models -----------------------------------------------

def _models(args, device, dtype, with_variant):
    import timm

    from bench_models import dcvit_variant
    from dcvit_engine.engine import build_engine
    from dcvit_engine.macs import count_macs
    from dcvit_engine.reference import ViTReference, reference_from_timm

    name = "deit_tiny_patch16_224" if args.dry_run else "deit_base_patch16_224"
    torch.manual_seed(0)
    timm_model = timm.create_model(name, pretrained=False).eval()
    teacher = reference_from_timm(timm_model)
    spec = teacher.spec
    engine = build_engine(teacher, backend=None, dtype=dtype, device=device, cuda_graphs=True)
    models = {"engine": (engine, count_macs(spec).total)}
    if with_variant:
        variant_spec, _ = dcvit_variant(spec, 4)
        variant = ViTReference(variant_spec).eval()
        models["engine_dcvit_n4"] = (build_engine(variant, backend=None, dtype=dtype, device=device,
                                                  cuda_graphs=True), count_macs(variant_spec).total)
    return timm_model, spec, models


def headline(args, device, dtype, shape, rows, compile_mode=False):
    timm_model, spec, models = _models(args, device, dtype, with_variant=not compile_mode)
    batch = shape["batch"]
    images = torch.randn(batch, spec.in_chans, *spec.img_size, generator=torch.Generator().manual_seed(1))
    if not compile_mode:
        # accuracy first (cheap, and what any speed is worth): fp32 timm on the same images
        with torch.no_grad():
            ref = timm_model.to(device).float()(images.to(device)).double()
            eager = timm_model.to(dtype)(images.to(device, dtype))
            engine_logits = models["engine"][0](images.to(device, dtype))
        for runner, out in (("engine", engine_logits), ("timm_eager", eager)):
            rel, worst = _rel(out, ref)
            rows.add(kind="logit_error", runner=runner, batch_size=batch, value=worst, rel_err=rel, default=1)
        del ref, eager, engine_logits
    timm_model = timm_model.to(device, dtype)
    runners = {"timm_eager": timm_model}
    if compile_mode:
        # CUDA graphs, like the engine; the dry run traces with dynamo only (no inductor codegen,
        # minutes on a CPU): the control flow, not a measurement
        options = dict(mode="reduce-overhead") if device.type == "cuda" else dict(backend="eager")
        runners["timm_compile"] = torch.compile(timm_model, **options)
        runners["engine"] = models["engine"][0]
    else:
        runners.update({name: engine for name, (engine, _) in models.items()})
    images = images.to(device, dtype)
    timed = time_interleaved(runners, images, warmup=args.warmup, repeats=args.repeats)
    base_macs = models["engine"][1]
    for name, t in timed.items():
        rows.add(kind="images_per_s", runner=name, batch_size=batch, value=t.images_per_s,
                 median_ms=t.median_ms, default=int(name != "timm_compile"))
    if "engine_dcvit_n4" in timed:
        reduction = base_macs / models["engine_dcvit_n4"][1]
        speedup = timed["engine_dcvit_n4"].images_per_s / timed["engine"].images_per_s
        rows.add(kind="realized_speedup", runner="engine_dcvit_n4", batch_size=batch,
                 value=speedup / reduction, macs_reduction=reduction, default=1)


# ---- gemms ------------------------------------------------------------------------------

def gemms(args, device, dtype, shape, rows):
    gen = torch.Generator().manual_seed(2)
    m, d = shape["batch"] * shape["tokens"], shape["dim"]
    widths = (shape["hidden"],) if args.dry_run else (shape["hidden"], *PRUNED_HIDDEN)
    cases = [("qkv", 3 * d, d), ("proj", d, d)] + [(f"fc1_h{h}", h, d) for h in widths] \
        + [(f"fc2_h{h}", d, h) for h in widths]
    peak = matmul_peak_tflops(device, dtype)
    for name, n, k in cases:
        a = torch.randn(m, k, generator=gen).to(device, dtype)
        w = (torch.randn(n, k, generator=gen) * k**-0.5).to(device, dtype)
        bias = torch.zeros(n, device=device, dtype=dtype)
        if name.startswith(("qkv", "fc1")):  # LayerNorm + GEMM with the affine folded, as the engine
            ones = torch.ones(k, device=device, dtype=dtype)
            zeros = torch.zeros_like(ones)
            folded = fused_linear.fold_layer_norm(ones, zeros, w, bias)
            kernel = fused_linear._norm_linear_kernel

            def run(a=a, w=w, bias=bias, folded=folded, ones=ones, zeros=zeros,
                    act="gelu" if name.startswith("fc1") else "none"):
                return fused_linear.ln_linear(a, ones, zeros, w, bias, 1e-6, act=act,
                                              launch=launch_directly, folded=folded)
        else:
            residual, out = torch.randn(m, n, device=device, dtype=dtype), torch.empty(m, n, device=device,
                                                                                        dtype=dtype)
            kernel = fused_linear._linear_residual_kernel

            def run(a=a, w=w, bias=bias, residual=residual, out=out):
                return fused_linear.linear_residual(a, w, bias, None, residual, out, launch=launch_directly)
        triton_ms = median_ms(run, device, warmup=1, repeats=1 if args.dry_run else 10)
        torch_ms = median_ms(lambda: torch.mm(a, w.t()), device)
        tuner = fused_linear._TUNED.get((kernel, True))
        best = getattr(tuner, "best_config", None) if device.type == "cuda" else None
        pick = fused_linear.gemm_config_name({**best.kwargs, "num_warps": best.num_warps,
                                              "num_stages": best.num_stages}) if best else "fixed"
        flops = 2 * m * n * k
        rows.add(gemm=name, m=m, n=n, k=k, triton_ms=triton_ms, torch_mm_ms=torch_ms,
                 triton_tflops=flops / triton_ms / 1e9, torch_tflops=flops / torch_ms / 1e9,
                 speedup_vs_mm=torch_ms / triton_ms, frac_of_peak=flops / triton_ms / 1e9 / peak,
                 autotune_pick=pick, default=1)


# ---- backend order ----------------------------------------------------------------------

def backends(args, device, dtype, shape, rows):
    from bench_attention import time_case
    from dcvit_engine.ops.attention import attention_block_backends
    from dcvit_engine.ops.mlp_block import mlp_block_backends

    gen = torch.Generator().manual_seed(3)
    b, n, d = shape["batch"], shape["tokens"], shape["dim"]
    peak = matmul_peak_tflops(device, dtype)
    x = torch.randn(b * n, d, generator=gen).to(device, dtype)
    widths = (shape["hidden"],) if args.dry_run else (shape["hidden"], *PRUNED_HIDDEN)
    for hidden in widths:
        (nw, nb, w1, b1, w2, b2, gm), _ = _block_weights(shape, hidden, device, dtype, gen)
        reasons = mlp_block_backends(x, nw, nb, w1, b1, w2, b2, gamma=gm)
        chosen = default_backend("mlp_block", reasons, device)
        folded = fused_linear.fold_layer_norm(nw, nb, w1, b1)
        flops = 4 * b * n * d * hidden
        def unfused(nw=nw, nb=nb, w1=w1, b1=b1, w2=w2, b2=b2, gm=gm):
            h = F.gelu(F.linear(F.layer_norm(x, (d,), nw, nb, 1e-6), w1, b1))
            return x + F.linear(h, w2, b2) * gm
        unfused_ms = median_ms(unfused, device)
        rows.add(op="mlp_block", case=f"hidden{hidden}", impl="torch_unfused", median_ms=unfused_ms,
                 frac_of_peak=flops / unfused_ms / 1e9 / peak, speedup_vs_torch=1.0, default=0,
                 priority_first=PRIORITY["mlp_block"][device.type][0])
        for backend in ("triton", "cuda"):
            if reasons.get(backend) is not None or (backend == "triton" and device.type == "cpu"):
                continue
            ms = median_ms(lambda: ops.mlp_block(x, nw, nb, w1, b1, w2, b2, gamma=gm, backend=backend,
                                                 fc1_folded=folded if backend == "triton" else None), device)
            rows.add(op="mlp_block", case=f"hidden{hidden}", impl=backend, median_ms=ms,
                     frac_of_peak=flops / ms / 1e9 / peak, speedup_vs_torch=unfused_ms / ms,
                     default=int(backend == chosen), priority_first=PRIORITY["mlp_block"][device.type][0])

    case_args = argparse.Namespace(batch=b, tokens=n)
    model = "deit_s" if args.dry_run else "deit_b"
    for with_bias in (False, True):
        measured = time_case(model, "dense", with_bias, case_args, device, dtype, peak, log=lambda line: None)
        torch_ms = {r["scope"]: r["median_ms"] for r in measured if r["impl"] in ("torch_unfused", "sdpa")}
        xs = torch.randn(b, n, d, device=device, dtype=dtype)
        _, (anw, anb, wqkv, bqkv, wp, bp, ag) = _block_weights(shape, shape["hidden"], device, dtype, gen)
        heads = [64] * (d // 64) if d >= 64 else [d]
        kb = torch.zeros(b, n, device=device, dtype=dtype) if with_bias else None
        chosen = default_backend("attention_block", attention_block_backends(
            xs, anw, anb, wqkv, bqkv, wp, bp, heads, heads, 0.125, gamma=ag, key_bias=kb), device)
        # the engine's core is the flash kernel inside the triton block, SDPA inside the others
        engine_impl = {"block": chosen, "core": "triton_flash" if chosen == "triton" else "sdpa"}
        for r in measured:
            rows.add(op="attention_" + r["scope"], case="dense_key_bias" if with_bias else "dense",
                     impl=r["impl"], median_ms=r["median_ms"], frac_of_peak=r["frac_of_peak"],
                     speedup_vs_torch=torch_ms[r["scope"]] / r["median_ms"],
                     default=int(r["impl"] == engine_impl[r["scope"]]),
                     priority_first=PRIORITY["attention_block"][device.type][0])


# ---- merges -----------------------------------------------------------------------------

def merges(args, device, dtype, shape, rows):
    import bench_token_merge
    from dcvit_engine.ops.token_merge import token_merge_backends

    case_args = argparse.Namespace(batch=shape["batch"], grid=int((shape["tokens"] - 1) ** 0.5))
    peak = bench_token_merge.copy_bandwidth_gbs(device)
    model = "deit_s" if args.dry_run else "deit_b"
    probe = torch.empty(1, 1, bench_token_merge.MODELS[model], device=device, dtype=dtype)
    reasons = token_merge_backends(probe)
    for case in ("tome_r13", "atme_w", "unmerge_w"):
        op = bench_token_merge.OP_OF_CASE[case.split("_")[0]]
        chosen = default_backend(op, reasons[op], device)
        measured = bench_token_merge.time_case(model, case, case_args, device, dtype, peak, log=print)
        for r in measured:
            rows.add(op=op, case=case, impl=r["impl"], median_ms=r["median_ms"], gb_per_s=r["gb_per_s"],
                     frac_of_peak=r["frac_of_peak"], default=int(r["impl"] == chosen))


STEPS = {"smoke": smoke, "merges": merges, "headline": headline, "gemms": gemms, "backends": backends,
         "compile": lambda *a: headline(*a, compile_mode=True)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU machine, or pass --dry-run")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    shape = TINY if args.dry_run else DEIT_B
    args.repeats = args.repeats or (1 if args.dry_run else 20)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.dry_run else 5)
    os.makedirs(args.out, exist_ok=True)
    rows = Rows(os.path.join(args.out, f"{args.step}.csv"))
    with torch.no_grad():
        STEPS[args.step](args, device, dtype, shape, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
