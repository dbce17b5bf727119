"""progress.RunProgress (the overall line of a command's phases), compress.phases (the plan)
and presets (the budget learning-rate rule, --preset quick). A fake clock: no timing."""
import io

import pytest
import timm

from dcvit_engine.compress.phases import planned_phases
from dcvit_engine.presets import PAPER_LR, SMALL_BUDGET_LR, budget_lr, gpu_sized_note, preset_options
from dcvit_engine.progress import DEEPINVERSION, TRAINING, RunProgress, progress_bar


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_estimate_waits_for_timed_steps_then_counts_every_phase_bar():
    clock, log = _Clock(), io.StringIO()
    run = RunProgress([("metric set", 4, DEEPINVERSION), ("scoring", 3, TRAINING), ("finetune", 6, TRAINING)],
                      stream=log, clock=clock)
    assert run.describe_plan() == ("plan: metric set: 4 DeepInversion steps; scoring: 3 training steps; "
                                   "finetune: 6 training steps (13 steps)")
    assert run.estimate_text().startswith("no estimate yet")
    with run:
        for _ in progress_bar(range(4), desc="metric set (DeepInversion)", stream=io.StringIO()):
            clock.now += 2.0
        assert "no estimate yet for the training steps" in run.line()
        for _ in progress_bar(range(3), desc="scoring", disable=True):  # a quiet bar counts too
            clock.now += 1.0
        assert run.line().endswith("about 0:06 left on this device")  # 6 steps x 1 s
        bar = progress_bar(total=6, desc="finetune", stream=io.StringIO())
        for _ in range(6):
            clock.now += 1.0
            bar.update()
        bar.close()
    text = log.getvalue()
    assert "estimate after the first timed steps: at least" in text
    assert text.splitlines()[-1] == ("overall: 13/13 steps (100%), 0:17 elapsed, "
                                     "about 0:00 left on this device")
    with progress_bar(total=2, desc="after", stream=io.StringIO()) as bar:  # outside: not counted
        bar.update(2)
    assert run.done == {DEEPINVERSION: 4, TRAINING: 9}


def test_plan_follows_the_methods_settings_and_plan():
    from dcvit_engine.adapter import spec_from_timm
    spec = spec_from_timm(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                            patch_size=8, embed_dim=48, depth=6, num_heads=3,
                                            num_classes=10))
    phases = planned_phases("dcvit", spec, 0.8, dict(iters=10, select_iters=5, metric_iters=7))
    (_, metric, kind), (_, scoring, _), (label, progressive, _) = phases
    assert (metric, kind) == (7, DEEPINVERSION) and scoring == 4 * 5  # blocks 1..4 are candidates
    assert progressive % 10 == 0 and label.startswith("progressive")
    assert [steps for _, steps, _ in planned_phases("practise", spec, 0.8, dict(iters=9))] == [4 * 9, 9]
    assert planned_phases("tome", spec, None, {}) == []


def test_learning_rate_follows_the_budget():
    assert budget_lr(1) == budget_lr(150) == SMALL_BUDGET_LR
    assert budget_lr(2000) == budget_lr(10_000) == PAPER_LR
    assert PAPER_LR < budget_lr(500) < budget_lr(300) < SMALL_BUDGET_LR
    assert budget_lr(500) == pytest.approx(1.96e-4, rel=0.01)


def test_quick_preset_fills_only_what_was_not_given_and_cpu_note():
    options = preset_options("quick", ["iters", "metric_iters", "lr"], dict(iters=7))
    assert options == dict(metric_iters=100) and preset_options(None, ["iters"], {}) == {}
    assert "--preset quick" in gpu_sized_note("cpu", 30_000, None)
    assert gpu_sized_note("cuda", 30_000, None) is None and gpu_sized_note("cpu", 500, None) is None


def test_compress_help_states_the_lr_rule_and_the_quick_preset(capsys):
    from dcvit_engine.cli import main
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "follows the iterations, 0.001 at <= 150, the paper's 3e-05 at >= 2000" in text
    assert "--preset {quick}" in text and "iters 100, select_iters 25" in text


def test_a_one_step_run_says_so_instead_of_an_unchanged_loss():
    from dcvit_engine.compress.fewshot import loss_change
    assert loss_change("feature MSE", [0.0291]) == ("feature MSE 0.02910 at its only finetuning step "
                                                    "(one step: no change to report)")
    assert loss_change("feature MSE", [0.5, 0.25]) == "feature MSE 0.50000 -> 0.25000 over 2 steps"


def test_uvc_says_when_its_search_was_too_short_for_the_gates(capsys, tmp_path):
    from compress_cli import run_compress_cli
    rc, out, err = run_compress_cli(capsys, tmp_path, "uvc", "--iters", "6", "--finetune-iters", "1")
    assert rc == 0, err
    assert "the search ran 5 steps with its gates free (after 1 warm-up steps), too few" in err
    assert "give --iters 41 or more" in err
