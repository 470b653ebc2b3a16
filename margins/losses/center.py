r"""Center loss and the update rule that moves its class centres.

Center loss pulls each embedding towards the centre of its class, ``centers [C, D]`` (one row per
class, like the classifier weights). In the paper the centres are not learned by gradient descent:
the loss gives gradient to the embeddings only (the centres pass through ``stop_gradient``), and
:func:`update_centers` moves the centres of the classes present in each batch. Typical use, beside
a softmax-family loss and with ``centers`` kept in the training state::

  loss = softmax_loss + lambda_c * center_loss(x, centers, labels).mean()
  centers = update_centers(centers, jax.lax.stop_gradient(x), labels, alpha=0.5)

Under ``jit`` with Explicit mesh axes, the centres may be split over the devices by rows, as a
class-sharded head's ``W`` is (``margins.sharded``): each device reads and writes the rows it
holds, and the centres are never gathered (the batch's ``[B, D]`` rows are summed over the
devices instead).
"""

import jax
import jax.numpy as jnp
import numpy as np

from margins.losses import _common

Array = jax.Array


def _check_center_inputs(embeddings: Array, centers: Array, labels: Array) -> Array:
  """Checks the inputs; returns the labels as ``_common.check_labels`` does."""
  _common.check_embeddings_and_weights(embeddings, centers, name="centers")
  return _common.check_labels(labels, np.shape(embeddings)[0], np.shape(centers)[0])


def center_loss(embeddings: Array, centers: Array, labels: Array) -> Array:
  r"""Center loss :math:`\ell_i = \tfrac12 |x_i - c_{y_i}|^2`, one value per example.

  The centres get no gradient from this loss (``stop_gradient``): move them with
  :func:`update_centers`. The paper's batch loss is ``loss.sum()`` (often ``loss.mean()``), added
  to the softmax loss with a weight :math:`\lambda_c`. A label outside ``[0, C)`` raises when the
  labels are concrete and gives NaN under ``jit``.

  Args:
    embeddings: ``[B, D]`` (not normalised).
    centers: ``[C, D]`` class centres.
    labels: ``[B]`` integers in ``[0, C)``.

  Returns:
    ``[B]`` losses, in float32 (float64 when an input is).

  >>> import jax.numpy as jnp, margins
  >>> centers = jnp.array([[0.0, 0.0], [1.0, 1.0]])
  >>> margins.center_loss(jnp.array([[3.0, 4.0], [1.0, 2.0]]), centers, jnp.array([0, 1]))
  Array([12.5,  0.5], dtype=float32)

  References:
    Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition", ECCV 2016.
  """
  labels = _check_center_inputs(embeddings, centers, labels)
  dtype = _common.compute_dtype(embeddings, centers)
  in_range = jnp.clip(labels, 0, np.shape(centers)[0] - 1)  # out-of-range losses become NaN
  centers = _common.whole_rows(centers)  # D whole on each device, as the embeddings' rows.
  own_centers = _common.take_rows(jax.lax.stop_gradient(centers), in_range)
  differences = embeddings.astype(dtype) - own_centers.astype(dtype)
  loss = 0.5 * jnp.sum(jnp.square(differences), axis=1)
  return _common.nan_where_invalid(loss, labels, np.shape(centers)[0])


def update_centers(centers: Array, embeddings: Array, labels: Array, *,
                   alpha: float | Array = 0.5) -> Array:
  r"""The paper's centre update: each class present in the batch moves towards its examples.

  .. math::
      c_j \leftarrow c_j - \alpha \frac{\sum_{i:\,y_i = j} (c_j - x_i)}{1 + n_j}

  where :math:`n_j` is the number of examples of class ``j`` in the batch; other centres are
  unchanged. Only the ``<= B`` classes of the batch are read and written (per-class sums over the
  batch, then one scatter), so the cost does not grow with ``C``; donate ``centers`` to ``jit`` to
  update them in place. Arithmetic is in float32 (or wider) and the result keeps ``centers``'s
  dtype. A label outside ``[0, C)`` raises when the labels are concrete; under ``jit`` its example
  is ignored.

  Args:
    centers: ``[C, D]`` class centres.
    embeddings: ``[B, D]``; no gradient is meant to flow through the update.
    labels: ``[B]`` integers in ``[0, C)``.
    alpha: step :math:`\alpha` in ``[0, 1]`` (0.5 in the paper's experiments).

  Returns:
    ``[C, D]`` new centres, with ``centers``'s dtype.

  >>> import jax.numpy as jnp, margins
  >>> centers = jnp.zeros((3, 2))
  >>> x = jnp.array([[2.0, 0.0], [4.0, 0.0], [0.0, 3.0]])
  >>> margins.update_centers(centers, x, jnp.array([0, 0, 2]), alpha=0.5)
  Array([[1.  , 0.  ],
         [0.  , 0.  ],
         [0.  , 0.75]], dtype=float32)

  References:
    Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition", ECCV 2016
    (Algorithm 1).
  """
  labels = _check_center_inputs(embeddings, centers, labels)
  given = jnp.asarray(centers)
  centers = _common.whole_rows(given)  # D whole on each device; split back as given at the end.
  _common.check_range("`alpha`", alpha, lambda a: (a >= 0) & (a <= 1), "in [0, 1]")
  if np.ndim(alpha) != 0:
    raise ValueError(f"`alpha` must be a scalar, got shape {np.shape(alpha)}.")
  dtype = _common.compute_dtype(embeddings, centers)
  # Each class's examples are grouped over the whole batch (all of it on every device where
  # mesh axes split it: Explicit axes, or a caller's ``shard_map``).
  embeddings, labels = _common.whole_batch(embeddings), _common.whole_batch(labels)
  num_classes, batch_size = np.shape(centers)[0], np.shape(labels)[0]
  # Out-of-range labels become `num_classes`, the fill value of the unused slots: both are
  # dropped by the final scatter.
  labels = jnp.where((labels >= 0) & (labels < num_classes), labels, num_classes)
  classes, slots = jnp.unique(labels, size=batch_size, fill_value=num_classes,
                              return_inverse=True)
  slots = slots.reshape(batch_size)
  counts = jax.ops.segment_sum(jnp.ones((batch_size,), dtype), slots, num_segments=batch_size)
  sums = jax.ops.segment_sum(embeddings.astype(dtype), slots, num_segments=batch_size)
  # Where mesh axes split the centres' rows, each device reads and writes the rows it holds.
  rows_sharding = _common.gathered_rows_sharding(centers)
  current = centers.at[classes].get(mode="fill", fill_value=0,
                                    out_sharding=rows_sharding).astype(dtype)
  counts = counts[:, None]
  step = jnp.asarray(alpha, dtype) * (counts * current - sums) / (1 + counts)
  updated = centers.at[classes].set(
      (current - step).astype(centers.dtype), mode="drop",
      out_sharding=None if rows_sharding is None else jax.typeof(centers).sharding)
  return updated if centers is given else jax.reshard(updated, jax.typeof(given).sharding)
