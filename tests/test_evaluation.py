"""Tests of margins.evaluation against independent re-implementations written from the protocols.

The verification reference follows insightface's LFW protocol step by step with explicit loops
over folds and thresholds; the retrieval reference ranks every query's neighbours with Python's
``sorted`` and applies pytorch-metric-learning's definitions literally.
"""

import dataclasses
import math
import os

import matplotlib
import matplotlib.collections
import matplotlib.colors
import matplotlib.figure
import numpy as np
import PIL.Image
import pytest

from margins import evaluation
from margins.evaluation import plots
from tests import reference

# ---------------------------------------------------------------------------------------------
# insightface's verification protocol, re-implemented from its description.


def _contiguous_folds(num_pairs, num_folds):
  """Folds in order; the first ``num_pairs % num_folds`` folds hold one pair more."""
  sizes = [num_pairs // num_folds + (i < num_pairs % num_folds) for i in range(num_folds)]
  bounds = np.cumsum([0] + sizes)
  everything = set(range(num_pairs))
  for start, stop in zip(bounds[:-1], bounds[1:]):
    test = list(range(start, stop))
    yield np.array(sorted(everything - set(test))), np.array(test)


def _accuracy_at(threshold, dist, issame):
  return np.sum((dist < threshold) == issame) / len(dist)


def _reference_distances(embeddings):
  unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  return np.sum(np.square(unit[0::2] - unit[1::2]), 1)


def _reference_accuracy(dist, issame, num_folds=10):
  thresholds = np.arange(0, 4, 0.01)
  accuracies, best_thresholds = [], []
  for train, test in _contiguous_folds(len(issame), num_folds):
    best_index, best_accuracy = 0, -1.0
    for index, threshold in enumerate(thresholds):
      accuracy = _accuracy_at(threshold, dist[train], issame[train])
      if accuracy > best_accuracy:  # The first of equally good thresholds wins.
        best_index, best_accuracy = index, accuracy
    best_thresholds.append(thresholds[best_index])
    accuracies.append(_accuracy_at(thresholds[best_index], dist[test], issame[test]))
  return np.array(accuracies), np.array(best_thresholds)


def _interpolate_on_steps(x, y, value):
  """Linear interpolation on non-decreasing ``x`` with repeated values, SciPy 1.8 ``slinear``.

  Uses the interval ``[x_j, x_{j+1})`` holding ``value`` with ``j`` the last such index; at the
  end, ``y``'s last value, where SciPy's spline gave 0 if ``x`` ends on a flat run.
  """
  j = max(i for i in range(len(x)) if x[i] <= value)
  if j == len(x) - 1:
    return y[j]
  return y[j] + (value - x[j]) * (y[j + 1] - y[j]) / (x[j + 1] - x[j])


def _reference_val(dist, issame, far_target=1e-3, num_folds=10):
  thresholds = np.arange(0, 4, 0.001)
  vals, fars = [], []
  for train, test in _contiguous_folds(len(issame), num_folds):
    train_different = dist[train][~issame[train]]
    far_train = [np.sum(train_different < t) / len(train_different) for t in thresholds]
    if max(far_train) >= far_target:
      threshold = _interpolate_on_steps(far_train, thresholds, far_target)
    else:
      threshold = 0.0
    accepted_same = sum(d < threshold for d, same in zip(dist[test], issame[test]) if same)
    accepted_different = sum(
        d < threshold for d, same in zip(dist[test], issame[test]) if not same)
    vals.append(accepted_same / np.sum(issame[test]))
    fars.append(accepted_different / np.sum(~issame[test]))
  return np.mean(vals), np.std(vals), np.mean(fars)


def _pairs_with_separation(rng, num_pairs, dim, noise):
  """Embeddings of ``num_pairs`` pairs in random order: same pairs are noisy copies."""
  issame = rng.random(num_pairs) < 0.5
  first = rng.normal(size=(num_pairs, dim))
  second = np.where(issame[:, None], first + noise * rng.normal(size=(num_pairs, dim)),
                    rng.normal(size=(num_pairs, dim)))
  return np.stack([first, second], axis=1).reshape(2 * num_pairs, dim), issame


def test_val_accepts_nothing_when_no_threshold_reaches_the_target_far():
  # Same pairs at distance 0, different ones at 4: no grid threshold (below 4) accepts a different
  # pair, so insightface's VAL threshold is 0, which accepts nothing (distance < 0), not the
  # pairs at distance 0.
  issame = np.arange(20) % 2 == 0
  first = np.tile([1.0, 0.0], (20, 1))
  second = np.where(issame[:, None], first, -first)
  embeddings = np.stack([first, second], 1).reshape(40, 2)
  result = evaluation.evaluate_verification(embeddings, issame, num_folds=2)
  assert (result.val, result.far) == (0.0, 0.0) and result.accuracy == 1.0


@pytest.mark.parametrize("seed, num_pairs, noise", [(0, 300, 0.8), (1, 157, 1.2), (2, 64, 0.3)])
def test_verification_matches_insightface_protocol(seed, num_pairs, noise):
  embeddings, issame = _pairs_with_separation(np.random.default_rng(seed), num_pairs, 8, noise)
  result = evaluation.evaluate_verification(embeddings, issame)

  dist = _reference_distances(embeddings)
  accuracies, thresholds = _reference_accuracy(dist, issame)
  np.testing.assert_allclose(result.distances, dist, rtol=1e-13, atol=1e-15)
  np.testing.assert_array_equal(result.fold_accuracies, accuracies)
  np.testing.assert_array_equal(result.fold_thresholds, thresholds)
  assert result.accuracy == np.mean(accuracies)
  assert result.accuracy_std == np.std(accuracies)
  for fold, (_, test) in enumerate(_contiguous_folds(num_pairs, 10)):
    np.testing.assert_array_equal(np.flatnonzero(result.fold_index == fold), test)
  # Each pair judged with its fold's threshold reproduces the fold accuracies.
  correct = (result.distances < result.fold_thresholds[result.fold_index]) == issame
  np.testing.assert_array_equal(
      [correct[result.fold_index == fold].mean() for fold in range(10)], accuracies)
  assert (result.val, result.val_std, result.far) == _reference_val(dist, issame)


def test_val_target_on_a_plateau_of_the_training_far():
  # Alternating pairs: every training part holds exactly 45 different pairs, so a target of
  # 2/45 is hit exactly, on a whole range of grid thresholds; the largest of them is used.
  rng = np.random.default_rng(8)
  first = rng.normal(size=(100, 3))
  issame = np.arange(100) % 2 == 0
  second = np.where(issame[:, None], first + 1.2 * rng.normal(size=(100, 3)),
                    rng.normal(size=(100, 3)))
  embeddings = np.stack([first, second], 1).reshape(200, 3)
  result = evaluation.evaluate_verification(embeddings, issame, val_far_target=2 / 45)
  dist = _reference_distances(embeddings)
  assert (result.val, result.val_std, result.far) == _reference_val(dist, issame, 2 / 45)


def test_val_at_a_far_target_of_one_accepts_every_pair():
  # The training rate reaches 1 and stays there to the end of the grid: the last grid threshold
  # accepts every pair (SciPy 1.8's spline, and so insightface, gave 0: accept none).
  embeddings, issame = _pairs_with_separation(np.random.default_rng(5), 200, 8, 0.8)
  result = evaluation.evaluate_verification(embeddings, issame, val_far_target=1.0)
  assert result.distances.max() < 3.999
  assert (result.val, result.val_std, result.far) == (1.0, 0.0, 1.0)


def test_verification_ties_on_the_threshold_grid():
  # Unit vectors whose squared distances are exactly 0, 2 and 4, values on the threshold grid,
  # shared by same and different pairs alike.
  east, north, west = [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]
  layout = [(east, east, True), (east, north, True), (east, north, False), (east, west, False),
            (north, north, False), (east, west, True), (north, east, False), (east, east, True)]
  embeddings = np.array([vector for first, second, _ in layout * 5 for vector in (first, second)])
  issame = np.array([same for _, _, same in layout * 5])
  result = evaluation.evaluate_verification(embeddings, issame, far_targets=(0.2, 0.5))

  dist = _reference_distances(embeddings)
  assert set(dist.tolist()) == {0.0, 2.0, 4.0}
  accuracies, thresholds = _reference_accuracy(dist, issame)
  np.testing.assert_array_equal(result.fold_accuracies, accuracies)
  np.testing.assert_array_equal(result.fold_thresholds, thresholds)
  assert (result.val, result.val_std, result.far) == _reference_val(dist, issame)
  # By hand: every training part is best served by accepting distance 0 only (0 < t <= 2), first
  # reached at the grid's second threshold, 0.01; the folds alternate between the first and the
  # second half of the layout, which that threshold gets 3/4 and 2/4 right.
  np.testing.assert_array_equal(result.fold_thresholds, np.full(10, 0.01))
  np.testing.assert_array_equal(result.fold_accuracies, [0.75, 0.5] * 5)
  assert result.accuracy == 5 / 8


def test_verification_fold_with_one_kind_of_pairs():
  rng = np.random.default_rng(3)
  embeddings, issame = _pairs_with_separation(rng, 40, 6, 0.7)
  issame[:4] = True  # Fold 0 (pairs 0-3) all same,
  issame[4:8] = False  # fold 1 all different.
  result = evaluation.evaluate_verification(embeddings, issame)

  accuracies, thresholds = _reference_accuracy(_reference_distances(embeddings), issame)
  np.testing.assert_array_equal(result.fold_accuracies, accuracies)
  np.testing.assert_array_equal(result.fold_thresholds, thresholds)
  # insightface divides by the fold's same (different) pairs: VAL is undefined.
  assert math.isnan(result.val) and math.isnan(result.far)


def test_verification_single_fold_trains_on_everything():
  embeddings, issame = _pairs_with_separation(np.random.default_rng(4), 50, 4, 1.0)
  result = evaluation.evaluate_verification(embeddings, issame, num_folds=1)
  dist = _reference_distances(embeddings)
  best = max(np.arange(0, 4, 0.01), key=lambda t: _accuracy_at(t, dist, issame))
  assert result.fold_thresholds.tolist() == [best]
  assert result.fold_index.tolist() == [0] * 50
  assert result.accuracy == _accuracy_at(best, dist, issame)
  assert result.accuracy_std == 0


def _roc_points(dist, issame):
  """Every operating point ``(far, tar)`` of "accept when distance <= t", brute force."""
  points = [(0.0, 0.0)]
  for t in sorted(set(dist.tolist())):
    accepted = dist <= t
    points.append((np.sum(accepted & ~issame) / np.sum(~issame),
                   np.sum(accepted & issame) / np.sum(issame)))
  return points


def _reference_eer(points):
  """Where the ROC, linear between operating points, crosses ``far = 1 - tar``."""
  for (far0, tar0), (far1, tar1) in zip(points[:-1], points[1:]):
    gap0, gap1 = far0 + tar0 - 1, far1 + tar1 - 1
    if gap0 <= 0 <= gap1:
      return far0 + (far1 - far0) * (-gap0) / (gap1 - gap0)
  raise AssertionError("the ROC must cross far = 1 - tar")


@pytest.mark.parametrize("seed", [0, 1])
def test_roc_statistics_match_brute_force(seed):
  rng = np.random.default_rng(seed)
  # Few distinct directions: many exact distance ties between same and different pairs, which
  # make diagonal ROC steps (the operating points sklearn's drop_intermediate would remove).
  directions = rng.normal(size=(5, 3))
  embeddings = directions[rng.integers(5, size=400)]
  issame = rng.random(200) < 0.4
  issame[:2] = [True, False]
  targets = (1e-3, 0.01, 0.05, 0.2, 0.5, 1.0)
  result = evaluation.evaluate_verification(embeddings, issame, far_targets=targets)

  dist = result.distances
  num_different = np.sum(~issame)
  points = _roc_points(dist, issame)
  for target in targets:
    if target < 1 / num_different:
      assert math.isnan(result.tar_at_far[target])
    else:
      expected = max(tar for far, tar in points if far <= target)
      assert result.tar_at_far[target] == pytest.approx(expected, abs=1e-12)
  positive, negative = dist[issame], dist[~issame]
  mann_whitney = np.mean((positive[:, None] < negative[None, :])
                         + 0.5 * (positive[:, None] == negative[None, :]))
  assert result.auc == pytest.approx(mann_whitney, abs=1e-12)
  assert result.eer == pytest.approx(_reference_eer(points), abs=1e-12)
  np.testing.assert_allclose(np.stack([result.fpr, result.tpr], 1), points, atol=1e-12)
  np.testing.assert_array_equal(result.thresholds[1:], sorted(set(dist.tolist())))


def test_tar_at_far_keeps_every_operating_point():
  # Each distance is shared by one same and one different pair: the ROC climbs the diagonal
  # through collinear operating points (k/8, k/8), each of them a real threshold.
  distances = np.repeat(np.arange(1, 9) * np.pi / 18, 2)
  embeddings = np.stack([np.ones_like(distances), np.zeros_like(distances),
                         np.cos(distances), np.sin(distances)], 1).reshape(32, 2)
  issame = np.arange(16) % 2 == 0
  result = evaluation.evaluate_verification(embeddings, issame, num_folds=2,
                                            far_targets=(0.125, 0.5))
  assert result.tar_at_far == {0.125: 0.125, 0.5: 0.5}
  assert result.auc == 0.5 and result.eer == 0.5


def test_verification_separable_pairs():
  rng = np.random.default_rng(5)
  first = rng.normal(size=(100, 4))
  issame = np.arange(100) % 2 == 0
  second = np.where(issame[:, None], first + 1e-3 * rng.normal(size=(100, 4)), -first)
  result = evaluation.evaluate_verification(
      np.stack([first, second], 1).reshape(200, 4), issame, far_targets=(0.02, 0.01))
  assert result.accuracy == 1 and result.accuracy_std == 0
  assert result.auc == 1 and result.eer == 0
  # 50 different pairs: FAR 1/50 is the smallest that can be measured.
  assert result.tar_at_far[0.02] == 1 and math.isnan(result.tar_at_far[0.01])
  # Different pairs sit at distance 4, beyond the grid: the training FAR never reaches 1e-3, so
  # insightface's threshold falls back to 0 and accepts nothing.
  assert result.val == 0 and result.far == 0


def test_flip_embeddings():
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
  expected = (a + b) / np.linalg.norm(a + b, axis=1, keepdims=True)
  np.testing.assert_allclose(evaluation.flip_embeddings(a, b), expected, rtol=1e-14)
  np.testing.assert_allclose(
      evaluation.flip_embeddings(a.astype(np.float32), b.astype(np.float32)),
      (a.astype(np.float32).astype(np.float64) + b.astype(np.float32)) / np.linalg.norm(
          a.astype(np.float32).astype(np.float64) + b.astype(np.float32), axis=1, keepdims=True),
      rtol=1e-14)
  with pytest.raises(ValueError, match="flipped_embeddings"):
    evaluation.flip_embeddings(a, b[:3])
  with pytest.raises(TypeError, match="embeddings"):
    evaluation.flip_embeddings(np.ones((2, 2), np.int32), b[:2, :2])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(embeddings=np.ones(8)), ValueError, "embeddings"),
    (dict(embeddings=np.ones((8, 3), np.int32)), TypeError, "embeddings"),
    (dict(embeddings=np.full((8, 3), np.nan)), ValueError, "finite"),
    (dict(embeddings=np.ones((6, 3))), ValueError, "2 rows per pair"),
    (dict(issame=[True] * 4), ValueError, "both"),
    (dict(issame=[0.0, 1.0, 0.0, 1.0]), TypeError, "issame"),
    (dict(issame=[[True, False]] * 2), ValueError, "issame"),
    (dict(num_folds=5), ValueError, "num_folds"),
    (dict(num_folds=0), ValueError, "num_folds"),
    (dict(num_folds=2, far_targets=(0.0,)), ValueError, "far_targets"),
    (dict(num_folds=2, val_far_target=2.0), ValueError, "val_far_target"),
])
def test_verification_bad_input(kwargs, error, match):
  arguments = dict(embeddings=np.random.default_rng(0).normal(size=(8, 3)),
                   issame=[True, False, True, False])
  arguments.update(kwargs)
  with pytest.raises(error, match=match):
    evaluation.evaluate_verification(arguments.pop("embeddings"), arguments.pop("issame"),
                                     **arguments)


