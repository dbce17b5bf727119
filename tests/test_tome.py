"""ToMe method: schedules, r by bisection on count_macs, and the merged reference module
against ToMe's own algorithm run by hand on the timm model (float64)."""
import math

import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled

from compress_cli import run_compress_cli
from dcvit_engine.adapter import spec_from_timm
from dcvit_engine.artifact import load, load_report, save
from dcvit_engine.compress import api
from dcvit_engine.compress.tome import compress_tome, max_useful_r, parse_r, r_for_target, tome_spec
from dcvit_engine.engine import build_engine
from dcvit_engine.macs import count_macs
from test_adapter import randomize_


def tiny_vit(**kw):
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    args.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**args).eval()


# ---- ToMe's algorithm, transcribed from facebookresearch/ToMe (merge.py, patch/timm.py) ----

def _bipartite_soft_matching(metric, r, class_token, distill_token):
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="sum"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)
    return merge


def tome_by_hand(model, images, r_per_block, sources=None):
    """ToMe's patched timm forward: proportional attention, keys averaged over heads as the
    metric, size-weighted merge after the attention residual, LayerScale as timm's blocks.
    `sources` (a list) receives ToMe's source trace after each merging block: (B, N, N0)
    booleans, token i of the block's output stands for the input tokens marked in row i."""
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = None
    source = torch.eye(x.shape[1], dtype=x.dtype).expand(x.shape[0], -1, -1)
    for blk, r in zip(model.blocks, r_per_block):
        attn = blk.attn
        h = blk.norm1(x)
        batch, tokens, dim = h.shape
        q, k, v = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + blk.ls1(attn.proj(out))
        if r > 0:
            merge = _bipartite_soft_matching(k.mean(1), r, class_token, distill_token)
            size = torch.ones_like(x[..., 0, None]) if size is None else size
            x, size = merge(x * size), merge(size)
            x = x / size
            source = merge(source, mode="amax")  # ToMe's trace_source
            if sources is not None:
                sources.append(source > 0)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.forward_head(model.norm(x))


def reference_sources(student, images):
    """Runs the reference module and returns its logits and its source trace after each
    merging block: the block's own merge applied to a one-hot trace with the block's metric
    (unit sizes: a size-weighted average is nonzero exactly where a source token is)."""
    traces = []
    merge = student._merge

    def tracing(i, x, size, metric):
        trace = traces[-1].to(x.dtype) if traces else torch.eye(x.shape[1], dtype=x.dtype).expand(
            x.shape[0], -1, -1).contiguous()
        traces.append(merge(i, trace, None, metric)[0] > 0)
        return merge(i, x, size, metric)

    student._merge = tracing
    try:
        with torch.no_grad():
            logits = student(images)
    finally:
        del student._merge
    return logits, traces


@pytest.mark.parametrize("schedule", ["constant", "decreasing"])
def test_tome_reference_matches_tome_by_hand(schedule):
    model = tiny_vit().double()
    student = compress_tome(model, r=6, schedule=schedule)
    assert student.spec.prop_attn
    r_per_block = [b.merge.r if b.merge else 0 for b in student.spec.blocks]
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = tome_by_hand(model, images, r_per_block)
        got = student(images)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-10


def vit_with_layer_scale_and_avg_pool():
    return tiny_vit(class_token=False, global_pool="avg", init_values=0.1)


def distilled_vit():
    return VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=48, depth=4,
                                      num_heads=3, num_classes=10).eval()


@pytest.mark.parametrize("make_model", [
    lambda: tiny_vit(class_token=False, global_pool="avg", fc_norm=True),
    vit_with_layer_scale_and_avg_pool,
    distilled_vit,
], ids=["avg_pool_no_class_token", "avg_pool_layer_scale", "distillation_token"])
def test_reference_merges_the_tokens_tome_merges(make_model):
    """Without a class token ToMe keeps the unmerged tokens in score order; a module that
    sorted them would split tokens differently from the second merge on. Every merging
    block must output the same tokens (same source sets, same order) and the same logits."""
    model = randomize_(make_model()).double()
    student = compress_tome(model, r=5, schedule="constant")
    r_per_block = [b.merge.r if b.merge else 0 for b in student.spec.blocks]
    assert sum(r > 0 for r in r_per_block) >= 3
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected_sources = []
    with torch.no_grad():
        expected = tome_by_hand(model, images, r_per_block, expected_sources)
    got, got_sources = reference_sources(student, images)
    assert len(got_sources) == len(expected_sources)
    for block, (g, e) in enumerate(zip(got_sources, expected_sources)):
        assert torch.equal(g, e), f"block {block}: the reference merged other tokens than ToMe"
    assert ((got - expected).norm() / expected.norm()).item() < 1e-6


