"""Input checks, numerically safe primitives and pytree registration shared by every loss.

Checks run at trace time on shapes and dtypes, so they cost nothing under ``jit``. Label values are
checked only when they are concrete; under ``jit`` an out-of-range label turns that example's loss
into NaN instead (see :func:`nan_where_invalid`).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def register_dataclass(cls: type) -> type:
  """Registers the dataclass ``cls`` as a pytree: fields whose metadata says ``static`` are part
  of the structure, the others are children (attribute keys in paths). Returns ``cls``.

  Not ``jax.tree_util.register_dataclass``: in jax 0.10.2 (and so in ``flax.struct``) the
  structures of two classes registered by it compare equal whatever the class when their leaves
  and static fields do, and ``jit``'s caches then now and then run one class's program for the
  other's (in about 1% of processes, the tests' all-margin program ran CombinedMargin's for
  CurricularFace). A node registered with its own functions compares its class.
  """
  fields = dataclasses.fields(cls)
  children = tuple(f.name for f in fields if not f.metadata.get("static"))
  static = tuple(f.name for f in fields if f.metadata.get("static"))

  keys = tuple(jax.tree_util.GetAttrKey(name) for name in children)

  def flatten(obj):
    return [getattr(obj, name) for name in children], tuple(getattr(obj, name) for name in static)

  def flatten_with_keys(obj):
    values, static_values = flatten(obj)
    return list(zip(keys, values)), static_values

  def unflatten(static_values, child_values):
    return cls(**dict(zip(children, child_values)), **dict(zip(static, static_values)))

  jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
  return cls


def check_floating(name: str, x: Any, rank: int | tuple[int, ...]) -> None:
  """Raises unless ``x`` is a floating array of the given rank(s)."""
  if isinstance(x, (list, tuple)):  # jnp.result_type's error would not name the argument.
    raise TypeError(f"`{name}` must be a floating array, got a {type(x).__name__}.")
  ranks = (rank,) if isinstance(rank, int) else rank
  shape = np.shape(x)
  if len(shape) not in ranks:
    want = " or ".join(str(r) for r in ranks)
    raise ValueError(f"`{name}` must have rank {want}, got shape {shape}.")
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(f"`{name}` must be a floating array, got dtype {jnp.result_type(x)}.")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  """Raises unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def check_flag(name: str, value: Any) -> None:
  """Raises unless ``value`` is a Python (or NumPy) bool, or 0 or 1: it picks the formula, so a
  traced one cannot, and ``"no"`` would read as true."""
  if not (isinstance(value, (bool, np.bool_))
          or isinstance(value, (int, np.integer)) and value in (0, 1)):
    raise TypeError(f"`{name}` must be a bool (it picks the formula), got {value!r}.")


def check_range(label: str, value: Any, holds: Callable[[np.ndarray], Any], rule: str) -> None:
  """Raises ``ValueError`` (``"<label> must be <rule>, got <value>."``) unless ``holds`` is true
  for every element of ``value``; a tracer passes (its value is unknown)."""
  if not isinstance(value, jax.core.Tracer) and not np.all(holds(np.asarray(value))):
    raise ValueError(f"{label} must be {rule}, got {value}.")


def check_labels(labels: Any, batch_size: int, num_classes: int | None = None) -> Any:
  """Raises unless ``labels`` is an integer vector of length ``batch_size``.

  When the labels are concrete (not traced) and ``num_classes`` is given, values outside
  ``[0, num_classes)`` raise too.

  Returns:
    ``labels`` as a signed array of at least 32 bits, so that comparing them with a class count
    cannot overflow their dtype (``uint8`` labels and 256 classes) and -1 can mark an example
    (an unsigned label of ``2^31`` or more, out of range anyway, becomes negative).
  """
  if not isinstance(labels, (jax.Array, np.ndarray)):  # A list, of tracers under jit or vmap.
    traced = any(isinstance(label, jax.core.Tracer) for label in jax.tree.leaves(labels))
    labels = jnp.asarray(labels) if traced else np.asarray(labels)
  shape = np.shape(labels)
  if len(shape) != 1:
    raise ValueError(f"`labels` must have rank 1 ([batch]), got shape {shape}.")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise TypeError(f"`labels` must be integers, got dtype {labels.dtype}.")
  if shape[0] != batch_size:
    raise ValueError(f"`labels` has length {shape[0]} but the batch has {batch_size} examples.")
  if num_classes is not None and not isinstance(labels, jax.core.Tracer):
    values = np.asarray(labels)  # Before the cast below, which wraps large unsigned labels.
    bad = (values < 0) | (values >= num_classes)
    if bad.any():
      raise ValueError(
          f"`labels` must lie in [0, {num_classes}); got {values[bad][:5].tolist()} "
          f"at positions {np.flatnonzero(bad)[:5].tolist()}.")
  if labels.dtype.itemsize < 4 or jnp.issubdtype(labels.dtype, jnp.unsignedinteger):
    labels = labels.astype(np.int64 if labels.dtype.itemsize == 8 else np.int32)
  return labels


