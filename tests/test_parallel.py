"""Every margin on every engine equals the dense loss of the zoo; sampling; memory; collectives.

To keep compilation cheap, each engine configuration compiles one program that computes every
margin's loss and gradients at once.
"""

import contextlib
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

import margins
from margins import parallel
from margins import sharding
from tests import reference

B, D = 16, 16  # B <= D: the chunked engines keep their scores (keep_scores=False recomputes)
KEY = jax.random.key(7)

MARGINS = {
    "softmax": margins.Softmax(),
    "normface": margins.NormFace(scale=8.0),
    "lsoftmax": margins.LSoftmax(margin=3),
    "sphereface": margins.SphereFace(annealing=3.0),
    "sphereface_scaled": margins.SphereFace(margin=2, scale=8.0),
    "cosface": margins.CosFace(scale=8.0),
    "arcface": margins.ArcFace(scale=8.0),
    "arcface_easy": margins.ArcFace(scale=8.0, easy_margin=True),
    "arcface_detach": margins.ArcFace(scale=8.0, detach_margin=True),
    "combined": margins.CombinedMargin(scale=8.0),
    "curricularface": margins.CurricularFace(scale=8.0, t=0.3),
    "mv_softmax": margins.MVSoftmax(scale=8.0),
    "mv_softmax_arc": margins.MVSoftmax(scale=8.0, margin=0.5, kind="arc", easy_margin=False),
    "adaface": margins.AdaFace(scale=8.0),
    "magface": margins.MagFace(scale=8.0),
    "elasticface": margins.ElasticFace(key=KEY, scale=8.0, sigma=0.1),
    "elasticface_plus": margins.ElasticFace(key=KEY, scale=8.0, sigma=0.1, plus=True),
    "spherefacer": margins.SphereFaceR(scale=8.0, margin=1.7),
    "spherefacer_v2": margins.SphereFaceR(scale=8.0, margin=1.4, kind="v2"),
    "sphereface2": margins.SphereFace2(bias=1.0, scale=8.0),
    "sphereface2_arc": margins.SphereFace2(bias=-1.0, scale=8.0, margin=0.5, kind="arc"),
    "subcenter_arcface": margins.ArcFace(scale=8.0),  # run with weights [C, K, D]
}


def make_inputs(num_classes, padded_classes, seed=0):
  """The same examples and centres whatever the padding (padding rows are random too)."""
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(B, D)) * 3).astype(np.float32)
  w2 = rng.normal(size=(64, D)).astype(np.float32)[:padded_classes]
  w3 = rng.normal(size=(64, 3, D)).astype(np.float32)[:padded_classes]
  labels = rng.integers(0, num_classes, size=B).astype(np.int32)
  labels[:2] = [0, num_classes - 1]
  return x, w2, w3, labels


FEW_MARGINS = ("arcface", "curricularface", "lsoftmax", "subcenter_arcface")


def floating_fields(margin):
  """A margin's floating parameters and state by field name: what a gradient reaches."""
  values = {field.name: getattr(margin, field.name) for field in dataclasses.fields(margin)
            if not field.metadata.get("static") and getattr(margin, field.name) is not None}
  return {name: jnp.asarray(value, jnp.float32) for name, value in values.items()
          if jnp.issubdtype(jnp.result_type(value), jnp.inexact)}


def all_losses_and_grads(engine, num_classes, key=None, names=tuple(MARGINS)):
  """One program: the margins' losses, gradients (x, W, the margin's floating fields) and
  updated margins."""

  def run(x, w2, w3, labels):
    out = {}
    for name in names:
      margin = MARGINS[name]
      w = w3 if name == "subcenter_arcface" else w2

      def mean_loss(x_, w_, fields, margin=margin):
        losses, new_margin = engine(x_, w_, labels, dataclasses.replace(margin, **fields),
                                    num_classes=num_classes, key=key)
        return jnp.mean(losses), (losses, new_margin)

      (_, (losses, new_margin)), grads = jax.value_and_grad(
          mean_loss, argnums=(0, 1, 2), has_aux=True)(x, w, floating_fields(margin))
      out[name] = (losses, grads, new_margin)
    return out

  return jax.jit(run)


@pytest.fixture(scope="module")
def dense_results():
  """Dense single-device reference for both class counts used below."""
  results = {}
  for num_classes in (13, 16):
    x, w2, w3, labels = make_inputs(num_classes, num_classes)
    results[num_classes] = all_losses_and_grads(margins.dense(), num_classes)(x, w2, w3, labels)
  return results


def assert_matches_dense(got, want, num_classes, case=""):
  """``case``: a prefix for the messages (which engine, where one program runs several)."""
  for margin_name, (losses, (gx, gw, gfields), new_margin) in got.items():
    name = case + margin_name
    want_losses, (want_gx, want_gw, want_gfields), want_margin = want[margin_name]
    gw = np.asarray(gw)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(gx, want_gx, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(gw[:num_classes], want_gw, rtol=1e-5, atol=1e-6, err_msg=name)
    for field, want_g in want_gfields.items():  # e.g. a learnt scale (NormFace)
      np.testing.assert_allclose(gfields[field], want_g, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{name}.{field}")
    assert not np.any(gw[num_classes:]), f"{name}: padding rows got a gradient"
    for leaf, want_leaf in zip(jax.tree.leaves(new_margin), jax.tree.leaves(want_margin)):
      if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
        np.testing.assert_allclose(leaf, want_leaf, rtol=1e-5, err_msg=name)


def make_mesh(num_devices, axis_type=AxisType.Auto):
  return jax.make_mesh((num_devices,), ("devices",), axis_types=(axis_type,),
                       devices=jax.devices()[:num_devices])


@pytest.mark.parametrize("keep_scores", [True, False])
def test_every_margin_chunked_equals_dense(dense_results, keep_scores):
  x, w2, w3, labels = make_inputs(13, 13)
  engine = margins.chunked(5, keep_scores=keep_scores)  # 2 chunks + 3 left
  got = all_losses_and_grads(engine, 13)(x, w2, w3, labels)
  assert_matches_dense(got, dense_results[13], 13)
  assert set(got) == set(MARGINS)


@pytest.mark.parametrize("engine", [
    margins.dense(), margins.chunked(5), margins.chunked(5, keep_scores=False),
    margins.chunked(5, sample_rate=0.5), margins.sharded(make_mesh(2), chunk_size=5),
    margins.sharded(make_mesh(2, AxisType.Explicit), chunk_size=5)],
    ids=["dense", "kept", "recomputed", "sampled", "sharded", "sharded-explicit"])
def test_engines_under_vmap_equal_each_problem_alone(engine):
  # E.g. several heads trained at once: the custom_vjp, its chunk loops, the scores kept in the
  # gradient buffer and the shard_map batch over a leading axis; each problem draws its sample
  # from its own key.
  problems = [make_inputs(13, 14, seed) for seed in (0, 1)]
  keys = jax.random.split(KEY, 2)

  def value_and_grads(x, w2, w3, labels, key):
    return all_losses_and_grads(engine, 13, key, ("curricularface", "subcenter_arcface"))(
        x, w2, w3, labels)

  stacked = [np.stack(arrays) for arrays in zip(*problems)]
  with jax.set_mesh(engine.mesh) if engine.mesh else contextlib.nullcontext():
    got = jax.jit(jax.vmap(value_and_grads))(*stacked, keys)
    for i, (problem, key) in enumerate(zip(problems, keys)):
      want = jax.jit(value_and_grads)(*problem, key)
      for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got_leaf[i], want_leaf, rtol=1e-5, atol=1e-6)


def test_chunked_keeps_the_scores_that_fit_in_the_gradient_buffer():
  f32, bf16 = jnp.float32, jnp.bfloat16
  w = lambda *shape, dtype=f32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  assert parallel._kept_rows(16, w(10, 16), f32) == 16  # B <= D: all
  assert parallel._kept_rows(17, w(10, 16), f32) == 16
  assert parallel._kept_rows(16, w(10, 3, 16), f32) == 16  # K scores in K rows of D
  assert parallel._kept_rows(12, w(10, 16, dtype=bf16), f32) == 8  # a float32 score: two words
  assert parallel._kept_rows(4, w(10, 16, dtype=jnp.float64), f32) == 0  # half a word

  rng = np.random.default_rng(1)
  # All kept; 16 of 24 kept, 8 recomputed (also with 3 sub-centres); 16-bit words, all or 8 of 12.
  cases = []
  for batch, centre_shape, w_dtype in [(16, (16,), f32), (24, (16,), f32), (24, (3, 16), f32),
                                       (8, (16,), bf16), (12, (16,), bf16)]:
    cases.append((jnp.asarray(rng.normal(size=(batch, 16)), f32),
                  jnp.asarray(rng.normal(size=(11, *centre_shape)), w_dtype),
                  jnp.asarray(rng.integers(0, 11, batch), jnp.int32)))

  def loss_and_grads(engine, x, w, labels):
    loss = lambda x_, w_: jnp.mean(  # noqa: E731
        engine(x_, w_, labels, margins.ArcFace(scale=8.0))[0])
    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

  @jax.jit
  def kept_recomputed_and_dense(cases):  # One program for every case and engine.
    engines = margins.chunked(4, keep_scores=True), margins.chunked(4, keep_scores=False)
    return [[loss_and_grads(engine, *case) for engine in (*engines, margins.dense())]
            for case in cases]

  for (x, w, _), (kept, recomputed, dense) in zip(cases, kept_recomputed_and_dense(cases)):
    case = f"x {x.shape}, W {w.shape} {w.dtype}"
    for got, want in zip(jax.tree.leaves(kept), jax.tree.leaves(recomputed)):
      # The kept scores are the recomputed ones, bits.
      np.testing.assert_array_equal(got, want, err_msg=case)
    for got, want in zip(jax.tree.leaves(kept), jax.tree.leaves(dense)):
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                 rtol=1e-5, atol=1e-6, err_msg=case)


