"""Softmax engines: the cross-entropy of a margin softmax over many classes.

Every engine computes the same per-example loss for every :class:`~margins.Margin`,

.. math::
    \\ell_b = \\log\\Big(e^{t_b} + \\sum_{j \\ne y_b} e^{f(s_{bj})}\\Big) - t_b
              (+ \\text{the margin's regulariser}),

with the target logit :math:`t_b` and the non-target logits :math:`f(s_{bj})` of the margin, or,
for a ``one_vs_all`` margin (SphereFace2), its sum of per-class binary losses (softplus terms in
place of the exponentials, no running maximum). The engines differ in how the sum over classes
is formed:

- ``dense``: one ``[B, C]`` matrix of logits (plain autodiff: three matmuls, ``B x C`` memory);
- ``chunked``: classes in chunks with an online log-sum-exp and a ``custom_vjp``; each chunk's
  ``[B, c]`` scores wait for the backward pass in the chunk's rows of ``W``'s gradient buffer
  (all of them when ``B <= D``: three matmuls, like the floor) and the backward pass recomputes
  those that did not fit (up to a fourth matmul); temporaries ``O(B x chunk)`` whatever ``C``;
- ``sharded``: ``W`` split over the devices of a mesh on the class axis (model-parallel FC, as
  Partial FC): inside ``jax.shard_map`` the embeddings and labels are all-gathered, each device
  scores the global batch against its slice (dense or chunked), the row statistics are combined
  with ``pmax``/``psum`` of ``[B]`` vectors, and the gradient of ``W`` never leaves its device;
- any of them with ``sample_rate < 1`` (Partial FC sampling): per device, ``sample_rate`` of its
  classes (a fixed number), those of the global batch first and the rest drawn uniformly,
  reproducible from a PRNG key. To update the sampled rows alone, draw a :class:`RowSample`
  (:meth:`SoftmaxEngine.sample`), score ``engine.take(W, sample)`` with ``sample=`` and write the
  updated rows back with ``engine.put``: the gradient is the sample's ``[S, D]``, not ``W``'s.

The target class's row of ``W`` is gathered (``[B, D]``) to form ``t_b`` once per batch, so
margins that need the target before scoring negatives (CurricularFace) work chunk by chunk, and
the ``[B, C]`` logits are never gathered or scattered.
"""

import dataclasses
import fractions
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from margins._checks import check_int
from margins.losses import _common
from margins.losses.margin import Margin, Rows, check_batch_fields, check_margin, is_per_example

Array = jax.Array
AxisName = str | tuple[str, ...]


