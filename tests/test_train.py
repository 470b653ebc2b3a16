"""The training loop: every config runs, loss falls, kill -9 resumes exactly, 8 devices = 1."""

import dataclasses
import functools
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import PIL.Image
import pytest
from flax import nnx

import margins
from margins import checkpoints
from margins import data as margins_data
from margins import eval_lib
from margins import evaluation
from margins import parallel
from margins import run_log
from margins import sharding as sharding_lib
from margins import train_lib
from margins import train_state
from margins.losses import margin as margin_lib
from tests import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load_config(path: str, arg: str | None = "quick") -> ml_collections.ConfigDict:
  return train_lib.config_from_file(path, arg)


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def losses_by_step(workdir: str) -> dict[int, float]:
  return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


def tiny(config: ml_collections.ConfigDict, num_steps: int = 2) -> ml_collections.ConfigDict:
  config.num_steps = num_steps
  config.log_every = 1
  config.checkpoint_every = num_steps
  config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, num_steps - 1)
  config.eval.num_pairs = 100
  return config


def digits_batch(config: ml_collections.ConfigDict,
                 size: int) -> tuple[margins_data.ArraySource, dict]:
  """``(source, batch)``: the digits training source at ``config``'s image size and a batch of
  its first ``size`` images (uint8, as the pipeline's) and labels."""
  source = margins_data.digits("open_train", image_size=config.data.image_size)
  return source, {"image": source.images[:size],
                  "label": jnp.asarray(source.labels[:size])}


def test_every_config_refuses_an_argument_it_does_not_take():
  # A mistyped ":quik" used to run the full experiment (IResNet-50 on 100k classes for the
  # synthetic config).
  for path in CONFIGS:
    with pytest.raises(ValueError, match="Unknown config argument 'quik': this config takes "
                                         "none or 'quick'"):
      load_config(path, "quik")
    assert load_config(path, None).num_steps > load_config(path).num_steps
  # train.py's spelling, "<path>:<arg>", reads the same; a missing file is named.
  path = os.path.join(ROOT, "configs", "digits_arcface.py")
  assert train_lib.config_from_file(f"{path}:quick") == load_config(path)
  recipe = os.path.join(ROOT, "configs", "recipes", "ms1mv3_r50.py")  # Its argument: a path.
  assert train_lib.config_from_file(f"{recipe}:gs://bucket/ms1mv3,quick").data.path == (
      "gs://bucket/ms1mv3")
  with pytest.raises(FileNotFoundError, match="No config file 'configs/no_such.py'"):
    train_lib.config_from_file("configs/no_such.py:quick")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p)[:-3])
def test_every_config_runs_in_quick_mode(path, tmp_path):
  config = tiny(load_config(path))
  if config.model.name.startswith("iresnet"):
    # Running the IResNet at quick mode's batch (64) and 128 evaluation images took most of a
    # minute on two CPU cores; every part of the run is still there at a quarter of the images
    # (two per device and step, two per held-out identity).
    config.batch_size, config.data.eval_images, config.eval.batch_size = 16, 32, 32
  final = train_lib.train_and_evaluate(config, str(tmp_path))
  metrics = read_metrics(str(tmp_path))
  assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
  assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
  assert 0 <= final["open/verification_accuracy"] <= 1
  assert np.isfinite(final["open/auc"]) and 0 <= final["open/eer"] <= 1
  assert os.path.isdir(tmp_path / "checkpoints" / "2")
  assert int(train_lib.restore(str(tmp_path))[1].step) == 2  # The plain softmax's run too.
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert os.path.exists(tmp_path / "roc.png")
  if config.model.embedding_dim in (2, 3):
    assert os.path.exists(tmp_path / "features_open.png")
  if config.data.name == "digits":  # The plots' legends name the digits (open-set label 0: 6).
    assert final["_class_names"] == {"closed": list("012345"), "open": list("6789")}


@pytest.mark.parametrize("name", list(train_lib.MARGINS))
def test_a_step_returns_the_state_types_it_takes(name):
  # Else the second step compiles the program again (a weakly typed leaf coming back strongly
  # typed did, for every run, until the margin's Python floats were made arrays of their dtype).
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")))
  config.loss = ml_collections.ConfigDict({"name": name})
  if name == "subcenter_arcface":
    config.loss.subcenters = 3
  source, batch = digits_batch(config, config.batch_size)
  experiment, state = train_lib.create_train_state(config, sharding_lib.make_mesh(config),
                                                   source.num_classes, source.image_shape)
  new_state, _ = jax.eval_shape(functools.partial(train_lib.train_step, experiment), state,
                                jax.device_put(batch, experiment.batch_sharding))
  def types(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype, a.weak_type), tree)
  assert types(new_state) == types(state)


def test_digits_arcface_learns(tmp_path):
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.num_steps, config.log_every = 60, 10
  final = train_lib.train_and_evaluate(config, str(tmp_path))
  losses = losses_by_step(str(tmp_path))
  assert losses[60] < losses[10] - 0.5, losses
  assert final["closed/accuracy"] > 0.4  # 6 classes: chance is 1/6.
  assert final["open/auc"] > 0.6  # Held-out digits: chance is 0.5.


@pytest.mark.parametrize("open_flip", [False, True])
def test_log_lines_say_accuracy_flip_when_the_open_set_is_flip_tested(open_flip):
  issame = np.arange(40) % 2 == 0
  result = evaluation.evaluate_verification(
      np.random.default_rng(0).normal(size=(80, 4)), issame, num_folds=2)
  lines = run_log.summary_lines(
      {"_results": {"open": (None, None, result), "lfw": (None, None, result)}},
      open_flip=open_flip)
  assert [line.split(":")[0] for line in lines if "Accuracy" in line] == [
      "[open] Accuracy-Flip" if open_flip else "[open] Accuracy", "[lfw] Accuracy-Flip"]


def test_log_lines_name_only_the_sets_whose_embeddings_are_not_finite():
  issame = np.arange(40) % 2 == 0
  result = evaluation.evaluate_verification(
      np.random.default_rng(0).normal(size=(80, 4)), issame, num_folds=2)
  lines = run_log.summary_lines(
      {"closed/accuracy": 0.5, "open/auc": 0.75, "lfw/non_finite_embeddings": 12,
       "_results": {"closed": (None, None), "open": (None, None, result)}}, open_flip=True)
  assert lines[0] == "[closed set] accuracy: 0.5000"
  assert [line for line in lines if "not evaluated" in line] == [
      "[lfw] not evaluated: 12 of its embeddings are not finite (NaN or infinite: a float16 "
      "forward pass that overflowed?)"]
  assert lines[-1].startswith("[lfw] not evaluated")


def test_float16_run_learns_and_restores_its_loss_scale(tmp_path):
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.compute_dtype = "float16"
  config.num_steps, config.log_every, config.checkpoint_every = 60, 1, 60
  final = train_lib.train_and_evaluate(config, str(tmp_path))
  metrics = [m for m in read_metrics(str(tmp_path)) if "loss" in m]
  losses = {m["step"]: m["loss"] for m in metrics}
  # One batch's loss is noisy (ArcFace's on the digits first rises): the last ten against the
  # first step's.
  assert np.mean([losses[step] for step in range(51, 61)]) < losses[1] - 1.0, losses
  assert final["open/auc"] > 0.6
  assert all(m["loss_scale"] > 1 for m in metrics)
  _, state = train_lib.restore(str(tmp_path))
  assert state.loss_scale.scale.dtype == jnp.float32 and state.loss_scale.scale >= 1
  # It evaluated in float32, as margins.evaluate does: its figures are those of the checkpoint.
  experiment, params = train_lib.restore(str(tmp_path), parts="params", compute_dtype="float32")
  _, sources = train_lib.make_sources(config.data)
  with jax.set_mesh(experiment.mesh):
    again = eval_lib.evaluate(
        experiment, params, {**sources, "bins": {}},
        embed_fn=jax.jit(functools.partial(eval_lib.embed, experiment)),
        scores_fn=jax.jit(functools.partial(eval_lib.class_scores, experiment)))
  for name in ("closed/accuracy", "open/auc", "open/xnorm",
               "open/mean_average_precision_at_r"):
    assert again[name] == pytest.approx(final[name], rel=1e-6), name


def _schedule_counts(opt_state) -> list[int]:
  def is_schedule(node):
    return isinstance(node, optax.ScaleByScheduleState)

  return [int(s.count) for s in jax.tree.leaves(opt_state, is_leaf=is_schedule)
          if is_schedule(s)]


def test_float16_loss_scale_skips_overflows_halves_and_grows():
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.loss_scale = dict(initial=2.0**30, growth_interval=2)  # Overflows float16 at first.
  source, batch = digits_batch(config, 64)
  steps, states = {}, {}
  for dtype in ("float32", "float16"):
    config.compute_dtype = dtype
    mesh = sharding_lib.make_mesh(config)
    experiment, states[dtype] = train_lib.create_train_state(config, mesh, source.num_classes,
                                                             source.image_shape)
    steps[dtype] = jax.jit(lambda s, b, e=experiment: train_lib.train_step(e, s, b))
    batch = jax.device_put(batch, experiment.batch_sharding)
  state = states["float16"]
  assert float(state.loss_scale.scale) == 2.0**30 and states["float32"].loss_scale is None
  skipped = 0
  while True:  # Each overflow leaves the parameters and the optimizer's moments as they were.
    scale = float(state.loss_scale.scale)
    new, metrics = steps["float16"](state, batch)
    assert float(metrics["loss_scale"]) == scale
    if int(metrics["skipped"]) == skipped:  # The count of the run's skipped steps.
      break
    skipped += 1
    assert int(metrics["skipped"]) == int(new.skipped_steps) == skipped
    assert float(new.loss_scale.scale) == scale / 2 and int(new.loss_scale.finite_steps) == 0
    jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
    # ... but the learning-rate schedules count the step, as the step counter does.
    assert _schedule_counts(new.opt_state) == [skipped] * 2 and int(new.step) == skipped
    state = new
  assert 5 <= skipped < 30 and int(new.loss_scale.finite_steps) == 1
  # The first finite step's update is the float32 step's from the same state (the same
  # parameters, the same step count): the gradients were unscaled.
  before = states["float32"].replace(step=state.step, opt_state=state.opt_state)
  float32_state, _ = steps["float32"](before, batch)
  for name in ("backbone", "head"):
    update = jax.tree.leaves(jax.tree.map(jnp.subtract, new.params[name], state.params[name]))
    expected = jax.tree.leaves(jax.tree.map(jnp.subtract, float32_state.params[name],
                                            before.params[name]))
    update, expected = (np.concatenate([np.ravel(a) for a in t]) for t in (update, expected))
    assert np.linalg.norm(update) == pytest.approx(np.linalg.norm(expected), rel=0.05)
    assert update @ expected / np.linalg.norm(update) / np.linalg.norm(expected) > 0.99
  # A second finite step in a row doubles the scale.
  state = new
  new, metrics = steps["float16"](state, batch)
  assert int(metrics["skipped"]) == skipped
  assert float(new.loss_scale.scale) == 2 * scale and int(new.loss_scale.finite_steps) == 0


def test_float16_skipped_steps_are_counted_and_checkpointed(tmp_path):
  # Each overflow halves the scale (no growth here): each line's ``skipped`` counts every skipped
  # step of the run so far, not one step in ``log_every``, and the count is checkpointed: a run
  # resumed from a checkpoint saved between two lines counts the skips before it.
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")), num_steps=8)
  config.compute_dtype, config.log_every = "float16", 4
  config.checkpoint_every, config.keep_checkpoints = 2, 4
  config.loss_scale = dict(initial=2.0**20, growth_interval=1000)
  train_lib.train_and_evaluate(config, str(tmp_path))
  counts = [m["skipped"] for m in read_metrics(str(tmp_path)) if "skipped" in m]
  _, state = train_lib.restore(str(tmp_path))
  halvings = np.log2(2.0**20 / float(state.loss_scale.scale))
  assert halvings >= 2 and counts[-1] == halvings == int(state.skipped_steps)
  assert int(train_lib.restore(str(tmp_path), step=2)[1].skipped_steps) >= 1
  # As if the run had stopped after saving step 2, before its first line (step 4).
  for step in (4, 6, 8):
    shutil.rmtree(tmp_path / "checkpoints" / str(step))
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert [m["skipped"] for m in read_metrics(str(tmp_path)) if "skipped" in m] == counts


def test_eight_devices_sharded_and_chunked_steps_equal_one_device_dense_step():
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.center_loss.weight = 0.01
  source, batch = digits_batch(config, 64)
  results = []
  # chunked on 8 devices: data parallel, W whole on each device, the batch split over a 2 x 4
  # mesh's two axes.
  for shape, axis_names, kind in (((1,), ("data",), "dense"), ((8,), ("data",), "sharded"),
                                  ((2, 4), ("hosts", "local"), "chunked")):
    config.mesh.shape, config.mesh.axis_names = shape, axis_names
    config.engine.kind, config.engine.chunk_size = kind, 2
    mesh = sharding_lib.make_mesh(config)
    experiment, state = train_lib.create_train_state(config, mesh, source.num_classes,
                                                     source.image_shape)
    global_batch = jax.device_put(batch, experiment.batch_sharding)
    step = jax.jit(lambda s, b: train_lib.train_step(experiment, s, b)).lower(
        state, global_batch).compile()
    state, metrics = step(state, global_batch)
    if kind == "sharded":  # W, its momentum and the centres live split over the 8 devices,
      # and no collective of the step moves their rows (16: 10 classes padded for 8 devices).
      for rows in state.params["head"], state.centers:
        assert rows.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, jax.P("data")), 2)
      collectives = sharding_lib.collectives(step.as_text())
      assert not [shape for _, _, shapes in collectives for shape in shapes
                  if shape.startswith("f32[16,")], collectives
    if kind == "chunked":  # The engine's data-parallel program: W's gradient is summed once,
      # after the chunk loops, and nothing crosses devices chunk by chunk (Auto mesh axes would
      # sum each chunk's gradient inside the loop).
      collectives = sharding_lib.collectives(step.as_text())
      assert {computation for computation, _, _ in collectives} == {"ENTRY"}, collectives
      head_sums = [s for _, op, shapes in collectives for s in shapes
                   if op == "all-reduce" and s == f"f32[{source.num_classes},32]"]
      assert len(head_sums) == 1, collectives
    params = jax.device_get(state.params)
    params["head"] = params["head"][:source.num_classes]  # Without the padding rows.
    params["centers"] = jax.device_get(state.centers)[:source.num_classes]
    results.append((params, float(metrics["loss"])))
  (one, one_loss), *others = results
  for eight, eight_loss in others:
    assert one_loss == pytest.approx(eight_loss, rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), one, eight)


def test_backbone_is_the_seeded_model_replicated_on_every_device():
  # The backbone's parameters and state come from one program on the host's CPU, then go to the
  # mesh: each device holds the whole model, the one the seed builds outside any program.
  config = train_lib.default_config()
  config.engine.kind = "sharded"
  mesh = sharding_lib.make_mesh(config)
  image_shape = (8, 8, 1)
  _, state = train_lib.create_train_state(config, mesh, 10, image_shape)
  model = margins.models.create(
      config.model.name, rngs=nnx.Rngs(config.seed), embedding_dim=config.model.embedding_dim,
      input_size=image_shape[:2], in_channels=1, **config.model.kwargs)
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  expected = (params, model_state)
  created = (state.params["backbone"], state.model_state)
  assert jax.tree.structure(created) == jax.tree.structure(expected)
  for leaf, value in zip(jax.tree.leaves(created), jax.tree.leaves(expected)):
    assert leaf.sharding.is_fully_replicated and len(leaf.addressable_shards) == 8
    assert leaf.sharding.mesh.shape == mesh.shape
    np.testing.assert_allclose(leaf, value, rtol=1e-6, atol=1e-7)
  assert state.params["head"].sharding.spec == jax.P("data")


