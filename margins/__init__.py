"""margins: margin-based softmax losses and metric-learning losses in JAX.

The public API at a glance: the loss zoo (one function per paper), the margins they are built
from, and the softmax engines that run any margin dense, chunked, class-sharded or sampled.

The rest is in subpackages, imported on first use (``margins.models.create``, ``margins.data``,
``margins.evaluation``, ``margins.train_lib`` ...), so that the losses alone need no Flax, grain or
Pillow at import.
"""

import importlib
import pkgutil

from margins.losses.center import center_loss
from margins.losses.center import update_centers
from margins.losses.classification import AdaFaceState
from margins.losses.classification import adaface_loss
from margins.losses.classification import arcface_loss
from margins.losses.classification import combined_margin_loss
from margins.losses.classification import cosface_loss
from margins.losses.classification import curricularface_loss
from margins.losses.classification import elasticface_loss
from margins.losses.classification import lsoftmax_loss
from margins.losses.classification import magface_loss
from margins.losses.classification import mv_softmax_loss
from margins.losses.classification import normface_loss
from margins.losses.classification import softmax_loss
from margins.losses.classification import sphereface2_loss
from margins.losses.classification import sphereface_loss
from margins.losses.classification import spherefacer_loss
from margins.losses.classification import subcenter_arcface_loss
from margins.losses.pairwise import circle_loss
from margins.losses.pairwise import contrastive_loss
from margins.losses.pairwise import triplet_loss
from margins.losses.margin import AdaFace
from margins.losses.margin import ArcFace
from margins.losses.margin import CombinedMargin
from margins.losses.margin import CosFace
from margins.losses.margin import CurricularFace
from margins.losses.margin import ElasticFace
from margins.losses.margin import LSoftmax
from margins.losses.margin import MVSoftmax
from margins.losses.margin import MagFace
from margins.losses.margin import Margin
from margins.losses.margin import NormFace
from margins.losses.margin import Rows
from margins.losses.margin import Softmax
from margins.losses.margin import SphereFace
from margins.losses.margin import SphereFace2
from margins.losses.margin import SphereFaceR
from margins.losses.margin import arcface_cos
from margins.losses.margin import margin_dataclass
from margins.losses.margin import multiplicative_psi
from margins.losses.margin import similarity_adjustment
from margins.losses.margin import sphereface2_bias
from margins.losses.margin import sphereface_lambda
from margins.parallel import RowSample
from margins.parallel import SoftmaxEngine
from margins.parallel import chunked
from margins.parallel import dense
from margins.parallel import margin_softmax_loss
from margins.parallel import padded_num_classes
from margins.parallel import sample_classes
from margins.parallel import sharded
from margins.parallel import similarity

__all__ = [  # The public API: the names imported above.
    "AdaFace",
    "AdaFaceState",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "ElasticFace",
    "LSoftmax",
    "MVSoftmax",
    "MagFace",
    "Margin",
    "NormFace",
    "RowSample",
    "Rows",
    "Softmax",
    "SoftmaxEngine",
    "SphereFace",
    "SphereFace2",
    "SphereFaceR",
    "adaface_loss",
    "arcface_cos",
    "arcface_loss",
    "center_loss",
    "chunked",
    "circle_loss",
    "combined_margin_loss",
    "contrastive_loss",
    "cosface_loss",
    "curricularface_loss",
    "dense",
    "elasticface_loss",
    "lsoftmax_loss",
    "magface_loss",
    "margin_dataclass",
    "margin_softmax_loss",
    "multiplicative_psi",
    "mv_softmax_loss",
    "normface_loss",
    "padded_num_classes",
    "sample_classes",
    "sharded",
    "similarity",
    "similarity_adjustment",
    "softmax_loss",
    "sphereface2_bias",
    "sphereface2_loss",
    "sphereface_lambda",
    "sphereface_loss",
    "spherefacer_loss",
    "subcenter_arcface_loss",
    "triplet_loss",
    "update_centers",
]

_SUBMODULES = frozenset(module.name for module in pkgutil.iter_modules(__path__)
                        if not module.name.startswith("_"))


def __getattr__(name: str):
  if name in _SUBMODULES:  # Python sets it as an attribute, so this runs once.
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
