"""PRACTISE (whole-block dropping) on a tiny timm ViT."""
import json

import pytest
import timm
import torch

from dcvit_engine.compress import practise as practise_module
from dcvit_engine.compress.practise import compress_practise, with_adaptor, with_official_adaptors
from dcvit_engine.compress.run_state import STATE_FILENAME
from dcvit_engine.compress.structure import plan_block_drop, replace_block
from dcvit_engine.macs import count_macs
from dcvit_engine.reference import reference_from_timm

FAST = dict(iters=10, adaptor_iters=15, adaptor_lr=3e-3, batch_size=8, lr=1e-3, device="cpu", seed=5)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=48, depth=6, num_heads=3, num_classes=10)
    return reference_from_timm(model)


@pytest.fixture(scope="module")
def images():
    return torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_untrained_adaptor_is_the_dropped_block(teacher, images):
    adapted, adaptor = with_adaptor(teacher, 3)
    dropped = replace_block(teacher, 3, 0)
    with torch.no_grad():
        assert torch.equal(adapted(images), dropped(images))
    assert adaptor.linear.weight.abs().sum() == 0 and adaptor.linear.weight.shape == (48, 48)


def test_official_recipe_adaptors_sgd_and_label(teacher, images):
    adapted, params = with_official_adaptors(teacher, 3)
    with torch.no_grad():  # identity adaptors: exactly the dropped block before training
        assert torch.allclose(adapted(images), replace_block(teacher, 3, 0)(images), atol=1e-5)
    # as the DC-ViT code's port: after the fc2 of every earlier block (0, 1, 2), before the qkv of
    # every later block (4, 5); weight and bias each
    assert len(params) == 2 * (3 + 2) and params[0].shape == (48, 48)
    assert all(isinstance(adapted.blocks[i].mlp.fc2, torch.nn.Sequential) for i in range(3))
    assert all(isinstance(adapted.blocks[i].attn.qkv, torch.nn.Sequential) for i in (4, 5))
    assert not isinstance(adapted.blocks[4].mlp.fc2, torch.nn.Sequential)
    shared, official = {}, {}
    compress_practise(teacher, images, 0.7, report=shared, **dict(FAST, iters=3))
    student = compress_practise(teacher, images, 0.7, recipe="official", report=official,
                                **dict(FAST, iters=3))
    assert official["extras"]["recipe"] == "official" and shared["extras"]["recipe"] == "shared"
    assert official["settings"]["lr"] == FAST["lr"] and "feature MSE" in official["extras"]["scoring"]
    assert ([s["score"] for s in official["extras"]["block_scores"]]
            != [s["score"] for s in shared["extras"]["block_scores"]])
    # every layer but the classifier trains in the official recipe, the last block included
    assert not torch.equal(student.blocks[5].mlp.fc1.weight, teacher.blocks[5].mlp.fc1.weight)
    assert torch.equal(student.head.weight, teacher.head.weight)
    with pytest.raises(ValueError, match="recipe must be one of"):
        compress_practise(teacher, images, 0.7, recipe="paper", **FAST)


def test_recipe_rates_are_defaults_and_explicit_rates_are_kept(teacher, images):
    """The recipe decides the rates only where none was given: an explicit lr 3e-5 / adaptor_lr
    1e-3 (the shared recipe's defaults) stays in the official recipe."""
    fast = {k: v for k, v in FAST.items() if k not in ("lr", "adaptor_lr")}
    given, default = {}, {}
    compress_practise(teacher, images, 0.85, recipe="official", lr=3e-5, adaptor_lr=1e-3, report=given,
                      **dict(fast, iters=2, adaptor_iters=2))
    compress_practise(teacher, images, 0.85, recipe="official", report=default,
                      **dict(fast, iters=2, adaptor_iters=2))
    assert (given["settings"]["lr"], given["settings"]["adaptor_lr"]) == (3e-5, 1e-3)
    assert (default["settings"]["lr"], default["settings"]["adaptor_lr"]) == (0.02, 0.02)



