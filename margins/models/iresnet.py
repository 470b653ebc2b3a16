"""IResNet: the improved residual networks of ArcFace (insightface ``arcface_torch`` topology).

Every block is ``BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN`` plus a shortcut; the stem
is ``conv3x3 -> BN -> PReLU`` at full resolution and four stride-2 stages (widths 64, 128, 256, 512)
bring 112x112 faces to 7x7; the head is ``BN -> dropout -> flatten -> Linear -> BN``.

Layout and dtypes: images are NHWC. ``dtype`` is the compute dtype of the convolutional body (what
insightface's ``fp16=True`` puts under autocast); parameters stay float32, and the head's ``Linear``
and feature ``BatchNorm`` run in float32, so embeddings come back float32.

Differences from the PyTorch model worth knowing when porting weights:

- Flatten order: the 7x7x512 map is flattened NHWC, i.e. in ``(h, w, c)`` order; PyTorch flattens
  NCHW in ``(c, h, w)`` order. A PyTorch ``fc.weight`` ``[D, 512*7*7]`` maps to our ``fc.kernel``
  by ``w.reshape(D, 512, 7, 7).transpose(2, 3, 1, 0).reshape(7*7*512, D)``.
- The feature BatchNorm: insightface builds ``BatchNorm1d(affine=True)``, sets its weight to 1.0
  and freezes it (``requires_grad = False``). Here it has no scale at all (``use_scale=False``),
  which is the same function. The parameter count is therefore insightface's trainable count (what
  its ``flops.py`` prints: ptflops counts ``requires_grad`` parameters only), ``embedding_dim``
  below ``sum(p.numel() for p in model.parameters())``.
- BatchNorm momentum 0.9 here is PyTorch's default 0.1; eps 1e-5 as in insightface. The running
  variance averages the biased batch variance (PyTorch: the unbiased one). Under ``jax.jit`` with a
  batch sharded over devices the batch statistics are global (synchronised BatchNorm) unless the
  BatchNorms' ``stats_per_device`` is set (``model.set_attributes(stats_per_device=True)``;
  train.py's ``config.model.batch_stats="device"``): then each device normalises its own rows, as
  insightface's DDP training normalises each GPU's 128 images.
- Conv kernels are drawn from N(0, 0.1^2) as insightface does; ``fc`` uses PyTorch's default
  U(+-1/sqrt(fan_in)) kernel and a zero bias (the feature BatchNorm removes any bias in training).

This module also holds the pieces every backbone here shares: :class:`PReLU`, :class:`BatchNorm`
(float32 normalisation) and the argument checks.

References: Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
CVPR 2019; insightface ``recognition/arcface_torch/backbones/iresnet.py``.
"""

import math
from collections.abc import Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from margins._checks import check_int
from margins._checks import positive_ints
from margins.losses import _common

Array = jax.Array

STAGE_WIDTHS = (64, 128, 256, 512)
BN_MOMENTUM = 0.9  # PyTorch momentum=0.1.
BN_EPSILON = 1e-5

# Stage depths of insightface's presets.
LAYERS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}

_CONV_INIT = nnx.initializers.normal(0.1)
# PyTorch's default Linear/Conv kernel init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
TORCH_DEFAULT_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def image_size(input_size: int | Sequence[int]) -> tuple[int, int]:
  """``(height, width)`` from an int or a pair, checked positive.

  >>> image_size(112), image_size((112, 96))
  ((112, 112), (112, 96))
  """
  sizes = (input_size, input_size) if np.ndim(input_size) == 0 else input_size
  return positive_ints(sizes, "input_size", 2, "a positive int or (height, width)",
                       given=input_size)


def halved(size: int, times: int) -> int:
  """Side after ``times`` stride-2 convolutions with padding 1 (or 1x1 stride 2): ``ceil(n / 2)``.

  >>> halved(112, 4), halved(96, 4)
  (7, 6)
  """
  for _ in range(times):
    size = (size + 1) // 2
  return size


def check_compute_dtype(dtype: Any) -> jnp.dtype:
  """Returns ``dtype`` as a NumPy dtype, raising unless it is floating.

  >>> check_compute_dtype(jnp.bfloat16)
  dtype(bfloat16)
  """
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`dtype` must be a floating dtype, got {dtype!r}.")
  return jnp.dtype(dtype)


