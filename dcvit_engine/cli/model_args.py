"""Shared by the commands that run a model: the model-source arguments (ARTIFACT, or
--model NAME with options) and the one-line report of an unavailable backend."""
import argparse
import contextlib

from dcvit_engine.cli import CommandError
from dcvit_engine.models import (
    describe_source,
    parse_model_kwargs,
    resolve_model,
    resolve_preprocess,
    resolve_spec,
)
from dcvit_engine.ops import BackendUnavailableError


def add_model_arguments(parser: argparse.ArgumentParser, weights: bool = True) -> None:
    """ARTIFACT (positional, optional) | --model NAME [--model-kwargs JSON]; with `weights`
    also --checkpoint and --pretrained for a timm model."""
    parser.add_argument("artifact", nargs="?", default=None, metavar="ARTIFACT",
                        help="artifact folder (spec.json + model.safetensors)")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="timm model name instead of an artifact (e.g. deit_small_patch16_224)")
    parser.add_argument("--model-kwargs", default=None, metavar="JSON",
                        help='timm create_model keyword arguments, e.g. \'{"img_size": 32, "depth": 3}\'')
    if weights:
        parser.add_argument("--checkpoint", default=None, metavar="FILE",
                            help="state dict file for the timm model (default: random weights)")
        parser.add_argument("--pretrained", action="store_true",
                            help="download timm's pretrained weights for --model")


def _source(args) -> dict:
    return dict(artifact=args.artifact, model_name=args.model,
                model_kwargs=parse_model_kwargs(args.model_kwargs) or None)


def model_from_args(args):
    """The ViTReference named by the arguments, and a printable name."""
    source = _source(args)
    model = resolve_model(**source, checkpoint=args.checkpoint, pretrained=args.pretrained)
    return model, describe_source(**source)


def spec_from_args(args):
    """Only the spec named by the arguments (no weights), and a printable name."""
    source = _source(args)
    return resolve_spec(**source), describe_source(**source)


def preprocess_from_source(args):
    """Only the preprocessing config of the model the arguments name (no weights)."""
    return resolve_preprocess(**_source(args))


@contextlib.contextmanager
def backend_errors_as_command_errors():
    """A requested backend that cannot run (its reasons span several lines) becomes a
    one-line CommandError: `dcvit` prints it and exits with status 2."""
    try:
        yield
    except BackendUnavailableError as err:
        raise CommandError("; ".join(line.strip() for line in str(err).splitlines())) from None
