"""`dcvit export`: the exportable ToMe merge against tome_merge_ref in float64, every
method's model through torch.export (.pt2) and ONNX (onnxruntime), the exported files run
without dcvit_engine, the bad-input refusals (one line, exit 2, nothing written), and
`dcvit bench --onnx`. Tiny random models: an ONNX export takes seconds."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from dcvit_engine import artifact, export
from dcvit_engine.cli import main
from dcvit_engine.exportable_merge import bipartite_merge_static, stable_argsort_descending
from dcvit_engine.kernels.token_merge import atme_merge_ref, tome_merge_ref
from dcvit_engine.reference import ViTReference
from dcvit_engine.spec import AttentionSpec, BlockSpec, MergeSpec, ViTSpec
from numerics import rel_err


def make_spec(blocks, **overrides):
    fields = dict(img_size=(24, 28), patch_size=4, in_chans=3, embed_dim=24, num_classes=7,
                  class_token=True, dist_token=False, global_pool="token", fc_norm=False,
                  pre_norm=False, final_norm=True, no_embed_class=False, norm_eps=1e-6,
                  prop_attn=True)
    fields.update(overrides)
    return ViTSpec(blocks=blocks, **fields).validate()


def heads(n=3, width=8):
    return AttentionSpec([width] * n, [width] * n, width ** -0.5)


# One spec per method's kind of artifact (6 x 7 patch grid, odd on purpose).
SPECS = {
    # DC-ViT: attention-free blocks with a resized MLP; LayerScale as DeiT-3 / CaiT-style timm models
    "dcvit_layerscale": lambda: make_spec([
        BlockSpec(heads(), 40, layer_scale=True), BlockSpec(None, 17, layer_scale=True),
        BlockSpec(heads(), 40, layer_scale=True)]),
    # PRACTISE: a whole block dropped; UVC: ragged heads, a skipped MLP
    "practise_uvc_ragged": lambda: make_spec([
        BlockSpec(AttentionSpec([8, 5, 3], [8, 2, 6], 8 ** -0.5), 40), BlockSpec(None, 0),
        BlockSpec(AttentionSpec([7], [3], 8 ** -0.5), 0)]),
    # CAIT: ATME merges along both axes (odd rows and columns pass through)
    "cait_atme": lambda: make_spec([
        BlockSpec(heads(), 40, merge=MergeSpec("atme", axis="w")),
        BlockSpec(heads(), 40, merge=MergeSpec("atme", axis="h")), BlockSpec(heads(), 40)]),
    # ToMe with proportional attention after the merges
    "tome": lambda: make_spec([
        BlockSpec(heads(), 40, merge=MergeSpec("tome", r=9)),
        BlockSpec(heads(), 40, merge=MergeSpec("tome", r=12)), BlockSpec(heads(), 40)]),
    # DeiT distillation token, after an ATME merge
    "atme_tome_distilled": lambda: make_spec([
        BlockSpec(heads(), 40, merge=MergeSpec("atme", axis="w")),
        BlockSpec(heads(), 40, merge=MergeSpec("tome", r=6)), BlockSpec(heads(), 40)], dist_token=True),
    # no class token: average pooling with fc_norm, ToMe keeps unmerged tokens in score order
    "tome_avg_pool_no_class_token": lambda: make_spec([
        BlockSpec(heads(), 40, merge=MergeSpec("tome", r=7)), BlockSpec(heads(), 40)],
        class_token=False, global_pool="avg", fc_norm=True, final_norm=False),
}


def model_for(spec, seed=0):
    torch.manual_seed(seed)
    model = ViTReference(spec).eval()
    with torch.no_grad():  # tokens, biases and LayerScale away from their constant init
        for name, p in model.named_parameters():
            if p.dim() <= 1 or "token" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    return {name: artifact.save(model_for(make()), root / name) for name, make in SPECS.items()}


@pytest.fixture(scope="module")
def distilled_exports(artifacts, tmp_path_factory):
    """The ATME + ToMe + distillation-token model exported once to both formats with a dynamic
    batch through the CLI (shared by the tests that only need the files): (onnx, pt2, stdout)."""
    folder = tmp_path_factory.mktemp("exports")
    files, stdout = {}, io.StringIO()
    for fmt in ("onnx", "pt2"):
        files[fmt] = folder / f"model.{fmt}"
        with contextlib.redirect_stdout(stdout):
            code = main(["export", str(artifacts["atme_tome_distilled"]), "--format", fmt,
                         "--out", str(files[fmt]), "--dynamic-batch"])
        assert code == 0
    assert sorted(os.listdir(folder)) == ["model.onnx", "model.pt2"]  # no temporary file left
    return files["onnx"], files["pt2"], stdout.getvalue()


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def images_for(spec, batch, dtype=torch.float32):
    return torch.randn(batch, spec.in_chans, *spec.img_size).to(dtype)


def test_onnx_dynamic_batch_axis_is_named_batch(distilled_exports):
    import onnx

    onnx_file, _, _ = distilled_exports
    graph = onnx.load(str(onnx_file)).graph
    for value in list(graph.input) + list(graph.output):
        first = value.type.tensor_type.shape.dim[0]
        assert first.dim_param == "batch", (value.name, first)


# ---- the exportable merge, float64 --------------------------------------------------------

def test_stable_argsort_matches_torch_with_ties_and_inf():
    values = torch.randint(0, 4, (3, 29)).double()
    values[0, 3] = values[0, 8] = values[2, 0] = -torch.inf
    expected = values.argsort(dim=-1, descending=True, stable=True)
    assert torch.equal(stable_argsort_descending(values), expected)


def test_stable_argsort_puts_nan_last_and_stays_a_permutation():
    values = torch.randint(0, 3, (4, 23)).double()
    values[0, [2, 5, 9]] = torch.nan
    values[1, :] = torch.nan
    values[2, [0, 7]] = -torch.inf
    values[2, 11] = torch.nan
    expected = (-values).argsort(dim=-1, stable=True)  # ascending of -v: descending, NaN last
    order = stable_argsort_descending(values)
    assert torch.equal(order, expected)
    assert torch.equal(order.sort(dim=-1).values, torch.arange(23).expand(4, -1))


@pytest.mark.parametrize("poison", ["nan", "zero_rows"])
def test_static_tome_merge_is_defined_on_nan_and_zero_metrics(poison):
    """The export's merge follows the merge ops' rule: same result as the reference kernel,
    every token accounted for (sizes sum to the token count), the class token kept first."""
    torch.manual_seed(0)
    x, metric = torch.randn(2, 37, 8).double(), torch.randn(2, 37, 5).double()
    if poison == "nan":
        metric[0, [3, 4, 10]] = torch.nan
        metric[1, :, 0] = torch.nan
    else:
        metric[:, [2, 6, 7, 20]] = 0.0
    merged, size = bipartite_merge_static(x, metric, 7, class_token=True)
    expected, expected_size = tome_merge_ref(x, metric, 7, None, True, False)
    assert torch.equal(size, expected_size) and torch.equal(merged.isnan(), expected.isnan())
    assert torch.allclose(merged.nan_to_num(), expected.nan_to_num(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(size.sum(dim=(1, 2)), torch.full((2,), 37.0, dtype=torch.float64))
    assert torch.equal(merged[:, 0], x[:, 0])


@pytest.mark.parametrize("class_token, distill_token", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("tokens, r", [(37, 5), (50, 1), (51, 100)])
def test_static_tome_merge_equals_the_reference_in_float64(class_token, distill_token, tokens, r):
    """Same tokens, same order, same values; r = 100 is clamped; sizes from an earlier merge;
    duplicated tokens create tied scores that the stable order must break like argsort."""
    x = torch.randn(2, tokens, 19, dtype=torch.float64)
    metric = torch.randn(2, tokens, 11, dtype=torch.float64)
    metric[:, 10:14] = metric[:, 20:21]  # four tokens with one metric: tied best matches
    size = torch.randint(1, 4, (2, tokens, 1)).double()
    got, got_size = bipartite_merge_static(x, metric, r, size, class_token, distill_token)
    want, want_size = tome_merge_ref(x, metric, r, size, class_token, distill_token)
    assert torch.equal(got_size, want_size)  # integer counts: exact by construction
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_static_tome_merge_sums_in_fp32_in_low_precision(dtype):
    """In fp16/bf16 the exportable merge sums in fp32 (as the engine's kernels do; onnxruntime's
    CPU scatter-add takes no fp16): the same merges as the reference, with less error against
    float64 than the reference's low-precision sums."""
    x = torch.randn(2, 51, 40, dtype=torch.float64)
    metric = torch.randn(2, 51, 16, dtype=torch.float64)
    size = torch.randint(1, 5, (2, 51, 1)).double()
    x, metric, size = (t.to(dtype) for t in (x, metric, size))
    # the float64 reference on the low-precision inputs: only the merge's own rounding differs
    want, want_size = tome_merge_ref(x.double(), metric.double(), 12, size.double(), True, False)
    got, got_size = bipartite_merge_static(x, metric, 12, size, True, False)
    same_precision, _ = tome_merge_ref(x, metric, 12, size, True, False)
    assert got.dtype == dtype and torch.equal(got_size.double(), want_size)
    # one rounding instead of one per product and sum: measured about half the error
    assert rel_err(got, want) < 0.75 * rel_err(same_precision, want)


