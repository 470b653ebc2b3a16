"""IJB-B / IJB-C 1:1 template verification, as insightface's ``eval_ijbc.py`` scores it.

Each image's embedding is the sum of the embeddings of the aligned face and its mirror image (the
flip test; ``python -m margins.evaluate --noflip``: the face's alone), kept unnormalised (its norm
weighs it, insightface's "N1") and multiplied by the face detector's score ("D1"). A template's
feature is the sum over its media (a photo, or the frames of one video) of the mean of the media's
images, L2-normalised; a pair of templates is scored by the cosine of their features. Reported: the
true-accept rate at false-accept rates 1e-6 ... 1e-1 on the ROC of all pairs (IJB-C has 19,557 same
and 15,638,932 different pairs), and the AUC.

TAR@FAR reads the ROC one of two ways (``operating_point``): by default the highest TAR whose FAR
is at most the target; or, as ``eval_ijbc.py`` does, the TAR of the ROC point whose FAR is nearest
the target, for comparison with published IJB tables. That point's FAR may exceed the target, so
its TAR is mostly higher; it is lower where scikit-learn's ROC dropped the best point below the
target (an inner point of a straight run, where same and different pairs share scores).
"""

import dataclasses
from collections.abc import Sequence

import numpy as np
import sklearn.metrics
import sklearn.preprocessing

from margins.data.ijb import IJBProtocol
from margins.evaluation import verification

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
OPERATING_POINTS = ("at_most", "nearest")


@dataclasses.dataclass(frozen=True, eq=False)
class IJBResult:
  """What :func:`evaluate_ijb` measures.

  Attributes:
    tar_at_far: ``{target FAR: TAR}``, read as :func:`evaluate_ijb`'s ``operating_point`` says.
    auc: area under the ROC.
    scores: ``[P]`` cosine of each pair's template features.
    issame: ``[P]`` whether each pair shows one identity.
    fpr: ``[K]`` false-accept rates of the ROC.
    tpr: ``[K]`` true-accept rates of the ROC.
  """

  tar_at_far: dict[float, float]
  auc: float
  scores: np.ndarray
  issame: np.ndarray
  fpr: np.ndarray
  tpr: np.ndarray


def template_features(image_features, templates, media) -> tuple[np.ndarray, np.ndarray]:
  """``(template ids [T], unit features [T, D])``: per template (ids in sorted order), the sum
  over its media of the mean feature of each media's images, L2-normalised.

  >>> import numpy as np
  >>> features = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
  >>> ids, unit = template_features(features, templates=[7, 7, 7], media=[1, 2, 2])
  >>> ids.tolist(), np.round(unit, 4).tolist()  # (1, 0) + mean((0, 1), (0, 3)) = (1, 2)
  ([7], [[0.4472, 0.8944]])
  """
  image_features = np.asarray(image_features, np.float64)
  templates, media = np.asarray(templates), np.asarray(media)
  if image_features.ndim != 2 or not len(image_features):
    raise ValueError(f"`image_features` must be [N, D] with N >= 1, got {image_features.shape}.")
  if not np.isfinite(image_features).all():
    raise ValueError("`image_features` must be finite.")
  if not templates.shape == media.shape == image_features.shape[:1]:
    raise ValueError(f"`templates` {templates.shape} and `media` {media.shape} must give one id "
                     f"per image of `image_features` {image_features.shape}.")
  # Ids of any sortable kind (numbers, strings), as their ranks.
  template_ids, templates = np.unique(templates, return_inverse=True)
  media = np.unique(media, return_inverse=True)[1]
  order = np.lexsort((media, templates))  # Images grouped by template, then by media.
  templates, media = templates[order], media[order]
  media_starts = np.flatnonzero(np.diff(templates, prepend=templates[0] - 1)
                                | np.diff(media, prepend=media[0] - 1))
  counts = np.diff(np.append(media_starts, len(order)))
  media_means = np.add.reduceat(image_features[order], media_starts) / counts[:, None]
  media_templates = templates[media_starts]
  template_starts = np.flatnonzero(np.diff(media_templates, prepend=media_templates[0] - 1))
  features = np.add.reduceat(media_means, template_starts)
  return template_ids[media_templates[template_starts]], sklearn.preprocessing.normalize(features)


