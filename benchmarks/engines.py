"""Speed and memory of the softmax engines against the matmul floor.

For each number of classes ``C`` and dtype, prints the time of ``jit(value_and_grad)`` of the mean
loss of ``--margin`` (ArcFace by default; w.r.t. the embeddings and ``W``) for the dense, chunked
and sampled engines, divided by the time of the floor: the three bare matmuls of a forward and
backward pass (``x W^T``, ``g W``, ``g^T x``; inputs in the dtype, float32 accumulation). bfloat16
is measured as the training loop runs it: float32 ``x`` and ``W`` with ``matmul_dtype=bfloat16``
(each chunk cast as it is multiplied), against a floor given bfloat16 inputs. Every function is
timed in the same run, interleaved round by round with the floor alone; times are medians,
ratios the median over the rounds of the ratio within a round. Beside it: the XLA temporaries
of each compiled program, and the memory it needs in all (arguments, outputs and temporaries,
less what outputs alias), the peak a device must hold for the step.

The chunked engine is timed for each ``--chunk-sizes`` and both ways it can run its backward
pass: keeping each chunk's scores in ``W``'s gradient buffer (the default when ``B <= D``: three
matmuls) and recomputing them (``keep_scores=False``: four matmuls). Beside it, for each size, the
floor's three matmuls run chunk by chunk with nothing else (``common.chunked_floor``): what the
loop over chunks costs before any softmax. The sampled and sharded engines use the first chunk
size. ``sampled rows only`` is the sampled engine as a step that updates the sampled rows alone
runs it (``engine.sample``, ``take``, ``sample=``): the gradient of those rows, not of ``W``;
``sample and gather`` draws the sample and gathers its rows, nothing more. After the table, the
issue's Partial FC target from the same run: ``r`` times the chunked engine's cost plus that
gather, beside what the sampled rows cost.

With ``--profile`` each table is followed by where each program's time goes: the trace events
of a ``jax.profiler`` trace that name one of its HLO instructions (``args.hlo_op``; on CPU, one
per instruction run; on an accelerator, only the device's own events count, not the host's
launches: not yet checked on one), the ones taking the most time, each with the JAX operation
it came from, and the sums over matmul and other ops. ``--trace-dir`` also keeps each
program's trace (Perfetto JSON, gzipped) there, to read offline.

With ``--sharded N`` the script instead runs on ``N`` fake CPU devices and compares the
class-sharded engine (``W`` split over the devices) with the chunked engine on one device.

  python benchmarks/engines.py --classes 100000 1000000 --repeats 3
  python benchmarks/engines.py --classes 100000 --dtypes float32 --chunk-sizes 256 --profile
  python benchmarks/engines.py --sharded 8 --classes 100000 --dtypes float32
"""

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

import margins
import common

_GB = 1 << 30


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                      choices=["float32", "bfloat16"])
  parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 8192],
                      help="classes per chunk; on this CPU, chunks whose rows of W fit in the "
                      "cache are fastest")
  parser.add_argument("--sample-rate", type=float, default=0.1)
  parser.add_argument("--margin", choices=sorted(MARGINS), default="arcface",
                      help="the margin every engine runs (SphereFace2: softplus terms, no softmax)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--max-temp-gb", type=float, default=6.0,
                      help="compile but do not run a program whose XLA temporaries exceed this")
  parser.add_argument("--profile", action="store_true",
                      help="after each table, the XLA ops taking each program's time")
  parser.add_argument("--trace-dir", help="with --profile, keep each program's trace here")
  parser.add_argument("--sharded", type=int, default=0, metavar="N",
                      help="compare the sharded engine on N fake CPU devices with chunked")
  return parser.parse_args()


# ---------------------------------------------------------------------------------------------
# The floor and the engines.
# ---------------------------------------------------------------------------------------------


MARGINS = {"arcface": margins.ArcFace(), "sphereface2": margins.SphereFace2(bias=0.0)}


def engine_step(engine, x, w, labels, key, num_classes=None, margin=MARGINS["arcface"]):
  """``(mean loss, (dx, dW))`` of ``margin`` computed by ``engine``."""
  def mean_loss(x, w):
    return jnp.mean(engine(x, w, labels, margin, num_classes=num_classes, key=key)[0])
  return jax.value_and_grad(mean_loss, argnums=(0, 1))(x, w)


def sampled_rows(engine, w, labels, key, num_classes=None):
  """``(sample, rows [rC, D])``: Partial FC's sample of ``W``'s rows and the rows gathered."""
  sample = engine.sample(labels, num_rows=w.shape[0], num_classes=num_classes, key=key)
  return sample, engine.take(w, sample)


