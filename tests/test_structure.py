"""DC-ViT / PRACTISE structure math and the block surgery that applies it."""
import math

import pytest
import timm
import torch

from dcvit_engine.adapter import spec_from_timm
from dcvit_engine.compress.structure import (
    check_target_ratio,
    compressed_spec,
    plan_block_drop,
    plan_dcvit,
    replace_block,
)
from dcvit_engine.macs import block_macs, count_macs
from dcvit_engine.reference import reference_from_timm


@pytest.fixture(scope="module")
def deit_base_spec():
    with torch.device("meta"):  # only the structure is needed, not the weights
        model = timm.create_model("deit_base_patch16_224", pretrained=False, weight_init="skip")
    return spec_from_timm(model)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=48, depth=5, num_heads=3, num_classes=10)
    with torch.no_grad():  # non-trivial norms and biases, so a mis-wired tensor shows up
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return reference_from_timm(model).double()


def test_deit_base_dense_range_within_half_percent(deit_base_spec):
    teacher = count_macs(deit_base_spec).total
    a = block_macs(deit_base_spec, 1).attn
    largest = 1 - a / teacher
    rhos = [r / 100 for r in range(50, 100) if r / 100 <= largest]
    assert rhos[-1] == 0.97  # deit_base: one attention branch is ~3% of the MACs
    for rho in rhos:
        plan = plan_dcvit(deit_base_spec, rho)
        assert abs(plan.macs - rho * teacher) <= 0.005 * rho * teacher, (rho, plan.summary())
        assert plan.round_to is None and plan.hidden_width == plan.exact_hidden_width
        # the plan's MACs are those of the compressed spec, and never above the target
        assert plan.macs <= plan.target_macs


