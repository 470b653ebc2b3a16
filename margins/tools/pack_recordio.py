r"""Packs an image folder (one sub-folder per identity) into insightface's RecordIO layout.

  python -m margins.tools.pack_recordio --image_dir DIR --output PREFIX \
      [--quality 95] [--image_size 112,112] [--num_threads 8]

writes ``PREFIX.rec``, ``PREFIX.idx`` and ``property`` (beside them; ``PREFIX/train.rec`` ... where
``PREFIX`` is a folder), the files insightface's ``MXFaceDataset`` and
:class:`margins.data.recordio.RecordIOSource` read:

- key 0: header record with labels ``[N + 1, N + 1 + K]``;
- keys ``1..N``: the images, JPEG-encoded, grouped by identity (identities sorted by folder name
  get labels ``0..K-1``), each with its label;
- keys ``N + 1..N + K``: identity ``k``'s range ``[start, end)`` of image keys;
- ``property``: ``K,H,W``.

Images are decoded and re-encoded as JPEG (``--quality``), resized to ``--image_size`` when given;
without it every image must have the size of the first. The files are written under temporary
names and renamed once complete: a failed run (an image that does not decode, say) leaves no
half-written dataset, nor touches one already there.
"""

import argparse
import concurrent.futures
import os
from collections.abc import Iterable, Sequence

import numpy as np

from margins._checks import names_folder
from margins.data import image_folder
from margins.data import recordio

_CHUNK = 1024  # Images encoded per batch of thread-pool work (bounds memory).


def pack_image_folder(image_dir: str | os.PathLike[str], output_prefix: str | os.PathLike[str],
                      *, quality: int = 95, image_size: Sequence[int] | None = None,
                      num_threads: int | None = None) -> tuple[int, int]:
  """Packs ``image_dir/<identity>/<image>`` into ``output_prefix.rec/.idx`` and ``property``.

  Args:
    image_dir: folder with one sub-folder per identity (see
      :func:`margins.data.image_folder.list_image_folder`).
    output_prefix: path of the outputs without extension; ``property`` goes in its folder. A
      folder (one that exists, or a path ending in a separator) holds ``train.rec`` and the rest.
    quality: JPEG quality.
    image_size: ``(H, W)`` to resize every image to; ``None``: all images must share one size.
    num_threads: threads decoding and encoding images (``None``: one per CPU).

  Returns:
    ``(num_images, num_classes)``.

  Raises:
    ValueError: the folder is not an identity folder, an image cannot be decoded, or images differ
      in size while ``image_size`` is ``None``; the message names the file.

  >>> import os, tempfile, numpy as np
  >>> from margins.data.image_folder import encode_image
  >>> from margins.data.recordio import RecordIOSource
  >>> from margins.tools.pack_recordio import pack_image_folder
  >>> tmp = tempfile.TemporaryDirectory()
  >>> for name in ("alice/0.png", "alice/1.png", "bob/0.png"):
  ...   os.makedirs(os.path.dirname(os.path.join(tmp.name, "faces", name)), exist_ok=True)
  ...   with open(os.path.join(tmp.name, "faces", name), "wb") as f:
  ...     _ = f.write(encode_image(np.zeros((8, 8, 3), np.uint8), image_format="png"))
  >>> pack_image_folder(os.path.join(tmp.name, "faces"), os.path.join(tmp.name, "train"))
  (3, 2)
  >>> source = RecordIOSource(tmp.name)
  >>> len(source), source.num_classes, source.image_shape, source.identity_ranges().tolist()
  (3, 2, (8, 8, 3), [[1, 3], [3, 4]])
  >>> tmp.cleanup()

  References:
    insightface's dataset layout (``recognition/arcface_torch/dataset.py``); MXNet's
    ``tools/im2rec.py`` for packing images into RecordIO.
  """
  if not 1 <= quality <= 100:  # Checked before any image is read.
    raise ValueError(f"`quality` must lie in [1, 100], got {quality}.")
  paths, labels, class_names = image_folder.list_image_folder(image_dir)
  num_images, num_classes = len(paths), len(class_names)
  if image_size is None:
    height, width, _ = image_folder.read_image(paths[0]).shape
  else:
    height, width = (int(n) for n in image_size)
  image_shape = (height, width, 3)

  def encode(path: str) -> bytes:
    image = image_folder.read_image(
        path, image_shape=image_shape if image_size is not None else None)
    if image.shape != image_shape:
      raise ValueError(f"{path}: image is {image.shape[:2]}, but {paths[0]} is "
                       f"{(height, width)}; pass --image_size to resize all images.")
    return image_folder.encode_image(image, image_format="jpeg", quality=quality)

  def encoded_images():
    with concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count()) as pool:
      for chunk_start in range(0, num_images, _CHUNK):
        yield from pool.map(encode, paths[chunk_start:chunk_start + _CHUNK])

  write_identity_dataset(output_prefix, labels, encoded_images(), num_classes=num_classes,
                         image_size=(height, width))
  return num_images, num_classes