def test_format_verification():
  result = evaluation.VerificationResult(
      accuracy=0.9965, accuracy_std=0.003, fold_accuracies=np.ones(10),
      fold_thresholds=np.ones(10), val=0.98, val_std=0.01, far=0.00105, val_far_target=1e-3,
      tar_at_far={1e-3: 0.97, 1e-4: float("nan")}, auc=0.999, eer=0.0045, fpr=np.zeros(2),
      tpr=np.zeros(2), thresholds=np.zeros(2), distances=np.zeros(1), issame=np.ones(1, bool),
      fold_index=np.zeros(1, int))
  assert evaluation.format_verification("lfw", result).splitlines() == [
      "[lfw] Accuracy-Flip: 0.99650+-0.00300",
      "[lfw] VAL@FAR=1e-03: 0.98000+-0.01000 (FAR 0.00105)  TAR@FAR=1e-03: 0.97000"
      "  TAR@FAR=1e-04: n/a",
      "[lfw] AUC: 0.99900  EER: 0.00450",
  ]
  first_line = evaluation.format_verification("cfp_fp", result, step=2000, flip=False)
  assert first_line.splitlines()[0] == "[cfp_fp][2000] Accuracy: 0.99650+-0.00300"
  unmeasured = dataclasses.replace(result, val=np.nan, val_std=np.nan, far=np.nan)
  assert evaluation.format_verification("lfw", unmeasured).splitlines()[1] == (
      "[lfw] VAL@FAR=1e-03: n/a+-n/a (FAR n/a)  TAR@FAR=1e-03: 0.97000  TAR@FAR=1e-04: n/a")