def test_score_cache_scores_each_candidate_once_across_targets(teacher, images):
    cache, first, second, fresh = {}, {}, {}, {}
    compress_practise(teacher, images, 0.8, score_cache=cache, report=first, **dict(FAST, iters=2))
    compress_practise(teacher, images, 0.6, score_cache=cache, report=second, **dict(FAST, iters=2))
    assert ([s["score"] for s in second["extras"]["block_scores"]]
            == [s["score"] for s in first["extras"]["block_scores"]])
    assert second["timings"]["selection_s"] == 0.0 < first["timings"]["selection_s"]
    # another seed is another setting: scored afresh
    compress_practise(teacher, images, 0.6, score_cache=cache, report=fresh, **dict(FAST, iters=2, seed=6))
    assert fresh["timings"]["selection_s"] > 0.0 and len(cache) == 2


def test_drops_whole_blocks_and_reports_honest_macs(teacher, images):
    report = {}
    student = compress_practise(teacher, images, 0.7, report=report, rounding="down", **FAST)
    plan = plan_block_drop(teacher.spec, 0.7, rounding="down")
    dropped = [i for i, b in enumerate(student.spec.blocks) if b.attn is None]
    assert dropped == report["extras"]["chosen_blocks"] and len(dropped) == plan.blocks_dropped
    assert all(student.spec.blocks[i].mlp_hidden == 0 for i in dropped)
    assert all(student.spec.blocks[i].attn is not None for i in range(6) if i not in dropped)
    assert report["achieved_macs"] == count_macs(student).total == plan.macs <= plan.target_macs
    assert report["achieved_ratio"] < 0.7  # whole blocks: the next step below the target
    assert "proportional to block MACs" in report["extras"]["latency_model"]
    scores = {s["block"]: s for s in report["extras"]["block_scores"]}
    assert sorted(scores) == [1, 2, 3, 4]
    lowest = sorted(scores, key=lambda b: (scores[b]["score"], b))[:len(dropped)]
    assert sorted(lowest) == dropped
    # score = recoverability / % of MACs saved, the same for every block of a ViT
    # (a quotient of floats: equal only up to rounding, so compared with a tolerance)
    saved = 100 * plan.block_macs / plan.teacher_macs
    assert [s["recoverability"] / s["score"] for s in scores.values()] == pytest.approx([saved] * len(scores))
    # the adaptor training lowered the feature loss for every candidate
    for losses in report["extras"]["losses"]["adaptor"].values():
        assert losses[-1] < losses[0]
    assert report["extras"]["losses"]["finetune"][-1] < report["extras"]["losses"]["finetune"][0]
    json.dumps(report)


def test_resume_after_interrupted_finetune(teacher, images, tmp_path, monkeypatch):
    real_finetune = practise_module.feature_mimic_finetune

    def dies_in_final_finetune(*args, **kwargs):
        if kwargs["iters"] == FAST["iters"]:
            raise KeyboardInterrupt("simulated interruption")
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(practise_module, "feature_mimic_finetune", dies_in_final_finetune)
    with pytest.raises(KeyboardInterrupt):
        compress_practise(teacher, images, 0.7, checkpoint_dir=tmp_path, **FAST)
    state = json.loads((tmp_path / STATE_FILENAME).read_text())
    assert len(state["scores"]) == 4 and state.get("finetune") is None

    calls = []
    monkeypatch.setattr(practise_module, "feature_mimic_finetune",
                        lambda *a, **k: calls.append(k["iters"]) or real_finetune(*a, **k))
    report = {}
    student = compress_practise(teacher, images, 0.7, checkpoint_dir=tmp_path, resume=True,
                                report=report, **FAST)
    assert calls == [FAST["iters"]] and report["resumed"]
    assert sum(b.attn is None for b in student.spec.blocks) == len(report["extras"]["chosen_blocks"])


def test_infeasible_target(teacher, images):
    with pytest.raises(ValueError, match="smallest feasible target"):
        compress_practise(teacher, images, 0.05, **FAST)
