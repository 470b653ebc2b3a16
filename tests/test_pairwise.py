"""Contrastive, triplet and circle losses against float64 loops over pairs and triplets."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from margins.losses import pairwise
from tests import jaxprs

# Label 2 is a singleton (an anchor without positives); the others have 2-3 examples.
LABELS = np.array([0, 0, 1, 1, 1, 2, 3, 3], np.int32)
B, D = len(LABELS), 4
AVERAGES = ("anchor", "anchor_non_zero", "batch_non_zero", "batch")


def make_embeddings(seed=7, *, batch=B, dim=D, scale=3.0):
  """Seed 7 gives zero and non-zero terms in every mining mode and both semi-hard branches."""
  return (np.random.default_rng(seed).normal(size=(batch, dim)) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Float64 references, one pair or triplet at a time.


def ref_unit(x):
  x = np.asarray(x, np.float64)
  out = np.zeros_like(x)
  for i, row in enumerate(x):
    norm = np.sqrt(np.sum(row * row))
    if norm > 0:
      out[i] = row / norm
  return out


def ref_distance(x, i, j, squared):
  diff = x[i] - x[j]
  squared_distance = float(np.sum(diff * diff))
  return squared_distance if squared else np.sqrt(squared_distance)


def ref_positives(labels, a):
  return [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]


def ref_negatives(labels, a):
  return [n for n in range(len(labels)) if labels[n] != labels[a]]


def ref_average(terms_per_anchor, average):
  """Per-anchor value from each anchor's list of terms."""
  total_non_zero = sum(sum(t > 0 for t in terms) for terms in terms_per_anchor)
  total = sum(len(terms) for terms in terms_per_anchor)
  out = []
  for terms in terms_per_anchor:
    if average == "anchor":
      count = len(terms)
    elif average == "anchor_non_zero":
      count = sum(t > 0 for t in terms)
    elif average == "batch":
      count = total
    else:
      count = total_non_zero
    out.append(sum(terms) / count if count else 0.0)
  return np.array(out)


def ref_contrastive_terms(x, labels, pos_margin, neg_margin, squared, normalize):
  x = ref_unit(x) if normalize else np.asarray(x, np.float64)
  positives, negatives = [], []
  for a in range(len(labels)):
    positives.append([max(ref_distance(x, a, p, squared) - pos_margin, 0.0)
                      for p in ref_positives(labels, a)])
    negatives.append([max(neg_margin - ref_distance(x, a, n, squared), 0.0)
                      for n in ref_negatives(labels, a)])
  return positives, negatives


def ref_contrastive(x, labels, *, pos_margin=0.0, neg_margin=1.0, squared=False, normalize=True,
                    average="anchor"):
  positives, negatives = ref_contrastive_terms(x, labels, pos_margin, neg_margin, squared,
                                               normalize)
  return ref_average(positives, average) + ref_average(negatives, average)


def ref_triplet_terms(x, labels, *, margin, mining, squared, normalize, soft=False):
  """Each anchor's triplet terms, and how many semi-hard choices fell back to the farthest."""
  x = ref_unit(x) if normalize else np.asarray(x, np.float64)
  d = lambda i, j: ref_distance(x, i, j, squared)
  # The term of d(a, p) - d(a, n): the hinge, or Hermans et al.'s soft margin.
  term = (lambda gap: np.log1p(np.exp(gap))) if soft else (lambda gap: max(gap + margin, 0.0))
  terms_per_anchor, fallbacks = [], 0
  for a in range(len(labels)):
    positives, negatives = ref_positives(labels, a), ref_negatives(labels, a)
    terms = []
    if positives and negatives:
      if mining == "all":
        terms = [term(d(a, p) - d(a, n)) for p in positives for n in negatives]
      elif mining == "batch_hard":
        hardest_p = max(d(a, p) for p in positives)
        hardest_n = min(d(a, n) for n in negatives)
        terms = [term(hardest_p - hardest_n)]
      else:
        for p in positives:
          farther = [d(a, n) for n in negatives if d(a, n) > d(a, p)]
          fallbacks += not farther
          chosen = min(farther) if farther else max(d(a, n) for n in negatives)
          terms.append(term(d(a, p) - chosen))
    terms_per_anchor.append(terms)
  return terms_per_anchor, fallbacks


