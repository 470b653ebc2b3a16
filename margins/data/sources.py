"""Offline data sources: in-memory arrays, scikit-learn's digits, and synthetic identities.

Every source of ``margins.data`` is a grain random-access data source (``__len__`` and
``__getitem__``, picklable into grain's worker processes) whose records are
``{"image": uint8 [H, W, C], "label": int32 []}``, with attributes ``num_classes`` and
``image_shape``. Images stay ``uint8`` here; :mod:`margins.data.pipeline` converts them.

- :class:`ArraySource` serves images and labels already in memory.
- :func:`digits` is the embedded default dataset: the 1,797 real 8x8 handwritten digits that
  scikit-learn ships (no download), upscaled, with a closed-set split (all ten classes,
  train/test by example) and an open-set split (train on some digits, verify on the others).
- :class:`SyntheticSource` draws images of ``N`` identities procedurally, ``N`` up to millions,
  storing nothing: for throughput runs and for smoke tests of large-class training.
"""

import operator
from collections.abc import Sequence

import numpy as np
import PIL.Image

from margins._checks import check_int

DIGITS_SPLITS = ("train", "test", "open_train", "open_val", "open_test")

_DIGITS_MAX_PIXEL = 16  # load_digits pixels count the set bits of a 4x4 block of a 32x32 bitmap.


