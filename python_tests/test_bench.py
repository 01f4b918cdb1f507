"""The benchmark runner: competitors equal the ops, and a tiny run writes well-formed rows and a report."""

import csv
import json
import os

import pytest
import torch

import condkernels
from condkernels.bench import batch_shaping, cases, competitors, condconv, gated, models, runner, timing
from condkernels.bench.runner import check_outputs


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stride,padding,groups,bias", [(1, 1, 1, True), (2, "same", 2, False), (1, 0, 4, True)])
def test_cond_competitors_equal_the_reference(stride, padding, groups, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 9, 9, generator=gen, dtype=torch.float64)
    routing = torch.rand(3, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(4, 12, 8 // groups, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(4, 12, generator=gen, dtype=torch.float64) if bias else None
    args = (x, routing, weight, b, stride, padding, 1, groups)
    expected = condkernels.cond_conv2d(*args, backend="reference")
    _close(competitors.cond_grouped(*args), expected)
    _close(competitors.cond_loop(*args), expected)
    # static: the same shape with expert 0 alone == cond_conv2d routed entirely to expert 0
    one_hot = torch.zeros_like(routing)
    one_hot[:, 0] = 1
    _close(competitors.cond_static(*args), condkernels.cond_conv2d(x, one_hot, *args[2:], backend="reference"))


@pytest.mark.parametrize("stride,padding,groups,sides", [(1, 1, 1, "both"), (2, "same", 2, "in"), (1, 0, 1, "out")])
def test_gated_competitors_equal_the_reference(stride, padding, groups, sides):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 7, 7, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, 8 // groups, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(6, generator=gen, dtype=torch.float64)
    in_gate = (torch.rand(3, 8, generator=gen) < 0.5).double() * 1.5 if sides in ("both", "in") else None
    out_gate = (torch.rand(3, 6, generator=gen) < 0.5).double() if sides in ("both", "out") else None
    args = (x, weight, bias, in_gate, out_gate, stride, padding, 1, groups)
    expected = condkernels.gated_conv2d(*args, backend="reference")
    _close(competitors.gated_grouped(*args), expected)
    _close(competitors.gated_loop(*args), expected)
    _close(competitors.gated_static(*args), condkernels.gated_conv2d(x, weight, bias, None, None, *args[5:],
                                                                      backend="reference"))


def test_ops_replaced_swaps_the_op_inside_modules_and_restores_it():
    layer = condkernels.nn.CondConv2d(4, 4, 3, padding=1, num_experts=2).eval()
    x = torch.randn(2, 4, 5, 5)
    seen = []

    def spy(*args, **kwargs):
        seen.append(1)
        return competitors.cond_grouped(*args, **kwargs)

    with torch.no_grad():
        expected = layer(x)
        with competitors.ops_replaced(cond=spy):
            got = layer(x)
        layer(x)
    assert len(seen) == 1
    _close(got, expected)


def test_lower_vector_isa_methods_cap_the_kernels_during_each_call():
    """--paths times the CPU op capped at every instruction set below the CPU's, and only then."""
    below = {"avx512": ["avx2", "none"], "avx2": ["none"], "none": []}[condkernels.cpu_vector_isa()]
    seen = []
    methods = cases.with_lower_vector_isas("m", lambda: seen.append(condkernels.cpu_vector_isa()))
    assert list(methods) == [f"m isa={isa}" for isa in below]
    for call in methods.values():
        call()
    assert seen == below
    assert "CONDKERNELS_CPU_ISA" not in os.environ


def test_check_outputs_flags_a_wrong_competitor():
    a = torch.ones(10)
    result = check_outputs({"x": a, "y": a.clone(), "z": a * 1.01}, ("x", "y", "z"))
    assert result["y"] == "ok" and result["z"].startswith("differs")


@pytest.fixture
def tiny_suites(monkeypatch):
    """Minuscule shapes in every suite and small floor measurements."""
    monkeypatch.setitem(timing.STREAM_BYTES, "cpu", 8 << 20)
    monkeypatch.setitem(timing.GEMM_SIZE, "cpu", 256)
    monkeypatch.setitem(condconv.SHAPES, "tiny", ("tiny 3x3 16->16 @8x8", 16, 16, 1, 3, 8, 1, 1))
    monkeypatch.setattr(condconv, "QUICK", [("tiny", 2, 1, ("inference",)), ("tiny", 2, 4, ("inference", "fwd+bwd")),
                                            ("tiny", 2, 8, ("inference",))])
    monkeypatch.setattr(gated, "QUICK", [(16, 16, 8, 1, 2, "in", (0.25, 0.5, 1.0)), (8, 16, 8, 2, 2, "out", (0.5,))])
    monkeypatch.setattr(gated, "QUICK_TRAINING", [(16, 8, 2, (0.5,))])
    monkeypatch.setattr(batch_shaping, "QUICK_LOSS", [(16, 32)])
    monkeypatch.setattr(batch_shaping, "CDF_VALUES", 1 << 10)
    monkeypatch.setattr(models, "RESOLUTION", 32)
    monkeypatch.setattr(models, "CC_EXPERTS", (2,))


def test_tiny_run_writes_rows_csv_plots_and_report(tiny_suites, tmp_path, capsys):
    argv = ["--threads", "1", "--rounds", "2", "--out", str(tmp_path)]
    assert runner.main(argv + ["--suite", "condconv", "--suite", "gated", "--filter", "B=2"]) == 0
    assert runner.main(argv + ["--suite", "batch_shaping", "--suite", "models"]) == 0
    data = json.loads((tmp_path / "results" / "benchmarks.json").read_text())
    rows = data["rows"]
    assert {r["suite"] for r in rows} == {"condconv", "gated", "batch_shaping", "models"}
    assert len(data["runs"]) == 2  # the second run kept the first one's rows
    for r in rows:
        for field in ("device_name", "threads", "torch", "condkernels", "date", "case", "method", "floor_ms"):
            assert r[field] not in (None, ""), (field, r)
        assert r["condkernels"] == condkernels.__version__ and r["device"] == "cpu"
    cases = {r["case"] for r in rows if r["suite"] in ("condconv", "gated")}
    assert len(cases) == 3 + 1 + 4 + 1
    timed = [r for r in rows if r["time_ms"] is not None]
    # Every competitor of the op suites was timed, and gave the op's result.
    for r in rows:
        if r["suite"] in ("condconv", "gated"):
            assert r["time_ms"] is not None and r["time_ms"] > 0, r
            assert r["check"] in ("", "ok"), r
    # No method beats the machine's floor by much (tiny cases sit far above it).
    for r in timed:
        if r["method"].startswith("condkernels:") and r["floor_ms"] > 0:
            assert r["vs_floor"] > 0.8, r
    assert any(r["method"] == "naive" and r["time_ms"] for r in rows if r["op"] == "batch_shaping_loss")
    mobilenet = [r for r in rows if r["op"] == "cc_mobilenet_v1"]
    assert {r["method"] for r in mobilenet} >= {"static", "naive", "grouped", "loop", "condkernels:cpu"}
    assert all(r["check"] in ("", "ok") for r in mobilenet)

    with open(tmp_path / "results" / "benchmarks.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and float(csv_rows[0]["floor_ms"]) == rows[0]["floor_ms"]

    pngs = sorted((tmp_path / "figures").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"cpu_condconv_time_vs_experts.png", "cpu_gated_time_vs_density.png"} <= names
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    md = (tmp_path / "benchmarks.md").read_text()
    for heading in ("## Targets", "## cond_conv2d (cpu)", "## gated_conv2d (cpu)", "## batch_shaping_loss",
                    "## Networks"):
        assert heading in md
    for case in cases:
        assert f"| {case.split(': ', 1)[1]} |" in md
    assert "figures/cpu_condconv_time_vs_experts.png" in md
    # Every table row has as many cells as its header.
    for block in md.split("\n\n"):
        table = [line for line in block.splitlines() if line.startswith("|")]
        if table:
            assert len({line.count(" | ") for line in table[:1] + table[2:]}) == 1, table[0]

    (tmp_path / "benchmarks.md").unlink()
    assert runner.main(["--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "benchmarks.md").read_text() == md


def test_a_run_cut_short_keeps_the_rows_of_the_cases_it_finished(tiny_suites, tmp_path, monkeypatch):
    argv = ["--threads", "1", "--rounds", "2", "--out", str(tmp_path), "--suite", "condconv", "--filter", "B=2"]
    assert runner.main(argv + ["--filter", "E=8 "]) == 0  # the case the cut run will not reach
    earlier = json.loads((tmp_path / "results" / "benchmarks.json").read_text())["rows"]
    measure = runner.run_case
    finished = []

    def stop_at_the_third_case(case, *args):
        if len(finished) == 2:
            raise KeyboardInterrupt  # as a time limit or a lost machine would stop the run
        finished.append(case.name)
        return measure(case, *args)

    monkeypatch.setattr(runner, "run_case", stop_at_the_third_case)
    with pytest.raises(KeyboardInterrupt):
        runner.main(argv)
    data = json.loads((tmp_path / "results" / "benchmarks.json").read_text())
    kept = {r["case"] for r in data["rows"]}
    assert len(finished) == 2 and set(finished) <= kept
    assert {r["case"] for r in earlier} <= kept  # the earlier run's rows stay beside them
    assert len(data["runs"]) == 2
    assert not list((tmp_path / "results").glob("*.tmp"))
    assert runner.main(["--report-only", "--out", str(tmp_path)]) == 0
    assert "## cond_conv2d (cpu)" in (tmp_path / "benchmarks.md").read_text()
