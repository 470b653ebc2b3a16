"""The insightface recipes in ``configs/recipes/``: their values; one run on a RecordIO folder."""

import glob
import os

import jax
import numpy as np
import pytest

from margins import recipes
from margins import sharding as sharding_lib
from margins import train_lib
from margins.data import recordio
from margins.data import write_bin
from margins.data.image_folder import encode_image
from tests.test_recordio import _smooth_image
from tests.test_train import ROOT, load_config, read_metrics

RECIPES = os.path.join(ROOT, "configs", "recipes")

# insightface arcface_torch's configs (train_v2): backbone, margin (s, m), weight decay, epochs,
# images per epoch (``num_image``), Partial FC sample rate, steps (images // batch * epochs), the
# optimizer and the backbone's arguments. 512-d embedding, polynomial decay.
SGD = dict(name="sgd", learning_rate=0.1, batch=128 * 8, warmup_epochs=0)  # 128 on 8 GPUs
ADAMW = dict(name="adamw", learning_rate=1e-3, batch=384 * 64, warmup_epochs=4)  # 384 on 64 GPUs
VIT_DP005_MASK0 = dict(drop_path_rate=0.05, mask_ratio=0.0)
# insightface's vit_{b,l}_dp005_mask_005 set mask_ratio=0.05, but its forward pass calls
# random_masking(x) without it: 10% of the tokens are masked, its default.
VIT_DP005_MASK005 = dict(drop_path_rate=0.05, mask_ratio=0.1)
EXPECTED = {
    "ms1mv3_r50": ("iresnet50", "arcface", 0.5, 5e-4, 20, 5_179_510, 1.0, 101_160, SGD, {}),
    "ms1mv3_r100": ("iresnet100", "arcface", 0.5, 5e-4, 20, 5_179_510, 1.0, 101_160, SGD, {}),
    "ms1mv3_mbf": ("mobilefacenet", "arcface", 0.5, 1e-4, 40, 5_179_510, 1.0, 202_320, SGD, {}),
    "glint360k_r100": ("iresnet100", "cosface", 0.4, 1e-4, 20, 17_091_657, 1.0, 333_820, SGD,
                       {}),
    "webface42m_r100_pfc": ("iresnet100", "cosface", 0.4, 5e-4, 20, 42_474_557, 0.2, 829_580, SGD,
                            {}),
    "webface42m_vit_t_pfc": ("vit_t", "cosface", 0.4, 0.1, 40, 42_474_557, 0.3, 69_120, ADAMW,
                             VIT_DP005_MASK0),
    "webface42m_vit_s_pfc": ("vit_s", "cosface", 0.4, 0.1, 40, 42_474_557, 0.3, 69_120, ADAMW,
                             VIT_DP005_MASK0),
    "webface42m_vit_b_pfc": ("vit_b", "cosface", 0.4, 0.1, 40, 42_474_557, 0.3, 69_120, ADAMW,
                             VIT_DP005_MASK005),
    "webface42m_vit_l_pfc": ("vit_l", "cosface", 0.4, 0.1, 40, 42_474_557, 0.3, 69_120, ADAMW,
                             VIT_DP005_MASK005),
}
# insightface's ``verbose``, steps between evaluations (here checkpoints too): 2,000, but 10,000 in
# wf42m_pfc02_r100.
VERBOSE = {"webface42m_r100_pfc": 10_000}


def test_every_recipe_is_in_the_table():
  names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(RECIPES, "*.py")))
  assert names == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_values_are_insightfaces(name):
  (model, loss, margin, weight_decay, epochs, images, sample_rate, steps, optimizer,
   model_kwargs) = EXPECTED[name]
  config = load_config(os.path.join(RECIPES, f"{name}.py"), "/data/set")
  assert config.data.to_dict() == dict(name="recordio", path="/data/set", image_shape=(112, 112, 3),
                                       num_classes=None)
  assert (config.model.name, config.model.embedding_dim) == (model, 512)
  assert config.model.kwargs.to_dict() == model_kwargs
  assert config.model.batch_stats == "device"  # each GPU's BatchNorm statistics, as DDP
  # ArcFace's gradient flows through cos(theta + m), as in insightface until Dec 2022.
  detach = dict(detach_margin=False) if loss == "arcface" else {}
  assert config.loss.to_dict() == dict(name=loss, scale=64.0, margin=margin, subcenters=None,
                                       **detach)
  if detach:  # Today's insightface detaches the margin: one flag away.
    config.loss.detach_margin = True
    assert train_lib.make_margin(config.loss).detach_margin
  assert (config.engine.kind, config.engine.sample_rate) == ("sharded", sample_rate)
  batch = optimizer["batch"]
  assert (config.batch_size, config.micro_batches) == (batch, 1)
  assert config.num_steps == steps == images // batch * epochs
  opt = config.optimizer
  assert (opt.name, opt.learning_rate) == (optimizer["name"], optimizer["learning_rate"])
  if opt.name == "sgd":
    assert (opt.momentum, opt.nesterov) == (0.9, False)
  else:  # PyTorch's AdamW defaults.
    assert (opt.b1, opt.b2) == (0.9, 0.999)
  assert (opt.weight_decay, opt.head_weight_decay, opt.head_lr_scale) == (weight_decay, None, 1.0)
  assert opt.warmup_steps == images // batch * optimizer["warmup_epochs"]
  assert (opt.decay_power, opt.grad_clip_norm) == (2.0, 5.0)
  assert config.compute_dtype == "bfloat16" and config.eval.compute_dtype == "float32"
  assert config.input.random_flip and config.eval.flip
  assert config.eval.bins == ("/data/set/lfw.bin", "/data/set/cfp_fp.bin",
                              "/data/set/agedb_30.bin")
  assert config.eval_every == config.checkpoint_every == VERBOSE.get(name, 2000)
  config.batch_size = batch // 4  # Same epochs, four times the steps (and warm-up steps).
  assert config.num_steps == images // (batch // 4) * epochs
  assert opt.warmup_steps == images // (batch // 4) * optimizer["warmup_epochs"]
  config.num_steps = 1000  # A shorter run warms up for the same share of its steps.
  assert opt.warmup_steps == 1000 * optimizer["warmup_epochs"] // epochs


