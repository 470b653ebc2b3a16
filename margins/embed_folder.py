r"""Embeds every image of a folder with an exported model (see :mod:`margins.export`) to ``.npy``.

  python -m margins.embed_folder --model <exported dir> --images <folder> \
      --out embeddings.npy [--flip] [--batch_size 256]

finds the images below ``--images`` (any depth; ``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.webp``),
decodes each to the model's input (resized, RGB or grey), normalises it as in training and writes

- ``embeddings.npy``: ``float32 [N, D]``, not normalised (with ``--flip``, the sum of an image's
  and its mirror image's embeddings, insightface's flip test);
- ``embeddings.txt``: the ``N`` image paths relative to ``--images``, sorted, one per line, in the
  order of the rows.

The network is the serialized StableHLO the export wrote: neither the training code nor the
model definitions are imported (the package's data and loss modules are).
"""

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from margins import cli_flags
from margins._checks import names_folder
from margins.data import image_folder
from margins.data import pipeline

# The files of an exported model's folder.
MODEL_FILE = "model.stablehlo"
METADATA_FILE = "model.json"

_MODEL = flags.DEFINE_string("model", None, "Folder of an exported model (python -m "
                             "margins.export).")
_IMAGES = flags.DEFINE_string("images", None, "Folder of images to embed (searched recursively).")
for _name in ("out", "batch_size", "flip"):
  flags.declare_key_flag(_name)
DEFAULT_BATCH_SIZE = 256


def load_model(directory: str | os.PathLike[str]) -> tuple[jax.export.Exported, dict]:
  """``(exported, metadata)`` of a folder written by :func:`margins.export.save_model`."""
  directory = os.fspath(directory)
  paths = [os.path.join(directory, name) for name in (MODEL_FILE, METADATA_FILE)]
  missing = [path for path in paths if not os.path.isfile(path)]
  if missing:
    raise FileNotFoundError(f"{', '.join(missing)} not found: is {directory!r} a folder written "
                            "by python -m margins.export?")
  with open(paths[0], "rb") as file:
    serialized = bytearray(file.read())
  try:
    exported = jax.export.deserialize(serialized)
  except Exception as error:  # flatbuffers' struct.error, IndexError ... on damaged bytes.
    raise ValueError(f"{paths[0]} ({len(serialized)} bytes) is not a model jax.export can read: "
                     f"damaged or cut short? Export it again ({type(error).__name__}: "
                     f"{error}).") from error
  with open(paths[1], encoding="utf-8") as file:
    try:
      return exported, json.load(file)
    except ValueError as error:  # JSON's errors, and bytes that are not UTF-8.
      raise ValueError(f"{paths[1]} is not JSON ({error}): export the model again.") from error


def list_images(root: str | os.PathLike[str]) -> list[str]:
  """The image files below ``root`` (any depth), as sorted paths relative to ``root``; hidden
  ones skipped, a folder reached twice read once (:func:`margins.data.image_folder.image_files`).
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root} is not a folder.")
  return [os.path.relpath(path, root) for path in image_folder.image_files(root)]


def embed_files(exported: jax.export.Exported, paths: Sequence[str], *,
                batch_size: int = DEFAULT_BATCH_SIZE, flip: bool = False) -> np.ndarray:
  """``float32 [N, D]`` embeddings of image files, by the exported model, ``batch_size`` at a time.

  Every batch has the same size (the last one is padded with black images), so the model is
  compiled once.
  """
  image_shape = tuple(exported.in_avals[0].shape[1:])
  if not paths:
    return np.zeros((0, exported.out_avals[0].shape[1]), np.float32)
  # The pixels cross to the device as uint8 and are normalised (and mirrored) there.
  embed = jax.jit(lambda images: exported.call(pipeline.normalize_images(images)))
  batch_size = min(batch_size, len(paths))
  embeddings = []
  for start in range(0, len(paths), batch_size):
    batch = np.zeros((batch_size, *image_shape), np.uint8)
    chunk = paths[start:start + batch_size]
    for row, path in enumerate(chunk):
      batch[row] = image_folder.read_image(path, image_shape=image_shape)
    images = jax.device_put(batch)
    out = embed(images)
    if flip:
      out = out + embed(jnp.flip(images, axis=2))
    embeddings.append(np.asarray(out)[:len(chunk)])
  return np.concatenate(embeddings)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli_flags.refuse_unused(cli_flags.BATCH_SIZE, cli_flags.OUT, cli_flags.FLIP)
  cli_flags.quiet_library_logs()
  for name, holder in (("model", _MODEL), ("images", _IMAGES), ("out", cli_flags.OUT)):
    if not holder.value:
      raise app.UsageError(f"--{name} is required.")
  out = cli_flags.OUT.value
  if names_folder(out):
    raise app.UsageError(f"--out {out} is a folder: give the .npy file to write, e.g. "
                         f"{os.path.join(out, 'embeddings.npy')}.")
  try:
    names = list_images(_IMAGES.value)
    if not names:
      raise app.UsageError(f"--images {_IMAGES.value}: no image files found.")
    broken = [name for name in names if "\n" in name or "\r" in name]
    if broken:  # The listing has one path per line.
      raise app.UsageError(f"File names with a line break cannot be listed one per line: "
                           f"{broken[:3]}; rename them.")
    exported, _ = load_model(_MODEL.value)
  except (FileNotFoundError, ValueError) as error:
    raise app.UsageError(str(error)) from error
  try:
    embeddings = embed_files(exported, [os.path.join(_IMAGES.value, name) for name in names],
                             batch_size=cli_flags.BATCH_SIZE.value or DEFAULT_BATCH_SIZE,
                             flip=cli_flags.flip_test(False))
  except (ValueError, OSError) as error:  # An image that does not decode or cannot be read
    # (a broken link): its path is in the message.
    raise app.UsageError(str(error)) from error
  out = out if out.endswith(".npy") else out + ".npy"  # As np.save names it.
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  listing = out[:-len(".npy")] + ".txt"
  # File names as the file system gave them, undecodable bytes included.
  with open(listing, "w", encoding="utf-8", errors="surrogateescape") as file:
    file.writelines(name + "\n" for name in names)
  np.save(out, embeddings)
  print(f"{embeddings.shape[0]} embeddings of dimension {embeddings.shape[1]}: {out}, paths: "
        f"{listing}", flush=True)


if __name__ == "__main__":
  app.run(main)
