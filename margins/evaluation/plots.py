"""Plots of verification ROC curves and of learned features.

``draw_*`` draw into a matplotlib ``Axes`` of the caller's figure (a notebook's subplots);
``plot_*`` draw the same into a figure of their own and write it to a PNG file, with matplotlib's
Agg canvas, never pyplot, so nothing needs a display and no global figure state is left behind.
Each class keeps one colour in every plot: ``tab10`` indexed by ``label % 10``.
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import sklearn.preprocessing
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from margins._checks import check_int
from margins.evaluation.verification import VerificationResult
from margins.evaluation.verification import _check_embeddings
from margins.losses import _common

_MAX_LEGEND_CLASSES = 20


def _class_colour(label: int):
  return matplotlib.colormaps["tab10"](int(label) % 10)


def _save(figure: Figure, path) -> str:
  """Writes ``figure`` to ``path`` (creating its directory) with the Agg canvas."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  FigureCanvasAgg(figure)
  figure.savefig(path, dpi=100, bbox_inches="tight")
  return path


def _check_labelled(embeddings, labels) -> tuple[np.ndarray, np.ndarray]:
  embeddings = _check_embeddings("embeddings", embeddings)
  _common.check_labels(labels, embeddings.shape[0])
  return embeddings, np.asarray(labels)


def plot_roc(results_by_name: Mapping[str, VerificationResult], path, *,
             title: str = "Verification ROC") -> str:
  """ROC curves (TAR against FAR on a log axis) of one or more verification results.

  Operating points at FAR 0 cannot appear on the log axis and are left out; each legend entry
  gives the curve's AUC and EER.

  Args:
    results_by_name: ``{name: VerificationResult}``, e.g. one per benchmark or per loss.
    path: the PNG file to write.
    title: the figure title.

  Returns:
    ``path``, as a string.

  >>> import os, tempfile, numpy as np
  >>> from margins.evaluation import evaluate_verification, plot_roc
  >>> rng = np.random.default_rng(0)
  >>> issame = np.arange(200) % 2 == 0
  >>> first = rng.normal(size=(200, 8))
  >>> second = np.where(issame[:, None], first + rng.normal(size=(200, 8)),
  ...                   rng.normal(size=(200, 8)))
  >>> result = evaluate_verification(np.stack([first, second], 1).reshape(400, 8), issame)
  >>> tmp = tempfile.TemporaryDirectory()
  >>> path = plot_roc({"toy": result}, os.path.join(tmp.name, "roc.png"))
  >>> os.path.getsize(path) > 10_000
  True
  >>> tmp.cleanup()

  References:
    insightface, ``recognition/arcface_torch`` (IJB ROC plots on a log FAR axis).
  """
  figure = Figure(figsize=(6.5, 5))
  axes = figure.add_subplot()
  draw_roc(axes, results_by_name)
  axes.set_title(title)
  return _save(figure, path)


def draw_roc(axes, results_by_name: Mapping[str, VerificationResult]) -> None:
  """Draws :func:`plot_roc`'s curves (log FAR axis, AUC and EER in the legend) into ``axes``.

  >>> import numpy as np
  >>> from matplotlib.figure import Figure
  >>> from margins.evaluation import draw_roc, evaluate_verification
  >>> rng = np.random.default_rng(0)
  >>> issame = np.arange(200) % 2 == 0
  >>> first = rng.normal(size=(200, 8))
  >>> second = np.where(issame[:, None], first + 0.5 * rng.normal(size=(200, 8)),
  ...                   rng.normal(size=(200, 8)))
  >>> result = evaluate_verification(np.stack([first, second], 1).reshape(400, 8), issame)
  >>> axes = Figure().add_subplot()
  >>> draw_roc(axes, {"toy": result})
  >>> [text.get_text() for text in axes.get_legend().get_texts()]
  ['toy (AUC 0.9945, EER 4.00%)']
  """
  if not results_by_name:
    raise ValueError("`results_by_name` must hold at least one result.")
  for name, result in results_by_name.items():
    if not isinstance(result, VerificationResult):
      raise TypeError(
          f"`results_by_name[{name!r}]` must be a VerificationResult, got "
          f"{type(result).__name__}.")
  smallest_far = 1.0
  for name, result in results_by_name.items():
    measurable = result.fpr > 0
    axes.plot(result.fpr[measurable], result.tpr[measurable],
              label=f"{name} (AUC {result.auc:.4f}, EER {result.eer:.2%})")
    smallest_far = min(smallest_far, result.fpr[measurable].min())
  axes.set_xscale("log")
  axes.set_xlim(smallest_far, 1)
  axes.set_ylim(0, 1.01)
  axes.set_xlabel("False accept rate (FAR)")
  axes.set_ylabel("True accept rate (TAR)")
  axes.grid(True, which="both", alpha=0.3)
  axes.legend(loc="lower right")


