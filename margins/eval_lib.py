"""Evaluation of a run's state: embeddings on the devices, then on the host closed-set accuracy,
verification (held-out identities, ``.bin`` sets, IJB-B/C), retrieval and plots."""

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from margins import data as data_lib
from margins import evaluation
from margins import parallel
from margins import sharding as sharding_lib
from margins.losses import _common
from margins.train_state import Experiment
from margins.train_state import TrainState

Array = jax.Array

# Images per evaluation batch over all devices when none is given, rounded up to their number.
DEFAULT_BATCH_SIZE = 256


class NonFiniteEmbeddings(ValueError):
  """Some embeddings of a set are NaN or infinite: :func:`compute_embeddings` raises it, and a
  training run's evaluation reports the set's ``count`` instead of its metrics."""

  def __init__(self, count: int, total: int):
    super().__init__(f"{count} of {total} embeddings are not finite (NaN or infinite): the "
                     "network's forward pass overflowed (float16?) or its parameters are not "
                     "finite.")
    self.count = count


def global_batch_size(batch_size: int | None, num_devices: int) -> int:
  """``batch_size``, checked to be a multiple of ``num_devices``; ``None``:
  ``DEFAULT_BATCH_SIZE`` rounded up to one."""
  if batch_size is None:
    return -(-DEFAULT_BATCH_SIZE // num_devices) * num_devices
  if batch_size < 1 or batch_size % num_devices:
    raise ValueError(f"batch_size {batch_size} must be a positive multiple of the {num_devices} "
                     "devices.")
  return batch_size


def embed(experiment: Experiment, state: TrainState, images: Array) -> Array:
  """``[B, D]`` float32 embeddings in evaluation mode (running batch statistics, no dropout),
  the network computing in ``experiment.eval_graphdef``'s arithmetic (``config.eval.compute_dtype``
  when the experiment was made).

  ``images``: ``uint8 [B, H, W, C]`` pixels as the pipelines yield them, normalised here by
  ``margins.data.normalize_images``, or floats already normalised to ``[-1, 1]`` (the exported
  model's input).
  """
  if images.dtype == jnp.uint8:
    images = data_lib.normalize_images(images)
  model = nnx.merge(experiment.eval_graphdef, state.params["backbone"], state.model_state)
  model.eval()
  return model(images).astype(jnp.float32)


def class_scores(experiment: Experiment, state: TrainState, embeddings: Array) -> Array:
  """``[B, C]`` scores of each class for closed-set prediction: the margin's similarity.

  Scored against every row of the head, split or not; the padding rows of a split head are
  cut from the gathered scores (a split axis cannot be cut unevenly).
  """
  scores = parallel.similarity(embeddings, state.params["head"], state.margin)
  return _common.gathered(scores)[:, :experiment.num_classes]


def compute_embeddings(experiment, state, source, *, flip: bool, embed_fn,
                       read_threads: int = 1, with_xnorm: bool = False):
  """``[N, D]`` embeddings of every example of ``source`` (flip test: summed with the mirror's),
  its batches read by ``read_threads`` threads.

  With ``with_xnorm``, ``(embeddings, xnorm)``: also insightface's ``XNorm``, the mean L2 norm of
  the embeddings of the ``N`` images (and of their ``N`` mirror images), each before any sum.
  A set smaller than ``config.eval.batch_size`` is embedded in one batch of its own size (rounded
  up to the devices), not padded to the full batch. ``embed_fn(state, images)`` receives the
  pipeline's ``uint8 [B, H, W, C]`` images (and, with ``flip``, their mirror images, also
  ``uint8``), split over the devices, as :func:`embed` takes them.
  """
  devices = experiment.mesh.size
  batch_size = min(experiment.config.eval.batch_size, max(-(-len(source) // devices), 1) * devices)
  per_process = batch_size // jax.process_count()
  dataset = data_lib.eval_dataset(source, batch_size=per_process, shard_index=jax.process_index(),
                                  shard_count=jax.process_count(), read_threads=read_threads)
  embeddings = np.zeros((len(source), experiment.config.model.embedding_dim), np.float32)
  norm_sum = 0.0
  everywhere = jax.NamedSharding(experiment.mesh, jax.P())  # every device holds all of it

  def collect(results):  # Waits for a batch's gathered results and files them.
    nonlocal norm_sum
    out, norms, index, mask = (np.asarray(a.addressable_data(0)) for a in results)
    embeddings[index[mask]] = out[mask]
    norm_sum += float(np.sum(norms[mask], dtype=np.float64))

  pending = None
  for batch in dataset:
    local = {k: batch[k] for k in ("image", "index", "mask")}
    sharded = sharding_lib.global_batch(experiment.batch_sharding, local)
    out = embed_fn(state, sharded["image"])
    norms = jnp.linalg.norm(out, axis=-1)
    if flip:  # The mirror images, made on the devices.
      flipped = embed_fn(state, jnp.flip(sharded["image"], axis=2))
      out, norms = out + flipped, norms + jnp.linalg.norm(flipped, axis=-1)
    # Gathered onto every device now, read one batch later: dispatch is asynchronous, so the
    # devices embed this batch while the host reads the previous one, each process its own copy
    # (fetched at once, the devices would wait for the copies and the next batch).
    gathered = jax.device_put((out, norms, sharded["index"], sharded["mask"]), everywhere)
    if pending is not None:
      collect(pending)
    pending = gathered
  if pending is not None:
    collect(pending)
  non_finite = int(np.count_nonzero(~np.isfinite(embeddings).all(axis=-1)))
  if non_finite:
    raise NonFiniteEmbeddings(non_finite, len(source))
  if not with_xnorm:
    return embeddings
  return embeddings, norm_sum / max(len(source) * (2 if flip else 1), 1)


def open_set_pairs(labels: np.ndarray, num_pairs: int) -> tuple[np.ndarray, np.ndarray]:
  """The held-out identities' verification pairs ``(pairs [P, 2], issame [P])`` of their
  ``labels [N]``, the same at every evaluation (:func:`margins.evaluation.make_pairs`, seed 0)."""
  return evaluation.make_pairs(labels, num_pairs, seed=0)


def evaluate(experiment, state, eval_sources, *, embed_fn, scores_fn) -> dict[str, Any]:
  """Closed-set accuracy, open-set verification and retrieval, ``.bin`` verification sets.

  ``eval_sources``: :func:`margins.train_lib.make_sources`' ``{"closed": ..., "open": ...}``
  (either may be absent) and ``"bins"``: ``{name: (source, issame)}`` of :func:`load_bin_set`,
  decoded once per run as insightface does.

  Returns flat metrics (``name/metric``: float) plus ``"_results"`` (the verification results and
  embeddings, for plots) and ``"_class_names"`` (the closed and open sets' names of their labels,
  where the sources have them). A set whose embeddings are not all finite (a float16 network that
  overflowed) has only ``name/non_finite_embeddings``, their count, and the run goes on (stopped,
  it would stop at the same evaluation again when resumed).
  """
  eval_config = experiment.config.eval

  def closed(source):
    embeddings = compute_embeddings(experiment, state, source, flip=False, embed_fn=embed_fn)
    predictions = np.argmax(np.asarray(scores_fn(state, jnp.asarray(embeddings))), axis=-1)
    return {"accuracy": float(np.mean(predictions == source.labels))}, (embeddings, source.labels)

  def held_out(source):
    embeddings, xnorm = compute_embeddings(experiment, state, source, flip=eval_config.flip,
                                           embed_fn=embed_fn, with_xnorm=True)
    labels = source.labels
    pairs, issame = open_set_pairs(labels, eval_config.num_pairs)
    result = dataclasses.replace(
        evaluation.evaluate_verification(embeddings[pairs.reshape(-1)], issame), xnorm=xnorm)
    return ({**_verification_metrics(result), **evaluation.retrieval_metrics(embeddings, labels)},
            (embeddings, labels, result))

  def bin_set(source, issame):
    result = verify_bin_set(experiment, state, source, issame, embed_fn=embed_fn)
    return _verification_metrics(result), (None, None, result)

  sets = {name: (evaluate_set, (eval_sources[name],))
          for name, evaluate_set in (("closed", closed), ("open", held_out))
          if name in eval_sources}
  sets.update({name: (bin_set, bin_source)
               for name, bin_source in eval_sources.get("bins", {}).items()})
  metrics, results = {}, {}
  metrics["_class_names"] = {name: getattr(eval_sources[name], "class_names", None)
                             for name in ("closed", "open") if name in eval_sources}
  for name, (evaluate_set, args) in sets.items():
    try:
      set_metrics, results[name] = evaluate_set(*args)
    except NonFiniteEmbeddings as error:
      set_metrics = {"non_finite_embeddings": error.count}
    metrics.update({f"{name}/{key}": value for key, value in set_metrics.items()})
  metrics["_results"] = results
  return metrics


def bin_set_name(path: str) -> str:
  """The name a ``.bin`` set is reported under: its file name without extension (``lfw``)."""
  return os.path.splitext(os.path.basename(path))[0]


def check_set_names(names: Sequence[str], *, given_as: str, reserved: Sequence[str] = ()) -> None:
  """Raises ``ValueError`` where two evaluation sets share a name (results are reported by name)
  or one takes a ``reserved`` one; ``given_as`` says where they were named."""
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    raise ValueError(f"Several {given_as} are named {repeated}: rename one, as results are "
                     "reported by name.")
  taken = sorted(set(names) & set(reserved))
  if taken:
    raise ValueError(f"{given_as} named {taken}: the held-out sets' results are reported under "
                     f"{list(reserved)}; rename the file.")


def load_bin_set(image_shape: tuple[int, int, int],
                 path: str) -> tuple[data_lib.ArraySource, np.ndarray]:
  """``(source, issame [P])`` of a ``.bin`` verification set: its ``2P`` images decoded to the
  model's input shape ``[H, W, C]`` (grey for one channel), held as ``uint8`` (a 12,000-image
  set at 112 x 112: 450 MB)."""
  height, width, channels = image_shape
  images, issame = data_lib.load_bin(path, image_size=(height, width), channels=channels)
  try:
    evaluation.check_pairs(issame)
  except ValueError as error:  # Known before its images are embedded, or a run trains.
    raise ValueError(f"{path}: {error}") from error
  return data_lib.ArraySource(images, np.zeros(len(images), np.int32), num_classes=1), issame


def evaluate_bin(experiment, state, path: str, *, embed_fn,
                 flip: bool = True) -> evaluation.VerificationResult:
  """insightface's protocol on the ``.bin`` verification set at ``path``, with the flip test
  unless ``flip`` is false."""
  return verify_bin_set(experiment, state, *load_bin_set(experiment.image_shape, path),
                        embed_fn=embed_fn, flip=flip)


def verify_bin_set(experiment, state, source, issame: np.ndarray, *, embed_fn,
                   flip: bool = True) -> evaluation.VerificationResult:
  """insightface's protocol on a :func:`load_bin_set`, with the flip test unless ``flip`` is
  false."""
  embeddings, xnorm = compute_embeddings(experiment, state, source, flip=flip, embed_fn=embed_fn,
                                         with_xnorm=True)
  return dataclasses.replace(evaluation.evaluate_verification(embeddings, issame), xnorm=xnorm)


def evaluate_ijb(experiment, state, folder: str, *, embed_fn, operating_point: str = "at_most",
                 flip: bool = True) -> evaluation.IJBResult:
  """insightface's IJB-B/C 1:1 template verification on an IJB folder, with the flip test unless
  ``flip`` is false (``operating_point``: :func:`margins.evaluation.evaluate_ijb`'s).

  Its crops (469,375 for IJB-C) are decoded and aligned by one thread per CPU: about 1 ms each
  for a 250 x 250 JPEG on this machine's CPU, 1.4x faster with its 2 threads than with one.
  """
  source = data_lib.IJBSource(folder, image_shape=experiment.image_shape)
  embeddings = compute_embeddings(experiment, state, source, flip=flip, embed_fn=embed_fn,
                                  read_threads=os.cpu_count() or 1)
  return evaluation.evaluate_ijb(embeddings, source.protocol, operating_point=operating_point)


def _verification_metrics(result) -> dict[str, float]:
  metrics = {"verification_accuracy": result.accuracy,
             "verification_accuracy_std": result.accuracy_std, "auc": result.auc,
             "eer": result.eer, "xnorm": result.xnorm}
  metrics.update({f"tar_at_far_{far:g}": tar for far, tar in result.tar_at_far.items()})
  return metrics


def write_plots(workdir: str, metrics: Mapping[str, Any]) -> list[str]:
  """ROC curves of every verification set; features on the circle/sphere for 2-D/3-D ones."""
  results = metrics["_results"]
  paths = []
  curves = {name: r[2] for name, r in results.items() if len(r) == 3}
  if curves:
    paths.append(evaluation.plot_roc(curves, os.path.join(workdir, "roc.png")))
  for name, result in results.items():
    embeddings, labels = result[0], result[1]
    if embeddings is not None and embeddings.shape[1] in (2, 3):
      paths.append(evaluation.plot_embeddings(
          embeddings, labels, os.path.join(workdir, f"features_{name}.png"),
          title=f"Features of the {name}-set identities",
          class_names=metrics.get("_class_names", {}).get(name)))  # Open-set 0 is digit 6.
  return paths
