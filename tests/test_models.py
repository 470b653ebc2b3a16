"""Tests for margins.models: parameter counts against the published topologies, shapes, modes,
dtypes, gradients and argument checks.

Big models are only built abstractly (``nnx.eval_shape``). Models that run for real get their
variables from NumPy (``_concrete``) rather than from their own initialisers, which are XLA
programs that take seconds each to compile on CPU (``test_initializers`` runs IResNet's on one
block). Jitted functions are compiled at XLA optimisation level 0: these tests check values, not
speed, and compiling is most of their cost.
"""

import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
import pytest

from margins import models
from margins import sharding as sharding_lib
from margins._checks import check_int
from margins.models import iresnet
from margins.models import mobilefacenet
from margins.models import small_cnn
from margins.models import vit

_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# Independent parameter counts, layer by layer from the published topologies (insightface
# arcface_torch backbones/iresnet.py, mobilefacenet.py, vit.py; the center-loss Caffe prototxt).


class _Tally:
  """Trainable parameters and BatchNorm running statistics (not parameters), counted apart."""

  def __init__(self):
    self.params = 0
    self.stats = 0

  def conv(self, cin, cout, kernel, *, groups=1, bias=False):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    self.params += kh * kw * (cin // groups) * cout + (cout if bias else 0)

  def linear(self, fin, fout, *, bias):
    self.params += fin * fout + (fout if bias else 0)

  def batch_norm(self, c, *, trainable_weight=True):
    self.params += (2 if trainable_weight else 1) * c
    self.stats += 2 * c  # running mean and var

  def prelu(self, c):
    self.params += c

  def layer_norm(self, c):
    self.params += 2 * c


def _iresnet_tally(layers, embedding_dim=512, final=(7, 7)):
  t = _Tally()
  t.conv(3, 64, 3)
  t.batch_norm(64)
  t.prelu(64)
  cin = 64
  for width, depth in zip((64, 128, 256, 512), layers):
    for block in range(depth):
      t.batch_norm(cin)
      t.conv(cin, width, 3)
      t.batch_norm(width)
      t.prelu(width)
      t.conv(width, width, 3)
      t.batch_norm(width)
      if block == 0:  # stride 2: conv1x1 + BN downsample
        t.conv(cin, width, 1)
        t.batch_norm(width)
      cin = width
  t.batch_norm(512)
  t.linear(512 * final[0] * final[1], embedding_dim, bias=True)
  # insightface: BatchNorm1d whose weight is set to 1.0 with requires_grad=False. ptflops (their
  # flops.py) counts requires_grad parameters only, so only the bias is a parameter here.
  t.batch_norm(embedding_dim, trainable_weight=False)
  return t


def _mobilefacenet_tally(blocks=(1, 4, 6, 2), scale=2, embedding_dim=512, final=(7, 7)):
  t = _Tally()

  def conv_block(cin, cout, kernel, groups=1, prelu=True):
    t.conv(cin, cout, kernel, groups=groups)
    t.batch_norm(cout)
    if prelu:
      t.prelu(cout)

  def depthwise(cin, cout, hidden):
    conv_block(cin, hidden, 1)
    conv_block(hidden, hidden, 3, groups=hidden)
    conv_block(hidden, cout, 1, prelu=False)

  c64, c128 = 64 * scale, 128 * scale
  conv_block(3, c64, 3)
  if blocks[0] == 1:
    conv_block(c64, c64, 3, groups=64)
  else:
    for _ in range(blocks[0]):
      depthwise(c64, c64, 128)
  for cin, cout, hidden, repeats, repeat_hidden in (
      (c64, c64, 128, blocks[1], 128), (c64, c128, 256, blocks[2], 256),
      (c128, c128, 512, blocks[3], 256)):
    depthwise(cin, cout, hidden)
    for _ in range(repeats):
      depthwise(cout, cout, repeat_hidden)
  conv_block(c128, 512, 1)
  conv_block(512, 512, final, groups=512, prelu=False)
  t.linear(512, embedding_dim, bias=False)
  t.batch_norm(embedding_dim)
  return t


def _vit_tally(width, depth, embedding_dim=512, patch=9, tokens=144, mlp_ratio=4):
  t = _Tally()
  t.conv(3, width, patch, bias=True)
  t.params += tokens * width  # position embedding
  t.params += width  # mask token
  for _ in range(depth):
    t.layer_norm(width)
    t.linear(width, 3 * width, bias=False)
    t.linear(width, width, bias=True)
    t.layer_norm(width)
    t.linear(width, mlp_ratio * width, bias=True)
    t.linear(mlp_ratio * width, width, bias=True)
  t.layer_norm(width)
  t.linear(tokens * width, width, bias=False)
  t.batch_norm(width)
  t.linear(width, embedding_dim, bias=False)
  t.batch_norm(embedding_dim)
  return t


def _lenets_tally(embedding_dim=2, size=28, widths=(32, 64, 128), batch_norm=False):
  t = _Tally()
  cin = 1
  for width, window in zip(widths, (2, 2, 3)):
    for unit_in in (cin, width):
      t.conv(unit_in, width, 5, bias=not batch_norm)
      if batch_norm:
        t.batch_norm(width)
      t.prelu(width)
    cin = width
    size = math.ceil((size - window) / 2) + 1  # Caffe pooling rounds up
  t.linear(size * size * cin, embedding_dim, bias=True)
  t.prelu(embedding_dim)
  return t


EXPECTED = {
    "iresnet18": _iresnet_tally((2, 2, 2, 2)),
    "iresnet34": _iresnet_tally((3, 4, 6, 3)),
    "iresnet50": _iresnet_tally((3, 4, 14, 3)),
    "iresnet100": _iresnet_tally((3, 13, 30, 3)),
    "iresnet200": _iresnet_tally((6, 26, 60, 6)),
    "mobilefacenet": _mobilefacenet_tally(),
    "mobilefacenet_large": _mobilefacenet_tally(blocks=(2, 8, 12, 4), scale=4),
    "small_cnn": _lenets_tally(),
    "vit_t": _vit_tally(256, 12),
    "vit_s": _vit_tally(512, 12),
    "vit_b": _vit_tally(512, 24),
    "vit_l": _vit_tally(768, 24),
}
INPUT_SHAPES = {name: (112, 112, 3) for name in EXPECTED} | {"small_cnn": (28, 28, 1)}


@functools.cache
def _abstract(name):
  return nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0)))


def _size(model, kind):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, kind)))


