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
# # Target logits and decision margins
#
# Every margin loss in `margins` changes one thing: the logit of an example's own class as a
# function of the angle $\theta$ between its embedding and the class centre (AdaFace and MagFace
# also of the embedding's norm, ElasticFace of a random draw; CurricularFace also re-weights hard
# negatives). This notebook draws those functions, for every margin but SphereFace-R (whose v0
# target is SphereFace's $\psi$ with a real $m$), by calling the margin objects
# themselves, `margin.target_logit(rows)` and `margin.nontarget_logits(similarity, rows)`: the
# methods every softmax engine evaluates, so the pictures are the library's code, not a copy.
#
# With unit-norm embeddings and centres every logit is a function of the cosine alone, and the
# curves are drawn with `scale=1`: multiply by $s$ for the logits the softmax sees.
#
# `MARGINS_QUICK=1` uses coarse grids; figures go to `MARGINS_FIGURES_DIR` (default `docs/figures`).

# %%
import inspect
import sys

import jax
import jax.numpy as jnp
import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np

import margins
from common import LOSS_COLORS, QUICK, save_figure
from margins.losses.margin import cos_add_angle

theta = np.linspace(0, np.pi, 181 if QUICK else 721)
degrees = np.degrees(theta)
cos = jnp.asarray(np.cos(theta), jnp.float32)


def unit_rows(cos):
  """Rows for unit-norm embeddings and centres: ``|x| = |W_y| = 1``."""
  ones = jnp.ones_like(cos)
  return margins.Rows(cos=cos, embedding_norm=ones, weight_norm=ones)


def target_curve(margin):
  """The margin's target logit at each angle of ``theta``."""
  return np.asarray(margin.target_logit(unit_rows(cos)))


def variants(color, n):
  """``n`` tints of ``color`` from light to dark, for the variants of one loss."""
  rgb = np.asarray(matplotlib.colors.to_rgb(color))
  light, dark = rgb + (1 - rgb) * 0.6, rgb * 0.55
  return [tuple(light + (dark - light) * i / max(n - 1, 1)) for i in range(n)]


def style_angle_axes(axes, title, ylabel="target logit / s"):
  axes.set_title(title)
  axes.set_xlabel(r"$\theta$, angle to the target centre (degrees)")
  axes.set_ylabel(ylabel)
  axes.set_xlim(0, 180)
  axes.set_xticks(range(0, 181, 30))
  axes.grid(alpha=0.3)


# %% [markdown]
# ## All the target logits on one figure
#
# Left: every loss with its usual hyperparameters. Softmax is $|W||x|\cos\theta$ (unit norms
# here), NormFace $s\cos\theta$: the same curve per unit of scale. ArcFace's $\cos(\theta + m)$
# would turn back up past $\theta = \pi - m$ (the faint vertical line); the library's default
# continues it as $\cos\theta - m\sin m$, which steps down from $-1$ to $-\cos m - m\sin m$
# there, as in the implementations it follows; `easy_margin=True` applies the margin only while
# $\cos\theta > 0$ (a jump at 90°); the plain formula is drawn dotted for comparison.
# CurricularFace's target is ArcFace's (its change is on the negatives, below).
#
# Right: L-Softmax / SphereFace's $\psi(\theta) = (-1)^k\cos(m\theta) - 2k$ for $m = 1..4$, plain
# (solid) and annealed (dashed) with $\lambda$: $(\lambda\cos\theta + \psi)/(1 + \lambda)$, the
# form SphereFace trains with ($\lambda$ falls to 5). L-Softmax's target is $|W||x|\psi$,
# SphereFace's $|x|\psi$: the same at unit norms.

