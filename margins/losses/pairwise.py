r"""Pairwise metric-learning losses: contrastive, triplet (all, batch-hard, semi-hard) and circle.

Every loss compares the examples of one batch with each other: ``(i, j)`` is a positive pair when
``labels[i] == labels[j]`` and ``i != j`` (self-pairs never count), a negative pair when the labels
differ. Each example is in turn the anchor, and the losses return one value per anchor, ``[B]``;
an anchor without the pairs its loss needs gives 0, with zero gradient.

Embeddings are L2-normalised (``normalize=True``; a zero embedding stays zero) and compared by
Euclidean distance, computed from the Gram matrix: memory is ``O(B^2)`` for every loss, including
triplet mining over all ``O(B^3)`` triplets, which sorts each anchor's negative distances instead of
enumerating triplets. Everything runs in float32 (float64 when the inputs are) whatever the input
dtype, and distances have finite gradients at 0 (duplicated embeddings). Norms are floored as the
classification losses' are: a float16 embedding shorter than 0.01 is divided by 0.01.

Labels are only compared, so any integers do; but ``jit`` passes 64-bit labels on as int32 unless
``jax_enable_x64`` is set, and two ids equal modulo ``2**32`` then count as one identity. Map
such ids to ``0..K-1`` first (``np.unique(ids, return_inverse=True)[1]``).

How the pair (or triplet) terms of one anchor become its loss is set by ``average``:

* ``"anchor"``: the mean over all the anchor's pairs (triplets).
* ``"anchor_non_zero"``: the mean over the anchor's pairs (triplets) with a non-zero term.
* ``"batch_non_zero"``: the anchor's sum divided by the number of non-zero terms in the whole batch,
  so that ``loss.sum()`` is pytorch-metric-learning's number (its ``AvgNonZeroReducer``) for the
  same distance and margins.
* ``"batch"``: the anchor's sum divided by the number of terms in the whole batch, so that
  ``loss.sum()`` is the mean over all the batch's pairs (triplets): pytorch-metric-learning's
  ``MeanReducer``, and TensorFlow Addons' ``triplet_semihard_loss`` (the mean over all positive
  pairs) where every anchor has a negative. ``"anchor"`` and ``loss.mean()`` instead weight the
  anchors equally and count those without pairs as 0.

Contrastive losses average their positive and negative terms separately, as pytorch-metric-learning
does, so that a batch's many negatives do not drown its few positives.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from margins.losses import _common

Array = jax.Array

AVERAGES = ("anchor", "anchor_non_zero", "batch_non_zero", "batch")
MININGS = ("all", "batch_hard", "semi_hard")


def _whole_batch(loss_fn):
  """Runs ``loss_fn(embeddings, labels, **hyperparameters)`` on the whole batch on every device
  where mesh axes split the batch (Explicit axes, or a caller's ``shard_map``: an all-gather of
  ``[B, D]`` and ``[B]``, so that every pair of the batch counts), and keeps each device's rows
  of its ``[B]`` losses."""
  @functools.wraps(loss_fn)
  def loss_over_whole_batch(embeddings: Array, labels: Array, **hyperparameters) -> Array:
    _common.check_floating("embeddings", embeddings, 2)
    labels = _common.check_labels(labels, np.shape(embeddings)[0])
    losses = loss_fn(_common.whole_batch(embeddings), _common.whole_batch(labels),
                     **hyperparameters)
    return _common.own_rows(losses, embeddings)
  return loss_over_whole_batch


def _pair_masks(labels: Array) -> tuple[Array, Array]:
  """``[B, B]`` masks of positive pairs (same label, not self) and negative pairs."""
  same = labels[:, None] == labels[None, :]
  return same & ~jnp.eye(labels.shape[0], dtype=bool), ~same


def _prepared(embeddings: Array, normalize: bool) -> Array:
  """Embeddings in the compute dtype, L2-normalised when ``normalize``."""
  _common.check_flag("normalize", normalize)
  x = embeddings.astype(_common.compute_dtype(embeddings))
  return _common.l2_normalize(x, floor_dtype=embeddings.dtype) if normalize else x


def _gram(x: Array) -> Array:
  return jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)


def pairwise_distances(x: Array, *, squared: bool) -> Array:
  r"""``[B, B]`` Euclidean distances :math:`|x_i - x_j|` (squared when ``squared``) of ``x [B, D]``.

  Computed from the Gram matrix ``G`` as :math:`G_{ii} + G_{jj} - 2 G_{ij}` clamped at 0 (the
  squared norms taken from the same ``G``, so that identical rows are exactly 0 apart), whose square
  root has a zero (not infinite) gradient where two rows coincide. Distinct rows closer than about
  ``sqrt(eps) |x|`` are resolved only to that accuracy, as in every Gram-matrix distance.

  >>> import jax.numpy as jnp
  >>> from margins.losses import pairwise
  >>> pairwise.pairwise_distances(jnp.array([[0.0, 0.0], [3.0, 4.0]]), squared=False)
  Array([[0., 5.],
         [5., 0.]], dtype=float32)

  References:
    The Gram-matrix form used by FaceNet's and pytorch-metric-learning's batch losses.
  """
  _common.check_flag("squared", squared)
  gram = _gram(x)
  squared_norms = jnp.diagonal(gram)
  squared_distances = jnp.maximum(squared_norms[:, None] + squared_norms[None, :] - 2 * gram, 0)
  return squared_distances if squared else _common.safe_sqrt(squared_distances)


def _average(total: Array, num_terms: Array, num_non_zero: Array, average: str) -> Array:
  """Per-anchor ``total [B]`` divided as ``average`` says (0 where there is nothing to divide)."""
  if average == "anchor":
    count = num_terms
  elif average == "anchor_non_zero":
    count = num_non_zero
  elif average == "batch":
    count = jnp.sum(num_terms)
  else:
    count = jnp.sum(num_non_zero)
  return total / jnp.maximum(count, 1).astype(total.dtype)


def _average_pairs(terms: Array, mask: Array, average: str) -> Array:
  """Averages masked ``[B, B]`` pair terms per anchor (row)."""
  terms = jnp.where(mask, terms, 0)
  count = lambda m: jnp.sum(m, axis=1, dtype=terms.dtype)
  return _average(jnp.sum(terms, axis=1), count(mask), count(terms > 0), average)


@_whole_batch
def contrastive_loss(embeddings: Array, labels: Array, *, pos_margin: float = 0.0,
                     neg_margin: float = 1.0, squared: bool = False, normalize: bool = True,
                     average: str = "anchor") -> Array:
  r"""Contrastive loss over all pairs of the batch.

  Positive pairs are pulled within ``pos_margin``, negative pairs pushed beyond ``neg_margin``:

  .. math::
      \ell_i = \operatorname*{avg}_{p:\,y_p = y_i,\,p \ne i} [d_{ip} - m_+]_+
             + \operatorname*{avg}_{n:\,y_n \ne y_i} [m_- - d_{in}]_+

  with :math:`d` the Euclidean distance of the L2-normalised embeddings and the averages as set by
  ``average`` (see the module docstring). ``loss.mean()`` with the defaults is each anchor's mean
  positive term plus its mean negative term, averaged over anchors; ``average="batch_non_zero"``
  and ``loss.sum()`` reproduce ``pytorch_metric_learning.losses.ContrastiveLoss()``. Its hinges,
  like these, are not squared: Hadsell et al.'s loss is :math:`\tfrac12 d^2` and
  :math:`\tfrac12 [m_- - d]_+^2`.

  Args:
    embeddings: ``[B, D]``.
    labels: ``[B]`` integers; equal labels make positive pairs.
    pos_margin: ``m_+``.
    neg_margin: ``m_-``.
    squared: compare squared distances :math:`d^2` with the margins instead.
    normalize: L2-normalise the embeddings first.
    average: ``"anchor"``, ``"anchor_non_zero"``, ``"batch_non_zero"`` or ``"batch"``.

  Returns:
    ``[B]`` losses.

  >>> import jax.numpy as jnp, margins
  >>> x = jnp.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
  >>> # The positives are 2 apart, the negatives sqrt(2) > 1 apart; anchor 2 has no positive.
  >>> margins.contrastive_loss(x, jnp.array([0, 0, 1]))
  Array([2., 2., 0.], dtype=float32)

  References:
    Hadsell et al., "Dimensionality Reduction by Learning an Invariant Mapping", CVPR 2006;
    the margins and distance of pytorch-metric-learning's ``ContrastiveLoss``.
  """
  _common.check_choice("average", average, AVERAGES)
  distances = pairwise_distances(_prepared(embeddings, normalize), squared=squared)
  positive, negative = _pair_masks(labels)
  return (_average_pairs(jax.nn.relu(distances - pos_margin), positive, average)
          + _average_pairs(jax.nn.relu(neg_margin - distances), negative, average))


def _sorted_negative_distances(distances: Array, negative: Array) -> tuple[Array, Array, Array]:
  """Each anchor's negative distances in ascending order.

  Returns ``(keys, values, num_negatives)``: ``keys [B, B]`` with ``+inf`` after the negatives (for
  searching), ``values [B, B]`` the same with 0 there (for summing and gathering, differentiable),
  and ``num_negatives [B]``.
  """
  keys = jnp.sort(jnp.where(negative, distances, jnp.inf), axis=1)
  num_negatives = jnp.sum(negative, axis=1, dtype=jnp.int32)
  is_negative = jnp.arange(distances.shape[1], dtype=jnp.int32)[None, :] < num_negatives[:, None]
  return jax.lax.stop_gradient(keys), jnp.where(is_negative, keys, 0), num_negatives


def _search_rows(sorted_rows: Array, queries: Array, side: str) -> Array:
  """``searchsorted`` of each row of ``queries [B, Q]`` in the matching row of ``sorted_rows``."""
  search = lambda row, query: jnp.searchsorted(row, query, side=side)
  return jax.vmap(search)(sorted_rows, jax.lax.stop_gradient(queries))


def _all_triplets(distances, positive, negative, margin, average):
  # For anchor a and positive p, the negatives with d_an < t = d_ap + margin are the first k of the
  # sorted row, and sum_n [t - d_an]_+ = k t - (sum of those k): O(B^2 log B), no [B, B, B] array.
  keys, values, num_negatives = _sorted_negative_distances(distances, negative)
  thresholds = distances + margin
  num_violating = _search_rows(keys, thresholds, side="left")
  prefix_sums = jnp.concatenate([jnp.zeros_like(values[:, :1]), jnp.cumsum(values, axis=1)], axis=1)
  sums = (num_violating.astype(values.dtype) * thresholds
          - jnp.take_along_axis(prefix_sums, num_violating, axis=1))
  dtype = distances.dtype
  num_triplets = jnp.sum(positive, axis=1, dtype=dtype) * num_negatives.astype(dtype)
  num_non_zero = jnp.sum(jnp.where(positive, num_violating, 0), axis=1, dtype=dtype)
  return _average(jnp.sum(jnp.where(positive, sums, 0), axis=1), num_triplets, num_non_zero,
                  average)


def _all_soft_triplets(distances, positive, negative, average):
  # Every triplet's soft term: no sorted sums, so one anchor's [B, B] (p, n) terms at a time.
  def anchor_sums(row):
    anchor_distances, anchor_positives, anchor_negatives = row
    terms = jnp.where(anchor_positives[:, None] & anchor_negatives[None, :],
                      jax.nn.softplus(anchor_distances[:, None] - anchor_distances[None, :]), 0)
    return jnp.sum(terms), jnp.sum(terms > 0, dtype=terms.dtype)

  # Rematerialised: else the backward pass keeps every anchor's [B, B] terms, B^3 in all.
  totals, num_non_zero = jax.lax.map(jax.checkpoint(anchor_sums), (distances, positive, negative))
  dtype = distances.dtype
  num_triplets = jnp.sum(positive, axis=1, dtype=dtype) * jnp.sum(negative, axis=1, dtype=dtype)
  return _average(totals, num_triplets, num_non_zero, average)


def _semi_hard_triplets(distances, positive, negative, hinge, average):
  # FaceNet / TensorFlow's triplet_semihard_loss: for each (a, p), the closest negative farther
  # than d_ap; when there is none, the farthest negative.
  keys, values, num_negatives = _sorted_negative_distances(distances, negative)
  first_farther = _search_rows(keys, distances, side="right")
  farthest = jnp.maximum(num_negatives - 1, 0)[:, None]
  chosen = jnp.where(first_farther < num_negatives[:, None], first_farther, farthest)
  negative_distances = jnp.take_along_axis(values, chosen, axis=1)
  valid = positive & (num_negatives > 0)[:, None]
  return _average_pairs(hinge(distances - negative_distances), valid, average)


def _batch_hard_triplets(distances, positive, negative, hinge, average):
  # Hermans et al.: the farthest positive and the closest negative of each anchor.
  has_positive, has_negative = jnp.any(positive, axis=1), jnp.any(negative, axis=1)
  # The initial values, those of the masked entries, are for a batch of none.
  hardest_positive = jnp.max(jnp.where(positive, distances, 0), axis=1, initial=0)
  hardest_negative = jnp.min(jnp.where(negative, distances, jnp.inf), axis=1, initial=jnp.inf)
  hardest_negative = jnp.where(has_negative, hardest_negative, 0)
  valid = has_positive & has_negative
  terms = jnp.where(valid, hinge(hardest_positive - hardest_negative), 0)
  dtype = terms.dtype
  return _average(terms, valid.astype(dtype), (terms > 0).astype(dtype), average)


# The miners that choose one negative per term, whose term is any function of d_ap - d_an.
_MINERS = {
    "batch_hard": _batch_hard_triplets,
    "semi_hard": _semi_hard_triplets,
}


@_whole_batch
def triplet_loss(embeddings: Array, labels: Array, *, margin: float = 0.2, mining: str = "all",
                 squared: bool = True, normalize: bool = True, average: str = "anchor",
                 soft: bool = False) -> Array:
  r"""Triplet loss :math:`[d(a, p) - d(a, n) + m]_+` with in-batch mining.

  Anchors ``a`` are all examples, positives ``p != a`` share the anchor's label, negatives ``n``
  do not. ``d`` is the squared Euclidean distance of the L2-normalised embeddings, as in FaceNet
  (``squared=False`` for the plain distance, as in Hermans et al. and pytorch-metric-learning).
  ``mining`` picks the triplets of each anchor:

  * ``"all"``: every valid ``(p, n)``;
  * ``"batch_hard"``: one triplet, the farthest positive and the closest negative;
  * ``"semi_hard"``: for every positive, the closest negative farther than it
    (:math:`d(a, p) < d(a, n)`, FaceNet's semi-hard negatives, which violate the margin when
    :math:`d(a, n) < d(a, p) + m`); if no negative is farther, the farthest negative (as
    TensorFlow's ``triplet_semihard_loss``).

  Each anchor's triplet terms are averaged as ``average`` says (see the module docstring);
  ``mining="all", squared=False, margin=0.05, average="batch_non_zero"`` and ``loss.sum()`` give
  ``pytorch_metric_learning.losses.TripletMarginLoss()``; ``mining="semi_hard", margin=1.0,
  average="batch"`` and ``loss.sum()`` give TensorFlow Addons' ``triplet_semihard_loss`` on unit
  embeddings (it does not normalise them) of a batch where every anchor has a negative: with
  ``squared=False`` at its default ``distance_metric="L2"`` (not squared), with ``squared=True``
  at ``"squared-L2"`` (and at the default of its early releases, ``"L_2"``, which squared).
  Memory is ``O(B^2)`` for every mode.

  ``soft=True`` takes Hermans et al.'s soft margin :math:`\log(1 + e^{d(a, p) - d(a, n)})` for
  the hinge (no ``m``; TensorFlow Addons' ``triplet_hard_loss(soft=True)``,
  pytorch-metric-learning's ``smooth_loss``), which keeps pulling on triplets the hinge has
  satisfied; every term is then non-zero unless it underflows (Hermans et al. pair it with
  batch-hard mining). With ``"all"``, whose hinge sums come from each anchor's sorted negatives,
  soft terms are summed one anchor at a time instead: ``O(B^3)`` work, still ``O(B^2)`` memory.

  Args:
    embeddings: ``[B, D]``.
    labels: ``[B]`` integers.
    margin: ``m`` (FaceNet: 0.2 on squared distances of unit vectors).
    mining: ``"all"``, ``"batch_hard"`` or ``"semi_hard"``.
    squared: use squared distances.
    normalize: L2-normalise the embeddings first.
    average: ``"anchor"``, ``"anchor_non_zero"``, ``"batch_non_zero"`` or ``"batch"``.
    soft: the soft margin instead of the hinge (``margin`` is then not used).

  Returns:
    ``[B]`` losses.

  >>> import jax.numpy as jnp, margins
  >>> x = jnp.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
  >>> # Squared distances: d(a, p) = 4, d(a, n) = 2; anchor 2 has no positive.
  >>> margins.triplet_loss(x, jnp.array([0, 0, 1]), margin=0.5)
  Array([2.5, 2.5, 0. ], dtype=float32)

  References:
    Schroff et al., "FaceNet: A Unified Embedding for Face Recognition and Clustering", CVPR 2015;
    Hermans et al., "In Defense of the Triplet Loss for Person Re-Identification", arXiv 2017.
  """
  _common.check_choice("mining", mining, MININGS)
  _common.check_choice("average", average, AVERAGES)
  _common.check_flag("soft", soft)
  distances = pairwise_distances(_prepared(embeddings, normalize), squared=squared)
  positive, negative = _pair_masks(labels)
  if mining == "all":
    if soft:
      return _all_soft_triplets(distances, positive, negative, average)
    return _all_triplets(distances, positive, negative, margin, average)
  hinge = jax.nn.softplus if soft else lambda gap: jax.nn.relu(gap + margin)
  return _MINERS[mining](distances, positive, negative, hinge, average)


def _masked_logsumexp(logits: Array, mask: Array) -> Array:
  """Row-wise log-sum-exp over ``mask``; 0 (with zero gradient) for a row with nothing in it."""
  top = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=1, keepdims=True, initial=-jnp.inf)
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0))
  sum_exp = jnp.sum(jnp.exp(jnp.where(mask, logits - top, -jnp.inf)), axis=1)
  has_any = jnp.any(mask, axis=1)
  return jnp.where(has_any, jnp.log(jnp.where(has_any, sum_exp, 1)) + top[:, 0], 0)


@_whole_batch
def circle_loss(embeddings: Array, labels: Array, *, margin: float = 0.25,
                gamma: float = 256.0) -> Array:
  r"""Circle loss, pair-wise form on the cosine similarities within the batch.

  For anchor ``i`` with positive similarities :math:`s_p` and negative similarities :math:`s_n`:

  .. math::
      \ell_i = \operatorname{softplus}\Big(
          \log\sum_n e^{\gamma \alpha_n (s_n - \Delta_n)}
        + \log\sum_p e^{-\gamma \alpha_p (s_p - \Delta_p)}\Big)

  with :math:`\alpha_p = [1 + m - s_p]_+`, :math:`\alpha_n = [s_n + m]_+` (constants for the
  gradient, as in the paper), :math:`\Delta_p = 1 - m`, :math:`\Delta_n = m`. An anchor without a
  positive or without a negative gives 0. pytorch-metric-learning's ``CircleLoss`` is the mean of
  the non-zero entries (its defaults are ``m=0.4, gamma=80``, the paper's fine-grained setting).

  Args:
    embeddings: ``[B, D]`` (normalised inside).
    labels: ``[B]`` integers.
    margin: relaxation ``m`` (0.25 for face recognition).
    gamma: scale :math:`\gamma` (256 for face recognition).

  Returns:
    ``[B]`` losses.

  >>> import jax.numpy as jnp, margins
  >>> x = jnp.array([[1.0, 0.0], [0.75, 0.4375 ** 0.5], [0.25, -(0.9375 ** 0.5)]])
  >>> # Anchor 0 sits on the decision circle, s_p = 1 - m and s_n = m: softplus(0) = log 2.
  >>> float(margins.circle_loss(x, jnp.array([0, 0, 1]))[0])
  0.6931...

  References:
    Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization", CVPR 2020.
  """
  _common.check_range("`gamma`", gamma, lambda g: g > 0, "positive (a scale)")
  x = _prepared(embeddings, True)
  similarity = _gram(x)
  positive, negative = _pair_masks(labels)
  alpha_positive = jax.lax.stop_gradient(jax.nn.relu(1 + margin - similarity))
  alpha_negative = jax.lax.stop_gradient(jax.nn.relu(similarity + margin))
  positive_logits = -gamma * alpha_positive * (similarity - (1 - margin))
  negative_logits = gamma * alpha_negative * (similarity - margin)
  valid = jnp.any(positive, axis=1) & jnp.any(negative, axis=1)
  logits = (_masked_logsumexp(positive_logits, positive)
            + _masked_logsumexp(negative_logits, negative))
  return jnp.where(valid, jax.nn.softplus(logits), 0)
