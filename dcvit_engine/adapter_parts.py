"""The timm adapter's readers of single parts: norms, activations, RoPE and the attention-pool head.

Each returns the spec's description of one timm module or raises UnsupportedModelError
naming the part and its module path (adapter.py assembles the whole model).
"""
from __future__ import annotations

import torch.nn as nn

from .errors import InputError
from .spec import AttnPoolSpec, RopeSpec


class UnsupportedModelError(InputError):
    """The model uses a feature the dcvit_engine spec cannot represent."""


def unsupported(feature: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"unsupported model: {feature}; dcvit_engine handles timm "
                                 "VisionTransformer / DeiT / Eva layouts (see the spec contract)")


def timm_classes() -> dict:
    try:
        from timm.layers import (
            Attention,
            AttentionPoolLatent,
            AttentionRope,
            GluMlp,
            LayerScale,
            Mlp,
            PatchEmbed,
            SwiGLU,
        )
        from timm.layers.activations import GELU, GELUTanh, QuickGELU, Swish
        from timm.layers.pos_embed_sincos import (
            RotaryEmbeddingCat,
            RotaryEmbeddingDinoV3,
            RotaryEmbeddingMixed,
        )
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.eva import Eva, EvaAttention, EvaBlock
        from timm.models.vision_transformer import Block, VisionTransformer
    except ImportError as err:  # pragma: no cover - timm is a dependency
        raise ImportError(f"the timm adapter needs timm installed: {err}") from None
    return dict(Attention=Attention, AttentionPoolLatent=AttentionPoolLatent, AttentionRope=AttentionRope,
                GluMlp=GluMlp, LayerScale=LayerScale, Mlp=Mlp, PatchEmbed=PatchEmbed, SwiGLU=SwiGLU,
                TimmGELU=GELU, GELUTanh=GELUTanh, QuickGELU=QuickGELU, Swish=Swish,
                RotaryEmbeddingCat=RotaryEmbeddingCat, RotaryEmbeddingDinoV3=RotaryEmbeddingDinoV3,
                RotaryEmbeddingMixed=RotaryEmbeddingMixed,
                VisionTransformerDistilled=VisionTransformerDistilled, Eva=Eva, EvaAttention=EvaAttention,
                EvaBlock=EvaBlock, Block=Block, VisionTransformer=VisionTransformer)


class NormChecker:
    """Every norm must be an affine LayerNorm with one shared eps."""

    def __init__(self):
        self.eps: float | None = None

    def present(self, module: nn.Module, where: str) -> bool:
        if module is None or isinstance(module, nn.Identity):
            return False
        if not isinstance(module, nn.LayerNorm):
            raise unsupported(f"{where} is {type(module).__name__}, only LayerNorm norms are supported")
        if not module.elementwise_affine or module.bias is None:
            raise unsupported(f"{where} is a LayerNorm without affine weight and bias")
        if self.eps is None:
            self.eps = float(module.eps)
        elif module.eps != self.eps:
            raise unsupported(f"{where} has LayerNorm eps {module.eps} while other norms use {self.eps}")
        return True


def activation_name(act: nn.Module, where: str, classes: dict) -> str:
    """The spec's name of a timm / torch activation module."""
    kind = type(act)
    if kind is nn.GELU and act.approximate in ("none", "tanh"):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    names = {classes["TimmGELU"]: "gelu", classes["GELUTanh"]: "gelu_tanh",
             classes["QuickGELU"]: "quick_gelu", nn.SiLU: "silu", classes["Swish"]: "silu"}
    if kind in names:
        return names[kind]
    raise unsupported(f"{where} is {kind.__name__}; the supported activations are exact GELU, tanh GELU, "
                      "QuickGELU and SiLU")