def check_embeddings_and_weights(embeddings: Any, weights: Any,
                                 weights_rank: int | tuple[int, ...] = 2,
                                 name: str = "weights") -> None:
  """Checks ``embeddings [B, D]`` and ``weights [C, D]`` (``[C, K, D]`` with sub-centres),
  called ``name`` in the errors."""
  check_floating("embeddings", embeddings, 2)
  check_floating(name, weights, weights_rank)
  dim = np.shape(embeddings)[1]
  if np.shape(weights)[-1] != dim:
    raise ValueError(
        f"`{name}` has feature dimension {np.shape(weights)[-1]} but `embeddings` has {dim} "
        f"({name} are [num_classes, dim], one row per class).")
  if 0 in np.shape(weights):  # No class, no sub-centre or no feature: nothing to score.
    raise ValueError(f"`{name}` has shape {np.shape(weights)}; every dimension must be at "
                     "least 1.")


def check_classification_inputs(embeddings: Any, weights: Any, labels: Any) -> None:
  """Checks ``embeddings [B, D]``, ``weights [C, D]`` and ``labels [B]``."""
  check_embeddings_and_weights(embeddings, weights)
  check_labels(labels, np.shape(embeddings)[0], np.shape(weights)[0])


def common_float_dtype(*arrays: Any) -> jnp.dtype:
  """The float dtype all ``arrays`` fit in: the widest, or float32 for a 16-bit mix.

  Written out because strict dtype promotion (rightly) refuses to mix float widths implicitly.
  """
  dtypes = {jnp.dtype(jnp.result_type(array)) for array in arrays}
  if len(dtypes) == 1:
    return dtypes.pop()
  widest = max(dtypes, key=lambda dtype: dtype.itemsize)
  return widest if widest.itemsize >= 4 else jnp.dtype(jnp.float32)


def compute_dtype(*arrays: Any) -> jnp.dtype:
  """Float32, or wider when an input is wider: softmax statistics never run in 16 bits."""
  return common_float_dtype(jnp.zeros((), jnp.float32), *arrays)


def safe_norm_floor(dtype: Any) -> float:
  """Smallest norm a vector of ``dtype`` is divided by when it is normalised.

  1e-12 (as ``torch.nn.functional.normalize``), and 1e-2 for float16, whose gradients would
  otherwise overflow: the gradient of ``x / |x|`` is about ``1 / |x|`` times the incoming one.
  """
  return 1e-2 if jnp.dtype(dtype) == jnp.float16 else 1e-12


def floor_dtype_of(*arrays_or_dtypes: Any) -> jnp.dtype:
  """The dtype whose :func:`safe_norm_floor` norms are floored at: float16 when any input is
  (a gradient cast back to it must not overflow, whatever the other inputs' width), else their
  common float dtype."""
  dtypes = [jnp.dtype(jnp.result_type(a)) for a in arrays_or_dtypes]
  return jnp.dtype(jnp.float16) if jnp.float16 in dtypes else common_float_dtype(*dtypes)


def safe_norm(x: Array, *, axis: int = -1, floor_dtype: Any = None) -> Array:
  """``max(|x|, floor)`` along ``axis`` (keepdims), computed in ``x.dtype``.

  ``floor_dtype`` (default ``x.dtype``) picks the floor (:func:`safe_norm_floor`): pass the
  caller's input dtype when ``x`` was upcast. Below the floor the gradient is exactly zero;
  above it, ``sqrt`` then divide keeps the gradient of huge norms from underflowing (an
  ``rsqrt`` would take ``|x|^-3``).
  """
  floor = safe_norm_floor(x.dtype if floor_dtype is None else floor_dtype)
  squared = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  above = squared > floor * floor
  return jnp.where(above, jnp.sqrt(jnp.where(above, squared, 1)), floor)


def l2_normalize(x: Array, *, axis: int = -1, floor_dtype: Any = None) -> Array:
  """``x / max(|x|, floor)``: unit vectors, and zero for a zero vector (finite gradient)."""
  return x / safe_norm(x, axis=axis, floor_dtype=floor_dtype)