def test_reference_module_merges_through_the_static_merge():
    """The reference module's ToMe step is the exportable merge (not a second implementation)
    and its ATME step is atme_merge_ref, which exports as it is; float64."""
    spec = SPECS["atme_tome_distilled"]()
    model = model_for(spec).double()
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(images_for(spec, 2, torch.float64)))
        x, metric = model.blocks[0].attention_residual(x, None, return_keys=True)
        got, size = model._merge(0, x, None, metric)
        want, want_size, _ = atme_merge_ref(x, metric, (6, 7), "w", 2)
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
        x, metric = model.blocks[1].attention_residual(model.blocks[0].mlp_residual(got), size,
                                                       return_keys=True)
        got, got_size = model._merge(1, x, size, metric)
        want, want_size = tome_merge_ref(x, metric, 6, size, True, True)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    assert torch.equal(got_size, want_size)


@pytest.mark.parametrize("name", ["cait_atme", "tome", "atme_tome_distilled", "tome_avg_pool_no_class_token"])
def test_torch_export_of_every_merge_kind_matches_in_float64(name):
    """The traced graph (what both formats are written from) computes the reference's merges:
    float64, a batch size other than the traced one."""
    spec = SPECS[name]()
    model = model_for(spec).double()
    program = torch.export.export(model, (images_for(spec, 2, torch.float64),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    images = images_for(spec, 3, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images), model(images), rtol=1e-12, atol=1e-12)


# ---- every method's artifact, both formats ---------------------------------------------------

@pytest.mark.parametrize("name", list(SPECS))
def test_pt2_export_of_every_method(name, artifacts, tmp_path, capsys):
    out = tmp_path / f"{name}.pt2"
    code, stdout, err = run(capsys, "export", artifacts[name], "--format", "pt2", "--out", out,
                            "--dynamic-batch", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["checked_batches"] == [1, 3] and result["max_rel_diff"] <= 1e-4
    spec = artifact.load_spec(artifacts[name])
    images = images_for(spec, 5)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(out)).module()(images),
                                   artifact.load(artifacts[name])(images), rtol=1e-5, atol=1e-5)


