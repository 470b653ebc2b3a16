"""Training and evaluation of an embedding network with any margin loss.

:func:`train_and_evaluate` is the whole job, called by ``train.py`` (flags only), the tests and
the notebooks. It reads top to bottom:

1. a device mesh from ``config.mesh`` (:mod:`margins.sharding`); the batch is split over all its
   devices, and with the ``sharded`` engine so are the rows of the class centres ``W``
   (model-parallel FC);
2. the data: a grain pipeline over the source named by ``config.data``;
3. the backbone (``margins.models``), the head ``W [C, D]``, the margin and the softmax engine,
   the optax optimizer; the head and the optimizer state are created already sharded (``jit``
   with ``out_shardings``), the backbone on the host's CPU and then placed on the devices;
4. orbax checkpoints (:mod:`margins.checkpoints`; saved every ``checkpoint_every`` steps and at
   the end, asynchronously): a run restarts from the latest one in ``workdir`` and continues
   exactly as if it had not stopped, the data at the batch after the restored step's (so also
   with another ``config.input.worker_count`` or number of processes); on SIGTERM (preemption)
   the loop saves the step it is in and raises :class:`margins.checkpoints.Preempted`;
5. the loop: one jitted step, a progress line, ``metrics.jsonl`` and TensorBoard events
   (:mod:`margins.run_log`);
6. evaluation (:mod:`margins.eval_lib`) every ``eval_every`` steps and at the end: closed-set
   accuracy, open-set verification (LFW protocol) and retrieval on held-out identities, ``.bin``
   verification files; at the end, plots (ROC, features on the circle or sphere) in ``workdir``.
"""

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import secrets
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from margins import checkpoints
from margins import data as data_lib
from margins import eval_lib
from margins import models
from margins import parallel
from margins import run_log
from margins import sharding as sharding_lib
from margins._checks import COMPUTE_DTYPES
from margins._checks import EVAL_COMPUTE_DTYPES
from margins.losses import _common
from margins.losses import center as center_lib
from margins.losses import margin as margin_lib
from margins.train_state import Experiment
from margins.train_state import LossScale
from margins.train_state import TrainState

Array = jax.Array

# Loss names of ``config.loss.name`` and the margin each one builds.
MARGINS = {
    "softmax": margin_lib.Softmax,
    "normface": margin_lib.NormFace,
    "lsoftmax": margin_lib.LSoftmax,
    "sphereface": margin_lib.SphereFace,
    "spherefacer": margin_lib.SphereFaceR,
    "cosface": margin_lib.CosFace,
    "arcface": margin_lib.ArcFace,
    "combined": margin_lib.CombinedMargin,
    "subcenter_arcface": margin_lib.ArcFace,
    "curricularface": margin_lib.CurricularFace,
    "mv_softmax": margin_lib.MVSoftmax,
    "adaface": margin_lib.AdaFace,
    "magface": margin_lib.MagFace,
    "elasticface": margin_lib.ElasticFace,
    "sphereface2": margin_lib.SphereFace2,
}
# Fields of ``config.loss`` read by the training loop rather than passed to the margin.
_LOOP_LOSS_FIELDS = ("name", "subcenters", "lambda_schedule")


# ---------------------------------------------------------------------------------------------
# Building blocks, from the config.
# ---------------------------------------------------------------------------------------------

def config_from_file(path: str | os.PathLike[str], arg: str | None = None
                     ) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of a config file, as ``train.py --config=<path>:<arg>`` reads it (e.g.
  ``config_from_file("configs/digits_arcface.py", "quick")``, or ``train.py``'s spelling,
  ``"configs/digits_arcface.py:quick"``)."""
  path = os.fspath(path)
  if arg is None and ":" in path and not os.path.isfile(path):
    path, arg = path.split(":", 1)  # As ml_collections: the argument may hold colons (gs://).
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No config file {path!r}.")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def default_config() -> ml_collections.ConfigDict:
  """The training loop's fields, with the digits ArcFace run's values.

  Experiment files in ``configs/`` start from this and change what differs; a field they do not
  set keeps the value here. A ``--config.<field>`` override can only change a field the config
  has: the optional ones (``loss.subcenters``, ``loss.lambda_schedule``, ``loss.bias``, each data
  source's own fields below) are there only where a config sets them (the recipes declare
  ``loss.subcenters``).
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Source and its fields: "digits" (image_size, open_set_train_classes), "synthetic"
  # (num_classes, num_images, image_shape, seed, eval_classes, eval_images), "recordio" (path,
  # image_shape, num_classes), "image_folder" (path, image_shape), "tfds" (tfds_name, split,
  # data_dir, image_shape); a face dataset's image_shape None (or left out) takes the size of its
  # `property` or first image; a RecordIO's num_classes None (or left out), `property`'s or the
  # count of its identity records.
  c.data = dict(name="digits", image_size=16, open_set_train_classes=(0, 1, 2, 3, 4, 5))
  c.batch_size = 128  # Global, over all devices and processes.
  c.micro_batches = 1  # Parts of each batch whose gradients are averaged (``train_step``).
  c.num_steps = 400
  # Training augmentation: a random crop after padding ``crop_padding`` pixels each side, a
  # left-right mirror with ``random_flip``; ``worker_count`` decoding processes (0: this one).
  c.input = dict(random_flip=False, crop_padding=2, worker_count=0)
  # LeNets++ at half the paper's widths: the 8x8 digits need no more, and it trains 6x faster.
  # ``batch_stats``: "global", BatchNorm's statistics over the global batch (synchronised), or
  # "device", each device's rows (insightface's DDP; no collective in the backbone's passes).
  c.model = dict(name="small_cnn", embedding_dim=32, batch_stats="global",
                 kwargs=dict(widths=(16, 32, 64), batch_norm=False))
  # ``name`` is a key of ``MARGINS``; the other fields are the margin's, plus ``subcenters``
  # (sub-centre ArcFace's K) and ``lambda_schedule`` (SphereFace's annealing, a dict of
  # ``sphereface_lambda``'s keywords); SphereFace2's ``bias`` is where its learnt bias starts
  # (default: ``sphereface2_bias``).
  c.loss = dict(name="arcface", scale=16.0, margin=0.5)
  c.center_loss = dict(weight=0.0, alpha=0.5)
  # ``kind``: dense, chunked or sharded (``W`` split over all the mesh's axes). With
  # ``sample_rate < 1``, ``freeze_unsampled`` updates only the sampled rows of ``W`` and their
  # optimizer state (Partial FC v1; ``train_step``); otherwise every row moves every step.
  c.engine = dict(kind="dense", chunk_size=8192, sample_rate=1.0, freeze_unsampled=False)
  c.mesh = dict(shape=(-1,), axis_names=("data",))  # -1: all the devices (``make_mesh``).
  # ``name``: "sgd" (``momentum``, ``nesterov``) or "adamw" (``b1``, ``b2``); ``grad_clip_norm``
  # clips the backbone's gradient (global norm; 0: off); the head's learning rate is
  # ``head_lr_scale`` times the backbone's and its weight decay ``head_weight_decay`` (None: the
  # same); linear warm-up over ``warmup_steps``, then polynomial decay to 0 with ``decay_power``.
  c.optimizer = dict(
      name="sgd", learning_rate=0.01, momentum=0.9, nesterov=False, weight_decay=5e-4,
      grad_clip_norm=5.0, head_lr_scale=1.0,
      head_weight_decay=ml_collections.config_dict.placeholder(float), b1=0.9, b2=0.999,
      warmup_steps=0, decay_power=2.0)
  # "float32", "bfloat16" or "float16": backbone activations and the head's matmuls. float16
  # scales the loss (``LossScale``): from ``initial`` (torch's 2**16), doubled after
  # ``growth_interval`` finite steps (insightface's GradScaler: 100), halved on an overflow.
  c.compute_dtype = "float32"
  c.loss_scale = dict(initial=2.0**16, growth_interval=100)
  c.log_every = 50
  c.checkpoint_every = 200
  c.keep_checkpoints = 2  # The latest ones kept in ``workdir/checkpoints``.
  c.eval_every = 0  # 0: only at the end.
  # ``num_pairs``: open-set verification pairs of held-out identities, half of them of one
  # identity; ``flip``: the flip test (sum of an image's and its mirror's embedding) on those
  # pairs, not for digits (``.bin`` sets are always flip-tested, as insightface's).
  # ``bins``: paths of insightface ``.bin`` verification sets, decoded once when the run starts
  # and held in memory (uint8: 450 MB for 12,000 images at 112 x 112).
  # ``compute_dtype``: the network's arithmetic when it embeds, "float32" whatever the run
  # trains in, as ``margins.evaluate`` and insightface's ``eval_ijbc.py`` (its verification
  # during training runs in the training's fp16), another, or "run": ``c.compute_dtype``.
  c.eval = dict(batch_size=256, flip=False, num_pairs=3000, bins=(), compute_dtype="float32")
  return c


