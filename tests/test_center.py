"""Center loss and the centre update rule against float64 loops over the batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from margins import sharding as sharding_lib
from margins.losses import center
from tests import jaxprs

B, D, C = 7, 3, 5
# Class 0 three times, class 3 twice, class 4 once; classes 1 and 2 are absent.
LABELS = np.array([0, 3, 0, 4, 3, 0, 3], np.int32)[:B]


def make_inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, D)).astype(np.float32)
  centers = rng.normal(size=(C, D)).astype(np.float32)
  return x, centers


def ref_center_loss(x, centers, labels):
  x, centers = np.asarray(x, np.float64), np.asarray(centers, np.float64)
  return np.array([0.5 * sum((x[i, k] - centers[labels[i], k]) ** 2 for k in range(x.shape[1]))
                   for i in range(len(labels))])


def ref_update_centers(centers, x, labels, alpha):
  """Wen et al., Algorithm 1: c_j -= alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)."""
  centers, x = np.asarray(centers, np.float64), np.asarray(x, np.float64)
  new = centers.copy()
  for j in range(len(centers)):
    members = [i for i in range(len(labels)) if labels[i] == j]
    if members:
      delta = sum(centers[j] - x[i] for i in members) / (1 + len(members))
      new[j] = centers[j] - alpha * delta
  return new


def test_center_loss_matches_reference():
  x, centers = make_inputs()
  got = jax.jit(center.center_loss)(x, centers, LABELS)
  assert got.shape == (B,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref_center_loss(x, centers, LABELS), rtol=1e-6)


def test_center_loss_gradient_reaches_embeddings_only():
  x, centers = make_inputs(1)
  with jax.enable_x64(True):
    x64, c64 = jnp.asarray(x, jnp.float64), jnp.asarray(centers, jnp.float64)
    weights = jnp.linspace(0.5, 1.5, B, dtype=jnp.float64)
    fn = jax.jit(lambda x_, c_: jnp.sum(center.center_loss(x_, c_, LABELS) * weights))
    check_grads(lambda x_: fn(x_, c64), (x64,), order=1, modes=["rev"], atol=1e-7, rtol=1e-7)
    grad_x, grad_c = jax.grad(fn, argnums=(0, 1))(x64, c64)
  # d/dx_i = w_i (x_i - c_{y_i}); the centres are moved by `update_centers`, not by gradients.
  np.testing.assert_allclose(grad_x, np.asarray(weights)[:, None] * (x - centers[LABELS]),
                             rtol=1e-6)
  np.testing.assert_array_equal(grad_c, 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_center_loss_in_16_bits(dtype):
  x, centers = make_inputs(2)
  x, centers = jnp.asarray(x, dtype), jnp.asarray(centers * 10, dtype)
  loss, grad = jax.value_and_grad(lambda x_: center.center_loss(x_, centers, LABELS).sum())(x)
  assert loss.dtype == jnp.float32 and grad.dtype == dtype
  # Computed in float32 from the 16-bit inputs, not in 16 bits.
  want = ref_center_loss(np.asarray(x, np.float64), np.asarray(centers, np.float64), LABELS)
  np.testing.assert_allclose(loss, want.sum(), rtol=1e-6)


def test_out_of_range_labels():
  x, centers = make_inputs()
  bad = LABELS.copy()
  bad[2] = C
  with pytest.raises(ValueError, match="`labels`"):
    center.center_loss(x, centers, bad)
  with pytest.raises(ValueError, match="`labels`"):
    center.update_centers(centers, x, bad)
  # Under jit the loss of that example is NaN, and the update ignores it.
  bad[4] = -1
  loss = jax.jit(center.center_loss)(x, centers, bad)
  assert np.isnan(loss[2]) and np.isnan(loss[4])
  assert np.all(np.isfinite(np.delete(loss, [2, 4])))
  got = jax.jit(center.update_centers)(centers, x, bad)
  keep = np.array([i for i in range(B) if i not in (2, 4)])
  np.testing.assert_allclose(got, ref_update_centers(centers, x[keep], LABELS[keep], 0.5),
                             rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [-1, -2, -3, -4, C])
def test_update_centers_under_jit_drops_negative_labels_instead_of_wrapping_them(bad):
  # Only class 0 is in the batch, so a label -k read NumPy-style as class C - k would move a
  # centre that must keep its value bit for bit (classes 1 to 4 are absent); C is dropped too.
  # (test_out_of_range_labels' -1 wraps to class 4, which its batch has: the scatter's duplicate
  # index hid the wrong write.)
  x, centers = make_inputs(8)
  labels = np.array([0, bad, 0, bad, 0, 0, bad], np.int32)
  got = jax.jit(center.update_centers)(centers, x, labels)
  np.testing.assert_allclose(got, ref_update_centers(centers, x, labels, 0.5), rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_array_equal(np.asarray(got)[1:], centers[1:])


def test_uint8_labels_of_256_classes_and_numpy_centres():
  # Every label is valid (255 < 256): the comparison with the class count must not wrap.
  x, _ = make_inputs()
  centers = np.random.default_rng(1).normal(size=(256, D)).astype(np.float32)
  labels = LABELS.copy(); labels[0] = 255
  want_loss = center.center_loss(x, centers, labels)
  want_centers = center.update_centers(jnp.asarray(centers), x, labels)
  for narrow in (labels.astype(np.uint8), jnp.asarray(labels, jnp.uint8)):
    np.testing.assert_allclose(jax.jit(center.center_loss)(x, centers, narrow), want_loss,
                               rtol=1e-6)
    np.testing.assert_array_equal(center.update_centers(centers, x, narrow), want_centers)
  np.testing.assert_allclose(want_centers, ref_update_centers(centers, x, labels, 0.5),
                             rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.5, 0.1, 1.0])
def test_update_centers_matches_the_paper(alpha):
  x, centers = make_inputs(3)
  # `alpha` is traced here (jit arguments are), as it is when it follows a schedule.
  got = jax.jit(center.update_centers)(centers, x, LABELS, alpha=alpha)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref_update_centers(centers, x, LABELS, alpha), rtol=1e-6,
                             atol=1e-7)
  # Classes absent from the batch keep their centres bit for bit.
  np.testing.assert_array_equal(np.asarray(got)[[1, 2]], centers[[1, 2]])


def test_update_centers_moves_towards_the_class_mean():
  # With alpha = 1 and n examples, a centre ends n / (n + 1) of the way to their mean.
  centers = jnp.zeros((2, 2))
  x = jnp.array([[3.0, 0.0], [0.0, 3.0], [3.0, 3.0]])
  got = jax.jit(center.update_centers)(centers, x, jnp.array([1, 1, 1]), alpha=1.0)
  np.testing.assert_allclose(got, [[0, 0], [1.5, 1.5]], rtol=1e-6)
  assert center.center_loss(x, got, jnp.array([1, 1, 1])).sum() < center.center_loss(
      x, centers, jnp.array([1, 1, 1])).sum()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_update_centers_keeps_the_centres_dtype_and_rounds_once(dtype):
  x, centers = make_inputs(5)
  centers = jnp.asarray(centers, dtype)
  got = jax.jit(center.update_centers)(centers, jnp.asarray(x, dtype), LABELS)
  assert got.dtype == dtype
  # Computed in float32 and rounded once: the float64 result rounded to `dtype` (arithmetic in
  # bfloat16 stayed within an ulp of it, so a bound of an ulp would not tell).
  want = ref_update_centers(np.asarray(centers, np.float64), np.asarray(x, dtype).astype(
      np.float64), LABELS, 0.5)
  np.testing.assert_array_equal(got, jnp.asarray(want, dtype))


def test_one_float64_input_makes_loss_and_update_compute_in_float64():
  # "float32 (float64 when an input is)": the float64 input may be either of the two.
  x, centers = make_inputs(9)
  rng = np.random.default_rng(9)
  x64, centers64 = rng.normal(size=x.shape), rng.normal(size=centers.shape)  # not float32 values
  with jax.enable_x64(True):
    loss = jax.jit(center.center_loss)(x, jnp.asarray(centers64), LABELS)
    new_centers = jax.jit(center.update_centers)(centers, jnp.asarray(x64), LABELS)
  assert loss.dtype == jnp.float64 and new_centers.dtype == jnp.float32
  np.testing.assert_allclose(loss, ref_center_loss(x, centers64, LABELS), rtol=1e-12)
  # The centres keep float32, rounded once from the float64 update (as the 16-bit case above).
  np.testing.assert_array_equal(new_centers,
                                ref_update_centers(centers, x64, LABELS, 0.5).astype(np.float32))


def test_update_centers_cost_does_not_grow_with_classes_times_batch():
  # No [B, C] one-hot: every intermediate of the update is at most the size of the centres.
  batch, dim, num_classes = 16, 4, 1000
  centers = jnp.zeros((num_classes, dim))
  x = jnp.zeros((batch, dim))
  labels = jnp.arange(batch, dtype=jnp.int32) * 7

  jaxpr = jax.make_jaxpr(center.update_centers)(centers, x, labels).jaxpr
  assert jaxprs.largest_intermediate(jaxpr) <= num_classes * dim < batch * num_classes
  # Only the rows of classes in the batch are written: a scatter, not a dense rewrite.
  assert "scatter" in {eqn.primitive.name for eqn in jaxprs.equations(jaxpr)}


def test_update_centers_under_vmap():
  # E.g. several independent centre sets (one per task or per device shard of the batch).
  x, centers = make_inputs(6)
  stacked_x = np.stack([x, x[::-1]])
  stacked_labels = np.stack([LABELS, LABELS[::-1] % 2])
  got = jax.jit(jax.vmap(center.update_centers))(np.stack([centers, centers]), stacked_x,
                                                 stacked_labels)
  for k in range(2):
    want = ref_update_centers(centers, stacked_x[k], stacked_labels[k], 0.5)
    np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-7)


def test_centres_split_by_rows_beside_a_sharded_head_are_never_gathered():
  # Centres split over "model" as a class-sharded W is, the batch over both axes of a 2 x 4
  # mesh: each device reads and writes its own rows; only [B] labels and [B, D] rows cross.
  num_classes, batch = 40, 8
  rng = np.random.default_rng(7)
  x = rng.normal(size=(batch, D)).astype(np.float32)
  centers = rng.normal(size=(num_classes, D)).astype(np.float32)
  labels = np.array([3, 39, 3, 17, 0, 39, 3, 22], np.int32)
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    split_centers = jax.device_put(centers, jax.P("model"))
    split_x, split_labels = (jax.device_put(a, jax.P(("data", "model"))) for a in (x, labels))
    for fn, want in ((center.center_loss, ref_center_loss(x, centers, labels)),
                     (lambda x_, c_, l_: center.update_centers(c_, x_, l_, alpha=0.5),
                      ref_update_centers(centers, x, labels, 0.5))):
      compiled = jax.jit(fn).lower(split_x, split_centers, split_labels).compile()
      got = compiled(split_x, split_centers, split_labels)
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
      collectives = sharding_lib.collectives(compiled.as_text())
      assert collectives and not [shape for _, _, shapes in collectives for shape in shapes
                                  if shape.startswith(f"f32[{num_classes},")], collectives
  assert got.sharding.spec == jax.P("model", None)  # The new centres stay split.


def test_bad_input_names_the_argument():
  x, centers = make_inputs()
  for fn in (lambda *a: center.center_loss(*a), lambda x_, c_, l_: center.update_centers(
      c_, x_, l_)):
    with pytest.raises(ValueError, match="`centers`"):
      fn(x, centers[:, :2], LABELS)
    with pytest.raises(ValueError, match="`centers`"):
      fn(x, centers[0], LABELS)
    with pytest.raises(TypeError, match="`centers`"):
      fn(x, centers.astype(np.int32), LABELS)
    with pytest.raises(ValueError, match="`embeddings`"):
      fn(x[None], centers, LABELS)
    with pytest.raises(TypeError, match="`labels`"):
      fn(x, centers, LABELS.astype(np.float32))
    with pytest.raises(ValueError, match="`labels`"):
      fn(x, centers, LABELS[:-1])
  for alpha in (1.5, -0.1, np.float32(1.5), jnp.float32(1.5)):  # Any concrete number.
    with pytest.raises(ValueError, match="`alpha`"):
      center.update_centers(centers, x, LABELS, alpha=alpha)
  with pytest.raises(ValueError, match=r"`alpha` must be a scalar, got shape \(4,\)"):
    center.update_centers(centers, x, LABELS, alpha=np.full(4, 0.5))  # A rank error before.
  for alpha in (0.0, 1.0):  # The ends of [0, 1] are steps, given eagerly as concrete numbers.
    np.testing.assert_allclose(center.update_centers(centers, x, LABELS, alpha=alpha),
                               ref_update_centers(centers, x, LABELS, alpha), rtol=1e-6, atol=1e-7)
