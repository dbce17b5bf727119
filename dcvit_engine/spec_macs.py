"""Analytic multiply-accumulate count of a ViT described by a spec (per image).

Every matmul is counted: patch embedding, qkv, QK^T, A.V, proj, fc1 (both halves of a gated
fc1), fc2, the attention-pool head (q, kv, QK^T, A.V, proj, its MLP), head and head_dist.
LayerNorm is reported separately (thop's convention: 2 ops per element, doubled for the affine
part) and is not in the total; so is RoPE (2 multiplies per rotated q/k element: x*cos and
rotate(x)*sin). Token merging is accounted
for through the token schedule; the matching cost of a merge itself is not counted
(as the ToMe paper counts it).

A spec alone decides the count, so this module imports only spec.py (layer 1);
`macs.count_macs` (layer 2) also takes a timm model, a module or an artifact path.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import InputError
from .spec import AttentionSpec, ViTSpec, final_tokens, merge_schedule

_LAYERNORM_MACS_PER_ELEMENT = 4  # thop: 2 * numel, times 2 with elementwise affine


@dataclass(frozen=True)
class BlockMacs:
    """MACs of one block. tokens enter the attention; mlp_tokens (after the merge) the MLP."""
    tokens: int
    mlp_tokens: int
    qkv: int
    qk: int        # Q K^T
    av: int        # A V
    proj: int
    fc1: int
    fc2: int
    layernorm: int  # norm1, q/k norms, attn.norm, norm2, mlp.norm (not in total)
    rope: int = 0   # rotary embedding of q and k (not in total)

    @property
    def attn(self) -> int:
        """The attention branch: qkv + QK^T + A.V + proj."""
        return self.qkv + self.qk + self.av + self.proj

    @property
    def mlp(self) -> int:
        return self.fc1 + self.fc2

    @property
    def total(self) -> int:
        return self.attn + self.mlp


@dataclass(frozen=True)
class AttnPoolMacs:
    """MACs of the attention-pool head (timm AttentionPoolLatent)."""
    q: int
    kv: int
    qk: int
    av: int
    proj: int
    mlp: int   # fc1 + fc2

    @property
    def total(self) -> int:
        return self.q + self.kv + self.qk + self.av + self.proj + self.mlp


@dataclass(frozen=True)
class MacsReport:
    patch_embed: int
    blocks: list[BlockMacs]
    head: int        # head plus head_dist
    layernorm: int   # every LayerNorm of the model; NOT part of total
    attn_pool: AttnPoolMacs | None = None  # global_pool 'map'
    rope: int = 0    # every rotary embedding; NOT part of total

    @property
    def total(self) -> int:
        pool = self.attn_pool.total if self.attn_pool is not None else 0
        return self.patch_embed + sum(b.total for b in self.blocks) + pool + self.head

    @property
    def attention_matmuls(self) -> int:
        """QK^T and A.V of all blocks and of the attention pool (what thop-style counters leave out)."""
        pool = self.attn_pool.qk + self.attn_pool.av if self.attn_pool is not None else 0
        return sum(b.qk + b.av for b in self.blocks) + pool

    @property
    def thop_style(self) -> int:
        """Linear + Conv + LayerNorm, no attention matmuls: what DC-ViT's bundled thop reports."""
        return self.total - self.attention_matmuls + self.layernorm

    def to_dict(self) -> dict:
        return {
            "total": self.total, "patch_embed": self.patch_embed, "head": self.head,
            "layernorm": self.layernorm, "rope": self.rope,
            "attn_pool": None if self.attn_pool is None else dict(asdict(self.attn_pool),
                                                                  total=self.attn_pool.total),
            "blocks": [dict(asdict(b), attn=b.attn, mlp=b.mlp, total=b.total) for b in self.blocks],
        }

    def summary(self) -> str:
        """A small per-block table, GMACs."""
        pool = f", attn_pool {self.attn_pool.total / 1e9:.4f}" if self.attn_pool is not None else ""
        rope = f", rope {self.rope / 1e9:.4f}" if self.rope else ""
        lines = [f"total {self.total / 1e9:.4f} GMACs (patch_embed {self.patch_embed / 1e9:.4f}{pool}, "
                 f"head {self.head / 1e9:.4f}; layernorm {self.layernorm / 1e9:.4f}{rope} not included)",
                 "block  tokens  attn_GMACs  mlp_GMACs"]
        for i, b in enumerate(self.blocks):
            tokens = f"{b.tokens}" if b.tokens == b.mlp_tokens else f"{b.tokens}->{b.mlp_tokens}"
            lines.append(f"{i:5d}  {tokens:>6}  {b.attn / 1e9:10.4f}  {b.mlp / 1e9:9.4f}")
        return "\n".join(lines)


def attention_macs(attn: AttentionSpec | None, embed_dim: int, tokens: int) -> int:
    """MACs of one attention branch (qkv, QK^T, A.V, proj) over `tokens` tokens."""
    if attn is None:
        return 0
    return (tokens * embed_dim * attn.qkv_out + tokens * tokens * attn.qk_total
            + tokens * tokens * attn.v_total + tokens * attn.v_total * embed_dim)