@_common.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSample:
  """Partial FC's rows of ``W`` for one step (:meth:`SoftmaxEngine.sample`).

  Attributes:
    index: ``[shards * S]`` sorted row indices within each shard's rows of ``W``, split over the
      mesh like ``W``; ``rows_per_shard`` (out of range) pads a shard's to whole chunks.
    num_rows: rows of the whole ``W`` (static).
    num_shards: the pieces ``W`` was split into when it was drawn (static): ``index`` holds
      rows within each piece, so only an engine with as many shards can use it.
  """
  index: Array
  num_rows: int = dataclasses.field(metadata=dict(static=True))
  num_shards: int = dataclasses.field(default=1, metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class SoftmaxEngine:
  """How the softmax over classes is computed; see the module docstring.

  Attributes:
    chunk_size: classes scored at once; ``None`` scores all (local) classes in one ``[B, C]`` block.
    mesh: shard classes (and the batch) over this mesh; ``None`` runs on one device.
    axis_name: mesh axis (or axes) the classes and the batch are split over.
    sample_rate: Partial FC's fraction of (local) classes kept per step; 1.0 keeps all (see
      :func:`sampled_count`).
    matmul_dtype: dtype of the matmul inputs (e.g. ``jnp.bfloat16``); accumulation and softmax
      statistics stay in float32. ``None`` uses the inputs' dtype.
    keep_scores: chunks only: keep each chunk's ``[B, c]`` scores from the forward pass for the
      backward pass in the chunk's rows of ``W``'s gradient buffer, for as many examples as fit
      there (``D`` for a float32 ``W``, ``D / 2`` for a 16-bit one), and recompute the others'
      (three matmuls when ``B <= D``, four when all are recomputed: ``False``). Either way the
      temporaries are bounded by the chunk; keeping holds a ``W``-sized residual between the
      forward and the backward pass.
  """
  chunk_size: int | None = None
  mesh: jax.sharding.Mesh | None = None
  axis_name: AxisName | None = None
  sample_rate: float = 1.0
  matmul_dtype: Any = dataclasses.field(default=None, compare=False)
  keep_scores: bool = True
  # ``matmul_dtype`` as engines compare and hash it (they are static arguments of ``jit``):
  # NumPy's float64 dtype compares equal to ``None``, which would share one compiled program.
  _matmul_dtype_name: str | None = dataclasses.field(default=None, init=False, repr=False)

  def __post_init__(self):
    if self.chunk_size is not None:
      object.__setattr__(self, "chunk_size",
                         check_int(self.chunk_size, "chunk_size", minimum=1, static=True))
    if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, numbers.Real):
      raise TypeError(f"`sample_rate` must be a Python number (static), got {self.sample_rate!r}.")
    if not 0 < self.sample_rate <= 1:
      raise ValueError(f"`sample_rate` must be in (0, 1], got {self.sample_rate}.")
    if isinstance(self.axis_name, list):  # Hashable, as ``jit``'s static arguments must be.
      object.__setattr__(self, "axis_name", tuple(self.axis_name))
    if self.matmul_dtype is not None:
      matmul_dtype = jnp.dtype(self.matmul_dtype)
      if not jnp.issubdtype(matmul_dtype, jnp.floating):
        raise TypeError(f"`matmul_dtype` must be a floating dtype (or None), got {matmul_dtype}.")
      object.__setattr__(self, "matmul_dtype", matmul_dtype)
      object.__setattr__(self, "_matmul_dtype_name", matmul_dtype.name)
    if not isinstance(self.keep_scores, (bool, np.bool_)):
      raise TypeError(f"`keep_scores` must be True or False, got {self.keep_scores!r}.")
    if (self.mesh is None) != (self.axis_name is None):
      raise ValueError("`mesh` and `axis_name` go together: give both (sharded) or neither.")
    if self.mesh is not None:
      missing = set(_axes(self.axis_name)) - set(self.mesh.axis_names)
      if missing:
        raise ValueError(f"`axis_name` {sorted(missing)} not in the mesh axes "
                         f"{self.mesh.axis_names}.")
      if len(set(_axes(self.axis_name))) < len(_axes(self.axis_name)):
        raise ValueError(f"`axis_name` {self.axis_name} names a mesh axis twice.")

  @property
  def num_shards(self) -> int:
    """How many pieces ``W`` is split into."""
    if self.mesh is None:
      return 1
    return math.prod(self.mesh.shape[a] for a in _axes(self.axis_name))

  def __call__(
      self, embeddings: Array, weights: Array, labels: Array, margin: Margin, *,
      num_classes: int | None = None, key: Array | None = None,
      sample: RowSample | None = None) -> tuple[Array, Margin]:
    """Per-example margin softmax losses.

    Args:
      embeddings: ``[B, D]``.
      weights: class centres ``[C', D]`` (``[C', K, D]`` for sub-centres), ``C' >= num_classes``:
        rows past ``num_classes`` are padding (a sharded ``W`` needs ``C'`` divisible by the
        number of shards, see :func:`padded_num_classes`) and never score.
      labels: ``[B]`` integers in ``[0, num_classes)``; an out-of-range label gives NaN (or an
        error when the labels are concrete).
      margin: a :class:`~margins.Margin`.
      num_classes: the number of real classes; default ``C'``.
      key: PRNG key, required when ``sample_rate < 1`` (and no ``sample``); pass a new one
        each step (``jax.random.fold_in(key, step)``): the same key draws the same negatives.
      sample: ``weights`` holds only these rows of ``W`` (``self.take(W, sample)``): the loss
        over them, with gradients for them alone (Partial FC updating only its sampled rows).
        Every label must be among them (:meth:`sample` keeps the batch's classes); an example
        whose class is not gets NaN.

    Returns:
      ``(losses [B], margin)``: float32 (or wider) losses, and the margin with this batch's
      statistics folded in (the new state of CurricularFace / AdaFace).
    """
    check_margin(margin)
    manual = set(self.mesh.axis_names if self.mesh else ()) & set(
        jax.sharding.get_abstract_mesh().manual_axes)
    if manual:
      raise ValueError(
          f"sharded(mesh, {self.axis_name!r}) runs its own shard_map over its mesh, whose axes "
          f"{sorted(manual)} this call is inside: call it on the global `weights`, embeddings "
          "and labels (under jit), or inside your shard_map use dense() or chunked() with "
          "`weights` whole.")
    _common.check_embeddings_and_weights(embeddings, weights, (2, 3))
    check_batch_fields(margin, np.shape(embeddings)[0])  # In a shard_map, the device's examples.
    # The labels' range is checked below, against ``W``'s rows: with ``sample`` they index all of
    # ``W``, not the sample's rows that ``weights`` holds.
    _common.check_labels(labels, np.shape(embeddings)[0])
    if sample is not None:
      self._check_sample(sample)
    rows_total = np.shape(weights)[0] if sample is None else sample.num_rows
    if sample is not None and np.shape(sample.index) != (np.shape(weights)[0],):
      raise ValueError(f"`weights` must be the {np.shape(sample.index)[0]} rows of `sample`, "
                       f"got {np.shape(weights)[0]}: pass engine.take(weights, sample).")
    num_classes = rows_total if num_classes is None else check_int(
        num_classes, "num_classes", minimum=1, static=True)
    if num_classes > rows_total:
      raise ValueError(f"`num_classes` must be in [1, {rows_total}] (rows of `weights`), got "
                       f"{num_classes}.")
    labels = _common.check_labels(labels, np.shape(embeddings)[0], num_classes)
    if self.sample_rate < 1 and key is None and sample is None:
      raise ValueError("`key` is required when `sample_rate` < 1 (Partial FC sampling).")
    if np.shape(embeddings)[0] == 0:  # No loss, no gradient, no statistics to fold in.
      return jnp.zeros((0,), _common.compute_dtype(embeddings, weights)), margin
    if self.mesh is None:
      class_axes = jax.typeof(weights).sharding.spec[0]
      if class_axes is not None:
        raise ValueError(
            f"`weights` are split over the mesh axes {class_axes!r} on the class dimension (an "
            f"Explicit sharding); split the classes with margins.sharded(mesh, {class_axes!r}) "
            "or replicate `weights`.")
    return _engine_loss(embeddings, weights, labels, margin, key, sample, engine=self,
                        num_classes=num_classes)

  def sample(self, labels: Array, *, num_rows: int, num_classes: int | None = None,
             key: Array) -> RowSample:
    """Partial FC's rows of ``W`` for one step, to update those rows alone.

    The loss of ``self(x, self.take(W, sample), labels, margin, sample=sample)`` has gradients
    for the sampled rows only (``[shards * S, ...]``, not ``W``-sized); :meth:`put` writes the
    updated rows (and their optimizer state) back.

    Per shard, :func:`sampled_count` of the fullest shard's classes (the same count on every
    shard; padding rows not counted) but never fewer than the batch's examples (nor more than
    its rows), so that every class of the batch is kept (insightface's rule, with
    a static count): those of the batch first, the rest uniformly random, as the engine draws
    for itself from the same key when the counts agree.

    Args:
      labels: ``[B]`` labels of the global batch (of every micro-batch the sample serves).
      num_rows: rows of ``W`` (:func:`padded_num_classes` rows for a sharded engine).
      num_classes: the number of real classes; default ``num_rows``.
      key: PRNG key; the same key gives the same sample, so pass a new one each step.
    """
    num_rows = check_int(num_rows, "num_rows", minimum=1, static=True)
    num_classes = num_rows if num_classes is None else check_int(
        num_classes, "num_classes", minimum=1, static=True)
    if num_rows % self.num_shards or num_classes > num_rows:
      raise ValueError(f"`num_rows` ({num_rows}) must be divisible by the {self.num_shards} "
                       f"shards and hold the `num_classes` ({num_classes}).")
    per_shard = num_rows // self.num_shards
    count = min(per_shard, max(sampled_count(min(per_shard, num_classes), self.sample_rate),
                               np.shape(labels)[0]))
    padded, _ = _sample_layout(count, self.chunk_size)
    # Signed and at least 32 bits, as the engine takes them: the index (in the labels' dtype)
    # must hold ``per_shard``, its padding, and -1.
    labels = _common.gathered(_common.check_labels(labels, np.shape(labels)[0], num_classes))

    def draw(labels, key, start):
      local_labels, num_valid = _shard_labels(labels, start, per_shard, num_classes)
      if count == per_shard:
        index = jnp.arange(per_shard, dtype=local_labels.dtype)
      else:
        index = sample_classes(local_labels, per_shard, num_valid, count, key)
      return _padded(index, padded, per_shard)

    if self.mesh is None:
      return RowSample(draw(labels, key, 0), num_rows, self.num_shards)

    def each_shard(labels, key):
      shard = _shard_index(self.axis_name)
      return draw(labels, jax.random.fold_in(key, shard), shard * per_shard)

    index = jax.shard_map(each_shard, mesh=self.mesh, in_specs=(jax.P(), jax.P()),
                          out_specs=jax.P(self.axis_name))(labels, key)
    return RowSample(index, num_rows, self.num_shards)

  def take(self, weights: Array, sample: RowSample) -> Array:
    """``[shards * S, ...]``: the rows of ``weights`` (``W``, or optimizer state shaped like it)
    in ``sample``, split like ``weights`` (under Explicit axes: as it came); padding rows are
    zero."""
    return self._each_shard(lambda w, i: w.at[i].get(mode="fill", fill_value=0),
                            jnp.asarray(weights), sample)

  def put(self, weights: Array, sample: RowSample, rows: Array) -> Array:
    """``weights`` with its rows in ``sample`` replaced by ``rows`` (shaped as :meth:`take`
    gives them; padding rows are dropped), split as ``weights`` came."""
    want = (np.shape(sample.index)[0], *np.shape(weights)[1:])
    if np.shape(rows) != want:
      raise ValueError(f"`rows` must be shaped {want}, as `take` gives them; got "
                       f"{np.shape(rows)}.")
    return self._each_shard(lambda w, i, r: w.at[i].set(r, mode="drop"), jnp.asarray(weights),
                            sample, rows)

  def _check_sample(self, sample: RowSample) -> None:
    if sample.num_shards != self.num_shards:
      raise ValueError(f"The sample was drawn for {sample.num_shards} shards of `W`; this engine "
                       f"splits it into {self.num_shards}.")

  def _each_shard(self, fn, weights, sample, *rows):
    self._check_sample(sample)
    if np.shape(weights)[0] != sample.num_rows:
      raise ValueError(f"`weights` has {np.shape(weights)[0]} rows; the sample was drawn from "
                       f"{sample.num_rows}.")
    if self.mesh is None:
      return fn(weights, sample.index, *rows)
    args = (weights, sample.index, *rows)
    split = _explicit_split(self)
    if split is not None:  # Split as ``shard_map`` needs; given back split as ``weights`` came.
      given = jax.NamedSharding(self.mesh, jax.typeof(weights).sharding.spec)
      args = jax.reshard(args, split)
    spec = jax.P(self.axis_name)
    out = jax.shard_map(fn, mesh=self.mesh, in_specs=(spec,) * len(args), out_specs=spec)(*args)
    return out if split is None else jax.reshard(out, given)


@functools.partial(jax.jit, static_argnames=("engine", "num_classes"))
def _engine_loss(embeddings, weights, labels, margin, key, sample, *, engine, num_classes):
  """:meth:`SoftmaxEngine.__call__` past its checks. Compiled as one program when called eagerly
  (op by op, a sharded engine's call on 8 examples took 5 s, its Partial FC 7 s); under an
  outer ``jit`` it is inlined."""
  if engine.mesh is None:
    # Explicit axes splitting the embedding dimension (or sub-centres) are gathered: the
    # engines split only the examples (and, sharded, the classes).
    embeddings, weights = _common.whole_rows(embeddings), _common.whole_rows(weights)
    labels = _common.split_like(labels, embeddings)  # As the examples, where these are split.
    losses, margin = _local_loss(embeddings, weights, labels, margin, key, sample, engine=engine,
                                 num_classes=num_classes)
  else:
    losses, margin = _sharded_loss(embeddings, weights, labels, margin, key, sample,
                                   engine=engine, num_classes=num_classes)
  return _common.nan_where_invalid(losses, labels, num_classes), margin