def test_sharded_head_resumes_and_restores_on_another_device_count(tmp_path):
  # 6 classes: W has 6 rows split over 2 devices, 8 over 8 (2 padding rows that never score);
  # so have the centres of a center loss, split beside W.
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")), num_steps=4)
  config.checkpoint_every = 2
  config.engine.kind, config.engine.chunk_size = "sharded", 2
  config.center_loss.weight = 0.01
  config.mesh.shape = (2,)
  whole, moved = tmp_path / "whole", tmp_path / "moved"
  train_lib.train_and_evaluate(config, str(whole))
  shutil.copytree(whole, moved)
  shutil.rmtree(moved / "checkpoints" / "4")
  config.mesh.shape = (8,)
  train_lib.train_and_evaluate(config, str(moved))  # Resumes from step 2 with W padded.
  want, got = losses_by_step(str(whole)), losses_by_step(str(moved))
  np.testing.assert_allclose([got[3], got[4]], [want[3], want[4]], rtol=1e-5)
  (whole_head, whole_centers), (moved_head, moved_centers) = (
      (np.asarray(state.params["head"]), np.asarray(state.centers)) for state in (
          train_lib.restore(str(workdir))[1] for workdir in (whole, moved)))
  assert whole_head.shape == moved_head.shape == whole_centers.shape == (8, 32)
  np.testing.assert_array_equal(whole_head[6:], 0)  # Padded on the 8 devices.
  np.testing.assert_allclose(moved_head[:6], whole_head[:6], rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(whole_centers[6:], 0)
  np.testing.assert_allclose(moved_centers[:6], whole_centers[:6], rtol=1e-4, atol=1e-6)
  assert np.abs(whole_centers[:6]).sum() > 0  # They moved.
  # The model alone, without the optimizer state: the same 6 rows, padded to 8 the same way.
  model = train_lib.restore(str(whole), parts="params")[1]
  assert model.opt_state is None and model.loss_scale is None
  np.testing.assert_array_equal(model.params["head"], whole_head)
  # Back to 2 devices: the 8 rows are truncated to 6; any other change of shape is an error.
  config.mesh.shape = (2,)
  source, _ = train_lib.make_sources(config.data)
  with checkpoints.checkpoint_manager(str(moved), config) as manager:
    for dim, error in ((32, None), (16, "does not fit this config")):
      config.model.embedding_dim = dim
      _, abstract = train_lib.create_train_state(
          config, sharding_lib.make_mesh(config), source.num_classes, source.image_shape,
          abstract=True)
      if error:
        with pytest.raises(ValueError, match=error):
          checkpoints.restore_checkpoint(manager, 4, abstract)
        continue
      state = checkpoints.restore_checkpoint(manager, 4, abstract)
      np.testing.assert_array_equal(state.params["head"], moved_head[:6])
      np.testing.assert_array_equal(state.centers, moved_centers[:6])
      assert state.centers.sharding.spec == jax.P("data")  # Split beside W.


def test_restore_builds_missing_centres_split_beside_a_sharded_head(tmp_path):
  # A checkpoint saved without a center loss, read under a config with one (config.json as a
  # resume that added it leaves it): the centres start as a new run's on this mesh would, with
  # W's padded rows (6 classes: 8 on the 8 devices) and split like W.
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")), num_steps=1)
  config.engine.kind, config.engine.chunk_size = "sharded", 2
  config.mesh.shape = (2,)
  train_lib.train_and_evaluate(config, str(tmp_path))
  saved = json.loads((tmp_path / "config.json").read_text())
  saved["center_loss"]["weight"] = 0.01
  (tmp_path / "config.json").write_text(json.dumps(saved))
  state = train_lib.restore(str(tmp_path))[1]
  assert state.centers.shape == state.params["head"].shape == (8, 32)
  assert state.centers.sharding.spec == state.params["head"].sharding.spec == jax.P("data")
  np.testing.assert_array_equal(state.centers, 0.0)


def test_checkpoints_write_small_replicated_arrays_whole_compiling_nothing(tmp_path,
                                                                          monkeypatch):
  # orbax's default splits an array replicated over the devices among them, each share cut out
  # by a program compiled for its shape and offset (136 for IResNet-50's first save on 8
  # devices). The run's checkpoints split only shares of MIN_REPLICA_SLICE_BYTES or more.
  mesh = jax.make_mesh((8,), ("devices",))
  values = {"replicated": np.arange(8 * 321, dtype=np.float32).reshape(8, 321),
            "split": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
  state = {"replicated": jax.device_put(values["replicated"], jax.NamedSharding(mesh, jax.P())),
           "split": jax.device_put(values["split"], jax.NamedSharding(mesh, jax.P("devices")))}
  compiled = []

  def on_compile(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(event)

  def programs_compiled_to_save(workdir):
    compiled.clear()
    with checkpoints.checkpoint_manager(str(workdir), ml_collections.ConfigDict(
        {"keep_checkpoints": 1})) as manager:
      checkpoints.save(manager, 1, state)
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "1" / "state")
    jax.tree.map(np.testing.assert_array_equal, restored, values)
    return len(compiled)

  jax.monitoring.register_event_duration_secs_listener(on_compile)
  try:
    assert programs_compiled_to_save(tmp_path / "whole") == 0
    monkeypatch.setattr(checkpoints, "MIN_REPLICA_SLICE_BYTES", 0)  # orbax's default
    assert programs_compiled_to_save(tmp_path / "split") == 8  # One per device's share.
  finally:
    jax.monitoring.unregister_event_duration_listener(on_compile)


def test_checkpoint_manager_keeps_the_latest_keep_checkpoints_steps(tmp_path):
  # config.keep_checkpoints = 2: of steps 1 to 4 saved in turn, 3 and 4 stay on disk.
  state = {"w": jnp.arange(3.0)}
  config = ml_collections.ConfigDict({"keep_checkpoints": 2})
  with checkpoints.checkpoint_manager(str(tmp_path), config) as manager:
    for step in range(1, 5):
      checkpoints.save(manager, step, jax.tree.map(lambda x, s=step: x + s, state))
    manager.wait_until_finished()
  assert sorted(int(name) for name in os.listdir(tmp_path / "checkpoints")) == [3, 4]
  restored = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "4" / "state")
  np.testing.assert_array_equal(restored["w"], np.arange(3.0) + 4)


def test_checkpoint_saved_before_a_state_field_existed_restores(tmp_path):
  # A float32 run saved before TrainState had ``loss_scale``: its checkpoint has no such entry.
  # Saved as runs did then, with orbax's standard handler and its default for replicated arrays.
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  source, _ = train_lib.make_sources(config.data)
  mesh = sharding_lib.make_mesh(config)
  _, state = train_lib.create_train_state(config, mesh, source.num_classes, source.image_shape)
  old = {field.name: getattr(state, field.name) for field in dataclasses.fields(state)
         if field.name != "loss_scale"}
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(old)))
  with checkpoints.checkpoint_manager(str(tmp_path), config) as manager:
    _, abstract = train_lib.create_train_state(config, mesh, source.num_classes,
                                               source.image_shape, abstract=True)
    asked = []  # The fields a new run would start: asked for only where one differs.
    def new_fields(names):
      asked.append(names)
      return {name: getattr(initial, name) for name in names}
    restored = checkpoints.restore_checkpoint(manager, 3, abstract, new_fields=new_fields)
    assert isinstance(restored, train_state.TrainState) and restored.loss_scale is None
    assert not asked
    jax.tree.map(np.testing.assert_array_equal, (restored.params, restored.opt_state),
                 (state.params, state.opt_state))
    config.compute_dtype = "float16"  # Its loss scale is not in the checkpoint.
    _, abstract = train_lib.create_train_state(config, mesh, source.num_classes,
                                               source.image_shape, abstract=True)
    with pytest.raises(ValueError, match="does not fit this config"):
      checkpoints.restore_checkpoint(manager, 3, abstract)
    # The training loop passes its new state's fields: the loss scale starts from it.
    _, initial = train_lib.create_train_state(config, mesh, source.num_classes,
                                              source.image_shape)
    restored = checkpoints.restore_checkpoint(manager, 3, abstract, new_fields=new_fields)
    assert restored.loss_scale is initial.loss_scale
    assert restored.skipped_steps is initial.skipped_steps
    assert asked == [("loss_scale", "skipped_steps")]
    # A float16 run saved before TrainState had ``skipped_steps``: the count starts at zero.
    old = {field.name: getattr(restored, field.name) for field in dataclasses.fields(restored)
           if field.name != "skipped_steps"}
    manager.save(4, args=ocp.args.Composite(state=ocp.args.PyTreeSave(old)))
    manager.wait_until_finished()
    asked.clear()
    restored = checkpoints.restore_checkpoint(manager, 4, abstract, new_fields=new_fields)
    assert asked == [("skipped_steps",)] and int(restored.skipped_steps) == 0
    assert float(restored.loss_scale.scale) == float(initial.loss_scale.scale)


def test_run_resumes_with_float16_or_a_center_loss_switched_on_or_off(tmp_path, monkeypatch):
  # The checkpoint lacks the loss scale or the centres the new config needs (they start as a
  # new run's), or holds ones it no longer uses (not kept); so does a step that ``restore`` reads
  # from the run's workdir after it (config.json is the new config's).
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")), num_steps=1)
  config.mesh.shape = (1,)
  asked = []  # The optional fields a new run's are asked for: only those that differ.
  restore_checkpoint = checkpoints.restore_checkpoint
  def spy(*args, new_fields, **kwargs):
    return restore_checkpoint(*args, **kwargs, new_fields=lambda names: asked.append(
        names) or new_fields(names))
  monkeypatch.setattr(checkpoints, "restore_checkpoint", spy)
  read = []  # The fields read from the checkpoint by each restore.
  restore_fields = checkpoints._restore
  monkeypatch.setattr(checkpoints, "_restore", lambda manager, step, fields, rows_differ: (
      read.append(set(fields)) or restore_fields(manager, step, fields, rows_differ)))
  for num_steps, (dtype, center_weight) in enumerate(
      [("float32", 0.0), ("float16", 0.01), ("float32", 0.0)], start=1):
    config.num_steps = config.checkpoint_every = num_steps
    config.compute_dtype, config.center_loss.weight = dtype, center_weight
    train_lib.train_and_evaluate(config, str(tmp_path))
    # The resume (none on the first run) and each ``restore`` of a step saved under the other
    # config ask for both fields; the latest step, saved under this config, builds none (no
    # ``[C, D]`` of zeros for centres that the checkpoint holds).
    both = [("loss_scale", "skipped_steps", "centers")]
    assert asked == ([] if num_steps == 1 else both)
    state = train_lib.restore(str(tmp_path))[1]
    assert asked == ([] if num_steps == 1 else both)
    assert int(state.step) == num_steps
    assert (state.loss_scale is None) == (config.compute_dtype == "float32")
    assert (state.skipped_steps is None) == (config.compute_dtype == "float32")
    assert (state.centers is None) == (not config.center_loss.weight)
    if state.loss_scale is not None:  # One float16 step from the initial scale.
      assert float(state.loss_scale.scale) in (2.0**15, 2.0**16)
      assert int(state.skipped_steps) == (float(state.loss_scale.scale) == 2.0**15)
    if state.centers is not None:  # From zero, moved by one step.
      assert 0 < float(jnp.abs(state.centers).sum()) < 10
    if num_steps > 1:  # The step before, saved under the other config, restores under this one.
      earlier = train_lib.restore(str(tmp_path), step=num_steps - 1)[1]
      assert asked == both * 2
      assert not read[-1] & set(checkpoints.OPTIONAL_FIELDS)  # Stored ones dropped are not read.
      assert int(earlier.step) == num_steps - 1
      assert (earlier.loss_scale is None) == (config.compute_dtype == "float32")
      assert (earlier.skipped_steps is None) == (config.compute_dtype == "float32")
      assert (earlier.centers is None) == (not config.center_loss.weight)
      if earlier.loss_scale is not None:  # As in a new run.
        assert float(earlier.loss_scale.scale) == config.loss_scale.initial
        assert int(earlier.skipped_steps) == 0
      if earlier.centers is not None:
        np.testing.assert_array_equal(earlier.centers, 0.0)
      for parts in ("params", "backbone"):
        model = train_lib.restore(str(tmp_path), step=num_steps - 1, parts=parts)[1]
        jax.tree.map(np.testing.assert_array_equal, model.params["backbone"],
                     earlier.params["backbone"])
    asked.clear()


