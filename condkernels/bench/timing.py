"""Timing and the machine's floors, both measured in the same run as the benchmarks.

CPU: ``torch.utils.benchmark.Timer`` in interleaved rounds -- every competitor of a case runs once
per round, in turn, so that the drift of a shared machine falls on all of them alike -- and the
median round is reported (the fastest round too). GPU: the same rounds, each a
``triton.testing.do_bench`` (CUDA events when Triton is missing).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils import benchmark

# Sizes of the floor measurements; far larger than the last-level cache of either device.
STREAM_BYTES = {"cpu": 128 << 20, "cuda": 1 << 30}
GEMM_SIZE = {"cpu": 2048, "cuda": 8192}


@dataclass
class Timing:
    median_s: float
    best_s: float
    rounds: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _do_bench():
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return do_bench


def time_once(call: Callable, number: int, device: torch.device) -> float:
    """Seconds per call of ``number`` back-to-back calls."""
    if device.type == "cpu":
        # Timer runs single-threaded unless told otherwise.
        timer = benchmark.Timer("call()", globals={"call": call}, num_threads=torch.get_num_threads())
        return timer.timeit(number).mean
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    synchronize(device)
    start.record()
    for _ in range(number):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / number


def time_interleaved(calls: dict[str, Callable], rounds: int, device: torch.device,
                     round_s: float = 0.05) -> dict[str, Timing]:
    """Median and fastest of ``rounds`` rounds; in each round every call runs, in turn, for about
    ``round_s`` seconds. The calls must have been run once already (warm-up)."""
    do_bench = _do_bench() if device.type == "cuda" else None
    if do_bench is not None:
        samples = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                samples[name].append(do_bench(call, warmup=1, rep=max(1, int(round_s * 1e3)),
                                              return_mode="median") / 1e3)
    else:
        numbers = {}
        for name, call in calls.items():
            first = time_once(call, 1, device)
            numbers[name] = max(1, min(1000, int(round_s / max(first, 1e-7))))
        samples = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                samples[name].append(time_once(call, numbers[name], device))
    return {name: Timing(statistics.median(s), min(s), len(s)) for name, s in samples.items()}


@dataclass
class Floors:
    """The machine's streaming bandwidth (bytes/s) and GEMM throughput (multiply-adds/s)."""

    bandwidth: float
    gemm: float

    def of(self, macs: float, nbytes: float) -> tuple[float, str]:
        """Floor of a piece of work in seconds, and which bound sets it ("compute" or "bytes")."""
        compute, memory = macs / self.gemm, nbytes / self.bandwidth
        return (compute, "compute") if compute >= memory else (memory, "bytes")


def measure_floors(device: torch.device, dtype: torch.dtype, rounds: int) -> Floors:
    """Bandwidth: the fastest of a sum (1 stream), a copy (2) and a triad a = b + s c (3) over buffers
    far larger than the last-level cache. GEMM: ``torch.mm`` of two n x n matrices in ``dtype``.
    Both from their fastest round."""
    n = STREAM_BYTES[device.type] // 4
    a, b, c = (torch.full((n,), v, device=device) for v in (0.0, 1.0, 2.0))
    size = GEMM_SIZE[device.type]
    x, y = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    z = torch.empty_like(x)
    calls = {
        "read": lambda: b.sum(),
        "copy": lambda: a.copy_(b),
        "triad": lambda: torch.add(b, c, alpha=3.0, out=a),
        "gemm": lambda: torch.mm(x, y, out=z),
    }
    for call in calls.values():
        call()
    synchronize(device)
    t = time_interleaved(calls, rounds, device, round_s=0.1)
    # The fastest round: a floor is what the machine can do, and contention only ever adds time.
    nbytes = n * a.element_size()
    bandwidth = max(nbytes / t["read"].best_s, 2 * nbytes / t["copy"].best_s, 3 * nbytes / t["triad"].best_s)
    return Floors(bandwidth=bandwidth, gemm=size ** 3 / t["gemm"].best_s)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_run(device: torch.device, dtype: torch.dtype, floors: Floors, full: bool, rounds: int) -> dict:
    """Where and when: the fields every row of this run carries, and the run's description."""
    import condkernels

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:  # the vector kernels differ by instruction set: the name says which ran
        name = f"{cpu_model()} ({condkernels.cpu_vector_isa().upper()} kernels)"
    try:
        load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": device.type,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "condkernels": condkernels.__version__,
        "bandwidth_gb_s": round(floors.bandwidth / 1e9, 2),
        "gemm_gmac_s": round(floors.gemm / 1e9, 2),
        "mode": "full" if full else "quick",
        "rounds": rounds,
        "logical_cpus": os.cpu_count(),
        "load_average": load,
        "python": platform.python_version(),
    }
