"""Vision Transformer for 112x112 faces, as insightface's ``arcface_torch`` builds it.

Topology (insightface ``backbones/vit.py``): a ``conv9x9`` stride-9 patch embedding (12x12 = 144
tokens from a 112x112 face: the last 4 rows and columns fall outside every patch), a learned
position embedding, no class token; pre-norm encoder blocks ``x + DropPath(Attention(LN(x)))``,
``x + DropPath(MLP(LN(x)))`` with a bias-free ``qkv`` projection, a biased output projection and a
ReLU6 MLP of ratio 4; a final LayerNorm; then the feature head ``flatten (144 x width) ->
Linear(width, no bias) -> BN -> Linear(embedding_dim, no bias) -> BN`` (BN eps 2e-5).

In training, a random ``mask_ratio`` of the tokens (10% in the presets) skips the encoder and a
learned mask token takes their place before the head; stochastic depth grows linearly from 0 to
``drop_path_rate`` over the blocks. Both are off in evaluation mode (``model.eval()`` or
``nnx.view(model, deterministic=True, use_running_average=True)``).

Presets (``vit_t``/``vit_s``/``vit_b``/``vit_l``): width 256/512/512/768, depth 12/12/24/24,
8 heads, patch 9; drop path and mask ratio 0.1, but drop path 0.05 for ``vit_l`` (insightface's
``vit_l_dp005_mask_005``, for WebFace42M); ``vit_b`` and ``vit_l`` recompute their blocks'
activations in the backward pass (``remat``), as insightface's do. insightface's ``mask_ratio``
only switches masking on or off: its ``forward_features`` calls ``random_masking(x)`` without it,
so every variant that masks drops 10% of the tokens (129 of 144 kept), its ``_mask_005`` ones too;
the ``vit_l`` preset and the ViT-B/L recipes therefore use 0.1.

``dtype`` is the compute dtype of the blocks' linear layers, the layers insightface runs under
autocast. The patch embedding, the residual stream (each block adds its branches to float32
tokens), the LayerNorms, the attention and the feature head run in float32.
Linear kernels, the position embedding and the mask token start from N(0, 0.02^2) (timm's
``trunc_normal_(std=.02)`` truncates at +-2, i.e. 100 standard deviations), biases at zero; the
patch embedding uses PyTorch's default U(+-1/sqrt(fan_in)) kernel and a zero bias.

References: Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021; insightface
``recognition/arcface_torch/backbones/vit.py`` and ``backbones/__init__.py``.
"""

from collections.abc import Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from margins._checks import check_int
from margins.models import iresnet

Array = jax.Array

PRESETS = {
    "vit_t": {"width": 256, "depth": 12, "num_heads": 8},
    "vit_s": {"width": 512, "depth": 12, "num_heads": 8},
    "vit_b": {"width": 512, "depth": 24, "num_heads": 8, "remat": True},
    "vit_l": {"width": 768, "depth": 24, "num_heads": 8, "drop_path_rate": 0.05, "remat": True},
}
LAYER_NORM_EPSILON = 1e-5  # PyTorch's default.
HEAD_BN_EPSILON = 2e-5

_INIT = nnx.initializers.normal(0.02)


class LayerNorm(nnx.LayerNorm):
  """``nnx.LayerNorm`` (eps 1e-5, PyTorch's) that normalises in float32 and returns ``x.dtype``.

  ``nnx.LayerNorm(dtype=jnp.bfloat16)`` mixes bfloat16 and float32 in its statistics, which
  ``jax_numpy_dtype_promotion='strict'`` rejects; PyTorch autocast runs layer norm in float32 too.

  >>> norm = LayerNorm(4, rngs=nnx.Rngs(0))
  >>> norm(jnp.array([[1.0, 1.0, 3.0, 3.0]], jnp.bfloat16))
  Array([[-1, -1,  1,  1]], dtype=bfloat16)
  """

  def __init__(self, num_features: int, *, rngs: nnx.Rngs):
    super().__init__(num_features, epsilon=LAYER_NORM_EPSILON, rngs=rngs)

  def __call__(self, x: Array, **kwargs: Any) -> Array:  # pytype: disable=signature-mismatch
    return super().__call__(x.astype(jnp.float32), **kwargs).astype(x.dtype)


