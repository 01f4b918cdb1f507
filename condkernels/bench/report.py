"""Benchmark results: one ``Result`` per (case, mode); written as JSON/CSV rows, a terminal table, plots,
and ``docs/benchmarks.md`` regenerated from every stored rows file."""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
from typing import Optional


@dataclasses.dataclass
class Result:
    suite: str
    case: str  # the layer or network, e.g. "pointwise 512->512 @14x14"
    mode: str  # "inference" or "training" (forward + backward)
    params: dict  # B, E, density, ... (what varies inside a case)
    times: dict  # method -> median seconds; None where a competitor was skipped as too slow
    ours: str  # the method whose figures the targets judge
    floor: Optional[float] = None  # seconds that cannot be avoided on this machine
    targets: list = dataclasses.field(default_factory=list)  # [(description, met)]

    def ratio(self, method: str, to: str) -> Optional[float]:
        a, b = self.times.get(method), self.times.get(to)
        return a / b if a and b else None


def to_rows(results: list[Result], machine: dict) -> list[dict]:
    """One flat row per (result, method): what JSON/CSV hold and plots read back."""
    rows = []
    for r in results:
        for method, t in r.times.items():
            rows.append(
                {
                    **machine,
                    "suite": r.suite,
                    "case": r.case,
                    "mode": r.mode,
                    **{f"param_{k}": v for k, v in r.params.items()},
                    "method": method,
                    "ours": method == r.ours,
                    "time_ms": None if t is None else t * 1e3,
                    "floor_ms": None if r.floor is None else r.floor * 1e3,
                    "targets": "; ".join(f"{d}: {'met' if ok else 'MISSED'}" for d, ok in r.targets),
                }
            )
    return rows


def write_rows(rows: list[dict], out_dir: str, stem: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{stem}.json")
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    with open(json_path, "w") as f:
        json.dump(rows, f, indent=1)
    fields = sorted({k for row in rows for k in row}, key=lambda k: (k not in rows[0], k)) if rows else []
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return [json_path, csv_path]


def _fmt_ms(t: Optional[float]) -> str:
    return "—" if t is None else f"{t:.3g}"


def _group(rows: list[dict]) -> dict:
    """(suite, case, mode, params) -> {method: row}, in first-seen order."""
    groups: dict = {}
    for row in rows:
        params = tuple((k, row[k]) for k in sorted(row) if k.startswith("param_"))
        groups.setdefault((row["suite"], row["case"], row["mode"], params), {})[row["method"]] = row
    return groups


def markdown_table(rows: list[dict]) -> str:
    """Times in ms per method, the ratio of ours to the floor, and the targets met or missed."""
    groups = _group(rows)
    methods: list[str] = []
    for by_method in groups.values():
        methods += [m for m in by_method if m not in methods]
    head = ["case", "mode", "params", *methods, "floor", "ours / floor", "targets"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (_, case, mode, params), by_method in groups.items():
        ours = next((r for r in by_method.values() if r["ours"]), None)
        floor = next(iter(by_method.values()))["floor_ms"]
        ratio = ours["time_ms"] / floor if ours and floor and ours["time_ms"] else None
        cells = [
            case,
            mode,
            ", ".join(f"{k[6:]}={v}" for k, v in params),
            *(_fmt_ms(by_method[m]["time_ms"]) if m in by_method else "" for m in methods),
            _fmt_ms(floor),
            "—" if ratio is None else f"{ratio:.2f}×",
            next(iter(by_method.values()))["targets"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(rows: list[dict]) -> None:
    print(markdown_table(rows))


def regenerate_docs(results_dir: str, docs_path: str) -> str:
    """Rebuilds ``docs/benchmarks.md`` from every rows file under ``results_dir``."""
    sections = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            rows = json.load(f)
        if not rows:
            continue
        first = rows[0]
        plots = sorted(glob.glob(os.path.splitext(path)[0] + "*.png"))
        missed = sum("MISSED" in r["targets"] for r in rows if r["ours"])
        met = sum("met" in r["targets"] and "MISSED" not in r["targets"] for r in rows if r["ours"])
        sections.append(
            "\n".join(
                [
                    f"## {first['suite']} — {first['device']}",
                    "",
                    f"{first['date']}, torch {first['torch']}, {first['threads']} threads; times in ms "
                    f"(median). Rows: `{os.path.relpath(path, os.path.dirname(docs_path))}`. "
                    f"Cases meeting every target: {met}; missing one or more: {missed}.",
                    "",
                    markdown_table(rows),
                    "",
                    *[f"![{os.path.basename(p)}]({os.path.relpath(p, os.path.dirname(docs_path))})" for p in plots],
                ]
            )
        )
    text = "\n\n".join(
        [
            "# Benchmarks",
            "Generated by `python -m condkernels.bench` from the rows in `docs/results/`; do not edit by hand. "
            "Each table compares condkernels with the competitors named in its columns, on the machine named "
            "in its heading; the floor is the time the machine cannot go below (compute at its measured GEMM "
            "throughput or bytes at its measured streaming bandwidth, whichever is larger, as each suite defines).",
            *sections,
        ]
    )
    with open(docs_path, "w") as f:
        f.write(text + "\n")
    return docs_path
