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
# is best on the other nine). For faces each embedding is first summed with that of the mirror
# image (the flip test, `compute_embeddings(..., flip=True)`); not for digits, whose mirror
# images are no digits: the config's `eval.flip` is off and this notebook follows it.
#
# Here on the digits: an ArcFace network trained on digits 0-5 verifies pairs of 6-9, beside the
# simplest possible baseline, the raw pixels scored by the same protocol. The run is trained
# into a new folder, `WORKDIR`, and restored from its checkpoint as any run would be.
# `MARGINS_QUICK=1` trains a few steps only; figures go to `MARGINS_FIGURES_DIR` (default
# `docs/figures`).

# %%
import pathlib
import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np

from common import (CONFIGS_DIR, DIFFERENT_PAIRS_COLOR, LOSS_COLORS, QUICK, pixel_verification,
                    save_figure)
from margins import data as data_lib
from margins import eval_lib
from margins import evaluation
from margins import train_lib

CONFIG_PATH = CONFIGS_DIR / "digits_arcface.py"
WORKDIR = pathlib.Path(tempfile.mkdtemp(prefix="margins_04_")) / "digits_arcface"

# %% [markdown]
# ## The checkpoint
#
# `configs/digits_arcface.py` as it is, the README's default experiment: LeNets++ with a 32-D
# embedding, ArcFace with s = 16 and m = 0.5, the digits upscaled to 16x16, 400 steps of
# batches of 128 (the whole notebook takes about a minute and a half on a 2-core CPU;
# `MARGINS_QUICK=1` takes the config's `quick` variant, 20 steps). A new folder each time: a run
# kept from an earlier version of the library would show that version's network.
#
# Fast settings like notebook 02's (8x8 digits, BatchNorm, batches of 64) at a learning rate
# of 0.05 do not suit this 32-D model: after 300 steps its embeddings had collapsed, nearly half
# of all pairs at a cosine above 0.98, and verified the unseen digits at chance, 0.54.

# %%
config = train_lib.config_from_file(CONFIG_PATH, "quick" if QUICK else None)

train_lib.train_and_evaluate(config, str(WORKDIR))
experiment, state = train_lib.restore(str(WORKDIR), parts="backbone")  # All embedding needs.
print(f"restored step {int(state.step)} of {WORKDIR}")

# %% [markdown]
# ## Embeddings of the unseen digits, and pairs
#
# `make_pairs` draws balanced pairs (same digit / different digits alternate, so every fold
# holds both kinds); `evaluate_verification` scores them. The baseline: the same pairs scored
# by the images themselves, each flattened to a vector of its pixels minus the mean image (the
# protocol L2-normalises it, so a pair's score is the cosine of the two centred images).

# %%
data_config = experiment.config.data
source = data_lib.digits("open_test", image_size=data_config.image_size,
                         open_set_train_classes=data_config.open_set_train_classes)
embed_fn = jax.jit(lambda s, x: eval_lib.embed(experiment, s, x))
flip = experiment.config.eval.flip  # False for the digits (see above).
embeddings = eval_lib.compute_embeddings(experiment, state, source, flip=flip,
                                         embed_fn=embed_fn)
pairs, issame = evaluation.make_pairs(source.labels, 3000, seed=0)
result = evaluation.evaluate_verification(embeddings[pairs.reshape(-1)], issame)
print(f"{len(source)} images of digits {', '.join(source.class_names)} -> embeddings "
      f"{embeddings.shape}; {len(issame)} pairs, {issame.sum()} of one digit")
print(evaluation.format_verification("ArcFace", result, flip=flip))

pixel_result, num_pixels = pixel_verification(source, pairs, issame)
print(f"\nraw pixels: {num_pixels} per image")
print(evaluation.format_verification("pixels", pixel_result, flip=False))