def dense(*, matmul_dtype: Any = None, sample_rate: float = 1.0) -> SoftmaxEngine:
  """All ``[B, C]`` logits at once on one device: the loss zoo's engine.

  Called as ``engine(embeddings [B, D], weights [C, D], labels [B], margin)`` (see
  :meth:`SoftmaxEngine.__call__`), it returns ``(losses [B], margin)``, the margin with this
  batch's running statistics (CurricularFace, AdaFace) folded in.

  >>> import jax, jax.numpy as jnp, margins
  >>> x = jax.random.normal(jax.random.key(0), (4, 8))   # [B, D]
  >>> w = jax.random.normal(jax.random.key(1), (10, 8))  # [C, D]
  >>> y = jnp.array([0, 3, 3, 9])                        # [B]
  >>> losses, _ = margins.dense()(x, w, y, margins.ArcFace())
  >>> losses.shape, bool(jnp.allclose(losses, margins.arcface_loss(x, w, y)))
  ((4,), True)
  """
  return SoftmaxEngine(matmul_dtype=matmul_dtype, sample_rate=sample_rate)


def chunked(chunk_size: int = 8192, *, matmul_dtype: Any = None, sample_rate: float = 1.0,
            keep_scores: bool = True) -> SoftmaxEngine:
  """``chunk_size`` classes at a time on one device: memory ``B x chunk_size`` whatever ``C``.

  On a CPU the fastest size moves from run to run (256, 512 and 8,192 classes at ``D = 512`` each
  were fastest in some runs of ``benchmarks/engines.py``). On a GPU larger is faster: on an H200
  at ``B = 256``, chunks of 65,536 took 0.72-0.79x the time of the default's (README). The
  default keeps a chunk's ``[B, chunk_size]`` scores small for large global batches.

  Same call and result as :func:`dense`, to float tolerance (``C`` need not divide into chunks):

  >>> import jax, jax.numpy as jnp, margins
  >>> x = jax.random.normal(jax.random.key(0), (4, 8))
  >>> w = jax.random.normal(jax.random.key(1), (10, 8))
  >>> y = jnp.array([0, 3, 3, 9])
  >>> losses, _ = margins.chunked(4)(x, w, y, margins.ArcFace())
  >>> bool(jnp.allclose(losses, margins.arcface_loss(x, w, y), rtol=1e-5))
  True
  """
  return SoftmaxEngine(chunk_size=chunk_size, matmul_dtype=matmul_dtype, sample_rate=sample_rate,
                       keep_scores=keep_scores)


def sharded(mesh: jax.sharding.Mesh, axis_name: AxisName | None = None, *,
            chunk_size: int | None = None, sample_rate: float = 1.0,
            matmul_dtype: Any = None, keep_scores: bool = True) -> SoftmaxEngine:
  """Classes split over ``axis_name`` of ``mesh`` (default: all its axes), batch data-parallel.

  Under Explicit mesh axes (all or some) the inputs are resharded to that split if they arrive
  otherwise, and the losses come back split as the labels came. ``W`` has
  :func:`padded_num_classes` rows so that it splits evenly (the padding rows never score);
  ``chunk_size`` chunks each device's slice (``None``: one block); ``sample_rate < 1`` is
  Partial FC, which takes a ``key``.

  >>> import jax, jax.numpy as jnp, margins
  >>> mesh = jax.make_mesh((jax.device_count(),), ("model",))
  >>> rows = margins.padded_num_classes(10, mesh.size)  # C = 10 classes
  >>> x = jax.random.normal(jax.random.key(0), (8, 16))
  >>> w = jnp.zeros((rows, 16)).at[:10].set(jax.random.normal(jax.random.key(1), (10, 16)))
  >>> y = jnp.arange(8)
  >>> losses, _ = margins.sharded(mesh)(x, w, y, margins.ArcFace(), num_classes=10)
  >>> bool(jnp.allclose(losses, margins.arcface_loss(x, w[:10], y), rtol=1e-5))
  True
  >>> partial_fc = margins.sharded(mesh, sample_rate=0.5)
  >>> partial_fc(x, w, y, margins.ArcFace(), num_classes=10, key=jax.random.key(2))[0].shape
  (8,)

  References:
    An et al., "Partial FC: Training 10 Million Identities on a Single Machine", ICCVW 2021;
    An et al., "Killing Two Birds with One Stone: Efficient and Robust Training of Face
    Recognition CNNs by Partial FC", CVPR 2022.
  """
  axis_name = tuple(mesh.axis_names) if axis_name is None else axis_name
  return SoftmaxEngine(chunk_size=chunk_size, mesh=mesh, axis_name=axis_name,
                       sample_rate=sample_rate, matmul_dtype=matmul_dtype,
                       keep_scores=keep_scores)