def test_kept_scores_spare_the_backward_pass_a_matmul():
  x, w, labels = jnp.ones((16, 16)), jnp.ones((12, 16)), jnp.zeros(16, jnp.int32)

  def matmuls(engine, *args):  # In the program's loop bodies (chunks of 4 or 2 classes).
    loss = lambda x_, w_, y_: jnp.mean(engine(x_, w_, y_, margins.ArcFace())[0])  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).as_text().count("dot_general")

  for keep, want in [(True, 3), (False, 4)]:  # the floor's three; one more to recompute
    assert matmuls(margins.chunked(4, keep_scores=keep), x, w, labels) == want
    assert matmuls(margins.sharded(make_mesh(2), chunk_size=2, keep_scores=keep),
                   x, w, labels) == want
    mesh = make_mesh(2, AxisType.Explicit)
    split, whole = NamedSharding(mesh, jax.P("devices")), NamedSharding(mesh, jax.P())
    with jax.set_mesh(mesh):
      args = jax.device_put((x, w, labels), (split, split, split))
      assert matmuls(margins.sharded(mesh, chunk_size=2, keep_scores=keep), *args) == want
      # Data parallel (the batch split, W whole on each device): each device keeps its own.
      args = jax.device_put((x, w, labels), (split, whole, split))
      assert matmuls(margins.chunked(4, keep_scores=keep), *args) == want


def test_gradient_buffer_needs_no_initial_values(monkeypatch, request, dense_results):
  # On GPU and TPU the buffer that holds the kept scores and becomes W's gradient starts
  # uninitialised; here it starts as NaN, and every element must be written before it is read.
  made = []

  def nan_scratch(w, real=parallel._scratch_like):
    made.append(w.shape)
    return real(w) + jnp.nan

  monkeypatch.setattr(parallel, "_scratch_like", nan_scratch)
  # ``jit`` keeps the engines' traces (``parallel._engine_loss``): those made before the patch
  # would not call it, and those made with it must not serve the tests after.
  jax.clear_caches()
  request.addfinalizer(jax.clear_caches)
  engines = {"kept": margins.chunked(5), "recomputed": margins.chunked(5, keep_scores=False),
             "sharded": margins.sharded(make_mesh(2), "devices", chunk_size=3)}
  inputs = {name: make_inputs(13, 16 if name == "sharded" else 13) for name in engines}
  every = jax.jit(lambda inputs: {  # One program for the three.
      name: all_losses_and_grads(engine, 13, names=FEW_MARGINS)(*inputs[name])
      for name, engine in engines.items()})(inputs)
  for name, got in every.items():
    assert_matches_dense(got, dense_results[13], 13, case=f"{name}: ")
  mesh = make_mesh(2, AxisType.Explicit)  # data parallel: a buffer on each device
  split, whole = NamedSharding(mesh, jax.P("devices")), NamedSharding(mesh, jax.P())
  with jax.set_mesh(mesh):
    inputs = jax.device_put(make_inputs(13, 13), (split, whole, whole, split))
    got = all_losses_and_grads(margins.chunked(5), 13, names=FEW_MARGINS)(*inputs)
  assert_matches_dense(got, dense_results[13], 13)
  assert len(made) == 4 * len(FEW_MARGINS), made


@pytest.mark.parametrize("keep_scores", [True, False])
def test_gradient_buffer_is_not_filled_on_accelerators(keep_scores):
  x, w, labels = jnp.ones((16, 16)), jnp.ones((12, 16)), jnp.zeros(16, jnp.int32)
  engine = margins.chunked(4, keep_scores=keep_scores)
  loss = lambda x_, w_: jnp.mean(engine(x_, w_, labels, margins.ArcFace())[0])  # noqa: E731
  traced = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, w)
  for platform, allocations in [("cuda", 1), ("rocm", 1), ("tpu", 1), ("cpu", 0)]:
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert text.count("AllocateBuffer") == allocations, platform


@pytest.mark.parametrize("num_devices,num_classes,chunk_size", [(8, 13, 1), (4, 16, None)])
def test_every_margin_sharded_equals_dense(dense_results, num_devices, num_classes, chunk_size):
  padded = margins.padded_num_classes(num_classes, num_devices)
  x, w2, w3, labels = make_inputs(num_classes, padded)
  engine = margins.sharded(make_mesh(num_devices), "devices", chunk_size=chunk_size)
  got = all_losses_and_grads(engine, num_classes)(x, w2, w3, labels)
  assert_matches_dense(got, dense_results[num_classes], num_classes)


# (devices, real classes, local chunk): every device count with C divisible and not, and with
# the local scoring both in one block and in chunks.
# The local chunks keep their scores in the gradient buffer, or recompute them (keep=False).
SHARDED_CASES = [(1, 13, 5, True), (2, 13, None, True), (2, 16, 3, False), (4, 13, 3, True),
                 (4, 16, None, True), (8, 13, None, True), (8, 16, 1, True), (8, 13, 1, False)]


@pytest.mark.parametrize("num_devices,num_classes,chunk_size,keep", SHARDED_CASES)
def test_sharded_on_1_2_4_8_devices(dense_results, num_devices, num_classes, chunk_size, keep):
  padded = margins.padded_num_classes(num_classes, num_devices)
  assert (padded != num_classes) == (num_classes % num_devices != 0)
  x, w2, w3, labels = make_inputs(num_classes, padded)
  engine = margins.sharded(make_mesh(num_devices), "devices", chunk_size=chunk_size,
                           keep_scores=keep)
  got = all_losses_and_grads(engine, num_classes, names=FEW_MARGINS)(x, w2, w3, labels)
  assert_matches_dense(got, dense_results[num_classes], num_classes)


@pytest.mark.parametrize("split_inputs", [True, False])
def test_sharded_explicit_axes(dense_results, split_inputs):
  mesh = make_mesh(8, AxisType.Explicit)
  x, w2, w3, labels = make_inputs(13, 16)
  spec = jax.P("devices") if split_inputs else jax.P()  # Replicated: the engine splits them.
  put = lambda a: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
  run = all_losses_and_grads(margins.sharded(mesh, chunk_size=1), 13, names=FEW_MARGINS)
  with jax.set_mesh(mesh):
    got = run(put(x), put(w2), put(w3), put(labels))
  assert_matches_dense(got, dense_results[13], 13)
  assert got["arcface"][1][1].sharding.is_equivalent_to(put(w2).sharding, 2)  # dW sharded like W


E, A = AxisType.Explicit, AxisType.Auto


@pytest.mark.parametrize("axis_types, engine_axes, batch_axis", [
    ((E, E), "a", "b"), ((E, E), ("a", "b"), "a"), ((E, A), "b", "a"), ((E, A), ("a", "b"), None),
    ((A, E), ("a", "b"), "a"), ((A, E), "a", "b")])
def test_sharded_on_two_axes_of_mixed_types(axis_types, engine_axes, batch_axis):
  # Classes over some axes of a 2 x 4 mesh, the batch arriving split over another (or none).
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=axis_types, devices=jax.devices()[:8])
  x, w, _, labels = make_inputs(13, 16)
  loss = lambda engine: jax.value_and_grad(  # noqa: E731
      lambda x_, w_, y_: jnp.mean(engine(x_, w_, y_, margins.ArcFace(), num_classes=13)[0]),
      argnums=(0, 1))
  want_loss, want_grads = jax.jit(loss(margins.dense()))(x, w, labels)
  batch = NamedSharding(mesh, jax.P(batch_axis))
  engine = margins.sharded(mesh, engine_axes, chunk_size=3)

  @jax.jit
  def losses_and_mean_loss(*args):  # One program: the losses, and the mean's value and grads.
    return (engine(*args, margins.ArcFace(), num_classes=13)[0],
            loss(engine)(*args))

  with jax.set_mesh(mesh):
    x_in, labels_in = jax.device_put((x, labels), batch)
    losses, (got_loss, got_grads) = losses_and_mean_loss(x_in, w, labels_in)
  if E in axis_types:  # The losses come back split as the labels came.
    assert losses.sharding.is_equivalent_to(labels_in.sharding, 1)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for got, want in zip(got_grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine", [margins.chunked(5), margins.chunked(16), margins.dense()],
                         ids=["chunks", "one_chunk", "dense"])
@pytest.mark.parametrize("split_labels", [True, False])
def test_batch_split_over_explicit_axes(dense_results, engine, split_labels):
  # Data parallel: each device scores its examples against the whole of W, which here is on no
  # mesh; replicated labels are split like the examples; ElasticFace+ sorts the whole batch's
  # cosines; SphereFace2 selects by label.
  mesh = make_mesh(4, AxisType.Explicit)
  x, w2, w3, labels = make_inputs(13, 13)
  split = lambda a: jax.device_put(a, NamedSharding(mesh, jax.P("devices")))  # noqa: E731
  run = all_losses_and_grads(engine, 13, names=(*FEW_MARGINS, "elasticface_plus", "sphereface2"))
  with jax.set_mesh(mesh):
    got = run(split(x), w2, w3, split(labels) if split_labels else labels)
  assert_matches_dense(got, {name: dense_results[13][name] for name in got}, 13)


@pytest.mark.parametrize("engine", [margins.chunked(5), margins.dense()], ids=["chunks", "dense"])
def test_gradient_of_per_example_fields_with_the_batch_split_over_explicit_axes(engine):
  # [B] fields that the non-target logits read, differentiated too: on the dense path (and a
  # chunk holding every class) SphereFace2's per-example bias stayed whole beside the split
  # logits, and JAX's transpose failed (an AssertionError) where one device's gradient is fine.
  mesh = make_mesh(4, AxisType.Explicit)
  x, w, _, labels = make_inputs(13, 13)
  fields = {"bias": jnp.linspace(-1.0, 1.0, B), "margin": jnp.linspace(0.1, 0.4, B)}
  weights = jnp.arange(1.0, B + 1.0)  # Each example's loss counts differently.

  def loss(x, w, labels, fields):
    losses, _ = engine(x, w, labels, margins.SphereFace2(scale=8.0, **fields))
    return jnp.sum(weights * losses)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3)))
  want = grad(x, w, labels, fields)
  split = lambda a: jax.device_put(a, NamedSharding(mesh, jax.P("devices")))  # noqa: E731
  with jax.set_mesh(mesh):
    got = grad(split(x), w, split(labels), fields)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


