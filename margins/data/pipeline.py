"""The grain input pipeline: from a data source to batches of images.

:func:`train_dataset` and :func:`eval_dataset` turn any source of ``margins.data`` (records
``{"image": uint8 [H, W, C], "label": int32 []}``) into a ``grain.IterDataset`` of batches
``{"image": uint8 [b, H, W, C], "label": int32 [b], ...}`` with the *per-process* batch size
``b``. The images stay ``uint8`` on their way to the accelerators (a quarter of float32's bytes
between processes and to the devices): :func:`normalize_images` maps them to the model's
``float32`` input in ``[-1, 1]`` on the device, inside the jitted step (``margins.train_lib``
and ``margins.eval_lib`` do). Both are built from grain's dataset API (``MapDataset`` up to the
batch, then ``to_iter_dataset`` and ``mp_prefetch``), so everything up to the batch is a pure
function of the example's position: shuffling and augmentation are deterministic given the
seed, the output does not depend on ``worker_count``, and the iterator's position is a small
state that grain saves and restores.

Resuming: the position in the stream is the number of batches drawn, so a run that has taken
``step`` batches resumes with ``train_dataset(..., start_batch=step)``, whatever ``worker_count``,
``read_threads`` or (for the same global batch) the number of processes (what
``margins.train_lib`` does). grain's own iterator state (``get_state``/``set_state``, saved
with orbax by ``grain.checkpoint.CheckpointSave``) also works, but only into a pipeline with the
same arguments: its format changes with ``worker_count`` and it is kept per process::

  iterator = iter(train_dataset(source, batch_size=128))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)))
  # ... later, into a fresh iterator of the same pipeline (same arguments, worker_count too):
  manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(iterator)))

Worker processes (``worker_count > 0``) are started with ``spawn``: the calling program needs an
``if __name__ == "__main__":`` guard, and, when it defines absl flags, must parse them before
iterating (run it through ``absl.app.run``), since grain reads its own flags in the workers
(unparsed flags, as in a notebook, are marked parsed at their defaults).
``worker_count=0`` reads in the calling process (the tests do that).

Multi-host: each process reads its own shard (``shard_index``/``shard_count``, by default
``jax.process_index()``/``jax.process_count()``). Training shards the shuffled, augmented stream
of examples batch by batch, so the ``shard_count`` per-process batches of a step, one after the
other, are one global batch of size ``shard_count * b`` of a single-process run, in its order
(which decides ``config.micro_batches``' micro-batches).
"""

import math
import time
from collections.abc import Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from margins._checks import check_int

_PREFETCH_BATCHES = 2


def normalize_images(images):
  """Maps ``uint8`` pixels to ``float32`` in ``[-1, 1]``: :math:`(x / 255 - 0.5) / 0.5`.

  A NumPy array is normalised on the host; a ``jax.Array`` (traced under ``jit`` too) on its
  devices, as the training and evaluation steps do with the pipelines' batches; both give the
  same bits.

  Args:
    images: ``uint8 [..., H, W, C]``, NumPy or JAX.

  Returns:
    ``float32`` of the same shape, of the same kind (NumPy or JAX).

  Raises:
    TypeError: ``images`` are not ``uint8``.

  >>> import numpy as np
  >>> from margins.data.pipeline import normalize_images
  >>> images = normalize_images(np.array([0, 51, 255], np.uint8))
  >>> images.dtype, [round(float(x), 6) for x in images]
  (dtype('float32'), [-1.0, -0.6, 1.0])

  References:
    insightface arcface_torch ``dataset.py`` (``Normalize(mean=0.5, std=0.5)`` after ``ToTensor``).
  """
  xp = jnp if isinstance(images, jax.Array) else np
  images = xp.asarray(images)
  if images.dtype != np.uint8:
    raise TypeError(f"`images` must be uint8, got dtype {images.dtype}.")
  # The subtraction is exact, so one rounding follows: the same on the host and on any device,
  # wherever a compiler would fuse ``x * a - 1`` into one FMA and where not (an element at the end
  # of a vectorised loop, say), which made two runs' embeddings differ in the last bits.
  return (images.astype(np.float32) - np.float32(127.5)) * np.float32(1.0 / 127.5)


