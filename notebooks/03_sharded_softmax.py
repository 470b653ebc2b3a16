# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The class-sharded softmax
#
# With a million identities the classifier `W` (`[C, D]`) and the `[B, C]` logits no longer fit
# on one device. `margins` computes the same margin softmax loss with four engines:
#
# - `margins.dense()`: all `[B, C]` logits at once;
# - `margins.chunked(n)`: `n` classes at a time with an online log-sum-exp; each chunk's scores
#   wait for the backward pass in the chunk's rows of `W`'s gradient buffer (the scores of
#   examples past the first `D` are recomputed there);
# - `margins.sharded(mesh)`: `W` split over the devices on the class axis; each device scores
#   the whole (all-gathered) batch against its slice; only the batch and `[B]`-sized statistics
#   cross devices;
# - any of them with `sample_rate < 1`: Partial FC's sampled negatives.
#
# This notebook runs on 8 fake CPU devices: where `W` and the logits live, how much memory each
# engine needs as `C` grows, and the check that the engines agree. `MARGINS_QUICK=1` measures
# fewer class counts and checks one margin; figures go to `MARGINS_FIGURES_DIR` (default
# `docs/figures`).

# %%
import jax

jax.config.update("jax_num_cpu_devices", 8)  # Before JAX starts its backend.

import collections
import functools

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.sharding import NamedSharding

import margins
from common import QUICK, save_figure
from margins import sharding as margins_sharding
from margins.parallel import sampled_count

mesh = jax.make_mesh((8,), ("classes",))
by_class = NamedSharding(mesh, jax.P("classes"))
print(mesh)

# %% [markdown]
# ## Where `W` lives
#
# `W` gets `padded_num_classes` rows so that it splits evenly; the padding rows never score.
# Each device holds one contiguous block of classes. The batch is split over the same axis
# (data parallel) and all-gathered inside the engine.

# %%
num_classes, dim, batch = 1003, 64, 32
rows = margins.padded_num_classes(num_classes, mesh.size)
keys = jax.random.split(jax.random.key(0), 3)
x_host = jax.random.normal(keys[0], (batch, dim))
w_host = jax.random.normal(keys[1], (rows, dim))
labels_host = jax.random.randint(keys[2], (batch,), 0, num_classes)

x, w, labels = (jax.device_put(a, by_class) for a in (x_host, w_host, labels_host))
print(f"{num_classes} classes -> W {jax.typeof(w)}, {rows - num_classes} padding rows")
jax.debug.visualize_array_sharding(w)
for shard in w.addressable_shards:
  print(f"{shard.device}: classes {shard.index[0].start}..{shard.index[0].stop - 1}, "
        f"local block {shard.data.shape}")

# %% [markdown]
# ## Where the logits live
#
# Inside the engine each device forms the `[global batch, C / 8]` block of logits of its own
# classes and reduces it to a row max and a row sum. The compiled program of the loss and its
# gradient shows what crosses devices: the embeddings, their norms and the labels
# (all-gathered), `[B]`-sized statistics and cosines, and the embeddings' gradient
# (reduce-scattered: summed over the devices, each keeping its own examples' rows). Neither `W`,
# its gradient nor the logits are ever moved: the cell checks that every array a collective moves
# is `[B]`-sized or a block of `[B, D]` (the table counts arrays: one all-reduce can move
# several), and that no `[B, C]` array of all the classes' logits exists anywhere in the program.

# %%
@functools.partial(jax.jit, static_argnums=0)
def losses_and_grads(engine, margin, x, w, labels):
  """Per-example losses ``[B]`` and the gradients of their sum for ``x`` and ``w``."""
  def total(x, w):
    losses, _ = engine(x, w, labels, margin, num_classes=num_classes)
    return jnp.sum(losses), losses

  (_, losses), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(x, w)
  return losses, grads


