"""timm VisionTransformer -> (ViTSpec, state dict).

Checks the model by module types and attributes (never by model name) and refuses
anything the spec cannot represent with UnsupportedModelError naming the feature,
so a compressed model can never silently compute something else than its teacher.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .errors import InputError
from .spec import AttentionSpec, BlockSpec, ViTSpec


class UnsupportedModelError(InputError):
    """The model uses a feature the dcvit_engine spec cannot represent."""


def _unsupported(feature: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"unsupported model: {feature}; dcvit_engine handles timm "
                                 "VisionTransformer / DeiT layouts (see the spec contract)")


def _timm_classes():
    try:
        from timm.layers import Attention, LayerScale, Mlp, PatchEmbed
        from timm.layers.activations import GELU as TimmGELU
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import Block, VisionTransformer
    except ImportError as err:  # pragma: no cover - timm is a dependency
        raise ImportError(f"the timm adapter needs timm installed: {err}") from None
    return dict(Attention=Attention, LayerScale=LayerScale, Mlp=Mlp, PatchEmbed=PatchEmbed,
                TimmGELU=TimmGELU, Block=Block, VisionTransformer=VisionTransformer,
                VisionTransformerDistilled=VisionTransformerDistilled)


class _NormChecker:
    """Every norm must be an affine LayerNorm with one shared eps."""

    def __init__(self):
        self.eps: float | None = None

    def present(self, module: nn.Module, where: str) -> bool:
        if isinstance(module, nn.Identity):
            return False
        if not isinstance(module, nn.LayerNorm):
            raise _unsupported(f"{where} is {type(module).__name__}, only LayerNorm norms are supported")
        if not module.elementwise_affine or module.bias is None:
            raise _unsupported(f"{where} is a LayerNorm without affine weight and bias")
        if self.eps is None:
            self.eps = float(module.eps)
        elif module.eps != self.eps:
            raise _unsupported(f"{where} has LayerNorm eps {module.eps} while other norms use {self.eps}")
        return True


def _check_gelu(act: nn.Module, where: str, classes: dict) -> None:
    exact_gelu = (type(act) is nn.GELU and act.approximate == "none") or type(act) is classes["TimmGELU"]
    if not exact_gelu:
        detail = f"GELU(approximate={act.approximate!r})" if isinstance(act, nn.GELU) else type(act).__name__
        raise _unsupported(f"{where} activation is {detail}, only exact GELU is supported")


def _layer_scale(module: nn.Module, where: str, classes: dict) -> bool:
    if isinstance(module, nn.Identity):
        return False
    if type(module) is not classes["LayerScale"]:
        raise _unsupported(f"{where} is {type(module).__name__}, expected timm LayerScale or Identity")
    return True


def _attention_spec(attn: nn.Module, dim: int, where: str, norms: _NormChecker,
                    classes: dict) -> AttentionSpec:
    if type(attn) is not classes["Attention"]:
        raise _unsupported(f"{where} is {type(attn).__name__}, only timm's plain Attention is "
                           "supported (no rope / differential / custom attention)")
    if getattr(attn, "gate", None) is not None:
        raise _unsupported(f"{where} has a gated attention output")
    if norms.present(attn.norm, f"{where}.norm"):
        raise _unsupported(f"{where} has scale_norm (a norm before proj)")
    q_norm = norms.present(attn.q_norm, f"{where}.q_norm")
    if q_norm != norms.present(attn.k_norm, f"{where}.k_norm"):
        raise _unsupported(f"{where} normalises only one of q and k")
    heads, head_dim = attn.num_heads, attn.head_dim
    if attn.qkv.out_features != 3 * heads * head_dim or attn.qkv.in_features != dim:
        raise _unsupported(f"{where}.qkv shape {tuple(attn.qkv.weight.shape)} does not match "
                           f"{heads} heads of {head_dim} on width {dim}")
    if attn.proj.in_features != heads * head_dim or attn.proj.out_features != dim:
        raise _unsupported(f"{where}.proj shape {tuple(attn.proj.weight.shape)} does not match the heads")
    return AttentionSpec(qk_dims=[head_dim] * heads, v_dims=[head_dim] * heads,
                         scale=float(attn.scale), qkv_bias=attn.qkv.bias is not None,
                         proj_bias=attn.proj.bias is not None, qk_norm=q_norm)


def _block_spec(block: nn.Module, dim: int, where: str, norms: _NormChecker,
                classes: dict) -> BlockSpec:
    if type(block) is not classes["Block"]:
        raise _unsupported(f"{where} is {type(block).__name__}, only timm's pre-norm Block is "
                           "supported (no res-post / parallel blocks)")
    if not norms.present(block.norm1, f"{where}.norm1") or not norms.present(block.norm2, f"{where}.norm2"):
        raise _unsupported(f"{where} lacks norm1/norm2")
    attn = _attention_spec(block.attn, dim, f"{where}.attn", norms, classes)
    layer_scale = _layer_scale(block.ls1, f"{where}.ls1", classes)
    if layer_scale != _layer_scale(block.ls2, f"{where}.ls2", classes):
        raise _unsupported(f"{where} has LayerScale on only one of its two branches")
    mlp = block.mlp
    if (type(mlp) is not classes["Mlp"] or not isinstance(mlp.fc1, nn.Linear)
            or not isinstance(mlp.fc2, nn.Linear)):
        raise _unsupported(f"{where}.mlp is {type(mlp).__name__}, only timm's Mlp with Linear "
                           "layers is supported (no SwiGLU / GLU / conv MLP)")
    _check_gelu(mlp.act, f"{where}.mlp", classes)
    if norms.present(mlp.norm, f"{where}.mlp.norm"):
        raise _unsupported(f"{where}.mlp has scale_mlp_norm (a norm inside the MLP)")
    if mlp.fc1.bias is None or mlp.fc2.bias is None:
        raise _unsupported(f"{where}.mlp has no bias (proj_bias=False)")
    if (mlp.fc1.in_features != dim or mlp.fc2.out_features != dim
            or mlp.fc2.in_features != mlp.fc1.out_features):
        raise _unsupported(f"{where}.mlp shapes do not form a {dim} -> hidden -> {dim} MLP")
    return BlockSpec(attn=attn, mlp_hidden=mlp.fc1.out_features, layer_scale=layer_scale)


def _check_model_level(model: nn.Module, classes: dict) -> None:
    if getattr(model, "rope", None) is not None or getattr(model, "pos_embed_rope", None) is not None:
        raise _unsupported("rotary position embedding (rope)")
    if type(model) not in (classes["VisionTransformer"], classes["VisionTransformerDistilled"]):
        raise _unsupported(f"model class {type(model).__name__} (only timm VisionTransformer "
                           "and VisionTransformerDistilled)")
    if getattr(model, "num_reg_tokens", 0) or getattr(model, "reg_token", None) is not None:
        raise _unsupported(f"{model.num_reg_tokens} register tokens (reg_tokens)")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg", ""):
        raise _unsupported(f"global_pool {model.global_pool!r} (only 'token', 'avg' or '')")
    if model.global_pool in ("avg",) and getattr(model, "pool_include_prefix", False):
        raise _unsupported("pool_include_prefix (average pooling over prefix tokens)")
    if model.dynamic_img_size:
        raise _unsupported("dynamic_img_size")
    if model.pos_embed is None:
        raise _unsupported("no absolute position embedding (pos_embed='none')")
    pe = model.patch_embed
    if type(pe) is not classes["PatchEmbed"]:
        raise _unsupported(f"patch embedding {type(pe).__name__} (only timm PatchEmbed)")
    if not isinstance(pe.norm, nn.Identity):
        raise _unsupported("patch_embed norm (embed_norm_layer)")
    if pe.dynamic_img_pad or not pe.flatten or pe.img_size is None:
        raise _unsupported("patch_embed with dynamic_img_pad / no flatten / no fixed img_size")
    if pe.patch_size[0] != pe.patch_size[1]:
        raise _unsupported(f"non-square patch size {tuple(pe.patch_size)}")
    if pe.proj.kernel_size != pe.proj.stride or pe.proj.padding != (0, 0) or pe.proj.groups != 1:
        raise _unsupported("patch_embed convolution that is not a plain patchify (kernel == stride)")


def spec_from_timm(model: nn.Module) -> ViTSpec:
    """Describe a timm VisionTransformer (or DeiT distilled) as a ViTSpec."""
    classes = _timm_classes()
    _check_model_level(model, classes)
    norms = _NormChecker()
    dim = model.embed_dim
    pre_norm = norms.present(model.norm_pre, "norm_pre")
    # timm drops the patch-embedding bias exactly when pre_norm is on; the spec relies on it
    if (model.patch_embed.proj.bias is None) != pre_norm:
        raise _unsupported("patch_embed bias that does not follow timm's rule (bias = not pre_norm)")
    blocks = [_block_spec(b, dim, f"blocks.{i}", norms, classes) for i, b in enumerate(model.blocks)]
    final_norm = norms.present(model.norm, "norm")
    fc_norm = norms.present(model.fc_norm, "fc_norm")
    dist_token = getattr(model, "dist_token", None) is not None
    if dist_token and getattr(model, "head_dist", None) is None:
        raise _unsupported("a distillation token without head_dist")
    head = model.head
    if isinstance(head, nn.Linear):
        num_classes = head.out_features
        if head.in_features != dim or head.bias is None:
            raise _unsupported("head is not a Linear(embed_dim, num_classes) with bias")
    elif isinstance(head, nn.Identity):
        num_classes = 0
    else:
        raise _unsupported(f"head {type(head).__name__} (only Linear or Identity)")
    if dist_token:
        head_dist = model.head_dist
        if (num_classes and not (isinstance(head_dist, nn.Linear) and head_dist.out_features == num_classes
                                 and head_dist.bias is not None)) \
                or (not num_classes and not isinstance(head_dist, nn.Identity)):
            raise _unsupported("head_dist does not mirror head")
        if fc_norm:
            raise _unsupported("fc_norm on a distilled model (timm's distilled head ignores it)")
    spec = ViTSpec(
        img_size=tuple(int(s) for s in model.patch_embed.img_size),
        patch_size=int(model.patch_embed.patch_size[0]),
        in_chans=model.patch_embed.proj.in_channels,
        embed_dim=dim,
        num_classes=num_classes,
        class_token=model.cls_token is not None,
        dist_token=dist_token,
        global_pool=model.global_pool,
        fc_norm=fc_norm,
        pre_norm=pre_norm,
        final_norm=final_norm,
        no_embed_class=bool(model.no_embed_class),
        norm_eps=norms.eps if norms.eps is not None else 1e-6,
        prop_attn=False,
        blocks=blocks,
    )
    expected_pos = spec.num_patches + (0 if spec.no_embed_class else spec.num_prefix_tokens)
    if tuple(model.pos_embed.shape) != (1, expected_pos, dim):
        raise _unsupported(f"pos_embed of shape {tuple(model.pos_embed.shape)}, expected "
                           f"(1, {expected_pos}, {dim})")
    return spec.validate()


def from_timm(model: nn.Module) -> tuple[ViTSpec, dict[str, torch.Tensor]]:
    """(spec, state dict) of a timm ViT; the tensors are detached copies with timm's names."""
    spec = spec_from_timm(model)
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    return spec, state
