"""cond_conv2d on the CPU against a static conv, the naive MoE, timm's grouped-conv trick and a
per-example loop, in inference and forward+backward, for layer shapes of CC-MobileNetV1/V2 and
CC-ResNet-50.

    python bench/bench_cond_conv2d.py              # default: a representative subset, a few minutes
    python bench/bench_cond_conv2d.py --full       # every shape x B x E x competitor

Floor of a configuration = the static conv of the same shape + one streaming read of the E expert
kernels at the machine's streaming bandwidth (a large tensor sum, measured in the same run); for
forward+backward the static conv's forward+backward + that read. Every competitor of a configuration
is timed in interleaved rounds and the median round is reported. Writes a markdown table with the
machine description to docs/benchmarks_cond_conv2d_cpu.md and the rows to
docs/results/bench_cond_conv2d_cpu.{csv,json}.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import condkernels  # noqa: E402

TILING_ENV = "CONDKERNELS_COND_CONV2D_CPU_TILING"

# (name, Cin, Cout, groups, k, H=W, stride, padding)
SHAPES = [
    ("pointwise 512->512 @14x14 (MobileNetV1)", 512, 512, 1, 1, 14, 1, 0),
    ("depthwise 3x3 512 @14x14 (MobileNetV1)", 512, 512, 512, 3, 14, 1, 1),
    ("depthwise 3x3 256 @28x28 (MobileNetV1)", 256, 256, 256, 3, 28, 1, 1),
    ("3x3 512->512 @7x7 (ResNet-50)", 512, 512, 1, 3, 7, 1, 1),
    ("pointwise 2048->512 @7x7 (ResNet-50)", 2048, 512, 1, 1, 7, 1, 0),
]
BATCHES = (1, 8, 32)
EXPERTS = (1, 4, 8, 32)
# Default mode: every shape with these (B, E); --full runs B x E.
DEFAULT_BATCH_EXPERTS = ((1, 1), (1, 4), (1, 32), (8, 4), (8, 32), (32, 32))
# Default mode skips a slow competitor whose estimated time per call exceeds this.
SKIP_SECONDS = 0.4

COMPETITORS = ("static", "naive_moe", "grouped", "loop", "condkernels")


# --- competitors ---------------------------------------------------------------------------------


def static_conv(x, routing, weight, stride, padding, groups):
    return F.conv2d(x, weight[0], None, stride, padding, 1, groups)


def naive_moe(x, routing, weight, stride, padding, groups):
    return condkernels.cond_conv2d(x, routing, weight, None, stride, padding, 1, groups, backend="reference")


def grouped_trick(x, routing, weight, stride, padding, groups):
    """timm's CondConv2d: mix with one GEMM, fold the batch into the groups, one conv."""
    batch, experts, cout = x.shape[0], weight.shape[0], weight.shape[1]
    mixed = (routing @ weight.reshape(experts, -1)).view(batch * cout, *weight.shape[2:])
    y = F.conv2d(x.reshape(1, -1, *x.shape[-2:]), mixed, None, stride, padding, 1, groups * batch)
    return y.view(batch, cout, *y.shape[-2:])


def per_example_loop(x, routing, weight, stride, padding, groups):
    experts = weight.shape[0]
    mixed = (routing @ weight.reshape(experts, -1)).view(x.shape[0], *weight.shape[1:])
    return torch.cat([F.conv2d(x[b : b + 1], mixed[b], None, stride, padding, 1, groups) for b in range(x.shape[0])])


def ours(x, routing, weight, stride, padding, groups):
    return condkernels.cond_conv2d(x, routing, weight, None, stride, padding, 1, groups, backend="cpu")


FUNCTIONS = {
    "static": static_conv,
    "naive_moe": naive_moe,
    "grouped": grouped_trick,
    "loop": per_example_loop,
    "condkernels": ours,
}


def make_call(fn, inputs, conv_args, backward):
    x, routing, weight = inputs
    if not backward:

        def call():
            with torch.no_grad():
                fn(x, routing, weight, *conv_args)

        return call
    leaves = [t.detach().requires_grad_(True) for t in inputs]

    def call():
        y = fn(*leaves, *conv_args)
        torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=True)

    return call


def time_once(call, number):
    return benchmark.Timer("call()", globals={"call": call}).timeit(number).median


