"""pytest-benchmark versions of the key cases of ``python -m condkernels.bench``:

    pytest bench/ --benchmark-only

The cases and competitors are the runner's own (condkernels/bench/); this file only picks a few
and hands their calls to pytest-benchmark, grouped by case so each group compares the methods.
"""

import functools

import pytest
import torch

from condkernels.bench import batch_shaping, condconv, gated
from condkernels.bench.cases import Config
from condkernels.bench.runner import num_threads

CONFIG = Config(device=torch.device("cpu"), dtype=torch.float32, full=False, rounds=5, round_s=0.02, skip_s=None)

CASES = {
    "condconv pointwise": (lambda: condconv.make_case(CONFIG, "pw512", 8, 8, "inference"),
                           ("static", "grouped", "condkernels:cpu")),
    "condconv depthwise": (lambda: condconv.make_case(CONFIG, "dw512", 8, 8, "inference"),
                           ("static", "grouped", "condkernels:cpu")),
    "condconv 3x3 fwd+bwd": (lambda: condconv.make_case(CONFIG, "c3x3", 1, 8, "fwd+bwd"),
                             ("static", "grouped", "condkernels:cpu")),
    "gated in_gate d=0.5": (lambda: gated.inference_case(CONFIG, 128, 128, 28, 1, 8, "in", 0.5),
                            ("naive", "loop", "condkernels:cpu")),
    "batch_shaping_loss 256x4096": (lambda: batch_shaping.loss_case(CONFIG, 256, 4096),
                                    ("naive", "condkernels:cpu")),
    "beta_cdf (0.6, 0.4)": (lambda: batch_shaping.cdf_case(CONFIG, 0.6, 0.4), ("naive", "condkernels:cpu")),
}


@functools.lru_cache(maxsize=None)
def built(name):
    case = CASES[name][0]()
    return case, case.setup()


@pytest.mark.parametrize("name,method", [(n, m) for n, (_, methods) in CASES.items() for m in methods])
def test_bench(benchmark, name, method):
    case, calls = built(name)
    benchmark.group = case.name
    with num_threads(case.threads):
        benchmark(calls[method])
