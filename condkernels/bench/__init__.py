"""The benchmark runner: ``python -m condkernels.bench`` (see ``--help``).

Suites, one module each: ``condconv`` (cond_conv2d), ``gated`` (gated_conv2d), ``batch_shaping``
(batch_shaping_loss, beta_cdf) and ``models`` (batch-1 latency of whole networks). Each suite
builds its cases (:class:`~condkernels.bench.cases.Case`), and from the result rows writes its part
of the report and judges its targets. :mod:`~condkernels.bench.runner` times the cases against
the machine's floors and writes the rows; :mod:`~condkernels.bench.report` turns the rows into
docs/benchmarks.md and the plots.
"""

from . import batch_shaping, condconv, gated, models

SUITES = {"condconv": condconv, "gated": gated, "batch_shaping": batch_shaping, "models": models}

__all__ = ["SUITES", "main"]


def main(argv=None):
    from .runner import main as run_main

    return run_main(argv)