def test_names_cover_the_expected_table():
  assert set(models.NAMES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_and_statistics_counts(name):
  model = _abstract(name)
  assert _size(model, nnx.Param) == EXPECTED[name].params
  assert _size(model, nnx.BatchStat) == EXPECTED[name].stats


def test_published_iresnet_sizes():
  # AdaDistill (Boutros et al., ECCV 2024) prints insightface's ResNet50 as 43.59M parameters.
  # OpenVINO's model zoo lists the MXNet ArcFace LResNet100E-IR export at 65.132M and
  # LResNet34E-IR at 34.129M (a different, converted graph: within 0.04% of these).
  # insightface's own `sum(p.numel() for p in model.parameters())` adds the 512 frozen weights.
  assert EXPECTED["iresnet50"].params == 43_590_336
  assert round(EXPECTED["iresnet50"].params / 1e6, 2) == 43.59
  assert EXPECTED["iresnet100"].params == 65_155_648
  assert EXPECTED["iresnet100"].params + 512 == 65_156_160
  assert abs(EXPECTED["iresnet100"].params / 65.132e6 - 1) < 4e-4
  assert abs(EXPECTED["iresnet34"].params / 34.129e6 - 1) < 4e-4


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_output_shape(name):
  images = jax.ShapeDtypeStruct((2, *INPUT_SHAPES[name]), jnp.float32)
  out = nnx.eval_shape(lambda m, x: m(x), _abstract(name), images)
  assert out.shape == (2, 2 if name == "small_cnn" else 512)
  assert out.dtype == jnp.float32


@pytest.mark.parametrize("name, kwargs, images_shape, layer, kernel_shape", [
    ("iresnet18", {"input_size": (112, 96)}, (3, 112, 96, 3), "fc", (7 * 6 * 512, 128)),
    ("iresnet18", {"input_size": 32}, (3, 32, 32, 3), "fc", (2 * 2 * 512, 128)),
    # Odd sides round up at every stride 2: 100 -> 50 -> 25 -> 13 -> 7, 90 -> 45 -> 23 -> 12 -> 6.
    ("iresnet18", {"input_size": (100, 90)}, (3, 100, 90, 3), "fc", (7 * 6 * 512, 128)),
    ("mobilefacenet", {"input_size": (112, 96)}, (3, 112, 96, 3), "gdc", (7, 6, 1, 512)),
    ("mobilefacenet", {"input_size": (100, 90)}, (3, 100, 90, 3), "gdc", (7, 6, 1, 512)),
    ("vit_t", {"input_size": 36, "depth": 1}, (3, 36, 36, 3), "fc1", (16 * 256, 256)),
    ("vit_t", {"input_size": (36, 45), "depth": 1}, (3, 36, 45, 3), "fc1", (4 * 5 * 256, 256)),
    ("small_cnn", {"input_size": 32}, (3, 32, 32, 1), "fc", (4 * 4 * 128, 128)),
])
def test_input_size_and_embedding_dim(name, kwargs, images_shape, layer, kernel_shape):
  model = nnx.eval_shape(
      lambda: models.create(name, embedding_dim=128, rngs=nnx.Rngs(0), **kwargs))
  out = nnx.eval_shape(
      lambda m, x: m(x), model, jax.ShapeDtypeStruct(images_shape, jnp.float32))
  assert out.shape == (3, 128)
  sublayer = getattr(model, layer)
  kernel = sublayer.conv.kernel if name == "mobilefacenet" else sublayer.kernel
  assert kernel.shape == kernel_shape


# Real forward and backward passes on small configurations.


def _rngs():
  # RBG keys: dropout and masking compile much faster on CPU than with threefry.
  return nnx.Rngs(jax.random.key(0, impl="rbg"))


def _concrete(make, seed=0):
  """``make()`` with NumPy-drawn variables (positive running variances, fresh RNG streams)."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)

  def value(path, variable):
    name = path[-1].key
    shape = variable.get_value().shape
    if isinstance(variable, nnx.RngCount):
      return np.zeros(shape, np.uint32)
    if name == "var":
      return rng.uniform(0.5, 1.5, shape)
    if name == "scale":
      return 1.0 + 0.1 * rng.normal(size=shape)
    if name in ("bias", "mean"):
      return 0.1 * rng.normal(size=shape)
    if name == "negative_slope":
      return 0.25 + 0.05 * rng.normal(size=shape)
    return rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1]))

  def fill(path, variable):
    if isinstance(variable, nnx.RngKey):
      return variable.replace(jax.random.key(seed, impl="rbg"))
    return variable.replace(jnp.asarray(value(path, variable), variable.get_value().dtype))

  state = jax.tree.map_with_path(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


@functools.partial(_jit, static_argnums=0)
def _apply(graphdef, state, images):
  model = nnx.merge(graphdef, state)
  return model(images), nnx.state(model)


def _run(model, images):
  """The model's output, through ``nnx.split`` + ``jax.jit``, updating its state like a call."""
  out, state = _apply(*nnx.split(model), images)
  nnx.update(model, state)
  return np.asarray(out)


def _images(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


SMALL = {  # name -> (create kwargs, image shape)
    "iresnet": ("iresnet18", {"layers": (1, 1, 1, 1), "input_size": 16, "dropout": 0.5},
                (4, 16, 16, 3)),
    "mobilefacenet": ("mobilefacenet", {"blocks": (1, 1, 1, 1), "input_size": 32},
                      (4, 32, 32, 3)),
    "small_cnn": ("small_cnn", {}, (4, 28, 28, 1)),
    "vit": ("vit_t", {"depth": 2, "input_size": 18, "mask_ratio": 0.5}, (4, 18, 18, 3)),
}


def _small(key, seed=0, **overrides):
  name, kwargs, shape = SMALL[key]
  model = _concrete(
      lambda: models.create(name, embedding_dim=8, rngs=_rngs(), **(kwargs | overrides)), seed)
  return model, _images(shape)


def _np_conv(x, kernel, *, stride=1, pad=0, groups=1):
  """NHWC convolution with a ``[kh, kw, cin / groups, cout]`` kernel and PyTorch-style symmetric
  padding; ``groups`` splits the input and output channels into that many consecutive groups."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  windows = sliding_window_view(x, kernel.shape[:2], axis=(1, 2))[:, ::stride, ::stride]
  batch, height, width, channels = windows.shape[:4]
  windows = windows.reshape(batch, height, width, groups, channels // groups, *kernel.shape[:2])
  kernel = kernel.reshape(*kernel.shape[:3], groups, -1)
  return np.einsum("bhwgcij,ijcgo->bhwgo", windows, kernel).reshape(batch, height, width, -1)


def _np_prelu(x, slope):
  return np.where(x >= 0, x, slope * x)


def _np_batch_norm(x, scale, bias, eps=1e-5):
  axes = tuple(range(x.ndim - 1))  # all but the channels
  mean, var = x.mean(axis=axes), x.var(axis=axes)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _f64(variable):
  return np.asarray(variable[...], np.float64)


def _bn(layer, y, eps=1e-5):
  """``_np_batch_norm`` (batch statistics) with ``layer``'s scale (1 if it has none) and bias."""
  scale = 1.0 if layer.scale is None else _f64(layer.scale)
  return _np_batch_norm(y, scale, _f64(layer.bias), eps)


def test_prelu_and_batch_norm_match_numpy():
  x = np.random.default_rng(0).normal(size=(3, 2, 2, 4)) * 3 + 1
  prelu = iresnet.PReLU(4)
  prelu.negative_slope[...] = jnp.array([0.1, 0.2, 0.3, 0.4], jnp.float32)
  np.testing.assert_allclose(
      prelu(jnp.asarray(x, jnp.float32)), _np_prelu(x, _f64(prelu.negative_slope)), rtol=1e-6)

  bn = iresnet.BatchNorm(4)
  bn.scale[...] = jnp.array([1.0, 2.0, 0.5, -1.0], jnp.float32)
  bn.bias[...] = jnp.array([0.0, 1.0, -1.0, 0.5], jnp.float32)
  train = bn(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(train, _np_batch_norm(x, _f64(bn.scale), _f64(bn.bias)), atol=1e-5)
  np.testing.assert_allclose(bn.mean[...], 0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * x.var(axis=(0, 1, 2)), rtol=1e-5)
  mean, var = _f64(bn.mean), _f64(bn.var)
  bn.eval()
  expected = (x - mean) / np.sqrt(var + 1e-5) * _f64(bn.scale) + _f64(bn.bias)
  np.testing.assert_allclose(bn(jnp.asarray(x, jnp.float32)), expected, atol=1e-5)
  np.testing.assert_array_equal(bn.mean[...], mean.astype(np.float32))  # no update in eval
  half = bn(jnp.asarray(x, jnp.bfloat16))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(half.astype(jnp.float32), expected, atol=0.05, rtol=0.02)


def test_prelu_and_batch_norm_gradients():
  x = np.random.default_rng(3).normal(size=(5, 3))
  x = jnp.asarray(np.where(np.abs(x) < 0.1, 0.5, x), jnp.float32)  # away from PReLU's kink

  def layers(x, slope, scale, bias):
    prelu, bn = iresnet.PReLU(3), iresnet.BatchNorm(3)
    prelu.negative_slope[...] = slope
    bn.scale[...], bn.bias[...] = scale, bias
    return bn(prelu(x))

  args = (x, jnp.array([0.1, 0.2, 0.3]), jnp.array([1.0, -2.0, 0.5]), jnp.array([0.0, 1.0, 2.0]))
  jax.test_util.check_grads(jax.jit(layers), args, order=1, modes=("rev",), atol=2e-2, rtol=2e-2)


def test_batch_norm_statistics_per_device():
  # 8 examples over 4 devices: each device's 2 rows normalised by their own statistics, as
  # 4 separate BatchNorms would; no all-reduce in the passes, unlike the global statistics.
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:4])
  x = np.random.default_rng(5).normal(size=(8, 2, 2, 3)) * 2 + 1
  scale, bias = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, 2.0])
  weights = jnp.asarray(np.random.default_rng(6).normal(size=x.shape), jnp.float32)

  def batch_norm(stats_per_device):
    bn = iresnet.BatchNorm(3, stats_per_device=stats_per_device)
    bn.scale[...], bn.bias[...] = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
    return nnx.split(bn)

  def forward(graphdef, state, x):  # outputs, new running statistics
    bn = nnx.merge(graphdef, state)
    y = bn(x)
    return y, (bn.mean[...], bn.var[...])

  def loss(graphdef, state, x):
    return jnp.sum(forward(graphdef, state, x)[0] * weights)

  graphdef, state = batch_norm(True)
  sharded = jax.device_put(jnp.asarray(x, jnp.float32), jax.NamedSharding(mesh, jax.P("data")))
  with jax.set_mesh(mesh):
    y, (mean, var) = jax.jit(forward, static_argnums=0)(graphdef, state, sharded)
    grads = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(graphdef, state, sharded)
    hlo = {per_device: jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0).lower(
        *batch_norm(per_device), sharded).compile().as_text() for per_device in (True, False)}
  groups = x.reshape(4, 2, 2, 2, 3)
  np.testing.assert_allclose(y, np.concatenate([_np_batch_norm(g, scale, bias) for g in groups]),
                             atol=1e-5)
  np.testing.assert_allclose(mean, 0.1 * groups.mean(axis=(1, 2, 3)).mean(axis=0), rtol=1e-5)
  np.testing.assert_allclose(var, 0.9 + 0.1 * groups.var(axis=(1, 2, 3)).mean(axis=0), rtol=1e-5)
  # Gradients: as four unsharded BatchNorms of the global statistics, one per device's rows.
  global_graphdef, global_state = batch_norm(False)
  separate = lambda state, x: sum(  # noqa: E731
      jnp.sum(forward(global_graphdef, state, x[2 * i:2 * i + 2])[0] * weights[2 * i:2 * i + 2])
      for i in range(4))
  want = jax.jit(jax.grad(separate, argnums=(0, 1)))(global_state, jnp.asarray(x, jnp.float32))
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5), grads, want)
  reductions = {k: [op for op in sharding_lib.collectives(text) if op.op == "all-reduce"]
                for k, text in hlo.items()}
  # Per device, only the parameters' gradients are summed over the devices (one all-reduce).
  assert [op.shapes for op in reductions[True]] == [["f32[3]", "f32[3]"]], reductions
  assert len(reductions[False]) >= 3, reductions  # the statistics, forward and backward
  # A batch whose type does not say it is split: the whole batch's statistics.
  np.testing.assert_allclose(forward(graphdef, state, jnp.asarray(x, jnp.float32))[0],
                             _np_batch_norm(x, scale, bias), atol=1e-5)
  one_each = jax.device_put(jnp.asarray(x[:4, 0, 0], jnp.float32),  # one value per device
                            jax.NamedSharding(mesh, jax.P("data")))
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="one example per device"):
    forward(graphdef, state, one_each)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_gradients_of_slopes_and_biases_are_summed_in_float32(dtype):
  # Summed over 25k positions in 16 bits (XLA:CPU sums in order) these gradients stall: the
  # PReLU slopes' came out ~20x too small in bfloat16.
  x = -jnp.abs(jax.random.normal(jax.random.key(0), (8, 56, 56, 4)))
  for module, expected in ((iresnet.PReLU(4), 0.01 * jnp.sum(x, axis=(0, 1, 2))),
                           (vit.Linear(4, 4, dtype=dtype, rngs=nnx.Rngs(0)),
                            jnp.full((4,), 0.01 * x.size / 4)),
                           (small_cnn.Conv(4, 4, (1, 1), dtype=dtype, rngs=nnx.Rngs(0)),
                            jnp.full((4,), 0.01 * x.size / 4))):
    graphdef, params = nnx.split(module)
    loss = lambda p, m=graphdef: jnp.sum(  # noqa: E731
        0.01 * nnx.merge(m, p)(x.astype(dtype)).astype(jnp.float32))
    grad, = jax.tree.leaves(jax.jit(jax.grad(loss))(params)[
        "negative_slope" if isinstance(module, iresnet.PReLU) else "bias"])
    assert grad.dtype == jnp.float32
    np.testing.assert_allclose(grad, expected, rtol=5e-3)


