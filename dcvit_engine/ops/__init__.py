"""Fused ops with one schema and several backends (torch, cpu, cuda, triton).

Each op is defined once with ops.define.define_op (its schema, reference, kernels, fake and
refusal reasons); dcvit_engine.ops.dispatch says how a backend is chosen.
"""
from dcvit_engine.ops.attention import (
    attention_block,
    attention_block_backends,
    attention_block_key_mean,
    attention_block_key_mean_backends,
)
from dcvit_engine.ops.define import OPS
from dcvit_engine.ops.dispatch import BACKENDS, ENV_VAR, PRIORITY, BackendUnavailableError
from dcvit_engine.ops.mlp_block import mlp_block, mlp_block_backends
from dcvit_engine.ops.token_merge import atme_merge, atme_unmerge, token_merge_backends, tome_merge

__all__ = ["BACKENDS", "ENV_VAR", "PRIORITY", "OPS", "BackendUnavailableError", "mlp_block",
           "mlp_block_backends", "tome_merge", "atme_merge", "atme_unmerge", "token_merge_backends",
           "attention_block", "attention_block_backends", "attention_block_key_mean",
           "attention_block_key_mean_backends"]