engine = margins.sharded(mesh)
hlo = losses_and_grads.lower(engine, margins.ArcFace(), x, w, labels).compile().as_text()
# Each collective lists the arrays it moves (several when XLA combined them), per device.
collectives = collections.Counter(
    (shape, found.op) for found in margins_sharding.collectives(hlo) for shape in found.shapes)
print(f"{'collective':>14}  {'array':<12} count")
for (shape, op), count in sorted(collectives.items()):
  print(f"{op:>14}  {shape:<12} x{count}")
block, whole = f"f32[{batch},{rows // mesh.size}]", f"f32[{batch},{rows}]"
print(f"per-device logits block {block} in the program: {block in hlo}; "
      f"all the logits {whole}: {whole in hlo or f'f32[{rows},{batch}]' in hlo}")
batch_sized = {f"f32[{batch}]", f"s32[{batch}]", f"f32[{batch},1]", f"f32[{batch},{dim}]",
               f"f32[{batch // mesh.size},{dim}]"}
assert {shape for shape, _ in collectives} <= batch_sized, collectives
assert block in hlo and whole not in hlo and f"f32[{rows},{batch}]" not in hlo

losses, (_, grad_w) = losses_and_grads(engine, margins.ArcFace(), x, w, labels)
print(f"mean loss {float(jnp.mean(losses)):.4f}; dW is {jax.typeof(grad_w)}: it stays where W is")

# %% [markdown]
# ## Memory as the number of classes grows
#
# XLA's memory analysis of the compiled loss-and-gradient program (ArcFace, `B = 256`,
# `D = 512`, float32), per device. Nothing is run: compiling is enough to know the sizes.

# %%
MEMORY_ENGINES = {
    "dense": margins.dense(),
    "chunked (8192)": margins.chunked(8192),
    "sharded, 8 devices": margins.sharded(mesh),
    "sharded + chunked (8192)": margins.sharded(mesh, chunk_size=8192),
    "sampled (10%)": margins.dense(sample_rate=0.1),
}
ENGINE_COLORS = dict(zip(MEMORY_ENGINES, ["tab:red", "tab:blue", "tab:green", "tab:olive",
                                          "tab:purple"]))
CLASS_COUNTS = [1_000, 100_000] if QUICK else [1_000, 10_000, 100_000, 1_000_000]
MEMORY_BATCH, MEMORY_DIM = 256, 512


def memory_analysis(engine, num_classes):
  """XLA's per-device memory analysis of ArcFace's loss and gradient (compiled, not run)."""
  sharding = by_class if engine.mesh is not None else None
  x = jax.ShapeDtypeStruct((MEMORY_BATCH, MEMORY_DIM), jnp.float32, sharding=sharding)
  w = jax.ShapeDtypeStruct((num_classes, MEMORY_DIM), jnp.float32, sharding=sharding)
  labels = jax.ShapeDtypeStruct((MEMORY_BATCH,), jnp.int32, sharding=sharding)

  def loss(x, w, labels):
    losses, _ = engine(x, w, labels, margins.ArcFace(), key=jax.random.key(0))
    return jnp.mean(losses)

  return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w, labels).compile().memory_analysis()


memory = {name: [memory_analysis(engine, c) for c in CLASS_COUNTS]
          for name, engine in MEMORY_ENGINES.items()}

mib = 2.0**20
print(f"{'engine':<26}" + "".join(f"{c:>12,}" for c in CLASS_COUNTS) + "   (MiB of temporaries)")
for name, analyses in memory.items():
  print(f"{name:<26}" + "".join(f"{a.temp_size_in_bytes / mib:>12.1f}" for a in analyses))

# %%
figure, (temp_axes, io_axes) = plt.subplots(1, 2, figsize=(13, 5))
logits_bytes = [MEMORY_BATCH * c * 4 / mib for c in CLASS_COUNTS]
io_bytes = collections.defaultdict(list)  # Engines with equal sizes share a line.
for name, analyses in memory.items():
  temp_axes.plot(CLASS_COUNTS, [a.temp_size_in_bytes / mib for a in analyses], marker="o",
                 color=ENGINE_COLORS[name], label=name)
  io_bytes[tuple((a.argument_size_in_bytes + a.output_size_in_bytes) / mib
                 for a in analyses)].append(name)
