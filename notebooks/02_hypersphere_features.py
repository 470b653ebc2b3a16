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
# # Features on the hypersphere
#
# The figures of the center-loss and SphereFace papers, on the digits: a small CNN (LeNets++,
# `small_cnn`) with a **2-D embedding** trained with softmax, softmax + center loss, SphereFace,
# CosFace and ArcFace, and ArcFace once more with a **3-D embedding**. Each run is one call of
# `margins.train_lib.train_and_evaluate(config, workdir)`, the training loop of `train.py`,
# with a config from `configs/`.
#
# The networks train on digits 0-5 (the *closed set*: their held-out examples are classified);
# digits 6-9 are never seen in training (the *open set*, like the identities of a face
# verification benchmark): their features show whether what the loss learned transfers.
#
# `MARGINS_QUICK=1` trains a few steps only; figures go to `MARGINS_FIGURES_DIR` (default
# `docs/figures`).

# %%
import importlib.util
import pathlib
import tempfile
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

from common import LOSS_COLORS, QUICK, save_figure
from margins import data as data_lib
from margins import evaluation
from margins import train_lib

CONFIGS = pathlib.Path.cwd().parent / "configs"
# The runs share most of their programs (the CNN's initialisation, its inference): compile once.
jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(tempfile.gettempdir())
                                                    / "margins_notebooks_jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def load_config(name):
  """``get_config()`` of ``configs/NAME.py``."""
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# %% [markdown]
# ## The runs
#
# The configs are those of `configs/`, changed so that all six runs fit in a few minutes on a
# 2-core CPU: the digits at their native 8x8 pixels, BatchNorm in the CNN (LeNets++ without it
# trains far more slowly), batches of 64, a learning rate of 0.05 and gradients clipped to norm 1
# (with 5, the configs' value, 2-D ArcFace reaches 66 % closed-set accuracy in 200 steps instead
# of 76 %). With a 2-D embedding the
# six classes share a circle, 60 degrees each: CosFace's margin is 0.1 and ArcFace's 0.2 (the
# 3-D run uses 0.3). SphereFace's annealing $\lambda = \max(5, 1000 / (1 + \gamma t))$ is
# sped up so that $\lambda$ reaches 5 two thirds of the way through the run instead of after
# 1,700 steps.
#
# Edit `RUNS` (a loss, a margin) and rerun the cells below to see the effect.

# %%
NUM_STEPS = 10 if QUICK else 200


