"""Interleaved timing shared by the benchmarks: robust to a shared machine's drifting speed."""

import statistics
import time
from collections.abc import Callable, Mapping


def interleaved(timers: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
  """Seconds of each ``name: fn`` (which must block until done), round by round.

  Every function runs once first (warm-up, compilation); then each round runs all of them in
  turn, so that a slow spell of the machine hits all of them alike.
  """
  for fn in timers.values():
    fn()
  times = {name: [] for name in timers}
  for _ in range(repeats):
    for name, fn in timers.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def median_ratio(times: list[float], reference: list[float]) -> float:
  """Median over the rounds of ``times / reference`` taken within each round."""
  return statistics.median(t / r for t, r in zip(times, reference, strict=True))