for sizes, names in io_bytes.items():
  io_axes.plot(CLASS_COUNTS, sizes, marker="o", color=ENGINE_COLORS[names[0]],
               label=", ".join(names))
temp_axes.plot(CLASS_COUNTS, logits_bytes, color="black", linestyle=":",
               label=f"one [B, C] float32 matrix (B = {MEMORY_BATCH})")
temp_axes.set_title("Temporaries of loss + gradient, per device")
io_axes.set_title("Arguments + outputs (W, x, dW, dx), per device")
for axes in (temp_axes, io_axes):
  axes.set_xscale("log")
  axes.set_yscale("log")
  axes.set_xlabel("number of classes C")
  axes.set_ylabel("MiB")
  axes.grid(alpha=0.3, which="both")
  axes.legend(fontsize=8)
figure.suptitle(f"ArcFace loss and gradient, B = {MEMORY_BATCH}, D = {MEMORY_DIM}, float32 "
                "(XLA memory analysis)")
figure.tight_layout()
save_figure(figure, "engine_memory.png")

# %% [markdown]
# What grows with `C`:
#
# - **dense**: the `[B, C]` logits and their gradient, about two `[B, C]` matrices: 2 GB at a
#   million classes, on top of `W` and `dW`.
# - **chunked**: the temporaries stop growing once `C` passes the chunk size: a few `[B, chunk]`
#   blocks whatever `C`. `W` and `dW` (right) still grow, on one device.
# - **sharded**: each device holds `C / 8` classes: `W`, `dW` and the logits block are all 8x
#   smaller; with chunks inside each device, the temporaries stop growing too.
# - **sampled**: the logits of the sampled 10%, and the gathered rows of `W` with their gradient
#   (at `D = 512 > B = 256` these weigh more): about 3x less than dense, still growing with `C`;
#   `W` and `dW` are whole.
# - Below a few chunks, chunking buys nothing: with one or two chunks XLA's temporaries can even
#   exceed the dense engine's.

# %% [markdown]
# ## The engines agree
#
# The same loss and gradients from every engine, for several margins, on the `W` sharded above
# (with padding rows). The printed numbers are `max |a - b| / max |b|` against the dense engine.

# %%
CHECK_ENGINES = {
    "chunked (100)": margins.chunked(100),
    "sharded": margins.sharded(mesh),
    "sharded + chunked (50)": margins.sharded(mesh, chunk_size=50),
}
# CurricularFace uses every hook of a margin: batch statistics, target and hard negatives.
CHECK_MARGINS = {"CurricularFace": margins.CurricularFace()}
if not QUICK:
  CHECK_MARGINS.update(ArcFace=margins.ArcFace(), CosFace=margins.CosFace(),
                       SphereFace=margins.SphereFace())


def relative_difference(got, want):
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


