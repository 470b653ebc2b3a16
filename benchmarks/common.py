"""Shared by the benchmarks: the matmul floor, and interleaved timing robust to a shared
machine's drifting speed."""

import statistics
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from margins import parallel


def dot(a, b, contract):
  """``a . b`` over dimensions ``contract`` (two tuples), accumulated in float32."""
  return jax.lax.dot_general(a, b, ((contract[0], contract[1]), ((), ())),
                             preferred_element_type=jnp.float32)


def floor(x, w, matmul_dtype=None):
  """The three matmuls of a forward and backward pass, the logits standing in for ``g``.

  Inputs in their dtype (or cast to ``matmul_dtype`` first, as the engines cast a float32
  ``W``), float32 accumulation, outputs in the inputs' dtypes.
  """
  xm, wm = (x, w) if matmul_dtype is None else (x.astype(matmul_dtype), w.astype(matmul_dtype))
  g = dot(xm, wm, ((1,), (1,))).astype(xm.dtype)
  return dot(g, wm, ((1,), (0,))).astype(x.dtype), dot(g, xm, ((0,), (0,))).astype(w.dtype)


def chunked_floor(x, w, chunk_size):
  """:func:`floor`'s matmuls chunk by chunk over the classes, as the chunked engine runs them,
  and nothing else: ``g_c = x W_c^T``; ``dx`` sums ``g_c W_c``; ``g_c^T x`` fills ``dW``'s rows.

  Its time over the floor's is what looping over chunks costs on its own (slicing ``W``, the
  buffer of ``dW``, the smaller matmuls), before any softmax.
  """
  # pylint: disable=protected-access
  def body(carry, start, size):  # W and its gradient sliced and updated as the engine does.
    dx, dw = carry
    w_chunk = parallel._rows_slice(w, start, size)
    g = dot(x, w_chunk, ((1,), (1,))).astype(x.dtype)
    dw = parallel._rows_update(dw, dot(g, x, ((0,), (0,))).astype(w.dtype), start)
    return dx + dot(g, w_chunk, ((1,), (0,))), dw

  init = (jnp.zeros(x.shape, jnp.float32), parallel._scratch_like(w))
  dx, dw = parallel._for_each_chunk(w.shape[0], chunk_size, body, init)
  return dx.astype(x.dtype), parallel._from_bits(dw, w.dtype)


def memory_bytes(compiled) -> tuple[int, int]:
  """``(temporaries, in all)`` of ``compiled`` (per device); in all: arguments, outputs and
  temporaries, less aliased outputs."""
  stats = compiled.memory_analysis()
  return stats.temp_size_in_bytes, (stats.argument_size_in_bytes + stats.output_size_in_bytes
                                    + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


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
