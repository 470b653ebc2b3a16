"""A run's files in its workdir: orbax checkpoints of the state, ``config.json``, ``data.json``.

A checkpoint restores on another number of devices (``W``'s rows padded or cut) and under a
config that adds or drops an optional field of the state (:data:`OPTIONAL_FIELDS`). A preempted
run saves one where it stops (:func:`preemption_notice`).
"""

import contextlib
import dataclasses
import json
import os
import signal
import threading
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store

from margins import run_log
from margins import sharding
from margins.train_state import TrainState


# orbax saves an array replicated over R devices (the backbone, under data parallelism) "replica
# parallel": each device writes 1/R of it, cut out by a slice program that JAX compiles for each
# shape and offset: 136 programs at IResNet-50's first save on 8 devices, a "compile storm"
# (orbax issue 2934). Here a replicated array is split only where each device's share has at
# least this many bytes; a smaller one is written whole from one device, as orbax did before
# replica-parallel saving. On 8 fake CPU devices splitting made every save slower
# (benchmarks/checkpoint_save.py); a device with its own link to the host may gain from
# splitting a large array.
MIN_REPLICA_SLICE_BYTES = 8 << 20


class UnreadableCheckpoint(ValueError):
  """A checkpoint's files are damaged or incomplete."""


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict, *,
                       remove_unfinished: bool = False,
                       create: bool = True) -> ocp.CheckpointManager:
  """The run's orbax checkpoints, in ``workdir/checkpoints``; :func:`save` writes one.

  ``remove_unfinished``: delete the folders of saves that a killed run left unfinished (orbax
  ignores them, but they would stay, each as large as a checkpoint). Only the training run
  itself may: another process (an evaluation beside a running training) would delete the save
  in progress. ``create``: make ``workdir/checkpoints`` if it is missing (``False`` to read).
  """
  arrays = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
      # As orbax's default handler has (not exported): it restores typed PRNG keys as keys.
      array_metadata_store=array_metadata_store.Store())
  types = ocp.type_handlers.create_type_handler_registry(
      *((type_, ocp.type_handlers.get_type_handler(type_))
        for type_ in ocp.type_handlers.supported_types()), (jax.Array, arrays))
  handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
  handlers.add("state", ocp.args.PyTreeSave,
               ocp.PyTreeCheckpointHandler(type_handler_registry=types))
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=create,
                                           cleanup_tmp_directories=remove_unfinished),
      handler_registry=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: TrainState) -> None:
  """Starts saving ``state`` as checkpoint ``step`` of ``manager`` (:func:`checkpoint_manager`)."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))


class Preempted(Exception):
  """The run stopped at ``step`` when told to (SIGTERM), after its checkpoint was committed."""

  def __init__(self, step: int):
    super().__init__(f"Preempted: stopped at step {step} and saved it; the same command "
                     "resumes from there.")
    self.step = step


@contextlib.contextmanager
def preemption_notice(manager: ocp.CheckpointManager) -> Iterator[Callable[[int], bool]]:
  """``reached(step)``: whether the job is being preempted, so that every process saves
  ``step`` and stops. Schedulers send SIGTERM and wait a while (SLURM, Kubernetes: 30 s by
  default) before killing the job. Where ``jax.distributed`` runs, JAX's preemption service
  catches it on any process and picks the same step for all (read through orbax); a process on
  its own catches it itself while the context is open (in the main thread; elsewhere, or where
  code outside Python holds SIGTERM, never preempted)."""
  if jax.distributed.is_initialized():  # Its service holds SIGTERM, from C++: left to it.
    yield manager.reached_preemption
    return
  # A handler installed outside Python reads as None: it could not be put back after ours.
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGTERM) is None):
    yield lambda step: False
    return
  received = threading.Event()
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.set())
  try:
    yield lambda step: received.is_set()
  finally:
    signal.signal(signal.SIGTERM, previous)


def _read_json(workdir: str, name: str):
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir!r} the workdir of a run?")
  with open(path) as f:
    return json.load(f)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in ``workdir`` was trained with (its ``config.json``)."""
  return ml_collections.ConfigDict(_read_json(workdir, "config.json"))


def load_data_info(workdir: str) -> tuple[int, tuple[int, int, int]]:
  """``(num_classes, image_shape)`` of the data a run in ``workdir`` trained on (its
  ``data.json``)."""
  data = _read_json(workdir, "data.json")
  return data["num_classes"], tuple(data["image_shape"])