# ---------------------------------------------------------------------------------------------
# make_pairs


def test_make_pairs_balanced_valid_and_deterministic():
  labels = np.repeat(np.arange(7), [2, 3, 5, 2, 9, 4, 2])[np.random.default_rng(0).permutation(27)]
  pairs, issame = evaluation.make_pairs(labels, 400, seed=3)
  assert pairs.shape == (400, 2) and pairs.dtype == np.int64
  np.testing.assert_array_equal(issame, np.arange(400) % 2 == 0)
  same_labels = labels[pairs[:, 0]] == labels[pairs[:, 1]]
  np.testing.assert_array_equal(same_labels, issame)
  assert np.all(pairs[:, 0] != pairs[:, 1])
  assert set(labels[pairs[issame]].ravel()) == set(range(7))  # Every class is drawn.
  again, _ = evaluation.make_pairs(labels, 400, seed=3)
  np.testing.assert_array_equal(pairs, again)
  from_generator, _ = evaluation.make_pairs(labels, 400, seed=np.random.default_rng(3))
  np.testing.assert_array_equal(pairs, from_generator)
  other, _ = evaluation.make_pairs(labels, 400, seed=4)
  assert not np.array_equal(pairs, other)


def test_make_pairs_feed_verification():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(20), 5)
  embeddings = 3 * rng.normal(size=(20, 8))[labels] + rng.normal(size=(100, 8))
  pairs, issame = evaluation.make_pairs(labels, 200, seed=0)
  result = evaluation.evaluate_verification(embeddings[pairs.reshape(-1)], issame)
  assert result.accuracy > 0.9 and not math.isnan(result.val)