def _np_iresnet_block(block, x, stride):
  """insightface's IBasicBlock in training mode; the conv1x1 + BN projection where it has one."""
  y = _np_conv(_bn(block.bn1, x), _f64(block.conv1.kernel), pad=1)
  y = _np_prelu(_bn(block.bn2, y), _f64(block.prelu.negative_slope))
  y = _bn(block.bn3, _np_conv(y, _f64(block.conv2.kernel), stride=stride, pad=1))
  if block.downsample is None:
    return y + x
  conv, norm = block.downsample.layers
  return y + _bn(norm, _np_conv(x, _f64(conv.kernel), stride=stride))


def test_iresnet_block_matches_numpy():
  # An even input side tells PyTorch's padding=1 (a zero row on each side) from 'SAME' (0 before,
  # 1 after) in the stride-2 convolution.
  block = _concrete(lambda: iresnet.IBasicBlock(3, 5, strides=2, rngs=_rngs()))
  x = np.asarray(_images((2, 6, 6, 3)), np.float64)
  out = _run(block, jnp.asarray(x, jnp.float32))
  assert block.downsample is not None and out.shape == (2, 3, 3, 5)
  np.testing.assert_allclose(out, _np_iresnet_block(block, x, 2), rtol=1e-4, atol=1e-4)


