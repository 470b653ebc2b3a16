"""The loss zoo against float64 references, gradients, edge cases, dtypes and bad input."""

import dataclasses
import functools
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import margins
from tests import reference

B, D, C = 6, 5, 7


def make_inputs(seed=0, *, batch=B, dim=D, classes=C, subcenters=None, norm_scale=1.0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, dim)) * norm_scale
  w_shape = (classes, subcenters, dim) if subcenters else (classes, dim)
  w = rng.normal(size=w_shape)
  labels = rng.integers(0, classes, size=batch)
  labels[:2] = [0, classes - 1]
  return x.astype(np.float32), w.astype(np.float32), labels.astype(np.int32)


# (name, package loss, reference, kwargs, the loss takes 3-D weights)
CASES = [
    ("softmax", margins.softmax_loss, reference.softmax, {}),
    ("normface", margins.normface_loss, reference.normface, {"scale": 16.0}),
    ("lsoftmax2", margins.lsoftmax_loss, reference.lsoftmax, {"margin": 2}),
    ("lsoftmax4", margins.lsoftmax_loss, reference.lsoftmax, {"margin": 4}),
    ("lsoftmax3_annealed", margins.lsoftmax_loss, reference.lsoftmax,
     {"margin": 3, "annealing": 2.0}),
    ("sphereface", margins.sphereface_loss, reference.sphereface, {"margin": 4}),
    ("sphereface_annealed", margins.sphereface_loss, reference.sphereface,
     {"margin": 4, "annealing": 5.0}),
    ("sphereface_scaled", margins.sphereface_loss, reference.sphereface,
     {"margin": 2, "scale": 30.0}),
    ("cosface", margins.cosface_loss, reference.cosface, {"scale": 64.0, "margin": 0.35}),
    ("arcface", margins.arcface_loss, reference.arcface, {"scale": 64.0, "margin": 0.5}),
    ("arcface_big_margin", margins.arcface_loss, reference.arcface,
     {"scale": 8.0, "margin": 1.4}),
    ("arcface_easy", margins.arcface_loss, reference.arcface,
     {"scale": 8.0, "margin": 0.5, "easy_margin": True}),
    ("combined", margins.combined_margin_loss, reference.combined, {}),
    ("combined_m1", margins.combined_margin_loss, reference.combined,
     {"scale": 4.0, "m1": 1.35, "m2": 0.0, "m3": 0.0}),
    ("mv_softmax", margins.mv_softmax_loss, reference.mv_softmax, {}),
    ("mv_softmax_plain_fixed", margins.mv_softmax_loss, reference.mv_softmax,
     {"easy_margin": False, "adaptive": False, "t": 0.3}),
    ("mv_softmax_arc", margins.mv_softmax_loss, reference.mv_softmax,
     {"kind": "arc", "margin": 0.5, "scale": 8.0}),
    ("mv_softmax_arc_plain", margins.mv_softmax_loss, reference.mv_softmax,
     {"kind": "arc", "margin": 0.5, "easy_margin": False, "t": 0.12}),
    ("magface", margins.magface_loss, reference.magface, {}),
    ("magface_continued", margins.magface_loss, reference.magface, {"easy_margin": False}),
    ("spherefacer", margins.spherefacer_loss, reference.spherefacer, {}),
    ("spherefacer_v1", margins.spherefacer_loss, reference.spherefacer,
     {"margin": 1.7, "kind": "v1"}),
    ("spherefacer_v2", margins.spherefacer_loss, reference.spherefacer,
     {"scale": 60.0, "margin": 1.4, "kind": "v2"}),
    # Example 2 (theta 2.32) reaches k = 2: 2.8 theta passes 2 pi.
    ("spherefacer_v0_k2", margins.spherefacer_loss, reference.spherefacer,
     {"scale": 4.0, "margin": 2.8}),
    ("sphereface2", functools.partial(margins.sphereface2_loss, bias=1.5), reference.sphereface2,
     {}),
    ("sphereface2_arc", functools.partial(margins.sphereface2_loss, bias=-2.0),
     reference.sphereface2, {"kind": "arc", "margin": 0.5, "scale": 30.0, "t": 2.0}),
    ("sphereface2_multiplicative", functools.partial(margins.sphereface2_loss, bias=0.5),
     reference.sphereface2, {"kind": "multiplicative", "margin": 1.7, "alpha": 0.8}),
    # Example 2's target (cos -0.682) passes pi: the combined margin's linear continuation and
    # SphereFace2-A's cap at -1 (the cases above all stay short of them).
    ("combined_continued", margins.combined_margin_loss, reference.combined,
     {"scale": 4.0, "m1": 1.5, "m2": 0.2, "m3": 0.1}),
    ("sphereface2_arc_capped", functools.partial(margins.sphereface2_loss, bias=0.3),
     reference.sphereface2, {"kind": "arc", "margin": 1.0, "scale": 30.0, "t": 1.0}),
]


def test_value_cases_reach_the_branches_past_pi():
  # Guards the cases above against data that never leave the first branch.
  x, w, labels = make_inputs()
  theta = np.arccos(reference.cosines(x, w)[np.arange(B), labels])
  assert np.any(1.5 * theta + 0.2 >= np.pi) and np.any(1.5 * theta + 0.2 < np.pi)  # combined
  assert np.any(theta + 1.0 >= np.pi) and np.any(theta + 1.0 < np.pi)  # sphereface2 arc
  assert np.any(2.8 * theta >= 2 * np.pi)  # spherefacer v0, k = 2