def test_deit_base_structure_follows_the_formula(deit_base_spec):
    plan = plan_dcvit(deit_base_spec, 0.75)
    m, a, f = plan.teacher_macs, plan.attn_macs, plan.mlp_macs
    removed = m - round(0.75 * m)
    n = math.ceil(removed / (a + f))
    assert plan.blocks_compressed == n == plan.min_blocks
    assert plan.max_blocks == min(removed // a, 10)
    exact = 3072 * (1 - (removed - n * a) / (n * f))
    assert plan.hidden_width == math.floor(exact)
    assert plan.candidates == tuple(range(1, 11))


def test_infeasible_targets_name_the_feasible_limits(deit_base_spec):
    teacher = count_macs(deit_base_spec).total
    a = block_macs(deit_base_spec, 1).attn
    with pytest.raises(ValueError, match=r"largest feasible target is 0\.9701"):
        plan_dcvit(deit_base_spec, 0.975)
    plan_dcvit(deit_base_spec, 0.9701)  # the named limit itself is feasible
    with pytest.raises(ValueError, match=r"smallest feasible target is 0\.1722"):
        plan_dcvit(deit_base_spec, 0.15)
    plan_dcvit(deit_base_spec, 0.1722)
    assert 1 - a / teacher == pytest.approx(0.97014, abs=1e-5)


@pytest.mark.parametrize("bad", [0, 1, 1.2, -0.5, float("nan"), "0.5", True, None])
def test_target_out_of_range(bad):
    with pytest.raises(ValueError, match="target MACs"):
        check_target_ratio(bad)


def test_block_count_override(deit_base_spec):
    plan = plan_dcvit(deit_base_spec, 0.75, num_blocks=6)
    assert plan.blocks_compressed == 6
    assert abs(plan.relative_error) < 0.005 and plan.hidden_width > 1177  # more blocks, wider MLPs
    for bad in (3, 9, 0):
        with pytest.raises(ValueError, match=r"feasible range is 4\.\.8"):
            plan_dcvit(deit_base_spec, 0.75, num_blocks=bad)


@pytest.mark.parametrize("multiple", [8, 64])
def test_rounding_reports_its_cost(deit_base_spec, multiple):
    exact = plan_dcvit(deit_base_spec, 0.75)
    plan = plan_dcvit(deit_base_spec, 0.75, round_to=multiple)
    assert plan.hidden_width % multiple == 0
    assert abs(plan.hidden_width - exact.hidden_width) <= multiple // 2
    assert plan.unrounded_macs == exact.macs
    per_neuron = 2 * 197 * 768
    width_change = plan.hidden_width - exact.hidden_width
    assert plan.rounding_macs == width_change * per_neuron * plan.blocks_compressed
    assert f"multiple of {multiple}" in plan.summary()
    with pytest.raises(ValueError, match="round_to"):
        plan_dcvit(deit_base_spec, 0.75, round_to=0)


def test_explicit_candidates_are_checked(deit_base_spec):
    with pytest.raises(ValueError, match="does not exist"):
        plan_dcvit(deit_base_spec, 0.9, candidates=[3, 12])
    with pytest.raises(ValueError, match="duplicates"):
        plan_dcvit(deit_base_spec, 0.9, candidates=[3, 3])
    half = compressed_spec(deit_base_spec, [4], 1000)
    with pytest.raises(ValueError, match="not a full attention"):
        plan_dcvit(half, 0.9, candidates=[4, 5])
    assert plan_dcvit(deit_base_spec, 0.9, candidates=[0, 11]).candidates == (0, 11)


def test_practise_plan_drops_whole_blocks_within_budget(deit_base_spec):
    plan = plan_block_drop(deit_base_spec, 0.75, rounding="down")
    assert plan.macs <= plan.target_macs
    assert plan.teacher_macs - (plan.blocks_dropped - 1) * plan.block_macs > plan.target_macs
    assert plan.macs == plan.teacher_macs - plan.blocks_dropped * plan.block_macs
    with pytest.raises(ValueError, match="smallest feasible target"):
        plan_block_drop(deit_base_spec, 0.1)


def test_full_width_without_attention_is_exactly_the_teacher_mlp(tiny):
    hidden = tiny.spec.blocks[2].mlp_hidden
    student = replace_block(tiny, 2, hidden, torch.arange(hidden))
    assert student.spec.blocks[2].attn is None and student.blocks[2].attn is None
    assert not any(k.startswith("blocks.2.norm1") or k.startswith("blocks.2.attn")
                   for k in student.state_dict())
    x = torch.randn(3, 17, 48, dtype=torch.float64)
    assert torch.equal(student.blocks[2].mlp_residual(student.blocks[2].attention_residual(x, None)),
                       tiny.blocks[2].mlp_residual(x))
    # the rest of the model is the teacher's, and the teacher is untouched
    assert torch.equal(student.blocks[1].attn.qkv.weight, tiny.blocks[1].attn.qkv.weight)
    assert tiny.spec.blocks[2].attn is not None and tiny.blocks[2].attn is not None


def test_subset_reuses_fc1_rows_and_fc2_columns(tiny):
    neurons = torch.tensor([190, 3, 77, 41, 5, 120, 9])
    student = replace_block(tiny, 3, 7, neurons)
    x = torch.randn(2, 17, 48, dtype=torch.float64)
    t = tiny.blocks[3]
    h = torch.nn.functional.layer_norm(x, (48,), t.norm2.weight, t.norm2.bias, tiny.spec.norm_eps)
    hidden = torch.nn.functional.gelu(h @ t.mlp.fc1.weight[neurons].T + t.mlp.fc1.bias[neurons])
    expected = x + hidden @ t.mlp.fc2.weight[:, neurons].T + t.mlp.fc2.bias
    actual = student.blocks[3].mlp_residual(x)
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-12
    assert count_macs(student).total == count_macs(compressed_spec(tiny.spec, [3], 7)).total


def test_dropping_a_block_makes_it_the_identity(tiny):
    student = replace_block(tiny, 1, 0)
    assert student.blocks[1].attn is None and student.blocks[1].mlp is None
    x = torch.randn(2, 17, 48, dtype=torch.float64)
    assert torch.equal(student.blocks[1].mlp_residual(student.blocks[1].attention_residual(x, None)), x)


def test_bad_neuron_sets_are_refused(tiny):
    with pytest.raises(ValueError, match="distinct neuron indices"):
        replace_block(tiny, 1, 3, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="distinct neuron indices"):
        replace_block(tiny, 1, 2, torch.tensor([0, 10_000]))
    with pytest.raises(ValueError, match="indices of the neurons"):
        replace_block(tiny, 1, 2)


@pytest.mark.parametrize("target", [0.9, 0.8, 0.753, 0.75, 0.7, 0.6, 0.45, 0.2])
def test_practise_rounding_nearest_down_up(deit_base_spec, target):
    """nearest (default) is the count whose MACs are nearest the target; down at most the
    target, up at least; nearest is always one of the other two."""
    down, up = (plan_block_drop(deit_base_spec, target, rounding=r) for r in ("down", "up"))
    nearest = plan_block_drop(deit_base_spec, target)
    assert nearest.rounding == "nearest" and "rounded nearest" in nearest.summary()
    assert down.macs <= down.target_macs <= up.macs
    assert up.blocks_dropped <= down.blocks_dropped <= up.blocks_dropped + 1
    assert nearest.blocks_dropped in (down.blocks_dropped, up.blocks_dropped)
    assert abs(nearest.macs - nearest.target_macs) == min(abs(down.macs - down.target_macs),
                                                          abs(up.macs - up.target_macs))


def test_practise_rounding_refusals(deit_base_spec):
    one_block = plan_block_drop(deit_base_spec, 0.5, rounding="down").block_macs
    kept = 1 - one_block / plan_block_drop(deit_base_spec, 0.5).teacher_macs
    with pytest.raises(ValueError, match="rounding up is infeasible.*dropping one whole block"):
        plan_block_drop(deit_base_spec, (1 + kept) / 2, rounding="up")
    assert plan_block_drop(deit_base_spec, (1 + kept) / 2 - 1e-3).blocks_dropped == 1, "never zero blocks"
    with pytest.raises(ValueError, match="rounding must be one of nearest, down, up"):
        plan_block_drop(deit_base_spec, 0.7, rounding="closest")
    # every candidate dropped: up keeps them all, nearest only within half a block
    assert plan_block_drop(deit_base_spec, 0.1, rounding="up").blocks_dropped == 10
    with pytest.raises(ValueError, match="smallest feasible target"):
        plan_block_drop(deit_base_spec, 0.1)
