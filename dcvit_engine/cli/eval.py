"""`dcvit eval`: top-1 accuracy of an artifact on an image folder (when the folder has one
subfolder per class) and its top-1 agreement with a teacher.

  dcvit eval deit_b_075 --data val/ --teacher deit_base_patch16_224 --checkpoint deit_b.pth

--teacher is an artifact folder or a timm model name; --model-kwargs and --checkpoint
build that timm teacher.
"""
import argparse
import json
from pathlib import Path

import torch

from dcvit_engine.artifact import load
from dcvit_engine.cli.compress import model_from_source
from dcvit_engine.cli.data_args import add_data_arguments, images_from_args, preprocess_from_args
from dcvit_engine.cli.infer import _class_names
from dcvit_engine.cli.option_types import positive_int
from dcvit_engine.compress.fewshot import predict_logits
from dcvit_engine.data import check_finite
from dcvit_engine.devices import resolve_device
from dcvit_engine.errors import InputError
from dcvit_engine.macs import count_macs


def register(subparsers):
    parser = subparsers.add_parser("eval", help="top-1 of an artifact on an image folder, and agreement "
                                   "with a teacher", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", metavar="ARTIFACT", help="artifact folder to evaluate")
    add_data_arguments(parser, num_samples_required=False)
    parser.add_argument("--teacher", default=None, metavar="NAME|ARTIFACT",
                        help="teacher to compare predictions with: an artifact folder or a timm model name")
    parser.add_argument("--model-kwargs", default=None, metavar="JSON",
                        help="timm create_model keyword arguments of a timm --teacher")
    parser.add_argument("--checkpoint", default=None, metavar="FILE",
                        help="state dict file of a timm --teacher (default: random weights)")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="picks the images when --num-samples is given")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--class-names", default=None, metavar="FILE",
                        help="text file with one class name per line, in the model's class order: maps "
                        "the folder's class subfolders to the model's classes by name")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.set_defaults(func=run)


def _teacher(args):
    if args.teacher is None:
        if args.model_kwargs or args.checkpoint:
            raise InputError("--model-kwargs and --checkpoint describe the --teacher; give --teacher too")
        return None, None
    if Path(args.teacher).is_dir():
        if args.model_kwargs:
            raise InputError("an artifact teacher carries its own structure; --model-kwargs applies "
                             "only to a timm model name")
        return model_from_source(args.teacher, None, None, args.checkpoint)
    return model_from_source(None, args.teacher, args.model_kwargs, args.checkpoint)


def labels_for_model(labels, folder_classes, num_classes: int, class_names_file: str | None, data: str):
    """The folder's labels as the model's class indices. Without a class-names file the
    folder's sorted class subfolders are the model's classes in order, so a folder with more
    classes than the model is refused (its top-1 would count labels the head can never
    predict); with one, each subfolder is mapped to its name's line in the file."""
    if labels is None:
        return None
    if class_names_file is None:
        if len(folder_classes) > num_classes:
            raise InputError(f"--data {data} has {len(folder_classes)} class folders but the model predicts "
                             f"{num_classes} classes; give --class-names FILE (one name per model class, in "
                             "its output order) to map the folders by name")
        return labels
    names = _class_names(class_names_file)
    if len(names) != num_classes or len(set(names)) != len(names):
        raise InputError(f"--class-names {class_names_file} must list {num_classes} distinct names (one per "
                         f"model class), it lists {len(names)} ({len(set(names))} distinct)")
    index = {name: i for i, name in enumerate(names)}
    unknown = [c for c in folder_classes if c not in index]
    if unknown:
        raise InputError(f"class folder(s) {', '.join(unknown[:5])} of --data {data} are not in "
                         f"--class-names {class_names_file}")
    return torch.tensor([index[c] for c in folder_classes])[labels]


def run(args):
    device = resolve_device(args.device)
    student = load(args.artifact, device=device)
    teacher, teacher_name = _teacher(args)
    if teacher is not None and (teacher.spec.img_size, teacher.spec.in_chans, teacher.spec.num_classes) != \
            (student.spec.img_size, student.spec.in_chans, student.spec.num_classes):
        raise InputError(f"the teacher ({teacher_name}) and {args.artifact} differ in input size, "
                         "channels or classes; they cannot be compared")
    config = preprocess_from_args(args, student)  # the artifact's own (the teacher's) preprocessing
    images, labels, classes = images_from_args(args, config, seed=args.seed)
    labels = labels_for_model(labels, classes, student.spec.num_classes, args.class_names, args.data)
    check_finite(images)
    logits = predict_logits(student, images, args.batch_size, device)
    check_finite(images, logits, model=str(args.artifact))
    preds = logits.argmax(-1)
    result = dict(artifact=str(args.artifact), images=int(images.shape[0]),
                  macs=count_macs(student).total, top1=None, teacher=teacher_name,
                  teacher_macs=None, teacher_top1=None, agreement=None, preprocess=config.to_dict())
    if labels is not None:
        result["top1"] = (preds == labels).float().mean().item()
    if teacher is not None:
        teacher_logits = predict_logits(teacher.to(device), images, args.batch_size, device)
        check_finite(images, teacher_logits, model=f"the teacher {teacher_name}")
        teacher_preds = teacher_logits.argmax(-1)
        result["teacher_macs"] = count_macs(teacher).total
        result["agreement"] = (preds == teacher_preds).float().mean().item()
        if labels is not None:
            result["teacher_top1"] = (teacher_preds == labels).float().mean().item()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.artifact}: {result['images']} images, {result['macs'] / 1e9:.4f} GMACs")
    print(f"  preprocessing: {config.describe()}")
    print(f"  top-1 {result['top1']:.2%}" if labels is not None else
          "  top-1: the folder has no class subfolders (unlabeled)")
    if teacher is not None:
        line = f"  teacher {teacher_name}: {result['teacher_macs'] / 1e9:.4f} GMACs"
        if labels is not None:
            line += f", top-1 {result['teacher_top1']:.2%}"
        print(line)
        print(f"  top-1 agreement with the teacher {result['agreement']:.2%}")
    return 0
