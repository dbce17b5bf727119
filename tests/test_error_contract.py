"""The CLI's error contract (docs/ARCHITECTURE.md, "Errors"): what a user causes is one line
with exit 2 and nothing half-written; a bug keeps its traceback; SIGINT/SIGTERM exit 130/143
with temporary files removed; two writers of one --out: the second refuses, naming the first."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import timm
import torch

import dcvit_engine.cli as cli
import dcvit_engine.export as export
from dcvit_engine.artifact import save
from dcvit_engine.atomic import atomic_folder, atomic_path
from dcvit_engine.cli import main
from dcvit_engine.digits import DIGITS_MEAN, DIGITS_STD, export_digits_folder
from dcvit_engine.errors import InputError, describe_os_error
from dcvit_engine.runlock import exclusive_folder
from tests.compress_cli import TINY_VIT

TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY_VIT)]
NORM = ["--mean", str(DIGITS_MEAN[0]), "--std", str(DIGITS_STD[0])]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return export_digits_folder(tmp_path_factory.mktemp("digits") / "d", per_class=1)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT).eval()
    return save(model, tmp_path_factory.mktemp("art") / "tiny")


def tome_argv(digits, out):
    return ["compress", *TINY_ARGS, "--data", str(digits), "--num-samples", "4", "--method", "tome",
            "--target-macs", "0.9", "--device", "cpu", *NORM, "--out", str(out)]


def one_error_line(err: str, command: str) -> str:
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"dcvit {command}: error: "), err
    return last


def raising(exc):
    def command(args):
        raise exc
    return command


def run_with(monkeypatch, capsys, exc):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["doctor"])
    import dcvit_engine.cli.doctor as doctor
    monkeypatch.setattr(doctor, "run", raising(exc))
    rc = main(["doctor"])
    return rc, capsys.readouterr().err


# ---- what becomes one line, what keeps its traceback -----------------------------
@pytest.mark.parametrize("exc", [ValueError("a bug"), TypeError("a bug"), KeyError("a bug"),
                                 RuntimeError("a bug"), OSError(errno.EIO, "I/O error", "/x")])
def test_bugs_keep_their_traceback(monkeypatch, capsys, exc):
    with pytest.raises(type(exc)):
        run_with(monkeypatch, capsys, exc)


def test_user_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    rc, err = run_with(monkeypatch, capsys, InputError("--thing is wrong\n  on two lines"))
    assert rc == 2 and err == "dcvit doctor: error: --thing is wrong; on two lines\n"
    monkeypatch.setenv("DCVIT_DEBUG", "1")
    rc, err = run_with(monkeypatch, capsys, InputError("--thing is wrong"))
    assert rc == 2 and "Traceback" in err and err.endswith("dcvit doctor: error: --thing is wrong\n")


@pytest.mark.parametrize("code,cause", [(errno.EACCES, "permission denied"), (errno.EISDIR, "is a folder"),
                                        (errno.EEXIST, "already exists"),
                                        (errno.ENOSPC, "no space left on the device")])
def test_os_errors_on_a_path_are_one_line_naming_path_and_cause(monkeypatch, capsys, code, cause):
    exc = OSError(code, os.strerror(code), "/data/out")
    assert describe_os_error(exc).startswith("/data/out: " + cause)
    rc, err = run_with(monkeypatch, capsys, exc)
    assert rc == 2 and err.startswith(f"dcvit doctor: error: /data/out: {cause}")


# ---- the disk: full, read-only, a folder where a file goes -------------------------
def test_a_full_disk_names_the_target_and_leaves_nothing(tmp_path, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(type(tmp_path), "write_bytes", full)
    with pytest.raises(OSError) as info, atomic_path(tmp_path / "model.pt2") as tmp:
        tmp.write_bytes(b"x")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "model.pt2")
    with pytest.raises(OSError) as info, atomic_folder(tmp_path / "art") as staging:
        (staging / "model.safetensors").write_bytes(b"x")
    assert info.value.filename == str(tmp_path / "art") and os.listdir(tmp_path) == []


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 64 KiB tmpfs (root can mount one here); skipped where mounting is not allowed."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (test_a_full_disk_names_the_target_and_leaves_nothing "
                    "simulates ENOSPC instead)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_compress_onto_a_full_filesystem_is_one_line(capsys, digits, tiny_filesystem):
    out = tiny_filesystem / "tome"
    rc = main(tome_argv(digits, out))
    line = one_error_line(capsys.readouterr().err, "compress")
    assert rc == 2 and line.endswith(f"{out}: no space left on the device")
    assert os.listdir(tiny_filesystem) == []  # no staging folder, no OUT.partial


def test_pt2_export_onto_a_full_filesystem_is_one_line_not_sigabrt(artifact, tiny_filesystem):
    out = tiny_filesystem / "tiny.pt2"
    proc = subprocess.run([sys.executable, "-m", "dcvit_engine.cli", "export", str(artifact), "--format",
                           "pt2", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc.stderr, "export").endswith(f"{out}: no space left on the device")
    assert os.listdir(tiny_filesystem) == []


def _without_dac_override(argv):
    """argv run as root without the capability to bypass file permissions (the machine runs
    tests as root, which reads and writes anything); None where setpriv cannot do that."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    probe = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", "true"],
                           capture_output=True)
    return None if probe.returncode else ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *argv]