class RandomFlipAndCrop(grain.transforms.RandomMap):
  """Grain random map: random horizontal flip and random crop of a zero-padded image.

  With ``crop_padding = p`` (``p < H, W``) the image is padded with ``p`` black pixels on each
  side and an ``H x W`` window is cut at a uniformly drawn offset in ``[0, 2p]^2`` (a shift of
  at most ``p`` pixels each way); then, with ``random_flip``, it is mirrored left-right with
  probability 1/2. Records stay ``uint8``. Inside the pipeline grain seeds the generator from
  the seed and the example's position in the repeated stream, i.e. from
  ``(seed, epoch, index)``.

  >>> import numpy as np
  >>> from margins.data.pipeline import RandomFlipAndCrop
  >>> image = np.arange(12, dtype=np.uint8).reshape(2, 6, 1)
  >>> flip = RandomFlipAndCrop(random_flip=True, crop_padding=0)
  >>> outputs = {flip.random_map({"image": image, "label": np.int32(0)},
  ...                            np.random.default_rng(seed))["image"][0, 0, 0]
  ...            for seed in range(20)}
  >>> sorted(int(pixel) for pixel in outputs)  # the first pixel, or the last of the row
  [0, 5]

  References:
    insightface arcface_torch ``dataset.py`` (``RandomHorizontalFlip``); the padded random crop
    of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), CIFAR recipe.
  """

  def __init__(self, *, random_flip: bool = True, crop_padding: int = 0):
    self.random_flip = bool(random_flip)
    self.crop_padding = check_int(crop_padding, "crop_padding", minimum=0)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = element["image"]
    flip_draw, *offset_draws = rng.random(3)  # one call: cheaper than three
    if self.crop_padding:
      # The window at offset (top, left) of the padded image is the image shifted by
      # (p - top, p - left), black where it moved out.
      p = self.crop_padding
      height, width = image.shape[:2]
      dy, dx = (int(draw * (2 * p + 1)) - p for draw in offset_draws)
      shifted = np.zeros_like(image)
      shifted[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)] = (
          image[max(0, dy):height - max(0, -dy), max(0, dx):width - max(0, -dx)])
      image = shifted
    if self.random_flip and flip_draw < 0.5:
      image = image[:, ::-1]
    return {**element, "image": np.ascontiguousarray(image)}


class _PaddedRecord(grain.transforms.Map):
  """Maps a position to its record with ``index`` and ``mask``; past the end, a black image."""

  def __init__(self, source):
    self.source = source

  def map(self, index: int) -> dict[str, Any]:
    if index < len(self.source):
      record = self.source[index]
      return {"image": record["image"], "label": record["label"], "index": np.int32(index),
              "mask": np.True_}
    return {"image": np.zeros(self.source.image_shape, np.uint8), "label": np.int32(0),
            "index": np.int32(index), "mask": np.False_}


def _check_source(source) -> int:
  if not all(hasattr(source, name) for name in ("__len__", "__getitem__", "image_shape")):
    raise TypeError(
        "`source` must be a random-access data source with `__len__`, `__getitem__` and "
        f"`image_shape`, got {type(source).__name__}.")
  if len(source) == 0:
    raise ValueError("`source` is empty.")
  return len(source)


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  """``(shard_index, shard_count)``: as given, or this JAX process and the process count."""
  if shard_index is None and shard_count is None:
    return jax.process_index(), jax.process_count()
  if shard_index is None or shard_count is None:
    raise ValueError("give both `shard_index` and `shard_count`, or neither.")
  shard_count = check_int(shard_count, "shard_count", minimum=1)
  shard_index = check_int(shard_index, "shard_index", minimum=0)
  if shard_index >= shard_count:
    raise ValueError(f"`shard_index` must be < `shard_count` = {shard_count}, got {shard_index}.")
  return shard_index, shard_count


def _iterate(ds: grain.MapDataset, *, worker_count: int, read_threads: int) -> grain.IterDataset:
  """Batches read by ``read_threads`` threads, in ``worker_count`` processes (0: this one)."""
  worker_count = check_int(worker_count, "worker_count", minimum=0)
  read_threads = check_int(read_threads, "read_threads", minimum=0)
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=_PREFETCH_BATCHES if read_threads else 0))
  if worker_count:
    if not flags.FLAGS.is_parsed():  # Called from Python (a notebook): grain's flags' defaults.
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=_PREFETCH_BATCHES))
  return iter_ds