def is_quick(arg: str | None) -> bool:
  """Whether a config file's argument asks for :func:`quick` (``--config <file>:quick``); any
  other argument is refused, not ignored (``:quik`` would run the full experiment)."""
  if arg not in (None, "", "quick"):
    raise ValueError(f"Unknown config argument {arg!r}: this config takes none or 'quick'.")
  return arg == "quick"


def quick(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same experiment in a short smoke run (``get_config("quick")``)."""
  config.num_steps = 20
  config.batch_size = 64
  config.log_every = 5
  config.checkpoint_every = 10
  config.eval.num_pairs = 300
  config.eval.batch_size = 128
  return config


def make_margin(loss_config: ml_collections.ConfigDict) -> margin_lib.Margin:
  """The margin named ``loss_config.name`` with the hyperparameters given beside it."""
  name = loss_config.name
  if name not in MARGINS:
    raise ValueError(f"Unknown loss {name!r} in config.loss.name; valid: {', '.join(MARGINS)}.")
  cls = MARGINS[name]
  kwargs = {k: v for k, v in loss_config.items() if k not in _LOOP_LOSS_FIELDS}
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"config.loss has field(s) {unknown} that loss {name!r} does not take; "
                     f"it takes {sorted(fields - {'key'})}.")
  schedule = loss_config.get("lambda_schedule")
  if schedule is not None:
    if "annealing" not in fields:
      raise ValueError(f"config.loss.lambda_schedule anneals the lambda of SphereFace and "
                       f"L-Softmax; loss {name!r} has none.")
    try:
      margin_lib.sphereface_lambda(0, **schedule)
    except TypeError as error:
      raise ValueError(f"config.loss.lambda_schedule: {error}") from error
  if cls is margin_lib.ElasticFace:
    kwargs["key"] = jax.random.key_data(jax.random.key(0))  # replaced every step
  if cls is margin_lib.SphereFace2:
    kwargs.setdefault("bias", 0.0)  # learnt: params["head_bias"] (see initial_head_bias)
  return cls(**kwargs)


def initial_head_bias(loss_config: ml_collections.ConfigDict, num_classes: int) -> float | None:
  """A learnt bias of the head, for SphereFace2: ``config.loss.bias`` if given, else
  :func:`~margins.sphereface2_bias`. ``None`` for the other losses."""
  margin = make_margin(loss_config)
  if not isinstance(margin, margin_lib.SphereFace2):
    return None
  if "bias" in loss_config:
    return float(loss_config.bias)
  return margin_lib.sphereface2_bias(num_classes, scale=margin.scale, margin=margin.margin,
                                     t=margin.t, alpha=margin.alpha, kind=margin.kind)


def _step_margin(margin, loss_config, step, key, params):
  """The margin for this step: SphereFace's annealed lambda, ElasticFace's draw, SphereFace2's
  learnt bias."""
  if "head_bias" in params:
    margin = dataclasses.replace(margin, bias=params["head_bias"])
  schedule = loss_config.get("lambda_schedule")
  if schedule is not None:
    margin = dataclasses.replace(margin, annealing=margin_lib.sphereface_lambda(step, **schedule))
  if isinstance(margin, margin_lib.ElasticFace):
    margin = dataclasses.replace(margin, key=jax.random.key_data(key))
  return margin


def make_engine(config: ml_collections.ConfigDict, mesh) -> parallel.SoftmaxEngine:
  """The softmax engine of ``config.engine`` (``kind``: dense, chunked or sharded)."""
  engine = config.engine
  matmul_dtype = None if config.compute_dtype == "float32" else jnp.dtype(config.compute_dtype)
  try:  # The engines' own errors name their arguments; the field is ``config.engine``'s.
    if engine.kind == "dense":
      return parallel.dense(sample_rate=engine.sample_rate, matmul_dtype=matmul_dtype)
    if engine.kind == "chunked":
      return parallel.chunked(engine.chunk_size, sample_rate=engine.sample_rate,
                              matmul_dtype=matmul_dtype)
    if engine.kind == "sharded":
      return parallel.sharded(mesh, chunk_size=engine.chunk_size,
                              sample_rate=engine.sample_rate, matmul_dtype=matmul_dtype)
  except ValueError as error:
    raise ValueError(f"config.engine: {error}") from error
  raise ValueError(f"Unknown config.engine.kind {engine.kind!r}; valid: dense, chunked, sharded.")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """insightface's schedule: linear warm-up, then polynomial decay (power
  ``config.optimizer.decay_power``, 2 in its recipes) to zero."""
  opt = config.optimizer
  warmup = opt.warmup_steps
  decay = optax.polynomial_schedule(opt.learning_rate, 0.0, power=opt.decay_power,
                                    transition_steps=max(config.num_steps - warmup, 1))
  if not warmup:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, opt.learning_rate, warmup), decay], [warmup])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD with momentum or AdamW, weight decay, backbone clipping; the head may differ.

  ``config.optimizer``: ``name`` (sgd, adamw), ``learning_rate``, ``momentum``, ``weight_decay``,
  ``grad_clip_norm`` (backbone only, as insightface; 0 or None: off), ``head_lr_scale`` and
  ``head_weight_decay`` (None: same as the backbone).
  """
  opt = config.optimizer
  if opt.grad_clip_norm is not None and opt.grad_clip_norm < 0:
    raise ValueError(f"config.optimizer.grad_clip_norm must be positive (0 or None: no clipping), "
                     f"got {opt.grad_clip_norm}: a negative norm would turn the gradient around.")
  schedule = learning_rate_schedule(config)

  def group(lr_scale, weight_decay, clip):
    lr = (lambda step: lr_scale * schedule(step)) if lr_scale != 1 else schedule
    if opt.name == "sgd":
      steps = [optax.add_decayed_weights(weight_decay),
               optax.sgd(lr, momentum=opt.momentum or None, nesterov=opt.nesterov)]
    elif opt.name == "adamw":
      steps = [optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=weight_decay)]
    else:
      raise ValueError(f"Unknown config.optimizer.name {opt.name!r}; valid: sgd, adamw.")
    return optax.chain(*([optax.clip_by_global_norm(clip)] if clip else []), *steps)

  head_decay = opt.weight_decay if opt.head_weight_decay is None else opt.head_weight_decay
  head = group(opt.head_lr_scale, head_decay, None)
  transforms = {"backbone": group(1.0, opt.weight_decay, opt.grad_clip_norm), "head": head}
  if MARGINS.get(config.loss.name) is margin_lib.SphereFace2:
    # Its learnt bias goes with the head, sampling aside (it has no rows). Only then: another
    # group would change every other run's optimizer state, and so its checkpoints.
    transforms["head_bias"] = group(opt.head_lr_scale, head_decay, None)

  def labels(params):  # Each entry of params is its own group.
    return {**{name: name for name in params},
            "backbone": jax.tree.map(lambda _: "backbone", params["backbone"])}

  return optax.multi_transform(transforms, labels)


