"""Face verification by the LFW protocol, as insightface evaluates its ``.bin`` benchmarks.

Embeddings of ``2P`` images form ``P`` pairs (pair ``i`` is rows ``2i`` and ``2i + 1``), each
labelled same or different identity. Embeddings are L2-normalised (summed with those of the
horizontally flipped images first: :func:`flip_embeddings`) and a pair is accepted as "same" when
the squared Euclidean distance of its two embeddings, ``2 - 2 cos``, is below a threshold.

:func:`evaluate_verification` reports, on the same numbers as insightface's
``recognition/arcface_torch/eval/verification.py``:

- **accuracy** by 10-fold cross-validation: the pairs are split in order (no shuffle) into 10
  folds; for each fold, the threshold on the grid ``0, 0.01, ..., 3.99`` with the best accuracy on
  the other nine folds is applied to it; the mean and (population) standard deviation over folds;
- **VAL@FAR**, insightface's ``calculate_val``: on each fold, the threshold at which the other
  folds' false-accept rate reaches the target, interpolated on the grid ``0, 0.001, ..., 3.999``,
  and the true-accept rate (VAL) and false-accept rate it gives on the fold;

and, from the ROC of all pairs at once (scikit-learn): TAR at chosen FARs, the area under the ROC
and the equal error rate.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np
import sklearn.metrics
import sklearn.model_selection
import sklearn.preprocessing

from margins._checks import check_int
from margins.losses import _common

# insightface's threshold grids on the squared distance (0 to 4 for unit vectors).
_ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
_VAL_THRESHOLDS = np.arange(0, 4, 0.001)


@dataclasses.dataclass(frozen=True, eq=False)
class VerificationResult:
  """What :func:`evaluate_verification` measures on ``P`` pairs and ``F`` folds.

  Attributes:
    accuracy: mean over folds of the held-out accuracy (insightface's ``Accuracy-Flip`` when the
      embeddings are flip-summed).
    accuracy_std: population standard deviation (``np.std``) of the fold accuracies.
    fold_accuracies: ``[F]`` held-out accuracy of each fold.
    fold_thresholds: ``[F]`` squared-distance threshold each fold was tested at, the best on the
      other folds (the first, i.e. smallest, of equally good ones).
    val: mean over folds of the true-accept rate at the threshold where the other folds'
      false-accept rate is ``val_far_target`` (insightface's ``calculate_val``); NaN where a
      fold's test part lacks same or different pairs or its training part lacks different pairs
      (insightface divides by zero there). Where no grid threshold reaches the target on the
      training folds (different pairs all at distance >= 3.999), the threshold is 0 and VAL 0.
    val_std: population standard deviation of VAL over folds.
    far: mean over folds of the false-accept rate those thresholds give on the held-out folds.
    val_far_target: the training false-accept rate VAL was measured at.
    tar_at_far: ``{target FAR: TAR}`` from the ROC of all pairs: the highest true-accept rate of
      an operating point whose false-accept rate is at most the target; NaN when the target is
      below ``1 / num_different_pairs``, the smallest FAR the pairs can measure.
    auc: area under the ROC.
    eer: equal error rate, where the false-accept rate equals the false-reject rate on the ROC
      (linearly interpolated between operating points).
    fpr: ``[K]`` false-accept rates of the ROC, increasing, from 0 to 1.
    tpr: ``[K]`` true-accept rates of the ROC.
    thresholds: ``[K]`` squared-distance thresholds of the ROC (a pair is accepted when its
      distance is at most the threshold; the first, ``-inf``, accepts none).
    distances: ``[P]`` squared Euclidean distance of each pair's normalised embeddings.
    issame: ``[P]`` whether each pair shows one identity.
    fold_index: ``[P]`` the fold each pair was tested in: pair ``i`` is accepted by the protocol
      when ``distances[i] < fold_thresholds[fold_index[i]]``.
    xnorm: insightface's ``XNorm``, the mean L2 norm of the embeddings of the images and of their
      mirror images before they are summed and normalised; NaN unless the caller measured it
      (:func:`evaluate_verification` sees only the sums: set it with ``dataclasses.replace``, as
      :func:`margins.eval_lib.verify_bin_set` does).
  """

  accuracy: float
  accuracy_std: float
  fold_accuracies: np.ndarray
  fold_thresholds: np.ndarray
  val: float
  val_std: float
  far: float
  val_far_target: float
  tar_at_far: dict[float, float]
  auc: float
  eer: float
  fpr: np.ndarray
  tpr: np.ndarray
  thresholds: np.ndarray
  distances: np.ndarray
  issame: np.ndarray
  fold_index: np.ndarray
  xnorm: float = float("nan")


def _check_embeddings(name: str, embeddings) -> np.ndarray:
  _common.check_floating(name, embeddings, 2)
  embeddings = np.asarray(embeddings, np.float64)
  if not np.isfinite(embeddings).all():
    raise ValueError(f"`{name}` must be finite.")
  return embeddings


def flip_embeddings(embeddings, flipped_embeddings) -> np.ndarray:
  r"""The flip test: embeddings of the images plus those of their mirror images, L2-normalised.

  .. math:: e_i = \frac{f(x_i) + f(\bar x_i)}{|f(x_i) + f(\bar x_i)|},
     \quad \bar x_i = \text{the mirror image of } x_i

  Args:
    embeddings: ``[N, D]`` embeddings of the images.
    flipped_embeddings: ``[N, D]`` embeddings of the horizontally flipped images.

  Returns:
    ``float64 [N, D]`` unit rows (a zero sum stays zero).

  >>> import numpy as np
  >>> from margins.evaluation import flip_embeddings
  >>> flip_embeddings(np.array([[3.0, 0.0]]), np.array([[0.0, 4.0]]))
  array([[0.6, 0.8]])

  References:
    insightface, ``recognition/arcface_torch/eval/verification.py`` (``test``).
  """
  embeddings = _check_embeddings("embeddings", embeddings)
  flipped_embeddings = _check_embeddings("flipped_embeddings", flipped_embeddings)
  if embeddings.shape != flipped_embeddings.shape:
    raise ValueError(
        f"`flipped_embeddings` has shape {flipped_embeddings.shape} but `embeddings` has "
        f"{embeddings.shape}.")
  return sklearn.preprocessing.normalize(embeddings + flipped_embeddings)


def check_pairs(issame, *, num_folds: int = 10) -> np.ndarray:
  """``issame`` as ``bool [P]``; raises unless :func:`evaluate_verification` can score these
  pairs in ``num_folds`` folds (both kinds of pair, at least one per fold): a ``.bin`` set is
  checked when it is read, not after its images are embedded.

  >>> from margins.evaluation import check_pairs
  >>> check_pairs([1, 0, 1, 0], num_folds=2).tolist()
  [True, False, True, False]
  >>> check_pairs([True] * 12)
  Traceback (most recent call last):
  ...
  ValueError: `issame` must contain both same and different pairs.
  """
  issame = np.asarray(issame)
  if issame.ndim != 1:
    raise ValueError(f"`issame` must have rank 1 ([num_pairs]), got shape {issame.shape}.")
  if issame.dtype != bool:
    if not np.issubdtype(issame.dtype, np.integer) or not np.isin(issame, (0, 1)).all():
      raise TypeError(f"`issame` must be booleans (or 0/1), got dtype {issame.dtype}.")
    issame = issame.astype(bool)
  if issame.all() or not issame.any():
    raise ValueError("`issame` must contain both same and different pairs.")
  num_folds = check_int(num_folds, "num_folds", minimum=1)
  if num_folds > issame.size:
    raise ValueError(f"`num_folds` ({num_folds}) must not exceed the {issame.size} pairs.")
  return issame


def _accepted_counts(distances: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """How many ``distances`` are strictly below each threshold (insightface accepts ``d < t``)."""
  return np.searchsorted(np.sort(distances), thresholds, side="left")


def _num_correct(distances: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """Correct decisions at each threshold: same pairs accepted plus different pairs rejected."""
  different = ~issame
  return (_accepted_counts(distances[issame], thresholds) + different.sum()
          - _accepted_counts(distances[different], thresholds))


def _val_threshold(distances: np.ndarray, issame: np.ndarray, far_target: float) -> float:
  """insightface's VAL threshold: where the training false-accept rate reaches ``far_target``.

  The false-accept rate on the grid is a non-decreasing step function. The threshold is
  interpolated linearly between the largest grid threshold whose rate is at most the target and
  the next one: what insightface's ``interp1d(far, thresholds, kind='slinear')`` computed with
  SciPy up to 1.8 (later versions refuse the repeated rates, insightface issue #2152). 0 (accept
  nothing) when the rate never reaches the target. When it ends exactly at the target, the last
  grid threshold; there SciPy departs when the rate ends on a flat run (as it does for a target
  of 1): its spline's last knot interval has zero length and gives 0, so VAL and FAR were 0.
  """
  different = ~issame
  far = _accepted_counts(distances[different], _VAL_THRESHOLDS) / different.sum()
  if far[-1] < far_target:
    return 0.0
  below = np.searchsorted(far, far_target, side="right") - 1
  if below == far.size - 1:
    return float(_VAL_THRESHOLDS[-1])
  return float(np.interp(far_target, far[below:below + 2], _VAL_THRESHOLDS[below:below + 2]))


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, num_different: int,
               far_targets: Sequence[float]) -> dict[float, float]:
  """``{target: TAR}`` on a ROC: the highest true-accept rate of an operating point whose
  false-accept rate is at most the target; NaN below ``1 / num_different``, the smallest
  false-accept rate ``num_different`` different pairs can measure."""
  return {far: float(np.max(tpr[fpr <= far])) if far >= 1 / num_different else float("nan")
          for far in far_targets}


def _folds(num_pairs: int, num_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """``(train, test)`` indices of contiguous folds in order; one fold trains and tests on all."""
  if num_folds == 1:
    everything = np.arange(num_pairs)
    return [(everything, everything)]
  return list(sklearn.model_selection.KFold(n_splits=num_folds, shuffle=False).split(
      np.zeros(num_pairs)))


def check_far(name: str, far: float) -> float:
  """``far`` as a float; raises unless it is a false-accept rate in ``(0, 1]``."""
  far = float(far)
  if not 0 < far <= 1:
    raise ValueError(f"`{name}` must be in (0, 1], got {far}.")
  return far


def evaluate_verification(
    embeddings, issame, *, num_folds: int = 10,
    far_targets: Sequence[float] = (1e-2, 1e-3, 1e-4), val_far_target: float = 1e-3,
) -> VerificationResult:
  """Verification accuracy (10-fold LFW protocol), VAL@FAR, TAR@FAR, AUC and EER.

  The embeddings are L2-normalised (in float64; a zero row stays zero, as in insightface, so two
  zero rows are 0 apart and accepted as "same" at every threshold) and pair ``i`` is scored by the
  squared distance ``|e_{2i} - e_{2i+1}|^2``; a pair is accepted as "same" when its distance is
  below a threshold.
  The fold statistics (accuracy, best thresholds, VAL, FAR) are exactly those of insightface's
  ``evaluate(normalize(embeddings), issame)`` (see the module docstring); TAR@FAR, the AUC, the
  EER and the ROC come from the ROC of all pairs together.

  Args:
    embeddings: ``[2P, D]`` embeddings; pair ``i`` is rows ``2i`` and ``2i + 1``. For the flip
      test pass :func:`flip_embeddings` of the images and their mirror images.
    issame: ``[P]`` booleans (or 0/1): whether pair ``i`` shows one identity. Both kinds needed.
    num_folds: folds of the cross-validation, split in pair order (10 in the protocol); with 1,
      the threshold is chosen and tested on all pairs.
    far_targets: false-accept rates to report the ROC's true-accept rate at.
    val_far_target: the false-accept rate of insightface's VAL (``1e-3`` there).

  Returns:
    A :class:`VerificationResult`.

  >>> import numpy as np
  >>> from margins.evaluation import evaluate_verification
  >>> rng = np.random.default_rng(0)
  >>> issame = np.arange(600) % 2 == 0
  >>> first = rng.normal(size=(600, 16))
  >>> second = np.where(issame[:, None], first + 0.9 * rng.normal(size=(600, 16)),
  ...                   rng.normal(size=(600, 16)))
  >>> embeddings = np.stack([first, second], axis=1).reshape(1200, 16)
  >>> result = evaluate_verification(embeddings, issame)
  >>> print(f"{result.accuracy:.5f}+-{result.accuracy_std:.5f} AUC {result.auc:.4f}")
  0.97000+-0.01633 AUC 0.9951

  References:
    G. B. Huang et al., "Labeled Faces in the Wild", 2007 (the 10-fold protocol); insightface,
    ``recognition/arcface_torch/eval/verification.py`` (``evaluate``, ``calculate_roc``,
    ``calculate_val``).
  """
  embeddings = _check_embeddings("embeddings", embeddings)
  if embeddings.shape[0] != 2 * np.size(issame):
    raise ValueError(
        f"`embeddings` must have 2 rows per pair: {2 * np.size(issame)} for {np.size(issame)} "
        f"pairs, got {embeddings.shape[0]}.")
  issame = check_pairs(issame, num_folds=num_folds)
  far_targets = tuple(check_far("far_targets", far) for far in far_targets)
  val_far_target = check_far("val_far_target", val_far_target)

  unit = sklearn.preprocessing.normalize(embeddings)
  distances = np.sum(np.square(unit[0::2] - unit[1::2]), axis=1)

  fold_accuracies, fold_thresholds, vals, fars = [], [], [], []
  fold_index = np.zeros(issame.size, np.int64)
  for fold, (train, test) in enumerate(_folds(issame.size, num_folds)):
    fold_index[test] = fold
    best = np.argmax(_num_correct(distances[train], issame[train], _ACCURACY_THRESHOLDS))
    fold_thresholds.append(_ACCURACY_THRESHOLDS[best])
    correct = _num_correct(distances[test], issame[test], _ACCURACY_THRESHOLDS[best:best + 1])
    fold_accuracies.append(correct[0] / test.size)

    test_same, test_different = issame[test], ~issame[test]
    if test_same.any() and test_different.any() and not issame[train].all():
      threshold = _val_threshold(distances[train], issame[train], val_far_target)
      accepted = distances[test] < threshold
      vals.append(np.sum(accepted & test_same) / test_same.sum())
      fars.append(np.sum(accepted & test_different) / test_different.sum())
    else:
      vals.append(np.nan)
      fars.append(np.nan)

  fpr, tpr, score_thresholds = sklearn.metrics.roc_curve(
      issame, -distances, drop_intermediate=False)
  return VerificationResult(
      accuracy=float(np.mean(fold_accuracies)),
      accuracy_std=float(np.std(fold_accuracies)),
      fold_accuracies=np.array(fold_accuracies),
      fold_thresholds=np.array(fold_thresholds),
      val=float(np.mean(vals)),
      val_std=float(np.std(vals)),
      far=float(np.mean(fars)),
      val_far_target=val_far_target,
      tar_at_far=tar_at_far(fpr, tpr, np.sum(~issame), far_targets),
      auc=float(sklearn.metrics.auc(fpr, tpr)),
      eer=float(np.interp(0.0, fpr + tpr - 1, fpr)),
      fpr=fpr,
      tpr=tpr,
      thresholds=-score_thresholds,
      distances=distances,
      issame=issame,
      fold_index=fold_index,
  )


def make_pairs(labels, num_pairs: int, *, seed: int | np.random.Generator = 0,
               ) -> tuple[np.ndarray, np.ndarray]:
  """Balanced verification pairs drawn from labelled examples (e.g. held-out identities).

  Same and different pairs alternate (pair ``2k`` same, ``2k + 1`` different), so that every
  contiguous fold of the protocol holds both kinds. A same pair picks a class uniformly, then two
  distinct examples of it; a different pair picks two distinct classes uniformly, then one example
  of each. Pairs are drawn independently, so one may repeat.

  Args:
    labels: ``[N]`` integer class of each example; every class needs at least 2 examples, and
      there must be at least 2 classes.
    num_pairs: number of pairs ``P``, even and positive.
    seed: seed or ``np.random.Generator``; the same seed gives the same pairs.

  Returns:
    ``(pairs, issame)``: ``int64 [P, 2]`` example indices and ``bool [P]``; evaluate with
    ``evaluate_verification(embeddings[pairs.reshape(-1)], issame)``.

  >>> import numpy as np
  >>> from margins.evaluation import make_pairs
  >>> pairs, issame = make_pairs(np.array([0, 0, 1, 1, 2, 2]), 4, seed=0)
  >>> pairs.shape, issame.tolist()
  ((4, 2), [True, False, True, False])

  References:
    G. B. Huang et al., "Labeled Faces in the Wild", 2007 (balanced same/different pairs).
  """
  _common.check_labels(labels, np.size(labels))
  num_pairs = check_int(num_pairs, "num_pairs", minimum=2)
  if num_pairs % 2:
    raise ValueError(f"`num_pairs` must be even (half same, half different), got {num_pairs}.")
  labels = np.asarray(labels)
  classes, counts = np.unique(labels, return_counts=True)
  if classes.size < 2:
    raise ValueError(f"`labels` must hold at least 2 classes, got {classes.size}.")
  if counts.min() < 2:
    raise ValueError(
        f"every class needs at least 2 examples; classes {classes[counts < 2][:5].tolist()} "
        "have 1.")
  rng = np.random.default_rng(seed)
  by_class = np.argsort(labels, kind="stable")
  starts = np.cumsum(counts) - counts

  def examples(which_class, positions):
    return by_class[starts[which_class] + positions]

  half = num_pairs // 2
  same_class = rng.integers(classes.size, size=half)
  first = rng.integers(counts[same_class])
  second = (first + 1 + rng.integers(counts[same_class] - 1)) % counts[same_class]
  class_a = rng.integers(classes.size, size=half)
  class_b = (class_a + 1 + rng.integers(classes.size - 1, size=half)) % classes.size

  pairs = np.empty((num_pairs, 2), np.int64)
  pairs[0::2, 0] = examples(same_class, first)
  pairs[0::2, 1] = examples(same_class, second)
  pairs[1::2, 0] = examples(class_a, rng.integers(counts[class_a]))
  pairs[1::2, 1] = examples(class_b, rng.integers(counts[class_b]))
  return pairs, np.arange(num_pairs) % 2 == 0


def format_value(value: float) -> str:
  """``value`` to five decimals, or ``n/a`` where it was not measured (NaN).

  >>> format_value(0.99652), format_value(float("nan"))
  ('0.99652', 'n/a')
  """
  return "n/a" if np.isnan(value) else f"{value:.5f}"


def format_verification(name: str, result: VerificationResult, *, step: int | None = None,
                        flip: bool = True) -> str:
  """Log lines for one benchmark, insightface style (``[lfw] Accuracy-Flip: 0.99650+-0.00300``).

  Args:
    name: the benchmark, e.g. ``"lfw"``.
    result: its :class:`VerificationResult`.
    step: training step, printed after the name as insightface does (``[lfw][2000]``).
    flip: whether the embeddings were flip-summed (``Accuracy-Flip``, else ``Accuracy``).

  Returns:
    Three lines: the accuracy; VAL@FAR and TAR@FAR (``n/a`` at a FAR below one over the
    negative pairs); AUC and EER. A first line gives XNorm when ``result.xnorm`` was measured
    (not NaN).

  >>> import numpy as np
  >>> from margins.evaluation import evaluate_verification, format_verification
  >>> rng = np.random.default_rng(0)
  >>> issame = np.arange(2000) % 2 == 0
  >>> first = rng.normal(size=(2000, 16))
  >>> second = np.where(issame[:, None], first + 0.8 * rng.normal(size=(2000, 16)),
  ...                   rng.normal(size=(2000, 16)))
  >>> embeddings = np.stack([first, second], axis=1).reshape(4000, 16)
  >>> result = evaluate_verification(embeddings, issame, far_targets=(1e-3,))
  >>> print(format_verification("toy", result, step=100))
  [toy][100] Accuracy-Flip: 0.97750+-0.00873
  [toy][100] VAL@FAR=1e-03: 0.40400+-0.11182 (FAR 0.00100)  TAR@FAR=1e-03: 0.75100
  [toy][100] AUC: 0.99761  EER: 0.02000

  References:
    insightface, ``recognition/arcface_torch/utils/utils_callbacks.py`` (the log format).
  """
  prefix = f"[{name}]" if step is None else f"[{name}][{step}]"
  accuracy = "Accuracy-Flip" if flip else "Accuracy"
  tars = "".join(f"  TAR@FAR={far:.0e}: {format_value(tar)}"
                 for far, tar in result.tar_at_far.items())
  xnorm = [] if np.isnan(result.xnorm) else [f"{prefix} XNorm: {result.xnorm:.5f}"]
  return "\n".join([
      *xnorm,
      f"{prefix} {accuracy}: {result.accuracy:.5f}+-{result.accuracy_std:.5f}",
      f"{prefix} VAL@FAR={result.val_far_target:.0e}: {format_value(result.val)}+-"
      f"{format_value(result.val_std)} (FAR {format_value(result.far)}){tars}",
      f"{prefix} AUC: {result.auc:.5f}  EER: {result.eer:.5f}",
  ])
