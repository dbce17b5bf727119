"""CAIT: ATME plans keep the 2-D grid and unmerge to full resolution, shared channel masks
slice exactly (float64, merges included), and the few-shot run meets the budget."""

import pytest
import timm
import torch

from compress_cli import run_compress_cli
from dcvit_engine.artifact import load, load_report, save
from dcvit_engine.compress import api
from dcvit_engine.compress.cait import (
    ChannelGates,
    atme_spec,
    candidate_plans,
    compress_cait,
    fit_masks,
    full_resolution_features,
    plan_atme,
)
from dcvit_engine.compress.slicing import BlockMasks, apply_masks, slice_model, width_costs
from dcvit_engine.engine import build_engine
from dcvit_engine.macs import count_macs
from dcvit_engine.reference import ViTReference, reference_from_timm
from dcvit_engine.spec import merge_schedule, tokens_per_block

TOLERANCE = 1.005  # the final MACs may exceed the target by at most 0.5%


def tiny_vit(**kw):
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    args.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**args).eval()


def with_spec(reference: ViTReference, spec) -> ViTReference:
    with torch.device("meta"):
        out = ViTReference(spec)
    out.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return out.eval()


def test_atme_keeps_the_grid_and_alternates_axes():
    spec = reference_from_timm(tiny_vit()).spec  # 8 x 8 grid + class token
    merged = atme_spec(spec, [0, 1, 3], first_axis="w")
    assert [b.merge.axis if b.merge else None for b in merged.blocks] == ["w", "h", None, "w"]
    grids = [grid for _, _, grid in merge_schedule(merged)]
    assert grids == [(8, 8), (8, 4), (4, 4), (4, 4)]
    assert tokens_per_block(merged) == [65, 33, 17, 17]
    assert count_macs(merged).blocks[3].mlp_tokens == 1 + 4 * 2
    for layers in candidate_plans(spec):  # every candidate is a valid rectangular plan
        schedule = merge_schedule(atme_spec(spec, layers))
        assert all(grid is not None for _, _, grid in schedule)


def test_a_single_column_switches_the_axis():
    spec = reference_from_timm(tiny_vit(img_size=(32, 8))).spec  # 8 x 2 grid
    merged = atme_spec(spec, [0, 1, 2], first_axis="w")
    assert [b.merge.axis for b in merged.blocks[:3]] == ["w", "h", "h"]  # (8,1) (4,1) (2,1)
    small = reference_from_timm(tiny_vit(img_size=8)).spec  # 2 x 2 grid
    with pytest.raises(ValueError, match="already 1 x 1"):
        atme_spec(small, [0, 1, 2])


def test_full_resolution_features_unmerge_to_the_input_grid():
    teacher = reference_from_timm(tiny_vit().double())
    student = with_spec(teacher, atme_spec(teacher.spec, [1, 2], first_axis="w"))
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        merged = student.forward_features(images)
        full = full_resolution_features(student, images)
    assert merged.shape == (2, 1 + 4 * 4, 48)
    assert full.shape == (2, 1 + 8 * 8, 48)
    grid = full[:, 1:].reshape(2, 8, 8, 48)
    assert torch.equal(grid[:, :, 0::2], grid[:, :, 1::2])  # axis w undone
    assert torch.equal(grid[:, 0::2], grid[:, 1::2])        # axis h undone
    assert torch.equal(grid[:, ::2, ::2].reshape(2, 16, 48), merged[:, 1:])
    assert torch.equal(full[:, 0], merged[:, 0])


