"""Batch-1 latency of whole networks, eval mode, after ``condkernels.optimize_for_inference``.

Targets on the CPU: CC-MobileNetV1 (0.5x) at 8 and 32 experts within 1.3x of (MobileNetV1 (0.5x)
latency + one streaming read of all the CC network's weights at the measured bandwidth);
ResNet34-BAS with its gates forced to 50% density <= 0.65x ResNet-34.

Every competitor runs the same network object: the op inside its layers is swapped
(:class:`~condkernels.bench.competitors.ops_replaced`) for the naive, grouped or loop formulation;
static is the plain network of the same shape.
"""

from __future__ import annotations

import torch

import condkernels
from condkernels import models as ck_models
from condkernels.utils import set_gate_density

from . import competitors
from .cases import FROZEN, GROUPED, LOOP, NAIVE, STATIC, Case, in_frozen_weights, ours, ours_method
from .results import Target, cases_of, cell, count, fmt_ms, fmt_ratio, method_order, ms, yes_no

SUITE = "models"
RESOLUTION = 224
MOBILENET_WIDTH = 0.5
CC_EXPERTS = (8, 32)
BAS_DENSITY = 0.5


def _prepared(model: torch.nn.Module, cfg) -> torch.nn.Module:
    return condkernels.optimize_for_inference(model.to(cfg.device, cfg.dtype))


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _network_calls(cfg, model, static_model, replace: str) -> dict:
    x = torch.randn(1, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)).to(cfg.device, cfg.dtype)
    fns = competitors.COND if replace == "cond" else competitors.GATED
    op = condkernels.cond_conv2d if replace == "cond" else condkernels.gated_conv2d

    def run(net, swap):
        def call():
            with torch.no_grad(), swap:
                return net(x)

        return call

    calls = {STATIC: run(static_model, competitors.ops_replaced())}
    for name in (NAIVE, GROUPED, LOOP):
        calls[name] = run(model, competitors.ops_replaced(**{replace: fns[name]}))
    for backend in competitors.own_backends(cfg.device):
        calls[ours(backend)] = run(model, competitors.ops_replaced(**{replace: competitors.with_backend(op, backend)}))
    if replace == "cond" and cfg.device.type == "cpu":
        calls[FROZEN] = in_frozen_weights(calls[ours("cpu")])
    return calls


def cc_mobilenet_case(cfg, experts) -> Case:
    meta = torch.device("meta")
    with meta:
        cc = ck_models.cc_mobilenet_v1(MOBILENET_WIDTH, num_experts=experts)
    macs = condkernels.utils.count_macs(cc, (3, RESOLUTION, RESOLUTION))
    param_bytes = sum(p.numel() for p in cc.parameters()) * torch.tensor([], dtype=cfg.dtype).element_size()

    def setup():
        torch.manual_seed(0)
        model = _prepared(ck_models.cc_mobilenet_v1(MOBILENET_WIDTH, num_experts=experts), cfg)
        static = _prepared(ck_models.mobilenet_v1(MOBILENET_WIDTH), cfg)
        return _network_calls(cfg, model, static, "cond")

    return Case(
        suite=SUITE, op="cc_mobilenet_v1", name=f"{SUITE}: CC-MobileNetV1 ({MOBILENET_WIDTH}x) E={experts} B=1",
        mode="inference", params=dict(model=f"CC-MobileNetV1 ({MOBILENET_WIDTH}x)", experts=experts, batch=1,
                                      resolution=RESOLUTION, param_bytes=param_bytes),
        setup=setup, macs=macs, nbytes=param_bytes, compare=(NAIVE, GROUPED, LOOP, *[
            ours(b) for b in competitors.own_backends(cfg.device)], *([FROZEN] if cfg.device.type == "cpu" else [])),
        hints={NAIVE: experts / 4},
    )


