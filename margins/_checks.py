"""Checks of arguments shared by the models, the data pipeline and the evaluation."""

import operator


def check_int(value, name: str, *, minimum: int) -> int:
  """``value`` as an ``int``: ``TypeError`` unless an integer, ``ValueError`` below ``minimum``.

  >>> check_int(3, "depth", minimum=1)
  3
  """
  if isinstance(value, bool):
    raise TypeError(f"`{name}` must be an integer, got a bool.")
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(f"`{name}` must be an integer, got {type(value).__name__}.") from None
  if value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
  return value