def time_interleaved(calls: dict, rounds: int) -> dict:
    """Median over `rounds` rounds; in each round every competitor runs once in turn."""
    numbers = {}
    for name, call in calls.items():  # warm-up, and a number of calls per round of about 50 ms
        first = time_once(call, 1)
        numbers[name] = max(1, min(50, int(0.05 / max(first, 1e-6))))
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            samples[name].append(time_once(call, numbers[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


def streaming_bandwidth(rounds: int) -> float:
    """Bytes per second of a sum over a tensor far larger than the last-level cache."""
    big = torch.ones(64 << 20)  # 256 MiB
    seconds = time_interleaved({"sum": lambda: big.sum()}, rounds)["sum"]
    return big.numel() * big.element_size() / seconds


# --- the run ---------------------------------------------------------------------------------------


def configurations(full: bool):
    for shape in SHAPES:
        pairs = [(b, e) for b in BATCHES for e in EXPERTS] if full else DEFAULT_BATCH_EXPERTS
        for batch, experts in pairs:
            yield shape, batch, experts


def run(args):
    torch.manual_seed(0)
    rounds = args.rounds
    bandwidth = streaming_bandwidth(rounds)
    print(f"streaming bandwidth (sum of 256 MiB, {torch.get_num_threads()} threads): {bandwidth / 1e9:.1f} GB/s")
    rows = []
    for (name, cin, cout, groups, k, hw, stride, padding), batch, experts in configurations(args.full):
        x = torch.randn(batch, cin, hw, hw)
        routing = torch.rand(batch, experts)
        weight = torch.randn(experts, cout, cin // groups, k, k) * (1.0 / (cin // groups * k * k)) ** 0.5
        expert_bytes = weight.numel() * weight.element_size()
        read_s = expert_bytes / bandwidth
        conv_args = (stride, padding, groups)
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "inference"
            calls, skipped = {}, {}
            # The static conv owns a single expert, so its backward does not fill an E-expert gradient.
            static_inputs = (x, routing, weight[:1].clone())
            static_call = make_call(static_conv, static_inputs, conv_args, backward)
            static_guess = time_once(static_call, 1)
            estimates = {"naive_moe": experts * static_guess, "loop": batch * static_guess / max(1, batch // 8)}
            for comp in COMPETITORS:
                if not args.full and comp in estimates and estimates[comp] > SKIP_SECONDS:
                    skipped[comp] = estimates[comp]
                    continue
                inputs = static_inputs if comp == "static" else (x, routing, weight)
                calls[comp] = make_call(FUNCTIONS[comp], inputs, conv_args, backward)
            if backward:  # context: a fresh E-expert weight gradient must be allocated and written
                calls["expert_grad_write"] = lambda: torch.empty_like(weight).fill_(1.0)
            t = time_interleaved(calls, rounds)
            floor = t["static"] + read_s
            target = 1.5 if backward else 1.3
            row = dict(
                shape=name, batch=batch, experts=experts, mode=mode,
                expert_mb=round(expert_bytes / 1e6, 2), read_ms=round(read_s * 1e3, 3),
                floor_ms=round(floor * 1e3, 3),
                **{f"{c}_ms": (round(t[c] * 1e3, 3) if c in t else None) for c in COMPETITORS},
                expert_grad_write_ms=round(t["expert_grad_write"] * 1e3, 3) if backward else None,
                skipped=",".join(f"{c}~{v:.1f}s" for c, v in skipped.items()),
            )
            row["vs_static"] = round(t["condkernels"] / t["static"], 2)
            row["vs_grouped"] = round(t["condkernels"] / t["grouped"], 2)
            row["vs_floor"] = round(t["condkernels"] / floor, 2)
            row["not_slower_than_grouped"] = t["condkernels"] <= t["grouped"]
            row["within_floor_target"] = t["condkernels"] <= target * floor
            rows.append(row)
            print(format_row(row), flush=True)
    tiling = tiling_study(rounds, args.full) if not args.skip_tiling else []
    return bandwidth, rows, tiling


def tiling_study(rounds, full):
    """The mix + GEMM path with its output-channel tiles forced whole or cache-sized, and as chosen."""
    out = []
    if full:
        cases = [(s, b, e) for s in (SHAPES[0], SHAPES[3], SHAPES[4]) for b in (1, 8, 32) for e in (4, 32)]
    else:
        cases = [(SHAPES[3], 1, 32), (SHAPES[3], 8, 32), (SHAPES[0], 32, 4), (SHAPES[4], 32, 32)]
    for (name, cin, cout, groups, k, hw, stride, padding), batch, experts in cases:
        x = torch.randn(batch, cin, hw, hw)
        routing = torch.rand(batch, experts)
        weight = torch.randn(experts, cout, cin // groups, k, k) * 0.05
        results = {}
        for backward in (False, True) if full else (False,):
            calls = {}
            for policy in ("whole", "tiled", "auto"):
                inner = make_call(ours, (x, routing, weight), (stride, padding, groups), backward)

                def call(policy=policy, inner=inner):
                    os.environ[TILING_ENV] = policy
                    inner()

                calls[policy] = call
            t = time_interleaved(calls, rounds)
            os.environ.pop(TILING_ENV, None)
            results["fwd+bwd" if backward else "inference"] = t
        for mode, t in results.items():
            row = dict(shape=name, batch=batch, experts=experts, mode=mode,
                       **{f"{p}_ms": round(v * 1e3, 3) for p, v in t.items()})
            out.append(row)
            print(f"tiling {name[:28]:28s} B={batch:2d} E={experts:2d} {mode:9s} "
                  + " ".join(f"{p}={v * 1e3:8.2f}ms" for p, v in t.items()), flush=True)
    return out


def fmt(v):
    return "skip" if v is None else f"{v:.2f}"


def format_row(r):
    return (f"{r['shape'][:40]:40s} B={r['batch']:2d} E={r['experts']:2d} {r['mode']:9s} "
            f"static={fmt(r['static_ms'])} naive={fmt(r['naive_moe_ms'])} grouped={fmt(r['grouped_ms'])} "
            f"loop={fmt(r['loop_ms'])} ours={fmt(r['condkernels_ms'])} floor={fmt(r['floor_ms'])} ms | "
            f"x static {r['vs_static']:.2f}  x grouped {r['vs_grouped']:.2f}  x floor {r['vs_floor']:.2f}")


# --- reporting -------------------------------------------------------------------------------------


def machine_description(bandwidth):
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_1_5_15min": load,
        "streaming_bandwidth_gb_s": round(bandwidth / 1e9, 2),
    }


def write_reports(machine, rows, tiling, args):
    results = ROOT / "docs" / "results"
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "bench_cond_conv2d_cpu.json", "w") as f:
        json.dump({"machine": machine, "full": args.full, "rounds": args.rounds, "rows": rows, "tiling": tiling},
                  f, indent=1)
    with open(results / "bench_cond_conv2d_cpu.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    def yes(b):
        return "yes" if b else "**no**"

    lines = [
        "# cond_conv2d on the CPU: benchmark",
        "",
        "Written by `bench/bench_cond_conv2d.py"
        + (" --full" if args.full else "") + f" --threads {args.threads}`; every figure below comes from that one run.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in machine.items()],
        "",
        "The machine is shared: the load average above says how busy it was, and timings on it vary",
        "between runs. Compare ratios within one row (the competitors of a row are timed in interleaved",
        "rounds, median of the rounds), not absolute times across runs.",
        "",
        "## What runs (csrc/cpu/)",
        "",
        "- depthwise (groups == Cin == Cout): `depthwise.h`, a direct kernel over (example, channel block):",
        "  the block's k x k filters are mixed from the E experts into an L1 buffer and used at once (the",
        "  B per-example weights are never written out). NCHW planes are convolved in a zero-padded \"wide\"",
        "  layout (one long axpy per tap); NHWC runs along the channels (one panel FMA per output row and tap).",
        "- everything else (1x1, strided 1x1, dense and grouped k x k): `cond_conv2d.cpp`, mix + GEMM. The input",
        "  is used in place (stride-1 unpadded 1x1) or laid out once by im2col (`im2col.h`, any padding, both",
        "  formats); output channels are walked in tiles; for each tile one pass of the mixing kernel",
        "  (`mixing.h`) reads the expert tile once and mixes it for every example, and per-example GEMMs",
        "  (`at::mm`, MKL) consume it from cache. The backward walks the same tiles and reduces each tile's",
        "  per-example weight gradients into dW_e and dr with two GEMMs, so all B dW_b never exist at once.",
        "- tile heuristic (`plan_tiling`): im2col columns of a run of examples <= 16 MiB; when all mixed",
        "  weights of a run take <= 64 MiB (twice the L3) they are mixed at once (one tile); otherwise a",
        "  tile of mixed weights for the run is <= 2 MiB (the L2 of one core) but never thinner than 32",
        "  output channels; at batch 1 at least two tiles so both threads' GEMMs have work. `whole` (below)",
        "  is strategy (a), mixing every per-example weight before the GEMMs; `tiled` is strategy (b).",
        "  The 64 MiB threshold comes from an earlier run of the study below (whole won at 34 MB of mixed",
        "  weights, tiles won at 134 MB).",
        "",
        "## Method",
        "",
        "- float32, NCHW, no bias, stride 1; routing uniform in [0, 1); `torch.set_num_threads"
        f"({args.threads})`.",
        "- inference: under `torch.no_grad()`; fwd+bwd: forward, then `torch.autograd.grad` of every input",
        "  (x, routing, weight; x and weight for the static conv).",
        "- static: `F.conv2d` of one expert. naive MoE: `cond_conv2d(..., backend=\"reference\")`",
        "  (E convolutions, mixed outputs). grouped: timm's trick (mix with `routing @ weight`, batch folded",
        "  into groups, one `F.conv2d`). loop: mixed weights, one `F.conv2d` per example. ours:",
        "  `cond_conv2d(..., backend=\"cpu\")`.",
        "- floor = static + one read of the E expert kernels (expert bytes / streaming bandwidth); the",
        "  targets are ours <= grouped, inference <= 1.3 x floor, fwd+bwd <= 1.5 x floor.",
        "- dW write (fwd+bwd rows, context only, not part of the floor): `torch.empty_like(weight).fill_(1)`,",
        "  the cost of producing a fresh E-expert weight gradient, which every competitor but the static",
        "  conv pays; on this virtual machine first-touch page faults make it far slower than the bandwidth.",
        ("- default mode: (B, E) in " + ", ".join(f"({b}, {e})" for b, e in DEFAULT_BATCH_EXPERTS)
         + f" for every shape; naive MoE / loop skipped where they would take more than {SKIP_SECONDS} s per call"
         " (`skip` below, estimate in the last column); the tiling study in inference only. `--full` runs"
         " B in {1, 8, 32} x E in {1, 4, 8, 32}, every competitor, both modes of the tiling study."
         if not args.full else "- full mode: every configuration and competitor."),
        "",
        "## Results (ms per call)",
        "",
        "| shape | B | E | mode | static | naive MoE | grouped | loop | ours | floor | ours/static "
        "| ours/grouped | ours/floor | <= grouped | <= floor target | dW write | skipped (estimate) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['experts']} | {r['mode']} | {fmt(r['static_ms'])} | "
            f"{fmt(r['naive_moe_ms'])} | {fmt(r['grouped_ms'])} | {fmt(r['loop_ms'])} | "
            f"{fmt(r['condkernels_ms'])} | {fmt(r['floor_ms'])} | {r['vs_static']:.2f} | {r['vs_grouped']:.2f} | "
            f"{r['vs_floor']:.2f} | {yes(r['not_slower_than_grouped'])} | {yes(r['within_floor_target'])} | "
            f"{fmt(r['expert_grad_write_ms']) if r['mode'] == 'fwd+bwd' else ''} | {r['skipped']} |"
        )
    n = len(rows)
    lines += [
        "",
        "## Targets",
        "",
        f"- never slower than the grouped-conv trick: {sum(r['not_slower_than_grouped'] for r in rows)} of {n} rows",
        f"- inference within 1.3 x floor: {sum(r['within_floor_target'] for r in rows if r['mode'] == 'inference')}"
        f" of {sum(r['mode'] == 'inference' for r in rows)} rows",
        f"- fwd+bwd within 1.5 x floor: {sum(r['within_floor_target'] for r in rows if r['mode'] == 'fwd+bwd')}"
        f" of {sum(r['mode'] == 'fwd+bwd' for r in rows)} rows",
    ]
    if tiling:
        lines += [
            "",
            "## Tile size of the mix + GEMM path",
            "",
            f"`{TILING_ENV}=whole` mixes every output channel of a run of examples before the GEMMs",
            "(strategy (a): materialise the per-example weights); `tiled` walks output-channel tiles whose",
            "mixed weights fit the L2 budget and mixes each expert tile for every example while it is in",
            "cache (strategy (b)); `auto` is what the kernel chooses (`plan_tiling` in",
            "csrc/cpu/cond_conv2d.cpp).",
            "",
            "| shape | B | E | mode | whole | tiled | auto |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in tiling:
            lines.append(f"| {r['shape']} | {r['batch']} | {r['experts']} | {r['mode']} | {r['whole_ms']:.2f} | "
                         f"{r['tiled_ms']:.2f} | {r['auto_ms']:.2f} |")
    lines.append("")
    (ROOT / "docs" / "benchmarks_cond_conv2d_cpu.md").write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="every configuration and competitor")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, 5 with --full)")
    parser.add_argument("--skip-tiling", action="store_true", help="leave out the whole/tiled study")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    args.rounds = args.rounds or (5 if args.full else 3)
    torch.set_num_threads(args.threads)
    bandwidth, rows, tiling = run(args)
    machine = machine_description(bandwidth)
    if not args.no_write:
        write_reports(machine, rows, tiling, args)
        print(f"wrote {ROOT / 'docs' / 'benchmarks_cond_conv2d_cpu.md'} and docs/results/bench_cond_conv2d_cpu.*")


if __name__ == "__main__":
    main()
