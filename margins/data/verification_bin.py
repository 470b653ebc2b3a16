"""Verification ``.bin`` files (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW) as insightface ships them.

A ``.bin`` is a pickle of ``(bins, issame)``: ``bins`` holds ``2P`` encoded images (JPEG/PNG),
pair ``i`` being ``bins[2i]`` and ``bins[2i + 1]``; ``issame`` holds ``P`` booleans. Most files
were written by Python 2, whose ``str`` objects Python 3 can only load as ``bytes``
(``encoding='bytes'``); newer files were written by Python 3.

The pickle is loaded by an unpickler that builds only bytes, containers, booleans and NumPy
arrays, so a ``.bin`` from the internet cannot run code.
"""

import os
import pickle
from collections.abc import Sequence

import numpy as np

from margins.data import image_folder

# Globals a .bin pickle may name: Python 3's protocol-2 encoding of bytes, bytearray, and what
# NumPy needs to rebuild arrays and scalars (``_frombuffer``: arrays pickled with protocol 5;
# NumPy 1 and 2 module names).
_ALLOWED_GLOBALS = frozenset(
    [("_codecs", "encode"), ("builtins", "bytearray"), ("__builtin__", "bytearray"),
     ("numpy", "dtype"), ("numpy", "ndarray")]
    + [(f"numpy.{core}.{module}", name)
       for core in ("core", "_core")
       for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                            ("numeric", "_frombuffer"))])


class _BinUnpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str):
    if (module, name) not in _ALLOWED_GLOBALS:
      raise pickle.UnpicklingError(f"a verification .bin may not reference {module}.{name}")
    if module.startswith("numpy.core."):  # NumPy 1's names; NumPy 2 warns when they are imported.
      module = module.replace("numpy.core.", "numpy._core.", 1)
    return super().find_class(module, name)


def _encoded_bytes(value) -> bytes:
  # OpenCV 3's imencode, which wrote CFP-FP and AgeDB-30, returned ``[N, 1]`` arrays.
  if isinstance(value, np.ndarray) and value.dtype == np.uint8:
    return value.tobytes()
  if isinstance(value, (bytes, bytearray, memoryview)):
    return bytes(value)
  raise TypeError(f"expected encoded image bytes, got {type(value).__name__}")