def evaluate_ijb(image_features, protocol: IJBProtocol, *,
                 far_targets: Sequence[float] = FAR_TARGETS,
                 detector_scores: bool = True, operating_point: str = "at_most") -> IJBResult:
  """TAR@FAR of an IJB benchmark from the embeddings of its images.

  Args:
    image_features: ``[N, D]`` embeddings of ``protocol``'s images in its order, each summed
      with its mirror image's (the flip test) in insightface's recipe, not normalised.
    protocol: :func:`margins.data.read_ijb`'s.
    far_targets: false-accept rates to report the true-accept rate at.
    detector_scores: weigh each image by its face detector score (insightface's default).
    operating_point: ``"at_most"``: TAR@FAR is the highest TAR whose FAR is at most the target,
      as :class:`VerificationResult`'s (NaN below ``1 / different pairs``); ``"nearest"``:
      ``eval_ijbc.py``'s, the TAR of the point nearest the target on scikit-learn's ROC, whose
      collinear intermediate points are dropped (on a tie, the larger FAR, then the larger TAR).

  Returns:
    An :class:`IJBResult`.

  >>> import numpy as np
  >>> from margins.data import IJBProtocol
  >>> protocol = IJBProtocol(  # three one-image templates; pairs (1, 2) same, (1, 3) not
  ...     folder="", name="toy", files=["a.jpg", "b.jpg", "c.jpg"], landmarks=np.zeros((3, 5, 2)),
  ...     detector_scores=np.ones(3), templates=np.array([1, 2, 3]), media=np.array([1, 2, 3]),
  ...     pairs=np.array([[1, 2], [1, 3]]), issame=np.array([True, False]))
  >>> result = evaluate_ijb(np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), protocol)
  >>> np.round(result.scores, 4).tolist(), result.auc  # cosines of the pairs' templates
  ([0.9939, 0.0], 1.0)

  References:
    B. Maze et al., "IARPA Janus Benchmark-C", ICB 2018; insightface,
    ``recognition/arcface_torch/eval_ijbc.py``.
  """
  if operating_point not in OPERATING_POINTS:
    raise ValueError(f"`operating_point` must be one of {OPERATING_POINTS}, got "
                     f"{operating_point!r}.")
  features = np.asarray(image_features, np.float64)
  issame = verification.check_pairs(protocol.issame, num_folds=1)  # Booleans (or 0/1), both kinds.
  far_targets = tuple(verification.check_far("far_targets", far) for far in far_targets)
  if features.ndim != 2 or len(features) != len(protocol.files):
    raise ValueError(f"`image_features` must be [{len(protocol.files)}, D], one row per image "
                     f"of the protocol, got {features.shape}.")
  if detector_scores:
    if not np.isfinite(protocol.detector_scores).all():
      raise ValueError("The protocol's detector scores must be finite.")
    features = features * protocol.detector_scores[:, None]
  template_ids, unit = template_features(features, protocol.templates, protocol.media)
  rows = np.searchsorted(template_ids, protocol.pairs)
  rows = np.minimum(rows, len(template_ids) - 1)
  missing = template_ids[rows] != protocol.pairs
  if missing.any():
    raise ValueError(f"Pairs name templates without images: {protocol.pairs[missing][:5]}.")
  scores = np.concatenate([  # 100,000 pairs at a time: IJB-C has 15.7 million.
      np.sum(unit[part[:, 0]] * unit[part[:, 1]], axis=1)
      for part in np.array_split(rows, max(1, -(-len(rows) // 100_000)))])
  fpr, tpr, _ = sklearn.metrics.roc_curve(issame, scores, drop_intermediate=False)
  if operating_point == "nearest":
    tar_at_far = nearest_tar_at_far(issame, scores, far_targets)
  else:
    tar_at_far = verification.tar_at_far(fpr, tpr, np.sum(~issame), far_targets)
  return IJBResult(
      tar_at_far=tar_at_far, auc=float(sklearn.metrics.auc(fpr, tpr)), scores=scores,
      issame=issame, fpr=fpr, tpr=tpr)


def nearest_tar_at_far(issame, scores, far_targets: Sequence[float]) -> dict[float, float]:
  """``{target: TAR}`` read as insightface's ``eval_ijbc.py`` reads its ROC: the TAR of the point
  of scikit-learn's ROC (collinear intermediate points dropped, its default) whose FAR is nearest
  the target, the larger FAR first on a tie, then the larger TAR. Its FAR may exceed the target.

  >>> nearest_tar_at_far([True, False, True, False], [0.9, 0.8, 0.7, 0.1], [0.4])  # At FAR 0.5.
  {0.4: 1.0}
  """
  issame = verification.check_pairs(issame, num_folds=1)
  far_targets = tuple(verification.check_far("far_targets", far) for far in far_targets)
  fpr, tpr, _ = sklearn.metrics.roc_curve(issame, scores)
  # Reversed, the first of the nearest points is the one with the larger FAR, then TAR.
  fpr, tpr = fpr[::-1], tpr[::-1]
  return {far: float(tpr[np.argmin(np.abs(fpr - far))]) for far in far_targets}


def format_ijb(name: str, result: IJBResult) -> str:
  """One line: ``[ijbc] TAR@FAR=1e-06: 0.89000 ... AUC: 0.99000``.

  >>> import numpy as np
  >>> result = IJBResult({1e-4: 0.9712, 1e-5: float("nan")}, 0.99, *[np.zeros(0)] * 4)
  >>> format_ijb("ijbc", result)
  '[ijbc] TAR@FAR=1e-04: 0.97120  TAR@FAR=1e-05: n/a  AUC: 0.99000'
  """
  cells = [f"TAR@FAR={far:.0e}: {verification.format_value(tar)}"
           for far, tar in result.tar_at_far.items()]
  return f"[{name}] " + "  ".join(cells) + f"  AUC: {result.auc:.5f}"
