r"""The margin-softmax loss zoo, one function per paper, on one device.

Each function is a :class:`~margins.Margin` run by the dense engine: per-example losses ``[B]``,
hyperparameters keyword-only with the papers' defaults. For millions of classes, the same margin
runs on the chunked, sharded and sampled engines of :mod:`margins.parallel`.

Shapes everywhere: ``embeddings [B, D]``, ``weights [C, D]`` (one row per class, as insightface
stores them), integer ``labels [B]``. Losses are computed in float32 (or float64 when the inputs
are) whatever the input dtype.
"""

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from margins import parallel
from margins.losses import _common
from margins.losses import margin as margin_lib

Array = jax.Array


def _dense_loss(embeddings, weights, labels, margin, *, subcentres=False):
  """The dense engine's ``(losses, margin)``; ``weights [C, D]``, or ``[C, K, D]`` with
  ``subcentres``."""
  if not subcentres and np.ndim(weights) == 3:
    raise ValueError(f"`weights` must be [C, D], got shape {np.shape(weights)}: sub-centres "
                     "[C, K, D] go to subcenter_arcface_loss, or any margin through an engine "
                     "(margins.dense() ...).")
  return parallel.dense()(embeddings, weights, labels, margin)


def softmax_loss(embeddings: Array, weights: Array, labels: Array, *,
                 bias: Array | None = None) -> Array:
  r"""Softmax cross-entropy on the logits :math:`W_j \cdot x + b_j`.

  .. math:: \ell = -\log \frac{e^{W_y \cdot x + b_y}}{\sum_j e^{W_j \cdot x + b_j}}

  Args:
    embeddings: ``[B, D]``.
    weights: ``[C, D]``.
    labels: ``[B]`` integers in ``[0, C)``.
    bias: optional ``[C]``.

  Returns:
    ``[B]`` losses.

  >>> import jax.numpy as jnp, margins
  >>> x, w = jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 0.0], [0.0, 1.0]])
  >>> float(margins.softmax_loss(x, w, jnp.array([0]))[0])  # log(1 + e^-1)
  0.3132...

  References:
    The softmax loss of every classifier; see NormFace (Wang et al., 2017) for its geometry.
  """
  if bias is not None:
    _common.check_floating("bias", bias, 1)
    if np.shape(bias)[0] != np.shape(weights)[0]:
      raise ValueError(f"`bias` has {np.shape(bias)[0]} entries but `weights` has "
                       f"{np.shape(weights)[0]} classes.")
    _common.check_classification_inputs(embeddings, weights, labels)
    # x.W_j + b_j is the dot product of [x, 1] and [W_j, b_j] (D whole on each device).
    embeddings, weights = _common.whole_rows(embeddings), _common.whole_rows(weights)
    embeddings = jnp.concatenate([embeddings, jnp.ones_like(embeddings[:, :1])], axis=1)
    dtype = _common.common_float_dtype(weights, bias)  # A float32 bias is not rounded to 16 bits.
    weights = jnp.concatenate([weights.astype(dtype), bias[:, None].astype(dtype)], axis=1)
  return _dense_loss(embeddings, weights, labels, margin_lib.Softmax())[0]


def normface_loss(embeddings: Array, weights: Array, labels: Array, *,
                  scale: float = 16.0) -> Array:
  r"""NormFace: softmax on scaled cosines, :math:`\ell = -\log\frac{e^{s\cos\theta_y}}{\sum_j e^{s\cos\theta_j}}`.

  Args:
    embeddings: ``[B, D]``; weights: ``[C, D]``; labels: ``[B]``.
    scale: ``s``.

  Returns:
    ``[B]`` losses.

  >>> import jax.numpy as jnp, margins
  >>> x, w = jnp.array([[2.0, 0.0]]), jnp.array([[1.0, 0.0], [0.0, 3.0]])
  >>> float(margins.normface_loss(x, w, jnp.array([0]), scale=1.0)[0])  # log(1 + e^-1)
  0.3132...

  References:
    Wang et al., "NormFace: L2 Hypersphere Embedding for Face Verification", ACM MM 2017.
  """
  return _dense_loss(embeddings, weights, labels, margin_lib.NormFace(scale=scale))[0]