def test_compute_dtype_reaches_the_heads_matmuls_in_every_engine():
  # config.compute_dtype is the backbone's arithmetic and the head's matmul inputs (float32
  # accumulation): a float16 or bfloat16 run whose head multiplied in float32 trains the same
  # to a tolerance, only slower and larger, which no training test tells.
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  mesh = sharding_lib.make_mesh(config)
  for kind in ("dense", "chunked", "sharded"):
    for dtype, expected in (("float32", None), ("bfloat16", jnp.bfloat16),
                            ("float16", jnp.float16)):
      config.engine.kind, config.compute_dtype = kind, dtype
      engine = train_lib.make_engine(config, mesh)
      assert engine.matmul_dtype == (None if expected is None else jnp.dtype(expected)), (
          kind, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_only_float16_has_a_loss_scale(dtype):
  # The optional fields a new run (and restore's step saved under another config) starts from.
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.mesh.shape, config.compute_dtype = (1,), dtype
  _, state = train_lib.create_train_state(config, sharding_lib.make_mesh(config), 10, (28, 28, 1),
                                          abstract=True)
  assert (state.loss_scale is None) == (state.skipped_steps is None) == (dtype != "float16")


def test_a_set_smaller_than_the_eval_batch_is_embedded_in_a_batch_of_its_size():
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.eval.batch_size = 4096
  source = margins_data.digits("open_test", image_size=16)
  small = margins_data.ArraySource(source.images[:11], source.labels[:11], num_classes=10)
  experiment, state = train_lib.create_train_state(config, sharding_lib.make_mesh(config), 6,
                                                   source.image_shape)
  shapes = []
  embed = jax.jit(lambda s, x: eval_lib.embed(experiment, s, x))
  with jax.set_mesh(experiment.mesh):
    embeddings = eval_lib.compute_embeddings(
        experiment, state, small, flip=False,
        embed_fn=lambda s, x: shapes.append(x.shape[0]) or embed(s, x))
    want = embed(state, jnp.asarray(margins_data.normalize_images(small.images[:8])))
  assert shapes == [16] and embeddings.shape == (11, 32)  # 11 images, 8 devices: 16, not 4096.
  np.testing.assert_allclose(embeddings[:8], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flip", [False, True])
def test_evaluate_reports_each_held_out_set_as_its_embeddings_give(flip):
  # An untrained network, its head split over the 8 devices: 6 classes in 8 rows. The head is
  # set to a closed-set image's embedding per class, and its 2 padding rows, which no
  # prediction may take, to the mean of them all (the nearest row to most images). Checked
  # against NumPy and the brute-force retrieval.
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")))
  config.engine.kind, config.eval.flip = "sharded", flip
  mesh = sharding_lib.make_mesh(config)
  _, sources = train_lib.make_sources(config.data)
  experiment, state = train_lib.create_train_state(config, mesh, 6, (16, 16, 1))
  assert state.params["head"].shape[0] == 8
  embed = jax.jit(lambda x: eval_lib.embed(experiment, state, x))

  def embeddings(source, mirrored=False):  # Normalised as insightface does; mirrored: width.
    images = ((source.images / 255.0 - 0.5) / 0.5).astype(np.float32)
    with jax.set_mesh(mesh):
      return np.asarray(embed(images[:, :, ::-1] if mirrored else images), np.float64)

  closed, labels = embeddings(sources["closed"]), sources["closed"].labels
  head = np.concatenate([closed[[np.flatnonzero(labels == c)[0] for c in range(6)]],
                         np.tile(closed.mean(axis=0), (2, 1))])
  head = jax.device_put(head.astype(np.float32), state.params["head"].sharding)
  state = state.replace(params={**state.params, "head": head})
  with jax.set_mesh(mesh):
    metrics = eval_lib.evaluate(
        experiment, state, sources,
        embed_fn=jax.jit(functools.partial(eval_lib.embed, experiment)),
        scores_fn=jax.jit(functools.partial(eval_lib.class_scores, experiment)))
  # Closed set: the nearest of the 6 real classes' rows by cosine (ArcFace's score).
  cosines = reference.cosines(closed, np.asarray(head)[:6])
  predictions = np.argmax(cosines, axis=1)
  top_two = np.sort(cosines, axis=1)[:, -2:]
  assert np.min(top_two[:, 1] - top_two[:, 0]) > 1e-5  # No tie that float32 rounding could turn.
  assert np.mean(predictions == labels) > 0.3  # Well above chance (1/6): a real test.
  assert metrics["closed/accuracy"] == np.mean(predictions == labels)
  alone, mirrored = embeddings(sources["open"]), embeddings(sources["open"], mirrored=True)
  open_embeddings, open_labels, result = metrics["_results"]["open"]
  np.testing.assert_allclose(open_embeddings, alone + mirrored if flip else alone, rtol=1e-5,
                             atol=1e-6)
  norms = np.linalg.norm(np.concatenate([alone, mirrored] if flip else [alone]), axis=1)
  assert metrics["open/xnorm"] == pytest.approx(np.mean(norms), rel=1e-5)
  # In float64, as retrieval_metrics computes (float32 cosines of these embeddings tie).
  for name, value in reference.retrieval(open_embeddings.astype(np.float64),
                                         open_labels).items():
    assert metrics[f"open/{name}"] == pytest.approx(value, abs=1e-12), name
  # The logged verification metrics are the result's (plotted and printed from it).
  assert result.distances.size == config.eval.num_pairs
  for name, value in (("verification_accuracy", result.accuracy),
                      ("verification_accuracy_std", result.accuracy_std), ("auc", result.auc),
                      ("eer", result.eer), ("tar_at_far_0.001", result.tar_at_far[1e-3])):
    np.testing.assert_equal(metrics[f"open/{name}"], value, err_msg=name)


def test_evaluation_embeds_with_the_running_statistics_whatever_the_batch():
  # In evaluation mode a BatchNorm uses its running statistics: an image's embedding does not
  # depend on the images embedded with it (with the batch's statistics, it does).
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.model.kwargs.batch_norm = True
  experiment, state = train_lib.create_train_state(config, sharding_lib.make_mesh(config), 6,
                                                   (16, 16, 1))
  images = margins_data.digits("open_test", image_size=16).images[:16]
  embed = jax.jit(lambda x: eval_lib.embed(experiment, state, x))
  with jax.set_mesh(experiment.mesh):
    together, first, second = (np.asarray(embed(x)) for x in (images, images[:8], images[8:]))
  np.testing.assert_allclose(np.concatenate([first, second]), together, rtol=1e-5, atol=1e-6)


def test_an_embedding_with_one_coordinate_not_finite_is_counted():
  # A float16 forward pass can overflow in one coordinate only: the set is still refused (its
  # verification would otherwise fail later, stopping the run).
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  source = margins_data.digits("open_test", image_size=16)
  small = margins_data.ArraySource(source.images[:11], source.labels[:11], num_classes=10)
  experiment, state = train_lib.create_train_state(config, sharding_lib.make_mesh(config), 6,
                                                   source.image_shape)
  embed = jax.jit(lambda s, x: eval_lib.embed(experiment, s, x))

  def one_coordinate_nan(s, x):  # The first coordinate of the batch's first two rows.
    out = embed(s, x)
    rows, columns = jnp.arange(out.shape[0])[:, None] < 2, jnp.arange(out.shape[1])[None] == 0
    return jnp.where(rows & columns, jnp.nan, out)

  with jax.set_mesh(experiment.mesh):
    with pytest.raises(eval_lib.NonFiniteEmbeddings, match="^2 of 11 embeddings") as raised:
      eval_lib.compute_embeddings(experiment, state, small, flip=False,
                                  embed_fn=one_coordinate_nan)
  assert raised.value.count == 2


def test_partial_fc_sampling_resumes_exactly_and_freezes_unsampled_rows(tmp_path):
  # 512 classes over 2 devices, a quarter sampled per step (64 of each device's 256 rows, as
  # many as the 64 classes a batch can hold, so that sampling really happens).
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")), num_steps=4)
  config.data = dict(name="synthetic", num_classes=512, num_images=4096, image_shape=(16, 16, 1),
                     seed=0, eval_classes=8, eval_images=64)
  config.checkpoint_every, config.mesh.shape = 2, (2,)
  config.engine.update(kind="sharded", chunk_size=32, sample_rate=0.25, freeze_unsampled=True)
  assert parallel.sampled_count(256, 0.25) == 64 >= config.batch_size
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  train_lib.train_and_evaluate(config, str(whole))
  shutil.copytree(whole, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  train_lib.train_and_evaluate(config, str(resumed))
  assert read_metrics(str(resumed)) == read_metrics(str(whole))
  source, _ = train_lib.make_sources(config.data)
  mesh = sharding_lib.make_mesh(config)
  with jax.set_mesh(mesh):  # As training creates it (bit for bit).
    _, initial = train_lib.create_train_state(config, mesh, source.num_classes,
                                              source.image_shape)
  head, initial_head = (np.asarray(train_lib.restore(str(resumed))[1].params["head"]),
                        np.asarray(initial.params["head"]))
  never_sampled = np.all(head == initial_head, axis=1).sum()
  assert 0 < never_sampled < 512 * 0.75**3  # About 0.75**4 of the rows, left exactly as they were.


def _train_command(workdir, num_steps, checkpoint_every):
  return [sys.executable, os.path.join(ROOT, "train.py"),
          f"--config={os.path.join(ROOT, 'configs', 'digits_arcface.py')}:quick",
          f"--workdir={workdir}", f"--config.num_steps={num_steps}", "--config.log_every=1",
          f"--config.checkpoint_every={checkpoint_every}", "--config.eval.num_pairs=100"]


def test_only_w_its_optimizer_state_and_the_centres_may_change_rows_on_restore():
  # On another device count the padding rows of W, and of the centres split beside it, change;
  # an array elsewhere that happens to have W's shape (a backbone's kernel) must not be cut or
  # padded with them, nor may the centres' dimension change.
  shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32)  # noqa: E731
  def state(head_rows, kernel_rows, centre_rows, centre_dim=4, subcentres=()):
    return {"params": {"backbone": {"fc": {"kernel": shape(kernel_rows, 4)}},
                       "head": shape(head_rows, *subcentres, 4)},
            "opt_state": {"trace": {"head": shape(head_rows, *subcentres, 4)}},
            "centers": shape(centre_rows, centre_dim)}
  manager = types.SimpleNamespace(directory="/run/checkpoints")
  fits = lambda stored, wanted: checkpoints._check_fits(  # noqa: E731
      manager, 3, stored, wanted, wanted["params"]["head"].shape)
  assert fits(state(8, 6, 6), state(6, 6, 6))  # Rows of W and its momentum: fitted.
  # Beside sub-centres, W [rows, K, D]: the centres' rows change, their [D] stays.
  assert fits(state(8, 6, 8, subcentres=(3,)), state(6, 6, 6, subcentres=(3,)))
  # Which leaves have a row per class: the state's centres (an attribute, or a checkpoint's key)
  # beside any head, not a backbone's leaf that happens to be named so.
  key, attribute = jax.tree_util.DictKey, jax.tree_util.GetAttrKey
  for path in (attribute("centers"),), (key("centers"),):
    assert sharding_lib.is_class_rows(path, shape(6, 4), (6, 3, 4))
  assert not sharding_lib.is_class_rows(
      (attribute("params"), key("backbone"), key("centers")), shape(6, 4), (6, 4))
  assert fits(state(6, 6, 5), state(6, 6, 6))  # The centres' (5: saved before 2026-12-07).
  assert not fits(state(6, 6, 6), state(6, 6, 6))
  for stored in state(8, 8, 6), state(8, 6, 8, centre_dim=2):
    with pytest.raises(ValueError, match=r"Checkpoint 3 in /run/checkpoints does not fit"):
      fits(stored, state(6, 6, 6))


def test_checkpoint_with_leaves_the_config_lacks_does_not_fit():
  # A run saved with BatchNorm, resumed without it: every leaf the new state has fits, but the
  # checkpoint's BatchNorm would be dropped silently (orbax's partial restore ignores them).
  # Restoring part of a state (evaluation: partial) may leave leaves on disk.
  shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32)  # noqa: E731
  wanted = {"params": {"backbone": {"conv": shape(3, 4)}, "head": shape(6, 4)}}
  stored = {"params": {"backbone": {"conv": shape(3, 4), "norm": shape(4)}, "head": shape(6, 4)}}
  manager = types.SimpleNamespace(directory="/run/checkpoints")
  with pytest.raises(ValueError, match=r"does not fit this config: .* leaves only stored "
                                       r"\[\"\['params'\]\['backbone'\]\['norm'\]\"\]"):
    checkpoints._check_fits(manager, 3, stored, wanted, (6, 4))
  assert not checkpoints._check_fits(manager, 3, stored, wanted, (6, 4), partial=True)


def test_resuming_with_other_margin_settings_is_refused(tmp_path, monkeypatch):
  # The margin's settings live in the checkpointed state: a resume kept the stored ones while
  # config.json said otherwise.
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")), num_steps=1)
  train_lib.train_and_evaluate(config, str(tmp_path))
  written = (tmp_path / "config.json").read_text()
  config.num_steps = 2
  config.loss.scale, config.loss.margin = 4.0, 0.0
  # Nor is the training loop's manager made, whose removal of unfinished saves runs in a thread
  # that failed with a traceback when the refused process exited first (seen once in CI).
  managers, make_manager = [], checkpoints.checkpoint_manager
  monkeypatch.setattr(checkpoints, "checkpoint_manager", lambda *args, **kwargs: (
      managers.append(kwargs.get("remove_unfinished", False)) or make_manager(*args, **kwargs)))
  with pytest.raises(ValueError, match=r"config.loss sets \{'margin': 0.0, 'scale': 4.0\} "
                                       r"where the run in .* trained with \{'margin': 0.5, "
                                       r"'scale': 16.0\}; a resumed run keeps"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert managers == [False]
  assert (tmp_path / "config.json").read_text() == written  # Refused before anything changed.
  # Other data: W's rows are its classes. 8 classes where 6 trained would have resumed with
  # two rows of zeros (and 5 would have cut a trained class), silently.
  config.loss.scale, config.loss.margin = 16.0, 0.5
  data = (tmp_path / "data.json").read_text()
  for change, message in (
      (dict(open_set_train_classes=tuple(range(8))), r"8 classes of \(16, 16, 1\) images where"),
      (dict(image_size=12), r"6 classes of \(12, 12, 1\) images where")):
    config.data.update(change)
    with pytest.raises(ValueError, match=message + r" the run in .* trained on 6 classes of "
                                                   r"\(16, 16, 1\); a resumed run trains"):
      train_lib.train_and_evaluate(config, str(tmp_path))
    config.data.update(open_set_train_classes=tuple(range(6)), image_size=16)
  assert (tmp_path / "data.json").read_text() == data
  # As many classes, other images: digit 9 for digit 5 (W's row of 5 would train on 9s).
  config.data.update(open_set_train_classes=(0, 1, 2, 3, 4, 9))
  with pytest.raises(train_lib.ResumeMismatch, match=r"config.data gives \d+ images where the run "
                                                     r"in .* trained on \d+; a resumed run"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  config.data.update(open_set_train_classes=tuple(range(6)))
  # Clipping switched off: the optimizer's state has another structure. Named, where the
  # restore listed the state's leaves.
  config.optimizer.update(grad_clip_norm=None)
  with pytest.raises(train_lib.ResumeMismatch, match=r"these fields that shape it differ from "
                     r"the run's \(run's, given\): \{'config.optimizer.grad_clip_norm': "
                     r"\(5.0, None\)\}. Resume .* does not fit this config"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  config.optimizer.update(grad_clip_norm=5.0)
  # Another backbone or optimizer: named, where restoring into it listed every leaf of the state.
  for section, change, kept in (("model", dict(embedding_dim=16), "the backbone"),
                                ("optimizer", dict(name="adamw"), "the optimizer's state")):
    stored = config[section].to_dict()
    config[section].update(change)
    with pytest.raises(train_lib.ResumeMismatch, match=rf"config.{section} sets {change} where "
                       rf"the run in .* trained with .*; a resumed run keeps {kept} of"):
      train_lib.train_and_evaluate(config, str(tmp_path))
    config[section].update(stored)
  assert (tmp_path / "config.json").read_text() == written


def test_resuming_with_another_sphereface_lambda_schedule_is_allowed(tmp_path):
  # The schedule is read at each step, not kept in the checkpoint: a resumed run may change it
  # (anneal longer, say), where another margin is refused.
  config = load_config(os.path.join(ROOT, "configs", "digits_sphereface.py"))
  run_log.write_atomically(str(tmp_path / "config.json"), config.to_json_best_effort(indent=2))
  config.loss.lambda_schedule.gamma = 0.05
  train_lib._check_resumed_config(config, str(tmp_path))
  config.loss.margin = 3
  with pytest.raises(train_lib.ResumeMismatch, match=r"config.loss sets \{'margin': 3\} where"):
    train_lib._check_resumed_config(config, str(tmp_path))


def test_resuming_without_a_loss_field_the_run_set_is_refused(tmp_path):
  # A field the run's config.loss set and the given one leaves out takes the margin's default:
  # another margin (here ArcFace's gradient through cos(theta + m) where the run detached it).
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.loss.detach_margin = True
  run_log.write_atomically(str(tmp_path / "config.json"), config.to_json_best_effort(indent=2))
  config.loss = dict(name="arcface", scale=16.0, margin=0.5)
  with pytest.raises(train_lib.ResumeMismatch,
                     match=r"config.loss sets \{'detach_margin': None\} where .* trained with "
                           r"\{'detach_margin': True\}"):
    train_lib._check_resumed_config(config, str(tmp_path))


def test_data_and_bin_sets_are_read_before_the_state_is_built(tmp_path, monkeypatch):
  # A .bin that does not decode, or an identity folder without images, fails the run at once
  # (CannotStart: train.py prints its message alone), not after the backbone and its state are
  # built (minutes for a recipe's).
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")), num_steps=1)
  config.eval.bins = (str(tmp_path / "lfw.bin"),)
  (tmp_path / "lfw.bin").write_bytes(b"not a pickle")
  monkeypatch.setattr(train_lib, "create_train_state", None)  # Called: a TypeError.
  with pytest.raises(train_lib.CannotStart, match="lfw.bin"):
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  (tmp_path / "faces" / "alice").mkdir(parents=True)
  config.eval.bins = ()
  config.data = dict(name="image_folder", path=str(tmp_path / "faces"), image_shape=(16, 16, 1))
  with pytest.raises(train_lib.CannotStart, match="alice"):
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))


def test_an_unexpected_error_reading_the_data_reaches_the_other_processes(tmp_path, monkeypatch):
  # Only ValueError and OSError did: any other left the other processes waiting for a collective
  # until it timed out. One process alone raises it as it is.
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")), num_steps=1)
  monkeypatch.setattr(train_lib, "make_sources", lambda data: [][0])  # An IndexError.
  with pytest.raises(IndexError):
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  agreed = []

  def agree(config, workdir, train_source, error):  # As it does: the others learn, this raises.
    agreed.append(error)
    raise error

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(train_lib, "check_processes_agree", agree)
  with pytest.raises(IndexError):
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert len(agreed) == 1 and isinstance(agreed[0], IndexError)


def test_face_data_without_an_image_shape_take_the_first_images(tmp_path):
  # As the sources document; make_sources failed with "'NoneType' object is not iterable".
  for name in ("alice", "bob"):
    (tmp_path / name).mkdir()
    PIL.Image.new("RGB", (12, 10)).save(tmp_path / name / "0.png")
  for data in (dict(name="image_folder", path=str(tmp_path), image_shape=None),
               dict(name="image_folder", path=str(tmp_path))):
    train_source, _ = train_lib.make_sources(ml_collections.ConfigDict(data))
    assert tuple(train_source.image_shape) == (10, 12, 3) and train_source.num_classes == 2


def test_recordio_data_take_num_classes_from_the_config(tmp_path):
  # Files with neither `property` nor identity records could not be trained from train.py.
  rec, idx = str(tmp_path / "train.rec"), str(tmp_path / "train.idx")
  recordio = margins_data.recordio
  image = margins_data.image_folder.encode_image(np.zeros((4, 4, 3), np.uint8), image_format="png")
  with recordio.RecordIOWriter(rec, idx) as writer:
    for key, label in enumerate([0, 3]):
      writer.write(recordio.pack(recordio.IRHeader(0, label, key), image), key=key)
  data = dict(name="recordio", path=str(tmp_path), image_shape=None)
  with pytest.raises(ValueError, match="`num_classes` is needed"):
    train_lib.make_sources(ml_collections.ConfigDict(data))
  train_source, _ = train_lib.make_sources(ml_collections.ConfigDict(dict(data, num_classes=7)))
  assert train_source.num_classes == 7 and int(train_source[1]["label"]) == 3


def test_a_run_with_nothing_to_evaluate_says_so_and_writes_no_empty_lines(tmp_path, monkeypatch,
                                                                          capsys):
  # Face data have no held-out sets; with config.eval.bins=() the run wrote {"step": N} lines
  # with no metrics in them at each evaluation.
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")), num_steps=2)
  config.eval_every = config.log_every = 1
  make_sources = train_lib.make_sources
  monkeypatch.setattr(train_lib, "make_sources", lambda data: (make_sources(data)[0], {}))
  final = train_lib.train_and_evaluate(config, str(tmp_path))
  lines = read_metrics(str(tmp_path))
  assert [line["step"] for line in lines] == [1, 2] and all("loss" in line for line in lines)
  assert final == {"_plots": []}
  assert "Nothing to evaluate: config.data has no held-out sets" in capsys.readouterr().out


def test_checkpoint_saved_before_a_failing_evaluation_is_kept_and_the_evaluation_redone(
    tmp_path, monkeypatch):
  # The save is asynchronous; an error in the evaluation that follows it (out of memory, a bad
  # setting) left it unfinished, and orbax deletes unfinished checkpoints when the run restarts.
  # The resumed run does that evaluation first; metrics.jsonl then reads as if the run had not
  # failed, and so it does after a run that has nothing left to train is started again.
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")), num_steps=4)
  config.eval_every, config.checkpoint_every, config.log_every = 2, 2, 2
  train_lib.train_and_evaluate(config, str(tmp_path / "whole"))
  whole = read_metrics(str(tmp_path / "whole"))
  assert [line["step"] for line in whole if "closed/accuracy" in line] == [2, 4]
  evaluate = eval_lib.evaluate
  def fail(*args, **kwargs):
    raise RuntimeError("evaluation failed")
  monkeypatch.setattr(eval_lib, "evaluate", fail)
  with pytest.raises(RuntimeError, match="evaluation failed"):
    train_lib.train_and_evaluate(config, str(tmp_path / "failed"))
  assert os.listdir(tmp_path / "failed" / "checkpoints") == ["2"]  # Not 2.orbax-checkpoint-tmp.
  monkeypatch.setattr(eval_lib, "evaluate", evaluate)
  # As a save that a kill -9 cut short leaves it: ignored, and removed by the resumed run.
  unfinished = tmp_path / "failed" / "checkpoints" / "4.orbax-checkpoint-tmp-1765000000"
  (unfinished / "state").mkdir(parents=True)
  for _ in range(2):
    train_lib.train_and_evaluate(config, str(tmp_path / "failed"))
    assert read_metrics(str(tmp_path / "failed")) == whole
    assert sorted(os.listdir(tmp_path / "failed" / "checkpoints")) == ["2", "4"]


def test_evaluation_with_embeddings_that_are_not_finite_is_counted_and_the_run_goes_on(
    tmp_path, monkeypatch, capsys):
  # A float16 network whose forward pass overflowed at an evaluation stopped the run there, and
  # again at the same evaluation each time it was resumed. Here every embedding of step 1's
  # evaluation is NaN, and step 2's are the network's.
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")))
  config.eval_every = 1
  embed = eval_lib.embed
  monkeypatch.setattr(eval_lib, "embed", lambda experiment, state, images: jnp.where(
      state.step == 1, jnp.nan, embed(experiment, state, images)))
  final = train_lib.train_and_evaluate(config, str(tmp_path))
  evaluated = [line for line in read_metrics(str(tmp_path)) if "loss" not in line]
  sizes = {name: len(margins_data.digits(split, image_size=config.data.image_size))
           for name, split in (("closed", "open_val"), ("open", "open_test"))}
  assert evaluated[0] == {"step": 1, "closed/non_finite_embeddings": sizes["closed"],
                          "open/non_finite_embeddings": sizes["open"]}
  assert evaluated[1]["step"] == 2 and 0 < evaluated[1]["closed/accuracy"] <= 1
  assert 0 < evaluated[1]["open/auc"] <= 1
  assert not any("non_finite" in key for key in evaluated[1])
  assert final["closed/accuracy"] == evaluated[1]["closed/accuracy"]
  out = capsys.readouterr().out
  assert (f"[step 1] [closed] not evaluated: {sizes['closed']} of its embeddings are not "
          "finite (NaN or infinite: a float16 forward pass that overflowed?)") in out
  assert f"[step 1] [open] not evaluated: {sizes['open']} of its embeddings" in out


def _progress_on_a_fake_clock(monkeypatch):
  """``(now, reported, taking)``: the training loop's clock reads ``now[0]``; each progress line
  appends its ``(step, speed, seconds_left)`` to ``reported``; ``taking(fn, seconds)`` is ``fn``
  moving the clock on by ``seconds`` at each call."""
  now, reported = [0.0], []
  monkeypatch.setattr(train_lib, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
  progress_line = run_log.progress_line

  def spy(step, num_steps, metrics, speed, seconds_left):
    reported.append((step, speed, seconds_left))
    return progress_line(step, num_steps, metrics, speed, seconds_left)

  monkeypatch.setattr(run_log, "progress_line", spy)

  def taking(fn, seconds):
    def timed(*args, **kwargs):
      now[0] += seconds
      return fn(*args, **kwargs)
    return timed

  return now, reported, taking


def test_speed_and_eta_count_the_training_steps_only(tmp_path, monkeypatch):
  # On a clock that moves only while the run saves and evaluates, the steps take no time: any
  # reported speed short of that (or an ETA above zero) counted the saves or evaluations.
  now, reported, taking = _progress_on_a_fake_clock(monkeypatch)
  monkeypatch.setattr(eval_lib, "evaluate", taking(eval_lib.evaluate, 1000.0))
  monkeypatch.setattr(checkpoints, "save", taking(checkpoints.save, 1000.0))
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")), num_steps=3)
  config.eval_every = config.checkpoint_every = 1
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert [step for step, _, _ in reported] == [1, 2, 3] and now[0] == 6000.0
  assert all(speed > config.batch_size * 1e8 and seconds_left == 0
             for _, speed, seconds_left in reported), reported


def test_eta_is_the_steps_left_at_the_latest_speed(tmp_path, monkeypatch):
  # Each step takes 1 s (its batch is placed on the devices then): at step s of 5 the ETA is
  # 5 - s seconds. The test above, on a clock the steps do not move, saw every formula give 0.
  _, reported, taking = _progress_on_a_fake_clock(monkeypatch)
  monkeypatch.setattr(sharding_lib, "global_batch", taking(sharding_lib.global_batch, 1.0))
  # 5 steps, a line every 2 and one at the last step.
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")), num_steps=5)
  config.log_every, config.eval_every = 2, 0
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert [(step, left) for step, _, left in reported] == [(2, 3.0), (4, 1.0), (5, 0.0)], reported
  # The speed: the images of the steps since the last line (2 x 64 in 2 s, then 64 in 1 s), not
  # those since the run began.
  assert [speed for _, speed, _ in reported] == [config.batch_size] * 3, reported


def test_killed_run_resumes_exactly(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  steps, every = 12, 3
  subprocess.run(_train_command(tmp_path / "whole", steps, every), env=env, check=True,
                 capture_output=True)
  killed = tmp_path / "killed"
  process = subprocess.Popen(_train_command(killed, steps, every), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  while not os.path.isdir(killed / "checkpoints" / "6") and time.monotonic() < deadline:
    assert process.poll() is None, "the run ended before it could be killed"
    time.sleep(0.05)
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  assert not os.path.isdir(killed / "checkpoints" / str(steps))
  result = subprocess.run(_train_command(killed, steps, every), env=env, check=True,
                          capture_output=True, text=True)
  assert "Resumed from step" in result.stdout
  # Every logged value (losses, gradient norms, the final evaluation) is identical.
  assert read_metrics(str(killed)) == read_metrics(str(tmp_path / "whole"))
  # A resume that cannot be is a one-line message, as a config that cannot run is.
  result = subprocess.run(_train_command(killed, steps, every) + ["--config.loss.margin=0.3"],
                          env=env, capture_output=True, text=True)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
  assert "FATAL config.loss sets {'margin': 0.3} where the run in" in result.stderr, result.stderr
  assert "--workdir: Directory" not in result.stderr  # The message alone, not the flags' help.


def test_sigterm_saves_the_current_step_stops_and_the_run_resumes_exactly(tmp_path,
                                                                          monkeypatch):
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")), num_steps=4)
  config.log_every = 4
  train_lib.train_and_evaluate(config, str(tmp_path / "whole"))
  global_batch, steps, handler = sharding_lib.global_batch, [], signal.getsignal(signal.SIGTERM)
  def global_batch_then_sigterm_at_step_2(*args):
    steps.append(len(steps) + 1)
    if steps[-1] == 2:  # A scheduler's notice, while the loop runs; the handler runs now.
      os.kill(os.getpid(), signal.SIGTERM)
    return global_batch(*args)
  monkeypatch.setattr(sharding_lib, "global_batch", global_batch_then_sigterm_at_step_2)
  preempted = tmp_path / "preempted"
  with pytest.raises(checkpoints.Preempted, match="stopped at step 2 and saved it") as stopped:
    train_lib.train_and_evaluate(config, str(preempted))
  assert stopped.value.step == 2 and steps == [1, 2]
  assert os.listdir(preempted / "checkpoints") == ["2"]  # Committed, not checkpoint_every's 4.
  assert signal.getsignal(signal.SIGTERM) is handler  # The loop's handler is gone.
  monkeypatch.setattr(sharding_lib, "global_batch", global_batch)
  train_lib.train_and_evaluate(config, str(preempted))
  # The stopped step is logged, though not a multiple of log_every; the rest is as if the run had
  # not stopped.
  stopped_line, *rest = read_metrics(str(preempted))
  assert stopped_line["step"] == 2 and np.isfinite(stopped_line["loss"])
  assert rest == read_metrics(str(tmp_path / "whole"))


def test_sigterm_held_outside_python_is_left_to_its_owner(monkeypatch):
  # Python reads a handler installed by C code as None, and could not put it back after the
  # loop's own; the loop then leaves SIGTERM alone (and is never told of a preemption).
  monkeypatch.setattr(signal, "getsignal", lambda signum: None)
  replaced = []
  monkeypatch.setattr(signal, "signal", lambda signum, handler: replaced.append(signum))
  with checkpoints.preemption_notice(manager=None) as reached_preemption:
    assert not reached_preemption(1)
  assert not replaced


def test_training_step_refuses_silent_host_transfers(monkeypatch, tmp_path):
  # The loop places each batch on the devices itself; a batch (or anything else a step reads)
  # left on the host would be copied silently every step, which the transfer guard refuses.
  monkeypatch.setattr(sharding_lib, "global_batch", lambda batch_sharding, batch: batch)
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")), num_steps=1)
  with pytest.raises(jax.errors.JaxRuntimeError, match="Disallowed host-to-device transfer"):
    train_lib.train_and_evaluate(config, str(tmp_path))


def test_unknown_command_line_field_is_an_error_that_names_it(tmp_path):
  # (Overrides that exist are exercised by the kill -9 test.) ml_collections raises an
  # AttributeError while absl parses the flags: a traceback until train.py reported it.
  # A missing field on the way to the last one is a KeyError of its own, reported the same; so
  # is an override read from a --flagfile.
  (tmp_path / "flags.txt").write_text("--config.optimizer.learnig_rate=0.1\n")
  for override, field, meant in (
      ("--config.loss.margn=0.4", "margn", "margin"),
      ("--config.optimzer.learning_rate=0.2", "optimzer", "optimizer"),
      (f"--flagfile={tmp_path / 'flags.txt'}", "learnig_rate", "learning_rate")):
    command = _train_command(tmp_path, 1, 1) + [override]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(
        os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode != 0
    assert ("FATAL Flags parsing error: a --config override names a field the config lacks:\n"
            f"  '{field}'\n  Did you mean \"{meant}\"") in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_batch_statistics_per_device_take_the_collectives_out_of_the_backbone():
  # LeNets++ with a BatchNorm after each of its 6 convolutions, on 4 devices. Synchronised
  # statistics sum channel vectors over the devices in every layer, forward and backward, one
  # after the other (25 all-reduces here); per device (insightface's DDP), the step's
  # all-reduces are those the data-parallel step needs anyway (1 here: XLA combines the
  # gradients' and the running statistics' sums).
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.model.kwargs.batch_norm = True
  config.mesh.shape = (4,)
  source, batch = digits_batch(config, 16)
  reductions, losses = {}, {}
  for stats in ("global", "device"):
    config.model.batch_stats = stats
    mesh = sharding_lib.make_mesh(config)
    train_lib.check_config(config, mesh)
    experiment, state = train_lib.create_train_state(config, mesh, source.num_classes,
                                                     source.image_shape)
    global_batch = jax.device_put(batch, experiment.batch_sharding)
    step = jax.jit(lambda s, b, e=experiment: train_lib.train_step(e, s, b)).lower(
        state, global_batch).compile()
    reductions[stats] = [op for op in sharding_lib.collectives(step.as_text())
                         if op.op == "all-reduce"]
    losses[stats] = float(step(state, global_batch)[1]["loss"])
  assert len(reductions["device"]) <= 2 and len(reductions["global"]) >= 2 * 6, reductions
  assert np.isfinite(losses["device"]) and losses["device"] != losses["global"]
  config.model.batch_stats = "devices"
  with pytest.raises(ValueError, match="config.model.batch_stats must be 'global' or 'device'"):
    train_lib.check_config(config, sharding_lib.make_mesh(config))


def test_batch_stats_reach_every_batch_norm_and_older_runs_keep_global_ones():
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.model.kwargs.batch_norm = True
  mesh = sharding_lib.make_mesh(config)
  for stats, per_device in (("device", True), ("global", False), (None, False)):
    if stats is None:  # A run's config.json written before the field (2026-12-07).
      config.unlock()
      del config.model["batch_stats"]
    else:
      config.model.batch_stats = stats
    experiment, state = train_lib.create_train_state(config, mesh, 6, (16, 16, 1), abstract=True)
    model = nnx.merge(experiment.graphdef, state.params["backbone"], state.model_state)
    flags = [module.stats_per_device for _, module in nnx.iter_graph(model)
             if isinstance(module, margins.models.iresnet.BatchNorm)]
    assert len(flags) == 6 and set(flags) == {per_device}, (stats, flags)


def test_evaluation_embeds_in_its_own_compute_dtype():
  # A bfloat16 or float16 run evaluates as margins.evaluate does, in float32 (a float16 run's
  # evaluation overflowed where float32's would not); "run" keeps the training's arithmetic.
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.mesh.shape = (1,)
  mesh = sharding_lib.make_mesh(config)
  images = margins_data.digits("open_test", image_size=16).images[:8]

  def embed(experiment, state):
    with jax.set_mesh(mesh):
      return np.asarray(jax.jit(functools.partial(eval_lib.embed, experiment))(state, images))

  def embeddings(compute_dtype, eval_compute_dtype, *, trained=False):
    config.compute_dtype, config.eval.compute_dtype = compute_dtype, eval_compute_dtype
    train_lib.check_config(config, mesh)
    experiment, state = train_lib.create_train_state(config, mesh, 6, (16, 16, 1))
    if trained:  # What the training step's graph computes, in evaluation mode.
      experiment = dataclasses.replace(experiment, eval_graphdef=experiment.graphdef)
    return embed(experiment, state)

  float32, in_run = embeddings("float32", "float32"), {}
  for dtype in ("bfloat16", "float16"):
    np.testing.assert_array_equal(embeddings(dtype, "float32"), float32)
    in_run[dtype] = embeddings(dtype, "run")
    np.testing.assert_array_equal(in_run[dtype], embeddings("float32", dtype))
    assert not np.array_equal(in_run[dtype], float32)
    np.testing.assert_allclose(in_run[dtype], float32, rtol=0.05, atol=0.05)
    # The training still computes in the run's dtype.
    np.testing.assert_array_equal(embeddings(dtype, "float32", trained=True), in_run[dtype])
  # A config without the field (config.eval replaced whole) embeds in the run's arithmetic.
  config.unlock()
  del config.eval["compute_dtype"]
  config.compute_dtype = "bfloat16"
  np.testing.assert_array_equal(
      embed(*train_lib.create_train_state(config, mesh, 6, (16, 16, 1))), in_run["bfloat16"])


def test_mesh_fills_its_minus_one_with_the_devices_left_and_splits_the_batch_over_all():
  # (2, -1) on 8 devices: 2 x 4. The batch is split over both axes: a [16] batch is 8 blocks of
  # 2 rows, one on each device (not 2 blocks of 8 rows, each on 4 devices), in the mesh's
  # row-major order: the device at (i, j) holds block 4 i + j, so that a row of the mesh (one
  # process's devices in a run of two) holds one run of the batch, that process's part.
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.mesh.shape, config.mesh.axis_names = (2, -1), ("hosts", "local")
  mesh = sharding_lib.make_mesh(config)
  assert dict(mesh.shape) == {"hosts": 2, "local": 4}
  experiment, _ = train_lib.create_train_state(config, mesh, 10, (28, 28, 1), abstract=True)
  batch = jax.device_put(np.arange(16, dtype=np.int32), experiment.batch_sharding)
  rows = {shard.device: np.asarray(shard.data).tolist() for shard in batch.addressable_shards}
  for (i, j), device in np.ndenumerate(mesh.devices):
    assert rows[device] == [2 * (4 * i + j), 2 * (4 * i + j) + 1], (i, j, rows[device])
  # A mesh of fewer devices than there are takes the first ones (make_mesh's docstring).
  config.mesh.shape, config.mesh.axis_names = (2,), ("data",)
  assert list(sharding_lib.make_mesh(config).devices.flat) == jax.devices()[:2]


def test_processes_with_different_device_counts_are_a_config_error(monkeypatch):
  """Each process loads ``batch_size / processes`` examples for its devices: with 3 and 1
  devices the run would fail later, inside orbax, with "cannot reshape array of size 4"."""
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  devices = [types.SimpleNamespace(process_index=i) for i in (0, 0, 0, 1)]
  monkeypatch.setattr(jax, "devices", lambda: devices)
  with pytest.raises(ValueError, match=r"different numbers of devices \(\{process: devices\} "
                                       r"\{0: 3, 1: 1\}\)"):
    sharding_lib.make_mesh(config)


def test_missing_data_folder_is_a_config_error(tmp_path):
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.unlock()
  config.data.update(name="recordio", path=str(tmp_path / "ms1mv3"))
  with pytest.raises(FileNotFoundError, match="config.data.path = '.*ms1mv3' is not a folder"):
    train_lib.check_config(config, sharding_lib.make_mesh(config))
  (tmp_path / "ms1mv3").mkdir()  # A folder, but of images say: no RecordIO files in it.
  (tmp_path / "ms1mv3" / "train.idx").write_text("")
  with pytest.raises(FileNotFoundError, match="config.data.path = '.*ms1mv3' has no train.rec: "
                                              "a RecordIO dataset is a folder of"):
    train_lib.check_config(config, sharding_lib.make_mesh(config))
  # A recipe's .bin sets missing (images packed by pack_recordio have none): the way out named.
  config.data.update(name="digits", path=None)
  config.eval.bins = (str(tmp_path / "lfw.bin"),)
  with pytest.raises(FileNotFoundError, match=r"lfw.bin'\] not found; .* or none: "
                                              r"--config.eval.bins=\"\(\)\""):
    train_lib.check_config(config, sharding_lib.make_mesh(config))
  # Two sets of one name would report as one; "open" would overwrite the held-out set's results.
  for folder in "a", "b":
    (tmp_path / folder).mkdir()
    for name in "lfw.bin", "open.bin":
      (tmp_path / folder / name).write_bytes(b"")
  for bins, message in (((tmp_path / "a" / "lfw.bin", tmp_path / "b" / "lfw.bin"),
                         r"Several config.eval.bins are named \['lfw'\]"),
                        ((tmp_path / "a" / "open.bin",), r"config.eval.bins named \['open'\]")):
    config.eval.bins = tuple(map(str, bins))
    with pytest.raises(ValueError, match=message):
      train_lib.check_config(config, sharding_lib.make_mesh(config))


@pytest.mark.parametrize("flag, message", [
    ("--config.engine.kind=fused", "Unknown config.engine.kind 'fused'"),
    # ml_collections deferred the file's error to a traceback where the config was first read.
    (f"--config={os.path.join(ROOT, 'configs', 'nope.py')}:quick",
     "FATAL Flags parsing error: --config: Failed loading config file"),
    # Not a cluster that JAX detects: its ValueError, as a message.
    ("--multihost", "Cannot start the multi-process runtime: coordinator_address should be "
     "defined. Outside a cluster"),
])
def test_config_that_cannot_run_is_a_message_not_a_traceback(flag, message, tmp_path):
  command = _train_command(tmp_path, 1, 1) + [flag]
  result = subprocess.run(command, capture_output=True, text=True, env=dict(
      os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0
  assert message in result.stderr, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  assert "--workdir: Directory" not in result.stderr  # The message alone, not the flags' help.
  assert not os.listdir(tmp_path)  # Refused before the run wrote anything.


@pytest.mark.parametrize("change, message", [
    (lambda c: c.loss.update(name="nope"), "Unknown loss 'nope'"),
    (lambda c: c.loss.update(name="cosface", gamma=2.0), r"\['gamma'\]"),
    # In the step the margin is traced: its scale is checked here or never.
    (lambda c: c.loss.update(scale=-16.0),
     "`scale` of ArcFace must be positive and finite, got -16.0"),
    (lambda c: c.model.update(name="resnet"), "Unknown model 'resnet'"),
    (lambda c: c.update(batch_size=60), "batch_size = 60 is not divisible by the 8"),
    (lambda c: c.update(batch_size=0), "config.batch_size must be at least 1, got 0"),
    (lambda c: c.eval.update(batch_size=0), "config.eval.batch_size must be at least 1, got 0"),
    (lambda c: c.loss.update(name="subcenter_arcface"), "needs config.loss.subcenters"),
    (lambda c: c.mesh.update(shape=(16,)), "needs 16 devices"),
    (lambda c: c.mesh.update(shape=(3, -1), axis_names=("a", "b")),
     r"the 8 devices are not a multiple of 3"),  # Was a mesh of 6 devices, silently.
    (lambda c: c.mesh.update(shape=(-1, -1), axis_names=("a", "b")), "at most one -1"),
    (lambda c: c.mesh.update(shape=(0, -1), axis_names=("a", "b")), "sizes must be positive"),
    (lambda c: c.mesh.update(shape=(2, 4), axis_names=("a", "a")), "repeat a name"),
    # JAX's own message would not name config.mesh.
    (lambda c: c.mesh.update(shape=(2, 4), axis_names=("data",)), r"config.mesh.shape \(2, 4\) "
     r"and config.mesh.axis_names \('data',\) differ in length"),
    (lambda c: c.engine.update(kind="fused"), "Unknown config.engine.kind 'fused'"),
    (lambda c: c.engine.update(sample_rate=1.5), "config.engine: `sample_rate` must be in"),
    (lambda c: c.data.update(name="mnist"), "Unknown config.data.name 'mnist'"),
    (lambda c: c.optimizer.update(name="lion"), "Unknown config.optimizer.name 'lion'"),
    (lambda c: c.update(compute_dtype="float64"), "compute_dtype must be 'float32', "),
    (lambda c: c.eval.update(compute_dtype="float64"),
     r"config.eval.compute_dtype must be one of \('float32', 'bfloat16', 'float16', 'run'\), "
     "got 'float64'"),
    (lambda c: c.update(log_every=0), "config.log_every must be a positive"),
    (lambda c: c.update(checkpoint_every=0), "config.checkpoint_every must be a positive"),
    # orbax's max_to_keep=0 would delete every checkpoint, the final one included.
    (lambda c: c.update(keep_checkpoints=0), "config.keep_checkpoints must be at least 1"),
    # A run shorter than its warm-up would end at its peak rate, never decaying.
    (lambda c: c.optimizer.update(warmup_steps=20), r"warmup_steps = 20 must lie in \[0, "
     r"config.num_steps = 20\)"),
    (lambda c: c.optimizer.update(warmup_steps=-1), r"warmup_steps = -1 must lie in \[0, "),
    # A negative norm would turn the backbone's gradient around (optax scales it to that norm).
    (lambda c: c.optimizer.update(grad_clip_norm=-1.0), "grad_clip_norm must be positive"),
    (lambda c: c.update(num_steps=-5), r"config.num_steps must be a number of steps \(0: "),
    (lambda c: c.update(eval_every=-1), r"config.eval_every must be a number of steps \(0: "),
    (lambda c: c.loss_scale.update(growth_interval=0), "growth_interval must be a positive"),
    (lambda c: c.loss.update(subcenters=0), "config.loss.subcenters must be a positive"),
    (lambda c: c.loss.update(lambda_schedule=dict(base=100.0)), "loss 'arcface' has none"),
    (lambda c: c.loss.update(name="sphereface", margin=4, lambda_schedule=dict(bse=1.0)),
     "config.loss.lambda_schedule: .*'bse'"),
    # Each ran: float16 skipping every step at a scale of 0, a loss climbing, the centres pushed
    # away, an evaluation failing after the whole run, a traceback while the head was built.
    (lambda c: c.loss_scale.update(initial=0.0), "config.loss_scale.initial must be positive and "
                                                 r"finite \(a scale of 0 skips every step\)"),
    (lambda c: c.optimizer.update(learning_rate=-0.01), "config.optimizer.learning_rate must be "
                                                        "positive, got -0.01"),
    (lambda c: c.optimizer.update(head_lr_scale=-1.0), "head_lr_scale must be at least 0"),
    (lambda c: c.optimizer.update(weight_decay=-1e-4), "weight_decay must be at least 0, got"),
    (lambda c: c.optimizer.update(head_weight_decay=-1e-4), "head_weight_decay must be at least"),
    (lambda c: c.optimizer.update(momentum=1.0), r"momentum must be in \[0, 1\)"),
    (lambda c: c.optimizer.update(name="adamw", b2=1.0), r"config.optimizer.b2 must be in \["),
    (lambda c: c.optimizer.update(name="adamw", b1=-0.1), r"config.optimizer.b1 must be in \["),
    (lambda c: c.optimizer.update(decay_power=-1.0), "decay_power must be at least 0"),
    (lambda c: c.center_loss.update(weight=-0.5), "config.center_loss.weight must be at least 0"),
    (lambda c: c.center_loss.update(alpha=2.0), r"config.center_loss.alpha must be in \[0, 1\]"),
    (lambda c: c.eval.update(num_pairs=301), r"config.eval.num_pairs must be even \(half"),
    (lambda c: c.eval.update(num_pairs=4), r"and at least 10 \(the protocol's folds\), got 4"),
    (lambda c: c.update(loss=dict(name="sphereface2", alpha=1.0)),
     r"config.loss: `alpha` must lie in \(0, 1\)"),
    # The pipeline refused these with a traceback naming no field, once the state was built.
    (lambda c: c.input.update(crop_padding=-1), "config.input.crop_padding must be at least 0"),
    (lambda c: c.input.update(worker_count=-2), "config.input.worker_count must be at least 0"),
    (lambda c: c.update(seed=-1), r"config.seed must lie in \[0, 2\*\*32\)"),
    # One digit left out: the whole run trained, then its first evaluation failed (no pairs of
    # two identities).
    (lambda c: c.data.update(open_set_train_classes=tuple(range(9))),
     r"config.data's held-out identities \(180 images\) cannot be evaluated: `labels` must hold "
     "at least 2 classes, got 1"),
    # The digits' small_cnn widths beside another backbone: a traceback, after the workdir.
    (lambda c: c.model.update(name="iresnet18"),
     r"config.model \(name 'iresnet18', kwargs \{'batch_norm': False, 'widths': .*\}\) cannot be "
     r"built for"),
])
def test_bad_config_gives_a_clear_error(change, message, tmp_path):
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.unlock()
  change(config)
  with pytest.raises(ValueError, match=message):
    train_lib.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("name", sorted(train_lib.MARGINS))
def test_every_loss_name_builds_its_margin_with_the_given_hyperparameters(name):
  loss_config = ml_collections.ConfigDict(dict(name=name, scale=7.0))
  if name in ("softmax", "lsoftmax"):
    del loss_config.scale  # These take no scale.
  margin = train_lib.make_margin(loss_config)
  assert type(margin) is train_lib.MARGINS[name]
  assert getattr(margin, "scale", 7.0) == 7.0


def test_learning_rate_schedule_warms_up_then_decays():
  config = train_lib.default_config()
  config.num_steps, config.optimizer.warmup_steps = 110, 10
  config.optimizer.learning_rate, config.optimizer.decay_power = 0.1, 2.0
  schedule = train_lib.learning_rate_schedule(config)
  np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 60, 110)],
                             [0.0, 0.05, 0.1, 0.1 * 0.5**2, 0.0], atol=1e-7)


def test_learning_rate_decays_with_the_configured_power():
  # The test above uses insightface's power 2, which a power fixed at 2 also passes: here the
  # decay lr (1 - t / T)^p after the warm-up, for p = 1 (linear) and 3.
  config = train_lib.default_config()
  config.num_steps, config.optimizer.warmup_steps = 110, 10
  config.optimizer.learning_rate = 0.1
  for power in (1.0, 3.0):
    config.optimizer.decay_power = power
    schedule = train_lib.learning_rate_schedule(config)
    np.testing.assert_allclose([schedule(s) for s in (10, 35, 60, 85, 110)],
                               [0.1 * (1 - t / 100) ** power for t in (0, 25, 50, 75, 100)],
                               atol=1e-7)


def test_loss_scale_follows_grad_scalers_rule_step_by_step():
  # torch.cuda.amp.GradScaler: an overflow halves the scale and restarts the count of finite
  # steps; growth_interval finite steps in a row double it and restart the count. Finite steps
  # broken by an overflow do not add up (the float16 test only ever sees overflows first).
  finite_flags = [1, 1, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1]
  interval = 3
  loss_scale = train_state.LossScale(jnp.float32(2.0**10), jnp.zeros((), jnp.int32))
  scale, tracker = 2.0**10, 0
  for finite in finite_flags:
    loss_scale = train_lib._next_loss_scale(loss_scale, jnp.asarray(bool(finite)), interval)
    if not finite:
      scale, tracker = scale / 2, 0
    elif tracker + 1 == interval:
      scale, tracker = scale * 2, 0
    else:
      tracker += 1
    assert (float(loss_scale.scale), int(loss_scale.finite_steps)) == (scale, tracker)
  assert scale == 2.0**10 * 2.0**3 / 2.0**4  # Three doublings, four halvings.


def test_update_sampled_rows_keeps_the_others_and_their_state():
  # Through make_optimizer, as training builds it: the head's transform sees W's rows among
  # masked backbone leaves. Sampling every row is the plain step; then rows 0 and 2 stay
  # exactly as they were, momentum and all, where the plain step moves them on.
  config = train_lib.default_config()
  config.optimizer.update(weight_decay=0.1, momentum=0.9, learning_rate=0.5, grad_clip_norm=None)
  optimizer, engine = train_lib.make_optimizer(config), margins.dense()
  params = {"backbone": {"kernel": jnp.ones((2, 3))}, "head": jnp.arange(12.0).reshape(4, 3) + 1}
  states = {"sparse": optimizer.init(params), "plain": optimizer.init(params)}
  history = {"sparse": [], "plain": []}
  whole = {"sparse": params, "plain": params}
  for rows in ([0, 1, 2, 3], [1, 3]):
    sample = parallel.RowSample(jnp.array(rows, jnp.int32), 4)
    backbone_grad = {"kernel": jnp.full((2, 3), 0.5)}
    rows_grad = jnp.ones((len(rows), 3))
    whole["sparse"], states["sparse"] = train_lib.update_sampled_rows(
        optimizer, engine, sample, {"backbone": backbone_grad, "head": rows_grad},
        states["sparse"], whole["sparse"])
    updates, states["plain"] = optimizer.update(
        {"backbone": backbone_grad, "head": engine.put(jnp.zeros((4, 3)), sample, rows_grad)},
        states["plain"], whole["plain"])
    whole["plain"] = optax.apply_updates(whole["plain"], updates)
    for name in history:
      traces = [leaf for leaf in jax.tree.leaves(states[name]) if leaf.shape == (4, 3)]
      assert len(traces) == 1  # The momentum of W.
      history[name].append((whole[name], traces[0]))
  (first, first_trace), (second, second_trace) = history["sparse"]
  (plain_first, _), (plain_second, plain_trace) = history["plain"]
  for got, want in ((first, plain_first), (second["backbone"], plain_second["backbone"])):
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-6)
  unsampled, sampled = jnp.array([0, 2]), jnp.array([1, 3])
  np.testing.assert_array_equal(second["head"][unsampled], first["head"][unsampled])
  np.testing.assert_array_equal(second_trace[unsampled], first_trace[unsampled])
  assert np.all(np.asarray(plain_trace[unsampled]) != np.asarray(first_trace[unsampled]))
  # The sampled rows' momentum and step are the plain step's (the others' gradient is zero).
  np.testing.assert_allclose(second_trace[sampled], plain_trace[sampled], rtol=1e-6)
  assert not np.allclose(second["head"][sampled], first["head"][sampled])


@pytest.mark.parametrize("margin, weights_shape", [
    (margin_lib.ArcFace(), (5, 4)), (margin_lib.Softmax(), (5, 4)),
    (margin_lib.SphereFace(), (5, 4)), (margin_lib.ArcFace(), (5, 3, 4))])
def test_similarity_is_what_the_margin_scores(margin, weights_shape):
  x = jax.random.normal(jax.random.key(0), (6, 4))
  w = jax.random.normal(jax.random.key(1), weights_shape)
  xs = np.asarray(x, np.float64)
  ws = np.asarray(w, np.float64)
  if margin.normalize_embeddings:
    xs = xs / np.linalg.norm(xs, axis=-1, keepdims=True)
  if margin.normalize_weights:
    ws = ws / np.linalg.norm(ws, axis=-1, keepdims=True)
  expected = np.einsum("bd,c...d->bc...", xs, ws)
  if len(weights_shape) == 3:
    expected = expected.max(axis=-1)
  np.testing.assert_allclose(parallel.similarity(x, w, margin), expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_step_is_finite_and_keeps_float32_parameters():
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.compute_dtype = "bfloat16"
  config.mesh.shape = (1,)
  source, batch = digits_batch(config, 32)
  experiment, state = train_lib.create_train_state(
      config, sharding_lib.make_mesh(config), source.num_classes, source.image_shape)
  step = jax.jit(lambda s, b: train_lib.train_step(experiment, s, b))
  for _ in range(2):
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
  assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}


def test_grad_norm_and_embedding_norm_metrics_are_what_they_name():
  # The norm that grad_clip_norm compares (the head's gradient is not clipped): with plain SGD
  # at learning rate 1 the backbone moves by minus its gradient.
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.mesh.shape = (1,)
  config.optimizer.update(learning_rate=1.0, momentum=0.0, weight_decay=0.0, grad_clip_norm=0.0)
  source, batch = digits_batch(config, 16)
  experiment, state = train_lib.create_train_state(
      config, sharding_lib.make_mesh(config), source.num_classes, source.image_shape)
  new, metrics = jax.jit(lambda s, b: train_lib.train_step(experiment, s, b))(state, batch)
  assert float(metrics["learning_rate"]) == 1.0
  moved = optax.tree.norm(jax.tree.map(jnp.subtract, new.params["backbone"],
                                       state.params["backbone"]))
  head_moved = optax.tree.norm(new.params["head"] - state.params["head"])
  assert float(head_moved) > 0.1 * float(moved) > 0
  assert float(metrics["grad_norm"]) == pytest.approx(float(moved), rel=1e-5)
  # embedding_norm: the mean of the step's embeddings' norms, from the state before the step.
  model = nnx.merge(experiment.graphdef, state.params["backbone"], state.model_state, copy=True)
  embeddings = np.asarray(model(margins_data.normalize_images(batch["image"])), np.float64)
  assert float(metrics["embedding_norm"]) == pytest.approx(
      np.linalg.norm(embeddings, axis=1).mean(), rel=1e-5)


def test_float16_step_whose_backbone_gradient_alone_overflows_is_skipped():
  # A term of the loss that only the backbone's gradient sees, large enough to overflow the
  # float16 backward pass at scale 1: the head's gradient stays finite, the step must still be
  # skipped (every gradient is checked, not the head's alone).
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.compute_dtype, config.mesh.shape = "float16", (1,)
  config.loss_scale = dict(initial=1.0, growth_interval=100)
  source, batch = digits_batch(config, 16)
  experiment, state = train_lib.create_train_state(
      config, sharding_lib.make_mesh(config), source.num_classes, source.image_shape)

  def engine(x, w, labels, margin, **kwargs):
    losses, new_margin = experiment.engine(x, w, labels, margin, **kwargs)
    return losses + 1e10 * jnp.mean(x, axis=-1), new_margin

  spy = dataclasses.replace(experiment, engine=engine)
  new, metrics = jax.jit(lambda s, b: train_lib.train_step(spy, s, b))(state, batch)
  assert int(metrics["skipped"]) == 1 and float(new.loss_scale.scale) == 0.5
  jax.tree.map(np.testing.assert_array_equal, new.params, state.params)


def _step_on_copies(config, copies, parts):
  """``(state, metrics)`` after one step of ``config`` in ``parts`` micro-batches, on a batch of
  ``copies`` copies of each of 16 digits (rows ``i * copies .. (i + 1) * copies - 1``: every
  micro-batch of rows ``k, k + parts, ...`` holds the 16 digits when ``parts == copies``)."""
  source = margins_data.digits("open_train", image_size=config.data.image_size)
  batch = {"image": np.repeat(source.images[:16], copies, axis=0),
           "label": np.repeat(source.labels[:16], copies)}
  config.micro_batches = parts
  mesh = sharding_lib.make_mesh(config)
  train_lib.check_config(config, mesh)
  experiment, state = train_lib.create_train_state(config, mesh, source.num_classes,
                                                   source.image_shape)
  step = jax.jit(lambda s, b: train_lib.train_step(experiment, s, b))
  return jax.device_get(step(state, jax.device_put(batch, experiment.batch_sharding)))


@pytest.mark.parametrize("freeze_unsampled", [False, True])
def test_micro_batches_average_their_gradients(freeze_unsampled):
  # Every one of 4 micro-batches is the 16 examples: each has the batch's gradient (batch
  # statistics included), and so has their average. Micro-batches of contiguous rows would each
  # see 4 of the examples. Updating sampled rows only, one sample (here every row: the 16
  # examples' classes) serves the 4 micro-batches.
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.mesh.shape = (2,)
  config.engine.kind, config.engine.chunk_size = "sharded", 2
  if freeze_unsampled:
    config.engine.update(sample_rate=0.5, freeze_unsampled=True)
  (one, one_metrics), (four, four_metrics) = (
      _step_on_copies(config, copies=4, parts=parts) for parts in (1, 4))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), one.params,
               four.params)
  for name in ("loss", "grad_norm", "embedding_norm", "learning_rate"):
    assert four_metrics[name] == pytest.approx(one_metrics[name], rel=1e-5), name


def test_micro_batches_of_different_examples_average_to_the_batch_gradient():
  # 16 different digits in 4 micro-batches of 4 (rows k, k + 4, ...), no BatchNorm nor sampling:
  # the parts' gradients average to the whole batch's, which keeping one part, or summing them,
  # does not give (the test above, with every part the same examples, cannot tell).
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.mesh.shape = (2,)
  (one, one_metrics), (four, four_metrics) = (
      _step_on_copies(config, copies=1, parts=parts) for parts in (1, 4))
  assert one_metrics["learning_rate"] > 0 and one_metrics["grad_norm"] > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), one.params,
               four.params)
  for name in ("loss", "grad_norm"):
    assert four_metrics[name] == pytest.approx(one_metrics[name], rel=1e-5), name


