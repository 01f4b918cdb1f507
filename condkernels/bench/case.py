"""A benchmark case: one shape and mode, its competitors, its floor and its targets."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from . import timing
from .report import Result

Competitors = dict  # method name -> zero-argument callable (None: skipped as too slow here)


@dataclasses.dataclass
class Case:
    suite: str
    label: str
    mode: str  # "inference" or "training"
    params: dict
    make: Callable[[object], Competitors]  # builds inputs and competitors for a run Context
    ours: str
    floor: Optional[Callable[[object], float]] = None
    judge: Optional[Callable[[dict, Optional[float]], list]] = None  # (times, floor) -> [(desc, met)]

    def run(self, ctx) -> list[Result]:
        competitors = self.make(ctx)
        timed = {name: fn for name, fn in competitors.items() if fn is not None}
        times = timing.time_in_turn(timed, ctx.device, ctx.repeats, ctx.min_run_time)
        times = {name: times.get(name) for name in competitors}
        floor = self.floor(ctx) if self.floor else None
        targets = self.judge(times, floor) if self.judge else []
        return [Result(self.suite, self.label, self.mode, self.params, times, self.ours, floor, targets)]