DATA_NAMES = ("digits", "synthetic", "recordio", "image_folder", "tfds")


def check_data(data_config: ml_collections.ConfigDict) -> None:
  """Raises unless ``config.data.name`` is one of :data:`DATA_NAMES` and its folder exists."""
  if data_config.name not in DATA_NAMES:
    raise ValueError(f"Unknown config.data.name {data_config.name!r}; valid: "
                     f"{', '.join(DATA_NAMES)}.")
  if data_config.name in ("recordio", "image_folder") and not os.path.isdir(data_config.path):
    raise FileNotFoundError(f"config.data.path = {data_config.path!r} is not a folder.")
  if data_config.name == "recordio":  # An image folder given by mistake, say.
    missing = [os.path.basename(path) for path in data_lib.recordio.dataset_files(
        data_config.path) if not os.path.isfile(path)]
    if missing:
      raise FileNotFoundError(
          f"config.data.path = {data_config.path!r} has no {' or '.join(missing)}: a RecordIO "
          "dataset is a folder of train.rec, train.idx and property (python -m "
          "margins.tools.pack_recordio writes one from a folder of images).")


def make_sources(data_config: ml_collections.ConfigDict):
  """``(train source, {eval name: source})`` of ``config.data``.

  Eval sources: ``"closed"``, held-out examples of the training identities (accuracy), and
  ``"open"``, identities never seen in training (verification and retrieval). Face datasets
  (``recordio``, ``image_folder``, ``tfds``) have neither: they are evaluated on ``.bin``
  verification sets (``config.eval.bins``).
  """
  check_data(data_config)
  name = data_config.name
  if name == "digits":
    kwargs = dict(image_size=data_config.image_size,
                  open_set_train_classes=tuple(data_config.open_set_train_classes))
    return data_lib.digits("open_train", **kwargs), {
        "closed": data_lib.digits("open_val", **kwargs),
        "open": data_lib.digits("open_test", **kwargs)}
  if name == "synthetic":
    shape = tuple(data_config.image_shape)
    train = data_lib.SyntheticSource(num_classes=data_config.num_classes,
                                     num_images=data_config.num_images, image_shape=shape,
                                     seed=data_config.seed)
    held_out = data_lib.SyntheticSource(num_classes=data_config.eval_classes,
                                        num_images=data_config.eval_images, image_shape=shape,
                                        seed=data_config.seed + 1)
    return train, {"open": held_out}
  # None (or left out): the size of ``property``, or of the first image.
  shape = None if data_config.get("image_shape") is None else tuple(data_config.image_shape)
  if name == "recordio":  # ``path``: the folder of train.rec, train.idx (and property).
    return data_lib.RecordIOSource(data_config.path, image_shape=shape,
                                   num_classes=data_config.get("num_classes")), {}
  if name == "image_folder":  # ``path``: one sub-folder per identity.
    return data_lib.ImageFolderSource(data_config.path, image_shape=shape), {}
  # tfds: ``tfds_name``, ``split``, ``data_dir``: a dataset prepared locally.
  return data_lib.TfdsSource(data_config.tfds_name, split=data_config.split,
                             data_dir=data_config.data_dir, image_shape=shape), {}


# ---------------------------------------------------------------------------------------------
# State and steps.
# ---------------------------------------------------------------------------------------------


def _batch_stats(config) -> str:
  """``config.model.batch_stats``; "global" for runs written before 2026-12-07 without it."""
  return config.model.get("batch_stats", "global")


def eval_compute_dtype(config: ml_collections.ConfigDict) -> str:
  """The network's arithmetic when it embeds, ``config.eval.compute_dtype``; ``"run"`` (or no
  such field: a run's config.json written before 2026-12-07, or a config that replaced
  ``config.eval`` whole) means ``config.compute_dtype``."""
  name = config.eval.get("compute_dtype", "run")
  return config.compute_dtype if name == "run" else name


def _model_fn(config, image_shape, compute_dtype: str):
  dtype = jnp.dtype(compute_dtype)

  def build():
    model = models.create(
        config.model.name, rngs=nnx.Rngs(config.seed), embedding_dim=config.model.embedding_dim,
        input_size=tuple(image_shape[:2]), in_channels=image_shape[2], dtype=dtype,
        **config.model.kwargs)
    model.set_attributes(stats_per_device=_batch_stats(config) == "device",
                         raise_if_not_found=False)
    return model

  return build


def create_train_state(config, mesh, num_classes: int, image_shape: tuple[int, int, int], *,
                       abstract: bool = False):
  """``(experiment, state)``: the state created on the devices, already sharded.

  With ``abstract``, the state's leaves are only ``jax.ShapeDtypeStruct`` with their shardings
  (what a checkpoint is restored into), and nothing is computed.
  """
  def graphdef(model_fn):
    return nnx.split(nnx.eval_shape(model_fn), nnx.Param, ...)[0]

  model_fn = _model_fn(config, image_shape, config.compute_dtype)
  train_graphdef = graphdef(model_fn)
  eval_dtype = eval_compute_dtype(config)
  eval_graphdef = train_graphdef if eval_dtype == config.compute_dtype else graphdef(
      _model_fn(config, image_shape, eval_dtype))
  engine = make_engine(config, mesh)
  optimizer = make_optimizer(config)
  margin = make_margin(config.loss)
  rows = parallel.padded_num_classes(num_classes, engine.num_shards)
  subcenters = config.loss.get("subcenters")
  head_shape = (rows, subcenters, config.model.embedding_dim) if subcenters else (
      rows, config.model.embedding_dim)
  head_bias = initial_head_bias(config.loss, num_classes)

  def init_model():
    _, params, model_state = nnx.split(model_fn(), nnx.Param, ...)
    return params, model_state

  def init(backbone, model_state):
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    # insightface initialises the FC weight with N(0, 0.01).
    params = {"backbone": backbone, "head": 0.01 * jax.random.normal(key, head_shape)}
    if head_bias is not None:
      params["head_bias"] = jnp.asarray(head_bias, jnp.float32)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=optimizer.init(params),
                      margin=jax.tree.map(_strongly_typed, margin),
                      **_optional_fields(config, rows))

  shapes = jax.eval_shape(init, *jax.eval_shape(init_model))
  shardings = sharding_lib.state_shardings(shapes, mesh, engine)
  if abstract:
    state = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(
        leaf.shape, leaf.dtype, sharding=sharding), shapes, shardings)
  else:
    model = sharding_lib.on_host(init_model, (shardings.params["backbone"], shardings.model_state))
    state = jax.jit(init, out_shardings=shardings, donate_argnums=(0, 1))(*model)
  return Experiment(config, mesh, train_graphdef, eval_graphdef, engine, optimizer, num_classes,
                    tuple(image_shape)), state


