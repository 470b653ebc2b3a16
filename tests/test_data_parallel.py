"""Every loss under a data-parallel mesh (the batch split over devices, the centres replicated),
with Auto and Explicit axes, equals the loss on one device: values, gradients and states."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

import margins
from margins import sharding

B, D, C, K = 16, 8, 12, 3
KEY = jax.random.key(3)

# name: loss(x, w, w3 (sub-centres), labels) -> (per-example losses, anything else to compare)
LOSSES = {
    "softmax": lambda x, w, w3, y: (margins.softmax_loss(x, w, y, bias=w.mean(axis=1)), None),
    "normface": lambda x, w, w3, y: (margins.normface_loss(x, w, y), None),
    "lsoftmax": lambda x, w, w3, y: (margins.lsoftmax_loss(x, w, y, margin=3), None),
    "sphereface": lambda x, w, w3, y: (margins.sphereface_loss(x, w, y, annealing=5.0), None),
    "cosface": lambda x, w, w3, y: (margins.cosface_loss(x, w, y, scale=8.0), None),
    "arcface": lambda x, w, w3, y: (margins.arcface_loss(x, w, y, scale=8.0), None),
    "combined": lambda x, w, w3, y: (margins.combined_margin_loss(x, w, y, scale=8.0), None),
    "subcenter": lambda x, w, w3, y: (margins.subcenter_arcface_loss(x, w3, y, scale=8.0), None),
    "curricularface": lambda x, w, w3, y: margins.curricularface_loss(x, w, y, 0.2, scale=8.0),
    "adaface": lambda x, w, w3, y: margins.adaface_loss(x, w, y, scale=8.0),
    "magface": lambda x, w, w3, y: (margins.magface_loss(x, w, y, scale=8.0), None),
    "elasticface": lambda x, w, w3, y: (margins.elasticface_loss(x, w, y, KEY, scale=8.0), None),
    "spherefacer": lambda x, w, w3, y: (margins.spherefacer_loss(x, w, y, scale=8.0), None),
    "sphereface2": lambda x, w, w3, y: (margins.sphereface2_loss(x, w, y, -1.0, scale=8.0), None),
    "mv_softmax": lambda x, w, w3, y: (margins.mv_softmax_loss(x, w, y, scale=8.0, kind="arc"),
                                       None),
    "center": lambda x, w, w3, y: (margins.center_loss(x, w, y),
                                   margins.update_centers(w, x, y)),
    "contrastive": lambda x, w, w3, y: (margins.contrastive_loss(x, y), None),
    "triplet_all": lambda x, w, w3, y: (margins.triplet_loss(x, y), None),
    "triplet_hard": lambda x, w, w3, y: (margins.triplet_loss(x, y, mining="batch_hard"), None),
    "triplet_semi": lambda x, w, w3, y: (margins.triplet_loss(x, y, mining="semi_hard"), None),
    "circle": lambda x, w, w3, y: (margins.circle_loss(x, y, gamma=8.0), None),
    "dense_engine": lambda x, w, w3, y: margins.dense()(x, w, y, margins.ArcFace(scale=8.0)),
    "chunked_engine": lambda x, w, w3, y: margins.chunked(5)(x, w, y, margins.ArcFace(scale=8.0)),
    "chunked_curricularface": lambda x, w, w3, y: margins.chunked(5)(
        x, w, y, margins.CurricularFace(scale=8.0, t=0.2)),
    "chunked_subcenter": lambda x, w, w3, y: margins.chunked(5)(
        x, w3, y, margins.ArcFace(scale=8.0)),
    # Per-example [B] fields that the non-target logits read: split with the examples.
    "chunked_per_example_t": lambda x, w, w3, y: margins.chunked(5)(
        x, w, y, margins.MVSoftmax(scale=8.0, t=jnp.linspace(0.0, 0.4, B))),
    "chunked_per_example_margin": lambda x, w, w3, y: margins.chunked(5)(
        x, w, y, margins.SphereFace2(-1.0, scale=8.0, margin=jnp.linspace(0.1, 0.4, B))),
    # 48 classes (W four times over), 16 of them sampled: the batch's 4 and 12 others.
    "sampled_engine": lambda x, w, w3, y: margins.chunked(5, sample_rate=0.25)(
        x, jnp.tile(w, (4, 1)), y, margins.CosFace(scale=8.0), key=KEY),
    "sampled_dense_engine": lambda x, w, w3, y: margins.dense(sample_rate=0.25)(
        x, jnp.tile(w, (4, 1)), y, margins.CurricularFace(scale=8.0, t=0.2), key=KEY),
}


def inputs():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(B, D)) * 3, jnp.float32)
  w = jnp.asarray(rng.normal(size=(C, D)), jnp.float32)
  w3 = jnp.asarray(rng.normal(size=(C, K, D)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, C // 3, B), jnp.int32)  # repeated classes: positive pairs
  return x, w, w3, labels


def losses_and_grads(x, w, w3, labels, names=tuple(LOSSES)):
  """One program: each loss's per-example values, other outputs and gradients (x, w, w3) of
  their sum over the batch divided by ``B`` (the mean over the whole batch, also where each
  device holds a part of it)."""
  out = {}
  for name in names:
    def mean_loss(x_, w_, w3_, loss=LOSSES[name]):
      losses, other = loss(x_, w_, w3_, labels)
      return jnp.sum(losses) / B, (losses, other)

    (_, aux), grads = jax.value_and_grad(mean_loss, argnums=(0, 1, 2), has_aux=True)(x, w, w3)
    out[name] = (aux, grads)
  return out


@pytest.fixture(scope="module")
def single_device():
  return jax.jit(losses_and_grads)(*inputs())


@pytest.mark.parametrize("axis_type,placed,fsdp", [
    (AxisType.Explicit, True, False), (AxisType.Auto, True, False),
    (AxisType.Explicit, False, False), (AxisType.Explicit, True, True)])
def test_every_loss_data_parallel_equals_one_device(single_device, axis_type, placed, fsdp):
  # ``placed``: the arrays are put on the mesh before the call; else ``jit``'s ``in_shardings``
  # place them (under Explicit axes, JAX then traces them without a mesh in their type).
  # ``fsdp``: the centres split on the feature axis over the same devices, as FSDP splits
  # parameters; their gradients come back split so.
  mesh = jax.make_mesh((4,), ("batch",), axis_types=(axis_type,), devices=jax.devices()[:4])
  batch, replicated = NamedSharding(mesh, jax.P("batch")), NamedSharding(mesh, jax.P())
  shardings = (batch, replicated, replicated, batch)
  if fsdp:
    shardings = (batch, NamedSharding(mesh, jax.P(None, "batch")),
                 NamedSharding(mesh, jax.P(None, None, "batch")), batch)
  arrays = inputs()
  with jax.set_mesh(mesh):
    if placed:
      got = jax.jit(losses_and_grads)(*jax.device_put(arrays, shardings))
    else:
      got = jax.jit(losses_and_grads, in_shardings=shardings)(*arrays)
  for name, ((losses, other), grads) in got.items():
    want_aux, want_grads = single_device[name]
    for leaf, want_leaf in zip(jax.tree.leaves(((losses, other), grads)),
                               jax.tree.leaves((want_aux, want_grads)), strict=True):
      np.testing.assert_allclose(leaf, want_leaf, rtol=1e-5, atol=1e-6, err_msg=name)
    if axis_type == AxisType.Explicit and placed:
      assert losses.sharding.spec[0] == "batch", (name, losses.sharding)  # stays split
      assert grads[1].sharding.is_equivalent_to(shardings[1], 2), (name, grads[1].sharding)
  new_centers = got["center"][0][1]  # update_centers gives them back split as they came
  assert new_centers.sharding.is_equivalent_to(shardings[1], 2) or not placed


def test_every_loss_with_only_the_labels_split_equals_one_device(single_device):
  # The embeddings whole on each device and the labels split (Explicit axes), as a loader may
  # place them: CurricularFace and MV-Softmax compared split per-row thresholds with whole scores
  # (a ShardingTypeError); the labels now follow the embeddings.
  mesh = jax.make_mesh((4,), ("batch",), axis_types=(AxisType.Explicit,),
                       devices=jax.devices()[:4])
  replicated = NamedSharding(mesh, jax.P())
  shardings = (replicated, replicated, replicated, NamedSharding(mesh, jax.P("batch")))
  with jax.set_mesh(mesh):
    got = jax.jit(losses_and_grads)(*jax.device_put(inputs(), shardings))
  for name, (aux, grads) in got.items():
    want_aux, want_grads = single_device[name]
    for leaf, want_leaf in zip(jax.tree.leaves((aux, grads)),
                               jax.tree.leaves((want_aux, want_grads)), strict=True):
      np.testing.assert_allclose(leaf, want_leaf, rtol=1e-5, atol=1e-6, err_msg=name)


def test_every_loss_inside_a_callers_shard_map_equals_one_device(single_device):
  # The caller's own shard_map over the batch (each device a quarter of it, the centres whole on
  # each): the pairwise losses and update_centers still see every pair and every example of the
  # batch, the batch statistics are the whole batch's, and the centres' gradients and the new
  # states come back whole (out_specs P()), as on one device. Partial FC's sample is each
  # device's own there (drawn from its own examples' classes): left out.
  mesh = jax.make_mesh((4,), ("batch",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
  # Per-example fields there are the device's own examples' (the test below).
  names = tuple(name for name in LOSSES if not name.startswith("sampled")
                and "per_example" not in name)
  split, whole = jax.P("batch"), jax.P()

  # The centres are the same on every device: JAX sums their gradients over the devices.
  specs = {name: ((split, whole), (split, whole, whole)) for name in names}
  got = jax.jit(jax.shard_map(functools.partial(losses_and_grads, names=names), mesh=mesh,
                              in_specs=(split, whole, whole, split), out_specs=specs))(*inputs())
  for name, (aux, grads) in got.items():
    want_aux, want_grads = single_device[name]
    for leaf, want_leaf in zip(jax.tree.leaves((aux, grads)),
                               jax.tree.leaves((want_aux, want_grads)), strict=True):
      np.testing.assert_allclose(leaf, want_leaf, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("engine", [margins.dense(), margins.chunked(5)], ids=["dense", "chunked"])
def test_per_example_fields_inside_a_callers_shard_map_are_the_devices_own(engine):
  # Split like the examples they belong to (in_specs), the target's margin and the non-target
  # logits' t give each example what one device gives it.
  x, w, _, labels = inputs()
  mesh = jax.make_mesh((4,), ("batch",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
  for margin in (margins.ArcFace(scale=8.0, margin=jnp.linspace(0.1, 0.5, B)),
                 margins.MVSoftmax(scale=8.0, t=jnp.linspace(0.0, 0.4, B))):
    specs = jax.tree.map(lambda v: jax.P("batch") if jnp.shape(v) == (B,) else jax.P(),
                         jax.tree.map(jnp.asarray, margin))
    per_device = jax.shard_map(lambda x_, y_, m_: engine(x_, w, y_, m_)[0], mesh=mesh,
                               in_specs=(jax.P("batch"), jax.P("batch"), specs),
                               out_specs=jax.P("batch"))
    np.testing.assert_allclose(jax.jit(per_device)(x, labels, jax.tree.map(jnp.asarray, margin)),
                               engine(x, w, labels, margin)[0], rtol=1e-5)
    with pytest.raises(ValueError, match=r"one per example \(4\), got shape \(16,\)"):
      jax.jit(jax.shard_map(lambda x_, y_: engine(x_, w, y_, margin)[0], mesh=mesh,
                            in_specs=jax.P("batch"), out_specs=jax.P("batch")))(x, labels)


# What the data-parallel chunked program may move between devices: W's gradient, summed once
# under Explicit axes, where the labels and the target rows' [B, D] gradient are all-gathered
# (each device then adds the whole batch's to its W); under Auto axes GSPMD sums it chunk by
# chunk (256 rows) and sums a whole [C, D] for the target rows. Nothing of the [B, C] scores.
DATA_PARALLEL_COLLECTIVES = {
    AxisType.Explicit: {("all-reduce", "f32[4096,32]"), ("all-gather", "s32[64]"),
                        ("all-gather", "f32[64,32]")},
    AxisType.Auto: {("all-reduce", "f32[256,32]"), ("all-reduce", "f32[4096,32]")},
}


@pytest.mark.parametrize("axis_type,keep_scores", [(AxisType.Explicit, True),
                                                   (AxisType.Auto, False)])
def test_data_parallel_chunked_moves_only_gradients_between_devices(axis_type, keep_scores):
  # Explicit axes: the engine sees the split batch and runs the chunks on each device's own
  # examples (kept scores stay there); Auto axes cannot tell it, so keep_scores=False is needed
  # there (GSPMD would move the kept scores between devices).
  mesh = jax.make_mesh((4,), ("batch",), axis_types=(axis_type,), devices=jax.devices()[:4])
  batch, replicated = NamedSharding(mesh, jax.P("batch")), NamedSharding(mesh, jax.P())
  engine = margins.chunked(256, keep_scores=keep_scores)
  loss = lambda x_, w_, y_: jnp.mean(engine(x_, w_, y_, margins.ArcFace())[0])  # noqa: E731
  args = (jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=batch),
          jax.ShapeDtypeStruct((4096, 32), jnp.float32, sharding=replicated),
          jax.ShapeDtypeStruct((64,), jnp.int32, sharding=batch))
  with jax.set_mesh(mesh):
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
  found = {(op, shape) for _, op, shapes in sharding.collectives(text) for shape in shapes}
  assert found == DATA_PARALLEL_COLLECTIVES[axis_type]