# %%
def draw_target_logits(left, right, *, cosface_margin=0.35, arcface_margin=0.5,
                       sphereface_margin=4, annealing=5.0, m1=1.0, m2=0.3, m3=0.2):
  """Draws every loss's target logit on ``left`` and SphereFace's psi family on ``right``."""
  curves = [
      ("Softmax (unit norms)", margins.Softmax(), LOSS_COLORS["softmax"], "-", 2.5),
      ("NormFace", margins.NormFace(scale=1.0), LOSS_COLORS["normface"], (0, (4, 4)), 2.0),
      (f"SphereFace (m={sphereface_margin}, λ={annealing:g})",
       margins.SphereFace(margin=sphereface_margin, annealing=annealing),
       LOSS_COLORS["sphereface"], "-", 2.0),
      (f"CosFace (m={cosface_margin:g})", margins.CosFace(scale=1.0, margin=cosface_margin),
       LOSS_COLORS["cosface"], "-", 2.0),
      (f"ArcFace (m={arcface_margin:g}), default",
       margins.ArcFace(scale=1.0, margin=arcface_margin), LOSS_COLORS["arcface"], "-", 2.0),
      ("ArcFace, easy_margin", margins.ArcFace(scale=1.0, margin=arcface_margin, easy_margin=True),
       LOSS_COLORS["arcface"], "-.", 1.5),
      (f"Combined ({m1:g}, {m2:g}, {m3:g})", margins.CombinedMargin(scale=1.0, m1=m1, m2=m2, m3=m3),
       LOSS_COLORS["combined_margin"], "-", 2.0),
      ("CurricularFace (= ArcFace)", margins.CurricularFace(scale=1.0, margin=arcface_margin),
       LOSS_COLORS["curricularface"], (0, (1, 3)), 2.5),
  ]
  for label, margin, color, linestyle, width in curves:
    left.plot(degrees, target_curve(margin), color=color, linestyle=linestyle, linewidth=width,
              label=label)
  left.plot(degrees, np.asarray(cos_add_angle(cos, arcface_margin)), color=LOSS_COLORS["arcface"],
            linestyle=":", linewidth=1.2, label=r"plain $\cos(\theta + m)$")
  left.axvline(np.degrees(np.pi - arcface_margin), color=LOSS_COLORS["arcface"], alpha=0.3,
               linewidth=0.8)
  left.set_ylim(-2.1, 1.05)
  style_angle_axes(left, "Target logit of each loss")
  left.legend(fontsize=8, loc="lower left")

  for m, color in zip(range(1, 5), variants(LOSS_COLORS["sphereface"], 4)):
    plain = target_curve(margins.SphereFace(margin=m))
    right.plot(degrees, plain, color=color, linewidth=2, label=f"m={m}")
    right.plot(degrees, target_curve(margins.SphereFace(margin=m, annealing=annealing)),
               color=color, linewidth=1.5, linestyle="--", label=f"m={m}, λ={annealing:g}")
  right.set_ylim(-7.3, 1.2)
  style_angle_axes(right, r"L-Softmax / SphereFace $\psi(\theta)$, plain and annealed")
  right.legend(fontsize=8, ncol=2, loc="lower left")


figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
draw_target_logits(left, right)
save_figure(figure, "target_logits.png")

# L-Softmax and SphereFace share psi: at unit norms their targets are equal.
for m in range(1, 5):
  np.testing.assert_allclose(target_curve(margins.LSoftmax(margin=m, annealing=5.0)),
                             target_curve(margins.SphereFace(margin=m, annealing=5.0)), rtol=1e-6)

# %% [markdown]
# ## What the scale does: the target's probability, and how hard the loss pulls
#
# The softmax sees $s$ times the curves above, against every other class. Take MS1MV2's 85,742
# classes with every negative at 90° (logit 0: where the centres of a trained model sit from an
# example, in 512 dimensions). The target's probability is then
# $p_y = e^{s f(\theta)} / (e^{s f(\theta)} + C - 1)$, with $f$ the target logit per unit of scale,
# and the loss $-\log p_y$ pulls the embedding towards its centre with
# $\partial L / \partial\theta = (1 - p_y)\, s\, \partial(-f)/\partial\theta$ (JAX's gradient of
# the margin's own `target_logit`, right, divided by $s$).
#
# At $s = 16$ ArcFace's $p_y$ reaches only 0.94 at the centre and is 0.5 at 16°: the loss pulls
# on almost every example, however close (it falls below a tenth of its pull at 61° only within
# 7° of the centre). At $s = 64$, $p_y$ is 0.5 at 51° and the pull dies within about 49°:
# examples closer than that are left alone, and the margin decides how close that is. CosFace at
# $s = 16$ cannot even reach $p_y = 0.5$ ($0.28$ at the centre): its margin takes $s m$ off the
# target, so $p_y = 0.5$ needs $s (1 - m) > \log(C - 1)$: $s > 17.48$ here. NormFace's and
# CosFace's papers bound $s$ from below with the number of classes in the same way (without a
# margin, $s$ above 11.4 for $p_y = 0.5$); the recipes' $s = 64$ is far above. ArcFace's pull would
# vanish at $\theta = \pi - m$, where $\cos(\theta + m)$ turns back up; the library's default
# continuation $\cos\theta - m \sin m$ keeps pulling there (the jump at 151°).

# %%
NUM_CLASSES = 85742  # MS1MV2


def loss_at_angle(margin, angle):
  """``-log p_y`` at ``angle`` to the target, the other classes' logits 0."""
  target = margin.target_logit(unit_rows(jnp.cos(angle)[None]))[0]
  return jax.nn.softplus(jnp.log(NUM_CLASSES - 1.0) - target)


def probability_and_pull(margin):
  """``p_y`` and ``dL/dθ`` at each angle of ``theta``."""
  angles = jnp.asarray(theta, jnp.float32)
  losses = jax.vmap(lambda a: loss_at_angle(margin, a))(angles)
  pulls = jax.vmap(jax.grad(lambda a: loss_at_angle(margin, a)))(angles)
  return np.exp(-np.asarray(losses)), np.asarray(pulls)