def _legend(axes, labels: np.ndarray) -> None:
  if np.unique(labels).size <= _MAX_LEGEND_CLASSES:
    axes.legend(title="class", loc="center left", bbox_to_anchor=(1.02, 0.5), markerscale=3)


def _check_features(embeddings, labels) -> tuple[np.ndarray, np.ndarray]:
  embeddings, labels = _check_labelled(embeddings, labels)
  if embeddings.shape[1] not in (2, 3):
    raise ValueError("`embeddings` must be 2-D or 3-D features ([N, 2] or [N, 3]), got "
                     f"{embeddings.shape[1]}.")
  return embeddings, labels


def draw_features(axes, embeddings, labels, *, normalize: bool = False,
                  class_names: Sequence[str] | None = None, legend: bool = True) -> None:
  """Scatters 2-D or 3-D features into ``axes`` (a 3-D ``Axes`` for 3-D features), by class.

  Args:
    axes: the matplotlib ``Axes``; ``projection="3d"`` for ``[N, 3]`` features.
    embeddings: ``[N, 2]`` or ``[N, 3]`` features.
    labels: ``[N]`` integer class of each feature; its colour is ``tab10[label % 10]``.
    normalize: L2-normalise the features and draw the unit circle (sphere) behind them.
    class_names: legend name of each label value (default: the label).
    legend: draw the legend of classes (up to 20 classes), right of the axes.

  >>> import numpy as np
  >>> from matplotlib.figure import Figure
  >>> from margins.evaluation import draw_features
  >>> axes = Figure().add_subplot()
  >>> x = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
  >>> draw_features(axes, x, np.array([0, 1, 1]), normalize=True)
  >>> len(axes.collections), len(axes.lines)  # a scatter per class, the unit circle
  (2, 1)
  """
  embeddings, labels = _check_features(embeddings, labels)
  if (embeddings.shape[1] == 3) != (axes.name == "3d"):
    raise ValueError(f"{embeddings.shape[1]}-D features need "
                     f"{'a 3-D' if embeddings.shape[1] == 3 else 'a 2-D'} `axes` "
                     f"(projection=\"3d\" for 3-D features), got a {axes.name!r} one.")
  points = sklearn.preprocessing.normalize(embeddings) if normalize else embeddings
  if points.shape[1] == 3:
    if normalize:
      polar, azimuth = np.meshgrid(np.linspace(0, np.pi, 19), np.linspace(0, 2 * np.pi, 37))
      axes.plot_wireframe(np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth),
                          np.cos(polar), color="0.85", linewidth=0.4)
    axes.set_box_aspect((1, 1, 1), zoom=0.9)
    axes.set_zlabel("feature 3")
  else:
    if normalize:
      angles = np.linspace(0, 2 * np.pi, 361)
      axes.plot(np.cos(angles), np.sin(angles), color="0.7", linewidth=0.8, zorder=0)
    axes.set_aspect("equal", adjustable="datalim")
    axes.grid(True, alpha=0.3)
  for label in np.unique(labels):
    chosen = labels == label
    axes.scatter(*points[chosen].T, s=6, alpha=0.7, color=_class_colour(label),
                 label=class_names[label] if class_names is not None else str(label))
  axes.set_xlabel("feature 1")
  axes.set_ylabel("feature 2")
  if legend:
    _legend(axes, labels)