def test_micro_batches_carry_the_margin_state_and_centres_from_one_to_the_next():
  # CurricularFace's t <- 0.01 mean(cos_y) + 0.99 t from t = 0: with every micro-batch the same
  # examples (and parameters), one part gives t = 0.01 c, two give 0.0199 c = 1.99 times that.
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.loss = dict(name="curricularface", scale=16.0, margin=0.5)
  config.center_loss.update(weight=0.01, alpha=0.3)  # Not the default alpha, 0.5.
  config.mesh.shape = (2,)
  (one, one_metrics), (two, two_metrics) = (
      _step_on_copies(config, copies=2, parts=parts) for parts in (1, 2))
  assert np.isfinite(one_metrics["center_loss"]) and np.isfinite(two_metrics["center_loss"])
  assert one_metrics["loss"] == pytest.approx(  # The weight, once.
      one_metrics["softmax_loss"] + 0.01 * one_metrics["center_loss"], rel=1e-6)
  assert float(one.margin.t) != 0.0  # The step's t is the new state's, not t = 0 kept.
  assert float(two.margin.t) == pytest.approx(1.99 * float(one.margin.t), rel=1e-5)
  # The centres move once per part, from c = 0 towards the same mean x of a class's n examples
  # in each part: c = a x with a = alpha n / (1 + n) after one move, a (2 - a) x after two; one
  # part of 2n examples gives b x, b = alpha 2n / (1 + 2n).
  labels = margins_data.digits("open_train", image_size=config.data.image_size).labels[:16]
  n = np.bincount(labels, minlength=one.centers.shape[0])[:, None]
  a, b = 0.3 * n / (1 + n), 0.3 * 2 * n / (1 + 2 * n)
  np.testing.assert_allclose(two.centers, one.centers * a * (2 - a) / b, rtol=1e-5, atol=1e-7)
  assert np.all(np.linalg.norm(one.centers, axis=1)[n[:, 0] > 0] > 0)