scales = (16.0, 32.0, 64.0)
curves = [(f"ArcFace (m=0.5), s={s:g}", margins.ArcFace(scale=s, margin=0.5), color, "-")
          for s, color in zip(scales, variants(LOSS_COLORS["arcface"], 3))]
curves += [("CosFace (m=0.35), s=16", margins.CosFace(scale=16.0, margin=0.35),
            LOSS_COLORS["cosface"], "--"),
           ("CosFace (m=0.35), s=64", margins.CosFace(scale=64.0, margin=0.35),
            LOSS_COLORS["cosface"], "-"),
           ("NormFace, s=64", margins.NormFace(scale=64.0), LOSS_COLORS["normface"], "-")]
figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
measured = {}
for label, margin, color, linestyle in curves:
  probability, pull = probability_and_pull(margin)
  measured[label] = probability, pull
  left.plot(degrees, probability, color=color, linestyle=linestyle, linewidth=2, label=label)
  right.plot(degrees, pull / float(margin.scale), color=color, linestyle=linestyle, linewidth=2,
             label=label)
style_angle_axes(left, f"Target probability, {NUM_CLASSES:,} classes, negatives at 90°",
                 ylabel=r"$p_y$")
style_angle_axes(right, "How hard the loss pulls the embedding to its centre",
                 ylabel=r"$\partial L / \partial\theta$ / s")
left.legend(fontsize=8, loc="upper right")
save_figure(figure, "target_probability.png")


def angle_where(values, level):
  """The smallest angle (degrees) at which ``values`` fall to ``level`` or below."""
  return float(degrees[np.argmax(values <= level)])


def pull_starts(pull):
  """The smallest angle (degrees) at which ``pull`` reaches a tenth of its peak."""
  return float(degrees[np.argmax(pull >= pull.max() / 10)])


for s in scales:
  probability, pull = measured[f"ArcFace (m=0.5), s={s:g}"]
  print(f"ArcFace s={s:g}: p_y at the centre {probability[0]:.3f}, 0.5 at "
        f"{angle_where(probability, 0.5):.0f}°, pull below a tenth of its peak "
        f"({degrees[np.argmax(pull)]:.0f}°) within {pull_starts(pull):.0f}°")
print(f"CosFace s=16: p_y at the centre {measured['CosFace (m=0.35), s=16'][0][0]:.2f}")

# The text above.
step = degrees[1]
arc16, arc64 = measured["ArcFace (m=0.5), s=16"], measured["ArcFace (m=0.5), s=64"]
assert abs(arc16[0][0] - 0.94) < 0.005 and abs(angle_where(arc16[0], 0.5) - 16) <= step
assert abs(angle_where(arc64[0], 0.5) - 51) <= step
assert abs(pull_starts(arc16[1]) - 7) <= step + 0.5
assert abs(pull_starts(arc64[1]) - 49) <= step + 0.5
assert abs(degrees[np.argmax(arc16[1])] - 61) <= step + 0.5
# Just past pi - m the continuation pulls with s sin(theta), about 0.45 s.
assert arc64[1][(degrees > 152) & (degrees < 154)].min() > 0.4 * 64
assert measured["CosFace (m=0.35), s=16"][0].max() < 0.5
assert 16 < np.log(NUM_CLASSES - 1) / (1 - 0.35) < 17.5 and 11 < np.log(NUM_CLASSES - 1) < 11.4

# %% [markdown]
# ## Annealing, overflow modes, combined margins and hard negatives
#
# - SphereFace anneals $\lambda$ with the step (`margins.sphereface_lambda`): the target starts as
#   plain softmax ($\lambda = 1000$) and bends towards $\psi$ as $\lambda$ falls to 5.
# - ArcFace past $\pi - m$, zoomed in: the library's two ways to handle the overflow (the
#   default and `easy_margin`) beside the plain formula. (`detach_margin` changes only the
#   gradient: its values are the default's.)
# - The combined margin $\cos(m_1\theta + m_2) - m_3$ contains SphereFace-like ($m_1$), ArcFace
#   ($m_2$) and CosFace ($m_3$) margins. Where $m_1\theta + m_2$ passes $\pi$ (the kinks) the
#   library continues it as $\cos\theta - \cos\theta^* - 1 - m_3$, $\theta^* = (\pi - m_2)/m_1$:
#   no step, so $(1, 0.5, 0)$ is ArcFace only up to $\pi - m$, where ArcFace's default steps down.
# - CurricularFace: a negative class $j$ is *hard* when $\cos\theta_j > \cos(\theta_y + m)$; its
#   logit becomes $\cos\theta_j\,(t + \cos\theta_j)$, where $t$ tracks the mean target cosine:
#   early in training ($t \approx 0$) hard negatives with $\cos\theta_j > 0$ are played down
#   (as drawn, $\theta_y = 60°$), later ($t \to 1$) stressed. Past 90° the early logit
#   $\cos^2\theta_j$ is positive: with $\theta_y + m$ beyond 90°, as early in training, those
#   negatives are raised.
#   MV-Softmax (`kind='arc'`) takes the same negatives as mis-classified and always stresses them:
#   $(1 + t)\cos\theta_j + t$ with a fixed $t$.

