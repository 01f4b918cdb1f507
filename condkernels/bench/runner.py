"""``python -m condkernels.bench``: times the suites' cases against the machine's floors, prints a
table, writes the rows (JSON, CSV) and the report (docs/benchmarks.md, plots)."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time
from pathlib import Path

import torch

from . import SUITES, report, results
from .cases import Case, Config, is_ours
from .timing import Floors, describe_run, measure_floors, synchronize, time_interleaved

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m condkernels.bench", description=__doc__)
    p.add_argument("--suite", action="append", choices=list(SUITES),
                   help="a suite to run (repeat for several; default: all)")
    p.add_argument("--full", action="store_true", help="every shape (default: a quick subset, a few minutes)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU (default: torch's)")
    p.add_argument("--filter", action="append", default=[], metavar="SUBSTRING",
                   help="only the cases whose name contains it (repeat: every one of them)")
    p.add_argument("--paths", action="store_true",
                   help="also time the CPU kernels with each of their paths forced (cond_conv2d's mixing "
                        "tiles and fused small-plane kernel, gated_conv2d's compacted path): the studies "
                        "behind their thresholds; and cond_conv2d and the batch-shaping loss with the "
                        "vector kernels capped below the CPU's instruction set (isa=avx2, isa=none)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case (default 5, 9 with --full)")
    p.add_argument("--out", default="docs", help="where results/, figures/ and benchmarks.md go (default docs/)")
    p.add_argument("--no-report", action="store_true", help="print the table only; write nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from OUT/results/benchmarks.json")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    return p.parse_args(argv)


class Progress:
    """A one-line progress bar on stderr (one line per step where stderr is not a terminal)."""

    def __init__(self, total: int, width: int = 28):
        self.total, self.width, self.done, self.start = total, width, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def show(self, label: str) -> None:
        filled = self.width * self.done // max(1, self.total)
        elapsed = time.perf_counter() - self.start
        text = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {elapsed:5.0f}s {label}"
        if self.tty:
            sys.stderr.write("\r\033[K" + text[:150])
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


@contextlib.contextmanager
def num_threads(n):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]


def check_outputs(outputs: dict, names: tuple, tolerance: float = 2e-3) -> dict[str, str]:
    """Each output against the first of ``names`` present: 'ok' or how far it is (the largest
    difference relative to the largest magnitude of the first)."""
    present = [n for n in names if n in outputs]
    if len(present) < 2:
        return {}
    flat = lambda o: torch.cat([t.reshape(-1).double().cpu() for t in (o if isinstance(o, (tuple, list)) else [o])
                                if t is not None])  # noqa: E731
    ref = flat(outputs[present[0]])
    scale = ref.abs().max().item() or 1.0
    out = {}
    for n in present:
        got = flat(outputs[n])
        err = (got - ref).abs().max().item() / scale if got.shape == ref.shape else float("inf")
        out[n] = "ok" if err <= tolerance else f"differs from {present[0]} by {err:.1e} (relative)"
    return out


def _seconds(call, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def sig(v, digits: int = 5):
    """``v`` to ``digits`` significant digits (rows stay readable in the CSV)."""
    return None if v is None else float(f"{v:.{digits}g}")


def run_case(case: Case, cfg: Config, floors: Floors, common: dict) -> list[dict]:
    dtype = case.dtype or cfg.dtype
    notes, checks, live, outputs = {}, {}, {}, {}
    with num_threads(case.threads) as threads:
        try:
            calls = case.setup()
        except Exception as e:  # noqa: BLE001  (a case that cannot be built becomes a row that says why)
            calls, notes["*"] = {}, first_line(e)
        first_s = None
        for name, call in calls.items():
            hint = case.hints.get(name)
            if cfg.skip_s is not None and hint is not None and first_s is not None and hint * first_s > cfg.skip_s:
                notes[name] = f"skipped: expected ~{hint * first_s:.2f} s per call"
                continue
            try:
                synchronize(cfg.device)
                start = time.perf_counter()
                out = call()
                synchronize(cfg.device)
                elapsed = time.perf_counter() - start
            except Exception as e:  # noqa: BLE001
                notes[name] = first_line(e)
                continue
            if first_s is None:  # the yardstick of the hints: the faster of two warm calls of the first method
                first_s = min(_seconds(call, cfg.device) for _ in range(2))
            live[name] = call
            if name in case.compare:
                outputs[name] = out
        checks = check_outputs(outputs, case.compare, 2e-3 if dtype in (torch.float32, torch.float64) else 5e-2)
        outputs.clear()
        timings = time_interleaved(live, cfg.rounds, cfg.device, cfg.round_s) if live else {}
    floor_s, bound = floors.of(case.macs, case.nbytes)
    rows = []
    for name in list(calls) or ["*"]:
        t = timings.get(name)
        rows.append(dict(
            suite=case.suite, op=case.op, case=case.name, mode=case.mode, method=name,
            time_ms=None if t is None else sig(t.median_s * 1e3), best_ms=None if t is None else sig(t.best_s * 1e3),
            floor_ms=sig(floor_s * 1e3), bound=bound,
            vs_floor=None if t is None or not floor_s else sig(t.median_s / floor_s, 4),
            macs=case.macs, bytes=case.nbytes, check=checks.get(name, ""), note=notes.get(name, notes.get("*", "")),
            **case.params, **common, threads=threads, dtype=str(dtype).replace("torch.", ""),
        ))
    return rows


def format_case(rows: list[dict]) -> str:
    r0 = rows[0]
    parts = []
    for r in rows:
        mark = "*" if is_ours(r["method"]) else ""
        if r["time_ms"] is not None:
            value = f"{r['time_ms']:.3g}"
        else:
            value = "skip" if r["note"].startswith("skipped") else "err"
        bad = "!" if r["check"] not in ("", "ok") else ""
        parts.append(f"{mark}{r['method']}={value}{bad}")
    ratios = [r["vs_floor"] for r in rows if is_ours(r["method"]) and r["vs_floor"] is not None]
    tail = f"  floor {r0['floor_ms']:.3g} ({r0['bound']})" + (f"  ours/floor {min(ratios):.2f}" if ratios else "")
    return f"{r0['case']}\n    ms: " + "  ".join(parts) + tail


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        print(f"wrote {report.generate(out)}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no GPU is visible", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (9 if args.full else 5)
    cfg = Config(device=device, dtype=DTYPES[args.dtype], full=args.full, rounds=rounds,
                 round_s=0.05 if args.full else 0.02, skip_s=3.0 if args.full else 0.25, paths=args.paths)
    suites = args.suite or list(SUITES)
    cases = [c for s in suites for c in SUITES[s].cases(cfg) if all(f in c.name for f in args.filter)]
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    if not cases:
        print(f"no case matches --filter {args.filter!r}", file=sys.stderr)
        return 1
    progress = Progress(len(cases) + 1)
    progress.show("floors: streaming bandwidth and GEMM throughput")
    torch.manual_seed(0)
    floors = measure_floors(device, cfg.dtype, rounds)
    progress.done += 1
    meta = describe_run(device, cfg.dtype, floors, args.full, rounds)
    meta["command"] = "python -m condkernels.bench " + " ".join(shlex.quote(a) for a in argv)
    progress.clear()
    print(f"{meta['device_name']}, {meta['threads']} threads: bandwidth {meta['bandwidth_gb_s']} GB/s, "
          f"GEMM {meta['gemm_gmac_s']} GMAC/s ({meta['dtype']})", flush=True)
    common = {k: meta[k] for k in ("date", "device", "device_name", "torch", "condkernels", "bandwidth_gb_s",
                                   "gemm_gmac_s")}
    old = None if args.no_report else results.load(out)
    rows = []
    for case in cases:
        progress.show(case.name)
        case_rows = run_case(case, cfg, floors, common)
        rows += case_rows
        progress.done += 1
        progress.clear()
        print(format_case(case_rows), flush=True)
        if old is not None:
            # After every case, so that a run cut short (a time limit, a lost machine) keeps its rows:
            # `--report-only` makes the report from them.
            json_path, csv_path = results.save(out, results.merge(old, [meta], rows))
    progress.clear()
    if args.no_report:
        return 0
    md = report.generate(out)
    print(f"wrote {json_path}, {csv_path}, {md} and {out / report.FIGURES}/")
    return 0