def test_iresnet_matches_numpy_with_pytorchs_flatten_order():
  # The whole network in training mode (batch statistics), insightface's topology written out: stem
  # conv3x3 -> BN -> PReLU, the blocks, then BN -> flatten -> Linear -> BN without scale. A 32x48
  # input leaves a 2x3x512 map, which the reference flattens as PyTorch does, in (c, h, w) order,
  # with the PyTorch fc weight that the module docstring says maps to our kernel.
  model = _concrete(lambda: iresnet.IResNet(
      (1, 2, 1, 1), embedding_dim=8, input_size=(32, 48), rngs=_rngs()))
  x = np.asarray(_images((3, 32, 48, 3)), np.float64)
  out = _run(model, jnp.asarray(x, jnp.float32))
  y = _np_conv(x, _f64(model.conv1.kernel), pad=1)
  y = _np_prelu(_bn(model.bn1, y), _f64(model.prelu.negative_slope))
  for block, stride in zip(model.blocks, (2, 2, 1, 2, 2), strict=True):
    y = _np_iresnet_block(block, y, stride)
  y = _bn(model.bn2, y)
  assert y.shape == (3, 2, 3, 512)
  kernel = _f64(model.fc.kernel)  # row (h * 3 + w) * 512 + c
  torch_weight = np.empty((8, 512 * 2 * 3))  # column (c * 2 + h) * 3 + w
  for h in range(2):
    for w in range(3):
      for c in range(512):
        torch_weight[:, (c * 2 + h) * 3 + w] = kernel[(h * 3 + w) * 512 + c]
  np.testing.assert_array_equal(  # The docstring's formula.
      torch_weight.reshape(8, 512, 2, 3).transpose(2, 3, 1, 0).reshape(2 * 3 * 512, 8), kernel)
  y = y.transpose(0, 3, 1, 2).reshape(3, -1) @ torch_weight.T + _f64(model.fc.bias)
  np.testing.assert_allclose(out, _bn(model.features, y), rtol=1e-4, atol=1e-4)


def test_iresnet_dropout_follows_the_head_batch_norm():
  # insightface's head is bn2 -> dropout -> fc: each of the fc's inputs is then bn2's output scaled
  # by 1 / (1 - rate), or 0. Seen here through an identity fc and an identity feature BatchNorm.
  rate = 0.25
  model = _concrete(lambda: iresnet.IResNet(
      (1, 1, 1, 1), embedding_dim=512, input_size=16, dropout=rate, rngs=_rngs()))
  model.fc.kernel[...] = jnp.eye(512, dtype=jnp.float32)
  model.fc.bias[...] = jnp.zeros(512, jnp.float32)
  model.features.use_running_average = True
  model.features.mean[...] = jnp.zeros(512, jnp.float32)
  model.features.var[...] = jnp.full(512, 1 - 1e-5, jnp.float32)
  model.features.bias[...] = jnp.zeros(512, jnp.float32)
  images = _images((4, 16, 16, 3))
  model.dropout.deterministic = True
  normalised = _run(model, images)  # bn2's output (batch statistics)
  np.testing.assert_allclose(normalised.mean(axis=0), _f64(model.bn2.bias), atol=1e-4)
  model.dropout.deterministic = False
  dropped = _run(model, images)
  zero = dropped == 0
  assert 0.15 < zero.mean() < 0.35, zero.mean()  # 512 x 4 draws of rate 0.25
  np.testing.assert_allclose(dropped[~zero], normalised[~zero] / (1 - rate), rtol=1e-5, atol=1e-6)


def test_mobilefacenet_matches_numpy():
  # Training mode, insightface's topology written out (strides, paddings and groups from its
  # mobilefacenet.py, not from the model): the depthwise conv3x3 of a bottleneck carries its
  # stride, residual bottlenecks add their input, the GDC covers the whole 2x3 map.
  model = _concrete(lambda: mobilefacenet.MobileFaceNet(
      embedding_dim=8, blocks=(1, 1, 2, 1), input_size=(32, 48), rngs=_rngs()))
  x = np.asarray(_images((3, 32, 48, 3)), np.float64)
  out = _run(model, jnp.asarray(x, jnp.float32))

  def conv_block(block, y, stride=1, pad=0, groups=1):
    y = _bn(block.bn, _np_conv(y, _f64(block.conv.kernel), stride=stride, pad=pad, groups=groups))
    return y if block.prelu is None else _np_prelu(y, _f64(block.prelu.negative_slope))

  def bottleneck(block, y, stride, residual):
    hidden = block.expand.conv.kernel.shape[-1]
    z = conv_block(block.expand, y)
    z = conv_block(block.depthwise, z, stride=stride, pad=1, groups=hidden)
    z = conv_block(block.project, z)
    return y + z if residual else z

  y = conv_block(model.layers[0], x, stride=2, pad=1)
  y = conv_block(model.layers[1], y, pad=1, groups=64)  # blocks[0] == 1
  for layer, stride in zip(model.layers[2:], (2, 1, 2, 1, 1, 2, 1), strict=True):
    y = bottleneck(layer, y, stride, residual=stride == 1)
  y = conv_block(model.conv_sep, y)
  assert y.shape == (3, 2, 3, 512)
  y = conv_block(model.gdc, y, groups=512).reshape(3, 512)
  y = _bn(model.features, y @ _f64(model.linear.kernel))
  np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-4)


def _np_layer_norm(norm, y):
  mean, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
  return (y - mean) / np.sqrt(var + 1e-5) * _f64(norm.scale) + _f64(norm.bias)