def _strongly_typed(leaf: Any) -> Array:
  """``leaf`` as an array of its dtype without JAX's weak type, as a step returns it and a
  checkpoint restores it: a margin's Python floats would otherwise enter the first step weakly
  typed and leave it strongly typed, and the second step would compile the program again."""
  return jnp.asarray(leaf, jnp.asarray(leaf).dtype)


def _optional_fields(config, num_rows: int) -> dict[str, Any]:
  """A new run's :data:`~margins.checkpoints.OPTIONAL_FIELDS`: center loss's centres (zero, one
  row per row of ``W``: ``num_rows``) and float16's loss scale (``config.loss_scale.initial``)
  and count of skipped steps (zero), each ``None`` where ``config`` does not use it."""
  centers = loss_scale = skipped_steps = None
  if config.center_loss.weight:
    centers = jnp.zeros((num_rows, config.model.embedding_dim))
  if config.compute_dtype == "float16":
    loss_scale = LossScale(jnp.float32(config.loss_scale.initial), jnp.zeros((), jnp.int32))
    skipped_steps = jnp.zeros((), jnp.int32)
  return {"centers": centers, "loss_scale": loss_scale, "skipped_steps": skipped_steps}


def train_step(experiment: Experiment, state: TrainState, batch: Mapping[str, Array]):
  """One optimizer step on a global batch; returns the new state and the step's metrics.

  ``batch``: ``{"image": uint8 [B, H, W, C], "label": int32 [B]}`` as the pipeline yields it;
  the images are normalised (``margins.data.normalize_images``) here, on the devices.

  With ``config.micro_batches = k`` the batch ``[B, ...]`` is processed as ``k`` micro-batches
  of ``B / k`` examples one after the other (``jax.lax.scan``), as insightface's
  ``gradient_acc``: the gradients are averaged, batch statistics, the margin's state, the
  centres and Partial FC's sample move on from one micro-batch to the next, and the metrics are
  the micro-batches' means. Micro-batch ``i`` takes rows ``i, i + k, i + 2k, ...``: each device
  holds ``1 / k`` of its own rows of every micro-batch.

  With Partial FC's ``config.engine.freeze_unsampled``, one :class:`~margins.RowSample` serves
  the whole step: the loss, the gradient and the optimizer see only its rows of ``W`` (and of
  their optimizer state), which are then written back; the other rows are never read or written.
  """
  config, engine = experiment.config, experiment.engine
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 2), state.step)
  parts = config.micro_batches
  scale = None if state.loss_scale is None else state.loss_scale.scale
  params, sample = state.params, None
  if config.engine.sample_rate < 1 and config.engine.freeze_unsampled:
    # One sample for every micro-batch, from the key the engine would draw its own from (with
    # one micro-batch); the step sees (and updates) only its rows of ``W``.
    sample = engine.sample(batch["label"], num_rows=params["head"].shape[0],
                           num_classes=experiment.num_classes, key=jax.random.split(key)[1])
    params = {**params, "head": engine.take(params["head"], sample)}

  def loss_fn(params, carry, batch, key):
    model_state, margin, centers = carry
    # Independent draws: ElasticFace's margins must not decide Partial FC's sample.
    margin_key, sample_key = jax.random.split(key)
    margin = _step_margin(margin, config.loss, state.step, margin_key, params)
    labels = batch["label"]
    model = nnx.merge(experiment.graphdef, params["backbone"], model_state, copy=True)
    embeddings = model(data_lib.normalize_images(batch["image"])).astype(jnp.float32)
    losses, new_margin = engine(embeddings, params["head"], labels, margin,
                                num_classes=experiment.num_classes, key=sample_key, sample=sample)
    loss = jnp.mean(losses)
    metrics = {"softmax_loss": loss}
    if centers is not None:
      center = jnp.mean(center_lib.center_loss(embeddings, centers, labels))
      loss = loss + config.center_loss.weight * center
      metrics["center_loss"] = center
      centers = center_lib.update_centers(centers, jax.lax.stop_gradient(embeddings), labels,
                                          alpha=config.center_loss.alpha)
    _, _, model_state = nnx.split(model, nnx.Param, ...)
    metrics = dict(metrics, loss=loss,
                   embedding_norm=jnp.mean(jnp.linalg.norm(embeddings, axis=-1)))
    scaled = loss if scale is None else loss * scale
    return scaled, ((model_state, jax.tree.map(jnp.asarray, new_margin), centers), metrics)

  grad_fn = jax.grad(loss_fn, has_aux=True)
  carry = (state.model_state, state.margin, state.centers)
  if parts == 1:
    grads, (carry, metrics) = grad_fn(params, carry, batch, key)
  else:
    def micro_step(carry, inputs):
      index, micro_batch = inputs
      grads, inner = carry
      new_grads, (inner, metrics) = grad_fn(params, inner, micro_batch,
                                            jax.random.fold_in(key, index))
      return (jax.tree.map(jnp.add, grads, new_grads), inner), metrics

    micro_batches = jax.tree.map(lambda x: _micro_batches(x, parts), batch)
    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, carry), metrics = jax.lax.scan(micro_step, (zeros, carry),
                                           (jnp.arange(parts), micro_batches))
    grads = jax.tree.map(lambda g: g / parts, grads)
    metrics = jax.tree.map(jnp.mean, metrics)
  finite, loss_scale = None, state.loss_scale
  if scale is not None:
    grads = jax.tree.map(lambda g: g / scale, grads)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  if sample is None:
    updates, opt_state = experiment.optimizer.update(grads, state.opt_state, params)
    params = optax.apply_updates(params, updates)
    if finite is not None:
      params, opt_state = _unless_overflow(finite, (params, opt_state),
                                           (state.params, state.opt_state))
  else:
    # An overflow keeps the sampled rows as they were before they are put back: selecting
    # between whole ``[C, D]`` arrays would hold a copy of ``W`` and of its state.
    params, opt_state = update_sampled_rows(experiment.optimizer, engine, sample, grads,
                                            state.opt_state, state.params, finite=finite)
  skipped_steps = state.skipped_steps
  if loss_scale is not None:
    loss_scale = _next_loss_scale(loss_scale, finite, config.loss_scale.growth_interval)
    skipped_steps = skipped_steps + 1 - finite.astype(jnp.int32)
    metrics = dict(metrics, loss_scale=scale, skipped=skipped_steps)
  model_state, margin, centers = carry
  if finite is not None:
    # A skipped step keeps the running statistics too: a forward pass that overflowed float16
    # would leave NaN in the BatchNorms' (and the margin's, the centres') for good.
    model_state, margin, centers = _unless_overflow_stats(
        finite, (model_state, margin, centers), (state.model_state, state.margin, state.centers))
  new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                            opt_state=opt_state, margin=margin, centers=centers,
                            loss_scale=loss_scale, skipped_steps=skipped_steps)
  metrics = dict(metrics, learning_rate=learning_rate_schedule(config)(state.step),
                 grad_norm=optax.tree.norm(grads["backbone"]))
  return new_state, metrics