def test_schedules_follow_tome_parse_r():
    assert parse_r(4, 6, "constant") == [6, 6, 6, 6]
    assert parse_r(4, 6, "decreasing") == [12, 8, 4, 0]  # ToMe's (r, -1): 2r -> 0
    assert parse_r(12, 13, "decreasing") == [int(26 - 26 / 11 * i) for i in range(12)]
    spec = spec_from_timm(tiny_vit())  # 65 tokens: the first block can merge at most 32
    merged = tome_spec(spec, 20, "decreasing")
    # unclamped [40, 26, 13, 0]; ToMe clamps each to half the unprotected tokens entering
    assert [b.merge.r if b.merge else 0 for b in merged.blocks] == [32, 16, 8, 0]
    assert merged.blocks[3].merge is None


@pytest.mark.parametrize("schedule", ["constant", "decreasing"])
@pytest.mark.parametrize("target", [0.9, 0.6, 0.45])
def test_r_from_target_is_the_smallest_that_meets_it(schedule, target):
    spec = spec_from_timm(tiny_vit())
    teacher = count_macs(spec).total
    r = r_for_target(spec, target, schedule)
    assert 1 <= r <= max_useful_r(spec, schedule)
    assert count_macs(tome_spec(spec, r, schedule)).total <= target * teacher
    assert count_macs(tome_spec(spec, r - 1, schedule)).total > target * teacher


def test_target_through_the_api_saves_loads_and_runs_on_the_engine(tmp_path):
    model = tiny_vit()
    report = {}
    student = api.compress(model, None, method="tome", target_macs=0.6, report=report)
    assert report["achieved_macs"] <= 0.6 * report["teacher_macs"]
    assert count_macs(student.spec).total == report["achieved_macs"]
    images = torch.randn(2, 3, 32, 32)
    loaded = load(save(student, tmp_path / "tome"))
    assert loaded.spec.to_dict() == student.spec.to_dict()
    engine = build_engine(tmp_path / "tome", backend="torch")
    with torch.no_grad():
        ref = student(images)
        assert torch.allclose(loaded(images), ref)
        assert torch.allclose(engine(images), ref, rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_rejected():
    model = tiny_vit()
    with pytest.raises(ValueError, match="exactly one of r"):
        compress_tome(model)
    with pytest.raises(ValueError, match="exactly one of r"):
        compress_tome(model, target_macs=0.5, r=3)
    with pytest.raises(ValueError, match="schedule"):
        compress_tome(model, r=3, schedule="increasing")
    with pytest.raises(ValueError, match="non-negative integer"):
        compress_tome(model, r=-1)
    with pytest.raises(ValueError, match="out of ToMe's reach"):
        compress_tome(model, target_macs=0.05)
    with pytest.raises(ValueError, match="between 0 and 1"):
        compress_tome(model, target_macs=1.5)
    with pytest.raises(ValueError, match="already merges"):
        compress_tome(compress_tome(model, r=2), r=2)
    with pytest.raises(ValueError, match="no option"):
        api.compress(model, None, method="tome", r=2, inflection=-1)


def test_cli_compress_tome(capsys, tmp_path):
    rc, out, err = run_compress_cli(capsys, tmp_path, "tome", "--schedule", "decreasing")
    assert rc == 0, err
    report = load_report(tmp_path / "tome")
    assert report["method"] == "tome" and report["extras"]["schedule"] == "decreasing"
    assert report["achieved_macs"] <= 0.6 * report["teacher_macs"]
    rc, _, err = run_compress_cli(capsys, tmp_path, "tome", "--resume")
    assert rc == 2 and "--resume do(es) not apply to --method tome" in err
