"""Training-step throughput of a recipe, and the share of it that its softmax head takes.

For a recipe of ``configs/recipes`` (backbone, loss, softmax engine, optimizer and compute dtype
as the recipe sets them) and each ``--classes``, times ``jit(train_step)`` with the state
donated, on random batches already on the devices: no input pipeline, so this is what the step
can take. Beside it, the head alone: the engine's loss and gradients for embeddings ``[B, D]``
against ``W [C, D]``, and the head's floor, the three bare matmuls of the rows each device
scores (``ceil(r C / n)`` of them with Partial FC's rate ``r`` on ``n`` devices), timed in turn
round by round; their ratio is the median over the rounds. Also printed: the memory the
compiled step needs per device (arguments, outputs and temporaries, less the donated state),
the head and its optimizer state within it (what the state holds per class; W's gradient, a
temporary of the step, grows with C too, except with ``--freeze-unsampled``), and the seconds
spent creating the state and compiling the step.

  python benchmarks/train_step.py --recipe ms1mv3_r50 --classes 93431 --batch 512
  python benchmarks/train_step.py --recipe webface42m_r100_pfc --classes 2059906 --batch 512

``--freeze-unsampled`` times the step that updates Partial FC's sampled rows alone;
``--freeze-unsampled both`` prints a table each way, one after the other, from one process.
``--quick`` takes the recipe's quick variant (32x32 images, IResNet-18 or the same small
backbone, float32, chunks of 256): a try on a CPU.
"""

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from margins import parallel
from margins import sharding as sharding_lib
from margins import train_lib
import common
import engines

_MB = 1 << 20


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--recipe", default="ms1mv3_r50", help="a file of configs/recipes")
  parser.add_argument("--classes", type=int, nargs="+", default=[93_431])
  parser.add_argument("--batch", type=int, default=512, help="the global batch")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
  parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
  parser.add_argument("--sample-rate", type=float, help="Partial FC's rate (default: the recipe's)")
  parser.add_argument("--chunk-size", type=int, help="classes per chunk (default: the recipe's)")
  parser.add_argument("--freeze-unsampled", nargs="?", const="yes", default="no",
                      choices=("no", "yes", "both"),
                      help="Partial FC updating the sampled rows alone (config.engine); "
                      "both: a table each way, in one run")
  parser.add_argument("--quick", action="store_true", help="the recipe's quick variant")
  return parser.parse_args()


def load_recipe(name: str, batch_size: int, sample_rate: float | None = None,
                chunk_size: int | None = None, quick: bool = False,
                freeze_unsampled: bool = False):
  """The config of ``configs/recipes/<name>.py`` (its data folder is not read here), or of its
  quick variant, with the engine's sample rate and chunk size replaced where given (and its
  ``freeze_unsampled`` set if asked)."""
  path = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "recipes", f"{name}.py")
  config = train_lib.config_from_file(path, "/unused,quick" if quick else "/unused")
  config.batch_size = batch_size
  if sample_rate is not None:
    config.engine.sample_rate = sample_rate
  if chunk_size is not None:
    config.engine.chunk_size = chunk_size
  if freeze_unsampled:
    config.engine.freeze_unsampled = True
  return config


def _random_batch(experiment, seed):
  rng = np.random.default_rng(seed)
  batch_size = experiment.config.batch_size
  batch = {"image": rng.integers(0, 256, (batch_size, *experiment.image_shape), dtype=np.uint8),
           "label": rng.integers(0, experiment.num_classes, batch_size, dtype=np.int32)}
  return jax.device_put(batch, experiment.batch_sharding)


