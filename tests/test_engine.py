"""The engine against the float64 reference module: timm layouts, compressed specs, dtypes,
backends (torch, cpu, Triton interpreter), torch.compile, CUDA graphs and bad input."""
import copy

import pytest
import timm
import torch

from conftest import requires_cuda, requires_interpreter
from dcvit_engine import artifact
from dcvit_engine.engine import Engine, build_engine, parse_dtype
from dcvit_engine.ops import BackendUnavailableError
from dcvit_engine.reference import ViTReference, reference_from_timm
from dcvit_engine.spec import AttentionSpec, BlockSpec, MergeSpec, ViTSpec
from numerics import assert_close_to_reference

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)
TIMM_LAYOUTS = {
    "cls_token": ("vit_tiny_patch16_224", {}),
    "avg_fc_norm_no_cls": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg", fc_norm=True)),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "layerscale_qknorm_no_embed_class_pre_norm": (
        "vit_tiny_patch16_224", dict(init_values=0.1, qk_norm=True, no_embed_class=True, pre_norm=True)),
    "no_head": ("vit_tiny_patch16_224", dict(num_classes=0)),
}


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Fresh non-trivial weights everywhere (LayerNorm affine near 1/0, linear ~ 1/sqrt(fan_in))."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            elif name.endswith("weight") or name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return module.eval()


def tiny_timm(layout: str) -> torch.nn.Module:
    name, extra = TIMM_LAYOUTS[layout]
    return randomize(timm.create_model(name, pretrained=False, **{**TINY, **extra}))


def compressed_spec(prop_attn=False) -> ViTSpec:
    """Ragged heads, an attention-free block, an MLP-free block, LayerScale."""
    scale = 16 ** -0.5
    blocks = [
        BlockSpec(attn=AttentionSpec(qk_dims=[16, 8, 12, 8], v_dims=[16, 4, 16, 4], scale=scale),
                  mlp_hidden=100),
        BlockSpec(attn=None, mlp_hidden=37),
        BlockSpec(attn=AttentionSpec(qk_dims=[16], v_dims=[9], scale=scale, qkv_bias=False, proj_bias=False),
                  mlp_hidden=0),
        BlockSpec(attn=AttentionSpec(qk_dims=[16] * 3, v_dims=[16] * 3, scale=scale), mlp_hidden=192,
                  layer_scale=True),
    ]
    return ViTSpec(img_size=(40, 32), patch_size=8, in_chans=3, embed_dim=48, num_classes=7,
                   class_token=True, dist_token=False, global_pool="token", fc_norm=False,
                   pre_norm=False, final_norm=True, no_embed_class=False, norm_eps=1e-6,
                   prop_attn=prop_attn, blocks=blocks)


def merging_spec(kind: str, dist_token=False, qk_norm=False) -> ViTSpec:
    """Token merges in every position a spec allows: after a full block, after an
    attention-free block, twice in a row, with proportional attention (ToMe)."""
    spec = compressed_spec(prop_attn=kind == "tome")
    if kind == "tome":
        merges = [MergeSpec("tome", r=4), MergeSpec("tome", r=3), None, MergeSpec("tome", r=2)]
    else:
        merges = [MergeSpec("atme", axis="w"), MergeSpec("atme", axis="h"), None, MergeSpec("atme", axis="w")]
    for block, merge in zip(spec.blocks, merges):
        block.merge = merge
    if qk_norm:
        spec.blocks[3].attn.qk_norm = True
    spec.dist_token = dist_token
    return spec.validate()


def images_for(spec: ViTSpec, batch=3):
    return torch.randn(batch, spec.in_chans, *spec.img_size, dtype=torch.float64)


def check_engine(reference: ViTReference, backend, dtype, batch=3, device="cpu", **engine_kwargs):
    reference64 = copy.deepcopy(reference).double()
    images64 = images_for(reference.spec, batch)
    ref64 = reference64(images64)
    same_precision = copy.deepcopy(reference).to(device=device, dtype=dtype)(images64.to(device, dtype))
    engine = build_engine(reference, backend=backend, dtype=dtype, device=device, **engine_kwargs)
    out = engine(images64.to(device, dtype))
    assert out.shape == ref64.shape and out.dtype == dtype and out.device.type == device
    interpreter_bf16 = backend == "triton" and device == "cpu" and dtype == torch.bfloat16
    assert_close_to_reference(out.cpu(), ref64, same_precision.cpu(), interpreter_bf16=interpreter_bf16,
                              what=f"engine {backend} {dtype}")
    return engine, out