# %%
figure, axes = plt.subplots(2, 2, figsize=(13, 9.5))

steps = [0, 100, 300, 1000, 3000]
for step, color in zip(steps, variants(LOSS_COLORS["sphereface"], len(steps))):
  annealing = float(margins.sphereface_lambda(step))
  axes[0, 0].plot(degrees, target_curve(margins.SphereFace(margin=4, annealing=annealing)),
                  color=color, linewidth=2, label=f"step {step}: λ = {annealing:.1f}")
axes[0, 0].plot(degrees, target_curve(margins.Softmax()), color=LOSS_COLORS["softmax"],
                linestyle=":", label="softmax")
style_angle_axes(axes[0, 0], "SphereFace (m=4) as sphereface_lambda anneals")
axes[0, 0].legend(fontsize=8, loc="lower left")

arcface_margin = 0.5
modes = [(r"default: $\cos\theta - m\sin m$ past $\pi - m$",
          margins.ArcFace(scale=1.0, margin=arcface_margin), "-"),
         ("easy_margin", margins.ArcFace(scale=1.0, margin=arcface_margin, easy_margin=True), "-.")]
for label, margin, linestyle in modes:
  axes[0, 1].plot(degrees, target_curve(margin), color=LOSS_COLORS["arcface"],
                  linestyle=linestyle, linewidth=2, label=label)
axes[0, 1].plot(degrees, np.asarray(cos_add_angle(cos, arcface_margin)),
                color=LOSS_COLORS["arcface"], linestyle=":", linewidth=2,
                label=r"plain $\cos(\theta + m)$: not monotone")
axes[0, 1].plot(degrees, target_curve(margins.Softmax()), color=LOSS_COLORS["softmax"],
                linewidth=4, alpha=0.3, label="softmax")
axes[0, 1].axvline(np.degrees(np.pi - arcface_margin), color="0.5", linewidth=0.8)
axes[0, 1].annotate(r"$\theta = \pi - m$", (np.degrees(np.pi - arcface_margin), 0.5),
                    xytext=(5, 0), textcoords="offset points", fontsize=9)
style_angle_axes(axes[0, 1], f"ArcFace (m={arcface_margin}) past π - m: default, easy_margin, "
                 "plain")
axes[0, 1].set_xlim(60, 180)
axes[0, 1].legend(fontsize=8, loc="lower left")

combined = [(1.0, 0.3, 0.2), (0.9, 0.4, 0.15), (1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.35, 0.0, 0.0)]
for (m1, m2, m3), color in zip(combined, variants(LOSS_COLORS["combined_margin"], len(combined))):
  axes[1, 0].plot(
      degrees, target_curve(margins.CombinedMargin(scale=1.0, m1=m1, m2=m2, m3=m3)),
      color=color, linewidth=2, label=f"(m1, m2, m3) = ({m1:g}, {m2:g}, {m3:g})")
axes[1, 0].plot(degrees, target_curve(margins.Softmax()), color=LOSS_COLORS["softmax"],
                linestyle=":", label="softmax")
axes[1, 0].set_ylim(-2.1, 1.05)
style_angle_axes(axes[1, 0], r"Combined margin $\cos(m_1\theta + m_2) - m_3$")
axes[1, 0].legend(fontsize=8, loc="lower left")

target_angle = 60.0
target_rows = unit_rows(jnp.full((1,), np.cos(np.radians(target_angle)), jnp.float32))
ts = [0.0, 0.3, 0.6, 1.0]
for t, color in zip(ts, variants(LOSS_COLORS["curricularface"], len(ts))):
  curricular = margins.CurricularFace(scale=1.0, margin=arcface_margin, t=t)
  negatives = curricular.nontarget_logits(cos[None, :], target_rows)[0]
  axes[1, 1].plot(degrees, np.asarray(negatives), color=color, linewidth=2, label=f"t = {t:g}")
mv_softmax = margins.MVSoftmax(scale=1.0, margin=arcface_margin, kind="arc")
axes[1, 1].plot(degrees, np.asarray(mv_softmax.nontarget_logits(cos[None, :], target_rows)[0]),
                color=LOSS_COLORS["mv_softmax"], linestyle="--", linewidth=2,
                label=f"MV-Softmax (arc), t = {mv_softmax.t:g}")
axes[1, 1].plot(degrees, np.asarray(margins.NormFace(scale=1.0).nontarget_logits(
    cos[None, :], target_rows)[0]), color=LOSS_COLORS["softmax"], linestyle=":",
                label="plain cos (every other loss)")
hard_below = target_angle + np.degrees(arcface_margin)
axes[1, 1].axvspan(0, hard_below, color=LOSS_COLORS["curricularface"], alpha=0.08)
axes[1, 1].text(4, -0.9, "hard negatives:\n" + rf"$\theta_j < \theta_y + m$ = {hard_below:.0f}°",
                fontsize=9)
