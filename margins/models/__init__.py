"""Embedding backbones in Flax NNX: images ``[B, H, W, C]`` (NHWC) to embeddings ``[B, D]``.

Every model is built in training mode (BatchNorm on batch statistics, dropout and the other
stochastic layers on); switch with ``model.eval()`` / ``model.train()``, or take a view with
``nnx.view(model, use_running_average=True, deterministic=True, raise_if_not_found=False)`` (not
every model has both kinds of layer: MobileFaceNet has no dropout, LeNets++ neither). Models are
NNX pytrees and work under ``nnx.jit`` or ``nnx.split`` + ``jax.jit`` + ``nnx.merge``; running
statistics and RNG counters are state to carry from step to step. Under ``jax.grad``, merge with
``nnx.merge(graphdef, params, rest, copy=True)``: the BatchNorms and RNG streams write their
Variables, which must belong to the trace that writes them.

To count parameters or look at shapes without allocating anything::

  model = nnx.eval_shape(lambda: create("iresnet100", rngs=nnx.Rngs(0)))
"""

from typing import Any

from flax import nnx

from margins.models import iresnet
from margins.models import vit
from margins.models.iresnet import IResNet
from margins.models.mobilefacenet import MobileFaceNet
from margins.models.small_cnn import SmallCNN
from margins.models.vit import VisionTransformer

_BUILDERS = {
    **{f"iresnet{depth}": (IResNet, {"layers": layers})
       for depth, layers in iresnet.LAYERS.items()},
    "mobilefacenet": (MobileFaceNet, {}),
    "mobilefacenet_large": (MobileFaceNet, {"blocks": (2, 8, 12, 4), "scale": 4}),
    "small_cnn": (SmallCNN, {}),
    **{name: (VisionTransformer, preset) for name, preset in vit.PRESETS.items()},
}
NAMES = tuple(_BUILDERS)


def check_name(name: str) -> None:
  """Raises ``ValueError`` naming the valid names unless ``name`` is one of :data:`NAMES`."""
  if name not in _BUILDERS:
    raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(NAMES)}.")


def create(
    name: str, *, rngs: nnx.Rngs, embedding_dim: int | None = None, **kwargs: Any) -> nnx.Module:
  """Builds the backbone called ``name``; ``kwargs`` go to its constructor (and override presets).

  Names: ``iresnet18``, ``iresnet34``, ``iresnet50``, ``iresnet100``, ``iresnet200`` (insightface
  ``r18`` ... ``r200``), ``mobilefacenet`` (``mbf``), ``mobilefacenet_large`` (``mbf_large``),
  ``small_cnn`` (LeNets++), ``vit_t``, ``vit_s``, ``vit_b``, ``vit_l``. ``embedding_dim``
  defaults to the model's own (512 for the face models, 2 for ``small_cnn``).

  >>> model = nnx.eval_shape(lambda: create("iresnet50", embedding_dim=256, rngs=nnx.Rngs(0)))
  >>> len(model.blocks), model.fc.kernel.shape
  (24, (25088, 256))

  References: insightface ``recognition/arcface_torch/backbones/__init__.py``.
  """
  check_name(name)
  builder, preset = _BUILDERS[name]
  if embedding_dim is not None:
    kwargs["embedding_dim"] = embedding_dim
  return builder(**{**preset, **kwargs}, rngs=rngs)


__all__ = [
    "IResNet",
    "MobileFaceNet",
    "NAMES",
    "SmallCNN",
    "VisionTransformer",
    "check_name",
    "create",
]
