"""Plain-PyTorch module built from a ViTSpec: the numerical reference for every backend.

Parameter names equal timm VisionTransformer's, so an uncompressed timm ViT state dict
loads with strict=True (an Eva model's through adapter.from_timm, which renames). Heads may
be ragged (per-head q/k and v widths, packed qkv as the spec contract says), branches may be
removed, and blocks may merge tokens. The engine shares this module's merge metric, merge
dispatch and head (merge_metric, merge_tokens, classify).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter import from_timm
from .errors import InputError
from .exportable_merge import bipartite_merge_static
from .kernels.attention import key_mean_ref
from .ops.token_merge import atme_merge, tome_merge
from .rope import apply_rope, rope_tables
from .spec import AttentionSpec, AttnPoolSpec, BlockSpec, MergeSpec, ViTSpec, merge_schedule


def _affine(module: nn.Module | None):
    """(weight, bias) of a LayerNorm / Linear, or None for a missing one."""
    return None if module is None else (module.weight, module.bias)


def merge_metric(keys: torch.Tensor, qk_dims, k_norm=None, eps: float = 1e-6) -> torch.Tensor:
    """ToMe's merge metric from the keys (B, N, sum(qk_dims)) before k_norm: the keys as
    attention uses them (after k_norm, a (weight, bias) pair or None) averaged over heads;
    heads of different widths cannot be averaged and are concatenated instead (the
    attention_block_key_mean op's second output; kernels/attention.py key_mean_ref)."""
    return key_mean_ref(keys, qk_dims, k_norm, eps)


def merge_tokens(spec: ViTSpec, merge: MergeSpec, grid, x: torch.Tensor, metric: torch.Tensor,
                 size: torch.Tensor | None, *, backend: str | None = None, exportable: bool = False):
    """A block's token merge; returns (x, size), size (B, N, 1) token counts. ToMe through
    ops.tome_merge, or with `exportable` its form that torch.export and ONNX take (the same
    numbers, tested in float64); ATME through ops.atme_merge on `grid`, the patch grid
    entering the block."""
    if merge.kind == "tome":
        if spec.reg_tokens:
            return _tome_beside_registers(spec, merge, x, metric, size, backend, exportable)
        if exportable:
            return bipartite_merge_static(x, metric, merge.r, size, class_token=spec.class_token,
                                          distill_token=spec.dist_token)
        return tome_merge(x, metric, merge.r, size, spec.class_token, spec.dist_token, backend=backend)
    x, size, _ = atme_merge(x, metric, grid, merge.axis, spec.num_prefix_tokens, size, backend=backend)
    return x, size


def _tome_beside_registers(spec: ViTSpec, merge: MergeSpec, x, metric, size, backend, exportable):
    """ToMe on a model with register tokens: the registers are prefix tokens that ToMe never
    sees (neither merged nor matched, size 1): they are set aside, the class token (if any) and
    the patches merge as in a model without registers, and the registers go back after the
    class token, so the prefix keeps its order. (A register token with a distillation token
    is no timm layout; the spec refuses it.)"""
    lead, regs = int(spec.class_token), spec.reg_tokens

    def without_registers(t):
        return torch.cat([t[:, :lead], t[:, lead + regs:]], dim=1)
    registers = x[:, lead:lead + regs]
    reg_size = size[:, lead:lead + regs] if size is not None else None
    inner = MergeSpec(kind="tome", r=merge.r)
    plain = dataclasses.replace(spec, reg_tokens=0, blocks=[])
    x, size = merge_tokens(plain, inner, None, without_registers(x), without_registers(metric),
                           None if size is None else without_registers(size), backend=backend,
                           exportable=exportable)
    if reg_size is None:
        reg_size = torch.ones(size.shape[0], regs, 1, dtype=size.dtype, device=size.device)
    return (torch.cat([x[:, :lead], registers, x[:, lead:]], dim=1),
            torch.cat([size[:, :lead], reg_size, size[:, lead:]], dim=1))


def pool_features(spec: ViTSpec, feats: torch.Tensor) -> torch.Tensor:
    """timm's pooling before the head: the class token, the mean of the patch tokens, or
    (global_pool '') every token."""
    if spec.global_pool == "token":
        return feats[:, 0]
    if spec.global_pool == "avg":
        return feats[:, spec.num_prefix_tokens:].mean(dim=1)
    return feats


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The spec's MLP activations (spec.ACTIVATIONS), as timm computes them."""
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {name!r}")


def attention_pool(spec: ViTSpec, feats: torch.Tensor, params: dict) -> torch.Tensor:
    """timm's AttentionPoolLatent (global_pool 'map') on the final tokens. params: the
    attn_pool.* tensors without the prefix (latent, q.weight, kv.weight, [q.bias, kv.bias],
    [q_norm.*, k_norm.*], proj.*, norm.*, mlp.fc1.*, mlp.fc2.*)."""
    pool: AttnPoolSpec = spec.attn_pool
    if not pool.include_prefix:
        feats = feats[:, spec.num_prefix_tokens:]
    batch, tokens, dim = feats.shape
    heads, eps = pool.num_heads, spec.norm_eps
    head_dim = dim // heads
    # k and v stay strided views of the kv projection: SDPA takes them as they are, where `@`
    # would copy both per head (a third of the head's time on the CPU at batch 64)
    latent = params["latent"].expand(batch, -1, -1)
    q = F.linear(latent, params["q.weight"], params.get("q.bias"))
    q = q.reshape(batch, pool.latent_len, heads, head_dim).transpose(1, 2)
    kv = F.linear(feats, params["kv.weight"], params.get("kv.bias"))
    k, v = kv.reshape(batch, tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if pool.qk_norm:
        q = F.layer_norm(q, (head_dim,), params["q_norm.weight"], params["q_norm.bias"], eps)
        k = F.layer_norm(k, (head_dim,), params["k_norm.weight"], params["k_norm.bias"], eps)
    x = F.scaled_dot_product_attention(q, k, v)
    x = x.transpose(1, 2).reshape(batch, pool.latent_len, dim)
    x = F.linear(x, params["proj.weight"], params["proj.bias"])
    y = F.layer_norm(x, (dim,), params["norm.weight"], params["norm.bias"], eps)
    y = activation(pool.mlp_act, F.linear(y, params["mlp.fc1.weight"], params["mlp.fc1.bias"]))
    x = x + F.linear(y, params["mlp.fc2.weight"], params["mlp.fc2.bias"])
    if pool.pool == "token":
        return x[:, 0]
    return x.mean(dim=1) if pool.pool == "avg" else x


def classify(spec: ViTSpec, feats: torch.Tensor, *, head=None, head_dist=None, fc_norm=None,
             attn_pool: dict | None = None):
    """timm's eval-mode output from the final tokens: for a distilled model the mean of the
    two heads, else pooling (pool_features, or attention_pool with the attn_pool tensors for
    global_pool 'map'), fc_norm and the head; head, head_dist and fc_norm are (weight, bias)
    pairs or None (no head: the pooled features)."""
    if spec.dist_token:
        x, x_dist = feats[:, 0], feats[:, 1]
        if head is not None:
            x, x_dist = F.linear(x, *head), F.linear(x_dist, *head_dist)
        return (x + x_dist) / 2
    if spec.global_pool == "map":
        if attn_pool is None:
            raise ValueError("global_pool 'map' needs the attn_pool tensors")
        x = attention_pool(spec, feats, attn_pool)
    else:
        x = pool_features(spec, feats)
    if fc_norm is not None:
        x = F.layer_norm(x, (spec.embed_dim,), *fc_norm, spec.norm_eps)
    return F.linear(x, *head) if head is not None else x


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class PatchEmbed(nn.Module):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        # timm builds the patch projection without bias exactly when pre_norm is on
        self.proj = nn.Conv2d(spec.in_chans, spec.embed_dim, spec.patch_size,
                              stride=spec.patch_size, bias=not spec.pre_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc2([norm](act(fc1(x)))); gated: fc1's rows are [gate | value] and the hidden is
    act(gate) * value (the spec contract)."""

    def __init__(self, dim: int, block: BlockSpec, norm_eps: float):
        super().__init__()
        hidden = block.mlp_hidden
        self.act, self.gated = block.mlp_act, block.mlp_gated
        self.fc1 = nn.Linear(dim, 2 * hidden if self.gated else hidden)
        self.norm = nn.LayerNorm(hidden, eps=norm_eps) if block.mlp_inner_norm else None
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.gated:
            gate, value = x.chunk(2, dim=-1)
            x = activation(self.act, gate) * value
        else:
            x = activation(self.act, x)
        if self.norm is not None:
            x = self.norm(x)
        return self.fc2(x)


class AttentionPool(nn.Module):
    """Holds timm AttentionPoolLatent's parameters under its names; computes attention_pool."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        pool, dim, eps = spec.attn_pool, spec.embed_dim, spec.norm_eps
        self.spec = spec
        self.latent = nn.Parameter(torch.zeros(1, pool.latent_len, dim))
        self.q = nn.Linear(dim, dim, bias=pool.qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=pool.qkv_bias)
        if pool.qk_norm:
            self.q_norm = nn.LayerNorm(dim // pool.num_heads, eps=eps)
            self.k_norm = nn.LayerNorm(dim // pool.num_heads, eps=eps)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, pool.mlp_hidden)
        self.mlp.fc2 = nn.Linear(pool.mlp_hidden, dim)

    def params(self) -> dict:
        return dict(self.named_parameters())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return attention_pool(self.spec, feats, self.params())


class Attention(nn.Module):
    """Multi-head self-attention over kept heads of possibly different widths.

    qkv rows are [q_0 | q_1 | ... | k_0 | k_1 | ... | v_0 | v_1 | ...]; proj columns
    follow the v heads. The softmax scale comes from the spec (the teacher's), not
    from the pruned width.
    """

    def __init__(self, dim: int, attn: AttentionSpec, norm_eps: float, prop_attn: bool,
                 rope: ViTSpec | None = None):
        super().__init__()
        self.qk_dims, self.v_dims = list(attn.qk_dims), list(attn.v_dims)
        self.scale = attn.scale
        self.prop_attn = prop_attn
        # RoPE (rope: the model's spec when it has one): each attention builds its tables, so
        # that calling a block alone rotates too; the prefix tokens stay unrotated
        self.rope_spec = rope
        self.rope_prefix = rope.num_prefix_tokens if rope is not None else 0
        self.rotate_half = rope is not None and rope.rope.rotate_half
        self.rope_freqs = None  # mixed RoPE: this block's learned frequencies (2, heads, dim // 2)
        if rope is not None and rope.rope.kind == "mixed":
            self.rope_freqs = nn.Parameter(torch.zeros(2, attn.num_heads, rope.rope.dim // 2))
        self.qkv = nn.Linear(dim, attn.qkv_out, bias=attn.qkv_bias)
        if attn.qk_norm:
            self.q_norm = nn.LayerNorm(attn.qk_dims[0], eps=norm_eps)
            self.k_norm = nn.LayerNorm(attn.qk_dims[0], eps=norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.norm = nn.LayerNorm(attn.v_total, eps=norm_eps) if attn.inner_norm else None
        self.proj = nn.Linear(attn.v_total, dim, bias=attn.proj_bias)

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None, return_keys: bool = False):
        """Attention output; with return_keys also the token-merge metric (see merge_metric)."""
        qk_total = sum(self.qk_dims)
        q, k, v = self.qkv(x).split([qk_total, qk_total, sum(self.v_dims)], dim=-1)
        rope = None
        if self.rope_spec is not None:  # (N, d) tables, or (heads, N, d) for mixed RoPE
            rope = rope_tables(self.rope_spec, layout="spec", dtype=x.dtype, device=x.device,
                               freqs=self.rope_freqs)
        out = self._heads(q, k, v, size, rope)
        return (out, self.merge_metric(k)) if return_keys else out

    def merge_metric(self, k: torch.Tensor) -> torch.Tensor:
        """ToMe's merge metric of keys k (see the module-level merge_metric)."""
        eps = self.k_norm.eps if self.k_norm is not None else 1e-6
        return merge_metric(k, self.qk_dims, _affine(self.k_norm), eps)

    def _heads(self, q, k, v, size, rope):
        bias = None
        if self.prop_attn and size is not None:
            # proportional attention: a key standing for s merged tokens gets weight s
            bias = size.log().reshape(size.shape[0], 1, -1)
        if len(set(self.qk_dims)) == 1 and len(set(self.v_dims)) == 1:
            # equal widths: all heads in one batched matmul (B, H, N, d)
            batch, tokens, heads = q.shape[0], q.shape[1], len(self.qk_dims)
            q, k, v = (t.reshape(batch, tokens, heads, -1).transpose(1, 2) for t in (q, k, v))
            out = self._attend(q, k, v, None if bias is None else bias.unsqueeze(1), rope)
            return self._project(out.transpose(1, 2).reshape(batch, tokens, -1))
        per_head = [rope] * len(self.qk_dims)
        if rope is not None and self.rope_freqs is not None:
            per_head = list(zip(*rope))  # mixed: head h rotates with its own tables
        heads = [self._attend(qh, kh, vh, bias, rh) for qh, kh, vh, rh in zip(
            q.split(self.qk_dims, -1), k.split(self.qk_dims, -1), v.split(self.v_dims, -1), per_head)]
        return self._project(torch.cat(heads, dim=-1))

    def _project(self, out: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(out) if self.norm is not None else out)

    def _rotate(self, t: torch.Tensor, rope) -> torch.Tensor:
        """RoPE on the patch tokens (dim -2 past the prefix) of q or k, as timm."""
        n = self.rope_prefix
        return torch.cat([t[..., :n, :], apply_rope(t[..., n:, :], *rope, self.rotate_half)], dim=-2)

    def _attend(self, q, k, v, bias, rope):
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self._rotate(q, rope), self._rotate(k, rope)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        return logits.softmax(dim=-1) @ v


class Block(nn.Module):
    """Pre-norm block split in its two residual halves, because a merge sits between them."""

    def __init__(self, spec: ViTSpec, block: BlockSpec):
        super().__init__()
        dim, eps = spec.embed_dim, spec.norm_eps
        self.merge = block.merge
        self.norm1 = self.attn = self.ls1 = None
        self.norm2 = self.mlp = self.ls2 = None
        if block.attn is not None:
            self.norm1 = nn.LayerNorm(dim, eps=eps)
            self.attn = Attention(dim, block.attn, eps, spec.prop_attn,
                                  spec if spec.rope is not None else None)
            self.ls1 = LayerScale(dim) if block.layer_scale else None
        if block.mlp_hidden:
            self.norm2 = nn.LayerNorm(dim, eps=eps)
            self.mlp = Mlp(dim, block, eps)
            self.ls2 = LayerScale(dim) if block.layer_scale else None

    def attention_residual(self, x: torch.Tensor, size: torch.Tensor | None,
                           return_keys: bool = False):
        """x + attention; with return_keys also the merge metric: the attention keys, or the
        tokens themselves in a block without attention."""
        if self.attn is None:
            return (x, x) if return_keys else x
        y = self.attn(self.norm1(x), size, return_keys=return_keys)
        y, metric = y if return_keys else (y, None)
        x = x + (self.ls1(y) if self.ls1 is not None else y)
        return (x, metric) if return_keys else x

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp is None:
            return x
        y = self.mlp(self.norm2(x))
        return x + (self.ls2(y) if self.ls2 is not None else y)


class ViTReference(nn.Module):
    """A timm-compatible ViT computed exactly as its spec says (eval semantics of timm)."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        # a private copy: editing the caller's spec later must not desync it from the weights
        self.spec = copy.deepcopy(spec.validate())
        dim = spec.embed_dim
        self.patch_embed = PatchEmbed(spec)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if spec.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if spec.dist_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, spec.reg_tokens, dim)) if spec.reg_tokens else None
        pos_len = spec.num_patches + (0 if spec.no_embed_class else spec.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, pos_len, dim) * 0.02) if spec.abs_pos_embed else None
        self.norm_pre = nn.LayerNorm(dim, eps=spec.norm_eps) if spec.pre_norm else None
        self.blocks = nn.ModuleList(Block(self.spec, b) for b in self.spec.blocks)
        self.norm = nn.LayerNorm(dim, eps=spec.norm_eps) if spec.final_norm else None
        self.attn_pool = AttentionPool(self.spec) if spec.attn_pool is not None else None
        self.fc_norm = nn.LayerNorm(dim, eps=spec.norm_eps) if spec.fc_norm else None
        has_head = spec.num_classes > 0
        self.head = nn.Linear(dim, spec.num_classes) if has_head else None
        self.head_dist = nn.Linear(dim, spec.num_classes) if has_head and spec.dist_token else None

    @classmethod
    def from_state(cls, spec: ViTSpec, state: dict[str, torch.Tensor]) -> "ViTReference":
        """The model of `spec` holding the tensors of `state` themselves (not copies; every
        name of state_shapes(spec), no other). Built on the meta device: no random init that
        the weights would overwrite."""
        with torch.device("meta"):
            model = cls(spec)
        model.load_state_dict(state, strict=True, assign=True)
        return model

    def _check_input(self, x: torch.Tensor) -> None:
        spec = self.spec
        expected = (spec.in_chans, *spec.img_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"expected images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) "
                             f"(in_chans, img_size of the spec), got {got}; resize the images")

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token)
                  if t is not None]
        if self.pos_embed is None:
            return torch.cat(prefix + [x], dim=1)
        if self.spec.no_embed_class:
            return torch.cat(prefix + [x + self.pos_embed], dim=1)
        return torch.cat(prefix + [x], dim=1) + self.pos_embed

    def _merge(self, i: int, x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor):
        """Apply block i's token merge with plain torch ops that torch.export and ONNX take;
        returns (x, size) with size (B, N, 1) token counts. metric: the block's keys (see
        Attention.merge_metric)."""
        grid = merge_schedule(self.spec)[i][2]  # the patch grid entering block i
        return merge_tokens(self.spec, self.spec.blocks[i].merge, grid, x, metric, size,
                            backend="torch", exportable=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm, (B, N, D) with N after all merges."""
        self._check_input(x)
        x = self._pos_embed(self.patch_embed(x))
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        size = None  # merged-token counts; None until the first merge (all ones)
        for i, block in enumerate(self.blocks):
            if block.merge is None:
                x = block.attention_residual(x, size)
            else:
                x, metric = block.attention_residual(x, size, return_keys=True)
                x, size = self._merge(i, x, size, metric)
            x = block.mlp_residual(x)
        return self.norm(x) if self.norm is not None else x

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return classify(self.spec, feats, head=_affine(self.head), head_dist=_affine(self.head_dist),
                        fc_norm=_affine(self.fc_norm),
                        attn_pool=None if self.attn_pool is None else self.attn_pool.params())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def state_shapes(spec: ViTSpec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a model with this spec has (timm names)."""
    with torch.device("meta"):
        module = ViTReference(spec)
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def reference_from_timm(model: nn.Module) -> ViTReference:
    """The reference module of a timm ViT, with its weights, on its device and dtype, in eval mode."""
    spec, state = from_timm(model)
    return ViTReference.from_state(spec, state).eval()