def lsoftmax_loss(embeddings: Array, weights: Array, labels: Array, *, margin: int = 4,
                  annealing: float | Array = 0.0) -> Array:
  r"""L-Softmax: the target logit :math:`|W_y||x|\psi(\theta_y)`, others :math:`W_j \cdot x`.

  .. math::
      \psi(\theta) = (-1)^k\cos(m\theta) - 2k,\quad \theta\in[k\pi/m, (k+1)\pi/m]

  With ``annealing`` :math:`\lambda > 0` the target is
  :math:`|W_y||x|(\lambda\cos\theta_y + \psi(\theta_y))/(1 + \lambda)`.

  Args:
    embeddings: ``[B, D]``; weights: ``[C, D]``; labels: ``[B]``.
    margin: integer ``m >= 1`` (1 is plain softmax without bias).
    annealing: ``lambda``.

  Returns:
    ``[B]`` losses.

  >>> import jax.numpy as jnp, margins
  >>> x, w = jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 0.0], [0.0, 1.0]])
  >>> float(margins.lsoftmax_loss(x, w, jnp.array([0]), margin=2)[0])  # theta = 0: psi = 1
  0.3132...

  References:
    Liu et al., "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML 2016.
  """
  loss_margin = margin_lib.LSoftmax(margin=margin, annealing=annealing)
  return _dense_loss(embeddings, weights, labels, loss_margin)[0]


def sphereface_loss(embeddings: Array, weights: Array, labels: Array, *, margin: int = 4,
                    scale: float | None = None, annealing: float | Array = 0.0) -> Array:
  r"""A-Softmax (SphereFace): normalised ``W``, target :math:`|x|\psi(\theta_y)`, others :math:`|x|\cos\theta_j`.

  SphereFace only trains with its annealing: pass ``annealing=margins.sphereface_lambda(step)``,
  which makes the target :math:`|x|(\lambda\cos\theta_y + \psi(\theta_y))/(1 + \lambda)`. With
  ``scale`` set, ``x`` is normalised too and ``scale`` replaces :math:`|x|` (the form SphereFace-R
  builds on; :func:`spherefacer_loss` is the authors' version).

  Args:
    embeddings: ``[B, D]``; weights: ``[C, D]``; labels: ``[B]``.
    margin: integer ``m >= 1``.
    scale: ``None`` (use ``|x|``) or ``s``.
    annealing: ``lambda``.

  Returns:
    ``[B]`` losses.

  >>> import jax.numpy as jnp, margins
  >>> x, w = jnp.array([[1.0, 0.0]]), jnp.array([[2.0, 0.0], [0.0, 2.0]])
  >>> float(margins.sphereface_loss(x, w, jnp.array([0]), annealing=margins.sphereface_lambda(0))[0])
  0.3132...

  References:
    Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017.
  """
  loss_margin = margin_lib.SphereFace(margin=margin, scale=scale, annealing=annealing)
  return _dense_loss(embeddings, weights, labels, loss_margin)[0]


def cosface_loss(embeddings: Array, weights: Array, labels: Array, *, scale: float = 64.0,
                 margin: float = 0.35) -> Array:
  r"""CosFace / AM-Softmax: target logit :math:`s(\cos\theta_y - m)`, others :math:`s\cos\theta_j`.

  Args:
    embeddings: ``[B, D]``; weights: ``[C, D]``; labels: ``[B]``.
    scale: ``s`` (64 in CosFace, 30 in AM-Softmax).
    margin: ``m``.

  Returns:
    ``[B]`` losses.

  >>> import jax.numpy as jnp, margins
  >>> x, w = jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 0.0], [0.0, 1.0]])
  >>> float(margins.cosface_loss(x, w, jnp.array([0]), scale=1.0, margin=1.0)[0])  # log 2
  0.6931...

  References:
    Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018;
    Wang et al., "Additive Margin Softmax for Face Verification", IEEE SPL 2018.
  """
  return _dense_loss(embeddings, weights, labels,
                     margin_lib.CosFace(scale=scale, margin=margin))[0]


