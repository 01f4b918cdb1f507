"""Result rows: one per (case, method), written as JSON and CSV and read back for the report."""

from __future__ import annotations

import csv
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

JSON_NAME = "results/benchmarks.json"
CSV_NAME = "results/benchmarks.csv"
# A row is identified by these fields; a new run replaces the rows of the cases it measured again.
KEY = ("device", "suite", "case", "method")


@dataclass
class Target:
    """One target of an op, judged on the rows: met is None where it could not be judged."""

    op: str
    text: str
    met: Optional[bool]
    detail: str


def load(out: Path) -> dict:
    path = Path(out) / JSON_NAME
    if not path.exists():
        return {"runs": [], "rows": []}
    with open(path) as f:
        return json.load(f)


def merge(old: dict, runs: list[dict], rows: list[dict]) -> dict:
    """The old results with every case measured now replaced by its new rows."""
    measured = {(r["device"], r["suite"], r["case"]) for r in rows}
    kept = [r for r in old["rows"] if (r["device"], r["suite"], r["case"]) not in measured]
    merged = kept + rows
    used = {(r["date"], r["device"]) for r in merged}
    all_runs = [m for m in old["runs"] + runs if (m["date"], m["device"]) in used]
    unique = list(OrderedDict(((m["date"], m["device"]), m) for m in all_runs).values())
    return {"runs": unique, "rows": merged}


def save(out: Path, data: dict) -> tuple[Path, Path]:
    """Writes both files whole or not at all (each written beside itself, then renamed over it): a run
    stopped while saving leaves the previous rows."""
    out = Path(out)
    json_path, csv_path = out / JSON_NAME, out / CSV_NAME
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with open(json_path.with_suffix(".json.tmp"), "w") as f:
        json.dump(data, f, indent=1)
    fields: list[str] = []
    for r in data["rows"]:
        fields += [k for k in r if k not in fields]
    with open(csv_path.with_suffix(".csv.tmp"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(data["rows"])
    os.replace(json_path.with_suffix(".json.tmp"), json_path)
    os.replace(csv_path.with_suffix(".csv.tmp"), csv_path)
    return json_path, csv_path


# --- helpers for the suites' report sections -----------------------------------------------------


def cases_of(rows: list[dict]) -> "OrderedDict[str, dict[str, dict]]":
    """Rows grouped by case (in run order), each a {method: row}."""
    out: OrderedDict = OrderedDict()
    for r in rows:
        out.setdefault(r["case"], {})[r["method"]] = r
    return out


def ms(row: Optional[dict]) -> Optional[float]:
    return None if row is None or row.get("time_ms") is None else row["time_ms"]


def fmt_ms(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3g}" if v < 10 else f"{v:.1f}"


def fmt_ratio(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.2f}"


def yes_no(met: Optional[bool]) -> str:
    return "n/a" if met is None else ("yes" if met else "**no**")


def cell(row: Optional[dict]) -> str:
    """A method's time in a table, or why there is none."""
    if row is None:
        return "–"
    if row.get("time_ms") is None:
        return "skip" if row.get("note", "").startswith("skipped") else "error"
    text = fmt_ms(row["time_ms"])
    return text + (" ✗" if row.get("check", "ok") not in ("ok", "") else "")


def method_order(methods) -> list[str]:
    """Report columns: the competitors, then condkernels' backends ("*" marks a case that could not
    be built, which has no method column)."""
    methods = {m for m in methods if m != "*"}
    fixed = ["static", "naive", "reference", "grouped", "loop"]
    first = [m for m in fixed if m in methods]
    return first + sorted(m for m in methods if m not in fixed)


def count(targets: list[bool]) -> str:
    """How many rows meet a target, e.g. "7 of 12 rows met"."""
    return f"{sum(targets)} of {len(targets)} rows met"


def plot_time_per_method(ax, rows: list[dict], x_key: str) -> None:
    """One line per method on ``ax``: ms per call against ``row[x_key]`` (condkernels' backends drawn
    thicker), with its legend."""
    from .cases import is_ours

    for method in method_order({r["method"] for r in rows}):
        pts = sorted((r[x_key], r["time_ms"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method,
                linewidth=2.5 if is_ours(method) else 1.2)
    ax.set_ylabel("ms per call")
    ax.legend(fontsize=7)


def save_figure(fig, plt, figdir: Path, name: str) -> str:
    """Writes ``fig`` to ``figdir/name`` and closes it; returns ``name``."""
    fig.tight_layout()
    fig.savefig(figdir / name, dpi=110)
    plt.close(fig)
    return name