def check_images(images: Any, size: tuple[int, int], channels: int) -> None:
  """Raises unless ``images`` is a floating ``[B, height, width, channels]`` array.

  >>> check_images(jnp.zeros((2, 16, 16, 3)), (16, 16), 3)
  """
  _common.check_floating("images", images, 4)
  if tuple(images.shape[1:]) != (*size, channels):
    raise ValueError(
        f"`images` must be [batch, {size[0]}, {size[1]}, {channels}] (NHWC) for this model, "
        f"got shape {tuple(images.shape)}.")


class PReLU(nnx.Module):
  """Parametric ReLU with one learned slope per channel (the last axis), like ``torch.nn.PReLU(C)``.

  ``y = x`` where ``x >= 0``, else ``a_c x``; the slopes ``a`` start at 0.25.

  >>> prelu = PReLU(3)
  >>> prelu(jnp.array([[-4.0, 0.0, 2.0]]))
  Array([[-1.,  0.,  2.]], dtype=float32)

  References: He et al., "Delving Deep into Rectifiers", ICCV 2015.
  """

  def __init__(self, num_features: int):
    # torch.nn.PReLU's initial slope, as insightface's models start.
    self.negative_slope = nnx.Param(jnp.full((num_features,), 0.25, jnp.float32))

  def __call__(self, x: Array) -> Array:
    return jnp.where(x >= 0, x, broadcast_param(self.negative_slope[...], x) * x)


def broadcast_param(param: Array, like: Array) -> Array:
  """``param [C]`` broadcast to ``like [..., C]`` (split as ``like`` is), then cast to its dtype.

  Broadcast before the cast, the gradient is summed over the batch and positions in ``param``'s
  dtype (float32): summed in bfloat16 or float16 (as XLA:CPU does, in order) it stalls.

  >>> broadcast_param(jnp.arange(2.0), jnp.zeros((3, 2), jnp.bfloat16)).dtype
  dtype(bfloat16)
  """
  shaped = param.reshape((1,) * (like.ndim - 1) + (-1,))
  return jnp.broadcast_to(shaped, like.shape, out_sharding=jax.typeof(like).sharding).astype(
      like.dtype)


def _batch_shards(x: Array) -> int:
  """How many devices split ``x``'s leading (batch) axis, by its type: the sizes of the Explicit
  mesh axes it is split over (1 where it is not split, or its type does not say)."""
  mesh_shape = jax.typeof(x).sharding.mesh.shape
  return math.prod(mesh_shape[name] for name in _common.batch_axes(x))


