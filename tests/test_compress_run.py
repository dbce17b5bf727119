"""The run scaffold (compress/run.py): every registered method writes the one report schema,
old reports read into it, the shared checks hold for direct calls, and the registry is all
the CLI knows of a method."""
import json

import pytest
import timm
import torch

from dcvit_engine.compress import api
from dcvit_engine.compress.report import COMMON_KEYS, REPORT_FORMAT, block_structure, upgrade_report
from dcvit_engine.macs import count_macs

# each method at its cheapest (its registry entry's `quick`): the schema, not the quality, is under test
CHEAP = {name: method.quick for name, method in api.METHODS.items()}


def tiny_vit():
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10).eval()


def test_registry_entries_agree_with_the_methods():
    import inspect
    for method, entry in api.METHODS.items():
        function = api.method_function(method)
        assert function.__name__ == f"compress_{method}"
        assert set(api.method_cli_options(method)) <= set(api.method_options(method))
        assert set(entry.quick) <= set(api.method_options(method))
        params = inspect.signature(function).parameters
        # a method that needs no target or no images lets the caller leave them out
        assert (params["target_macs"].default is not None) == entry.needs_target, method
        assert entry.uses_images or params["images"].default is None, method
        assert (entry.plan is None) == (api.method_plan(method) is None)
        assert set(api.plan_options(method)) <= set(api.method_cli_options(method))  # offered by dcvit plan


@pytest.mark.parametrize("method", list(CHEAP))
def test_every_method_writes_the_common_report(method):
    model = tiny_vit()
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    report = {}
    options = dict(CHEAP[method], **({"device": "cpu"} if "device" in api.method_options(method) else {}))
    student = api.compress(model, images, method=method, target_macs=0.7, report=report, **options)
    assert set(report) == set(COMMON_KEYS)
    assert report["method"] == method and report["report_format"] == REPORT_FORMAT
    assert report["target_macs"] == dict(ratio=0.7, macs=round(0.7 * report["teacher_macs"]))
    assert report["achieved_macs"] == count_macs(student.spec).total
    assert report["achieved_ratio"] == report["achieved_macs"] / report["teacher_macs"]
    assert report["structure"] == block_structure(student.spec) and len(report["structure"]) == 4
    assert set(report["finetune_iters"]) >= {"student", "per_step", "steps", "selection"}
    assert report["timings"]["total_s"] >= 0 and report["num_images"] == 8
    assert isinstance(report["extras"], dict)
    json.dumps(report)  # report.json material


def test_format_1_reports_read_into_the_schema():
    dcvit_v1 = {"method": "dcvit", "target_macs": {"ratio": 0.7, "macs": 70}, "teacher_macs": 100,
                "achieved_macs": 69, "achieved_ratio": 0.69, "chosen_blocks": [2],
                "timings": {"total_s": 3.0}, "model": "vit", "wall_s": 4.0}
    new = upgrade_report(dcvit_v1)
    assert set(new) >= set(COMMON_KEYS) and new["target_macs"] == {"ratio": 0.7, "macs": 70}
    assert new["extras"] == {"chosen_blocks": [2]} and new["model"] == "vit" and new["wall_s"] == 4.0
    tome_v1 = {"method": "tome", "r": 3, "schedule": "constant", "target_ratio": 0.6, "teacher_macs": 200,
               "achieved_macs": 110, "kept_ratio": 0.55, "r_per_block": [3, 3]}
    new = upgrade_report(tome_v1)
    assert new["target_macs"] == {"ratio": 0.6, "macs": 120} and new["achieved_ratio"] == 0.55
    assert new["extras"] == {"r": 3, "schedule": "constant", "r_per_block": [3, 3]}
    assert upgrade_report(new) is new  # format 2 as it is


@pytest.mark.parametrize("method", list(api.METHODS))
def test_direct_calls_get_the_shared_checks(method):
    function = api.method_function(method)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    images[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="^1 of 5 images hold NaN or Inf values"):
        function(tiny_vit(), images, 0.7)
    broken = tiny_vit()
    with torch.no_grad():
        broken.blocks[0].mlp.fc1.bias[0] = float("nan")
    with pytest.raises(ValueError, match="the teacher gives NaN or Inf outputs on 4 of 4 images"):
        function(broken, torch.randn(4, 3, 32, 32), 0.7)
    with pytest.raises(ValueError, match="between 0 and 1"):
        function(tiny_vit(), torch.randn(4, 3, 32, 32), 1.5)
