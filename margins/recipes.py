r"""insightface arcface_torch's training recipes as ``train_lib`` configs (``configs/recipes/``).

A recipe trains on a dataset in insightface's RecordIO layout: a folder with ``train.rec``,
``train.idx`` and ``property``, and beside them the ``.bin`` verification sets ``lfw.bin``,
``cfp_fp.bin`` and ``agedb_30.bin`` (evaluated with the flip test every ``eval_every`` steps and at
the end). Hyperparameters are those of insightface's ``train_v2.py`` configs. The IResNet and
MobileFaceNet recipes: 128 images per GPU on 8 GPUs (a global batch of 1,024), SGD with momentum
0.9, the learning rate not rescaled with the batch, no warm-up. The ViT recipes (WebFace42M,
``wf42m_pfc03_40epoch_64gpu_vit_*``): 384 images per GPU on 64 GPUs (24,576), AdamW with lr 1e-3
and weight decay 0.1, 40 epochs of which 4 warm up linearly from 0, Partial FC 0.3. All of them:
backbone gradients clipped to norm 5, polynomial decay (power 2) to zero over
``images // batch * epochs`` steps, scale 64, a 512-d embedding, fp16 there and bfloat16 here.

They follow the insightface code of the published results' time: its earlier ``train_v2.py``
decays with ``PolyScheduler`` (power 2), and ArcFace's gradient flows through ``cos(theta + m)``.
insightface's master decays linearly (``PolynomialLRWarmup``, power 1) and, since Dec 2022,
detaches ArcFace's margin from the gradient: ``--config.optimizer.decay_power=1.0`` (and, in the
ArcFace recipes, ``--config.loss.detach_margin=True``) trains as it does. (``PolyScheduler``
runs its first two steps at the step-0 rate, a side effect of how it sets up torch's scheduler,
so its schedule trails this one by a step.) Partial FC scores ``ceil(rate * C / devices)``
classes per device (insightface: ``int(rate * C / devices)``, more only when a device's classes
of the batch do not fit).

The number of steps follows ``batch_size``: ``--config.batch_size=4096`` trains the same number
of epochs in a quarter of the steps (set ``--config.optimizer.learning_rate`` to match). On fewer
devices than insightface used, ``--config.micro_batches=k`` keeps the global batch, in ``k``
micro-batches per step whose gradients are averaged (insightface's ``gradient_acc``); as there,
BatchNorm's statistics and Partial FC's sample are each micro-batch's own. BatchNorm's statistics
are each device's rows' (``config.model.batch_stats="device"``), as insightface's DDP normalises
each GPU's: 128 images in the IResNet and MobileFaceNet recipes (384 in the ViT ones) with their
batch on 8 GPUs (64), or on one with ``micro_batches=8`` (64).
"""

import os

import ml_collections

from margins import train_lib

# Images per epoch of insightface's RecordIO datasets (its configs' ``num_image``; identities:
# 93,431, 360,232 and 2,059,906, REFERENCE.md section 3).
NUM_IMAGES = {"ms1mv3": 5_179_510, "glint360k": 17_091_657, "webface42m": 42_474_557}
VERIFICATION_SETS = ("lfw", "cfp_fp", "agedb_30")
GLOBAL_BATCH = 128 * 8
VIT_GLOBAL_BATCH = 384 * 64


def parse_arg(arg: str | None) -> tuple[str, bool]:
  """``(dataset folder, quick)`` from a config argument ``"<folder>"`` or ``"<folder>,quick"``.

  >>> from margins.recipes import parse_arg
  >>> parse_arg("/data/ms1m-retinaface-t1,quick")
  ('/data/ms1m-retinaface-t1', True)
  """
  if not arg:
    raise ValueError("A recipe needs the dataset folder (train.rec, train.idx, property) as its "
                     "argument: --config configs/recipes/<recipe>.py:/path/to/dataset[,quick]")
  path, _, flag = arg.rpartition(",")
  if flag == "quick":
    return path, True
  return arg, False


