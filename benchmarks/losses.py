"""Speed of the loss zoo against the matmul floor, beside pytorch-metric-learning.

For B=256, D=512 and each ``C``, float32, prints per loss the time of ``jit(value_and_grad)`` of
the batch loss (w.r.t. the embeddings, and the centres for the classification losses) and, for the
classification losses, its ratio to the floor: the three bare matmuls of a forward and backward
pass (sub-centre ArcFace: with its ``K C`` rows). Beside it, the forward and backward time of the
PyTorch implementation people use (pytorch-metric-learning, or ``F.cross_entropy`` for plain
softmax) on the same inputs, its ratio to the same floor, and the relative difference of the two
loss values, with the hyperparameters and reductions matched (see ``_torch_losses``). Each step
is timed interleaved round by round with its floor alone, the JAX steps first, then the torch
steps; times are medians over the rounds, and each ratio to the floor is the median over the
rounds of the ratio within a round, so that the drifting speed of a shared machine cancels out.

  python benchmarks/losses.py --classes 10000 100000
"""

import argparse
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import margins
import common

SUB_CENTERS = 3
ARC_MARGIN = 0.5  # radians; pytorch-metric-learning takes degrees.


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--classes", type=int, nargs="+", default=[10_000])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--identities", type=int, default=64,
                      help="distinct labels in the batch of the pairwise losses")
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--losses", nargs="+", default=None, choices=[*CLASSIFICATION, *PAIRWISE],
                      metavar="LOSS", help="only these losses (default: all), e.g. arcface "
                      f"cosface; one of: {', '.join(map(repr, [*CLASSIFICATION, *PAIRWISE]))}")
  return parser.parse_args()


# name: (loss of (x, w, labels) -> [B] losses, weights with sub-centres).
CLASSIFICATION = {
    "softmax": (margins.softmax_loss, False),
    "normface": (margins.normface_loss, False),
    "cosface": (margins.cosface_loss, False),
    "arcface": (margins.arcface_loss, False),
    "sphereface": (margins.sphereface_loss, False),
    "combined": (margins.combined_margin_loss, False),
    "curricularface": (lambda x, w, y: margins.curricularface_loss(x, w, y)[0], False),
    "mv-softmax": (margins.mv_softmax_loss, False),
    "adaface": (lambda x, w, y: margins.adaface_loss(x, w, y)[0], False),
    "magface": (margins.magface_loss, False),
    "subcenter arcface": (margins.subcenter_arcface_loss, True),
    "spherefacer": (margins.spherefacer_loss, False),
    "sphereface2": (lambda x, w, y: margins.sphereface2_loss(x, w, y, 0.0), False),
}


def _mean_non_zero(losses):
  return jnp.sum(losses) / jnp.maximum(jnp.sum(losses > 0), 1)


# name: (batch loss of (x, labels), as pytorch-metric-learning reduces it).
PAIRWISE = {
    "triplet batch-hard": lambda x, y: jnp.sum(margins.triplet_loss(
        x, y, mining="batch_hard", margin=0.2, squared=False, average="batch_non_zero")),
    "contrastive": lambda x, y: jnp.sum(margins.contrastive_loss(x, y, average="batch_non_zero")),
    "circle": lambda x, y: _mean_non_zero(margins.circle_loss(x, y, margin=0.25, gamma=256.0)),
}


