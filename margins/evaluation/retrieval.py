r"""Open-set retrieval metrics, as pytorch-metric-learning's ``AccuracyCalculator`` defines them.

Every example is a query against all the others (leave-one-out: a query never retrieves itself),
ranked by the cosine similarity of L2-normalised embeddings. With ``R`` the number of *other*
examples of the query's class:

- **precision@1**: whether the nearest neighbour has the query's class;
- **R-precision**: the fraction of the ``R`` nearest neighbours that have the query's class;
- **MAP@R**: :math:`\frac{1}{R} \sum_{i=1}^{R} P(i)\, \mathrm{rel}(i)`, with ``rel(i)`` whether
  the ``i``-th neighbour has the query's class and ``P(i)`` the precision of the first ``i``
  neighbours: rewards putting the ``R`` relevant examples first, in any order among themselves.

Each metric is the mean over queries (pytorch-metric-learning's default ``avg_of_avgs=False``);
queries alone in their class (``R = 0``) are left out, as there.

Ties: a neighbour of another class whose similarity equals that of a neighbour of the query's
class, to within ``TIE_TOLERANCE``, is ranked before it (the pessimistic order), so the metrics
never credit a tie, and a model that maps everything to one point scores 0. The tolerance is for
rounding: a matrix product gives equal cosines a few units apart in their last digit, differently
for different ``chunk_size``. pytorch-metric-learning leaves tie order to its nearest-neighbour
search.
"""

import numpy as np
import sklearn.preprocessing

from margins._checks import check_int
from margins.evaluation.verification import _check_embeddings
from margins.losses import _common

TIE_TOLERANCE = 1e-12  # Float64 cosines of unit vectors are within ~1e-14 of their exact value.


def _ranks_of_relevant(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
  """``[Q, R]`` rank (from 1) of each query's ``R`` relevant examples, best first.

  The ``i``-th most similar relevant example is ranked ``i`` plus the number of negatives at
  least as similar, less ``TIE_TOLERANCE`` (ties go to the negative). Only negatives among the
  ``R`` most similar can rank a relevant example within the first ``R``, so only those are
  sorted.

  Args:
    positive: ``[Q, R]`` similarities of each query to the other examples of its class.
    negative: ``[Q, M]`` similarities to the examples of other classes.
  """
  num_relevant, num_negative = positive.shape[1], negative.shape[1]
  if num_negative > num_relevant:
    negative = np.partition(negative, num_negative - num_relevant, axis=1)[:, -num_relevant:]
  positive = -np.sort(-positive, axis=1)
  negative = np.sort(negative, axis=1)
  negatives_ahead = negative.shape[1] - np.stack([
      np.searchsorted(row_negative, row_positive - TIE_TOLERANCE, side="left")
      for row_negative, row_positive in zip(negative, positive)])
  return np.arange(1, num_relevant + 1) + negatives_ahead


def retrieval_metrics(embeddings, labels, *, chunk_size: int = 512) -> dict[str, float]:
  """Precision@1, R-precision and MAP@R of every example queried against all the others.

  Exact (no approximate search): the similarities are computed in float64, ``chunk_size`` queries at
  a time (memory a few times ``chunk_size * N`` floats: 167 MB at ``N = 20,000`` in classes of ten,
  500 MB in one class: tracemalloc's peak at the default chunks); each query sorts only its ``R``
  most similar examples of other classes with its ``R`` of its own, so the cost is ``O(N^2 D)`` for
  the similarities plus ``O(N (N + R log R))``: 1.5-6 s for ``N = 10^4``, ``D = 128`` on 2 CPU cores
  (the more examples per class, the slower).

  Args:
    embeddings: ``[N, D]`` embeddings (L2-normalised here; a zero row stays zero).
    labels: ``[N]`` integer class of each example; at least one class needs 2 examples.
    chunk_size: queries per block of the similarity matrix.

  Returns:
    ``{"precision_at_1": ..., "r_precision": ..., "mean_average_precision_at_r": ...}``, each the
    mean over the queries whose class has another example.

  >>> import numpy as np
  >>> from margins.evaluation import retrieval_metrics
  >>> embeddings = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.5], [0.2, 0.9]])
  >>> metrics = retrieval_metrics(embeddings, np.array([0, 0, 1, 1, 1]))
  >>> {name: round(value, 4) for name, value in metrics.items()}
  {'precision_at_1': 0.8, 'r_precision': 0.9, 'mean_average_precision_at_r': 0.85}

  References:
    K. Musgrave, S. Belongie, S.-N. Lim, "A Metric Learning Reality Check", ECCV 2020 (MAP@R);
    pytorch-metric-learning, ``utils/accuracy_calculator.py``.
  """
  embeddings = _check_embeddings("embeddings", embeddings)
  _common.check_labels(labels, embeddings.shape[0])
  chunk_size = check_int(chunk_size, "chunk_size", minimum=1)
  labels = np.asarray(labels)
  _, classes, counts = np.unique(labels, return_inverse=True, return_counts=True)
  if counts.max() < 2:
    raise ValueError("`labels` has no class with 2 examples: no query has anything to retrieve.")

  unit = sklearn.preprocessing.normalize(embeddings)
  by_class = np.argsort(classes, kind="stable")  # Each class's examples in increasing index.
  queries = by_class[counts[classes[by_class]] >= 2]
  totals = np.zeros(3)
  for start in range(0, queries.size, chunk_size):
    block = queries[start:start + chunk_size]
    similarities = unit[block] @ unit.T
    block_classes = classes[block]
    bounds = [0, *(np.flatnonzero(np.diff(block_classes)) + 1), block.size]
    for first, stop in zip(bounds[:-1], bounds[1:]):  # One class at a time.
      in_class = classes == block_classes[first]
      members = np.flatnonzero(in_class)
      own = similarities[first:stop, in_class]
      not_self = np.ones(own.shape, bool)
      not_self[np.arange(stop - first), np.searchsorted(members, block[first:stop])] = False
      ranks = _ranks_of_relevant(own[not_self].reshape(stop - first, members.size - 1),
                                 similarities[first:stop, ~in_class])
      # The i-th relevant example, at rank r_i <= R, adds precision i / r_i to MAP@R.
      within_r = ranks <= members.size - 1
      totals += [
          np.sum(ranks[:, 0] == 1),
          np.sum(within_r) / (members.size - 1),
          np.sum(np.where(within_r, np.arange(1, members.size) / ranks, 0)) / (members.size - 1),
      ]
  precision_at_1, r_precision, map_at_r = totals / queries.size
  return {"precision_at_1": float(precision_at_1), "r_precision": float(r_precision),
          "mean_average_precision_at_r": float(map_at_r)}


def format_retrieval(name: str, metrics: dict[str, float], *, step: int | None = None) -> str:
  """One log line for :func:`retrieval_metrics`, in the style of :func:`format_verification`.

  >>> from margins.evaluation import format_retrieval
  >>> print(format_retrieval("digits", {"precision_at_1": 0.9, "r_precision": 0.7,
  ...                                   "mean_average_precision_at_r": 0.6}, step=10))
  [digits][10] Precision@1: 0.90000  R-Precision: 0.70000  MAP@R: 0.60000

  References:
    insightface, ``recognition/arcface_torch/utils/utils_callbacks.py`` (the log format).
  """
  prefix = f"[{name}]" if step is None else f"[{name}][{step}]"
  return (f"{prefix} Precision@1: {metrics['precision_at_1']:.5f}  "
          f"R-Precision: {metrics['r_precision']:.5f}  "
          f"MAP@R: {metrics['mean_average_precision_at_r']:.5f}")
