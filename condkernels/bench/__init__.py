"""Benchmarks of condkernels against the naive formulations, the tricks in use, and the machine's floors.

Run ``python -m condkernels.bench --help``. Suites live in ``condkernels/bench/suites/<name>.py`` and
expose ``cases(ctx) -> list[Case]`` (and optionally ``plot(results, path_stem) -> list[str]``).
"""