style_angle_axes(axes[1, 1], "CurricularFace, MV-Softmax: negative logits for "
                 rf"$\theta_y$ = {target_angle:.0f}°",
                 ylabel="negative logit / s")
axes[1, 1].set_xlabel(r"$\theta_j$, angle to a negative centre (degrees)")
axes[1, 1].legend(fontsize=8, loc="upper right")

figure.tight_layout()
save_figure(figure, "target_logit_details.png")

# %% [markdown]
# ## Margins that depend on the feature norm, or on chance
#
# Three margins of the zoo are not a function of $\theta$ alone, so they get curves of their
# own (still at `scale=1`, with `margins.Rows` carrying the embedding norm $|x|$):
#
# - **AdaFace** reads image quality from $|x|$ against the batch's norm statistics
#   ($\mu$, $\sigma$): $\hat z = \mathrm{clip}(h(|x| - \mu)/\sigma, -1, 1)$ and the target
#   $\cos(\theta - m\hat z) - m(1 + \hat z)$. A low-norm (hard to recognise) example, $\hat z = -1$,
#   gets ArcFace's $\cos(\theta + m)$; a high-norm one, $\hat z = 1$, an additive $2m$ with the
#   angle *reduced* by $m$, CosFace-like; $\hat z = 0$ is CosFace's $\cos\theta - m$. As in the
#   official code the shifted angle is clipped to $[\epsilon, \pi - \epsilon]$: flat below
#   $\theta = m$ at $\hat z = 1$, held at $-1$ past $\pi - m$ at $\hat z = -1$.
# - **MagFace** is ArcFace with a margin that grows linearly with $|x|$ between $l_a$ and $u_a$
#   (0.45 at $|x| \le 10$ to 0.8 at $|x| \ge 110$ by default): larger norms must sit closer to
#   their centre. As in its authors' code, the margin applies only where $\cos\theta > 0$ (the
#   easy margin): at 90° the target jumps back up to the plain $\cos\theta$ and follows it.
# - **ElasticFace** draws each example's margin from $\mathcal{N}(m, \sigma)$ at every step: the
#   target is a band around $\cos(\theta + m)$ (or CosFace's curve, `kind="cos"`), with no
#   continuation past $\pi - m$, as in its authors' code. Drawn: the 2.5-97.5 %
#   band of 2,000 draws per angle for the default $\sigma = 0.0125$ and, to make it visible, 0.05.

# %%
figure, axes = plt.subplots(1, 3, figsize=(18, 5))

norm_mean, norm_std, h = 20.0, 5.0, 0.333
adaface = margins.AdaFace(scale=1.0, margin=0.4, h=h, norm_mean=norm_mean, norm_std=norm_std)
qualities = [-1.0, -0.5, 0.0, 0.5, 1.0]
for quality, color in zip(qualities, variants(LOSS_COLORS["adaface"], len(qualities))):
  norm = norm_mean + quality * norm_std / h
  rows = margins.Rows(cos=cos, embedding_norm=jnp.full_like(cos, norm),
                      weight_norm=jnp.ones_like(cos))
  axes[0].plot(degrees, np.asarray(adaface.target_logit(rows)), color=color, linewidth=2,
               label=rf"$|x|$ = {norm:.1f}: $\hat z$ = {quality:+g}")
axes[0].plot(degrees, target_curve(margins.Softmax()), color=LOSS_COLORS["softmax"],
             linestyle=":", label="softmax")
style_angle_axes(axes[0], rf"AdaFace (m=0.4, h={h}; $\mu$={norm_mean:g}, $\sigma$={norm_std:g})")
axes[0].set_ylim(-2.1, 1.05)
axes[0].legend(fontsize=8, loc="lower left")

magface = margins.MagFace(scale=1.0)
norms = [10.0, 35.0, 60.0, 85.0, 110.0]
for norm, color in zip(norms, variants(LOSS_COLORS["magface"], len(norms))):
  rows = margins.Rows(cos=cos, embedding_norm=jnp.full_like(cos, norm),
                      weight_norm=jnp.ones_like(cos))
  adaptive = float(magface.adaptive_margin(rows)[0])
  axes[1].plot(degrees, np.asarray(magface.target_logit(rows)), color=color, linewidth=2,
               label=rf"$|x|$ = {norm:g}: m = {adaptive:.3g}")
axes[1].plot(degrees, target_curve(margins.Softmax()), color=LOSS_COLORS["softmax"],
             linestyle=":", label="softmax")
style_angle_axes(axes[1], "MagFace (defaults): ArcFace with m growing with |x|, easy margin")
axes[1].set_ylim(-2.1, 1.05)
axes[1].legend(fontsize=8, loc="lower left")

