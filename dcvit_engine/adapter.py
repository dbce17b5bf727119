"""timm VisionTransformer / Eva -> (ViTSpec, state dict).

Checks the model by module types and attributes (never by model name) and refuses
anything the spec cannot represent with UnsupportedModelError naming the feature and its
module path, so a compressed model can never silently compute something else than its teacher.

The state dict uses timm VisionTransformer's names for every family. An Eva model's tensors
are renamed on the way (exact: no arithmetic but concatenation):
  attn.q_bias, (zero) k_bias, attn.v_bias      -> attn.qkv.bias
  attn.q_proj / k_proj / v_proj (unfused)      -> attn.qkv
  gamma_1 / gamma_2                            -> ls1.gamma / ls2.gamma
  mlp.fc1_g, mlp.fc1_x (SwiGLU)                -> mlp.fc1 rows [gate | value]
  GluMlp(gate_last=True) fc1 [value | gate]    -> mlp.fc1 rows [gate | value]
  rope.freqs (RotaryEmbeddingMixed)            -> blocks.i.attn.rope_freqs, block i's slice
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .adapter_parts import (  # UnsupportedModelError: re-exported, part of this module's API
    NormChecker,
    UnsupportedModelError,  # noqa: F401
    activation_name,
    attn_pool_spec,
    rope_spec,
    timm_classes,
    unsupported,
)
from .spec import AttentionSpec, BlockSpec, ViTSpec


def _layer_scale(module, where: str, classes: dict) -> bool:
    if module is None or isinstance(module, nn.Identity):
        return False
    if isinstance(module, nn.Parameter):  # Eva's gamma_1 / gamma_2
        return True
    if type(module) is not classes["LayerScale"]:
        raise unsupported(f"{where} is {type(module).__name__}, expected timm LayerScale or Identity")
    return True


def _linear_parts(layer, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(layer, nn.Linear):
        raise unsupported(f"{where} is {type(layer).__name__}, expected Linear")
    return layer.weight, layer.bias


def _attention(attn: nn.Module, dim: int, where: str, norms: NormChecker, classes: dict):
    """(AttentionSpec, {canonical suffix: tensor}) of a ViT Attention, EvaAttention or AttentionRope."""
    kind = type(attn)
    if kind not in (classes["Attention"], classes["EvaAttention"], classes["AttentionRope"]):
        raise unsupported(f"{where} is {kind.__name__}, only timm's Attention, EvaAttention and "
                          "AttentionRope are supported (no relative position bias / differential attention)")
    if getattr(attn, "gate", None) is not None:
        raise unsupported(f"{where} has a gated attention output ({where}.gate)")
    if getattr(attn, "num_kv_groups", 1) != 1:
        raise unsupported(f"{where} uses grouped-query attention (num_kv_heads)")
    heads, head_dim = attn.num_heads, attn.head_dim
    width = heads * head_dim
    tensors = {}
    if attn.qkv is not None:
        weight, bias = _linear_parts(attn.qkv, f"{where}.qkv")
        if kind is classes["EvaAttention"] and attn.q_bias is not None:
            bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    else:  # unfused q/k/v projections (EVA02 base and up)
        parts = [_linear_parts(getattr(attn, n), f"{where}.{n}") for n in ("q_proj", "k_proj", "v_proj")]
        weight = torch.cat([w for w, _ in parts])
        biases = [b for _, b in parts]
        if all(b is None for b in biases):
            bias = None
        else:  # EvaAttention's k_proj has no bias: timm's k bias is zero
            bias = torch.cat([b if b is not None else torch.zeros(width, dtype=weight.dtype) for b in biases])
    if tuple(weight.shape) != (3 * width, dim):
        raise unsupported(f"{where}.qkv shape {tuple(weight.shape)} does not match {heads} heads of "
                          f"{head_dim} on width {dim}")
    tensors["qkv.weight"] = weight
    if bias is not None:
        tensors["qkv.bias"] = bias
    q_norm = norms.present(attn.q_norm, f"{where}.q_norm")
    if q_norm != norms.present(attn.k_norm, f"{where}.k_norm"):
        raise unsupported(f"{where} normalises only one of q and k")
    inner_norm = norms.present(attn.norm, f"{where}.norm")
    for name, present in (("q_norm", q_norm), ("k_norm", q_norm), ("norm", inner_norm)):
        if present:
            module = getattr(attn, name)
            tensors[f"{name}.weight"], tensors[f"{name}.bias"] = module.weight, module.bias
    proj_w, proj_b = _linear_parts(attn.proj, f"{where}.proj")
    if tuple(proj_w.shape) != (dim, width):
        raise unsupported(f"{where}.proj shape {tuple(proj_w.shape)} does not match the heads")
    tensors["proj.weight"] = proj_w
    if proj_b is not None:
        tensors["proj.bias"] = proj_b
    spec = AttentionSpec(qk_dims=[head_dim] * heads, v_dims=[head_dim] * heads, scale=float(attn.scale),
                         qkv_bias=bias is not None, proj_bias=proj_b is not None, qk_norm=q_norm,
                         inner_norm=inner_norm)
    return spec, tensors


def _mlp(mlp: nn.Module, dim: int, where: str, norms: NormChecker, classes: dict):
    """(hidden, act, gated, inner_norm, {canonical suffix: tensor}) of a timm Mlp, GluMlp or SwiGLU."""
    kind = type(mlp)
    if kind is classes["Mlp"]:
        gated = False
        fc1_w, fc1_b = _linear_parts(mlp.fc1, f"{where}.fc1")
    elif kind is classes["GluMlp"]:
        gated = True
        if mlp.chunk_dim != -1:
            raise unsupported(f"{where} is a GluMlp chunked along dim {mlp.chunk_dim} (conv layout)")
        fc1_w, fc1_b = _linear_parts(mlp.fc1, f"{where}.fc1")
        if mlp.gate_last:  # timm applies act to the second half: store [gate | value]
            fc1_w = torch.cat(fc1_w.chunk(2)[::-1])
            fc1_b = None if fc1_b is None else torch.cat(fc1_b.chunk(2)[::-1])
    elif kind is classes["SwiGLU"]:
        gated = True
        (g_w, g_b), (x_w, x_b) = (_linear_parts(getattr(mlp, n), f"{where}.{n}") for n in ("fc1_g", "fc1_x"))
        if (g_b is None) != (x_b is None):
            raise unsupported(f"{where} has a bias on only one of fc1_g and fc1_x")
        fc1_w = torch.cat([g_w, x_w])
        fc1_b = None if g_b is None else torch.cat([g_b, x_b])
    else:
        raise unsupported(f"{where} is {kind.__name__}, only timm's Mlp, GluMlp and SwiGLU are supported")
    fc2_w, fc2_b = _linear_parts(mlp.fc2, f"{where}.fc2")
    act = activation_name(mlp.act, f"{where}.act", classes)
    if fc1_b is None or fc2_b is None:
        raise unsupported(f"{where} has no bias (proj_bias=False)")
    hidden = fc2_w.shape[1]
    if fc1_w.shape != ((2 if gated else 1) * hidden, dim) or fc2_w.shape[0] != dim:
        raise unsupported(f"{where} shapes do not form a {dim} -> hidden -> {dim} MLP")
    tensors = {"fc1.weight": fc1_w, "fc1.bias": fc1_b, "fc2.weight": fc2_w, "fc2.bias": fc2_b}
    inner_norm = norms.present(mlp.norm, f"{where}.norm")
    if inner_norm:
        tensors["norm.weight"], tensors["norm.bias"] = mlp.norm.weight, mlp.norm.bias
    return hidden, act, gated, inner_norm, tensors


def _block(block: nn.Module, dim: int, where: str, norms: NormChecker, classes: dict):
    """(BlockSpec, {canonical name: tensor}) of a ViT Block or an EvaBlock."""
    kind = type(block)
    if kind is classes["Block"]:
        ls1, ls2 = block.ls1, block.ls2
    elif kind is classes["EvaBlock"]:
        ls1, ls2 = block.gamma_1, block.gamma_2
    else:
        raise unsupported(f"{where} is {kind.__name__}, only timm's pre-norm Block and EvaBlock are "
                          "supported (no res-post / post-norm / parallel blocks)")
    if not norms.present(block.norm1, f"{where}.norm1") or not norms.present(block.norm2, f"{where}.norm2"):
        raise unsupported(f"{where} lacks norm1/norm2")
    attn, attn_tensors = _attention(block.attn, dim, f"{where}.attn", norms, classes)
    layer_scale = _layer_scale(ls1, f"{where}.ls1", classes)
    if layer_scale != _layer_scale(ls2, f"{where}.ls2", classes):
        raise unsupported(f"{where} has LayerScale on only one of its two branches")
    hidden, act, gated, mlp_norm, mlp_tensors = _mlp(block.mlp, dim, f"{where}.mlp", norms, classes)
    tensors = {f"{where}.{n}.{p}": getattr(getattr(block, n), p) for n in ("norm1", "norm2")
               for p in ("weight", "bias")}
    tensors.update({f"{where}.attn.{k}": v for k, v in attn_tensors.items()})
    tensors.update({f"{where}.mlp.{k}": v for k, v in mlp_tensors.items()})
    if layer_scale:
        for name, gamma in (("ls1", ls1), ("ls2", ls2)):
            tensors[f"{where}.{name}.gamma"] = gamma if isinstance(gamma, nn.Parameter) else gamma.gamma
    spec = BlockSpec(attn=attn, mlp_hidden=hidden, layer_scale=layer_scale, mlp_act=act,
                     mlp_gated=gated, mlp_inner_norm=mlp_norm)
    return spec, tensors


def _refuse_unrepresentable(model: nn.Module, classes: dict) -> None:
    """Named refusals of the parts the spec has no field for, before any other check."""
    for path, module in model.named_modules():
        where = path or "(model)"
        names = {n for n, _ in module.named_parameters(recurse=False)}
        names |= {n for n, _ in module.named_buffers(recurse=False)}
        if any("relative_position" in n for n in names) or "RelPos" in type(module).__name__:
            raise unsupported(f"relative position bias ({where}: {type(module).__name__})")
        if "Parallel" in type(module).__name__:
            raise unsupported(f"parallel blocks ({where}: {type(module).__name__})")
    if type(model) not in (classes["VisionTransformer"], classes["VisionTransformerDistilled"],
                           classes["Eva"]):
        raise unsupported(f"model class {type(model).__name__} (only timm VisionTransformer, "
                          "VisionTransformerDistilled and Eva)")


def _check_model_level(model: nn.Module, classes: dict) -> None:
    _refuse_unrepresentable(model, classes)
    global_pool = model.global_pool
    if global_pool not in ("token", "avg", "map", ""):
        raise unsupported(f"global_pool {global_pool!r} (only 'token', 'avg', 'map' or '')")
    if global_pool == "avg" and getattr(model, "pool_include_prefix", False):
        raise unsupported("pool_include_prefix (average pooling over prefix tokens)")
    if global_pool == "map" and type(getattr(model, "attn_pool", None)) is not classes["AttentionPoolLatent"]:
        raise unsupported(f"attn_pool {type(getattr(model, 'attn_pool', None)).__name__} (only "
                          "AttentionPoolLatent)")
    if getattr(model, "patch_drop", None) is not None and not isinstance(model.patch_drop, nn.Identity):
        raise unsupported("patch dropout (patch_drop)")
    pe = model.patch_embed
    if type(pe) is not classes["PatchEmbed"]:
        raise unsupported(f"patch embedding {type(pe).__name__} (only timm PatchEmbed)")
    if not isinstance(pe.norm, nn.Identity):
        raise unsupported("patch_embed norm (embed_norm_layer)")
    if pe.dynamic_img_pad or pe.img_size is None:
        raise unsupported("patch_embed with dynamic_img_pad / no fixed img_size")
    if not pe.flatten and not model.dynamic_img_size:
        raise unsupported("patch_embed without flatten")
    if pe.patch_size[0] != pe.patch_size[1]:
        raise unsupported(f"non-square patch size {tuple(pe.patch_size)}")
    if pe.proj.kernel_size != pe.proj.stride or pe.proj.padding != (0, 0) or pe.proj.groups != 1:
        raise unsupported("patch_embed convolution that is not a plain patchify (kernel == stride)")


def _head(model: nn.Module, dim: int, dist_token: bool) -> int:
    head = model.head
    if isinstance(head, nn.Linear):
        num_classes = head.out_features
        if head.in_features != dim or head.bias is None:
            raise unsupported("head is not a Linear(embed_dim, num_classes) with bias")
    elif isinstance(head, nn.Identity):
        num_classes = 0
    else:
        raise unsupported(f"head {type(head).__name__} (only Linear or Identity)")
    if dist_token:
        head_dist = model.head_dist
        if (num_classes and not (isinstance(head_dist, nn.Linear) and head_dist.out_features == num_classes
                                 and head_dist.bias is not None)) \
                or (not num_classes and not isinstance(head_dist, nn.Identity)):
            raise unsupported("head_dist does not mirror head")
    return num_classes


def _convert(model: nn.Module) -> tuple[ViTSpec, dict[str, torch.Tensor]]:
    classes = timm_classes()
    _check_model_level(model, classes)
    norms = NormChecker()
    dim = model.embed_dim
    pre_norm = norms.present(model.norm_pre, "norm_pre")
    # timm drops the patch-embedding bias exactly when pre_norm is on; the spec relies on it
    if (model.patch_embed.proj.bias is None) != pre_norm:
        raise unsupported("patch_embed bias that does not follow timm's rule (bias = not pre_norm)")
    state = {}
    blocks = []
    for i, b in enumerate(model.blocks):
        block, tensors = _block(b, dim, f"blocks.{i}", norms, classes)
        blocks.append(block)
        state.update(tensors)
    final_norm = norms.present(model.norm, "norm")
    fc_norm = norms.present(model.fc_norm, "fc_norm")
    dist_token = getattr(model, "dist_token", None) is not None
    if dist_token and getattr(model, "head_dist", None) is None:
        raise unsupported("a distillation token without head_dist")
    if dist_token and fc_norm:
        raise unsupported("fc_norm on a distilled model (timm's distilled head ignores it)")
    num_classes = _head(model, dim, dist_token)
    reg_token = getattr(model, "reg_token", None)
    attn_pool = None
    if model.global_pool == "map":
        attn_pool = attn_pool_spec(model.attn_pool, dim, norms, classes,
                                   include_prefix=type(model) is classes["Eva"]
                                   or bool(getattr(model, "pool_include_prefix", False)))
    rope = rope_spec(model, classes)
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
        reg_tokens=0 if reg_token is None else int(reg_token.shape[1]),
        abs_pos_embed=model.pos_embed is not None,
        rope=rope,
        attn_pool=attn_pool,
    )
    if spec.abs_pos_embed:
        expected_pos = spec.num_patches + (0 if spec.no_embed_class else spec.num_prefix_tokens)
        if tuple(model.pos_embed.shape) != (1, expected_pos, dim):
            raise unsupported(f"pos_embed of shape {tuple(model.pos_embed.shape)}, expected "
                              f"(1, {expected_pos}, {dim})")
    try:
        spec.validate()
    except ValueError as err:  # a timm layout the spec's rules cannot hold (e.g. RoPE wider than a head)
        raise unsupported(str(err)) from None
    # every other tensor (embeddings, tokens, norms, heads, attn_pool.*) keeps timm's own name
    if rope is not None and rope.kind == "mixed":  # (2, depth, heads, d/2): each block its own slice
        for i in range(spec.depth):
            state[f"blocks.{i}.attn.rope_freqs"] = model.rope.freqs[:, i]
    for name, tensor in model.state_dict().items():
        if not name.startswith(("blocks.", "rope.")):
            state[name] = tensor
    return spec, state


def spec_from_timm(model: nn.Module) -> ViTSpec:
    """Describe a timm VisionTransformer, DeiT distilled or Eva model as a ViTSpec."""
    return _convert(model)[0]


def from_timm(model: nn.Module) -> tuple[ViTSpec, dict[str, torch.Tensor]]:
    """(spec, state dict) of a timm ViT; detached copies, named as timm VisionTransformer names
    them (see the module docstring for Eva's renames)."""
    spec, state = _convert(model)
    return spec, {name: t.detach().clone() for name, t in state.items()}
