"""IJB-B and IJB-C as insightface distributes them for 1:1 template verification.

A folder (``IJBC/`` or ``IJBB/``) holds ``loose_crop/`` (the face crops, JPEG) and ``meta/`` with
three space-separated files, ``<name>`` being ``ijbc`` or ``ijbb``:

- ``<name>_name_5pts_score.txt``: per image, ``file x1 y1 ... x5 y5 score``: five landmarks
  (eyes, nose tip, mouth corners, in pixels of the crop) and the face detector's score;
- ``<name>_face_tid_mid.txt``: per image, in the same order, ``file template_id media_id``;
- ``<name>_template_pair_label.txt``: per pair, ``template_id template_id label`` (1: one
  identity).

:class:`IJBSource` reads each crop and aligns it to ``112 x 112`` by the similarity transform
that maps its landmarks onto insightface's ``arcface_dst`` template, as insightface's
``eval_ijbc.py`` does (OpenCV's ``warpAffine``, bilinear, black border; here Pillow with the same
pixel-centre convention). :func:`margins.evaluation.evaluate_ijb` turns the image embeddings into
template scores.
"""

import dataclasses
import glob
import os

import numpy as np
import PIL.Image

from margins.data import image_folder

# insightface's arcface_dst: where the five landmarks of a 112 x 112 face crop lie (pixels).
ARCFACE_LANDMARKS = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                              [41.5493, 92.3655], [70.7299, 92.2041]])
ARCFACE_SIZE = 112


@dataclasses.dataclass(frozen=True, eq=False)
class IJBProtocol:
  """The images, templates and template pairs of an IJB benchmark.

  Attributes:
    folder: the benchmark's folder.
    name: ``"ijbc"`` or ``"ijbb"`` (the meta files' prefix).
    files: ``[N]`` image file names under ``loose_crop/``.
    landmarks: ``float64 [N, 5, 2]`` five landmarks per image, in its pixels.
    detector_scores: ``float64 [N]`` the face detector's score of each image.
    templates: ``int64 [N]`` template of each image.
    media: ``int64 [N]`` media (photo or video) of each image.
    pairs: ``int64 [P, 2]`` template ids of each pair.
    issame: ``bool [P]`` whether each pair shows one identity.
  """

  folder: str
  name: str
  files: list[str]
  landmarks: np.ndarray
  detector_scores: np.ndarray
  templates: np.ndarray
  media: np.ndarray
  pairs: np.ndarray
  issame: np.ndarray


def _rows(path: str, num_columns: int) -> list[list[str]]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: an IJB folder has meta/<name>_*.txt files.")
  with open(path, encoding="utf-8") as lines:
    rows = [line.split() for line in lines if line.strip()]
  if not rows:
    raise ValueError(f"{path}: the file is empty.")
  bad = [index for index, row in enumerate(rows) if len(row) != num_columns]
  if bad:
    raise ValueError(f"{path}: line {bad[0] + 1} has {len(rows[bad[0]])} fields, not "
                     f"{num_columns}.")
  return rows


def _numbers(path: str, rows: list[list[str]], dtype: type) -> np.ndarray:
  """``rows`` as an array of ``dtype``; a field that is no such number is named with its file."""
  try:
    return np.array(rows, dtype)
  except (ValueError, OverflowError):
    for number, row in enumerate(rows, start=1):
      for field in row:
        try:
          np.array(field, dtype)
        except (ValueError, OverflowError) as error:
          raise ValueError(f"{path}: line {number} has {field!r}, not a number of type "
                           f"{dtype.__name__}.") from error
    raise


_SCORED_SUFFIX = "_name_5pts_score.txt"


def benchmark_name(folder: str | os.PathLike[str]) -> str:
  """The meta files' prefix in ``folder/meta`` (``ijbc``), or the folder's name in lower case
  when there is not exactly one ``*_name_5pts_score.txt``."""
  found = glob.glob(os.path.join(glob.escape(os.fspath(folder)), "meta", "*" + _SCORED_SUFFIX))
  if len(found) == 1:
    return os.path.basename(found[0])[:-len(_SCORED_SUFFIX)]
  return os.path.basename(os.path.normpath(folder)).lower()


