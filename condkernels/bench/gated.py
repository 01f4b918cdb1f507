"""gated_conv2d: the 3x3 convolutions of ResNet-18/34 blocks under per-example binary gates (the
blocks' stride-1 convolutions, and in the full grid also the stride-2 first convolutions of
layers 2-4).

Targets: inference time that scales with the density d -- condkernels <= (1.2 d + 0.05) x the dense
masked convolution, and never slower than the per-example slicing loop; training (forward +
backward of the batch-shaping block's gated pair, gates requiring grad) <= 1.1 x the dense masked
block under autograd.
"""

from __future__ import annotations

import statistics

import torch

import condkernels

from . import competitors
from .cases import (
    GROUPED, LOOP, NAIVE, STATIC, Case, conv_macs, no_grad_call, ours, ours_method, with_env,
)
from .results import (
    Target, cases_of, cell, count, fmt_ms, fmt_ratio, method_order, ms, plot_time_per_method, save_figure, yes_no,
)

SUITE = "gated"
OP = "gated_conv2d"
DENSE_ABOVE_ENV = "CONDKERNELS_GATED_DENSE_ABOVE"
PADDED_ENV = "CONDKERNELS_GATED_PADDED_POSITIONS"

SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]  # (C, H=W)
STRIDED = [(64, 128, 56), (128, 256, 28), (256, 512, 14)]  # (Cin, Cout, input H=W), stride 2
DENSITIES = (0.25, 0.5, 0.75, 1.0)
# Inference: (Cin, Cout, input HW, stride, B, gate side, densities); training: (C, HW, B, densities).
QUICK = [(128, 128, 28, 1, 8, "in", DENSITIES), (512, 512, 7, 1, 8, "in", (0.25, 0.5)),
         (128, 128, 28, 1, 8, "out", (0.5,)), (128, 256, 28, 2, 8, "out", (0.5,))]
QUICK_TRAINING = [(128, 28, 8, (0.5,))]


def configurations(full: bool):
    if full:
        sides = ("in", "out")
        inference = [(c, c, hw, 1, b, side, DENSITIES) for b in (1, 32) for c, hw in SHAPES for side in sides]
        inference += [(cin, cout, hw, 2, b, side, DENSITIES) for b in (1, 32) for cin, cout, hw in STRIDED
                      for side in sides]
        return inference, [(c, hw, 32, DENSITIES) for c, hw in SHAPES]
    return QUICK, QUICK_TRAINING


def random_gate(batch: int, channels: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """Per-example binary gates with exactly round(density * channels) open channels each."""
    n_open = max(1, round(density * channels))
    order = torch.rand(batch, channels, generator=gen).argsort(dim=1)
    return torch.zeros(batch, channels).scatter_(1, order[:, :n_open], 1.0)


def _functions(cfg) -> dict:
    fns = {STATIC: competitors.gated_static, NAIVE: competitors.gated_naive,
           GROUPED: competitors.gated_grouped, LOOP: competitors.gated_loop}
    for backend in competitors.own_backends(cfg.device):
        fns[ours(backend)] = competitors.with_backend(condkernels.gated_conv2d, backend)
    if cfg.paths and cfg.device.type == "cpu":  # the per-example compacted path at every density
        fns[ours("cpu", "compacted")] = with_env(fns[ours("cpu")], {DENSE_ABOVE_ENV: "2"})
        for policy, positions in (("0", "1000000000"), ("1", "0")):  # padded planes off / wherever they apply
            fns[ours("cpu", f"compacted padded={policy}")] = with_env(
                fns[ours("cpu")], {DENSE_ABOVE_ENV: "2", PADDED_ENV: positions})
    return fns


def _es(cfg) -> int:
    return torch.tensor([], dtype=cfg.dtype).element_size()


def inference_case(cfg, cin, cout, hw, stride, batch, side, density) -> Case:
    """3x3, padding 1; ``hw`` is the input's height and width."""
    es = _es(cfg)
    out_hw = (hw - 1) // stride + 1
    x_n, y_n, w_n = batch * cin * hw * hw, batch * cout * out_hw * out_hw, cout * cin * 9
    # Unavoidable: the open input channels read (in_gate) or all of x, y written, the weight read.
    nbytes = es * (x_n * (density if side == "in" else 1.0) + y_n + w_n)
    gated_channels = cin if side == "in" else cout

    def setup():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, cin, hw, hw, generator=gen)
        w = torch.randn(cout, cin, 3, 3, generator=gen) * (9 * cin) ** -0.5
        gate = random_gate(batch, gated_channels, density, gen)
        x, w, gate = (t.to(cfg.device, cfg.dtype) for t in (x, w, gate))
        ig, og = (gate, None) if side == "in" else (None, gate)
        return {name: no_grad_call(fn, x, w, None, ig, og, stride, 1) for name, fn in _functions(cfg).items()}

    shape = f"C={cin}@{hw}" if stride == 1 and cin == cout else f"C={cin}->{cout}@{hw} stride {stride}"
    return Case(
        suite=SUITE, op=OP, name=f"{SUITE}: {shape} B={batch} {side}_gate d={density} inference",
        mode="inference",
        params=dict(channels=cin, out_channels=cout, hw=hw, stride=stride, batch=batch, gate=side, density=density),
        setup=setup, macs=conv_macs(batch, cin, cout, 1, 3, out_hw, out_hw) * density, nbytes=nbytes,
        compare=tuple(m for m in _functions(cfg) if m != STATIC), hints={LOOP: max(1.0, batch / 8)},
    )