def head_seconds(experiment, state, labels, repeats):
  """``(engine, floor, median ratio)``: seconds of the head's loss and gradients for ``labels``
  (of the sampled rows alone with ``freeze_unsampled``) and of its three matmuls, timed in turn
  round by round (``common.interleaved``)."""
  config, mesh = experiment.config, experiment.mesh
  w = state.params["head"]
  kx, kw, kf = jax.random.split(jax.random.key(2), 3)
  x = jax.device_put(jax.random.normal(kx, (config.batch_size, w.shape[-1])),
                     experiment.batch_sharding)
  margin = train_lib.make_margin(config.loss)
  # Each device scores the global batch against its rows (all of them, or the sampled ones).
  num_shards = experiment.engine.num_shards
  rows = parallel.sampled_count(w.shape[0] // num_shards, config.engine.sample_rate)
  step_fn = functools.partial(engines.engine_step, num_classes=experiment.num_classes)
  if config.engine.sample_rate < 1 and config.engine.freeze_unsampled:
    sample = jax.eval_shape(lambda: experiment.engine.sample(
        labels, num_rows=w.shape[0], num_classes=experiment.num_classes, key=kw))
    rows = sample.index.shape[0] // num_shards  # its rows as scored, padding included
    step_fn = functools.partial(engines.sampled_rows_step, num_classes=experiment.num_classes)
  # Float32 inputs cast to the compute dtype, as the head reads its float32 ``W``.
  floor_args = jax.device_put(
      [jax.random.normal(key, shape, w.dtype)
       for key, shape in zip(jax.random.split(kf), [x.shape, (rows, w.shape[-1])])],
      jax.devices()[0])
  floor = jax.jit(functools.partial(common.floor, matmul_dtype=jnp.dtype(config.compute_dtype)))
  engine = jax.jit(lambda x, w, labels: step_fn(experiment.engine, x, w, labels, kw,
                                                margin=margin))

  def run_engine():  # On the mesh; the floor, on one device, outside it.
    with jax.set_mesh(mesh):
      return jax.block_until_ready(engine(x, w, labels))

  times = common.interleaved(
      {"engine": run_engine, "floor": lambda: jax.block_until_ready(floor(*floor_args))}, repeats)
  return (statistics.median(times["engine"]), statistics.median(times["floor"]),
          common.median_ratio(times["engine"], times["floor"]))


def step_seconds(experiment, state, batches, steps, repeats):
  """``(median seconds per step, (first loss, last loss), compiled step, seconds to compile)``,
  timed over rounds of ``steps`` (``batches`` in turn: the loss falls as they are learnt by
  heart)."""
  with jax.set_mesh(experiment.mesh):
    step = jax.jit(lambda s, b: train_lib.train_step(experiment, s, b), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_seconds = time.perf_counter() - start
    state, metrics = compiled(state, batches[0])  # warm-up
    first_loss = float(metrics["loss"])
    rounds = []
    for _ in range(repeats):
      start = time.perf_counter()
      for i in range(steps):
        state, metrics = compiled(state, batches[i % len(batches)])
      jax.block_until_ready(metrics)
      rounds.append((time.perf_counter() - start) / steps)
  return statistics.median(rounds), (first_loss, float(metrics["loss"])), compiled, compile_seconds


def main():
  args = _parse_args()
  for freeze_unsampled in {"no": [False], "yes": [True], "both": [False, True]}[
      args.freeze_unsampled]:
    run(args, freeze_unsampled)


def run(args, freeze_unsampled):
  """The table of the recipe's step for each of ``args.classes``."""
  config = load_recipe(args.recipe, args.batch, args.sample_rate, args.chunk_size,
                       args.quick, freeze_unsampled)
  mesh = sharding_lib.make_mesh(config)
  image_shape = tuple(config.data.image_shape)
  print(f"jax {jax.__version__}, devices: {jax.devices()}, recipe {args.recipe}: "
        f"{config.model.name}, {config.loss.name}, engine {config.engine.kind} (chunk "
        f"{config.engine.chunk_size}, sample rate {config.engine.sample_rate}, freeze_unsampled "
        f"{config.engine.freeze_unsampled}), "
        f"{config.compute_dtype}, {config.optimizer.name}, global batch {args.batch}")
  print("\n| C | images/s | step (ms) | head (ms) | head floor (ms) | head / floor | head / step "
        "| step memory (MB) | head and its optimizer state (MB) | loss, first step and last |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  setup_lines = []
  for num_classes in args.classes:
    start = time.perf_counter()
    experiment, state = jax.block_until_ready(
        train_lib.create_train_state(config, mesh, num_classes, image_shape))
    create_seconds = time.perf_counter() - start
    batches = [_random_batch(experiment, seed) for seed in (10, 11)]
    head, floor, head_ratio = head_seconds(experiment, state, batches[0]["label"], args.repeats)
    head_shape = state.params["head"].shape
    head_bytes = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(state)
                     if leaf.shape == head_shape)
    step, (first_loss, loss), compiled, compile_seconds = step_seconds(
        experiment, state, batches, args.steps, args.repeats)
    _, memory = common.memory_bytes(compiled)
    print(f"| {num_classes:,} | {args.batch / step:,.0f} | {step * 1e3:.1f} | {head * 1e3:.1f} "
          f"| {floor * 1e3:.1f} | {head_ratio:.2f}x | {head / step:.0%} | {memory / _MB:,.0f} "
          f"| {head_bytes / _MB:,.0f} | {first_loss:.2f}, {loss:.2f} |", flush=True)
    setup_lines.append(f"C={num_classes:,}: state created in {create_seconds:.1f} s (its "
                       f"programs compiled and run), step compiled in {compile_seconds:.1f} s")
    del experiment, state, compiled
  print("\n" + "\n".join(setup_lines))


if __name__ == "__main__":
  main()
