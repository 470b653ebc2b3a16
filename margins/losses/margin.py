"""Margins: how a margin softmax turns cosines into logits.

A margin says *what* the logits are; a softmax engine (:mod:`margins.parallel`) says *how* the
cross-entropy over all classes is computed (dense, chunked, class-sharded, sampled). The two meet in
three small methods, evaluated by every engine in the same order:

1. ``prepared = margin.prepare(rows)``: batch statistics (CurricularFace's ``t``, AdaFace's norm
   statistics) from the whole (global) batch, before any chunking. Most margins return ``self``.
2. ``prepared.target_logit(rows) -> [B]``: the logit of each example's own class.
3. ``prepared.nontarget_logits(similarity, rows) -> [B, c]``: the logits of a chunk of other
   classes, elementwise in the similarity; ``scale * cos`` for most margins.

The loss is the softmax cross-entropy of those logits. A ``one_vs_all`` margin (SphereFace2)
replaces it with a sum of per-class binary losses through two more methods, ``row_terms`` and
``loss``.

``rows`` (:class:`Rows`) holds per-example quantities: the cosine to the target class centre and
the norms of the embedding and of that centre. ``similarity`` is ``<x', W_j'>`` where ``x'`` and
``W_j'`` are L2-normalised when the margin's ``normalize_embeddings`` / ``normalize_weights``
say so: the cosine for NormFace-style margins, ``|x| cos`` for SphereFace, the raw dot product
for L-Softmax and plain softmax.

A new margin is a small frozen dataclass with a ``target_logit`` method; hyperparameters that
change during training (SphereFace's annealing ``lambda``, CurricularFace's ``t``) are array fields,
so a margin is a pytree that passes through ``jit``. Flags, kinds, integer margins and constants
(AdaFace's ``eps``) are static fields.
Angular margins are in radians, less than a half turn (:func:`check_margin` says so otherwise).
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from margins._checks import check_int
from margins.losses import _common

Array = jax.Array


class Rows(NamedTuple):
  """Per-example quantities an engine computes once per (global) batch.

  Attributes:
    cos: ``[B]`` cosine between each embedding and its target class centre, in ``[-1, 1]``.
    embedding_norm: ``[B]`` ``|x|``.
    weight_norm: ``[B]`` ``|W_y|``.
    valid: ``[B]`` whether the label is in range; batch statistics (:meth:`Margin.prepare`)
      count only these examples. ``None``: all.
  """
  cos: Array
  embedding_norm: Array
  weight_norm: Array
  valid: Array | None = None


def batch_moments(values: Array, valid: Array | None) -> tuple[Array, Array, Array]:
  """``(mean, std, count)`` of ``values [B]`` over the examples with ``valid`` labels (all if
  ``None``); the std with Bessel's correction from two examples on, 0 for one.

  Inside a ``shard_map`` whose devices each hold a part of the batch (``values`` varies over its
  axes), they are the whole batch's, the same on every device.
  """
  axes = tuple(sorted(_common.varying_axes(values)))

  def total(a):
    return jax.lax.psum(jnp.sum(a), axes) if axes else jnp.sum(a)

  valid = jnp.ones(values.shape, bool) if valid is None else valid
  count = total(valid.astype(values.dtype))
  mean = total(jnp.where(valid, values, 0)) / jnp.maximum(count, 1)
  squares = total(jnp.where(valid, jnp.square(values - mean), 0))
  return mean, jnp.sqrt(squares / jnp.maximum(count - 1, 1)), count


def static_field(default: Any) -> Any:
  """A dataclass field that is part of the pytree structure (a Python value), not a leaf."""
  return dataclasses.field(default=default, metadata=dict(static=True))


def margin_dataclass(cls):
  """Makes ``cls`` a frozen dataclass registered as a pytree (array fields are leaves).

  A new margin is a :class:`Margin` subclass with a ``target_logit(rows)`` method:

  >>> import jax, jax.numpy as jnp, margins
  >>> @margins.margin_dataclass
  ... class MyCosFace(margins.Margin):
  ...   scale: jax.Array | float = 64.0
  ...   margin: jax.Array | float = 0.35
  ...   def target_logit(self, rows):  # rows.cos: [B] cosine to the target centre
  ...     return self.scale * (rows.cos - self.margin)
  >>> x = jax.random.normal(jax.random.key(0), (4, 8))
  >>> w = jax.random.normal(jax.random.key(1), (10, 8))
  >>> y = jnp.array([0, 3, 3, 9])
  >>> losses, _ = margins.dense()(x, w, y, MyCosFace())
  >>> bool(jnp.allclose(losses, margins.cosface_loss(x, w, y), rtol=1e-5))
  True
  """
  return _common.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


class Margin:
  """Base class of margins: plain ``scale * similarity`` for every class but the target."""

  normalize_embeddings: bool = True
  normalize_weights: bool = True

  def prepare(self, rows: Rows) -> "Margin":
    """Returns the margin with batch statistics of the whole batch folded in."""
    del rows
    return self

  def target_logit(self, rows: Rows) -> Array:
    """``[B]`` logit of each example's target class."""
    raise NotImplementedError

  def nontarget_logits(self, similarity: Array, rows: Rows) -> Array:
    """``[B, c]`` logits of non-target classes from their ``[B, c]`` similarities."""
    del rows
    return getattr(self, "scale", 1.0) * similarity

  def regularizer(self, rows: Rows) -> Array | None:
    """Optional ``[B]`` term added to each example's loss (MagFace's ``g(|x|)``)."""
    del rows
    return None

  def check(self) -> None:
    """Where a margin overrides it: raises ``ValueError`` naming a field whose value is out of
    range (see :func:`require`). Every engine calls it, through :func:`check_margin`."""

  # How logits become a loss: the softmax cross-entropy, unless a margin sets ``one_vs_all`` and
  # overrides the two methods below (SphereFace2's binary classifiers). Engines sum
  # ``row_terms`` over the non-target classes chunk by chunk, after subtracting a running row
  # maximum (a softmax's; it stays 0 for ``one_vs_all``), and hand the sum to ``loss``.
  one_vs_all: bool = False

  def row_terms(self, logits: Array, row_max: Array) -> Array:
    """``[B, c]`` terms of non-target ``logits`` summed over classes: ``exp(logit - max)``."""
    return jnp.exp(logits - row_max[:, None])

  def loss(self, target: Array, row_max: Array, row_sum: Array) -> Array:
    """``[B]`` losses from the target logits and the sums of :meth:`row_terms`."""
    return row_max + jnp.log(row_sum + jnp.exp(target - row_max)) - target