def arcface_loss(embeddings: Array, weights: Array, labels: Array, *, scale: float = 64.0,
                 margin: float = 0.5, easy_margin: bool = False,
                 detach_margin: bool = False) -> Array:
  r"""ArcFace: target logit :math:`s\cos(\theta_y + m)`, others :math:`s\cos\theta_j`.

  Past :math:`\theta_y > \pi - m` the target is :math:`s(\cos\theta_y - m\sin m)` (the paper's
  choice); ``easy_margin`` applies the margin only where :math:`\cos\theta_y > 0`;
  ``detach_margin`` keeps the value but takes the gradient of plain :math:`s\cos\theta_y`.

  Args:
    embeddings: ``[B, D]``; weights: ``[C, D]``; labels: ``[B]``.
    scale: ``s``.
    margin: ``m`` in radians.
    easy_margin: see above.
    detach_margin: see above.

  Returns:
    ``[B]`` losses.

  >>> import jax.numpy as jnp, margins
  >>> x, w = jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 0.0], [-1.0, 0.0]])
  >>> float(margins.arcface_loss(x, w, jnp.array([0]), scale=1.0, margin=jnp.pi / 2)[0])  # log(1 + e^-1)
  0.3132...

  References:
    Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019.
  """
  loss_margin = margin_lib.ArcFace(scale=scale, margin=margin, easy_margin=easy_margin,
                                   detach_margin=detach_margin)
  return _dense_loss(embeddings, weights, labels, loss_margin)[0]


def combined_margin_loss(embeddings: Array, weights: Array, labels: Array, *,
                         scale: float = 64.0, m1: float = 1.0, m2: float = 0.3,
                         m3: float = 0.2) -> Array:
  r"""The combined margin: target logit :math:`s(\cos(m_1\theta_y + m_2) - m_3)`.

  (1, 0.5, 0) is ArcFace (without its continuation), (1, 0, 0.35) CosFace, (1.35, 0, 0) a
  SphereFace-like margin. Past :math:`m_1\theta + m_2 = \pi` it continues monotonically (see
  :class:`~margins.CombinedMargin`).

  Args:
    embeddings: ``[B, D]``; weights: ``[C, D]``; labels: ``[B]``.
    scale: ``s``; m1, m2, m3: the three margins.

  Returns:
    ``[B]`` losses.

  >>> import jax.numpy as jnp, margins
  >>> x, w = jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 0.0], [0.0, 1.0]])
  >>> float(margins.combined_margin_loss(x, w, jnp.array([0]), scale=1.0, m2=0.0, m3=1.0)[0])
  0.6931...

  References:
    Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019.
  """
  loss_margin = margin_lib.CombinedMargin(scale=scale, m1=m1, m2=m2, m3=m3)
  return _dense_loss(embeddings, weights, labels, loss_margin)[0]


def subcenter_arcface_loss(embeddings: Array, weights: Array, labels: Array, *,
                           scale: float = 64.0, margin: float = 0.5) -> Array:
  r"""Sub-center ArcFace: ArcFace on :math:`\max_k \cos\theta_{j,k}` over ``K`` sub-centres.

  Args:
    embeddings: ``[B, D]``.
    weights: ``[C, K, D]`` (K = 3 in the paper).
    labels: ``[B]``.
    scale: ``s``; margin: ``m``.

  Returns:
    ``[B]`` losses.

  >>> import jax.numpy as jnp, margins
  >>> x = jnp.array([[1.0, 0.0]])
  >>> w = jnp.array([[[0.0, 1.0], [1.0, 0.0]], [[-1.0, 0.0], [-1.0, 0.0]]])
  >>> float(margins.subcenter_arcface_loss(x, w, jnp.array([0]), scale=1.0, margin=jnp.pi / 2)[0])
  0.3132...

  References:
    Deng et al., "Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy Web
    Faces", ECCV 2020.
  """
  _common.check_floating("weights", weights, 3)
  return _dense_loss(embeddings, weights, labels,
                     margin_lib.ArcFace(scale=scale, margin=margin), subcentres=True)[0]


def curricularface_loss(embeddings: Array, weights: Array, labels: Array,
                        t: Array | float = 0.0, *, scale: float = 64.0, margin: float = 0.5,
                        momentum: float = 0.01) -> tuple[Array, Array]:
  r"""CurricularFace: ArcFace's target, hard negatives weighted by a learned curriculum ``t``.

  Negatives with :math:`\cos\theta_j > \cos(\theta_y + m)` get the logit
  :math:`s\cos\theta_j(t + \cos\theta_j)`; ``t`` is first updated with this batch,
  :math:`t \leftarrow 0.01\,\overline{\cos\theta_y} + 0.99\,t`.

  Args:
    embeddings: ``[B, D]``; weights: ``[C, D]``; labels: ``[B]``.
    t: the curriculum state (starts at 0).
    scale: ``s``; margin: ``m``; momentum: the weight of the batch mean in the update.

  Returns:
    ``(losses [B], new t)``.

  >>> import jax.numpy as jnp, margins
  >>> x, w = jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 0.0], [0.0, 1.0]])
  >>> loss, t = margins.curricularface_loss(x, w, jnp.array([0]))
  >>> round(float(t), 4)  # 0.01 * cos(0)
  0.01

  References:
    Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face
    Recognition", CVPR 2020.
  """
  loss_margin = margin_lib.CurricularFace(scale=scale, margin=margin, t=t, momentum=momentum)
  losses, prepared = _dense_loss(embeddings, weights, labels, loss_margin)
  return losses, prepared.t