@pytest.mark.parametrize("engine", [
    margins.dense(), margins.chunked(5), margins.chunked(5, keep_scores=False),
    margins.chunked(5, sample_rate=0.5)], ids=["dense", "chunks", "recompute", "sampled"])
def test_engine_inside_a_callers_shard_map_over_the_batch(engine):
  # The caller splits the batch with its own shard_map, W and the margin whole on each device:
  # the custom_vjps' cotangents of W and of the scale must come back summed over the devices.
  mesh = make_mesh(4)
  x, w, _, labels = make_inputs(13, 13)

  def loss(x, w, labels, scale):
    return engine(x, w, labels, margins.ArcFace(scale=scale), key=KEY)[0].sum()

  def split_loss(x, w, labels, scale):
    local = lambda *args: jax.lax.psum(loss(*args), "devices")  # noqa: E731
    spec = jax.P("devices")
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, jax.P(), spec, jax.P()),
                         out_specs=jax.P())(x, w, labels, scale)

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 3)))  # noqa: E731
  if engine.sample_rate < 1:  # Each device draws its own sample: compare W's gradient's rows.
    _, (_, dw, _) = grad(split_loss)(x, w, labels, jnp.float32(8.0))
    assert np.isfinite(np.asarray(dw)).all() and np.abs(np.asarray(dw)).sum() > 0
    return
  got = grad(split_loss)(x, w, labels, jnp.float32(8.0))
  want = grad(loss)(x, w, labels, jnp.float32(8.0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


@pytest.mark.parametrize("engine", [margins.dense(), margins.chunked(5)], ids=["dense", "chunks"])
@pytest.mark.parametrize("name", ["curricularface", "adaface", "elasticface", "elasticface_plus"])
def test_batch_statistics_inside_a_callers_shard_map_are_the_whole_batchs(engine, name):
  # CurricularFace's t, AdaFace's norm statistics, ElasticFace's margins (drawn for the batch;
  # ElasticFace+ ranks the batch's cosines): each device holds a quarter of the batch, and the
  # statistics (so the losses, gradients and the margin's new state) are the whole batch's, the
  # same on every device, as on one device. They were each device's own batch's (every device
  # drew the same margins for its quarter), and a new state could not be returned replicated.
  mesh = make_mesh(4)
  x, w, _, labels = make_inputs(13, 13)
  labels[3] = -1  # Left out of the statistics, on one device only.
  margin = MARGINS[name]

  def loss(x, w, labels):
    losses, new_margin = engine(x, w, labels, margin)
    return jnp.nansum(losses), new_margin

  def split_loss(x, w, labels):
    def local(*args):
      total, new_margin = loss(*args)
      return jax.lax.psum(total, "devices"), new_margin
    spec = jax.P("devices")
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, jax.P(), spec),
                         out_specs=(jax.P(), jax.P()))(x, w, labels)

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))  # noqa: E731
  got, want = grad(split_loss)(x, w, labels), grad(loss)(x, w, labels)
  data = lambda a: jax.random.key_data(a) if jax.dtypes.issubdtype(  # noqa: E731
      a.dtype, jax.dtypes.prng_key) else a
  jax.tree.map(lambda a, b: np.testing.assert_allclose(data(a), data(b), rtol=1e-5, atol=1e-5),
               got, want)
  if name in ("curricularface", "adaface"):  # The state moved.
    assert jax.tree.leaves(want[0][1]) != jax.tree.leaves(margin)


@pytest.mark.parametrize("name", ["adaface", "elasticface", "elasticface_plus"])
def test_batch_statistics_inside_a_shard_map_over_two_axes_are_the_whole_batchs(name):
  # The batch split over two manual axes at once, named in the mesh's order, which is not
  # alphabetical: the gather of the whole batch and the slice of this device's rows back must
  # take the axes in that order (the spec's), or each device keeps another device's margins
  # (as with an order taken from the set of axes a value varies over, or sorted); one axis
  # cannot show it.
  names = ("replica", "data")
  mesh = jax.make_mesh((2, 2), names, axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:4])
  x, w, _, labels = make_inputs(13, 13)
  margin = MARGINS[name]
  loss = lambda x, w, labels: margins.dense()(x, w, labels, margin)  # noqa: E731
  spec = jax.P(names)
  split_loss = jax.shard_map(loss, mesh=mesh, in_specs=(spec, jax.P(), spec),
                             out_specs=(spec, jax.P()))
  (got, got_margin), (want, want_margin) = jax.jit(split_loss)(x, w, labels), loss(x, w, labels)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if name == "adaface":  # Its batch statistics: psum'd over both axes.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), got_margin,
                 want_margin)


@pytest.mark.parametrize("engine", [margins.chunked(5), margins.dense()], ids=["chunks", "dense"])
@pytest.mark.parametrize("batch_split", [True, False])
def test_embedding_dimension_split_over_explicit_axes(dense_results, engine, batch_split):
  # W (and x) split on D, as FSDP splits parameters: the engines gather D and give W's gradient
  # back split as W came (they failed on a contraction over a split axis, or on the chunk loops).
  mesh = make_mesh(4, AxisType.Explicit)
  x, w2, w3, labels = make_inputs(13, 13)
  features = NamedSharding(mesh, jax.P(None, "devices"))
  put_x = NamedSharding(mesh, jax.P("devices")) if batch_split else features
  run = all_losses_and_grads(engine, 13, names=FEW_MARGINS)
  with jax.set_mesh(mesh):
    got = run(jax.device_put(x, put_x), jax.device_put(w2, features),
              jax.device_put(w3, NamedSharding(mesh, jax.P(None, None, "devices"))), labels)
  assert_matches_dense(got, {name: dense_results[13][name] for name in got}, 13)
  assert got["arcface"][1][1].sharding.is_equivalent_to(features, 2)  # dW split like W


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_program_never_gathers_weights(axis_type):
  mesh = make_mesh(8, axis_type)
  num_classes, rows = 50, 64  # W [64, 16] is sharded 8 x [8, 16]; the batch is [16, 16]
  engine = margins.sharded(mesh, chunk_size=3)
  # Under Explicit axes the inputs' types carry the split (Auto: left to the compiler).
  split = NamedSharding(mesh, jax.P("devices")) if axis_type == AxisType.Explicit else None
  x = jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=split)
  w = jax.ShapeDtypeStruct((rows, D), jnp.float32, sharding=split)
  labels = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=split)
  loss = lambda x_, w_, y_: jnp.mean(engine(x_, w_, y_, margins.ArcFace(),
                                              num_classes=num_classes)[0])
  with jax.set_mesh(mesh):
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w, labels).compile().as_text()
  found = [(op, shape) for _, op, shapes in sharding.collectives(text) for shape in shapes]
  gathers = [shape for op, shape in found if op == "all-gather"]
  assert gathers, "the embeddings and labels should be all-gathered"
  assert set(gathers) <= {f"f32[{B},{D}]", f"f32[{B},1]", f"s32[{B}]"}, gathers  # x, |x|, y
  collectives = [shape for op, shape in found if op != "all-gather"]
  assert all(not shape.startswith(f"f32[{rows}") and f"[{rows // 8},{D}]" not in shape
             for shape in collectives), collectives
  # The embeddings' gradient: one reduce-scatter of the batch's [B, D], no all-reduce of it.
  assert [op for op, shape in found if shape.endswith(f",{D}]")].count("reduce-scatter") == 1
  assert (f"f32[{B // 8},{D}]", "reduce-scatter") in [(s, op) for op, s in found], found
  assert not [shape for op, shape in found if op == "all-reduce" and shape.endswith(f",{D}]")]


def test_collectives_names_a_loop_bodys_ops_and_their_computation():
  # A loop whose body sums over the devices and passes each device's rows to the next: both
  # ops are found, each a [2, 4] block per device (16 rows over 8), in the computation that the
  # while instruction names as its body, not in ENTRY.
  mesh = make_mesh(8, AxisType.Explicit)
  ring = [(i, (i + 1) % 8) for i in range(8)]

  def step(_, c):
    return jax.lax.psum(c, "devices") + jax.lax.ppermute(c, "devices", ring)

  loop = jax.shard_map(lambda c: jax.lax.fori_loop(0, 3, step, c), mesh=mesh,
                       in_specs=jax.P("devices"), out_specs=jax.P("devices"))
  x = jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=NamedSharding(mesh, jax.P("devices")))
  text = jax.jit(loop).lower(x).compile().as_text()
  body = re.search(r"\bbody=(%[\w.\-]+)", text).group(1)
  assert sorted(sharding.collectives(text)) == [
      (body, "all-reduce", ["f32[2,4]"]), (body, "collective-permute", ["f32[2,4]"])]


def test_collectives_counts_an_async_collective_once_by_its_start():
  # XLA:GPU splits a collective into -start and -done (hand-written here in its text format, as
  # a CPU program has none): one all-reduce of f32[8], counted at its start, not again at its end.
  text = """HloModule jit_f, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

ENTRY %main.2 (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %all-reduce-start = f32[8]{0} all-reduce-start(%x), replica_groups={{0,1}}, to_apply=%add
  ROOT %all-reduce-done = f32[8]{0} all-reduce-done(%all-reduce-start)
}
"""
  assert sharding.collectives(text) == [("ENTRY", "all-reduce", ["f32[8]"])]


