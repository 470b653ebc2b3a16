"""A run's checkpoint saves: seconds, and the XLA programs the first one compiles.

For a recipe of ``configs/recipes`` (its state on the devices as a run creates it: the backbone
and its optimizer state replicated, the head split over the devices), saves the state with the
run's checkpoints (``margins.checkpoints``: an array replicated over the devices is split among
them only where each device's share is at least ``MIN_REPLICA_SLICE_BYTES``) and with orbax's
default handler (every replicated array split, each share cut out by a program compiled for its
shape and offset), each into a fresh folder. The first save of each is timed alone (a warm-up
save of a small array goes before both); later saves are timed in turn, round by round, their
ratio the median over the rounds.

  python benchmarks/checkpoint_save.py --recipe ms1mv3_r50 --cpu-devices 8
"""

import argparse
import contextlib
import itertools
import statistics
import tempfile
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from margins import checkpoints
from margins import sharding as sharding_lib
from margins import train_lib
import common
import train_step

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--recipe", default="ms1mv3_r50", help="a file of configs/recipes")
  parser.add_argument("--classes", type=int, default=10_000, help="rows of the head")
  parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the first save")
  parser.add_argument("--cpu-devices", type=int,
                      help="that many fake CPU devices (default: this machine's devices)")
  parser.add_argument("--quick", action="store_true", help="the recipe's quick variant")
  return parser.parse_args()


@contextlib.contextmanager
def compile_seconds():
  """A list that receives the seconds of each XLA program compiled within the block."""
  seconds = []

  def listener(event, duration, **kwargs):
    del kwargs
    if event == _COMPILE_EVENT:
      seconds.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seconds
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _saver(manager, save):
  """``run()``: ``save(step)`` for the next step of ``manager``, then waits until it is written."""
  steps = itertools.count(1)

  def run():
    save(next(steps))
    manager.wait_until_finished()

  return run


def _savers(config, state, folder):
  """``({name: save()}, managers)``: each saves ``state`` as the next step of its own manager."""
  run_manager = checkpoints.checkpoint_manager(f"{folder}/run", config)
  default_manager = ocp.CheckpointManager(f"{folder}/default/checkpoints", options=(
      ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints)))
  return {
      "margins": _saver(run_manager, lambda step: checkpoints.save(run_manager, step, state)),
      "orbax default": _saver(default_manager, lambda step: default_manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))),
  }, (run_manager, default_manager)


def main():
  args = _parse_args()
  if args.cpu_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  config = train_step.load_recipe(args.recipe, batch_size=jax.device_count(), quick=args.quick)
  mesh = sharding_lib.make_mesh(config)
  with jax.set_mesh(mesh):
    _, state = train_lib.create_train_state(config, mesh, args.classes,
                                            tuple(config.data.image_shape))
  leaves = jax.tree.leaves(state)
  replicated = [leaf for leaf in leaves if leaf.sharding.is_fully_replicated]
  split = sum(leaf.nbytes // jax.device_count() >= checkpoints.MIN_REPLICA_SLICE_BYTES
              for leaf in replicated)
  print(f"jax {jax.__version__}, orbax-checkpoint {ocp.__version__}, {jax.device_count()} "
        f"devices ({jax.devices()[0].device_kind}), recipe {args.recipe}: {config.model.name}, "
        f"{args.classes:,} classes, {config.optimizer.name}: {len(leaves)} arrays, "
        f"{sum(leaf.nbytes for leaf in leaves) / 2**20:,.0f} MB, of which {len(replicated)} "
        f"replicated ({sum(leaf.nbytes for leaf in replicated) / 2**20:,.0f} MB); split by "
        f"margins where a device's share is >= {checkpoints.MIN_REPLICA_SLICE_BYTES >> 20} MB: "
        f"{split}")
  with tempfile.TemporaryDirectory() as folder:
    warm_up = ocp.StandardCheckpointer()
    warm_up.save(f"{folder}/warm_up", {"x": np.zeros(8, np.float32)})
    warm_up.close()
    savers, managers = _savers(ml_collections.ConfigDict({"keep_checkpoints": 2}), state, folder)
    first = {}
    for name, save in savers.items():  # margins first: orbax's programs cannot help it
      with compile_seconds() as seconds:
        start = time.perf_counter()
        save()
        first[name] = (time.perf_counter() - start, len(seconds), sum(seconds))
    later = common.interleaved(savers, args.repeats)
    for manager in managers:
      manager.close()
  print("\n| saver | first save (s) | programs compiled | compiling (s) | later saves (s) "
        "| later / margins' |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  for name, (seconds, programs, compiling) in first.items():
    print(f"| {name} | {seconds:.2f} | {programs} | {compiling:.2f} "
          f"| {statistics.median(later[name]):.2f} "
          f"| {common.median_ratio(later[name], later['margins']):.2f}x |")


if __name__ == "__main__":
  main()