draws = 200 if QUICK else 2000
many_cos = jnp.tile(cos, draws)
for sigma, alpha in ((0.05, 0.2), (0.0125, 0.5)):
  elastic = margins.ElasticFace(key=jax.random.key_data(jax.random.key(0)), scale=1.0,
                                margin=0.5, sigma=sigma)
  ones = jnp.ones_like(many_cos)
  targets = np.asarray(elastic.target_logit(margins.Rows(many_cos, ones, ones)))
  low, high = np.percentile(targets.reshape(draws, -1), [2.5, 97.5], axis=0)
  axes[2].fill_between(degrees, low, high, color=LOSS_COLORS["elasticface"], alpha=alpha,
                       linewidth=0, label=rf"$\sigma$ = {sigma:g}: 95 % of the draws")
axes[2].plot(degrees, np.asarray(cos_add_angle(cos, 0.5)), color=LOSS_COLORS["elasticface"],
             linewidth=1, label=r"$\cos(\theta + 0.5)$")
axes[2].plot(degrees, target_curve(margins.Softmax()), color=LOSS_COLORS["softmax"],
             linestyle=":", label="softmax")
style_angle_axes(axes[2], "ElasticFace-Arc (m=0.5): a margin drawn per example")
axes[2].set_ylim(-2.1, 1.05)
axes[2].legend(fontsize=8, loc="lower left")

figure.tight_layout()
save_figure(figure, "target_logits_norm_and_random.png")

# With zero spread ElasticFace is cos(theta + m) (no continuation past pi - m, as in its
# authors' code), and AdaFace at z = 0 is CosFace (up to its clip of theta to [eps, pi - eps]).
zero_spread = margins.ElasticFace(key=jax.random.key_data(jax.random.key(0)), scale=1.0,
                                  margin=0.5, sigma=0.0)
np.testing.assert_allclose(target_curve(zero_spread), np.asarray(cos_add_angle(cos, 0.5)),
                           atol=1e-6)
at_mean = margins.Rows(cos=cos, embedding_norm=jnp.full_like(cos, norm_mean),
                       weight_norm=jnp.ones_like(cos))
np.testing.assert_allclose(np.asarray(adaface.target_logit(at_mean)),
                           target_curve(margins.CosFace(scale=1.0, margin=0.4)), atol=2e-3)

# %% [markdown]
# ## Binary decision margins in angle space
#
# Two classes, an embedding at angle $\theta_1$ from centre 1 and $\theta_2$ from centre 2. Class
# 1 wins with its margin when its target logit beats the logit class 2 gets as a negative,
# $t(\theta_1) > n(\theta_2)$; the boundary $t(\theta_1) = n(\theta_2)$ is drawn solid, class 2's
# mirror image dashed. Between them (grey) neither class has cleared its margin: the decision
# margin of the CosFace and ArcFace papers' figures. Plain softmax at equal norms has none; a
# negative margin would make both classes win in a band (drawn beige). (Not
# every point of the square is reachable for a given angle between the two centres; the papers
# draw the whole square, and so do we.)

# %%
grid = np.linspace(0, np.pi, 91 if QUICK else 361)
grid_cos = jnp.asarray(np.cos(grid), jnp.float32)


def class_one_advantage(margin):
  """``[N, N]`` ``t(theta_1) - n(theta_2)`` over ``grid`` (rows: theta_1, columns: theta_2)."""
  cos1, cos2 = jnp.meshgrid(grid_cos, grid_cos, indexing="ij")
  rows = unit_rows(cos1.reshape(-1))
  negative = margin.nontarget_logits(cos2.reshape(-1, 1), rows)[:, 0]
  return np.asarray(margin.target_logit(rows) - negative).reshape(cos1.shape)


def style_angle_plane(axes, title):
  axes.set_title(title, fontsize=10)
  axes.set_xlabel(r"$\theta_1$ (degrees)")
  axes.set_ylabel(r"$\theta_2$ (degrees)")
  axes.set_xticks(range(0, 181, 45))
  axes.set_yticks(range(0, 181, 45))
  axes.set_aspect("equal")


def draw_decision_regions(axes, margin, color, title):
  """Shades where class 1, class 2 or neither clears its margin; draws both boundaries."""
  one = class_one_advantage(margin)
  two = one.T  # Class 2's advantage is class 1's with the angles swapped.
  neither = (one <= 0) & (two <= 0)
  both = (one > 0) & (two > 0)
  extent = np.degrees(grid).tolist()
  axes.contourf(extent, extent, neither.T.astype(float), levels=[0.5, 1.5], colors=["0.85"])
  if both.any():
    axes.contourf(extent, extent, both.T.astype(float), levels=[0.5, 1.5], colors=["#fde9c8"])
  axes.contour(extent, extent, one.T, levels=[0], colors=[color], linewidths=2)
  axes.contour(extent, extent, two.T, levels=[0], colors=[color], linewidths=2,
               linestyles="--")
  axes.plot([0, 180], [0, 180], color="0.6", linewidth=0.6)
  axes.text(175, 5, "class 2", ha="right", va="bottom", fontsize=9)
  axes.text(5, 175, "class 1", ha="left", va="top", fontsize=9)
  style_angle_plane(axes, title)