def _np_encoder_block(block, x, keep_attention=1.0, keep_mlp=1.0):
  """insightface's ViT block on ``x [B, N, width]``; ``keep_*`` multiply the residual branches (0
  or ``1 / (1 - drop_path)`` where stochastic depth drops or keeps them)."""
  attn = block.attn
  batch, tokens, width = x.shape
  num_heads = attn.num_heads
  head_dim = width // num_heads
  qkv = (_np_layer_norm(block.norm1, x) @ _f64(attn.qkv.kernel)).reshape(
      batch, tokens, 3, num_heads, head_dim)
  q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, heads, N, head_dim]
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  heads = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, width)
  y = x + keep_attention * (heads @ _f64(attn.proj.kernel) + _f64(attn.proj.bias))
  hidden = np.clip(
      _np_layer_norm(block.norm2, y) @ _f64(block.fc1.kernel) + _f64(block.fc1.bias), 0, 6)
  return y + keep_mlp * (hidden @ _f64(block.fc2.kernel) + _f64(block.fc2.bias))


def test_vit_encoder_block_matches_numpy():
  # Pre-norm residual branches, qkv split as [3, heads, head_dim] (insightface's layout), ReLU6.
  block = _concrete(lambda: vit.EncoderBlock(8, num_heads=2, drop_path=0.5, rngs=_rngs()))
  block.eval()  # no drop path
  block.fc1.kernel[...] = 10 * block.fc1.kernel[...]  # so that ReLU6 clips
  x = np.asarray(_images((3, 5, 8)), np.float64)
  out = _run(block, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(out, _np_encoder_block(block, x), rtol=1e-4, atol=1e-5)


def test_vit_drop_path_drops_a_samples_whole_branch():
  # Stochastic depth (timm's DropPath): per sample, each residual branch is dropped whole, or kept
  # and scaled by 1 / (1 - rate); never element by element.
  block = _concrete(lambda: vit.EncoderBlock(8, num_heads=2, drop_path=0.5, rngs=_rngs()))
  x = np.asarray(_images((16, 5, 8)), np.float64)
  out = _run(block, jnp.asarray(x, jnp.float32))
  choices = [(a, m) for a in (0.0, 2.0) for m in (0.0, 2.0)]
  candidates = [_np_encoder_block(block, x, a, m) for a, m in choices]
  drawn = []
  for sample in range(16):
    matches = [choice for choice, candidate in zip(choices, candidates)
               if np.allclose(out[sample], candidate[sample], rtol=1e-4, atol=1e-5)]
    assert len(matches) == 1, (sample, matches)
    drawn += matches
  assert {a for a, _ in drawn} == {m for _, m in drawn} == {0.0, 2.0}, drawn


def test_vit_matches_numpy_in_training_with_token_masking():
  # Training mode with half the tokens masked: patch embedding + position embedding, the kept
  # tokens through the blocks and the final LayerNorm, the mask token in the dropped places (not
  # normalised), a token-major flatten, then Linear -> BN -> Linear -> BN (eps 2e-5).
  model = _concrete(lambda: vit.VisionTransformer(
      width=16, depth=2, num_heads=2, embedding_dim=8, input_size=(18, 27), mask_ratio=0.5,
      drop_path_rate=0.0, rngs=_rngs()))
  x = np.asarray(_images((4, 18, 27, 3)), np.float64)
  # The draw the model's masking is about to make: a copy makes it first.
  _, restore_ids = _jit(lambda m, t: m.masking.keep(t))(nnx.clone(model), jnp.zeros((4, 6, 16)))
  out = _run(model, jnp.asarray(x, jnp.float32))
  kept = np.asarray(restore_ids) < 3  # int(6 * 0.5) tokens: those restored from the kept ones
  assert np.all(kept.sum(axis=1) == 3)
  y = _np_conv(x, _f64(model.patch_embed.kernel), stride=9) + _f64(model.patch_embed.bias)
  y = y.reshape(4, 6, 16) + _f64(model.pos_embed)  # the 2x3 patches row by row
  tokens = np.broadcast_to(_f64(model.masking.mask_token), y.shape).copy()
  for sample in range(4):
    z = y[sample][kept[sample]][None]
    for block in model.blocks:
      z = _np_encoder_block(block, z)
    tokens[sample][kept[sample]] = _np_layer_norm(model.norm, z)[0]
  y = _bn(model.bn1, tokens.reshape(4, -1) @ _f64(model.fc1.kernel), eps=2e-5)
  y = _bn(model.features, y @ _f64(model.fc2.kernel), eps=2e-5)
  np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_small_cnn_matches_numpy(batch_norm):
  # 32x32 makes the last pool round up (8 -> 4), as Caffe does; the network is LeNets++. With
  # batch_norm, every unit is conv (no bias) -> BN -> PReLU.
  model = _concrete(lambda: small_cnn.SmallCNN(
      embedding_dim=3, input_size=32, widths=(4, 6, 8), batch_norm=batch_norm, rngs=_rngs()))
  x = np.asarray(_images((2, 32, 32, 1)), np.float64)
  out = _run(model, jnp.asarray(x, jnp.float32))
  y = x
  for stage, window in enumerate((2, 2, 3)):
    for unit in model.units[2 * stage: 2 * stage + 2]:
      y = _np_conv(y, _f64(unit.conv.kernel), pad=2)
      y = _bn(unit.bn, y) if batch_norm else y + _f64(unit.conv.bias)
      y = _np_prelu(y, _f64(unit.prelu.negative_slope))
    size = y.shape[1]
    pooled = math.ceil((size - window) / 2) + 1
    high = (pooled - 1) * 2 + window - size
    y = np.pad(y, ((0, 0), (0, high), (0, high), (0, 0)), constant_values=-np.inf)
    y = sliding_window_view(y, (window, window), axis=(1, 2))[:, ::2, ::2].max(axis=(-2, -1))
  assert y.shape == (2, 4, 4, 8)
  y = y.reshape(2, -1) @ _f64(model.fc.kernel) + _f64(model.fc.bias)
  y = _np_prelu(y, _f64(model.prelu.negative_slope))
  np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-5)
  # The BatchNorm takes the place of the convolutions' biases.
  assert _size(model, nnx.Param) == _lenets_tally(3, 32, (4, 6, 8), batch_norm=batch_norm).params


def _snapshot(model, kind):
  return [np.array(x) for x in jax.tree.leaves(nnx.state(model, kind))]


