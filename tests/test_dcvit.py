"""DC-ViT on a tiny timm ViT: selection, progressive finetuning, checkpoints and resume."""
import json

import pytest
import timm
import torch

import dcvit_engine
from dcvit_engine.artifact import load
from dcvit_engine.compress import dcvit as dcvit_module
from dcvit_engine.compress.dcvit import compress_dcvit, keep_neurons
from dcvit_engine.compress.fewshot import mean_mlp_activations
from dcvit_engine.compress.run_state import STATE_FILENAME
from dcvit_engine.compress.structure import plan_dcvit, replace_block
from dcvit_engine.macs import count_macs
from dcvit_engine.reference import ViTReference, reference_from_timm

TARGET = 0.7
FAST = dict(iters=12, select_iters=2, batch_size=8, lr=1e-3, device="cpu", seed=3)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=48, depth=5, num_heads=3, num_classes=10)
    return reference_from_timm(model)


@pytest.fixture(scope="module")
def images():
    return torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def metric_set():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def feature_mse(student, teacher, images):
    with torch.no_grad():
        return torch.nn.functional.mse_loss(student.forward_features(images),
                                            teacher.forward_features(images)).item()


def run(teacher, images, metric_set, **options):
    report = {}
    student = compress_dcvit(teacher, images, TARGET, metric_set=metric_set, report=report,
                             **dict(FAST, **options))
    return student, report


def test_structure_scores_and_report(teacher, images, metric_set):
    student, report = run(teacher, images, metric_set)
    plan = plan_dcvit(teacher.spec, TARGET)
    assert isinstance(student, ViTReference) and not student.training
    compressed = [i for i, b in enumerate(student.spec.blocks) if b.attn is None]
    assert sorted(compressed) == sorted(report["extras"]["chosen_blocks"])
    assert len(compressed) == plan.blocks_compressed
    assert all(student.spec.blocks[i].mlp_hidden == plan.hidden_width for i in compressed)
    assert report["achieved_macs"] == count_macs(student).total == plan.macs
    # every candidate was scored, the chosen ones are the lowest KL, in score order
    scores = {s["block"]: s["score"] for s in report["extras"]["block_scores"]}
    assert sorted(scores) == list(plan.candidates)
    ranked = sorted(scores, key=lambda b: (scores[b], b))
    assert report["extras"]["chosen_blocks"] == ranked[:plan.blocks_compressed]
    assert [s["block"] for s in report["extras"]["steps"]] == report["extras"]["chosen_blocks"]
    # only blocks up to the one after the latest compressed block were trainable
    for k, step in enumerate(report["extras"]["steps"]):
        assert step["trainable_up_to"] == min(max(report["extras"]["chosen_blocks"][:k + 1]) + 1, 4)
    assert set(report["timings"]) >= {"selection_s", "progressive_s", "total_s"}
    json.dumps(report)  # report.json material
    # the teacher is untouched
    assert teacher.spec.blocks[2].attn is not None and teacher.blocks[2].attn is not None


def test_progressive_finetuning_lowers_feature_mse(teacher, images, metric_set):
    student, report = run(teacher, images, metric_set, iters=25)
    for step in report["extras"]["steps"]:
        assert step["last_loss"] < step["first_loss"]
    # the same blocks and neurons without finetuning mimic the teacher worse
    plan = plan_dcvit(teacher.spec, TARGET)
    untrained = teacher
    for block in report["extras"]["chosen_blocks"]:
        neurons = keep_neurons("random", block, plan.teacher_hidden, plan.hidden_width, FAST["seed"], None)
        untrained = replace_block(untrained, block, plan.hidden_width, neurons)
    assert feature_mse(student, teacher, images) < 0.8 * feature_mse(untrained, teacher, images)


def test_full_length_scoring_trains_the_final_norm_and_skips_flips(teacher, images, metric_set):
    """The official code scores each candidate after a full finetuning run and always trains
    the final norm; "shift" augmentation never flips (digits)."""
    options = dict(FAST, iters=3, augment="shift", candidates=[1, 2])
    del options["select_iters"]
    report = {}
    student = compress_dcvit(teacher, images, TARGET, metric_set=metric_set, report=report, **options)
    assert report["finetune_iters"]["per_candidate"] == 3
    assert all(len(losses) == 3 for losses in report["extras"]["losses"]["selection"].values())
    assert report["settings"]["augment"] == "shift"
    # blocks 3 and 4 stay frozen (candidates 1, 2), so the final norm trains only because
    # DC-ViT trains it always
    assert torch.equal(student.blocks[4].mlp.fc1.weight, teacher.blocks[4].mlp.fc1.weight)
    assert not torch.equal(student.norm.weight, teacher.norm.weight)
    assert torch.equal(student.head.weight, teacher.head.weight)
    with pytest.raises(ValueError, match="augment must be one of"):
        compress_dcvit(teacher, images, TARGET, metric_set=metric_set, augment="mixup", **FAST)


def test_activation_selection_keeps_the_most_active_neurons(teacher, images):
    activations = mean_mlp_activations(teacher, images, [2], 8, torch.device("cpu"))
    kept = keep_neurons("activation", 2, 192, 20, 0, activations)
    assert kept.tolist() == sorted(torch.topk(activations[2], 20).indices.tolist())
    _, report = run(teacher, images, torch.randn(4, 3, 32, 32), neuron_selection="activation", iters=2)
    assert report["settings"]["neuron_selection"] == "activation"


