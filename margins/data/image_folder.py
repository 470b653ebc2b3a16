"""Image folders (one sub-folder per identity), and the image codec every data source shares.

A face dataset unpacked to disk is a folder ``root/<identity>/<image>`` (CASIA-WebFace, VGGFace2,
insightface's datasets after unpacking). :class:`ImageFolderSource` reads it as a grain
random-access data source: identities sorted by name get labels ``0..K-1``, and each image is
decoded in ``__getitem__``, i.e. in grain's worker processes.

Every source of ``margins.data`` yields records ``{"image": uint8 [H, W, C], "label": int32 []}``
and exposes ``num_classes`` and ``image_shape``; :func:`decode_image` gives all of them the same
decoding (Pillow) and the same resizing to ``image_shape``.
"""

import array
import io
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps

from margins._checks import check_int
from margins.data import _shared_memory

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_MODES = {1: "L", 3: "RGB"}


def check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
  """``image_shape`` as a tuple of ints, checked to be ``(height, width, 1 or 3)``."""
  shape = tuple(check_int(n, "image_shape", minimum=1) for n in image_shape)
  if len(shape) != 3 or shape[2] not in _MODES:
    raise ValueError(
        f"`image_shape` must be (height, width, channels) with 1 or 3 channels, got {image_shape}.")
  return shape


def decode_image(data: bytes, *, image_shape: Sequence[int] | None = None,
                 channels: int = 3) -> np.ndarray:
  """Decodes an encoded image (JPEG, PNG, BMP, WebP) into ``uint8 [H, W, C]``, upright by its
  EXIF orientation tag if it has one.

  Args:
    data: the encoded bytes.
    image_shape: ``(H, W, C)``: the image is converted to ``C`` channels (1: grey, 3: RGB) and,
      when its size differs, resized to ``H x W`` (bilinear). ``None``: ``channels`` at the
      stored size.
    channels: 1 or 3, where ``image_shape`` is ``None``.

  Returns:
    ``uint8 [H, W, C]``.

  Raises:
    ValueError: ``data`` is not an image Pillow can decode.

  >>> import numpy as np
  >>> from margins.data.image_folder import decode_image, encode_image
  >>> image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  >>> data = encode_image(image, image_format="png")
  >>> bool((decode_image(data) == image).all())
  True
  >>> decode_image(data, image_shape=(4, 6, 1)).shape
  (4, 6, 1)

  References:
    Pillow, https://pillow.readthedocs.io (the decoder).
  """
  shape = None if image_shape is None else check_image_shape(image_shape)
  if shape is not None:
    channels = shape[2]
  elif channels not in _MODES:
    raise ValueError(f"`channels` must be 1 or 3, got {channels}.")
  try:
    with PIL.Image.open(io.BytesIO(data)) as opened:
      # Upright by its EXIF orientation, as viewers and OpenCV 4's decoder show it.
      PIL.ImageOps.exif_transpose(opened, in_place=True)
      image = _eight_bit(opened).convert(_MODES[channels])
  # Pillow's errors for bad image data; a damaged header can also claim billions of pixels.
  except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
    raise ValueError(f"cannot decode image ({len(data)} bytes): {error}") from error
  if shape is not None and image.size != (shape[1], shape[0]):
    image = image.resize((shape[1], shape[0]), PIL.Image.Resampling.BILINEAR)
  width, height = image.size
  return np.asarray(image, dtype=np.uint8).reshape(height, width, channels)


def _eight_bit(image: PIL.Image.Image) -> PIL.Image.Image:
  """16-bit greyscale (Pillow's modes ``I;16*`` and ``I``) scaled to 8 bits, as OpenCV and
  MXNet decode it (Pillow's ``convert`` would clip every value above 255); others as they are."""
  if image.mode != "I" and not image.mode.startswith("I;16"):
    return image
  return PIL.Image.fromarray((np.clip(np.asarray(image, np.int64), 0, 65535) >> 8).astype(np.uint8))


