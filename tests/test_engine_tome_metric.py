"""ToMe's merge metric from the attention op's own keys (attention_block_key_mean): both
outputs on every backend against the float64 reference (ragged heads side by side, uniform
heads averaged, q/k-norm, widths padded per call), RoPE refused, every output element
written, and the engine's op calls per ToMe block: the block op, the merge and the MLP op,
no second LayerNorm and K projection."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import requires_interpreter
from dcvit_engine import ops
from dcvit_engine.engine import build_engine
from dcvit_engine.kernels.attention import attention_block_key_mean_ref, key_mean_ref
from dcvit_engine.reference import ViTReference
from dcvit_engine.spec import AttentionSpec, BlockSpec, MergeSpec, ViTSpec
from numerics import assert_close_to_reference, poisoned_like
from test_attention import assert_branch_close, make_inputs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [  # batch, tokens, dim, qk_dims, v_dims, q/k-norm
    (2, 13, 40, [24, 7, 16], [16, 5, 9], False),  # ragged (UVC): keys side by side
    (3, 9, 36, [10, 10, 10], [7, 7, 7], True),    # one width off 16, q/k-norm: averaged
    (1, 17, 48, [16, 16], [16, 16], False),       # the engine's padded layout
]
BACKENDS = ["torch", "cpu", pytest.param("triton", marks=requires_interpreter)]


def _inputs(batch, tokens, dim, qk_dims, v_dims, qk_norm, dtype):
    torch.manual_seed(batch * 1000 + tokens)
    x, weights, gamma, key_bias = make_inputs(batch, tokens, dim, qk_dims, v_dims, dtype=torch.float64)
    norms = {}
    if qk_norm:
        width = qk_dims[0]
        pair = lambda: (1 + 0.2 * torch.randn(width, dtype=torch.float64),  # noqa: E731
                        0.1 * torch.randn(width, dtype=torch.float64))
        norms = dict(q_norm=pair(), k_norm=pair())
    args64 = (x, *weights, qk_dims, v_dims, 0.3)
    kwargs64 = dict(gamma=gamma, key_bias=key_bias, **norms)

    def cast(value):
        if isinstance(value, torch.Tensor):
            return value.to(dtype)
        if isinstance(value, tuple):
            return tuple(cast(v) for v in value)
        return value
    return args64, kwargs64, tuple(cast(a) for a in args64), {k: cast(v) for k, v in kwargs64.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=["ragged", "qk_norm", "aligned"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_both_outputs_match_the_float64_reference(backend, case, dtype):
    args64, kwargs64, args, kwargs = _inputs(*case, dtype)
    ref_out, ref_metric = ops.attention_block_key_mean(*args64, backend="torch", **kwargs64)
    same_out, same_metric = ops.attention_block_key_mean(*args, backend="torch", **kwargs)
    out, metric = ops.attention_block_key_mean(*args, backend=backend, **kwargs)
    qk_dims = case[3]
    width = qk_dims[0] if len(set(qk_dims)) == 1 else sum(qk_dims)
    assert metric.shape == (case[0], case[1], width) and metric.dtype == dtype
    interpreter_bf16 = backend == "triton" and dtype == torch.bfloat16
    what = f"{backend} {dtype}"
    assert_close_to_reference(metric, ref_metric, same_metric, interpreter_bf16=interpreter_bf16,
                              what=f"key mean {what}")
    assert_branch_close(out, args[0], ref_out, same_out, interpreter_bf16=interpreter_bf16,
                        what=f"block {what}")
    torch.testing.assert_close(ref_out, ops.attention_block(*args64, backend="torch", **kwargs64),
                               rtol=0, atol=0)


def test_reference_metric_is_the_keys_after_k_norm_averaged_over_heads():
    # written out by hand for one uniform case: LayerNorm, the k rows, k-norm per head, mean
    args64, kwargs64, _, _ = _inputs(*CASES[1], torch.float64)
    x, norm_w, norm_b, qkv_w, qkv_b = args64[:5]
    qk_dims = args64[7]
    total, heads, width = sum(qk_dims), len(qk_dims), qk_dims[0]
    h = torch.nn.functional.layer_norm(x, (x.shape[-1],), norm_w, norm_b, 1e-6)
    k = (h @ qkv_w[total:2 * total].T + qkv_b[total:2 * total]).unflatten(-1, (heads, width))
    k = torch.nn.functional.layer_norm(k, (width,), *kwargs64["k_norm"], 1e-6)
    _, metric = attention_block_key_mean_ref(*args64[:10], 1e-6, kwargs64["gamma"], kwargs64["key_bias"],
                                             *kwargs64["q_norm"], *kwargs64["k_norm"])
    torch.testing.assert_close(metric, k.mean(dim=-2), rtol=1e-12, atol=1e-12)
    assert key_mean_ref(k.flatten(-2), [4, 5, 21]).shape[-1] == 30  # ragged: side by side


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_rope_is_refused(backend):
    args64, kwargs64, _, _ = _inputs(*CASES[2], torch.float64)
    tables = torch.zeros(CASES[2][1], 32)
    with pytest.raises(ValueError, match="RoPE is refused"):
        ops.attention_block_key_mean(*args64, backend=backend, rope_cos=tables.cos(), rope_sin=tables,
                                     **kwargs64)


def test_cpu_out_variant_writes_both_outputs():
    _, _, args, kwargs = _inputs(*CASES[0], torch.float32)
    ref_out, ref_metric = ops.attention_block_key_mean(*args, backend="torch", **kwargs)
    x = args[0]
    out, metric = poisoned_like(x), poisoned_like(ref_metric)
    torch.ops.dcvit.attention_block_key_mean.out(*args, 1e-6, kwargs["gamma"], kwargs["key_bias"],
                                                 out=out, key_mean_out=metric)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(metric, ref_metric, rtol=1e-4, atol=1e-4)


class _OpCalls(TorchDispatchMode):
    """The ops a forward calls at the top level (a compiled op's own ATen calls are not seen)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket).split(".")[-1])  # aten.mm -> mm
        return func(*args, **(kwargs or {}))


def _tome_spec(qk_dims, merges) -> ViTSpec:
    blocks = [BlockSpec(attn=AttentionSpec(qk_dims=qk_dims, v_dims=[16] * len(qk_dims), scale=0.25),
                        mlp_hidden=64, merge=merge) for merge in merges]
    return ViTSpec(img_size=(32, 32), patch_size=8, in_chans=3, embed_dim=48, num_classes=5,
                   class_token=True, dist_token=False, global_pool="token", fc_norm=False,
                   pre_norm=False, final_norm=True, no_embed_class=False, norm_eps=1e-6,
                   prop_attn=True, blocks=blocks).validate()


def _block_calls(spec: ViTSpec) -> list[list[str]]:
    """The op calls of each block of the cpu-backend engine of `spec` (the blocks of an
    engine run the same calls whatever precedes them, so a model's calls minus those of the
    model with one block less are the last block's)."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    calls = []
    for depth in range(len(spec.blocks) + 1):
        part = ViTSpec(**{**spec.__dict__, "blocks": spec.blocks[:depth]})
        engine = build_engine(ViTReference(part.validate()).eval(), backend="cpu")
        with torch.no_grad(), _OpCalls() as mode:
            engine(images)
        calls.append(mode.names)
    return [_difference(calls[i + 1], calls[i]) for i in range(len(spec.blocks))]


def _difference(longer: list[str], shorter: list[str]) -> list[str]:
    rest = list(longer)
    for name in shorter:
        rest.remove(name)
    return rest


@pytest.mark.parametrize("qk_dims", [[16, 16, 16], [8, 8, 8]], ids=["aligned", "padded"])
def test_engine_op_calls_per_tome_block(qk_dims):
    tome, plain = MergeSpec("tome", r=2), None
    merging, unmerged = _block_calls(_tome_spec(qk_dims, [plain, tome, tome]))[1:]
    # the first ToMe block has no sizes yet (no key bias); afterwards log(size) is one call
    slicing = ["slice"] if qk_dims[0] % 16 else []  # the padded heads' real key columns
    assert sorted(merging) == sorted(["attention_block_key_mean", *slicing, "tome_merge", "mlp_block"])
    assert sorted(unmerged) == sorted(["log", "squeeze", "attention_block_key_mean", *slicing, "tome_merge",
                                       "mlp_block"])
    assert not {"layer_norm", "native_layer_norm", "linear", "addmm", "mm"} & set(merging + unmerged)
    plain_calls = _block_calls(_tome_spec(qk_dims, [plain]))[0]
    assert sorted(plain_calls) == ["attention_block", "mlp_block"]