@pytest.mark.parametrize("parts", [0, 3, 128])
def test_micro_batches_must_divide_each_devices_batch(parts):
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.mesh.shape, config.batch_size, config.micro_batches = (2,), 128, parts
  with pytest.raises(ValueError, match="micro_batches"):
    train_lib.check_config(config, sharding_lib.make_mesh(config))


def test_micro_batches_of_one_example_are_refused():
  # BatchNorm over one example made every embedding its bias; the step failed while tracing.
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.mesh.shape, config.batch_size, config.micro_batches = (1,), 4, 4
  with pytest.raises(ValueError, match="1 example per micro-batch: the backbones' BatchNorm"):
    train_lib.check_config(config, sharding_lib.make_mesh(config))
  config.micro_batches = 2
  train_lib.check_config(config, sharding_lib.make_mesh(config))


def _spied_keys(config, batch_size=16):
  """The ``(margin key, sample key)`` bits of each engine call in one step of ``config`` on the
  first ``batch_size`` digits: one call per micro-batch."""
  source = margins_data.digits("open_train", image_size=config.data.image_size)
  batch = {"image": source.images[:batch_size],
           "label": source.labels[:batch_size].astype(np.int32)}
  experiment, state = train_lib.create_train_state(config, sharding_lib.make_mesh(config),
                                                   source.num_classes, source.image_shape)
  seen = []

  def engine(x, w, labels, margin, *, num_classes, key, sample):
    jax.debug.callback(lambda *keys: seen.append(keys), margin.key, jax.random.key_data(key))
    return experiment.engine(x, w, labels, margin, num_classes=num_classes, key=key,
                             sample=sample)

  spy = dataclasses.replace(experiment, engine=engine)
  jax.block_until_ready(jax.jit(lambda s, b: train_lib.train_step(spy, s, b))(
      state, jax.device_put(batch, experiment.batch_sharding)))
  return seen