def encode_image(image: np.ndarray, *, image_format: str = "jpeg", quality: int = 95) -> bytes:
  """Encodes ``uint8 [H, W, 3]``, ``[H, W, 1]`` or ``[H, W]`` as JPEG or PNG bytes.

  Args:
    image: the pixels.
    image_format: ``"jpeg"`` (lossy, what insightface's datasets store) or ``"png"`` (lossless).
    quality: JPEG quality in ``[1, 100]`` (ignored for PNG); 95 as MXNet's ``pack_img``.

  Returns:
    The encoded bytes.

  >>> import numpy as np
  >>> from margins.data.image_folder import encode_image
  >>> encode_image(np.zeros((8, 8, 3), np.uint8))[:3]  # the JPEG start-of-image marker
  b'\\xff\\xd8\\xff'

  References:
    Pillow, https://pillow.readthedocs.io (the encoder).
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise TypeError(f"`image` must be uint8, got dtype {image.dtype}.")
  if image.ndim == 3 and image.shape[2] == 1:
    image = image[:, :, 0]
  if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
    raise ValueError(f"`image` must have shape [H, W, 3], [H, W, 1] or [H, W], got {image.shape}.")
  image_format = image_format.lower()
  if image_format not in ("jpeg", "png"):
    raise ValueError(f"`image_format` must be 'jpeg' or 'png', got {image_format!r}.")
  if not 1 <= quality <= 100:
    raise ValueError(f"`quality` must lie in [1, 100], got {quality}.")
  buffer = io.BytesIO()
  options = dict(quality=quality) if image_format == "jpeg" else {}
  PIL.Image.fromarray(image).save(buffer, format=image_format.upper(), **options)
  return buffer.getvalue()


def read_image(path: str | os.PathLike[str], *, image_shape: Sequence[int] | None = None,
               channels: int = 3) -> np.ndarray:
  """:func:`decode_image` of the file at ``path``; a decoding error names the file."""
  with open(path, "rb") as file:
    data = file.read()
  try:
    return decode_image(data, image_shape=image_shape, channels=channels)
  except ValueError as error:
    raise ValueError(f"{os.fspath(path)}: {error}") from error


def list_image_folder(
    root: str | os.PathLike[str], *, extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> tuple[list[str], np.ndarray, list[str]]:
  """Lists ``root/<identity>/**/<image>``: image paths, their labels and the identity names.

  Identities are the sub-folders of ``root`` (hidden ones skipped), sorted by name: the ``k``-th
  gets label ``k``. Images are the files below each identity folder whose extension (any case) is
  in ``extensions``, sorted by path, so the listing is the same on every machine. Hidden files and
  folders (a leading ``.``, as macOS's ``._x.jpg`` companions or ``.ipynb_checkpoints``) are
  skipped at every level.

  Args:
    root: the dataset folder.
    extensions: file name endings counted as images.

  Returns:
    ``(paths, labels, class_names)``: ``paths[i]`` has label ``labels[i]`` (``int32 [N]``, grouped
    and ascending); ``class_names[k]`` is the folder of identity ``k``.

  Raises:
    ValueError: ``root`` is not a folder, has no identity folders, or an identity has no images.

  >>> import os, tempfile
  >>> from margins.data.image_folder import list_image_folder
  >>> tmp = tempfile.TemporaryDirectory()
  >>> for name in ("bob/1.jpg", "bob/2.png", "alice/1.jpg", "alice/notes.txt"):
  ...   os.makedirs(os.path.dirname(os.path.join(tmp.name, name)), exist_ok=True)
  ...   open(os.path.join(tmp.name, name), "wb").close()
  >>> paths, labels, names = list_image_folder(tmp.name)
  >>> [os.path.relpath(p, tmp.name) for p in paths], labels.tolist(), names
  (['alice/1.jpg', 'bob/1.jpg', 'bob/2.png'], [0, 1, 1], ['alice', 'bob'])
  >>> tmp.cleanup()

  References:
    The layout of torchvision's ``ImageFolder`` and of unpacked insightface datasets.
  """
  class_names, images, counts = _listing(os.fspath(root), extensions)
  paths = list(images)
  return paths, _labels(counts), class_names


def _listing(root: str, extensions: Sequence[str]) -> tuple[list[str], Iterator[str], list[int]]:
  """``(class_names, images, counts)`` of :func:`list_image_folder`: ``images`` yields the image
  paths one identity folder at a time, appending each identity's number of images to ``counts``,
  and raises ``ValueError`` after the last if an identity has none."""
  if not os.path.isdir(root):
    raise ValueError(f"`root` must be a folder with one sub-folder per identity, got {root!r}.")
  if isinstance(extensions, str):  # Its characters would each be a suffix.
    raise TypeError(f"`extensions` must be a sequence of suffixes, e.g. ('.jpg', '.png'), got "
                    f"{extensions!r}.")
  suffixes = tuple(extension.lower() for extension in extensions)
  with os.scandir(root) as entries:
    class_names = sorted(
        entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))
  if not class_names:
    raise ValueError(f"{root}: no identity sub-folders found.")
  counts = []

  def images() -> Iterator[str]:
    for name in class_names:
      found = image_files(os.path.join(root, name), suffixes)
      counts.append(len(found))
      yield from found
    empty = [name for name, count in zip(class_names, counts) if not count]
    if empty:
      raise ValueError(
          f"{root}: {len(empty)} identity folder(s) hold no image with an extension in "
          f"{list(suffixes)}: {empty[:5]}.")

  return class_names, images(), counts


def _labels(counts: Sequence[int]) -> np.ndarray:
  """``int32 [N]``: label ``k`` repeated ``counts[k]`` times."""
  return np.repeat(np.arange(len(counts), dtype=np.int32), counts)


def image_files(folder: str, suffixes: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
  """Sorted paths of the files below ``folder`` (any depth, symbolic links followed) whose names
  end in one of the lower-case ``suffixes``, in any case.

  Hidden files and folders (``.*``, such as macOS's ``._*`` resource files) are skipped, and a
  folder reached twice (through a symbolic link, perhaps a loop) is read once, under the name by
  which a walk of the sorted folders reaches it first.
  """
  found, seen = [], set()
  for current, sub_folders, names in os.walk(folder, followlinks=True):
    real = os.path.realpath(current)
    if real in seen:
      sub_folders.clear()
      continue
    seen.add(real)
    sub_folders[:] = sorted(sub for sub in sub_folders if not sub.startswith("."))
    found += [os.path.join(current, name) for name in names
              if not name.startswith(".") and name.lower().endswith(suffixes)]
  return sorted(found)


class PackedStrings(Sequence[str]):
  """Strings that all begin with ``prefix``, packed into two arrays without it, held in shared
  memory from 16 MiB on: grain's worker processes map them, where each unpickled its own copy of
  a list of ``str``. Indexing (slices give lists) and iteration decode them one at a time.

  An image folder's paths at WebFace42M's layout (``/data/WebFace42M/0000123/001.jpg``, prefix
  ``/data/WebFace42M/``) take 23 bytes each here, 89 in a list of ``str``.

  Attributes:
    prefix: what every string begins with.
    data: ``uint8 [B]``: the strings without ``prefix``, ``os.fsencode``-d, end to end.
    offsets: ``int64 [N + 1]``: string ``i`` is ``prefix`` and ``data[offsets[i]:offsets[i + 1]]``.

  >>> from margins.data.image_folder import PackedStrings
  >>> paths = PackedStrings(["/data/alice/1.jpg", "/data/bob/1.jpg"], prefix="/data/")
  >>> len(paths), paths[1], paths.data.nbytes, paths.offsets.tolist()
  (2, '/data/bob/1.jpg', 20, [0, 11, 20])
  """

  def __init__(self, strings: Iterable[str], *, prefix: str = ""):
    """Packs ``strings``, reading one at a time (a generator's need not all be held).

    Raises:
      ValueError: a string does not begin with ``prefix``.
    """
    data, offsets = bytearray(), array.array("q", [0])
    for string in strings:
      if not string.startswith(prefix):
        raise ValueError(f"{string!r} does not begin with the prefix {prefix!r}.")
      data += os.fsencode(string[len(prefix):])
      offsets.append(len(data))
    self.prefix = prefix
    self.data = _shared_memory.shared(np.frombuffer(data, np.uint8))
    self.offsets = _shared_memory.shared(np.frombuffer(offsets, np.int64))

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, index: int | slice) -> str | list[str]:
    if isinstance(index, slice):
      return [self[i] for i in range(len(self))[index]]
    index = range(len(self))[index]  # A negative index counts from the end; IndexError past it.
    stored = self.data[self.offsets[index]:self.offsets[index + 1]].tobytes()
    return self.prefix + os.fsdecode(stored)

  def __repr__(self) -> str:
    return f"PackedStrings({len(self)} strings, prefix={self.prefix!r})"


class ImageFolderSource:
  """Grain random-access source over a folder with one sub-folder per identity.

  Records are ``{"image": uint8 [H, W, C], "label": int32 []}``; images are decoded (and, when
  their size differs from ``image_shape``, resized) in ``__getitem__``. The source holds its paths
  and identity names packed (:class:`PackedStrings`) and its labels, in shared memory from 16 MiB
  on: grain's worker processes map them, where each unpickled its own list of paths (about 4 GB
  at WebFace42M's size, see ``docs/benchmarks.md``).

  Attributes:
    root: the dataset folder.
    paths: :class:`PackedStrings`, the image paths (see :func:`list_image_folder` for the order).
    labels: ``int32 [N]`` label of each path.
    class_names: :class:`PackedStrings`, the identity folder of each label.
    num_classes: number of identities ``K``.
    image_shape: ``(H, W, C)`` of every image returned.

  >>> import os, tempfile, numpy as np
  >>> from margins.data.image_folder import ImageFolderSource, encode_image
  >>> tmp = tempfile.TemporaryDirectory()
  >>> for name in ("alice", "bob"):
  ...   os.makedirs(os.path.join(tmp.name, name))
  ...   with open(os.path.join(tmp.name, name, "0.png"), "wb") as f:
  ...     _ = f.write(encode_image(np.zeros((6, 4, 3), np.uint8), image_format="png"))
  >>> source = ImageFolderSource(tmp.name)
  >>> len(source), source.num_classes, source.image_shape
  (2, 2, (6, 4, 3))
  >>> record = source[1]
  >>> record["image"].shape, record["label"]
  ((6, 4, 3), np.int32(1))
  >>> tmp.cleanup()

  References:
    grain's random-access data source protocol (``__len__``, ``__getitem__``).
  """

  def __init__(self, root: str | os.PathLike[str], *,
               image_shape: Sequence[int] | None = None,
               extensions: Sequence[str] = IMAGE_EXTENSIONS):
    """Lists the folder.

    Args:
      root: folder with one sub-folder per identity.
      image_shape: ``(H, W, C)`` of the returned images (C = 1 or 3); ``None``: the size of the
        first image, RGB.
      extensions: file name endings counted as images.
    """
    self.root = os.fspath(root)
    class_names, images, counts = _listing(self.root, extensions)
    self.paths = PackedStrings(images, prefix=os.path.join(self.root, ""))
    self.labels = _shared_memory.shared(_labels(counts))
    self.class_names = PackedStrings(class_names)
    self.num_classes = len(self.class_names)
    if image_shape is None:
      height, width, channels = self._decode(0, None).shape
      image_shape = (height, width, channels)
    self.image_shape = check_image_shape(image_shape)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self._decode(index, self.image_shape), "label": self.labels[index]}

  def _decode(self, index: int, image_shape: tuple[int, int, int] | None) -> np.ndarray:
    return read_image(self.paths[index], image_shape=image_shape)

  def __repr__(self) -> str:
    return (f"ImageFolderSource({self.root!r}, {len(self)} images, {self.num_classes} classes, "
            f"image_shape={self.image_shape})")
