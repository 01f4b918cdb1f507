"""cond_conv2d: the layer shapes of CC-MobileNetV1/V2 and CC-ResNet-50.

Targets on the CPU: never slower than the grouped trick; inference within 1.3x and forward+backward
within 1.5x of the target floor = the static convolution of the same shape + one read of the E
expert kernels at the measured bandwidth (the static conv's forward+backward for forward+backward).
"""

from __future__ import annotations


import torch

import condkernels

from . import competitors
from .cases import (
    FROZEN, GROUPED, LOOP, NAIVE, STATIC, Case, conv_macs, grad_call, in_frozen_weights, no_grad_call, ours,
    ours_method, with_env, with_lower_vector_isas,
)
from .results import (
    Target, cases_of, cell, count, fmt_ms, fmt_ratio, method_order, ms, plot_time_per_method, save_figure, yes_no,
)

SUITE = "condconv"
OP = "cond_conv2d"
TILING_ENV = "CONDKERNELS_COND_CONV2D_CPU_TILING"
FUSED_ENV = "CONDKERNELS_COND_CONV2D_CPU_FUSED"

# key: (label, Cin, Cout, groups, k, H=W, stride, padding)
SHAPES = {
    "pw512": ("pointwise 512->512 @14x14 (MobileNetV1)", 512, 512, 1, 1, 14, 1, 0),
    "dw512": ("depthwise 3x3 512 @14x14 (MobileNetV1)", 512, 512, 512, 3, 14, 1, 1),
    "dw256": ("depthwise 3x3 256 @28x28 (MobileNetV1)", 256, 256, 256, 3, 28, 1, 1),
    "c3x3": ("3x3 512->512 @7x7 (ResNet-50)", 512, 512, 1, 3, 7, 1, 1),
    "pw2048": ("pointwise 2048->512 @7x7 (ResNet-50)", 2048, 512, 1, 1, 7, 1, 0),
}
# Quick mode: (shape, B, E, modes). The pointwise sweep over E makes the time-vs-experts plot.
QUICK = [
    ("pw512", 8, 1, ("inference",)), ("pw512", 8, 4, ("inference",)),
    ("pw512", 8, 8, ("inference", "fwd+bwd")), ("pw512", 8, 32, ("inference",)),
    ("dw512", 1, 8, ("inference",)), ("dw512", 8, 8, ("inference", "fwd+bwd")),
    ("c3x3", 1, 8, ("inference",)), ("c3x3", 8, 8, ("inference", "fwd+bwd")),
    ("pw2048", 1, 32, ("inference",)),
]
FULL_BATCHES = (1, 8, 32)
FULL_EXPERTS = (1, 4, 8, 32)
MODES = ("inference", "fwd+bwd")


def configurations(full: bool):
    if full:
        return [(s, b, e, MODES) for s in SHAPES for b in FULL_BATCHES for e in FULL_EXPERTS]
    return QUICK


def _functions(cfg, mode: str = "inference") -> dict:
    fns = {STATIC: competitors.cond_static, NAIVE: competitors.cond_naive,
           GROUPED: competitors.cond_grouped, LOOP: competitors.cond_loop}
    for backend in competitors.own_backends(cfg.device):
        fns[ours(backend)] = competitors.with_backend(condkernels.cond_conv2d, backend)
    if mode == "inference" and cfg.device.type == "cpu":
        fns[FROZEN] = in_frozen_weights(fns[ours("cpu")])
    if cfg.paths and cfg.device.type == "cpu":  # the studies behind the CPU kernel's thresholds
        for policy in ("whole", "tiled"):  # the mix + GEMM path itself, never the fused kernel
            fns[ours("cpu", f"tiling={policy}")] = with_env(fns[ours("cpu")], {TILING_ENV: policy, FUSED_ENV: "0"})
        for policy in ("0", "1"):
            fns[ours("cpu", f"fused={policy}")] = with_env(fns[ours("cpu")], {FUSED_ENV: policy})
        fns.update(with_lower_vector_isas(ours("cpu"), fns[ours("cpu")]))
    return fns


