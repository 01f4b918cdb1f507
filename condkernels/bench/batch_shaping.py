"""batch_shaping_loss and beta_cdf against the scipy-based implementation of the batch-shaping paper.

Targets: the loss's forward + backward >= 20x the scipy/CPU approach at 256 x 4096 gates (CPU, the
run's threads); beta_cdf >= 5x scipy.special.betainc single-threaded in float64 at the paper's
Beta(0.6, 0.4); on a GPU the loss at 256 x 16384 gates in < 1 ms.
"""

from __future__ import annotations

import numpy as np
import scipy.special
import scipy.stats
import torch

import condkernels

from . import competitors
from .cases import NAIVE, STATIC, Case, is_ours, ours, ours_method, with_lower_vector_isas
from .results import Target, cases_of, cell, fmt_ms, fmt_ratio, method_order, ms

SUITE = "batch_shaping"
REFERENCE = "reference"

QUICK_LOSS = [(256, 4096)]
FULL_LOSS = [(64, 4096), (256, 4096), (1024, 4096)]
GPU_LOSS = [(256, 16384)]
QUICK_CDF = [(0.6, 0.4)]
FULL_CDF = [(0.6, 0.4), (0.05, 0.05), (2.0, 5.0), (50.0, 50.0)]
CDF_VALUES = 1 << 20


class ScipyBatchShaping(torch.autograd.Function):
    """The authors' approach: sort with torch, Beta CDF and density from scipy on the CPU, mean over
    gates, density clipped to [1e-3, 100] in the backward, unsorted through the sort indices."""

    @staticmethod
    def forward(ctx, gates, alpha, beta):
        n = gates.shape[0]
        values, order = gates.detach().cpu().reshape(n, -1).sort(dim=0, stable=True)
        x = np.clip(values.double().numpy(), 1e-6, 1 - 1e-6)
        cdf = scipy.stats.beta.cdf(x, alpha, beta)
        pdf = np.clip(scipy.stats.beta.pdf(x, alpha, beta), 1e-3, 100.0)
        residual = (np.arange(1, n + 1) / (n + 1))[:, None] - cdf
        ctx.save_for_backward(order, torch.from_numpy(-2.0 * residual * pdf / (n * x.shape[1])))
        ctx.shape, ctx.device, ctx.dtype = gates.shape, gates.device, gates.dtype
        return torch.tensor((residual ** 2).sum(axis=0).mean() / n, dtype=gates.dtype, device=gates.device)

    @staticmethod
    def backward(ctx, grad_loss):
        order, grad_sorted = ctx.saved_tensors
        grad = torch.zeros_like(grad_sorted).scatter_(0, order, grad_sorted)
        return grad.reshape(ctx.shape).to(device=ctx.device, dtype=ctx.dtype) * grad_loss, None, None


def loss_case(cfg, n, g) -> Case:
    es = torch.tensor([], dtype=cfg.dtype).element_size()

    def setup():
        gates = torch.sigmoid(2 * torch.randn(n, g, generator=torch.Generator().manual_seed(0)))
        gates = gates.to(cfg.device, cfg.dtype)

        def step(loss_fn):
            def call():
                leaf = gates.detach().requires_grad_(True)
                return torch.autograd.grad(loss_fn(leaf), leaf)[0]

            return call

        def sort_only():  # the sort over the batch that every formulation does, and no more
            return gates.sort(dim=0)[0]

        calls = {STATIC: sort_only, NAIVE: step(lambda x: ScipyBatchShaping.apply(x, 0.6, 0.4)),
                 REFERENCE: step(lambda x: condkernels.batch_shaping_loss(x, reduction="mean", backend="reference"))}
        for backend in competitors.own_backends(cfg.device):
            calls[ours(backend)] = step(lambda x, b=backend: condkernels.batch_shaping_loss(
                x, reduction="mean", backend=b))
        if cfg.paths and cfg.device.type == "cpu":  # the sorting network against the radix sort
            calls.update(with_lower_vector_isas(ours("cpu"), calls[ours("cpu")]))
        return calls

    return Case(
        suite=SUITE, op="batch_shaping_loss", name=f"{SUITE}: loss fwd+bwd {n}x{g}", mode="fwd+bwd",
        params=dict(n=n, gates=g), setup=setup, nbytes=2 * n * g * es,  # gates read, gradient written
        hints={REFERENCE: 1000.0},  # times the sort alone: the reference CDF makes 240 passes over the gates
        compare=tuple(m for m in ["naive", REFERENCE] + [ours(b) for b in competitors.own_backends(cfg.device)]),
    )