def update_sampled_rows(optimizer: optax.GradientTransformation, engine: parallel.SoftmaxEngine,
                        sample: parallel.RowSample, grads, opt_state, params,
                        finite: Array | None = None):
  """``(params, opt_state)`` after an optimizer step on the rows of ``W`` in ``sample`` only.

  ``grads["head"]`` is the gradient of those rows (``engine.take(W, sample)``'s shape);
  ``params`` and ``opt_state`` are whole. The sampled rows of ``W`` and of its per-row optimizer
  state (momentum, Adam's moments) are taken, updated and put back; the other rows are neither
  read nor written, so they and their state stay as they are (Partial FC v1). State that is not
  per row updates as usual: Adam's step count, and with it the bias correction, is shared, so
  a row sampled again after a while is corrected by the global count. ``finite`` (loss
  scaling): where false, the step is skipped as :func:`_unless_overflow` skips it.
  """
  head_shape = params["head"].shape

  def is_row(path, leaf):
    return sharding_lib.is_head_rows(path, leaf, head_shape)

  rows_state = jax.tree_util.tree_map_with_path(
      lambda path, leaf: engine.take(leaf, sample) if is_row(path, leaf) else leaf, opt_state)
  rows = {**params, "head": engine.take(params["head"], sample)}
  updates, new_rows_state = optimizer.update(grads, rows_state, rows)
  new_rows = optax.apply_updates(rows, updates)
  if finite is not None:
    new_rows, new_rows_state = _unless_overflow(finite, (new_rows, new_rows_state),
                                                (rows, rows_state))
  rows, rows_state = new_rows, new_rows_state
  new_state = jax.tree_util.tree_map_with_path(
      lambda path, whole, new: engine.put(whole, sample, new) if is_row(path, whole) else new,
      opt_state, rows_state)
  return {**rows, "head": engine.put(params["head"], sample, rows["head"])}, new_state


def _unless_overflow(finite: Array, new, old):
  """``new`` where ``finite``, else ``old``; but the learning-rate schedules' step counts
  always advance, as insightface steps its scheduler on the steps ``GradScaler`` skips."""
  def is_schedule(node):
    return isinstance(node, optax.ScaleByScheduleState)

  def select(new, old):
    if is_schedule(new):
      return new
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  return jax.tree.map(select, new, old, is_leaf=is_schedule)


def _unless_overflow_stats(finite: Array, new, old):
  """``new`` where ``finite``, else ``old``, for the floating leaves (batch statistics, margin
  state, centres); the others (RNG counters and keys) keep ``new``: they advance either way."""
  def select(new, old):
    if jnp.issubdtype(new.dtype, jnp.floating):
      return jnp.where(finite, new, old)
    return new

  return jax.tree.map(select, new, old)


def _next_loss_scale(loss_scale: LossScale, finite: Array, growth_interval: int) -> LossScale:
  """After a step: halved on an overflow, doubled after ``growth_interval`` finite steps."""
  steps = jnp.where(finite, loss_scale.finite_steps + 1, 0)
  grow = steps >= growth_interval
  scale = jnp.where(finite, jnp.where(grow, 2 * loss_scale.scale, loss_scale.scale),
                    loss_scale.scale / 2)
  return LossScale(scale, jnp.where(grow, 0, steps))


def _micro_batches(x: Array, parts: int) -> Array:
  """``[parts, B / parts, ...]``: ``x [B, ...]``'s rows ``i, i + parts, ...`` in part ``i``,
  split over the devices as ``x``'s rows were."""
  split = _common.batch_axes(x)  # Explicit axes splitting the batch.
  rows = jnp.reshape(x, (x.shape[0] // parts, parts, *x.shape[1:]), out_sharding=jax.NamedSharding(
      jax.typeof(x).sharding.mesh, jax.P(split)) if split else None)
  return jnp.swapaxes(rows, 0, 1)