def sampled_rows_step(engine, x, w, labels, key, num_classes=None, margin=MARGINS["arcface"]):
  """``(mean loss, (dx, d rows))`` over Partial FC's rows alone, as a step updating only those
  rows computes it: the sample, its rows of ``W``, the loss over them and its gradient w.r.t.
  ``x`` and the rows (``[rC, D]``, not ``W``-sized)."""
  sample, rows = sampled_rows(engine, w, labels, key, num_classes)

  def mean_loss(x, rows):
    return jnp.mean(engine(x, rows, labels, margin, num_classes=num_classes, sample=sample)[0])
  return jax.value_and_grad(mean_loss, argnums=(0, 1))(x, rows)


# ---------------------------------------------------------------------------------------------
# Measurement.
# ---------------------------------------------------------------------------------------------


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def measure(programs, repeats):
  """``(median seconds, median per-round ratio to the first program)`` of ``name: (compiled,
  args)``, each timed interleaved round by round with the first alone (with every program in
  each round, the floor of ``losses.py`` ran slower than the losses themselves)."""
  timers = {name: functools.partial(lambda c, a: jax.block_until_ready(c(*a)), compiled, args)
            for name, (compiled, args) in programs.items()}
  first, *others = timers
  reference, results = [], {}
  for name in others:
    times = common.interleaved({first: timers[first], name: timers[name]}, repeats)
    reference += times[first]
    results[name] = (statistics.median(times[name]),
                     common.median_ratio(times[name], times[first]))
  if not others:
    reference = common.interleaved({first: timers[first]}, repeats)[first]
  return {first: (statistics.median(reference), 1.0), **results}


def _op_sources(compiled) -> dict[str, str]:
  """``{instruction: the JAX operation it came from}`` of ``compiled``'s HLO (``"-"`` if none
  is recorded, as for a buffer's fill), but for loops and calls, whose time is their ops'."""
  sources = {}
  for name, rest in re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", compiled.as_text(), re.M):
    if re.search(r"\s(while|conditional|call)\(", rest):
      continue
    op_name = re.search(r'metadata=\{op_name="([^"]*)"', rest)
    sources[name] = op_name.group(1).rsplit("/", 1)[-1] if op_name else "-"
  return sources


def device_events(events):
  """The complete (``"X"``) events of a trace's ``events``: those of its accelerators'
  processes (``/device:...``: their kernels) if it has any, whose launches on the host would
  count their time twice, else all of them (a CPU's)."""
  processes = {event["pid"]: event["args"]["name"] for event in events
               if event.get("ph") == "M" and event.get("name") == "process_name"}
  devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
  return [event for event in events
          if event.get("ph") == "X" and (not devices or event["pid"] in devices)]


def profile(compiled, args, runs=3, keep_trace=None):
  """``(seconds, {instruction: (seconds, calls)})`` per run of ``compiled``, from a
  ``jax.profiler`` trace of ``runs`` runs (copied to the path ``keep_trace`` if given)."""
  sources = _op_sources(compiled)
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(runs):
        jax.block_until_ready(compiled(*args))
      seconds = (time.perf_counter() - start) / runs
    (path,) = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
    if keep_trace:
      shutil.copyfile(path, keep_trace)
    with gzip.open(path) as file:
      events = json.load(file)["traceEvents"]
  totals, calls = collections.Counter(), collections.Counter()
  for event in device_events(events):
    instruction = event.get("args", {}).get("hlo_op", event["name"])
    if instruction in sources:
      totals[instruction] += event["dur"] * 1e-6 / runs  # microseconds
      calls[instruction] += 1
  return seconds, {name: (totals[name], calls[name] // runs) for name in totals}, sources


def _print_profile(name, compiled, args, keep_trace=None, top=8):
  seconds, ops, sources = profile(compiled, args, keep_trace=keep_trace)
  if not ops:
    print(f"\n{name}: no trace event is named after one of its HLO instructions")
    return
  matmuls = sum(t for op, (t, _) in ops.items() if sources[op] == "dot_general")
  others = sum(t for op, (t, _) in ops.items() if sources[op] != "dot_general")
  print(f"\n{name}: {seconds * 1e3:.0f} ms per run under the profiler; its XLA ops from "
        f"matmuls {matmuls * 1e3:.0f} ms, from the rest {others * 1e3:.0f} ms")
  for op, (t, count) in sorted(ops.items(), key=lambda item: -item[1][0])[:top]:
    print(f"  {t * 1e3:8.1f} ms {count:6d} calls  {op} ({sources[op]})")


def _inputs(num_classes, batch, dim, dtype, seed=0):
  kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, dim), dtype)
  w = jax.random.normal(kw, (num_classes, dim), dtype)
  labels = jax.random.randint(ky, (batch,), 0, num_classes)
  return x, w, labels


