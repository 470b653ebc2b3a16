"""LeNets++: the small CNN of the center-loss paper, for digit-sized images and 2-D/3-D embeddings.

Topology (Wen et al. 2016, Caffe ``mnist_example``): three stages of two ``conv5x5`` (padding 2,
PReLU after each), widths 32, 64 and 128, each stage closed by a stride-2 max pool of size 2, 2 and
3 with Caffe's ceil rounding (28 -> 14 -> 7 -> 3, 32 -> 16 -> 8 -> 4); then
``flatten -> Linear(embedding_dim) -> PReLU``. The PReLU on the embedding is the paper's: the
features it plots are taken after it.

Kernels use Caffe's ``xavier`` filler, which is U(+-sqrt(3 / fan_in)) (LeCun uniform); biases start
at zero and the PReLU slopes at 0.25. ``batch_norm=True`` adds a BatchNorm after every convolution
(whose bias it then replaces), which is not in the paper but makes training from scratch less
sensitive to the learning rate. ``dtype`` is the compute dtype of the convolutional stages; the
embedding layer runs in float32.

References: Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition",
ECCV 2016 (LeNets++, Table 1 and the ``caffe-face`` MNIST example).
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

POOL_SIZES = (2, 2, 3)
POOL_STRIDE = 2
_KERNEL_INIT = nnx.initializers.lecun_uniform()


def pooled_size(size: int, window: int) -> int:
  """Output side of Caffe's unpadded max pool: ``ceil((size - window) / POOL_STRIDE) + 1``.

  >>> pooled_size(7, 3), pooled_size(8, 3)
  (3, 4)
  """
  return -(-(size - window) // POOL_STRIDE) + 1


class Conv(nnx.Conv):
  """``nnx.Conv`` whose bias is added by :func:`~margins.models.iresnet.broadcast_param`: in a
  16-bit ``dtype`` its gradient is summed over the batch and positions in float32.

  >>> conv = Conv(1, 2, (3, 3), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  >>> conv(jnp.ones((1, 4, 4, 1))).dtype, conv.bias.shape
  (dtype(bfloat16), (2,))
  """

  def __init__(self, *args: Any, use_bias: bool = True, **kwargs: Any):
    super().__init__(*args, use_bias=False, **kwargs)  # ``__call__`` adds the bias.
    self.bias = nnx.Param(jnp.zeros((self.out_features,), jnp.float32)) if use_bias else None

  def __call__(self, x: Array) -> Array:  # pytype: disable=signature-mismatch
    y = super().__call__(x)
    return y if self.bias is None else y + iresnet.broadcast_param(self.bias[...], y)


class ConvPReLU(nnx.Module):
  """``conv5x5 (padding 2) -> [BN] -> PReLU``, the unit of every LeNets++ stage.

  >>> unit = nnx.eval_shape(lambda: ConvPReLU(1, 4, rngs=nnx.Rngs(0)))
  >>> x = jax.ShapeDtypeStruct((2, 7, 7, 1), jnp.float32)
  >>> nnx.eval_shape(lambda u, x: u(x), unit, x).shape
  (2, 7, 7, 4)
  """

  def __init__(
      self, in_features: int, out_features: int, *, batch_norm: bool = False,
      dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.conv = Conv(
        in_features, out_features, (5, 5), padding=((2, 2), (2, 2)), use_bias=not batch_norm,
        kernel_init=_KERNEL_INIT, dtype=dtype, rngs=rngs)
    self.bn = iresnet.BatchNorm(out_features) if batch_norm else None
    self.prelu = iresnet.PReLU(out_features)

  def __call__(self, x: Array) -> Array:
    x = self.conv(x)
    return self.prelu(x if self.bn is None else self.bn(x))


class SmallCNN(nnx.Module):
  """LeNets++: ``images [B, H, W, C]`` to embeddings ``[B, embedding_dim]`` (2 or 3 to plot).

  Args:
    embedding_dim: size of the embedding (2 in the paper).
    input_size: ``H`` or ``(H, W)`` (28 for MNIST; 8x8 digits upscaled to 28 or 32 work too).
    in_channels: image channels.
    widths: channels of the three stages.
    batch_norm: BatchNorm after every convolution (built in training mode; ``model.eval()``).
    dtype: compute dtype of the convolutional stages; parameters are float32.
    rngs: parameter randomness.

  >>> model = nnx.eval_shape(lambda: SmallCNN(embedding_dim=2, input_size=28, rngs=nnx.Rngs(0)))
  >>> images = jax.ShapeDtypeStruct((5, 28, 28, 1), jnp.float32)
  >>> nnx.eval_shape(lambda m, x: m(x), model, images).shape
  (5, 2)
  >>> model.fc.kernel.shape  # 3x3x128 after the pools.
  (1152, 2)

  References: Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition",
  ECCV 2016.
  """

  def __init__(
      self,
      *,
      embedding_dim: int = 2,
      input_size: int | Sequence[int] = 28,
      in_channels: int = 1,
      widths: Sequence[int] = (32, 64, 128),
      batch_norm: bool = False,
      dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    widths = positive_ints(widths, "widths", len(POOL_SIZES), f"{len(POOL_SIZES)} positive ints")
    embedding_dim = check_int(embedding_dim, "embedding_dim", minimum=1)
    in_channels = check_int(in_channels, "in_channels", minimum=1)
    self.input_size = iresnet.image_size(input_size)
    self.in_channels = in_channels
    self.dtype = iresnet.check_compute_dtype(dtype)

    sizes = [self.input_size]
    for window in POOL_SIZES:
      sizes.append(tuple(pooled_size(s, window) for s in sizes[-1]))
    if min(sizes[-1]) < 1:
      raise ValueError(
          f"`input_size` {self.input_size} is too small: the pooled maps would be {sizes[1:]}.")
    # High-side padding that makes an unpadded pool round up like Caffe's.
    self.pool_padding = tuple(
        tuple((0, (out - 1) * POOL_STRIDE + window - size) for size, out in zip(before, after))
        for window, before, after in zip(POOL_SIZES, sizes, sizes[1:]))

    units = []
    features = in_channels
    for width in widths:
      for _ in range(2):
        units.append(ConvPReLU(features, width, batch_norm=batch_norm, dtype=dtype, rngs=rngs))
        features = width
    self.units = nnx.List(units)  # Two per stage.
    height, width = sizes[-1]
    self.fc = nnx.Linear(
        height * width * features, embedding_dim, kernel_init=_KERNEL_INIT, rngs=rngs)
    self.prelu = iresnet.PReLU(embedding_dim)

  def __call__(self, images: Array) -> Array:
    iresnet.check_images(images, self.input_size, self.in_channels)
    x = images.astype(self.dtype)
    for stage, (window, padding) in enumerate(zip(POOL_SIZES, self.pool_padding)):
      x = self.units[2 * stage + 1](self.units[2 * stage](x))
      x = nnx.max_pool(x, (window, window), strides=(POOL_STRIDE, POOL_STRIDE), padding=padding)
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)  # NHWC flatten: (h, w, c) order.
    return self.prelu(self.fc(x))
