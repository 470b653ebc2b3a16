"""The insightface recipes in ``configs/recipes/``: their values; one run on a RecordIO folder."""

import glob
import os

import jax
import numpy as np
import pytest

from margins import recipes
from margins import train_lib
from margins.data import recordio
from margins.data import write_bin
from margins.data.image_folder import encode_image
from tests.test_recordio import _smooth_image
from tests.test_train import ROOT, load_config, read_metrics

RECIPES = os.path.join(ROOT, "configs", "recipes")

# insightface arcface_torch's configs (train_v2): backbone, margin (s, m), weight decay, epochs,
# images per epoch (``num_image``), Partial FC sample rate; 128 images per GPU on 8 GPUs, SGD lr
# 0.1 momentum 0.9, no warm-up, polynomial decay, 512-d embedding. Steps: images // 1024 * epochs.
EXPECTED = {
    "ms1mv3_r50": ("iresnet50", "arcface", 0.5, 5e-4, 20, 5_179_510, 1.0, 101_160),
    "ms1mv3_r100": ("iresnet100", "arcface", 0.5, 5e-4, 20, 5_179_510, 1.0, 101_160),
    "ms1mv3_mbf": ("mobilefacenet", "arcface", 0.5, 1e-4, 40, 5_179_510, 1.0, 202_320),
    "glint360k_r100": ("iresnet100", "cosface", 0.4, 1e-4, 20, 17_091_657, 1.0, 333_820),
    "webface42m_r100_pfc": ("iresnet100", "cosface", 0.4, 5e-4, 20, 42_474_557, 0.2, 829_580),
}


def test_every_recipe_is_in_the_table():
  names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(RECIPES, "*.py")))
  assert names == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_values_are_insightfaces(name):
  model, loss, margin, weight_decay, epochs, images, sample_rate, steps = EXPECTED[name]
  config = load_config(os.path.join(RECIPES, f"{name}.py"), "/data/set")
  assert config.data.to_dict() == dict(name="recordio", path="/data/set", image_shape=(112, 112, 3))
  assert (config.model.name, config.model.embedding_dim) == (model, 512)
  # ArcFace's gradient flows through cos(theta + m), as in insightface until Dec 2022.
  detach = dict(detach_margin=False) if loss == "arcface" else {}
  assert config.loss.to_dict() == dict(name=loss, scale=64.0, margin=margin, **detach)
  if detach:  # Today's insightface detaches the margin: one flag away.
    config.loss.detach_margin = True
    assert train_lib.make_margin(config.loss).detach_margin
  assert (config.engine.kind, config.engine.sample_rate) == ("sharded", sample_rate)
  assert config.batch_size == 128 * 8
  assert config.num_steps == steps == images // 1024 * epochs
  opt = config.optimizer
  assert (opt.name, opt.learning_rate, opt.momentum, opt.nesterov) == ("sgd", 0.1, 0.9, False)
  assert (opt.weight_decay, opt.head_weight_decay, opt.head_lr_scale) == (weight_decay, None, 1.0)
  assert (opt.warmup_steps, opt.decay_power, opt.grad_clip_norm) == (0, 2.0, 5.0)
  assert config.compute_dtype == "bfloat16"
  assert config.input.random_flip and config.eval.flip
  assert config.eval.bins == ("/data/set/lfw.bin", "/data/set/cfp_fp.bin",
                              "/data/set/agedb_30.bin")
  config.batch_size = 4096  # Same epochs, a quarter of the steps.
  assert config.num_steps == images // 4096 * epochs


def test_recipe_needs_the_dataset_folder():
  with pytest.raises(ValueError, match="needs the dataset folder"):
    load_config(os.path.join(RECIPES, "ms1mv3_r50.py"), None)
  assert recipes.parse_arg("/a,b/ms1m,quick") == ("/a,b/ms1m", True)
  assert recipes.parse_arg("/a,b/ms1m") == ("/a,b/ms1m", False)


def _write_dataset(folder, num_classes, per_class):
  """insightface's layout: header (key 0), images (1..N), identity ranges, property, .bin sets."""
  num_images = num_classes * per_class
  with recordio.RecordIOWriter(folder / "train.rec", folder / "train.idx") as writer:
    writer.write(recordio.pack(recordio.IRHeader(0, [num_images + 1, num_images + 1 + num_classes],
                                                 0), b""), key=0)
    for key in range(1, num_images + 1):
      label = (key - 1) // per_class
      jpeg = encode_image(_smooth_image(key, size=112), image_format="jpeg")
      writer.write(recordio.pack(recordio.IRHeader(0, label, key), jpeg), key=key)
    for label in range(num_classes):
      key = num_images + 1 + label
      start = 1 + label * per_class
      writer.write(recordio.pack(recordio.IRHeader(0, [start, start + per_class], key), b""),
                   key=key)
  (folder / "property").write_text(f"{num_classes},112,112")
  pairs = np.stack([_smooth_image(1000 + k, size=112) for k in range(40)])
  for name in recipes.VERIFICATION_SETS:
    write_bin(folder / f"{name}.bin", pairs, [k % 2 == 0 for k in range(20)])


def test_partial_fc_recipe_trains_in_quick_mode_on_a_recordio_folder(tmp_path):
  data = tmp_path / "webface"
  data.mkdir()
  _write_dataset(data, num_classes=12, per_class=4)
  config = load_config(os.path.join(RECIPES, "webface42m_r100_pfc.py"), f"{data},quick")
  config.num_steps, config.log_every = 2, 1
  # Quick mode's IResNet-18 takes minutes on two CPU cores; the recipe's data, head and
  # evaluation are what this tests.
  config.model = dict(name="small_cnn", embedding_dim=32, kwargs=dict(widths=(8, 16, 32)))
  config.eval.batch_size = 64
  with jax.default_prng_impl("rbg"):  # Compiles the initialisation 10x faster than threefry.
    final = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  losses = [m["loss"] for m in read_metrics(str(tmp_path / "run")) if "loss" in m]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
  for name in recipes.VERIFICATION_SETS:
    assert 0 <= final[f"{name}/verification_accuracy"] <= 1
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")
