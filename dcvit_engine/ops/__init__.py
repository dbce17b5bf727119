"""Fused ops with one schema and several backends (torch, cpu, cuda, triton).

See dcvit_engine.ops.dispatch for how a backend is chosen.
"""
from dcvit_engine.ops.attention import attention_block, attention_block_backends
from dcvit_engine.ops.dispatch import BACKENDS, ENV_VAR, BackendUnavailableError
from dcvit_engine.ops.mlp_block import mlp_block, mlp_block_backends
from dcvit_engine.ops.token_merge import atme_merge, atme_unmerge, bipartite_merge, token_merge_backends

__all__ = ["BACKENDS", "ENV_VAR", "BackendUnavailableError", "mlp_block", "mlp_block_backends",
           "bipartite_merge", "atme_merge", "atme_unmerge", "token_merge_backends",
           "attention_block", "attention_block_backends"]