def test_elasticface_margins_and_partial_fc_sample_draw_from_independent_keys():
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.loss = dict(name="elasticface", scale=64.0, margin=0.5)
  config.engine.sample_rate = 0.5
  (margin_key, sample_key), = _spied_keys(config)
  assert not np.array_equal(margin_key, sample_key)


def test_each_micro_batch_draws_its_own_elasticface_margins_and_partial_fc_sample():
  # As insightface's gradient_acc, each micro-batch is a forward pass of its own: the same key
  # for every one would repeat the ElasticFace margins (and the sample's random rows) k times.
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.loss = dict(name="elasticface", scale=64.0, margin=0.5)
  config.engine.sample_rate, config.micro_batches, config.mesh.shape = 0.5, 2, (1,)
  seen = _spied_keys(config)
  assert len(seen) == 2
  for first, second in zip(*seen, strict=True):
    assert not np.array_equal(first, second)


def test_step_margin_anneals_sphereface_lambda_with_the_step():
  # lambda = max(5, 1000 / (1 + 0.12 t)) at the state's step t, not the first step's.
  loss = ml_collections.ConfigDict(dict(name="sphereface", margin=4, lambda_schedule=dict(
      base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0)))
  margin = train_lib.make_margin(loss)
  for step, expected in ((0, 1000.0), (100, 1000.0 / 13.0), (10_000, 5.0)):
    got = train_lib._step_margin(margin, loss, jnp.int32(step), jax.random.key(0), {})
    assert float(got.annealing) == pytest.approx(expected, rel=1e-6), step


