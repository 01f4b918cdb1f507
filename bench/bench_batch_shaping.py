"""Benchmark of beta_cdf and batch_shaping_loss against scipy-based implementations.

    python bench/bench_batch_shaping.py [--quick] [--out docs/benchmarks_batch_shaping.md]

CPU: forward + backward of the loss for N in {64, 256, 1024} examples x 4096 gates (float32, 2
threads) against the authors' approach -- the Beta CDF and density from scipy on the CPU inside a
custom autograd function -- (target: >= 20x at 256 x 4096); beta_cdf alone against
scipy.special.betainc, single-threaded (target: >= 5x). GPU, when present: the whole loss for
256 x 16384 gates (target: < 1 ms). Writes a markdown report with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import numpy as np
import scipy
import scipy.special
import scipy.stats
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import condkernels  # noqa: E402


class ScipyBatchShaping(torch.autograd.Function):
    """The authors' approach: sort with torch, Beta CDF/pdf with scipy on the CPU, mean over gates,
    pdf clipped to [1e-3, 100] in the backward, unsorted through the sort indices."""

    @staticmethod
    def forward(ctx, gates, alpha, beta):
        n = gates.shape[0]
        values, order = gates.detach().cpu().reshape(n, -1).sort(dim=0, stable=True)
        x = np.clip(values.double().numpy(), 1e-6, 1 - 1e-6)
        cdf = scipy.stats.beta.cdf(x, alpha, beta)
        pdf = np.clip(scipy.stats.beta.pdf(x, alpha, beta), 1e-3, 100.0)
        target = (np.arange(1, n + 1) / (n + 1))[:, None]
        residual = target - cdf
        loss = (residual ** 2).sum(axis=0).mean() / n
        ctx.save_for_backward(order, torch.from_numpy(-2.0 * residual * pdf / (n * x.shape[1])))
        ctx.shape, ctx.device, ctx.dtype = gates.shape, gates.device, gates.dtype
        return torch.tensor(loss, dtype=gates.dtype, device=gates.device)

    @staticmethod
    def backward(ctx, grad_loss):
        order, grad_sorted = ctx.saved_tensors
        grad = torch.zeros_like(grad_sorted).scatter_(0, order, grad_sorted)
        grad = grad.reshape(ctx.shape).to(device=ctx.device, dtype=ctx.dtype)
        return grad * grad_loss, None, None


def timed(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def loss_step(loss_fn, gates):
    g = gates.detach().requires_grad_(True)
    loss_fn(g).backward()
    return g.grad


def machine():
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "CPU": f"{cpu}, {os.cpu_count()} logical cores",
        "load average at start (1 min; the machine may be shared)": f"{os.getloadavg()[0]:.1f}",
        "GPU": gpu,
        "torch": torch.__version__,
        "scipy": scipy.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--out", default=None, help="markdown report to write")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    lines = ["# batch-shaping benchmarks", "", "Written by `bench/bench_batch_shaping.py`" + (" --quick" if args.quick else "") + ".", ""]
    for key, value in machine().items():
        lines.append(f"- {key}: {value}")
    lines.append("")

    torch.manual_seed(0)
    # --- the loss, CPU, 2 threads ---
    torch.set_num_threads(2)
    lines += ["## batch_shaping_loss, forward + backward, CPU, float32, 2 threads", "",
              "| gates (N x G) | scipy-based (authors' approach) | condkernels | speed-up |", "|---|---|---|---|"]
    ratio_256 = None
    for n in (64, 256, 1024):
        gates = torch.sigmoid(2 * torch.randn(n, 4096))
        ours_grad = loss_step(lambda g: condkernels.batch_shaping_loss(g, reduction="mean"), gates)
        ref_grad = loss_step(lambda g: ScipyBatchShaping.apply(g, 0.6, 0.4), gates)
        assert torch.allclose(ours_grad, ref_grad, rtol=1e-3, atol=1e-9), "the two implementations disagree"
        t_ref = timed(lambda: loss_step(lambda g: ScipyBatchShaping.apply(g, 0.6, 0.4), gates), max(2, repeats // 2))
        t_ours = timed(lambda: loss_step(lambda g: condkernels.batch_shaping_loss(g, reduction="mean"), gates), repeats)
        ratio = t_ref / t_ours
        if n == 256:
            ratio_256 = ratio
        lines.append(f"| {n} x 4096 | {t_ref * 1e3:.1f} ms | {t_ours * 1e3:.2f} ms | {ratio:.1f}x |")
        print(lines[-1], flush=True)
    lines += ["", f"Target >= 20x at 256 x 4096: **{'met' if ratio_256 >= 20 else 'not met'}** ({ratio_256:.1f}x).", ""]

    # --- beta_cdf alone, single-threaded ---
    torch.set_num_threads(1)
    lines += ["## beta_cdf alone vs scipy.special.betainc, CPU, float64, 1 thread, 2^20 values", "",
              "| (a, b) | scipy.special.betainc | condkernels.beta_cdf | speed-up |", "|---|---|---|---|"]
    x = torch.rand(1 << 20, dtype=torch.float64)
    xn = x.numpy()
    ratio_paper = None
    for a, b in [(0.6, 0.4), (0.05, 0.05), (2.0, 5.0), (50.0, 50.0)]:
        err = np.abs(condkernels.beta_cdf(x, a, b).numpy() - scipy.special.betainc(a, b, xn)).max()
        assert err < 1e-12, err
        t_ref = timed(lambda: scipy.special.betainc(a, b, xn), repeats)
        t_ours = timed(lambda: condkernels.beta_cdf(x, a, b), repeats)
        if (a, b) == (0.6, 0.4):
            ratio_paper = t_ref / t_ours
        lines.append(f"| ({a}, {b}) | {t_ref * 1e3:.1f} ms | {t_ours * 1e3:.1f} ms | {t_ref / t_ours:.1f}x |")
        print(lines[-1], flush=True)
    lines += ["", f"Target >= 5x single-threaded at the paper's Beta(0.6, 0.4): **{'met' if ratio_paper >= 5 else 'not met'}** "
              f"({ratio_paper:.1f}x).", ""]

    # --- GPU ---
    lines += ["## GPU: batch_shaping_loss forward + backward, 256 x 16384 gates, float32", ""]
    if torch.cuda.is_available() and condkernels.cuda_built():
        gates = torch.sigmoid(2 * torch.randn(256, 16384, device="cuda"))
        step = lambda: loss_step(lambda g: condkernels.batch_shaping_loss(g), gates)  # noqa: E731
        for _ in range(3):
            step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(20):
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        ms = statistics.median(times)
        lines.append(f"{torch.cuda.get_device_name()}: {ms:.3f} ms; target < 1 ms: **{'met' if ms < 1 else 'not met'}**.")
    else:
        lines.append("Not measured: no GPU (or no CUDA kernels) on this machine.")
    lines.append("")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