class Linear(nnx.Linear):
  """``nnx.Linear`` whose bias is added by :func:`~margins.models.iresnet.broadcast_param`: in a
  16-bit ``dtype`` its gradient is summed over the tokens in float32.

  >>> layer = Linear(2, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((4, 5, 2))).dtype
  dtype(bfloat16)
  """

  def __call__(self, x: Array) -> Array:  # pytype: disable=signature-mismatch
    x, kernel = self.promote_dtype((x, self.kernel[...]), dtype=self.dtype)
    y = self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    return y if self.bias is None else y + iresnet.broadcast_param(self.bias[...], y)


class Attention(nnx.Module):
  """Multi-head self-attention over ``[B, N, width]`` tokens, softmax in float32.

  ``softmax(q k^T / sqrt(head_dim)) v`` per head, with ``q, k, v`` from one bias-free projection and
  a biased output projection.

  >>> attention = nnx.eval_shape(lambda: Attention(8, num_heads=2, rngs=nnx.Rngs(0)))
  >>> tokens = jax.ShapeDtypeStruct((3, 5, 8), jnp.float32)
  >>> nnx.eval_shape(lambda a, x: a(x), attention, tokens).shape
  (3, 5, 8)
  """

  def __init__(
      self, width: int, *, num_heads: int, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"`width` ({width}) must be a multiple of `num_heads` ({num_heads}).")
    self.num_heads = num_heads
    self.qkv = Linear(
        width, 3 * width, use_bias=False, kernel_init=_INIT, dtype=dtype, rngs=rngs)
    self.proj = Linear(width, width, kernel_init=_INIT, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    batch, tokens, width = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads)
    query, key, value = (qkv[:, :, i].astype(jnp.float32) for i in range(3))
    out = jax.nn.dot_product_attention(query, key, value)  # [B, N, heads, head_dim]
    return self.proj(out.reshape(batch, tokens, width).astype(x.dtype))


class EncoderBlock(nnx.Module):
  """``x + DropPath(Attention(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``, MLP ``Linear -> ReLU6 ->
  Linear``.

  Stochastic depth (``drop_path``) zeroes a sample's branch with that probability in training and
  scales the kept ones by ``1 / (1 - drop_path)``.

  >>> block = nnx.eval_shape(lambda: EncoderBlock(8, num_heads=2, rngs=nnx.Rngs(0)))
  >>> tokens = jax.ShapeDtypeStruct((3, 5, 8), jnp.float32)
  >>> nnx.eval_shape(lambda b, x: b(x), block, tokens).shape
  (3, 5, 8)
  """

  def __init__(
      self,
      width: int,
      *,
      num_heads: int,
      mlp_ratio: float = 4.0,
      drop_path: float = 0.0,
      dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    hidden = int(width * mlp_ratio)
    self.norm1 = LayerNorm(width, rngs=rngs)
    self.attn = Attention(width, num_heads=num_heads, dtype=dtype, rngs=rngs)
    self.norm2 = LayerNorm(width, rngs=rngs)
    self.fc1 = Linear(width, hidden, kernel_init=_INIT, dtype=dtype, rngs=rngs)
    self.fc2 = Linear(hidden, width, kernel_init=_INIT, dtype=dtype, rngs=rngs)
    # One keep/drop draw per sample: the mask broadcasts over tokens and channels.
    self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=rngs)

  def __call__(self, x: Array) -> Array:
    # The branches compute in ``dtype``; the residual sums stay in ``x``'s (float32 in the model).
    x = x + self.drop_path(self.attn(self.norm1(x)).astype(x.dtype))
    return x + self.drop_path(self.fc2(jax.nn.relu6(self.fc1(self.norm2(x)))).astype(x.dtype))


def _apply(module: nnx.Module, x: Array) -> Array:
  return module(x)