@pytest.mark.parametrize("key", ["iresnet", "mobilefacenet", "vit"])
def test_train_and_eval_modes(key):
  model, images = _small(key)
  running = _snapshot(model, nnx.BatchStat)
  train1 = _run(model, images)
  train2 = _run(model, images)
  updated = _snapshot(model, nnx.BatchStat)
  assert all(not np.allclose(a, b) for a, b in zip(running, updated))
  if key == "mobilefacenet":  # No randomness: batch statistics only.
    np.testing.assert_allclose(train1, train2, rtol=1e-5, atol=1e-5)
  else:  # Dropout / drop path and token masking draw new masks on every call.
    assert not np.allclose(train1, train2)
  # With batch statistics, the last BatchNorm centres every embedding coordinate on its bias.
  np.testing.assert_allclose(train1.mean(axis=0), _f64(model.features.bias), atol=1e-4)

  eval_view = nnx.view(
      model, use_running_average=True, deterministic=True, raise_if_not_found=False)
  model.eval()
  eval1 = _run(model, images)
  eval2 = _run(model, images)
  np.testing.assert_array_equal(eval1, eval2)
  np.testing.assert_array_equal(_run(eval_view, images), eval1)
  assert not np.allclose(eval1, train1)
  for before, after in zip(updated, _snapshot(model, nnx.BatchStat)):
    np.testing.assert_array_equal(before, after)
  model.train()
  assert not np.allclose(_run(model, images), eval1)


@pytest.mark.parametrize("key", ["iresnet", "small_cnn", "vit"])
def test_training_step_gradients(key):
  """One step as the training loop takes it: ``nnx.split`` + ``jax.jit(jax.grad)``."""
  model, images = _small(key)
  target = jnp.asarray(np.random.default_rng(2).normal(size=(images.shape[0], 8)), jnp.float32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest):
    model = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables in this trace
    embeddings = model(images)
    unit = embeddings / jnp.linalg.norm(embeddings, axis=1, keepdims=True)
    return -jnp.mean(jnp.sum(unit * target, axis=1)), nnx.state(model, nnx.Not(nnx.Param))

  (loss, new_rest), grads = _jit(jax.value_and_grad(loss_fn, has_aux=True))(params, rest)
  assert np.isfinite(loss)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  grads, old, new = (dict(nnx.to_flat_state(s)) for s in (grads, rest, new_rest))
  first_kernel = {"iresnet": ("conv1", "kernel"), "small_cnn": ("units", 0, "conv", "kernel"),
                  "vit": ("patch_embed", "kernel")}[key]
  assert np.abs(grads[first_kernel][...]).max() > 0
  if key == "vit":  # Half of the tokens are masked in training: the mask token learns.
    assert np.abs(grads[("masking", "mask_token")][...]).max() > 0
  if key == "iresnet":  # The step moved the running statistics and drew a dropout key.
    assert not np.allclose(old[("bn1", "mean")][...], new[("bn1", "mean")][...])
    count = ("dropout", "rngs", "count")
    assert int(new[count][...]) == int(old[count][...]) + 1


@pytest.mark.parametrize("key", sorted(SMALL))
def test_training_step_with_the_batch_split_over_explicit_mesh_axes(key):
  """Data parallel as the training loop runs it (``jax.make_mesh``'s Explicit axes, the batch
  split over 4 devices, the variables on each): the same loss, gradients and updated statistics
  and RNG counts as on one device. Batch statistics, dropout, drop path and token masking must
  draw and reduce over the whole batch."""
  model, images = _small(key)
  images = jnp.concatenate([images, -images])  # 8 examples, 2 per device
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest, images):
    model = nnx.merge(graphdef, params, rest, copy=True)
    return jnp.mean(jnp.square(model(images))), nnx.state(model, nnx.Not(nnx.Param))

  step = _jit(jax.value_and_grad(loss_fn, has_aux=True))
  one = step(params, rest, images)
  mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:4])
  with jax.set_mesh(mesh):
    split = jax.device_put(images, jax.P("batch"))
    four = step(*jax.device_put((params, rest), jax.P()), split)
  assert split.sharding.spec[0] == "batch"
  as_numbers = lambda a: (jax.random.key_data(a)
                          if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      as_numbers(a), as_numbers(b), rtol=1e-5, atol=1e-6), one, four)


@pytest.mark.parametrize("key", ["iresnet", "mobilefacenet", "vit"])
def test_bfloat16_compute(key):
  model, images = _small(key)
  half, _ = _small(key, dtype=jnp.bfloat16)
  for x in jax.tree.leaves(nnx.state(half, nnx.Param)):
    assert x.dtype == jnp.float32
  graphdef, state = nnx.split(nnx.view(
      half, use_running_average=True, deterministic=True, raise_if_not_found=False))
  jaxpr = str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, images))
  products = [line for line in jaxpr.splitlines()
              if "conv_general_dilated[" in line or "dot_general[" in line]
  assert any(line.split("=")[0].count("bf16[") for line in products)
  if key == "vit":  # Training mode too: drop path and token masking on bfloat16 activations.
    assert np.isfinite(_run(half, images)).all()
  model.eval()
  half.eval()
  full, reduced = _run(model, images), _run(half, images)
  assert reduced.dtype == np.float32
  cosine = np.sum(full * reduced, axis=1) / (
      np.linalg.norm(full, axis=1) * np.linalg.norm(reduced, axis=1))
  assert cosine.min() > 0.99, cosine


def test_vit_bfloat16_keeps_the_residual_stream_in_float32():
  # insightface autocasts only the blocks' linear layers: the patch embedding, the position
  # embedding and every residual sum stay float32, the branches' outputs are added to them.
  model, images = _small("vit", dtype=jnp.bfloat16)
  model.eval()
  graphdef, state = nnx.split(model)
  jaxpr = str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, images))
  convs = [line.split("=")[0] for line in jaxpr.splitlines() if "conv_general_dilated[" in line]
  assert convs and all("f32[" in out for out in convs), convs
  block = model.blocks[0]
  tokens = jax.ShapeDtypeStruct((2, 5, block.norm1.num_features), jnp.float32)
  assert nnx.eval_shape(lambda b, x: b(x), block, tokens).dtype == jnp.float32


def test_vit_remat_gives_the_same_outputs_and_gradients():
  # Training mode: drop path and token masking draw the same randomness with or without remat.
  def value_grads_and_jaxpr(**overrides):
    model, images = _small("vit", drop_path_rate=0.5, **overrides)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest):
      return jnp.sum(nnx.merge(graphdef, params, rest, copy=True)(images) ** 2)

    return (*_jit(jax.value_and_grad(loss))(params, rest),
            str(jax.make_jaxpr(jax.grad(loss))(params, rest)))

  value, grads, jaxpr = value_grads_and_jaxpr()
  remat_value, remat_grads, remat_jaxpr = value_grads_and_jaxpr(remat=True)
  assert remat_jaxpr.count("remat2[") == 2 and "remat" not in jaxpr  # one per block
  np.testing.assert_allclose(remat_value, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               remat_grads, grads)
  assert models.create("vit_b", rngs=nnx.Rngs(0), depth=1).remat


@pytest.mark.parametrize("name, kept, drop_path", [
    ("vit_t", 129, 0.1), ("vit_s", 129, 0.1), ("vit_b", 129, 0.1), ("vit_l", 129, 0.05)])