@pytest.mark.parametrize("name,loss_fn,reference_fn,kwargs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("norm_scale", [1.0, 30.0])
def test_values_match_float64_reference(name, loss_fn, reference_fn, kwargs, norm_scale):
  del name
  x, w, labels = make_inputs(norm_scale=norm_scale)
  got = jax.jit(functools.partial(loss_fn, **kwargs))(x, w, labels)
  if isinstance(loss_fn, functools.partial):  # The keyword arguments fixed by the case.
    kwargs = {**loss_fn.keywords, **kwargs}
  want = reference_fn(x, w, labels, **kwargs)
  assert got.shape == (B,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4)


def test_softmax_bias():
  x, w, labels = make_inputs()
  bias = np.linspace(-1, 1, C).astype(np.float32)
  np.testing.assert_allclose(margins.softmax_loss(x, w, labels, bias=bias),
                             reference.softmax(x, w, labels, bias), rtol=2e-5, atol=1e-5)
  # A float32 bias beside bfloat16 centres keeps its precision: logits [1, 1.003], where a
  # bfloat16 bias would be 1.0 (a loss of log 2, 0.0015 off).
  loss, grad = jax.value_and_grad(
      lambda b: margins.softmax_loss(jnp.array([[1.0, 0.0]]), jnp.eye(2, dtype=jnp.bfloat16),
                                     jnp.array([0]), bias=b)[0])(jnp.array([0.0, 1.003]))
  assert grad.dtype == jnp.float32
  assert float(loss) == pytest.approx(np.log1p(np.exp(0.003)), rel=1e-6)
  np.testing.assert_allclose(grad, [-1, 1] / (1 + np.exp(-0.003)), rtol=1e-6)


def test_arcface_detach_margin_keeps_value_and_takes_cosface_free_gradient():
  x, w, labels = make_inputs()
  detached = functools.partial(margins.arcface_loss, scale=8.0, detach_margin=True)
  np.testing.assert_allclose(detached(x, w, labels), margins.arcface_loss(x, w, labels, scale=8.0),
                             rtol=1e-6)
  # The gradient is that of s*cos_y as target logit, evaluated at ArcFace's probabilities.
  grad = jax.grad(lambda x_: detached(x_, w, labels).sum())(x)
  cos = reference.cosines(x, w)
  target = np.array([reference.arc_target(cos[b, y], 0.5) for b, y in enumerate(labels)])

  def surrogate(x_):
    unit = x_ / jnp.linalg.norm(x_, axis=1, keepdims=True)
    cos_ = unit @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    cos_y = jnp.take_along_axis(cos_, labels[:, None], axis=1)[:, 0]
    shift = jnp.asarray(target, jnp.float32) - jax.lax.stop_gradient(cos_y)
    logits = 8.0 * (cos_ + jax.nn.one_hot(labels, C, dtype=jnp.float32) * shift[:, None])
    return (jax.nn.logsumexp(logits, axis=1) - 8.0 * (cos_y + shift)).sum()

  np.testing.assert_allclose(grad, jax.grad(surrogate)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["cos", "arc", "multiplicative"])
def test_sphereface2_gradient_is_that_of_scaled_cosines_and_bias(kind):
  # As in the authors' code, g and the margin shift the logits by constants: the gradient is that
  # of r cos + b at SphereFace2's probabilities. The bias is learnt.
  x, w, labels = make_inputs()
  margin = {"cos": 0.4, "arc": 0.5, "multiplicative": 1.7}[kind]
  loss = lambda x_, w_, b_: margins.sphereface2_loss(  # noqa: E731
      x_, w_, labels, b_, scale=8.0, margin=margin, kind=kind).sum()
  grads = jax.grad(loss, argnums=(0, 1, 2))(x, w, jnp.float32(0.5))
  # Each logit's constant shift from r cos, from the paper's formulas in float64.
  shifts = (reference.sphereface2_adjusted(x, w, labels, margin, kind=kind)
            - reference.cosines(x, w))
  is_target = np.arange(C)[None, :] == labels[:, None]

  def surrogate(x_, w_, b_):
    unit = x_ / jnp.linalg.norm(x_, axis=1, keepdims=True)
    cos_ = unit @ (w_ / jnp.linalg.norm(w_, axis=1, keepdims=True)).T
    logits = 8.0 * (cos_ + jnp.asarray(shifts, jnp.float32)) + b_
    terms = jnp.where(is_target, 0.7 * jax.nn.softplus(-logits), 0.3 * jax.nn.softplus(logits))
    return terms.sum() / 8.0

  want = jax.grad(surrogate, argnums=(0, 1, 2))(x, w, jnp.float32(0.5))
  for got_g, want_g in zip(grads, want):
    np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,margin", [("v0", 1.7), ("v1", 2.5), ("v2", 1.4)])
def test_spherefacer_gradient_is_that_of_scaled_cosines(kind, margin):
  # As in the authors' code, the characteristic function shifts the logits by constants: the
  # gradient is that of s cos at SphereFace-R's probabilities.
  x, w, labels = make_inputs()
  grad = jax.grad(lambda x_, w_: margins.spherefacer_loss(
      x_, w_, labels, scale=8.0, margin=margin, kind=kind).sum(), argnums=(0, 1))(x, w)
  shifts = jnp.asarray(reference.spherefacer_adjusted(x, w, labels, margin, kind)
                       - reference.cosines(x, w), jnp.float32)

  def surrogate(x_, w_):
    unit = x_ / jnp.linalg.norm(x_, axis=1, keepdims=True)
    logits = 8.0 * (unit @ (w_ / jnp.linalg.norm(w_, axis=1, keepdims=True)).T + shifts)
    return (jax.nn.logsumexp(logits, axis=1)
            - jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]).sum()

  for got, want in zip(grad, jax.grad(surrogate, argnums=(0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_sphereface2_fractional_t_at_a_cosine_rounded_below_minus_one():
  # x = -W_4: the float32 similarity to class 4 comes out as -1.0000001, and g's fractional
  # power of (cos + 1) / 2 < 0 would be NaN.
  rng = np.random.default_rng(1)
  w = rng.normal(size=(8, 6)).astype(np.float32)
  x = np.stack([-w[4], w[0]])
  labels = np.array([0, 0], np.int32)
  assert float(margins.similarity(x, w, margins.SphereFace2(bias=0.0))[0, 4]) < -1
  for kind in ("cos", "arc", "multiplicative"):
    loss = lambda x_: margins.sphereface2_loss(x_, w, labels, 1.0, t=2.5, kind=kind)  # noqa
    np.testing.assert_allclose(loss(x), reference.sphereface2(x, w, labels, 1.0, t=2.5, kind=kind),
                               rtol=1e-5)
    assert np.all(np.isfinite(jax.grad(lambda x_: loss(x_).sum())(x))), kind


@pytest.mark.parametrize("num_classes,kind,margin,scale,alpha", [
    (2, "cos", 0.4, 40.0, 0.7), (3, "cos", 0.4, 40.0, 0.7), (10, "arc", 0.5, 40.0, 0.7),
    (1000, "multiplicative", 1.7, 40.0, 0.7), (100_000, "cos", 0.4, 40.0, 0.7),
    (10, "multiplicative", 0.5, 1e3, 0.7)])
def test_sphereface2_bias_makes_the_untrained_loss_flat_in_the_bias(num_classes, kind, margin,
                                                                    scale, alpha):
  # Every cosine 0 (x orthogonal to every centre): the bias's derivative of the loss is 0 there,
  # where the balance ratio is above 1 (2 and 3 classes), far below it, and where
  # exp(target - other) overflows (the last).
  kwargs = dict(margin=margin, kind=kind, scale=scale, alpha=alpha)
  bias = margins.sphereface2_bias(num_classes, **kwargs)
  with jax.enable_x64(True):
    x = jnp.zeros((1, 2), jnp.float64).at[0, 0].set(1.0)
    w = jnp.zeros((num_classes, 2), jnp.float64).at[:, 1].set(1.0)
    loss = lambda b_: margins.sphereface2_loss(x, w, jnp.array([0]), b_, **kwargs)[0]  # noqa
    slope = jax.grad(loss)(jnp.float64(bias))
    curvature = jax.grad(jax.grad(loss))(jnp.float64(bias))
  assert abs(float(slope)) < 1e-9 * max(1.0, float(curvature)), (slope, curvature)
  assert float(curvature) > 0  # a minimum


def test_sphereface2_bias_where_the_balance_is_exact_and_the_exponential_underflows():
  # alpha = 0.5 and 2 classes: the ratio is 1, the quadratic is e^(T + O) u^2 = 1 and
  # b = -(T + O) / 2 = 0.75 r, with T - O = -2 r m far below exp's range at r = 1e4.
  assert margins.sphereface2_bias(2, scale=1e4, alpha=0.5) == pytest.approx(7500.0, rel=1e-12)


def test_sphereface2_bias_inside_a_trace_and_for_a_count_that_is_not_whole():
  # A model initialised under jit or nnx.eval_shape calls it there: it raised a
  # ConcretizationTypeError; 10.5 classes were taken for a count.
  want = margins.sphereface2_bias(10)
  assert jax.jit(lambda: jnp.float32(margins.sphereface2_bias(10)))() == np.float32(want)
  assert jax.eval_shape(lambda: jnp.asarray(margins.sphereface2_bias(10))).shape == ()
  assert margins.sphereface2_bias(np.int64(10)) == want
  with pytest.raises(TypeError, match="`num_classes` must be an integer, got float"):
    margins.sphereface2_bias(10.5)


def test_subcenter_arcface_matches_reference():
  x, w, labels = make_inputs(subcenters=3)
  got = margins.subcenter_arcface_loss(x, w, labels)
  np.testing.assert_allclose(got, reference.arcface(x, w, labels), rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("margin", [margins.Softmax(), margins.NormFace(scale=4.0)],
                         ids=["softmax", "normface"])
def test_subcentres_score_the_target_as_every_other_class(margin):
  # Each class scores with its best sub-centre: the best <x, W_k> when W keeps its norms (which
  # need not be the best cosine: the centres' lengths differ here), the best cosine otherwise.
  x, w, labels = make_inputs(subcenters=3)
  w = w * np.random.default_rng(1).uniform(0.2, 5.0, size=w.shape[:2] + (1,)).astype(np.float32)
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  if margin.normalize_weights:
    x64 = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
    w64 = margin.scale * w64 / np.linalg.norm(w64, axis=2, keepdims=True)
  scores = np.einsum("bd,ckd->bck", x64, w64).max(axis=2)
  want = np.log(np.exp(scores).sum(axis=1)) - scores[np.arange(B), labels]
  np.testing.assert_allclose(margins.margin_softmax_loss(x, w, labels, margin), want, rtol=1e-5)


@pytest.mark.parametrize("engine", [margins.dense(), margins.chunked(3)], ids=["dense", "chunked"])
def test_tied_subcentres_share_the_derivative_as_jnp_max_does(engine):
  # Sub-centres 0 and 1 of every class are equal, and all three of class 1. The labels' classes
  # are untied (a target's derivative goes to its best sub-centre alone). A plain jnp loss over
  # `jnp.max` of the K scores splits ties equally; so must the engines, in both modes.
  x, w, _ = make_inputs(subcenters=3)
  w[:, 1] = w[:, 0]
  w[1, 2] = w[1, 0]
  labels = np.full(B, 2, np.int32); labels[:2] = [0, C - 1]
  w[labels, 1] += 0.5  # The target's own sub-centres are not tied.

  def plain(x, w):
    scores = jnp.max(jnp.einsum("bd,ckd->bck", x, w), axis=2)
    return jnp.mean(jax.nn.logsumexp(scores, axis=1) - scores[jnp.arange(B), labels])

  def package(x, w):
    return jnp.mean(margins.margin_softmax_loss(x, w, labels, margins.Softmax(), engine=engine))

  got, want = (jax.jit(jax.grad(f, argnums=(0, 1)))(x, w) for f in (package, plain))
  for got_leaf, want_leaf in zip(got, want, strict=True):
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-6)
  tied = np.setdiff1d(np.arange(C), labels)
  np.testing.assert_array_equal(got[1][tied, 0], got[1][tied, 1])
  assert np.abs(got[1][tied, 0]).min() > 0
  if engine.chunk_size is None:  # Forward mode (the chunked engine defines reverse mode only).
    tangent = np.random.default_rng(3).normal(size=w.shape).astype(np.float32)
    (_, got_jvp), (_, want_jvp) = (jax.jvp(lambda w_: f(x, w_), (w,), (tangent,))
                                   for f in (package, plain))
    np.testing.assert_allclose(got_jvp, want_jvp, rtol=1e-5)


@margins.margin_dataclass
class _UserCosFace(margins.Margin):
  # A margin defined outside the package, as the README shows: one method.
  scale: jax.Array | float = 64.0
  margin: jax.Array | float = 0.35

  def target_logit(self, rows):
    return self.scale * (rows.cos - self.margin)


@pytest.mark.parametrize("engine", [margins.dense(), margins.chunked(3)], ids=["dense", "chunked"])
def test_a_user_margin_runs_on_every_engine_under_jit(engine):
  x, w, labels = make_inputs()

  @jax.jit
  def losses_and_grads(x, w, margin):
    def mean_loss(x, w, margin):
      return jnp.mean(margins.margin_softmax_loss(x, w, labels, margin, engine=engine))
    return jax.value_and_grad(mean_loss, argnums=(0, 1, 2))(x, w, margin)

  (value, grads), (want_value, want_grads) = (
      losses_and_grads(x, w, m(scale=jnp.float32(16.0), margin=jnp.float32(0.2)))
      for m in (_UserCosFace, margins.CosFace))
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_margins_of_different_classes_never_share_a_jit_trace():
  # In jax 0.10.2 the structures of two classes registered by `register_dataclass` (and so by
  # flax.struct) compare equal whatever the class when their leaves and static fields do; jit's
  # caches then ran one class's program for the other's now and then (in about 1% of processes,
  # the tests' all-margin program ran CombinedMargin's for CurricularFace). `margin_dataclass`
  # registers margins whose structures compare their class.
  zoo = [margins.AdaFace(), margins.ArcFace(), margins.CombinedMargin(), margins.CosFace(),
         margins.CurricularFace(), margins.ElasticFace(key=jax.random.key(0)), margins.LSoftmax(),
         margins.MVSoftmax(), margins.MagFace(), margins.NormFace(), margins.Softmax(),
         margins.SphereFace(), margins.SphereFace2(bias=0.0), margins.SphereFaceR()]
  structures = [jax.tree.structure(margin) for margin in zoo]
  same = [(type(a).__name__, type(b).__name__) for i, a in enumerate(zoo) for j, b in
          enumerate(zoo) if i < j and structures[i] == structures[j]]  # Not a set: hashes differ.
  assert not same
  classes = [margins.margin_dataclass(type(f"Offset{i}", (margins.Margin,), {
      "__annotations__": {"scale": float}, "scale": 1.0, "offset": i,
      "target_logit": lambda self, rows: self.scale * rows.cos + self.offset}))
             for i in range(100)]
  rows = margins.Rows(jnp.zeros(1), embedding_norm=jnp.ones(1), weight_norm=jnp.ones(1))
  target_logit = jax.jit(lambda margin: (margin.target_logit(rows), margin))
  for cls in classes:
    logit, margin = target_logit(cls(jnp.float32(1.0)))
    assert (type(margin).__name__, float(logit[0])) == (cls.__name__, cls.offset)


@pytest.mark.parametrize("kind", ["cos", "arc"])
@pytest.mark.parametrize("easy_margin", [True, False])
@pytest.mark.parametrize("cos_y", [0.2, -0.2])
def test_mv_softmax_emphasises_exactly_the_negatives_above_the_margined_target(kind, easy_margin,
                                                                              cos_y):
  # The easy margin keeps cos_y only where cos_y <= 0 (the authors' rule; FaceX-Zoo's AM branch
  # keeps it up to m). One negative sits just above the margined target (mis-classified), one
  # just below.
  m, t = 0.35, 0.2
  margined = cos_y - m if kind == "cos" else np.cos(np.arccos(cos_y) + m)
  angles = np.arccos([cos_y, margined + 0.01, margined - 0.01])
  w = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
  x = np.array([[1.0, 0.0]], np.float32)
  loss = margins.mv_softmax_loss(x, w, np.array([0]), scale=1.0, margin=m, t=t, kind=kind,
                                 easy_margin=easy_margin)
  target = cos_y if easy_margin and cos_y <= 0 else margined
  logits = [target, (1 + t) * (margined + 0.01) + t, margined - 0.01]
  want = np.log(np.sum(np.exp(logits))) - target
  np.testing.assert_allclose(loss, [want], rtol=1e-5)


def test_curricularface_value_and_state():
  x, w, labels = make_inputs()
  losses, t = margins.curricularface_loss(x, w, labels, 0.3)
  want, want_t = reference.curricularface(x, w, labels, t=0.3)
  np.testing.assert_allclose(losses, want, rtol=2e-5, atol=2e-4)
  np.testing.assert_allclose(t, want_t, rtol=1e-6)


def test_curricularface_gradient_treats_t_as_a_constant():
  # The updated t (from the batch's mean target cosine) and its use are detached, as the paper's
  # code: the gradient is that of the loss at the new t held fixed. A test at momentum 0 never saw
  # whether it was.
  x, w, labels = make_inputs()
  _, t_new = margins.curricularface_loss(x, w, labels, 0.3, momentum=0.5)

  def grads(t, momentum):
    return jax.grad(lambda x, w: jnp.mean(margins.curricularface_loss(
        x, w, labels, t, momentum=momentum)[0]), argnums=(0, 1))(x, w)

  for got, want in zip(grads(0.3, 0.5), grads(t_new, 0.0)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  t_grad = jax.grad(lambda t: jnp.sum(margins.curricularface_loss(x, w, labels, t)[0]))(0.3)
  assert float(t_grad) == 0.0


def test_adaface_value_and_state():
  x, w, labels = make_inputs(norm_scale=10.0)
  state = margins.AdaFaceState(norm_mean=15.0, norm_std=40.0)
  losses, new_state = margins.adaface_loss(x, w, labels, state, t_alpha=0.3)
  want, (mean, std) = reference.adaface(x, w, labels, 15.0, 40.0, t_alpha=0.3)
  np.testing.assert_allclose(losses, want, rtol=2e-5, atol=2e-4)
  np.testing.assert_allclose(new_state, (mean, std), rtol=1e-5)


def test_adaface_clips_the_other_classes_cosines_as_the_official_code():
  # A non-target centre at cos 0.9998 (past 1 - eps) and one at -0.9998: both logits are held at
  # s (1 - eps) and -s (1 - eps), and those centres get no gradient.
  x = jnp.array([[20.0, 0.0, 0.0], [30.0, 0.0, 0.0]])
  w = jnp.array([[0.0, 1.0, 0.0], [1.0, 0.02, 0.0], [-1.0, 0.02, 0.0], [0.6, 0.0, 0.8]])
  labels = jnp.array([0, 0])
  loss = lambda w_: margins.adaface_loss(x, w_, labels, scale=8.0)[0]  # noqa: E731
  np.testing.assert_allclose(loss(w), reference.adaface(x, w, labels, scale=8.0)[0], rtol=1e-6)
  grad = jax.grad(lambda w_: jnp.sum(loss(w_)))(w)
  np.testing.assert_array_equal(grad[1:3], 0)
  assert np.all(np.asarray(grad[3, ::2]) != 0)


def test_adaface_embedding_gradient_treats_norms_and_batch_statistics_as_constants():
  # The official code detaches the norms (the quality proxy) and the batch statistics, so the
  # embeddings' gradient is that of their directions alone: finite differences of the reference
  # evaluated at x / |x| * |x0|, every norm (and so every statistic) held at x0's.
  x0, w, labels = make_inputs(seed=5, norm_scale=10.0)
  x0, w = x0.astype(np.float64), w.astype(np.float64)
  norms0 = np.linalg.norm(x0, axis=1, keepdims=True)
  weights = np.linspace(0.5, 1.5, B)
  kwargs = dict(norm_mean=15.0, norm_std=40.0, scale=8.0, t_alpha=0.5)

  def ref(x):
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    return reference.adaface(unit * norms0, w, labels, **kwargs)[0] @ weights

  want = np.zeros_like(x0)
  for index in np.ndindex(*x0.shape):
    step = np.zeros_like(x0)
    step[index] = 1e-6
    want[index] = (ref(x0 + step) - ref(x0 - step)) / 2e-6
  state = margins.AdaFaceState(kwargs.pop("norm_mean"), kwargs.pop("norm_std"))
  with jax.enable_x64(True):
    got = jax.grad(lambda x_: margins.adaface_loss(
        x_, jnp.asarray(w), labels, state, **kwargs)[0] @ weights)(jnp.asarray(x0))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_adaface_clips_the_shifted_angle_and_divides_by_std_plus_eps():
  # Frozen statistics (t_alpha=0). Std 1: a norm of 30 gives z = 1, and its theta = 0.1 shifted by
  # -m z is clipped up to eps; a norm of 10 gives z = -1, and theta = pi - 0.2 shifted by +m is
  # clipped down to pi - eps. Std 1e-3: eps doubles the denominator, z = 0.333 (0.666 without).
  angles = np.array([0.1, np.pi - 0.2, 1.0, 2.0])
  norms = np.array([30.0, 10.0, 20.002, 19.998])
  x = norms[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  w = np.array([[1.0, 0.0], [0.0, 1.0], [-0.6, -0.8]])
  labels = np.zeros(4, np.int32)
  with jax.enable_x64(True):
    for std, rows in ((1.0, slice(0, 2)), (1e-3, slice(2, 4))):
      state = margins.AdaFaceState(norm_mean=20.0, norm_std=std)
      got = margins.adaface_loss(jnp.asarray(x[rows]), jnp.asarray(w), labels[rows], state,
                                 scale=8.0, t_alpha=0.0)[0]
      want = reference.adaface(x[rows], w, labels[rows], 20.0, std, scale=8.0, t_alpha=0.0)[0]
      np.testing.assert_allclose(got, want, rtol=1e-9)


@pytest.mark.parametrize("t_alpha", [0.0, 1.0])
def test_adaface_clips_the_norms_at_100_for_the_margin_and_the_statistics(t_alpha):
  # The official code's safe_norms: clip(|x|, 0.001, 100) sets both z (frozen statistics,
  # t_alpha=0: norms 150 and 300 give z = 0.27, not 0.43 and 0.93) and the batch statistics
  # (t_alpha=1: mean 65 and std 41 of [100, 40, 100, 20], not 127.5 and 128).
  angles = np.array([0.3, 1.0, 2.0, 2.5])
  norms = np.array([150.0, 40.0, 300.0, 20.0])
  x = (norms[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)).astype(np.float32)
  w = np.array([[1.0, 0.0], [0.0, 1.0], [-0.6, -0.8]], np.float32)
  labels = np.array([0, 1, 0, 2], np.int32)
  losses, state = margins.adaface_loss(x, w, labels, scale=8.0, t_alpha=t_alpha)
  want, want_state = reference.adaface(x, w, labels, scale=8.0, t_alpha=t_alpha)
  np.testing.assert_allclose(losses, want, rtol=1e-5)
  np.testing.assert_allclose(state, want_state, rtol=1e-5)


def test_adaface_statistics_of_a_single_example_take_its_std_as_0():
  # Bessel's correction divides by B - 1, which is 0 for one example: its std is 0 (the
  # batch_moments contract), not 0 / 0, which would turn the state and the loss into NaN.
  x, w, labels = make_inputs(norm_scale=10.0)
  x, labels = x[:1], labels[:1]
  losses, state = margins.adaface_loss(x, w, labels, margins.AdaFaceState(15.0, 40.0),
                                       t_alpha=0.5)
  norm = np.linalg.norm(x[0].astype(np.float64))
  want_state = (0.5 * norm + 0.5 * 15.0, 0.5 * 0.0 + 0.5 * 40.0)
  np.testing.assert_allclose(state, want_state, rtol=1e-6)
  # The loss at those statistics: the reference with them frozen (t_alpha=0), given the example
  # twice (its own std of one value is NumPy's warning).
  want = reference.adaface(np.concatenate([x, x]), w, np.concatenate([labels, labels]),
                           *want_state, t_alpha=0.0)[0][:1]
  np.testing.assert_allclose(losses, want, rtol=2e-5, atol=2e-4)


# A target at theta_y = pi - 0.2, past pi - m (m = 0.5): cos(theta_y + m) = -cos(0.3) = -0.955,
# where ArcFace's target continues as cos_y - m sin m = -1.22. Centres of classes 1-3 at
# cosines -0.97 (between the two), -0.9 and 0.3 with x.
PAST_PI_ANGLES = np.array([np.pi - 0.2, -np.arccos(-0.97), np.arccos(-0.9), np.arccos(0.3)])
PAST_PI_X = np.array([[1.0, 0.0]], np.float32)
PAST_PI_W = np.stack([np.cos(PAST_PI_ANGLES), np.sin(PAST_PI_ANGLES)], axis=1).astype(np.float32)


def test_curricularface_hard_negatives_past_pi_minus_m_are_above_the_raw_cos_theta_plus_m():
  # The authors' mask compares with cos(theta_y + m) as it is: the class at -0.97 is not hard
  # (it would be against the continued target), the one at -0.9 is.
  labels = np.array([0])
  losses, t = margins.curricularface_loss(PAST_PI_X, PAST_PI_W, labels, 0.3, scale=8.0)
  want, want_t = reference.curricularface(PAST_PI_X, PAST_PI_W, labels, t=0.3, scale=8.0)
  np.testing.assert_allclose(losses, want, rtol=1e-5)
  np.testing.assert_allclose(t, want_t, rtol=1e-6)


def test_elasticface_arc_target_past_pi_minus_m_is_the_raw_cos_theta_plus_m():
  # As the authors' code: cos(theta_y + m_i) without ArcFace's continuation.
  labels, key = np.array([0]), jax.random.key(0)
  got = margins.elasticface_loss(PAST_PI_X, PAST_PI_W, labels, key, scale=8.0, sigma=0.0)
  want = reference.elasticface(PAST_PI_X, PAST_PI_W, labels, [0.5], scale=8.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("easy_margin", [True, False])
def test_mv_softmax_arc_mask_past_pi_minus_m_is_the_raw_cos_theta_plus_m(easy_margin):
  # As CurricularFace's: the authors' mask compares with cos(theta_y + m) = -0.955 as it is, not
  # with the target's continuation (-1.22), so the class at -0.97 is not mis-classified and the
  # one at -0.9 is, whichever target the easy margin picks. (Without the class at 0.3, whose
  # logit would hide the others'; t = 0.5 sets the two masks' losses 0.03 apart.)
  labels, w = np.array([0]), PAST_PI_W[:3]
  kwargs = dict(scale=8.0, margin=0.5, t=0.5, kind="arc", easy_margin=easy_margin)
  got = margins.mv_softmax_loss(PAST_PI_X, w, labels, **kwargs)
  np.testing.assert_allclose(got, reference.mv_softmax(PAST_PI_X, w, labels, **kwargs), rtol=1e-5)


@pytest.mark.parametrize("kind,plus", [("arc", False), ("cos", False), ("arc", True),
                                       ("cos", True)])
def test_elasticface_draws_margins_from_key(kind, plus):
  x, w, labels = make_inputs(seed=1)
  # ElasticFace+ gives the smallest margin to the largest target cosine (the paper), not draws
  # sorted and indexed by that order (the authors' code): these differ only where the order is
  # not its own inverse, as here (seed 0's was).
  unit_x = x / np.linalg.norm(x, axis=1, keepdims=True)
  unit_w = w / np.linalg.norm(w, axis=1, keepdims=True)
  order = np.argsort(-np.sum(unit_x * unit_w[labels], axis=1))
  assert not np.array_equal(order, np.argsort(order))
  key = jax.random.key(3)
  draws = 0.5 + 0.1 * np.asarray(jax.random.normal(key, (B,), jnp.float32), np.float64)
  got = margins.elasticface_loss(x, w, labels, key, margin=0.5, sigma=0.1, kind=kind, plus=plus)
  want = reference.elasticface(x, w, labels, draws, kind=kind, plus=plus)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4)
  other = margins.elasticface_loss(x, w, labels, jax.random.key(4), sigma=0.1, kind=kind)
  assert not np.allclose(got, other)


def test_psi_is_monotone_and_continuous():
  theta = np.linspace(0, np.pi, 2001)
  for m in (1, 2, 3, 4, 5):
    values = np.asarray(margins.multiplicative_psi(jnp.asarray(np.cos(theta), jnp.float32), m))
    np.testing.assert_allclose(values, reference.psi(np.cos(theta), m), atol=2e-4)
    assert np.all(np.diff(values) <= 1e-5)
    assert np.max(np.abs(np.diff(values))) < 0.02 * m


def test_a_multiplicative_margin_of_1_is_plain_softmax():
  # m = 1 is the smallest integer margin, psi(theta) = cos(theta): L-Softmax is then the softmax
  # without bias, SphereFace the softmax on normalised centres.
  x, w, labels = make_inputs()
  np.testing.assert_allclose(margins.lsoftmax_loss(x, w, labels, margin=1),
                             reference.softmax(x, w, labels), rtol=2e-5, atol=1e-5)
  unit_w = w / np.linalg.norm(w, axis=1, keepdims=True)
  np.testing.assert_allclose(margins.sphereface_loss(x, w, labels, margin=1),
                             reference.softmax(x, unit_w, labels), rtol=2e-5, atol=1e-5)


def test_sphereface_lambda_schedule():
  steps = np.array([0, 1, 100, 1000, 1659, 1700, 100000])
  want = np.maximum(5.0, 1000.0 * (1 + 0.12 * steps) ** -1.0)
  np.testing.assert_allclose(margins.sphereface_lambda(steps), want, rtol=1e-6)


# The published settings (REFERENCE.md; opensphere's SphereFaceR_H for SphereFace-R): each loss
# function's keyword defaults and its Margin's field defaults.
PUBLISHED_DEFAULTS = [
    ((margins.normface_loss, margins.NormFace), dict(scale=16.0)),
    ((margins.lsoftmax_loss, margins.LSoftmax), dict(margin=4)),
    ((margins.sphereface_loss, margins.SphereFace), dict(margin=4)),
    ((margins.cosface_loss, margins.CosFace), dict(scale=64.0, margin=0.35)),
    ((margins.arcface_loss, margins.ArcFace), dict(scale=64.0, margin=0.5)),
    ((margins.subcenter_arcface_loss,), dict(scale=64.0, margin=0.5)),
    ((margins.combined_margin_loss, margins.CombinedMargin), dict(m1=1.0, m2=0.3, m3=0.2)),
    ((margins.curricularface_loss, margins.CurricularFace),
     dict(scale=64.0, margin=0.5, t=0.0, momentum=0.01)),
    ((margins.mv_softmax_loss, margins.MVSoftmax), dict(scale=32.0, margin=0.35, t=0.2)),
    ((margins.adaface_loss,), dict(scale=64.0, margin=0.4, h=0.333, t_alpha=1.0)),
    ((margins.AdaFace,), dict(scale=64.0, margin=0.4, h=0.333, momentum=1.0)),
    ((margins.magface_loss, margins.MagFace),
     dict(scale=64.0, lower_norm=10.0, upper_norm=110.0, lower_margin=0.45, upper_margin=0.8,
          lambda_g=20.0)),
    ((margins.elasticface_loss, margins.ElasticFace), dict(scale=64.0, margin=0.5, sigma=0.0125)),
    ((margins.sphereface2_loss, margins.SphereFace2, margins.sphereface2_bias),
     dict(scale=40.0, margin=0.4, t=3.0, alpha=0.7)),
    ((margins.spherefacer_loss, margins.SphereFaceR), dict(scale=30.0, margin=1.5, kind="v0")),
    ((margins.sphereface_lambda,), dict(base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0)),
]


@pytest.mark.parametrize("targets,published", PUBLISHED_DEFAULTS,
                         ids=[t[0].__name__ for t, _ in PUBLISHED_DEFAULTS])
def test_defaults_are_the_published_settings(targets, published):
  for target in targets:
    if dataclasses.is_dataclass(target):
      defaults = {f.name: f.default for f in dataclasses.fields(target)}
    else:
      defaults = {name: p.default for name, p in inspect.signature(target).parameters.items()}
    assert {name: defaults[name] for name in published} == published, target.__name__


# Every keyword of a loss function away from its default at once, against the reference given
# the same values: a keyword the function did not hand to its margin (which would then run at
# the margin's default) shows. (The value cases above leave most of these at their defaults.)
KEYWORD_CASES = [
    ("adaface",
     lambda x, w, y, **kw: margins.adaface_loss(x, w, y, margins.AdaFaceState(15.0, 40.0), **kw)[0],
     lambda x, w, y, **kw: reference.adaface(x, w, y, 15.0, 40.0, **kw)[0],
     dict(scale=16.0, margin=0.3, h=0.6, t_alpha=0.4)),
    ("magface", margins.magface_loss, reference.magface,
     dict(scale=16.0, lower_norm=5.0, upper_norm=60.0, lower_margin=0.3, upper_margin=0.6,
          lambda_g=5.0, easy_margin=False)),
    ("curricularface", lambda x, w, y, **kw: margins.curricularface_loss(x, w, y, 0.3, **kw)[0],
     lambda x, w, y, **kw: reference.curricularface(x, w, y, t=0.3, **kw)[0],
     dict(scale=16.0, margin=0.4, momentum=0.2)),
    ("mv_softmax", margins.mv_softmax_loss, reference.mv_softmax,
     dict(scale=16.0, margin=0.3, t=0.25, kind="arc", adaptive=False, easy_margin=False)),
]


@pytest.mark.parametrize("loss_fn,reference_fn,kwargs", [c[1:] for c in KEYWORD_CASES],
                         ids=[c[0] for c in KEYWORD_CASES])
def test_every_keyword_of_a_loss_function_reaches_its_margin(loss_fn, reference_fn, kwargs):
  x, w, labels = make_inputs(norm_scale=10.0)
  np.testing.assert_allclose(loss_fn(x, w, labels, **kwargs),
                             reference_fn(x, w, labels, **kwargs), rtol=2e-5, atol=2e-4)


# ---------------------------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------------------------

GRAD_CASES = [
    (margins.softmax_loss, {}), (margins.normface_loss, {}),
    (margins.lsoftmax_loss, {"margin": 3}), (margins.sphereface_loss, {"annealing": 1.0}),
    (margins.cosface_loss, {"scale": 8.0}), (margins.arcface_loss, {"scale": 8.0}),
    (margins.arcface_loss, {"scale": 8.0, "easy_margin": True}),
    (margins.combined_margin_loss, {"scale": 8.0}), (margins.magface_loss, {"scale": 8.0}),
    (margins.mv_softmax_loss, {"scale": 8.0}),
    (margins.mv_softmax_loss, {"scale": 8.0, "kind": "arc", "easy_margin": False}),
]


@pytest.mark.parametrize("loss_fn,kwargs", GRAD_CASES,
                         ids=[f"{f.__name__}{k}" for f, k in GRAD_CASES])
def test_gradients_match_finite_differences(loss_fn, kwargs):
  x, w, labels = make_inputs(seed=1, norm_scale=12.0 if loss_fn is margins.magface_loss else 1.0)
  with jax.enable_x64(True):
    x64, w64 = jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64)
    fn = lambda x_, w_: loss_fn(x_, w_, jnp.asarray(labels), **kwargs)  # noqa: E731
    check_grads(fn, (x64, w64), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_stateful_and_subcenter_gradients_match_finite_differences():
  # The papers detach the batch statistics (CurricularFace's t, AdaFace's norms), which finite
  # differences would see move: freeze them (momentum 0) to compare the rest of the gradient.
  with jax.enable_x64(True):
    x, w, labels = make_inputs(seed=2)
    x, w = jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64)
    curricular = lambda x_, w_: margins.curricularface_loss(  # noqa: E731
        x_, w_, labels, 0.2, scale=8.0, momentum=0.0)[0]
    check_grads(curricular, (x, w), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)
    state = margins.AdaFaceState(norm_mean=2.0, norm_std=1.0)
    ada = lambda w_: margins.adaface_loss(x, w_, labels, state, scale=8.0, t_alpha=0.0)[0]  # noqa
    check_grads(ada, (w,), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)
    _, w3, _ = make_inputs(seed=2, subcenters=3)
    sub = lambda x_, w_: margins.subcenter_arcface_loss(x_, w_, labels, scale=8.0)  # noqa: E731
    check_grads(sub, (x, jnp.asarray(w3, jnp.float64)), order=1, modes=["rev"], atol=1e-5,
                rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Edge cases in every dtype: cos = +-1, zero vectors, huge and tiny norms, duplicate centres.
# ---------------------------------------------------------------------------------------------

ALL_LOSSES = [
    ("softmax", lambda x, w, y: margins.softmax_loss(x, w, y)),
    ("normface", lambda x, w, y: margins.normface_loss(x, w, y)),
    ("lsoftmax", lambda x, w, y: margins.lsoftmax_loss(x, w, y)),
    ("sphereface", lambda x, w, y: margins.sphereface_loss(x, w, y, annealing=5.0)),
    ("sphereface_scaled", lambda x, w, y: margins.sphereface_loss(x, w, y, scale=30.0)),
    ("cosface", lambda x, w, y: margins.cosface_loss(x, w, y)),
    ("arcface", lambda x, w, y: margins.arcface_loss(x, w, y)),
    ("arcface_easy", lambda x, w, y: margins.arcface_loss(x, w, y, easy_margin=True)),
    ("arcface_detach", lambda x, w, y: margins.arcface_loss(x, w, y, detach_margin=True)),
    ("combined", lambda x, w, y: margins.combined_margin_loss(x, w, y)),
    ("curricularface", lambda x, w, y: margins.curricularface_loss(x, w, y, 0.5)[0]),
    ("adaface", lambda x, w, y: margins.adaface_loss(x, w, y)[0]),
    ("magface", lambda x, w, y: margins.magface_loss(x, w, y)),
    ("mv_softmax", lambda x, w, y: margins.mv_softmax_loss(x, w, y)),
    ("mv_softmax_arc", lambda x, w, y: margins.mv_softmax_loss(x, w, y, kind="arc",
                                                               easy_margin=False)),
    ("elasticface", lambda x, w, y: margins.elasticface_loss(x, w, y, jax.random.key(0))),
    ("spherefacer", lambda x, w, y: margins.spherefacer_loss(x, w, y, margin=1.7)),
    ("spherefacer_v2", lambda x, w, y: margins.spherefacer_loss(x, w, y, kind="v2")),
    ("sphereface2", lambda x, w, y: margins.sphereface2_loss(x, w, y, 1.0)),
    ("sphereface2_arc", lambda x, w, y: margins.sphereface2_loss(x, w, y, 1.0, kind="arc")),
]


def edge_inputs(case, dtype):
  """Embeddings/centres hitting one numerical edge; labels [0, 1, 2, 0]."""
  e = np.eye(4, 3)
  w = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]])
  if case == "cos_plus_one":  # x exactly along its centre
    x = np.array([[2.0, 0, 0], [0, 3, 0], [0, 0, 0.5], [1, 0, 0]])
  elif case == "cos_minus_one":  # x exactly opposite its centre
    x = -np.array([[2.0, 0, 0], [0, 3, 0], [0, 0, 0.5], [1, 0, 0]])
  elif case == "zero_embeddings":
    x = np.zeros((4, 3)); x[3] = [1.0, 0, 0]
  elif case == "zero_centres":
    x = e + 0.1; w = w.copy(); w[0] = 0; w[2] = 0
  elif case == "huge_norms":
    big = {"float16": 3e2, "bfloat16": 1e15, "float32": 1e15}[dtype]
    x = (e + 0.1) * big; w = w * big
  elif case == "tiny_norms":
    tiny = {"float16": 1e-4, "bfloat16": 1e-30, "float32": 1e-30}[dtype]
    x = (e + 0.1) * tiny; w = w * tiny
  elif case == "duplicate_centres":
    x = e + 0.1; w = np.stack([w[0], w[0], w[0], w[0]])
  else:
    raise ValueError(case)
  return (jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.array([0, 1, 2, 0], jnp.int32))


EDGE_CASES = ["cos_plus_one", "cos_minus_one", "zero_embeddings", "zero_centres", "huge_norms",
              "tiny_norms", "duplicate_centres"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_edge_cases_finite_values_and_gradients(dtype):
  # All cases stacked and all losses in one program: one compilation per dtype.
  xs, ws, ys = (jnp.stack(parts) for parts in zip(*(edge_inputs(c, dtype) for c in EDGE_CASES)))

  def values_and_grads(x, w, y):
    return {name: jax.value_and_grad(lambda x_, w_: fn(x_, w_, y).sum(), argnums=(0, 1))(x, w)
            for name, fn in ALL_LOSSES}

  results = jax.jit(jax.vmap(values_and_grads))(xs, ws, ys)
  for name, (values, grads) in results.items():
    for g in grads:
      assert g.dtype == jnp.dtype(dtype)
    for i, case in enumerate(EDGE_CASES):
      assert np.isfinite(float(values[i])), (name, case, dtype)
      for g in grads:
        assert np.all(np.isfinite(np.asarray(g[i], np.float32))), (name, case, dtype)


@pytest.mark.parametrize("x_dtype,w_dtype", [("float16", "float32"), ("float32", "float16")])
def test_float16_beside_float32_floors_the_norms_for_float16(x_dtype, w_dtype):
  # A float16 backbone's embeddings with float32 centres, or the reverse: the norms are floored
  # for float16, as when both are float16. With float32's floor (1e-12) a zero vector's gradient,
  # cast back to float16, was inf.
  for case in ("zero_embeddings", "zero_centres"):
    x, w, y = edge_inputs(case, "float16")
    x, w = x.astype(x_dtype), w.astype(w_dtype)
    for engine in (margins.dense(), margins.chunked(2)):
      grads = jax.grad(lambda x_, w_: engine(x_, w_, y, margins.ArcFace())[0].sum(),
                       argnums=(0, 1))(x, w)
      for g in grads:
        assert np.isfinite(np.asarray(g, np.float32)).all(), (case, engine)


def test_bfloat16_embeddings_beside_float16_centres_compute_in_float32():
  # Neither 16-bit format holds the other: the mix is computed in float32, so the loss is the
  # float64 reference's on the same (exactly widened) values, as for float32 inputs.
  x, w, labels = make_inputs()
  x16, w16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.float16)
  want = reference.arcface(np.asarray(x16, np.float64), np.asarray(w16, np.float64), labels)
  got = jax.jit(margins.arcface_loss)(x16, w16, labels)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_margins_on_low_precision_rows_have_finite_gradients_at_cos_one(dtype):
  # The engines build Rows in float32; a margin applied to a user's own bfloat16 Rows must hold
  # too (AdaFace's clip below 1 - 1e-3 rounded to 1 in bfloat16: NaN and inf gradients).
  cos = jnp.array([1.0, -1.0, 0.3], dtype)
  for margin in [margins.AdaFace(), margins.ArcFace(), margins.CombinedMargin(),
                 margins.CosFace(), margins.CurricularFace(),
                 margins.ElasticFace(key=jax.random.key(0)), margins.LSoftmax(),
                 margins.MVSoftmax(), margins.MagFace(), margins.NormFace(), margins.Softmax(),
                 margins.SphereFace(), margins.SphereFace2(bias=0.0), margins.SphereFaceR()]:
    def target_sum(cos, margin=margin):
      rows = margins.Rows(cos, embedding_norm=jnp.full(3, 20.0, dtype),
                          weight_norm=jnp.ones(3, dtype))
      return margin.target_logit(rows).astype(jnp.float32).sum()
    value, grad = jax.value_and_grad(target_sum)(cos)
    assert grad.dtype == dtype, type(margin).__name__
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad, np.float32)).all(), (
        type(margin).__name__, grad)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_close_to_float32(dtype):
  x, w, labels = make_inputs(seed=4)
  for name, loss_fn in ALL_LOSSES:
    full = loss_fn(x, w, labels)
    low = loss_fn(jnp.asarray(x, dtype), jnp.asarray(w, dtype), labels)
    assert low.dtype == jnp.float32
    # Bounds near the largest errors measured here (bfloat16 0.16, float16 0.016, on losses up
    # to ~140): float16 softmax statistics (0.024) fail; in bfloat16 the inputs' rounding
    # dominates, whatever the statistics' precision.
    rtol, atol = {"bfloat16": (5e-3, 0.05), "float16": (5e-4, 5e-3)}[dtype]
    np.testing.assert_allclose(low, full, rtol=rtol, atol=atol, err_msg=name)