def padded_num_classes(num_classes: int, num_shards: int) -> int:
  """Rows to allocate for ``W`` so that it splits evenly into ``num_shards`` pieces.

  >>> padded_num_classes(10, 4), padded_num_classes(93_431, 8)
  (12, 93432)
  """
  num_classes = check_int(num_classes, "num_classes", minimum=1, static=True)
  num_shards = check_int(num_shards, "num_shards", minimum=1, static=True)
  return -(-num_classes // num_shards) * num_shards


def margin_softmax_loss(
    embeddings: Array, weights: Array, labels: Array, margin: Margin, *,
    engine: SoftmaxEngine | None = None, num_classes: int | None = None,
    key: Array | None = None) -> Array:
  """Per-example loss ``[B]`` of ``margin`` computed by ``engine`` (default :func:`dense`).

  >>> import jax, jax.numpy as jnp, margins
  >>> x = jax.random.normal(jax.random.key(0), (4, 8))
  >>> w = jax.random.normal(jax.random.key(1), (10, 8))
  >>> y = jnp.array([0, 3, 3, 9])
  >>> dense = margins.margin_softmax_loss(x, w, y, margins.ArcFace())
  >>> chunks = margins.margin_softmax_loss(x, w, y, margins.ArcFace(), engine=margins.chunked(4))
  >>> bool(jnp.allclose(dense, chunks, rtol=1e-5))
  True
  """
  engine = dense() if engine is None else engine
  if not isinstance(engine, SoftmaxEngine):
    raise TypeError(f"`engine` must be a SoftmaxEngine (margins.dense(), chunked(), sharded()), "
                    f"got {engine!r}.")
  return engine(embeddings, weights, labels, margin, num_classes=num_classes, key=key)[0]


# ---------------------------------------------------------------------------------------------
# Building blocks, shared by all engines.
# ---------------------------------------------------------------------------------------------


def _axes(axis_name: AxisName) -> tuple[str, ...]:
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _dot(a: Array, b: Array, contract: tuple[int, int], out_dtype: Any,
         out_sharding: Any = None) -> Array:
  """``a . b`` over dimensions ``contract`` of each, accumulated in ``out_dtype``."""
  return jax.lax.dot_general(a, b.astype(a.dtype), (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=out_dtype, out_sharding=out_sharding)


def _sharding_like(w: Array) -> Any:
  """The ``out_sharding`` of an array like ``w`` (its gradient, a buffer), for where XLA cannot
  infer one (a sum over a batch split on an Explicit axis): ``w``'s partition spec on the mesh in
  context, even where ``w`` was traced without a mesh; else ``w``'s sharding, if on a mesh."""
  sharding = jax.typeof(w).sharding
  if jax.sharding.get_abstract_mesh().empty:
    return None if sharding.mesh.empty else sharding
  return sharding.spec


def _inverse_norms(w: Array, floor_dtype: Any, out_dtype: Any) -> tuple[Array, Array]:
  """``(1 / |W_j|, 1 / |W_j|^2)`` of the rows of ``w [c, D]``; the second is 0 below the norm
  floor, where the norm is a constant (no radial gradient)."""
  norms = _common.safe_norm(w.astype(out_dtype), floor_dtype=floor_dtype)[:, 0]
  inverse = 1 / norms
  return inverse, jnp.where(norms > _common.safe_norm_floor(floor_dtype), inverse * inverse, 0)


def _scores(x_in: Array, w: Array, norms: tuple[Array, Array] | None) -> Array:
  """``[B, c]`` float32 ``<x_in, W_j>`` of the rows of ``w [c, D]``, divided by their norms when
  ``norms`` (their :func:`_inverse_norms`) are given."""
  scores = _dot(x_in, w, (1, 1), _common.compute_dtype(x_in, w))
  return scores if norms is None else scores * norms[0][None, :]


def _scores_pullback(x_in: Array, w: Array, g: Array,
                     norms: tuple[Array, Array] | None) -> tuple[Array, Array]:
  """``(dx_in, dW)`` from the cotangent ``g [B, c]`` of :func:`_scores` (``norms``: the
  :func:`_inverse_norms` of ``w [c, D]`` when they normalise it): two matmuls, no scores needed.
  ``dx_in`` stays in ``g``'s (float32) dtype, for the chunked engine to sum over chunks.

  Through ``W_j / |W_j|``, ``dW_j = H_j - (W_j . H_j) W_j / |W_j|^2`` with the matmul
  ``H = (g / |W|)^T x``: one pass over ``[c, D]`` instead of reducing ``g`` over the batch (a slow
  column reduction).
  """
  if norms is not None:
    g = g * norms[0][None, :]
  scaled = g.astype(x_in.dtype)
  dx = _dot(scaled, w, (1, 0), g.dtype)
  dw = _dot(scaled, x_in, (0, 0), g.dtype, out_sharding=_sharding_like(w))  # sums the batch
  if norms is not None:
    w_wide = w.astype(g.dtype)
    dw = dw - (jnp.sum(w_wide * dw, axis=1) * norms[1])[:, None] * w_wide
  return dx, dw.astype(w.dtype)


def _normalized_dot(x_in: Array, w: Array, floor_dtype: Any) -> Array:
  """``[B, c]`` ``<x_in, W_j / |W_j|>`` without materialising the normalised ``W``."""
  return _normalized_dot_vjp(*_vary_together((x_in, w)), floor_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _normalized_dot_vjp(x_in: Array, w: Array, floor_dtype: Any) -> Array:
  return _normalized_dot_fwd(x_in, w, floor_dtype)[0]


def _normalized_dot_fwd(x_in, w, floor_dtype):
  norms = _inverse_norms(w, floor_dtype, _common.compute_dtype(x_in, w))
  return _scores(x_in, w, norms), (x_in, w, norms)


def _normalized_dot_bwd(floor_dtype, residuals, g):
  del floor_dtype
  x_in, w, norms = residuals
  dx, dw = _scores_pullback(x_in, w, g, norms)
  return dx.astype(x_in.dtype), dw


_normalized_dot_vjp.defvjp(_normalized_dot_fwd, _normalized_dot_bwd)


def _best_subcentre(scores: Array, w_shape: tuple[int, ...]) -> Array:
  """``[B, c]`` best of the sub-centres' ``scores [B, c K]`` for ``w [c, K, D]`` (else as is)."""
  if len(w_shape) == 2:
    return scores
  return _max_over_last(scores.reshape(scores.shape[0], *w_shape[:2]))


@jax.custom_jvp
def _max_over_last(values: Array) -> Array:
  """``jnp.max(values, axis=-1)`` over a short last axis (the ``K`` sub-centres) as ``K - 1``
  elementwise maxima; ties share the derivative equally, as with ``jnp.max``.

  On XLA:CPU, reducing a minor axis of a few elements, as ``jnp.max`` and its derivative (which
  counts the ties) do, is several times slower than one pass over the array.
  """
  return functools.reduce(jnp.maximum, _unstack_last(values))


@_max_over_last.defjvp
def _max_over_last_jvp(primals, tangents):
  (values,), (dvalues,) = primals, tangents
  best = _max_over_last(values)
  hits = values == best[..., None]
  ties = functools.reduce(jnp.add, _unstack_last(hits.astype(values.dtype)))
  return best, jnp.sum(jnp.where(hits, dvalues, 0), axis=-1) / ties


def _unstack_last(values: Array) -> list[Array]:
  return [values[..., k] for k in range(values.shape[-1])]


def _all_scores(x_in: Array, w: Array, *, normalize_weights: bool, floor_dtype: Any) -> Array:
  """``[B, c K]`` ``<x_in, W_j>`` of every centre of ``w [c, (K,) D]`` (``W_j`` normalised if
  asked): float32, float64 for float64 inputs."""
  flat = w.reshape(-1, x_in.shape[1])
  if normalize_weights:
    return _normalized_dot(x_in, flat, floor_dtype)
  return _scores(x_in, flat, None)


def _similarity(x_in: Array, w: Array, *, normalize_weights: bool, floor_dtype: Any) -> Array:
  """``[B, c]`` ``<x_in, W_j>`` as :func:`_all_scores`, the best sub-centre's."""
  scores = _all_scores(x_in, w, normalize_weights=normalize_weights, floor_dtype=floor_dtype)
  return _best_subcentre(scores, w.shape)


def similarity(x: Array, w: Array, margin: Margin) -> Array:
  """``[B, C]`` scores for closed-set prediction (float32, float64 for float64 inputs): the
  similarity the margin scores with.

  ``cos(x, W_j)`` when the margin normalises both, ``<x, W_j / |W_j|>`` or ``<x, W_j>`` otherwise;
  the best sub-centre for ``w [C, K, D]``. ``argmax`` over classes is the predicted class; for a
  ``W`` padded to split its classes (:func:`padded_num_classes`), cut the scores to the real
  classes first (``[:, :C]``).

  >>> import jax, jax.numpy as jnp, margins
  >>> x = jax.random.normal(jax.random.key(0), (4, 8))   # [B, D]
  >>> w = jax.random.normal(jax.random.key(1), (10, 8))  # [C, D]
  >>> scores = margins.similarity(x, w, margins.ArcFace())
  >>> scores.shape, bool((jnp.abs(scores) <= 1).all())
  ((4, 10), True)
  """
  margin = check_margin(margin)
  _common.check_embeddings_and_weights(x, w, (2, 3))
  floor_dtype = _common.floor_dtype_of(x, w)
  x_wide = x.astype(_common.compute_dtype(x))
  if margin.normalize_embeddings:
    x_wide = _common.l2_normalize(x_wide, floor_dtype=floor_dtype)
  return _similarity(x_wide, w, normalize_weights=margin.normalize_weights,
                     floor_dtype=floor_dtype)


def _chunk_logits(scores, w_shape, start, rows, margin, local_labels, num_valid):
  """``[B, c]`` non-target logits of classes ``start .. start + c`` from their :func:`_scores`
  (``w_shape``: the chunk's ``[c, D]`` or ``[c, K, D]``), in the rows' dtype (float64 for float64
  embeddings, whatever the matmul's); target and padding ``-inf``."""
  scores = _best_subcentre(scores, w_shape).astype(rows.cos.dtype)
  logits = _checked_shape(margin, "nontarget_logits", margin.nontarget_logits(scores, rows),
                          scores.shape)
  ids = start + jnp.arange(w_shape[0], dtype=local_labels.dtype)
  excluded = (local_labels[:, None] == ids[None, :]) | (ids >= num_valid)[None, :]
  return jnp.where(excluded, -jnp.inf, logits)


def _target_rows(x_unit, norms, w, local_labels, floor_dtype, axis_name,
                 normalize_weights) -> Rows:
  """Cosine to the target centre and the norms, from the gathered target rows of ``w``.

  ``local_labels`` is -1 where the target class lives on another shard; the owner's values are
  summed over ``axis_name``. Of sub-centres, the target's is the one every class is scored
  with: the best cosine, or the best ``<x, W_k>`` when the margin keeps ``W``'s norms.
  """
  owned = local_labels >= 0
  target_w = _common.take_rows(w, jnp.maximum(local_labels, 0)).astype(x_unit.dtype)  # [B, (K,) D]
  if w.ndim == 3:
    norms_k = _common.safe_norm(target_w, floor_dtype=floor_dtype)[..., 0]
    cos_k = jnp.einsum("bd,bkd->bk", x_unit, target_w) / norms_k
    best = jnp.argmax(cos_k if normalize_weights else cos_k * norms_k, axis=-1)[:, None]
    cos = jnp.take_along_axis(cos_k, best, axis=-1)[:, 0]
    weight_norm = jnp.take_along_axis(norms_k, best, axis=-1)[:, 0]
  else:
    weight_norm = _common.safe_norm(target_w, floor_dtype=floor_dtype)[:, 0]
    cos = jnp.sum(x_unit * target_w, axis=-1) / weight_norm
  zero = jnp.zeros_like(cos)
  cos, weight_norm = jnp.where(owned, cos, zero), jnp.where(owned, weight_norm, zero)
  if axis_name is not None:
    cos, weight_norm, owners = jax.lax.psum(
        (cos, weight_norm, owned.astype(jnp.int32)), axis_name)
    owned = owners > 0
  return Rows(cos=jnp.clip(cos, -1, 1), embedding_norm=norms, weight_norm=weight_norm,
              valid=owned)


def _combine(max_, sum_, axis_name):
  """Merges per-shard row statistics ``(max, sum of exp(logit - max))`` over ``axis_name``."""
  if axis_name is None:
    return max_, sum_
  global_max = jax.lax.pmax(max_, axis_name)
  return global_max, jax.lax.psum(sum_ * jnp.exp(max_ - global_max), axis_name)


def _for_each_chunk(num_rows: int, chunk_size: int, body: Callable, carry):
  """``carry = body(carry, start, size)`` over ``[0, num_rows)`` in chunks (static ``size``)."""
  num_full = num_rows // chunk_size
  if num_full:
    carry = jax.lax.fori_loop(
        0, num_full, lambda i, c: body(c, i * chunk_size, chunk_size), carry)
  remainder = num_rows - num_full * chunk_size
  if remainder:
    carry = body(carry, num_full * chunk_size, remainder)
  return carry


def _rows_slice(w, start, size):
  return _from_bits(jax.lax.dynamic_slice_in_dim(_bits(w), start, size, axis=0), w.dtype)


def _rows_update(buffer, rows, start):
  """``buffer`` (a :func:`_scratch_like` of ``W``) with ``rows`` (in ``W``'s dtype) written
  over its rows from ``start``."""
  return jax.lax.dynamic_update_slice_in_dim(buffer, _bits(rows), start, axis=0)


def _bits_dtype(dtype: Any) -> Any:
  """``uint16`` for ``bfloat16`` on a CPU, else ``dtype``: the dtype the loops over chunks
  slice and update ``W``-sized arrays in.

  XLA:CPU widens a ``bfloat16`` array to float32 to slice or update it, which in a loop copies
  all of ``W`` at every chunk (10x the floor's time at C = 100k), while integers it slices and
  updates in place. Accelerators slice ``bfloat16`` in place, and there the bitcast
  could cost a copy of ``W``.
  """
  if jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu":
    return jnp.uint16
  return dtype


def _bits(a: Array) -> Array:
  """``a`` bitcast to :func:`_bits_dtype`. For ``W``, XLA:CPU makes one copy of the bits,
  outside the loop."""
  dtype = _bits_dtype(a.dtype)
  return a if dtype == a.dtype else jax.lax.bitcast_convert_type(a, dtype)


def _from_bits(bits: Array, dtype: Any) -> Array:
  """The inverse of :func:`_bits` for an array of ``dtype``."""
  return bits if bits.dtype == dtype else jax.lax.bitcast_convert_type(bits, dtype)


def _dense_stats(x_in, w, rows, margin, local_labels, num_valid, stabilizer, floor_dtype,
                 axis_name):
  """Row statistics ``(max, sum exp(logit - max))`` of the non-target logits, in one block.

  The max starts from ``stabilizer`` (the target logit) so that it is finite; it carries no
  gradient (the loss does not depend on it).
  """
  scores = _all_scores(x_in, w, normalize_weights=margin.normalize_weights,
                       floor_dtype=floor_dtype)
  logits = _chunk_logits(scores, w.shape, 0, rows, margin, local_labels, num_valid)
  max_ = jax.lax.stop_gradient(_running_max(margin, stabilizer, logits))
  sum_ = jnp.sum(margin.row_terms(logits, max_), axis=1)
  return _combine(max_, sum_, axis_name)


def _running_max(margin, max_, logits):
  """The row maximum after a chunk of ``[B, c]`` logits (a softmax's); ``one_vs_all`` margins
  keep theirs at 0."""
  return max_ if margin.one_vs_all else jnp.maximum(max_, jnp.max(logits, axis=1))


def _kept_rows(batch: int, w: Array, score_dtype: Any) -> int:
  """How many examples' scores fit in a class's row of a buffer like ``w [C, (K,) D]``: ``K``
  scores per example in ``K D`` words, so ``D`` examples for a float32 ``w`` (``D / 2`` for
  16-bit), at most ``batch``."""
  word, score_size = jnp.dtype(w.dtype).itemsize, jnp.dtype(score_dtype).itemsize
  if score_size % word:
    return 0
  return min(batch, w.shape[-1] * word // score_size)


def _store_scores(buffer: Array, scores: Array, start: Array | int, size: int) -> Array:
  """``buffer [C, ...]`` with ``scores [b, size K]`` written over its rows ``start ..
  start + size``, in an order only :func:`_load_scores` reads back (no transpose)."""
  words = jax.lax.bitcast_convert_type(scores, buffer.dtype).reshape(size, -1)
  flat = buffer.reshape(buffer.shape[0], -1)
  return jax.lax.dynamic_update_slice(flat, words, (start, 0)).reshape(buffer.shape)


def _load_scores(buffer: Array, start: Array | int, size: int, shape: tuple[int, int],
                 dtype: Any) -> Array:
  """The ``scores`` of shape ``shape`` and ``dtype`` that :func:`_store_scores` wrote."""
  ratio = jnp.dtype(dtype).itemsize // jnp.dtype(buffer.dtype).itemsize
  flat = buffer.reshape(buffer.shape[0], -1)
  words = jax.lax.dynamic_slice(flat, (start, 0), (size, math.prod(shape) * ratio // size))
  return jax.lax.bitcast_convert_type(
      words.reshape(*shape, ratio) if ratio > 1 else words.reshape(shape), dtype)


def _chunked_stats(x_in, w, rows, margin, local_labels, num_valid, stabilizer,
                   chunk_size, floor_dtype, axis_name, keep_scores):
  """:func:`_dense_stats` chunk by chunk (online).

  The backward pass needs each chunk's ``[B, c]`` scores again. With ``keep_scores`` the forward
  pass writes the scores of the first :func:`_kept_rows` examples (all of them when ``B <= D``
  for float32 ``W``) into the chunk's rows of the buffer that becomes ``W``'s gradient, and the
  backward pass reads them back, chunk by chunk, before overwriting those rows with the chunk's
  gradient: the ``[B, C]`` scores live where the ``[C, D]`` gradient will. The backward pass
  recomputes the scores of the other examples (all of them without ``keep_scores``): three
  matmuls plus a fourth over the recomputed rows.
  """
  x_in, w, rows, margin, stabilizer = _vary_together((x_in, w, rows, margin, stabilizer))
  return _chunked_stats_vjp(x_in, w, rows, margin, local_labels, num_valid, stabilizer,
                            chunk_size, floor_dtype, axis_name, keep_scores)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _chunked_stats_vjp(x_in, w, rows, margin, local_labels, num_valid, stabilizer,
                       chunk_size, floor_dtype, axis_name, keep_scores):
  max_, sum_, _ = _online_stats(x_in, w, rows, margin, local_labels, num_valid, stabilizer,
                                chunk_size, floor_dtype, keep_scores=False)
  return _combine(max_, sum_, axis_name)


def _online_stats(x_in, w, rows, margin, local_labels, num_valid, stabilizer, chunk_size,
                  floor_dtype, keep_scores):
  """``(max, sum, buffer)``: the local row statistics and, if ``keep_scores``, a buffer shaped
  like ``w`` holding every chunk's scores of the first :func:`_kept_rows` examples (``None`` if
  none fit)."""
  def body(carry, start, size):
    max_, sum_, buffer = carry
    w_chunk, centres, chunk_norms = _chunk(x_in, w, start, size, margin, floor_dtype)
    scores = _scores(x_in, centres, chunk_norms)
    logits = _chunk_logits(scores, w_chunk.shape, start, rows, margin, local_labels, num_valid)
    new_max = jax.lax.stop_gradient(_running_max(margin, max_, logits))
    sum_ = sum_ * jnp.exp(max_ - new_max) + jnp.sum(margin.row_terms(logits, new_max), axis=1)
    if buffer is not None:
      buffer = _store_scores(buffer, scores[:kept], start, size)
    return new_max, sum_, buffer

  kept = _kept_rows(x_in.shape[0], w, _common.compute_dtype(x_in, w)) if keep_scores else 0
  stabilizer = jax.lax.stop_gradient(stabilizer)
  buffer = _scratch_like(w) if kept else None
  return _for_each_chunk(w.shape[0], chunk_size, body,
                         (stabilizer, jnp.zeros_like(stabilizer), buffer))


def _vary_together(tree: Any) -> Any:
  """``tree`` with each floating array cast to varying over every mesh axis any of them varies
  over: a ``custom_vjp``'s cotangents vary as its inputs do, and the casts' transposes sum them
  over the devices where an input was the same on each (``W`` whole in a caller's ``shard_map``
  over the batch)."""
  floating, rebuild = _floating_leaves(tree)
  axes = frozenset().union(*(_common.varying_axes(leaf) for leaf in floating))

  def vary(leaf):
    missing = tuple(sorted(axes - _common.varying_axes(leaf)))
    return jax.lax.pcast(jnp.asarray(leaf), missing, to="varying") if missing else leaf

  return rebuild([vary(leaf) for leaf in floating])


def _scratch_like(w: Array) -> Array:
  """An array like :func:`_bits` of ``w`` (shape, dtype, sharding; varying over the same mesh
  axes as ``w``) whose every element is written before it is read: uninitialised
  on GPU and TPU, which spares a pass filling ``[C, D]`` with zeros (XLA:CPU fills it anyway)."""
  scratch = _empty_like(jax.lax.stop_gradient(w))
  axes = tuple(sorted(_common.varying_axes(w)))
  return jax.lax.pcast(scratch, axes, to="varying") if axes else scratch


def _empty(w: Array) -> Array:
  return jax.lax.empty(w.shape, _bits_dtype(w.dtype), out_sharding=_sharding_like(w))


@jax.custom_batching.custom_vmap
def _empty_like(w: Array) -> Array:
  """:func:`_empty` of ``w``, batched under ``vmap`` only where ``w`` is.

  ``lax.empty`` has no operand, so ``vmap`` batches it wherever it is traced: under ``jax.hessian``
  (``vmap`` of ``jvp`` of the gradient) the buffers, and through them the gradient's primal,
  would come out batched, which ``jacfwd`` refuses. ``w`` only ties the buffer to the batching of
  the array it stands for; nothing reads it.
  """
  return _empty(w)


@_empty_like.def_vmap
def _empty_like_vmap(axis_size, in_batched, w):
  del axis_size, in_batched  # Called only where ``w`` is batched.
  return jax.vmap(_empty)(w), True


def _chunk(x_in, w, start, size, margin, floor_dtype):
  """Classes ``start .. start + size``: their rows of ``w``, their ``[size K, D]`` centres and,
  if the margin normalises them, the centres' :func:`_inverse_norms` (else ``None``)."""
  w_chunk = _rows_slice(w, start, size)
  centres = w_chunk.reshape(-1, w.shape[-1])
  norms = None
  if margin.normalize_weights:
    norms = _inverse_norms(centres, floor_dtype, _common.compute_dtype(x_in, w))
  return w_chunk, centres, norms


def _chunked_stats_fwd(x_in, w, rows, margin, local_labels, num_valid, stabilizer,
                       chunk_size, floor_dtype, axis_name, keep_scores):
  max_, sum_, buffer = _online_stats(x_in, w, rows, margin, local_labels, num_valid,
                                     stabilizer, chunk_size, floor_dtype, keep_scores)
  max_, sum_ = _combine(max_, sum_, axis_name)
  return (max_, sum_), (x_in, w, rows, margin, local_labels, num_valid, max_, buffer)


def _chunked_stats_bwd(chunk_size, floor_dtype, axis_name, keep_scores, residuals, cotangents):
  del keep_scores  # ``buffer`` says what was kept.
  x_in, w, rows, margin, local_labels, num_valid, max_, buffer = residuals
  _, g = cotangents  # The max carries no gradient.
  score_dtype = _common.compute_dtype(x_in, w)
  kept = 0 if buffer is None else _kept_rows(x_in.shape[0], w, score_dtype)
  rest = x_in[kept:]  # The examples whose scores are recomputed.

  params, with_params = _floating_leaves(margin)

  def body(carry, start, size):
    dx, dw, drows, dparams = carry
    w_chunk, centres, chunk_norms = _chunk(x_in, w, start, size, margin, floor_dtype)
    scores = _scores(rest, centres, chunk_norms) if rest.shape[0] else None
    if kept:
      stored = _load_scores(dw, start, size, (kept, centres.shape[0]), score_dtype)
      stored = _kept_scores(stored, x_in[:kept], centres,
                            floor_dtype if margin.normalize_weights else None)
      scores = stored if scores is None else jnp.concatenate([stored, scores])
    def row_terms(s_, r_, p_):
      chunk_margin = with_params(p_)
      logits = _chunk_logits(s_, w_chunk.shape, start, r_, chunk_margin, local_labels, num_valid)
      return chunk_margin.row_terms(logits, max_)

    terms, pullback = jax.vjp(row_terms, scores, rows, params)
    dscores, ddrows, ddparams = pullback(jnp.ones_like(terms) * g[:, None])  # (terms' type)
    ddx, ddw = _scores_pullback(x_in, centres, dscores, chunk_norms)
    dw = _rows_update(dw, ddw.reshape(w_chunk.shape), start)
    return (dx + ddx, dw, *jax.tree.map(jnp.add, (drows, dparams), (ddrows, ddparams)))

  if buffer is None:
    buffer = _scratch_like(w)
  # ``dx`` sums every chunk's in float32 (``score_dtype``), even for 16-bit ``x_in``.
  init = (jnp.zeros_like(x_in, score_dtype), buffer,
          *jax.tree.map(jnp.zeros_like, (rows, params)))
  dx, dw, drows, dparams = _for_each_chunk(w.shape[0], chunk_size, body, init)
  return (dx.astype(x_in.dtype), _from_bits(dw, w.dtype), drows,
          with_params(dparams, keep_others=False), None, None, None)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _kept_scores(stored: Array, x_kept: Array, centres: Array, floor_dtype: Any) -> Array:
  """``stored``, the :func:`_scores` of ``x_kept`` and ``centres`` that the forward pass kept
  (normalised for the norm floor of ``floor_dtype``, none if ``None``), with the tangents of
  recomputed scores: differentiating the backward pass (a Hessian, a gradient penalty) sees how
  the scores move, where the bits read back from the buffer would carry none. A first derivative
  never evaluates the tangents, so it costs nothing there."""
  del x_kept, centres, floor_dtype
  return stored


@_kept_scores.defjvp
def _kept_scores_jvp(floor_dtype, primals, tangents):
  stored, x_kept, centres = primals
  _, dx, dcentres = tangents

  def scores(x_, centres_):
    norms = None
    if floor_dtype is not None:
      norms = _inverse_norms(centres_, floor_dtype, _common.compute_dtype(x_, centres_))
    return _scores(x_, centres_, norms)

  return stored, jax.jvp(scores, (x_kept, centres), (dx, dcentres))[1].astype(stored.dtype)


def _floating_leaves(tree: Any) -> tuple[list[Any], Callable[..., Any]]:
  """``(floating, rebuild)``: the floating leaves of ``tree`` (a margin's parameters and state,
  the ones with a gradient) and ``rebuild(new, keep_others=True)``, the tree with ``new`` in their
  places and, in every other leaf's (a PRNG key, an integer), its own or ``None``."""
  leaves, treedef = jax.tree.flatten(tree)
  floating = [jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for leaf in leaves]

  def rebuild(new, keep_others=True):
    new = iter(new)
    return treedef.unflatten([
        next(new) if is_floating else (leaf if keep_others else None)
        for leaf, is_floating in zip(leaves, floating)])

  return [leaf for leaf, is_floating in zip(leaves, floating) if is_floating], rebuild


_chunked_stats_vjp.defvjp(_chunked_stats_fwd, _chunked_stats_bwd)


def sample_classes(local_labels: Array, num_rows: int, num_valid: Array | int,
                   num_sampled: int, key: Array) -> Array:
  """Partial FC's classes for one shard: the classes of the batch, then random negatives.

  Args:
    local_labels: ``[B]`` row of each example's class in this shard, -1 if it lives elsewhere.
    num_rows: rows of the shard's ``W``.
    num_valid: rows before the padding; padding rows are drawn only if nothing else is left.
    num_sampled: how many to keep (static; see :func:`sampled_count`). Every class of the batch
      is kept if they fit; if not, as many of them as fit, drawn at random.
    key: PRNG key; the same key gives the same sample.

  Returns:
    ``[num_sampled]`` sorted, distinct row indices.

  >>> import jax, jax.numpy as jnp
  >>> index = sample_classes(jnp.array([7, -1, 2]), 10, 10, 4, jax.random.key(0))
  >>> bool(jnp.isin(jnp.array([2, 7]), index).all()), index.shape
  (True, (4,))

  References:
    An et al., "Killing Two Birds with One Stone: Efficient and Robust Training of Face
    Recognition CNNs by Partial FC", CVPR 2022.
  """
  if not 1 <= num_sampled <= num_rows:
    raise ValueError(f"`num_sampled` must lie in [1, num_rows = {num_rows}], got {num_sampled}.")
  # Signed and at least 32 bits: 8- or 16-bit labels cannot hold the rows' ids, nor -1.
  local_labels = _common.check_labels(local_labels, np.shape(local_labels)[0])
  ids = jnp.arange(num_rows, dtype=local_labels.dtype)
  labels = _common.gathered(local_labels)  # The whole batch's, where mesh axes split the batch.
  positive = jnp.zeros(num_rows, bool).at[jnp.maximum(labels, 0)].max(labels >= 0)
  # Uniform in [0, 1) for the negatives, [1, 2) for the batch's classes: those come first.
  priority = jax.random.uniform(key, (num_rows,), jnp.float32) + positive.astype(jnp.float32)
  priority = jnp.where(ids < num_valid, priority, -1.0)
  return jnp.sort(jax.lax.top_k(priority, num_sampled)[1]).astype(local_labels.dtype)


def _sample_layout(num_sampled: int, chunk_size: int | None) -> tuple[int, int | None]:
  """``(rows, chunk)``: a sample of ``num_sampled`` rows padded to whole chunks of one size, at
  most ``chunk_size`` (``None``: one block, no padding).

  A shorter last chunk made XLA:CPU copy the sample's ``[S, D]`` gradient once more on its way to
  ``W``'s; whole chunks of ``chunk_size`` would score up to ``chunk_size - 1`` padding rows (64 %
  more than the 10,000 sampled of 100,000 classes with chunks of 8,192).
  """
  if chunk_size is None or chunk_size >= num_sampled:
    return num_sampled, chunk_size
  chunks = -(-num_sampled // chunk_size)
  size = -(-num_sampled // chunks)
  return chunks * size, size


def _padded(index: Array, size: int, fill: int) -> Array:
  return jnp.pad(index, (0, size - index.shape[0]), constant_values=fill)


def _in_sample(index: Array, num_rows: int, local_labels: Array, num_valid: Array | int):
  """``(labels, num_valid)`` for the rows ``index`` of a shard's ``num_rows`` (sorted, padded
  with ``num_rows``): each label's position in ``index`` (-1 where it is not there) and how many
  of the rows are real classes (they come first)."""
  position = jnp.full(num_rows, -1, local_labels.dtype).at[index].set(
      jnp.arange(index.shape[0], dtype=local_labels.dtype), mode="drop")
  labels = jnp.where(local_labels >= 0,
                     _common.take_rows(position, jnp.maximum(local_labels, 0)), -1)
  return labels, jnp.sum(index < num_valid, dtype=local_labels.dtype)


def sampled_count(num_local: int, sample_rate: float) -> int:
  """Classes kept per shard: ``ceil(sample_rate * num_local)``, at least one.

  Static, so shapes do not change from step to step. insightface's Partial FC keeps
  ``int(sample_rate * num_local)`` classes, or the shard's classes of the batch where they are
  more; here those that do not fit are scored only as their own examples' targets.
  """
  if sample_rate >= 1:
    return num_local
  # The rate meant: the fraction nearest its float (0.55 is 11/20, 5 / 7 is 5/7), so that 0.55
  # of 100 classes is 55 and 5 / 7 of 7 is 5, where the floats' products are just above.
  rate = fractions.Fraction(float(sample_rate)).limit_denominator(10**9)
  return min(num_local, max(math.ceil(rate * num_local), 1))


def _scored_loss(x, w, local_labels, num_valid, margin, key, sample, *, engine, axis_name,
                 num_classes):
  """Per-example losses of the whole (global) batch against this shard's classes ``w``.

  ``x``: the batch, or under ``axis_name`` this shard's part of it, gathered here (its
  gradient then reduce-scattered: one collective of ``[B, D]``). ``local_labels`` (the whole
  batch's) index rows of the shard, -1 where the class lives on another shard (or is invalid);
  ``num_valid``: this shard's rows before its padding; ``num_classes``: all shards' (static);
  ``sample``: ``(index, shard rows)`` where ``w`` holds only the rows ``index`` of the
  shard's (a :class:`RowSample`'s), else ``None``.
  """
  input_dtype = _common.common_float_dtype(x, w)
  matmul_dtype = engine.matmul_dtype or input_dtype
  # Norms are floored for float16 where the matmuls or an input use it: float16 takes
  # cotangents scaled by ``1 / |W_j|`` or ``1 / |x|``, which must not overflow it (a zero
  # vector's would with float32's floor).
  floor_dtype = _common.floor_dtype_of(x, w, matmul_dtype)
  dtype = _common.compute_dtype(x, w, matmul_dtype)  # The scores' and the statistics' dtype.
  # Each floating leaf's dtype, ``None`` for the others: a bfloat16 learnt scale is computed in
  # ``dtype`` (no mixed arithmetic) and returned in its own; an integer state (CurricularFace's
  # ``t = 0``) comes back as ``prepare`` makes it, a float.
  param_dtypes = [jnp.result_type(leaf) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
                  else None for leaf in jax.tree.leaves(margin)]
  scale_shape = np.shape(getattr(margin, "scale", None))
  margin = _cast_params(_with_scale_shape(margin, ()),
                        [dtype if d is not None else None for d in param_dtypes])
  x_wide = x.astype(dtype)  # Gathered and reduce-scattered in ``dtype``.
  norms = _common.safe_norm(x_wide, floor_dtype=floor_dtype)
  if axis_name is not None:
    # The norms (and with them the rows and the margin's batch statistics) the same on every
    # shard; the embeddings varying, as they meet each shard's classes in the scores and the
    # target: their cotangents are summed once, by the gather's transpose.
    norms = jax.lax.all_gather(norms, axis_name, tiled=True, to="invarying")
    x_wide = jax.lax.all_gather(x_wide, axis_name, tiled=True)
  x_unit = x_wide / norms
  chunk_size = engine.chunk_size
  if sample is not None:
    local_labels, num_valid = _in_sample(*sample, local_labels, num_valid)
    chunk_size = _sample_layout(w.shape[0], chunk_size)[1]
  # The targets come from all of ``w``: a class of the batch that a sample has no room for is
  # still its own examples' target.
  rows = _target_rows(x_unit, norms[:, 0], w, local_labels, floor_dtype, axis_name,
                      margin.normalize_weights)
  # Every shard keeps as many as a rate of the fullest shard's classes, padding rows not counted.
  num_sampled = sampled_count(min(w.shape[0], num_classes), engine.sample_rate)
  if sample is None and engine.sample_rate < 1 and num_sampled < w.shape[0]:
    if axis_name is not None:
      key = jax.random.fold_in(key, _shard_index(axis_name))
    num_rows = w.shape[0]
    padded, chunk_size = _sample_layout(num_sampled, chunk_size)
    index = _padded(sample_classes(local_labels, num_rows, num_valid, num_sampled, key), padded,
                    num_rows)
    w = jnp.asarray(w).at[index].get(mode="fill", fill_value=0)
    local_labels, num_valid = _in_sample(index, num_rows, local_labels, num_valid)
  margin = margin.prepare(rows)
  target = _checked_shape(margin, "target_logit", margin.target_logit(rows), rows.cos.shape)
  target = target.astype(dtype)
  # ``w`` keeps its dtype: each chunk is cast to ``matmul_dtype`` as it is multiplied (``_dot``),
  # so its gradient accumulates in ``w``'s dtype with no ``[C, D]`` copy in ``matmul_dtype``.
  x_in = x_unit if margin.normalize_embeddings else x_wide
  scored_rows = rows._replace(valid=None)  # Scoring needs no mask.
  # The row maximum starts at the target logit (a softmax's), at 0 for ``one_vs_all``.
  stabilizer = jnp.zeros_like(target) if margin.one_vs_all else target
  if axis_name is not None:  # The same on every shard; their cotangents differ per shard.
    scored_rows, stabilizer = jax.lax.pcast((scored_rows, stabilizer), _axes(axis_name),
                                            to="varying")
  x_in = x_in.astype(matmul_dtype)
  batch_axes = _data_parallel_axes(x_in, w) if axis_name is None else ()
  # Where the batch is split, so is a per-example [B] field (MV-Softmax's t, say) that scores it:
  # whole beside the split logits, SphereFace2's per-example bias failed JAX's transpose.
  scoring_margin = _split_per_example(margin, x_in) if batch_axes else margin
  args = (x_in, w, scored_rows, scoring_margin, local_labels, num_valid, stabilizer)
  if chunk_size is None or chunk_size >= w.shape[0]:
    max_, sum_ = _dense_stats(*args, floor_dtype, axis_name)
  elif batch_axes:
    max_, sum_ = _data_parallel_stats(*args, chunk_size, floor_dtype, engine.keep_scores,
                                      batch_axes)
  else:
    max_, sum_ = _chunked_stats(*args, chunk_size, floor_dtype, axis_name, engine.keep_scores)
  # A softmax's max_ >= target and is one of the logits, so its sum (+ the target's) is >= 1.
  losses = margin.loss(target, jax.lax.stop_gradient(max_), sum_)
  extra = margin.regularizer(rows)
  if extra is not None:
    losses = losses + _checked_shape(margin, "regularizer", extra, losses.shape)
  if sample is not None:  # An example whose class is not in the sample has no target.
    losses = jnp.where(rows.valid, losses, jnp.nan)
  return losses, _with_scale_shape(_cast_params(margin, param_dtypes), scale_shape)


def _checked_shape(margin: Margin, method: str, value: Array, shape: tuple[int, ...]) -> Array:
  """``value``, what ``margin.<method>`` returned, unless its shape is not ``shape``: a margin of
  one's own returning one logit for the batch would be broadcast over it without a word."""
  if jnp.shape(value) != shape:
    raise ValueError(f"{type(margin).__name__}.{method} must return shape {shape} (one value "
                     f"per example{'' if len(shape) == 1 else ' and class'}), got "
                     f"{jnp.shape(value)}.")
  return value


def _with_scale_shape(margin: Margin, shape: tuple[int, ...]) -> Margin:
  """``margin`` with its ``scale`` (one value, or ``None``) reshaped to ``shape``: a learnt ``[1]``
  scale is computed as a scalar, which broadcasts without rank promotion (refused under
  ``jax_numpy_rank_promotion="raise"``), and comes back ``[1]``."""
  scale = getattr(margin, "scale", None)
  if scale is None or np.shape(scale) == shape:
    return margin
  return dataclasses.replace(margin, scale=jnp.reshape(scale, shape))


def _cast_params(margin: Margin, dtypes: list[Any]) -> Margin:
  """``margin`` with each array leaf cast to its entry of ``dtypes`` (one per leaf, in order;
  ``None``: as it is); Python numbers (weakly typed) stay as they are."""
  leaves, treedef = jax.tree.flatten(margin)
  return treedef.unflatten([
      jnp.asarray(leaf).astype(d)
      if d is not None and isinstance(leaf, (jax.Array, np.ndarray, np.generic)) else leaf
      for leaf, d in zip(leaves, dtypes, strict=True)])


def _data_parallel_axes(x_in: Array, w: Array) -> tuple[str, ...]:
  """The Explicit mesh axes that split the batch ``x_in`` while every device holds all of
  ``w`` (data parallel); empty otherwise."""
  if any(axis is not None for axis in jax.typeof(w).sharding.spec):
    return ()
  return _common.batch_axes(x_in)


def _split_per_example(margin: Margin, x: Array) -> Margin:
  """``margin`` with each per-example ``[B]`` field split over the mesh as the examples
  ``x [B, ...]`` are (:func:`margins.losses._common.split_like`)."""
  return jax.tree.map(
      lambda v: _common.split_like(jnp.asarray(v), x) if is_per_example(v, x.shape[0]) else v,
      margin)


def _data_parallel_stats(x_in, w, rows, margin, local_labels, num_valid, stabilizer, chunk_size,
                         floor_dtype, keep_scores, batch_axes):
  """:func:`_chunked_stats` where the mesh axes ``batch_axes`` split the batch and every device
  holds all of ``w``: each device runs the chunks over its own examples and keeps their scores in
  a buffer of its own; ``w``'s gradient is summed over the devices once, at the end (the
  transpose of :func:`_vary_together`'s cast of ``w`` to varying)."""
  split, whole = jax.P(batch_axes), jax.P()

  def local_stats(x_in, w, rows, margin, local_labels, num_valid, stabilizer):
    return _chunked_stats(x_in, w, rows, margin, local_labels, num_valid, stabilizer, chunk_size,
                          floor_dtype, None, keep_scores)

  margin, num_valid = jax.tree.map(jnp.asarray, (margin, num_valid))
  # Per-example ``[B]`` fields arrive split like the examples (:func:`_split_per_example`).
  margin_specs = jax.tree.map(
      lambda v: split if is_per_example(v, x_in.shape[0]) else whole, margin)
  return jax.shard_map(local_stats, mesh=jax.typeof(x_in).sharding.mesh,
                       in_specs=(split, whole, split, margin_specs, split, whole, split),
                       out_specs=split)(x_in, w, rows, margin, local_labels, num_valid, stabilizer)


def _local_loss(x, w, labels, margin, key, sample, *, engine, num_classes):
  local_labels = jnp.where((labels >= 0) & (labels < num_classes), labels, -1)
  sample = None if sample is None else (sample.index, sample.num_rows)
  return _scored_loss(x, w, local_labels, num_classes, margin, key, sample, engine=engine,
                      axis_name=None, num_classes=num_classes)


def _shard_labels(labels: Array, start: Array | int, rows_per_shard: int, num_classes: int):
  """``(local labels, num_valid)`` of the shard whose rows start at ``start``: each label's row
  there, -1 where its class lives elsewhere (or past ``num_classes``), and the shard's rows before
  its padding."""
  # int32 as the shard's index (int64 labels under jax_enable_x64 too); a label outside
  # [0, num_classes) stays outside, so no shard takes it for one of its rows.
  labels = jnp.clip(labels, -1, num_classes).astype(jnp.int32)
  num_valid = jnp.clip(num_classes - start, 0, rows_per_shard)
  local = labels - start
  return jnp.where((local >= 0) & (local < num_valid), local, -1), num_valid


def _shard_index(axis_name):
  return jax.lax.axis_index(_axes(axis_name))  # Over several axes: row-major, as W is split.


def _explicit_split(engine: SoftmaxEngine) -> jax.NamedSharding | None:
  """Where the engine's mesh has Explicit axes: the split of ``W`` over the engine's Explicit axes
  (``shard_map`` splits the inputs over its Auto axes itself); else ``None``."""
  explicit = [a for a, kind in zip(engine.mesh.axis_names, engine.mesh.axis_types)
              if kind == jax.sharding.AxisType.Explicit]
  if not explicit:
    return None
  engine_explicit = tuple(a for a in _axes(engine.axis_name) if a in explicit)
  return jax.NamedSharding(engine.mesh, jax.P(engine_explicit or None))


def _sharded_loss(x, w, labels, margin, key, sample, *, engine, num_classes):
  axis_name = engine.axis_name
  shards = engine.num_shards
  num_rows = w.shape[0] if sample is None else sample.num_rows
  if num_rows % shards:
    raise ValueError(
        f"`weights` has {num_rows} rows, not divisible by the {shards} shards of "
        f"{axis_name!r}; allocate padded_num_classes({num_classes}, {shards}) rows.")
  if x.shape[0] % shards:
    raise ValueError(f"The batch ({x.shape[0]}) must be divisible by the {shards} shards of "
                     f"{axis_name!r}.")
  rows_per_shard = num_rows // shards
  spec = jax.P(axis_name)
  index = jnp.zeros(shards, jnp.int32) if sample is None else sample.index
  split = _explicit_split(engine)
  if split is not None:
    # Explicit axes are part of the inputs' types: split the inputs as ``shard_map`` needs and
    # give the losses back split as the labels came. A replicated input is sliced where it lies,
    # without traffic.
    batch_sharding = jax.NamedSharding(engine.mesh, jax.typeof(labels).sharding.spec)
    x, w, labels, index = jax.reshard((x, w, labels, index), split)
  key = jax.random.key(0) if key is None else key
  margin = jax.tree.map(jnp.asarray, margin)

  def body(x, w, labels, index, margin, key):
    shard = _shard_index(axis_name)
    labels = jax.lax.all_gather(labels, axis_name, tiled=True, to="invarying")
    local_labels, num_valid = _shard_labels(labels, shard * rows_per_shard, rows_per_shard,
                                            num_classes)
    losses, margin = _scored_loss(
        x, w, local_labels, num_valid, margin, key,
        None if sample is None else (index, rows_per_shard), engine=engine, axis_name=axis_name,
        num_classes=num_classes)
    batch = x.shape[0]
    return jax.lax.dynamic_slice_in_dim(losses, shard * batch, batch), margin

  losses, margin = jax.shard_map(
      body, mesh=engine.mesh, in_specs=(spec, spec, spec, spec, jax.P(), jax.P()),
      out_specs=(spec, jax.P()))(x, w, labels, index, margin, key)
  return (losses if split is None else jax.reshard(losses, batch_sharding)), margin