def rope_spec(model: nn.Module, classes: dict) -> RopeSpec | None:
    """The RopeSpec of an Eva model's `rope` module, None without one."""
    rope = getattr(model, "rope", None)
    if rope is None:
        return None
    kind = type(rope)
    if kind is classes["RotaryEmbeddingCat"]:
        if rope.in_pixels or rope.grid_type != "index":
            raise unsupported(f"rope: RotaryEmbeddingCat with pixel bands / grid {rope.grid_type!r} "
                              "(only the index grid with temperature bands, as Eva builds it)")
        spec = RopeSpec(kind="cat", dim=int(rope.dim), temperature=float(rope.temperature),
                        rotate_half=bool(rope.rotate_half), grid_indexing=rope.grid_indexing,
                        grid_offset=float(rope.grid_offset),
                        ref_feat_shape=None if rope.ref_feat_shape is None
                        else [int(s) for s in rope.ref_feat_shape])
    elif kind is classes["RotaryEmbeddingDinoV3"]:
        periods = rope.min_period is not None and rope.max_period is not None
        spec = RopeSpec(kind="dinov3", dim=int(rope.dim),
                        temperature=1.0 if periods else float(rope.temperature),
                        rotate_half=bool(rope.rotate_half), grid_indexing=rope.grid_indexing,
                        grid_offset=float(rope.grid_offset), normalize_coords=rope.normalize_coords,
                        min_period=float(rope.min_period) if periods else None,
                        max_period=float(rope.max_period) if periods else None)
    elif kind is classes["RotaryEmbeddingMixed"]:
        depth = len(model.blocks)
        if rope.depth != depth or tuple(rope.freqs.shape[1:3]) != (depth, rope.num_heads):
            raise unsupported(f"rope: RotaryEmbeddingMixed frequencies of shape {tuple(rope.freqs.shape)} "
                              f"for {len(model.blocks)} blocks")
        if not getattr(model, "rope_mixed", False):
            raise unsupported("rope: RotaryEmbeddingMixed on a model that does not pass it per block")
        spec = RopeSpec(kind="mixed", dim=int(rope.dim // rope.num_heads),
                        temperature=float(rope.temperature), rotate_half=False,
                        grid_indexing=rope.grid_indexing)
    else:
        raise unsupported(f"rope: {kind.__name__} (only RotaryEmbeddingCat, RotaryEmbeddingDinoV3 and "
                          "RotaryEmbeddingMixed)")
    feat_shape = getattr(rope, "feat_shape", None)
    if feat_shape is not None and tuple(feat_shape) != tuple(model.patch_embed.grid_size):
        raise unsupported(f"rope: its grid {tuple(feat_shape)} differs from the patch grid "
                          f"{tuple(model.patch_embed.grid_size)}")
    for i, block in enumerate(model.blocks):
        attn = block.attn
        if bool(getattr(attn, "rotate_half", False)) != spec.rotate_half:
            raise unsupported(f"blocks.{i}.attn rotates in another layout than rope")
        if getattr(attn, "num_prefix_tokens", model.num_prefix_tokens) != model.num_prefix_tokens:
            raise unsupported(f"blocks.{i}.attn leaves {attn.num_prefix_tokens} tokens unrotated, the "
                              f"model has {model.num_prefix_tokens} prefix tokens")
    return spec


def attn_pool_spec(pool: nn.Module, dim: int, norms: NormChecker, classes: dict,
                   include_prefix: bool) -> AttnPoolSpec:
    """The AttnPoolSpec of a timm AttentionPoolLatent over width `dim`."""
    where = "attn_pool"
    if pool.pos_embed is not None:
        raise unsupported(f"{where}.pos_embed (an attention-pool position embedding)")
    if not isinstance(pool.q, nn.Linear) or tuple(pool.q.weight.shape) != (dim, dim) \
            or pool.latent.shape[-1] != dim:
        raise unsupported(f"{where}.q: only a Linear latent query projection of width {dim}")
    if not isinstance(pool.kv, nn.Linear) or tuple(pool.kv.weight.shape) != (2 * dim, dim):
        raise unsupported(f"{where}.kv: only a Linear({dim}, {2 * dim})")
    if (pool.q.bias is None) != (pool.kv.bias is None):
        raise unsupported(f"{where} has a bias on only one of q and kv")
    if pool.mlp is None or not isinstance(pool.proj, nn.Linear) or pool.proj.out_features != dim:
        raise unsupported(f"{where} without its proj / mlp (out_features=0)")
    if pool.proj.bias is None:
        raise unsupported(f"{where}.proj has no bias")
    if not norms.present(pool.norm, f"{where}.norm"):
        raise unsupported(f"{where} without a norm before its mlp")
    qk_norm = norms.present(pool.q_norm, f"{where}.q_norm")
    if qk_norm != norms.present(pool.k_norm, f"{where}.k_norm"):
        raise unsupported(f"{where} normalises only one of q and k")
    mlp = pool.mlp
    if type(mlp) is not classes["Mlp"] or not isinstance(mlp.fc1, nn.Linear) or mlp.fc1.bias is None \
            or not isinstance(mlp.fc2, nn.Linear) or mlp.fc2.bias is None:
        raise unsupported(f"{where}.mlp: only timm's Mlp with Linear layers and biases")
    if norms.present(mlp.norm, f"{where}.mlp.norm"):
        raise unsupported(f"{where}.mlp has a norm inside")
    if pool.pool not in ("token", "avg", ""):
        raise unsupported(f"{where} pools its latents with {pool.pool!r}")
    return AttnPoolSpec(num_heads=int(pool.num_heads), mlp_hidden=int(mlp.fc1.out_features),
                        latent_len=int(pool.latent_len), qkv_bias=pool.q.bias is not None,
                        qk_norm=qk_norm, mlp_act=activation_name(mlp.act, f"{where}.mlp.act", classes),
                        include_prefix=include_prefix, pool=pool.pool)
