r"""Cleans a RecordIO dataset with a sub-centre ArcFace run: drops its noisy images.

  python -m margins.tools.subcenter_drop --workdir <run> --out <folder> \
      [--data <folder>] [--max_angle 75] [--step N] [--batch_size 256] [--compute_dtype float32]

The second step of sub-centre ArcFace's recipe for noisy web faces (Deng et al., ECCV 2020;
insightface's ``subcenter_arcface/drop.py``): train with ``K`` sub-centres per class (``K = 3``,
``config.loss.subcenters``), then

- embed every image of the training set (``--data``, by default the run's own
  ``config.data.path``), without the flip test, the network computing in float32 whatever the run
  trained in (``--compute_dtype``, as ``margins.evaluate``);
- per class, the dominant sub-centre is the one nearest (by cosine) to most of its images, the
  first on a tie: the clean faces gather there, noisy and hard ones at the others;
- keep the images within ``--max_angle`` degrees of their class's dominant sub-centre (75 in the
  paper); classes left without images are dropped and the others renumbered in order.

Writes ``--out/train.rec``, ``train.idx`` and ``property`` (insightface's layout), the kept
images' bytes as they were stored, and copies the data folder's verification sets (``*.bin``),
which the recipes evaluate from the folder they train on; the third step trains ArcFace
(``K = 1``) on them. A run with one centre per class (``W [C, D]``) cleans by the angle to it.
"""

import dataclasses
import math
import os
import shutil
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from margins import checkpoints
from margins import cli_flags
from margins import data as data_lib
from margins import distributed
from margins import eval_lib
from margins import sharding as sharding_lib
from margins import train_lib
from margins.data import image_folder
from margins.losses import _common
from margins.tools import pack_recordio

_DATA = flags.DEFINE_string(
    "data", None, "The RecordIO folder the run trained on (default: the run's config.data.path).")
_MAX_ANGLE = flags.DEFINE_float(
    "max_angle", 75.0, "Keep images within this angle (degrees) of their class's dominant "
    "sub-centre.", lower_bound=0.0, upper_bound=180.0)
for _name in ("workdir", "out", "step", "batch_size", "compute_dtype"):
  flags.declare_key_flag(_name)
_DISTRIBUTED = distributed.define_flags()
flags.adopt_module_key_flags(distributed)

_BLOCK = 65_536  # Images embedded at once: bounds the host's [block, D] arrays.


@dataclasses.dataclass(frozen=True)
class Cleaning:
  """What :func:`drop_noisy` keeps.

  Attributes:
    keep: ``bool [N]`` images kept.
    labels: ``int32 [N]`` new label of each kept image (-1 where dropped), ``0..num_classes-1``
      in the order of the old labels.
    num_classes: classes kept (those with a kept image).
    dominant: ``int [C]`` each old class's dominant sub-centre.
    cosines: ``float32 [N]`` each image's cosine to its class's dominant sub-centre.
  """

  keep: np.ndarray
  labels: np.ndarray
  num_classes: int
  dominant: np.ndarray
  cosines: np.ndarray


@jax.jit
def subcenter_cosines(embeddings, centres, labels) -> jax.Array:
  """``float32 [N, K]``: the cosine of each embedding ``[N, D]`` to each sub-centre of its own
  class, of ``centres [C, K, D]`` (or ``[C, D]``: ``K = 1``); zero vectors give 0. ``centres``
  may be a run's head split over the devices by rows: only the labels' rows are gathered."""
  embeddings = jnp.asarray(embeddings, jnp.float32)
  centres = jnp.asarray(centres, jnp.float32)
  centres = centres[:, None] if centres.ndim == 2 else centres
  # [N, K, D], NaN for a label past the rows; from a head split over Explicit mesh axes, whole on
  # each device: the rows are gathered, not the head.
  own = centres.at[jnp.asarray(labels)].get(
      mode="fill", fill_value=jnp.nan, out_sharding=_common.gathered_rows_sharding(centres))
  dots = jnp.einsum("nd,nkd->nk", embeddings, own, precision=jax.lax.Precision.HIGHEST)
  norms = jnp.linalg.norm(embeddings, axis=1)[:, None] * jnp.linalg.norm(own, axis=2)
  # A zero vector's cosine is 0; a missing row's stays NaN.
  cosines = dots / jnp.where(norms > 0, norms, 1)
  return jnp.where(norms > 0, cosines, jnp.where(norms == 0, 0, norms))