# (title, margin, colour, line style in the overview)
BOUNDARY_MARGINS = [
    ("Softmax / NormFace", margins.Softmax(), LOSS_COLORS["softmax"], "-"),
    ("SphereFace (m=4)", margins.SphereFace(margin=4), LOSS_COLORS["sphereface"], "-"),
    ("SphereFace (m=4, λ=5)", margins.SphereFace(margin=4, annealing=5.0),
     LOSS_COLORS["sphereface"], "--"),
    ("CosFace (m=0.35)", margins.CosFace(scale=1.0, margin=0.35), LOSS_COLORS["cosface"], "-"),
    ("ArcFace (m=0.5)", margins.ArcFace(scale=1.0, margin=0.5), LOSS_COLORS["arcface"], "-"),
    ("ArcFace (m=0.5), easy_margin", margins.ArcFace(scale=1.0, margin=0.5, easy_margin=True),
     LOSS_COLORS["arcface"], "--"),
    ("Combined (1, 0.3, 0.2)", margins.CombinedMargin(scale=1.0, m1=1.0, m2=0.3, m3=0.2),
     LOSS_COLORS["combined_margin"], "-"),
    ("CurricularFace (m=0.5, t=0.2)", margins.CurricularFace(scale=1.0, margin=0.5, t=0.2),
     LOSS_COLORS["curricularface"], "-"),
    ("CurricularFace (m=0.5, t=1)", margins.CurricularFace(scale=1.0, margin=0.5, t=1.0),
     LOSS_COLORS["curricularface"], "--"),
]

figure, axes = plt.subplots(2, 5, figsize=(21, 9))
overview = axes[0, 0]
for (label, margin, color, linestyle), panel in zip(BOUNDARY_MARGINS, axes.flat[1:]):
  draw_decision_regions(panel, margin, color, label)
  overview.contour(np.degrees(grid), np.degrees(grid), class_one_advantage(margin).T, levels=[0],
                   colors=[color], linewidths=1.8, linestyles=linestyle)
  overview.plot([], [], color=color, linestyle=linestyle, label=label)  # legend entry
style_angle_plane(overview, "Class 1's boundary, every loss")
overview.legend(fontsize=6.5, loc="lower right")
figure.suptitle("Binary decision margins: class 1 clears its margin above the solid line, class 2 "
                "below the dashed one, neither in the grey band", fontsize=12)
figure.tight_layout()
save_figure(figure, "decision_boundaries.png")

# %% [markdown]
# ## SphereFace2: thresholds instead of a competition
#
# SphereFace2 (`margins.SphereFace2`) trains one binary classifier per class: class $j$ claims an
# example when its logit $f_j = r\,g(\cos\theta_j) + b$ is positive, with
# $g(z) = 2((z + 1)/2)^t - 1$ and a learnt bias $b$. The target's classifier must clear $f_y > 0$
# with the margin taken off (SphereFace2-C: $r(g(\cos\theta_y) - m) + b$), every other class's
# must stay below 0 with the margin added ($r(g(\cos\theta_j) + m) + b$). So an example belongs
# to its class by an absolute angle, whatever the other classes score, which is the rule of
# open-set verification. SphereFace2-A and -M put the margin into the target's angle instead,
# $f_y = r\,g(\cos(\min(\theta_y + m, \pi))) + b$ and $r\,g(\cos(\min(m\theta_y, \pi))) + b$,
# and leave the others at $f_j = r\,g(\cos\theta_j) + b$. Below, $f / r$ against the angle to
# the class's own centre, at the initial bias `sphereface2_bias(C)` for 10,000 classes: where each
# curve crosses 0 is the angle the target must beat (solid) and the angle every other class must
# stay beyond (dashed); the angles between are the margin.
#
# The dashed curve is the same in all three panels. The initial bias makes an untrained network's
# loss flat in $b$; with every cosine 0 the target's term is saturated, so what fixes $b$ is the
# $C - 1$ others: $\sigma(f_j(90°)) \approx \lambda / ((1 - \lambda)(C - 1))$, so
# $f_j(90°) = -8.36$ here, for every kind. The -C bias is $r m = 16$ below the -A and -M ones (the
# titles' $b$), which makes up for the margin the -C negatives carry, and
# $f_j = r\,g(\cos\theta_j) + f_j(90°) - r\,g(0)$ comes out the same curve.