@pytest.mark.parametrize("labels, num_pairs, error, match", [
    (np.array([0, 0, 1]), 4, ValueError, "at least 2 examples"),
    (np.array([2, 2, 2]), 4, ValueError, "at least 2 classes"),
    (np.array([0, 0, 1, 1]), 3, ValueError, "even"),
    (np.array([0, 0, 1, 1]), 0, ValueError, "num_pairs"),
    (np.array([0.0, 0.0, 1.0, 1.0]), 4, TypeError, "labels"),
    (np.array([[0, 0], [1, 1]]), 4, ValueError, "labels"),
])
def test_make_pairs_bad_input(labels, num_pairs, error, match):
  with pytest.raises(error, match=match):
    evaluation.make_pairs(labels, num_pairs)


# ---------------------------------------------------------------------------------------------
# Retrieval, against pytorch-metric-learning's definitions applied query by query.


@pytest.mark.parametrize("seed, chunk_size", [(0, 512), (1, 3), (2, 7)])
def test_retrieval_matches_brute_force(seed, chunk_size):
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(6), [1, 2, 4, 7, 12, 3]))  # Class 0 is lone.
  embeddings = 1.5 * rng.normal(size=(6, 5))[labels] + rng.normal(size=(29, 5))
  metrics = evaluation.retrieval_metrics(embeddings, labels, chunk_size=chunk_size)
  expected = reference.retrieval(embeddings, labels)
  assert metrics.keys() == expected.keys()
  for name in metrics:
    assert metrics[name] == pytest.approx(expected[name], abs=1e-12), name


