"""The evaluation, export and folder-embedding tools, on a two-step digits run."""

import dataclasses
import gc
import json
import logging as python_logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from absl import app
from absl import flags
from absl import logging

from margins import checkpoints
from margins import cli_flags
from margins import data as data_lib
from margins import distributed
from margins import embed_folder
from margins import eval_lib
from margins import evaluate
from margins import evaluation
from margins import export
from margins import sharding as sharding_lib
from margins import train_lib
from tests.test_ijb import write_ijb
from tests.test_train import ROOT
from tests.test_train import load_config


@pytest.fixture(scope="module")
def digits_bin(tmp_path_factory) -> tuple[str, np.ndarray, np.ndarray]:
  """``(path, grey images [2P, 16, 16, 1], issame [P])``: held-out digits as an RGB ``.bin``."""
  source = data_lib.digits("open_test", image_size=16)
  pairs, issame = evaluation.make_pairs(source.labels, 100, seed=1)
  grey = source.images[pairs.reshape(-1)]
  path = str(tmp_path_factory.mktemp("bins") / "digits.bin")
  data_lib.write_bin(path, np.repeat(grey, 3, axis=-1), issame, image_format="png")
  return path, grey, issame


@pytest.fixture(scope="module")
def training(tmp_path_factory, digits_bin) -> tuple[str, list[str]]:
  """``(workdir, the .bin files the run decoded)`` of a two-step ArcFace run on the digits
  (16 x 16 grey images), evaluated at both steps, on the digits ``.bin`` too."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.num_steps = config.checkpoint_every = 2
  config.eval_every = 1
  config.eval.update(num_pairs=100, bins=(digits_bin[0],))
  config.mesh.shape = (1,)  # Compiles faster; the tools restore it on all 8 devices.
  decoded = []
  with pytest.MonkeyPatch.context() as monkeypatch:
    load_bin = data_lib.load_bin
    monkeypatch.setattr(data_lib, "load_bin",
                        lambda path, **kwargs: decoded.append(path) or load_bin(path, **kwargs))
    train_lib.train_and_evaluate(config, workdir)
  return workdir, decoded


@pytest.fixture(scope="module")
def run(training) -> str:
  return training[0]


@pytest.fixture(scope="module")
def restored(run):
  return train_lib.restore(run)


def test_training_decodes_each_bin_once_and_verifies_it_at_every_evaluation(
    training, restored, digits_bin):
  workdir, decoded = training
  assert decoded == [digits_bin[0]]
  with open(os.path.join(workdir, "metrics.jsonl")) as file:
    logged = [line for line in map(json.loads, file) if "digits/auc" in line]
  assert [line["step"] for line in logged] == [1, 2]
  experiment, state = restored
  embed_fn = jax.jit(lambda s, x: eval_lib.embed(experiment, s, x))
  with jax.set_mesh(experiment.mesh):
    final = eval_lib.evaluate_bin(experiment, state, digits_bin[0], embed_fn=embed_fn)
  np.testing.assert_allclose([logged[-1]["digits/auc"], logged[-1]["digits/xnorm"]],
                             [final.auc, final.xnorm], rtol=1e-5)


@pytest.fixture
def cli():
  """Runs a tool's ``main`` in this process, on fresh flags."""

  def call(module, *args):
    flags.FLAGS.unparse_flags()
    module.main(flags.FLAGS([module.__name__, *args]))

  yield call
  flags.FLAGS.unparse_flags()


def live_embeddings(experiment, state, grey: np.ndarray, *, flip: bool) -> np.ndarray:
  """The restored model's embeddings of uint8 images, normalised here as insightface does."""
  images = ((grey / 255.0 - 0.5) / 0.5).astype(np.float32)
  embed = jax.jit(lambda x: eval_lib.embed(experiment, state, x))
  with jax.set_mesh(experiment.mesh):  # The restored state lives on the run's mesh.
    out = np.asarray(embed(images), np.float64)
    if flip:
      out = out + np.asarray(embed(np.ascontiguousarray(images[:, :, ::-1])), np.float64)
  return out


def insightface_xnorm(experiment, state, grey: np.ndarray) -> float:
  """Mean norm of the embeddings of the images and of their mirror images, taken apart."""
  mirrored = np.ascontiguousarray(grey[:, :, ::-1])
  both = np.concatenate([live_embeddings(experiment, state, images, flip=False)
                         for images in (grey, mirrored)])
  return float(np.mean(np.linalg.norm(both, axis=1)))


def test_evaluate_bin_reports_insightface_xnorm(run, restored, digits_bin):
  experiment, state = restored
  path, grey, issame = digits_bin
  embed_fn = jax.jit(lambda s, x: eval_lib.embed(experiment, s, x))
  with jax.set_mesh(experiment.mesh):
    result = eval_lib.evaluate_bin(experiment, state, path, embed_fn=embed_fn)
  expected = insightface_xnorm(experiment, state, grey)
  np.testing.assert_allclose(result.xnorm, expected, rtol=1e-5)
  first_line = evaluation.format_verification("digits", result, step=3).splitlines()[0]
  assert first_line == f"[digits][3] XNorm: {result.xnorm:.5f}"
  assert np.isnan(evaluation.evaluate_verification(  # It sees only the sums.
      live_embeddings(experiment, state, grey, flip=True), issame).xnorm)
  with open(os.path.join(run, "metrics.jsonl")) as file:  # Training logs the open set's.
    assert json.loads(file.readlines()[-1])["open/xnorm"] > 0


