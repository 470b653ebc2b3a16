"""Float64 NumPy references written from the papers' formulas (and, for retrieval,
pytorch-metric-learning's definitions), independent of the package.

Angles come from ``arccos`` and ``psi`` from its piecewise definition (the package uses
Chebyshev polynomials and ``sqrt(1 - cos^2)``), and logits are filled in per example with loops.
"""

import numpy as np


def _unit(a):
  return a / np.linalg.norm(a, axis=-1, keepdims=True)


def cosines(x, w):
  """``[B, C]`` cosines (``w [C, D]``), or the max over sub-centres (``w [C, K, D]``)."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  if w.ndim == 3:
    return np.einsum("bd,ckd->bck", _unit(x), _unit(w)).max(axis=-1)
  return _unit(x) @ _unit(w).T


def cross_entropy(logits, labels):
  """Per-example ``-log softmax(logits)[label]`` for a ``[B, C]`` logit matrix."""
  out = []
  for row, label in zip(logits, labels):
    top = row.max()
    out.append(top + np.log(np.exp(row - top).sum()) - row[label])
  return np.array(out)


def with_targets(nontarget, targets, labels):
  logits = np.array(nontarget, np.float64)
  for b, label in enumerate(labels):
    logits[b, label] = targets[b]
  return logits


def psi(cos, m):
  theta = np.arccos(np.clip(cos, -1, 1))
  k = np.minimum(np.floor(m * theta / np.pi), m - 1)
  return (-1.0) ** k * np.cos(m * theta) - 2 * k


def arc_target(cos, m, easy_margin=False):
  theta = np.arccos(np.clip(cos, -1, 1))
  if easy_margin:
    return np.where(cos > 0, np.cos(theta + m), cos)
  return np.where(cos > np.cos(np.pi - m), np.cos(theta + m), cos - m * np.sin(m))


def softmax(x, w, labels, bias=None):
  logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)[None, :]
  return cross_entropy(logits, labels)


def normface(x, w, labels, scale=16.0):
  return cross_entropy(scale * cosines(x, w), labels)


def lsoftmax(x, w, labels, margin=4, annealing=0.0):
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  cos = cosines(x, w)
  dots = x @ w.T
  targets = []
  for b, y in enumerate(labels):
    c = cos[b, y]
    scale = np.linalg.norm(x[b]) * np.linalg.norm(w[y])
    targets.append(scale * (annealing * c + psi(c, margin)) / (1 + annealing))
  return cross_entropy(with_targets(dots, targets, labels), labels)


def sphereface(x, w, labels, margin=4, scale=None, annealing=0.0):
  x = np.asarray(x, np.float64)
  cos = cosines(x, w)
  radius = np.linalg.norm(x, axis=1) if scale is None else np.full(len(x), scale)
  targets = [radius[b] * (annealing * cos[b, y] + psi(cos[b, y], margin)) / (1 + annealing)
             for b, y in enumerate(labels)]
  return cross_entropy(with_targets(radius[:, None] * cos, targets, labels), labels)


def cosface(x, w, labels, scale=64.0, margin=0.35):
  cos = cosines(x, w)
  targets = [scale * (cos[b, y] - margin) for b, y in enumerate(labels)]
  return cross_entropy(with_targets(scale * cos, targets, labels), labels)


def arcface(x, w, labels, scale=64.0, margin=0.5, easy_margin=False):
  cos = cosines(x, w)
  targets = [scale * arc_target(cos[b, y], margin, easy_margin) for b, y in enumerate(labels)]
  return cross_entropy(with_targets(scale * cos, targets, labels), labels)


def combined(x, w, labels, scale=64.0, m1=1.0, m2=0.3, m3=0.2):
  cos = cosines(x, w)
  theta_star = (np.pi - m2) / m1
  targets = []
  for b, y in enumerate(labels):
    theta = np.arccos(np.clip(cos[b, y], -1, 1))
    if m1 * theta + m2 < np.pi:
      value = np.cos(m1 * theta + m2)
    else:  # the linear continuation in cos, joining at theta_star
      value = cos[b, y] - np.cos(theta_star) - 1
    targets.append(scale * (value - m3))
  return cross_entropy(with_targets(scale * cos, targets, labels), labels)


def curricularface(x, w, labels, t=0.0, scale=64.0, margin=0.5, momentum=0.01):
  cos = cosines(x, w)
  target_cos = np.array([cos[b, y] for b, y in enumerate(labels)])
  t = momentum * target_cos.mean() + (1 - momentum) * t
  logits = np.array(cos)
  for b, y in enumerate(labels):
    threshold = np.cos(np.arccos(target_cos[b]) + margin)
    for j in range(cos.shape[1]):
      if j != y and cos[b, j] > threshold:
        logits[b, j] = cos[b, j] * (t + cos[b, j])
    logits[b, y] = arc_target(target_cos[b], margin)
  return cross_entropy(scale * logits, labels), t


def mv_softmax(x, w, labels, scale=32.0, margin=0.35, t=0.2, kind="cos", adaptive=True,
               easy_margin=True):
  """The paper's form: each mis-classified negative's exp(s cos) weighted by
  h = exp(s (t' - 1)(cos + 1)) with t' = 1 + t (adaptive) or exp(s t) (fixed)."""
  cos = cosines(x, w)
  out = []
  for b, y in enumerate(labels):
    c = cos[b, y]
    theta = np.arccos(np.clip(c, -1, 1))
    margined = c - margin if kind == "cos" else np.cos(theta + margin)
    if kind == "arc":
      target = arc_target(c, margin, easy_margin)
    else:
      target = margined if (c > 0 or not easy_margin) else c
    terms = [scale * target]
    for j in range(cos.shape[1]):
      if j == y:
        continue
      hard = cos[b, j] > margined
      log_h = (scale * t * (cos[b, j] + 1) if adaptive else scale * t) if hard else 0.0
      terms.append(scale * cos[b, j] + log_h)
    terms = np.array(terms)
    top = terms.max()
    out.append(top + np.log(np.exp(terms - top).sum()) - terms[0])
  return np.array(out)


def adaface(x, w, labels, norm_mean=20.0, norm_std=100.0, scale=64.0, margin=0.4, h=0.333,
            t_alpha=1.0, eps=1e-3):
  norms = np.clip(np.linalg.norm(np.asarray(x, np.float64), axis=1), 1e-3, 100)
  norm_mean = t_alpha * norms.mean() + (1 - t_alpha) * norm_mean
  norm_std = t_alpha * norms.std(ddof=1) + (1 - t_alpha) * norm_std
  cos = cosines(x, w)
  targets = []
  for b, y in enumerate(labels):
    z = np.clip(h * (norms[b] - norm_mean) / (norm_std + eps), -1, 1)
    theta = np.arccos(np.clip(cos[b, y], -1 + eps, 1 - eps))
    angle = np.clip(theta - margin * z, eps, np.pi - eps)
    targets.append(scale * (np.cos(angle) - (margin + margin * z)))
  others = scale * np.clip(cos, -1 + eps, 1 - eps)  # The official code clips every cosine.
  return cross_entropy(with_targets(others, targets, labels), labels), (norm_mean, norm_std)


def magface(x, w, labels, scale=64.0, lower_norm=10.0, upper_norm=110.0, lower_margin=0.45,
            upper_margin=0.8, lambda_g=20.0, easy_margin=True):
  a = np.clip(np.linalg.norm(np.asarray(x, np.float64), axis=1), lower_norm, upper_norm)
  m = (upper_margin - lower_margin) / (upper_norm - lower_norm) * (a - lower_norm) + lower_margin
  cos = cosines(x, w)
  targets = [scale * arc_target(cos[b, y], m[b], easy_margin) for b, y in enumerate(labels)]
  ce = cross_entropy(with_targets(scale * cos, targets, labels), labels)
  return ce + lambda_g * (1 / a + a / upper_norm**2)


def elasticface(x, w, labels, margins_per_example, scale=64.0, kind="arc", plus=False):
  cos = cosines(x, w)
  target_cos = np.array([cos[b, y] for b, y in enumerate(labels)])
  m = np.array(margins_per_example, np.float64)
  if plus:  # the k-th largest cosine gets the k-th smallest margin
    assigned = np.empty_like(m)
    assigned[np.argsort(-target_cos, kind="stable")] = np.sort(m)
    m = assigned
  theta = np.arccos(np.clip(target_cos, -1, 1))
  targets = scale * (np.cos(theta + m) if kind == "arc" else target_cos - m)
  return cross_entropy(with_targets(scale * cos, targets, labels), labels)


def sphereface2_adjusted(x, w, labels, margin=0.4, t=3.0, kind="cos"):
  """``[B, C]`` SphereFace2 logits before the scale and the bias, class by class."""
  cos = cosines(x, w)
  g = lambda c: 2 * ((c + 1) / 2) ** t - 1  # noqa: E731
  out = np.empty_like(cos)
  for b, y in enumerate(labels):
    for j, c in enumerate(cos[b]):
      theta = np.arccos(np.clip(c, -1, 1))
      if j != y:
        out[b, j] = g(c) + margin if kind == "cos" else g(c)
      elif kind == "cos":
        out[b, j] = g(c) - margin
      elif kind == "arc":
        out[b, j] = g(np.cos(min(theta + margin, np.pi)))
      else:
        out[b, j] = g(np.cos(min(margin * theta, np.pi)))
  return out


def sphereface2(x, w, labels, bias, scale=40.0, margin=0.4, t=3.0, alpha=0.7, kind="cos"):
  """Per-example binary losses: the target's classifier and every other's."""
  logits = scale * sphereface2_adjusted(x, w, labels, margin, t, kind) + bias
  out = []
  for b, y in enumerate(labels):
    others = np.delete(logits[b], y)
    out.append((alpha * np.logaddexp(0, -logits[b, y])
                + (1 - alpha) * np.logaddexp(0, others).sum()) / scale)
  return np.array(out)


def spherefacer_adjusted(x, w, labels, margin=1.5, kind="v0"):
  """``[B, C]`` SphereFace-R's characteristic function, from arccos, per example."""
  cos = cosines(x, w)
  theta = np.arccos(np.clip(cos, -1, 1))
  out = np.cos(theta / margin) if kind == "v2" else cos.copy()
  for b, y in enumerate(labels):
    t = margin * theta[b, y]
    if kind == "v0":
      k = np.floor(t / np.pi)
      out[b, y] = (-1.0) ** k * np.cos(t) - 2 * k
    elif kind == "v1":
      out[b, y] = np.cos(min(t, np.pi))
    else:
      out[b, y] = cos[b, y]
  return out


def spherefacer(x, w, labels, scale=30.0, margin=1.5, kind="v0"):
  return cross_entropy(scale * spherefacer_adjusted(x, w, labels, margin, kind), labels)


def retrieval(embeddings, labels):
  """Precision@1, R-precision and MAP@R, pytorch-metric-learning's definitions applied query by
  query with a full sort: a query alone in its class is left out; ties rank the wrong class
  first."""
  unit = _unit(embeddings)
  similarity = unit @ unit.T
  precision_at_1, r_precision, map_at_r = [], [], []
  for query in range(len(labels)):
    num_relevant = np.sum(labels == labels[query]) - 1
    if num_relevant == 0:
      continue
    others = [k for k in range(len(labels)) if k != query]
    # Decreasing similarity; on ties an example of another class comes first (False < True).
    ranked = sorted(others, key=lambda k: (-similarity[query, k], labels[k] == labels[query]))
    relevant = [labels[k] == labels[query] for k in ranked[:num_relevant]]
    precision_at_1.append(float(relevant[0]))
    r_precision.append(sum(relevant) / num_relevant)
    precisions = [sum(relevant[:i + 1]) / (i + 1) for i in range(num_relevant) if relevant[i]]
    map_at_r.append(sum(precisions) / num_relevant)
  return {"precision_at_1": np.mean(precision_at_1), "r_precision": np.mean(r_precision),
          "mean_average_precision_at_r": np.mean(map_at_r)}
