"""Code-generation gate: every Triton kernel compiled ahead of time for sm_90 and sm_80 without a
GPU, with exactly the launch configurations the engine picks on CUDA, and read back from ptxas
and the SASS; the CUDA kernels of the built extension read back with cuobjdump.

How a kernel gets here: each workload below calls the engine's real launcher
(`mlp_block_triton`, `attention_block_triton`, `tome_merge_triton`, ...) on fake CUDA
tensors (torch's FakeTensorMode: shapes, strides and dtypes, no memory, no GPU) with a
`launch` function that records each launch instead of running it; a launcher that asks for the
arch (torch.cuda.get_device_capability, or triton's driver target) is told the one being compiled
for. So the tile configs are
whatever the launchers choose on CUDA today (`gemm_tile_config`, the autotuner's configs,
`_attention_tile_config`, the token-merge blocks), never copies. Each recorded launch is then
compiled through the kernel's own `JITFunction.warmup(...)` against a fake driver that reports
GPUTarget("cuda", arch, 32), so the JIT's real argument specialization applies.

Per kernel and arch: compiles (or the first error line), registers, spill bytes (ptxas -v),
shared memory, tensor-core instructions (HGMMA on sm_90, HMMA on sm_80), and in the main loop
(the loop with the most tensor-core instructions, else the one with the most global loads):
instructions per iteration, the widest and narrowest global load, cp.async (LDGSTS) and TMA
(UTMALDG). Every threshold lives in RULES; a rule is a "gate" (fails) or a "target" (reported,
for the kernel-speed issue to meet and then promote).

Usage: python benchmarks/codegen_report.py [--out DIR] [--arch 90 --arch 80] [--jobs N]
           [--only SUBSTRING] [--no-cuda]
Writes DIR/codegen.csv; prints a table and every gate failure; exit status 1 on a gate failure.
TRITON_INTERPRET is removed before triton is imported (the compile needs the real JIT).
"""
import argparse
import collections
import concurrent.futures
import contextlib
import csv
import glob
import importlib.machinery
import io
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# ---- thresholds: the one place (the kernel-speed issue tightens these) ------------------
# kinds: which kernels a rule applies to (see KERNEL_KINDS); archs: which targets; level:
# "gate" fails the run, "target" is reported as missed. To promote a met target, change its level.
RULES = {
    "compiles": dict(level="gate", kinds=None, archs=None),
    "no_spills": dict(level="gate", kinds=None, archs=None, max_spill_bytes=0),
    # sm_90: the main loop must issue wgmma (HGMMA); mma.sync (HMMA) there is the slow fall-back
    # (a tile/warp shape Triton cannot map to warpgroups) and fails. sm_80 has only HMMA.
    "tensor_cores_in_main_loop": dict(level="gate", kinds=("gemm", "attention"), archs=None,
                                      loop_count={90: "loop_hgmma", 80: "loop_tc"}),
    "shared_memory_fits": dict(level="gate", kinds=None, archs=(90,)),
    # sm_80 has 164 KiB; triton.autotune skips a config that does not fit, so only reported
    "shared_memory_fits_sm80": dict(level="target", kinds=None, archs=(80,)),
    "attention_loop_instructions": dict(level="target", kinds=("attention",), archs=(90,), max=500),
    "attention_async_16B_loads": dict(level="target", kinds=("attention",), archs=(90,), min_bits=128),
    # LayerNorm out of the GEMM loop: fc1/qkv K-step within 1.2x of the plain fc2/proj GEMM's
    "norm_gemm_loop_vs_plain_gemm": dict(level="target", kinds=("gemm",), archs=(90,), max_ratio=1.2),
    # CUDA row kernels: no scalar 2-byte global loads in their main loops
    "cuda_no_scalar_16bit_loads": dict(level="target", kinds=("cuda",), archs=(90,), min_bits=32),
}
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}  # opt-in max dynamic shared memory per block
KERNEL_KINDS = {"_norm_linear_kernel": "gemm", "_linear_residual_kernel": "gemm",
                "_flash_attention_kernel": "attention", "_tome_best_match_kernel": "match"}
PLAIN_GEMM = {"_norm_linear_kernel": "_linear_residual_kernel"}  # norm GEMM -> its plain twin
# A gate rule a kernel variant is known to break, with the reason and the issue that fixes it:
# (rule, kernel, substring of its variant) -> reason. Reported as "waived: ..." in `missed`,
# never silently. Keep this empty; an entry is a debt that the report shows on every run.
WAIVERS = {}