def digits_config(name, **changes):
  """``configs/NAME.py`` with this notebook's fast settings; ``changes``: config fields."""
  config = load_config(name)
  config.data.image_size = 8
  config.model.kwargs = dict(widths=(16, 32, 64), batch_norm=True)
  config.batch_size = 64
  config.optimizer.learning_rate = 0.05
  config.optimizer.grad_clip_norm = 1.0
  config.num_steps = NUM_STEPS
  config.log_every = max(NUM_STEPS // 4, 1)
  config.checkpoint_every = NUM_STEPS
  config.eval.num_pairs = 1000 if QUICK else 3000
  config.update(changes)
  return config


annealing_gamma = (1000 / 5 - 1) / (2 / 3 * NUM_STEPS)
# (key, title, config): the key picks the loss's colour in every notebook.
RUNS = [
    ("softmax", "Softmax", digits_config("digits_softmax", model=dict(embedding_dim=2))),
    ("center", "Softmax + center loss", digits_config("digits_softmax_center")),
    ("sphereface", "SphereFace (m=4, annealed)", digits_config(
        "digits_sphereface", model=dict(embedding_dim=2),
        loss=dict(lambda_schedule=dict(gamma=annealing_gamma)))),
    ("cosface", "CosFace (s=16, m=0.1)", digits_config(
        "digits_cosface", model=dict(embedding_dim=2), loss=dict(margin=0.1))),
    ("arcface", "ArcFace (s=16, m=0.2)", digits_config("digits_arcface_2d")),
]
RUN_3D = ("arcface", "ArcFace 3-D (s=16, m=0.3)", digits_config(
    "digits_arcface", model=dict(embedding_dim=3), loss=dict(margin=0.3)))
if QUICK:  # Under CI: two of the losses, to keep the compilations few.
  RUNS = [RUNS[0], RUNS[-1]]

# %%
results = {}
workdirs = pathlib.Path(tempfile.mkdtemp(prefix="margins_02_"))
for key, title, config in RUNS + [RUN_3D]:
  start = time.perf_counter()
  metrics = train_lib.train_and_evaluate(config, str(workdirs / title.split(" (")[0]))
  results[title] = dict(key=key, dim=config.model.embedding_dim, metrics=metrics)
  print(f"== {title}: {time.perf_counter() - start:.0f} s\n")

# %% [markdown]
# ## The features, coloured by class
#
# Top: held-out examples of the training digits; bottom: the unseen digits. Softmax separates
# the training classes by angle but leaves them wide and lets the norm grow; the center loss
# pulls each class to a point; the margin losses (SphereFace, CosFace, ArcFace) squeeze each
# class into a narrow spoke with empty angles between them. The unseen digits have no class
# centre of their own and fall into the same spokes or between them: with two dimensions there
# is no room left for new identities.

# %%
SETS = (("closed", "training digits (held-out examples)", "open_val"),
        ("open", "unseen digits", "open_test"))
data_config = RUNS[0][2].data
digit_names = {split: data_lib.digits(split, image_size=data_config.image_size,
                                      open_set_train_classes=data_config.open_set_train_classes
                                      ).class_names for _, _, split in SETS}


def digit_labels(labels, split):
  """Labels as the digits themselves, so that each digit keeps its colour (``tab10[digit]``)."""
  return np.asarray(digit_names[split], int)[labels]


figure, axes = plt.subplots(2, len(RUNS), figsize=(4 * len(RUNS), 8.3))
for column, (key, title, _) in enumerate(RUNS):
  run_results = results[title]["metrics"]["_results"]
  for row, (name, description, split) in enumerate(SETS):
    embeddings, labels = run_results[name][0], run_results[name][1]
    panel = axes[row, column]
    evaluation.draw_features(panel, embeddings, digit_labels(labels, split),
                             legend=column == len(RUNS) - 1)
    if column == 0:
      panel.set_ylabel(f"{description}\nfeature 2")
    if row == 0:
      panel.set_title(title, color=LOSS_COLORS[key], fontweight="bold")
figure.suptitle("2-D features of the digits: training digits 0-5 (top) and unseen digits 6-9 "
                "(bottom)", fontsize=13)
figure.tight_layout()
save_figure(figure, "features_2d.png")

# %% [markdown]
# And ArcFace with a 3-D embedding, normalised onto the unit sphere: the six training classes
# take six separated caps; with a third dimension the unseen digits find more room than on the
# circle.

# %%
key, title, _ = RUN_3D
run_results = results[title]["metrics"]["_results"]
figure = plt.figure(figsize=(12, 5.5))
for index, (name, description, split) in enumerate(SETS):
  embeddings, labels = run_results[name][0], run_results[name][1]
  panel = figure.add_subplot(1, 2, index + 1, projection="3d")
  evaluation.draw_features(panel, embeddings, digit_labels(labels, split), normalize=True)
  panel.set_title(description)
figure.suptitle(f"{title}: L2-normalised features on the unit sphere", color=LOSS_COLORS[key])
figure.tight_layout()
save_figure(figure, "features_3d.png")

# %% [markdown]
# ## Angles within and between classes
#
# For every pair of unseen-digit features (the open set, as in verification): the angle between
# the two, for pairs of one digit (filled, the loss's colour) and of two digits (grey). The gap
# between the two histograms is what a verification threshold has to fall into.

# %%
runs = RUNS + [RUN_3D]
figure, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 3.8), sharey=True)
for panel, (key, title, _) in zip(axes, runs):
  embeddings, labels, _ = results[title]["metrics"]["_results"]["open"]
  evaluation.draw_angle_histograms(panel, embeddings, labels, bins=60,
                                   colors=(LOSS_COLORS[key], "0.55"))
  panel.set_title(title, color=LOSS_COLORS[key], fontsize=10, fontweight="bold")
  panel.set_xticks(range(0, 181, 45))
  panel.legend(fontsize=7, loc="upper right")
  panel.set_ylabel("fraction of pairs" if panel is axes[0] else "")
figure.suptitle("Angles between features of the unseen digits 6-9", fontsize=12)
figure.tight_layout()
save_figure(figure, "angle_histograms.png")

# %% [markdown]
# ## Open-set verification
#
# Balanced pairs of unseen-digit images, scored by the cosine of their features, with the LFW
# protocol's 10-fold accuracy (`margins.evaluation.evaluate_verification`, the numbers
# `train_and_evaluate` reports). Closed-set accuracy: the training digits' held-out examples
# classified by the nearest class centre.

# %%
header = (f"{'loss':<28} {'dim':>3} {'closed acc.':>11} {'verification acc.':>19} "
          f"{'AUC':>6} {'EER':>6}")
print(header)
print("-" * len(header))
for title, run in results.items():
  metrics = run["metrics"]
  print(f"{title:<28} {run['dim']:>3} {metrics['closed/accuracy']:>11.3f} "
        f"{metrics['open/verification_accuracy']:>11.3f} ± "
        f"{metrics['open/verification_accuracy_std']:.3f} {metrics['open/auc']:>6.3f} "
        f"{metrics['open/eer']:>6.3f}")