def mv_softmax_loss(embeddings: Array, weights: Array, labels: Array, *, scale: float = 32.0,
                    margin: float = 0.35, t: float = 0.2, kind: str = "cos",
                    adaptive: bool = True, easy_margin: bool = True) -> Array:
  r"""MV-Softmax: CosFace's or ArcFace's target, mis-classified negatives emphasised.

  A negative with :math:`\cos\theta_j` above the margined target (:math:`\cos\theta_y - m` for
  ``kind='cos'``, :math:`\cos(\theta_y + m)` for ``'arc'``) gets the logit
  :math:`s((1 + t)\cos\theta_j + t)` (``adaptive``; else :math:`s(\cos\theta_j + t)`). Defaults
  are the authors' code's (MV-AM-Softmax, with ``easy_margin``); see :class:`~margins.MVSoftmax`.
  For MV-Arc-Softmax use ``kind='arc', margin=0.5``.

  Args:
    embeddings: ``[B, D]``; weights: ``[C, D]``; labels: ``[B]``.
    scale: ``s``; margin: ``m``; t: the weight of mis-classified negatives; kind: ``'cos'`` or
      ``'arc'``; adaptive, easy_margin: see above.

  Returns:
    ``[B]`` losses.

  >>> import jax.numpy as jnp, margins
  >>> x, w = jnp.array([[1.0, 0.0]]), jnp.array([[0.8, 0.6], [1.0, 0.0]])
  >>> loss = margins.mv_softmax_loss(x, w, jnp.array([0]), scale=1.0)
  >>> float(loss[0])  # 1 > 0.8 - 0.35: logits 0.45 and 1.2 + 0.2: log(1 + e^0.95)
  1.2769...

  References:
    Wang et al., "Mis-classified Vector Guided Softmax Loss for Face Recognition", AAAI 2020.
  """
  loss_margin = margin_lib.MVSoftmax(scale=scale, margin=margin, t=t, kind=kind,
                                     adaptive=adaptive, easy_margin=easy_margin)
  return _dense_loss(embeddings, weights, labels, loss_margin)[0]


class AdaFaceState(NamedTuple):
  """AdaFace's running mean and std of the feature norms (official initial values)."""
  norm_mean: Array | float = 20.0
  norm_std: Array | float = 100.0


def adaface_loss(embeddings: Array, weights: Array, labels: Array,
                 state: AdaFaceState = AdaFaceState(), *, scale: float = 64.0,
                 margin: float = 0.4, h: float = 0.333,
                 t_alpha: float = 1.0) -> tuple[Array, AdaFaceState]:
  r"""AdaFace: an angular and additive margin set by the feature norm, a proxy of image quality.

  :math:`\hat z = \mathrm{clip}(h(|x| - \mu)/(\sigma + \epsilon), -1, 1)`, target logit
  :math:`s(\cos(\theta_y - m\hat z) - (m + m\hat z))`, where :math:`\mu, \sigma` are running
  statistics of the batch's norms (``t_alpha`` is their momentum; 1.0 uses this batch's). As in
  the official code the norms set the margin but take no gradient through it (MagFace's margin
  does pass its gradient to :math:`|x|`).

  Args:
    embeddings: ``[B, D]`` *unnormalised* (their norms carry the quality signal).
    weights: ``[C, D]``; labels: ``[B]``.
    state: :class:`AdaFaceState`.
    scale: ``s``; margin: ``m``; h: the concentration ``h``; t_alpha: momentum.

  Returns:
    ``(losses [B], new state)``.

  >>> import jax.numpy as jnp, margins
  >>> x = jnp.array([[3.0, 0.0], [0.0, 5.0]])
  >>> w = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  >>> loss, state = margins.adaface_loss(x, w, jnp.array([0, 1]))
  >>> float(state.norm_mean), round(float(state.norm_std), 4)
  (4.0, 1.4142)

  References:
    Kim et al., "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022.
  """
  if not isinstance(state, AdaFaceState):  # Not a bare tuple, list or dict: which is which?
    raise TypeError(f"`state` must be a margins.AdaFaceState(norm_mean, norm_std), got a "
                    f"{type(state).__name__}.")
  loss_margin = margin_lib.AdaFace(scale=scale, margin=margin, h=h, momentum=t_alpha,
                                   norm_mean=state.norm_mean, norm_std=state.norm_std)
  losses, prepared = _dense_loss(embeddings, weights, labels, loss_margin)
  return losses, AdaFaceState(prepared.norm_mean, prepared.norm_std)