def test_evaluate_bin_without_the_flip_test_embeds_each_image_alone(restored, digits_bin):
  experiment, state = restored
  path, grey, issame = digits_bin
  embed_fn = jax.jit(lambda s, x: eval_lib.embed(experiment, s, x))
  with jax.set_mesh(experiment.mesh):
    result = eval_lib.evaluate_bin(experiment, state, path, embed_fn=embed_fn, flip=False)
  alone = live_embeddings(experiment, state, grey, flip=False)
  expected = evaluation.evaluate_verification(alone, issame)
  np.testing.assert_allclose(result.distances, expected.distances, rtol=1e-5, atol=1e-6)
  assert result.xnorm == pytest.approx(np.mean(np.linalg.norm(alone, axis=1)), rel=1e-5)


def test_evaluate_cli_matches_the_protocol_on_independent_embeddings(
    run, restored, digits_bin, cli, capsys):
  path, grey, issame = digits_bin
  expected = dataclasses.replace(evaluation.evaluate_verification(
      live_embeddings(*restored, grey, flip=True), issame),
      xnorm=insightface_xnorm(*restored, grey))
  capsys.readouterr()
  cli(evaluate, "--workdir", run, "--bin", path, "--batch_size", "16")  # 200 images: padded.
  out = capsys.readouterr().out
  table = evaluate.format_table({"digits": expected})
  assert f"{run}, step 2, in float32:\n{table}\n" in out, (out, table)
  assert os.path.getsize(os.path.join(run, "roc_2.png")) > 10_000
  # Each image alone, as a deployment without the flip test embeds it.
  unflipped = live_embeddings(*restored, grey, flip=False)
  alone = dataclasses.replace(evaluation.evaluate_verification(unflipped, issame),
                              xnorm=float(np.mean(np.linalg.norm(unflipped, axis=1))))
  cli(evaluate, "--workdir", run, "--bin", path, "--noflip")
  table = evaluate.format_table({"digits": alone}, flip=False)
  assert "| Accuracy " in table and alone.auc != expected.auc
  assert f"{run}, step 2, in float32:\n{table}\n" in capsys.readouterr().out


