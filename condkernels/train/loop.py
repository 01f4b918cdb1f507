"""The training loop: processes, model, optimiser and schedule, epochs, evaluation, checkpoints.

One process or N under ``torchrun`` (DDP; gloo on the CPU, nccl on CUDA). ``--batch-size`` is the
global batch: each of N ranks takes ``batch_size / N`` of the examples the single-process run would
take at that step (see :mod:`condkernels.train.data`), BatchNorm statistics are those of the global
batch (``--sync-bn``, default on) and the batch-shaping loss sees the global batch, so N processes
follow the single-process run up to floating-point summation order. Only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import build_model, resolve
from .data import augmentation, cifar10, epoch_order, make_batch, synthetic
from .objectives import make_objective
from .report import ProgressBar, metric_columns, plot_metrics, step_columns, write_csv
from .sync_bn import convert_sync_batchnorm

CHECKPOINT_FORMAT = 1


def main(argv=None) -> int:
    """Entry point of ``python -m condkernels.train`` (also under torchrun)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    args = resolve(argv, world_size=world)
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
        started = True
    try:
        Trainer(args, device).fit()
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def lr_factor(args, step: int, steps_per_epoch: int) -> float:
    """Learning rate / initial learning rate at optimiser step ``step`` (0-based)."""
    total = args.epochs * steps_per_epoch
    if args.lr_schedule == "step":
        epoch = step / steps_per_epoch
        return 0.1 ** sum(epoch >= m for m in args.milestones)
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """Trains ``args.model`` as configured by :func:`condkernels.train.config.resolve`."""

    def __init__(self, args, device: torch.device) -> None:
        self.args, self.device = args, device
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0
        group = dist.group.WORLD if self.world > 1 else None

        self.data = (cifar10(args.data) if args.data
                     else synthetic(args.synthetic_size, args.image_size, args.seed))
        self.local_batch = args.batch_size // self.world
        self.steps_per_epoch = len(self.data.train) // args.batch_size
        if self.steps_per_epoch < 1:
            raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(self.data.train)} "
                             "training examples")
        self.pad = 0 if args.no_augment else max(1, args.image_size // 8)

        # every rank builds the same initial model; the model's own noise (gates, dropout) differs per rank
        torch.manual_seed(args.seed)
        model = build_model(args, self.data.num_classes).to(device)
        if self.world > 1 and args.sync_bn:
            # a group of its own: the statistics' all-reduces in the backward must not interleave with
            # DDP's asynchronous gradient all-reduces on one gloo group
            model = convert_sync_batchnorm(model, dist.new_group(list(range(self.world))))
        self.model = model
        self.objective = make_objective(args.kind, model, args, group)
        torch.manual_seed(args.seed + 1_000 * self.rank)
        np.random.seed((args.seed + 1_000 * self.rank) % 2 ** 32)
        random.seed(args.seed + 1_000 * self.rank)

        no_decay = self.objective.no_weight_decay()
        decay = [p for p in model.parameters() if id(p) not in no_decay]
        groups = [{"params": decay, "weight_decay": args.weight_decay}]
        if no_decay:
            groups.append({"params": [p for p in model.parameters() if id(p) in no_decay], "weight_decay": 0.0})
        self.optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum,
                                         nesterov=not args.no_nesterov and args.momentum > 0)
        spe = self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(args, s, spe))
        self.static_macs = self._static_macs()

        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0
        self.global_step = 0
        self.sums = self._zero_sums()
        self.history: list = []
        self.stage: Optional[str] = None
        self.ddp = model
        if args.resume:
            self._load(args.resume)
        self.steps_file = None

    # --- set-up ----------------------------------------------------------------------------------

    def _zero_sums(self) -> dict:
        return {"loss": 0.0, "ce": 0.0, **{t: 0.0 for t in self.objective.terms},
                "correct": 0.0, "count": 0.0, "density": 0.0, "steps": 0, "time": 0.0}

    def _static_macs(self) -> Optional[int]:
        from ..utils import count_macs

        try:
            return count_macs(self.model, (3, self.args.image_size, self.args.image_size))
        except Exception:  # a module the counting rules do not know: the column stays empty
            return None

    def _wrap(self) -> None:
        """(Re)wraps the model in DDP, e.g. after the gates were frozen."""
        if self.world == 1:
            self.ddp = self.model
            return
        self.ddp = nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.objective.find_unused_parameters)

    # --- checkpoints -----------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.args.out, name)

    def _save(self) -> None:
        rng = rng_state(self.device)
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        if not self.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT, "model_name": self.args.model, "kind": self.args.kind,
            "args": {k: v for k, v in vars(self.args).items()},
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "sums": dict(self.sums), "history": list(self.history), "stage": self.stage,
            "world_size": self.world, "batch_size": self.args.batch_size, "seed": self.args.seed,
            "train_size": len(self.data.train), "rng": states,
        }
        os.makedirs(self.args.out, exist_ok=True)
        tmp = self._path("checkpoint.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self._path("checkpoint.pt"))
        if self.steps_file is not None:
            self.steps_file.flush()

    def _load(self, where: str) -> None:
        path = self._path("checkpoint.pt") if where == "auto" else where
        if not os.path.isfile(path):
            raise SystemExit(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location="cpu", weights_only=False)
        for key, mine in (("model_name", self.args.model), ("batch_size", self.args.batch_size),
                          ("seed", self.args.seed), ("train_size", len(self.data.train))):
            if state.get(key) != mine:
                raise SystemExit(f"--resume: the checkpoint has {key}={state.get(key)!r}, this run {mine!r}; "
                                 "resume with the same model, --batch-size, --seed and data")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.sums, self.history = state["global_step"], state["sums"], state["history"]
        if len(state["rng"]) == self.world:
            set_rng_state(state["rng"][self.rank], self.device)
        elif self.is_main:  # the data order and augmentation still continue exactly; the model's noise does not
            print(f"resume: checkpoint written by {len(state['rng'])} processes, now {self.world}: "
                  "random states reseeded", file=sys.stderr)

    # --- training --------------------------------------------------------------------------------

    def _reduce(self, values: list) -> list:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def _open_steps_file(self):
        """steps.csv, keeping the rows up to the resumed step."""
        import csv

        path = self._path("steps.csv")
        columns = step_columns(self.objective.terms)
        kept = []
        if os.path.isfile(path) and self.global_step > 0:
            with open(path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= self.global_step]
        write_csv(path, columns, kept)
        f = open(path, "a", newline="")
        return f, csv.DictWriter(f, fieldnames=columns)

    def train_step(self, index: torch.Tensor, aug, epoch_f: float) -> dict:
        x, y = make_batch(self.data.train, index, self.data, self.args.image_size, self.device, aug, self.pad)
        logits = self.ddp(x)
        loss, terms = self.objective(logits, y, epoch_f)
        ce = nn.functional.cross_entropy(logits.detach(), y)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        density = self.objective.density()
        names = self.objective.terms
        local = ([loss.item() / self.world, ce.item() / self.world]
                 + [float(terms[t].detach()) / self.world for t in names]
                 + [float((logits.argmax(1) == y).sum()), float(y.numel()),
                    (density or 0.0) / self.world])
        red = self._reduce(local)
        out = {"lr": lr, "loss": red[0], "ce": red[1], **{t: red[2 + i] for i, t in enumerate(names)},
               "correct": red[2 + len(names)], "count": red[3 + len(names)],
               "density": red[4 + len(names)] if density is not None else None}
        return out

    @torch.no_grad()
    def evaluate(self) -> dict:
        model = self.model
        model.eval()
        split = self.data.test
        mine = torch.arange(self.rank, len(split), self.world)
        loss_sum = correct = count = density_sum = macs_sum = macs_n = 0.0
        has_density = False
        for start in range(0, len(mine), max(self.local_batch, 1)):
            index = mine[start:start + self.local_batch]
            x, y = make_batch(split, index, self.data, self.args.image_size, self.device)
            logits = model(x)
            n = float(y.numel())
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += float((logits.argmax(1) == y).sum())
            count += n
            density = self.objective.density()
            if density is not None:
                has_density = True
                density_sum += density * n
            macs = self.objective.macs(model, x)
            if macs is not None:
                macs_sum += macs * n
                macs_n += n
        model.train()
        loss_sum, correct, count, density_sum, macs_sum, macs_n = self._reduce(
            [loss_sum, correct, count, density_sum, macs_sum, macs_n])
        macs = macs_sum / macs_n if macs_n else self.static_macs
        return {"test_loss": loss_sum / max(count, 1), "test_acc": correct / max(count, 1),
                "test_density": density_sum / count if has_density and count else None, "macs": macs}

    def _end_epoch(self, epoch: int) -> None:
        s = self.sums
        steps = max(s["steps"], 1)
        row = {"epoch": epoch + 1, "stage": self.stage, "step": self.global_step,
               "lr": self.optimizer.param_groups[0]["lr"],
               "train_loss": s["loss"] / steps, "train_ce": s["ce"] / steps,
               **{f"train_{t}": s[t] / steps for t in self.objective.terms},
               "train_acc": s["correct"] / max(s["count"], 1),
               "train_density": s["density"] / steps if self.objective.density() is not None else None}
        row.update(self.evaluate())
        row["time_s"] = round(s["time"], 3)
        self.history.append(row)
        self.epoch, self.step_in_epoch, self.sums = epoch + 1, 0, self._zero_sums()
        self._save()
        if self.is_main:
            self.write_reports()
            print(f"epoch {epoch + 1}/{self.args.epochs}: loss {row['train_loss']:.4f} "
                  f"train acc {row['train_acc']:.4f} test acc {row['test_acc']:.4f}"
                  + (f" density {row['test_density']:.3f}" if row["test_density"] is not None else ""),
                  file=sys.stderr, flush=True)

    def write_reports(self) -> None:
        terms = self.objective.terms
        write_csv(self._path("metrics.csv"), metric_columns(terms), self.history)
        if self.history:
            plot_metrics(self._path("metrics.png"), self.history, terms, self.args.model)

    def fit(self) -> None:
        args = self.args
        if self.is_main:
            os.makedirs(args.out, exist_ok=True)
            self.steps_file, writer = self._open_steps_file()
        self.model.train()
        try:
            for epoch in range(self.epoch, args.epochs):
                if args.max_steps is not None and self.global_step >= args.max_steps:
                    break
                stage = self.objective.stage(epoch)
                if stage != self.stage:
                    self.objective.enter_stage(stage)
                    self.stage = stage
                    self._wrap()
                order = torch.tensor(epoch_order(len(self.data.train), epoch, args.seed, self.rank, self.world))
                aug = augmentation(len(self.data.train), epoch, args.seed, self.pad) if self.pad else None
                bar = ProgressBar(self.steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}",
                                  self.is_main and not args.no_progress, initial=self.step_in_epoch)
                stopped = False
                for step in range(self.step_in_epoch, self.steps_per_epoch):
                    if args.max_steps is not None and self.global_step >= args.max_steps:
                        stopped = True
                        break
                    began = time.perf_counter()
                    index = order[step * self.local_batch:(step + 1) * self.local_batch]
                    epoch_f = self.global_step / self.steps_per_epoch
                    out = self.train_step(index, aug, epoch_f)
                    self.global_step += 1
                    self.step_in_epoch = step + 1
                    s = self.sums
                    for key in ("loss", "ce", *self.objective.terms, "correct", "count"):
                        s[key] += out[key]
                    s["density"] += out["density"] or 0.0
                    s["steps"] += 1
                    s["time"] += time.perf_counter() - began
                    if self.is_main:
                        writer.writerow({"step": self.global_step, "epoch": epoch_f, "lr": out["lr"],
                                         "loss": out["loss"], "ce": out["ce"],
                                         **{t: out[t] for t in self.objective.terms}})
                    bar.update(1, loss=s["loss"] / s["steps"], acc=s["correct"] / max(s["count"], 1), lr=out["lr"])
                bar.close()
                if stopped:
                    break
                self._end_epoch(epoch)
            else:
                return
            self._save()  # stopped by --max-steps: resume continues from this step
        finally:
            if self.steps_file is not None:
                self.steps_file.close()
                self.steps_file = None