def training_case(cfg, channels, hw, batch, density) -> Case:
    """The batch-shaping block's gated pair: conv1 out-gated, ReLU, conv2 in-gated by the same gate;
    gradients of x, both weights and the gate."""
    es = _es(cfg)
    act, w_n = batch * channels * hw * hw, channels * channels * 9
    macs = 2 * conv_macs(batch, channels, channels, 1, 3, hw, hw) * density

    def setup():
        gen = torch.Generator().manual_seed(1)
        tensors = (torch.randn(batch, channels, hw, hw, generator=gen),
                   torch.randn(channels, channels, 3, 3, generator=gen) * (9 * channels) ** -0.5,
                   torch.randn(channels, channels, 3, 3, generator=gen) * (9 * channels) ** -0.5,
                   random_gate(batch, channels, density, gen))
        x, w1, w2, gate = (t.to(cfg.device, cfg.dtype).requires_grad_(True) for t in tensors)
        leaves = (x, w1, w2, gate)

        def block_step(fn):
            def call():
                h = torch.relu(fn(x, w1, None, None, gate, 1, 1))
                y = fn(h, w2, None, gate, None, 1, 1)
                return torch.autograd.grad(y.sum(), leaves, allow_unused=True)

            return call

        return {name: block_step(fn) for name, fn in _functions(cfg).items()}

    return Case(
        suite=SUITE, op=OP, name=f"{SUITE}: C={channels}@{hw} B={batch} block d={density} training",
        mode="training",
        params=dict(channels=channels, hw=hw, batch=batch, gate="block", density=density),
        # Forward and two backward products over the open channels; every tensor of the pair once
        # per pass (three passes).
        setup=setup, macs=3 * macs, nbytes=3 * es * (act + 2 * act + act + 2 * w_n),
        hints={LOOP: max(1.0, batch / 8)},
    )


def cases(cfg) -> list[Case]:
    inference, training = configurations(cfg.full)
    out = [inference_case(cfg, cin, cout, hw, s, b, side, d) for cin, cout, hw, s, b, side, ds in inference for d in ds]
    out += [training_case(cfg, c, hw, b, d) for c, hw, b, ds in training for d in ds]
    return out


# --- report ----------------------------------------------------------------------------------------


def judge(case: dict[str, dict]) -> dict:
    any_row = next(iter(case.values()))
    method = ours_method(case)
    t, dense, loop = ms(case.get(method)), ms(case.get(NAIVE)), ms(case.get(LOOP))
    training = any_row["mode"] == "training"
    limit = 1.1 if training else 1.2 * any_row["density"] + 0.05
    out = dict(time=t, vs_dense=None, limit=limit, vs_loop=None, met=None)
    if t is not None and dense is not None:
        out["vs_dense"] = t / dense
        out["met"] = t <= limit * dense
        if not training and loop is not None:
            out["vs_loop"] = t / loop
            out["met"] = out["met"] and t <= loop
    return out