def test_vit_presets_mask_and_drop_as_insightface(name, kept, drop_path):
  # insightface masks int(144 * (1 - 0.1)) = 129 of the 144 tokens in training for every preset:
  # vit_l_dp005_mask_005 sets mask_ratio=0.05, but forward_features calls random_masking(x)
  # without it, so its default 0.1 applies. Drop path grows linearly from 0 to the preset's rate.
  model = _abstract(name)
  tokens = jax.ShapeDtypeStruct((2, 144, model.pos_embed.shape[1]), jnp.float32)
  out, _ = nnx.eval_shape(lambda m, x: m.keep(x), model.masking, tokens)
  assert out.shape[1] == kept
  rates = [block.drop_path.rate for block in model.blocks]
  np.testing.assert_allclose(rates, np.linspace(0, drop_path, len(rates)))


def test_vit_token_masking_matches_numpy():
  masking = _concrete(lambda: vit.TokenMasking(3, mask_ratio=0.4, rngs=_rngs()))
  tokens = _images((5, 6, 3))
  kept, restore_ids = masking.keep(tokens)
  restored = np.asarray(masking.restore(kept, restore_ids))
  assert kept.shape == (5, 3, 3)  # int(6 * 0.6) = 3 tokens go through the encoder
  mask_token = np.asarray(masking.mask_token[...])
  orders = set()
  for sample in range(5):
    is_kept = np.all(restored[sample] == np.asarray(tokens[sample]), axis=1)
    is_mask = np.all(restored[sample] == mask_token, axis=1)
    assert is_kept.sum() == 3 and is_mask.sum() == 3 and np.all(is_kept | is_mask)
    np.testing.assert_array_equal(np.asarray(kept[sample]), np.asarray(tokens[sample])[is_kept]
                                  [np.argsort(np.asarray(restore_ids[sample])[is_kept])])
    orders.add(tuple(is_kept))
  assert len(orders) > 1  # a fresh draw per sample


def test_initializers():
  block = iresnet.IBasicBlock(64, 64, rngs=nnx.Rngs(0))
  assert block.downsample is None
  assert abs(np.std(block.conv1.kernel[...]) - 0.1) < 0.005  # insightface: N(0, 0.1^2)
  np.testing.assert_array_equal(block.prelu.negative_slope[...], np.full(64, 0.25, np.float32))
  for variable, value in ((block.bn1.scale, 1), (block.bn1.bias, 0), (block.bn1.mean, 0),
                          (block.bn1.var, 1)):
    np.testing.assert_array_equal(variable[...], np.full(64, value, np.float32))


def _initialised(make):
  """``make()`` with its own initialisers, run as one jitted program."""
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  return nnx.merge(graphdef, _jit(lambda: nnx.state(make()))())


def _assert_drawn(name, values, std, bound=None):
  """``values`` look drawn with mean 0 and standard deviation ``std`` (within 5 standard errors),
  and within ``[-bound, bound]``."""
  values = np.asarray(values, np.float64).ravel()
  assert abs(values.std() / std - 1) < 5 / math.sqrt(2 * values.size), (name, values.std(), std)
  assert abs(values.mean()) < 5 * std / math.sqrt(values.size), (name, values.mean(), std)
  if bound is not None:
    assert np.abs(values).max() <= bound, (name, np.abs(values).max(), bound)


def _assert_uniform(name, values, bound):
  _assert_drawn(name, values, bound / math.sqrt(3), bound)


@pytest.mark.parametrize("key", ["iresnet", "mobilefacenet", "vit", "small_cnn"])
def test_every_layer_starts_as_in_insightface(key):
  # Kernels: IResNet's convs N(0, 0.1^2), its fc PyTorch's default U(+-1/sqrt(fan_in));
  # MobileFaceNet's convs and Linear kaiming_normal_(mode='fan_out', nonlinearity='relu'), i.e.
  # N(0, 2 / fan_out) with PyTorch's fan_out = out channels x kernel area, groups or not; ViT's
  # Linear weights, position embedding and mask token N(0, 0.02^2), its patch Conv2d PyTorch's
  # default; LeNets++ Caffe's xavier filler U(+-sqrt(3 / fan_in)). Biases 0, PReLU slopes 0.25,
  # normalisation layers the identity.
  make = {
      "iresnet": lambda: iresnet.IResNet(
          (1, 1, 1, 1), embedding_dim=64, input_size=16, rngs=nnx.Rngs(0)),
      "mobilefacenet": lambda: mobilefacenet.MobileFaceNet(
          blocks=(1, 1, 1, 1), embedding_dim=64, input_size=16, rngs=nnx.Rngs(0)),
      "vit": lambda: vit.VisionTransformer(
          width=32, depth=1, num_heads=2, embedding_dim=64, input_size=18, rngs=nnx.Rngs(0)),
      "small_cnn": lambda: small_cnn.SmallCNN(embedding_dim=64, rngs=nnx.Rngs(0)),
  }[key]
  model = _initialised(make)
  kernels = 0
  for path, module in nnx.iter_graph(model):
    name = "/".join(map(str, path))
    if isinstance(module, (nnx.Conv, nnx.Linear)):
      kernel = np.asarray(module.kernel[...])
      fan_in = math.prod(kernel.shape[:-1])
      if key == "iresnet" and isinstance(module, nnx.Conv):
        _assert_drawn(name, kernel, 0.1)
      elif key == "mobilefacenet":
        _assert_drawn(name, kernel, math.sqrt(2 / (kernel.size // kernel.shape[-2])))
      elif key == "vit" and isinstance(module, nnx.Linear):
        _assert_drawn(name, kernel, 0.02)
      else:  # IResNet's fc, ViT's patch embedding, LeNets++
        _assert_uniform(name, kernel, math.sqrt((3 if key == "small_cnn" else 1) / fan_in))
      if module.bias is not None:
        np.testing.assert_array_equal(module.bias[...], 0)
      kernels += 1
    elif isinstance(module, iresnet.PReLU):
      np.testing.assert_array_equal(module.negative_slope[...], 0.25)
    elif isinstance(module, (iresnet.BatchNorm, nnx.LayerNorm)):
      for attr, value in (("scale", 1), ("bias", 0), ("mean", 0), ("var", 1)):
        if getattr(module, attr, None) is not None:
          np.testing.assert_array_equal(getattr(module, attr)[...], value)
  # Stem + 4 x (2 convs + projection) + fc; 2 + 6 bottlenecks x 3 + conv_sep + GDC + Linear;
  # patch embedding + qkv, proj, fc1, fc2 + the head's two; 6 convs + fc.
  assert kernels == {"iresnet": 14, "mobilefacenet": 23, "vit": 7, "small_cnn": 7}[key]
  if key == "vit":
    _assert_drawn("pos_embed", model.pos_embed[...], 0.02)
    _assert_drawn("mask_token", model.masking.mask_token[...], 0.02)


def test_create_passes_arguments_and_presets():
  model = nnx.eval_shape(lambda: models.create("vit_s", depth=2, rngs=nnx.Rngs(0)))
  assert len(model.blocks) == 2 and model.pos_embed.shape == (144, 512)
  assert _abstract("mobilefacenet_large").layers[0].conv.kernel.shape == (3, 3, 3, 256)
  model = nnx.eval_shape(lambda: models.create("small_cnn", embedding_dim=3, rngs=nnx.Rngs(0)))
  assert model.fc.kernel.shape == (3 * 3 * 128, 3)


@pytest.mark.parametrize("name, head", [("iresnet18", 1e-5), ("mobilefacenet", 1e-5),
                                        ("vit_t", 2e-5)])
def test_normalisation_epsilons_are_insightfaces(name, head):
  # PyTorch's 1e-5 for BatchNorm and LayerNorm; 2e-5 in the ViT's feature head (BatchNorm1d(...,
  # eps=2e-5)). With running variances near 1, as in the tests' models, a wrong one changes
  # outputs by about 1e-5, inside every tolerance.
  model = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0)))
  epsilons = {"/".join(map(str, path)): module.epsilon for path, module in nnx.iter_graph(model)
              if isinstance(module, (iresnet.BatchNorm, nnx.LayerNorm))}
  assert epsilons and all(epsilon == (head if path in ("bn1", "features") else 1e-5)
                          for path, epsilon in epsilons.items()), epsilons