def test_cos_plus_one_has_exact_value():
  x, w, labels = edge_inputs("cos_plus_one", "float32")
  got = margins.arcface_loss(x, w, labels, scale=8.0)
  np.testing.assert_allclose(got, reference.arcface(x, w, labels, scale=8.0), rtol=1e-5, atol=1e-6)


def test_huge_scale_is_finite():
  x, w, labels = make_inputs()
  for scale in (1e3, 1e4):
    value, grad = jax.value_and_grad(
        lambda x_: margins.arcface_loss(x_, w, labels, scale=scale).sum())(x)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(margins.arcface_loss(x, w, labels, scale=scale),
                               reference.arcface(x, w, labels, scale=scale), rtol=1e-4)


def test_a_float32_annealing_anneals_a_users_own_float64_rows():
  # The engines hand a margin its fields in the rows' dtype; a margin applied to a user's own
  # float64 Rows casts the float32 schedule itself (strict promotion refuses the mix).
  with jax.enable_x64(True):
    cos = np.array([0.9, 0.2, -0.6])
    rows = margins.Rows(jnp.asarray(cos), embedding_norm=jnp.full(3, 2.0, jnp.float64),
                        weight_norm=jnp.ones(3, jnp.float64))
    for margin in (margins.SphereFace(margin=3, annealing=margins.sphereface_lambda(1000)),
                   margins.LSoftmax(margin=3, annealing=margins.sphereface_lambda(1000))):
      got = margin.target_logit(rows)
      lam = 1000.0 / (1 + 0.12 * 1000)
      want = 2.0 * (lam * cos + reference.psi(cos, 3)) / (1 + lam)
      assert got.dtype == jnp.float64
      np.testing.assert_allclose(got, want, rtol=1e-6)