def load_image_count(workdir: str) -> int | None:
  """The number of training images of the run in ``workdir``; ``None`` where its ``data.json``
  was written before 2026-12-07 without it."""
  return _read_json(workdir, "data.json").get("num_images")


def write_run_files(workdir, config, train_source) -> None:
  """``config.json`` and ``data.json`` (what :func:`margins.train_lib.restore` needs without the
  training data)."""
  run_log.write_atomically(os.path.join(workdir, "config.json"),
                           config.to_json_best_effort(indent=2))
  run_log.write_atomically(os.path.join(workdir, "data.json"), json.dumps(
      {"num_classes": train_source.num_classes, "image_shape": list(train_source.image_shape),
       "num_images": len(train_source)}))


def restore_model(manager: ocp.CheckpointManager, step: int, abstract: TrainState, *,
                  head: bool) -> TrainState:
  """Checkpoint ``step``'s model, with or without the head, restored into ``abstract`` (``W``'s
  rows fitted to this mesh as :func:`restore_checkpoint` does); the optimizer state, the centres
  and the loss scale stay on disk (``None``), as orbax's partial restore allows."""
  params = abstract.params if head else {"backbone": abstract.params["backbone"]}
  wanted = {"step": abstract.step, "params": params, "model_state": abstract.model_state,
            "margin": abstract.margin}
  rows_differ = _check_fits(manager, step, _stored_state(manager, step), wanted,
                            abstract.params["head"].shape, partial=True)
  return abstract.replace(**_restore(manager, step, wanted, rows_differ), opt_state=None,
                          centers=None, loss_scale=None, skipped_steps=None)


# State fields that a config adds or drops: float16's loss scale and count of skipped steps,
# center loss's centres.
OPTIONAL_FIELDS = ("loss_scale", "skipped_steps", "centers")


def restore_checkpoint(
    manager: ocp.CheckpointManager, step: int, abstract: TrainState, *,
    new_fields: Callable[[tuple[str, ...]], Mapping[str, Any]] | None = None) -> TrainState:
  """Checkpoint ``step``'s ``state``, restored into ``abstract`` (other items a checkpoint may
  hold, as the data iterator's position that runs saved before 2026-12-05, are not read).

  ``W`` has ``padded_num_classes`` rows for the devices of its run; on another number of devices its
  rows, their optimizer state and the centres' rows are padded with zeros or truncated to this
  mesh's count (the rows past ``num_classes`` never score; centres saved before 2026-12-07 have
  ``num_classes`` rows). Any other difference of shape is an error. A field of the state that the
  checkpoint does not have (it was saved before the field existed) must be ``None`` in ``abstract``,
  and stays ``None``: a float32 or bfloat16 run saved before ``loss_scale`` existed restores.

  ``new_fields``: ``names -> {name: field}``, the :data:`OPTIONAL_FIELDS` named as a new run of
  this config starts them (the training loop's new state holds them). An optional field that the
  checkpoint holds and this config does not, or the other way round (a run resumed in float16
  after float32, or with a center loss added or removed), is then taken from it: the loss scale
  starts at ``config.loss_scale.initial``, the count of skipped steps and the centres at zero, and
  a stored field the config no longer uses is dropped (a float16 run saved before the count
  existed, 2026-12-06, resumes with it at zero). It is called only for the fields that differ
  (none: not called), so that a new run's ``[C, D]`` centres are not built where the
  checkpoint's are read.
  """
  stored_tree = _stored_state(manager, step)
  differing = tuple(
      name for name in OPTIONAL_FIELDS
      if bool(jax.tree.leaves(stored_tree.get(name))) != (getattr(abstract, name) is not None))
  fresh = dict(new_fields(differing)) if new_fields is not None and differing else {}
  # The fields taken from ``fresh`` are not read (a stored one the config dropped stays on disk).
  fields = {field.name: getattr(abstract, field.name) for field in dataclasses.fields(abstract)
            if field.name not in fresh and (
                field.name in stored_tree or getattr(abstract, field.name) is not None)}
  read = {name: tree for name, tree in stored_tree.items() if name not in fresh}
  rows_differ = _check_fits(manager, step, read, fields, abstract.params["head"].shape)
  return abstract.replace(**_restore(manager, step, fields, rows_differ), **fresh)