def magface_loss(embeddings: Array, weights: Array, labels: Array, *, scale: float = 64.0,
                 lower_norm: float = 10.0, upper_norm: float = 110.0,
                 lower_margin: float = 0.45, upper_margin: float = 0.8,
                 lambda_g: float = 20.0, easy_margin: bool = True) -> Array:
  r"""MagFace: ArcFace with the margin :math:`m(a)` growing with :math:`a = |x|`, plus :math:`\lambda_g g(a)`.

  :math:`a` is clipped to :math:`[l_a, u_a]`;
  :math:`m(a) = l_m + (u_m - l_m)(a - l_a)/(u_a - l_a)`; :math:`g(a) = 1/a + a/u_a^2`. The margin
  applies where :math:`\cos\theta > 0` (``easy_margin``, as the authors' code trains); with
  ``easy_margin=False`` it continues as ArcFace past :math:`\pi - m`.

  Args:
    embeddings: ``[B, D]`` unnormalised; weights: ``[C, D]``; labels: ``[B]``.
    scale: ``s``; lower_norm, upper_norm: ``l_a, u_a``; lower_margin, upper_margin:
      ``l_m, u_m``; lambda_g: weight of the regulariser; easy_margin: see above.

  Returns:
    ``[B]`` losses (cross-entropy + :math:`\lambda_g g(a)`).

  >>> import jax.numpy as jnp, margins
  >>> x, w = jnp.array([[10.0, 0.0]]), jnp.array([[1.0, 0.0], [-1.0, 0.0]])
  >>> round(float(margins.magface_loss(x, w, jnp.array([0]), lambda_g=1.0)[0]), 4)  # 1/10 + 10/110^2
  0.1008

  References:
    Meng et al., "MagFace: A Universal Representation for Face Recognition and Quality
    Assessment", CVPR 2021.
  """
  loss_margin = margin_lib.MagFace(
      scale=scale, lower_norm=lower_norm, upper_norm=upper_norm, lower_margin=lower_margin,
      upper_margin=upper_margin, lambda_g=lambda_g, easy_margin=easy_margin)
  return _dense_loss(embeddings, weights, labels, loss_margin)[0]


def elasticface_loss(embeddings: Array, weights: Array, labels: Array, key: Array, *,
                     scale: float = 64.0, margin: float = 0.5, sigma: float = 0.0125,
                     kind: str = "arc", plus: bool = False) -> Array:
  r"""ElasticFace: ArcFace (``kind='arc'``) or CosFace (``'cos'``) with :math:`m_i \sim N(m, \sigma)` per example.

  ``plus`` (ElasticFace+) gives the larger margins to the examples farther from their centre.
  The official training config uses ``sigma=0.05``; the loss's default is 0.0125. For
  ElasticFace-Cos use ``margin=0.35``.

  Args:
    embeddings: ``[B, D]``; weights: ``[C, D]``; labels: ``[B]``.
    key: PRNG key drawing the margins (a new one each step).
    scale: ``s``; margin: mean ``m``; sigma: std; kind: ``'arc'`` or ``'cos'``; plus: see above.

  Returns:
    ``[B]`` losses.

  >>> import jax, jax.numpy as jnp, margins
  >>> x, w = jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 0.0], [0.0, 1.0]])
  >>> loss = margins.elasticface_loss(x, w, jnp.array([0]), jax.random.key(0))
  >>> loss.shape
  (1,)

  References:
    Boutros et al., "ElasticFace: Elastic Margin Loss for Deep Face Recognition", CVPRW 2022.
  """
  loss_margin = margin_lib.ElasticFace(key=key, scale=scale, margin=margin, sigma=sigma,
                                       kind=kind, plus=plus)
  return _dense_loss(embeddings, weights, labels, loss_margin)[0]