def arcface_torch(arg: str | None, *, dataset: str, model: str, loss: dict, weight_decay: float,
                  num_epochs: int, sample_rate: float = 1.0, eval_every: int = 2000,
                  optimizer: str = "sgd", learning_rate: float = 0.1,
                  batch_size: int = GLOBAL_BATCH, warmup_epochs: int = 0,
                  model_kwargs: dict | None = None) -> ml_collections.ConfigDict:
  """The config of one insightface recipe, on the dataset folder named by ``arg``.

  Args:
    arg: ``"<folder>"`` or ``"<folder>,quick"`` (a smoke run of 1-3 minutes on a 2-core CPU:
      IResNet-18, or the same MobileFaceNet or ViT-T, at 32x32 with a 64-d embedding, 20 steps
      of 64 images, float32, evaluated at the end on its ``.bin`` sets).
    dataset: a key of ``NUM_IMAGES``.
    model: backbone name (``margins.models``).
    loss: ``config.loss`` (name and margin hyperparameters).
    weight_decay: weight decay (head included, as insightface).
    num_epochs: epochs of ``NUM_IMAGES[dataset]`` images.
    sample_rate: Partial FC's share of negative class centres per step.
    eval_every: steps between evaluations and checkpoints (insightface's ``verbose``).
    optimizer: ``"sgd"`` (momentum 0.9) or ``"adamw"``.
    learning_rate: the peak learning rate.
    batch_size: the global batch.
    warmup_epochs: epochs of linear warm-up (insightface's ``warmup_epoch``).
    model_kwargs: the backbone's arguments beside its preset's.
  """
  path, quick = parse_arg(arg)
  num_images = NUM_IMAGES[dataset]
  config = train_lib.default_config()
  # ``num_classes``: for files with neither ``property`` nor identity records.
  config.data = dict(name="recordio", path=path, image_shape=(112, 112, 3),
                     num_classes=ml_collections.config_dict.placeholder(int))
  config.batch_size = batch_size
  config.num_steps = num_images // config.get_ref("batch_size") * num_epochs
  config.input = dict(random_flip=True, crop_padding=0, worker_count=8)
  # Each GPU's BatchNorm statistics, as insightface's DDP training.
  config.model = dict(name=model, embedding_dim=512, batch_stats="device",
                      kwargs=model_kwargs or {})
  # ``subcenters``: sub-centre ArcFace's K (``--config.loss.subcenters=3``), with any margin.
  config.loss = dict(loss, subcenters=ml_collections.config_dict.placeholder(int))
  config.engine = dict(kind="sharded", chunk_size=8192, sample_rate=sample_rate,
                       freeze_unsampled=False)
  config.optimizer.update(name=optimizer, learning_rate=learning_rate, momentum=0.9,
                          weight_decay=weight_decay, grad_clip_norm=5.0, decay_power=2.0,
                          # The same share of the steps, with any --config.num_steps too.
                          warmup_steps=config.get_ref("num_steps") * warmup_epochs // num_epochs)
  config.compute_dtype = "bfloat16"
  config.log_every = 50
  config.checkpoint_every = config.eval_every = eval_every
  config.eval.update(batch_size=512, flip=True, num_pairs=3000,
                     bins=tuple(os.path.join(path, f"{name}.bin") for name in VERIFICATION_SETS))
  if quick:
    config = train_lib.quick(config)
    config.data.image_shape = (32, 32, 3)
    config.input.worker_count = 0
    if model.startswith("vit"):
      config.model.name = "vit_t"
    elif model != "mobilefacenet":
      config.model.name, config.model.kwargs = "iresnet18", {}
    config.model.embedding_dim = 64
    config.engine.chunk_size = 256
    config.compute_dtype = "float32"
    config.eval_every = 0
  return config


def webface42m_vit(arg: str | None, *, model: str, drop_path_rate: float,
                   mask_ratio: float) -> ml_collections.ConfigDict:
  """insightface's ``wf42m_pfc03_40epoch_64gpu_<model>``: CosFace (s 64, m 0.4), Partial FC 0.3,
  AdamW (lr 1e-3, weight decay 0.1), 40 epochs (4 of linear warm-up) of global batches of 24,576
  (384 images on each of 64 GPUs; 69,120 steps), polynomial decay; its ViT variants set drop
  path and token masking (``vit_t_dp005_mask0``: 0.05 and 0). Its ``_mask_005`` backbones mask
  10% of the tokens, not 5%: insightface's ``forward_features`` calls ``random_masking`` without
  their ``mask_ratio`` (:mod:`margins.models.vit`), so the ViT-B/L recipes pass 0.1.

  On 8 devices, ``--config.micro_batches=8`` keeps the global batch: 8 micro-batches of 384
  images per device and step (insightface's 8-GPU ViT-B config accumulates 12 of 256). Its
  configs evaluate nothing (``val_targets = []``); these evaluate the folder's ``.bin`` sets as
  the other recipes do (``--config.eval.bins="()"``: none).
  """
  return arcface_torch(arg, dataset="webface42m", model=model,
                       loss=dict(name="cosface", scale=64.0, margin=0.4), weight_decay=0.1,
                       num_epochs=40, sample_rate=0.3, optimizer="adamw", learning_rate=1e-3,
                       batch_size=VIT_GLOBAL_BATCH, warmup_epochs=4,
                       model_kwargs=dict(drop_path_rate=drop_path_rate, mask_ratio=mask_ratio))