def _trace_path(directory, num_classes, dtype_name, name):
  """Where ``--trace-dir`` keeps a program's trace: ``C<C>_<dtype>_<program>.trace.json.gz``."""
  if not directory:
    return None
  os.makedirs(directory, exist_ok=True)
  program = re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")
  return os.path.join(directory, f"C{num_classes}_{dtype_name}_{program}.trace.json.gz")


def _print_table(title, rows):
  print(f"\n{title}\n")
  print("| engine | time (ms) | / floor | XLA temp (MB) | in all (MB) |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for name, seconds, ratio, temp, total in rows:
    time_text = "skipped" if seconds is None else f"{seconds * 1e3:.0f}"
    ratio_text = "-" if ratio is None else f"{ratio:.2f}x"
    print(f"| {name} | {time_text} | {ratio_text} | {temp / 2**20:.0f} | {total / 2**20:.0f} |")


def run_single(args):
  key = jax.random.key(0)
  temps_by_case = {}
  for num_classes in args.classes:
    for dtype_name in args.dtypes:
      # bfloat16 as the training loop runs it: float32 x and W, bfloat16 matmul inputs.
      matmul_dtype = None if dtype_name == "float32" else jnp.dtype(dtype_name)
      engines = {"dense": margins.dense(matmul_dtype=matmul_dtype)}
      for size in args.chunk_sizes:
        engines[f"chunked ({size})"] = margins.chunked(size, matmul_dtype=matmul_dtype)
        engines[f"chunked ({size}), keep_scores=False"] = margins.chunked(
            size, matmul_dtype=matmul_dtype, keep_scores=False)
      first = args.chunk_sizes[0]
      sampled = margins.chunked(first, sample_rate=args.sample_rate, matmul_dtype=matmul_dtype)
      engines[f"sampled (r={args.sample_rate}, chunked {first})"] = sampled
      x, w, labels = _inputs(num_classes, args.batch, args.dim, jnp.float32)
      floor_inputs = (x.astype(dtype_name), w.astype(dtype_name))
      candidates = {"floor (3 matmuls)": (common.floor, floor_inputs)}
      if matmul_dtype is not None:  # What the engines must at least do: read float32 W, cast it.
        candidates[f"floor, float32 W cast to {dtype_name}"] = (
            functools.partial(common.floor, matmul_dtype=matmul_dtype), (x, w))
      for size in args.chunk_sizes:
        candidates[f"floor in chunks of {size}"] = (
            functools.partial(common.chunked_floor, chunk_size=size), floor_inputs)
      for name, engine in engines.items():
        candidates[name] = (functools.partial(engine_step, engine, margin=MARGINS[args.margin]),
                            (x, w, labels, key))
      rows_only = f"sampled rows only (r={args.sample_rate}, chunked {first})"
      candidates[rows_only] = (
          functools.partial(sampled_rows_step, sampled, margin=MARGINS[args.margin]),
          (x, w, labels, key))
      gather = f"sample and gather (r={args.sample_rate})"
      candidates[gather] = (functools.partial(sampled_rows, sampled), (w, labels, key))
      programs, temps, totals, skipped = {}, {}, {}, []
      for name, (fn, fn_args) in candidates.items():
        compiled = _compile(fn, *fn_args)
        temps[name], totals[name] = common.memory_bytes(compiled)
        if temps[name] > args.max_temp_gb * _GB:
          skipped.append(name)
        else:
          programs[name] = (compiled, fn_args)
      measured = measure(programs, args.repeats)
      if "floor (3 matmuls)" in skipped:  # The first program run is not the floor: no ratios.
        measured = {name: (seconds, None) for name, (seconds, _) in measured.items()}
      rows = [(name, *measured.get(name, (None, None)), temps[name], totals[name])
              for name in candidates]
      _print_table(f"C={num_classes:,}, B={args.batch}, D={args.dim}, {dtype_name}, "
                   f"{args.repeats} interleaved rounds", rows)
      if skipped:
        print(f"\nskipped (XLA temporaries > {args.max_temp_gb} GB): {', '.join(skipped)}")
      _print_sampled_target(measured, args.sample_rate, f"chunked ({first})", gather, rows_only)
      if args.profile:
        print("\nWhere the time goes (per run; ops may run side by side, and a CPU's Eigen "
              "matmuls may return before they finish: the sums need not make up the run):")
        for name, (compiled, fn_args) in programs.items():
          _print_profile(name, compiled, fn_args,
                         _trace_path(args.trace_dir, num_classes, dtype_name, name))
      temps_by_case[(num_classes, dtype_name)] = temps
      del x, w, floor_inputs, candidates, programs, fn_args  # This case's W, before the next's.
  _print_temporaries(temps_by_case, args)


def _print_sampled_target(measured, rate, full, gather, rows_only):
  """Partial FC's target: ``rate`` times the cost of the ``full`` engine plus drawing the sample
  and gathering its rows (``gather``), beside what ``rows_only`` measured (ratios to the
  floor)."""
  ratios = {name: measured.get(name, (None, None))[1] for name in (full, gather, rows_only)}
  if None in ratios.values():
    return
  target = rate * ratios[full] + ratios[gather]
  print(f"\n{rows_only}: {ratios[rows_only]:.3f}x the floor; {rate} x {full} + {gather}: "
        f"{rate} x {ratios[full]:.2f}x + {ratios[gather]:.3f}x = {target:.3f}x")


def _print_temporaries(temps_by_case, args):
  print("\nXLA temporaries by C (MB):")
  for dtype_name in args.dtypes:
    keys = [(c, dtype_name) for c in args.classes if (c, dtype_name) in temps_by_case]
    for name in temps_by_case[keys[0]]:
      values = ", ".join(f"C={c:,}: {temps_by_case[(c, d)][name] / 2**20:.0f}" for c, d in keys)
      print(f"  {dtype_name} {name}: {values}")


# ---------------------------------------------------------------------------------------------
# Sharded.
# ---------------------------------------------------------------------------------------------


def _collectives(compiled):
  """``op array xN`` for each array the collectives of ``compiled`` move (per-device shapes)."""
  # Imported here: it needs the training packages (flax, optax, ml_collections), which an
  # accelerator's image may lack, and the engines' tables do not.
  from margins import sharding  # pylint: disable=g-import-not-at-top
  counts = collections.Counter((found.op, shape) for found in sharding.collectives(
      compiled.as_text()) for shape in found.shapes)
  return ", ".join(f"{op} {shape} x{count}" for (op, shape), count in sorted(counts.items()))


def run_sharded(args):
  num_devices = args.sharded
  mesh = jax.make_mesh((num_devices,), ("classes",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  spec = jax.NamedSharding(mesh, jax.P("classes"))
  device0 = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  key = jax.random.key(0)
  for num_classes in args.classes:
    rows_total = margins.padded_num_classes(num_classes, num_devices)
    for dtype_name in args.dtypes:
      matmul_dtype = None if dtype_name == "float32" else jnp.dtype(dtype_name)
      chunk_size = args.chunk_sizes[0]
      sharded_engine = margins.sharded(mesh, chunk_size=chunk_size, matmul_dtype=matmul_dtype)
      x, w, labels = _inputs(rows_total, args.batch, args.dim, jnp.float32)
      labels = labels % num_classes
      one = jax.device_put((x, w, labels), device0)
      split = jax.device_put((x, w, labels), spec)
      floor_inputs = jax.device_put((x.astype(dtype_name), w.astype(dtype_name)), device0)
      with jax.set_mesh(mesh):
        sharded_compiled = _compile(
            functools.partial(engine_step, sharded_engine, num_classes=num_classes,
                              margin=MARGINS[args.margin]), *split, key)
      candidates = {
          "floor (3 matmuls, 1 device)": (_compile(common.floor, *floor_inputs), floor_inputs),
          f"chunked ({chunk_size}, 1 device)": (
              _compile(functools.partial(engine_step, margins.chunked(
                  chunk_size, matmul_dtype=matmul_dtype), margin=MARGINS[args.margin]), *one,
                  key), (*one, key)),
          f"sharded ({num_devices} devices, chunk {chunk_size})": (
              sharded_compiled, (*split, key)),
      }
      measured = measure(candidates, args.repeats)
      rows = [(name, *measured[name], *common.memory_bytes(compiled))
              for name, (compiled, _) in candidates.items()]
      _print_table(f"C={num_classes:,} ({rows_total:,} rows), B={args.batch}, D={args.dim}, "
                   f"{dtype_name}, {args.repeats} interleaved rounds "
                   f"(the sharded program's memory is per device)", rows)
      w_bytes = rows_total // num_devices * args.dim * w.dtype.itemsize
      print(f"\nW per device: {rows_total // num_devices:,} rows, {w_bytes / 2**20:.0f} MB; "
            f"collectives in the compiled sharded program (arrays per device): "
            f"{_collectives(sharded_compiled)}")


def main():
  args = _parse_args()
  if args.sharded:  # Fake CPU devices, even where an accelerator is the default backend.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.sharded)
  print(f"jax {jax.__version__}, devices: {jax.devices()}, margin: {args.margin}")
  if args.sharded:
    run_sharded(args)
  else:
    run_single(args)


if __name__ == "__main__":
  main()
