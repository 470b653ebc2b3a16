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
# # Verification, step by step
#
# Face verification asks of two images "same identity or not?", for identities never seen in
# training. The LFW protocol, as `margins.evaluation.evaluate_verification` implements it after
# insightface: embed both images, L2-normalise, score the pair by the squared distance
# $|e_1 - e_2|^2 = 2 - 2\cos\theta$, accept it when the distance is below a threshold, and
# measure the accuracy by 10-fold cross-validation (each fold is judged with the threshold that
# is best on the other nine).
#
# Here on the digits: an ArcFace network trained on digits 0-5 verifies pairs of 6-9. The run is
# trained once into `WORKDIR` and restored from its checkpoint on later runs of the notebook.
# `MARGINS_QUICK=1` trains a few steps only; figures go to `MARGINS_FIGURES_DIR` (default
# `docs/figures`).

# %%
import importlib.util
import pathlib
import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

from common import FIGURES_DIR, LOSS_COLORS, QUICK, save_figure
from margins import data as data_lib
from margins import evaluation
from margins import train_lib

CONFIG_PATH = pathlib.Path.cwd().parent / "configs" / "digits_arcface.py"
WORKDIR = pathlib.Path(tempfile.gettempdir()) / (
    "margins_04_arcface_quick" if QUICK else "margins_04_arcface")

# %% [markdown]
# ## The checkpoint
#
# `configs/digits_arcface.py` (32-D embedding, s = 16, m = 0.5), with the fast settings of
# notebook 02: the digits at 8x8 pixels, BatchNorm, batches of 64, learning rate 0.05.
# Delete `WORKDIR` to train again.