def test_sharded_rejects_bad_shapes():
  mesh = make_mesh(8)
  x, w2, _, labels = make_inputs(13, 13)
  with pytest.raises(ValueError, match="padded_num_classes"):
    margins.margin_softmax_loss(x, w2, labels, margins.ArcFace(), engine=margins.sharded(mesh))
  x, w2, _, labels = make_inputs(13, 16)
  with pytest.raises(ValueError, match="batch"):
    margins.margin_softmax_loss(x[:12], w2, labels[:12], margins.ArcFace(),
                                engine=margins.sharded(mesh), num_classes=13)
  with pytest.raises(ValueError, match="axis_name"):
    margins.sharded(mesh, "model")
  with pytest.raises(ValueError, match="num_classes"):
    margins.margin_softmax_loss(x, w2, labels, margins.ArcFace(), num_classes=17)
  explicit = make_mesh(8, AxisType.Explicit)
  with jax.set_mesh(explicit):  # W split on classes, but a one-device engine
    split_w = jax.device_put(w2, NamedSharding(explicit, jax.P("devices")))
    for engine in (margins.dense(), margins.chunked(5)):
      with pytest.raises(ValueError, match=r"margins.sharded\(mesh, 'devices'\)"):
        jax.jit(lambda w_, e=engine: margins.margin_softmax_loss(
            x, w_, labels, margins.ArcFace(), engine=e, num_classes=13))(split_w)
  # Inside a caller's shard_map (each device with its block of W, as in a port of insightface's
  # model-parallel FC) the sharded engine said its block was too few rows for the classes.
  in_own_shard_map = jax.shard_map(
      lambda x_, w_, y_: margins.sharded(mesh)(x_, w_, y_, margins.ArcFace())[0], mesh=mesh,
      in_specs=(jax.P("devices"),) * 3, out_specs=jax.P("devices"))
  with pytest.raises(ValueError, match=r"runs its own shard_map over its mesh, whose axes "
                     r"\['devices'\] this call is inside: call it on the global `weights`"):
    jax.jit(in_own_shard_map)(x, w2, labels)
  grid = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  over_data = jax.shard_map(  # The batch split over another axis of the engine's mesh.
      lambda x_, y_: margins.sharded(grid, "model")(x_, w2, y_, margins.ArcFace())[0], mesh=grid,
      in_specs=(jax.P("data"),) * 2, out_specs=jax.P("data"))
  with pytest.raises(ValueError, match=r"whose axes \['data', 'model'\] this call is inside"):
    jax.jit(over_data)(x, labels)


@pytest.mark.parametrize("engine", [
    margins.chunked(5), margins.chunked(5, sample_rate=0.5),
    margins.sharded(make_mesh(4), chunk_size=3)], ids=["chunked", "sampled", "sharded"])
def test_batch_statistics_leave_out_out_of_range_labels(engine):
  # Under jit: those examples' losses are NaN; the state is that of the others (on every
  # shard). A negative label too: clipped to 0, it was class 0 on the first shard.
  x, w2, _, labels = make_inputs(13, 16)
  bad = labels.copy(); bad[5] = 13; bad[9] = -1
  keep = np.delete(np.arange(B), [5, 9])
  for margin in (MARGINS["curricularface"], MARGINS["adaface"]):
    losses, state = jax.jit(lambda x_, y_, e=engine, m=margin: e(
        x_, w2, y_, m, num_classes=13, key=KEY))(x, bad)
    losses = np.asarray(losses)
    assert np.isnan(losses[[5, 9]]).all() and np.isfinite(losses[keep]).all()
    _, want = margins.dense()(x[keep], w2, labels[keep], margin, num_classes=13)
    for got_leaf, want_leaf in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
      np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-6)


@pytest.mark.parametrize("engine", [
    margins.chunked(5), margins.chunked(5, matmul_dtype=jnp.bfloat16),
    margins.chunked(5, matmul_dtype=jnp.float16), margins.chunked(5, sample_rate=0.5),
    margins.sharded(make_mesh(2), chunk_size=4)],
    ids=["chunked", "bfloat16", "float16", "sampled", "sharded"])
def test_engines_are_finite_at_the_edges(engine):
  # A zero embedding, embeddings at cos = +1 and -1 to their centre, one on a zero centre, and
  # a huge scale: finite losses and gradients, as the loss zoo's dense engine gives.
  w = np.array(jax.random.normal(KEY, (12, 8)))
  w[3] = 0
  x = np.stack([np.zeros(8), w[5], -w[7], np.ones(8)]).astype(np.float32)
  labels = np.array([0, 5, 7, 3], np.int32)
  edge_margins = [MARGINS[name] for name in (
      "arcface", "curricularface", "sphereface", "lsoftmax", "cosface", "adaface", "magface",
      "sphereface2_arc")]
  edge_margins += [margins.ArcFace(scale=1e4), margins.SphereFace2(bias=0.0, scale=1e4)]

  @jax.jit
  def values_and_grads(x, w):
    return [jax.value_and_grad(
        lambda x_, w_, m=margin: jnp.mean(engine(x_, w_, labels, m, key=KEY)[0]),
        argnums=(0, 1))(x, w) for margin in edge_margins]

  for margin, leaves in zip(edge_margins, values_and_grads(x, w)):
    for leaf in jax.tree.leaves(leaves):
      assert np.all(np.isfinite(leaf)), margin



@margins.margin_dataclass
class _ArcCosMargin(margins.Margin):
  """ArcFace written as a user might: the arccos of ``rows.cos``, NaN outside [-1, 1]."""
  scale: float = 8.0

  def target_logit(self, rows):
    return self.scale * jnp.cos(jnp.arccos(rows.cos) + 0.5)


@pytest.mark.parametrize("engine", [margins.dense(), margins.chunked(7),
                                    margins.sharded(make_mesh(2), chunk_size=7)],
                         ids=["dense", "chunked", "sharded"])
def test_margins_get_target_cosines_within_minus_one_and_one(engine):
  # Embeddings along their centres: float32 rounds some of these cosines to 1 + 1 ulp.
  rng = np.random.default_rng(0)
  w = rng.normal(size=(64, 8)).astype(np.float32)
  x = w[:16] * np.float32(1.7)
  labels = np.arange(16, dtype=np.int32)
  losses = jax.jit(lambda x_, w_: engine(x_, w_, labels, _ArcCosMargin())[0])(x, w)
  # A float32 cosine at 1 is off by an ulp, which sqrt(1 - cos^2) magnifies to about 1e-3.
  np.testing.assert_allclose(losses, reference.arcface(x, w, labels, scale=8.0), rtol=3e-3)


@pytest.mark.parametrize("engine", [margins.dense(), margins.chunked(3)], ids=["dense", "chunked"])
def test_short_vectors_above_the_floor_are_divided_by_their_norm(engine):
  # Norms of 1e-8: above the floor (1e-12), though their squares are below it.
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(4, 8)), rng.normal(size=(7, 8))
  x[1] *= 1e-8 / np.linalg.norm(x[1])
  w[3] *= 1e-8 / np.linalg.norm(w[3])
  labels = np.array([0, 2, 3, 6], np.int32)
  got = engine(x.astype(np.float32), w.astype(np.float32), labels, margins.NormFace(scale=8.0))[0]
  np.testing.assert_allclose(got, reference.normface(x, w, labels, scale=8.0), rtol=1e-5)


def test_centre_below_the_norm_floor_is_divided_by_the_floor():
  # A centre shorter than the floor (1e-12) is divided by the floor, a linear map: its gradient
  # has no radial term, as autodiff of w / max(|w|, 1e-12) gives (the dense engine shares it).
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(7, 8)).astype(np.float32)
  w[2] *= 5e-13 / np.linalg.norm(w[2])
  labels = np.array([0, 2, 6, 3], np.int32)

  def reference(x_, w_):
    unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa
    logits = 8.0 * unit(x_) @ unit(w_).T
    return jnp.sum(jax.nn.logsumexp(logits, axis=1) - logits[np.arange(4), labels])

  engine = margins.chunked(3)
  loss = lambda x_, w_: jnp.sum(engine(x_, w_, labels, margins.NormFace(scale=8.0))[0])  # noqa
  got, want = (jax.jit(jax.grad(f, argnums=(0, 1)))(x, w) for f in (loss, reference))
  for got_part, want_part in zip(got, want, strict=True):
    np.testing.assert_allclose(got_part, want_part, rtol=1e-5, atol=1e-6)


def test_engines_mix_float32_and_float64():
  # float32 embeddings with float64 centres, or float64 matmuls of float32 inputs: every engine
  # computes in float64, as the dense one does.
  x, w2, _, labels = make_inputs(12, 12)

  def losses(engine, x, w):
    return jax.jit(lambda x_, w_: engine(x_, w_, labels, MARGINS["arcface"])[0])(x, w)

  with jax.enable_x64(True):
    want = losses(margins.dense(), x.astype(np.float64), w2.astype(np.float64))
    for engine, w in ((margins.chunked(5), w2.astype(np.float64)),
                      (margins.sharded(make_mesh(2), chunk_size=3), w2.astype(np.float64)),
                      (margins.chunked(5, matmul_dtype=jnp.float64), w2)):
      got = losses(engine, x, w)
      assert got.dtype == jnp.float64, engine
      np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=str(engine))
    # float64 embeddings, bfloat16 matmuls of bfloat16 centres: float64 statistics.
    w16 = w2.astype(jnp.bfloat16)
    want = losses(margins.dense(), x.astype(np.float64), w16.astype(np.float64))
    for engine in (margins.dense(matmul_dtype=jnp.bfloat16),
                   margins.chunked(5, matmul_dtype=jnp.bfloat16)):
      got = losses(engine, x.astype(np.float64), w16)
      assert got.dtype == jnp.float64, engine
      np.testing.assert_allclose(got, want, rtol=2e-2, err_msg=str(engine))


@pytest.mark.parametrize("engine", [margins.dense(), margins.chunked(5),
                                    margins.sharded(make_mesh(2), chunk_size=3)],
                         ids=["dense", "chunked", "sharded"])
def test_bfloat16_margin_parameters(engine):
  # A learnt scale (or state) kept in bfloat16 with float32 inputs, under strict promotion: the
  # engine computes in float32, the gradient and the new state come back in bfloat16.
  x, w2, _, labels = make_inputs(12, 12)
  bf16 = lambda v: jnp.asarray(v, jnp.bfloat16)  # noqa: E731
  for given, want in (
      (margins.CurricularFace(scale=bf16(8.0), t=bf16(0.25)), margins.CurricularFace(8.0, t=0.25)),
      (margins.SphereFace2(bias=bf16(1.0), scale=8.0), MARGINS["sphereface2"])):
    losses, state = engine(x, w2, labels, given)
    np.testing.assert_allclose(losses, engine(x, w2, labels, want)[0], rtol=1e-5)
    grad = jax.grad(lambda m: engine(x, w2, labels, m)[0].sum())(given)  # noqa: B023
    for new, old, g in zip(jax.tree.leaves(state), jax.tree.leaves(given), jax.tree.leaves(grad)):
      assert jnp.result_type(new) == jnp.result_type(old) == jnp.result_type(g), (new, old, g)