def onnx_logits(path, images):
    session = export.onnx_session(path)
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


@pytest.mark.parametrize("name, options", [
    ("dcvit_layerscale", ["--batch-size", "2"]),
    ("practise_uvc_ragged", ["--batch-size", "3", "--opset", "20"]),
    ("tome_avg_pool_no_class_token", ["--dynamic-batch", "--dtype", "fp16"]),
])
def test_onnx_export_runs_in_onnxruntime_like_the_reference(name, options, artifacts, tmp_path, capsys):
    out = tmp_path / f"{name}.onnx"
    code, stdout, err = run(capsys, "export", artifacts[name], "--format", "onnx", "--out", out, *options)
    assert code == 0, err
    assert "max abs logit diff" in stdout and "relative" in stdout and f"wrote {out}" in stdout
    assert sorted(os.listdir(tmp_path)) == [out.name]  # no temporary file left behind
    spec = artifact.load_spec(artifacts[name])
    fp16 = "fp16" in options
    batch = int(options[1]) if options[0] == "--batch-size" else 4
    images = images_for(spec, batch, torch.float16 if fp16 else torch.float32)
    model = artifact.load(artifacts[name]).to(images.dtype)
    with torch.no_grad():
        expected = model(images).float()
    got = onnx_logits(out, images).float()
    tolerance = 1e-2 if fp16 else 1e-4
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()