def plot_embeddings(embeddings, labels, path, *, title: str = "Embeddings",
                    class_names: Sequence[str] | None = None) -> str:
  """Scatter plot of 2-D or 3-D features coloured by class.

  2-D features are drawn twice, side by side: as they are, and L2-normalised onto the unit
  circle, where angular margins show as gaps between the classes' arcs. 3-D features are drawn
  normalised onto the unit sphere. The legend (classes by colour) is drawn for up to 20 classes.

  Args:
    embeddings: ``[N, 2]`` or ``[N, 3]`` features.
    labels: ``[N]`` integer class of each feature.
    path: the PNG file to write.
    title: the figure title.
    class_names: legend name of each label value (default: the label).

  Returns:
    ``path``, as a string.

  >>> import os, tempfile, numpy as np
  >>> from margins.evaluation import plot_embeddings
  >>> rng = np.random.default_rng(0)
  >>> labels = np.repeat(np.arange(4), 25)
  >>> centres = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
  >>> features = 3 * centres[labels] + rng.normal(size=(100, 2))
  >>> tmp = tempfile.TemporaryDirectory()
  >>> path = plot_embeddings(features, labels, os.path.join(tmp.name, "features.png"))
  >>> os.path.getsize(path) > 10_000
  True
  >>> tmp.cleanup()

  References:
    W. Liu et al., "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML 2016
    (the 2-D feature plots); W. Liu et al., "SphereFace", CVPR 2017 (features on the sphere).
  """
  embeddings, labels = _check_features(embeddings, labels)
  if embeddings.shape[1] == 2:
    figure = Figure(figsize=(12, 5))
    raw_axes, unit_axes = figure.subplots(1, 2)
    draw_features(raw_axes, embeddings, labels, class_names=class_names, legend=False)
    raw_axes.set_title("Features")
    draw_features(unit_axes, embeddings, labels, normalize=True, class_names=class_names)
    unit_axes.set_title("L2-normalised features (unit circle)")
  else:
    figure = Figure(figsize=(7, 6))
    axes = figure.add_subplot(projection="3d")
    draw_features(axes, embeddings, labels, normalize=True, class_names=class_names)
    axes.set_title("L2-normalised features (unit sphere)")
  figure.suptitle(title)
  return _save(figure, path)


def _pair_angle_chunks(unit: np.ndarray, labels: np.ndarray, chunk_size: int = 1024):
  """Yields the angles (degrees) of all pairs ``i < j`` of ``unit`` vectors, ``chunk_size`` rows
  ``i`` at a time: ``(same class, two classes)``."""
  for start in range(0, unit.shape[0], chunk_size):
    rows = np.arange(start, min(start + chunk_size, unit.shape[0]))
    angles = np.degrees(np.arccos(np.clip(unit[rows] @ unit.T, -1, 1)))
    later = rows[:, None] < np.arange(unit.shape[0])[None, :]
    same = labels[rows][:, None] == labels[None, :]
    yield angles[later & same], angles[later & ~same]


def _pair_angle_histograms(unit: np.ndarray, labels: np.ndarray, edges: np.ndarray,
                           chunk_size: int = 1024):
  """Histograms and sums of the angles (degrees) of all pairs ``i < j``: same class, other class."""
  counts = {True: np.zeros(edges.size - 1), False: np.zeros(edges.size - 1)}
  sums = {True: 0.0, False: 0.0}
  for chunk in _pair_angle_chunks(unit, labels, chunk_size):
    for is_same, angles in zip((True, False), chunk):
      counts[is_same] += np.histogram(angles, bins=edges)[0]
      sums[is_same] += angles.sum()
  return counts, sums