def report(rows: list[dict]) -> tuple[list[str], list[Target]]:
    cases = cases_of(rows)
    methods = method_order({m for c in cases.values() for m in c})
    lines = [
        "Competitors: **static** = `F.conv2d` without gates; **naive** = the dense convolution times the",
        "masks (`backend=\"reference\"`, what public gated networks run); **grouped** = per-example masked",
        "kernels, batch folded into the groups; **loop** = one conv per example on its open channels only",
        "(the batch-shaping paper's CPU method); **condkernels:&lt;backend&gt;**. 3x3, padding 1, stride 1",
        "unless the row says `stride 2` (C=Cin->Cout@input size, ResNet's downsampling convolutions),",
        "per-example random binary gates with exactly `d·C` open channels. *training* = the batch-shaping",
        "block's pair (conv1 out-gated, ReLU, conv2 in-gated by the same gate), forward + backward with",
        "the gate requiring grad. *roofline* = max(MACs of the open channels / GEMM throughput, bytes /",
        "bandwidth). Times in ms.",
        "",
        "| case | " + " | ".join(methods) + " | roofline | ours/roofline | ours/naive | target | ours/loop | met |",
        "|---" * (len(methods) + 7) + "|",
    ]
    inf, train = [], []
    for name, case in cases.items():
        j = judge(case)
        roof = next(iter(case.values()))["floor_ms"]
        lines.append(
            f"| {name.split(': ', 1)[1]} | " + " | ".join(cell(case.get(m)) for m in methods)
            + f" | {fmt_ms(roof)} | {fmt_ratio(j['time'] / roof if j['time'] else None)} | {fmt_ratio(j['vs_dense'])}"
            f" | ≤ {j['limit']:.2f} | {fmt_ratio(j['vs_loop'])} | {yes_no(j['met'])} |"
        )
        if j["met"] is not None:
            (train if next(iter(case.values()))["mode"] == "training" else inf).append(j["met"])
    summary = []
    for d in sorted({r["density"] for r in rows if r["mode"] == "inference"}):
        ratios = [judge(c)["vs_dense"] for c in cases.values()
                  if next(iter(c.values()))["mode"] == "inference" and next(iter(c.values()))["density"] == d]
        ratios = [r for r in ratios if r is not None]
        if ratios:
            summary.append(f"| {d:.2f} | {statistics.median(ratios):.2f} | {1.2 * d + 0.05:.2f} |")
    if summary:
        lines += ["", "Median over the inference rows of each density:", "",
                  "| density | ours/naive | target |", "|---|---|---|", *summary]
    targets = [
        Target(OP, "inference ≤ (1.2 d + 0.05) × dense+mask and ≤ the slicing loop",
               all(inf) if inf else None, count(inf) if inf else "no rows"),
        Target(OP, "training (gated block, fwd+bwd) ≤ 1.1 × dense+mask",
               all(train) if train else None, count(train) if train else "no rows"),
    ]
    return lines, targets


def plots(rows: list[dict], plt, figdir, prefix: str) -> list[tuple[str, str]]:
    """Inference time against density, per method, for every (shape, B, side) with three or more."""
    groups: dict = {}
    for r in rows:
        if r["mode"] == "inference" and r.get("time_ms") is not None:
            groups.setdefault((r["channels"], r["hw"], r.get("stride", 1), r["batch"], r["gate"]), []).append(r)
    sweeps = [(k, v) for k, v in groups.items() if len({r["density"] for r in v}) >= 3][:8]
    if not sweeps:
        return []
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4), squeeze=False)
    for ax, ((c, hw, stride, b, side), sel) in zip(axes[0], sweeps):
        plot_time_per_method(ax, sel, "density")
        ax.set_xlabel("density d (open fraction)")
        ax.set_ylim(bottom=0)
        strided = f", stride {stride}" if stride != 1 else ""
        ax.set_title(f"C={c} @{hw}x{hw}{strided}, B={b}, {side}_gate", fontsize=9)
    name = save_figure(fig, plt, figdir, f"{prefix}gated_time_vs_density.png")
    return [("gated_conv2d: inference time against gate density", name)]