def cdf_case(cfg, a, b) -> Case:
    def setup():
        x = torch.rand(CDF_VALUES, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        xn = x.numpy()
        xd = x.to(cfg.device)
        calls = {NAIVE: lambda: torch.from_numpy(scipy.special.betainc(a, b, xn)).to(cfg.device),
                 REFERENCE: lambda: condkernels.beta_cdf(xd, a, b, backend="reference")}
        for backend in competitors.own_backends(cfg.device):
            calls[ours(backend)] = lambda bk=backend: condkernels.beta_cdf(xd, a, b, backend=bk)
        return calls

    on_cpu = cfg.device.type == "cpu"
    return Case(
        suite=SUITE, op="beta_cdf", name=f"{SUITE}: beta_cdf ({a}, {b}) 2^20 float64", mode="forward",
        params=dict(a=a, b=b, n=CDF_VALUES), setup=setup, nbytes=2 * CDF_VALUES * 8,
        compare=(NAIVE, REFERENCE, *[ours(b) for b in competitors.own_backends(cfg.device)]),
        hints={REFERENCE: 50.0}, threads=1 if on_cpu else None, dtype=torch.float64,
    )


def cases(cfg) -> list[Case]:
    loss_shapes = (FULL_LOSS if cfg.full else QUICK_LOSS) + (GPU_LOSS if cfg.device.type == "cuda" else [])
    out = [loss_case(cfg, n, g) for n, g in loss_shapes]
    out += [cdf_case(cfg, a, b) for a, b in (FULL_CDF if cfg.full else QUICK_CDF)]
    return out


# --- report ----------------------------------------------------------------------------------------


def report(rows: list[dict]) -> tuple[list[str], list[Target]]:
    cases = cases_of(rows)
    methods = method_order({m for c in cases.values() for m in c})
    device = rows[0]["device"]
    lines = [
        "Competitors: **naive** = the authors' approach (sort with torch, Beta CDF and density from scipy on",
        "the CPU in a custom autograd function; for beta_cdf `scipy.special.betainc`); **reference** =",
        "`backend=\"reference\"` (pure PyTorch, float64); **static** = `gates.sort(dim=0)` alone, the sort",
        "every formulation does; **condkernels:&lt;backend&gt;**. Loss: forward + backward, Beta(0.6, 0.4),",
        "`reduction=\"mean\"`, gates `sigmoid(2·N(0,1))`. beta_cdf: 2^20 uniform values in float64, one",
        "thread on the CPU. *roofline* = the bytes floor (gates read and gradient written; x read and",
        "the CDF written). Times in ms.",
        "",
        "| case | " + " | ".join(methods) + " | roofline | ours/roofline | naive/ours |",
        "|---" * (len(methods) + 4) + "|",
    ]
    speedups = {}
    for name, case in cases.items():
        method = ours_method(case)
        t, naive = ms(case.get(method)), ms(case.get(NAIVE))
        roof = next(iter(case.values()))["floor_ms"]
        speedup = naive / t if t and naive else None
        speedups[name] = (speedup, t)
        lines.append(f"| {name.split(': ', 1)[1]} | " + " | ".join(cell(case.get(m)) for m in methods)
                     + f" | {fmt_ms(roof)} | {fmt_ratio(t / roof if t else None)} | {fmt_ratio(speedup)} |")

    def find(prefix):
        return next((v for k, v in speedups.items() if k.startswith(f"{SUITE}: {prefix}")), (None, None))

    loss, _ = find("loss fwd+bwd 256x4096")
    cdf, _ = find("beta_cdf (0.6, 0.4)")
    _, gpu_ms = find("loss fwd+bwd 256x16384")
    on_cpu = device == "cpu"
    targets = [
        Target("batch_shaping_loss", "fwd+bwd ≥ 20× the scipy approach at 256 × 4096 (CPU)",
               (loss >= 20) if loss is not None and on_cpu else None,
               f"{loss:.1f}×" if loss is not None else "not measured"),
        Target("beta_cdf", "≥ 5× scipy.special.betainc, one thread, float64, Beta(0.6, 0.4) (CPU)",
               (cdf >= 5) if cdf is not None and on_cpu else None,
               f"{cdf:.1f}×" if cdf is not None else "not measured"),
    ]
    if not on_cpu:
        targets.append(Target("batch_shaping_loss", "fwd+bwd < 1 ms at 256 × 16384 (GPU)",
                              (gpu_ms < 1) if gpu_ms is not None else None,
                              f"{gpu_ms:.3f} ms" if gpu_ms is not None else "not measured"))
    return lines, targets


def plots(rows, plt, figdir, prefix):
    return []