# %% [markdown]
# ## Pair similarities
#
# The cosine of each pair, $1 - d/2$ from the library's squared distances $d$: left the ArcFace
# embeddings, right the centred pixels. The overlap of the two histograms is where verification
# fails; the dotted lines are the ten folds' thresholds (next section).
#
# The numbers below are those of a full run on 2026-12-07 (commit 203849c). A change of float32
# rounding anywhere in the 400 training steps moves them: before 8d4390d, which normalises the
# images on the devices, the same run verified at 0.657 (AUC 0.710). What they say held for both.
#
# ArcFace's pairs of one digit lean towards 1 (median cosine 0.58), but its pairs of two digits
# spread from −0.74 to above 0.9 (median 0.07) and the two overlap over most of the range: at
# the folds' threshold, a cosine near 0.40, 418 of the 1,500 pairs of two digits are accepted
# and 507 of the 1,500 pairs of one digit rejected. The centred pixels keep the two further
# apart (medians 0.45 and −0.16; at their threshold, 0.16, 166 false accepts and 319 false
# rejects): they verify the unseen digits better than the network, 0.838 against 0.692, AUC
# 0.910 against 0.756.
#
# Raw pixels beating the network is what the setting predicts, not a bug: the network learned
# to tell apart six identities, the digits 0-5 (closed-set accuracy 0.99), and nothing in its
# loss asks its 32 dimensions to keep what distinguishes a 7 from a 9. Six training identities
# do not teach features that transfer to new ones; face models get there by training on tens
# of thousands of identities or more. Nor does training longer help the unseen digits. On
# the same 3,000 pairs (measured separately), the network untrained (`config.num_steps = 0`)
# verifies at 0.645, AUC 0.698; after the quick run's 20 steps at 0.706, AUC 0.783; after the
# full 400 at 0.692, AUC 0.756. Along the 400-step run the score wanders with no trend
# (checkpoints at steps 50, 100, 200, 300, 400: 0.676, 0.604, 0.687, 0.694, 0.692), and over
# seeds 0-2 the untrained networks verify at 0.62-0.70, the trained ones at 0.63-0.69, one of
# the three below its own untrained start: learning the six digits neither steadily helps nor
# steadily hurts the other four. (The quick run's own evaluation scores 300 pairs: 0.650.)

# %%
similarity = 1 - result.distances / 2
fold_cosines = 1 - result.fold_thresholds / 2
PIXELS_COLOR = "black"  # The baseline is no loss: a colour outside LOSS_COLORS.
edges = np.linspace(-1, 1, 81)
figure, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
for panel, (name, scored, colour) in zip(axes, [
    ("ArcFace embeddings", result, LOSS_COLORS["arcface"]),
    ("raw pixels, mean-centred", pixel_result, PIXELS_COLOR)]):
  cosines = 1 - scored.distances / 2
  panel.hist(cosines[issame], bins=edges, color=colour, alpha=0.6,
             label=f"same digit ({issame.sum()} pairs)")
  panel.hist(cosines[~issame], bins=edges, color=DIFFERENT_PAIRS_COLOR, alpha=0.45,
             label=f"different digits ({(~issame).sum()} pairs)")
  for index, threshold in enumerate(scored.fold_thresholds):
    panel.axvline(1 - threshold / 2, color="0.3", linestyle=":", linewidth=1,
                  label="fold thresholds" if index == 0 else None)
  panel.set_xlabel(r"cosine similarity of the pair, $\cos\theta = 1 - d/2$")
  panel.set_title(f"{name}: accuracy {scored.accuracy:.3f}, AUC {scored.auc:.3f}")
  panel.grid(alpha=0.3)
  panel.legend(loc="upper left")
axes[0].set_ylabel("pairs")
figure.suptitle("Pair similarities of the unseen digits 6-9")
figure.tight_layout()
plt.show()


def accepted_pairs(scored):
  """Each pair judged as the protocol judges it: accepted when its distance is below the
  threshold of the fold that tests it."""
  return scored.distances < scored.fold_thresholds[scored.fold_index]