def test_retrieval_ties_are_pessimistic():
  rng = np.random.default_rng(7)
  # Five directions shared by all classes: every similarity is tied many times over.
  directions = rng.normal(size=(5, 4))
  labels = rng.integers(4, size=40)
  embeddings = directions[rng.integers(5, size=40)]
  metrics = evaluation.retrieval_metrics(embeddings, labels, chunk_size=6)
  expected = reference.retrieval(embeddings, labels)
  for name in metrics:
    assert metrics[name] == pytest.approx(expected[name], abs=1e-12), name
  # One point for everything: all neighbours tie, and no tie is credited.
  collapsed = evaluation.retrieval_metrics(np.ones((6, 3)), np.array([0, 0, 0, 1, 1, 1]))
  assert collapsed == {"precision_at_1": 0.0, "r_precision": 0.0,
                       "mean_average_precision_at_r": 0.0}
  # The same with a point whose equal cosines come out of the matrix product a few ulp apart
  # (at D = 64, N = 597 precision@1 was 0.12 with exact ties; at D = 128, N = 50 0.14 in
  # chunks of 1, 0 in chunks of 512).
  for dim, size, chunk_size in (64, 597, 512), (128, 50, 1), (128, 50, 512), (33, 101, 7):
    point = rng.normal(size=dim)
    collapsed = evaluation.retrieval_metrics(np.tile(point, (size, 1)),
                                             rng.integers(10, size=size), chunk_size=chunk_size)
    assert set(collapsed.values()) == {0.0}, (dim, size, chunk_size, collapsed)


