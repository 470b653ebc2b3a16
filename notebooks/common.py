"""Settings shared by the notebooks: quick mode, where figures go, one colour per loss; the
raw-pixel verification baseline.

``MARGINS_QUICK=1`` (set in CI) selects small settings that run in seconds; figures are written
to ``MARGINS_FIGURES_DIR``, by default the repository's ``docs/figures``. Run a notebook top to
bottom (or ``cd notebooks && python NAME.py``) with full settings to regenerate the committed
figures.
"""

import os
import pathlib

import numpy as np

from margins import evaluation

QUICK = os.environ.get("MARGINS_QUICK", "") not in ("", "0")
REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPOSITORY / "configs"
FIGURES_DIR = pathlib.Path(os.environ.get("MARGINS_FIGURES_DIR", REPOSITORY / "docs" / "figures"))

# One colour per loss in every notebook, keyed by the loss zoo's names (``margins.<key>_loss``).
LOSS_COLORS = {
    "softmax": "tab:gray",
    "center": "tab:brown",
    "lsoftmax": "tab:pink",
    "sphereface": "tab:purple",
    "normface": "tab:olive",
    "cosface": "tab:green",
    "arcface": "tab:red",
    "combined_margin": "tab:orange",
    "curricularface": "tab:blue",
    "mv_softmax": "darkslategray",
    "adaface": "tab:cyan",
    "magface": "darkgoldenrod",
    "elasticface": "maroon",
    "sphereface2": "indigo",
}
# Pairs of two identities in the angle and similarity histograms, beside the pairs of one identity
# drawn in the loss's colour: a colour no loss has, so that no panel is grey on grey.
DIFFERENT_PAIRS_COLOR = "navy"


def save_figure(figure, name: str) -> pathlib.Path:
  """Writes ``figure`` to ``FIGURES_DIR / name`` (a PNG) and returns the path."""
  FIGURES_DIR.mkdir(parents=True, exist_ok=True)
  path = FIGURES_DIR / name
  figure.savefig(path, dpi=110, bbox_inches="tight")
  print(f"saved {path}")
  return path


def pixel_verification(source, pairs, issame):
  """``(result, pixels per image)``: the pairs of ``source``'s images scored by the protocol on
  their raw pixels, each image flattened minus the mean image (normalised by the protocol, so a
  pair's score is the cosine of the two centred images)."""
  pixels = np.stack([np.asarray(source[i]["image"], np.float64).reshape(-1)
                     for i in range(len(source))])
  result = evaluation.evaluate_verification((pixels - pixels.mean(0))[pairs.reshape(-1)], issame)
  return result, pixels.shape[1]