class BatchNorm(nnx.Module):
  """Batch normalisation over every axis but the last, computed in float32, returning ``x.dtype``.

  ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``, with the batch statistics in training
  mode and the running ones (``mean <- momentum * mean + (1 - momentum) * batch_mean``, likewise
  ``var``) in evaluation mode. Variables and modes are those of ``nnx.BatchNorm``: ``scale`` and
  ``bias`` (``nnx.Param``), ``mean`` and ``var`` (``nnx.BatchStat``), and the attribute
  ``use_running_average`` that ``model.eval()``/``model.train()`` and ``nnx.view`` set; it starts
  in training mode. Defaults are insightface's: eps 1e-5, momentum 0.9 (PyTorch's 0.1).

  Why not ``nnx.BatchNorm`` (flax 0.12.8):

  - ``nnx.BatchNorm(dtype=jnp.bfloat16)`` mixes bfloat16 inputs with float32 statistics, which
    ``jax_numpy_dtype_promotion='strict'`` rejects, and normalises in bfloat16; this one normalises
    in float32, as PyTorch autocast does;
  - its running-statistics write (``self.mean[...] = ...``) and its ``rngs.params()`` calls read
    ``tracer.sharding``, whose error message walks the whole jaxpr traced so far: tracing the
    IResNet-200 forward pass took ~40 s that way. This one writes with ``Variable.set_value`` and
    needs no ``rngs``.

  Training mode uses the biased batch variance for normalising and for the running average
  (PyTorch averages the unbiased one).

  ``stats_per_device`` (an attribute, like ``use_running_average``; ``set_view`` and
  ``set_attributes`` set it): in training mode, each device's rows of the batch are normalised by
  their own statistics where the batch axis is split over devices by Explicit mesh axes (its
  type says so under ``jit``), as PyTorch's unsynchronised BatchNorm under DDP; the running
  statistics move by the devices' mean. The forward and backward passes then need no collective
  but the running statistics' one all-reduce. Otherwise (the default, or a batch whose type says
  nothing of devices) the statistics are the whole batch's.

  >>> bn = BatchNorm(3)
  >>> y = bn(jnp.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], jnp.bfloat16))
  >>> y.dtype, y.tolist()
  (dtype(bfloat16), [[-1.0, 0.0, 1.0], [1.0, 0.0, -1.0]])
  >>> bn.mean[...]  # 0.9 * 0 + 0.1 * 2
  Array([0.2, 0.2, 0.2], dtype=float32)

  References: Ioffe and Szegedy, "Batch Normalization", ICML 2015.
  """

  def __init__(
      self, num_features: int, *, use_scale: bool = True, use_bias: bool = True,
      epsilon: float = BN_EPSILON, momentum: float = BN_MOMENTUM, stats_per_device: bool = False):
    self.num_features = num_features
    self.epsilon = epsilon
    self.momentum = momentum
    self.use_running_average = False
    self.stats_per_device = stats_per_device
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32)) if use_scale else None
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32)) if use_bias else None
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

  def set_view(self, use_running_average: bool | None = None,
               stats_per_device: bool | None = None):
    """Used by ``nnx.view``.

    Args:
      use_running_average: if True, normalise with the running statistics (evaluation mode).
      stats_per_device: if True, batch statistics of each device's rows (see the class).
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average
    if stats_per_device is not None:
      self.stats_per_device = stats_per_device

  def __call__(self, x: Array) -> Array:
    stats_shape = (1,) * (x.ndim - 1) + (self.num_features,)
    y = x.astype(jnp.float32)
    if self.use_running_average:
      y = (y - self.mean[...].reshape(stats_shape)) * jax.lax.rsqrt(
          self.var[...].reshape(stats_shape) + self.epsilon)
    else:
      groups = _batch_shards(x) if self.stats_per_device else 1
      if math.prod(x.shape[:-1]) == groups:  # Every input would give ``bias``; PyTorch refuses too.
        per_device = f" per device ({groups} devices)" if groups > 1 else ""
        raise ValueError(
            f"Batch statistics of a single value per channel (input {x.shape}): a batch of one "
            f"example{per_device} in training mode. Embed single images in evaluation mode "
            "(model.eval()).")
      # ``[groups, rows, ..., C]``: a leading axis split as the batch is, one group per device.
      grouped = y.reshape((groups, x.shape[0] // groups) + x.shape[1:])
      axes = tuple(range(1, grouped.ndim - 1))
      mean = jnp.mean(grouped, axis=axes, keepdims=True)
      var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
      for running, batch in ((self.mean, mean), (self.var, var)):
        batch = jnp.mean(batch.reshape(groups, self.num_features), axis=0)
        running.set_value(jax.lax.stop_gradient(
            self.momentum * running[...] + (1.0 - self.momentum) * batch))
      y = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    if self.scale is not None:
      y = y * self.scale[...].reshape(stats_shape)
    if self.bias is not None:
      y = y + self.bias[...].reshape(stats_shape)
    return y.astype(x.dtype)


def _conv(
    in_features: int, out_features: int, kernel: int, *, strides: int, dtype: Any,
    rngs: nnx.Rngs) -> nnx.Conv:
  pad = (kernel - 1) // 2
  return nnx.Conv(
      in_features, out_features, (kernel, kernel), strides=strides,
      padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_CONV_INIT, dtype=dtype,
      rngs=rngs)


class IBasicBlock(nnx.Module):
  """``BN -> conv3x3 -> BN -> PReLU -> conv3x3(strides) -> BN``, plus the input or its projection.

  The projection (``conv1x1(strides) -> BN``) exists when the stride or the width changes.

  >>> block = nnx.eval_shape(lambda: IBasicBlock(8, 16, strides=2, rngs=nnx.Rngs(0)))
  >>> x = jax.ShapeDtypeStruct((2, 6, 6, 8), jnp.float32)
  >>> nnx.eval_shape(lambda b, x: b(x), block, x).shape
  (2, 3, 3, 16)
  """

  def __init__(
      self, in_features: int, out_features: int, *, strides: int = 1, dtype: Any = jnp.float32,
      rngs: nnx.Rngs):
    self.bn1 = BatchNorm(in_features)
    self.conv1 = _conv(in_features, out_features, 3, strides=1, dtype=dtype, rngs=rngs)
    self.bn2 = BatchNorm(out_features)
    self.prelu = PReLU(out_features)
    self.conv2 = _conv(out_features, out_features, 3, strides=strides, dtype=dtype, rngs=rngs)
    self.bn3 = BatchNorm(out_features)
    if strides != 1 or in_features != out_features:
      self.downsample = nnx.Sequential(
          _conv(in_features, out_features, 1, strides=strides, dtype=dtype, rngs=rngs),
          BatchNorm(out_features))
    else:
      self.downsample = None

  def __call__(self, x: Array) -> Array:
    out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
    shortcut = x if self.downsample is None else self.downsample(x)
    return out + shortcut


class IResNet(nnx.Module):
  """IResNet backbone: ``images [B, H, W, C]`` (in [-1, 1]) to embeddings ``[B, embedding_dim]``.

  Train/eval follows NNX: the model is built in training mode (batch statistics, dropout on);
  ``model.eval()`` / ``model.train()``, or ``nnx.view(model, use_running_average=True,
  deterministic=True)``, switch it.

  Args:
    layers: blocks per stage, e.g. ``LAYERS[50] == (3, 4, 14, 3)``.
    embedding_dim: size of the embedding (insightface ``num_features``).
    dropout: dropout rate before the ``Linear`` head (insightface default 0).
    input_size: ``H`` or ``(H, W)`` of the images; the head's input is ``512 * ceil(H/16) *
      ceil(W/16)`` (7x7x512 at 112x112).
    in_channels: image channels.
    dtype: compute dtype of the convolutional body (e.g. ``jnp.bfloat16``); parameters are float32.
    rngs: parameter and dropout randomness.

  >>> model = nnx.eval_shape(lambda: IResNet(LAYERS[50], rngs=nnx.Rngs(0)))  # Nothing allocated.
  >>> images = jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32)
  >>> nnx.eval_shape(lambda m, x: m(x), model, images).shape
  (2, 512)

  References: Deng et al., ArcFace, CVPR 2019 (the IR block, "LResNet-E-IR"); insightface
  ``arcface_torch/backbones/iresnet.py``.
  """

  def __init__(
      self,
      layers: Sequence[int],
      *,
      embedding_dim: int = 512,
      dropout: float = 0.0,
      input_size: int | Sequence[int] = 112,
      in_channels: int = 3,
      dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    layers = positive_ints(layers, "layers", 4, "four positive ints (blocks per stage)")
    embedding_dim = check_int(embedding_dim, "embedding_dim", minimum=1)
    in_channels = check_int(in_channels, "in_channels", minimum=1)
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"`dropout` must lie in [0, 1), got {dropout}.")
    self.input_size = image_size(input_size)
    self.in_channels = in_channels
    self.dtype = check_compute_dtype(dtype)

    self.conv1 = _conv(in_channels, STAGE_WIDTHS[0], 3, strides=1, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(STAGE_WIDTHS[0])
    self.prelu = PReLU(STAGE_WIDTHS[0])
    blocks = []
    in_features = STAGE_WIDTHS[0]
    for width, depth in zip(STAGE_WIDTHS, layers):
      for index in range(depth):
        blocks.append(IBasicBlock(
            in_features, width, strides=2 if index == 0 else 1, dtype=dtype, rngs=rngs))
        in_features = width
    self.blocks = nnx.List(blocks)
    self.bn2 = BatchNorm(in_features)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    height, width = (halved(s, len(STAGE_WIDTHS)) for s in self.input_size)
    self.fc = nnx.Linear(
        height * width * in_features, embedding_dim, kernel_init=TORCH_DEFAULT_KERNEL_INIT,
        rngs=rngs)
    # insightface's BatchNorm1d with its weight frozen at 1.0: no scale parameter at all.
    self.features = BatchNorm(embedding_dim, use_scale=False)

  def __call__(self, images: Array) -> Array:
    check_images(images, self.input_size, self.in_channels)
    x = self.prelu(self.bn1(self.conv1(images.astype(self.dtype))))
    for block in self.blocks:
      x = block(x)
    x = self.dropout(self.bn2(x))
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)  # NHWC flatten: (h, w, c) order.
    return self.features(self.fc(x))