def test_retrieval_by_hand():
  # On a circle, at angles (degrees) 0, 10, 20 (class 0) and 15, 100 (class 1).
  angles = np.radians([0.0, 10.0, 20.0, 15.0, 100.0])
  embeddings = np.stack([np.cos(angles), np.sin(angles)], 1)
  metrics = evaluation.retrieval_metrics(embeddings, np.array([0, 0, 0, 1, 1]))
  # Query 0 (R=2): 10 (rel), 15, 20 (rel) -> P@1 1, RP 1/2, AP (1/1)/2.
  # Query 1: 0 or 20 (both 10 away, both rel), 15 is 5 away first -> 0, 1/2, (1/2)/2.
  # Query 2: 15, 10 (rel) -> 0, 1/2, (1/2)/2.
  # Query 3 (R=1): 10 and 20 both 5 away -> 0, 0, 0. Query 4 (R=1): 20 -> 0, 0, 0.
  assert metrics["precision_at_1"] == pytest.approx(1 / 5)
  assert metrics["r_precision"] == pytest.approx(1.5 / 5)
  assert metrics["mean_average_precision_at_r"] == pytest.approx(1 / 5)


def test_retrieval_when_every_class_has_two_examples():
  # As in a set of pairs (LFW's identities): R = 1 for every query. On a circle at angles
  # (degrees) 0, 10 (class 0) and 50, 95 (class 1): the nearest neighbours are 10, 0, 10 and 50,
  # so queries 0, 1 and 3 find their class first and query 2 does not.
  angles = np.radians([0.0, 10.0, 50.0, 95.0])
  embeddings = np.stack([np.cos(angles), np.sin(angles)], 1)
  metrics = evaluation.retrieval_metrics(embeddings, np.array([0, 0, 1, 1]))
  assert metrics == pytest.approx({"precision_at_1": 0.75, "r_precision": 0.75,
                                   "mean_average_precision_at_r": 0.75})


def test_retrieval_of_one_direction_at_any_norms_scores_zero():
  # A model that maps everything to one direction, with norms of its own: the normalised
  # embeddings differ in their last bits, and so do the cosines, which are all ties.
  rng = np.random.default_rng(3)
  for dim, size, chunk_size in (16, 40, 512), (128, 50, 1), (33, 101, 7):
    embeddings = rng.normal(size=dim) * rng.uniform(0.5, 2.0, size=(size, 1))
    metrics = evaluation.retrieval_metrics(embeddings, rng.integers(10, size=size),
                                           chunk_size=chunk_size)
    assert set(metrics.values()) == {0.0}, (dim, size, chunk_size, metrics)


def test_retrieval_bad_input():
  embeddings = np.random.default_rng(0).normal(size=(4, 3))
  with pytest.raises(ValueError, match="no class with 2 examples"):
    evaluation.retrieval_metrics(embeddings, np.arange(4))
  with pytest.raises(ValueError, match="labels"):
    evaluation.retrieval_metrics(embeddings, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="embeddings"):
    evaluation.retrieval_metrics(embeddings[0], np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="chunk_size"):
    evaluation.retrieval_metrics(embeddings, np.zeros(4, np.int32), chunk_size=0)


def test_format_retrieval():
  line = evaluation.format_retrieval(
      "digits", {"precision_at_1": 0.95, "r_precision": 0.8, "mean_average_precision_at_r": 0.75})
  assert line == "[digits] Precision@1: 0.95000  R-Precision: 0.80000  MAP@R: 0.75000"


# ---------------------------------------------------------------------------------------------
# Plots


def _check_png(path, min_size=(300, 200)):
  assert os.path.getsize(path) > 5_000
  with PIL.Image.open(path) as image:
    assert image.format == "PNG"
    assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
    colours = np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)
  assert len(colours) > 50  # Curves, markers and text, not a blank canvas.


def test_plot_roc(tmp_path):
  rng = np.random.default_rng(0)
  results = {}
  for noise in (0.5, 1.0):
    embeddings, issame = _pairs_with_separation(rng, 200, 8, noise)
    results[f"noise {noise}"] = evaluation.evaluate_verification(embeddings, issame)
  path = evaluation.plot_roc(results, tmp_path / "nested" / "roc.png")
  assert path == str(tmp_path / "nested" / "roc.png")
  _check_png(path)
  with pytest.raises(ValueError, match="results_by_name"):
    evaluation.plot_roc({}, tmp_path / "empty.png")
  with pytest.raises(TypeError, match="VerificationResult"):
    evaluation.plot_roc({"bad": {"fpr": [0, 1]}}, tmp_path / "bad.png")


