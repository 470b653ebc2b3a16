"""MobileFaceNet as insightface's ``arcface_torch`` builds it (``mbf`` and ``mbf_large``).

Topology (insightface, adapted from cavaface), for width multiplier ``scale`` (2 for ``mbf``):

- ``conv3x3(64 s, stride 2) -> BN -> PReLU``;
- with ``blocks[0] == 1``: a grouped ``conv3x3(64 s, groups 64) -> BN -> PReLU``; otherwise
  ``blocks[0]`` residual bottlenecks of hidden width 128;
- bottleneck ``64 s -> 64 s`` (stride 2, hidden 128), ``blocks[1]`` residual ones (hidden 128);
- bottleneck ``64 s -> 128 s`` (stride 2, hidden 256), ``blocks[2]`` residual ones (hidden 256);
- bottleneck ``128 s -> 128 s`` (stride 2, hidden 512), ``blocks[3]`` residual ones (hidden 256);
- ``conv1x1(512) -> BN -> PReLU``;
- GDC head: depthwise conv over the whole 7x7 map (no padding) ``-> BN``, flatten,
  ``Linear(512 -> embedding_dim, no bias) -> BN``.

A bottleneck is ``conv1x1(hidden) -> BN -> PReLU -> depthwise conv3x3(stride) -> BN -> PReLU ->
conv1x1(out) -> BN``, plus the input when it is residual. The hidden widths stay 128/256/512
whatever ``scale`` is, as in insightface. Differences from Chen et al. (2018): widths doubled, a
512-d embedding from a ``Linear + BN`` head instead of a 128-d linear 1x1 conv.

``dtype`` is the compute dtype of the body up to the last bottleneck (insightface's ``fp16``
autocast region); the final ``conv1x1``, the GDC head and the embedding run in float32. BatchNorm
momentum 0.9 (PyTorch 0.1), eps 1e-5. Convolution and linear kernels use PyTorch's
``kaiming_normal_(mode='fan_out', nonlinearity='relu')`` as insightface does.

References: Chen et al., "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification on
Mobile Devices", CCBR 2018; insightface ``recognition/arcface_torch/backbones/mobilefacenet.py``.
"""

from collections.abc import Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from margins._checks import check_int
from margins._checks import positive_ints
from margins.models import iresnet

Array = jax.Array

