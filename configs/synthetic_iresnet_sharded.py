r"""Synthetic identities, IResNet-50 and a class-sharded ArcFace head on every device.

  python train.py --config configs/synthetic_iresnet_sharded.py --workdir /tmp/synthetic

The scale run, like insightface's synthetic mode: 100k procedurally generated identities (no data
on disk) at 112x112, the head ``W [100k, 512]`` split by rows over all devices (Partial FC's
model-parallel FC), chunked within each device, SGD with momentum (learning rate 0.2 after 1,000
warm-up steps, polynomial decay; insightface's recipes use 0.1 per 1,024 images, no warm-up), the
backbone in bfloat16 and each device's BatchNorm statistics its own, as in the recipes (``:quick``
in float32).
On CPU, try it with fake devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
``:quick`` runs an IResNet-18 at 32x32 on 1,000 identities for a few steps.
"""

from margins import train_lib


def get_config(arg=None):
  config = train_lib.default_config()
  config.data = dict(name="synthetic", num_classes=100_000, num_images=10_000_000,
                     image_shape=(112, 112, 3), seed=0, eval_classes=500, eval_images=5000)
  config.input = dict(random_flip=True, crop_padding=0, worker_count=4)
  config.model = dict(name="iresnet50", embedding_dim=512, batch_stats="device", kwargs={})
  config.loss = dict(name="arcface", scale=64.0, margin=0.5)
  config.engine = dict(kind="sharded", chunk_size=8192, sample_rate=1.0, freeze_unsampled=False)
  config.batch_size = 512
  config.num_steps = 20_000
  config.optimizer.learning_rate = 0.2
  config.optimizer.weight_decay = 5e-4
  config.optimizer.warmup_steps = 1000
  config.compute_dtype = "bfloat16"
  config.log_every = 50
  config.checkpoint_every = 2000
  config.eval.flip = True
  config.eval.num_pairs = 6000
  if train_lib.is_quick(arg):
    config = train_lib.quick(config)
    config.data.update(num_classes=1000, num_images=100_000, image_shape=(32, 32, 3),
                       eval_classes=16, eval_images=128)
    config.input.worker_count = 0
    config.model.name = "iresnet18"
    config.model.embedding_dim = 64
    config.engine.chunk_size = 256
    config.optimizer.warmup_steps = 5
    config.compute_dtype = "float32"
  return config