def ref_triplet(x, labels, *, margin=0.2, mining="all", squared=True, normalize=True,
                average="anchor", soft=False):
  terms, _ = ref_triplet_terms(x, labels, margin=margin, mining=mining, squared=squared,
                               normalize=normalize, soft=soft)
  return ref_average(terms, average)


def ref_logsumexp(values):
  top = max(values)
  return top + np.log(sum(np.exp(v - top) for v in values))


def ref_circle(x, labels, *, margin=0.25, gamma=256.0, frozen_at=None):
  """Circle loss; ``frozen_at`` evaluates the weights alpha at other embeddings (gradient stop)."""
  unit = ref_unit(x)
  alpha_unit = unit if frozen_at is None else ref_unit(frozen_at)
  out = []
  for a in range(len(labels)):
    positives, negatives = ref_positives(labels, a), ref_negatives(labels, a)
    if not positives or not negatives:
      out.append(0.0)
      continue
    logits_p = [-gamma * max(1 + margin - alpha_unit[a] @ alpha_unit[p], 0.0)
                * (unit[a] @ unit[p] - (1 - margin)) for p in positives]
    logits_n = [gamma * max(alpha_unit[a] @ alpha_unit[n] + margin, 0.0)
                * (unit[a] @ unit[n] - margin) for n in negatives]
    out.append(np.logaddexp(0.0, ref_logsumexp(logits_p) + ref_logsumexp(logits_n)))
  return np.array(out)


# ---------------------------------------------------------------------------------------------
# Distances.