def test_step_margin_gives_elasticface_the_steps_key():
  # Its margins are drawn anew from the key of each step (and micro-batch), not from the key
  # make_margin put in place.
  loss = ml_collections.ConfigDict(dict(name="elasticface", scale=64.0, margin=0.5))
  margin = train_lib.make_margin(loss)
  keys = jax.random.split(jax.random.key(7))
  got = [train_lib._step_margin(margin, loss, jnp.int32(0), key, {}).key for key in keys]
  for key_bits, key in zip(got, keys, strict=True):
    np.testing.assert_array_equal(key_bits, jax.random.key_data(key))


def test_sphereface2_head_bias_starts_at_the_configs_bias_or_from_its_hyperparameters():
  # The digits config's r, m, t and lambda are sphereface2_bias's defaults, which hid a bias
  # computed without them.
  loss = ml_collections.ConfigDict(dict(name="sphereface2", scale=30.0, margin=0.2, t=2.0,
                                        alpha=0.6))
  expected = margins.sphereface2_bias(100, scale=30.0, margin=0.2, t=2.0, alpha=0.6)
  for changed in ("scale", "margin", "t", "alpha"):  # Each of them moves the bias.
    others = {k: v for k, v in loss.items() if k not in ("name", changed)}
    assert margins.sphereface2_bias(100, **others) != pytest.approx(expected, rel=1e-3), changed
  assert train_lib.initial_head_bias(loss, 100) == pytest.approx(expected, rel=1e-6)
  loss.bias = 0.75  # Given: where the learnt bias starts.
  assert train_lib.initial_head_bias(loss, 100) == 0.75
  assert train_lib.initial_head_bias(ml_collections.ConfigDict(dict(name="arcface")), 100) is None


def test_sphereface2_learns_its_bias_with_the_head():
  # The bias starts at sphereface2_bias(C) and one SGD step (momentum's first step is the
  # gradient) moves it by the learning rate times the gradient of the dense SphereFace2 loss of
  # the step's embeddings, plus weight decay: here through the class-sharded head, in chunks.
  config = load_config(os.path.join(ROOT, "configs", "digits_sphereface2.py"))
  config.mesh.shape = (2,)
  config.engine.kind, config.engine.chunk_size = "sharded", 2
  # The head's group, 100 times the backbone's learning rate: a step the bias's float32 value
  # resolves to 1e-3 of itself.
  config.optimizer.head_lr_scale = 100.0
  source = margins_data.digits("open_train", image_size=config.data.image_size)
  batch = {"image": source.images[:16],
           "label": source.labels[:16].astype(np.int32)}
  mesh = sharding_lib.make_mesh(config)
  experiment, state = train_lib.create_train_state(config, mesh, source.num_classes,
                                                   source.image_shape)
  bias = float(state.params["head_bias"])
  assert bias == pytest.approx(margins.sphereface2_bias(source.num_classes), rel=1e-6)
  new_state, metrics = jax.jit(lambda s, b: train_lib.train_step(experiment, s, b))(
      state, jax.device_put(batch, experiment.batch_sharding))

  params, model_state = jax.device_get((state.params, state.model_state))  # off the mesh
  model = nnx.merge(experiment.graphdef, params["backbone"], model_state, copy=True)
  embeddings = model(jnp.asarray(margins_data.normalize_images(batch["image"]))).astype(
      jnp.float32)
  head = params["head"][:source.num_classes]
  gradient = jax.grad(lambda b: jnp.mean(margins.sphereface2_loss(
      embeddings, head, batch["label"], b, **{k: v for k, v in config.loss.items()
                                              if k != "name"})))(jnp.float32(bias))
  lr = float(metrics["learning_rate"]) * config.optimizer.head_lr_scale
  assert lr > 0
  step_taken = float(new_state.params["head_bias"]) - bias
  assert step_taken == pytest.approx(-lr * (float(gradient) + config.optimizer.weight_decay * bias),
                                     rel=1e-3)
  assert float(new_state.margin.bias) == pytest.approx(bias)  # the step's margin saw the param


def test_only_sphereface2_adds_an_optimizer_group():
  # Another group would change the optimizer state, and so the checkpoints, of every other run.
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  params = {"backbone": {"kernel": jnp.zeros(3)}, "head": jnp.zeros((4, 2))}
  assert set(train_lib.make_optimizer(config).init(params).inner_states) == {"backbone", "head"}
  config.loss = dict(name="sphereface2")
  params["head_bias"] = jnp.zeros(())
  assert set(train_lib.make_optimizer(config).init(params).inner_states) == {
      "backbone", "head", "head_bias"}


def _plain_sgd_updates(params, grads, **optimizer):
  """One step's updates of ``make_optimizer``: SGD at learning rate 1, without momentum, weight
  decay or clipping unless ``optimizer`` sets them."""
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.optimizer.update(learning_rate=1.0, momentum=0.0, weight_decay=0.0, grad_clip_norm=0.0,
                          warmup_steps=0)
  config.optimizer.update(**optimizer)
  transform = train_lib.make_optimizer(config)
  return transform.update(grads, transform.init(params), params)[0]


def test_the_head_has_its_own_learning_rate_scale_and_weight_decay():
  # head_lr_scale and head_weight_decay reach the head's rows alone; no test set either.
  params = {"backbone": {"kernel": jnp.ones((3, 4))}, "head": jnp.ones((10, 4))}
  grads = jax.tree.map(jnp.ones_like, params)
  for changed, head in ((dict(head_lr_scale=10.0), -10.0), (dict(head_weight_decay=0.5), -1.5)):
    got = _plain_sgd_updates(params, grads, **changed)  # -(gradient + decay * weight) x scale.
    np.testing.assert_allclose(got["head"], np.full((10, 4), head), rtol=1e-6)
    np.testing.assert_allclose(got["backbone"]["kernel"], -np.ones((3, 4)), rtol=1e-6)


def test_head_weight_decay_of_zero_turns_the_decay_off_for_the_head_and_sphereface2s_bias():
  # 0.0 is a value, not "unset" (None: the backbone's decay); SphereFace2's learnt bias goes
  # with the head. SGD at learning rate 1 on g = w = 1: -(1 + decay).
  config = load_config(os.path.join(ROOT, "configs", "digits_sphereface2.py"))
  config.optimizer.update(learning_rate=1.0, momentum=0.0, weight_decay=0.5, grad_clip_norm=0.0,
                          warmup_steps=0, head_weight_decay=0.0)
  params = {"backbone": {"kernel": jnp.ones((3, 4))}, "head": jnp.ones((10, 4)),
            "head_bias": jnp.ones(())}
  transform = train_lib.make_optimizer(config)
  updates = transform.update(jax.tree.map(jnp.ones_like, params), transform.init(params),
                             params)[0]
  np.testing.assert_allclose(updates["backbone"]["kernel"], np.full((3, 4), -1.5), rtol=1e-6)
  np.testing.assert_allclose(updates["head"], np.full((10, 4), -1.0), rtol=1e-6)
  np.testing.assert_allclose(updates["head_bias"], -1.0, rtol=1e-6)


def test_only_the_backbone_gradient_is_clipped():
  # As insightface's clip_grad_norm_(backbone.parameters(), 5): the head's gradient, often far
  # larger, is not clipped; no test built one past the norm.
  params = {"backbone": {"kernel": jnp.zeros((3, 4))}, "head": jnp.zeros((10, 4))}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)
  updates = _plain_sgd_updates(params, grads, grad_clip_norm=5.0)
  assert float(optax.tree.norm(updates["backbone"])) == pytest.approx(5.0, rel=1e-6)
  np.testing.assert_allclose(updates["head"], -grads["head"], rtol=1e-6)


def test_backbone_gradient_is_clipped_before_the_weight_decay_is_added():
  # As insightface: clip_grad_norm_ on the gradient, then SGD adds weight_decay * w. Clipping
  # the decayed gradient would shrink the decay with it.
  params = {"backbone": {"kernel": jnp.ones((3, 4))}, "head": jnp.ones((10, 4))}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)
  updates = _plain_sgd_updates(params, grads, grad_clip_norm=5.0, weight_decay=0.5)
  clipped = 5.0 / np.sqrt(12)  # Each of the 12 entries, at global norm 5.
  np.testing.assert_allclose(updates["backbone"]["kernel"], np.full((3, 4), -(clipped + 0.5)),
                             rtol=1e-6)
  np.testing.assert_allclose(updates["head"], np.full((10, 4), -100.5), rtol=1e-6)


def test_sgd_nesterov_flag_reaches_the_optimizer():
  # optax.sgd's first step: the gradient with momentum alone, (1 + momentum) times it with
  # Nesterov's look-ahead (g + momentum * trace, the trace being g).
  params = {"backbone": {"kernel": jnp.zeros((3, 4))}, "head": jnp.zeros((10, 4))}
  grads = jax.tree.map(jnp.ones_like, params)
  for nesterov, factor in ((False, 1.0), (True, 1.9)):
    updates = _plain_sgd_updates(params, grads, momentum=0.9, nesterov=nesterov)
    for leaf in jax.tree.leaves(updates):
      np.testing.assert_allclose(leaf, np.full(leaf.shape, -factor), rtol=1e-6)


def test_adamw_takes_the_configured_weight_decay_for_backbone_and_head():
  # AdamW's first step at learning rate 1: -(g / (|g| + eps) + decay * w), decoupled from the
  # gradient: -(1 + decay) for g = w = 1 (to float32's rounding of the bias correction).
  # optax.adamw's own default decay is 1e-4.
  params = {"backbone": {"kernel": jnp.ones((3, 4))}, "head": jnp.ones((10, 4))}
  grads = jax.tree.map(jnp.ones_like, params)
  with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes float and int.
    updates = _plain_sgd_updates(params, grads, name="adamw", weight_decay=0.5,
                                 head_weight_decay=0.25)
  np.testing.assert_allclose(updates["backbone"]["kernel"], np.full((3, 4), -1.5), rtol=1e-5)
  np.testing.assert_allclose(updates["head"], np.full((10, 4), -1.25), rtol=1e-5)


def test_head_starts_as_insightfaces_normal_with_std_0_01():
  # insightface's FC weight: N(0, 0.01). A normalised head's scale still sets how far a step
  # turns its rows (the gradient of w / |w| goes as 1 / |w|); a plain softmax's, its logits.
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.mesh.shape = (1,)
  _, state = train_lib.create_train_state(config, sharding_lib.make_mesh(config), 1000, (8, 8, 1))
  head = np.asarray(state.params["head"], np.float64)
  assert head.shape == (1000, 32)
  assert abs(head.mean()) < 0.001 and head.std() == pytest.approx(0.01, rel=0.05)


@pytest.mark.parametrize("parts", train_lib.RESTORE_PARTS)
def test_backbone_with_dropout_keys_restores(parts, tmp_path):
  # ViT's drop path and token masking (IResNet's dropout too) keep typed PRNG keys in the model
  # state; orbax stores their key data, [2] uint32, in place of the [] key.
  config = tiny(load_config(os.path.join(ROOT, "configs", "digits_arcface.py")), num_steps=1)
  config.model = dict(name="vit_t", embedding_dim=8,
                      kwargs=dict(width=16, depth=1, num_heads=1, patch_size=4))
  config.mesh.shape = (1,)
  train_lib.train_and_evaluate(config, str(tmp_path))
  _, state = train_lib.restore(str(tmp_path), parts=parts)
  keys = [leaf for leaf in jax.tree.leaves(state.model_state)
          if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)]
  assert keys and all(key.shape == () for key in keys)


