"""Which model a command means: an artifact folder or a timm model name.

The CLI and the benchmarks name models either way; this module turns that into a
ViTReference (weights) or just a ViTSpec (structure), with clear errors for a missing
artifact, an unknown timm name (with close matches) or keyword arguments timm rejects.
"""
from __future__ import annotations

import difflib
import json
import os

import torch

from .artifact import load, load_preprocess, load_spec
from .checkpoints import load_checkpoint
from .errors import InputError
from .jsonfile import parse_json
from .preprocess import PreprocessConfig, config_from_timm
from .reference import ViTReference, reference_from_timm
from .spec import ViTSpec


def parse_model_kwargs(text: str | None) -> dict:
    """The --model-kwargs JSON object (e.g. '{"img_size": 32, "depth": 3}') as a dict."""
    if text is None or text == "":
        return {}
    return parse_json(text, "model kwargs", hint="give a JSON object such as '{\"img_size\": 32}'")


def _check_choice(artifact, model_name) -> None:
    if (artifact is None) == (model_name is None):
        raise InputError("name exactly one model: an artifact folder, or a timm model name (--model)")


def _create_timm(model_name: str, model_kwargs: dict | None, checkpoint, pretrained: bool,
                 device: str | torch.device):
    import timm

    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else \
            "; see timm.list_models('*vit*') for ViT/DeiT names"
        raise InputError(f"unknown timm model {model_name!r}{hint}")
    kwargs = dict(model_kwargs or {})
    try:
        with torch.device(device):
            model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except TypeError as err:  # a keyword the model class does not take
        raise InputError(f"timm rejected the model kwargs {model_kwargs} for {model_name}: {err}") from None
    if checkpoint is not None:
        # The project's one checkpoint reader: weights_only loading, "model"/"state_dict"
        # wrappers, and the mismatching tensors named.
        load_checkpoint(model, checkpoint, what=f"{model_name} with kwargs {model_kwargs or {}}")
    return model.eval()


def create_timm_model(model_name: str, model_kwargs: dict | None = None,
                      device: str | torch.device = "cpu"):
    """The timm model itself (eval mode, random weights), e.g. to time timm's own forward
    beside the engine; unknown names and rejected kwargs are one-line ValueErrors."""
    return _create_timm(model_name, model_kwargs, None, False, device)


def resolve_model(artifact: str | os.PathLike | None = None, model_name: str | None = None,
                  model_kwargs: dict | None = None, checkpoint: str | os.PathLike | None = None,
                  pretrained: bool = False) -> ViTReference:
    """The model as a ViTReference (eval mode, CPU): from an artifact folder, or a timm
    model built with `model_kwargs`, random weights unless `checkpoint` (a timm state
    dict file) or `pretrained` (timm's download) give real ones."""
    _check_choice(artifact, model_name)
    if artifact is not None:
        if model_kwargs or checkpoint is not None or pretrained:
            raise InputError("an artifact carries its own structure and weights; model kwargs, "
                             "checkpoint and pretrained apply only to a timm model name")
        return load(artifact)
    timm_model = _create_timm(model_name, model_kwargs, checkpoint, pretrained, "cpu")
    model = reference_from_timm(timm_model)
    model.preprocess = config_from_timm(timm_model)
    return model


def resolve_spec(artifact: str | os.PathLike | None = None, model_name: str | None = None,
                 model_kwargs: dict | None = None) -> ViTSpec:
    """Only the structure: reads spec.json, or builds the timm model on the meta device
    (no memory, no init), so describing even a large model is instant."""
    _check_choice(artifact, model_name)
    if artifact is not None:
        if model_kwargs:
            raise InputError("an artifact carries its own structure; model kwargs apply only to a "
                             "timm model name")
        return load_spec(artifact)
    from .adapter import spec_from_timm

    return spec_from_timm(_create_timm(model_name, model_kwargs, None, False, "meta"))


def resolve_preprocess(artifact: str | os.PathLike | None = None, model_name: str | None = None,
                       model_kwargs: dict | None = None) -> PreprocessConfig:
    """Only the preprocessing config: preprocess.json (or the default, with a notice), or
    timm's resolution for the timm model built on the meta device."""
    _check_choice(artifact, model_name)
    if artifact is not None:
        return load_preprocess(artifact)
    return config_from_timm(_create_timm(model_name, model_kwargs, None, False, "meta"))


def describe_source(artifact=None, model_name=None, model_kwargs=None) -> str:
    """A short human-readable name of the model source, for printed reports."""
    if artifact is not None:
        return f"artifact {artifact}"
    return model_name + (f" {json.dumps(model_kwargs, sort_keys=True)}" if model_kwargs else "")
