"""`dcvit demo` refuses bad fairness settings in one line, before training or writing anything,
and passes its finetuning settings to DC-ViT and PRACTISE only."""
import pytest

from dcvit_engine.cli import main


def test_bad_seeds_targets_and_augment_write_nothing(tmp_path, capsys):
    base = ["demo", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert main(base + ["--seeds", "0"]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
    # PRACTISE drops all four candidate blocks of the 6-block teacher at 0.4: DC-ViT has no fifth
    assert main(base + ["--targets", "0.9,0.4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "target 0.40 has no equal-MACs pair" in err and "\n" not in err
    assert main(base + ["--augment", "mixup"]) == 2
    assert "--augment must be one of" in capsys.readouterr().err
    assert main(base + ["--depth", "2"]) == 2
    assert "--depth must be at least 3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


class _Reached(Exception):
    """Raised by the run_sweep stand-in: the options have been seen, stop there."""


def test_only_dcvit_and_practise_get_the_demos_finetuning_settings(tmp_path, monkeypatch):
    """--iters/--lr/--augment and batch 32 reach DC-ViT and PRACTISE; UVC, CAIT and ToMe keep
    their own defaults (nothing but the CPU device reaches them). No teacher is trained."""
    import torch

    from dcvit_engine import demo_teacher, sweep
    from dcvit_engine.compress import metric_set

    def untrained_teacher(cache_dir=None, config=None, progress=True):
        torch.manual_seed(0)
        return demo_teacher.build_demo_model(config.model_kwargs()).eval(), dict(
            model_kwargs=config.model_kwargs(), from_cache=True, test_top1=0.0)

    def no_metric_set(teacher, num_images, iters, img_size, seed, **_):
        return metric_set.MetricSet(torch.zeros(num_images, 3, *img_size), torch.zeros(num_images).long(), [])

    seen = {}

    def recording_sweep(teacher, images, eval_images, eval_labels, methods, targets, **kwargs):
        seen.update(methods)
        raise _Reached

    monkeypatch.setattr(demo_teacher, "demo_teacher", untrained_teacher)
    monkeypatch.setattr(metric_set, "synthesize_metric_set", no_metric_set)
    monkeypatch.setattr(sweep, "run_sweep", recording_sweep)
    with pytest.raises(_Reached):
        main(["demo", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--seeds", "1",
              "--iters", "7", "--lr", "0.5", "--augment", "none"])
    fewshot = dict(iters=7, batch_size=32, lr=0.5, augment="none", device="cpu")
    assert seen["dcvit"] == fewshot and seen["practise"] == fewshot
    assert seen["uvc"] == seen["cait"] == dict(device="cpu")
    assert seen["tome"] == {}, "ToMe is training-free: no device, no iterations"