def resnet34_bas_case(cfg) -> Case:
    es = torch.tensor([], dtype=cfg.dtype).element_size()
    # The unavoidable work: what the gated network executes at that density (conditional MACs of
    # the open channels, stem, shortcuts, gates and classifier included), and one read of its weights.
    gated = condkernels.optimize_for_inference(ck_models.resnet34_bas())
    set_gate_density(gated, BAS_DENSITY)
    macs = condkernels.utils.conditional_macs(gated, torch.zeros(1, 3, RESOLUTION, RESOLUTION))
    param_bytes = sum(p.numel() for p in ck_models.resnet34().parameters()) * es

    def setup():
        torch.manual_seed(0)
        model = _prepared(ck_models.resnet34_bas(), cfg)
        set_gate_density(model, BAS_DENSITY)
        static = _prepared(ck_models.resnet34(), cfg)
        return _network_calls(cfg, model, static, "gated")

    return Case(
        suite=SUITE, op="resnet34_bas", name=f"{SUITE}: ResNet34-BAS d={BAS_DENSITY} B=1", mode="inference",
        params=dict(model="ResNet34-BAS", density=BAS_DENSITY, batch=1, resolution=RESOLUTION,
                    param_bytes=param_bytes),
        setup=setup, macs=macs, nbytes=param_bytes,
        compare=(NAIVE, GROUPED, LOOP, *[ours(b) for b in competitors.own_backends(cfg.device)]),
    )


def cases(cfg) -> list[Case]:
    return [cc_mobilenet_case(cfg, e) for e in CC_EXPERTS] + [resnet34_bas_case(cfg)]


# --- report ----------------------------------------------------------------------------------------


def report(rows: list[dict]) -> tuple[list[str], list[Target]]:
    cases = cases_of(rows)
    methods = method_order({m for c in cases.values() for m in c})
    on_cpu = rows[0]["device"] == "cpu"
    lines = [
        "Batch 1, 224x224, eval mode after `condkernels.optimize_for_inference`. **static** = the plain",
        f"network (MobileNetV1 ({MOBILENET_WIDTH}x), ResNet-34); **naive** / **grouped** / **loop** = the",
        "conditional network with its op swapped for that formulation; **condkernels:&lt;backend&gt;** =",
        "the conditional network as shipped; **condkernels:cpu frozen** = the same inside",
        "`condkernels.frozen_weights()` (its copies of the experts kept between calls), which the",
        "CC-MobileNetV1 targets are judged on where it was timed. ResNet34-BAS runs with its gates forced to",
        f"{BAS_DENSITY:.0%} density (`condkernels.utils.set_gate_density`). Target floor of CC-MobileNetV1 =",
        "static + one read of all the CC network's weights at the measured bandwidth; *roofline* =",
        "max(MACs / GEMM throughput, weight bytes / bandwidth). Times in ms.",
        "",
        "| case | " + " | ".join(methods) + " | roofline | ours/roofline | target | ours/target | met |",
        "|---" * (len(methods) + 6) + "|",
    ]
    cc_met, bas_met, notes = [], [], []
    for name, case in cases.items():
        any_row = next(iter(case.values()))
        method = ours_method(case)
        t, static = ms(case.get(method)), ms(case.get(STATIC))
        roof = any_row["floor_ms"]
        if any_row["op"] == "resnet34_bas":
            target = 0.65 * static if static is not None else None
            target_text = "≤ 0.65 × static"
            bucket = bas_met
        else:
            read = any_row["param_bytes"] / (any_row["bandwidth_gb_s"] * 1e9) * 1e3
            target = 1.3 * (static + read) if static is not None else None
            target_text = f"≤ 1.3 × (static + {read:.2f} ms read)"
            bucket = cc_met
        met = (t <= target) if t is not None and target is not None else None
        if met is not None:
            bucket.append(met)
        if t is None and any_row.get("note"):
            notes.append(f"- {name.split(': ', 1)[1]}: {any_row['note']}")
        lines.append(
            f"| {name.split(': ', 1)[1]} | " + " | ".join(cell(case.get(m)) for m in methods)
            + f" | {fmt_ms(roof) if roof else '–'} | {fmt_ratio(t / roof if t and roof else None)} | {target_text}"
            f" = {fmt_ms(target)} | {fmt_ratio(t / target if t and target else None)} | {yes_no(met)} |"
        )
    if notes:
        lines += ["", "Not measured:", "", *notes]

    def target(op, text, results):
        met = None if not results or not on_cpu else all(results)
        return Target(op, text + ("" if on_cpu else " (a CPU target)"), met,
                      count(results) if results else "not measured")

    return lines, [
        target("models", "CC-MobileNetV1 (0.5x), E = 8 and 32, B = 1: ≤ 1.3 × (MobileNetV1 + weight read)", cc_met),
        target("models", "ResNet34-BAS at 50% density, B = 1: ≤ 0.65 × ResNet-34", bas_met),
    ]


def plots(rows, plt, figdir, prefix):
    return []
