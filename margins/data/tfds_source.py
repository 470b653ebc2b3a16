"""TensorFlow Datasets prepared locally as ``array_record``, read without TensorFlow.

``tfds.data_source`` gives random access to a dataset that was prepared on disk with
``file_format='array_record'``; reading it needs ``tensorflow-datasets`` and ``array_record``
but not TensorFlow (an optional extra of this project, see the install line below). Images are
read undecoded from TFDS and decoded by :func:`margins.data.image_folder.decode_image` in
``__getitem__``, as in every other source here.

Install: ``pip install tensorflow-datasets==4.9.10 array_record==0.8.6 importlib_resources``.
"""

import functools
import os
from collections.abc import Sequence

import numpy as np

from margins.data import image_folder


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        "TfdsSource needs the optional TFDS extra: pip install tensorflow-datasets==4.9.10 "
        "array_record==0.8.6 importlib_resources") from error
  return tfds


class TfdsSource:
  """Grain random-access source over a TFDS dataset prepared locally as ``array_record``.

  Records are ``{"image": uint8 [H, W, C], "label": int32 []}``, taken from the TFDS features
  ``image_key`` (an ``Image`` feature) and ``label_key`` (a ``ClassLabel``, or any integer when
  ``num_classes`` is given). Nothing is downloaded: the dataset must already be in ``data_dir``.

  Attributes:
    name, split, data_dir, image_key, label_key: what was opened.
    data_source: the TFDS data source (picklable; images come back undecoded).
    num_classes: number of classes.
    image_shape: ``(H, W, C)`` of every image returned.

  Usage (not run here: it needs the optional extra and a prepared dataset; the test
  ``tests/test_tfds_source.py`` prepares one)::

    source = TfdsSource("my_faces", split="train", data_dir="/data/tfds")
    record = source[0]  # {"image": uint8 [H, W, 3], "label": int32 []}

  References:
    TensorFlow Datasets, ``tfds.data_source``
    (https://www.tensorflow.org/datasets/api_docs/python/tfds/data_source).
  """

  def __init__(self, name: str, *, split: str = "train",
               data_dir: str | os.PathLike[str] | None = None,
               image_key: str = "image", label_key: str = "label",
               image_shape: Sequence[int] | None = None, num_classes: int | None = None):
    """Opens a prepared dataset.

    Args:
      name: the TFDS name, optionally with config and version (``"name/config:1.0.0"``).
      split: a TFDS split, slices included (``"train[:90%]"``).
      data_dir: where the dataset was prepared (``None``: TFDS's default,
        ``~/tensorflow_datasets``).
      image_key: the feature holding the image.
      label_key: the feature holding the class.
      image_shape: ``(H, W, C)`` of the returned images (C = 1 or 3); ``None``: the ``Image``
        feature's shape when it is fully known, else the first image's size with 3 channels.
      num_classes: ``None``: from the ``ClassLabel`` feature ``label_key``.

    Raises:
      ImportError: ``tensorflow-datasets`` is not installed.
      ValueError: the dataset, split or a feature is missing, or ``num_classes`` is not known.
    """
    tfds = _import_tfds()
    self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
    self.data_dir = None if data_dir is None else os.fspath(data_dir)
    self.data_source = tfds.data_source(
        name, split=split, data_dir=self.data_dir, download=False,
        decoders={image_key: tfds.decode.SkipDecoding()})
    features = self.data_source.dataset_info.features
    for key in (image_key, label_key):
      if key not in features:
        raise ValueError(f"{name}: no feature {key!r}; features are {sorted(features.keys())}.")
    if not isinstance(features[image_key], tfds.features.Image):
      raise ValueError(f"{name}: feature {image_key!r} is a {type(features[image_key]).__name__}, "
                       "expected an Image feature.")
    if num_classes is None:
      num_classes = getattr(features[label_key], "num_classes", None)
      if num_classes is None:
        raise ValueError(f"{name}: feature {label_key!r} is not a ClassLabel; pass `num_classes`.")
    if num_classes <= 0:
      raise ValueError(f"`num_classes` must be positive, got {num_classes}.")
    self.num_classes = int(num_classes)
    if image_shape is None:
      image_shape = features[image_key].shape
      if None in image_shape:
        height, width, _ = self._decode(0, self.data_source[0], None).shape
        image_shape = (height, width, image_shape[2] or 3)
    self.image_shape = image_folder.check_image_shape(image_shape)

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self.data_source[index]
    return {"image": self._decode(index, record, self.image_shape),
            "label": self._label(index, record)}

  @functools.cached_property
  def labels(self) -> np.ndarray:
    """``int32 [N]`` label of every record (images are read but not decoded)."""
    return np.array([self._label(i, self.data_source[i]) for i in range(len(self))], np.int32)

  def _label(self, index: int, record: dict) -> np.int32:
    label = int(record[self.label_key])
    if not 0 <= label < self.num_classes:
      raise ValueError(f"{self.name}[{self.split}] record {index} has label {label}, outside "
                       f"[0, {self.num_classes}).")
    return np.int32(label)

  def _decode(self, index: int, record: dict,
              image_shape: tuple[int, int, int] | None) -> np.ndarray:
    try:
      return image_folder.decode_image(record[self.image_key], image_shape=image_shape)
    except ValueError as error:
      raise ValueError(f"{self.name}[{self.split}] record {index}: {error}") from error

  def __repr__(self) -> str:
    return (f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} images, "
            f"{self.num_classes} classes, image_shape={self.image_shape})")