def sphereface2_loss(embeddings: Array, weights: Array, labels: Array, bias: Array | float, *,
                     scale: float = 40.0, margin: float = 0.4, t: float = 3.0,
                     alpha: float = 0.7, kind: str = "cos") -> Array:
  r"""SphereFace2: a binary classifier per class, :math:`\frac{\lambda}{r}\log(1 + e^{-f_y}) +
  \frac{1 - \lambda}{r}\sum_{j \ne y}\log(1 + e^{f_j})` with :math:`f_j = r\,g(\cos\theta_j) \pm
  r m + b`.

  See :class:`~margins.SphereFace2` for the logits of each ``kind`` and the gradient (that of
  :math:`r\cos\theta + b`, as in the authors' code). Defaults are the paper's (SphereFace2-C);
  the authors' MS1M configuration uses ``scale=64, margin=0.5, alpha=0.8``.

  Args:
    embeddings: ``[B, D]``; weights: ``[C, D]``; labels: ``[B]``.
    bias: the learnt scalar :math:`b`; start it at :func:`~margins.sphereface2_bias`.
    scale: :math:`r`; margin: :math:`m`; t: exponent of :func:`~margins.similarity_adjustment`;
    alpha: :math:`\lambda`, the positive classifier's weight; kind: ``'cos'``, ``'arc'`` or
    ``'multiplicative'``.

  Returns:
    ``[B]`` losses.

  >>> import jax.numpy as jnp, margins
  >>> x, w = jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 0.0], [0.0, 1.0]])
  >>> loss = margins.sphereface2_loss(x, w, jnp.array([0]), 0.0, scale=1.0, margin=0.0, t=1.0)
  >>> float(loss[0])  # 0.7 log(1 + e^-1) + 0.3 log 2
  0.4272...

  References:
    Wen et al., "SphereFace2: Binary Classification is All You Need for Deep Face
    Recognition", ICLR 2022.
  """
  if isinstance(bias, numbers.Real):  # Python numbers welcome; arrays must be float scalars.
    bias = float(bias)
  else:
    _common.check_floating("bias", bias, 0)
  loss_margin = margin_lib.SphereFace2(bias=bias, scale=scale, margin=margin, t=t, alpha=alpha,
                                       kind=kind)
  return _dense_loss(embeddings, weights, labels, loss_margin)[0]


def spherefacer_loss(embeddings: Array, weights: Array, labels: Array, *, scale: float = 30.0,
                     margin: float = 1.5, kind: str = "v0") -> Array:
  r"""SphereFace-R: SphereFace's multiplicative margin on normalised features, real ``m``.

  See :class:`~margins.SphereFaceR` for the kinds (``'v0'``: SphereFace's :math:`\psi(\theta_y)`;
  ``'v1'``: :math:`\cos(\min(m\theta_y, \pi))`; ``'v2'``: others :math:`\cos(\theta_j / m)`) and
  the gradient (that of :math:`s\cos\theta`, as in the authors' code). Defaults are opensphere's;
  its VGGFace2 configuration uses ``scale=60, margin=1.4, kind='v2'``.

  Args:
    embeddings: ``[B, D]``; weights: ``[C, D]``; labels: ``[B]``.
    scale: ``s``; margin: real ``m >= 1``; kind: ``'v0'``, ``'v1'`` or ``'v2'``.

  Returns:
    ``[B]`` losses.

  >>> import jax.numpy as jnp, margins
  >>> x, w = jnp.array([[0.0, 1.0]]), jnp.array([[1.0, 0.0], [0.0, 1.0]])
  >>> loss = margins.spherefacer_loss(x, w, jnp.array([0]), scale=1.0, margin=2.0, kind="v1")
  >>> float(loss[0])  # theta = 90 deg: target cos(180 deg) = -1, other 1: log(1 + e^2)
  2.1269...

  References:
    Liu et al., "SphereFace Revived: Unifying Hyperspherical Face Recognition", TPAMI 2022.
  """
  loss_margin = margin_lib.SphereFaceR(scale=scale, margin=margin, kind=kind)
  return _dense_loss(embeddings, weights, labels, loss_margin)[0]