def test_float64_with_x64():
  with jax.enable_x64(True):
    x, w, labels = make_inputs()
    got = margins.arcface_loss(jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64), labels)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, reference.arcface(x, w, labels), rtol=1e-10)
    # A float32 annealing schedule anneals float64 inputs (strict promotion would refuse a mix).
    got = margins.sphereface_loss(jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64), labels,
                                  annealing=margins.sphereface_lambda(0))
    np.testing.assert_allclose(got, reference.sphereface(x, w, labels, annealing=1000.0),
                               rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Transformations and bad input.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,loss_fn", ALL_LOSSES, ids=[n for n, _ in ALL_LOSSES])
def test_jit_and_vmap_agree_with_eager(name, loss_fn):
  del name
  xs, ws, ys = zip(*(make_inputs(seed=s, norm_scale=20.0) for s in range(3)))
  xs, ws, ys = np.stack(xs), np.stack(ws), np.stack(ys)
  eager = np.stack([loss_fn(x, w, y) for x, w, y in zip(xs, ws, ys)])
  np.testing.assert_allclose(jax.vmap(loss_fn)(xs, ws, ys), eager, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(loss_fn)(xs[0], ws[0], ys[0]), eager[0], rtol=1e-5,
                             atol=1e-5)


def test_hessian_equals_a_plain_jax_loss_without_custom_derivatives():
  # Forward over reverse (jax.hessian) runs through the normalised scores' custom_vjp: ArcFace
  # written directly in jnp, differentiated by JAX alone, gives the same second derivatives.
  x, w, labels = make_inputs(norm_scale=3.0)
  scale, margin = 8.0, 0.5

  def plain(x, w):
    cos = (x / jnp.linalg.norm(x, axis=1, keepdims=True)) @ (
        w / jnp.linalg.norm(w, axis=1, keepdims=True)).T
    theta = jnp.arccos(cos[jnp.arange(B), labels])
    logits = scale * cos.at[jnp.arange(B), labels].set(jnp.cos(theta + margin))
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(B), labels])

  def package(x, w):
    return jnp.mean(margins.arcface_loss(x, w, labels, scale=scale, margin=margin))

  assert np.all(np.arccos(reference.cosines(x, w)[np.arange(B), labels]) + margin < np.pi)
  got, want = (jax.jit(jax.hessian(f, argnums=(0, 1)))(x, w) for f in (package, plain))
  for got_block, want_block in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(got_block, want_block, rtol=1e-4, atol=1e-5)


