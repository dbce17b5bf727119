"""Where the CPU time goes: the engine's per-op time (torch.profiler over one forward) beside
OpenVINO's per-layer performance counters on the same model, dtype and batch, in comparable
buckets, and the floor: the model's FLOPs at this CPU's measured GEMM peak in that dtype
(timing.matmul_peak_tflops). Used by `bench_peers.py --profile`.

Buckets: the four GEMMs of a block (qkv, proj, fc1, fc2), the attention core (everything
between a block's qkv and proj GEMMs: scores, softmax, weighted sum, reshapes), LayerNorm,
GELU, other (patch embedding, residual adds, head, reorders, framework glue).

How GEMMs are named. Engine: a block's fused op (dcvit::attention_block, dcvit::mlp_block)
calls its GEMMs in order, so inside an attention op they alternate qkv, proj and inside an
MLP op fc1, fc2 (an op that works in row chunks repeats the pair); the op's own time outside
its children is the attention core resp. other. OpenVINO: its FullyConnected layers run in
graph order, which is the spec's order (per block qkv, proj, fc1, fc2; then the head); when
the count differs from the spec's, they are reported as "GEMM (unmatched)" rather than
guessed.
"""
import os
import sys
import tempfile
from collections import defaultdict

import torch

from dcvit_engine.engine import build_engine
from dcvit_engine.macs import count_macs
from dcvit_engine.peers import Unavailable, export_when_needed, open_peers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import matmul_peak_tflops  # noqa: E402

BUCKETS = ("qkv", "proj", "fc1", "fc2", "attention core", "LayerNorm", "GELU", "other")
GEMM_OPS = ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm",
            "mkldnn::_linear_pointwise")
WARMUP = 3  # oneDNN primitive creation and OpenVINO's first-inference work stay out of the profile
BLOCK_GEMMS = {"dcvit::attention_block": ("qkv", "proj"), "dcvit::mlp_block": ("fc1", "fc2")}


def _is_gemm(name: str) -> bool:
    return name in GEMM_OPS or name.startswith("mkldnn::_linear")


