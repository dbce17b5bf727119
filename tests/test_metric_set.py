"""DeepInversion metric set on a tiny timm teacher: the teacher's CE on the targets falls,
the image prior matches DeepInversion's formula, pixels stay valid, the cache is reused."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from dcvit_engine.compress.metric_set import MetricSet, image_prior_tv, synthesize_metric_set

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=48, depth=2, num_heads=3, num_classes=10).eval()
    with torch.no_grad():  # a random head barely depends on the input; sharpen it
        model.head.weight.mul_(30.0)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": MEAN, "std": STD}
    return model


def teacher_ce(teacher, result: MetricSet) -> float:
    with torch.no_grad():
        return F.cross_entropy(teacher(result.images), result.target_classes).item()


def test_synthesis_lowers_the_teachers_loss(teacher):
    # No jitter: a random tiny teacher is not shift invariant, so the default 4 px jitter
    # (30 px scaled to 32 px) would make 60 iterations too few to show the effect.
    result = synthesize_metric_set(teacher, num_images=12, iters=60, seed=1, progress=False, jitter=0)
    assert result.images.shape == (12, 3, 32, 32) and result.images.dtype == torch.float32
    # 12 images of 10 classes: every class once, then two more; sorted
    assert sorted(result.target_classes.bincount(minlength=10).tolist()) == [1] * 8 + [2] * 2
    assert torch.equal(result.target_classes, result.target_classes.sort().values)
    assert len(result.loss_history) == 60
    noise = MetricSet(torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
                      result.target_classes, [])
    assert teacher_ce(teacher, result) < 0.1 * teacher_ce(teacher, noise)
    assert min(result.loss_history[-10:]) < result.loss_history[0]
    low, high = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25  # clipped to valid pixels of the teacher's normalization
    assert result.images.min() >= low - 1e-6 and result.images.max() <= high + 1e-6
    again = synthesize_metric_set(teacher, num_images=12, iters=60, seed=1, progress=False, jitter=0)
    assert torch.equal(again.images, result.images)


def test_tv_prior_matches_deepinversion_formula():
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    beta = 0.6
    diffs = [x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
             x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:]]
    expected = sum(math.sqrt(float((d ** 2).sum())) ** beta for d in diffs)
    assert abs(float(image_prior_tv(x, beta)) - expected) < 1e-9 * expected


def test_cache_is_reused_and_keyed(teacher, tmp_path):
    path = tmp_path / "metric.pt"
    first = synthesize_metric_set(teacher, num_images=4, iters=3, cache_path=path, progress=False)
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    cached = synthesize_metric_set(teacher, num_images=4, iters=3, cache_path=path, progress=False)
    assert torch.equal(cached.images, first.images) and cached.loss_history == first.loss_history
    assert path.stat().st_mtime_ns == stamp  # read, not rewritten
    other = synthesize_metric_set(teacher, num_images=4, iters=3, seed=5, cache_path=path, progress=False)
    assert not torch.equal(other.images, first.images)  # other settings: regenerated, file replaced
    folder = tmp_path / "sets"
    folder.mkdir()
    synthesize_metric_set(teacher, num_images=4, iters=3, cache_path=folder, progress=False)
    synthesize_metric_set(teacher, num_images=4, iters=3, seed=5, cache_path=folder, progress=False)
    assert len(list(folder.glob("metric_set-*.pt"))) == 2
    path.write_bytes(b"corrupt")
    assert torch.equal(synthesize_metric_set(teacher, num_images=4, iters=3, cache_path=path,
                                             progress=False).images, first.images)


def test_bad_input(teacher):
    with pytest.raises(ValueError, match="num_images"):
        synthesize_metric_set(teacher, num_images=0, progress=False)
    with pytest.raises(ValueError, match="iters"):
        synthesize_metric_set(teacher, iters=-1, progress=False)
    with pytest.raises(ValueError, match="img_size"):
        synthesize_metric_set(teacher, img_size=(32,), iters=1, progress=False)
    with pytest.raises(ValueError, match="lr"):
        synthesize_metric_set(teacher, lr=0, iters=1, progress=False)


def test_interrupted_synthesis_resumes_to_the_same_images(teacher, tmp_path, monkeypatch):
    """Checkpointed every iteration (checkpoint_seconds=0): interrupted at iteration 5 of 8
    (raised from the image prior, as Ctrl-C would), the rerun continues from the checkpoint
    and ends with the images of an uninterrupted run; the checkpoint is then removed."""
    from dcvit_engine.compress import metric_set

    settings = dict(num_images=4, iters=8, seed=3, progress=False, checkpoint_seconds=0)
    whole = synthesize_metric_set(teacher, **settings)
    real, calls = metric_set.image_prior_tv, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(metric_set, "image_prior_tv", interrupted)
    path = tmp_path / "metric.pt"
    with pytest.raises(KeyboardInterrupt):
        synthesize_metric_set(teacher, cache_path=path, **settings)
    progress = metric_set.progress_file(path)
    assert progress.is_file() and not path.exists()
    assert torch.load(progress, weights_only=True)["step"] == 5
    calls.clear()
    resumed = synthesize_metric_set(teacher, cache_path=path, **settings)
    assert len(calls) == 3, "iterations 5, 6, 7 only"
    assert torch.equal(resumed.images, whole.images) and resumed.loss_history == whole.loss_history
    assert path.is_file() and not progress.exists()