class ArraySource:
  """Grain random-access source over images and labels held in memory.

  Attributes:
    images: ``uint8 [N, H, W, C]``.
    labels: ``int32 [N]`` in ``[0, num_classes)``.
    num_classes: number of classes.
    image_shape: ``(H, W, C)``.
    class_names: the name of each label (``str(label)`` unless given).

  >>> import numpy as np
  >>> from margins.data.sources import ArraySource
  >>> source = ArraySource(np.zeros((3, 4, 4, 1), np.uint8), np.array([0, 1, 1]))
  >>> len(source), source.num_classes, source.image_shape
  (3, 2, (4, 4, 1))
  >>> record = source[2]
  >>> record["image"].shape, record["label"]
  ((4, 4, 1), np.int32(1))

  References:
    grain's random-access data source protocol, https://google-grain.readthedocs.io.
  """

  def __init__(
      self, images: np.ndarray, labels: np.ndarray, *, num_classes: int | None = None,
      class_names: Sequence[str] | None = None,
  ):
    """Wraps ``images`` (``uint8 [N, H, W, C]``, C in {1, 3}) and integer ``labels`` ``[N]``.

    ``num_classes`` defaults to ``max(labels) + 1``; ``class_names`` to the labels as text.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8:
      raise TypeError(f"`images` must be uint8, got dtype {images.dtype}.")
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[3] not in (1, 3):
      raise ValueError(
          f"`images` must have shape [N, H, W, C] with N > 0 and C in (1, 3), got {images.shape}.")
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(
          f"`labels` must be integers of shape {images.shape[:1]}, got {labels.dtype} "
          f"{labels.shape}.")
    if num_classes is None:
      num_classes = int(labels.max()) + 1
    num_classes = check_int(num_classes, "num_classes", minimum=1)
    if labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(
          f"`labels` must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}].")
    if class_names is None:
      class_names = [str(label) for label in range(num_classes)]
    if len(class_names) != num_classes:
      raise ValueError(
          f"`class_names` must name {num_classes} classes, got {len(class_names)} names.")
    self.images = images
    self.labels = labels.astype(np.int32)
    self.num_classes = num_classes
    self.image_shape = tuple(int(n) for n in images.shape[1:])
    self.class_names = [str(name) for name in class_names]

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self.images[index], "label": self.labels[index]}

  def __repr__(self) -> str:
    return (f"ArraySource(len={len(self)}, num_classes={self.num_classes}, "
            f"image_shape={self.image_shape})")


def _stratified_test_mask(labels: np.ndarray, *, test_fraction: float, seed: int) -> np.ndarray:
  """``bool [N]``: ``round(test_fraction * n_k)`` examples of each class ``k``, drawn by seed."""
  rng = np.random.default_rng(seed)
  is_test = np.zeros(labels.shape, dtype=bool)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    num_test = int(round(test_fraction * len(members)))
    is_test[rng.permutation(members)[:num_test]] = True
  return is_test


def digits(
    split: str = "train", *, image_size: int = 32,
    open_set_train_classes: Sequence[int] = (0, 1, 2, 3, 4, 5), test_fraction: float = 0.2,
    seed: int = 0,
) -> ArraySource:
  """scikit-learn's handwritten digits, upscaled to ``image_size``, as a grain source.

  The 1,797 real 8x8 images (10 classes, about 180 each, 17 grey levels ``0..16``) ship with
  scikit-learn, so this works offline. Pixels are scaled to ``uint8`` (``round(v * 255 / 16)``)
  and upscaled with Pillow's bilinear filter to ``uint8 [image_size, image_size, 1]``.

  Splits (examples keep their order in scikit-learn's file within a split):

  - ``"train"`` / ``"test"`` (closed set): all ten classes; in each class,
    ``round(test_fraction * n)`` examples drawn with ``seed`` go to ``"test"``, the rest to
    ``"train"``. Labels are the digits, ``num_classes = 10``. For classification accuracy.
  - ``"open_train"`` / ``"open_val"`` (open set): the examples of the digits in
    ``open_set_train_classes``, split by example as ``"train"`` / ``"test"`` are (so
    ``"open_val"`` measures classification accuracy on identities seen in training), labels
    remapped to ``0..k-1`` in ascending digit order, ``num_classes = k``.
  - ``"open_test"``: every example of the other digits, identities never seen in training (as
    faces in a verification benchmark): for verification pairs and retrieval. Labels are
    remapped the same way, to ``0..10-k-1``.

  In every split ``class_names[label]`` is the digit as text. Horizontal flips change what a
  digit means: train on digits without flip augmentation.

  Args:
    split: one of ``"train"``, ``"test"``, ``"open_train"``, ``"open_val"``, ``"open_test"``.
    image_size: height and width of the returned images (8 keeps the original size).
    open_set_train_classes: the digits of ``"open_train"``; the others make ``"open_test"``.
    test_fraction: fraction of each class in the closed-set ``"test"`` split, in ``(0, 1)``.
    seed: draws the test examples of ``"test"`` and ``"open_val"`` (``"open_test"`` does not
      depend on it).

  Returns:
    An :class:`ArraySource` of ``{"image": uint8 [image_size, image_size, 1], "label": int32 []}``.

  >>> from margins.data.sources import digits
  >>> train, test = digits("train"), digits("test")
  >>> len(train), len(test), train.num_classes, train.image_shape
  (1438, 359, 10, (32, 32, 1))
  >>> open_test = digits("open_test", image_size=16)
  >>> len(open_test), open_test.num_classes, open_test.class_names
  (714, 4, ['6', '7', '8', '9'])

  References:
    Alpaydin & Kaynak, "Optical Recognition of Handwritten Digits" (UCI, 1998), the data behind
    ``sklearn.datasets.load_digits``.
  """
  if split not in DIGITS_SPLITS:
    raise ValueError(f"`split` must be one of {DIGITS_SPLITS}, got {split!r}.")
  image_size = check_int(image_size, "image_size", minimum=1)
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"`test_fraction` must lie in (0, 1), got {test_fraction}.")
  seed = check_int(seed, "seed", minimum=0)
  train_classes = sorted(
      check_int(digit, "open_set_train_classes", minimum=0) for digit in open_set_train_classes)
  if (not train_classes or len(set(train_classes)) != len(train_classes)
      or train_classes[-1] > 9 or len(train_classes) == 10):
    raise ValueError(
        "`open_set_train_classes` must be distinct digits in 0..9 leaving at least one out, "
        f"got {tuple(open_set_train_classes)}.")
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top  (slow import)

  bunch = load_digits()
  digit_labels = bunch.target.astype(np.int32)
  is_test = _stratified_test_mask(digit_labels, test_fraction=test_fraction, seed=seed)
  if split in ("train", "test"):
    classes = list(range(10))
    selected = np.flatnonzero(is_test if split == "test" else ~is_test)
  elif split in ("open_train", "open_val"):
    classes = train_classes
    in_split = is_test if split == "open_val" else ~is_test
    selected = np.flatnonzero(np.isin(digit_labels, classes) & in_split)
  else:
    classes = [digit for digit in range(10) if digit not in train_classes]
    selected = np.flatnonzero(np.isin(digit_labels, classes))
  label_of_digit = np.full(10, -1, dtype=np.int32)
  label_of_digit[classes] = np.arange(len(classes), dtype=np.int32)
  pixels = np.round(bunch.images[selected] * (255.0 / _DIGITS_MAX_PIXEL)).astype(np.uint8)
  if image_size != pixels.shape[1]:
    pixels = np.stack([
        np.asarray(PIL.Image.fromarray(image).resize(
            (image_size, image_size), PIL.Image.Resampling.BILINEAR))
        for image in pixels])
  return ArraySource(
      pixels[..., None], label_of_digit[digit_labels[selected]], num_classes=len(classes),
      class_names=[str(digit) for digit in classes])


class SyntheticSource:
  """Procedural images of ``num_classes`` identities: a pure function of ``(seed, index)``.

  Example ``index`` shows identity ``index % num_classes`` (so identities are balanced and the
  first ``num_classes`` examples show each once). An identity is the sum of three colour
  gratings, :math:`x_{ij} = b + 48 \\sum_{k=1}^{3} c_k \\cos(2\\pi (u_k j / W + v_k i / H)
  + \\phi_k)`, whose integer frequencies ``|u_k|, |v_k| <= 3``, phases ``phi_k``, colours
  ``c_k in [-1, 1]^C`` and base colour ``b in [64, 192]^C`` are drawn from a generator seeded
  by ``(seed, identity)``. Each example shifts its identity's pattern by up to ``W/32, H/32``
  pixels, scales its contrast by ``[0.8, 1.2]``, adds a brightness offset in ``[-16, 16]`` and
  uniform noise in ``[-12, 12]``, drawn from a generator seeded by ``(seed, index)``.
  Identities are thus learnable (a nearest-class-mean classifier on raw pixels already tells
  them apart) and need no storage; an example costs under a millisecond at 112x112x3.

  Attributes:
    num_classes: number of identities.
    num_images: number of examples (``len``).
    image_shape: ``(H, W, C)``.
    seed: selects the identities and their examples.

  >>> from margins.data.sources import SyntheticSource
  >>> source = SyntheticSource(num_classes=1_000_000, num_images=10_000_000)
  >>> record = source[1_000_003]
  >>> record["image"].shape, record["image"].dtype, record["label"]
  ((112, 112, 3), dtype('uint8'), np.int32(3))

  References:
    insightface arcface_torch's synthetic data loader (``rec == "synthetic"``), which this
    replaces with learnable identities.
  """

  _NUM_GRATINGS = 3
  _FREQUENCIES = np.array([(u, v) for u in range(-3, 4) for v in range(-3, 4) if u or v])
  _GRATING_AMPLITUDE = 48.0
  _NOISE_AMPLITUDE = 12.0

  def __init__(
      self, *, num_classes: int = 1000, num_images: int = 100_000,
      image_shape: Sequence[int] = (112, 112, 3), seed: int = 0,
  ):
    self.num_classes = check_int(num_classes, "num_classes", minimum=1)
    self.num_images = check_int(num_images, "num_images", minimum=1)
    shape = tuple(int(n) for n in image_shape)
    if len(shape) != 3 or min(shape) <= 0 or shape[2] not in (1, 3):
      raise ValueError(
          f"`image_shape` must be (height, width, channels) with 1 or 3 channels, got "
          f"{image_shape}.")
    self.image_shape = shape
    self.seed = check_int(seed, "seed", minimum=0)

  def __len__(self) -> int:
    return self.num_images

  @property
  def labels(self) -> np.ndarray:
    """``int32 [N]`` label of every example, without drawing the images."""
    return (np.arange(self.num_images, dtype=np.int64) % self.num_classes).astype(np.int32)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = operator.index(index)
    if not -self.num_images <= index < self.num_images:
      raise IndexError(f"index {index} out of range for {self.num_images} images.")
    index %= self.num_images
    identity = index % self.num_classes
    height, width, channels = self.image_shape
    k = self._NUM_GRATINGS
    # Identity: frequencies (u_k, v_k) != (0, 0), phases, grating colours and base colour.
    identity_rng = np.random.default_rng((self.seed, 0, identity))
    frequencies = self._FREQUENCIES[identity_rng.integers(len(self._FREQUENCIES), size=k)]
    phases = identity_rng.uniform(0.0, 2.0 * np.pi, size=k)
    colours = identity_rng.uniform(-1.0, 1.0, size=(k, channels))
    base = identity_rng.uniform(64.0, 192.0, size=channels)
    # Example: shift, contrast, brightness and noise (uniform, from random bytes: fast).
    example_rng = np.random.default_rng((self.seed, 1, index))
    shift = example_rng.uniform(-1.0 / 32.0, 1.0 / 32.0, size=2)  # fraction of (W, H)
    contrast = example_rng.uniform(0.8, 1.2)
    brightness = example_rng.uniform(-16.0, 16.0)
    noise = np.frombuffer(example_rng.bytes(height * width * channels), dtype=np.int8)
    # cos(a_j + a_i) = cos a_j cos a_i - sin a_j sin a_i: two outer products per grating.
    angle_x = 2.0 * np.pi * frequencies[:, :1] * (np.arange(width) / width + shift[0])
    angle_y = 2.0 * np.pi * frequencies[:, 1:] * (np.arange(height) / height + shift[1])
    angle_x = (angle_x + phases[:, None]).astype(np.float32)
    angle_y = angle_y.astype(np.float32)
    gratings = (np.cos(angle_y)[:, :, None] * np.cos(angle_x)[:, None, :]
                - np.sin(angle_y)[:, :, None] * np.sin(angle_x)[:, None, :])
    weights = (contrast * self._GRATING_AMPLITUDE * colours).astype(np.float32)
    image = gratings.reshape(k, height * width).T @ weights  # [H * W, C]
    image += (base + brightness).astype(np.float32)
    image += np.float32(self._NOISE_AMPLITUDE / 128.0) * noise.reshape(height * width, channels)
    image = np.clip(image, 0.0, 255.0).astype(np.uint8).reshape(self.image_shape)
    return {"image": image, "label": np.int32(identity)}

  def __repr__(self) -> str:
    return (f"SyntheticSource(num_classes={self.num_classes}, num_images={self.num_images}, "
            f"image_shape={self.image_shape}, seed={self.seed})")