def test_out_of_range_label_raises_when_concrete():
  x, w, labels = make_inputs()
  for bad in (C, -1):
    labels_bad = labels.copy(); labels_bad[3] = bad
    with pytest.raises(ValueError, match="labels"):
      margins.arcface_loss(x, w, labels_bad)


@pytest.mark.parametrize("engine", [margins.dense(), margins.chunked(3)], ids=["dense", "chunked"])
def test_out_of_range_unsigned_label_is_reported_as_given(engine):
  x, w, labels = make_inputs()
  labels_bad = labels.astype(np.uint32); labels_bad[3] = 2**32 - 1  # -1 once cast to int32
  with pytest.raises(ValueError, match=re.escape(f"got [{2**32 - 1}] at positions [3]")):
    engine(x, w, labels_bad, margins.ArcFace())


def test_out_of_range_label_is_nan_under_jit():
  x, w, labels = make_inputs()
  labels_bad = labels.copy(); labels_bad[3] = C + 5
  for _, loss_fn in ALL_LOSSES:
    got = np.asarray(jax.jit(loss_fn)(x, w, labels_bad))
    assert np.isnan(got[3]) and np.all(np.isfinite(np.delete(got, 3)))


def test_a_uint64_label_past_int32_is_nan_under_jit_with_x64():
  # Signed for the comparisons, but not cut to int32: the label 2**32 + 1 would wrap to the
  # valid class 1 and be scored as it.
  x, w, labels = make_inputs()
  labels_bad = labels.astype(np.uint64)
  labels_bad[3] = 2**32 + 1
  with jax.enable_x64(True):
    got = np.asarray(jax.jit(margins.arcface_loss)(x, w, labels_bad))
  assert np.isnan(got[3]) and np.all(np.isfinite(np.delete(got, 3)))