_KERNEL_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvBlock(nnx.Module):
  """``conv (no bias) -> BN`` and, when ``activation``, ``-> PReLU``.

  ``padding`` is PyTorch's: that many zeros on each side (``(k - 1) // 2`` keeps the size at
  stride 1).

  >>> block = nnx.eval_shape(
  ...     lambda: ConvBlock(4, 8, kernel_size=3, strides=2, padding=1, rngs=nnx.Rngs(0)))
  >>> x = jax.ShapeDtypeStruct((1, 6, 6, 4), jnp.float32)
  >>> nnx.eval_shape(lambda b, x: b(x), block, x).shape
  (1, 3, 3, 8)
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      kernel_size: int | Sequence[int] = 1,
      strides: int = 1,
      padding: int = 0,
      groups: int = 1,
      activation: bool = True,
      dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    self.conv = nnx.Conv(
        in_features, out_features, kernel, strides=strides,
        padding=((padding, padding), (padding, padding)), feature_group_count=groups,
        use_bias=False, kernel_init=_KERNEL_INIT, dtype=dtype, rngs=rngs)
    self.bn = iresnet.BatchNorm(out_features)
    self.prelu = iresnet.PReLU(out_features) if activation else None

  def __call__(self, x: Array) -> Array:
    x = self.bn(self.conv(x))
    return x if self.prelu is None else self.prelu(x)


class Bottleneck(nnx.Module):
  """``conv1x1(hidden) -> depthwise conv3x3(strides) -> conv1x1(out)`` (BN after each, PReLU after
  the first two), plus the input when ``residual``.

  >>> block = nnx.eval_shape(lambda: Bottleneck(8, 8, hidden=16, residual=True, rngs=nnx.Rngs(0)))
  >>> x = jax.ShapeDtypeStruct((1, 5, 5, 8), jnp.float32)
  >>> nnx.eval_shape(lambda b, x: b(x), block, x).shape
  (1, 5, 5, 8)
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      hidden: int,
      strides: int = 1,
      residual: bool = False,
      dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if residual and (strides != 1 or in_features != out_features):
      raise ValueError("A residual bottleneck keeps the shape: strides 1 and in == out features.")
    self.residual = residual
    self.expand = ConvBlock(in_features, hidden, dtype=dtype, rngs=rngs)
    self.depthwise = ConvBlock(
        hidden, hidden, kernel_size=3, strides=strides, padding=1, groups=hidden, dtype=dtype,
        rngs=rngs)
    self.project = ConvBlock(hidden, out_features, activation=False, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    y = self.project(self.depthwise(self.expand(x)))
    return x + y if self.residual else y


class MobileFaceNet(nnx.Module):
  """MobileFaceNet: ``images [B, H, W, C]`` (in [-1, 1]) to embeddings ``[B, embedding_dim]``.

  Built in training mode; ``model.eval()``/``model.train()`` or ``nnx.view(model,
  use_running_average=True)`` switch the BatchNorms.

  Args:
    embedding_dim: size of the embedding (insightface ``num_features``, 512).
    blocks: residual bottlenecks per stage; ``(1, 4, 6, 2)`` is ``mbf``, ``(2, 8, 12, 4)`` with
      ``scale=4`` is ``mbf_large``.
    scale: width multiplier of the 64/128 channel stages.
    input_size: ``H`` or ``(H, W)``; the GDC kernel covers the final ``ceil(H/16) x ceil(W/16)``
      map (7x7 at 112x112).
    in_channels: image channels.
    dtype: compute dtype of the body (e.g. ``jnp.bfloat16``); parameters are float32.
    rngs: parameter randomness.

  >>> model = nnx.eval_shape(lambda: MobileFaceNet(rngs=nnx.Rngs(0)))
  >>> images = jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32)
  >>> nnx.eval_shape(lambda m, x: m(x), model, images).shape
  (2, 512)

  References: Chen et al., MobileFaceNets, CCBR 2018; insightface
  ``arcface_torch/backbones/mobilefacenet.py``.
  """

  def __init__(
      self,
      *,
      embedding_dim: int = 512,
      blocks: Sequence[int] = (1, 4, 6, 2),
      scale: int = 2,
      input_size: int | Sequence[int] = 112,
      in_channels: int = 3,
      dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    blocks = positive_ints(blocks, "blocks", 4, "four positive ints (blocks per stage)")
    embedding_dim = check_int(embedding_dim, "embedding_dim", minimum=1)
    scale = check_int(scale, "scale", minimum=1)
    in_channels = check_int(in_channels, "in_channels", minimum=1)
    self.input_size = iresnet.image_size(input_size)
    self.in_channels = in_channels
    self.dtype = iresnet.check_compute_dtype(dtype)

    narrow, wide = 64 * scale, 128 * scale
    layers: list[nnx.Module] = [
        ConvBlock(in_channels, narrow, kernel_size=3, strides=2, padding=1, dtype=dtype, rngs=rngs)]
    if blocks[0] == 1:
      layers.append(ConvBlock(
          narrow, narrow, kernel_size=3, padding=1, groups=64, dtype=dtype, rngs=rngs))
    else:
      layers += _residuals(narrow, blocks[0], hidden=128, dtype=dtype, rngs=rngs)
    layers.append(Bottleneck(narrow, narrow, hidden=128, strides=2, dtype=dtype, rngs=rngs))
    layers += _residuals(narrow, blocks[1], hidden=128, dtype=dtype, rngs=rngs)
    layers.append(Bottleneck(narrow, wide, hidden=256, strides=2, dtype=dtype, rngs=rngs))
    layers += _residuals(wide, blocks[2], hidden=256, dtype=dtype, rngs=rngs)
    layers.append(Bottleneck(wide, wide, hidden=512, strides=2, dtype=dtype, rngs=rngs))
    layers += _residuals(wide, blocks[3], hidden=256, dtype=dtype, rngs=rngs)
    self.layers = nnx.List(layers)

    self.conv_sep = ConvBlock(wide, 512, rngs=rngs)
    final_size = tuple(iresnet.halved(s, 4) for s in self.input_size)
    self.gdc = ConvBlock(
        512, 512, kernel_size=final_size, groups=512, activation=False, rngs=rngs)
    self.linear = nnx.Linear(
        512, embedding_dim, use_bias=False, kernel_init=_KERNEL_INIT, rngs=rngs)
    self.features = iresnet.BatchNorm(embedding_dim)

  def __call__(self, images: Array) -> Array:
    iresnet.check_images(images, self.input_size, self.in_channels)
    x = images.astype(self.dtype)
    for layer in self.layers:
      x = layer(x)
    x = self.gdc(self.conv_sep(x.astype(jnp.float32)))
    return self.features(self.linear(x.reshape(x.shape[0], -1)))


def _residuals(
    features: int, count: int, *, hidden: int, dtype: Any, rngs: nnx.Rngs) -> list[Bottleneck]:
  return [
      Bottleneck(features, features, hidden=hidden, residual=True, dtype=dtype, rngs=rngs)
      for _ in range(count)]