def read_ijb(folder: str | os.PathLike[str], name: str | None = None) -> IJBProtocol:
  """Reads an IJB folder's meta files; ``name`` (their prefix) defaults to
  :func:`benchmark_name`.

  Raises:
    FileNotFoundError: a meta file is missing.
    ValueError: a meta file is empty, a line has the wrong number of fields or a field that is no
      number, or the two per-image files list different images; the message names the file.

  >>> import os, tempfile
  >>> from margins.data import read_ijb
  >>> folder = tempfile.TemporaryDirectory()
  >>> os.makedirs(os.path.join(folder.name, "meta"))
  >>> for suffix, lines in [("name_5pts_score", ["1.jpg" + " 50" * 10 + " 0.9",
  ...                                             "2.jpg" + " 60" * 10 + " 0.8"]),
  ...                       ("face_tid_mid", ["1.jpg 1 7", "2.jpg 2 8"]),
  ...                       ("template_pair_label", ["1 2 1"])]:
  ...   with open(os.path.join(folder.name, "meta", f"ijbc_{suffix}.txt"), "w") as f:
  ...     _ = f.write("\\n".join(lines))
  >>> protocol = read_ijb(folder.name)
  >>> protocol.name, protocol.files, protocol.landmarks.shape, protocol.pairs.tolist()
  ('ijbc', ['1.jpg', '2.jpg'], (2, 5, 2), [[1, 2]])
  >>> folder.cleanup()
  """
  folder = os.fspath(folder)
  name = (name or benchmark_name(folder)).lower()
  meta = os.path.join(folder, "meta")
  scored_path = os.path.join(meta, name + _SCORED_SUFFIX)
  grouped_path = os.path.join(meta, f"{name}_face_tid_mid.txt")
  pairs_path = os.path.join(meta, f"{name}_template_pair_label.txt")
  scored, grouped = _rows(scored_path, 12), _rows(grouped_path, 3)
  pairs = _numbers(pairs_path, _rows(pairs_path, 3), np.int64)
  files = [row[0] for row in scored]
  if files != [row[0] for row in grouped]:
    raise ValueError(f"{meta}: {name}_name_5pts_score.txt and {name}_face_tid_mid.txt list "
                     "different images (or in another order).")
  numbers = _numbers(scored_path, [row[1:] for row in scored], np.float64)
  ids = _numbers(grouped_path, [row[1:] for row in grouped], np.int64)
  return IJBProtocol(folder=folder, name=name, files=files,
                     landmarks=numbers[:, :10].reshape(-1, 5, 2), detector_scores=numbers[:, 10],
                     templates=ids[:, 0], media=ids[:, 1], pairs=pairs[:, :2],
                     issame=pairs[:, 2] == 1)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
  """``[2, 3]`` matrix of the similarity (rotation, uniform scale, translation; no reflection)
  that maps the points ``source [K, 2]`` closest to ``target [K, 2]`` in least squares (Umeyama,
  as scikit-image's ``SimilarityTransform.estimate``).

  >>> import numpy as np
  >>> points = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  >>> turn = np.array([[0.0, -2.0], [2.0, 0.0]])  # a quarter turn, twice the size
  >>> np.round(similarity_transform(points, points @ turn.T + 1), 6) + 0.0
  array([[ 0., -2.,  1.],
         [ 2.,  0.,  1.]])

  References:
    S. Umeyama, "Least-squares estimation of transformation parameters between two point
    patterns", IEEE TPAMI 1991.
  """
  source_mean, target_mean = source.mean(0), target.mean(0)
  centred_source, centred_target = source - source_mean, target - target_mean
  u, singular, vt = np.linalg.svd(centred_target.T @ centred_source / len(source))
  signs = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
  rotation = u @ np.diag(signs) @ vt
  scale = np.sum(singular * signs) / np.mean(np.sum(centred_source**2, axis=1))
  matrix = scale * rotation
  return np.concatenate([matrix, (target_mean - matrix @ source_mean)[:, None]], axis=1)