def test_shared_channel_masks_slice_exactly_with_merges():
    teacher = reference_from_timm(tiny_vit(init_values=0.3)).double()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student = with_spec(teacher, atme_spec(teacher.spec, [0, 2], first_axis="h"))
    gates = ChannelGates(student, 0.5, count_macs(teacher.spec).total)
    keep = ((torch.rand(gates.logits.shape) > 0.4) * (0.5 + torch.rand(gates.logits.shape))).double()
    keep[:, :, 0] = 1.0  # at least one channel of each kind
    neuron_keep = [((torch.rand(n.shape) > 0.5) * (0.5 + torch.rand(n.shape))).double()
                   for n in gates.neuron_logits]
    neuron_keep[1][:5] = 1.0
    neuron_keep[2].zero_()  # an MLP with no neuron left: the branch goes, with its bias
    masks = gates.masks(student, keep, neuron_keep)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad(), apply_masks(student, masks):
        masked = student(images)
    sliced = slice_model(student, masks)
    with torch.no_grad():
        got = sliced(images)
    assert ((got - masked).norm() / masked.norm()).item() < 1e-10
    for row, block in enumerate(sliced.spec.blocks):
        kept = (keep[row] != 0).sum(1).tolist()
        assert block.attn.qk_dims == [kept[0]] * 3 and block.attn.v_dims == [kept[1]] * 3
        assert block.mlp_hidden == int((neuron_keep[row] != 0).sum())
    # integer widths times integer costs in float64: exact
    hard_neurons = [(n != 0).double() for n in neuron_keep]
    assert float(gates.macs((keep != 0).double(), hard_neurons)) == count_macs(sliced.spec).total
    costs = width_costs(sliced.spec)
    blocks = sliced.spec.blocks
    assert costs.total([b.attn.qk_total for b in blocks], [b.attn.v_total for b in blocks],
                       [b.mlp_hidden for b in blocks]) == count_macs(sliced.spec).total


def test_per_head_q_k_masks_are_refused_where_tokens_merge():
    teacher = reference_from_timm(tiny_vit())
    student = with_spec(teacher, atme_spec(teacher.spec, [1]))
    attn = student.spec.blocks[1].attn
    qkv = torch.ones(attn.qkv_out)
    qkv[0] = 0  # channel 0 of head 0 only
    masks = [BlockMasks() for _ in range(4)]
    masks[1] = BlockMasks(qkv=qkv)
    with pytest.raises(ValueError, match="same in every head"):
        slice_model(student, masks)


@pytest.mark.parametrize("target", [0.8, 0.5, 0.3])
def test_plan_and_masks_fit_the_budget(target):
    teacher = reference_from_timm(tiny_vit())
    layers, merged = plan_atme(teacher.spec, target, token_share=0.5)
    gates = ChannelGates(with_spec(teacher, merged), target, count_macs(teacher.spec).total)
    budget = target * gates.teacher_macs
    keep, neuron_keep = fit_masks(gates, gates.hard(), budget, gates.hard_neurons())
    macs = float(gates.macs(keep, neuron_keep))
    assert macs <= budget
    assert (keep.sum(2) >= 1).all() and all(n.sum() >= 1 for n in neuron_keep)
    one_more = min([gates.channel_macs(r, k) for r in range(keep.shape[0]) for k in (0, 1)]
                   + [gates.channel_macs(r, 2) for r in range(len(neuron_keep))])
    everything = bool(keep.all()) and all(bool(n.all()) for n in neuron_keep)
    assert macs + one_more > budget or everything  # nothing more fits


@pytest.mark.parametrize("target,token_share", [(0.6, 0.5), (0.7, 0.0), (0.5, 1.0)])
def test_few_shot_cait_meets_budget(target, token_share, tmp_path):
    model = tiny_vit(patch_size=8)  # 4 x 4 grid: keeps the run short
    images = torch.randn(16, 3, 32, 32)
    report = {}
    student = api.compress(model, images, method="cait", target_macs=target, token_share=token_share,
                           iters=12, finetune_iters=3, batch_size=8, device="cpu", report=report)
    teacher_macs = count_macs(model).total
    assert count_macs(student.spec).total <= target * TOLERANCE * teacher_macs
    merges = [b.merge for b in student.spec.blocks if b.merge is not None]
    assert all(m.kind == "atme" for m in merges)
    assert (len(merges) == 0) == (token_share == 0.0)
    for block in student.spec.blocks:  # consistent across heads
        assert len(set(block.attn.qk_dims)) == 1 and len(set(block.attn.v_dims)) == 1
    assert all(grid is not None for _, _, grid in merge_schedule(student.spec))
    test_images = torch.randn(2, 3, 32, 32)
    loaded = load(save(student, tmp_path / "cait"))
    engine = build_engine(tmp_path / "cait", backend="torch")
    with torch.no_grad():
        ref = student(test_images)
        assert torch.allclose(loaded(test_images), ref)
        assert torch.allclose(engine(test_images), ref, rtol=1e-4, atol=1e-5)
        assert full_resolution_features(student, test_images).shape == (2, 17, 48)