def test_pairwise_distances_are_exactly_zero_at_duplicates_and_never_negative():
  # Rows, the rows moved by ~1e-5 (closer than the Gram matrix resolves in float32) and the rows
  # again: duplicates are exactly 0 apart, near-duplicates not below 0, the rest as in float64.
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(8, 5)) * 3
  x = np.concatenate([rows, rows + 1e-5 * rng.normal(size=rows.shape), rows]).astype(np.float32)
  for squared in (True, False):
    got = np.asarray(jax.jit(functools.partial(pairwise.pairwise_distances, squared=squared))(x))
    want = np.array([[ref_distance(x.astype(np.float64), i, j, squared) for j in range(len(x))]
                     for i in range(len(x))])
    assert got.dtype == np.float32 and np.all(got >= 0)
    np.testing.assert_array_equal(np.diagonal(got), 0)
    np.testing.assert_array_equal(np.diagonal(got, offset=2 * len(rows)), 0)
    apart = want > 1
    np.testing.assert_allclose(got[apart], want[apart], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Values.

CONTRASTIVE_CASES = [
    dict(average=average, squared=squared) for average in AVERAGES for squared in (False, True)
] + [dict(pos_margin=0.3, neg_margin=1.2), dict(normalize=False, pos_margin=1.0, neg_margin=6.0)]


@pytest.mark.parametrize("kwargs", CONTRASTIVE_CASES, ids=str)
def test_contrastive_matches_reference(kwargs):
  x = make_embeddings()
  got = pairwise.contrastive_loss(x, LABELS, **kwargs)
  assert got.shape == (B,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref_contrastive(x, LABELS, **kwargs), rtol=1e-5, atol=1e-5)


def test_contrastive_batch_non_zero_sums_to_pml_reduction():
  # pytorch-metric-learning: mean of the non-zero positive-pair terms plus the mean of the
  # non-zero negative-pair terms, over all ordered pairs of the batch.
  x = make_embeddings(1)
  positives, negatives = ref_contrastive_terms(x, LABELS, 0.0, 1.0, False, True)
  non_zero_mean = lambda terms: np.mean([t for ts in terms for t in ts if t > 0])
  want = non_zero_mean(positives) + non_zero_mean(negatives)
  got = pairwise.contrastive_loss(x, LABELS, average="batch_non_zero").sum()
  np.testing.assert_allclose(got, want, rtol=1e-5)


TRIPLET_CASES = [
    dict(mining=mining, average=average, squared=squared) for mining in ("all", "semi_hard")
    for average, squared in zip(AVERAGES, (True, False, True, False))
] + [dict(mining="all", squared=False), dict(mining="semi_hard", squared=False),
     dict(mining="batch_hard"), dict(mining="batch_hard", squared=False, average="batch_non_zero"),
     dict(mining="all", margin=2.0, normalize=False),
     dict(mining="semi_hard", margin=1.0, squared=False, average="anchor_non_zero"),
     dict(mining="batch_hard", squared=False, soft=True),
     dict(mining="semi_hard", soft=True, average="batch"),
     dict(mining="batch_hard", soft=True, normalize=False, average="anchor_non_zero"),
     dict(mining="all", soft=True, squared=False), dict(mining="all", soft=True, average="batch")]


@pytest.mark.parametrize("kwargs", TRIPLET_CASES, ids=str)
def test_triplet_matches_brute_force_mining(kwargs):
  x = make_embeddings()
  got = pairwise.triplet_loss(x, LABELS, **kwargs)
  assert got.shape == (B,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref_triplet(x, LABELS, **kwargs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("mining", ["all", "batch_hard", "semi_hard"])
def test_triplet_data_exercise_zero_and_non_zero_terms_and_the_semi_hard_fallback(mining, squared):
  # Guards the value tests above against data that cannot tell the conventions apart.
  terms, fallbacks = ref_triplet_terms(make_embeddings(), LABELS, margin=0.2, mining=mining,
                                       squared=squared, normalize=True)
  flat = [t for ts in terms for t in ts]
  assert 0 < sum(t > 0 for t in flat) < len(flat)
  if mining == "semi_hard":
    assert 0 < fallbacks < len(flat)


@pytest.mark.parametrize("mining,margin", [("semi_hard", 0.2), ("all", 0.0)])
def test_triplet_ties_between_positive_and_negative_distances(mining, margin):
  # Integer points, unnormalised: every squared distance is exact, and anchor 0 has its positive
  # (1, 0) and the negative (0, 1) both at 1. Semi-hard negatives are strictly farther than the
  # positive (FaceNet, TensorFlow); with margin 0 a tie is a zero term, left out of the count.
  x = np.array([[0, 0], [1, 0], [3, 0], [0, 1], [0, 2], [2, 2]], np.float32)
  labels = np.array([0, 0, 0, 1, 1, 2], np.int32)
  kwargs = dict(margin=margin, mining=mining, normalize=False, average="anchor_non_zero")
  np.testing.assert_allclose(pairwise.triplet_loss(x, labels, **kwargs),
                             ref_triplet(x, labels, **kwargs), rtol=1e-6)


@pytest.mark.parametrize("mining", ["all", "batch_hard"])
@pytest.mark.parametrize("average", ["anchor_non_zero", "batch_non_zero"])
def test_soft_terms_that_underflow_to_zero_are_not_counted(mining, average):
  # Unnormalised points on a line: anchor 0's negative at 40 is 1600 farther (squared) than its
  # positive, so its soft term underflows to 0 in float32 and float64 alike; the others do not.
  x = np.array([[0.0], [1.0], [0.5], [40.0], [41.0]], np.float32)
  labels = np.array([0, 0, 1, 2, 2], np.int32)
  kwargs = dict(mining=mining, normalize=False, soft=True, average=average)
  terms, _ = ref_triplet_terms(x, labels, margin=0.2, mining=mining, squared=True,
                               normalize=False, soft=True)
  flat = [t for ts in terms for t in ts]
  assert 0 < sum(t == 0 for t in flat) and 0 < sum(t > 0 for t in flat)
  np.testing.assert_allclose(pairwise.triplet_loss(x, labels, **kwargs),
                             ref_triplet(x, labels, **kwargs), rtol=1e-5, atol=1e-6)


def test_triplet_batch_non_zero_sums_to_pml_reduction():
  # pytorch-metric-learning's TripletMarginLoss(margin=0.05): unsquared distances of unit
  # vectors, mean over the triplets with a non-zero loss.
  x = make_embeddings(2)
  terms, _ = ref_triplet_terms(x, LABELS, margin=0.05, mining="all", squared=False,
                               normalize=True)
  want = np.mean([t for ts in terms for t in ts if t > 0])
  got = pairwise.triplet_loss(x, LABELS, margin=0.05, squared=False, average="batch_non_zero")
  np.testing.assert_allclose(got.sum(), want, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, dict(margin=0.4, gamma=80.0)], ids=str)
def test_circle_matches_reference(kwargs):
  x = make_embeddings()
  got = pairwise.circle_loss(x, LABELS, **kwargs)
  assert got.shape == (B,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref_circle(x, LABELS, **kwargs), rtol=2e-5, atol=2e-5)
  assert got[LABELS == 2] == 0  # the singleton has no positive pair


@pytest.mark.parametrize("loss_fn,published", [
    (pairwise.contrastive_loss, dict(pos_margin=0.0, neg_margin=1.0)),  # pytorch-metric-learning
    (pairwise.triplet_loss, dict(margin=0.2, squared=True)),  # FaceNet
    (pairwise.circle_loss, dict(margin=0.25, gamma=256.0)),  # the paper's face setting
], ids=lambda v: getattr(v, "__name__", ""))
def test_defaults_are_the_published_settings(loss_fn, published):
  parameters = inspect.signature(loss_fn).parameters
  assert {name: parameters[name].default for name in published} == published


LOSSES = [
    ("contrastive", pairwise.contrastive_loss, {}),
    ("contrastive_non_zero", pairwise.contrastive_loss, dict(average="anchor_non_zero")),
    ("triplet_all", pairwise.triplet_loss, {}),
    ("triplet_all_unsquared", pairwise.triplet_loss, dict(squared=False)),
    ("triplet_batch_hard", pairwise.triplet_loss, dict(mining="batch_hard", squared=False)),
    ("triplet_semi_hard", pairwise.triplet_loss, dict(mining="semi_hard")),
    ("triplet_batch_non_zero", pairwise.triplet_loss, dict(average="batch_non_zero")),
    ("triplet_batch_hard_soft", pairwise.triplet_loss,
     dict(mining="batch_hard", squared=False, soft=True)),
    ("triplet_all_soft", pairwise.triplet_loss, dict(soft=True)),
    ("circle", pairwise.circle_loss, dict(gamma=32.0)),
]
LOSS_IDS = [case[0] for case in LOSSES]


def all_losses(x, labels):
  return {name: loss_fn(x, labels, **kwargs) for name, loss_fn, kwargs in LOSSES}


def test_jit_matches_eager():
  x = make_embeddings(8)
  eager = all_losses(x, LABELS)
  jitted = jax.jit(all_losses)(x, LABELS)  # one program for all losses keeps the test fast
  for name in LOSS_IDS:
    # XLA fuses the jitted program differently: equal up to float32 rounding.
    np.testing.assert_allclose(jitted[name], eager[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_vmap_matches_a_loop_over_batches():
  stacked = np.stack([make_embeddings(seed) for seed in range(3)])
  labels = np.stack([LABELS, LABELS[::-1], np.zeros_like(LABELS)])
  cases = [("contrastive", pairwise.contrastive_loss, {}),
           ("semi_hard", pairwise.triplet_loss, dict(mining="semi_hard")),
           ("circle", pairwise.circle_loss, {})]
  vmapped = jax.jit(lambda xs, ls: {
      name: jax.vmap(functools.partial(loss_fn, **kwargs))(xs, ls)
      for name, loss_fn, kwargs in cases})(stacked, labels)
  for name, loss_fn, kwargs in cases:
    looped = np.stack([loss_fn(x, l, **kwargs) for x, l in zip(stacked, labels)])
    np.testing.assert_allclose(vmapped[name], looped, rtol=1e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Gradients.

def numerical_gradient(fn, x0, eps=1e-6):
  """Central differences of a float64 function, one coordinate at a time."""
  grad = np.zeros_like(x0)
  for index in np.ndindex(*x0.shape):
    step = np.zeros_like(x0)
    step[index] = eps
    grad[index] = (fn(x0 + step) - fn(x0 - step)) / (2 * eps)
  return grad


# (name, loss, reference(x, x0, **kwargs), kwargs). The circle reference keeps its weights alpha
# at the base point x0: the loss treats them as constants.
GRADIENT_CASES = [
    ("contrastive", pairwise.contrastive_loss,
     lambda x, x0, **kw: ref_contrastive(x, LABELS, **kw), {}),
    ("contrastive_squared_unnormalized_non_zero", pairwise.contrastive_loss,
     lambda x, x0, **kw: ref_contrastive(x, LABELS, **kw),
     dict(squared=True, normalize=False, neg_margin=60.0, average="anchor_non_zero")),
    ("triplet_all", pairwise.triplet_loss, lambda x, x0, **kw: ref_triplet(x, LABELS, **kw), {}),
    ("triplet_all_unsquared_non_zero", pairwise.triplet_loss,
     lambda x, x0, **kw: ref_triplet(x, LABELS, **kw),
     dict(squared=False, average="anchor_non_zero")),
    ("triplet_batch_hard", pairwise.triplet_loss,
     lambda x, x0, **kw: ref_triplet(x, LABELS, **kw), dict(mining="batch_hard", squared=False)),
    ("triplet_semi_hard", pairwise.triplet_loss,
     lambda x, x0, **kw: ref_triplet(x, LABELS, **kw), dict(mining="semi_hard")),
    ("triplet_semi_hard_unsquared_batch_non_zero", pairwise.triplet_loss,
     lambda x, x0, **kw: ref_triplet(x, LABELS, **kw),
     dict(mining="semi_hard", squared=False, average="batch_non_zero")),
    ("triplet_batch_hard_soft", pairwise.triplet_loss,
     lambda x, x0, **kw: ref_triplet(x, LABELS, **kw),
     dict(mining="batch_hard", squared=False, soft=True)),
    ("triplet_semi_hard_soft", pairwise.triplet_loss,
     lambda x, x0, **kw: ref_triplet(x, LABELS, **kw), dict(mining="semi_hard", soft=True)),
    ("triplet_all_soft_non_zero", pairwise.triplet_loss,
     lambda x, x0, **kw: ref_triplet(x, LABELS, **kw),
     dict(soft=True, average="batch_non_zero")),
    ("circle", pairwise.circle_loss,
     lambda x, x0, **kw: ref_circle(x, LABELS, frozen_at=x0, **kw), dict(gamma=32.0)),
]


@pytest.mark.parametrize("name,loss_fn,ref_fn,kwargs", GRADIENT_CASES,
                         ids=[c[0] for c in GRADIENT_CASES])
def test_gradients_match_differences_of_the_float64_reference(name, loss_fn, ref_fn, kwargs):
  del name
  x0 = make_embeddings(3).astype(np.float64)
  weights = np.linspace(0.5, 1.5, B)
  want = numerical_gradient(lambda x: ref_fn(x, x0, **kwargs) @ weights, x0)
  got = jax.grad(lambda x: loss_fn(x, LABELS, **kwargs) @ weights.astype(np.float32))(
      x0.astype(np.float32))
  assert np.abs(want).max() > 1e-2  # the case has a gradient to check
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_check_grads_in_float64():
  # The subtlest gradient: all triplets through sorted negatives, prefix sums and gathers.
  weights = np.linspace(0.5, 1.5, B)
  with jax.enable_x64(True):
    x = jnp.asarray(make_embeddings(3), jnp.float64)
    fn = jax.jit(lambda x_: jnp.sum(pairwise.triplet_loss(x_, LABELS, squared=False) * weights))
    assert jax.eval_shape(pairwise.triplet_loss, x, LABELS).dtype == jnp.float64
    check_grads(fn, (x,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Edge cases: duplicated and zero embeddings, anchors without pairs, 16-bit inputs.


def edge_case_batch(dtype):
  """Duplicates within and across classes, a zero embedding, a singleton class."""
  x = make_embeddings(5, batch=8)
  x[1] = x[0]            # duplicate positive pair
  x[3] = x[2] = x[6]     # duplicates across classes 1 and 3
  x[4] = 0.0             # zero embedding
  return jnp.asarray(x, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name,loss_fn,kwargs", LOSSES, ids=LOSS_IDS)
def test_duplicates_zeros_and_low_precision_stay_finite(name, loss_fn, kwargs, dtype):
  x = edge_case_batch(dtype)
  fn = functools.partial(loss_fn, **kwargs)
  loss = fn(x, LABELS)
  grad = jax.grad(lambda x_: fn(x_, LABELS).sum())(x)
  assert loss.dtype == jnp.float32 and grad.dtype == dtype
  assert np.all(np.isfinite(loss)) and np.all(np.isfinite(np.asarray(grad, np.float32)))
  # Against the reference on the same (rounded) inputs, for the losses that are continuous in the
  # distances: the zero embedding is exactly 1 from every unit vector, a tie with the margin that
  # float32 resolves either way, which moves the non-zero counts and the mined triplets.
  x64 = np.asarray(x, np.float64)
  if name == "contrastive":
    want = ref_contrastive(x64, LABELS, **kwargs)
    np.testing.assert_allclose(loss, want, rtol=1e-3, atol=2e-3)
  elif name == "circle":
    np.testing.assert_allclose(loss, ref_circle(x64, LABELS, **kwargs), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name,loss_fn,kwargs", LOSSES, ids=LOSS_IDS)
def test_anchors_without_pairs_give_zero_loss_and_zero_gradient(name, loss_fn, kwargs):
  fn = functools.partial(loss_fn, **kwargs)
  x = make_embeddings(6)
  # All one label: no negatives. Contrastive losses still pull the positives together.
  same = np.zeros(B, np.int32)
  loss = fn(x, same)
  grad = jax.grad(lambda x_: fn(x_, same).sum())(x)
  assert np.all(np.isfinite(grad))
  if name.startswith("contrastive"):
    np.testing.assert_allclose(loss, ref_contrastive(x, same, **kwargs), rtol=1e-5, atol=1e-5)
  else:
    np.testing.assert_array_equal(loss, 0)
    np.testing.assert_array_equal(grad, 0)
    # The singleton of LABELS has no positive: its own loss is 0 and depends on no embedding.
    singleton = int(np.flatnonzero(LABELS == 2)[0])
    assert fn(x, LABELS)[singleton] == 0
    np.testing.assert_array_equal(jax.grad(lambda x_: fn(x_, LABELS)[singleton])(x), 0)


def test_memory_is_quadratic_in_the_batch():
  # No intermediate of the loss or its gradient (jaxpr and sub-jaxprs) holds B^3 elements.
  batch, dim = 16, 3
  x = jnp.zeros((batch, dim))
  labels = jnp.arange(batch, dtype=jnp.int32) % 4

  for name, loss_fn, kwargs in LOSSES:
    fn = lambda x_: loss_fn(x_, labels, **kwargs).sum()
    jaxpr = jax.make_jaxpr(jax.value_and_grad(fn))(x).jaxpr
    assert jaxprs.largest_intermediate(jaxpr) <= batch * (batch + 1), name


def test_every_matmul_asks_for_full_float32_precision():
  # GPUs and TPUs round float32 matmuls to TF32 or bfloat16 by default: errors of 1e-3 to 1e-2 in
  # the distances and cosines of unit vectors. Forward and backward ask for HIGHEST.
  highest = (jax.lax.Precision.HIGHEST,) * 2
  for name, loss_fn, kwargs in LOSSES:
    fn = lambda x_: loss_fn(x_, LABELS, **kwargs).sum()
    jaxpr = jax.make_jaxpr(jax.value_and_grad(fn))(jnp.zeros((B, D))).jaxpr
    precisions = [eqn.params["precision"] for eqn in jaxprs.equations(jaxpr)
                  if eqn.primitive.name == "dot_general"]
    assert precisions and all(p == highest for p in precisions), (name, precisions)


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("loss_fn", [pairwise.contrastive_loss, pairwise.triplet_loss,
                                     pairwise.circle_loss])
def test_bad_input_names_the_argument(loss_fn):
  x = make_embeddings()
  with pytest.raises(ValueError, match="`embeddings`"):
    loss_fn(x[0], LABELS)
  with pytest.raises(TypeError, match="`embeddings`"):
    loss_fn(x.astype(np.int32), LABELS)
  with pytest.raises(TypeError, match="`labels` must be integers, got dtype float64"):
    loss_fn(x, LABELS.astype(np.float64))  # Named as given, not as JAX would cast it.
  with pytest.raises(ValueError, match="`labels`"):
    loss_fn(x, LABELS[:-1])
  with pytest.raises(ValueError, match="`labels`"):
    loss_fn(x, LABELS[:, None])
  with pytest.raises(TypeError, match="`labels`"):
    loss_fn(x, LABELS.astype(np.float32).tolist())
  with pytest.raises(TypeError, match="`embeddings` must be a floating array, got a list"):
    loss_fn(np.asarray(x).tolist(), LABELS)
  np.testing.assert_array_equal(loss_fn(x, LABELS.tolist()), loss_fn(x, LABELS))  # A list.


def test_a_scalar_label_is_refused_as_the_wrong_rank():
  # Not a batch of labels: named, not an IndexError from reading its length.
  with pytest.raises(ValueError, match=r"`labels` must have rank 1 \(\[batch\]\), got shape \(\)"):
    pairwise.contrastive_loss(make_embeddings(), LABELS[0])


def test_a_flag_takes_0_or_1_but_no_other_integer():
  # A flag picks the formula: 2 is neither true nor false, and must not read as true.
  for loss_fn in (pairwise.triplet_loss, pairwise.contrastive_loss):
    with pytest.raises(TypeError, match="`squared` must be a bool .*, got 2"):
      loss_fn(make_embeddings(), LABELS, squared=2)


def test_an_empty_batch_has_no_losses():
  x = make_embeddings()
  for name, loss_fn, kwargs in LOSSES:  # Batch-hard mining's max and min included.
    assert loss_fn(x[:0], LABELS[:0], **kwargs).shape == (0,), name


def test_bad_options_name_the_argument():
  x = make_embeddings()
  with pytest.raises(ValueError, match="`mining`"):
    pairwise.triplet_loss(x, LABELS, mining="hard")
  with pytest.raises(ValueError, match="`average`"):
    pairwise.triplet_loss(x, LABELS, average="mean")
  with pytest.raises(ValueError, match="`average`"):
    pairwise.contrastive_loss(x, LABELS, average="non_zero")
  # A flag picks the formula: "no" read as true, and a traced one failed inside the loss.
  for loss_fn in (pairwise.triplet_loss, pairwise.contrastive_loss):
    with pytest.raises(TypeError, match="`squared` must be a bool .*, got 'no'"):
      loss_fn(x, LABELS, squared="no")
    with pytest.raises(TypeError, match="`normalize` must be a bool"):
      jax.jit(lambda x, flag, f=loss_fn: f(x, LABELS, normalize=flag))(x, True)
  with pytest.raises(TypeError, match="`soft` must be a bool"):
    pairwise.triplet_loss(x, LABELS, mining="batch_hard", soft="yes")
  with pytest.raises(ValueError, match=r"`gamma` must be positive \(a scale\), got -5.0"):
    pairwise.circle_loss(x, LABELS, gamma=-5.0)  # It inverted the loss.
  np.testing.assert_array_equal(pairwise.triplet_loss(x, LABELS, squared=np.bool_(False)),
                                pairwise.triplet_loss(x, LABELS, squared=0))  # 0/1 as bools


def test_batch_average_sums_to_the_mean_over_all_terms():
  # pytorch-metric-learning's MeanReducer: the mean over all the batch's pairs (contrastive:
  # positive and negative pairs separately) or triplets; with one term per positive pair,
  # TensorFlow's triplet_semihard_loss (sum over positive pairs / number of positive pairs).
  x = make_embeddings(3)
  mean_of = lambda terms: np.mean([t for ts in terms for t in ts])
  positives, negatives = ref_contrastive_terms(x, LABELS, 0.0, 1.0, False, True)
  got = pairwise.contrastive_loss(x, LABELS, average="batch")
  np.testing.assert_allclose(got.sum(), mean_of(positives) + mean_of(negatives), rtol=1e-5)
  for mining, squared in [("all", False), ("semi_hard", True), ("batch_hard", False)]:
    terms, _ = ref_triplet_terms(x, LABELS, margin=0.2, mining=mining, squared=squared,
                                 normalize=True)
    got = pairwise.triplet_loss(x, LABELS, mining=mining, squared=squared, average="batch")
    np.testing.assert_allclose(got.sum(), mean_of(terms), rtol=1e-5, err_msg=mining)
  # TensorFlow Addons' triplet_semihard_loss, as its code computes it (margin 1, distances of
  # unit embeddings: "L2", its default, or "squared-L2"): every positive pair's term, averaged
  # over those pairs.
  unit = x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
  same = LABELS[:, None] == LABELS[None]
  for squared in (False, True):
    distances = np.sum((unit[:, None] - unit[None]) ** 2, axis=-1)
    distances = distances if squared else np.sqrt(distances)
    tf_terms = []
    for a, p in zip(*np.nonzero(same & ~np.eye(B, dtype=bool))):
      negatives = distances[a][~same[a]]
      farther = negatives[negatives > distances[a, p]]
      chosen = farther.min() if farther.size else negatives.max()
      tf_terms.append(max(1.0 + distances[a, p] - chosen, 0.0))
    got = pairwise.triplet_loss(x, LABELS, margin=1.0, mining="semi_hard", squared=squared,
                                average="batch")
    np.testing.assert_allclose(got.sum(), np.mean(tf_terms), rtol=1e-5, err_msg=squared)
  # Unequal classes and a singleton: "anchor" and loss.mean() is not this number.
  anchor = pairwise.triplet_loss(x, LABELS, mining="semi_hard").mean()
  assert abs(anchor - mean_of(ref_triplet_terms(x, LABELS, margin=0.2, mining="semi_hard",
                                                squared=True, normalize=True)[0])) > 1e-3
