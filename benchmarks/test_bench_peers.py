"""bench_peers in CI's smoke mode (tiny shapes, one round): every runner and peer gets a row
naming its runtime and version, a missing peer is a row with the reason while the rest is
measured, the peers compute the reference's logits, and --profile prints its buckets."""
import csv
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_peers import main, model_variants  # noqa: E402
from dcvit_engine.peers import PeerRunner, Unavailable, export_when_needed, open_peers, runtime_versions  # noqa: E402
from peer_profile import BUCKETS, spec_gemms  # noqa: E402


def _rows(path):
    with open(path / "peers.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    main(["--smoke", "--runners", "eager,onnxruntime,openvino,engine", "--batch-sizes", "2",
          "--threads", "1", "--out", str(out)])
    return out


def test_smoke_run_writes_every_runner_with_its_version(smoke_run):
    rows = _rows(smoke_run)
    versions = runtime_versions()
    cells = {(r["variant"], r["dtype"], r["runner"]): r for r in rows}
    for variant in ("full", "N=1"):
        for dtype in ("fp32", "bf16"):
            for runner in ("eager", "onnxruntime", "openvino", "engine"):
                row = cells[variant, dtype, runner]
                assert row["version"] == versions[row["runtime"]] and row["threads"] == "1"
    assert cells["full", "bf16", "onnxruntime"]["status"] == "unavailable"
    assert "bf16" in cells["full", "bf16", "onnxruntime"]["note"]
    for row in rows:
        installed = versions[row["runtime"]] != "not installed"
        if installed and not (row["runtime"] == "onnxruntime" and row["dtype"] == "bf16"):
            assert row["status"] == "ok" and float(row["images_per_s"]) > 0
    assert (smoke_run / "peers.png").stat().st_size > 0


def test_a_missing_peer_is_a_row_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    main(["--smoke", "--runners", "eager,openvino,engine", "--students", "", "--dtypes", "fp32",
          "--batch-sizes", "1", "--out", str(tmp_path)])
    rows = {r["runner"]: r for r in _rows(tmp_path)}
    assert rows["openvino"]["status"] == "unavailable"
    assert rows["openvino"]["version"] == "not installed"
    assert "openvino is not installed" in rows["openvino"]["note"] and ".[peers]" in rows["openvino"]["note"]
    assert rows["eager"]["status"] == rows["engine"]["status"] == "ok"


def test_the_peers_compute_the_models_logits(tmp_path):
    _, _, _, _, reference = model_variants("tiny", [1])[1]
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(images)
    export = export_when_needed(reference, tmp_path)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        for peer, runner in open_peers(*export, dtype, 1).items():
            if isinstance(runner, Unavailable):
                assert dtype == torch.bfloat16 and peer == "onnxruntime" or "not installed" in runner.reason
                continue
            assert isinstance(runner, PeerRunner)
            got = runner(images)
            assert (got - expected).abs().max() <= tolerance * expected.abs().max()


def test_a_failed_export_makes_both_peers_unavailable(tmp_path, monkeypatch):
    import dcvit_engine.peers as peers
    from dcvit_engine.export import ExportError

    def refuse(*args, **kwargs):
        raise ExportError("onnx export failed: unsupported op\nmore detail")

    monkeypatch.setattr(peers, "export_model", refuse)
    _, _, _, _, reference = model_variants("tiny", [])[0]
    result = open_peers(*export_when_needed(reference, tmp_path), torch.float32, 1)
    for peer in ("onnxruntime", "openvino"):
        assert isinstance(result[peer], Unavailable)
        if "not installed" not in result[peer].reason:
            assert result[peer].reason == "no model to load: the ONNX export failed: onnx export failed: " \
                                          "unsupported op"


def test_spec_gemms_follow_the_blocks():
    _, _, _, _, student = model_variants("tiny", [1])[1]
    names = spec_gemms(student.spec)
    attention_free = sum(block.attn is None for block in student.spec.blocks)
    assert attention_free == 1 and names.count("qkv") == names.count("proj") == 3
    assert names.count("fc1") == names.count("fc2") == 4


def test_profile_prints_every_bucket(capsys):
    pytest.importorskip("openvino")
    assert main(["--smoke", "--profile", "--dtypes", "bf16", "--batch-sizes", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for bucket in ("qkv", "proj", "fc1", "fc2", "LayerNorm", "other"):
        assert bucket in lines
    assert "attention core" in out and "floor:" in out and "TFLOP/s" in out
    assert len(BUCKETS) == 8
