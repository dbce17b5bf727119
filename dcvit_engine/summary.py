"""Per-block structure, MACs and parameter counts of a spec (what `dcvit info` prints)."""
from __future__ import annotations

import math

from .macs import spec_macs
from .reference import state_shapes
from .spec import ViTSpec, merge_schedule


def _widths(dims: list[int]) -> str:
    """'3x64' when every head has the same width, else the list."""
    if len(set(dims)) == 1:
        return f"{len(dims)}x{dims[0]}"
    return ",".join(str(d) for d in dims)


def _merge_text(merge: dict | None) -> str:
    if merge is None:
        return "-"
    return f"tome r={merge['r']}" if merge["kind"] == "tome" else f"atme {merge['axis']}"


def parameter_counts(spec: ViTSpec) -> tuple[dict[int, int], int]:
    """Parameters per block index, and the total over the whole model."""
    per_block = {i: 0 for i in range(spec.depth)}
    total = 0
    for name, shape in state_shapes(spec).items():
        count = math.prod(shape)
        total += count
        if name.startswith("blocks."):
            per_block[int(name.split(".")[1])] += count
    return per_block, total


def model_summary(spec: ViTSpec) -> dict:
    """Plain data: global structure, one entry per block, and totals (MACs per image)."""
    macs = spec_macs(spec)
    params, total_params = parameter_counts(spec)
    schedule = merge_schedule(spec)
    blocks = []
    rows = zip(spec.blocks, macs.blocks, schedule)
    for i, (block, block_macs, (tokens_in, tokens_out, _)) in enumerate(rows):
        attn = block.attn
        blocks.append({
            "index": i,
            "tokens": tokens_in,
            "tokens_after_merge": tokens_out,
            "heads": 0 if attn is None else attn.num_heads,
            "qk_dims": [] if attn is None else list(attn.qk_dims),
            "v_dims": [] if attn is None else list(attn.v_dims),
            "mlp_hidden": block.mlp_hidden,
            "merge": None if block.merge is None else {"kind": block.merge.kind, "r": block.merge.r,
                                                       "axis": block.merge.axis},
            "macs": block_macs.total,
            "attn_macs": block_macs.attn,
            "mlp_macs": block_macs.mlp,
            "params": params[i],
        })
    return {
        "img_size": list(spec.img_size), "patch_size": spec.patch_size, "in_chans": spec.in_chans,
        "embed_dim": spec.embed_dim, "num_classes": spec.num_classes, "depth": spec.depth,
        "class_token": spec.class_token, "dist_token": spec.dist_token, "reg_tokens": spec.reg_tokens,
        "global_pool": spec.global_pool, "prop_attn": spec.prop_attn,
        "blocks": blocks,
        "macs": {"total": macs.total, "patch_embed": macs.patch_embed, "head": macs.head,
                 "attn_pool": macs.attn_pool.total if macs.attn_pool is not None else 0,
                 "blocks": sum(b["macs"] for b in blocks), "layernorm_not_counted": macs.layernorm},
        "params": {"total": total_params, "blocks": sum(params.values())},
    }


def format_summary(summary: dict, title: str) -> str:
    """The summary as an aligned text table."""
    prefix = [name for name, on in (("class", summary["class_token"]),
                                    ("distillation", summary["dist_token"])) if on]
    if summary.get("reg_tokens"):
        prefix.append(f"{summary['reg_tokens']} registers")
    lines = [
        title,
        f"image {summary['img_size'][0]}x{summary['img_size'][1]}x{summary['in_chans']}, patch "
        f"{summary['patch_size']}, embed dim {summary['embed_dim']}, depth {summary['depth']}, "
        f"classes {summary['num_classes']}, tokens {' + '.join(prefix + ['patches'])}, "
        f"pool {summary['global_pool'] or 'none'}",
        "",
        f"{'block':>5} {'tokens':>9} {'heads':>5} {'qk widths':>10} {'v widths':>10} {'mlp':>6} "
        f"{'merge':>9} {'attn MMACs':>11} {'mlp MMACs':>10} {'params':>10}",
    ]
    for b in summary["blocks"]:
        tokens = str(b["tokens"]) if b["tokens"] == b["tokens_after_merge"] \
            else f"{b['tokens']}->{b['tokens_after_merge']}"
        lines.append(
            f"{b['index']:>5} {tokens:>9} {b['heads']:>5} "
            f"{(_widths(b['qk_dims']) if b['heads'] else '-'):>10} "
            f"{(_widths(b['v_dims']) if b['heads'] else '-'):>10} {b['mlp_hidden']:>6} "
            f"{_merge_text(b['merge']):>9} "
            f"{b['attn_macs'] / 1e6:>11.2f} {b['mlp_macs'] / 1e6:>10.2f} {b['params']:>10,}")
    macs, params = summary["macs"], summary["params"]
    lines += [
        "",
        f"MACs per image: {macs['total'] / 1e9:.4f} G (blocks {macs['blocks'] / 1e9:.4f} G, patch embedding "
        f"{macs['patch_embed'] / 1e9:.4f} G, "
        + (f"attention pool {macs['attn_pool'] / 1e9:.4f} G, " if macs.get("attn_pool") else "")
        + f"head {macs['head'] / 1e9:.4f} G; LayerNorm "
        f"{macs['layernorm_not_counted'] / 1e9:.4f} G not counted)",
        f"parameters: {params['total']:,} (blocks {params['blocks']:,})",
    ]
    return "\n".join(lines)