@pytest.mark.parametrize("dim", [2, 3])
def test_plot_embeddings(tmp_path, dim):
  rng = np.random.default_rng(dim)
  labels = np.repeat(np.arange(4), 30)
  features = 4 * rng.normal(size=(4, dim))[labels] + rng.normal(size=(120, dim))
  path = evaluation.plot_embeddings(features, labels, tmp_path / "features.png", title="test",
                                    class_names=["a", "b", "c", "d"])
  _check_png(path, min_size=(800, 300) if dim == 2 else (400, 400))


@pytest.mark.parametrize("features, labels, error, match", [
    (np.ones((5, 4)), np.zeros(5, np.int32), ValueError, r"\[N, 2\] or \[N, 3\]"),
    (np.ones((5, 1)), np.zeros(5, np.int32), ValueError, r"\[N, 2\] or \[N, 3\]"),
    (np.ones(5), np.zeros(5, np.int32), ValueError, "embeddings"),
    (np.ones((5, 2)), np.zeros(4, np.int32), ValueError, "labels"),
    (np.ones((5, 2)), np.zeros(5), TypeError, "labels"),
])
def test_plot_embeddings_bad_input(tmp_path, features, labels, error, match):
  with pytest.raises(error, match=match):
    evaluation.plot_embeddings(features, labels, tmp_path / "bad.png")
  assert not (tmp_path / "bad.png").exists()


def test_plot_angle_histograms(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(5), 12)
  embeddings = 2 * rng.normal(size=(5, 16))[labels] + rng.normal(size=(60, 16))
  _check_png(evaluation.plot_angle_histograms(embeddings, labels, tmp_path / "angles.png"))
  with pytest.raises(ValueError, match="same-class pair"):
    evaluation.plot_angle_histograms(embeddings, np.arange(60), tmp_path / "bad.png")
  with pytest.raises(ValueError, match="same-class pair"):
    evaluation.plot_angle_histograms(embeddings, np.zeros(60, np.int32), tmp_path / "bad.png")
  with pytest.raises(ValueError, match="bins"):
    evaluation.plot_angle_histograms(embeddings, labels, tmp_path / "bad.png", bins=0)


def test_pair_angles_and_their_histograms_count_every_pair_once():
  rng = np.random.default_rng(1)
  embeddings = rng.normal(size=(23, 4))
  labels = rng.integers(3, size=23)
  unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  edges = np.linspace(0, 180, 19)
  counts, sums = plots._pair_angle_histograms(unit, labels, edges, chunk_size=5)
  # Unnormalised embeddings, as a caller has them: the angles are those of their directions.
  angles_by_kind = evaluation.pair_angles(embeddings * rng.uniform(0.1, 10, size=(23, 1)), labels)
  for is_same, got in zip((True, False), angles_by_kind):
    angles = [np.degrees(np.arccos(np.clip(unit[i] @ unit[j], -1, 1)))
              for i in range(23) for j in range(i + 1, 23) if (labels[i] == labels[j]) == is_same]
    np.testing.assert_array_equal(counts[is_same], np.histogram(angles, bins=edges)[0])
    assert sums[is_same] == pytest.approx(sum(angles), rel=1e-12)
    np.testing.assert_allclose(got, angles, rtol=0, atol=1e-9)  # In the order of the pairs.


def test_roc_axis_shows_every_curve_down_to_its_smallest_far():
  # 100 different pairs measure FAR 0.01, 20 only 0.05: the axis starts at the smaller.
  rng = np.random.default_rng(4)
  results = {f"{num_pairs} pairs": evaluation.evaluate_verification(
      *_pairs_with_separation(rng, num_pairs, 8, 0.8)) for num_pairs in (200, 40)}
  axes = matplotlib.figure.Figure().add_subplot()
  evaluation.draw_roc(axes, results)
  smallest = min(np.min(r.fpr[r.fpr > 0]) for r in results.values())
  assert smallest <= 0.011
  assert axes.get_xlim()[0] == pytest.approx(smallest)
  assert all(line.get_xdata().min() >= axes.get_xlim()[0] for line in axes.get_lines())