def train_dataset(
    source, *, batch_size: int, seed: int = 0, num_epochs: int | None = None,
    shuffle: bool = True, drop_remainder: bool = True, random_flip: bool = False,
    crop_padding: int = 0, shard_index: int | None = None, shard_count: int | None = None,
    worker_count: int = 0, read_threads: int = 1, start_batch: int = 0,
) -> grain.IterDataset:
  """Training batches: shuffled by seed, repeated, augmented, sharded per process.

  The examples of ``source`` are shuffled (a new permutation each epoch), repeated
  ``num_epochs`` times (``None``: forever), augmented by :class:`RandomFlipAndCrop`, batched
  and split over ``shard_count`` processes (global batch ``k`` is the stream's next
  ``shard_count * batch_size`` positions, of which this one reads the ``batch_size`` from
  ``shard_index * batch_size``; with a finite ``num_epochs`` the stream is cut to a multiple of
  ``shard_count`` and a last, smaller global batch is split likewise, so every process gets as
  many batches). The images stay ``uint8``: normalise them with :func:`normalize_images` on the
  device. Batches run across epoch boundaries, as after ``repeat`` then ``batch`` in tf.data;
  ``drop_remainder`` concerns only the end of a finite stream. Everything is deterministic given
  ``seed``.

  Args:
    source: a random-access source of ``{"image": uint8 [H, W, C], "label": int32 []}``.
    batch_size: examples per batch *in this process*.
    seed: seeds the shuffle and the augmentation (from ``grain.MapDataset.seed``).
    num_epochs: passes over the data; ``None`` repeats forever.
    shuffle: whether to shuffle (``False``: the source's order, each epoch).
    drop_remainder: whether to drop a last, smaller batch of a finite stream.
    random_flip: random horizontal flips. Leave it off where mirroring changes the class, as for
      digits; insightface turns it on for faces.
    crop_padding: pad by this many black pixels and crop back at a random offset (0: no crop).
    shard_index: this process's shard; ``None`` (with ``shard_count``): ``jax.process_index()``.
    shard_count: number of shards; ``None`` (with ``shard_index``): ``jax.process_count()``.
    worker_count: worker processes producing batches (0: in the calling process).
    read_threads: threads producing batches ahead in each process (0: produced on demand).
    start_batch: batches of the stream to skip (nothing is read for them): resumes a run after
      ``start_batch`` steps with the batches it would have drawn next.

  Returns:
    A ``grain.IterDataset`` of ``{"image": uint8 [b, H, W, C], "label": int32 [b]}``; its
    iterator has grain's ``get_state``/``set_state``.

  Raises:
    ValueError: a bad argument, or too few examples for one batch per process.

  >>> import numpy as np
  >>> from margins.data import ArraySource, train_dataset
  >>> source = ArraySource(np.zeros((10, 4, 4, 1), np.uint8), np.arange(10) % 2)
  >>> batches = list(train_dataset(source, batch_size=4, num_epochs=2, seed=1))
  >>> len(batches), batches[0]["image"].shape, batches[0]["image"].dtype
  (5, (4, 4, 4, 1), dtype('uint8'))
  >>> iterator = iter(train_dataset(source, batch_size=4, seed=1))  # forever
  >>> _ = next(iterator)
  >>> iterator.get_state()
  {'next_index': 1}

  References:
    grain, https://google-grain.readthedocs.io (the dataset API); insightface arcface_torch
    ``dataset.py`` (flip augmentation).
  """
  length = _check_source(source)
  batch_size = check_int(batch_size, "batch_size", minimum=1)
  start_batch = check_int(start_batch, "start_batch", minimum=0)
  if num_epochs is not None:
    num_epochs = check_int(num_epochs, "num_epochs", minimum=1)
  if check_int(seed, "seed", minimum=0) >= 2**32:
    raise ValueError(f"`seed` must be < 2**32, got {seed}.")
  shard_index, shard_count = _shard(shard_index, shard_count)
  augment = RandomFlipAndCrop(random_flip=random_flip, crop_padding=crop_padding)
  if augment.crop_padding >= min(source.image_shape[:2]):
    raise ValueError(
        f"`crop_padding` must be smaller than the image, got {crop_padding} for images of shape "
        f"{source.image_shape}.")

  ds = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(num_epochs)
  if augment.random_flip or augment.crop_padding:
    ds = ds.random_map(augment)
  if num_epochs is None:  # Whole batches: grain's length of batches of one would overflow.
    ds = ds.batch(batch_size, drop_remainder=True)[shard_index::shard_count]
  else:
    per_shard = length * num_epochs // shard_count
    if drop_remainder and per_shard < batch_size:
      raise ValueError(
          f"{num_epochs} epoch(s) of {length} examples over {shard_count} process(es) give "
          f"{per_shard} per process, fewer than `batch_size` = {batch_size}.")
    full, rest = divmod(per_shard, batch_size)
    span = full * batch_size * shard_count
    parts = [ds[:span].batch(batch_size)[shard_index::shard_count]]
    if rest and not drop_remainder:  # The last global batch: ``rest`` examples per process.
      start = span + shard_index * rest
      parts.append(ds[start:start + rest].batch(rest))
    ds = grain.MapDataset.concatenate(parts) if len(parts) > 1 else parts[0]
  if start_batch > len(ds):
    raise ValueError(f"`start_batch` = {start_batch} is past the end of the stream "
                     f"({len(ds)} batches).")
  return _iterate(ds[start_batch:], worker_count=worker_count, read_threads=read_threads)


