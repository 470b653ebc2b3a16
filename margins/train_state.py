"""A run's state and its static parts: :class:`TrainState`, :class:`LossScale`, :class:`Experiment`.

Their own module, so that the checkpoints and the evaluation, which the training loop
(:mod:`margins.train_lib`) uses, can name them without importing the loop.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import ml_collections
import optax
from flax import struct

from margins import parallel
from margins.losses import margin as margin_lib

Array = jax.Array


class LossScale(NamedTuple):
  """float16 training's dynamic loss scale, as ``torch.cuda.amp.GradScaler``'s.

  The loss is multiplied by ``scale`` before the backward pass (so that small gradients do not
  underflow float16) and the gradients divided by it. A step whose gradients are not all finite
  changes neither the parameters nor the optimizer's state (but for its learning-rate
  schedule's step count) and halves ``scale``; ``config.loss_scale.growth_interval`` finite
  steps in a row double it.
  """
  scale: Array  # float32 []
  finite_steps: Array  # int32 []: finite steps since ``scale`` last changed


@struct.dataclass
class TrainState:
  """Everything a step changes, and all that a checkpoint holds (the data resumes by step)."""
  step: Array
  # {"backbone": nnx.State, "head": W [C', D] or [C', K, D], SphereFace2's "head_bias": []}
  params: dict[str, Any]
  model_state: Any  # the backbone's non-parameter state: batch statistics, RNG counters
  opt_state: Any
  margin: margin_lib.Margin  # carries CurricularFace's t, AdaFace's norm statistics
  centers: Array | None  # center loss's class centres, when its weight is non-zero
  loss_scale: LossScale | None = None  # float16 training's dynamic loss scale
  # float16: int32 [], the steps skipped since the run began (their gradients overflowed)
  skipped_steps: Array | None = None


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What the jitted functions close over: the static parts of a run."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  graphdef: Any  # the backbone's graph, computing in ``config.compute_dtype``
  # The same, computing in ``config.eval.compute_dtype`` as it was when the experiment was made:
  # what :func:`margins.eval_lib.embed` runs.
  eval_graphdef: Any
  engine: parallel.SoftmaxEngine
  optimizer: optax.GradientTransformation
  num_classes: int
  image_shape: tuple[int, int, int]  # [H, W, C] of the model's input

  @property
  def batch_sharding(self):
    return jax.NamedSharding(self.mesh, jax.P(tuple(self.mesh.axis_names)))
