"""count_macs: the per-image MACs of anything that has or is a spec.

The arithmetic is in spec_macs.py, which needs only the spec (layer 1); this module sits one
layer up, beside the timm adapter, because it also takes a timm model and reads its spec with
`adapter.spec_from_timm`. The arithmetic's names are re-exported so `dcvit_engine.macs` stays
the one place to import MACs from.
"""
from __future__ import annotations

import os

import torch.nn as nn

from .adapter import spec_from_timm
from .spec import ViTSpec
from .spec_macs import (
    AttnPoolMacs,
    BlockMacs,
    MacsReport,
    attention_macs,
    block_macs,
    mlp_macs,
    spec_macs,
)

__all__ = ["AttnPoolMacs", "BlockMacs", "MacsReport", "attention_macs", "block_macs", "count_macs",
           "mlp_macs", "spec_macs"]


def count_macs(obj) -> MacsReport:
    """Per-image MACs of a ViTSpec, a module carrying a `.spec` (the reference module,
    an engine), a timm VisionTransformer, or an artifact folder / spec JSON path."""
    if isinstance(obj, ViTSpec):
        return spec_macs(obj)
    if isinstance(obj, (str, os.PathLike)):
        return spec_macs(ViTSpec.load(obj))
    spec = getattr(obj, "spec", None)
    if isinstance(spec, ViTSpec):
        return spec_macs(spec)
    if isinstance(obj, nn.Module):
        return spec_macs(spec_from_timm(obj))
    raise TypeError(f"count_macs expects a ViTSpec, a timm VisionTransformer, a module with a "
                    f".spec, or an artifact path; got {type(obj).__name__}")