def test_partial_fc_samples_with_x64_enabled():
  # jax.random.uniform's default dtype is float64 there; the sample's priorities stay float32,
  # its count of real rows the labels' dtype.
  x, w2, _, labels = make_inputs(40, 40)  # 20 rows sampled, >= B: the counts agree.
  engine = margins.chunked(5, sample_rate=0.5)
  with jax.enable_x64(True):
    sample = engine.sample(labels, num_rows=40, key=KEY)
    got = engine(x, w2, labels, MARGINS["arcface"], key=KEY)[0]
    rows = engine.take(w2, sample)
    taken = engine(x, rows, labels, MARGINS["arcface"], sample=sample)[0]
    np.testing.assert_allclose(taken, got, rtol=1e-6)
  with jax.enable_x64(False):
    np.testing.assert_array_equal(sample.index, engine.sample(labels, num_rows=40, key=KEY).index)
  assert np.isfinite(np.asarray(got)).all()


def test_sharded_engine_takes_int64_labels_with_x64_enabled():
  # jax.numpy's arrays of labels are int64 there; the shard's row index is int32 (a promotion
  # error under strict promotion before).
  x, w2, _, labels = make_inputs(40, 40)
  mesh = make_mesh(2)
  with jax.enable_x64(True):
    for engine in (margins.sharded(mesh, chunk_size=5),
                   margins.sharded(mesh, chunk_size=5, sample_rate=0.5)):
      got = engine(x, w2, jnp.asarray(labels, jnp.int64), MARGINS["arcface"], key=KEY)[0]
      want = engine(x, w2, labels, MARGINS["arcface"], key=KEY)[0]
      np.testing.assert_array_equal(got, want)
    sample = engine.sample(jnp.asarray(labels, jnp.int64), num_rows=40, key=KEY)
    np.testing.assert_array_equal(sample.index, engine.sample(labels, num_rows=40, key=KEY).index)


@pytest.mark.parametrize("engine", [margins.dense(), margins.chunked(5),
                                    margins.sharded(make_mesh(2), chunk_size=3)],
                         ids=["dense", "chunked", "sharded"])
def test_an_empty_batch_has_no_loss_and_zero_gradient(engine):
  _, w2, _, _ = make_inputs(12, 12)
  x, labels = np.zeros((0, D), np.float32), np.zeros(0, np.int32)
  total, grads = jax.jit(jax.value_and_grad(
      lambda x_, w_: jnp.sum(engine(x_, w_, labels, MARGINS["arcface"])[0]), argnums=(0, 1)))(
          x, w2)
  assert total == 0 and grads[0].shape == (0, D)
  np.testing.assert_array_equal(grads[1], np.zeros_like(w2))


def test_engine_rejects_bad_settings():
  for chunk_size, error in ((0, ValueError), (2.5, TypeError), (True, TypeError),
                            (jnp.int32(4), TypeError)):
    with pytest.raises(error, match="`chunk_size` must be"):
      margins.chunked(chunk_size)
  assert type(margins.chunked(np.int64(4)).chunk_size) is int  # Hashable as a static argument.
  with pytest.raises(ValueError, match="sample_rate"):
    margins.dense(sample_rate=0.0)
  x, w2, _, labels = make_inputs(13, 13)
  with pytest.raises(ValueError, match="key"):
    margins.margin_softmax_loss(x, w2, labels, margins.ArcFace(),
                                engine=margins.dense(sample_rate=0.5))
  with pytest.raises(TypeError, match="margin"):
    margins.margin_softmax_loss(x, w2, labels, "arcface")
  # Static counts given as floats or traced: an error naming them, not one deep in JAX.
  with pytest.raises(TypeError, match="`num_classes` must be a Python integer"):
    margins.chunked(5)(x, w2, labels, margins.ArcFace(), num_classes=13.0)
  with pytest.raises(TypeError, match="`num_classes` must be a Python integer"):
    jax.jit(lambda n: margins.dense()(x, w2, labels, margins.ArcFace(), num_classes=n))(13)
  with pytest.raises(TypeError, match="`num_rows` must be a Python integer"):
    margins.chunked(5, sample_rate=0.5).sample(labels, num_rows=13.0, key=KEY)
  with pytest.raises(TypeError, match="`sample_rate` must be a Python number"):
    jax.jit(lambda r: margins.chunked(5, sample_rate=r))(0.5)
  # An integer matmul dtype gave finite, wrong losses; keep_scores took any truthy value.
  for dtype in jnp.int8, jnp.int32, bool:
    with pytest.raises(TypeError, match="`matmul_dtype` must be a floating dtype"):
      margins.chunked(5, matmul_dtype=dtype)
  assert margins.dense(matmul_dtype="bfloat16") == margins.dense(matmul_dtype=jnp.bfloat16)
  # NumPy's float64 dtype equals None: the two engines shared one compiled program, the first
  # one called (float64 losses from the default engine, or float32 ones from the float64 one).
  assert margins.dense(matmul_dtype=jnp.float64) != margins.dense()
  assert hash(margins.chunked(5, matmul_dtype="float64")) != hash(margins.chunked(5))
  with jax.enable_x64(True):
    for engine, dtype in ((margins.chunked(5), jnp.float32),
                          (margins.chunked(5, matmul_dtype=jnp.float64), jnp.float64)):
      assert engine(x, w2, labels, margins.ArcFace())[0].dtype == dtype
  with pytest.raises(TypeError, match="`engine` must be a SoftmaxEngine"):
    margins.margin_softmax_loss(x, w2, labels, margins.ArcFace(), engine="dense")
  with pytest.raises(ValueError, match="names a mesh axis twice"):
    margins.sharded(make_mesh(2), ("devices", "devices"))
  for args, error in (((10, 0), ValueError), ((-5, 4), ValueError), ((10.5, 4), TypeError)):
    with pytest.raises(error, match="`num_(classes|shards)` must be"):
      margins.padded_num_classes(*args)
  with pytest.raises(ValueError, match=r"`num_sampled` must lie in \[1, num_rows = 10\]"):
    parallel.sample_classes(labels[:2], 10, 10, 11, KEY)
  for keep_scores in None, "no", 1:
    with pytest.raises(TypeError, match="`keep_scores` must be True or False"):
      margins.chunked(5, keep_scores=keep_scores)


def test_engine_given_a_list_of_axis_names_runs_eagerly():
  # An eager call compiles the engine's body with the engine as a static (hashed) argument.
  mesh = make_mesh(2)
  engine = margins.SoftmaxEngine(mesh=mesh, axis_name=["devices"])
  assert engine == margins.sharded(mesh, ("devices",), chunk_size=None)
  x, w2, _, labels = make_inputs(13, 14)
  np.testing.assert_allclose(engine(x, w2, labels, margins.ArcFace(), num_classes=13)[0],
                             margins.arcface_loss(x, w2[:13], labels), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Partial FC sampling.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights_shape", [(10, 4), (10, 2, 4), (10, 3)])
def test_similarity_rejects_weights_of_another_dimension(weights_shape):
  with pytest.raises(ValueError, match=rf"feature dimension {weights_shape[-1]} but `embeddings` "
                                       r"has 8"):
    margins.similarity(jnp.ones((4, 8)), jnp.ones(weights_shape), margins.ArcFace())


def test_sample_classes_keeps_positives_fixed_count_and_is_reproducible():
  labels = jnp.array([3, 3, 40, -1, 99, 0], jnp.int32)
  draw = jax.jit(parallel.sample_classes, static_argnums=(1, 3))
  first = np.asarray(draw(labels, 100, 100, 20, jax.random.key(1)))
  assert first.shape == (20,) and len(set(first)) == 20
  assert np.all(np.diff(first) > 0)
  assert {0, 3, 40, 99} <= set(first)
  np.testing.assert_array_equal(first, draw(labels, 100, 100, 20, jax.random.key(1)))
  assert not np.array_equal(first, draw(labels, 100, 100, 20, jax.random.key(2)))
  # Padding rows (>= num_valid) are never drawn while real rows are left.
  assert np.all(np.asarray(draw(labels, 100, 90, 20, jax.random.key(3))) < 90)
  # More classes in the batch than room: only they are kept, a different few for each key.
  few = [frozenset(np.asarray(draw(labels, 100, 100, 2, jax.random.key(k)))) for k in range(12)]
  assert all(len(kept) == 2 and kept <= {0, 3, 40, 99} for kept in few)
  assert len(set(few)) > 1


def test_sample_classes_takes_no_row_for_labels_that_live_elsewhere():
  # -1 (the class is on another shard, or the label out of range) is no class of the batch: row
  # 0 is a negative like any other, not kept as the batch's whenever a label is -1.
  draws = jax.jit(jax.vmap(lambda k: parallel.sample_classes(
      jnp.array([-1, 5, -1], jnp.int32), 100, 100, 1, k)))(jax.random.split(KEY, 16))
  np.testing.assert_array_equal(draws, 5)
  # ... and a class of the batch at row 0 is kept whichever -1s come after it (they scatter to
  # row 0 too).
  for labels in ([0, -1, -1], [-1, 0, -1], [-1, -1, 0]):
    draws = jax.jit(jax.vmap(lambda k, y=jnp.array(labels, jnp.int32): parallel.sample_classes(
        y, 50, 50, 2, k)))(jax.random.split(KEY, 8))
    assert np.all(np.any(np.asarray(draws) == 0, axis=1)), labels
  # So in a sharded sample: shard 1's local labels are [0, -1], its row 0 the batch's class 8.
  engine = margins.sharded(make_mesh(2), sample_rate=0.25)  # 2 of each shard's 8 rows
  index = jax.jit(jax.vmap(lambda k: engine.sample(jnp.array([8, 1], jnp.int32), num_rows=16,
                                                   key=k).index))(jax.random.split(KEY, 8))
  index = np.asarray(index).reshape(8, 2, -1)
  assert np.all(np.any(index[:, 0] == 1, axis=1)) and np.all(np.any(index[:, 1] == 0, axis=1))
  # 8-bit labels: the rows' ids (here up to 299) and -1 fit only after the cast to 32 bits.
  draws = parallel.sample_classes(jnp.array([200, 250], jnp.uint8), 300, 300, 4, KEY)
  assert {200, 250} <= set(np.asarray(draws).tolist()) and np.all(np.diff(draws) > 0)


def test_sampled_count():
  assert parallel.sampled_count(1000, 1.0) == 1000
  assert parallel.sampled_count(1000, 0.1) == 100
  assert parallel.sampled_count(1001, 0.1) == 101
  assert parallel.sampled_count(100, 0.001) == 1
  # insightface's WebFace42M ViT recipe on its 64 GPUs: 30 % of each device's 32,187 classes,
  # whatever the global batch (24,576).
  assert parallel.sampled_count(32_187, 0.3) == 9657
  # The rate meant, not its binary float (0.55 * 100 = 55.00000000000001 in floats), whether
  # written as a decimal or computed (5 / 7 * 7 is just above 5 in its decimal digits too).
  assert [parallel.sampled_count(100, rate) for rate in (0.55, 0.07, 0.14, 0.28)] == [55, 7, 14, 28]
  assert [parallel.sampled_count(7, 5 / 7), parallel.sampled_count(3_000, 2 / 3)] == [5, 2_000]


@pytest.mark.parametrize("engine", [margins.dense(sample_rate=0.5),
                                    margins.chunked(4, sample_rate=0.5)])
def test_sample_size_counts_classes_not_padding_rows(engine):
  # Half of 10 classes, whether W has 10 rows or 100 (90 of them padding).
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8)).astype(np.float32)
  w = rng.normal(size=(100, 8)).astype(np.float32)
  labels = np.array([0, 1], np.int32)
  for rows in (10, 100):
    grad = jax.jit(jax.grad(lambda w_: jnp.sum(engine(
        x, w_, labels, margins.ArcFace(), num_classes=10, key=jax.random.key(0))[0])))(w[:rows])
    touched = np.any(np.asarray(grad) != 0, axis=1)
    assert touched[:2].all() and touched.sum() == 5, (rows, np.flatnonzero(touched))


