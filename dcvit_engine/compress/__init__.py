"""Compression methods (one module per method) and the pieces they share: structure
planning, finetuning, the synthetic metric set, run checkpoints.

The package is also callable: `dcvit_engine.compress(model, images, method=..., target_macs=...)`
is `dcvit_engine.compress.api.compress`. Nothing is imported up front, so loading one
piece does not load every method.
"""
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .api import compress
        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