def test_evaluate_and_export_compute_in_float32_unless_told_to_use_the_runs_dtype(
    run, restored, digits_bin, cli, tmp_path, capsys):
  # insightface evaluates and exports in float32; the recipes train in bfloat16. The parameters
  # are float32 either way: this run's checkpoint under a config.json saying bfloat16 is one.
  bf16_run = str(tmp_path / "bf16")
  shutil.copytree(run, bf16_run)
  config_path = pathlib.Path(bf16_run) / "config.json"
  config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                     "compute_dtype": "bfloat16"}))
  path, grey, _ = digits_bin
  # By default as the run evaluated, in its config.eval.compute_dtype (float32 by default).
  as_evaluated, as_run = (train_lib.restore(bf16_run, parts="backbone", compute_dtype=dtype)
                          for dtype in (None, "run"))
  float32_embeddings = live_embeddings(*restored, grey, flip=False)
  np.testing.assert_array_equal(live_embeddings(*as_evaluated, grey, flip=False),
                                float32_embeddings)
  run_embeddings = live_embeddings(*as_run, grey, flip=False)
  assert not np.array_equal(run_embeddings, float32_embeddings)
  # A run's config.json written before 2026-12-07, without the field: it evaluated in its own.
  stored = json.loads(config_path.read_text())
  del stored["eval"]["compute_dtype"]
  config_path.write_text(json.dumps(stored))
  np.testing.assert_array_equal(live_embeddings(
      *train_lib.restore(bf16_run, parts="backbone"), grey, flip=False), run_embeddings)
  for bad in ("float64", np.dtype("float16")):  # A NumPy dtype equals its name.
    with pytest.raises(ValueError, match=r"compute_dtype=.*; choose among \('float32'"):
      train_lib.restore(bf16_run, compute_dtype=bad)
  float32_result, bf16_result, own_result = (
      evaluate.evaluate_run(workdir, [path], **kwargs)[1]["digits"]
      for workdir, kwargs in ((run, {}), (bf16_run, {}), (bf16_run, {"compute_dtype": "run"})))
  assert float32_result.xnorm == bf16_result.xnorm != own_result.xnorm
  np.testing.assert_array_equal(float32_result.tpr, bf16_result.tpr)
  capsys.readouterr()
  cli(evaluate, "--workdir", bf16_run, "--bin", path, "--compute_dtype", "run")
  table = evaluate.format_table({"digits": own_result})
  assert f"{bf16_run}, step 2, in the run's compute_dtype:\n{table}\n" in capsys.readouterr().out
  # The whole training state too: its network trains in the run's bfloat16, embeds in float32.
  whole = train_lib.restore(bf16_run, compute_dtype="float32")
  assert whole[0].config.compute_dtype == "bfloat16"
  np.testing.assert_array_equal(live_embeddings(*whole, grey, flip=False), float32_embeddings)
  images = ((grey / 255.0 - 0.5) / 0.5).astype(np.float32)
  exported = {}
  for args, dtype in (((), "float32"), (("--compute_dtype", "run"), "bfloat16")):
    cli(export, "--workdir", bf16_run, "--out", str(tmp_path / dtype), *args)
    model, metadata = embed_folder.load_model(tmp_path / dtype)
    assert metadata["compute_dtype"] == dtype
    exported[dtype] = np.asarray(model.call(images), np.float64)
  np.testing.assert_allclose(exported["float32"], float32_embeddings, rtol=1e-5, atol=1e-6)
  assert not np.allclose(exported["bfloat16"], exported["float32"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size, count", [("128", 2), ("256", 1)])
def test_evaluate_names_the_set_whose_embeddings_are_not_finite(run, digits_bin, cli,
                                                                monkeypatch, batch_size, count):
  embed = eval_lib.embed
  def first_image_of_each_batch_infinite(experiment, state, images):
    embeddings = embed(experiment, state, images)
    return jnp.where(jnp.arange(len(images))[:, None] == 0, jnp.inf, embeddings)
  monkeypatch.setattr(eval_lib, "embed", first_image_of_each_batch_infinite)
  # One batch of 256: a single embedding that is not finite is refused too.
  with pytest.raises(app.UsageError, match=rf"^digits: {count} of 200 embeddings are not finite "
                                           r"\(NaN or infinite\): the network's forward pass "
                                           r"overflowed"):
    cli(evaluate, "--workdir", run, "--bin", digits_bin[0], "--batch_size", batch_size)


def test_evaluate_cli_scores_an_ijb_folder(run, restored, cli, tmp_path, capsys):
  # The digits model takes 16 x 16 grey images: the template is scaled to them.
  folder, _ = write_ijb(tmp_path, image_size=16)
  source = data_lib.IJBSource(folder, image_shape=(16, 16, 1))
  grey = np.stack([source[i]["image"] for i in range(len(source))])
  expected = evaluation.evaluate_ijb(live_embeddings(*restored, grey, flip=True), source.protocol)
  capsys.readouterr()
  cli(evaluate, "--workdir", run, "--ijb", str(folder), "--batch_size", "16")
  out = capsys.readouterr().out
  assert out == f"{run}, step 2, in float32:\n{evaluation.format_ijb('ijbc', expected)}\n", out
  nearest = evaluation.evaluate_ijb(live_embeddings(*restored, grey, flip=True), source.protocol,
                                    operating_point="nearest")
  assert nearest.tar_at_far != expected.tar_at_far  # 12 different pairs: FAR 1e-2 reads 0.
  cli(evaluate, "--workdir", run, "--ijb", str(folder), "--batch_size", "16",
      "--ijb_operating_point", "nearest")
  out = capsys.readouterr().out
  assert out == f"{run}, step 2, in float32:\n{evaluation.format_ijb('ijbc', nearest)}\n", out
  alone = evaluation.evaluate_ijb(live_embeddings(*restored, grey, flip=False), source.protocol)
  cli(evaluate, "--workdir", run, "--ijb", str(folder), "--noflip")
  assert capsys.readouterr().out == (
      f"{run}, step 2, in float32:\n{evaluation.format_ijb('ijbc', alone)}\n")
  with pytest.raises(app.UsageError, match="--ijb: no such folder"):
    cli(evaluate, "--workdir", run, "--ijb", str(tmp_path / "IJBB"))


def test_evaluate_run_names_each_result_by_its_own_set_with_bins_and_ijb_together(
    run, digits_bin, tmp_path):
  folder, _ = write_ijb(tmp_path, image_size=16)
  step, results = evaluate.evaluate_run(run, [digits_bin[0]], ijb_folders=[folder],
                                        batch_size=16)
  assert step == 2 and sorted(results) == ["digits", "ijbc"]
  assert isinstance(results["digits"], evaluation.VerificationResult)
  assert isinstance(results["ijbc"], evaluation.IJBResult)


def test_missing_files_give_errors_naming_them(run, digits_bin, tmp_path, cli):
  path = digits_bin[0]
  missing_bin = str(tmp_path / "lfw.bin")
  with pytest.raises(app.UsageError, match=f"no such file: {missing_bin}"):
    cli(evaluate, "--workdir", run, "--bin", path, "--bin", missing_bin)
  with pytest.raises(app.UsageError, match=f"--workdir {tmp_path}/nowhere is not a directory"):
    cli(evaluate, "--workdir", str(tmp_path / "nowhere"), "--bin", path)
  with pytest.raises(app.UsageError, match=f"{tmp_path}/config.json does not exist"):
    cli(export, "--workdir", str(tmp_path), "--out", str(tmp_path / "model"))
  _write_png(str(tmp_path / "images" / "a.png"), np.zeros((4, 4), np.uint8))
  with pytest.raises(app.UsageError, match=f"{tmp_path}/model.stablehlo"):
    cli(embed_folder, "--model", str(tmp_path), "--images", str(tmp_path / "images"),
        "--out", str(tmp_path / "e.npy"))
  with pytest.raises(app.UsageError, match="batch_size 12 must be a positive multiple of the 8 "
                     "devices"):
    cli(evaluate, "--workdir", run, "--bin", path, "--batch_size", "12")


def test_default_evaluation_batch_is_rounded_up_to_the_devices():
  # The default of 256 images runs on any device count (3, 6 or 12 devices do not divide it); a
  # batch given is checked.
  assert [eval_lib.global_batch_size(None, n) for n in (1, 3, 8, 12, 512)] == [256, 258, 256, 264,
                                                                             512]
  assert eval_lib.global_batch_size(24, 12) == 24
  for bad in (12, 0):
    with pytest.raises(ValueError, match=f"batch_size {bad} must be a positive multiple of the 8"):
      eval_lib.global_batch_size(bad, 8)


def test_bad_arguments_give_usage_errors(run, digits_bin, tmp_path, cli):
  path = digits_bin[0]
  for tool, args in ((evaluate, ("--bin", path)), (export, ("--out", str(tmp_path / "m")))):
    with pytest.raises(app.UsageError, match=r"No checkpoint 7 in .*; its checkpoints: \[2\]"):
      cli(tool, "--workdir", run, "--step", "7", *args)
  twin = tmp_path / "other" / "digits.bin"
  twin.parent.mkdir()
  twin.write_bytes(pathlib.Path(path).read_bytes())
  with pytest.raises(app.UsageError, match=r"Several --bin files or --ijb folders are named \['digits'\]"):
    cli(evaluate, "--workdir", run, "--bin", path, "--bin", str(twin))
  with pytest.raises(app.UsageError, match=r"--platforms: \['metal'\]; choose among"):
    cli(export, "--workdir", run, "--out", str(tmp_path / "m"), "--platforms", "cpu,metal")
  with pytest.raises(app.UsageError, match=r"--platforms: none given; choose among"):
    cli(export, "--workdir", run, "--out", str(tmp_path / "m"), "--platforms=")
  (tmp_path / "file").write_text("")
  with pytest.raises(app.UsageError, match="is a file, not a folder"):
    cli(export, "--workdir", run, "--out", str(tmp_path / "file"))
  # The shared flags that a tool does not read are refused, not ignored.
  with pytest.raises(app.UsageError, match="--batch_size: this tool does not read it"):
    cli(export, "--workdir", run, "--out", str(tmp_path / "m"), "--batch_size", "7")
  with pytest.raises(app.UsageError, match="--flip: this tool does not read it"):
    cli(export, "--workdir", run, "--out", str(tmp_path / "m"), "--noflip")
  with pytest.raises(app.UsageError, match="--workdir, --step: this tool does not read them"):
    cli(embed_folder, "--model", str(tmp_path / "m"), "--images", str(tmp_path), "--out",
        str(tmp_path / "e.npy"), "--workdir", run, "--step", "2")
  assert not (tmp_path / "m").exists()


def test_shared_flags_are_checked_before_a_tool_reads_anything(tmp_path, cli):
  # No run needed. embed_folder computes in the exported model's dtype: a --compute_dtype given
  # to it is refused, not ignored; a batch of no image is refused when the flags are parsed
  # (unchecked, 0 would read as unset: the default 256).
  args = ("--model", str(tmp_path / "m"), "--images", str(tmp_path), "--out",
          str(tmp_path / "e.npy"))
  with pytest.raises(app.UsageError, match="--compute_dtype: this tool does not read it"):
    cli(embed_folder, *args, "--compute_dtype", "bfloat16")
  with pytest.raises(flags.IllegalFlagValueError, match="--batch_size"):
    cli(embed_folder, *args, "--batch_size", "0")
  # float16 is one of the dtypes the network may compute in (margins._checks.COMPUTE_DTYPES).
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["evaluate", "--compute_dtype", "float16"])
  assert cli_flags.compute_dtype() == "float16"


# A failed read leaves orbax's reads of the other arrays pending; collected, each says that its
# event loop is closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoints_are_named_with_the_others(run, digits_bin, tmp_path, cli):
  # orbax and TensorStore raised some 70 lines ending in a bare Exception; an empty step folder
  # was taken as the latest checkpoint.
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  shutil.copytree(workdir / "checkpoints" / "2", workdir / "checkpoints" / "5")
  for path in (workdir / "checkpoints" / "5").rglob("*"):
    if path.is_file() and path.parent.name == "d":  # The arrays' data files.
      path.write_bytes(path.read_bytes()[:10])
  (workdir / "checkpoints" / "9").mkdir()
  for step, others in (([], r"9 .* cannot be read.*\(Metadata file.*\[2, 5\]"),
                       (["--step", "5"], r"5 .* cannot be read.*\[2, 9\]")):
    with pytest.raises(app.UsageError, match=f"Checkpoint {others}"):
      cli(export, "--workdir", str(workdir), "--out", str(tmp_path / "m"), *step)
    with pytest.raises(app.UsageError, match=f"Checkpoint {others}"):
      cli(evaluate, "--workdir", str(workdir), "--bin", digits_bin[0], *step)
  cli(export, "--workdir", str(workdir), "--out", str(tmp_path / "m"), "--step", "2")
  with pytest.MonkeyPatch.context() as monkeypatch:  # Memory running out is no damaged file.
    def out_of_memory(*args, **kwargs):
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory")

    monkeypatch.setattr(checkpoints.ocp.PyTreeCheckpointHandler, "restore", out_of_memory)
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
      train_lib.restore(str(workdir), 2)
  config = checkpoints.load_config(str(workdir))
  config.num_steps = 3
  with pytest.raises(train_lib.CannotStart, match=r"Checkpoint 9 .* once 9/ is moved out"):
    train_lib.train_and_evaluate(config, str(workdir))
  gc.collect()  # Here, not in another test.


def test_tools_refuse_a_checkpoint_of_another_config_and_write_nothing_in_the_run(
    run, digits_bin, tmp_path, cli):
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  config = json.loads((workdir / "config.json").read_text())
  config["model"]["embedding_dim"] += 1
  (workdir / "config.json").write_text(json.dumps(config))
  for tool, args in ((evaluate, ("--bin", digits_bin[0])),
                     (export, ("--out", str(tmp_path / "m")))):
    with pytest.raises(app.UsageError, match="Checkpoint 2 .* does not fit this config"):
      cli(tool, "--workdir", str(workdir), *args)  # export printed a traceback.
  shutil.rmtree(workdir / "checkpoints")
  for tool, args in ((evaluate, ("--bin", digits_bin[0])),
                     (export, ("--out", str(tmp_path / "m")))):
    with pytest.raises(app.UsageError, match="No checkpoint in"):
      cli(tool, "--workdir", str(workdir), *args)
  assert not (workdir / "checkpoints").exists()  # They made an empty one.


def test_a_bin_set_that_cannot_be_scored_is_named_before_anything_runs(
    run, digits_bin, tmp_path, cli, monkeypatch):
  grey = np.zeros((40, 16, 16, 3), np.uint8)
  embedded = []
  compute_embeddings = eval_lib.compute_embeddings
  monkeypatch.setattr(eval_lib, "compute_embeddings",
                      lambda *args, **kwargs: embedded.append(1) or compute_embeddings(*args,
                                                                                       **kwargs))
  for name, issame, message in (("same.bin", np.ones(20, bool), "both same and different"),
                                ("few.bin", np.arange(4) % 2 == 0, r"\(10\) must not exceed")):
    path = str(tmp_path / name)
    data_lib.write_bin(path, grey[:2 * len(issame)], issame, image_format="png")
    with pytest.raises(app.UsageError, match=f"{path}: .*{message}"):
      cli(evaluate, "--workdir", run, "--bin", digits_bin[0], "--bin", path)
  assert not embedded  # Not even the good set named first.
  config = checkpoints.load_config(run)
  config.eval.bins = (path,)
  with pytest.raises(train_lib.CannotStart, match=f"{path}: .*must not exceed"):
    train_lib.train_and_evaluate(config, str(tmp_path / "new_run"))


def test_evaluate_prints_its_table_then_plots_where_told(run, digits_bin, cli, capsys, tmp_path):
  args = ("--workdir", run, "--bin", digits_bin[0], "--batch_size", "16")
  cli(evaluate, *args, "--out", str(tmp_path / "roc.png"))
  assert os.path.getsize(tmp_path / "roc.png") > 10_000
  (tmp_path / "taken.png").mkdir()  # A plot that cannot be written (a read-only run, say)...
  capsys.readouterr()
  with pytest.raises(app.UsageError, match=r"The ROC curves were not written \(.*taken.png"):
    cli(evaluate, *args, "--out", str(tmp_path / "taken.png"))
  assert "| digits |" in capsys.readouterr().out  # ... after the results were printed.


def test_partial_restores_leave_the_optimizer_state_and_the_head_on_disk(run, restored):
  experiment, whole = restored
  assert whole.params["head"].shape[0] >= experiment.num_classes
  _, model = train_lib.restore(run, parts="params")
  _, backbone = train_lib.restore(run, parts="backbone")
  assert set(model.params) == {"backbone", "head"} and set(backbone.params) == {"backbone"}
  for state in (model, backbone):
    assert state.opt_state is None and state.centers is None
    kept = [jax.device_get((s.step, s.params["backbone"], s.model_state, s.margin))
            for s in (whole, state)]
    jax.tree.map(np.testing.assert_array_equal, *kept)
  np.testing.assert_array_equal(model.params["head"], whole.params["head"])
  with pytest.raises(ValueError, match=r"parts='optimizer'; choose among \('state', "):
    train_lib.restore(run, parts="optimizer")


def test_exported_model_equals_the_live_model_for_any_batch_size(restored, tmp_path):
  experiment, state = restored
  exported = export.export_embedding_model(experiment, state, platforms=("cpu", "cuda"))
  export.save_model(exported, tmp_path, step=2)
  loaded, metadata = embed_folder.load_model(tmp_path)
  assert metadata["input_shape"] == ["b", 16, 16, 1] and metadata["embedding_dim"] == 32
  assert metadata["platforms"] == ["cpu", "cuda"] and metadata["step"] == 2
  assert metadata["input_layout"] == "NHWC" and metadata["channels"] == "grey"
  assert "not L2-normalised" in metadata["embeddings"]
  model = tmp_path / "model.stablehlo"
  model.write_bytes(model.read_bytes()[:1000])  # A copy cut short: flatbuffers' struct.error.
  with pytest.raises(ValueError, match=r"model.stablehlo \(1000 bytes\) is not a model jax"):
    embed_folder.load_model(tmp_path)
  embed = jax.jit(lambda x: eval_lib.embed(experiment, state, x))
  rng = np.random.default_rng(0)
  for batch_size in (3, 8):
    images = rng.uniform(-1, 1, (batch_size, 16, 16, 1)).astype(np.float32)
    with jax.set_mesh(experiment.mesh):
      live = embed(images)
    np.testing.assert_allclose(loaded.call(images), live, rtol=1e-5, atol=1e-5)


def test_load_model_names_a_metadata_file_that_is_not_utf8(tmp_path):
  # A model.json of other bytes than UTF-8 raised a bare UnicodeDecodeError, naming no file. A tiny
  # exported function stands in for a model.
  exported = jax.export.export(jax.jit(lambda x: x.sum(axis=(1, 2))))(
      jax.ShapeDtypeStruct((2, 4, 4, 3), np.float32))
  (tmp_path / embed_folder.MODEL_FILE).write_bytes(exported.serialize())
  (tmp_path / embed_folder.METADATA_FILE).write_bytes(b"\xff\xfe{}")
  with pytest.raises(ValueError, match=r"model.json is not JSON \("):
    embed_folder.load_model(tmp_path)


def test_exported_model_takes_images_of_its_height_and_width_when_they_differ(tmp_path):
  # SphereFace's faces are 112 x 96: the input is [b, H, W, C], as the run's images are.
  config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
  config.mesh.shape = (1,)
  experiment, state = train_lib.create_train_state(config, sharding_lib.make_mesh(config), 6,
                                                   (16, 12, 1))
  export.save_model(export.export_embedding_model(experiment, state), tmp_path)
  loaded, metadata = embed_folder.load_model(tmp_path)
  assert metadata["input_shape"] == ["b", 16, 12, 1]
  images = np.random.default_rng(0).uniform(-1, 1, (3, 16, 12, 1)).astype(np.float32)
  with jax.set_mesh(experiment.mesh):
    live = jax.jit(lambda x: eval_lib.embed(experiment, state, x))(images)
  np.testing.assert_allclose(loaded.call(images), live, rtol=1e-5, atol=1e-5)


def test_export_takes_gpu_for_cuda(run, tmp_path, cli):
  # As the flag's help says: gpu and cuda are one platform, listed once under JAX's name.
  cli(export, "--workdir", run, "--out", str(tmp_path), "--platforms", "gpu,cpu,cuda")
  with open(tmp_path / embed_folder.METADATA_FILE) as f:
    assert json.load(f)["platforms"] == ["cuda", "cpu"]


def _write_png(path, image: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  PIL.Image.fromarray(image).save(path)


def test_export_cli_then_embed_a_folder(run, restored, tmp_path, cli, caplog):
  model_dir = str(tmp_path / "model")
  flags.FLAGS.unparse_flags()
  argv = flags.FLAGS(["export", "--workdir", run, "--out", model_dir])
  try:  # app.run sets INFO, at which orbax logs dozens of lines per restore: the tools show
    logging.set_verbosity(logging.INFO)  # warnings only, as train.py does, and a restore has
    with caplog.at_level(python_logging.INFO):  # none to show.
      export.main(argv)
    assert logging.get_verbosity() == logging.WARNING
    assert not [r.getMessage() for r in caplog.records if r.name == "absl"]
  finally:
    flags.FLAGS.unparse_flags()  # Back to absl's default verbosity.
  with open(os.path.join(model_dir, "model.json")) as f:
    metadata = json.load(f)
  # The run verified its .bin set with the flip test (its digits without: config.eval.flip).
  assert metadata["model"] == "small_cnn" and metadata["flip_test"] is True

  digits = data_lib.digits("open_test", image_size=16).images[:, :, :, 0]
  small = data_lib.digits("open_test", image_size=8).images[0, :, :, 0]
  images = tmp_path / "images"
  names = ["a/0.png", "a/deeper/1.png", "b/2.png", "b/3.png", "c.png"]
  _write_png(images / names[0], digits[0])
  _write_png(images / names[1], np.stack([digits[1]] * 3, axis=-1))  # RGB, R = G = B.
  _write_png(images / names[2], digits[2])
  _write_png(images / names[3], small)  # 8 x 8: resized to the model's 16 x 16.
  _write_png(images / names[4], digits[4])
  (images / "b" / "notes.txt").write_text("not an image")
  resized = np.asarray(PIL.Image.fromarray(small).resize((16, 16), PIL.Image.Resampling.BILINEAR))
  grey = np.stack([digits[0], digits[1], digits[2], resized, digits[4]])[..., None]

  (images / "b" / "._2.png").write_bytes(b"\0" * 16)  # Hidden (macOS resource file): skipped,
  _write_png(images / ".cache" / "x.png", digits[0])  # as is a hidden folder.
  os.symlink(images / "a", images / "a" / "deeper" / "loop")  # A loop: each folder read once.

  out = str(tmp_path / "out" / "embeddings.v1")  # ".npy" is added, as np.save does.
  cli(embed_folder, "--model", model_dir, "--images", str(images), "--out", out, "--flip",
      "--batch_size", "2")
  with open(str(tmp_path / "out" / "embeddings.v1.txt")) as f:
    assert f.read().splitlines() == names
  np.testing.assert_allclose(np.load(out + ".npy"), live_embeddings(*restored, grey, flip=True),
                             rtol=1e-5, atol=1e-5)

  exported, _ = embed_folder.load_model(model_dir)
  assert embed_folder.embed_files(exported, []).shape == (0, 32)
  (images / "b" / "broken.png").write_bytes(b"\0" * 16)
  with pytest.raises(app.UsageError, match="broken.png: cannot decode"):
    cli(embed_folder, "--model", model_dir, "--images", str(images), "--out", out)
  (images / "b" / "broken.png").unlink()
  os.symlink(tmp_path / "nowhere.png", images / "b" / "gone.png")  # A broken link.
  with pytest.raises(app.UsageError, match="No such file.*gone.png"):
    cli(embed_folder, "--model", model_dir, "--images", str(images), "--out", out)


@pytest.mark.parametrize("link_first", [True, False])
def test_a_folder_reached_twice_is_listed_under_the_name_a_sorted_walk_reaches_first(
    tmp_path, link_first):
  # Which name the file system's listing gives first depends on the order they were made in.
  if link_first:
    os.symlink(tmp_path / "faces", tmp_path / "link")
  for name in ("faces/1.png", "faces/2.png"):
    _write_png(tmp_path / name, np.zeros((4, 4), np.uint8))
  if not link_first:
    os.symlink(tmp_path / "faces", tmp_path / "link")
  assert embed_folder.list_images(tmp_path) == ["faces/1.png", "faces/2.png"]


def test_embed_folder_lists_file_names_the_file_system_gives(run, tmp_path, cli):
  # A Latin-1 name on a UTF-8 file system: written back byte for byte in the listing.
  model_dir = str(tmp_path / "model")
  cli(export, "--workdir", run, "--out", model_dir, "--platforms", "CPU,cpu")  # Any case.
  with open(os.path.join(model_dir, embed_folder.METADATA_FILE)) as f:
    assert json.load(f)["platforms"] == ["cpu"]  # Once.
  name = os.fsdecode(b"Jos\xe9.png")
  _write_png(str(tmp_path / "images" / name), np.zeros((16, 16), np.uint8))
  out = str(tmp_path / "e.npy")
  cli(embed_folder, "--model", model_dir, "--images", str(tmp_path / "images"), "--out", out)
  assert (tmp_path / "e.txt").read_bytes() == b"Jos\xe9.png\n"
  assert np.load(out).shape == (1, 32)


def test_embed_folder_refuses_file_names_with_line_breaks(tmp_path, cli):
  # The listing has one path per line: "new\nline.png" would read as two files.
  _write_png(str(tmp_path / "images" / "a.png"), np.zeros((4, 4), np.uint8))
  _write_png(str(tmp_path / "images" / "new\nline.png"), np.zeros((4, 4), np.uint8))
  with pytest.raises(app.UsageError, match=r"line break .*\['new\\nline.png'\]"):
    cli(embed_folder, "--model", str(tmp_path / "no_model"), "--images",
        str(tmp_path / "images"), "--out", str(tmp_path / "e.npy"))
  assert sorted(os.listdir(tmp_path)) == ["images"]


def test_embed_folder_refuses_a_folder_as_out(tmp_path, cli):
  # It wrote the hidden files <folder>/.npy and <folder>/.txt.
  for out in (str(tmp_path), str(tmp_path / "new") + os.sep):
    with pytest.raises(app.UsageError, match="is a folder: give the .npy file to write"):
      cli(embed_folder, "--model", str(tmp_path), "--images", str(tmp_path), "--out", out)
  assert os.listdir(tmp_path) == []


def test_embed_folder_needs_no_training_code():
  code = ("import sys, margins.embed_folder; "
          "print([m for m in sys.modules if m.startswith(('margins.models', 'margins.train_lib', "
          "'flax', 'optax'))])")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.stdout.strip() == "[]"


def test_export_writes_its_files_on_process_0_only(run, tmp_path, cli, monkeypatch):
  """Under srun every task exports (one job); only process 0 writes, else they race on ``out``."""
  saved = []
  monkeypatch.setattr(export, "save_model", lambda *args, **kwargs: saved.append(args))
  export_model = export.export_embedding_model

  def export_as_process_1(*args, **kwargs):  # After the restore, which is the whole job's.
    exported = export_model(*args, **kwargs)
    monkeypatch.setattr(jax, "process_index", lambda *args: 1)
    return exported

  monkeypatch.setattr(export, "export_embedding_model", export_as_process_1)
  cli(export, "--workdir", run, "--out", str(tmp_path / "m"))
  assert not saved and not (tmp_path / "m").exists()
  monkeypatch.setattr(export, "export_embedding_model", export_model)
  monkeypatch.setattr(jax, "process_index", lambda *args: 0)
  cli(export, "--workdir", run, "--out", str(tmp_path / "m"))
  assert len(saved) == 1


@pytest.mark.parametrize("tool", ["margins.evaluate", "margins.export",
                                  "margins.tools.subcenter_drop"])
@pytest.mark.parametrize("launch, expected", [
    ({"SLURM_NTASKS": "2"}, ()),  # srun -n 2: JAX reads the rest from SLURM.
    (["--multihost"], ()),  # A Cloud TPU pod: JAX reads the slice from the VM's metadata.
    (["--coordinator_address=10.0.0.1:1234", "--num_processes=2", "--process_id=1"],
     ("10.0.0.1:1234", 2, 1)),
    (["--coordinator_address=10.0.0.1:1234", "--num_processes=2", "--process_id=1",
      "--distributed_timeout_s=1800"], ("10.0.0.1:1234", 2, 1)),
])
def test_tools_join_the_job_when_launched_as_several_tasks(tool, launch, expected, cli,
                                                           monkeypatch, tmp_path):
  """Started as several tasks, as ``train.py`` is, the tools start ``jax.distributed`` (their
  process-0-only writes rely on it); otherwise every task would run alone as process 0 and write
  the same files."""
  import importlib  # pylint: disable=g-import-not-at-top

  class Started(Exception):
    pass

  def initialize(*args, **kwargs):
    raise Started(args, kwargs)

  for name, value in launch.items() if isinstance(launch, dict) else ():
    monkeypatch.setenv(name, value)
  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  with pytest.raises(Started) as started:
    cli(importlib.import_module(tool), f"--workdir={tmp_path}", f"--out={tmp_path / 'out'}",
        f"--bin={tmp_path / 'missing.bin'}", *(launch if isinstance(launch, list) else ()))
  timeout_s = 1800 if "--distributed_timeout_s=1800" in launch else 300  # JAX's default.
  assert started.value.args == (expected, {"initialization_timeout": timeout_s})


@pytest.mark.parametrize("launch, message", [
    (["--coordinator_address=10.0.0.1:1234"], "go together; got '10.0.0.1:1234', None, None"),
    (["--coordinator_address=10.0.0.1:1234", "--num_processes=2", "--process_id=2"],
     r"process_id 2 is not in \[0, 2\)"),
    # Without a port JAX failed with an IndexError.
    (["--coordinator_address=10.0.0.1", "--num_processes=2", "--process_id=0"],
     r"coordinator_address '10.0.0.1' must be host:port"),
    (["--coordinator_address=10.0.0.1:0", "--num_processes=2", "--process_id=0"],
     r"the port in \[1, 65535\]"),
    # A timeout of 0 s would fail before any other process could join.
    (["--distributed_timeout_s=0"], "--distributed_timeout_s=0: 0 is not a positive integer"),
])
def test_tools_refuse_an_incomplete_job_on_the_command_line(launch, message, cli, tmp_path):
  with pytest.raises(flags.IllegalFlagValueError, match=message):
    cli(export, f"--workdir={tmp_path}", f"--out={tmp_path / 'out'}", *launch)


def test_initialize_starts_the_runtime_only_for_a_job_of_several_processes(monkeypatch):
  """Its result says whether it started ``jax.distributed``: not for one process alone, but under
  Open MPI with two tasks (as under SLURM), and with explicit values; JAX waits 300 s unless told
  otherwise; an IPv6 coordinator in brackets, as gRPC takes it, is a host:port too."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda *args, **kwargs: calls.append((args, kwargs)))
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")  # mpirun -np 1
  assert distributed.initialize() is False and not calls
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # mpirun -np 2
  assert distributed.initialize() is True
  assert distributed.initialize("[::1]:1234", 2, 1, timeout_s=60) is True
  assert calls == [((), {"initialization_timeout": 300}),
                   (("[::1]:1234", 2, 1), {"initialization_timeout": 60})]


@pytest.mark.parametrize("job, message", [
    (("10.0.0.1:1234", 2, -1), r"process_id -1 is not in \[0, 2\)"),
    ((":1234", 2, 0), r"coordinator_address ':1234' must be host:port"),  # No host.
    # Not int()'s "invalid literal" message.
    (("10.0.0.1:http", 2, 0), r"coordinator_address '10.0.0.1:http' must be host:port"),
    (("10.0.0.1:65536", 2, 0), r"the port in \[1, 65535\]"),
])
def test_initialize_refuses_a_job_it_cannot_start_and_starts_nothing(job, message, monkeypatch):
  monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: pytest.fail(
      f"jax.distributed.initialize{args} was called"))
  with pytest.raises(ValueError, match=message):
    distributed.initialize(*job)