# The numbers of the text above.
for name, scored in (("ArcFace", result), ("pixels", pixel_result)):
  cosines = 1 - scored.distances / 2
  accepted_here = accepted_pairs(scored)
  print(f"{name:>8}: median cosine {np.median(cosines[issame]):.2f} (one digit), "
        f"{np.median(cosines[~issame]):.2f} (two digits, from {cosines[~issame].min():.2f} to "
        f"{cosines[~issame].max():.2f}); fold thresholds as cosines "
        f"{np.min(1 - scored.fold_thresholds / 2):.3f}-{np.max(1 - scored.fold_thresholds / 2):.3f}"
        f"; {np.sum(accepted_here & ~issame)} false accepts, "
        f"{np.sum(~accepted_here & issame)} false rejects")
assert pixel_result.accuracy > result.accuracy and pixel_result.auc > result.auc, (
    "the text says the pixels verify better than the network")

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

# Each pair judged as the protocol judges it (`accepted_pairs`, above): these decisions reproduce
# the library's fold accuracies.
accepted = accepted_pairs(result)
correct = accepted == issame
np.testing.assert_allclose([correct[result.fold_index == index].mean()
                            for index in range(len(result.fold_accuracies))],
                           result.fold_accuracies)

# %% [markdown]
# ## The ROC
#
# Every threshold at once: the true-accept rate (same pairs accepted) against the false-accept
# rate (different pairs accepted), drawn by `margins.evaluation.draw_roc`, for the network and
# the pixel baseline. The pixels' curve lies above the network's at every false-accept rate: at
# FAR = 1e-2 the pixels accept 48 % of the pairs of one digit, the network 7 %.
#
# TAR@FAR = 1e-4 is `nan`, not a failure: with 1,500 pairs of different digits the smallest
# false-accept rate the pairs can measure is one false accept in 1,500, 6.7e-4, so a target of
# 1e-4 is below what they resolve and the library reports NaN (measuring it would take at least
# 10,000 different pairs, and many more to measure it well). TAR@FAR = 1e-3 rests on a single
# false accept.

# %%
figure, axes = plt.subplots(figsize=(6.5, 5))
evaluation.draw_roc(axes, {"ArcFace, 32-D": result, "raw pixels, mean-centred": pixel_result})
for line, colour in zip(axes.get_lines(), (LOSS_COLORS["arcface"], PIXELS_COLOR)):
  line.set_color(colour)
axes.legend(loc="upper left")  # Again, with the new colours; above the curves.
axes.set_title("Verification ROC on unseen digits 6-9")
save_figure(figure, "verification_roc.png")
plt.show()
num_different = int((~issame).sum())
print(f"{num_different} different pairs: the smallest measurable FAR is 1/{num_different} = "
      f"{1 / num_different:.1e}")
for name, scored in (("ArcFace", result), ("pixels", pixel_result)):
  print(f"{name:>8} TAR@FAR: " + ", ".join(f"{far:g}: {tar:.3f}"
                                          for far, tar in scored.tar_at_far.items()))
assert np.isnan(result.tar_at_far[1e-4]) and 1e-4 < 1 / num_different


def best_tar(scored, fars):
  """The ROC's highest TAR at a FAR of at most each of ``fars``."""
  return np.array([scored.tpr[scored.fpr <= far].max() for far in fars])


# The full run's pixel ROC above the network's (the text): at every FAR, higher or both at 1.
if not QUICK:
  fars = np.union1d(result.fpr, pixel_result.fpr)
  network_tar, pixels_tar = best_tar(result, fars), best_tar(pixel_result, fars)
  assert np.all((pixels_tar > network_tar) | (network_tar == 1)), "the pixels' ROC is not above"

# %% [markdown]
# ## Failure cases
#
# The pairs the protocol gets wrong: **false accepts**, two different digits accepted (the most
# similar first), and **false rejects**, one digit rejected (the least similar first), with
# their cosine and their fold's threshold. In the full run the most similar false accepts are
# 9s paired with 8s and 6s (and an 8 with a 6) at a cosine of 0.95-0.96, and the least similar
# false rejects are all two 9s written differently (one closed, one open or slanted), at
# cosines down to −0.68.

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