def sampled_reference(x, w, labels, kept, margin):
  """Per-example losses over the kept classes plus the example's own class (a stateless
  margin): what sampling computes when the batch's classes do not all fit. One program."""

  @jax.jit
  def losses(w):
    per_example = []
    for example, label in enumerate(labels):
      classes = np.union1d(kept, [label])
      target = np.flatnonzero(classes == label).astype(np.int32)
      per_example.append(margins.margin_softmax_loss(x[example:example + 1], w[classes], target,
                                                     margin)[0])
    return jnp.stack(per_example)

  return losses(w)


def test_sampled_loss_is_the_dense_loss_over_the_sample():
  num_classes, batch = 40, 8
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, D)).astype(np.float32)
  w = rng.normal(size=(num_classes, D)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
  key = jax.random.key(5)
  engine = margins.dense(sample_rate=0.25)  # keeps 10 classes: the batch's 8 fit
  margin = margins.CurricularFace(scale=8.0)

  def loss(w_):
    losses, _ = engine(x, w_, labels, margin, key=key)
    return jnp.mean(losses), losses

  (_, losses), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(w)
  index = np.asarray(parallel.sample_classes(jnp.asarray(labels), num_classes, num_classes, 10,
                                             key))
  assert set(labels) <= set(index)
  position = {c: i for i, c in enumerate(index)}
  sub_labels = np.array([position[c] for c in labels], np.int32)
  want = margins.margin_softmax_loss(x, w[index], sub_labels, margin)
  np.testing.assert_allclose(losses, want, rtol=1e-5)
  assert set(np.flatnonzero(np.any(grad != 0, axis=1))) <= set(index)
  unsampled = np.setdiff1d(np.arange(num_classes), index)
  assert np.all(grad[unsampled] == 0)  # exactly zero, not small


@pytest.mark.parametrize("chunk_size", [None, 3, 4])  # 3, 4: the 7 kept padded to 9, 8 rows
def test_sampled_classes_of_the_batch_that_do_not_fit_are_still_targets(chunk_size):
  # 16 examples of at most 12 classes, 7 of 40 kept: each example is scored against the kept
  # classes and its own; a class of the batch left out is no one else's negative, and gets
  # gradient only through its own examples' targets.
  num_classes = 40
  rng = np.random.default_rng(1)
  x = rng.normal(size=(B, D)).astype(np.float32)
  w = rng.normal(size=(num_classes, D)).astype(np.float32)
  labels = rng.integers(0, 12, size=B).astype(np.int32)
  key = jax.random.key(2)
  engine = margins.SoftmaxEngine(chunk_size=chunk_size, sample_rate=0.17)
  margin = margins.ArcFace(scale=8.0)

  def loss(w_):
    losses, _ = engine(x, w_, labels, margin, key=key)
    return jnp.sum(losses), losses

  (_, losses), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(w)
  kept = np.asarray(parallel.sample_classes(jnp.asarray(labels), num_classes, num_classes, 7,
                                            key))
  assert set(kept) < set(labels)
  np.testing.assert_allclose(losses, sampled_reference(x, w, labels, kept, margin), rtol=1e-5)
  want_grad = jax.grad(lambda w_: jnp.sum(sampled_reference(x, w_, labels, kept, margin)))(w)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  touched = set(np.flatnonzero(np.any(grad != 0, axis=1)))
  assert touched == set(labels) | set(kept)


@pytest.mark.parametrize("chunk_size", [None, 2, 3])  # 3: each shard's 4 kept, a partial chunk
def test_sampled_sharded_is_the_loss_over_each_shards_sample(chunk_size):
  num_classes, rows = 30, 32
  x, w, _, labels = make_inputs(num_classes, rows)
  key = jax.random.key(11)
  margin = margins.ArcFace(scale=8.0)
  for num_devices, sample_rate in ((4, 0.5), (2, 0.25)):
    mesh = make_mesh(num_devices)
    engine = margins.sharded(mesh, chunk_size=chunk_size, sample_rate=sample_rate)
    losses = jax.jit(lambda x_, w_: engine(x_, w_, labels, margin, num_classes=num_classes,
                                           key=key)[0])(x, w)
    per_shard = rows // num_devices
    kept = []
    for shard in range(num_devices):
      start = shard * per_shard
      local = np.where((labels >= start) & (labels < min(start + per_shard, num_classes)),
                       labels - start, -1).astype(np.int32)
      index = parallel.sample_classes(jnp.asarray(local), per_shard,
                                      min(per_shard, num_classes - start),
                                      parallel.sampled_count(per_shard, sample_rate),
                                      jax.random.fold_in(key, shard))
      kept.extend(int(i) + start for i in index if int(i) + start < num_classes)
    assert len(kept) < num_classes
    want = sampled_reference(x, w, labels, np.array(kept), margin)
    np.testing.assert_allclose(losses, want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Memory: the chunked engine's temporaries do not grow with the number of classes.
# ---------------------------------------------------------------------------------------------


def compiled_temp_bytes(engine, num_classes, batch=256, dim=512, grad=True, key=None):
  x = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
  w = jax.ShapeDtypeStruct((num_classes, dim), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  loss = lambda x_, w_, y_: jnp.mean(  # noqa: E731
      engine(x_, w_, y_, margins.ArcFace(), key=key)[0])
  fn = jax.grad(loss, argnums=(0, 1)) if grad else loss
  compiled = jax.jit(fn).lower(x, w, labels).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("matmul_dtype,keep_scores", [(None, True), (jnp.bfloat16, True),
                                                      (None, False)])
def test_chunked_temporaries_do_not_grow_with_classes(matmul_dtype, keep_scores):
  # B = 256 <= D = 512: the scores can wait in W's gradient buffer, which is the output.
  engine = margins.chunked(8192, matmul_dtype=matmul_dtype, keep_scores=keep_scores)
  small, large = compiled_temp_bytes(engine, 100_000), compiled_temp_bytes(engine, 1_000_000)
  assert large <= small * 1.05 + (1 << 20), (small, large)
  assert large < 64 * 2**20, large  # the [B, C] logits alone would be 1 GB
  if matmul_dtype is not None or not keep_scores:
    return
  assert compiled_temp_bytes(engine, 1_000_000, grad=False) < 64 * 2**20  # loss alone
  dense_bytes = compiled_temp_bytes(margins.dense(), 1_000_000)
  assert dense_bytes > 256 * 2**20 * 4, dense_bytes


@pytest.mark.parametrize("engine,centre_shape", [
    (margins.chunked(128), (16,)), (margins.chunked(128, keep_scores=False), (16,)),
    (margins.chunked(128), (2, 16)), (margins.sharded(make_mesh(2), chunk_size=128), (16,))],
    ids=["kept", "recomputed", "subcentres", "sharded"])
def test_bfloat16_centres_are_not_widened_in_the_loop_on_cpu(engine, centre_shape):
  # XLA:CPU widens a bfloat16 array to float32 to slice or update it: a float32 copy of W (and
  # of its gradient) in the loop, rewritten at every chunk, 10x the floor at C = 100k. The loops
  # slice and update 16-bit integers instead.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(1000, *centre_shape)), jnp.bfloat16)
  labels = jnp.asarray(rng.integers(0, 1000, 8), jnp.int32)

  def value_and_grads(engine):
    loss = lambda x_, w_: jnp.mean(engine(x_, w_, labels, margins.ArcFace(scale=8.0))[0])  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

  compiled = value_and_grads(engine).lower(x, w).compile().as_text()
  loop_states = re.findall(r"= \((.*?)\) while\(", compiled)
  assert loop_states
  rows = 1000 // engine.num_shards  # of W on each device
  widened = f"f32[{','.join(map(str, (rows, *centre_shape)))}]"
  assert not [state for state in loop_states if widened in state]
  for got, want in zip(jax.tree.leaves(value_and_grads(engine)(x, w)),
                       jax.tree.leaves(value_and_grads(margins.dense())(x, w)), strict=True):
    assert got.dtype == want.dtype
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=1e-2, atol=1e-4)


def test_bfloat16_matmuls_sum_the_embeddings_gradient_in_float32():
  # The training loop's bfloat16 mode: float32 x and W, bfloat16 matmul inputs. The gradient of
  # the embeddings sums the chunks' products in float32 and is rounded once, as the dense
  # engine's single matmul is: summed in bfloat16 over 63 chunks, it was off by ~1%.
  engine = margins.chunked(16, matmul_dtype=jnp.bfloat16)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(8, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1000, 32)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 1000, 8), jnp.int32)

  def grad_x(engine):
    loss = lambda x_: jnp.mean(engine(x_, w, labels, margins.ArcFace(scale=16.0))[0])  # noqa: E731
    return jax.jit(jax.grad(loss))(x)

  got, want = grad_x(engine), grad_x(margins.dense(matmul_dtype=jnp.bfloat16))
  np.testing.assert_allclose(got, want, rtol=2**-8, atol=1e-3 * np.abs(want).max())