def test_cait_full_resolution_features_export(artifacts, tmp_path, capsys):
    """--output full-features: CAIT's tokens unmerged back to the input grid, as
    compress.cait.full_resolution_features computes them."""
    from dcvit_engine.compress.cait import full_resolution_features
    name = "cait_atme"
    out = tmp_path / "features.onnx"
    code, stdout, err = run(capsys, "export", artifacts[name], "--format", "onnx", "--out", out,
                            "--batch-size", "2", "--output", "full-features")
    assert code == 0, err
    assert "max abs feature diff" in stdout and "full-features" in stdout
    spec = artifact.load_spec(artifacts[name])
    images = images_for(spec, 2)
    with torch.no_grad():
        expected = full_resolution_features(artifact.load(artifacts[name]), images)
    assert expected.shape == (2, 1 + 6 * 7, spec.embed_dim)
    torch.testing.assert_close(onnx_logits(out, images), expected, rtol=1e-4, atol=1e-5)


def test_exported_files_run_without_dcvit_engine(artifacts, distilled_exports, tmp_path):
    """A fresh interpreter where importing dcvit_engine fails loads both files (dynamic batch,
    ATME + ToMe merges, distillation token) and gets the reference module's logits."""
    onnx_file, pt2_file, stdout = distilled_exports
    assert stdout.count("verified on batch(es) 1, 3") == 2 and "dynamic batch" in stdout
    name = "atme_tome_distilled"
    spec = artifact.load_spec(artifacts[name])
    images = images_for(spec, 5)
    torch.save(images, tmp_path / "images.pt")
    script = f"""
import sys
sys.modules["dcvit_engine"] = None  # any import of it raises
import torch, onnxruntime as ort
images = torch.load({str(tmp_path / 'images.pt')!r})
session = ort.InferenceSession({str(onnx_file)!r}, providers=["CPUExecutionProvider"])
onnx = torch.from_numpy(session.run(None, {{"images": images.numpy()}})[0])
pt2 = torch.export.load({str(pt2_file)!r}).module()(images)
torch.save((onnx, pt2), {str(tmp_path / 'logits.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    onnx, pt2 = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        expected = artifact.load(artifacts[name])(images)
    torch.testing.assert_close(onnx, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pt2, expected, rtol=1e-5, atol=1e-6)


# ---- bad input: one line, exit 2, nothing written -----------------------------------------

@pytest.mark.parametrize("options, message", [
    (["--format", "tflite"], "unknown format 'tflite'"),
    (["--format", "onnx", "--dtype", "bf16"], "onnx export cannot take bf16"),
    (["--format", "pt2", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["--format", "pt2", "--opset", "18"], "--opset applies to ONNX only"),
    (["--format", "onnx", "--opset", "13"], "--opset must be >= 18"),
    (["--format", "pt2", "--batch-size", "2", "--dynamic-batch"], "either --batch-size N or --dynamic-batch"),
    (["--format", "pt2", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--format", "pt2", "--output", "probs"], "unknown output 'probs'"),
    (["--format", "pt2", "--output", "full-features"], "block 0 merges with tome"),
])
def test_refused_options(options, message, artifacts, tmp_path, capsys):
    out = tmp_path / "model.out"
    code, _, err = run(capsys, "export", artifacts["tome"], "--out", out, *options)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_out_that_is_a_folder(artifacts, tmp_path, capsys):
    code, _, err = run(capsys, "export", artifacts["tome"], "--format", "pt2", "--out", tmp_path)
    assert code == 2 and "--out takes a file name" in err and os.listdir(tmp_path) == []


def test_artifact_that_does_not_load(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "spec.json").write_text("{not json")
    code, _, err = run(capsys, "export", broken, "--format", "pt2", "--out", tmp_path / "m.pt2")
    assert code == 2 and "cannot load artifact" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == ["broken"]


def test_missing_extra_names_the_install_command(artifacts, tmp_path, capsys, monkeypatch):
    real_find_spec = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    code, _, err = run(capsys, "export", artifacts["tome"], "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert code == 2 and 'pip install -e ".[export]"' in err and "onnxruntime" in err
    assert len(err.strip().splitlines()) == 1 and os.listdir(tmp_path) == []


def test_failed_verification_writes_nothing_and_keeps_an_old_file(artifacts, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.pt2"
    out.write_bytes(b"old export")
    # a tolerance nothing can meet: the exported model runs, is compared, and is refused
    monkeypatch.setitem(export.TOLERANCES, "fp32", -1.0)
    code, _, err = run(capsys, "export", artifacts["tome"], "--format", "pt2", "--out", out)
    assert code == 2 and "verification failed" in err and "nothing written" in err
    assert os.listdir(tmp_path) == ["m.pt2"] and out.read_bytes() == b"old export"


def test_dynamic_batch_the_exporter_cannot_keep_is_refused(artifacts, tmp_path, capsys, monkeypatch):
    """A head that reshapes with a fixed batch: torch.export specializes the batch, and the
    command says to export with a fixed batch instead."""
    def fixed_batch_head(self, feats):
        return feats.reshape(2, -1)[:, :7]

    monkeypatch.setattr(ViTReference, "forward_head", fixed_batch_head)
    code, _, err = run(capsys, "export", artifacts["tome"], "--format", "pt2", "--out",
                       tmp_path / "m.pt2", "--dynamic-batch")
    assert code == 2 and "export with --batch-size N" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_export_leaves_the_callers_module_as_it_was(tmp_path):
    model = model_for(SPECS["tome"]())
    export.export_model(model, tmp_path / "m.pt2", format="pt2", dtype="bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ---- dcvit bench --onnx -------------------------------------------------------------------------

def test_bench_times_the_engine_and_onnxruntime_in_one_run(artifacts, distilled_exports, capsys):
    name = "atme_tome_distilled"
    out = distilled_exports[0]
    code, stdout, err = run(capsys, "bench", artifacts[name], "--onnx", out, "--device", "cpu",
                            "--backend", "torch", "--batch-size", "3", "--warmup", "1", "--repeats", "2",
                            "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["images_per_s"] > 0 and result["onnxruntime"]["images_per_s"] > 0
    assert result["onnxruntime"]["batch_size"] == 3 and result["onnxruntime"]["repeats"] == 2
    # a file of another dtype is refused in one line
    code, _, err = run(capsys, "bench", artifacts[name], "--onnx", out, "--device", "cpu",
                       "--dtype", "bf16", "--batch-size", "3")
    assert code == 2 and "pass the matching --dtype" in err and len(err.strip().splitlines()) == 1