def load_bin(path: str | os.PathLike[str], *, image_size: Sequence[int] | None = None,
             channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """Loads a verification ``.bin``: decoded images and the same/different flag of each pair.

  Args:
    path: the ``.bin`` file.
    image_size: ``(H, W)`` to resize every image to (bilinear), e.g. the model's input size;
      ``None``: keep the stored size, which must then be the same for every image.
    channels: 3 (RGB) or 1 (grey, Pillow's conversion), as the model takes; 1 needs
      ``image_size``.

  Returns:
    ``(images, issame)``: ``uint8 [2P, H, W, channels]`` images, pair ``i`` being images ``2i`` and
    ``2i + 1``; ``bool [P]``.

  Raises:
    ValueError: the file is not a verification ``.bin`` or an image cannot be decoded; the
      message names the file (and the image).

  >>> import os, tempfile, numpy as np
  >>> from margins.data.verification_bin import load_bin, write_bin
  >>> tmp = tempfile.TemporaryDirectory()
  >>> path = os.path.join(tmp.name, "pairs.bin")
  >>> write_bin(path, np.zeros((4, 6, 6, 3), np.uint8), [True, False])
  >>> images, issame = load_bin(path, image_size=(8, 8))
  >>> images.shape, issame.tolist()
  ((4, 8, 8, 3), [True, False])
  >>> tmp.cleanup()

  References:
    insightface, ``recognition/arcface_torch/eval/verification.py`` (``load_bin``).
  """
  path = os.fspath(path)
  if image_size is not None and (len(image_size) != 2 or min(image_size) <= 0):
    raise ValueError(f"`image_size` must be (height, width), got {image_size}.")
  if channels not in (1, 3) or (channels == 1 and image_size is None):
    raise ValueError(f"`channels` must be 3, or 1 with `image_size`, got {channels}.")
  with open(path, "rb") as file:
    try:
      loaded = _BinUnpickler(file, encoding="bytes").load()
    except Exception as error:  # Unpickling bad bytes raises errors of many types.
      raise ValueError(f"{path}: not a verification .bin pickle ({error!r}).") from error
  if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2):
    raise ValueError(f"{path}: expected a pickled pair (bins, issame), got "
                     f"{type(loaded).__name__}.")
  bins, issame = loaded[0], np.asarray(loaded[1])
  if issame.shape == (0,):
    raise ValueError(f"{path}: the file holds no pairs.")
  if issame.ndim != 1 or not (issame.dtype == bool or (
      np.issubdtype(issame.dtype, np.integer) and np.isin(issame, (0, 1)).all())):
    raise ValueError(f"{path}: `issame` must be a list of P booleans, got dtype {issame.dtype} "
                     f"and shape {issame.shape}.")
  # A list of them, as insightface writes; an object array of them indexes the same way.
  if not (isinstance(bins, (list, tuple)) or (
      isinstance(bins, np.ndarray) and bins.dtype == object and bins.ndim == 1)):
    raise ValueError(f"{path}: the images must be a list of encoded images, got "
                     f"{type(bins).__name__}.")
  if len(bins) != 2 * len(issame):
    raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected "
                     f"{2 * len(issame)}).")
  image_shape = None if image_size is None else (*image_size, channels)
  images = []
  for number, value in enumerate(bins):
    try:
      images.append(image_folder.decode_image(_encoded_bytes(value), image_shape=image_shape))
    except (TypeError, ValueError) as error:
      raise ValueError(f"{path}: image {number}: {error}") from error
    if images[-1].shape != images[0].shape:
      raise ValueError(f"{path}: image {number} is {images[-1].shape[:2]} but image 0 is "
                       f"{images[0].shape[:2]}; pass `image_size` to resize them.")
  return np.stack(images), issame.astype(bool)


def write_bin(path: str | os.PathLike[str], images: np.ndarray, issame: Sequence[bool], *,
              image_format: str = "jpeg", quality: int = 95) -> None:
  """Writes a verification ``.bin`` readable by :func:`load_bin` and by insightface on Python 3
  (pickle protocol 4: Python 3.4 and later; Python 2 cannot read it).

  Args:
    path: the file to write.
    images: ``uint8 [2P, H, W, 3]``; pair ``i`` is images ``2i`` and ``2i + 1``.
    issame: ``[P]`` booleans, true where a pair shows one identity.
    image_format: ``"jpeg"`` (as insightface's files) or ``"png"`` (lossless).
    quality: JPEG quality.

  >>> import os, tempfile, numpy as np
  >>> from margins.data.verification_bin import load_bin, write_bin
  >>> tmp = tempfile.TemporaryDirectory()
  >>> path = os.path.join(tmp.name, "pairs.bin")
  >>> images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
  >>> write_bin(path, images, [True], image_format="png")
  >>> bool((load_bin(path)[0] == images).all())
  True
  >>> tmp.cleanup()

  References:
    insightface's ``.bin`` layout: ``pickle.dump((bins, issame_list), f)``.
  """
  images = np.asarray(images)
  issame = np.asarray(issame)
  if images.ndim != 4 or images.shape[3] != 3:
    raise ValueError(f"`images` must have shape [2P, H, W, 3], got {images.shape}.")
  if issame.ndim != 1 or issame.dtype != bool:
    raise TypeError(f"`issame` must be a 1-D sequence of booleans, got dtype {issame.dtype} and "
                    f"shape {issame.shape}.")
  if images.shape[0] != 2 * issame.shape[0]:
    raise ValueError(f"`images` holds {images.shape[0]} images but `issame` has "
                     f"{issame.shape[0]} pairs (expected {2 * issame.shape[0]} images).")
  bins = [image_folder.encode_image(image, image_format=image_format, quality=quality)
          for image in images]
  with open(path, "wb") as file:
    pickle.dump((bins, issame.tolist()), file, protocol=4)
