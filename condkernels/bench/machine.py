"""What a benchmark ran on, and the machine's limits measured in the same run (the floors)."""

from __future__ import annotations

import datetime
import functools
import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str) -> dict:
    """Device, threads, versions and date: stored with every row."""
    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{cpu_model()} ({os.cpu_count()} cores)",
        "device_type": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@functools.cache
def stream_bandwidth(device: str, nbytes: int = 512 * 2**20) -> float:
    """Bytes per second of one streaming read (a sum over a buffer far larger than the caches)."""
    from .timing import median_time

    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / median_time(lambda: buf.sum(), device, min_run_time=0.5)


@functools.cache
def gemm_throughput(device: str, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """Multiply-add pairs per second (FLOP/s / 1) of a large square GEMM: the compute roof."""
    from .timing import median_time

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_time(lambda: a @ b, device, min_run_time=0.5)