@pytest.mark.parametrize("label_dtype", [np.int32, np.uint32])
def test_batch_statistics_leave_out_examples_with_out_of_range_labels(label_dtype):
  # Under jit an out-of-range label's loss is NaN, and CurricularFace's t and AdaFace's norm
  # statistics are those of the other examples. (Unsigned labels must not turn the engines' -1,
  # "no valid class", into a huge valid-looking label.)
  x, w, labels = make_inputs(norm_scale=10.0)
  labels_bad = labels.astype(label_dtype); labels_bad[3] = C + 5
  keep = np.delete(np.arange(B), 3)
  _, t = jax.jit(margins.curricularface_loss)(x, w, labels_bad, 0.3)
  _, want_t = reference.curricularface(x[keep], w, labels[keep], t=0.3)
  np.testing.assert_allclose(t, want_t, rtol=1e-6)
  state = margins.AdaFaceState(norm_mean=15.0, norm_std=40.0)
  _, new_state = jax.jit(functools.partial(margins.adaface_loss, t_alpha=0.3))(
      x, w, labels_bad, state)
  _, want_state = reference.adaface(x[keep], w, labels[keep], 15.0, 40.0, t_alpha=0.3)
  np.testing.assert_allclose(new_state, want_state, rtol=1e-5)
  # No valid example: the state stays.
  _, t = jax.jit(margins.curricularface_loss)(x, w, np.full(B, C, np.int32), 0.3)
  assert t == np.float32(0.3)
  _, new_state = jax.jit(functools.partial(margins.adaface_loss, t_alpha=0.3))(
      x, w, np.full(B, C, np.int32), state)
  np.testing.assert_array_equal(new_state, (15.0, 40.0))


@pytest.mark.parametrize("dtype,num_classes", [(np.uint8, 256), (np.int8, 300), (np.int16, 70000)])
def test_narrow_integer_labels_equal_int32_labels(dtype, num_classes):
  # Every label is valid: comparing them with the class count must not wrap in their dtype.
  x, w, labels = make_inputs(classes=num_classes)
  largest = np.iinfo(dtype).max
  labels = labels % (largest + 1)
  labels[2] = largest
  want = margins.arcface_loss(x, w, labels)
  for loss_fn in (margins.arcface_loss, jax.jit(margins.arcface_loss)):
    np.testing.assert_allclose(loss_fn(x, w, labels.astype(dtype)), want, rtol=1e-6)
  np.testing.assert_array_equal(margins.arcface_loss(x, w, labels.tolist()), want)  # a list
  # A list of labels under jit or vmap is a list of tracers (np.asarray raised on them).
  traced = jax.jit(lambda x_, *ys: margins.arcface_loss(x_, w, list(ys)))(x, *labels.tolist())
  np.testing.assert_allclose(traced, want, rtol=1e-6)


@pytest.mark.parametrize("x_shape,w_shape,labels,error,match", [
    ((B,), (C, D), np.zeros(B, np.int32), ValueError, "embeddings"),
    ((B, D, 1), (C, D), np.zeros(B, np.int32), ValueError, "embeddings"),
    ((B, D), (C,), np.zeros(B, np.int32), ValueError, "weights"),
    ((B, D), (C, D + 1), np.zeros(B, np.int32), ValueError, "dimension"),
    # No class or no feature: an error, not NaN or a ZeroDivisionError deep in an engine.
    ((B, D), (0, D), np.zeros(B, np.int32), ValueError, r"shape \(0, 5\); every dimension"),
    ((B, 0), (C, 0), np.zeros(B, np.int32), ValueError, r"every dimension must be at least 1"),
    ((B, D), (C, D), np.zeros(B, np.float32), TypeError, "labels"),
    ((B, D), (C, D), np.zeros(B + 1, np.int32), ValueError, "labels"),
    ((B, D), (C, D), np.zeros((B, 1), np.int32), ValueError, "labels"),
])
def test_bad_input_is_named(x_shape, w_shape, labels, error, match):
  x, w = np.ones(x_shape, np.float32), np.ones(w_shape, np.float32)
  with pytest.raises(error, match=match):
    margins.arcface_loss(x, w, labels)