def _tensorboard_scalars(workdir: str, tag: str) -> list[int]:
  """The steps of ``tag`` as TensorBoard shows them: its event files in order, a SessionLog START
  at step ``s`` dropping the points at ``s`` and later written before it (TensorBoard's purge of
  a restarted run's orphaned data)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  steps = []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += length + 16
      if event.session_log.status == event_pb2.SessionLog.START:
        steps = [step for step in steps if step < event.step]
      steps += [event.step for value in event.summary.value if value.tag == tag]
  return steps


def test_resumed_metric_writer_drops_the_lost_steps_in_tensorboard_too(tmp_path):
  writer = run_log.MetricWriter(str(tmp_path), 0)
  for step in range(1, 5):
    writer.write(step, {"loss": float(step)})
  writer.close()
  time.sleep(1.1)  # tensorboardX names its files by the second: the resumed run's sorts after.
  writer = run_log.MetricWriter(str(tmp_path), 2)  # Resumed from checkpoint 2.
  for step in (3, 4):
    writer.write(step, {"loss": 10.0 + step})
  writer.close()
  assert [m["step"] for m in read_metrics(str(tmp_path))] == [1, 2, 3, 4]
  assert _tensorboard_scalars(str(tmp_path), "loss") == [1, 2, 3, 4]


def test_resumed_metric_writer_drops_a_line_a_crash_cut_short(tmp_path):
  # A machine that crashed mid-write (or a full disk) leaves the last line partial or zeroed.
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
  writer = run_log.MetricWriter(str(tmp_path), 2)  # Resumed from checkpoint 2.
  writer.write(3, {"loss": 13.0})
  writer.close()
  assert read_metrics(str(tmp_path)) == [{"step": s, "loss": v} for s, v in
                                         ((1, 1.0), (2, 2.0), (3, 13.0))]


def test_metrics_are_strict_json_with_null_for_values_that_are_not_finite(tmp_path):
  # JSON has no NaN: JavaScript's JSON.parse, Go and others refuse Python's default ``NaN``.
  writer = run_log.MetricWriter(str(tmp_path), 0)
  writer.write(1, {"loss": float("nan"), "open/tar_at_far_0.0001": np.float32(np.nan),
                   "grad_norm": np.inf, "open/auc": np.float64(0.5)})
  writer.close()
  def refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")
  with open(tmp_path / "metrics.jsonl") as f:
    lines = [json.loads(line, parse_constant=refuse) for line in f]
  assert lines == [{"step": 1, "loss": None, "open/tar_at_far_0.0001": None, "grad_norm": None,
                    "open/auc": 0.5}]
  assert _tensorboard_scalars(str(tmp_path), "open/auc") == [1]
  assert _tensorboard_scalars(str(tmp_path), "loss") == []


def test_feature_plots_name_their_classes(tmp_path, monkeypatch):
  # The open set's label 0 is digit 6: its legend read "0" before the names were passed.
  legends = {}
  monkeypatch.setattr(eval_lib.evaluation, "plot_embeddings",
                      lambda embeddings, labels, path, **kwargs: legends.setdefault(
                          os.path.basename(path), kwargs["class_names"]))
  features, labels = np.ones((4, 2)), np.array([0, 0, 1, 1])
  eval_lib.write_plots(str(tmp_path), {
      "_results": {"closed": (features, labels), "open": (features, labels)},  # No ROC.
      "_class_names": {"closed": ["0", "1"], "open": ["6", "7"]}})
  assert legends == {"features_closed.png": ["0", "1"], "features_open.png": ["6", "7"]}


def test_features_are_plotted_for_two_and_three_dimensional_embeddings_only(tmp_path):
  # On the circle for 2-D embeddings, on the sphere for 3-D ones; wider ones have no such plot.
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 10)
  eval_lib.write_plots(str(tmp_path), {"_results": {
      name: (rng.normal(size=(30, dim)), labels) for name, dim in (("two", 2), ("three", 3),
                                                                  ("four", 4))}})
  assert sorted(os.listdir(tmp_path)) == ["features_three.png", "features_two.png"]


def test_run_files_are_replaced_whole_or_not_at_all(tmp_path):
  # metrics.jsonl (rewritten on resume), config.json and data.json: a write that fails half way
  # (here at once: not text) leaves the old file, where writing in place had truncated it first.
  path = str(tmp_path / "config.json")
  run_log.write_atomically(path, '{"seed": 0}')
  with pytest.raises(TypeError):
    run_log.write_atomically(path, {"seed": 1})
  with open(path) as f:
    assert f.read() == '{"seed": 0}'


def test_update_sampled_rows_with_adamw_shares_the_bias_correction_count():
  # As the README says: the moments of an unsampled row stay, Adam's step count does not.
  config = train_lib.default_config()
  config.optimizer.update(name="adamw", weight_decay=0.0, learning_rate=1.0,
                          grad_clip_norm=None, warmup_steps=0)
  config.num_steps = 10**9
  optimizer, engine = train_lib.make_optimizer(config), margins.dense()
  params = {"backbone": {"k": jnp.ones(2)}, "head": jnp.ones((2, 3))}
  state = optimizer.init(params)
  both = parallel.RowSample(jnp.array([0, 1], jnp.int32), 2)
  row_1 = parallel.RowSample(jnp.array([1], jnp.int32), 2)
  update = jax.jit(functools.partial(train_lib.update_sampled_rows, optimizer, engine))
  backbone = {"k": jnp.zeros(2)}
  with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes float and int.
    after, state = update(both, {"backbone": backbone, "head": jnp.full((2, 3), 0.01)}, state,
                          params)
    for _ in range(1000):
      _, state = update(row_1, {"backbone": backbone, "head": jnp.full((1, 3), 0.01)}, state,
                        params)
    final, _ = update(both, {"backbone": backbone, "head": jnp.full((2, 3), 0.01)}, state, after)
  # Row 0's second step: a per-row count (2) would give -1; the shared count (1002) about -3.38.
  np.testing.assert_allclose(final["head"][0] - after["head"][0], -3.381, rtol=1e-3)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_freeze_unsampled_steps_the_sampled_rows_as_the_full_gradient_does(optimizer):
  # One step from a fresh state: the sample is the engine's own (same key, count), so the sampled
  # rows, their optimizer state, the backbone and the loss equal a step with W's full gradient;
  # the unsampled rows and their state are left exactly as they were, where the full step's
  # weight decay moves them. 497 classes in 8 x 63 rows: the last shard's 7 padding rows are never
  # sampled, as the engine's own sample leaves them out.
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.data = dict(name="synthetic", num_classes=497, num_images=4096, image_shape=(16, 16, 1),
                     seed=0, eval_classes=8, eval_images=64)
  config.batch_size, config.mesh.shape = 32, (8,)
  config.optimizer.update(name=optimizer, weight_decay=0.1, warmup_steps=0, learning_rate=0.5)
  config.engine.update(kind="sharded", chunk_size=24, sample_rate=0.6)
  source, _ = train_lib.make_sources(config.data)
  records = [source[i] for i in range(config.batch_size)]
  batch = {"image": np.stack([r["image"] for r in records]),
           "label": np.array([r["label"] for r in records], np.int32)}
  mesh = sharding_lib.make_mesh(config)
  results = {}
  for freeze in (True, False):
    config.engine.freeze_unsampled = freeze
    experiment, state = train_lib.create_train_state(config, mesh, source.num_classes,
                                                     source.image_shape)
    step = jax.jit(lambda s, b, e=experiment: train_lib.train_step(e, s, b))
    with jax.numpy_dtype_promotion("standard"):  # optax's AdamW mixes float and int.
      results[freeze] = jax.device_get((state, *step(state, jax.device_put(
          batch, experiment.batch_sharding))))
  (initial, frozen, frozen_metrics), (_, full, full_metrics) = results[True], results[False]

  def head_rows(state):  # W and its per-row optimizer state: momentum, or Adam's two moments
    return [leaf for leaf in jax.tree.leaves((state.params["head"], state.opt_state))
            if leaf.shape == (504, 32)]

  changed = np.any(frozen.params["head"] != initial.params["head"], axis=1)
  assert changed.sum() == 8 * 38  # each device's 38 sampled rows (all 32 classes among them)
  assert not np.any(changed[497:])  # W's padding rows
  assert set(batch["label"]) <= set(np.flatnonzero(changed))
  assert len(head_rows(frozen)) == {"sgd": 2, "adamw": 3}[optimizer]
  for got, want, before in zip(head_rows(frozen), head_rows(full), head_rows(initial),
                               strict=True):
    np.testing.assert_allclose(got[changed], want[changed], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got[~changed], before[~changed])
  moved = full.params["head"][~changed] != initial.params["head"][~changed]
  assert np.all(np.any(moved, axis=1))  # decayed: the full step moves every row
  for got, want in zip(jax.tree.leaves(frozen.params["backbone"]),
                       jax.tree.leaves(full.params["backbone"]), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(frozen_metrics["loss"], full_metrics["loss"], rtol=1e-6)


def _step_temp_bytes(config, num_classes):
  mesh = sharding_lib.make_mesh(config)
  experiment, state = train_lib.create_train_state(config, mesh, num_classes, (28, 28, 1),
                                                   abstract=True)
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, 28, 28, 1), jnp.uint8,
                                         sharding=experiment.batch_sharding),
           "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32,
                                         sharding=experiment.batch_sharding)}
  step = jax.jit(lambda s, b: train_lib.train_step(experiment, s, b), donate_argnums=0)
  with jax.set_mesh(mesh), jax.numpy_dtype_promotion("standard"):
    compiled = step.lower(state, batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes, state.params["head"].size * 4


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_freeze_unsampled_float16_step_holds_no_copy_of_w(optimizer):
  # Loss scaling must not undo updating the sampled rows alone: an overflow's select between
  # the whole new and old W (and its momentum or moments) held copies of them, so that the
  # float16 step needed more memory than the step updating every row.
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.batch_size, config.mesh.shape = 32, (1,)
  config.optimizer.name = optimizer
  config.engine.update(kind="chunked", chunk_size=8192, sample_rate=0.1, freeze_unsampled=True)
  temps = {}
  for dtype in ("float32", "float16"):
    config.compute_dtype = dtype
    temps[dtype], w_bytes = _step_temp_bytes(config, 400_000)
  assert temps["float16"] - temps["float32"] < w_bytes / 4, (temps, w_bytes)


@pytest.mark.parametrize("freeze_unsampled", [False, True])
def test_float16_overflow_leaves_the_state_as_it_was(freeze_unsampled):
  # Every running statistic too: BatchNorm's, CurricularFace's t, the centres (an overflowed
  # forward pass would leave NaN in them), on either path of the optimizer step.
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.compute_dtype, config.mesh.shape = "float16", (2,)
  config.loss_scale = dict(initial=2.0**40, growth_interval=2)  # Overflows at first.
  config.loss = dict(name="curricularface", scale=16.0, margin=0.5)
  config.center_loss.weight = 0.01
  config.engine.update(kind="sharded", chunk_size=2, sample_rate=0.5,
                       freeze_unsampled=freeze_unsampled)
  config.model.kwargs.batch_norm = True
  source = margins_data.digits("open_train", image_size=config.data.image_size)
  batch = {"image": source.images[:16],
           "label": jnp.asarray(source.labels[:16])}
  mesh = sharding_lib.make_mesh(config)
  train_lib.check_config(config, mesh)
  experiment, state = train_lib.create_train_state(config, mesh, source.num_classes,
                                                   source.image_shape)
  step = jax.jit(lambda s, b: train_lib.train_step(experiment, s, b))
  with jax.set_mesh(mesh):
    new, metrics = step(state, jax.device_put(batch, experiment.batch_sharding))
  assert metrics["skipped"] == 1
  for name in ("params", "model_state", "margin", "centers"):
    jax.tree.map(np.testing.assert_array_equal, getattr(new, name), getattr(state, name))
  counts = lambda s: [leaf for leaf in jax.tree.leaves(s.opt_state) if leaf.ndim]  # noqa: E731
  jax.tree.map(np.testing.assert_array_equal, counts(new), counts(state))  # the moments
  assert _schedule_counts(new.opt_state) == [1, 1]
  for _ in range(40):  # A finite step (the scale halved until one is) moves them all.
    if int(new.loss_scale.finite_steps):
      break
    with jax.set_mesh(mesh):
      new, metrics = step(new, jax.device_put(batch, experiment.batch_sharding))
  assert int(new.loss_scale.finite_steps) == 1
  assert float(new.margin.t) != float(state.margin.t)
  assert not np.array_equal(new.centers, state.centers)


def test_progress_line_shows_the_skipped_float16_steps():
  # A float16 run whose every step overflowed printed ordinary lines; metrics.jsonl alone said so.
  metrics = {"loss": 1.0, "learning_rate": 0.1, "skipped": np.float32(3)}
  assert "lr 0.1 | 3 skipped | 100 img/s" in run_log.progress_line(5, 10, metrics, 100.0, 5.0)
  metrics["skipped"] = np.float32(0)
  assert "skipped" not in run_log.progress_line(5, 10, metrics, 100.0, 5.0)
  del metrics["skipped"]  # float32 and bfloat16 runs
  assert "skipped" not in run_log.progress_line(5, 10, metrics, 100.0, 5.0)


def test_progress_line_eta_counts_hours_past_a_day():
  # The recipes train for days (ms1mv3_r50: 101,160 steps): an ETA of 25 h 1 min 1 s is
  # 25:01:01, three days 72:00:00 (a clock's %H wrapped them to 01:01:01 and 00:00:00).
  metrics = {"loss": 1.0, "learning_rate": 0.1}
  for seconds, eta in ((25 * 3600 + 61.7, "25:01:01"), (3 * 86400, "72:00:00"),
                       (59.9, "00:00:59"), (-1.0, "00:00:00")):
    assert run_log.progress_line(5, 10, metrics, 100.0, seconds).endswith(f"| ETA {eta}"), eta


def test_replaced_evaluation_line_leaves_the_other_steps_evaluations(tmp_path):
  # Redoing step 4's evaluation on a resume replaces step 4's line only: step 2's evaluation of
  # the same sets, and step 4's loss, stay.
  writer = run_log.MetricWriter(str(tmp_path), 0)
  writer.write(2, {"open/auc": 0.8})
  writer.write(4, {"loss": 1.0})
  writer.write(4, {"open/auc": 0.85})
  writer.close()
  writer = run_log.MetricWriter(str(tmp_path), 4)
  writer.write(4, {"open/auc": 0.9}, replace=True)
  writer.close()
  assert read_metrics(str(tmp_path)) == [
      {"step": 2, "open/auc": 0.8}, {"step": 4, "loss": 1.0}, {"step": 4, "open/auc": 0.9}]


def test_replaced_evaluation_line_goes_when_the_resumed_run_evaluates_fewer_sets(tmp_path):
  # The stopped run evaluated open and lfw at step 2; the resumed one, without lfw's .bin, only
  # open: its line replaces the old one, not beside it.
  writer = run_log.MetricWriter(str(tmp_path), 0)
  writer.write(2, {"loss": 1.0})
  writer.write(2, {"open/auc": 0.8, "lfw/auc": 0.9})
  writer.close()
  writer = run_log.MetricWriter(str(tmp_path), 2)
  writer.write(2, {"open/auc": 0.85}, replace=True)
  writer.close()
  assert read_metrics(str(tmp_path)) == [{"step": 2, "loss": 1.0}, {"step": 2, "open/auc": 0.85}]


def test_replaced_evaluation_line_goes_whether_or_not_its_sets_were_finite(tmp_path):
  # A run evaluated step 2 in float16 (lfw not finite), was stopped before its next checkpoint,
  # and resumed from 2 with config.compute_dtype = "float32": the step's evaluation is done
  # again and its line replaced; the old one, whose keys differ, stayed beside it.
  writer = run_log.MetricWriter(str(tmp_path), 0)
  writer.write(2, {"loss": 1.0})
  writer.write(2, {"lfw/non_finite_embeddings": 12})
  writer.close()
  writer = run_log.MetricWriter(str(tmp_path), 2)
  writer.write(2, {"lfw/verification_accuracy": 0.9, "lfw/auc": 0.95}, replace=True)
  writer.close()
  assert read_metrics(str(tmp_path)) == [
      {"step": 2, "loss": 1.0}, {"step": 2, "lfw/verification_accuracy": 0.9, "lfw/auc": 0.95}]
