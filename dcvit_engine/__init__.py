"""dcvit_engine: few-shot dense compression of Vision Transformers, run with fused kernels."""
from dcvit_engine import _native  # noqa: F401  (loads the compiled ops, warns if it cannot)

__version__ = "0.1.0"
