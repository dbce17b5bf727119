"""`dcvit info` and `dcvit bench`, run in-process through dcvit_engine.cli.main."""
import json

import pytest
import torch

from dcvit_engine import artifact
from dcvit_engine.cli import main
from dcvit_engine.macs import count_macs
from dcvit_engine.models import resolve_model, resolve_spec
from dcvit_engine.reference import ViTReference
from dcvit_engine.spec import AttentionSpec, BlockSpec, MergeSpec, ViTSpec

TINY_KWARGS = ('{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, '
               '"num_classes": 10}')
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", TINY_KWARGS]


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def compressed_artifact(tmp_path_factory):
    """Ragged heads, an attention-free block, a ToMe merge."""
    spec = ViTSpec(
        img_size=(32, 32), patch_size=8, in_chans=3, embed_dim=48, num_classes=10, class_token=True,
        dist_token=False, global_pool="token", fc_norm=False, pre_norm=False, final_norm=True,
        no_embed_class=False, norm_eps=1e-6, prop_attn=True,
        blocks=[BlockSpec(attn=AttentionSpec(qk_dims=[16, 8], v_dims=[16, 12], scale=0.25), mlp_hidden=100,
                          merge=MergeSpec("tome", r=3)),
                BlockSpec(attn=None, mlp_hidden=37)])
    path = tmp_path_factory.mktemp("art") / "student"
    artifact.save(ViTReference(spec), path)
    return path


def test_info_table_for_a_timm_model(capsys):
    code, out, _ = run(capsys, "info", *TINY)
    assert code == 0
    assert "vit_tiny_patch16_224" in out and "embed dim 48, depth 2" in out
    block_rows = [line for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert len(block_rows) == 2 and all("3x16" in row and "192" in row for row in block_rows)
    assert "MACs per image" in out and "parameters:" in out


def test_info_json_totals_match_the_library(capsys, compressed_artifact):
    code, out, _ = run(capsys, "info", str(compressed_artifact), "--json")
    assert code == 0
    data = json.loads(out)
    spec = resolve_spec(artifact=compressed_artifact)
    assert data["macs"]["total"] == count_macs(spec).total
    model = resolve_model(artifact=compressed_artifact)
    assert data["params"]["total"] == sum(p.numel() for p in model.parameters())
    first, second = data["blocks"]
    assert (first["heads"], first["qk_dims"], first["v_dims"]) == (2, [16, 8], [16, 12])
    assert first["merge"] == {"kind": "tome", "r": 3, "axis": ""}
    assert first["tokens"] == 17 and first["tokens_after_merge"] == 14 and second["tokens"] == 14
    assert second["heads"] == 0 and second["mlp_hidden"] == 37 and second["attn_macs"] == 0


def test_info_table_shows_removed_attention_and_merges(capsys, compressed_artifact):
    code, out, _ = run(capsys, "info", str(compressed_artifact))
    assert code == 0
    assert "16,8" in out and "16,12" in out and "tome r=3" in out and "17->14" in out


@pytest.mark.parametrize("argv,message", [
    (["info", "--model", "deit_smal_patch16_224"], "close matches: deit_small_patch16_224"),
    (["info", "/no/such/artifact"], "no artifact at /no/such/artifact"),
    (["info"], "name exactly one model"),
    (["info", "--model", "vit_tiny_patch16_224", "--model-kwargs", "[1, 2]"], "JSON object"),
    (["info", "--model", "vit_tiny_patch16_224", "--model-kwargs", '{"no_such_arg": 1}'], "no_such_arg"),
    (["info", "--model", "resnet18"], "unsupported model"),
])
def test_info_errors_are_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("dcvit info: error:") and message in err and err.count("\n") == 1


def test_bench_prints_throughput(capsys):
    code, out, _ = run(capsys, "bench", *TINY, "--batch-size", "2", "--backend", "cpu", "--device", "cpu",
                       "--warmup", "1", "--repeats", "3")
    assert code == 0
    assert "batch 2:" in out and "images/s" in out and "latency median" in out and "GMACs/image" in out


def test_bench_json_with_compile(capsys, compressed_artifact):
    code, out, _ = run(capsys, "bench", str(compressed_artifact), "--batch-size", "3", "--backend", "cpu",
                       "--device", "cpu", "--compile", "--warmup", "1", "--repeats", "2", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["batch_size"] == 3 and result["repeats"] == 2 and result["compile"] is True
    assert result["images_per_s"] == pytest.approx(3 / result["median_ms"] * 1e3)
    assert result["min_ms"] <= result["median_ms"] <= result["max_ms"]


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--dtype", "float8"], "unknown dtype"),
    (["--repeats", "0"], "repeats must be an integer >= 1"),
])
def test_bench_errors_are_one_line(capsys, extra, message):
    code, _, err = run(capsys, "bench", *TINY, "--device", "cpu", *extra)
    assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the refusal of a GPU backend on a CPU-only machine")