def drop_noisy(cosines, labels, num_classes: int, *, max_angle: float = 75.0) -> Cleaning:
  """Keeps the images within ``max_angle`` degrees of their class's dominant sub-centre.

  Args:
    cosines: ``[N, K]`` :func:`subcenter_cosines`.
    labels: ``[N]`` class of each image, in ``[0, num_classes)``.
    num_classes: the number of classes ``C``.
    max_angle: in degrees; an image is kept when its cosine to the dominant sub-centre exceeds
      ``cos(max_angle)``.

  Returns:
    A :class:`Cleaning`.

  >>> import numpy as np
  >>> cosines = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.95], [0.1, 0.3]])  # K = 2
  >>> result = drop_noisy(cosines, labels=np.array([0, 0, 0, 1]), num_classes=2)
  >>> result.dominant.tolist(), result.keep.tolist(), result.labels.tolist()
  ([0, 1], [True, True, False, True], [0, 0, -1, 1])
  """
  cosines, labels = np.asarray(cosines), np.asarray(labels)
  if cosines.ndim != 2 or labels.shape != cosines.shape[:1]:
    raise ValueError(f"`cosines` must be [N, K] and `labels` [N], got {cosines.shape} and "
                     f"{labels.shape}.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"`labels` must be in [0, {num_classes}).")
  num_subcenters = cosines.shape[1]
  nearest = labels.astype(np.int64) * num_subcenters + np.argmax(cosines, axis=1)
  votes = np.bincount(nearest, minlength=num_classes * num_subcenters)
  dominant = np.argmax(votes.reshape(num_classes, num_subcenters), axis=1)
  to_dominant = np.take_along_axis(cosines, dominant[labels][:, None], axis=1)[:, 0]
  keep = to_dominant > math.cos(math.radians(max_angle))
  kept_classes = np.unique(labels[keep])
  new_ids = np.full(num_classes, -1, np.int32)
  new_ids[kept_classes] = np.arange(len(kept_classes), dtype=np.int32)
  return Cleaning(keep=keep, labels=np.where(keep, new_ids[labels], -1).astype(np.int32),
                  num_classes=len(kept_classes), dominant=dominant, cosines=to_dominant)


class _Rows:
  """Rows ``[start, stop)`` of a random-access source."""

  def __init__(self, source, start: int, stop: int):
    self.source, self.start, self.stop = source, start, stop
    self.image_shape = source.image_shape

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int):
    return self.source[self.start + index]


