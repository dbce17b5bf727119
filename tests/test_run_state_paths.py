"""A resumable run's state.json is untrusted: the model folder it names must be the run's own
(a direct child named model-NNNN, not a link), so a tampered state can neither make a resume
read another folder nor make a commit delete one."""
import json
import os

import pytest
import torch

from dcvit_engine.artifact import save
from dcvit_engine.compress.run_state import STATE_FILENAME, RunCheckpoint
from dcvit_engine.errors import RunStateError
from dcvit_engine.reference import ViTReference
from dcvit_engine.spec import AttentionSpec, BlockSpec, ViTSpec
from tests.compress_cli import run_compress_cli

CONFIG = {"method": "test", "seed": 0}


def tiny_model() -> ViTReference:
    spec = ViTSpec(img_size=(16, 16), patch_size=8, in_chans=3, embed_dim=8, num_classes=3,
                   class_token=True, dist_token=False, global_pool="token", fc_norm=False,
                   pre_norm=False, final_norm=True, no_embed_class=False, norm_eps=1e-6,
                   prop_attn=False, blocks=[BlockSpec(AttentionSpec([4], [4], 0.5), 16)])
    torch.manual_seed(0)
    return ViTReference(spec).eval()


@pytest.fixture
def run_and_victim(tmp_path):
    """A run folder with two committed steps (model-0002 current) and, beside it, a folder
    holding a valid artifact that a tampered state may name."""
    run = tmp_path / "out.partial"
    ckpt = RunCheckpoint(run, CONFIG)
    ckpt.commit(tiny_model())
    ckpt.commit(tiny_model())
    victim = save(tiny_model(), tmp_path / "victim")
    return run, victim


def tamper(run, artifact):
    state = json.loads((run / STATE_FILENAME).read_text())
    state["artifact"] = artifact
    (run / STATE_FILENAME).write_text(json.dumps(state))


def test_an_honest_state_resumes(run_and_victim):
    run, _ = run_and_victim
    ckpt = RunCheckpoint(run, CONFIG, resume=True)
    assert ckpt.resumed and ckpt.state["artifact"] == "model-0002"
    assert ckpt.model() is not None
    ckpt.commit(tiny_model())
    assert sorted(p.name for p in run.iterdir()) == ["model-0003", STATE_FILENAME]


@pytest.mark.parametrize("kind", ["traversal", "absolute", "nested", "not a model name", "not a string"])
def test_a_state_naming_a_path_outside_is_refused(run_and_victim, kind):
    run, victim = run_and_victim
    named = {"traversal": "../victim", "absolute": str(victim), "nested": "model-0002/../../victim",
             "not a model name": "victim", "not a string": ["..", "victim"]}[kind]
    tamper(run, named)
    with pytest.raises(RunStateError, match="not a model folder of this run"):
        RunCheckpoint(run, CONFIG, resume=True)
    assert (victim / "spec.json").is_file() and (run / "model-0002" / "spec.json").is_file()


def test_a_symlink_out_is_refused_and_never_followed(run_and_victim):
    run, victim = run_and_victim
    os.symlink(victim, run / "model-0007")
    tamper(run, "model-0007")
    with pytest.raises(RunStateError, match="symbolic link"):
        RunCheckpoint(run, CONFIG, resume=True)
    assert (victim / "spec.json").is_file()


def test_a_run_folder_that_is_a_symlink_is_refused(run_and_victim, tmp_path):
    run, _ = run_and_victim
    link = tmp_path / "link.partial"
    os.symlink(run, link)
    with pytest.raises(RunStateError, match="symbolic link"):
        RunCheckpoint(link, CONFIG, resume=True)


def test_a_linked_metric_set_is_refused(run_and_victim, tmp_path):
    run, _ = run_and_victim
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes(b"x")
    os.symlink(outside, run / "metric_set.pt")
    with pytest.raises(RunStateError, match="symbolic link"):
        RunCheckpoint(run, CONFIG, resume=True).metric_set_path
    assert outside.read_bytes() == b"x"


@pytest.mark.parametrize("field,value", [("saves", "7"), ("saves", -1), ("config", [1])])
def test_malformed_state_fields_are_refused(run_and_victim, field, value):
    run, _ = run_and_victim
    state = json.loads((run / STATE_FILENAME).read_text())
    state[field] = value
    (run / STATE_FILENAME).write_text(json.dumps(state))
    with pytest.raises(RunStateError, match=field):
        RunCheckpoint(run, CONFIG, resume=True)


@pytest.mark.parametrize("named", ["../victim", "absolute"])
def test_compress_resume_with_a_tampered_state_is_one_line_and_deletes_nothing(capsys, tmp_path, named):
    victim = save(tiny_model(), tmp_path / "victim")
    run = tmp_path / "practise.partial"
    run.mkdir()
    artifact = str(victim) if named == "absolute" else named
    (run / STATE_FILENAME).write_text(json.dumps({"format": 1, "config": {}, "artifact": artifact,
                                                  "saves": 1}))
    rc, out, err = run_compress_cli(capsys, tmp_path, "practise", "--resume")
    last = err.strip().splitlines()[-1]  # progress lines go to stderr before it
    assert rc == 2 and "Traceback" not in err and last.startswith("dcvit compress: error: "), err
    assert "not a model folder of this run" in last
    assert (victim / "spec.json").is_file() and (victim / "model.safetensors").is_file()
    assert not (tmp_path / "practise").exists()


def test_old_module_name_is_the_run_state_module():
    """compress/checkpoint.py was renamed to run_state.py; the old import path is the same
    module for one release."""
    from dcvit_engine.compress import checkpoint, run_state

    assert checkpoint is run_state and checkpoint.RunCheckpoint is RunCheckpoint
