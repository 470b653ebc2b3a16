"""IJB-B / IJB-C 1:1 template verification, as insightface's ``eval_ijbc.py`` scores it.

Each image's embedding is the sum of the embeddings of the aligned face and its mirror image,
kept unnormalised (its norm weighs it, insightface's "N1") and multiplied by the face detector's
score ("D1"). A template's feature is the sum over its media (a photo, or the frames of one video)
of the mean of the media's images, L2-normalised; a pair of templates is scored by the cosine of
their features. Reported: the true-accept rate at false-accept rates 1e-6 ... 1e-1 on the ROC of
all pairs (IJB-C has 15,658 same and 19,557,540 different pairs), and the AUC.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np
import sklearn.metrics
import sklearn.preprocessing

from margins.data.ijb import IJBProtocol
from margins.evaluation import verification

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclasses.dataclass(frozen=True, eq=False)
class IJBResult:
  """What :func:`evaluate_ijb` measures.

  Attributes:
    tar_at_far: ``{target FAR: TAR}``, as :class:`VerificationResult`'s (NaN below
      ``1 / different pairs``).
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
  """``(template ids [T], unit features [T, D])``: per template, the sum over its media of the
  mean feature of each media's images, L2-normalised.

  >>> import numpy as np
  >>> features = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
  >>> ids, unit = template_features(features, templates=[7, 7, 7], media=[1, 2, 2])
  >>> ids.tolist(), np.round(unit, 4).tolist()  # (1, 0) + mean((0, 1), (0, 3)) = (1, 2)
  ([7], [[0.4472, 0.8944]])
  """
  image_features = np.asarray(image_features, np.float64)
  templates, media = np.asarray(templates), np.asarray(media)
  if not templates.shape == media.shape == image_features.shape[:1]:
    raise ValueError(f"`templates` {templates.shape} and `media` {media.shape} must give one id "
                     f"per image of `image_features` {image_features.shape}.")
  order = np.lexsort((media, templates))  # Images grouped by template, then by media.
  templates, media = templates[order], media[order]
  media_starts = np.flatnonzero(np.diff(templates, prepend=templates[0] - 1)
                                | np.diff(media, prepend=media[0] - 1))
  counts = np.diff(np.append(media_starts, len(order)))
  media_means = np.add.reduceat(image_features[order], media_starts) / counts[:, None]
  media_templates = templates[media_starts]
  template_starts = np.flatnonzero(np.diff(media_templates, prepend=media_templates[0] - 1))
  features = np.add.reduceat(media_means, template_starts)
  return media_templates[template_starts], sklearn.preprocessing.normalize(features)


def evaluate_ijb(image_features, protocol: IJBProtocol, *,
                 far_targets: Sequence[float] = FAR_TARGETS,
                 detector_scores: bool = True) -> IJBResult:
  """TAR@FAR of an IJB benchmark from the embeddings of its images.

  Args:
    image_features: ``[N, D]`` embeddings of ``protocol``'s images in its order, each summed
      with its mirror image's (the flip test), not normalised.
    protocol: :func:`margins.data.read_ijb`'s.
    far_targets: false-accept rates to report the true-accept rate at.
    detector_scores: weigh each image by its face detector score (insightface's default).

  Returns:
    An :class:`IJBResult`.

  References:
    B. Maze et al., "IARPA Janus Benchmark-C", ICB 2018; insightface,
    ``recognition/arcface_torch/eval_ijbc.py``.
  """
  features = np.asarray(image_features, np.float64)
  if features.ndim != 2 or len(features) != len(protocol.files):
    raise ValueError(f"`image_features` must be [{len(protocol.files)}, D], one row per image "
                     f"of the protocol, got {features.shape}.")
  if detector_scores:
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
  fpr, tpr, _ = sklearn.metrics.roc_curve(protocol.issame, scores, drop_intermediate=False)
  return IJBResult(
      tar_at_far=verification.tar_at_far(fpr, tpr, np.sum(~protocol.issame), far_targets),
      auc=float(sklearn.metrics.auc(fpr, tpr)), scores=scores, issame=protocol.issame, fpr=fpr,
      tpr=tpr)


def format_ijb(name: str, result: IJBResult) -> str:
  """One line: ``[ijbc] TAR@FAR=1e-06: 0.89 ... AUC 0.99``.

  >>> import numpy as np
  >>> result = IJBResult({1e-4: 0.9712, 1e-5: float("nan")}, 0.99, *[np.zeros(0)] * 4)
  >>> format_ijb("ijbc", result)
  '[ijbc] TAR@FAR=1e-04: 0.97120  TAR@FAR=1e-05: n/a  AUC: 0.99000'
  """
  cells = [f"TAR@FAR={far:.0e}: " + ("n/a" if np.isnan(tar) else f"{tar:.5f}")
           for far, tar in result.tar_at_far.items()]
  return f"[{name}] " + "  ".join(cells) + f"  AUC: {result.auc:.5f}"
