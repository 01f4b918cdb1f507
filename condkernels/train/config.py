"""Command line of ``python -m condkernels.train``: flags, the papers' presets, and their checks.

Each network kind trains with the setup of its paper (all SGD with Nesterov momentum 0.9):

- ``plain`` / ``cc`` (CondConv): the paper trains on ImageNet with the settings of Kornblith et al.
  (2018), which it does not restate; its one stated schedule (COCO) is a linear warm-up followed by
  cosine decay, so that is what these use, with He et al.'s CIFAR settings (lr 0.1, batch 128,
  weight decay 1e-4).
- ``bas`` (batch-shaping, CIFAR-10): lr 0.1 divided by 10 at 60 %, 75 % and 90 % of training
  (epochs 300, 375, 450 of 500), batch 256, weight decay 5e-4 and none on the gating modules;
  batch-shaping lambda 0.75 annealed to 0 over the first 20 % (100 of 500 epochs), then the L0 weight
  warms up from 20 % to 60 % (epochs 100 to 300).
- ``deepmoe`` (CIFAR): lr 0.1 (0.01 for VGG16) divided by 10 at 150/350 and 250/350 of training,
  joint training for 270/350 of the epochs, then 80/350 fine-tuning with frozen gates (lambda = mu
  = 0); batch 128 and weight decay 1e-4 as He et al., which the paper follows.

Every epoch count is a fraction of ``--epochs``, so a shorter run keeps the schedules' shape; each
value can be overridden by its flag.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Optional

KINDS = ("plain", "cc", "bas", "deepmoe")


@dataclass(frozen=True)
class Preset:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    schedule: str  # "cosine" or "step"
    milestones: tuple = ()  # fractions of --epochs where the lr is divided by 10 ("step")
    warmup: float = 0.0  # fraction of --epochs of linear warm-up ("cosine")
    extra: dict = field(default_factory=dict)


PRESETS = {
    "plain": Preset(200, 128, 0.1, 1e-4, "cosine", warmup=0.025),
    "cc": Preset(200, 128, 0.1, 1e-4, "cosine", warmup=0.025),
    "bas": Preset(500, 256, 0.1, 5e-4, "step", milestones=(0.6, 0.75, 0.9),
                  extra=dict(bs_anneal=0.2, l0_start=0.2, l0_full=0.6)),
    "deepmoe": Preset(350, 128, 0.1, 1e-4, "step", milestones=(150 / 350, 250 / 350),
                      extra=dict(finetune=80 / 350)),
}


def model_kind(name: str) -> str:
    """The training recipe of a builder in :mod:`condkernels.models`, from its name."""
    if name.startswith("deepmoe_"):
        return "deepmoe"
    if name.endswith("_bas"):
        return "bas"
    if name.startswith("cc_"):
        return "cc"
    return "plain"


def model_builders() -> dict:
    """Every public builder function of :mod:`condkernels.models` (lower-case callables)."""
    from .. import models

    return {
        name: fn for name, fn in vars(models).items()
        if not name.startswith("_") and name[0].islower() and inspect.isfunction(fn)
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m condkernels.train",
        description="Train a condkernels network on CIFAR-10 or on a generated data set, with the "
                    "training setup of its paper. Multi-process: torchrun --nproc-per-node N -m condkernels.train ...",
    )
    a = p.add_argument
    a("--model", required=True,
      help="a builder of condkernels.models, e.g. cc_mobilenet_v1, resnet20_bas, deepmoe_resnet56")
    a("--num-experts", type=int, help="experts per CondConv layer (builders that take num_experts)")
    a("--width-mult", type=float, help="width multiplier (builders that take width_mult)")
    a("--wide", action="store_true", help="DeepMoE: the wide variant (2x channels)")
    a("--model-arg", action="append", default=[], metavar="KEY=VALUE",
      help="any other keyword of the builder, e.g. cond_begin=13 or router_sharing=single (repeatable; "
           "values are read as Python literals, else kept as strings)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", metavar="DIR",
                      help="CIFAR-10 root (torchvision layout: DIR/cifar-10-batches-py), never downloaded")
    data.add_argument("--synthetic", action="store_true", help="a small generated, learnable data set (no files)")
    a("--synthetic-size", type=int, default=512, help="generated training examples (test: half as many); default 512")
    a("--epochs", type=int, help="training epochs (default: the paper's, by model kind)")
    a("--batch-size", type=int, help="global batch size over all processes (default: the paper's)")
    a("--lr", type=float, help="initial learning rate (default: the paper's)")
    a("--weight-decay", type=float, help="weight decay (default: the paper's)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    a("--no-nesterov", action="store_true", help="plain momentum instead of Nesterov's")
    a("--lr-schedule", choices=("cosine", "step"), help="default: the paper's")
    a("--milestones", type=_float_list, help="step schedule: epochs where the lr is divided by 10, comma separated")
    a("--warmup-epochs", type=float, help="cosine schedule: epochs of linear warm-up")
    a("--image-size", type=int, default=32, help="input side in pixels (CIFAR-10 is resized when not 32)")
    a("--no-augment", action="store_true", help="no random crop and flip")
    a("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
      help="BatchNorm statistics over the global batch when multi-process (default on)")
    # batch-shaping networks
    a("--bs-lambda", type=float, default=0.75, help="BAS: initial batch-shaping weight (0.75)")
    a("--bs-anneal-epochs", type=float, help="BAS: epochs over which it anneals to 0 (default 20%% of --epochs)")
    a("--l0-gamma", type=float, help="BAS: final L0 weight (default: condkernels.nn.GateLosses')")
    a("--l0-start-epoch", type=float, help="BAS: the L0 warm-up starts (default 20%% of --epochs)")
    a("--l0-full-epoch", type=float, help="BAS: the L0 weight reaches --l0-gamma (default 60%% of --epochs)")
    # DeepMoE networks
    a("--moe-lambda", type=float, help="DeepMoE: gate L1 weight lambda (default: condkernels.nn.DeepMoELosses')")
    a("--moe-mu", type=float,
      help="DeepMoE: embedding cross-entropy weight mu (default: condkernels.nn.DeepMoELosses')")
    a("--finetune-epochs", type=int, help="DeepMoE: final epochs with frozen gates (default 80/350 of --epochs)")
    # run control
    a("--out", default="runs/train", metavar="DIR", help="where checkpoint.pt, metrics.csv, steps.csv, metrics.png go")
    a("--resume", nargs="?", const="auto", metavar="CKPT", help="resume from CKPT (default: DIR/checkpoint.pt)")
    a("--seed", type=int, default=0)
    a("--max-steps", type=int, help="stop (with a checkpoint) after this many optimiser steps in all")
    a("--device", help="cpu or cuda (default: cuda when available)")
    a("--threads", type=int, help="torch CPU threads per process")
    a("--no-progress", action="store_true", help="no progress bar")
    return p


def _float_list(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _literal(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def resolve(argv=None, world_size: int = 1) -> argparse.Namespace:
    """Parses ``argv``, fills the kind's preset and checks every value. Errors exit through
    ``parser.error`` (status 2) with a message naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    err = parser.error

    builders = model_builders()
    if args.model not in builders:
        err(f"--model: unknown model {args.model!r}; choose from {', '.join(sorted(builders))}")
    args.kind = model_kind(args.model)
    params = inspect.signature(builders[args.model]).parameters
    for flag, name, value in (("--num-experts", "num_experts", args.num_experts),
                              ("--width-mult", "width_mult", args.width_mult),
                              ("--wide", "wide", args.wide or None)):
        if value is not None and name not in params:
            err(f"{flag}: model {args.model} does not take {name}")
    args.model_kwargs = {}
    for item in args.model_arg:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            err(f"--model-arg: expected KEY=VALUE, got {item!r}")
        if key not in params or key in ("num_classes", "num_experts", "width_mult", "wide"):
            err(f"--model-arg: model {args.model} takes no keyword {key!r} here "
                f"(its keywords: {', '.join(k for k in params if k not in ('num_classes',))})")
        args.model_kwargs[key] = _literal(value)
    if args.num_experts is not None and args.num_experts < 1:
        err(f"--num-experts must be >= 1, got {args.num_experts}")
    if args.width_mult is not None and not (args.width_mult > 0 and math.isfinite(args.width_mult)):
        err(f"--width-mult must be positive, got {args.width_mult}")
    if not args.data and not args.synthetic:
        err("one of --data DIR (CIFAR-10) or --synthetic is required")
    if args.data:
        batches = os.path.join(args.data, "cifar-10-batches-py")
        if not os.path.isdir(batches):
            err(f"--data: no CIFAR-10 at {batches} (the data set is never downloaded; put the "
                "python version of CIFAR-10 there)")
    if args.synthetic and args.synthetic_size < 2:
        err(f"--synthetic-size must be >= 2, got {args.synthetic_size}")

    preset = PRESETS[args.kind]
    args.epochs = preset.epochs if args.epochs is None else args.epochs
    args.batch_size = preset.batch_size if args.batch_size is None else args.batch_size
    if args.lr is None:
        args.lr = 0.01 if args.kind == "deepmoe" and "vgg" in args.model else preset.lr
    args.weight_decay = preset.weight_decay if args.weight_decay is None else args.weight_decay
    args.lr_schedule = args.lr_schedule or preset.schedule
    if args.epochs < 1:
        err(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        err(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.batch_size % world_size:
        err(f"--batch-size {args.batch_size} (global) must be divisible by the {world_size} processes")
    for flag, v in (("--lr", args.lr), ("--weight-decay", args.weight_decay), ("--momentum", args.momentum)):
        if not (v >= 0 and math.isfinite(v)):
            err(f"{flag} must be a non-negative number, got {v}")
    if args.lr == 0:
        err("--lr must be positive, got 0")
    if args.image_size < 8:
        err(f"--image-size must be >= 8, got {args.image_size}")
    if args.max_steps is not None and args.max_steps < 1:
        err(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.threads is not None and args.threads < 1:
        err(f"--threads must be >= 1, got {args.threads}")
    if args.device not in (None, "cpu", "cuda"):
        err(f"--device must be cpu or cuda, got {args.device!r}")

    e = args.epochs
    if args.milestones is None:
        args.milestones = tuple(round(f * e, 6) for f in preset.milestones) or (0.6 * e, 0.75 * e, 0.9 * e)
    if any(not (0 < m <= e) for m in args.milestones):
        err(f"--milestones must lie in (0, --epochs={e}], got {args.milestones}")
    if args.warmup_epochs is None:
        args.warmup_epochs = preset.warmup * e if args.lr_schedule == "cosine" else 0.0
    if not (0 <= args.warmup_epochs < e):
        err(f"--warmup-epochs must lie in [0, --epochs={e}), got {args.warmup_epochs}")

    bas = PRESETS["bas"].extra
    args.bs_anneal_epochs = bas["bs_anneal"] * e if args.bs_anneal_epochs is None else args.bs_anneal_epochs
    args.l0_start_epoch = bas["l0_start"] * e if args.l0_start_epoch is None else args.l0_start_epoch
    args.l0_full_epoch = bas["l0_full"] * e if args.l0_full_epoch is None else args.l0_full_epoch
    if not args.bs_lambda >= 0:
        err(f"--bs-lambda must be non-negative, got {args.bs_lambda}")
    if not args.bs_anneal_epochs > 0:
        err(f"--bs-anneal-epochs must be positive, got {args.bs_anneal_epochs}")
    if not 0 <= args.l0_start_epoch <= args.l0_full_epoch:
        err(f"--l0-start-epoch ({args.l0_start_epoch}) and --l0-full-epoch ({args.l0_full_epoch}) "
            "must satisfy 0 <= start <= full")
    for flag, v in (("--l0-gamma", args.l0_gamma), ("--moe-lambda", args.moe_lambda), ("--moe-mu", args.moe_mu)):
        if v is not None and not (v >= 0 and math.isfinite(v)):
            err(f"{flag} must be a non-negative number, got {v}")
    if args.finetune_epochs is None:
        args.finetune_epochs = int(round(PRESETS["deepmoe"].extra["finetune"] * e)) if args.kind == "deepmoe" else 0
    if not 0 <= args.finetune_epochs < e:
        err(f"--finetune-epochs must lie in [0, --epochs={e}), got {args.finetune_epochs}")
    if args.finetune_epochs and args.kind != "deepmoe":
        err(f"--finetune-epochs: only DeepMoE networks have a fine-tuning stage, not {args.model}")
    return args


def build_model(args: argparse.Namespace, num_classes: int):
    """Calls the builder with the flags it takes."""
    builder = model_builders()[args.model]
    params = inspect.signature(builder).parameters
    kwargs = {"num_classes": num_classes} if "num_classes" in params else {}
    if args.num_experts is not None:
        kwargs["num_experts"] = args.num_experts
    if args.width_mult is not None:
        kwargs["width_mult"] = args.width_mult
    if args.wide:
        kwargs["wide"] = True
    kwargs.update(args.model_kwargs)
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--model {args.model}: {e}") from None