@pytest.mark.parametrize("dim", [2, 3])
def test_plot_embeddings_draws_the_features_and_their_directions(monkeypatch, tmp_path, dim):
  # 2-D: the features as they are, then L2-normalised onto the circle; 3-D: onto the sphere.
  figures = []
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                      lambda figure, *args, **kwargs: figures.append(figure))
  rng = np.random.default_rng(dim)
  labels = np.repeat(np.arange(3), 10)
  features = 5 * rng.normal(size=(3, dim))[labels] + rng.normal(size=(30, dim))
  evaluation.plot_embeddings(features, labels, tmp_path / "features.png")
  unit = features / np.linalg.norm(features, axis=1, keepdims=True)
  (figure,) = figures
  if dim == 2:
    raw, normalised = figure.axes
    drawn = {"raw": raw, "normalised": normalised}
  else:
    (normalised,) = figure.axes
    drawn = {"normalised": normalised}
  for name, axes in drawn.items():
    scatters = [c for c in axes.collections  # One per class (not the sphere's wireframe).
                if isinstance(c, matplotlib.collections.PathCollection)]
    # A 3-D scatter's own offsets are its projection; its data points are _offsets3d.
    points = [np.asarray(c.get_offsets()) if dim == 2 else np.stack(c._offsets3d, axis=1)
              for c in scatters]
    np.testing.assert_allclose(np.concatenate(points), features if name == "raw" else unit,
                               rtol=1e-6, err_msg=name)


def test_angle_histograms_give_each_kinds_fraction_of_pairs_per_bin():
  # `bins` bins over [0, 180] degrees, each histogram normalised to its own pairs, against the
  # angles of every pair i < j taken one by one.
  rng = np.random.default_rng(5)
  embeddings = rng.normal(size=(12, 3))
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
  axes = matplotlib.figure.Figure().add_subplot()
  evaluation.draw_angle_histograms(axes, embeddings, labels, bins=12)
  unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  angles = {True: [], False: []}
  for i in range(12):
    for j in range(i + 1, 12):
      angles[bool(labels[i] == labels[j])].append(
          math.degrees(math.acos(max(-1.0, min(1.0, float(unit[i] @ unit[j]))))))
  for patch, is_same in zip(axes.patches, (True, False)):
    values, edges, _ = patch.get_data()
    np.testing.assert_allclose(edges, np.arange(0, 181, 15))
    counts = [sum(lo <= a < hi or (hi == 180 and a == 180) for a in angles[is_same])
              for lo, hi in zip(edges[:-1], edges[1:])]
    np.testing.assert_allclose(values, np.array(counts) / len(angles[is_same]), rtol=1e-12)


def test_draw_functions_fill_the_callers_axes():
  rng = np.random.default_rng(2)
  labels = np.repeat(np.arange(3), 10)
  features = 3 * rng.normal(size=(3, 2))[labels] + rng.normal(size=(30, 2))
  embeddings, issame = _pairs_with_separation(rng, 100, 8, 0.7)
  result = evaluation.evaluate_verification(embeddings, issame)
  figure = matplotlib.figure.Figure()
  roc, flat, sphere_axes, angles = (
      figure.add_subplot(2, 2, 1), figure.add_subplot(2, 2, 2),
      figure.add_subplot(2, 2, 3, projection="3d"), figure.add_subplot(2, 2, 4))

  evaluation.draw_roc(roc, {"toy": result})
  assert roc.get_xscale() == "log" and len(roc.get_lines()) == 1
  measured = result.fpr > 0
  np.testing.assert_array_equal(roc.get_lines()[0].get_xdata(), result.fpr[measured])

  evaluation.draw_features(flat, features, labels, normalize=True, class_names=["a", "b", "c"])
  scattered = [c.get_offsets() for c in flat.collections]
  assert len(scattered) == 3  # One colour per class,
  np.testing.assert_allclose(np.linalg.norm(np.concatenate(scattered), axis=1), 1)  # on the circle.
  assert [t.get_text() for t in flat.get_legend().get_texts()] == ["a", "b", "c"]
  assert flat.collections[1].get_facecolor()[0, :3].tolist() == list(
      matplotlib.colormaps["tab10"](1)[:3])

  sphere = np.concatenate([features, np.ones((30, 1))], axis=1)
  evaluation.draw_features(sphere_axes, sphere, labels, normalize=True, legend=False)
  assert sphere_axes.get_legend() is None and len(sphere_axes.collections) == 4  # + wireframe

  evaluation.draw_angle_histograms(angles, features, labels, bins=36, colors=("red", "grey"))
  same, different = angles.patches
  assert same.get_facecolor()[:3] == matplotlib.colors.to_rgb("red")
  assert angles.get_legend().get_texts()[0].get_text().startswith("intra-class (135 pairs")
  with pytest.raises(ValueError, match="2-D or 3-D"):
    evaluation.draw_features(flat, np.ones((4, 5)), np.zeros(4, np.int32))
  with pytest.raises(ValueError, match="3-D features need a 3-D `axes`"):
    evaluation.draw_features(flat, sphere, labels)
