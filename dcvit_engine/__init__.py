"""dcvit_engine: few-shot dense compression of Vision Transformers, run with fused kernels.

    import dcvit_engine as dv
    spec, weights = dv.from_timm(timm_model)        # any timm ViT/DeiT -> spec + weights
    dv.count_macs(timm_model)                       # every matmul, analytically
    student = dv.compress(timm_model, images, method="dcvit", target_macs=0.7)
    dv.save(student, "out/student"); student = dv.load("out/student")
    engine = dv.build_engine("out/student", dtype=torch.bfloat16, device="cuda")

Names are imported on first use, so `import dcvit_engine` stays light.
"""
import importlib

from dcvit_engine import _native  # noqa: F401  (loads the compiled ops, warns if it cannot)

__version__ = "0.1.0"

_EXPORTS = {
    "ViTSpec": "dcvit_engine.spec",
    "BlockSpec": "dcvit_engine.spec",
    "AttentionSpec": "dcvit_engine.spec",
    "MergeSpec": "dcvit_engine.spec",
    "SPEC_VERSION": "dcvit_engine.spec",
    "tokens_per_block": "dcvit_engine.spec",
    "count_macs": "dcvit_engine.macs",
    "MacsReport": "dcvit_engine.macs",
    "from_timm": "dcvit_engine.adapter",
    "spec_from_timm": "dcvit_engine.adapter",
    "UnsupportedModelError": "dcvit_engine.adapter",
    "ViTReference": "dcvit_engine.reference",
    "reference_from_timm": "dcvit_engine.reference",
    "save": "dcvit_engine.artifact",
    "load": "dcvit_engine.artifact",
    "load_spec": "dcvit_engine.artifact",
    "build_engine": "dcvit_engine.engine",
    "Engine": "dcvit_engine.engine",
    "run_inference": "dcvit_engine.infer",
    "resolve_model": "dcvit_engine.models",
    "measure_throughput": "dcvit_engine.throughput",
}
__all__ = sorted(_EXPORTS) + ["compress", "ops"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in ("compress", "ops"):
        # Subpackages; `compress` is also callable: dcvit_engine.compress(model, images, ...).
        return importlib.import_module(f"dcvit_engine.{name}")
    raise AttributeError(f"module 'dcvit_engine' has no attribute {name!r}")