class TokenMasking(nnx.Module):
  """Random token masking of insightface's ViT (training only).

  ``keep`` draws, per sample, which ``int(N * (1 - mask_ratio))`` tokens go through the encoder
  (uniformly, without replacement) and the permutation that puts them back; ``restore`` appends the
  learned ``mask_token`` for the dropped ones and undoes the permutation. ``deterministic`` (set by
  ``model.eval()``/``model.train()`` or ``nnx.view``) turns it off.

  >>> masking = nnx.eval_shape(lambda: TokenMasking(4, mask_ratio=0.5, rngs=nnx.Rngs(0)))
  >>> tokens = jax.ShapeDtypeStruct((2, 6, 4), jnp.float32)
  >>> kept, restore_ids = nnx.eval_shape(lambda m, x: m.keep(x), masking, tokens)
  >>> kept.shape, restore_ids.shape
  ((2, 3, 4), (2, 6))
  >>> nnx.eval_shape(lambda m, x: m.restore(*m.keep(x)), masking, tokens).shape
  (2, 6, 4)
  """

  def __init__(self, width: int, *, mask_ratio: float, rngs: nnx.Rngs):
    if not 0.0 <= mask_ratio < 1.0:
      raise ValueError(f"`mask_ratio` must lie in [0, 1), got {mask_ratio}.")
    self.mask_ratio = mask_ratio
    self.deterministic = False
    self.mask_token = nnx.Param(_INIT(rngs.params(), (width,), jnp.float32))
    self.rngs = rngs["dropout"].fork()

  def set_view(self, deterministic: bool | None = None):
    """Used by ``nnx.view``.

    Args:
      deterministic: if True, no token is masked (evaluation mode).
    """
    if deterministic is not None:
      self.deterministic = deterministic

  @property
  def active(self) -> bool:
    return not self.deterministic and self.mask_ratio > 0

  def keep(self, tokens: Array) -> tuple[Array, Array]:
    """``([B, kept, width] tokens, [B, N] permutation indices)`` from ``tokens [B, N, width]``."""
    batch, count, _ = tokens.shape
    kept = int(count * (1 - self.mask_ratio))
    # Drawn split like the tokens (as ``nnx.Dropout`` draws its mask) when a mesh splits the batch.
    draws = jax.random.uniform(self.rngs(), (batch, count, 1),
                               out_sharding=jax.typeof(tokens).sharding)
    order = jnp.argsort(draws[..., 0], axis=1)
    restore_ids = jnp.argsort(order, axis=1)
    return jnp.take_along_axis(tokens, order[:, :kept, None], axis=1), restore_ids

  def restore(self, kept: Array, restore_ids: Array) -> Array:
    """``[B, N, width]``: ``kept`` and mask tokens, back in their original positions."""
    batch, count = restore_ids.shape
    fill = jnp.broadcast_to(
        self.mask_token[...].astype(kept.dtype), (batch, count - kept.shape[1], kept.shape[2]),
        out_sharding=jax.typeof(kept).sharding)
    tokens = jnp.concatenate([kept, fill], axis=1)
    return jnp.take_along_axis(tokens, restore_ids[:, :, None], axis=1)