def test_sampled_temporaries_are_the_sample_and_its_gradient():
  # 10,000 of 100,000 classes kept: the gathered rows and their gradient (20 MB each), and no
  # third copy: the 10,000 are scored in 40 chunks of 250, not padded to chunks of 256.
  sample_bytes = 10_000 * 512 * 4
  temp = compiled_temp_bytes(margins.chunked(256, sample_rate=0.1), 100_000, key=KEY)
  assert 2 * sample_bytes <= temp < 2.5 * sample_bytes, temp / sample_bytes


SECOND_DERIVATIVE_MARGINS = ("softmax", "arcface", "curricularface")


def second_derivatives(engine):
  """One program: each margin's gradient-penalty gradient and Hessian-vector product."""
  x, w2, _, labels = make_inputs(13, 13)
  rng = np.random.default_rng(1)
  vx, vw = (rng.normal(size=a.shape).astype(np.float32) for a in (x, w2))

  def run():
    out = {}
    for name in SECOND_DERIVATIVE_MARGINS:
      loss = lambda x_, w_, margin=MARGINS[name]: jnp.mean(  # noqa: E731
          engine(x_, w_, labels, margin, key=KEY)[0])
      grad = jax.grad(loss, argnums=(0, 1))
      penalty = lambda x_, w_, grad=grad: sum(jnp.sum(g ** 2) for g in grad(x_, w_))  # noqa: E731
      hvp = jax.jvp(grad, (x, w2), (vx, vw))[1]
      out[name] = jax.grad(penalty, argnums=(0, 1))(x, w2), hvp
    return out

  return jax.jit(run)()


@functools.cache
def dense_second_derivatives(sample_rate):
  """The dense engine's, compiled once for the chunked engines that share its sample rate."""
  return second_derivatives(margins.dense(sample_rate=sample_rate))


@pytest.mark.parametrize("engine", [margins.chunked(5), margins.chunked(5, keep_scores=False),
                                    margins.chunked(5, sample_rate=0.9)],
                         ids=["kept", "recomputed", "sampled"])
def test_chunked_second_derivatives_equal_dense(engine):
  # Differentiating the gradient (a gradient penalty, a Hessian-vector product) runs through the
  # chunked backward pass: the running max must carry no derivative (as the dense one), and the
  # scores read back from W's gradient buffer must move as the scores they stand for. Before,
  # both gave wrong values (off by 2-70x), not errors.
  got = second_derivatives(engine)
  want = dense_second_derivatives(engine.sample_rate)
  for name in SECOND_DERIVATIVE_MARGINS:
    for got_part, want_part in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name]),
                                   strict=True):
      np.testing.assert_allclose(got_part, want_part, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("keep_scores", [True, False], ids=["kept", "recomputed"])
def test_chunked_hessian_equals_dense(keep_scores):
  # ``jax.hessian`` (``vmap`` of ``jvp`` of the gradient) needs the gradient's primal unbatched.
  # Before, ``lax.empty`` (W's gradient buffer) came out batched under any ``vmap``, and with it
  # the gradient: "got axis spec None but output was batched". A ``vmap`` over W still batches it.
  rng = np.random.default_rng(0)
  x, w = (rng.normal(size=shape).astype(np.float32) for shape in ((5, 6), (7, 6)))
  labels = np.array([0, 3, 3, 6, 1], np.int32)

  def hessian_and_stacked_grad(engine):
    loss = lambda x_, w_: jnp.sum(engine(x_, w_, labels, MARGINS["arcface"])[0])  # noqa: E731
    stacked = jax.vmap(jax.grad(loss, argnums=1), in_axes=(None, 0))(x, jnp.stack([w, -w]))
    return jax.hessian(loss, argnums=(0, 1))(x, w), stacked

  got, want = jax.jit(lambda: [hessian_and_stacked_grad(e) for e in (  # One program.
      margins.chunked(3, keep_scores=keep_scores), margins.dense())])()
  for got_part, want_part in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(got_part, want_part, rtol=1e-4, atol=1e-5)


def test_sample_classes_draws_the_negatives_uniformly():
  # Every class outside the batch is equally likely: 16 of the 96 other real rows per draw,
  # 1/6 each; over 3000 keys each row's count is Binomial(3000, 1/6), sd ~20.
  labels = jnp.array([3, 3, 40, -1, 99, 0], jnp.int32)
  keys = jax.random.split(jax.random.key(0), 3000)
  draws = np.asarray(jax.jit(jax.vmap(
      lambda k: parallel.sample_classes(labels, 100, 100, 20, k)))(keys))
  counts = np.bincount(draws.ravel(), minlength=100)
  np.testing.assert_array_equal(counts[[0, 3, 40, 99]], 3000)
  negatives = np.delete(counts, [0, 3, 40, 99])
  assert np.abs(negatives - 500).max() < 100, negatives  # 5 sd


# ---------------------------------------------------------------------------------------------
# Row samples: the loss over Partial FC's rows alone, for updates of those rows only.
# ---------------------------------------------------------------------------------------------

ROW_SAMPLE_MARGINS = ("arcface", "curricularface", "sphereface2", "subcenter_arcface")


def row_sample_inputs(num_classes=90, rows=96):
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(B, D)) * 3).astype(np.float32)
  w2 = rng.normal(size=(rows, D)).astype(np.float32)
  w3 = rng.normal(size=(rows, 3, D)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=B).astype(np.int32)
  return x, w2, w3, labels


@pytest.mark.parametrize("engine_fn", [
    lambda: margins.dense(sample_rate=0.5), lambda: margins.chunked(5, sample_rate=0.5),
    lambda: margins.chunked(7, sample_rate=0.5, keep_scores=False),
    lambda: margins.sharded(make_mesh(2), chunk_size=5, sample_rate=0.5),
    lambda: margins.sharded(make_mesh(4), sample_rate=0.75),
    lambda: margins.sharded(make_mesh(2, AxisType.Explicit), chunk_size=4, sample_rate=0.5)],
    ids=["dense", "chunked", "recompute", "sharded2", "sharded4", "explicit2"])
def test_row_sample_gives_the_engines_own_sample_and_gradients(engine_fn):
  # With room for the batch's classes, the rows a RowSample holds are those the engine samples
  # itself from the same key: the same losses, margin state and gradients, the rows' own
  # gradient put back where W's full gradient has it, zero elsewhere.
  engine, num_classes = engine_fn(), 90
  x, w2, w3, labels = row_sample_inputs(num_classes)
  per_shard = 96 // engine.num_shards
  assert B <= parallel.sampled_count(min(per_shard, num_classes), engine.sample_rate) < per_shard

  def run(x, w2, w3, labels):
    sample = engine.sample(labels, num_rows=96, num_classes=num_classes, key=KEY)
    out = {}
    for name in ROW_SAMPLE_MARGINS:
      w, margin = (w3 if name == "subcenter_arcface" else w2), MARGINS[name]

      def mean_loss(x_, w_, sample=None, margin=margin):
        losses, new_margin = engine(x_, w_, labels, margin, num_classes=num_classes, key=KEY,
                                    sample=sample)
        return jnp.mean(losses), (losses, new_margin)

      grad_fn = jax.grad(mean_loss, argnums=(0, 1), has_aux=True)
      full = grad_fn(x, w)
      (gx, g_rows), aux = grad_fn(x, engine.take(w, sample), sample)
      out[name] = full, ((gx, engine.put(jnp.zeros_like(w), sample, g_rows)), aux)
    return out, sample

  with jax.set_mesh(engine.mesh) if engine.mesh else contextlib.nullcontext():
    out, sample = jax.jit(run)(x, w2, w3, labels)
  index = np.asarray(sample.index).reshape(engine.num_shards, -1)
  assert np.all(np.diff(index, axis=1) >= 0) and np.all(index <= per_shard)
  for name, (want, got) in out.items():
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-6, err_msg=name)
    sampled_rows = {shard * per_shard + i for shard, row in enumerate(index) for i in row
                    if i < per_shard}
    grad_w = np.asarray(want[0][1])
    touched = set(np.flatnonzero(np.any(grad_w.reshape(len(grad_w), -1) != 0, axis=1)))
    assert touched <= sampled_rows and len(touched) > B, name


@pytest.mark.parametrize("num_devices,chunk_size", [(1, 6), (1, None), (2, 5)])
def test_row_sample_keeps_every_class_of_the_batch(num_devices, chunk_size):
  # 10 % of 40 classes is fewer than the batch's 16 examples: the sample grows to 16 rows a shard
  # (insightface keeps the batch's classes whatever the rate), padded to whole chunks with an
  # out-of-range row; the same key gives the same sample.
  mesh = make_mesh(num_devices) if num_devices > 1 else None
  engine = margins.SoftmaxEngine(chunk_size=chunk_size, mesh=mesh, sample_rate=0.1,
                                 axis_name=None if mesh is None else "devices")
  num_classes, per_shard = 40, 40 // num_devices
  labels = jnp.asarray(np.random.default_rng(0).integers(0, num_classes, B), jnp.int32)
  draw = jax.jit(lambda key: engine.sample(labels, num_rows=40, key=key).index)
  index = np.asarray(draw(KEY)).reshape(num_devices, -1)
  padded = {(1, 6): 18, (1, None): 16, (2, 5): 16}[num_devices, chunk_size]
  assert index.shape == (num_devices, padded)
  for shard, rows in enumerate(index):
    real = rows[rows < per_shard]
    assert len(real) == 16 and len(set(real)) == 16 and np.all(rows[16:] == per_shard)
    local = np.asarray(labels) - shard * per_shard
    assert set(local[(local >= 0) & (local < per_shard)]) <= set(real)
  np.testing.assert_array_equal(draw(KEY).reshape(num_devices, -1), index)
  assert not np.array_equal(draw(jax.random.key(1)).reshape(num_devices, -1), index)