def _torch_losses(num_classes, dim):
  """name: (description, module or function of (x, labels)) with margins' hyperparameters.

  pytorch-metric-learning's classification losses own ``W`` as ``[D, C]`` (sub-centres: column
  ``c K + k``) and average over the batch; ArcFace's margin is in degrees; NormalizedSoftmaxLoss
  has a temperature, ``1 / scale``; its SphereFaceLoss is margins' ``sphereface_loss`` with
  ``scale=None`` and no annealing. Its pairwise losses average the non-zero terms.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from pytorch_metric_learning import losses as pml  # pylint: disable=g-import-not-at-top
  from pytorch_metric_learning import miners  # pylint: disable=g-import-not-at-top
  degrees = math.degrees(ARC_MARGIN)
  batch_hard = miners.BatchHardMiner()
  triplet = pml.TripletMarginLoss(margin=0.2)
  return {
      "softmax": ("torch F.cross_entropy", torch.nn.Linear(dim, num_classes, bias=False)),
      "normface": ("PML NormalizedSoftmaxLoss(temperature=1/16)",
                   pml.NormalizedSoftmaxLoss(num_classes, dim, temperature=1 / 16)),
      "cosface": ("PML CosFaceLoss(margin=0.35, scale=64)",
                  pml.CosFaceLoss(num_classes, dim, margin=0.35, scale=64)),
      "arcface": (f"PML ArcFaceLoss(margin={degrees:.2f} deg, scale=64)",
                  pml.ArcFaceLoss(num_classes, dim, margin=degrees, scale=64)),
      "sphereface": ("PML SphereFaceLoss(margin=4, scale=1)",
                     pml.SphereFaceLoss(num_classes, dim, margin=4, scale=1)),
      "subcenter arcface": (
          f"PML SubCenterArcFaceLoss(margin={degrees:.2f} deg, scale=64, sub_centers=3)",
          pml.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=dim, margin=degrees,
                                   scale=64, sub_centers=SUB_CENTERS)),
      "triplet batch-hard": ("PML TripletMarginLoss(margin=0.2) + BatchHardMiner",
                             lambda x, y: triplet(x, y, batch_hard(x, y))),
      "contrastive": ("PML ContrastiveLoss()", pml.ContrastiveLoss()),
      "circle": ("PML CircleLoss(m=0.25, gamma=256)", pml.CircleLoss(m=0.25, gamma=256)),
  }


class _TorchCase:
  """One torch loss on fixed inputs: ``step()`` runs forward and backward, ``value()`` the loss."""

  def __init__(self, name, loss, x, w, labels):
    import torch  # pylint: disable=g-import-not-at-top
    self.x = torch.tensor(np.asarray(x), requires_grad=True)
    self.labels = torch.tensor(np.asarray(labels), dtype=torch.long)
    self.loss = loss
    self.params = [self.x]
    if name == "softmax":
      loss.weight.data = torch.tensor(np.asarray(w))
      self.loss = lambda x, y: torch.nn.functional.cross_entropy(loss(x), y)
      self.params.append(loss.weight)
    elif w is not None:
      loss.W.data = torch.tensor(np.asarray(w).reshape(-1, w.shape[-1]).T.copy())
      self.params.append(loss.W)

  def step(self):
    for p in self.params:
      p.grad = None
    self.loss(self.x, self.labels).backward()

  def value(self):
    import torch  # pylint: disable=g-import-not-at-top
    with torch.no_grad():
      return float(self.loss(self.x, self.labels))


def run(args, num_classes, torch_losses):
  kx, kw, ky, kp = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (args.batch, args.dim))
  w = jax.random.normal(kw, (num_classes, args.dim))
  w_sub = jax.random.normal(kw, (num_classes, SUB_CENTERS, args.dim))
  labels = jax.random.randint(ky, (args.batch,), 0, num_classes)
  pair_labels = jax.random.randint(kp, (args.batch,), 0, args.identities)

  cases = {}  # name: (jax step giving (value, grads), weights or None, labels, floor or None)
  wanted = lambda name: args.losses is None or name in args.losses  # noqa: E731
  for name, (loss, sub) in CLASSIFICATION.items():
    if not wanted(name):
      continue
    weights = w_sub if sub else w
    mean_loss = lambda x, w, y, loss=loss: jnp.mean(loss(x, w, y))
    step = jax.jit(jax.value_and_grad(mean_loss, argnums=(0, 1)))
    cases[name] = (lambda step=step, weights=weights: step(x, weights, labels), weights, labels,
                   "floor sub" if sub else "floor")
  for name, loss in PAIRWISE.items():
    if not wanted(name):
      continue
    step = jax.jit(jax.value_and_grad(loss))
    cases[name] = (lambda step=step: step(x, pair_labels), None, pair_labels, None)

  jit_floor = jax.jit(common.floor)
  w_flat = w_sub.reshape(-1, args.dim)
  floors = {"floor": lambda: jax.block_until_ready(jit_floor(x, w))}
  if any(case[3] == "floor sub" for case in cases.values()):
    floors["floor sub"] = lambda: jax.block_until_ready(jit_floor(x, w_flat))
  jax_timers, torch_timers, torch_cases = [], [], {}  # (name, fn, floor name or None)
  for name, (step, weights, case_labels, floor_name) in cases.items():
    jax_timers.append((name, lambda step=step: jax.block_until_ready(step()), floor_name))
    if name in torch_losses:
      torch_cases[name] = _TorchCase(name, torch_losses[name][1], x, weights, case_labels)
      torch_timers.append(("torch " + name, torch_cases[name].step, floor_name))

  # Each step is timed interleaved with its floor alone: with all 15 programs in every round,
  # the floor ran slower than beside a single loss, and the dense losses came out below it.
  # The JAX steps first: torch steps slow down the JAX steps that run after them (up to 10 %).
  times, ratios = {name: [] for name in floors}, {}
  for name, timer, floor_name in jax_timers + torch_timers:
    group = {name: timer} if floor_name is None else {floor_name: floors[floor_name], name: timer}
    measured = common.interleaved(group, args.repeats)
    times[name] = measured[name]
    if floor_name is not None:
      times[floor_name] += measured[floor_name]
      ratios[name] = common.median_ratio(measured[name], measured[floor_name])
  seconds = {name: statistics.median(t) for name, t in times.items() if t}
  floors_timed = []  # Those of the losses asked for.
  if "floor" in seconds:
    floors_timed.append(f"floor (3 matmuls) {seconds['floor'] * 1e3:.0f} ms")
  if "floor sub" in seconds:
    floors_timed.append(f"sub-centres, {SUB_CENTERS}C rows: {seconds['floor sub'] * 1e3:.0f} ms")
  print(f"\nC={num_classes:,}, B={args.batch}, D={args.dim}, float32, {args.repeats} interleaved "
        f"rounds (medians); {'; '.join(floors_timed) or 'no floor'}\n")
  print("| loss | margins (ms) | / floor | torch (ms) | torch / floor | torch / margins "
        "| rel. diff of values |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  for name, (step, _, _, floor_name) in cases.items():
    to_floor = f"{ratios[name]:.2f}x" if floor_name else "-"
    torch_cols = "- | - | - | -"
    if name in torch_cases:
      torch_seconds = seconds["torch " + name]
      value = float(step()[0])
      reference = torch_cases[name].value()
      diff = abs(value - reference) / abs(reference)
      torch_to_floor = f"{ratios['torch ' + name]:.2f}x" if floor_name else "-"
      speedup = (ratios["torch " + name] / ratios[name] if floor_name
                 else torch_seconds / seconds[name])
      torch_cols = (f"{torch_seconds * 1e3:.0f} | {torch_to_floor} | {speedup:.2f}x | "
                    f"{diff:.1e}")
    print(f"| {name} | {seconds[name] * 1e3:.1f} | {to_floor} | {torch_cols} |")


def main():
  args = _parse_args()
  print(f"jax {jax.__version__}")
  torch_losses = {}
  if not args.no_torch:
    import pytorch_metric_learning  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"pytorch-metric-learning {pytorch_metric_learning.__version__}")
  for num_classes in args.classes:
    if not args.no_torch:
      torch_losses = _torch_losses(num_classes, args.dim)
      print("\ntorch references: " + "; ".join(
          f"{name}: {description}" for name, (description, _) in torch_losses.items()))
    run(args, num_classes, torch_losses)


if __name__ == "__main__":
  main()