def test_floating_inputs_given_as_lists_are_named():
  # Integer labels may be a list; embeddings, centres and a bias are arrays (JAX's own error
  # would say only "Cannot determine dtype of [...]").
  x, w, labels = np.ones((B, D), np.float32), np.ones((C, D), np.float32), [0] * B
  for name, call in (("embeddings", lambda: margins.arcface_loss(x.tolist(), w, labels)),
                     ("weights", lambda: margins.arcface_loss(x, w.tolist(), labels)),
                     ("bias", lambda: margins.softmax_loss(x, w, labels, bias=[0.0] * C))):
    with pytest.raises(TypeError, match=f"`{name}` must be a floating array, got a list"):
      call()


def test_bad_types_and_hyperparameters():
  x, w, labels = make_inputs()
  with pytest.raises(TypeError, match="embeddings"):
    margins.cosface_loss(x.astype(np.int32), w, labels)
  with pytest.raises(ValueError, match="integer"):
    margins.lsoftmax_loss(x, w, labels, margin=2.5)
  with pytest.raises(ValueError, match="integer"):
    margins.sphereface_loss(x, w, labels, margin=0)
  with pytest.raises(ValueError, match="integer"):  # bool is an int, but not a margin.
    margins.lsoftmax_loss(x, w, labels, margin=True)
  with pytest.raises(ValueError, match=r"`t` of CurricularFace must be a scalar, got shape \(6,\)"):
    margins.curricularface_loss(x, w, labels, jnp.zeros(6))
  with pytest.raises(ValueError, match="`norm_std` of AdaFace must be a scalar"):
    margins.adaface_loss(x, w, labels, margins.AdaFaceState(norm_std=jnp.ones(C)))
  for alpha in 0.0, 1.0:
    with pytest.raises(ValueError, match=r"`alpha` must lie in \(0, 1\)"):
      margins.sphereface2_bias(10, alpha=alpha)
  with pytest.raises(ValueError, match="kind"):
    margins.elasticface_loss(x, w, labels, jax.random.key(0), kind="sphere")
  with pytest.raises(ValueError, match="bias"):
    margins.softmax_loss(x, w, labels, bias=np.zeros(C + 1, np.float32))
  with pytest.raises(ValueError, match="weights"):
    margins.subcenter_arcface_loss(x, w, labels)
  for name, loss_fn in ALL_LOSSES:  # [C, D] losses; sub-centres go through an engine.
    with pytest.raises(ValueError, match=r"`weights` must be \[C, D\], got shape \(7, 2, 5\)"):
      loss_fn(x, np.stack([w, w], axis=1), labels)
  with pytest.raises(ValueError, match="kind"):
    margins.sphereface2_loss(x, w, labels, 0.0, kind="additive")
  with pytest.raises(ValueError, match="kind"):
    margins.spherefacer_loss(x, w, labels, kind="v3")
  with pytest.raises(ValueError, match="bias"):
    margins.sphereface2_loss(x, w, labels, np.zeros(C, np.float32))
  with pytest.raises(ValueError, match="2 classes"):
    margins.sphereface2_bias(1)
  with pytest.raises(TypeError, match="bias"):
    margins.sphereface2_loss(x, w, labels, jnp.zeros((), jnp.int32))
  np.testing.assert_array_equal(margins.sphereface2_loss(x, w, labels, 0),  # a Python int is fine
                                margins.sphereface2_loss(x, w, labels, 0.0))
  for scale in (0.0, -64.0):  # A negative scale trains away from the classes.
    with pytest.raises(ValueError,
                       match=f"`scale` of ArcFace must be positive and finite, got {scale}"):
      margins.arcface_loss(x, w, labels, scale=scale)
  with pytest.raises(ValueError, match=r"`scale` of CosFace must be a scalar, got shape \(6,\)"):
    margins.cosface_loss(x, w, labels, scale=jnp.full(B, 64.0))
  with pytest.raises(TypeError, match=r"`state` must be a margins.AdaFaceState\(norm_mean, "
                     r"norm_std\), got a tuple"):
    margins.adaface_loss(x, w, labels, (20.0, 100.0))
  with pytest.raises(TypeError, match="`easy_margin` of ArcFace must be a bool, got 'yes'"):
    margins.arcface_loss(x, w, labels, easy_margin="yes")
  # A learnt scale kept as a [1] parameter works on every engine, here under rank promotion
  # "raise" (conftest), with its gradient, and comes back [1]; and 1 for True works as True.
  mesh = jax.make_mesh((2,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
  padded = np.pad(w, ((0, margins.padded_num_classes(C, 2) - C), (0, 0)))
  for engine, rows in ((margins.dense(), w), (margins.chunked(chunk_size=3), w),
                       (margins.sharded(mesh, "model"), padded)):
    def loss_fn(scale, engine=engine, rows=rows):
      losses, margin = engine(x, rows, labels, margins.ArcFace(scale=scale), num_classes=C)
      return jnp.mean(losses), margin.scale

    with jax.set_mesh(mesh):
      (loss, returned), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.full(1, 2.0))
    expected, expected_grad = jax.value_and_grad(
        lambda s: jnp.mean(margins.arcface_loss(x, w, labels, scale=s)))(2.0)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(grad, [expected_grad], rtol=1e-5)
    assert returned.shape == (1,)
  np.testing.assert_array_equal(margins.arcface_loss(x, w, labels, easy_margin=1),
                                margins.arcface_loss(x, w, labels, easy_margin=True))
  with pytest.raises(TypeError, match="`easy_margin` of ArcFace is static"):
    margins.arcface_loss(x, w, labels, easy_margin=jnp.array(True))

  class Undecorated(margins.CosFace):  # Was JAX's "cannot interpret as an abstract array".
    pass

  with pytest.raises(TypeError, match="Undecorated must be decorated with "
                     r"@margins.margin_dataclass \(a subclass of a margin too\)"):
    margins.dense()(x, w, labels, Undecorated())

  @margins.margin_dataclass
  class PerExampleCosFace(margins.Margin):  # One leaf, a NumPy array: a decorated margin.
    margin: np.ndarray

    def target_logit(self, rows):
      return 16.0 * (rows.cos - self.margin)

  per_example = PerExampleCosFace(np.linspace(0.0, 0.3, B))
  assert np.isfinite(margins.dense()(x, w, labels, per_example)[0]).all()


def test_an_angular_margin_of_a_half_turn_or_more_is_refused():
  # An angle in degrees (ArcFace's 0.5 as 28.6) used to give a loss of 0 without a word.
  x, w, labels = make_inputs()
  refused = [
      (lambda: margins.arcface_loss(x, w, labels, margin=28.6), "margin` of ArcFace"),
      (lambda: margins.combined_margin_loss(x, w, labels, m2=-30.0), "m2` of CombinedMargin"),
      (lambda: margins.magface_loss(x, w, labels, upper_margin=45.0), "upper_margin` of MagFace"),
      (lambda: margins.mv_softmax_loss(x, w, labels, margin=20.0, kind="arc"), "of MVSoftmax"),
      (lambda: margins.curricularface_loss(x, w, labels, 0.0, margin=np.pi), "CurricularFace"),
      (lambda: margins.elasticface_loss(x, w, labels, jax.random.key(0), margin=np.full(B, 4.0)),
       "of ElasticFace"),
      (lambda: margins.sphereface2_loss(x, w, labels, 1.0, margin=28.6, kind="arc"), "SphereFace2"),
      (lambda: margins.dense()(x, w, labels, margins.AdaFace(margin=20.0)), "of AdaFace")]
  for loss, name in refused:
    with pytest.raises(ValueError, match=rf"{name}.* must be an angle in radians, in \(-pi, pi\)"):
      loss()
  # Negative margins, per-example margins and cosine margins of any size still run.
  per_example = np.linspace(-3.1, 3.1, B).astype(np.float32)
  for loss in (lambda: margins.arcface_loss(x, w, labels, margin=-0.3),
               lambda: margins.elasticface_loss(x, w, labels, jax.random.key(0), sigma=0.0,
                                                margin=per_example),
               lambda: margins.mv_softmax_loss(x, w, labels, margin=2.0, kind="cos"),
               lambda: margins.sphereface2_loss(x, w, labels, 1.0, margin=2.0, kind="cos")):
    assert np.isfinite(loss()).all()


@pytest.mark.parametrize("loss_fn,flag", [
    (margins.arcface_loss, "easy_margin"), (margins.magface_loss, "easy_margin"),
    (functools.partial(margins.elasticface_loss, key=jax.random.key(0)), "plus")])
def test_a_traced_flag_is_named_and_leaves_later_calls_working(loss_fn, flag):
  # A flag traced by jit is refused before the engine's jit sees it: placed in that jit's cache
  # key, the tracer used to make every later call of the margin's class fail, eager ones too.
  x, w, labels = make_inputs()
  with pytest.raises(TypeError, match=f"`{flag}` of .* is static .* pass it with static_argnames"):
    jax.jit(loss_fn)(x, w, labels, **{flag: True})
  want = loss_fn(x, w, labels, **{flag: True})
  got = jax.jit(loss_fn, static_argnames=flag)(x, w, labels, **{flag: True})
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert np.isfinite(loss_fn(x, w, labels)).all()


@pytest.mark.parametrize("make, field, values", [
    (lambda **f: margins.MVSoftmax(**f), "t", np.linspace(0.0, 0.4, 6)),
    (lambda **f: margins.MVSoftmax(adaptive=False, **f), "t", np.linspace(0.0, 0.4, 6)),
    (lambda **f: margins.SphereFace2(bias=0.5, **f), "margin", np.linspace(0.1, 0.5, 6)),
    (lambda **f: margins.SphereFace2(bias=0.5, **f), "t", np.linspace(1.0, 4.0, 6)),
    (lambda **f: margins.SphereFace2(**f), "bias", np.linspace(-2.0, 2.0, 6)),
    (lambda **f: margins.SphereFaceR(kind="v2", **f), "margin", np.linspace(1.1, 2.0, 6)),
])
def test_a_per_example_field_scores_each_example_with_its_own_value(make, field, values):
  # Those the non-target logits read were laid across the classes: with as many classes as
  # examples, silently wrong losses (17 apart for MV-Softmax's t); else a broadcasting error.
  # The margins' code is the engines': chunked, in chunks of 4 of the 6 classes, runs it.
  engine = margins.chunked(chunk_size=4)
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
  labels = jnp.arange(6)

  @jax.jit
  @functools.partial(jax.value_and_grad, argnums=(0, 1))
  def example_loss(x, w, value, i):  # Example i's loss, every example scored with ``value``.
    return engine(x, w, labels, make(**{field: value}))[0][i]

  whole = jax.value_and_grad(lambda x, w: jnp.sum(engine(
      x, w, labels, make(**{field: jnp.asarray(values, jnp.float32)}))[0]), argnums=(0, 1))
  loss, grads = whole(x, w)
  alone = [example_loss(x, w, jnp.float32(value), i) for i, value in enumerate(values)]
  assert float(loss) == pytest.approx(sum(float(one) for one, _ in alone), rel=1e-5)
  for got, each in zip(grads, zip(*(grad for _, grad in alone))):
    np.testing.assert_allclose(got, sum(each), rtol=1e-5, atol=1e-5)


def test_hyperparameters_outside_their_range_and_lists_are_refused():
  # Each used to run: SphereFace-R's m = 0.5 to a loss of about 0, SphereFace2's alpha = 1.5 to
  # negative losses, MagFace's margin slope from norms the wrong way round; a list as a margin
  # failed inside the engine with a tracer's "unsupported operand".
  x, w, labels = make_inputs()
  refused = [
      (lambda: margins.spherefacer_loss(x, w, labels, margin=0.5), "`margin` of SphereFaceR must "
       r"be at least 1"),
      (lambda: margins.sphereface2_loss(x, w, labels, 1.0, alpha=1.5), r"`alpha` of SphereFace2 "
       r"must be a weight in \[0, 1\]"),
      (lambda: margins.elasticface_loss(x, w, labels, jax.random.key(0), sigma=-0.1),
       "`sigma` of ElasticFace must be a standard deviation"),
      (lambda: margins.combined_margin_loss(x, w, labels, m1=0.0), "`m1` of CombinedMargin must "
       "be positive"),
      (lambda: margins.magface_loss(x, w, labels, lower_norm=120.0), "`lower_norm` of MagFace "
       r"\(120.0\) must be below its `upper_norm` \(110.0\)"),
      (lambda: margins.magface_loss(x, w, labels, lower_norm=110.0), "`lower_norm` of MagFace "
       r"\(110.0\) must be below its `upper_norm` \(110.0\)"),  # A slope of 0 / 0: NaN.
      (lambda: margins.sphereface2_loss(x, w, labels, 1.0, t=0.0), "`t` of SphereFace2 must be "
       "positive"),  # Every example had the same loss.
      (lambda: margins.arcface_loss(x, w, labels, scale=np.inf), "`scale` of ArcFace must be "
       "positive and finite, got inf"),  # NaN losses.
  ]
  for loss, message in refused:
    with pytest.raises(ValueError, match=message):
      loss()
  # A per-example field of another length: a bare broadcasting error before.
  for engine in (margins.dense(), margins.chunked(4)):
    with pytest.raises(ValueError, match=rf"`margin` of ArcFace must be one value or one per "
                                         rf"example \({B}\), got shape \(3,\)"):
      engine(x, w, labels, margins.ArcFace(margin=jnp.full(3, 0.5)))
  assert np.isfinite(margins.arcface_loss(x, w, labels, margin=jnp.full(B, 0.5))).all()
  with pytest.raises(ValueError, match="`embeddings` must"):  # Its rank named first.
    margins.dense()(np.float32(1.0), w, labels, margins.ArcFace())

  @margins.margin_dataclass
  class PolynomialTarget(margins.Margin):  # A vector of its own: not a per-example field.
    coefficients: jax.Array = dataclasses.field(default_factory=lambda: jnp.array([1.0, -0.3]))

    def target_logit(self, rows):
      return 16.0 * jnp.polyval(self.coefficients, rows.cos)

  assert np.isfinite(margins.dense()(x, w, labels, PolynomialTarget())[0]).all()
  with pytest.raises(TypeError, match=r"`margin` of CosFace must be a number or an array, got a "
                     r"list: .* \(jnp.asarray\(\[0.1, 0.2"):
    margins.cosface_loss(x, w, labels, margin=[0.1, 0.2, 0.3, 0.1, 0.2, 0.3])
  # A batch statistic's momentum is one for the batch: [B] made CurricularFace's t a [B] vector.
  for margin in (margins.CurricularFace(momentum=jnp.full(B, 0.01)),
                 margins.AdaFace(momentum=jnp.full(B, 0.5))):
    with pytest.raises(ValueError, match="`momentum` of .* must be a scalar"):
      margins.dense()(x, w, labels, margin)

  @margins.margin_dataclass
  class SteppedCosFace(margins.CosFace):  # A static tuple of numbers is a custom margin's own.
    steps: tuple = margins.losses.margin.static_field((0.2, 0.35))

  assert np.isfinite(margins.dense()(x, w, labels, SteppedCosFace())[0]).all()
  # The edges of each range run.
  for loss in (lambda: margins.spherefacer_loss(x, w, labels, margin=1.0),
               lambda: margins.sphereface2_loss(x, w, labels, 1.0, alpha=1.0),
               lambda: margins.elasticface_loss(x, w, labels, jax.random.key(0), sigma=0.0)):
    assert np.isfinite(loss()).all()


def test_a_margin_of_your_own_declares_its_ranges_in_check():
  # Every engine calls the margin's own check (through check_margin) before any other work; a
  # subclass of a zoo margin keeps the zoo's checks, and a value known only under jit passes.
  x, w, labels = make_inputs()

  @margins.margin_dataclass
  class BoundedCosFace(margins.CosFace):
    def check(self):
      super().check()
      margins.losses.margin.require(self, "margin", lambda m: m < 1, "below 1, a cosine's range")

  mesh = jax.make_mesh((2,), ("classes",), devices=jax.devices()[:2])
  for engine in (margins.dense(), margins.chunked(4), margins.dense(sample_rate=0.5),
                 margins.sharded(mesh)):
    with pytest.raises(ValueError, match=r"`margin` of BoundedCosFace must be below 1, a cosine's "
                       r"range, got \[0.2 1.5 "):
      engine(x, w, labels, BoundedCosFace(margin=np.array([0.2, 1.5] * (B // 2))),
             key=jax.random.key(0))
    with pytest.raises(ValueError, match="`scale` of BoundedCosFace must be positive"):
      engine(x, w, labels, BoundedCosFace(scale=0.0), key=jax.random.key(0))
  assert np.isfinite(margins.dense()(x, w, labels, BoundedCosFace(margin=0.5))[0]).all()
  traced = jax.jit(lambda m: margins.dense()(x, w, labels, BoundedCosFace(margin=m))[0])
  assert np.isfinite(traced(2.0)).all()

  @margins.margin_dataclass
  class MyArcFace(margins.ArcFace):
    pass

  with pytest.raises(ValueError, match="`margin` of MyArcFace must be an angle in radians"):
    margins.dense()(x, w, labels, MyArcFace(margin=28.6))


def test_integer_states_come_back_as_floats_on_every_engine():
  # CurricularFace's t = 0 or AdaFace's norm statistics given as integers raised a bare
  # StopIteration: prepare() made the state a float, one more floating leaf than came in.
  x, w, labels = make_inputs()
  key = jax.random.key(0)
  pairs = [(margins.CurricularFace(t=0), margins.CurricularFace(t=0.0)),
           (margins.AdaFace(norm_mean=20, norm_std=jnp.array(100)),
            margins.AdaFace(norm_mean=20.0, norm_std=100.0))]
  for engine in (margins.dense(), margins.chunked(4), margins.dense(sample_rate=0.5)):
    for as_int, as_float in pairs:
      got_losses, got = engine(x, w, labels, as_int, key=key)
      want_losses, want = engine(x, w, labels, as_float, key=key)
      np.testing.assert_allclose(got_losses, want_losses, rtol=1e-6)
      for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert jnp.result_type(got_leaf) == jnp.float32, got
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-6)
  t = margins.curricularface_loss(x, w, labels, 0)[1]
  assert t.dtype == jnp.float32 and t == margins.curricularface_loss(x, w, labels, 0.0)[1]


def test_a_margin_of_your_own_returning_the_wrong_shape_is_named():
  # A target logit reduced over the batch was broadcast over it by the dense engine without a
  # word (another loss), and failed in the chunked engine's scan with no name.
  x, w, labels = make_inputs()

  @margins.margin_dataclass
  class MeanTarget(margins.CosFace):
    def target_logit(self, rows):
      return self.scale * jnp.mean(rows.cos)

  @margins.margin_dataclass
  class ColumnTarget(margins.CosFace):
    def target_logit(self, rows):
      return super().target_logit(rows)[:, None]

  @margins.margin_dataclass
  class RowNontarget(margins.CosFace):
    def nontarget_logits(self, similarity, rows):
      return super().nontarget_logits(similarity, rows)[:1]

  @margins.margin_dataclass
  class ScalarRegularizer(margins.CosFace):
    def regularizer(self, rows):
      return jnp.mean(rows.embedding_norm)

  for engine in (margins.dense(), margins.chunked(4)):
    for margin, method, shape in ((MeanTarget(), "target_logit", r"\(\)"),
                                  (ColumnTarget(), "target_logit", rf"\({B}, 1\)"),
                                  (RowNontarget(), "nontarget_logits", r"\(1, \d+\)"),
                                  (ScalarRegularizer(), "regularizer", r"\(\)")):
      with pytest.raises(ValueError, match=rf"{type(margin).__name__}.{method} must return shape "
                                           rf"\({B},.*\), got {shape}"):
        engine(x, w, labels, margin)