def test_recipe_needs_the_dataset_folder():
  with pytest.raises(ValueError, match="needs the dataset folder"):
    load_config(os.path.join(RECIPES, "ms1mv3_r50.py"), None)
  assert recipes.parse_arg("/a,b/ms1m,quick") == ("/a,b/ms1m", True)
  assert recipes.parse_arg("/a,b/ms1m") == ("/a,b/ms1m", False)
  with pytest.raises(ValueError, match="needs the dataset folder"):  # An empty folder name.
    recipes.parse_arg("")


@pytest.mark.parametrize("name,model", [
    ("ms1mv3_r50", "iresnet18"), ("glint360k_r100", "iresnet18"), ("ms1mv3_mbf", "mobilefacenet"),
    ("webface42m_vit_s_pfc", "vit_t")])
def test_quick_mode_is_a_small_float32_run_of_the_same_recipe(name, model):
  # As recipes.arcface_torch says: IResNet-18, or the same MobileFaceNet or ViT-T, at 32x32
  # with a 64-d embedding, 20 steps of 64 images, in float32; the same loss, head and data.
  path = os.path.join(RECIPES, f"{name}.py")
  full, config = load_config(path, "/data/set"), load_config(path, "/data/set,quick")
  assert (config.model.name, config.model.embedding_dim) == (model, 64)
  assert (config.data.path, config.data.image_shape) == ("/data/set", (32, 32, 3))
  assert (config.num_steps, config.batch_size, config.compute_dtype) == (20, 64, "float32")
  assert config.loss.to_dict() == full.loss.to_dict()
  assert config.engine.sample_rate == full.engine.sample_rate
  assert config.eval.bins == full.eval.bins


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


def test_vit_recipe_quick_mode_traces_a_micro_batched_adamw_step(tmp_path):
  config = load_config(os.path.join(RECIPES, "webface42m_vit_l_pfc.py"), f"{tmp_path},quick")
  assert (config.model.name, config.model.kwargs.to_dict()) == ("vit_t", dict(
      drop_path_rate=0.05, mask_ratio=0.1))
  assert config.optimizer.warmup_steps == 2  # 4 of 40 epochs, of 20 steps.
  config.num_steps = 100
  assert config.optimizer.warmup_steps == 10
  config.micro_batches, config.eval.bins = 2, ()
  mesh = sharding_lib.make_mesh(config)
  for name in ("train.rec", "train.idx"):  # check_config looks for them; nothing reads them.
    (tmp_path / name).touch()
  train_lib.check_config(config, mesh)
  # optax's Adam bias correction raises a float to the int32 step count: standard promotion (as
  # train.py runs), not the tests' strict one.
  with jax.set_mesh(mesh), jax.numpy_dtype_promotion("standard"):
    experiment, state = train_lib.create_train_state(config, mesh, 100, (32, 32, 3),
                                                     abstract=True)
    batch = {"image": jax.ShapeDtypeStruct((64, 32, 32, 3), np.uint8,
                                           sharding=experiment.batch_sharding),
             "label": jax.ShapeDtypeStruct((64,), np.int32, sharding=experiment.batch_sharding)}
    new_state, metrics = jax.eval_shape(
        lambda s, b: train_lib.train_step(experiment, s, b), state, batch)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state) == jax.tree.map(
      lambda a: (a.shape, a.dtype), state)
  assert metrics["loss"].shape == ()