# %%
spec = importlib.util.spec_from_file_location("digits_arcface", CONFIG_PATH)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.data.image_size = 8
config.model.kwargs = dict(widths=(16, 32, 64), batch_norm=True)
config.batch_size = 64
config.optimizer.learning_rate = 0.05
config.num_steps = 10 if QUICK else 300
config.log_every = max(config.num_steps // 4, 1)
config.checkpoint_every = config.num_steps

if not (WORKDIR / "checkpoints").is_dir():
  train_lib.train_and_evaluate(config, str(WORKDIR))
experiment, state = train_lib.restore(str(WORKDIR))
print(f"restored step {int(state.step)} of {WORKDIR}")

# %% [markdown]
# ## Embeddings of the unseen digits, and pairs
#
# `make_pairs` draws balanced pairs (same digit / different digits alternate, so every fold
# holds both kinds); `evaluate_verification` scores them.

# %%
data_config = experiment.config.data
source = data_lib.digits("open_test", image_size=data_config.image_size,
                         open_set_train_classes=data_config.open_set_train_classes)
embed_fn = jax.jit(lambda s, x: train_lib.embed(experiment, s, x))
embeddings = train_lib.compute_embeddings(experiment, state, source, flip=False,
                                          embed_fn=embed_fn)
pairs, issame = evaluation.make_pairs(source.labels, 3000, seed=0)
result = evaluation.evaluate_verification(embeddings[pairs.reshape(-1)], issame)
print(f"{len(source)} images of digits {', '.join(source.class_names)} -> embeddings "
      f"{embeddings.shape}; {len(issame)} pairs, {issame.sum()} of one digit")
print(evaluation.format_verification("digits 6-9", result, flip=False))

# %% [markdown]
# ## Pair similarities
#
# The cosine of each pair, $1 - d/2$ from the library's squared distances $d$. Pairs of one
# digit should sit near 1, pairs of two digits near 0 or below; the overlap is where
# verification fails. The dotted lines are the ten folds' thresholds (next section).

# %%
similarity = 1 - result.distances / 2
fold_cosines = 1 - result.fold_thresholds / 2
edges = np.linspace(-1, 1, 81)
figure, axes = plt.subplots(figsize=(8, 4.5))
axes.hist(similarity[issame], bins=edges, color=LOSS_COLORS["arcface"], alpha=0.7,
          label=f"same digit ({issame.sum()} pairs)")
axes.hist(similarity[~issame], bins=edges, color="0.5", alpha=0.55,
          label=f"different digits ({(~issame).sum()} pairs)")
for index, cosine in enumerate(fold_cosines):
  axes.axvline(cosine, color="black", linestyle=":", linewidth=1,
               label="fold thresholds" if index == 0 else None)
axes.set_xlabel(r"cosine similarity of the pair, $\cos\theta = 1 - d/2$")
axes.set_ylabel("pairs")
axes.set_title("ArcFace on unseen digits: pair similarities")
axes.grid(alpha=0.3)
axes.legend()
plt.show()

# %% [markdown]
# ## The threshold chosen per fold
#
# The pairs are split in order into 10 folds (`result.fold_index` says which fold tests each
# pair). For each fold the library picks, on a grid of distances $0, 0.01, \dots, 3.99$, the
# threshold with the best accuracy on the *other* nine folds, and measures the accuracy of that
# threshold on the fold: `result.fold_thresholds` and `result.fold_accuracies`. Their mean is the
# reported accuracy.

# %%
print(f"{'fold':>4} {'pairs':>6} {'threshold d':>12} {'as cosine':>10} {'accuracy':>9}")
for index, (threshold, accuracy) in enumerate(zip(result.fold_thresholds,
                                                  result.fold_accuracies)):
  print(f"{index:>4} {np.sum(result.fold_index == index):>6} {threshold:>12.2f} "
        f"{1 - threshold / 2:>10.3f} {accuracy:>9.4f}")
print(f"mean accuracy {result.accuracy:.4f} ± {result.accuracy_std:.4f} (std over folds)")

# Each pair judged as the protocol judges it: accepted when its distance is below its fold's
# threshold. These decisions reproduce the library's fold accuracies.
accepted = result.distances < result.fold_thresholds[result.fold_index]
correct = accepted == issame
np.testing.assert_allclose([correct[result.fold_index == index].mean()
                            for index in range(len(result.fold_accuracies))],
                           result.fold_accuracies)

# %% [markdown]
# ## The ROC
#
# Every threshold at once: the true-accept rate (same pairs accepted) against the false-accept
# rate (different pairs accepted), drawn by `margins.evaluation.plot_roc`.

# %%
roc_path = evaluation.plot_roc({"ArcFace, digits 6-9": result},
                               FIGURES_DIR / "verification_roc.png",
                               title="Verification ROC on unseen digits")
print(f"saved {roc_path}; TAR@FAR: " + ", ".join(
    f"{far:g}: {tar:.3f}" for far, tar in result.tar_at_far.items()))
display(Image(roc_path))

# %% [markdown]
# ## Failure cases
#
# The pairs the protocol gets wrong: **false accepts**, two different digits accepted (the most
# similar first), and **false rejects**, one digit rejected (the least similar first), with
# their cosine and their fold's threshold.

# %%
NUM_SHOWN = 8
false_accepts = np.flatnonzero(accepted & ~issame)
false_rejects = np.flatnonzero(~accepted & issame)
print(f"{len(false_accepts)} false accepts, {len(false_rejects)} false rejects "
      f"of {len(issame)} pairs")
kinds = [("false accept", false_accepts[np.argsort(-similarity[false_accepts])][:NUM_SHOWN]),
         ("false reject", false_rejects[np.argsort(similarity[false_rejects])][:NUM_SHOWN])]

figure, axes = plt.subplots(2, NUM_SHOWN, figsize=(1.9 * NUM_SHOWN, 4.6), squeeze=False)
for row, (kind, chosen) in enumerate(kinds):
  for column, panel in enumerate(axes[row]):
    panel.set_xticks([])
    panel.set_yticks([])
    if column >= len(chosen):
      panel.axis("off")
      continue
    pair = chosen[column]
    first, second = (source[int(i)] for i in pairs[pair])
    gap = np.zeros((first["image"].shape[0], 1), np.uint8)  # white
    panel.imshow(np.concatenate([first["image"][..., 0], gap, second["image"][..., 0]], axis=1),
                 cmap="gray_r", vmin=0, vmax=255)
    names = [source.class_names[r["label"]] for r in (first, second)]
    panel.set_title(f"{names[0]} vs {names[1]}\ncos {similarity[pair]:.2f} "
                    f"(t {fold_cosines[result.fold_index[pair]]:.2f})", fontsize=9)
  axes[row, 0].set_ylabel(f"{kind}s", fontsize=11)
figure.suptitle("Failure cases: pairs of unseen digits the fold's threshold decides wrongly "
                "(accepted when cos > t)", fontsize=11)
figure.tight_layout()
save_figure(figure, "failure_cases.png")