def test_row_sample_of_every_row_is_the_unsampled_loss():
  x, w, _, labels = row_sample_inputs()
  engine = margins.chunked(4, sample_rate=0.5)
  sample = parallel.RowSample(jnp.arange(96, dtype=jnp.int32), 96)
  got = engine(x, engine.take(w, sample), labels, margins.ArcFace(), sample=sample)[0]
  want = margins.margin_softmax_loss(x, w, labels, margins.ArcFace())
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_row_sample_without_an_examples_class_gives_nan():
  x, w, _, labels = row_sample_inputs()
  engine = margins.chunked(4)
  kept = np.setdiff1d(np.arange(96), labels[:1])
  sample = parallel.RowSample(jnp.asarray(np.append(kept, 96), jnp.int32), 96)
  losses = engine(x, engine.take(w, sample), labels, margins.ArcFace(), sample=sample)[0]
  assert np.all(np.isnan(losses) == (labels == labels[0]))


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sparse_update_of_sharded_rows_never_gathers_weights(axis_type):
  # A Partial FC step on the sampled rows alone: take, loss and gradient, put back. W [64, 16]
  # is split 8 x [8, 16]; each device reads and writes its own rows.
  mesh = make_mesh(8, axis_type)
  engine = margins.sharded(mesh, chunk_size=3, sample_rate=0.5)
  split = NamedSharding(mesh, jax.P("devices")) if axis_type == AxisType.Explicit else None
  x = jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=split)
  w = jax.ShapeDtypeStruct((64, D), jnp.float32, sharding=split)
  labels = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=split)

  def step(x, w, labels):
    sample = engine.sample(labels, num_rows=64, num_classes=50, key=KEY)
    loss = lambda rows: jnp.mean(engine(x, rows, labels, margins.ArcFace(), num_classes=50,  # noqa
                                        sample=sample)[0])
    rows = engine.take(w, sample)
    return engine.put(w, sample, rows - 0.1 * jax.grad(loss)(rows))

  with jax.set_mesh(mesh):
    text = jax.jit(step).lower(x, w, labels).compile().as_text()
  found = [(op, shape) for _, op, shapes in sharding.collectives(text) for shape in shapes]
  assert {shape for op, shape in found if op == "all-gather"} <= {
      f"f32[{B},{D}]", f"f32[{B},1]", f"s32[{B}]"}
  assert all(f",{D}]" not in shape or shape == f"f32[{B},{D}]" for _, shape in found), found


def test_row_sample_rejects_mismatched_rows():
  engine = margins.chunked(4, sample_rate=0.5)
  labels = jnp.zeros(B, jnp.int32)
  sample = engine.sample(labels, num_rows=96, key=KEY)
  with pytest.raises(ValueError, match="must be the 48 rows of `sample`"):
    engine(jnp.ones((B, D)), jnp.ones((96, D)), labels, margins.ArcFace(), sample=sample)
  with pytest.raises(ValueError, match="drawn from 96"):
    engine.take(jnp.ones((90, D)), sample)
  with pytest.raises(ValueError, match="divisible by the 4 shards"):
    margins.sharded(make_mesh(4)).sample(labels, num_rows=30, key=KEY)
  sharded = margins.sharded(make_mesh(4), chunk_size=4, sample_rate=0.5)
  with jax.set_mesh(sharded.mesh):
    sharded_sample = sharded.sample(labels, num_rows=96, key=KEY)  # rows within each shard's 24
    rows = sharded.take(jnp.ones((96, D)), sharded_sample)
  with pytest.raises(ValueError, match="drawn for 4 shards"):
    engine(jnp.ones((B, D)), rows, labels, margins.ArcFace(), sample=sharded_sample)
  with pytest.raises(ValueError, match="drawn for 4 shards"):
    engine.take(jnp.ones((96, D)), sharded_sample)


@pytest.mark.parametrize("num_devices", [1, 2])
def test_row_sample_outside_jit_with_concrete_labels(num_devices):
  # The README's step, eagerly: the labels index all of W's rows, not the sample's, so the range
  # check must not hold them against the sample's rows (it raised for every label >= S).
  mesh = make_mesh(num_devices) if num_devices > 1 else None
  engine = margins.SoftmaxEngine(chunk_size=5, mesh=mesh, sample_rate=0.3,
                                 axis_name=None if mesh is None else "devices")
  x, w, _, labels = row_sample_inputs()
  labels = jnp.asarray(labels)

  def loss(rows, sample):
    return jnp.mean(engine(x, rows, labels, margins.ArcFace(), num_classes=90, sample=sample)[0])

  with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
    sample = engine.sample(labels, num_rows=96, num_classes=90, key=KEY)
    rows = engine.take(w, sample)
    assert np.max(labels) >= rows.shape[0] // engine.num_shards
    got = jax.value_and_grad(loss)(rows, sample)
    want = jax.jit(jax.value_and_grad(loss))(rows, sample)
  for got_leaf, want_leaf in zip(got, want, strict=True):
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-6)


def test_row_sample_put_takes_numpy_weights_as_take_does():
  x, w, _, labels = row_sample_inputs()
  engine = margins.chunked(5, sample_rate=0.3)
  sample = engine.sample(labels, num_rows=96, key=KEY)
  rows = engine.take(w, sample)  # w: a NumPy array
  np.testing.assert_array_equal(engine.put(w, sample, rows), w)
  # Rows shaped otherwise would broadcast over the sample; labels out of range are refused.
  for wrong in rows[0], rows[:-1], np.float32(0.0):
    with pytest.raises(ValueError, match=r"`rows` must be shaped \(30, 16\), as `take` gives"):
      engine.put(w, sample, wrong)
  with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 96\)"):
    engine.sample(np.where(np.arange(B) == 0, 96, labels), num_rows=96, key=KEY)


@pytest.mark.parametrize("num_devices", [1, 2])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_row_sample_of_narrow_labels(num_devices, dtype):
  # The engine takes uint8 and int16 labels; the sample's index (and its padding row, 256 here)
  # must not be kept in their dtype: uint8 wrapped the padding to row 0, which the loss then
  # scored and put overwrote; sharded, strict promotion refused labels - start.
  mesh = make_mesh(num_devices) if num_devices > 1 else None
  engine = margins.SoftmaxEngine(chunk_size=8, mesh=mesh, sample_rate=0.1,
                                 axis_name=None if mesh is None else "devices")
  rows_total = 256 * num_devices
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, D)).astype(np.float32)
  w = rng.normal(size=(rows_total, D)).astype(np.float32)
  labels = rng.integers(0, 200, B).astype(dtype)

  def run(x, w, labels):
    sample = engine.sample(labels, num_rows=rows_total, num_classes=200, key=KEY)
    wide = engine.sample(labels.astype(jnp.int32), num_rows=rows_total, num_classes=200, key=KEY)
    rows = engine.take(w, sample)
    got = engine(x, rows, labels, margins.ArcFace(), num_classes=200, sample=sample)[0]
    want = engine(x, engine.take(w, wide), labels.astype(jnp.int32), margins.ArcFace(),
                  num_classes=200, sample=wide)[0]
    return sample.index, wide, got, want, engine.put(w, sample, rows + 1)

  with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
    index, wide, got, want, put = jax.jit(run)(x, w, labels)
  np.testing.assert_array_equal(index, wide.index)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  index = np.asarray(wide.index).reshape(num_devices, -1)
  sampled = {s * 256 + i for s, row in enumerate(index) for i in row if i < 256}
  untouched = np.setdiff1d(np.arange(rows_total), sorted(sampled))
  np.testing.assert_array_equal(np.asarray(put)[untouched], w[untouched])


@pytest.mark.parametrize("spec", [jax.P(), jax.P(None, "data")])
def test_row_sample_put_gives_w_back_split_as_it_came(spec):
  # Explicit axes: a W replicated, or split over its features (FSDP), comes back so from put, as
  # the engine's gradient of W does (put split it over the classes), so it fits a loop's carry.
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  engine = margins.sharded(mesh, "model", chunk_size=4, sample_rate=0.5)
  rng = np.random.default_rng(0)
  w = rng.normal(size=(16, 8)).astype(np.float32)
  labels = jnp.asarray(rng.integers(0, 16, 8))

  def two_steps(w):
    sample = engine.sample(labels, num_rows=16, key=KEY)
    step = lambda i, w_: engine.put(w_, sample, engine.take(w_, sample) + 1)  # noqa: E731
    return jax.lax.fori_loop(0, 2, step, w), sample.index

  with jax.set_mesh(mesh):
    given = jax.device_put(w, jax.NamedSharding(mesh, spec))
    out, index = jax.jit(two_steps)(given)
    assert jax.typeof(out).sharding.spec == jax.typeof(given).sharding.spec
  sampled = sorted({s * 4 + int(i) for s, row in enumerate(np.asarray(index).reshape(4, -1))
                    for i in row if i < 4})
  np.testing.assert_allclose(out, w + 2 * np.isin(np.arange(16), sampled)[:, None], rtol=1e-6)


def test_row_sample_take_gives_zero_padding_rows():
  # 16 rows a shard (the batch's examples) in chunks of at most 6: 3 chunks of 6, 2 padding rows.
  engine = margins.chunked(6, sample_rate=0.1)
  labels = jnp.arange(B, dtype=jnp.int32)
  w = np.arange(1.0, 40 * D + 1, dtype=np.float32).reshape(40, D)
  sample = engine.sample(labels, num_rows=40, key=KEY)
  index = np.asarray(sample.index)
  rows = np.asarray(engine.take(w, sample))
  assert index.shape == (18,) and np.all(index[16:] == 40)
  np.testing.assert_array_equal(rows[:16], w[index[:16]])
  np.testing.assert_array_equal(rows[16:], 0)