def eval_dataset(
    source, *, batch_size: int, shard_index: int | None = None, shard_count: int | None = None,
    worker_count: int = 0, read_threads: int = 1,
) -> grain.IterDataset:
  """Evaluation batches: every example once, in order, no augmentation, padded to full batches.

  The examples are padded with black images to a multiple of ``shard_count * batch_size`` and
  split position by position over the shards, so every process gets the same number of full
  batches (as multi-host evaluation under ``jit`` needs). ``mask`` tells real examples from
  padding, and ``index`` is each example's index in ``source``: over all shards, the examples
  with ``mask`` true are each of ``source`` exactly once. The images stay ``uint8``, as in
  :func:`train_dataset`; the flip test's mirror images are best made on the device too
  (``images[:, :, ::-1]``, as ``margins.eval_lib.compute_embeddings`` does).

  Args:
    source: a random-access source of ``{"image": uint8 [H, W, C], "label": int32 []}``.
    batch_size: examples per batch *in this process*.
    shard_index: this process's shard; ``None`` (with ``shard_count``): ``jax.process_index()``.
    shard_count: number of shards; ``None`` (with ``shard_index``): ``jax.process_count()``.
    worker_count: worker processes producing batches (0: in the calling process).
    read_threads: threads producing batches ahead in each process (0: produced on demand).

  Returns:
    A ``grain.IterDataset`` of ``{"image": uint8 [b, H, W, C], "label": int32 [b],
    "index": int32 [b], "mask": bool [b]}``, each pass the same.

  >>> import numpy as np
  >>> from margins.data import ArraySource, eval_dataset
  >>> source = ArraySource(np.zeros((5, 4, 4, 1), np.uint8), np.arange(5))
  >>> batches = list(eval_dataset(source, batch_size=4))
  >>> [batch["index"].tolist() for batch in batches], batches[1]["mask"].tolist()
  ([[0, 1, 2, 3], [4, 5, 6, 7]], [True, False, False, False])
  >>> sorted(batches[0])
  ['image', 'index', 'label', 'mask']

  References:
    grain, https://google-grain.readthedocs.io.
  """
  length = _check_source(source)
  batch_size = check_int(batch_size, "batch_size", minimum=1)
  shard_index, shard_count = _shard(shard_index, shard_count)
  padded_length = math.ceil(length / (batch_size * shard_count)) * batch_size * shard_count
  ds = grain.MapDataset.range(padded_length).map(_PaddedRecord(source))
  ds = ds[shard_index::shard_count].batch(batch_size)
  return _iterate(ds, worker_count=worker_count, read_threads=read_threads)


def measure_throughput(
    iterator: Iterator[dict[str, np.ndarray]], num_batches: int, *, warmup_batches: int = 1,
) -> float:
  """Images per second that ``iterator`` delivers, over ``num_batches`` batches.

  The first ``warmup_batches`` batches (worker start-up, first reads) are drawn untimed; then
  ``num_batches`` batches are drawn and their images counted (the leading dimension of
  ``batch["image"]``).

  Args:
    iterator: yields dicts with an ``"image"`` array ``[b, ...]``.
    num_batches: batches to time (>= 1).
    warmup_batches: batches drawn before the clock starts.

  Returns:
    Images per second.

  Raises:
    ValueError: ``num_batches`` < 1, or the iterator ends too early.

  >>> import numpy as np
  >>> from margins.data import ArraySource, measure_throughput, train_dataset
  >>> source = ArraySource(np.zeros((64, 8, 8, 1), np.uint8), np.zeros(64, np.int32))
  >>> iterator = iter(train_dataset(source, batch_size=16))
  >>> measure_throughput(iterator, 4) > 0
  True

  References:
    insightface arcface_torch's throughput logging (samples/s).
  """
  num_batches = check_int(num_batches, "num_batches", minimum=1)
  warmup_batches = check_int(warmup_batches, "warmup_batches", minimum=0)
  try:
    for _ in range(warmup_batches):
      next(iterator)
    num_images = 0
    start = time.perf_counter()
    for _ in range(num_batches):
      num_images += np.shape(next(iterator)["image"])[0]
    elapsed = time.perf_counter() - start
  except StopIteration:
    raise ValueError(
        f"`iterator` ended before {warmup_batches} + {num_batches} batches.") from None
  return num_images / elapsed