def align_face(image: np.ndarray, landmarks: np.ndarray,
               image_size: tuple[int, int] = (ARCFACE_SIZE, ARCFACE_SIZE)) -> np.ndarray:
  """``uint8 [H, W, C]``: ``image`` warped so that its five ``landmarks [5, 2]`` land on
  insightface's template (scaled to ``image_size = (H, W)``); bilinear, black outside.

  Pixel ``(x, y)`` of the result is the input at the inverse transform of ``(x, y)``, pixel
  centres at integer coordinates, as OpenCV's ``warpAffine`` computes it, fading to black over
  the pixel past the image's edge as it does. Within one grey level of OpenCV's (Pillow's
  fixed-point arithmetic truncates where OpenCV rounds).

  >>> import numpy as np
  >>> from margins.data import align_face
  >>> from margins.data.ijb import ARCFACE_LANDMARKS
  >>> image = np.zeros((224, 224, 3), np.uint8)
  >>> image[100:124, 100:124] = 255  # a white square around the nose of a face twice the size
  >>> aligned = align_face(image, 2 * ARCFACE_LANDMARKS)
  >>> aligned.shape, aligned[56, 56].tolist(), aligned[0, 0].tolist()
  ((112, 112, 3), [255, 255, 255], [0, 0, 0])
  """
  height, width = image_size
  template = ARCFACE_LANDMARKS * np.array([width, height]) / ARCFACE_SIZE
  # A black pixel around the image, for the interpolation to fade into: Pillow would repeat the
  # edge pixel half a pixel out, then cut to black.
  image = np.pad(image, ((1, 1), (1, 1), (0, 0)))
  forward = np.vstack([similarity_transform(np.asarray(landmarks, np.float64) + 1, template),
                       [0.0, 0.0, 1.0]])
  inverse = np.linalg.inv(forward)[:2]
  # Pillow samples output pixel (x, y) at (x + 0.5, y + 0.5), pixel centres at half integers.
  linear, offset = inverse[:, :2], inverse[:, 2]
  offset = offset + 0.5 - linear.sum(axis=1) * 0.5
  data = (*linear[0], offset[0], *linear[1], offset[1])
  channels = image.shape[2]
  pil = PIL.Image.fromarray(image[..., 0] if channels == 1 else image)
  warped = pil.transform((width, height), PIL.Image.Transform.AFFINE, data,
                         resample=PIL.Image.Resampling.BILINEAR, fillcolor=0)
  return np.asarray(warped, np.uint8).reshape(height, width, channels)


class IJBSource:
  """Grain random-access source of an IJB benchmark's aligned faces, in the meta files' order.

  ``source[i]`` is ``{"image": uint8 [H, W, C], "label": 0}``: image ``i`` of
  :attr:`protocol`, decoded (RGB, or grey for ``C = 1``) and aligned by :func:`align_face`.
  """

  def __init__(self, folder: str | os.PathLike[str], *, name: str | None = None,
               image_shape: tuple[int, int, int] = (ARCFACE_SIZE, ARCFACE_SIZE, 3)):
    self.protocol = read_ijb(folder, name)
    self.image_shape = image_folder.check_image_shape(image_shape)
    self.num_classes = 1
    self.labels = np.zeros(len(self.protocol.files), np.int32)

  def __len__(self) -> int:
    return len(self.protocol.files)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    path = os.path.join(self.protocol.folder, "loose_crop", self.protocol.files[index])
    height, width, channels = self.image_shape
    # Decoded as every other source is (upright by EXIF, as cv2.imread reads it; 16-bit scaled).
    image = image_folder.read_image(path, channels=channels)
    return {"image": align_face(image, self.protocol.landmarks[index], (height, width)),
            "label": np.int32(0)}