def mlp_macs(embed_dim: int, hidden: int, tokens: int, gated: bool = False) -> int:
    """MACs of one MLP branch (fc1 + fc2) over `tokens` tokens; a gated fc1 computes two halves."""
    return (3 if gated else 2) * tokens * embed_dim * hidden


def block_macs(spec: ViTSpec, index: int, tokens: int | None = None) -> BlockMacs:
    """MACs of block `index`; `.attn` is the attention-branch A, `.mlp` the MLP F.

    tokens defaults to the spec's own schedule. An explicit count ("what would this
    block cost with N tokens") is only meaningful for a block without a merge.
    """
    if not 0 <= index < spec.depth:
        raise IndexError(f"block index {index} out of range for a spec of depth {spec.depth}")
    if tokens is None:
        tokens, mlp_tokens, _ = merge_schedule(spec)[index]
    elif spec.blocks[index].merge is not None:
        raise InputError(f"block {index} merges tokens, so its MLP token count follows from "
                         "the spec's schedule; call block_macs without tokens")
    else:
        mlp_tokens = tokens
    return _block_macs(spec, index, tokens, mlp_tokens)


def _block_macs(spec: ViTSpec, index: int, tokens: int, mlp_tokens: int) -> BlockMacs:
    block, dim = spec.blocks[index], spec.embed_dim
    attn = block.attn
    layernorm = rope = 0
    if attn is not None:
        layernorm += tokens * dim
        if attn.qk_norm:
            layernorm += 2 * tokens * attn.qk_total
        if attn.inner_norm:
            layernorm += tokens * attn.v_total
        if spec.rope is not None:  # q and k of every patch token; prefix tokens are not rotated
            rope = 2 * 2 * (tokens - spec.num_prefix_tokens) * attn.qk_total
    if block.mlp_hidden:
        layernorm += mlp_tokens * dim
        if block.mlp_inner_norm:
            layernorm += mlp_tokens * block.mlp_hidden
    return BlockMacs(
        tokens=tokens, mlp_tokens=mlp_tokens,
        qkv=0 if attn is None else tokens * dim * attn.qkv_out,
        qk=0 if attn is None else tokens * tokens * attn.qk_total,
        av=0 if attn is None else tokens * tokens * attn.v_total,
        proj=0 if attn is None else tokens * attn.v_total * dim,
        fc1=(2 if block.mlp_gated else 1) * mlp_tokens * dim * block.mlp_hidden,
        fc2=mlp_tokens * block.mlp_hidden * dim,
        layernorm=_LAYERNORM_MACS_PER_ELEMENT * layernorm,
        rope=rope,
    )


def _head_inputs(spec: ViTSpec) -> int:
    """How many D-vectors reach the classifier (each head applies to every one)."""
    if spec.dist_token:
        return 2  # head on the class token, head_dist on the distillation token
    if spec.global_pool in ("token", "avg"):
        return 1
    if spec.global_pool == "map":
        return 1 if spec.attn_pool.pool else spec.attn_pool.latent_len
    return final_tokens(spec)


def _attn_pool_macs(spec: ViTSpec) -> tuple[AttnPoolMacs | None, int]:
    """(MACs, LayerNorm elements) of the attention-pool head, (None, 0) without one."""
    pool = spec.attn_pool
    if pool is None:
        return None, 0
    dim, latents = spec.embed_dim, pool.latent_len
    tokens = final_tokens(spec) - (0 if pool.include_prefix else spec.num_prefix_tokens)
    macs = AttnPoolMacs(q=latents * dim * dim, kv=tokens * dim * 2 * dim, qk=latents * tokens * dim,
                        av=latents * tokens * dim, proj=latents * dim * dim,
                        mlp=2 * latents * dim * pool.mlp_hidden)
    norm_elements = latents * dim + ((latents + tokens) * dim if pool.qk_norm else 0)
    return macs, norm_elements


def spec_macs(spec: ViTSpec) -> MacsReport:
    spec.validate()
    dim = spec.embed_dim
    blocks = [_block_macs(spec, i, t_in, t_out)
              for i, (t_in, t_out, _) in enumerate(merge_schedule(spec))]
    tokens_in, tokens_out = spec.num_prefix_tokens + spec.num_patches, final_tokens(spec)
    layernorm_elements = 0
    if spec.pre_norm:
        layernorm_elements += tokens_in * dim
    if spec.final_norm:
        layernorm_elements += tokens_out * dim
    if spec.fc_norm:
        layernorm_elements += _head_inputs(spec) * dim
    attn_pool, pool_norm_elements = _attn_pool_macs(spec)
    layernorm_elements += pool_norm_elements
    return MacsReport(
        patch_embed=spec.num_patches * dim * spec.in_chans * spec.patch_size ** 2,
        blocks=blocks,
        head=_head_inputs(spec) * dim * spec.num_classes,
        layernorm=_LAYERNORM_MACS_PER_ELEMENT * layernorm_elements + sum(b.layernorm for b in blocks),
        attn_pool=attn_pool,
        rope=sum(b.rope for b in blocks),
    )