def clean_run(workdir: str, output: str, *, data: str | None = None, max_angle: float = 75.0,
              step: int | None = None, batch_size: int | None = None,
              compute_dtype: str | None = "float32") -> Cleaning:
  """Cleans the RecordIO folder ``data`` (default: the run's) by the run's checkpoint ``step``
  (default: the latest) and, on process 0, writes the kept images to ``output``; see the module
  docstring. ``batch_size``: images embedded at once over all devices (a multiple of their
  number; ``None``: :data:`margins.eval_lib.DEFAULT_BATCH_SIZE` rounded up to one).
  ``compute_dtype``: the network's arithmetic (:func:`margins.train_lib.restore`'s: ``"run"``,
  the run's ``config.compute_dtype``; ``None``, its ``config.eval.compute_dtype``)."""
  # Checked before the checkpoint is read, which can take minutes.
  trained_on = checkpoints.load_config(workdir).data
  num_classes, image_shape = checkpoints.load_data_info(workdir)
  if data is None:
    if trained_on.name != "recordio":
      raise ValueError(f"The run trained on {trained_on.name!r} data, not a RecordIO folder: "
                       "give the folder to clean.")
    data = trained_on.path
    if not os.path.exists(data):  # A relative path, from where the run was started.
      raise FileNotFoundError(f"The run's config.data.path {data!r} is not found from here "
                              f"({os.getcwd()}); name its RecordIO folder with --data.")
  # As the run read it: files with neither ``property`` nor identity records need the config's.
  given_classes = trained_on.get("num_classes") if trained_on.name == "recordio" else None
  source = data_lib.RecordIOSource(data, image_shape=image_shape, num_classes=given_classes)
  folder = os.path.dirname(source.rec_path)  # ``data`` may name the folder or its .rec file.
  if os.path.realpath(output) == os.path.realpath(folder):
    raise ValueError(f"--out {output} is the folder being cleaned: writing there would truncate "
                     "the images still to be read. Give another folder.")
  if os.path.exists(output) and not os.path.isdir(output):
    raise ValueError(f"--out {output} is a file; give a folder.")
  if source.num_classes != num_classes:
    raise ValueError(f"{data} has {source.num_classes} classes, the run's head "
                     f"{num_classes}: not the data the run trained on.")
  batch_size = eval_lib.global_batch_size(batch_size, jax.device_count())  # restore's mesh
  experiment, state = train_lib.restore(workdir, step, parts="params", compute_dtype=compute_dtype)
  experiment.config.eval.batch_size = batch_size
  labels = source.labels
  embed_fn = jax.jit(lambda s, x: eval_lib.embed(experiment, s, x))
  cosines = []
  with jax.set_mesh(experiment.mesh):
    for start in range(0, len(source), _BLOCK):
      rows = _Rows(source, start, min(start + _BLOCK, len(source)))
      try:
        embeddings = eval_lib.compute_embeddings(experiment, state, rows, flip=False,
                                                 embed_fn=embed_fn)
      except eval_lib.NonFiniteEmbeddings as error:
        raise ValueError(f"{data}, images {rows.start} to {rows.stop - 1}: {error}") from error
      cosines.append(sharding_lib.to_host(subcenter_cosines(
          embeddings, state.params["head"], labels[rows.start:rows.stop])))
  cleaning = drop_noisy(np.concatenate(cosines), labels, source.num_classes, max_angle=max_angle)
  if not cleaning.num_classes:
    raise ValueError(f"No image of {data} lies within {max_angle:g} degrees of its class's "
                     "dominant sub-centre: nothing to write.")
  if jax.process_index() == 0:
    kept = np.flatnonzero(cleaning.keep)
    kept = kept[np.argsort(cleaning.labels[kept], kind="stable")]  # Grouped by identity.

    def stored_images() -> Iterator[bytes]:
      for index in kept.tolist():
        yield source.encoded_image(index)

    # ``property``'s size is the stored images', not the model's input: the first one's.
    stored_size = image_folder.decode_image(source.encoded_image(int(kept[0]))).shape[:2]
    pack_recordio.write_identity_dataset(
        os.path.join(output, "train"), cleaning.labels[kept], stored_images(),
        num_classes=cleaning.num_classes, image_size=stored_size)
    for name in sorted(os.listdir(folder)):
      if name.endswith(".bin"):
        shutil.copyfile(os.path.join(folder, name), os.path.join(output, name))
  return cleaning


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli_flags.refuse_unused(cli_flags.WORKDIR, cli_flags.OUT, cli_flags.STEP, cli_flags.BATCH_SIZE,
                          cli_flags.COMPUTE_DTYPE)
  cli_flags.quiet_library_logs()
  # Several tasks (srun / mpirun, --multihost, --coordinator_address): one job over all of them,
  # the dataset written by process 0 (else every task writes the same train.rec).
  distributed.initialize_from_flags(_DISTRIBUTED)
  for name, holder in (("workdir", cli_flags.WORKDIR), ("out", cli_flags.OUT)):
    if not holder.value:
      raise app.UsageError(f"--{name} is required.")
  try:
    cleaning = clean_run(cli_flags.WORKDIR.value, cli_flags.OUT.value, data=_DATA.value,
                         max_angle=_MAX_ANGLE.value, step=cli_flags.STEP.value,
                         batch_size=cli_flags.BATCH_SIZE.value,
                         compute_dtype=cli_flags.compute_dtype())
  except (FileNotFoundError, ValueError) as error:  # Not a run, not its data, ...
    raise app.UsageError(str(error)) from error
  if jax.process_index() == 0:
    kept = int(cleaning.keep.sum())
    print(f"Kept {kept} of {cleaning.keep.size} images ({kept / cleaning.keep.size:.1%}) and "
          f"{cleaning.num_classes} of {cleaning.dominant.size} classes within "
          f"{_MAX_ANGLE.value:g} degrees of their dominant sub-centre: {cli_flags.OUT.value}",
          flush=True)


if __name__ == "__main__":
  app.run(main)