def _ancestors(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def engine_buckets(engine, images) -> tuple[dict[str, float], dict[str, float]]:
    """ms per bucket, and ms per op name (self time), over one profiled forward after
    WARMUP warm-up forwards."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(WARMUP):
            engine(images)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine(images)
    events = list(prof.events())
    # the GEMM index inside each block op: the op's top-level GEMMs in start order
    gemm_name: dict[int, str] = {}
    for op in events:
        if op.name in BLOCK_GEMMS:
            names = BLOCK_GEMMS[op.name]
            top = sorted((e for e in events if _is_gemm(e.name) and not _is_gemm(e.cpu_parent.name
                          if e.cpu_parent else "") and op in _ancestors(e.cpu_parent)),
                         key=lambda e: e.time_range.start)
            for i, e in enumerate(top):
                gemm_name[id(e)] = names[i % 2]
    buckets: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        ms = e.self_cpu_time_total / 1e3
        by_op[e.name] += ms
        buckets[_engine_bucket(e, gemm_name)] += ms
    return dict(buckets), dict(by_op)


def _engine_bucket(event, gemm_name: dict[int, str]) -> str:
    for e in _ancestors(event):
        if id(e) in gemm_name:
            return gemm_name[id(e)]
        if "layer_norm" in e.name:
            return "LayerNorm"
        if "gelu" in e.name:
            return "GELU"
        if e.name == "dcvit::attention_block":
            return "attention core"
    return "other"


def spec_gemms(spec) -> list[str]:
    """The FullyConnected layers of the spec in graph order (the head and any other at the end)."""
    names = []
    for block in spec.blocks:
        names += ["qkv", "proj"] if block.attn is not None else []
        names += ["fc1", "fc2"] if block.mlp_hidden else []
    return names


def openvino_buckets(runner, images, spec) -> tuple[dict[str, float], dict[str, float]]:
    """ms per bucket, and ms per OpenVINO layer type (with its kernel), from the performance
    counters of the last of WARMUP + 1 inferences (the counters are per inference)."""
    for _ in range(WARMUP + 1):
        runner(images)
    infos = [p for p in runner.request(tuple(images.shape)).get_profiling_info()
             if p.status.name == "EXECUTED"]
    expected = spec_gemms(spec)
    fcs = [p for p in infos if p.node_type == "FullyConnected"]
    # the spec's GEMMs first, then the head(s): more or fewer than that is unmatched
    matched = len(expected) <= len(fcs) <= len(expected) + 2
    buckets: dict[str, float] = defaultdict(float)
    by_type: dict[str, float] = defaultdict(float)
    in_attention, fc_index = False, 0
    for p in infos:
        ms = p.real_time.total_seconds() * 1e3
        by_type[f"{p.node_type} ({p.exec_type})"] += ms
        if p.node_type == "FullyConnected":
            name = (expected[fc_index] if fc_index < len(expected) else "other") if matched \
                else "GEMM (unmatched)"
            fc_index += 1
            in_attention = name == "qkv"
            buckets[name if name in BUCKETS or name == "GEMM (unmatched)" else "other"] += ms
        elif in_attention:
            buckets["attention core"] += ms
        elif p.node_type in ("MVN", "LayerNorm", "RMS"):
            buckets["LayerNorm"] += ms
        elif p.node_type == "Gelu":
            buckets["GELU"] += ms
        else:
            buckets["other"] += ms
    return dict(buckets), dict(by_type)


def _print_table(title: str, values: dict[str, float], top: int = 12) -> None:
    print(title)
    for name, ms in sorted(values.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {name:48} {ms:9.3f} ms")


def profile_cell(reference, dtype: torch.dtype, batch: int, backend: str = "cpu", label: str = "") -> dict:
    """Prints and returns the bucket comparison for one model (a ViTReference), dtype and batch."""
    spec = reference.spec
    images = torch.randn(batch, spec.in_chans, *spec.img_size, dtype=dtype)
    engine = build_engine(reference, backend=backend, dtype=dtype, device="cpu")
    engine_ms, engine_ops = engine_buckets(engine, images)
    with tempfile.TemporaryDirectory(prefix="dcvit-profile-") as folder:
        export = export_when_needed(reference, folder, ["openvino"])
        openvino = open_peers(*export, dtype, torch.get_num_threads(), ["openvino"], profile=True)["openvino"]
        if isinstance(openvino, Unavailable):
            ov_ms, ov_layers = {}, {}
            print(f"OpenVINO unavailable: {openvino.reason}")
        else:
            ov_ms, ov_layers = openvino_buckets(openvino, images, spec)
    peak = matmul_peak_tflops(torch.device("cpu"), dtype)
    floor_ms = 2 * count_macs(spec).total * batch / (peak * 1e12) * 1e3
    print(f"\n{label} {str(dtype).removeprefix('torch.')} batch {batch}, {torch.get_num_threads()} threads "
          f"(one forward each; engine: torch.profiler self CPU time, OpenVINO: PERF_COUNT real time)")
    names = list(BUCKETS) + sorted(set(ov_ms) - set(BUCKETS))
    print(f"  {'bucket':18} {'engine ms':>10} {'OpenVINO ms':>12} {'engine / OV':>11}")
    for name in names:
        e, o = engine_ms.get(name, 0.0), ov_ms.get(name)
        ratio = f"{e / o:11.2f}" if o else f"{'-':>11}"
        print(f"  {name:18} {e:10.3f} {'-' if o is None else f'{o:.3f}':>12} {ratio}")
    total_e, total_o = sum(engine_ms.values()), sum(ov_ms.values())
    print(f"  {'total':18} {total_e:10.3f} {total_o:12.3f}")
    print(f"  floor: {2 * count_macs(spec).total * batch / 1e9:.2f} GFLOP at the measured GEMM peak "
          f"{peak:.2f} TFLOP/s ({str(dtype).removeprefix('torch.')}) = {floor_ms:.3f} ms\n")
    _print_table("engine, by op (self CPU time):", engine_ops)
    if ov_layers:
        _print_table("OpenVINO, by layer type (kernel):", ov_layers)
    return dict(engine=engine_ms, openvino=ov_ms, floor_ms=floor_ms, peak_tflops=peak)