def _restore(manager: ocp.CheckpointManager, step: int, fields: dict[str, Any],
             rows_differ: bool) -> dict[str, Any]:
  """The leaves of ``fields`` (a part of checkpoint ``step``'s ``state``), read from it."""
  # Fields without leaves (``None``, or the plain softmax's margin, which has no parameters) are
  # as given: orbax's partial restore fails on an empty node it stored as ``None``.
  leafless = {name: tree for name, tree in fields.items() if not jax.tree.leaves(tree)}
  fields = {name: tree for name, tree in fields.items() if name not in leafless}
  # By a handler of its own: ``manager`` saves ``state`` with the standard handler, and its
  # registry takes one handler per item, where a partial restore needs the PyTree handler.
  handler = ocp.PyTreeCheckpointHandler()
  restore_args = ocp.checkpoint_utils.construct_restore_args(fields, strict=not rows_differ)
  args = ocp.args.PyTreeRestore(fields, restore_args=restore_args, partial_restore=True)
  with _reading(manager, step):
    try:
      return {**handler.restore(manager.directory / str(step) / "state", args=args), **leafless}
    finally:
      handler.close()


def _stored_state(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The tree of checkpoint ``step``'s ``state``, its leaves orbax's metadata (shapes)."""
  # The item's handler reads it directly: a Checkpointer would also look for a step's
  # _CHECKPOINT_METADATA inside the item's folder and warn, on every restore, that it is missing.
  handler = ocp.StandardCheckpointHandler()
  with _reading(manager, step):
    try:
      return handler.metadata(manager.directory / str(step) / "state").tree
    finally:
      handler.close()


@contextlib.contextmanager
def _reading(manager: ocp.CheckpointManager, step: int) -> Iterator[None]:
  """Raises :class:`UnreadableCheckpoint`, naming the other checkpoints, for what orbax and
  TensorStore raise on files they cannot read (on damaged ones, a plain ``Exception`` and some
  70 lines); the device's or the host's memory running out is raised as it is."""
  try:
    yield
  except (MemoryError, jax.errors.JaxRuntimeError):  # Out of memory: the files may be fine.
    raise
  except Exception as error:  # pylint: disable=broad-except
    root = error
    while root.__cause__ is not None:  # TensorStore's own message, under orbax's.
      root = root.__cause__
    cause = (str(root).strip().splitlines() or [type(root).__name__])[0][:300]
    others = sorted(set(manager.all_steps()) - {step})
    raise UnreadableCheckpoint(
        f"Checkpoint {step} in {manager.directory} cannot be read ({cause}). Its other "
        f"checkpoints: {others}. If its files are damaged or incomplete, evaluate and export "
        f"restore another with --step, and training resumes from the latest once {step}/ is "
        "moved out of the folder.") from error


def _check_fits(manager: ocp.CheckpointManager, step: int, stored_tree: dict[str, Any],
                fields: dict[str, Any], head: tuple[int, ...], *, partial: bool = False) -> bool:
  """Whether the leaves of ``fields`` differ in shape from those of checkpoint ``step``'s
  ``stored_tree``: only in their rows, and only those with a row per class (``W``, its optimizer
  state and the centres: :func:`margins.sharding.is_class_rows`, with the head's shape ``head``),
  on another device count; any other difference is an error, a backbone's that happens to have
  ``W``'s shape too. ``partial``: the checkpoint may hold more leaves than ``fields``."""
  stored = _flat_shapes(stored_tree)
  serialized = ocp.tree.serialize_tree(fields, keep_empty_nodes=True)
  target = _flat_shapes(serialized)
  class_rows = {jax.tree_util.keystr(path)
                for path, leaf in jax.tree_util.tree_leaves_with_path(serialized)
                if sharding.is_class_rows(path, leaf, head)}
  differ = {path: (stored.get(path), shape) for path, shape in target.items()
            if stored.get(path) != shape}
  only_stored = set() if partial else set(stored) - set(target)
  if only_stored or any(old is None or path not in class_rows or old[1:] != new[1:]
                        for path, (old, new) in differ.items()):
    raise ValueError(f"Checkpoint {step} in {manager.directory} does not fit this config: "
                     f"(stored, wanted) shapes {differ}, leaves only stored "
                     f"{sorted(only_stored)}.")
  return bool(differ)


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  """Each leaf's shape by path; a typed PRNG key's (dropout's, drop path's) is that of its key
  data, ``[..., 2]``, as orbax stores it."""
  return {jax.tree_util.keystr(path): tuple(_stored_shape(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _stored_shape(leaf) -> tuple[int, ...]:
  if not jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
    return leaf.shape
  return jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)).shape