def test_resume_continues_where_it_stopped(teacher, images, metric_set, tmp_path, monkeypatch):
    reference, _ = run(teacher, images, metric_set, checkpoint_dir=tmp_path / "full")

    real_finetune = dcvit_module.feature_mimic_finetune
    calls = []

    def dies_on_second_progressive_step(*args, **kwargs):
        calls.append(kwargs["iters"])
        if kwargs["iters"] == FAST["iters"] and calls.count(FAST["iters"]) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real_finetune(*args, **kwargs)

    folder = tmp_path / "interrupted"
    monkeypatch.setattr(dcvit_module, "feature_mimic_finetune", dies_on_second_progressive_step)
    with pytest.raises(KeyboardInterrupt):
        run(teacher, images, metric_set, checkpoint_dir=folder)
    # the last complete checkpoint is intact: all scores and the first step
    state = json.loads((folder / STATE_FILENAME).read_text())
    assert len(state["scores"]) == 3 and len(state["steps"]) == 1
    saved = load(folder / state["artifact"])
    assert sum(b.attn is None for b in saved.spec.blocks) == 1

    calls.clear()
    monkeypatch.setattr(dcvit_module, "feature_mimic_finetune", real_finetune)
    with pytest.raises(FileExistsError, match="resume"):
        run(teacher, images, metric_set, checkpoint_dir=folder)
    with pytest.raises(ValueError, match="settings differ.*seed"):
        run(teacher, images, metric_set, checkpoint_dir=folder, resume=True, seed=4)
    counted = []
    monkeypatch.setattr(dcvit_module, "feature_mimic_finetune",
                        lambda *a, **k: counted.append(k["iters"]) or real_finetune(*a, **k))
    resumed, report = run(teacher, images, metric_set, checkpoint_dir=folder, resume=True)
    assert report["resumed"] and counted == [FAST["iters"]]  # no re-scoring, only the missing step
    assert resumed.spec == reference.spec
    for (name, a), (_, b) in zip(resumed.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_interrupted_metric_set_synthesis_resumes_within_the_phase(teacher, images, tmp_path, monkeypatch):
    """Interrupted inside DeepInversion (before any step ends), the run folder already holds
    a resumable state and the synthesis' own checkpoint; --resume continues the synthesis
    from that iteration, not from its start."""
    from dcvit_engine.compress import metric_set as metric_module

    monkeypatch.setattr(metric_module, "CHECKPOINT_SECONDS", 0.0)  # every iteration
    real, calls = metric_module.image_prior_tv, []

    def dies_at_iteration_4(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args)

    monkeypatch.setattr(metric_module, "image_prior_tv", dies_at_iteration_4)
    folder = tmp_path / "run"
    options = dict(checkpoint_dir=folder, metric_size=3, metric_iters=6)
    with pytest.raises(KeyboardInterrupt):
        run(teacher, images, None, **options)
    assert (folder / STATE_FILENAME).is_file() and (folder / "metric_set.pt.progress").is_file()
    calls.clear()
    _, report = run(teacher, images, None, resume=True, **options)
    assert report["resumed"] and len(calls) == 2, "iterations 4 and 5 only"
    assert not (folder / "metric_set.pt.progress").exists()


def test_package_entry_point_and_bad_input(teacher, images, metric_set):
    report = {}
    student = dcvit_engine.compress(teacher, images, method="dcvit", target_macs=TARGET,
                                    metric_set=metric_set, report=report, **FAST)
    assert report["method"] == "dcvit" and report["achieved_macs"] == count_macs(student).total
    with pytest.raises(ValueError, match="no option.*bogus"):
        dcvit_engine.compress(teacher, images, method="dcvit", target_macs=TARGET, bogus=1)
    with pytest.raises(ValueError, match="largest feasible"):
        dcvit_engine.compress(teacher, images, method="dcvit", target_macs=0.99)
    with pytest.raises(ValueError, match=r"shape \(N, 3, 32, 32\)"):
        compress_dcvit(teacher, images[:, :, :16], TARGET, metric_set=metric_set, **FAST)
    with pytest.raises(ValueError, match="iters must be a positive integer"):
        compress_dcvit(teacher, images, TARGET, metric_set=metric_set, **dict(FAST, iters=0))
    with pytest.raises(ValueError, match="neuron_selection"):
        compress_dcvit(teacher, images, TARGET, metric_set=metric_set, neuron_selection="gelu", **FAST)


def test_failed_save_keeps_the_last_complete_checkpoint(teacher, tmp_path, monkeypatch):
    from dcvit_engine.compress import checkpoint as checkpoint_module
    from dcvit_engine.compress.run_state import RunCheckpoint

    ckpt = RunCheckpoint(tmp_path, {"run": 1})
    first = replace_block(teacher, 1, 0)
    ckpt.state["steps"] = [1]
    ckpt.commit(first)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module, "_write_json_atomically", disk_full)
    ckpt.state["steps"] = [1, 2]
    with pytest.raises(OSError):
        ckpt.commit(replace_block(first, 2, 0))
    monkeypatch.undo()
    again = RunCheckpoint(tmp_path, {"run": 1}, resume=True)
    assert again.state["steps"] == [1]
    restored = again.model()
    assert restored.spec == first.spec
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), first.state_dict().values()))
