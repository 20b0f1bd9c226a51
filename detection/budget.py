"""Training length planned from a wall-clock budget (``train.time_budget``).

The plan is made once: the loop runs, the throughput is measured over a window of iterations after
the first ones (which pay for allocator warm-up and the data workers' start), and the number of
iterations that fits the rest of the budget becomes the training length, capped by
``train.max_iters``. The plan is part of the training state, so ``--resume`` continues it instead of
measuring again; for a fixed machine speed it is deterministic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["IterationPlan"]


class IterationPlan:
    """Fits the training length into ``budget`` seconds of the training loop.

    Args:
        budget: wall-clock seconds for the training iterations (evaluation and final outputs not included).
        max_iters: the cap: the length when the budget would allow more, and the provisional length
            (for the lr schedule's shape) until the plan is made.
        window: ``(first, last)`` iterations between which the throughput is measured. The default
            starts at iteration 400: on the quickstart the iterations before it ran about 10 % faster than
            the rest.
        clock: seconds as a float (a fake clock in tests).
    """

    def __init__(self, budget: float, max_iters: int, *, window: tuple[int, int] = (400, 600),
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if not 0 < window[0] < window[1]:
            raise ValueError(f"window must be 0 < first < last, got {window}")
        self.budget, self.cap, self.window, self.clock = float(budget), int(max_iters), window, clock
        self.planned: int | None = None
        self.seconds_per_iter: float | None = None
        self._start: float | None = None
        self._window_start: float | None = None

    @property
    def max_iters(self) -> int:
        """The planned length once made, else the cap."""
        return self.planned if self.planned is not None else self.cap

    def start(self, iteration: int) -> None:
        """The loop starts (or resumes) at ``iteration``; a resumed run before the plan measures afresh."""
        self._start = self.clock()
        self._window_start = None
        if self.planned is None and iteration >= self.window[0]:
            self.window = (iteration + 1, iteration + 1 + self.window[1] - self.window[0])

    def observe(self, iteration: int) -> int | None:
        """Call after each iteration (1-based count done); returns the new length when the plan is made now."""
        if self.planned is not None or self._start is None:
            return None
        first, last = self.window
        if iteration == first:
            self._window_start = self.clock()
        if iteration != last or self._window_start is None:
            return None
        now = self.clock()
        self.seconds_per_iter = (now - self._window_start) / (last - first)
        remaining = self.budget - (now - self._start)
        fits = last + math.floor(max(remaining, 0.0) / max(self.seconds_per_iter, 1e-9))
        self.planned = max(last, min(self.cap, fits))
        return self.planned

    def describe(self) -> str:
        """One line for the log: the measured speed and the length it gave."""
        capped = " (capped by train.max_iters)" if self.planned == self.cap else ""
        return (f"time budget {self.budget:.0f}s: {self.seconds_per_iter:.3f} s/iteration measured over iterations "
                f"{self.window[0] + 1}-{self.window[1]}, so {self.planned} iterations{capped}")

    def state_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "cap": self.cap, "planned": self.planned,
                "seconds_per_iter": self.seconds_per_iter, "window": list(self.window)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a plan; a checkpoint from before the plan (or without one) leaves it to be made."""
        if state.get("planned") is not None:
            self.planned = int(state["planned"])
            self.seconds_per_iter = state.get("seconds_per_iter")
            self.window = tuple(state.get("window", self.window))  # type: ignore[assignment]
