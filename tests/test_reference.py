"""Token merging inside the reference module: ToMe and ATME blocks run, the token count
follows the spec's schedule, and the merge uses the block's keys averaged over heads."""
import pytest
import torch

from dcvit_engine.kernels.token_merge import tome_merge_ref
from dcvit_engine.reference import ViTReference
from dcvit_engine.spec import AttentionSpec, BlockSpec, MergeSpec, ViTSpec, final_tokens, tokens_per_block


def make_spec(blocks, **overrides):
    fields = dict(img_size=(32, 32), patch_size=4, in_chans=3, embed_dim=24, num_classes=5,
                  class_token=True, dist_token=False, global_pool="token", fc_norm=False,
                  pre_norm=False, final_norm=True, no_embed_class=False, norm_eps=1e-6,
                  prop_attn=True)
    fields.update(overrides)
    return ViTSpec(blocks=blocks, **fields).validate()


def attn(heads=3, width=8):
    return AttentionSpec([width] * heads, [width] * heads, width ** -0.5)


def model_for(spec, seed=0):
    torch.manual_seed(seed)
    model = ViTReference(spec).eval()
    with torch.no_grad():  # tokens and biases away from their zero init
        for name, p in model.named_parameters():
            if p.dim() <= 1 or "token" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def tokens_seen_by_blocks(model, images):
    """Token count entering each block, recorded by wrapping its first half."""
    seen = {}

    def recording(i, first_half):
        def wrapper(x, *args, **kwargs):
            seen[i] = x.shape[1]
            return first_half(x, *args, **kwargs)
        return wrapper

    for i, block in enumerate(model.blocks):
        block.attention_residual = recording(i, block.attention_residual)
    with torch.no_grad():
        feats = model.forward_features(images)
        logits = model.forward_head(feats)
    for block in model.blocks:
        del block.attention_residual
    return [seen[i] for i in range(len(model.blocks))], feats, logits


SPECS = {
    "tome": lambda: make_spec([
        BlockSpec(attn(), 40, merge=MergeSpec("tome", r=8)),
        BlockSpec(attn(), 40),
        BlockSpec(attn(), 40, merge=MergeSpec("tome", r=20)),
        BlockSpec(attn(), 40)]),
    "tome_distilled": lambda: make_spec([
        BlockSpec(attn(), 40, merge=MergeSpec("tome", r=31)),
        BlockSpec(attn(), 40, merge=MergeSpec("tome", r=16)),
        BlockSpec(attn(), 40)], dist_token=True),
    "tome_avg_pool_no_class_token": lambda: make_spec([
        BlockSpec(attn(), 40, merge=MergeSpec("tome", r=5)),
        BlockSpec(attn(), 40, merge=MergeSpec("tome", r=5))],
        class_token=False, global_pool="avg", fc_norm=True, final_norm=False),
    "atme_then_tome": lambda: make_spec([
        BlockSpec(attn(), 40, merge=MergeSpec("atme", axis="w")),
        BlockSpec(attn(), 40, merge=MergeSpec("atme", axis="h")),
        BlockSpec(attn(), 40, merge=MergeSpec("atme", axis="w")),
        BlockSpec(attn(), 40, merge=MergeSpec("tome", r=3)),
        BlockSpec(attn(), 40)], img_size=(32, 28)),
    "ragged_heads_and_no_attention": lambda: make_spec([
        BlockSpec(AttentionSpec([8, 5, 3], [8, 2, 6], 8 ** -0.5), 40, merge=MergeSpec("atme", axis="h")),
        BlockSpec(None, 40, merge=MergeSpec("atme", axis="w")),
        BlockSpec(attn(2), 0, merge=MergeSpec("tome", r=4)),
        BlockSpec(None, 30)], dist_token=True),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_token_count_follows_the_spec_schedule(name):
    spec = SPECS[name]()
    model = model_for(spec)
    images = torch.randn(2, 3, *spec.img_size)
    counts, feats, logits = tokens_seen_by_blocks(model, images)
    assert counts == tokens_per_block(spec)
    assert feats.shape == (2, final_tokens(spec), spec.embed_dim)
    assert logits.shape == (2, spec.num_classes) and torch.isfinite(logits).all()


def test_tome_merge_uses_keys_averaged_over_heads_and_sizes_drive_attention():
    """Block 0 merges with ToMe on its keys; block 1 then attends with log(size) added."""
    spec = make_spec([BlockSpec(attn(), 40, merge=MergeSpec("tome", r=12)), BlockSpec(attn(), 40)])
    model = model_for(spec).double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(images))
        first, second = model.blocks
        keys = first.attn.qkv(first.norm1(x))[..., 24:48]
        metric = keys.unflatten(-1, (3, 8)).mean(dim=2)  # ToMe: k.mean over heads
        x = first.attention_residual(x, None)
        x, size = tome_merge_ref(x, metric, 12, None, True, False)
        x = first.mlp_residual(x)
        assert size.sum(1).flatten().tolist() == [65.0, 65.0] and size.max() > 1
        x = second.mlp_residual(second.attention_residual(x, size))
        expected = model.norm(x)
        torch.testing.assert_close(model.forward_features(images), expected, rtol=1e-12, atol=1e-12)
        # without sizes the second block's attention differs: sizes are really used
        no_sizes = model.norm(second.mlp_residual(second.attention_residual(
            first.mlp_residual(tome_merge_ref(first.attention_residual(
                model._pos_embed(model.patch_embed(images)), None), metric, 12)[0]), None)))
        assert not torch.allclose(no_sizes, expected)


def test_distillation_token_stays_second_after_tome():
    spec = SPECS["tome_distilled"]()
    model = model_for(spec)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(images))
        block = model.blocks[0]
        x, metric = block.attention_residual(x, None, return_keys=True)
        merged, size = model._merge(0, x, None, metric)
    assert torch.equal(merged[:, :2], x[:, :2]) and size[:, :2].flatten().tolist() == [1.0] * 4


def test_atme_merge_follows_the_grid():
    """After ATME along w, token (i, j) of the merged grid stands for grid tokens (i, 2j), (i, 2j+1)."""
    spec = make_spec([BlockSpec(attn(), 40, merge=MergeSpec("atme", axis="w")), BlockSpec(attn(), 40)],
                     img_size=(32, 28))
    model = model_for(spec)
    images = torch.randn(1, 3, 32, 28)
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(images))
        x, metric = model.blocks[0].attention_residual(x, None, return_keys=True)
        merged, size = model._merge(0, x, None, metric)
    assert merged.shape[1] == 1 + 8 * 4  # 8 x 7 grid -> 8 x 4
    # a pair adds the share (1 + max(cos, 0)) / 2 of its source's size; the odd column stays at 1
    pair_sizes = size[0, 1:, 0].reshape(8, 4)
    assert pair_sizes[:, :3].ge(1).all() and pair_sizes[:, :3].le(2).all() and pair_sizes[:, 3].eq(1).all()
    # the odd last column passes through unchanged
    grid_in = x[0, 1:].reshape(8, 7, -1)
    assert torch.equal(merged[0, 1:].reshape(8, 4, -1)[:, 3], grid_in[:, 6])