def safe_sqrt(x: Array) -> Array:
  """``sqrt(max(x, 0))`` whose gradient stays finite at 0 (it is 0 there)."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def nan_where_invalid(values: Array, labels: Array, num_classes: int) -> Array:
  """Per-example ``values``, with NaN where the label is outside ``[0, num_classes)``."""
  valid = (labels >= 0) & (labels < num_classes)
  return jnp.where(valid, values, jnp.asarray(jnp.nan, values.dtype))


def varying_axes(a: Any) -> frozenset[str]:
  """The manual mesh axes (inside a ``shard_map``) over which ``a`` differs between devices."""
  return jax.typeof(a).manual_axis_type.varying


def batch_axes(x: Array) -> tuple[str, ...]:
  """The Explicit mesh axes that split ``x``'s leading (batch) axis, in order; empty where none
  do (or its type does not say, as under Auto axes)."""
  spec = jax.typeof(x).sharding.spec
  axes = spec[0] if len(spec) else None
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def gathered(x: Array) -> Array:
  """``x`` whole on every device, if Explicit mesh axes split it (else as is): for work that needs
  the whole batch at once, such as comparing its examples with each other or sorting them."""
  sharding = jax.typeof(x).sharding
  if all(axis is None for axis in sharding.spec):
    return x
  return jax.reshard(x, sharding.update(spec=jax.P()))


def split_like(x: Array, reference: Array) -> Array:
  """``x [B, ...]`` split over the mesh like ``reference [B, ...]`` on the leading axis, where
  Explicit mesh axes split either: split as ``reference`` is, or whole where it is whole."""
  sharding = jax.typeof(reference).sharding
  if sharding.spec[0] is None:
    own = jax.typeof(x).sharding
    return jax.reshard(x, own.update(spec=jax.P())) if own.spec[0] is not None else x
  return jax.reshard(x, sharding.update(spec=jax.P(sharding.spec[0])))


def _split_axes(x: Array) -> tuple[str, ...]:
  """The manual axes ``x`` varies over, in the mesh's order: the order in which a ``shard_map``
  spec that names them as the mesh does (``P(("replica", "data"))``) splits the batch."""
  varying = varying_axes(x)
  return tuple(name for name in jax.sharding.get_abstract_mesh().axis_names if name in varying)


def whole_batch(x: Array) -> Array:
  """``x [b, ...]``, a part of the batch, as the whole batch ``[B, ...]`` on every device: inside
  a ``shard_map`` all-gathered over the manual axes ``x`` varies over, in the mesh's order
  (:func:`own_rows` takes this device's part back), under Explicit mesh axes :func:`gathered`."""
  axes = _split_axes(x)
  return jax.lax.all_gather(x, axes, tiled=True, to="invarying") if axes else gathered(x)


def own_rows(whole: Array, part: Array) -> Array:
  """This device's rows of ``whole`` (a :func:`whole_batch` of ``part``), split like ``part``."""
  axes = _split_axes(part)
  if not axes:
    return split_like(whole, part)
  size = part.shape[0]
  return jax.lax.dynamic_slice_in_dim(whole, jax.lax.axis_index(axes) * size, size)


def whole_rows(x: Array) -> Array:
  """``x [N, ...]`` whole in every dimension but the first on each device, if Explicit mesh axes
  split another (e.g. the embedding dimension of ``W``, as FSDP splits parameters); as is
  otherwise. Its gradient comes back split as ``x`` was."""
  sharding = jax.typeof(x).sharding
  if all(axis is None for axis in tuple(sharding.spec)[1:]):
    return x
  return jax.reshard(x, sharding.update(spec=jax.P(sharding.spec[0])))


def take_rows(table: Array, indices: Array) -> Array:
  """``table[indices]``: ``[B, ...]`` rows of ``table [N, ...]`` at ``indices [B]``, split over
  the mesh like ``indices``. Where Explicit mesh axes split the batch and each device holds the
  whole table, each device takes the rows of the whole batch and keeps its own, so that the
  gradient reaches ``table`` by an all-gather of ``[B, ...]`` rather than a sum of ``[N, ...]``
  over the devices. Where they split the table's rows (a sharded head's, or centres beside it),
  each device takes the rows it holds and a sum of ``[B, ...]`` over the devices completes them:
  the table is not gathered."""
  table = jnp.asarray(table)
  return split_like(table.at[gathered(indices)].get(out_sharding=gathered_rows_sharding(table)),
                    indices)


def gathered_rows_sharding(table: Array) -> jax.sharding.NamedSharding | None:
  """The ``out_sharding`` for rows taken from ``table [N, ...]`` by indices every device holds:
  whole on every device where Explicit mesh axes split the table's rows (each device takes those
  it holds, and XLA sums them over the devices), ``None`` (indexing's own) otherwise."""
  sharding = jax.typeof(table).sharding
  return sharding.update(spec=jax.P()) if sharding.spec[0] is not None else None