@pytest.mark.parametrize("make, error, match", [
    (lambda r: models.create("resnet50", rngs=r), ValueError, "iresnet50.*vit_b"),
    (lambda r: models.create("iresnet50", depth=3, rngs=r), TypeError, "depth"),
    (lambda r: models.create("iresnet50", embedding_dim=0, rngs=r), ValueError, "embedding_dim"),
    (lambda r: models.create("iresnet50", dropout=1.0, rngs=r), ValueError, "dropout"),
    (lambda r: models.create("iresnet50", dtype=jnp.int32, rngs=r), TypeError, "dtype"),
    (lambda r: models.create("iresnet50", input_size=(112,), rngs=r), ValueError, "input_size"),
    (lambda r: iresnet.IResNet((2, 2, 2), rngs=r), ValueError, "layers"),
    (lambda r: models.create("mobilefacenet", blocks=(1, 4, 6), rngs=r), ValueError, "blocks"),
    (lambda r: models.create("small_cnn", input_size=4, rngs=r), ValueError, "too small"),
    (lambda r: models.create("small_cnn", widths=(8, 8), rngs=r), ValueError, "widths"),
    (lambda r: models.create("small_cnn", widths=(8, True, 8), rngs=r), ValueError, "widths"),
    (lambda r: models.create("vit_t", num_heads=3, rngs=r), ValueError, "num_heads"),
    (lambda r: models.create("vit_t", input_size=8, rngs=r), ValueError, "patch_size"),
    (lambda r: models.create("vit_t", mask_ratio=1.0, rngs=r), ValueError, "mask_ratio"),
    (lambda r: models.create("vit_t", input_size=9, mask_ratio=0.5, rngs=r), ValueError,
     "all 1 tokens"),
])
def test_bad_arguments(make, error, match):
  with pytest.raises(error, match=match):
    nnx.eval_shape(lambda: make(nnx.Rngs(0)))


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet", "small_cnn", "vit_t"])
def test_sizes_are_any_integer_and_only_integers(name):
  # As everywhere in the package: a NumPy integer is an integer; a float is the wrong type.
  def embed():
    model = models.create(name, embedding_dim=np.int64(8), rngs=nnx.Rngs(0))
    return model(jnp.zeros((2, *model.input_size, model.in_channels)))

  assert jax.eval_shape(embed).shape == (2, 8)
  with pytest.raises(TypeError, match="`embedding_dim` must be an integer"):
    models.create(name, embedding_dim=8.0, rngs=nnx.Rngs(0))
  # Sizes too (they were refused with "not iterable", or a bool taken as 1).
  size = {"vit_t": 36}.get(name, 32)
  for input_size, want in ((np.int64(size), (size, size)), (np.array([size, size + 4]),
                                                             (size, size + 4))):
    model = nnx.eval_shape(lambda s=input_size: models.create(name, input_size=s,
                                                               rngs=nnx.Rngs(0)))
    assert model.input_size == want and all(type(n) is int for n in model.input_size)
  with pytest.raises(ValueError, match="`input_size` must be a positive int or"):
    models.create(name, input_size=True, rngs=nnx.Rngs(0))


def test_stage_counts_are_any_integers():
  model = nnx.eval_shape(lambda: iresnet.IResNet(np.array([1, 2, 1, 1]), input_size=32,
                                                 rngs=nnx.Rngs(0)))
  assert len(model.blocks) == 5
  small = nnx.eval_shape(lambda: models.create("mobilefacenet", blocks=(1, 2, 1, 1),
                                               rngs=nnx.Rngs(0)))
  model = nnx.eval_shape(lambda: models.create("mobilefacenet", blocks=np.array([1, 2, 1, 1]),
                                               rngs=nnx.Rngs(0)))
  assert nnx.graphdef(model) == nnx.graphdef(small)
  with pytest.raises(ValueError, match=r"`layers` must be four positive ints \(blocks per stage"):
    iresnet.IResNet((2, 2, True, 2), rngs=nnx.Rngs(0))
  widths = nnx.eval_shape(lambda: models.create("small_cnn", widths=np.array([4, 6, 8]),
                                                rngs=nnx.Rngs(0)))
  assert [unit.conv.out_features for unit in widths.units][::2] == [4, 6, 8]


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_a_batch_of_one_in_training_mode_is_refused(name):
  # Its batch statistics made every image's embedding the features BatchNorm's bias.
  model = nnx.eval_shape(lambda: models.create(name, input_size=32, rngs=nnx.Rngs(0)))
  image = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  with pytest.raises(ValueError, match=r"a batch of one example in training mode.*model.eval\(\)"):
    nnx.eval_shape(lambda m, x: m(x), model, image)
  model.eval()
  assert nnx.eval_shape(lambda m, x: m(x), model, image).shape == (1, 512)


def test_check_int_gives_an_int_and_refuses_a_bool():
  # True would pass as a size of 1; a NumPy integer comes back a Python int.
  value = check_int(np.int64(3), "depth", minimum=1)
  assert value == 3 and type(value) is int
  with pytest.raises(TypeError, match="`depth` must be an integer, got a bool"):
    check_int(True, "depth", minimum=1)


@pytest.mark.parametrize("images, error, match", [
    (jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32), ValueError, r"\[batch, 28, 28, 1\]"),
    (jax.ShapeDtypeStruct((2, 28, 28, 3), jnp.float32), ValueError, "images"),
    (jax.ShapeDtypeStruct((28, 28, 1), jnp.float32), ValueError, "rank 4"),
    (jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.uint8), TypeError, "floating"),
])
def test_bad_images(images, error, match):
  with pytest.raises(error, match=match):
    nnx.eval_shape(lambda m, x: m(x), _abstract("small_cnn"), images)