def require(margin: Margin, name: str, holds: Callable[[np.ndarray], Any], rule: str) -> None:
  """Raises ``ValueError`` unless ``holds(value)`` is true for every element of ``margin``'s field
  ``name``; ``rule`` says what the field must be. A tracer is not checked (its value is unknown).

  >>> import margins
  >>> require(margins.CosFace(margin=-2.0), "margin", lambda m: m > -1, "above -1")
  Traceback (most recent call last):
  ValueError: `margin` of CosFace must be above -1, got -2.0.
  """
  _common.check_range(f"`{name}` of {type(margin).__name__}", getattr(margin, name), holds, rule)


def require_angles(margin: Margin, *names: str) -> None:
  """Raises ``ValueError`` unless the additive angular margins ``names`` lie in ``(-pi, pi)``:
  radians, not degrees."""
  for name in names:
    require(margin, name, lambda angle: np.abs(angle) < np.pi,
            "an angle in radians, in (-pi, pi) (ArcFace's 0.5 is 28.6 degrees)")


def require_scalars(margin: Margin, *names: str) -> None:
  """Raises ``ValueError`` unless fields ``names`` hold one value: a batch statistic or its
  momentum, which would otherwise broadcast over the classes."""
  for name in names:
    if np.ndim(getattr(margin, name)) != 0:
      raise ValueError(f"`{name}` of {type(margin).__name__} must be a scalar, got shape "
                       f"{np.shape(getattr(margin, name))}.")


def _require_integer_margin(margin: Margin) -> None:
  """Raises ``ValueError`` unless the multiplicative margin is a Python integer ``m >= 1``."""
  m = margin.margin
  if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
    raise ValueError(f"`margin` of {type(margin).__name__} must be an integer >= 1, got {m!r}.")


# ---------------------------------------------------------------------------------------------
# Elementwise pieces: functions of the target cosine.
# ---------------------------------------------------------------------------------------------


def sine(cos: Array) -> Array:
  """``sin(theta) = sqrt(1 - cos^2)`` on ``[0, pi]``, finite gradient at ``|cos| = 1``."""
  return _common.safe_sqrt(1 - jnp.square(cos))


def angle(cos: Array) -> Array:
  """``theta = arccos(cos)`` as ``arctan2(sin, cos)``: finite gradient at ``|cos| = 1``."""
  return jnp.arctan2(sine(cos), cos)


def cos_add_angle(cos: Array, angle: Array | float) -> Array:
  """``cos(theta + angle)`` from ``cos(theta)`` without ``arccos``: ``cos c_m - sin s_m``."""
  return cos * jnp.cos(angle) - sine(cos) * jnp.sin(angle)


def capped_cos(angle: Array) -> Array:
  """``cos(min(angle, pi))``: the cosine of a shifted or multiplied angle, held at -1 past pi
  where it would rise again."""
  return jnp.cos(jnp.minimum(angle, math.pi))


def _per_row(value: Array | float) -> Array | float:
  """A hyperparameter as it broadcasts against ``[B, c]`` scores: a per-example ``[B]`` one
  down the rows, not across the classes."""
  return jnp.expand_dims(value, -1) if jnp.ndim(value) == 1 else value


def _detached(cos: Array, adjusted: Array) -> Array:
  """``cos + stop_gradient(adjusted - cos)``: the value of ``adjusted``, the gradient of ``cos``."""
  return cos + jax.lax.stop_gradient(adjusted - cos)


def arcface_cos(cos: Array, margin: Array | float, *, easy_margin: bool = False) -> Array:
  r"""ArcFace's target cosine :math:`\cos(\theta + m)`, kept monotone in :math:`\theta`.

  Past :math:`\theta > \pi - m`, :math:`\cos(\theta + m)` would increase again. By default (the
  paper, face.evoLVe, pytorch-metric-learning, insightface before 2022) it is replaced there by
  :math:`\cos\theta - m \sin m`, which drops by :math:`\cos m + m \sin m - 1` (0.117 at
  :math:`m = 0.5`) where it takes over, as in those implementations; with ``easy_margin`` the
  margin is applied only where :math:`\cos\theta > 0`.

  >>> import jax.numpy as jnp
  >>> float(arcface_cos(jnp.float32(1.0), 0.5))  # theta = 0: cos(0.5)
  0.8775...

  References:
    Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019.
  """
  shifted = cos_add_angle(cos, margin)
  if easy_margin:
    return jnp.where(cos > 0, shifted, cos)
  threshold = jnp.cos(math.pi - jnp.asarray(margin, cos.dtype))
  return jnp.where(cos > threshold, shifted, cos - margin * jnp.sin(margin))


def chebyshev(cos: Array, degree: int) -> Array:
  """``cos(degree * theta)`` as the Chebyshev polynomial ``T_degree(cos theta)``."""
  previous, current = jnp.ones_like(cos), cos
  if degree == 0:
    return previous
  for _ in range(degree - 1):
    previous, current = current, 2 * cos * current - previous
  return current


def multiplicative_psi(cos: Array, margin: int) -> Array:
  r"""L-Softmax / SphereFace's monotone extension of :math:`\cos(m\theta)` to :math:`[0, \pi]`.

  :math:`\psi(\theta) = (-1)^k \cos(m\theta) - 2k` for
  :math:`\theta \in [k\pi/m, (k+1)\pi/m]`. :math:`\cos(m\theta)` is the Chebyshev polynomial
  :math:`T_m(\cos\theta)` and :math:`k` counts the thresholds :math:`\cos(j\pi/m)` at or above
  :math:`\cos\theta`, so no ``arccos`` is needed and ``k`` carries no gradient.

  >>> import jax.numpy as jnp
  >>> [round(float(multiplicative_psi(jnp.float32(c), 2)), 4) for c in (1.0, 0.0, -1.0)]
  [1.0, -1.0, -3.0]

  References:
    Liu et al., "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML 2016.
  """
  thresholds = jnp.cos(jnp.arange(1, margin, dtype=cos.dtype) * (math.pi / margin))
  thresholds = jnp.expand_dims(thresholds, tuple(range(cos.ndim)))
  k = jnp.sum((cos[..., None] <= thresholds).astype(cos.dtype), axis=-1)
  sign = 1 - 2 * jnp.mod(k, 2)
  return sign * chebyshev(cos, margin) - 2 * k