def pair_angles(embeddings, labels) -> tuple[np.ndarray, np.ndarray]:
  """The angles (degrees) between the embeddings of every pair ``i < j``, as histogrammed by
  :func:`plot_angle_histograms`.

  Args:
    embeddings: ``[N, D]`` embeddings (any ``D``).
    labels: ``[N]`` integer class of each embedding.

  Returns:
    ``(same, different)``: the angles of the pairs of one class and of two classes, in the order
    of the pairs (``i``, then ``j``). Memory grows as ``N^2``; the histograms do not.

  >>> import numpy as np
  >>> from margins.evaluation import pair_angles
  >>> same, different = pair_angles(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]),
  ...                               np.array([0, 0, 1]))
  >>> same.round(1), different.round(1)
  (array([45.]), array([90., 45.]))
  """
  embeddings, labels = _check_labelled(embeddings, labels)
  class_sizes = np.unique(labels, return_counts=True)[1]
  num_same = int(np.sum(class_sizes * (class_sizes - 1) // 2))
  angles = (np.empty(num_same), np.empty(labels.size * (labels.size - 1) // 2 - num_same))
  filled = [0, 0]
  for chunk in _pair_angle_chunks(sklearn.preprocessing.normalize(embeddings), labels):
    for kind, chunk_angles in enumerate(chunk):
      angles[kind][filled[kind]:filled[kind] + chunk_angles.size] = chunk_angles
      filled[kind] += chunk_angles.size
  return angles


def plot_angle_histograms(embeddings, labels, path, *, title: str = "Angles between embeddings",
                          bins: int = 90) -> str:
  """Histograms of the angle between two embeddings of one class and of two different classes.

  Every pair ``i < j`` counts once; each histogram is normalised to fractions of its pairs, and
  the legend gives the mean angle. A margin loss pushes the two apart: intra-class angles small,
  inter-class angles near 90 degrees and beyond.

  Args:
    embeddings: ``[N, D]`` embeddings (any ``D``).
    labels: ``[N]`` integer class of each embedding; needs a pair of each kind.
    path: the PNG file to write.
    title: the figure title.
    bins: number of histogram bins over ``[0, 180]`` degrees.

  Returns:
    ``path``, as a string.

  >>> import os, tempfile, numpy as np
  >>> from margins.evaluation import plot_angle_histograms
  >>> rng = np.random.default_rng(0)
  >>> labels = np.repeat(np.arange(5), 20)
  >>> embeddings = 2 * rng.normal(size=(5, 16))[labels] + rng.normal(size=(100, 16))
  >>> tmp = tempfile.TemporaryDirectory()
  >>> path = plot_angle_histograms(embeddings, labels, os.path.join(tmp.name, "angles.png"))
  >>> os.path.getsize(path) > 10_000
  True
  >>> tmp.cleanup()

  References:
    J. Deng et al., "ArcFace", CVPR 2019 (angle distributions of positive and negative pairs).
  """
  figure = Figure(figsize=(7, 4.5))
  axes = figure.add_subplot()
  draw_angle_histograms(axes, embeddings, labels, bins=bins)
  axes.set_title(title)
  return _save(figure, path)


def draw_angle_histograms(axes, embeddings, labels, *, bins: int = 90,
                          colors: tuple[Any, Any] = ("tab:blue", "tab:red")) -> None:
  """Draws :func:`plot_angle_histograms`'s two histograms into ``axes``.

  ``colors``: of the intra-class and the inter-class histogram.

  >>> import numpy as np
  >>> from matplotlib.figure import Figure
  >>> from margins.evaluation import draw_angle_histograms
  >>> axes = Figure().add_subplot()
  >>> x = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
  >>> draw_angle_histograms(axes, x, np.array([0, 0, 1]))
  >>> [text.get_text() for text in axes.get_legend().get_texts()]
  ['intra-class (1 pairs, mean 5.7°)', 'inter-class (2 pairs, mean 87.1°)']
  """
  embeddings, labels = _check_labelled(embeddings, labels)
  bins = check_int(bins, "bins", minimum=1)
  _, class_counts = np.unique(labels, return_counts=True)
  if class_counts.size < 2 or class_counts.max() < 2:
    raise ValueError(
        "`labels` must give at least one same-class pair and two classes, got class sizes "
        f"{class_counts.tolist()[:10]}.")
  edges = np.linspace(0, 180, bins + 1)
  counts, sums = _pair_angle_histograms(
      sklearn.preprocessing.normalize(embeddings), labels, edges)
  for is_same, name, colour in ((True, "intra-class", colors[0]),
                                (False, "inter-class", colors[1])):
    total = counts[is_same].sum()
    axes.stairs(counts[is_same] / total, edges, fill=True, alpha=0.45, color=colour,
                label=f"{name} ({int(total)} pairs, mean {sums[is_same] / total:.1f}°)")
  axes.set_xlim(0, 180)
  axes.set_xticks(np.arange(0, 181, 30))
  axes.set_xlabel("Angle between embeddings (degrees)")
  axes.set_ylabel("Fraction of pairs")
  axes.grid(True, alpha=0.3)
  axes.legend()
