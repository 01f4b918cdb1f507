"""``python -m condkernels.bench``: the benchmark runner.

    python -m condkernels.bench                       # quick default suite, CPU
    python -m condkernels.bench --full --suite condconv --device cuda --dtype bfloat16

Each suite times condkernels against its competitors and the machine's floor, prints a table,
writes JSON/CSV rows and plots to ``--out`` and regenerates ``docs/benchmarks.md`` from all rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time

import torch

from . import machine, report

SUITES = ("condconv", "gated", "batch_shaping", "models")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class Context:
    """What a suite needs to know about this run."""

    device: str
    dtype: torch.dtype
    full: bool
    filter: str
    repeats: int
    min_run_time: float

    def selected(self, label: str) -> bool:
        return self.filter.lower() in label.lower()


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, label: str):
        self.total, self.done, self.label, self.start = max(total, 1), 0, label, time.time()

    def step(self, what: str) -> None:
        self.done += 1
        width = 30
        filled = width * self.done // self.total
        elapsed = time.time() - self.start
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{elapsed:5.0f}s {what[:50]:<50}"
        )
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m condkernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", action="append", choices=SUITES, help="suites to run (default: all available)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--filter", default="", help="run only cases whose label contains this text")
    p.add_argument("--full", action="store_true", help="all shapes (default: the quick suite)")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all competitors; the median is kept")
    p.add_argument("--min-run-time", type=float, default=0.1, help="seconds per measurement block")
    p.add_argument("--out", default="docs/results", help="folder for rows and plots")
    p.add_argument("--docs", default="docs/benchmarks.md", help="report regenerated from every rows file in --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    ctx = Context(args.device, DTYPES[args.dtype], args.full, args.filter, args.repeats, args.min_run_time)
    info = machine.describe(args.device)
    print(f"# {info['device']}, {info['threads']} threads, torch {info['torch']}, {info['date']}")
    print(
        f"# floors: streaming read {machine.stream_bandwidth(args.device) / 1e9:.1f} GB/s, "
        f"fp32 GEMM {machine.gemm_throughput(args.device) / 1e9:.0f} GFLOP/s"
    )
    for name in args.suite or SUITES:
        try:
            suite = importlib.import_module(f".suites.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(f"suites.{name}"):
                print(f"# suite {name}: not available yet, skipped")
                continue
            raise
        cases = suite.cases(ctx)
        progress = Progress(len(cases), name)
        results = []
        for case in cases:
            results.extend(case.run(ctx))
            progress.step(case.label)
        if not results:
            continue
        rows = report.to_rows(results, info)
        print(f"\n## {name}\n")
        report.print_table(rows)
        stem = f"{name}_{args.device}_{args.dtype}" + ("_full" if args.full else "")
        paths = report.write_rows(rows, args.out, stem)
        if hasattr(suite, "plot"):
            paths += suite.plot(results, os.path.join(args.out, stem))
        print("\n# wrote " + ", ".join(paths))
    if args.docs:
        print(f"# wrote {report.regenerate_docs(args.out, args.docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