def write_identity_dataset(output_prefix: str | os.PathLike[str], labels: np.ndarray,
                           images: Iterable[bytes], *, num_classes: int,
                           image_size: Sequence[int]) -> None:
  """Writes encoded images into ``output_prefix.rec/.idx`` and ``property``, laid out as the
  module docstring says.

  Args:
    output_prefix: path of the outputs without extension; ``property`` goes in its folder (a
      folder: :func:`resolve_output`).
    labels: ``[N]`` label of each image, in ``[0, num_classes)``, non-decreasing (grouped by
      identity).
    images: the ``N`` encoded images (JPEG, PNG ...), in the order of ``labels``.
    num_classes: number of identities ``K``.
    image_size: ``(H, W)`` of every image, for ``property``.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"`labels` must be integers of shape [N], got {labels.dtype} "
                    f"{labels.shape}.")
  if labels.size and (np.any(labels[1:] < labels[:-1]) or labels[0] < 0
                      or labels[-1] >= num_classes):
    raise ValueError(f"`labels` must be non-decreasing in [0, {num_classes}).")
  if num_classes > 2**24:  # Past it, float32 labels merge neighbouring classes.
    raise ValueError(f"RecordIO stores labels as float32, exact for up to 2**24 classes; got "
                     f"{num_classes}.")
  output_prefix = resolve_output(output_prefix)
  folder = os.path.dirname(output_prefix) or "."
  created, missing = [], folder  # The folders made here, deepest first.
  while not os.path.isdir(missing):
    created.append(missing)
    missing = os.path.dirname(missing) or "."
  os.makedirs(folder, exist_ok=True)
  outputs = [output_prefix + ".rec", output_prefix + ".idx"]
  partial = [path + ".partial" for path in outputs]
  try:
    with recordio.RecordIOWriter(*partial) as writer:
      _write_records(writer, labels, images, num_classes)
  except BaseException:  # Nothing left behind: no partial file, no folder made for them.
    for path in partial:
      if os.path.exists(path):
        os.remove(path)
    for made in created:
      os.rmdir(made)
    raise
  for source, target in zip(partial, outputs):
    os.replace(source, target)
  height, width = (int(n) for n in image_size)
  with open(os.path.join(os.path.dirname(output_prefix), "property"), "w",
            encoding="ascii") as file:
    file.write(f"{num_classes},{height},{width}")


def resolve_output(output_prefix: str | os.PathLike[str]) -> str:
  """The outputs' path without extension: ``<folder>/train`` for a folder (one that exists, or a
  path ending in a separator), where :class:`~margins.data.RecordIOSource` looks; else as given.

  >>> import tempfile
  >>> from margins.tools.pack_recordio import resolve_output
  >>> resolve_output("/data/faces_rec/"), resolve_output("/data/faces_rec/faces")
  ('/data/faces_rec/train', '/data/faces_rec/faces')
  """
  output_prefix = os.fspath(output_prefix)
  if names_folder(output_prefix):
    return os.path.join(output_prefix, "train")
  return output_prefix


def _write_records(writer: recordio.RecordIOWriter, labels: np.ndarray, images: Iterable[bytes],
                   num_classes: int) -> None:
  """The header, image and identity records of :func:`write_identity_dataset`."""
  num_images = len(labels)
  first_identity_key = num_images + 1
  header = recordio.IRHeader(0, [first_identity_key, first_identity_key + num_classes], 0)
  writer.write(recordio.pack(header, b""), key=0)
  images = iter(images)
  for key, label in enumerate(labels.tolist(), start=1):
    data = next(images, None)
    if data is None:
      raise ValueError(f"{num_images} labels but {key - 1} images.")
    writer.write(recordio.pack(recordio.IRHeader(0, float(label), key), data), key=key)
  if next(images, None) is not None:
    raise ValueError(f"{num_images} labels but more images.")
  identities = np.arange(num_classes)
  starts = np.searchsorted(labels, identities, side="left") + 1
  ends = np.searchsorted(labels, identities, side="right") + 1
  for identity, (start, end) in enumerate(zip(starts.tolist(), ends.tolist())):
    key = first_identity_key + identity
    writer.write(recordio.pack(recordio.IRHeader(0, [start, end], key), b""), key=key)


def main(argv: Sequence[str] | None = None) -> None:
  """Parses the command line and packs the folder (see the module docstring)."""
  parser = argparse.ArgumentParser(
      prog="python -m margins.tools.pack_recordio",
      description="Pack an image folder (one sub-folder per identity) into insightface's "
                  "RecordIO layout: PREFIX.rec, PREFIX.idx and property.")
  parser.add_argument("--image_dir", required=True, help="folder with one sub-folder per identity")
  parser.add_argument("--output", required=True,
                      help="output prefix, e.g. /data/faces/train, or a folder (FOLDER/train)")
  parser.add_argument("--quality", type=int, default=95, help="JPEG quality, 1-100")
  parser.add_argument("--image_size", default=None,
                      help="H,W to resize every image to (default: keep; sizes must agree)")
  parser.add_argument("--num_threads", type=int, default=None,
                      help="threads encoding images (default: one per CPU)")
  args = parser.parse_args(argv)
  if not 1 <= args.quality <= 100:
    parser.error(f"--quality must lie in [1, 100], got {args.quality}")
  if args.num_threads is not None and args.num_threads < 1:
    parser.error(f"--num_threads must be positive, got {args.num_threads}")
  image_size = None
  if args.image_size is not None:
    try:
      image_size = tuple(int(n) for n in args.image_size.split(","))
    except ValueError:
      image_size = ()
    if len(image_size) != 2 or min(image_size) <= 0:
      parser.error(f"--image_size must be 'H,W' with positive integers, got {args.image_size!r}")
  if not os.path.isdir(args.image_dir):
    parser.error(f"--image_dir {args.image_dir} is not a folder (of one sub-folder per identity)")
  try:
    num_images, num_classes = pack_image_folder(
        args.image_dir, args.output, quality=args.quality, image_size=image_size,
        num_threads=args.num_threads)
  except (ValueError, OSError) as error:  # Not an identity folder, an image that does not
    parser.error(str(error))  # decode (named), an output that cannot be written, ...
  prefix = resolve_output(args.output)
  print(f"Packed {num_images} images of {num_classes} identities into {prefix}.rec "
        f"({prefix}.idx, property).")


if __name__ == "__main__":
  main()
