"""Checks of arguments shared by the models, the engines, the data pipeline, the evaluation and
the tools, and the names of the dtypes a network computes in."""

import numbers
import operator
import os
from typing import Any

# A run's ``config.compute_dtype`` (its network's arithmetic); evaluation and the tools take one of
# them or ``"run"``, the run's own.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
EVAL_COMPUTE_DTYPES = (*COMPUTE_DTYPES, "run")


def check_int(value, name: str, *, minimum: int, static: bool = False) -> int:
  """``value`` as an ``int``: ``TypeError`` unless an integer, ``ValueError`` below ``minimum``.

  ``static``: shapes depend on it, so a JAX array (traced or not) is refused too.

  >>> check_int(3, "depth", minimum=1)
  3
  """
  kind = "a Python integer (static: shapes depend on it)" if static else "an integer"
  if isinstance(value, bool):
    raise TypeError(f"`{name}` must be {kind}, got a bool.")
  if static and not isinstance(value, numbers.Integral):
    raise TypeError(f"`{name}` must be {kind}, got {value!r}.")
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(f"`{name}` must be {kind}, got {type(value).__name__}.") from None
  if value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
  return value


def positive_ints(values: Any, name: str, count: int, expected: str, *,
                  given: Any = None) -> tuple[int, ...]:
  """``values`` as ``count`` positive ints (NumPy integers too); else a ``ValueError`` that says
  ``name`` must be ``expected`` and shows ``given`` (default ``values``)."""
  try:
    ints = tuple(check_int(value, name, minimum=1) for value in values)
  except (TypeError, ValueError):  # Not iterable, or not positive ints.
    ints = ()
  if len(ints) != count:
    raise ValueError(f"`{name}` must be {expected}, got {values if given is None else given!r}.")
  return ints


def names_folder(path: str) -> bool:
  """Whether ``path`` names a folder: one that exists, or a path ending in a separator.

  >>> names_folder("runs/new/"), names_folder("runs/new/embeddings.npy")
  (True, False)
  """
  return os.path.isdir(path) or path.endswith(("/", os.sep))