def test_read_only_out_and_unreadable_class_folder(tmp_path, digits):
    argv = _without_dac_override([sys.executable, "-m", "dcvit_engine.cli"])
    if argv is None:
        pytest.skip("needs root and setpriv to drop the permission override")
    locked = tmp_path / "read_only"
    locked.mkdir()
    locked.chmod(0o555)
    proc = subprocess.run([*argv, *tome_argv(digits, locked / "tome")], capture_output=True, text=True)
    assert proc.returncode == 2 and one_error_line(proc.stderr, "compress").endswith("permission denied")
    assert os.listdir(locked) == []
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    (data / "3").chmod(0)
    proc = subprocess.run([*argv, *tome_argv(data, tmp_path / "tome")], capture_output=True, text=True)
    line = one_error_line(proc.stderr, "compress")
    assert proc.returncode == 2 and f"{data / '3'}" in line and "permission denied" in line
    assert not (tmp_path / "tome").exists() and not (tmp_path / "tome.partial").exists()


def test_out_that_is_a_folder_for_a_file(artifact, tmp_path, digits, capsys):
    folder = tmp_path / "preds.csv"
    folder.mkdir()
    (folder / "keep").write_text("x")
    rc = main(["infer", str(artifact), "--data", str(digits), "--out", str(folder), "--num-workers", "0",
               "--device", "cpu", "--no-progress"])
    line = one_error_line(capsys.readouterr().err, "infer")
    assert rc == 2 and str(folder) in line and "is a folder" in line
    assert sorted(os.listdir(tmp_path)) == ["preds.csv"] and os.listdir(folder) == ["keep"]


# ---- signals ----------------------------------------------------------------------
def _sigterm_self(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("SIGTERM did not interrupt")


def test_sigterm_during_export_exits_143_and_leaves_no_temp_file(monkeypatch, capsys, artifact, tmp_path):
    monkeypatch.setattr(export, "_export_program", _sigterm_self)
    rc = main(["export", str(artifact), "--format", "pt2", "--out", str(tmp_path / "m.pt2")])
    assert rc == 143 and capsys.readouterr().err.strip() == "dcvit export: terminated"
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored after the command


def test_sigterm_during_compress_keeps_the_earlier_artifact(monkeypatch, capsys, digits, tmp_path):
    out = tmp_path / "tome"
    assert main(tome_argv(digits, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import dcvit_engine.cli.compress as compress_cli
    monkeypatch.setattr(compress_cli, "compress", _sigterm_self)
    capsys.readouterr()
    assert main([*tome_argv(digits, out), "--overwrite"]) == 143  # replacing it was asked for
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["tome"]


# ---- one writer per --out ---------------------------------------------------------
def test_a_second_writer_of_the_same_out_refuses_naming_the_first(capsys, digits, tmp_path):
    out = tmp_path / "tome"
    with exclusive_folder(tmp_path / "tome.partial"):  # the first writer, still running
        rc = main(tome_argv(digits, out))
        line = one_error_line(capsys.readouterr().err, "compress")
        assert rc == 2 and f"in use by process {os.getpid()}" in line and "--out" in line
    assert not out.exists()
    assert main(tome_argv(digits, out)) == 0  # once the first is done, a run goes through
    assert not (tmp_path / "tome.partial").exists()


def test_a_second_process_is_refused_too(tmp_path):
    folder = tmp_path / "out.partial"
    code = ("import sys; from dcvit_engine.runlock import exclusive_folder\n"
            "from dcvit_engine.errors import BusyError\n"
            "try:\n    exclusive_folder(sys.argv[1]).__enter__()\n"
            "except BusyError as e:\n    print(e); sys.exit(3)\n")
    with exclusive_folder(folder):
        proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    assert proc.returncode == 3 and f"process {os.getpid()}" in proc.stdout
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # the kernel released the lock


def test_a_failed_start_leaves_no_empty_folder(capsys, digits, artifact, tmp_path):
    hostile = tmp_path / "hostile"
    shutil.copytree(artifact, hostile)
    spec = json.loads((hostile / "spec.json").read_text())
    (hostile / "spec.json").write_text(json.dumps(dict(spec, embed_dim=10**9)))
    argv = ["compress", str(hostile), "--data", str(digits), "--num-samples", "4", "--method", "tome",
            "--target-macs", "0.9", "--device", "cpu", *NORM, "--out", str(tmp_path / "out" / "tome")]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err, "compress")
    assert "embed_dim: 1000000000 is above the limit" in line
    assert sorted(os.listdir(tmp_path)) == ["hostile", "out"] and os.listdir(tmp_path / "out") == []