def test_bad_inputs_are_rejected():
    model = tiny_vit()
    images = torch.randn(4, 3, 32, 32)
    with pytest.raises(ValueError, match="out of CAIT's reach"):
        compress_cait(model, images, 0.02)  # below one channel and one neuron per block
    with pytest.raises(ValueError, match="token_share"):
        compress_cait(model, images, 0.5, token_share=1.5)
    with pytest.raises(ValueError, match="first_axis"):
        compress_cait(model, images, 0.5, first_axis="x")
    with pytest.raises(ValueError, match="without token merging"):
        teacher = reference_from_timm(model)
        compress_cait(with_spec(teacher, atme_spec(teacher.spec, [1])), images, 0.5)
    with pytest.raises(ValueError, match="no option"):
        api.compress(model, images, method="cait", target_macs=0.5, merge_layers=[1])


def test_cli_compress_cait(capsys, tmp_path):
    rc, out, err = run_compress_cli(capsys, tmp_path, "cait", "--iters", "5", "--finetune-iters", "2",
                           "--token-share", "0.7")
    assert rc == 0, err
    report = load_report(tmp_path / "cait")
    assert report["method"] == "cait" and report["achieved_macs"] <= 0.6 * TOLERANCE * report["teacher_macs"]
    assert set(report["extras"]["removed_share"]) == {"tokens", "attention", "mlp"}
    from dcvit_engine.cli import main
    assert main(["info", str(tmp_path / "cait")]) == 0
    assert "CAIT (ATME token merging + CDCP channel pruning) is this project's own definition" \
        in capsys.readouterr().out
    rc, _, err = run_compress_cli(capsys, tmp_path, "cait", "--schedule", "decreasing")
    assert rc == 2 and "--schedule do(es) not apply to --method cait" in err


def test_interrupted_run_resumes_after_the_search(tmp_path, monkeypatch):
    """The search and the finetuning are checkpointed steps: a run interrupted in the
    finetuning resumes without searching again and gives the uninterrupted run's student."""
    from dcvit_engine.compress import cait, run

    model = tiny_vit(patch_size=8)
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    options = dict(iters=4, finetune_iters=3, batch_size=8, device="cpu", seed=5)
    expected = compress_cait(model, images, 0.6, **options)

    real_finetune, real_search = run.kd_finetune, cait.learn_channel_gates
    searches = []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def counted(*args, **kwargs):
        searches.append(1)
        return real_search(*args, **kwargs)

    monkeypatch.setattr(run, "kd_finetune", interrupted)
    monkeypatch.setattr(cait, "learn_channel_gates", counted)
    folder = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        compress_cait(model, images, 0.6, checkpoint_dir=folder, **options)
    assert searches == [1] and (folder / "state.json").is_file()
    monkeypatch.setattr(run, "kd_finetune", real_finetune)
    report = {}
    student = compress_cait(model, images, 0.6, checkpoint_dir=folder, resume=True, report=report, **options)
    assert searches == [1], "the search is not run again"
    assert report["resumed"] and len(report["extras"]["finetune_losses"]) == 3
    assert student.spec == expected.spec
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(student.state_dict()[name], tensor)  # same seeds, same data
