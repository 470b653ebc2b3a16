"""Where a run's arrays live: the mesh of ``config.mesh``, the state's shardings, batches, and
what a compiled program moves between devices (:func:`collectives`).

The batch is split over all the mesh's devices (``Experiment.batch_sharding``); the state is
replicated, but with the ``sharded`` engine the head ``W [C', D]``, its per-row optimizer state
and center loss's centres ``[C', D]`` are split by rows. Each process holds its own rows of a
batch: :func:`global_batch` joins them into one array and :func:`to_host` gathers one back on
every process.
"""

import collections
import math
import re
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from margins import parallel
from margins.train_state import TrainState


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The mesh of ``config.mesh``: ``shape`` (-1: all the devices left) and ``axis_names``.

  One process may use fewer devices than it has (the first ones); several processes use all.
  Its axes are Explicit (``jax.make_mesh``'s default): inside ``jax.jit`` every array's type says
  how it is split, so the softmax engines see that the batch is split over the devices and
  run their data-parallel programs. Jitted functions of the state run inside
  ``jax.set_mesh(mesh)``.
  """
  shape = list(config.mesh.shape)
  axis_names = tuple(config.mesh.axis_names)
  if len(shape) != len(axis_names):
    raise ValueError(f"config.mesh.shape {tuple(shape)} and config.mesh.axis_names {axis_names} "
                     "differ in length.")
  if len(set(axis_names)) != len(axis_names):
    raise ValueError(f"config.mesh.axis_names {axis_names} repeat a name.")
  if shape.count(-1) > 1 or any(size < 1 and size != -1 for size in shape):
    raise ValueError(f"config.mesh.shape {tuple(shape)}: sizes must be positive, with at most "
                     "one -1 (all the devices left).")
  devices = jax.devices()
  per_process = sorted(collections.Counter(d.process_index for d in devices).items())
  if len({count for _, count in per_process}) > 1:
    # Each process loads an equal part of the batch, and orbax's checkpoints assume it too.
    raise ValueError(f"The processes have different numbers of devices ({{process: devices}} "
                     f"{dict(per_process)}); a multi-process run needs the same number on each.")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if len(devices) % known:
      raise ValueError(f"config.mesh.shape {tuple(shape)}: the {len(devices)} devices are not a "
                       f"multiple of {known}, so -1 cannot take all the devices left.")
    shape[shape.index(-1)] = len(devices) // known
  size = math.prod(shape)
  if size > len(devices) or (size < len(devices) and jax.process_count() > 1):
    raise ValueError(f"config.mesh.shape {tuple(config.mesh.shape)} needs {size} devices; there "
                     f"are {len(devices)} (a multi-process run must use them all).")
  return jax.make_mesh(tuple(shape), axis_names, devices=devices[:size],
                       axis_types=(jax.sharding.AxisType.Explicit,) * len(shape))


def _is_head(path) -> bool:
  return any(getattr(entry, "key", None) == "head" for entry in path)


def is_head_rows(path, leaf, head_shape) -> bool:
  """Whether a leaf of the state is ``W`` or per-row state of it (momentum, Adam's moments)."""
  return _is_head(path) and leaf.shape == head_shape


def is_class_rows(path, leaf, head_shape) -> bool:
  """Whether a leaf of the state has ``W``'s rows, one per class: :func:`is_head_rows`, or
  center loss's centres (``TrainState.centers``, or a checkpoint's ``centers``)."""
  is_centers = bool(path) and getattr(path[0], "name", getattr(path[0], "key", None)) == "centers"
  return is_centers or is_head_rows(path, leaf, head_shape)


def state_shardings(state_shapes: TrainState, mesh, engine: parallel.SoftmaxEngine):
  """Replicated everywhere, but split by rows for ``sharded``: ``W``, its optimizer state and
  center loss's centres."""
  replicated = jax.NamedSharding(mesh, jax.P())
  if engine.mesh is None:
    return jax.tree.map(lambda _: replicated, state_shapes)
  rows = jax.NamedSharding(mesh, jax.P(engine.axis_name))
  head_shape = state_shapes.params["head"].shape
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: rows if is_class_rows(path, leaf, head_shape) else replicated,
      state_shapes)


def _host_device() -> jax.Device:
  """This process's CPU; its first device if ``JAX_PLATFORMS`` leaves the CPU out."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    return jax.local_devices()[0]


def on_host(init_fn, shardings):
  """``init_fn()`` (replicated arrays, no inputs) computed by one program on :func:`_host_device`,
  then placed on the devices of ``shardings`` (a matching tree), each process filling its own.

  The backbone's program holds hundreds of random initialisers: for IResNet-100, XLA:CPU
  compiles it in 8 s, where XLA:GPU was still compiling it after 100 s on an H200 (flax issue
  1331 reports the same on TPU). A program of its own also lets runs of one backbone with other
  heads, losses or optimizers share it in JAX's persistent compilation cache.
  """
  host = _host_device()
  with jax.set_mesh(jax.make_mesh((1,), ("host",), devices=[host])):
    values = jax.device_get(jax.jit(init_fn)())
  return jax.tree.map(
      lambda value, sharding: jax.make_array_from_callback(
          value.shape, sharding, lambda index: value[index]), values, shardings)


def global_batch(batch_sharding: jax.sharding.Sharding, local_batch):
  """This process's ``local_batch`` (a tree of its rows), as one batch on ``batch_sharding``
  (``Experiment.batch_sharding``: split over the mesh's devices) with every process's rows.

  >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
  >>> batch = global_batch(jax.NamedSharding(mesh, jax.P("data")),
  ...                      {"label": np.arange(8, dtype=np.int32)})  # one process: all 8 rows
  >>> batch["label"].sharding.spec, to_host(batch["label"]).tolist()
  (P('data',), [0, 1, 2, 3, 4, 5, 6, 7])
  """
  return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(batch_sharding, a), local_batch)


def to_host(array) -> np.ndarray:
  """All of a (possibly multi-process) global ``array`` as a NumPy array, on every process."""
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


class Collective(NamedTuple):
  """One collective op of a compiled program (see :func:`collectives`)."""
  computation: str  # ``ENTRY`` for the program's top level, else e.g. a loop body's name
  op: str  # ``all-gather``, ``all-reduce``, ``reduce-scatter``, ``all-to-all``, ...
  shapes: list[str]  # each array it returns, e.g. ``f32[256,512]`` (several when combined)


_COLLECTIVE = re.compile(r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(")


def collectives(hlo_text: str) -> list[Collective]:
  """The collective ops of compiled HLO text (``jax.jit(f).lower(...).compile().as_text()``),
  in program order: what crosses devices, each array's per-device shape, and where.

  >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
  >>> total = jax.jit(lambda x: x.sum(), in_shardings=jax.NamedSharding(mesh, jax.P("data")))
  >>> collectives(total.lower(np.ones(8, np.float32)).compile().as_text())
  [Collective(computation='ENTRY', op='all-reduce', shapes=['f32[]'])]
  """
  found, computation = [], None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      computation = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
    match = _COLLECTIVE.search(line)
    if match:
      found.append(Collective(computation, match.group(2),
                              re.findall(r"\w+\[[\d,]*\]", match.group(1))))
  return found