class VisionTransformer(nnx.Module):
  """ViT backbone: ``images [B, H, W, C]`` (in [-1, 1]) to embeddings ``[B, embedding_dim]``.

  Args:
    width: token width (insightface ``embed_dim``).
    depth: encoder blocks.
    num_heads: attention heads.
    embedding_dim: size of the embedding (insightface ``num_classes`` of the ViT, 512).
    input_size: ``H`` or ``(H, W)``; the tokens are the ``floor(H / patch) x floor(W / patch)``
      patches.
    patch_size: side of the square patches (9).
    mlp_ratio: MLP hidden width over ``width``.
    drop_path_rate: stochastic depth of the last block (linear from 0 at the first).
    mask_ratio: share of tokens masked in training.
    in_channels: image channels.
    dtype: compute dtype of the blocks' linear layers.
    remat: recompute each block's activations in the backward pass instead of keeping them
      (``nnx.remat``; insightface's ``using_checkpoint``, on in the ``vit_b`` and ``vit_l``
      presets): less memory, one more forward pass of the blocks.
    rngs: parameter, dropout and masking randomness (``dropout`` stream).

  >>> model = nnx.eval_shape(lambda: VisionTransformer(**PRESETS["vit_t"], rngs=nnx.Rngs(0)))
  >>> images = jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32)
  >>> nnx.eval_shape(lambda m, x: m(x), model, images).shape
  (2, 512)

  References: Dosovitskiy et al., ICLR 2021; insightface ``arcface_torch/backbones/vit.py``.
  """

  def __init__(
      self,
      *,
      width: int,
      depth: int,
      num_heads: int,
      embedding_dim: int = 512,
      input_size: int | Sequence[int] = 112,
      patch_size: int = 9,
      mlp_ratio: float = 4.0,
      drop_path_rate: float = 0.1,
      mask_ratio: float = 0.1,
      in_channels: int = 3,
      dtype: Any = jnp.float32,
      remat: bool = False,
      rngs: nnx.Rngs,
  ):
    width, depth, num_heads, embedding_dim, patch_size, in_channels = (
        check_int(value, name, minimum=1) for name, value in (
            ("width", width), ("depth", depth), ("num_heads", num_heads),
            ("embedding_dim", embedding_dim), ("patch_size", patch_size),
            ("in_channels", in_channels)))
    if width % num_heads:
      raise ValueError(f"`width` ({width}) must be a multiple of `num_heads` ({num_heads}).")
    if not 0.0 <= drop_path_rate < 1.0:
      raise ValueError(f"`drop_path_rate` must lie in [0, 1), got {drop_path_rate}.")
    if mlp_ratio <= 0:
      raise ValueError(f"`mlp_ratio` must be positive, got {mlp_ratio}.")
    self.input_size = iresnet.image_size(input_size)
    if min(self.input_size) < patch_size:
      raise ValueError(f"`input_size` {self.input_size} is smaller than `patch_size` {patch_size}.")
    self.in_channels = in_channels
    self.remat = remat
    dtype = iresnet.check_compute_dtype(dtype)
    num_tokens = (self.input_size[0] // patch_size) * (self.input_size[1] // patch_size)
    if int(num_tokens * (1 - mask_ratio)) < 1:
      raise ValueError(f"`mask_ratio` {mask_ratio} would mask all {num_tokens} tokens.")

    self.patch_embed = nnx.Conv(
        in_channels, width, (patch_size, patch_size), strides=patch_size, padding="VALID",
        kernel_init=iresnet.TORCH_DEFAULT_KERNEL_INIT, rngs=rngs)
    self.pos_embed = nnx.Param(_INIT(rngs.params(), (num_tokens, width), jnp.float32))
    self.masking = TokenMasking(width, mask_ratio=mask_ratio, rngs=rngs)
    self.blocks = nnx.List([
        EncoderBlock(
            width, num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path=float(rate), dtype=dtype,
            rngs=rngs)
        for rate in np.linspace(0.0, drop_path_rate, depth)])
    self.norm = LayerNorm(width, rngs=rngs)
    self.fc1 = nnx.Linear(num_tokens * width, width, use_bias=False, kernel_init=_INIT, rngs=rngs)
    self.bn1 = iresnet.BatchNorm(width, epsilon=HEAD_BN_EPSILON)
    self.fc2 = nnx.Linear(width, embedding_dim, use_bias=False, kernel_init=_INIT, rngs=rngs)
    self.features = iresnet.BatchNorm(embedding_dim, epsilon=HEAD_BN_EPSILON)

  def __call__(self, images: Array) -> Array:
    iresnet.check_images(images, self.input_size, self.in_channels)
    x = self.patch_embed(images.astype(jnp.float32))
    batch, _, _, width = x.shape
    x = x.reshape(batch, -1, width) + self.pos_embed[...][None]
    masked = self.masking.active
    if masked:
      x, restore_ids = self.masking.keep(x)
    apply = nnx.remat(_apply) if self.remat else _apply
    for block in self.blocks:
      x = apply(block, x)
    x = self.norm(x)
    if masked:
      x = self.masking.restore(x, restore_ids)
    x = self.bn1(self.fc1(x.reshape(batch, -1)))  # Token-major flatten, as in PyTorch.
    return self.features(self.fc2(x))