print(f"{'margin':<16}{'engine':<24}{'loss':>10}{'dx':>10}{'dW':>10}")
worst = 0.0
for margin_name, margin in CHECK_MARGINS.items():
  want = losses_and_grads(margins.dense(), margin, x_host, w_host, labels_host)
  for engine_name, engine in CHECK_ENGINES.items():
    inputs = (x, w, labels) if engine.mesh is not None else (x_host, w_host, labels_host)
    got = losses_and_grads(engine, margin, *inputs)
    differences = [relative_difference(g, h)
                   for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
    worst = max(worst, *differences)
    print(f"{margin_name:<16}{engine_name:<24}" + "".join(f"{d:>10.1e}" for d in differences))
print(f"largest relative difference: {worst:.1e}")
assert worst < 1e-5, worst

# %% [markdown]
# Sampling changes the loss on purpose: it is the dense loss over the classes it keeps (every
# class of the batch plus random negatives), and classes left out get exactly zero gradient.

# %%
sample_rate, sample_key = 0.25, jax.random.key(1)
w_real = w_host[:num_classes]
sampled = margins.dense(sample_rate=sample_rate)


@jax.jit
@jax.value_and_grad
def sampled_loss(w):
  return jnp.sum(sampled(x_host, w, labels_host, margins.ArcFace(), key=sample_key)[0])


kept = margins.sample_classes(labels_host, num_classes, num_classes,
                              sampled_count(num_classes, sample_rate), sample_key)
kept_labels = jnp.searchsorted(kept, labels_host).astype(labels_host.dtype)


@jax.jit
@jax.value_and_grad
def dense_loss_over_sample(w_kept):
  return jnp.sum(margins.margin_softmax_loss(x_host, w_kept, kept_labels, margins.ArcFace()))


got_loss, got_grad = sampled_loss(w_real)
want_loss, want_grad = dense_loss_over_sample(w_real[kept])
left_out = np.setdiff1d(np.arange(num_classes), np.asarray(kept))
print(f"kept {kept.size} of {num_classes} classes")
print(f"loss: relative difference {relative_difference(got_loss, want_loss):.1e}")
print(f"dW of kept classes: relative difference "
      f"{relative_difference(got_grad[kept], want_grad):.1e}")
print(f"dW of the {left_out.size} classes left out is exactly zero: "
      f"{bool(jnp.all(got_grad[left_out] == 0))}")
assert set(np.asarray(labels_host).tolist()) <= set(np.asarray(kept).tolist())
assert relative_difference(got_loss, want_loss) < 1e-6
assert relative_difference(got_grad[kept], want_grad) < 1e-6
assert bool(jnp.all(got_grad[left_out] == 0))

# %% [markdown]
# ## Updating only the sampled rows
#
# The gradient above is `W`-sized though zero outside the sample, and an optimizer holding
# momentum for every row reads and writes all of `W` each step. To step only the sampled rows
# (Partial FC v1; the training loop's `config.engine.freeze_unsampled`), draw the sample first:
# `engine.sample` picks each device's rows (the batch's classes first), `take` gathers them on
# their own device, the engine scores them with `sample=`, and `put` writes the updated rows
# back. Their gradient is `[8 × S, D]`, split like `W`, and equals the sampled rows of the full
# gradient when the engine draws the same sample itself (same key and count).

# %%
partial_fc = margins.sharded(mesh, sample_rate=sample_rate)
step_key = jax.random.key(2)


@jax.jit
def sampled_rows_step(x, w, labels):
  """One SGD step (learning rate 0.1) on the sampled rows alone, and both gradients."""
  sample = partial_fc.sample(labels, num_rows=w.shape[0], num_classes=num_classes, key=step_key)

  def total(w_or_rows, **sampling):
    return jnp.sum(partial_fc(x, w_or_rows, labels, margins.ArcFace(), num_classes=num_classes,
                              **sampling)[0])

  rows = partial_fc.take(w, sample)
  grad_rows = jax.grad(functools.partial(total, sample=sample))(rows)
  full_grad = jax.grad(functools.partial(total, key=step_key))(w)
  return (grad_rows, partial_fc.put(jnp.zeros_like(w), sample, grad_rows), full_grad,
          partial_fc.put(w, sample, rows - 0.1 * grad_rows))


grad_rows, grad_rows_in_w, full_grad, stepped = sampled_rows_step(x, w, labels)
changed = np.flatnonzero(np.any(np.asarray(stepped != w), axis=1))
print(f"gradient of the sampled rows: {jax.typeof(grad_rows)}; W's: {jax.typeof(full_grad)}")
print(f"against W's gradient: relative difference "
      f"{relative_difference(grad_rows_in_w, full_grad):.1e}")
print(f"rows the step changed: {changed.size} of {rows}, every class of the batch among them: "
      f"{set(np.asarray(labels_host).tolist()) <= set(changed.tolist())}")
assert relative_difference(grad_rows_in_w, full_grad) < 1e-5