# ---------------------------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Raises ``ValueError`` (``FileNotFoundError`` for a missing file) naming the field at fault,
  before anything is built; ``train.py`` prints it without a traceback."""
  margin_lib.check_margin(make_margin(config.loss))  # Its scale, say: a tracer in the step.
  try:
    initial_head_bias(config.loss, num_classes=2)  # SphereFace2's needs alpha in (0, 1).
  except ValueError as error:
    raise ValueError(f"config.loss: {error}") from error
  models.check_name(config.model.name)
  if _batch_stats(config) not in ("global", "device"):
    raise ValueError(f"config.model.batch_stats must be 'global' or 'device', got "
                     f"{_batch_stats(config)!r}.")
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"config.compute_dtype must be 'float32', 'bfloat16' or 'float16', got "
                     f"{config.compute_dtype!r}.")
  if config.eval.get("compute_dtype", "run") not in EVAL_COMPUTE_DTYPES:
    raise ValueError(f"config.eval.compute_dtype must be one of {EVAL_COMPUTE_DTYPES}, got "
                     f"{config.eval.compute_dtype!r}.")
  make_engine(config, mesh)
  make_optimizer(config)
  check_data(config.data)
  subcenters = config.loss.get("subcenters")
  if subcenters is not None and subcenters < 1:
    raise ValueError(f"config.loss.subcenters must be a positive number of centres per class "
                     f"(or None: one), got {subcenters}.")
  if config.loss.name == "subcenter_arcface" and not subcenters:
    raise ValueError("config.loss.name = 'subcenter_arcface' needs config.loss.subcenters (K, "
                     "e.g. 3); without it the head has one centre per class: plain ArcFace.")
  for name in ("batch_size", "eval.batch_size"):
    value = config.eval.batch_size if name == "eval.batch_size" else config.batch_size
    if value < 1:
      raise ValueError(f"config.{name} must be at least 1, got {value}.")
    if value % mesh.size:
      raise ValueError(f"config.{name} = {value} is not divisible by the {mesh.size} devices "
                       "of the mesh (the batch is split evenly over them).")
    if value % jax.process_count():
      raise ValueError(f"config.{name} = {value} is not divisible by the "
                       f"{jax.process_count()} processes.")
  for name in ("log_every", "checkpoint_every"):
    if config[name] < 1:
      raise ValueError(f"config.{name} must be a positive number of steps, got {config[name]}.")
  for name, meaning in (("num_steps", "0: evaluate only"), ("eval_every", "0: at the end only")):
    if config[name] < 0:
      raise ValueError(f"config.{name} must be a number of steps ({meaning}), got "
                       f"{config[name]}.")
  for name, holds, rule in (
      ("loss_scale.initial", lambda v: 0 < v < math.inf,
       "positive and finite (a scale of 0 skips every step)"),
      ("optimizer.learning_rate", lambda v: v > 0, "positive"),
      # Each of these out of its range trained on: a negative scale or decay turns the gradient
      # or the weights' pull around, a negative power makes the rate grow without bound at the
      # end, and Adam with b1 or b2 = 1 divides by zero (bias correction) at its first step.
      ("optimizer.head_lr_scale", lambda v: v >= 0, "at least 0 (0: the head stays as it is)"),
      ("optimizer.weight_decay", lambda v: v >= 0, "at least 0"),
      ("optimizer.head_weight_decay", lambda v: v is None or v >= 0,
       "at least 0 (None: weight_decay's)"),
      ("optimizer.momentum", lambda v: v is None or 0 <= v < 1, "in [0, 1) (0: plain SGD)"),
      ("optimizer.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
      ("optimizer.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
      ("optimizer.decay_power", lambda v: v >= 0, "at least 0 (0: no decay after the warm-up)"),
      ("center_loss.weight", lambda v: v >= 0, "at least 0 (0: off)"),
      ("center_loss.alpha", lambda v: 0 <= v <= 1, "in [0, 1] (the centres' step)"),
      # The input pipeline checks these too, but only once the state is built, naming no field.
      ("input.crop_padding", lambda v: v >= 0, "at least 0 (pixels each side; 0: no random crop)"),
      ("input.worker_count", lambda v: v >= 0, "at least 0 (0: read in the training process)")):
    section, field = name.split(".")
    if not holds(config[section][field]):
      raise ValueError(f"config.{name} must be {rule}, got {config[section][field]}.")
  if not 0 <= config.seed < 2**32:  # As the input pipeline's, which names no field.
    raise ValueError(f"config.seed must lie in [0, 2**32) (it seeds the data's order and "
                     f"augmentation, as well as the model), got {config.seed}.")
  num_pairs = config.eval.num_pairs
  if num_pairs < 10 or num_pairs % 2:
    raise ValueError(f"config.eval.num_pairs must be even (half of the open set's pairs show one "
                     f"identity) and at least 10 (the protocol's folds), got {num_pairs}.")
  if config.loss_scale.growth_interval < 1:
    raise ValueError(f"config.loss_scale.growth_interval must be a positive number of steps, got "
                     f"{config.loss_scale.growth_interval}.")
  if config.keep_checkpoints < 1:  # orbax's max_to_keep=0 deletes every checkpoint, the last too.
    raise ValueError(f"config.keep_checkpoints must be at least 1 (a run resumes from its latest "
                     f"checkpoint), got {config.keep_checkpoints}.")
  warmup = config.optimizer.warmup_steps
  if warmup < 0 or 0 < config.num_steps <= warmup:
    raise ValueError(f"config.optimizer.warmup_steps = {warmup} must lie in [0, config.num_steps "
                     f"= {config.num_steps}): the learning rate warms up, then decays to zero by "
                     "the last step.")
  parts = config.micro_batches
  if parts < 1 or config.batch_size % (parts * mesh.size):
    raise ValueError(f"config.micro_batches = {parts} must be a positive divisor of each "
                     f"device's {config.batch_size // mesh.size} examples (config.batch_size = "
                     f"{config.batch_size} over {mesh.size} devices).")
  if config.batch_size == parts:  # Normalised over one example, every embedding is a bias.
    raise ValueError("config.batch_size / config.micro_batches = 1 example per micro-batch: the "
                     "backbones' BatchNorm needs a batch of more than one.")
  missing = [path for path in config.eval.bins if not os.path.exists(path)]
  if missing:
    raise FileNotFoundError(f"config.eval.bins: {missing} not found; list the .bin files that "
                            "exist, e.g. --config.eval.bins=\"('/data/lfw.bin',)\", or none: "
                            "--config.eval.bins=\"()\".")
  eval_lib.check_set_names([eval_lib.bin_set_name(path) for path in config.eval.bins],
                           given_as="config.eval.bins", reserved=("closed", "open"))


# ---------------------------------------------------------------------------------------------
# A run's checkpoint, for inference.
# ---------------------------------------------------------------------------------------------


RESTORE_PARTS = ("state", "params", "backbone")


def restore(workdir: str, step: int | None = None, *, parts: str = "state",
            compute_dtype: str | None = None) -> tuple[Experiment, TrainState]:
  """The experiment and state of a run's checkpoint (the latest one by default), for inference.

  The mesh is rebuilt on the devices present now, which may differ from the training run's
  (``experiment.mesh``: jit functions of the state inside ``jax.set_mesh(experiment.mesh)``);
  the training data need not be present. ``parts``: ``"state"``, the whole training state;
  ``"params"``, the model alone (parameters, batch statistics, margin state, step), the
  optimizer state, the centres and the loss scale neither read nor held (``None``);
  ``"backbone"``, the same without the head ``W`` either (``params`` holds only the backbone's):
  all that embedding needs. ``compute_dtype``: the network's arithmetic when it embeds, in place
  of the run's ``config.eval.compute_dtype`` (``None``: that one; a run's config.json written
  before 2026-12-07 has none, and its network embeds as it evaluated, in ``"run"``, the run's
  ``config.compute_dtype``). The stored parameters and statistics are float32 whatever a run
  computes in, so a bfloat16 run embeds in float32 too.

  A step saved under another ``compute_dtype`` or center-loss weight than ``config.json``'s (a
  run resumed in float32 after float16) restores as training resumes it: a loss scale or centres
  it lacks start as in a new run, and those it holds that ``config.json`` does not use are not
  kept (:func:`~margins.checkpoints.restore_checkpoint`'s ``new_fields``).
  """
  if parts not in RESTORE_PARTS:
    raise ValueError(f"parts={parts!r}; choose among {RESTORE_PARTS}.")
  if compute_dtype is not None and not (isinstance(compute_dtype, str)
                                        and compute_dtype in EVAL_COMPUTE_DTYPES):
    raise ValueError(f"compute_dtype={compute_dtype!r}; choose among {EVAL_COMPUTE_DTYPES}.")
  config = checkpoints.load_config(workdir)
  num_classes, image_shape = checkpoints.load_data_info(workdir)
  config.mesh = dict(shape=(-1,), axis_names=tuple(config.mesh.axis_names)[:1])
  config.eval.compute_dtype = compute_dtype or eval_compute_dtype(config)
  mesh = sharding_lib.make_mesh(config)
  experiment, abstract = create_train_state(config, mesh, num_classes, image_shape,
                                            abstract=True)
  with checkpoints.checkpoint_manager(workdir, config, create=False) as manager:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints.")
    step = max(steps) if step is None else step
    if step not in steps:
      raise FileNotFoundError(f"No checkpoint {step} in {workdir}/checkpoints; its checkpoints: "
                              f"{sorted(steps)}.")
    if parts == "state":
      def new_fields(names):
        def named():  # Under ``jit``: the fields not named are never computed.
          fields = _optional_fields(config, abstract.params["head"].shape[0])
          return {name: fields[name] for name in names}
        shardings = {name: jax.tree.map(lambda leaf: leaf.sharding, getattr(abstract, name))
                     for name in names}
        return jax.jit(named, out_shardings=shardings)()
      return experiment, checkpoints.restore_checkpoint(manager, step, abstract,
                                                        new_fields=new_fields)
    return experiment, checkpoints.restore_model(manager, step, abstract, head=parts == "params")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates as ``config`` says, in ``workdir``; returns the final metrics.

  Restarting with the same ``workdir`` resumes from its latest checkpoint. Raises
  :class:`margins.checkpoints.Preempted` after saving the current step when the job gets SIGTERM
  (:func:`margins.checkpoints.preemption_notice`).
  """
  mesh = checked_mesh(config, workdir)
  with jax.set_mesh(mesh):
    return _train_and_evaluate(config, workdir, mesh)


def checked_mesh(config: ml_collections.ConfigDict, workdir: str) -> jax.sharding.Mesh:
  """``config``'s mesh, with :func:`check_config` passed on it. Where the check fails in one
  process of several, the others, which wait for this one in :func:`train_and_evaluate`,
  learn it (:func:`check_processes_agree`) and stop too."""
  try:
    mesh = sharding_lib.make_mesh(config)
    check_config(config, mesh)
  except (ValueError, FileNotFoundError) as error:
    if jax.process_count() > 1:
      check_processes_agree(config, workdir, error=error)  # Raises ``error``.
    raise
  return mesh


class CannotStart(ValueError):
  """The run cannot start: its data or ``.bin`` sets cannot be read, or it cannot resume the run
  in its workdir. Raised before the state is built; the message names the file or field."""


class ResumeMismatch(CannotStart):
  """A resumed run's config or data differ from what its checkpoint holds."""


# What a resumed run keeps from its checkpoint whatever its config says: (section of the config,
# its fields that shape or set the checkpointed state (None: all), what they decide).
_KEPT_ON_RESUME = (("loss", None, "the margin"),
                   ("model", ("name", "embedding_dim"), "the backbone"),
                   ("optimizer", ("name",), "the optimizer's state"))


def _run_and_given_configs(config: ml_collections.ConfigDict,
                           workdir: str) -> tuple[dict, dict] | None:
  """The config the run in ``workdir`` trained with (its ``config.json``) and ``config``, as
  dicts alike (tuples as lists); ``None`` where the workdir holds no ``config.json``."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    return None
  return (checkpoints.load_config(workdir).to_dict(),
          json.loads(config.to_json_best_effort()))


def _check_resumed_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises :class:`ResumeMismatch` if ``config`` sets the margin (scale, margin ...), the
  backbone or the optimizer otherwise than the run in ``workdir`` did (its ``config.json``)."""
  configs = _run_and_given_configs(config, workdir)
  if configs is None:
    return
  stored_config, given_config = configs
  for section, fields, kept in _KEPT_ON_RESUME:
    stored, given = stored_config[section], given_config[section]
    names = set(stored) | set(given) if fields is None else fields
    # SphereFace's lambda schedule is read at each step, not kept.
    changed = sorted(name for name in names
                     if name != "lambda_schedule" and stored.get(name) != given.get(name))
    if changed:
      now = {name: given.get(name) for name in changed}
      was = {name: stored.get(name) for name in changed}
      raise ResumeMismatch(
          f"config.{section} sets {now} where the run in {workdir} trained with {was}; a "
          f"resumed run keeps {kept} of its checkpoint. Resume with the run's config.{section}, "
          "or train in a new workdir.")


# Fields that give the state its structure beside those of ``_KEPT_ON_RESUME``.
_SHAPING_THE_STATE = (("model", "kwargs"), ("optimizer", "momentum"), ("optimizer", "nesterov"),
                      ("optimizer", "grad_clip_norm"))


def _state_mismatch(config: ml_collections.ConfigDict, workdir: str, error: ValueError) -> str:
  """What to say when the checkpoint's state does not fit the one ``config`` builds: the fields
  that shape the state (the backbone's ``kwargs``, momentum or clipping switched on or off) and
  differ from the run's, then ``error``'s own message."""
  configs = _run_and_given_configs(config, workdir)
  if configs is None:
    return str(error)
  stored_config, given_config = configs
  changed = {f"config.{section}.{name}": (stored_config[section].get(name),
                                          given_config[section].get(name))
             for section, name in _SHAPING_THE_STATE
             if stored_config[section].get(name) != given_config[section].get(name)}
  named = (f"these fields that shape it differ from the run's (run's, given): {changed}. Resume "
           "with the run's values, or train in a new workdir. " if changed else "")
  return (f"The checkpoint in {workdir} holds a state of another structure than this config "
          f"builds; {named}{error}")


def _check_resumed_data(train_source, workdir: str) -> None:
  """Raises :class:`ResumeMismatch` if ``train_source`` has other classes or images than the
  data the run in ``workdir`` trained on (its ``data.json``): ``W``'s rows are its classes."""
  if not os.path.exists(os.path.join(workdir, "data.json")):
    return
  stored = checkpoints.load_data_info(workdir)
  given = (train_source.num_classes, tuple(train_source.image_shape))
  if given != stored:
    raise ResumeMismatch(
        f"config.data gives {given[0]} classes of {given[1]} images where the run in {workdir} "
        f"trained on {stored[0]} classes of {stored[1]}; a resumed run trains on its own data. "
        "Train in a new workdir.")
  stored_count = checkpoints.load_image_count(workdir)
  if stored_count is not None and stored_count != len(train_source):
    raise ResumeMismatch(
        f"config.data gives {len(train_source)} images where the run in {workdir} trained on "
        f"{stored_count}; a resumed run trains on its own data (and resumes its order). Train "
        "in a new workdir.")


def check_processes_agree(config: ml_collections.ConfigDict, workdir: str, train_source=None,
                          error: Exception | None = None) -> None:
  """Raises on every process of a multi-process run unless all of them can start: none has an
  ``error`` of its own (which it raises here, once the others know), and all run one config on
  the same data (class and image counts, image shape) in one shared ``workdir``.

  A collective: every process calls it, from :func:`train_and_evaluate`, or from
  :func:`checked_mesh` with the ``error`` that stops it there. Each process checks only its own
  side; one that stopped alone would leave the others waiting on it until a collective timed
  out, and processes that disagree would train on different things (a backbone initialised from
  two seeds, shuffles of different image lists). A folder that is not shared would show only at
  the first checkpoint, whose save never completes. Other processes raise :class:`CannotStart`.
  """
  # Process 0 writes a file under a name new to every run (no network file system's cache can
  # know it), which every process then looks for.
  name = np.asarray(multihost_utils.broadcast_one_to_all(
      np.frombuffer(secrets.token_bytes(16), np.uint32)))
  token = os.path.join(workdir, f".process_0_token_{name.tobytes().hex()}")
  written = False
  if jax.process_index() == 0:
    try:
      os.makedirs(workdir, exist_ok=True)
      open(token, "w").close()
      written = True
    except OSError as os_error:
      error = error or CannotStart(f"Cannot write in --workdir {workdir}: {os_error}")
  multihost_utils.sync_global_devices("margins: the workdir token is written")
  data = None if train_source is None else (
      train_source.num_classes, len(train_source), tuple(train_source.image_shape))
  facts = {"started": error is None, "config": config.to_json_best_effort(sort_keys=True),
           "data": data, "workdir": os.path.exists(token)}
  digests = np.array([int.from_bytes(hashlib.sha256(repr(fact).encode()).digest()[:4], "little")
                      for fact in facts.values()], np.uint32)
  differ = dict(zip(facts, (np.asarray(multihost_utils.process_allgather(digests))
                            != digests[None]).any(axis=0)))
  if written:
    with contextlib.suppress(OSError):  # Never in place of the error that stops the run.
      os.remove(token)
  if error is not None:
    raise error
  if differ["started"]:
    raise CannotStart("Another process cannot start; its output says why.")
  if differ["config"]:
    raise CannotStart("The processes run different configs: give every process the same "
                      "command, config and --workdir.")
  if differ["data"]:
    raise CannotStart(f"The processes read different data; this one reads {data[0]} classes, "
                      f"{data[1]} images of {data[2]} from config.data. Give every process the "
                      "same data.")
  if differ["workdir"]:
    raise CannotStart(f"--workdir {workdir} is not one folder shared by all processes (a file "
                      "process 0 wrote there is not there for every process), so no checkpoint "
                      "could complete: give every process the same shared folder.")


def _check_model(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> None:
  """Raises ``ValueError`` naming ``config.model`` unless its backbone can be built for these
  images (only its shapes are traced): e.g. the digits configs' ``kwargs.widths`` left beside
  another ``model.name``."""
  try:
    nnx.eval_shape(_model_fn(config, image_shape, config.compute_dtype))
  except (TypeError, ValueError) as error:
    raise ValueError(f"config.model (name {config.model.name!r}, kwargs "
                     f"{dict(config.model.kwargs)}) cannot be built for {tuple(image_shape)} "
                     f"images: {error}") from error


def _check_open_set(config: ml_collections.ConfigDict, eval_sources) -> None:
  """Raises ``ValueError`` naming ``config.data`` unless its held-out identities (``"open"``)
  make the evaluation's verification pairs: at least two identities of two images or more (else
  the run would fail at its first evaluation, after training)."""
  if "open" in eval_sources:
    try:
      eval_lib.open_set_pairs(eval_sources["open"].labels, config.eval.num_pairs)
    except ValueError as error:
      raise ValueError(
          f"config.data's held-out identities ({len(eval_sources['open'])} images) cannot be "
          f"evaluated: {error} Verification pairs need at least two identities of two images or "
          "more (for digits, leave two digits or more out of open_set_train_classes).") from error


def _train_and_evaluate(config, workdir, mesh):
  # The data and the .bin sets are read, and a resume checked, before the state is built: a
  # file that does not decode, or a resume that cannot be, is known at once.
  train_source, error = None, None
  try:
    train_source, eval_sources = make_sources(config.data)
    eval_sources["bins"] = {
        eval_lib.bin_set_name(path): eval_lib.load_bin_set(train_source.image_shape, path)
        for path in config.eval.bins}
    _check_model(config, train_source.image_shape)
    _check_open_set(config, eval_sources)
  except (ValueError, OSError) as source_error:  # A malformed file, an empty identity folder ...
    error = CannotStart(str(source_error))
    error.__cause__ = source_error
  except Exception as unexpected:  # A bug, a MemoryError ...: its traceback, once others know.
    if jax.process_count() == 1:
      raise
    error = unexpected
  if jax.process_count() > 1:  # With that, the resume checks below agree on every process.
    check_processes_agree(config, workdir, train_source, error)
  elif error is not None:
    raise error
  os.makedirs(workdir, exist_ok=True)
  # The checks and the restore read the checkpoints through a manager of their own: the training
  # loop's removes a killed run's unfinished saves in a thread from its creation on, which fails
  # with a traceback if the interpreter shuts down first (a refused resume exits at once).
  with checkpoints.checkpoint_manager(workdir, config) as reader:
    latest = reader.latest_step()
    resuming = latest is not None
    if resuming:
      _check_resumed_config(config, workdir)
      _check_resumed_data(train_source, workdir)
    experiment, state = create_train_state(config, mesh, train_source.num_classes,
                                           train_source.image_shape)
    if resuming:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
      try:
        state = checkpoints.restore_checkpoint(
            reader, latest, abstract,
            new_fields=lambda names: {name: getattr(state, name) for name in names})
      except checkpoints.UnreadableCheckpoint as error:
        raise CannotStart(str(error)) from error
      except ValueError as error:  # A state of another structure than this config builds.
        raise ResumeMismatch(_state_mismatch(config, workdir, error)) from error
      run_log.report(f"Resumed from step {int(state.step)} in {workdir}.")
  manager = checkpoints.checkpoint_manager(workdir, config, remove_unfinished=True)
  start = int(state.step)
  # One batch per step: the data resumes at batch ``start`` of the stream, whatever the worker
  # count (grain's iterator state differs with it) or the number of processes.
  per_process = config.batch_size // jax.process_count()
  iterator = iter(data_lib.train_dataset(
      train_source, batch_size=per_process, seed=config.seed, random_flip=config.input.random_flip,
      crop_padding=config.input.crop_padding, worker_count=config.input.worker_count,
      shard_index=jax.process_index(), shard_count=jax.process_count(), start_batch=start))
  if jax.process_index() == 0:
    checkpoints.write_run_files(workdir, config, train_source)
  writer = run_log.MetricWriter(workdir, start)

  step_fn = jax.jit(lambda s, b: train_step(experiment, s, b), donate_argnums=0)
  embed_fn = jax.jit(lambda s, x: eval_lib.embed(experiment, s, x))
  scores_fn = jax.jit(lambda s, x: eval_lib.class_scores(experiment, s, x))

  num_steps = config.num_steps
  # Face data have no held-out sets: without .bin sets (``config.eval.bins=()``) nothing is.
  evaluates = bool({"closed", "open"} & set(eval_sources) or eval_sources["bins"])
  if not evaluates:
    run_log.report("Nothing to evaluate: config.data has no held-out sets and config.eval.bins "
                   "names no .bin verification sets.")

  def evaluation_due(step):
    return evaluates and (step == num_steps
                          or bool(config.eval_every and step % config.eval_every == 0))

  def evaluate_and_log(step, replace=False):
    metrics = eval_lib.evaluate(experiment, state, eval_sources, embed_fn=embed_fn,
                                scores_fn=scores_fn)
    writer.write(step, metrics, replace=replace)
    for line in run_log.summary_lines(metrics, open_flip=config.eval.flip):
      run_log.report(f"[step {step}] {line}")
    return metrics

  final = {}
  timer_start, timer_step = time.perf_counter(), start
  preempted = False
  with checkpoints.preemption_notice(manager) as reached_preemption:
    try:  # A save in flight is finished even when the loop fails (orbax drops unfinished ones).
      if evaluates and (start >= num_steps or (start > 0 and evaluation_due(start))):
        # The restored step's evaluation, or the only one (nothing left to train; ``num_steps =
        # 0``: the new model's): the run that saved the step may have stopped in or before it
        # (preempted, or the evaluation failed); a line it wrote is replaced.
        final = evaluate_and_log(start, replace=True)
        timer_start = time.perf_counter()
      for step in range(start + 1, num_steps + 1):
        batch = sharding_lib.global_batch(experiment.batch_sharding, next(iterator))
        with jax.transfer_guard("disallow"):  # The step reads nothing from the host.
          state, metrics = step_fn(state, batch)
        preempted = reached_preemption(step)  # Then the step is logged and saved.
        if step % config.log_every == 0 or step == num_steps or preempted:
          metrics = jax.device_get(metrics)
          elapsed = time.perf_counter() - timer_start
          speed = (step - timer_step) * config.batch_size / max(elapsed, 1e-9)
          run_log.report(run_log.progress_line(
              step, num_steps, metrics, speed,
              (num_steps - step) * elapsed / max(step - timer_step, 1)))
          writer.write(step, metrics)
          timer_start, timer_step = time.perf_counter(), step
        paused = time.perf_counter()
        if step % config.checkpoint_every == 0 or step == num_steps or preempted:
          checkpoints.save(manager, step, state)
        if preempted:  # Its evaluation, if one is due, is left out: the grace period is short.
          break
        if evaluation_due(step):
          final = evaluate_and_log(step)
        timer_start += time.perf_counter() - paused  # Speed and ETA count training steps only.
    finally:
      manager.wait_until_finished()
      manager.close()
      iterator.close()  # Stops the data workers now, not when the iterator is collected.
      writer.close()
  if preempted:
    raise checkpoints.Preempted(step)
  if jax.process_index() == 0:
    final["_plots"] = eval_lib.write_plots(workdir, final) if final else []
    plots = f"; plots: {', '.join(final['_plots'])}" if final["_plots"] else ""
    run_log.report(f"Metrics: {os.path.join(workdir, 'metrics.jsonl')}{plots}")
  return final