# %%
num_classes = 10_000
figure, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
crossings = {}
for panel, (kind, margin_value) in zip(axes, [("cos", 0.4), ("arc", 0.5),
                                              ("multiplicative", 1.7)]):
  bias = margins.sphereface2_bias(num_classes, margin=margin_value, kind=kind)
  margin = margins.SphereFace2(bias=bias, margin=margin_value, kind=kind)
  target = target_curve(margin) / margin.scale
  other = np.asarray(margin.nontarget_logits(cos[:, None], unit_rows(cos)))[:, 0] / margin.scale
  color = LOSS_COLORS["sphereface2"]
  panel.plot(degrees, target, color=color, linewidth=2, label="target $f_y / r$")
  panel.plot(degrees, other, color=color, linewidth=2, linestyle="--",
             label="any other class $f_j / r$")
  panel.axhline(0, color="black", linewidth=0.8)
  # The curves fall with the angle: where each crosses 0, interpolated between grid points.
  crossings[kind] = [np.interp(0.0, curve[::-1], degrees[::-1]) for curve in (target, other)]
  for angle_, linestyle in zip(crossings[kind], ("-", "--")):
    panel.axvline(angle_, color="grey", linewidth=1, linestyle=linestyle)
  panel.axvspan(*crossings[kind], color="grey", alpha=0.15)
  style_angle_axes(panel, f"SphereFace2, kind={kind!r}, m={margin_value:g}, b={bias:.2f}",
                   ylabel="logit / r")
  panel.set_xlabel(r"$\theta$, angle to the class's own centre (degrees)")
  panel.legend(fontsize=8, loc="lower left")
figure.tight_layout()
save_figure(figure, "sphereface2_thresholds.png")
for kind, (target_angle, other_angle) in crossings.items():
  print(f"{kind:>14}: the target must be within {target_angle:.1f} deg, every other class "
        f"beyond {other_angle:.1f} deg")

# %%
# Check: SphereFace2-C's target crosses 0 where g(cos theta) = m - b / r, the others where
# g(cos theta) = -m - b / r: solve g for the angle and compare with the curves' crossings.
bias = margins.sphereface2_bias(num_classes)
for level, drawn in zip((0.4 - bias / 40.0, -0.4 - bias / 40.0), crossings["cos"]):
  cos_at = 2 * ((level + 1) / 2) ** (1 / 3) - 1
  assert abs(np.degrees(np.arccos(cos_at)) - drawn) < 0.05, (cos_at, drawn)
# Every kind's initial bias puts the others at the same logit: one dashed curve, one angle.
ratio = 0.7 / (0.3 * (num_classes - 1))
others_at_90 = np.log(ratio / (1 - ratio))  # sigmoid(others_at_90) = ratio
assert abs(bias + 40.0 * (-0.75 + 0.4) - others_at_90) < 1e-6, bias
for kind, (_, other_angle) in crossings.items():
  assert abs(other_angle - crossings["cos"][1]) < 0.05, (kind, other_angle)

# %% [markdown]
# ## Try your own margin
#
# Change `margin` below (any margin of `margins`, with `scale=1.0` to keep the units) and rerun
# the cell: the left plot shows its target logit against softmax's, the right one its decision
# margin.

# %%
margin = margins.ArcFace(scale=1.0, margin=0.5)
# margin = margins.CosFace(scale=1.0, margin=0.2)
# margin = margins.CombinedMargin(scale=1.0, m1=0.9, m2=0.4, m3=0.15)
# margin = margins.SphereFace(margin=2, annealing=1.0)

figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
left.plot(degrees, target_curve(margins.Softmax()), color=LOSS_COLORS["softmax"], label="softmax")
left.plot(degrees, target_curve(margin), color="black", linewidth=2, label=repr(margin))
style_angle_axes(left, "Your margin's target logit")
left.legend(fontsize=7, loc="lower left")
draw_decision_regions(right, margin, "black", "Your margin's decision regions")
figure.tight_layout()

# %% [markdown]
# ## Sliders
#
# In Jupyter with `ipywidgets` installed, move the sliders to redraw the first figure. (Headless
# runs, and kernels without `ipywidgets`, skip this cell.)

# %%
try:
  import ipywidgets
except ImportError:
  ipywidgets = None

if ipywidgets is None or "ipykernel" not in sys.modules:
  print("Sliders need a Jupyter kernel with ipywidgets; edit the cell above instead.")
else:
  def redraw(**margins_and_annealing):
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    draw_target_logits(left, right, **margins_and_annealing)
    plt.show()

  # (min, max, step) of each slider, which starts at draw_target_logits's default, as drawn above.
  slider_ranges = dict(
      cosface_margin=(0.0, 0.8, 0.05), arcface_margin=(0.0, 1.2, 0.05), sphereface_margin=(1, 6, 1),
      annealing=(0.0, 20.0, 0.5), m1=(0.5, 2.0, 0.05), m2=(0.0, 1.0, 0.05), m3=(0.0, 0.6, 0.05))
  defaults = inspect.signature(draw_target_logits).parameters
  ipywidgets.interact(redraw, **{
      name: (ipywidgets.IntSlider if isinstance(low, int) else ipywidgets.FloatSlider)(
          value=defaults[name].default, min=low, max=high, step=step)
      for name, (low, high, step) in slider_ranges.items()})
