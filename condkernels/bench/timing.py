"""Timing: medians of several repeats, competitors measured in turn so that drift hits all alike."""

from __future__ import annotations

import statistics
from typing import Callable, Mapping

import torch
from torch.utils import benchmark


def median_time(fn: Callable[[], object], device: str, min_run_time: float = 0.2) -> float:
    """Median seconds per call of ``fn`` (CUDA events / do_bench on a GPU, torch.utils.benchmark on a CPU)."""
    if device == "cuda":
        try:
            import triton.testing

            return triton.testing.do_bench(fn, return_mode="median") * 1e-3
        except ImportError:
            pass
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def time_in_turn(
    competitors: Mapping[str, Callable[[], object]],
    device: str,
    repeats: int = 3,
    min_run_time: float = 0.1,
) -> dict[str, float]:
    """Median seconds of each competitor; the repeats go round all competitors in turn."""
    for fn in competitors.values():  # warm-up: first-call allocations, lazy initialisation
        fn()
    samples: dict[str, list[float]] = {name: [] for name in competitors}
    for _ in range(repeats):
        for name, fn in competitors.items():
            samples[name].append(median_time(fn, device, min_run_time))
    return {name: statistics.median(s) for name, s in samples.items()}
