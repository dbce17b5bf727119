"""Feature-mimicking and KD finetuning on a tiny timm pair: the student is a perturbed copy
of the teacher; the loss falls, frozen parameters and the teacher do not change."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from dcvit_engine.compress.augment import official_augment
from dcvit_engine.compress.finetune import (
    feature_mimic_finetune,
    kd_finetune,
    kd_loss,
    light_augment,
    select_parameters,
    trainable_up_to,
)

KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS).eval()


@pytest.fixture
def pair():
    teacher = tiny_vit()
    student = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return student, teacher


@pytest.fixture
def images():
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def feature_mse(student, teacher, x):
    with torch.no_grad():
        return F.mse_loss(student.forward_features(x), teacher.forward_features(x)).item()


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainable_up_to_selects_front_blocks(pair):
    student, _ = pair
    predicate = trainable_up_to(student, 1)
    names = [n for n, _ in student.named_parameters() if predicate(n)]
    assert "patch_embed.proj.weight" in names and "cls_token" in names and "pos_embed" in names
    assert any(n.startswith("blocks.1.") for n in names)
    assert not any(n.startswith(("blocks.2.", "norm.", "head.")) for n in names)
    everything = trainable_up_to(student, 7)  # beyond the last block: all blocks and the final norm
    assert (everything("blocks.2.mlp.fc1.weight") and everything("norm.weight")
            and not everything("head.weight"))
    with pytest.raises(ValueError, match="last_block"):
        trainable_up_to(student, -1)
    # DC-ViT's official code trains the final norm whatever the last block
    with_norm = trainable_up_to(student, 1, final_norm=True)
    assert (with_norm("norm.weight") and with_norm("blocks.1.attn.qkv.weight")
            and not with_norm("blocks.2.norm1.weight"))
    assert not trainable_up_to(student, 7, final_norm=False)("norm.weight")


def test_light_augment_flips_only_when_asked():
    images = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    padded = F.pad(images, (1,) * 4, mode="reflect")  # a 16-pixel image shifts by up to 1 pixel

    def shifted_crops(source):
        return [source[..., dy:dy + 16, dx:dx + 16] for dy in range(3) for dx in range(3)]

    for flip in (False, True):
        out = light_augment(images, torch.Generator().manual_seed(5), flip=flip)
        straight = [any(torch.equal(out[i], c[i]) for c in shifted_crops(padded)) for i in range(64)]
        flipped = [any(torch.equal(out[i], c[i]) for c in shifted_crops(padded.flip(-1))) for i in range(64)]
        assert all(s or f for s, f in zip(straight, flipped))
        assert any(flipped) and not all(straight) if flip else all(straight)


def test_feature_mimicking_lowers_mse_and_freezes_the_rest(pair, images):
    student, teacher = pair
    before_student, before_teacher = snapshot(student), snapshot(teacher)
    mse_before = feature_mse(student, teacher, images)
    history = feature_mimic_finetune(student, teacher, images, iters=30, batch_size=8, lr=1e-3,
                                     trainable=trainable_up_to(student, 1), progress=False)
    assert len(history) == 30 and all(v >= 0 for v in history)
    assert feature_mse(student, teacher, images) < 0.7 * mse_before
    predicate = trainable_up_to(student, 1)
    after = snapshot(student)
    for name, value in after.items():
        if not predicate(name):  # blocks.2, the final norm and the head
            assert torch.equal(value, before_student[name]), name
    assert not torch.equal(after["blocks.1.mlp.fc1.weight"], before_student["blocks.1.mlp.fc1.weight"])
    assert all(torch.equal(p, before_teacher[n]) for n, p in teacher.named_parameters())
    assert all(p.requires_grad for p in student.parameters()) and not student.training


def test_feature_mimicking_is_seeded(pair, images):
    student, teacher = pair
    other = copy.deepcopy(student)
    a = feature_mimic_finetune(student, teacher, images, iters=5, batch_size=8, lr=1e-3, progress=False)
    b = feature_mimic_finetune(other, teacher, images, iters=5, batch_size=8, lr=1e-3, progress=False)
    assert a == b


def test_trainable_as_names_or_parameters(pair, images):
    student, teacher = pair
    before = snapshot(student)
    feature_mimic_finetune(student, teacher, images, iters=3, batch_size=4, lr=1e-2,
                           trainable=list(student.blocks[0].mlp.parameters()), progress=False)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias",
                       "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias"}
    chosen = select_parameters(student, ["blocks.2.attn.qkv.weight"], train_head=False)
    assert chosen == [student.blocks[2].attn.qkv.weight]


def test_bad_input(pair, images):
    student, teacher = pair
    with pytest.raises(ValueError, match="classifier head stays frozen"):
        feature_mimic_finetune(student, teacher, images, iters=1, trainable=["head.weight"], progress=False)
    with pytest.raises(ValueError, match="not parameters of the student"):
        feature_mimic_finetune(student, teacher, images, iters=1, trainable=["nope"], progress=False)
    with pytest.raises(ValueError, match="not parameters of the student"):
        feature_mimic_finetune(student, teacher, images, iters=1, trainable=list(teacher.parameters()),
                               progress=False)
    with pytest.raises(ValueError, match="selected nothing"):
        feature_mimic_finetune(student, teacher, images, iters=1, trainable=lambda n: False, progress=False)
    with pytest.raises(ValueError, match="iters"):
        feature_mimic_finetune(student, teacher, images, iters=0, progress=False)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        feature_mimic_finetune(student, teacher, images[0], iters=1, progress=False)
    with pytest.raises(ValueError, match="shares trainable parameters"):
        feature_mimic_finetune(teacher, teacher, images, iters=1, progress=False)
    merging = tiny_vit()
    merging.forward_features = lambda x: teacher.forward_features(x)[:, :9]
    with pytest.raises(ValueError, match="teacher's shape"):
        feature_mimic_finetune(merging, teacher, images, iters=1, progress=False)


def test_kd_loss_matches_hand_formula():
    generator = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 5, generator=generator, dtype=torch.float64), torch.randn(6, 5, generator=generator,
                                                                                   dtype=torch.float64)
    p_t = t.softmax(-1)
    soft_ce = -(p_t * s.log_softmax(-1)).sum(-1).mean()
    tau = 2.0
    # UVC's official weighting: the KL summed, divided by batch x classes (here 6 x 5)
    log_ratio = torch.log_softmax(t / tau, -1) - torch.log_softmax(s / tau, -1)
    kl = (torch.softmax(t / tau, -1) * log_ratio).sum() / 30
    expected = 0.9 * soft_ce + 0.1 * tau ** 2 * kl
    torch.testing.assert_close(kd_loss(s, t, tau=tau), expected)
    labels = torch.tensor([0, 1, -1, 3, 4, -1])
    hard = -s.log_softmax(-1)[torch.arange(6), labels.clamp(min=0)]
    soft = -(p_t * s.log_softmax(-1)).sum(-1)
    mixed_ce = torch.where(labels >= 0, hard, soft).mean()
    torch.testing.assert_close(kd_loss(s, t, labels, tau=tau), 0.9 * mixed_ce + 0.1 * tau ** 2 * kl)


def test_kd_finetune_lowers_the_loss(pair, images):
    student, teacher = pair
    labels = torch.arange(len(images)) % 10
    with torch.no_grad():
        loss_before = kd_loss(student(images), teacher(images), labels).item()
    history = kd_finetune(student, teacher, images, labels=labels, iters=25, batch_size=12, lr=3e-3,
                          augment=False, progress=False)
    assert len(history) == 25
    with torch.no_grad():
        assert kd_loss(student(images), teacher(images), labels).item() < loss_before
    with pytest.raises(ValueError, match="labels must have shape"):
        kd_finetune(student, teacher, images, labels=labels[:3], iters=1, progress=False)


def test_sgd_step_decay_learning_rates(pair, images):
    """PRACTISE's recipe as DC-ViT's code: SGD, StepLR(int(0.4 * iters), 0.1): x0.1 every 3 of 8."""
    from dcvit_engine.compress.finetune import _optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer, schedule = _optimizer("sgd", params, 0.02, 0.0, 8)
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.02] * 3 + [0.002] * 3 + [0.0002] * 2)
    student, teacher = pair
    student = copy.deepcopy(student)
    mse_before = feature_mse(student, teacher, images)
    feature_mimic_finetune(student, teacher, images, iters=20, batch_size=8, lr=0.02, optimizer="sgd",
                           trainable=trainable_up_to(student, 1), progress=False)
    assert feature_mse(student, teacher, images) < mse_before
    with pytest.raises(ValueError, match="optimizer must be one of"):
        feature_mimic_finetune(student, teacher, images, iters=2, optimizer="lamb", progress=False)


def test_gradient_clipping_bounds_the_step(pair, images):
    """max_grad_norm clips the gradients' total norm (DC-ViT's 1.0): one plain SGD step of lr 1
    then moves the parameters by at most max_grad_norm; without clipping it moves them more."""
    moved = {}
    for clip in (None, 1e-3):
        student, teacher = copy.deepcopy(pair[0]), pair[1]
        before = snapshot(student)
        feature_mimic_finetune(student, teacher, images, iters=1, batch_size=8, lr=1.0, weight_decay=0.0,
                               warmup_frac=0.0, optimizer="sgd", max_grad_norm=clip, progress=False)
        after = snapshot(student)
        moved[clip] = torch.stack([(after[n] - before[n]).norm() for n in before]).norm().item()
    assert 0 < moved[1e-3] <= 1e-3 * (1 + 1e-4) < moved[None]
    with pytest.raises(ValueError, match="max_grad_norm must be positive"):
        feature_mimic_finetune(*pair, images, iters=1, max_grad_norm=0.0, progress=False)


def test_official_augment_is_seeded_and_keeps_shape():
    """The DC-ViT scripts' transform (RandomResizedCrop, flip, RandAugment m9) on normalised
    tensors: same shape and dtype, seeded by the generator, images actually changed, pixels
    within the normalised [0, 1] range."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    images = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    first = official_augment(images, torch.Generator().manual_seed(0))
    again = official_augment(images, torch.Generator().manual_seed(0))
    other = official_augment(images, torch.Generator().manual_seed(1))
    assert first.shape == images.shape and first.dtype == images.dtype
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.allclose(first, images)
    back = first * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5
