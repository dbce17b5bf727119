import json
import os

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import dcvit_engine.artifact as artifact
from dcvit_engine.artifact import load, load_report, load_spec, save
from dcvit_engine.macs import count_macs
from dcvit_engine.preprocess import PreprocessConfig, config_from_timm, imagenet_default
from dcvit_engine.reference import ViTReference
from dcvit_engine.spec import AttentionSpec, BlockSpec, ViTSpec


def tiny_timm(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48,
                             depth=2, num_heads=3, num_classes=5, **kwargs).eval()


def pruned_reference() -> ViTReference:
    spec = ViTSpec(img_size=(24, 16), patch_size=8, in_chans=3, embed_dim=24, num_classes=4,
                   class_token=True, dist_token=True, global_pool="token", fc_norm=False,
                   pre_norm=False, final_norm=True, no_embed_class=False, norm_eps=1e-6,
                   prop_attn=False, blocks=[
                       BlockSpec(AttentionSpec([16, 5, 11], [16, 7, 3], 0.25), 37, layer_scale=True),
                       BlockSpec(None, 50),
                       BlockSpec(AttentionSpec([8], [3], 0.25), 0)])
    torch.manual_seed(0)
    model = ViTReference(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def outputs(model, shape, seed=1):
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_round_trip_timm_model(tmp_path):
    model = tiny_timm(init_values=0.1, qk_norm=True)
    folder = save(model, tmp_path / "art", report={"method": "none", "macs": 1})
    assert sorted(os.listdir(folder)) == ["model.safetensors", "preprocess.json", "report.json", "spec.json"]
    loaded = load(folder)
    assert isinstance(loaded, ViTReference) and not loaded.training
    assert torch.allclose(outputs(loaded, (3, 32, 32)), outputs(model, (3, 32, 32)), rtol=1e-5, atol=1e-6)
    assert load_spec(folder) == loaded.spec
    assert load_report(folder) == {"method": "none", "macs": 1}
    assert count_macs(folder) == count_macs(model)


def test_round_trip_pruned_reference_is_exact(tmp_path):
    model = pruned_reference()
    save(model, tmp_path / "art")
    loaded = load(tmp_path / "art")
    assert torch.equal(outputs(loaded, (3, 24, 16)), outputs(model, (3, 24, 16)))
    assert load_report(tmp_path / "art") is None


def test_dtype_is_kept(tmp_path):
    model = pruned_reference().double()
    save(model, tmp_path / "art")
    assert next(load(tmp_path / "art").parameters()).dtype == torch.float64


def test_save_rejects_other_objects(tmp_path):
    with pytest.raises(TypeError, match="timm VisionTransformer or a dcvit_engine ViTReference"):
        save(nn.Linear(2, 2), tmp_path / "art")
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save(pruned_reference(), tmp_path / "art", report={"x": object()})
    assert not (tmp_path / "art").exists()


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no artifact"):
        load(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        load(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without spec.json"):
        load(tmp_path / "empty")

    folder = save(pruned_reference(), tmp_path / "art")
    spec_text = (folder / "spec.json").read_text()
    (folder / "spec.json").write_text(spec_text[:40])
    with pytest.raises(ValueError, match="not valid JSON"):
        load(folder)
    data = json.loads(spec_text)
    data["version"] = 99
    (folder / "spec.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unsupported spec version 99"):
        load(folder)
    (folder / "spec.json").write_text(spec_text)

    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load(folder)


def test_load_names_every_mismatched_tensor(tmp_path):
    folder = save(pruned_reference(), tmp_path / "art")
    tensors = load_file(folder / "model.safetensors")
    tensors["blocks.0.attn.qkv.weight"] = tensors["blocks.0.attn.qkv.weight"][:-1].clone()
    del tensors["head_dist.bias"]
    tensors["blocks.1.attn.qkv.weight"] = torch.zeros(3, 24)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError) as info:
        load(folder)
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "blocks.0.attn.qkv.weight has shape (89, 24), spec needs (90, 24)" in message
    assert "missing head_dist.bias (4,)" in message
    assert "unexpected blocks.1.attn.qkv.weight (3, 24)" in message


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    def broken_writer(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "save_bytes", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        save(pruned_reference(), tmp_path / "art")
    assert siblings(tmp_path / "art") == []


def test_replacing_an_artifact_is_safe(tmp_path, monkeypatch):
    first = tiny_timm()
    folder = save(first, tmp_path / "art")
    replacement = pruned_reference()
    save(replacement, folder)
    assert load_spec(folder) == replacement.spec
    assert siblings(folder) == ["art"]

    # a failing replacement keeps the previous artifact intact
    monkeypatch.setattr(artifact, "save_bytes", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        save(first, folder)
    assert load_spec(folder) == replacement.spec and siblings(folder) == ["art"]


def test_refuses_to_replace_something_else(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "important.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="without spec.json"):
        save(pruned_reference(), tmp_path / "data")
    (tmp_path / "plain").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an artifact folder"):
        save(pruned_reference(), tmp_path / "plain")
    assert (tmp_path / "data" / "important.txt").read_text() == "keep me"


def test_preprocessing_is_stored_and_loaded(tmp_path, capsys):
    model = tiny_timm()
    expected = config_from_timm(model)
    assert expected.input_size == (3, 32, 32) and expected.interpolation == "bicubic"
    assert load(save(model, tmp_path / "timm")).preprocess == expected
    given = PreprocessConfig((3, 24, 16), crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    student = load(save(pruned_reference(), tmp_path / "given", preprocess=given))
    assert student.preprocess == given
    assert load(save(student, tmp_path / "carried")).preprocess == given  # model.preprocess travels
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match=r"input_size \(3, 32, 32\) is not the model's input \(3, 24, 16\)"):
        save(pruned_reference(), tmp_path / "wrong", preprocess=expected)


def test_artifact_without_preprocessing_loads_with_notice(tmp_path, capsys):
    folder = save(pruned_reference(), tmp_path / "old")
    assert not (folder / artifact.PREPROCESS_FILENAME).exists()
    assert load(folder).preprocess is None  # loading alone (bench, export) says nothing
    assert capsys.readouterr().err == ""
    assert artifact.load_preprocess(folder) == imagenet_default((24, 16), 3)  # used for images: said
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no preprocess.json" in err and "ImageNet default" in err


def test_bad_preprocess_json_names_the_file_and_field(tmp_path):
    folder = save(tiny_timm(), tmp_path / "art")
    file = folder / artifact.PREPROCESS_FILENAME
    values = json.loads(file.read_text())
    file.write_text(json.dumps(dict(values, crop_pct=0)))
    with pytest.raises(ValueError, match="preprocess.json: preprocessing crop_pct must be in"):
        load(folder)
    file.write_text(json.dumps(dict(values, input_size=[3, 64, 64])))
    with pytest.raises(ValueError, match="describes input"):
        load(folder)
    file.write_text("{")
    with pytest.raises(ValueError, match="preprocess.json is not valid JSON"):
        load(folder)