def make_case(cfg, key, batch, experts, mode) -> Case:
    label, cin, cout, groups, k, hw, stride, padding = SHAPES[key]
    ho = (hw + 2 * padding - k) // stride + 1
    es = torch.tensor([], dtype=cfg.dtype).element_size()
    x_n, y_n, w_n = batch * cin * hw * hw, batch * cout * ho * ho, experts * cout * (cin // groups) * k * k
    macs = conv_macs(batch, cin, cout, groups, k, ho, ho)
    backward = mode == "fwd+bwd"
    # Unavoidable: x and the experts read and y written; the backward reads dy, x and the experts
    # again and writes dx and dW_e.
    nbytes = es * (x_n + y_n + w_n) if not backward else es * (3 * x_n + 2 * y_n + 3 * w_n)

    def setup():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, cin, hw, hw, generator=gen)
        routing = torch.rand(batch, experts, generator=gen)
        weight = torch.randn(experts, cout, cin // groups, k, k, generator=gen) * (cin // groups * k * k) ** -0.5
        x, routing, weight = (t.to(cfg.device, cfg.dtype) for t in (x, routing, weight))
        calls = {}
        for name, fn in _functions(cfg, mode).items():
            # The static conv owns one expert: its backward does not fill an E-expert gradient.
            w = weight[:1].clone() if name == STATIC else weight
            if backward:
                leaves = [t.detach().requires_grad_(True) for t in (x, routing, w)]
                calls[name] = grad_call(fn, leaves, None, stride, padding, 1, groups)
            else:
                calls[name] = no_grad_call(fn, x, routing, w, None, stride, padding, 1, groups)
        return calls

    return Case(
        suite=SUITE, op=OP, name=f"{SUITE}: {label} B={batch} E={experts} {mode}", mode=mode,
        params=dict(shape=label, cin=cin, cout=cout, groups=groups, k=k, hw=hw, batch=batch, experts=experts,
                    expert_bytes=es * w_n),
        setup=setup, macs=macs * (3 if backward else 1), nbytes=nbytes,
        compare=tuple(m for m in _functions(cfg, mode) if m != STATIC),  # outputs, or the gradients of x, r, W
        hints={NAIVE: experts, LOOP: batch / max(1, batch // 8)},
    )


def cases(cfg) -> list[Case]:
    return [make_case(cfg, key, b, e, mode) for key, b, e, modes in configurations(cfg.full) for mode in modes]


# --- report ----------------------------------------------------------------------------------------


def judge(case: dict[str, dict]) -> dict:
    """The target quantities of one case (a {method: row})."""
    any_row = next(iter(case.values()))
    method = ours_method(case)
    t, static, grouped = ms(case.get(method)), ms(case.get(STATIC)), ms(case.get(GROUPED))
    read_ms = any_row["expert_bytes"] / (any_row["bandwidth_gb_s"] * 1e9) * 1e3
    floor = static + read_ms if static is not None else None
    limit = 1.5 if any_row["mode"] == "fwd+bwd" else 1.3
    out = dict(method=method, time=t, target_floor=floor, limit=limit, vs_grouped=None, vs_floor=None,
               not_slower=None, within=None)
    if t is not None and grouped is not None:
        out["vs_grouped"] = t / grouped
        out["not_slower"] = t <= grouped
    if t is not None and floor is not None:
        out["vs_floor"] = t / floor
        out["within"] = t <= limit * floor
    return out


def report(rows: list[dict]) -> tuple[list[str], list[Target]]:
    cases = cases_of(rows)
    methods = method_order({m for c in cases.values() for m in c})
    on_cpu = rows[0]["device"] == "cpu"
    lines = [
        "Competitors: **static** = `F.conv2d` with one expert (the cost to match); **naive** = the mixture of",
        "E convolutions (`backend=\"reference\"`); **grouped** = timm's trick (mix with `routing @ weight`,",
        "batch folded into the groups of one conv); **loop** = mixed kernels, one conv per example;",
        "**condkernels:&lt;backend&gt;** = `cond_conv2d(..., backend=...)`; **condkernels:cpu frozen** = the",
        "same inside `condkernels.frozen_weights()` (inference with fixed weights: the fused kernel's",
        "layout of the experts made once and kept between calls), which the inference rows' ratios and",
        "targets are taken from where it was timed. float32 NCHW, no bias, routing uniform in [0, 1).",
        "fwd+bwd: forward, then the gradients of x, routing and the experts.",
        "",
        "Floors: *roofline* = max(conv MACs / GEMM throughput, unavoidable bytes / bandwidth), the",
        "bytes being x, y and the E experts (and dy, dx, dW_e in fwd+bwd); *target floor* = static +",
        "one read of the E experts at the measured bandwidth. Times in ms; `skip` = not timed, expected",
        "to take too long in the quick mode; ✗ = output disagrees with the others.",
        "",
        "| case | " + " | ".join(methods) + " | roofline | ours/roofline | target floor | ours/grouped "
        "| ours/target floor | ≤ grouped | within target |",
        "|---" * (len(methods) + 8) + "|",
    ]
    not_slower, within_inf, within_bwd = [], [], []
    for name, case in cases.items():
        j = judge(case)
        any_row = next(iter(case.values()))
        roof = any_row["floor_ms"]
        lines.append(
            f"| {name.split(': ', 1)[1]} | " + " | ".join(cell(case.get(m)) for m in methods)
            + f" | {fmt_ms(roof)} | {fmt_ratio(j['time'] / roof if j['time'] else None)} | {fmt_ms(j['target_floor'])}"
            f" | {fmt_ratio(j['vs_grouped'])} | {fmt_ratio(j['vs_floor'])} | {yes_no(j['not_slower'])}"
            f" | {yes_no(j['within'])} (≤ {j['limit']}×) |"
        )
        if j["not_slower"] is not None:
            not_slower.append(j["not_slower"])
        if j["within"] is not None:
            (within_bwd if any_row["mode"] == "fwd+bwd" else within_inf).append(j["within"])
    notes = "" if on_cpu else " (a CPU target, shown for reference)"

    def target(text, results):
        met = None if not results or not on_cpu else all(results)
        return Target(OP, text + notes, met, count(results) if results else "no rows")

    targets = [
        target("never slower than the grouped-conv trick", not_slower),
        target("inference ≤ 1.3 × (static + expert read)", within_inf),
        target("forward+backward ≤ 1.5 × (static fwd+bwd + expert read)", within_bwd),
    ]
    return lines, targets


def plots(rows: list[dict], plt, figdir, prefix: str) -> list[tuple[str, str]]:
    """Time against the number of experts, per method, for every (shape, B, mode) measured at three
    or more expert counts."""
    groups: dict = {}
    for r in rows:
        if r.get("time_ms") is not None:
            groups.setdefault((r["shape"], r["batch"], r["mode"]), []).append(r)
    sweeps = [(k, v) for k, v in groups.items() if len({r["experts"] for r in v}) >= 3]
    if not sweeps:
        return []
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4), squeeze=False)
    for ax, ((shape, batch, mode), sel) in zip(axes[0], sweeps):
        plot_time_per_method(ax, sel, "experts")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["experts"] for r in sel}), [str(e) for e in sorted({r["experts"] for r in sel})])
        ax.set_yscale("log")
        ax.set_xlabel("experts E")
        ax.set_title(f"{shape}\nB={batch}, {mode}", fontsize=9)
    name = save_figure(fig, plt, figdir, f"{prefix}condconv_time_vs_experts.png")
    return [("cond_conv2d: time against the number of experts", name)]
