"""The engine's blocks call their ops through calls bound once (Op.bind): the same results as
the checked public ops, bound again when the backend choice or the weights change, and never
shared with a copy."""
import copy

import torch

from dcvit_engine.engine import build_engine
from dcvit_engine.ops.attention import ATTENTION_BLOCK
from dcvit_engine.reference import ViTReference
from test_engine import compressed_spec, images_for, merging_spec, randomize


def _checked(engine):
    """The same engine running the public, checked ops on every call."""
    twin = copy.deepcopy(engine)
    twin._bind_blocks = lambda: False
    return twin


def test_bound_calls_match_the_checked_ops_exactly():
    for spec in (compressed_spec(prop_attn=True), merging_spec("tome", qk_norm=True)):
        torch.manual_seed(0)
        engine = build_engine(randomize(ViTReference(spec)), backend="cpu")
        images = images_for(spec, batch=3).float()
        with torch.no_grad():
            first, second = engine(images), engine(images)  # binds, then runs bound
            checked = _checked(engine)(images)
        assert all(b.attention_call is not None for b in engine.blocks if b.has_attn)
        assert all(b.mlp_call is not None for b in engine.blocks if b.has_mlp)
        torch.testing.assert_close(second, first, rtol=0, atol=0)
        torch.testing.assert_close(second, checked, rtol=0, atol=0)
        # another batch size reuses the bound calls
        with torch.no_grad():
            torch.testing.assert_close(engine(images[:1]), _checked(engine)(images[:1]), rtol=0, atol=0)


def test_bound_calls_follow_the_backend_choice(monkeypatch):
    spec = compressed_spec()
    engine = build_engine(randomize(ViTReference(spec)))  # backend chosen per op
    images = images_for(spec, batch=2).float()
    chosen = []
    original = ATTENTION_BLOCK.bind

    def recording(*args, backend=None, **options):
        chosen.append(ATTENTION_BLOCK.dispatcher.choose(args[0].device, *args, backend=backend).backend)
        return original(*args, backend=backend, **options)

    monkeypatch.setattr(ATTENTION_BLOCK, "bind", recording)
    monkeypatch.setenv("DCVIT_BACKEND", "torch")
    with torch.no_grad():
        on_torch = engine(images)
        monkeypatch.setenv("DCVIT_BACKEND", "cpu")
        on_cpu = engine(images)
        engine.backend = "torch"  # an explicit backend wins over the environment
        again = engine(images)
    heads = sum(b.has_attn for b in engine.blocks)
    assert chosen == ["torch"] * heads + ["cpu"] * heads + ["torch"] * heads
    torch.testing.assert_close(on_cpu, on_torch, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, on_torch, rtol=0, atol=0)


def test_moving_or_copying_binds_again():
    spec = compressed_spec()
    engine = build_engine(randomize(ViTReference(spec)), backend="cpu")
    images = images_for(spec, batch=2).float()
    with torch.no_grad():
        engine(images)
        twin = copy.deepcopy(engine)
        assert all(b.attention_call is None and b.mlp_call is None for b in twin.blocks)
        for block in twin.blocks:
            if block.has_mlp:
                block.fc2_bias.add_(1.0)  # the copy's own weights, which its calls must read
        assert not torch.allclose(twin(images), engine(images))
        engine.to(torch.bfloat16)
        out = engine(images.bfloat16())
    assert out.dtype == torch.bfloat16