@pytest.mark.parametrize("layout", sorted(TIMM_LAYOUTS))
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_matches_timm_layouts_fp32(layout, backend):
    check_engine(reference_from_timm(tiny_timm(layout)), backend, torch.float32)


def test_matches_timm_directly():
    model = tiny_timm("distilled")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(build_engine(model, backend="cpu")(images), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_half_precision(dtype, backend):
    check_engine(reference_from_timm(tiny_timm("cls_token")), backend, dtype)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compressed_spec(backend):
    check_engine(randomize(ViTReference(compressed_spec())), backend, torch.float32)


@pytest.mark.parametrize("kind", ["tome", "atme"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_token_merging(kind, backend):
    check_engine(randomize(ViTReference(merging_spec(kind))), backend, torch.float32)


@pytest.mark.parametrize("kind", ["tome", "atme"])
def test_token_merging_distilled_with_qk_norm(kind):
    # qk_norm runs on the engine's backend (the cpu op computes it), and the merge metric comes
    # from the normalised keys
    check_engine(randomize(ViTReference(merging_spec(kind, dist_token=True, qk_norm=True))), "cpu",
                 torch.float32)


def test_token_merging_bf16():
    check_engine(randomize(ViTReference(merging_spec("atme"))), "cpu", torch.bfloat16)


@pytest.mark.parametrize("kind", [None, "tome"])
@requires_interpreter
def test_triton_interpreter_tiny_model(kind):
    spec = compressed_spec() if kind is None else merging_spec(kind)
    check_engine(randomize(ViTReference(spec)), "triton", torch.float32, batch=1)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_fullgraph_compile_on_cpu(backend):
    # merges, proportional attention, qk_norm (on the engine's backend), ragged heads, removed branches
    reference = randomize(ViTReference(merging_spec("tome", qk_norm=True)))
    engine = build_engine(reference, backend=backend)
    images = images_for(reference.spec, 2).float()
    compiled = torch.compile(engine, fullgraph=True)
    torch.testing.assert_close(compiled(images), engine(images), rtol=1e-5, atol=1e-5)


def test_build_from_artifact(tmp_path):
    reference = randomize(ViTReference(compressed_spec()))
    artifact.save(reference, tmp_path / "model")
    engine = build_engine(tmp_path / "model", backend="torch")
    images = images_for(reference.spec, 2).float()
    torch.testing.assert_close(engine(images), reference(images), rtol=1e-5, atol=1e-5)


def test_weights_are_prepared_once():
    engine = build_engine(reference_from_timm(tiny_timm("cls_token")), dtype="bf16")
    assert isinstance(engine, Engine) and engine.dtype == torch.bfloat16
    for name, buffer in engine.named_buffers():
        assert buffer.dtype == torch.bfloat16 and buffer.is_contiguous(), name
        assert not buffer.requires_grad, name


def test_engine_owns_its_weights():
    reference = randomize(ViTReference(compressed_spec()))
    engine = build_engine(reference, backend="torch")
    images = images_for(reference.spec, 2).float()
    before = engine(images)
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(2)
    torch.testing.assert_close(engine(images), before, rtol=0, atol=0)


def test_to_keeps_the_expected_dtype_in_step():
    reference = randomize(ViTReference(compressed_spec()))
    engine = build_engine(reference, backend="torch").to(torch.bfloat16)
    assert engine.dtype == torch.bfloat16
    images = images_for(reference.spec, 2)
    same_precision = copy.deepcopy(reference).bfloat16()(images.bfloat16())
    assert_close_to_reference(engine(images.bfloat16()), copy.deepcopy(reference).double()(images),
                              same_precision, what="engine converted to bf16 after building")


# ---- bad input ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_engine():
    return build_engine(reference_from_timm(tiny_timm("cls_token")))


@pytest.mark.parametrize("shape,words", [
    ((2, 3, 64, 64), "32x32 pixels"), ((2, 1, 32, 32), "3 channels"), ((3, 32, 32), "(B, 3, 32, 32)"),
])
def test_wrong_image_shape_says_what_is_expected(tiny_engine, shape, words):
    with pytest.raises(ValueError, match="expects images of shape") as info:
        tiny_engine(torch.randn(*shape))
    assert words in str(info.value)


def test_wrong_dtype_says_what_is_expected(tiny_engine):
    with pytest.raises(ValueError, match="runs in torch.float32 but the images are torch.float16"):
        tiny_engine(torch.randn(2, 3, 32, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="normalise integer images"):
        tiny_engine(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_other_bad_input(tiny_engine):
    with pytest.raises(TypeError, match="expected a tensor"):
        tiny_engine([[1.0]])
    with pytest.raises(ValueError, match="empty batch"):
        tiny_engine(torch.randn(0, 3, 32, 32))


def test_bad_build_arguments(tmp_path):
    model = reference_from_timm(tiny_timm("cls_token"))
    with pytest.raises(ValueError, match="not a backend"):
        build_engine(model, backend="fast")
    with pytest.raises(ValueError, match="unknown dtype"):
        build_engine(model, dtype="float8")
    with pytest.raises(ValueError, match="floating-point"):
        parse_dtype(torch.int8)
    with pytest.raises(TypeError, match="build_engine takes"):
        build_engine(42)
    with pytest.raises(FileNotFoundError, match="no artifact"):
        build_engine(tmp_path / "missing")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            build_engine(model, device="cuda")


def test_unavailable_backend_names_reasons():
    engine = build_engine(reference_from_timm(tiny_timm("cls_token")), backend="cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        engine(torch.randn(1, 3, 32, 32))


# ---- GPU --------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("backend", [None, "torch", "cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_matches_reference(backend, dtype):
    if backend == "triton" and dtype == torch.float32:
        # Triton GEMM ops refuse fp32 on CUDA (no tensor cores); a forced request says so
        engine = build_engine(randomize(ViTReference(compressed_spec())), backend="triton",
                              dtype=dtype, device="cuda", cuda_graphs=False)
        with pytest.raises(BackendUnavailableError, match="fp32 on CUDA"):
            engine(torch.randn(1, 3, *engine.spec.img_size, device="cuda"))
        return
    check_engine(randomize(ViTReference(compressed_spec())), backend, dtype, device="cuda",
                 cuda_graphs=False)
    check_engine(reference_from_timm(tiny_timm("distilled")), backend, dtype, device="cuda",
                 cuda_graphs=False)
    # ToMe picks merges by argmax: half precision may flip near-ties, so it is checked in fp32;
    # ATME blends continuously and is checked in every dtype
    for kind in ("tome", "atme") if dtype == torch.float32 else ("atme",):
        check_engine(randomize(ViTReference(merging_spec(kind, qk_norm=True))), backend, dtype,
                     device="cuda", cuda_graphs=False)


@requires_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graphs_replay_equals_eager(compile):
    # fp32, so that eager and replayed kernels agree closely enough for ToMe to pick the same merges
    reference = randomize(ViTReference(merging_spec("tome")))
    graphed = build_engine(reference, dtype=torch.float32, device="cuda", compile=compile)
    eager = build_engine(reference, dtype=torch.float32, device="cuda", cuda_graphs=False)
    assert graphed.cuda_graphs
    for batch in (3, 1, 3, 5):
        images = torch.randn(batch, 3, 40, 32, device="cuda")
        out = graphed(images)
        torch.testing.assert_close(out, eager(images), rtol=1e-4, atol=1e-4)
        kept = out.clone()
        graphed(torch.randn_like(images))
        assert torch.equal(out, kept), "a later replay must not overwrite an earlier result"
    assert sorted(graphed._graphs) == [1, 3, 5]
    with torch.inference_mode():  # captured outside inference mode, replayed inside, and back
        graphed(torch.randn(3, 3, 40, 32, device="cuda"))
    graphed(torch.randn(3, 3, 40, 32, device="cuda"))
