"""`dcvit bench --peers`: onnxruntime and OpenVINO on the model's export, interleaved beside the
engine (and the teacher's runners); a peer that cannot run is one line with the reason."""
import json
import sys

import pytest

from dcvit_engine.cli import main
from dcvit_engine.peers import runtime_versions

TINY_KWARGS = ('{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, '
               '"num_classes": 10}')
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", TINY_KWARGS]
BENCH = ["bench", *TINY, "--device", "cpu", "--backend", "cpu", "--batch-size", "2", "--warmup", "1",
         "--repeats", "2", "--peers"]


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _peer_names():
    versions = runtime_versions()
    return {peer: f"{peer} {versions[peer]}".split("-")[0] for peer in ("onnxruntime", "openvino")
            if versions[peer] != "not installed"}


def test_peers_beside_the_engine_and_the_teacher_in_fp32(capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    code, out, _ = run(capsys, *BENCH, "--dtype", "float32", "--teacher", "vit_tiny_patch16_224",
                       "--teacher-kwargs", TINY_KWARGS, "--json")
    assert code == 0
    result = json.loads(out)
    names = _peer_names()
    assert set(result["runners"]) == {"timm eager (teacher)", "engine (teacher)", "engine", *names.values()}
    assert all(r["images_per_s"] > 0 for r in result["runners"].values())
    assert "notes" not in result


def test_bf16_lists_onnxruntime_as_unavailable_and_times_openvino(capsys):
    pytest.importorskip("openvino")
    code, out, _ = run(capsys, *BENCH, "--dtype", "bf16")
    assert code == 0
    assert "onnxruntime: unavailable: onnxruntime's CPU provider has no bf16 kernels" in out
    openvino = _peer_names()["openvino"]
    row = next(line for line in out.splitlines() if line.strip().startswith(openvino))
    assert "x" in row.split()[-1]  # its ratio to the engine


def test_a_missing_peer_is_a_line_with_the_reason_and_the_rest_runs(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, out, _ = run(capsys, *BENCH, "--dtype", "float32")
    assert code == 0
    assert 'openvino: unavailable: openvino is not installed (pip install -e ".[peers]")' in out
    assert 'onnxruntime: unavailable: onnxruntime is not installed' in out
    assert "images/s" in out

