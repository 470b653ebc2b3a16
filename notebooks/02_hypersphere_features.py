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
import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from common import LOSS_COLORS, QUICK, save_figure
from margins import data as data_lib
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
# trains far more slowly), batches of 64 and a learning rate of 0.05. With a 2-D embedding the
# six classes share a circle, 60 degrees each: CosFace's margin is 0.1 and ArcFace's 0.2 (the
# 3-D run keeps 0.3). SphereFace's annealing $\lambda = \max(5, 1000 / (1 + \gamma t))$ is
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


def scatter_digits(axes, points, labels, names, **kwargs):
  """One colour per digit (``tab10`` by the digit itself), so 6-9 differ from 0-5."""
  colours = matplotlib.colormaps["tab10"]
  for label in np.unique(labels):
    chosen = labels == label
    axes.scatter(*points[chosen].T, s=5, alpha=0.6, color=colours(int(names[label])),
                 label=names[label], **kwargs)


figure, axes = plt.subplots(2, len(RUNS), figsize=(4 * len(RUNS), 8.3))
for column, (key, title, _) in enumerate(RUNS):
  run_results = results[title]["metrics"]["_results"]
  for row, (name, description, split) in enumerate(SETS):
    embeddings, labels = run_results[name][0], run_results[name][1]
    panel = axes[row, column]
    scatter_digits(panel, embeddings, labels, digit_names[split])
    panel.set_aspect("equal", adjustable="datalim")
    panel.grid(alpha=0.3)
    panel.set_xlabel("feature 1")
    if column == 0:
      panel.set_ylabel(f"{description}\nfeature 2")
    if row == 0:
      panel.set_title(title, color=LOSS_COLORS[key], fontweight="bold")
  for row in range(2):
    if column == len(RUNS) - 1:
      axes[row, column].legend(title="digit", loc="center left", bbox_to_anchor=(1.02, 0.5),
                               markerscale=3)
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
  unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  panel = figure.add_subplot(1, 2, index + 1, projection="3d")
  polar, azimuth = np.meshgrid(np.linspace(0, np.pi, 13), np.linspace(0, 2 * np.pi, 25))
  panel.plot_wireframe(np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth),
                       np.cos(polar), color="0.85", linewidth=0.4)
  scatter_digits(panel, unit, labels, digit_names[split])
  panel.set_box_aspect((1, 1, 1))
  panel.set_title(description)
  panel.legend(title="digit", loc="center left", bbox_to_anchor=(1.05, 0.5), markerscale=3)
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
def pair_angles(embeddings, labels):
  """Angles (degrees) of all pairs ``i < j``: ``(same digit, different digits)``."""
  unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  first, second = np.triu_indices(len(labels), k=1)
  angles = np.degrees(np.arccos(np.clip(np.sum(unit[first] * unit[second], axis=1), -1, 1)))
  same = labels[first] == labels[second]
  return angles[same], angles[~same]


edges = np.linspace(0, 180, 61)
runs = RUNS + [RUN_3D]
figure, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 3.8), sharey=True)
for panel, (key, title, _) in zip(axes, runs):
  embeddings, labels, _ = results[title]["metrics"]["_results"]["open"]
  same, different = pair_angles(embeddings, labels)
  panel.hist(same, bins=edges, density=True, color=LOSS_COLORS[key], alpha=0.75,
             label=f"same digit, mean {same.mean():.0f}°")
  panel.hist(different, bins=edges, density=True, color="0.55", alpha=0.45,
             label=f"different, mean {different.mean():.0f}°")
  panel.set_title(title, color=LOSS_COLORS[key], fontsize=10, fontweight="bold")
  panel.set_xlabel("angle between the features (degrees)")
  panel.set_xticks(range(0, 181, 45))
  panel.grid(alpha=0.3)
  panel.legend(fontsize=8, loc="upper right")
axes[0].set_ylabel("density of pairs")
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
  verification = metrics["_results"]["open"][2]
  print(f"{title:<28} {run['dim']:>3} {metrics['closed/accuracy']:>11.3f} "
        f"{metrics['open/verification_accuracy']:>11.3f} ± "
        f"{metrics['open/verification_accuracy_std']:.3f} {metrics['open/auc']:>6.3f} "
        f"{verification.eer:>6.3f}")
