"""What a run shows and writes: a progress bar on stderr, metrics.csv, steps.csv and metrics.png."""

from __future__ import annotations

import csv
import math
import os
import sys
import time


class ProgressBar:
    """tqdm when it is installed, else a one-line bar on stderr (redrawn in place on a terminal,
    a line every 10 % otherwise)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0) -> None:
        self.total, self.desc, self.enabled, self.n = total, desc, enabled, initial
        self.start = time.monotonic()
        self._tqdm = None
        self._last_decile = -1
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._tqdm = tqdm(total=total, desc=desc, initial=initial, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1, **info) -> None:
        self.n += n
        if not self.enabled:
            return
        text = " ".join(f"{k}={_fmt(v)}" for k, v in info.items())
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(text, refresh=False)
            self._tqdm.update(n)
            return
        frac = self.n / max(self.total, 1)
        elapsed = time.monotonic() - self.start
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        line = f"{self.desc} [{bar}] {self.n}/{self.total} {elapsed:.0f}s {text}"
        if sys.stderr.isatty():
            sys.stderr.write("\r" + line[:150].ljust(150))
            sys.stderr.flush()
        elif int(frac * 10) != self._last_decile or self.n == self.total:
            self._last_decile = int(frac * 10)
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
        elif sys.stderr.isatty():
            sys.stderr.write("\n")
            sys.stderr.flush()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def metric_columns(terms: tuple) -> list:
    """Columns of metrics.csv: one row per epoch."""
    return (["epoch", "stage", "step", "lr", "train_loss", "train_ce"] + [f"train_{t}" for t in terms]
            + ["train_acc", "train_density", "test_loss", "test_acc", "test_density", "macs", "time_s"])


def step_columns(terms: tuple) -> list:
    """Columns of steps.csv: one row per optimiser step (losses averaged over the global batch)."""
    return ["step", "epoch", "lr", "loss", "ce"] + list(terms)


def write_csv(path: str, columns: list, rows: list) -> None:
    """Writes all ``rows`` (dicts) atomically: a resumed run rewrites the whole file."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    os.replace(tmp, path)


def plot_metrics(path: str, rows: list, terms: tuple, title: str) -> None:
    """metrics.png: losses, accuracies, gate density and multiply-adds against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]

    def series(key):
        return [math.nan if r.get(key) is None else float(r[key]) for r in rows]

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax = axes[0][0]
    for key in ["train_loss", "train_ce", "test_loss"] + [f"train_{t}" for t in terms]:
        ax.plot(epochs, series(key), marker=".", label=key)
    ax.set_title("loss")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    for key in ("train_acc", "test_acc"):
        ax.plot(epochs, series(key), marker=".", label=key)
    ax.set_title("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax = axes[1][0]
    for key in ("train_density", "test_density"):
        ax.plot(epochs, series(key), marker=".", label=key)
    ax.set_title("mean gate density (open fraction)")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    ax.plot(epochs, [m / 1e6 for m in series("macs")], marker=".")
    ax.set_title("multiply-adds per test image (M)")
    for row in axes:
        for a in row:
            a.set_xlabel("epoch")
            a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