# ---- workloads: DeiT-S / DeiT-B shapes through the real launchers -----------------------
BATCH, TOKENS = 256, 197
MODELS = {"deit_s": 384, "deit_b": 768}  # embed dim; heads of 64, MLP hidden 4D


def _workloads(dim):
    """(name, fn(tensor_factory, launcher)) per shape family; fn calls one real launcher."""
    from dcvit_engine.kernels import attention as at
    from dcvit_engine.kernels import mlp_block as mb
    from dcvit_engine.kernels import token_merge as tm

    heads = dim // 64

    def mlp(hidden, act="gelu", gated=False, inner_norm=False):
        def run(t, launch):
            width = 2 * hidden if gated else hidden
            inner = dict(inner_norm_weight=t(hidden), inner_norm_bias=t(hidden)) if inner_norm else {}
            mb.mlp_block_triton(t(BATCH, TOKENS, dim), t(dim), t(dim), t(width, dim), t(width),
                                t(dim, hidden), t(dim), gamma=t(dim), act=act, gated=gated,
                                launch=launch, **inner)
        return run

    def attention(qk_dims, v_dims, key_bias=False, tokens=TOKENS, eva=()):
        # eva: EvaAttention parts ("qk_norm", "rope", "rope_index", "inner_norm")
        def run(t, launch):
            qk, v = sum(qk_dims), sum(v_dims)
            parts = {}
            if "qk_norm" in eva:
                parts.update(q_norm_weight=t(qk_dims[0]), q_norm_bias=t(qk_dims[0]),
                             k_norm_weight=t(qk_dims[0]), k_norm_bias=t(qk_dims[0]))
            if "rope" in eva:
                parts.update(rope_cos=t(tokens, qk, dtype="float32"), rope_sin=t(tokens, qk, dtype="float32"))
            if "rope_index" in eva:
                parts.update(rope_index=t(BATCH, tokens, dtype="int64"))
            if "inner_norm" in eva:
                parts.update(inner_norm_weight=t(v), inner_norm_bias=t(v))
            at.attention_block_triton(
                t(BATCH, tokens, dim), t(dim), t(dim), t(2 * qk + v, dim), t(2 * qk + v), t(dim, v), t(dim),
                list(qk_dims), list(v_dims), 0.125, gamma=t(dim),
                key_bias=t(BATCH, tokens) if key_bias else None, launch=launch, **parts)
        return run

    def tome(r, with_size):
        def run(t, launch):
            tm.tome_merge_triton(t(BATCH, TOKENS, dim), t(BATCH, TOKENS, 64), r,
                                 t(BATCH, TOKENS, 1) if with_size else None, launch=launch)
        return run

    def atme(axis):
        def run(t, launch):
            merged, _, _ = tm.atme_merge_triton(t(BATCH, TOKENS, dim), t(BATCH, TOKENS, 64), (14, 14), axis,
                                                1, t(BATCH, TOKENS, 1), launch=launch)
            tm.atme_unmerge_triton(merged, (14, 14), axis, 1, launch=launch)
        return run

    ragged_qk = [64, 48, 32, 64, 16, 64][: heads] * (2 if heads > 6 else 1)
    ragged_v = [64, 32, 48, 16, 64, 64][: heads] * (2 if heads > 6 else 1)
    return [
        ("mlp", mlp(4 * dim)),
        ("mlp_half", mlp(2 * dim)),
        ("mlp_ragged", mlp(int(4 * dim * 0.37))),  # a DC-ViT resized MLP: no multiple of 16
        ("mlp_gelu_tanh", mlp(4 * dim, "gelu_tanh")),
        ("mlp_quick_gelu", mlp(4 * dim, "quick_gelu")),  # CLIP
        # SwiGLU (EVA-02, PE): hidden 8D/3 per half, fc1 both halves in one GEMM
        ("mlp_swiglu", mlp(8 * dim // 3, "silu", gated=True)),
        ("mlp_swiglu_norm", mlp(8 * dim // 3, "silu", gated=True, inner_norm=True)),
        ("mlp_swiglu_ragged", mlp(int(8 * dim // 3 * 0.37), "silu", gated=True)),
        ("mlp_gelu_norm", mlp(4 * dim, "gelu", inner_norm=True)),
        ("attn_dense", attention([64] * heads, [64] * heads)),
        ("attn_half_width", attention([32] * heads, [32] * heads)),
        ("attn_half_heads", attention([64] * (heads // 2), [64] * (heads // 2))),
        ("attn_ragged_x16", attention(ragged_qk, ragged_v)),  # UVC widths padded to 16
        ("attn_ragged", attention([w - 3 for w in ragged_qk], [w - 5 for w in ragged_v])),
        ("attn_tome_prop", attention([64] * heads, [64] * heads, key_bias=True, tokens=TOKENS - 16)),
        # EvaAttention (EVA-02, DINOv3): q/k-norm and RoPE on the qkv rows, the inner norm
        ("attn_eva", attention([64] * heads, [64] * heads,
                               eva=("qk_norm", "rope", "rope_index", "inner_norm"))),
        ("attn_eva_ragged", attention([w - 2 for w in ragged_qk], [w - 5 for w in ragged_v],
                                      eva=("rope", "inner_norm"))),
        ("tome_r16", tome(16, True)),
        ("tome_r16_nosize", tome(16, False)),
        ("atme_w", atme("w")),
        ("atme_h", atme("h")),
    ]


def collect_launches(dtypes=("bf16", "fp16"), archs=(90, 80), only=None, every_shape=True):
    """Every distinct (kernel, specialization, constexprs) the workloads launch on CUDA, as
    dicts: kernel (JITFunction), args (dtypes for tensors), kwargs, names (workloads), dtype.
    every_shape=False keeps one shape per (kernel, dtypes, constexprs): the int arguments'
    divisibility changes masks and addressing, rarely registers or tensor-core use."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dcvit_engine.dtypes import SHORT_DTYPES

    # launchers ask whether a CUDA graph is being captured and which arch runs: no GPU answers
    torch.cuda.is_current_stream_capturing = lambda: False
    launches = collections.OrderedDict()
    for arch, short in [(arch, short) for arch in archs for short in dtypes]:
        torch.cuda.get_device_capability = lambda device=None, arch=arch: divmod(arch, 10)
        if _DRIVER is not None:  # launchers may ask triton's driver for the target instead
            _DRIVER.arch = arch
        model_dtype = SHORT_DTYPES[short]
        for model, dim in MODELS.items():
            for name, run in _workloads(dim):
                label = f"{model}/{name}"
                if only and not any(o in f"{label}/{short}" for o in only):
                    continue
                def t(*shape, dtype=None, model_dtype=model_dtype):
                    return torch.empty(*shape, dtype=getattr(torch, dtype) if dtype else model_dtype,
                                       device="cuda")
                recorded = []
                with FakeTensorMode(allow_non_fake_inputs=True):
                    run(t, _recorder(recorded))
                for kernel, args, kwargs in recorded:
                    args = tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args)
                    # a kernel's dtype is its data's: index-only or fp32 kernels are the same
                    # binary for every model dtype and are compiled once
                    kinds = {a for a in args if isinstance(a, torch.dtype)}
                    dtype = next((n for n in ("bf16", "fp16", "fp32") if SHORT_DTYPES[n] in kinds), "int")
                    spec = (_spec_key(args) if every_shape
                            else tuple(str(a) for a in args if not isinstance(a, (int, float))))
                    key = (arch, kernel.__name__, spec, tuple(sorted(kwargs.items())))
                    entry = launches.setdefault(key, dict(kernel=kernel, args=args, kwargs=kwargs,
                                                          names=[], dtype=dtype, arch=arch))
                    if label not in entry["names"]:
                        entry["names"].append(label)
    return list(launches.values())


def _recorder(recorded):
    """A `launch` function that records launches; an autotuned kernel gives one per config."""
    def launcher(kernel):
        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    configs = getattr(kernel, "configs", None)
                    if configs is None:
                        recorded.append((kernel, args, kwargs))
                        return
                    for cfg in configs:  # triton.autotune: every config it may pick
                        recorded.append((kernel.fn, args, {**kwargs, **cfg.kwargs, "num_warps": cfg.num_warps,
                                                           "num_stages": cfg.num_stages}))
                return launch
        return Grid()
    return launcher


def _spec_key(args):
    # what the JIT specializes an int on (divisible by 16, equal to 1); floats are runtime values
    return tuple(("i", a % 16 == 0, a == 1) if isinstance(a, int) and not isinstance(a, bool)
                 else ("f",) if isinstance(a, float) else str(a) for a in args)


def config_text(kwargs):
    tiles = [f"{k.replace('BLOCK_', '')}{v}" for k, v in kwargs.items()
             if k.startswith(("BLOCK", "GROUP"))]
    text = " ".join(tiles + [f"w{kwargs.get('num_warps', 4)}", f"s{kwargs.get('num_stages', 3)}"])
    return text.replace("GROUP_", "G")


def variant_text(kwargs):
    return " ".join(f"{k}={v}" for k, v in kwargs.items()
                    if k.isupper() and not k.startswith(("BLOCK", "GROUP", "DOT_")))


# ---- compiling without a GPU ------------------------------------------------------------

def _tools_dir():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _install_fake_driver():
    import torch
    from triton.backends import DriverBase
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class FakeCudaDriver(DriverBase):
        """Enough of a driver for the JIT to specialize and compile; it never launches.
        The arch doubles as the device id, so each arch gets its own JIT cache."""
        arch = 90

        @staticmethod
        def is_active():
            return True

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError

        def get_current_target(self):
            return GPUTarget("cuda", self.arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError

        def get_current_device(self):
            return self.arch

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

    fake = FakeCudaDriver()
    driver.set_active(fake)
    import triton
    nvidia_knobs = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if nvidia_knobs is not None and hasattr(nvidia_knobs, "dump_ptxas_log"):
        nvidia_knobs.dump_ptxas_log = True
    return fake


_LAUNCHES = []  # set before the worker processes fork
_DRIVER = None


def _compile_one(index, arch):
    """One launch for one arch -> a report row (runs in a worker process)."""
    launch = _LAUNCHES[index]
    _DRIVER.arch = arch
    row = dict(arch=arch, kernel=launch["kernel"].__name__, dtype=launch["dtype"],
               config=config_text(launch["kwargs"]), variant=variant_text(launch["kwargs"]),
               workloads=" ".join(launch["names"]))
    start = time.time()
    ptxas_log = io.StringIO()
    try:
        with contextlib.redirect_stdout(ptxas_log):  # triton prints its own `ptxas -v` log here
            compiled = launch["kernel"].warmup(*launch["args"], grid=(1,), **launch["kwargs"])
    except Exception as exc:  # a compile error is a finding: kernel, config, first error line
        lines = [ln.strip() for ln in f"{type(exc).__name__}: {exc}".splitlines() if ln.strip()]
        first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "unknown error")
        row.update(compiles=False, error=first[:300], compile_s=round(time.time() - start, 1))
        return row
    row.update(compiles=True, error="", compile_s=round(time.time() - start, 1))
    metadata = compiled.metadata
    metadata = metadata._asdict() if hasattr(metadata, "_asdict") else dict(metadata)
    row["smem_bytes"] = metadata.get("shared", 0)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        log = ptxas_log.getvalue()
        if "registers" not in log:  # a triton without the ptxas-log knob: run ptxas -v once more
            target = re.search(r"^\.target\s+(\S+)", compiled.asm["ptx"], re.M).group(1)
            log = _run([os.path.join(_tools_dir(), "ptxas"), "-v", f"-arch={target}", ptx, "-o", os.devnull])
        row.update(_ptxas_facts(log))
        row.update(sass_facts(_run([os.path.join(_tools_dir(), "nvdisasm"), "-c", cubin])))
    return row


def _run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True)
    return done.stdout + done.stderr


def _ptxas_facts(log):
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(regs=int(regs.group(1)) if regs else None,
                spill_bytes=int(spill.group(1)) + int(spill.group(2)) if spill else None)


# ---- reading SASS -----------------------------------------------------------------------

_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*)")


def parse_sass(text):
    """[(address, opcode, operands)] and {label: address} from nvdisasm/cuobjdump SASS."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        label = re.match(r"^\s*\.?(L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        m = _INSTR.match(line)
        if m:
            address = int(m.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            instrs.append((address, m.group(2), m.group(3)))
    return instrs, labels


def _load_bits(opcode):
    if not opcode.startswith(("LDG", "LDGSTS")):
        return None
    for suffix, bits in ((".128", 128), (".64", 64), (".U16", 16), (".S16", 16), (".U8", 8), (".S8", 8)):
        if suffix in opcode:
            return bits
    return 32


def _is_tensor_core(opcode):
    return opcode.startswith(("HGMMA", "HMMA"))


def _is_wgmma(opcode):
    return opcode.startswith("HGMMA")


def sass_facts(text):
    """Tensor-core instructions, cp.async/TMA, and the main loop's instructions and loads."""
    instrs, labels = parse_sass(text)
    loops = []
    for address, opcode, operands in instrs:
        if not opcode.startswith("BRA"):
            continue
        # nvdisasm names branch targets (.L_x_3), cuobjdump gives addresses (0x5d0)
        label = re.search(r"`?\(?\.?(L_x_\d+)", operands)
        number = re.match(r"\s*(0x[0-9a-f]+)", operands)
        target = labels.get(label.group(1)) if label else int(number.group(1), 16) if number else None
        if target is not None and target < address:
            loops.append([i for i in instrs if target <= i[0] <= address])
    facts = dict(tc_instructions=sum(_is_tensor_core(op) for _, op, _ in instrs),
                 cp_async=any(op.startswith("LDGSTS") for _, op, _ in instrs),
                 tma=any(op.startswith("UTMALDG") for _, op, _ in instrs))

    def weight(body):
        return (sum(_is_tensor_core(op) for _, op, _ in body),
                sum(_load_bits(op) is not None or op.startswith("UTMALDG") for _, op, _ in body), -len(body))
    main = max(loops, key=weight, default=None)
    if main is None or weight(main)[:2] == (0, 0):
        return dict(facts, loop_instructions=None, loop_tc=0, loop_hgmma=0, loop_widest_load_bits=None,
                    loop_narrowest_load_bits=None, loop_cp_async=False, loop_tma=False)
    bits = [b for b in (_load_bits(op) for _, op, _ in main) if b is not None]
    return dict(facts, loop_instructions=len(main), loop_tc=weight(main)[0],
                loop_hgmma=sum(_is_wgmma(op) for _, op, _ in main),
                loop_widest_load_bits=max(bits, default=None),
                loop_narrowest_load_bits=min(bits, default=None),
                loop_cp_async=any(op.startswith("LDGSTS") for _, op, _ in main),
                loop_tma=any(op.startswith("UTMALDG") for _, op, _ in main))


# ---- CUDA kernels of the built extension ------------------------------------------------

def cuda_rows(archs):
    """Rows for the CUDA kernels in dcvit_engine/_C*.so, or (rows=[], reason) when it has none."""
    # the extension this interpreter imports (a py3.11 and a py3.12 build may sit side by side)
    libs = [path for suffix in importlib.machinery.EXTENSION_SUFFIXES
            for path in glob.glob(os.path.join(ROOT, "dcvit_engine", "_C" + suffix))]
    if not libs:
        return [], "no built extension (dcvit_engine/_C*.so): run the README's install first"
    cuobjdump = os.path.join(_tools_dir(), "cuobjdump")
    rows = []
    for arch in archs:
        usage = _run([cuobjdump, "-res-usage", "-arch", f"sm_{arch}", libs[0]])
        sass = _run([cuobjdump, "-sass", "-arch", f"sm_{arch}", libs[0]])
        functions = re.findall(r"Function ([^\s:]+):\s*\n\s*"
                               r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
        bodies = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S))
        seen = set()
        for name, regs, stack, shared, local in functions:
            # a kernel from a header shared by several .cu files is in several cubins: once here
            if ("dcvit" not in name and "cuda" not in name.lower()) or name in seen:
                continue
            seen.add(name)
            row = dict(arch=arch, kernel=_demangle(name), dtype=_cuda_dtype(name), config="", variant="",
                       workloads="csrc/cuda", compiles=True, error="", compile_s=0.0, regs=int(regs),
                       spill_bytes=int(local) + int(stack), smem_bytes=int(shared))
            row.update(sass_facts(bodies.get(name, "")))
            rows.append(row)
    if not rows:
        return [], (f"{os.path.basename(libs[0])} holds no CUDA kernels for "
                    f"sm_{'/sm_'.join(map(str, archs))} "
                    "(a CPU-only build, e.g. DCVIT_BUILD_CUDA=0 or no nvcc): CUDA part skipped")
    return rows, ""


def _demangle(name):
    """'void dcvit::(anonymous namespace)::ln_kernel<c10::BFloat16>(...)' -> 'ln_kernel'."""
    text = _run(["c++filt", name]).strip() or name
    text = text.replace("(anonymous namespace)::", "").removeprefix("void ")
    text = text.split("(")[0].split("<")[0]
    return text.removeprefix("dcvit::")


def _cuda_dtype(name):
    if "BFloat16" in name:
        return "bf16"
    if "Half" in name:
        return "fp16"
    scalar = re.search(r"I([fd])E", name)  # a float / double template argument
    return {"f": "fp32", "d": "fp64"}[scalar.group(1)] if scalar else "?"


# ---- rules ------------------------------------------------------------------------------

def kind_of(row):
    if row["workloads"] == "csrc/cuda":
        return "cuda"
    return KERNEL_KINDS.get(row["kernel"], "memory")


def evaluate(rows, rules=RULES, waivers=None):
    """Adds `gate` (failed gate rules) and `missed` (missed targets, waived gate rules) to each row."""
    waivers = WAIVERS if waivers is None else waivers
    plain_loop = {(r["arch"], r["dtype"], r["config"], r["kernel"]): r.get("loop_instructions")
                  for r in rows if r.get("compiles")}
    for row in rows:
        failed, missed = [], []
        for name, rule in rules.items():
            if rule["kinds"] is not None and kind_of(row) not in rule["kinds"]:
                continue
            if rule["archs"] is not None and row["arch"] not in rule["archs"]:
                continue
            if name != "compiles" and not row.get("compiles"):
                continue
            ok = _check(name, rule, row, plain_loop)
            if ok is False:
                waived = next((why for (rule_name, kernel, variant), why in waivers.items()
                               if rule_name == name and kernel == row["kernel"]
                               and variant in row["variant"]), None)
                if rule["level"] == "gate" and waived is None:
                    failed.append(name)
                else:
                    missed.append(name if waived is None else f"{name} (waived: {waived})")
        row["gate"] = " ".join(failed)
        row["missed"] = " ".join(missed)
    return rows


def _check(name, rule, row, plain_loop):
    if name == "compiles":
        return bool(row["compiles"])
    if name == "no_spills":
        return (row["dtype"] not in ("bf16", "fp16")
                or (row.get("spill_bytes") or 0) <= rule["max_spill_bytes"])
    if name == "tensor_cores_in_main_loop":
        # the count of the arch's own instruction: HGMMA on sm_90 (HMMA alone fails), HMMA on sm_80
        column = rule["loop_count"][row["arch"]]
        return row["dtype"] not in ("bf16", "fp16") or (row.get(column) or 0) > 0
    if name.startswith("shared_memory_fits"):
        return (row.get("smem_bytes") or 0) <= SHARED_MEMORY_LIMIT[row["arch"]]
    if name == "attention_loop_instructions":
        return row.get("loop_instructions") is not None and row["loop_instructions"] <= rule["max"]
    if name == "attention_async_16B_loads":
        return bool(row.get("loop_tma")) or (bool(row.get("loop_cp_async"))
                                             and (row.get("loop_widest_load_bits") or 0) >= rule["min_bits"])
    if name == "norm_gemm_loop_vs_plain_gemm":
        plain = plain_loop.get((row["arch"], row["dtype"], row["config"], PLAIN_GEMM.get(row["kernel"])))
        if row["kernel"] not in PLAIN_GEMM or not plain or not row.get("loop_instructions"):
            return None  # nothing to compare with
        return row["loop_instructions"] <= rule["max_ratio"] * plain
    if name == "cuda_no_scalar_16bit_loads":
        low = row.get("loop_narrowest_load_bits")
        return low is None or low >= rule["min_bits"]
    raise KeyError(f"rule {name} has no check")


# ---- report -----------------------------------------------------------------------------

COLUMNS = ["arch", "kernel", "dtype", "config", "variant", "compiles", "error", "regs", "spill_bytes",
           "smem_bytes", "tc_instructions", "loop_tc", "loop_hgmma", "loop_instructions",
           "loop_widest_load_bits", "loop_narrowest_load_bits", "loop_cp_async", "loop_tma", "cp_async",
           "tma", "compile_s", "gate", "missed", "workloads"]


def write_csv(rows, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def table(rows):
    head = (f"{'sm':>2} {'kernel':26} {'dt':4} {'config':30} {'regs':>4} {'spill':>5} {'smemKB':>6} "
            f"{'tc':>4} {'loop':>5} {'ldB':>4} {'cp.a':>4} gate / missed targets")
    lines = [head]
    for r in rows:
        if not r.get("compiles"):
            lines.append(f"{r['arch']:>2} {r['kernel'][:26]:26} {r['dtype']:4} {r['config'][:30]:30} "
                         f"COMPILE ERROR: {r['error'][:120]}")
            continue
        widest = r.get("loop_widest_load_bits")
        lines.append(
            f"{r['arch']:>2} {r['kernel'][:26]:26} {r['dtype']:4} {r['config'][:30]:30} "
            f"{r.get('regs') or 0:>4} {r.get('spill_bytes') or 0:>5} "
            f"{(r.get('smem_bytes') or 0) / 1024:>6.1f} {r.get('tc_instructions', 0):>4} "
            f"{r.get('loop_instructions') or '-':>5} {widest // 8 if widest else '-':>4} "
            f"{'yes' if r.get('loop_cp_async') else 'no':>4} "
            f"{('FAIL ' + r['gate']) if r['gate'] else 'ok'}{(' / ' + r['missed']) if r['missed'] else ''}")
    return "\n".join(lines)


# What each profile compiles: the model dtypes, and every shape or one per kernel variant.
# "full" is the report (benchmarks/RESULTS.md); "ci" is the gate on every push: every kernel
# variant and every tile config the engine or its autotuner may pick, in bf16, one shape per
# variant (fp16 compiles to the same registers and instructions within a few: see RESULTS.md).
# Kernels without bf16/fp16 data (index or fp32 kernels) are compiled once per arch.
PROFILES = {
    "full": dict(dtypes=("bf16", "fp16"), every_shape=True),
    "ci": dict(dtypes=("bf16",), every_shape=False),
}


def run_report(archs=(90, 80), jobs=None, only=None, with_cuda=True, profile="full"):
    """Compiles and reads every kernel; returns (rows, notes)."""
    global _LAUNCHES, _DRIVER
    if os.environ.pop("TRITON_INTERPRET", "0") == "1" and "triton" in sys.modules:
        raise RuntimeError("codegen_report: run it in a process without TRITON_INTERPRET=1")
    cache = tempfile.mkdtemp(prefix="codegen-triton-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache  # nothing is reused from an earlier run
    _DRIVER = _install_fake_driver()
    chosen = PROFILES[profile]
    _LAUNCHES = collect_launches(chosen["dtypes"], archs, only=only, every_shape=chosen["every_shape"])
    tasks = [(i, launch["arch"]) for i, launch in enumerate(_LAUNCHES)]
    jobs = jobs or os.cpu_count() or 1
    rows = []
    try:
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs,
                                                    mp_context=multiprocessing.get_context("fork")) as pool:
            rows = list(pool.map(_compile_one, *zip(*tasks))) if tasks else []
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    notes = [f"profile {profile}: {len(tasks)} Triton compiles (distinct launches on "
             f"sm_{'/sm_'.join(map(str, archs))}; {jobs} processes)"]
    if with_cuda:
        extra, reason = cuda_rows(archs)
        rows += extra
        notes.append(reason or f"{len(extra)} CUDA kernel rows from the built extension")
    else:
        notes.append("CUDA part skipped (--no-cuda)")
    return evaluate(rows), notes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="codegen_out")
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--only", action="append", help="workload substring, e.g. deit_b/mlp or /bf16")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels of the extension")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    args = parser.parse_args(argv)
    start = time.time()
    rows, notes = run_report(tuple(args.arch or (90, 80)), args.jobs, args.only, not args.no_cuda,
                             args.profile)
    path = os.path.join(args.out, "codegen.csv")
    write_csv(rows, path)
    import triton
    print(table(rows))
    failures = [r for r in rows if r["gate"]]
    print(f"\ntriton {triton.__version__}; " + "; ".join(notes)
          + f"; {time.time() - start:.0f} s; CSV: {path}")
    for r in failures:
        print(f"GATE FAILED sm_{r['arch']} {r['kernel']} {r['dtype']} [{r['config']}] {r['variant']}: "
              f"{r['gate']}" + (f" -- {r['error']}" if r["error"] else "")
              + f" (workloads: {r['workloads'][:120]})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