def test_bench_unavailable_backend_is_one_line(capsys):
    code, _, err = run(capsys, "bench", *TINY, "--device", "cpu", "--backend", "cuda", "--batch-size", "1")
    assert code == 2 and "backend 'cuda' was requested" in err and err.count("\n") == 1


def test_resolve_model_loads_a_checkpoint(tmp_path):
    import timm

    kwargs = json.loads(TINY_KWARGS)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = resolve_model(model_name="vit_tiny_patch16_224", model_kwargs=kwargs,
                          checkpoint=tmp_path / "weights.pth")
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="does not fit vit_tiny_patch16_224"):
        resolve_model(model_name="vit_tiny_patch16_224", model_kwargs=dict(kwargs, depth=3),
                      checkpoint=tmp_path / "weights.pth")
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        resolve_model(model_name="vit_tiny_patch16_224", checkpoint=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="an artifact carries its own"):
        resolve_model(artifact=tmp_path, checkpoint=tmp_path / "weights.pth")


TEACHER_KWARGS = ('{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3, '
                  '"num_classes": 10}')


def test_bench_before_and_after_with_the_teacher(capsys, compressed_artifact):
    code, out, _ = run(capsys, "bench", str(compressed_artifact), "--teacher", "vit_tiny_patch16_224",
                       "--teacher-kwargs", TEACHER_KWARGS, "--batch-size", "2", "--backend", "cpu",
                       "--device", "cpu", "--dtype", "fp32", "--warmup", "1", "--repeats", "2", "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result["runners"]) == {"timm eager (teacher)", "engine (teacher)", "engine"}
    teacher_macs = count_macs(resolve_spec(model_name="vit_tiny_patch16_224",
                                           model_kwargs=json.loads(TEACHER_KWARGS))).total
    student_macs = count_macs(resolve_spec(artifact=compressed_artifact)).total
    assert result["macs_reduction"] == pytest.approx(teacher_macs / student_macs)
    runners = result["runners"]
    speedup = runners["engine"]["images_per_s"] / runners["engine (teacher)"]["images_per_s"]
    assert result["speedup_vs_teacher_engine"] == pytest.approx(speedup)
    assert result["realized_speedup"] == pytest.approx(speedup / result["macs_reduction"])
    assert all(r["repeats"] == 2 and r["batch_size"] == 2 for r in runners.values())


def test_bench_table_names_the_runners(capsys, compressed_artifact):
    code, out, _ = run(capsys, "bench", str(compressed_artifact), "--teacher", "vit_tiny_patch16_224",
                       "--teacher-kwargs", TEACHER_KWARGS, "--batch-size", "1", "--backend", "cpu",
                       "--device", "cpu", "--dtype", "fp32", "--warmup", "0", "--repeats", "1")
    assert code == 0
    assert "timm eager (teacher)" in out and "engine (student)" in out and "realized speedup" in out


@pytest.mark.parametrize("extra,message", [
    (["--teacher", "vit_tiny_patch16_224"], "pass the teacher's --teacher-kwargs"),
    (["--teacher-kwargs", "{}"], "--teacher-kwargs needs --teacher"),
])
def test_bench_teacher_errors_are_one_line(capsys, compressed_artifact, extra, message):
    code, _, err = run(capsys, "bench", str(compressed_artifact), "--device", "cpu", "--batch-size", "1",
                       *extra)
    assert code == 2 and message in err and err.count("\n") == 1