def sphereface_lambda(
    step: Array | int, *, base: float = 1000.0, gamma: float = 0.12, power: float = 1.0,
    lambda_min: float = 5.0) -> Array:
  r"""SphereFace's annealing :math:`\lambda = \max(\lambda_{min}, base (1 + \gamma t)^{-power})`.

  Defaults are the Caffe release's; :math:`\lambda` reaches 5 after about 1,660 steps.

  >>> float(sphereface_lambda(0)), float(sphereface_lambda(10_000))
  (1000.0, 5.0)

  References:
    Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.maximum(lambda_min, base * (1 + gamma * step) ** (-power))


def annealed(margin_value: Array, plain_value: Array, annealing: Array | float) -> Array:
  """``(lambda * plain + margin) / (1 + lambda)``: the annealed target of SphereFace/L-Softmax
  (``lambda`` in the targets' dtype: a float32 :func:`sphereface_lambda` anneals float64 too)."""
  annealing = jnp.asarray(annealing, jnp.result_type(plain_value))
  return (annealing * plain_value + margin_value) / (1 + annealing)


# ---------------------------------------------------------------------------------------------
# The margins.
# ---------------------------------------------------------------------------------------------


@margin_dataclass
class Softmax(Margin):
  """Plain softmax on raw dot products ``<x, W_j>`` (no normalisation, no margin).

  >>> import jax.numpy as jnp, margins
  >>> cos = jnp.array([1.0, 0.0])  # theta_y = 0 and 90 degrees
  >>> rows = margins.Rows(cos, embedding_norm=jnp.full(2, 2.0), weight_norm=jnp.ones(2))
  >>> margins.Softmax().target_logit(rows)  # |x| |W_y| cos: the raw dot product
  Array([2., 0.], dtype=float32)

  References:
    The softmax loss of every classifier; see NormFace (Wang et al., 2017) for its geometry.
  """
  normalize_embeddings = False
  normalize_weights = False

  def target_logit(self, rows):
    return rows.embedding_norm * rows.weight_norm * rows.cos


@margin_dataclass
class NormFace(Margin):
  """NormFace: ``s cos`` for every class (Wang et al., ACM MM 2017).

  >>> import jax.numpy as jnp, margins
  >>> cos = jnp.array([1.0, 0.0])  # theta_y = 0 and 90 degrees
  >>> rows = margins.Rows(cos, embedding_norm=jnp.ones(2), weight_norm=jnp.ones(2))
  >>> margins.NormFace(scale=1.0).target_logit(rows)  # s cos
  Array([1., 0.], dtype=float32)

  References:
    Wang et al., "NormFace: L2 Hypersphere Embedding for Face Verification", ACM MM 2017.
  """
  scale: Array | float = 16.0

  def target_logit(self, rows):
    return self.scale * rows.cos


@margin_dataclass
class LSoftmax(Margin):
  """L-Softmax: target ``|W_y||x| psi(theta_y)``, others ``<x, W_j>`` (Liu et al., ICML 2016).

  ``annealing`` is the lambda of ``(lambda |W||x| cos + |W||x| psi) / (1 + lambda)``, 0 for the
  plain loss.

  >>> import jax.numpy as jnp, margins
  >>> cos = jnp.array([1.0, 0.0])  # theta_y = 0 and 90 degrees
  >>> rows = margins.Rows(cos, embedding_norm=jnp.full(2, 2.0), weight_norm=jnp.ones(2))
  >>> margins.LSoftmax(margin=2).target_logit(rows)  # |x| |W_y| psi(theta); psi(90 deg) = -1
  Array([ 2., -2.], dtype=float32)

  References:
    Liu et al., "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML 2016.
  """
  margin: int = static_field(4)
  annealing: Array | float = 0.0
  normalize_embeddings = False
  normalize_weights = False

  def check(self):
    _require_integer_margin(self)

  def target_logit(self, rows):
    psi = annealed(multiplicative_psi(rows.cos, self.margin), rows.cos, self.annealing)
    return rows.embedding_norm * rows.weight_norm * psi


@margin_dataclass
class SphereFace(Margin):
  """A-Softmax: ``W`` normalised, target ``|x| psi(theta_y)``, others ``|x| cos_j``.

  With ``scale`` set, ``x`` is normalised too and ``scale`` replaces ``|x|``, the form SphereFace-R
  builds on (:class:`SphereFaceR` is the authors' version: real ``m``, detached ``psi``).
  ``annealing`` is SphereFace's lambda (see :func:`sphereface_lambda`).

  >>> import jax.numpy as jnp, margins
  >>> cos = jnp.array([1.0, 0.0])  # theta_y = 0 and 90 degrees
  >>> rows = margins.Rows(cos, embedding_norm=jnp.full(2, 2.0), weight_norm=jnp.ones(2))
  >>> margins.SphereFace(margin=2).target_logit(rows)  # |x| psi(theta)
  Array([ 2., -2.], dtype=float32)

  References:
    Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017.
  """
  margin: int = static_field(4)
  scale: Array | float | None = None
  annealing: Array | float = 0.0
  normalize_weights = True

  def check(self):
    _require_integer_margin(self)

  @property
  def normalize_embeddings(self):
    return self.scale is not None

  def target_logit(self, rows):
    radius = rows.embedding_norm if self.scale is None else self.scale
    return radius * annealed(multiplicative_psi(rows.cos, self.margin), rows.cos, self.annealing)

  def nontarget_logits(self, similarity, rows):
    return similarity if self.scale is None else self.scale * similarity


@margin_dataclass
class CosFace(Margin):
  """CosFace / AM-Softmax: target ``s (cos_y - m)`` (Wang et al., CVPR 2018).

  >>> import jax.numpy as jnp, margins
  >>> cos = jnp.array([1.0, 0.0])  # theta_y = 0 and 90 degrees
  >>> rows = margins.Rows(cos, embedding_norm=jnp.ones(2), weight_norm=jnp.ones(2))
  >>> margins.CosFace(scale=1.0).target_logit(rows)  # cos - 0.35
  Array([ 0.65, -0.35], dtype=float32)

  References:
    Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018;
    Wang et al., "Additive Margin Softmax for Face Verification", IEEE SPL 2018.
  """
  scale: Array | float = 64.0
  margin: Array | float = 0.35

  def target_logit(self, rows):
    return self.scale * (rows.cos - self.margin)


@margin_dataclass
class ArcFace(Margin):
  """ArcFace: target ``s cos(theta_y + m)`` (Deng et al., CVPR 2019), see :func:`arcface_cos`.

  ``detach_margin``: the value is ArcFace's, the gradient that of plain ``s cos_y``
  (``s (cos_y + stop_gradient(cos(theta_y + m) - cos_y))``, opensphere / insightface since 2022).
  Past ``theta_y > pi - m`` the value is :func:`arcface_cos`'s continuation, where insightface's
  detached margin takes ``cos(theta_y + m)`` as it is and opensphere ``cos(min(theta_y + m, pi))``;
  the gradient is the same.

  >>> import jax.numpy as jnp, margins
  >>> cos = jnp.array([1.0, 0.0])  # theta_y = 0 and 90 degrees
  >>> rows = margins.Rows(cos, embedding_norm=jnp.ones(2), weight_norm=jnp.ones(2))
  >>> margins.ArcFace(scale=1.0).target_logit(rows)  # cos(theta + 0.5)
  Array([ 0.87758255, -0.47942555], dtype=float32)

  References:
    Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019.
  """
  scale: Array | float = 64.0
  margin: Array | float = 0.5
  easy_margin: bool = static_field(False)
  detach_margin: bool = static_field(False)

  def check(self):
    require_angles(self, "margin")

  def target_logit(self, rows):
    target = arcface_cos(rows.cos, self.margin, easy_margin=self.easy_margin)
    if self.detach_margin:
      target = _detached(rows.cos, target)
    return self.scale * target


@margin_dataclass
class CombinedMargin(Margin):
  r"""The ArcFace paper's combined margin :math:`s(\cos(m_1\theta + m_2) - m_3)`.

  Where :math:`m_1\theta + m_2` passes :math:`\pi` the curve would rise again; there it continues
  as the line :math:`\cos\theta - \cos\theta^* - 1 - m_3` in :math:`\cos\theta`
  (:math:`\theta^* = (\pi - m_2)/m_1`), which joins it continuously and keeps decreasing.

  >>> import jax.numpy as jnp, margins
  >>> cos = jnp.array([1.0, 0.0])  # theta_y = 0 and 90 degrees
  >>> rows = margins.Rows(cos, embedding_norm=jnp.ones(2), weight_norm=jnp.ones(2))
  >>> margins.CombinedMargin(scale=1.0).target_logit(rows)  # cos(theta + 0.3) - 0.2
  Array([ 0.7553365, -0.4955203], dtype=float32)

  References:
    Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019.
  """
  scale: Array | float = 64.0
  m1: Array | float = 1.0
  m2: Array | float = 0.3
  m3: Array | float = 0.2

  def check(self):
    require_angles(self, "m2")
    require(self, "m1", lambda m: m > 0, "positive (1: no multiplicative margin)")

  def target_logit(self, rows):
    shifted = self.m1 * angle(rows.cos) + self.m2
    cos_star = jnp.cos((math.pi - self.m2) / self.m1)
    continued = rows.cos - cos_star - 1
    target = jnp.where(shifted < math.pi, capped_cos(shifted), continued)
    return self.scale * (target - self.m3)


@margin_dataclass
class CurricularFace(Margin):
  """CurricularFace (Huang et al., CVPR 2020): ArcFace target, hard negatives re-weighted.

  A negative is hard when ``cos_j > cos(theta_y + m)``; its logit becomes ``s cos_j (t + cos_j)``.
  ``t`` follows ``t <- momentum * mean(cos_y) + (1 - momentum) t`` over the batch, updated by
  :meth:`prepare` before it is used, as in the paper's algorithm.

  >>> import jax.numpy as jnp, margins
  >>> cos = jnp.array([1.0, 0.0])  # theta_y = 0 and 90 degrees
  >>> rows = margins.Rows(cos, embedding_norm=jnp.ones(2), weight_norm=jnp.ones(2))
  >>> margins.CurricularFace(scale=1.0).target_logit(rows)  # ArcFace's target
  Array([ 0.87758255, -0.47942555], dtype=float32)

  References:
    Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face
    Recognition", CVPR 2020.
  """
  scale: Array | float = 64.0
  margin: Array | float = 0.5
  t: Array | float = 0.0
  momentum: Array | float = 0.01

  def check(self):
    require_angles(self, "margin")
    require_scalars(self, "t", "momentum")

  def prepare(self, rows):
    mean_cos, _, count = batch_moments(jax.lax.stop_gradient(rows.cos), rows.valid)
    t = self.momentum * mean_cos + (1 - self.momentum) * self.t
    return dataclasses.replace(self, t=jnp.where(count > 0, t, self.t))

  def target_logit(self, rows):
    return self.scale * arcface_cos(rows.cos, self.margin)

  def nontarget_logits(self, similarity, rows):
    threshold = jax.lax.stop_gradient(cos_add_angle(rows.cos, self.margin))
    hard = similarity > threshold[:, None]
    t = jax.lax.stop_gradient(self.t)
    return self.scale * jnp.where(hard, similarity * (t + similarity), similarity)


@margin_dataclass
class MVSoftmax(Margin):
  r"""MV-Softmax (Wang et al., AAAI 2020): a margin target, mis-classified negatives emphasised.

  The target cosine :math:`f_y` is CosFace's :math:`\cos\theta_y - m` (``kind='cos'``,
  MV-AM-Softmax) or ArcFace's :math:`\cos(\theta_y + m)` (``'arc'``, MV-Arc-Softmax, see
  :func:`arcface_cos`). A negative is mis-classified when :math:`\cos\theta_j` exceeds the
  margined target, :math:`\cos\theta_y - m` or :math:`\cos(\theta_y + m)` (the authors' mask);
  its logit becomes :math:`s((1 + t)\cos\theta_j + t)` (``adaptive``) or
  :math:`s(\cos\theta_j + t)`, the others' stay :math:`s\cos\theta_j`. The paper writes the
  adaptive weight as :math:`e^{s(t' - 1)(\cos\theta_j + 1)}`, whose :math:`t'` is this
  :math:`1 + t` (FaceX-Zoo's ``mv_weight``, 1.12 there). ``easy_margin`` (the authors' default)
  applies the margin only where :math:`\cos\theta_y > 0`; the mask keeps the margin. Without
  it, past :math:`\theta_y > \pi - m` the arc target continues as :func:`arcface_cos` does, where
  the authors' code takes :math:`\cos(\theta_y + m)` as it is.

  >>> import jax.numpy as jnp, margins
  >>> cos = jnp.array([1.0, 0.0])  # theta_y = 0 and 90 degrees
  >>> rows = margins.Rows(cos, embedding_norm=jnp.ones(2), weight_norm=jnp.ones(2))
  >>> margins.MVSoftmax(scale=1.0).target_logit(rows)  # cos - 0.35 where cos > 0 (easy_margin)
  Array([0.65, 0.  ], dtype=float32)

  References:
    Wang et al., "Mis-classified Vector Guided Softmax Loss for Face Recognition", AAAI 2020.
  """
  scale: Array | float = 32.0
  margin: Array | float = 0.35
  t: Array | float = 0.2
  kind: str = static_field("cos")
  adaptive: bool = static_field(True)
  easy_margin: bool = static_field(True)

  def __post_init__(self):
    _common.check_choice("kind", self.kind, ("cos", "arc"))

  def check(self):
    if self.kind == "arc":
      require_angles(self, "margin")

  def _margined(self, cos: Array) -> Array:
    """The margined target cosine that decides which negatives are mis-classified."""
    return cos - self.margin if self.kind == "cos" else cos_add_angle(cos, self.margin)

  def target_logit(self, rows):
    if self.kind == "arc":
      target = arcface_cos(rows.cos, self.margin, easy_margin=self.easy_margin)
    else:
      target = self._margined(rows.cos)
      if self.easy_margin:
        target = jnp.where(rows.cos > 0, target, rows.cos)
    return self.scale * target

  def nontarget_logits(self, similarity, rows):
    threshold = jax.lax.stop_gradient(self._margined(rows.cos))
    hard = similarity > threshold[:, None]
    t = _per_row(self.t)
    weight = 1 + t if self.adaptive else 1
    return self.scale * jnp.where(hard, weight * similarity + t, similarity)


@margin_dataclass
class AdaFace(Margin):
  r"""AdaFace (Kim et al., CVPR 2022): a margin that adapts to image quality via ``|x|``.

  With :math:`\hat z = \mathrm{clip}(h (|x| - \mu) / (\sigma + \epsilon), -1, 1)` from the running
  mean :math:`\mu` and std :math:`\sigma` of the norms, the target is
  :math:`s(\cos(\mathrm{clip}(\theta - m\hat z, \epsilon, \pi - \epsilon)) - (m + m\hat z))`.
  :meth:`prepare` updates the statistics with the batch (``momentum`` is the paper's
  ``t_alpha``: 1.0 uses the batch's own statistics). Initial values are the official ones. As in
  the official code, every cosine is clipped to :math:`[-1 + \epsilon, 1 - \epsilon]`, the
  other classes' too.

  >>> import jax.numpy as jnp, margins
  >>> cos = jnp.array([1.0, 0.0])  # theta_y = 0 and 90 degrees
  >>> rows = margins.Rows(cos, embedding_norm=jnp.full(2, 20.0), weight_norm=jnp.ones(2))
  >>> target = margins.AdaFace(scale=1.0).target_logit(rows)
  >>> [round(float(t), 4) for t in target]  # |x| at the mean: z = 0, cos(theta) - m
  [0.599, -0.4]

  References:
    Kim et al., "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022.
  """
  scale: Array | float = 64.0
  margin: Array | float = 0.4
  h: Array | float = 0.333
  momentum: Array | float = 1.0
  norm_mean: Array | float = 20.0
  norm_std: Array | float = 100.0
  eps: float = static_field(1e-3)

  def check(self):
    require_angles(self, "margin")
    require_scalars(self, "norm_mean", "norm_std", "momentum")

  def prepare(self, rows):
    norms = jax.lax.stop_gradient(jnp.clip(rows.embedding_norm, 1e-3, 100.0))
    batch_mean, batch_std, count = batch_moments(norms, rows.valid)
    norm_mean = self.momentum * batch_mean + (1 - self.momentum) * self.norm_mean
    norm_std = self.momentum * batch_std + (1 - self.momentum) * self.norm_std
    return dataclasses.replace(self, norm_mean=jnp.where(count > 0, norm_mean, self.norm_mean),
                               norm_std=jnp.where(count > 0, norm_std, self.norm_std))

  def target_logit(self, rows):
    norms = jax.lax.stop_gradient(jnp.clip(rows.embedding_norm, 1e-3, 100.0))
    quality = jnp.clip(self.h * (norms - self.norm_mean) / (self.norm_std + self.eps), -1, 1)
    # Clipped in float32 at least: in bfloat16 1 - eps rounds to 1, where arccos' slope is infinite.
    cos = rows.cos.astype(_common.compute_dtype(rows.cos))
    theta = jnp.arccos(jnp.clip(cos, -1 + self.eps, 1 - self.eps)).astype(rows.cos.dtype)
    shifted = jnp.clip(theta - self.margin * quality, self.eps, math.pi - self.eps)
    return self.scale * (jnp.cos(shifted) - (self.margin + self.margin * quality))

  def nontarget_logits(self, similarity, rows):
    del rows
    return self.scale * jnp.clip(similarity, -1 + self.eps, 1 - self.eps)


@margin_dataclass
class MagFace(Margin):
  r"""MagFace (Meng et al., CVPR 2021): ArcFace with a margin growing with ``|x|``.

  :math:`a = \mathrm{clip}(|x|, l_a, u_a)`, :math:`m(a) = l_m + (u_m - l_m)(a - l_a)/(u_a - l_a)`,
  target :math:`s\cos(\theta + m(a))`, and :meth:`regularizer` adds :math:`\lambda_g g(a)` with
  :math:`g(a) = 1/a + a/u_a^2` to each loss. ``easy_margin`` (the authors' code, ``MagLinear``'s
  default) applies the margin only where :math:`\cos\theta > 0`; ``False`` continues as ArcFace
  past :math:`\pi - m` (:func:`arcface_cos`).

  >>> import jax.numpy as jnp, margins
  >>> cos = jnp.array([1.0, 0.0])  # theta_y = 0 and 90 degrees
  >>> rows = margins.Rows(cos, embedding_norm=jnp.full(2, 10.0), weight_norm=jnp.ones(2))
  >>> margins.MagFace(scale=1.0).target_logit(rows)  # |x| = l_a: m = 0.45, only where cos > 0
  Array([0.90044713, 0.        ], dtype=float32)

  References:
    Meng et al., "MagFace: A Universal Representation for Face Recognition and Quality
    Assessment", CVPR 2021.
  """
  scale: Array | float = 64.0
  lower_norm: Array | float = 10.0
  upper_norm: Array | float = 110.0
  lower_margin: Array | float = 0.45
  upper_margin: Array | float = 0.8
  lambda_g: Array | float = 20.0
  easy_margin: bool = static_field(True)

  def check(self):
    require_angles(self, "lower_margin", "upper_margin")
    if not any(isinstance(value, jax.core.Tracer) for value in (self.lower_norm, self.upper_norm)
               ) and not np.all(np.asarray(self.lower_norm) < np.asarray(self.upper_norm)):
      raise ValueError(f"`lower_norm` of MagFace ({self.lower_norm}) must be below its "
                       f"`upper_norm` ({self.upper_norm}): the margin grows between them.")

  def _clipped_norm(self, rows):
    return jnp.clip(rows.embedding_norm, self.lower_norm, self.upper_norm)

  def adaptive_margin(self, rows: Rows) -> Array:
    """``[B]`` per-example margin ``m(a)``."""
    slope = (self.upper_margin - self.lower_margin) / (self.upper_norm - self.lower_norm)
    return self.lower_margin + slope * (self._clipped_norm(rows) - self.lower_norm)

  def target_logit(self, rows):
    return self.scale * arcface_cos(rows.cos, self.adaptive_margin(rows),
                                    easy_margin=self.easy_margin)

  def regularizer(self, rows):
    norm = self._clipped_norm(rows)
    return self.lambda_g * (1 / norm + norm / self.upper_norm**2)


@margin_dataclass
class ElasticFace(Margin):
  """ElasticFace (Boutros et al., CVPRW 2022): a margin drawn from ``N(margin, sigma)`` per example.

  ``kind='arc'``: target ``s cos(theta_y + m_i)`` (ElasticFace-Arc); ``kind='cos'``:
  ``s (cos_y - m_i)`` (ElasticFace-Cos). ``plus`` (ElasticFace+) hands the larger margins to the
  examples farther from their centre, as the paper describes. (The authors' code indexes the
  sorted margins with the cosines' sort order, ``margin[argsort(-cos)]``, where that order's
  inverse gives the paper's assignment, so its margins do not follow the cosines.) ``key`` draws
  the margins; pass a new key each step.

  >>> import jax, jax.numpy as jnp, margins
  >>> cos = jnp.array([1.0, 0.0])  # theta_y = 0 and 90 degrees
  >>> rows = margins.Rows(cos, embedding_norm=jnp.ones(2), weight_norm=jnp.ones(2))
  >>> elastic = margins.ElasticFace(key=jax.random.key(0), scale=1.0, sigma=0.0)
  >>> elastic.target_logit(rows)  # sigma 0: ArcFace's cos(theta + 0.5)
  Array([ 0.87758255, -0.47942555], dtype=float32)

  References:
    Boutros et al., "ElasticFace: Elastic Margin Loss for Deep Face Recognition", CVPRW 2022.
  """
  key: Array
  scale: Array | float = 64.0
  margin: Array | float = 0.5
  sigma: Array | float = 0.0125
  kind: str = static_field("arc")
  plus: bool = static_field(False)

  def __post_init__(self):
    _common.check_choice("kind", self.kind, ("arc", "cos"))

  def check(self):
    if self.kind == "arc":
      require_angles(self, "margin")
    require(self, "sigma", lambda sigma: sigma >= 0, "a standard deviation, at least 0")

  def sampled_margins(self, rows: Rows) -> Array:
    """``[B]`` margins for this batch, from ``key``.

    Drawn for the whole batch where mesh axes split it (Explicit axes, or a caller's
    ``shard_map`` over axes named in the mesh's order), each device keeping its examples': the
    margins one device would draw.
    """
    cos = _common.whole_batch(jax.lax.stop_gradient(rows.cos))
    draws = self.margin + self.sigma * jax.random.normal(self.key, cos.shape, cos.dtype)
    if self.plus:  # The k-th largest cosine gets the k-th smallest margin.
      draws = jnp.zeros_like(draws).at[jnp.argsort(-cos)].set(jnp.sort(draws))
    return _common.own_rows(draws, rows.cos)

  def target_logit(self, rows):
    margins = self.sampled_margins(rows)
    if self.kind == "arc":
      return self.scale * cos_add_angle(rows.cos, margins)
    return self.scale * (rows.cos - margins)


SPHEREFACE_R_KINDS = ("v0", "v1", "v2")


@margin_dataclass
class SphereFaceR(Margin):
  r"""SphereFace-R (Liu et al., "SphereFace Revived", TPAMI 2022): SphereFace's multiplicative
  margin on normalised features, any real :math:`m \ge 1`, as the authors' code (opensphere's
  ``SphereFaceR_H``) computes it.

  Logits are :math:`s\,\eta` with the gradient of :math:`s\cos\theta` (the characteristic
  function :math:`\eta` is detached). ``kind='v0'``: target :math:`\eta = (-1)^k\cos(m\theta_y) -
  2k`, :math:`k = \lfloor m\theta_y/\pi\rfloor` (SphereFace's :math:`\psi`, here for real
  :math:`m`); ``'v1'``: target :math:`\cos(\min(m\theta_y, \pi))`; ``'v2'``: the target's
  :math:`\cos\theta_y`, the others' :math:`\cos(\theta_j / m)`. Others are :math:`s\cos\theta_j`
  for v0 and v1. opensphere multiplies the loss by ``lw / s`` (``lw`` 50).

  >>> import jax.numpy as jnp, margins
  >>> cos = jnp.array([1.0, 0.0])  # theta_y = 0 and 90 degrees
  >>> rows = margins.Rows(cos, embedding_norm=jnp.ones(2), weight_norm=jnp.ones(2))
  >>> margins.SphereFaceR(scale=1.0, margin=2.0).target_logit(rows)  # psi(theta) at m = 2
  Array([ 1., -1.], dtype=float32)

  References:
    Liu et al., "SphereFace Revived: Unifying Hyperspherical Face Recognition", TPAMI 2022.
  """
  scale: Array | float = 30.0
  margin: Array | float = 1.5
  kind: str = static_field("v0")

  def __post_init__(self):
    _common.check_choice("kind", self.kind, SPHEREFACE_R_KINDS)

  def check(self):
    require(self, "margin", lambda m: m >= 1, "at least 1 (1: no margin)")

  def target_logit(self, rows):
    if self.kind == "v2":
      return self.scale * rows.cos
    multiplied = self.margin * angle(rows.cos)
    if self.kind == "v1":
      adjusted = capped_cos(multiplied)
    else:
      k = jnp.floor(multiplied / math.pi)
      adjusted = (1 - 2 * jnp.mod(k, 2)) * jnp.cos(multiplied) - 2 * k
    return self.scale * _detached(rows.cos, adjusted)

  def nontarget_logits(self, similarity, rows):
    del rows
    if self.kind != "v2":
      return self.scale * similarity
    adjusted = jnp.cos(angle(jnp.clip(similarity, -1, 1)) / _per_row(self.margin))
    return self.scale * _detached(similarity, adjusted)


SPHEREFACE2_KINDS = ("cos", "arc", "multiplicative")


def similarity_adjustment(cos: Array, t: Array | float) -> Array:
  """SphereFace2's ``g(cos) = 2 ((cos + 1) / 2)^t - 1``: ``[-1, 1]`` onto itself, pushing the
  cosines of unrelated classes (``cos ~ 0``) towards -1. ``cos`` is clipped to ``[-1, 1]`` first:
  a float32 dot product of opposite unit vectors can come out below -1, and a fractional power
  of a negative number is NaN.

  >>> import jax.numpy as jnp
  >>> [round(float(similarity_adjustment(jnp.float32(c), 3.0)), 4) for c in (-1.0, 0.0, 1.0)]
  [-1.0, -0.75, 1.0]

  References:
    Wen et al., "SphereFace2: Binary Classification is All You Need for Deep Face
    Recognition", ICLR 2022.
  """
  return 2 * ((jnp.clip(cos, -1, 1) + 1) / 2) ** t - 1


def _sphereface2_target_cos(cos: Array, margin: Array | float, kind: str) -> Array:
  """SphereFace2's target cosine before :func:`similarity_adjustment`: ``cos`` for ``kind='cos'``
  (the margin is subtracted after it), ``cos(min(theta + m, pi))`` for ``'arc'``,
  ``cos(min(m theta, pi))`` for ``'multiplicative'``."""
  if kind == "cos":
    return cos
  theta = angle(cos)
  shifted = theta + margin if kind == "arc" else margin * theta
  return capped_cos(shifted)


@margin_dataclass
class SphereFace2(Margin):
  r"""SphereFace2 (Wen et al., ICLR 2022): one binary classifier per class, no softmax.

  Every class scores :math:`f_j = r\,g(\cos\theta_j) + b` with the similarity adjustment
  :math:`g` (:func:`similarity_adjustment`), a margin and one learnt bias :math:`b`; each example
  pays

  .. math:: \ell = \frac{\lambda}{r}\log(1 + e^{-f_y})
            + \frac{1 - \lambda}{r}\sum_{j \ne y}\log(1 + e^{f_j}).

  ``kind='cos'`` (SphereFace2-C): :math:`f_y = r(g(\cos\theta_y) - m) + b`,
  :math:`f_j = r(g(\cos\theta_j) + m) + b`; ``'arc'`` (-A): :math:`f_y = r\,g(\cos(\theta_y + m))
  + b`; ``'multiplicative'`` (-M): :math:`f_y = r\,g(\cos(m\theta_y)) + b` (both angles capped at
  :math:`\pi`), others :math:`r\,g(\cos\theta_j) + b`. As in the authors' code (opensphere),
  :math:`g` and the margin set the values only: the gradient is that of :math:`r\cos\theta + b`.
  Start ``bias`` at :func:`sphereface2_bias` and train it with the network. opensphere multiplies
  the loss by ``lw`` (50; 10 in its appendix configurations).

  Attributes:
    bias: :math:`b`, a learnt scalar.
    scale: :math:`r`.
    margin: :math:`m`.
    t: the exponent of :math:`g`.
    alpha: :math:`\lambda`, the weight of the positive classifier.
    kind: ``'cos'``, ``'arc'`` or ``'multiplicative'``.

  >>> import jax.numpy as jnp, margins
  >>> cos = jnp.array([1.0, 0.0])  # theta_y = 0 and 90 degrees
  >>> rows = margins.Rows(cos, embedding_norm=jnp.ones(2), weight_norm=jnp.ones(2))
  >>> margins.SphereFace2(bias=0.0, scale=1.0).target_logit(rows)  # g(cos) - 0.4 (+ bias 0)
  Array([ 0.6 , -1.15], dtype=float32)

  References:
    Wen et al., "SphereFace2: Binary Classification is All You Need for Deep Face
    Recognition", ICLR 2022.
  """
  bias: Array | float
  scale: Array | float = 40.0
  margin: Array | float = 0.4
  t: Array | float = 3.0
  alpha: Array | float = 0.7
  kind: str = static_field("cos")
  one_vs_all = True

  def __post_init__(self):
    _common.check_choice("kind", self.kind, SPHEREFACE2_KINDS)

  def check(self):
    if self.kind == "arc":
      require_angles(self, "margin")
    require(self, "alpha", lambda a: (a >= 0) & (a <= 1), "a weight in [0, 1]")
    require(self, "t", lambda t: t > 0, "positive (1: no similarity adjustment)")

  def _logits(self, cos: Array, adjusted: Array, bias: Array | float) -> Array:
    """The value of ``r adjusted + b``, the gradient of ``r cos + b``."""
    return self.scale * _detached(cos, adjusted) + bias

  def target_logit(self, rows):
    adjusted = similarity_adjustment(
        _sphereface2_target_cos(rows.cos, self.margin, self.kind), self.t)
    return self._logits(rows.cos, adjusted - self.margin if self.kind == "cos" else adjusted,
                        self.bias)

  def nontarget_logits(self, similarity, rows):
    del rows
    margin, t, bias = (_per_row(value) for value in (self.margin, self.t, self.bias))
    adjusted = similarity_adjustment(similarity, t)
    return self._logits(similarity, adjusted + margin if self.kind == "cos" else adjusted, bias)

  def row_terms(self, logits, row_max):
    del row_max  # Always 0: softplus needs no shift.
    return jax.nn.softplus(logits)

  def loss(self, target, row_max, row_sum):
    del row_max
    return (self.alpha * jax.nn.softplus(-target) + (1 - self.alpha) * row_sum) / self.scale


def sphereface2_bias(num_classes: int, *, scale: float = 40.0, margin: float = 0.4,
                     t: float = 3.0, alpha: float = 0.7, kind: str = "cos") -> float:
  r"""SphereFace2's initial bias: where the loss of an untrained network is flat in ``b``.

  With every cosine 0 (random features and centres), the target logit is :math:`a_y + b` and the
  :math:`C - 1` others :math:`a + b`. The bias solves
  :math:`\lambda\,\sigma(-a_y - b) = (1 - \lambda)(C - 1)\,\sigma(a + b)`, a quadratic in
  :math:`e^b` (the initialisation of the authors' code).

  >>> round(sphereface2_bias(10_000), 2)  # cosines 0: target logit -46 + b, others -14 + b
  5.64

  References:
    Wen et al., "SphereFace2: Binary Classification is All You Need for Deep Face
    Recognition", ICLR 2022.
  """
  if check_int(num_classes, "num_classes", minimum=0) < 2:
    raise ValueError(f"SphereFace2 needs at least 2 classes, got {num_classes}.")
  if not 0 < alpha < 1:
    raise ValueError(f"`alpha` must lie in (0, 1), got {alpha}.")
  untrained = SphereFace2(bias=0.0, scale=scale, margin=margin, t=t, alpha=alpha, kind=kind)
  # Logits of thousands (large scales) to float64's precision; computed now, also where a
  # caller traces (a model's initialisation under jit or nnx.eval_shape).
  with jax.enable_x64(True), jax.ensure_compile_time_eval():
    zeros = jnp.zeros((1,), jnp.float64)
    rows = Rows(cos=zeros, embedding_norm=jnp.ones_like(zeros), weight_norm=jnp.ones_like(zeros))
    target = float(untrained.target_logit(rows)[0])
    other = float(untrained.nontarget_logits(zeros[:, None], rows)[0, 0])
  ratio = alpha / ((1 - alpha) * (num_classes - 1))
  # u = e^b solves e^(target + other) u^2 + e^other (1 - ratio) u - ratio = 0. Its positive root
  # in the one of its two forms that does not cancel, in logarithms: at large scales
  # e^(target - other) under- or overflows.
  log_gap = math.log(abs(1 - ratio)) if ratio != 1 else -math.inf  # log |1 - ratio|
  log_root = 0.5 * np.logaddexp(2 * log_gap, math.log(4 * ratio) + target - other)
  if ratio <= 1:
    return float(math.log(2 * ratio) - other - np.logaddexp(log_gap, log_root))
  return float(np.logaddexp(log_gap, log_root) - math.log(2) - target)


def _check_static_fields(margin: Margin) -> None:
  """Raises unless each static field holds a plain Python value of its default's kind.

  A static field is part of the structure that keys ``jit``'s cache: an array or a tracer there
  cannot be compared, and one failed call would leave every later call of the class failing.
  """
  name = type(margin).__name__
  for field in dataclasses.fields(margin) if dataclasses.is_dataclass(margin) else ():
    if not field.metadata.get("static"):
      continue
    value = getattr(margin, field.name)
    if isinstance(value, (jax.Array, np.ndarray)):
      hint = (" Under jax.jit, pass it with static_argnames."
              if isinstance(value, jax.core.Tracer) else "")
      raise TypeError(f"`{field.name}` of {name} is static (it selects the compiled program) "
                      f"and must be a Python value, got {value!r}.{hint}")
    kind = type(field.default)
    if (kind is bool and (isinstance(value, str) or value not in (True, False))
        or kind is str and not isinstance(value, str)):  # 1 for True is fine; "yes" is not.
      raise TypeError(f"`{field.name}` of {name} must be a {kind.__name__}, got {value!r}.")


def check_margin(margin: Any) -> Margin:
  """Raises a clear error unless ``margin`` is a :class:`Margin` with valid fields."""
  if not isinstance(margin, Margin):
    raise TypeError(f"`margin` must be a margins.Margin (e.g. margins.ArcFace()), got {margin!r}.")
  if any(leaf is margin for leaf in jax.tree_util.tree_leaves(margin)):  # Not a pytree.
    raise TypeError(f"{type(margin).__name__} must be decorated with @margins.margin_dataclass "
                    "(a subclass of a margin too), which makes it a pytree.")
  _check_static_fields(margin)
  for field in dataclasses.fields(margin):
    value = getattr(margin, field.name)
    if (not field.metadata.get("static") and isinstance(value, (list, tuple))
        and all(isinstance(item, (int, float)) for item in value)):
      # Numbers in a list: a tracer's "unsupported operand" in the engine. (A custom margin's
      # tuple of arrays is a pytree node of its own.)
      raise TypeError(f"`{field.name}` of {type(margin).__name__} must be a number or an array, "
                      f"got a {type(value).__name__}: one value per example is an array "
                      f"(jnp.asarray({value!r})).")
  scale = getattr(margin, "scale", None)  # None: SphereFace's logits scale with |x|.
  if scale is not None:
    # One for the batch (margins may vary per row); a learnt one may be a [1] parameter.
    if np.size(scale) != 1:
      raise ValueError(f"`scale` of {type(margin).__name__} must be a scalar, got shape "
                       f"{np.shape(scale)}.")
    require(margin, "scale", lambda s: (s > 0) & np.isfinite(s), "positive and finite")
  margin.check()
  return margin


def is_per_example(value: Any, batch_size: int) -> bool:
  """Whether a margin's field ``value`` holds one float per example of a batch of
  ``batch_size``: a ``[B]`` array (not a PRNG key's data, not a learnt ``[1]`` scale)."""
  return (isinstance(value, (jax.Array, np.ndarray)) and value.shape == (batch_size,)
          and jnp.issubdtype(value.dtype, jnp.inexact))


def check_batch_fields(margin: Margin, batch_size: int) -> None:
  """Raises ``ValueError`` where a field of a zoo margin is a vector of another length than the
  batch: its fields hold one value or one per example. (A margin of your own may hold vectors of
  its own: not checked.)"""
  if type(margin).__module__ != __name__:
    return
  for field in dataclasses.fields(margin):
    value = getattr(margin, field.name)
    if (isinstance(value, (jax.Array, np.ndarray)) and value.ndim == 1
        and value.shape[0] not in (1, batch_size) and jnp.issubdtype(value.dtype, jnp.inexact)):
      raise ValueError(f"`{field.name}` of {type(margin).__name__} must be one value or one per "
                       f"example ({batch_size}), got shape {value.shape}.")
