"""Sub-centre ArcFace's cleaning step (``margins.tools.subcenter_drop``): the dominant
sub-centre, the angle threshold, and the cleaned RecordIO folder written from a run."""

import json
import math
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

from margins import data as data_lib
from margins import eval_lib
from margins import recipes
from margins import train_lib
from margins.tools import subcenter_drop
from tests.test_evaluate_export import cli  # noqa: F401  (a fixture)
from tests.test_evaluate_export import live_embeddings
from tests.test_recipes import RECIPES, _write_dataset
from tests.test_train import load_config


def _unit(degrees):
  """Unit vectors in the plane at these angles (degrees) from the x axis, in 3-D."""
  radians = np.radians(np.asarray(degrees, np.float64))
  return np.stack([np.cos(radians), np.sin(radians), np.zeros_like(radians)], axis=-1)


def _by_loops(embeddings, centres, labels, num_classes, max_angle):
  """insightface's ``drop.py`` per class, as it reads: votes for the nearest sub-centre, the most
  voted, keep the images within ``max_angle`` of it; kept classes numbered in order."""
  keep, new_labels, next_label = [], {}, 0
  for label in range(num_classes):
    images = [i for i in range(len(labels)) if labels[i] == label]
    if not images:
      continue
    unit = [e / np.linalg.norm(e) for e in embeddings[images]]
    subcentres = [c / np.linalg.norm(c) for c in centres[label]]
    votes = [0] * len(subcentres)
    for e in unit:
      votes[int(np.argmax([c @ e for c in subcentres]))] += 1
    dominant = subcentres[int(np.argmax(votes))]
    kept = [i for i, e in zip(images, unit) if e @ dominant > math.cos(math.radians(max_angle))]
    if kept:
      keep += kept
      new_labels.update({i: next_label for i in kept})
      next_label += 1
  return sorted(keep), new_labels, next_label


def test_dominant_subcentre_and_threshold_on_known_angles():
  centres = np.stack([_unit([0, 120, 240]), _unit([0, 120, 240]), _unit([90, 180, 270])]) * 3
  labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
  # Class 0: three images near sub-centre 120° (one 74° off, kept), one at 0° (120° off).
  # Class 1: a tie of votes, 0° and 120°: the first wins; the image at 120° is 120° off.
  # Class 2: dominant 90°, both other images 80° off: only its first image stays.
  angles = [110, 130, 194, 0, 10, 120, 95, 170, 10]
  embeddings = _unit(angles) * np.linspace(0.5, 2, len(angles))[:, None]
  cosines = subcenter_drop.subcenter_cosines(embeddings, centres, labels)
  np.testing.assert_allclose(cosines, [[c @ e / np.linalg.norm(e) / 3 for c in centres[y]]
                                       for e, y in zip(embeddings, labels)], atol=1e-6)
  cleaning = subcenter_drop.drop_noisy(cosines, labels, 3, max_angle=75.0)
  assert cleaning.dominant.tolist() == [1, 0, 0]
  assert cleaning.keep.tolist() == [True, True, True, False, True, False, True, False, False]
  assert cleaning.labels.tolist() == [0, 0, 0, -1, 1, -1, 2, -1, -1]
  cleaning = subcenter_drop.drop_noisy(cosines, labels, 3, max_angle=12.0)  # 74° off: out.
  assert cleaning.labels.tolist() == [0, 0, -1, -1, 1, -1, 2, -1, -1]
  # Below 10°, classes 0 and 1 lose every image: class 2 becomes class 0.
  cleaning = subcenter_drop.drop_noisy(cosines, labels, 3, max_angle=9.0)
  assert cleaning.labels.tolist() == [-1, -1, -1, -1, -1, -1, 0, -1, -1]
  assert cleaning.num_classes == 1


def test_an_image_exactly_at_the_angle_limit_is_dropped():
  # Kept only where the cosine exceeds cos(max_angle): cos 0 = 1 and cos 180° = -1 are exact, so
  # an image on its sub-centre is dropped at 0 degrees, one opposite it at 180.
  cosines = np.array([[1.0], [-1.0], [0.5]], np.float32)
  labels = np.array([0, 0, 0])
  assert subcenter_drop.drop_noisy(cosines, labels, 1, max_angle=0.0).keep.tolist() == [
      False, False, False]
  assert subcenter_drop.drop_noisy(cosines, labels, 1, max_angle=180.0).keep.tolist() == [
      True, False, True]
  assert subcenter_drop.drop_noisy(cosines, labels, 1, max_angle=61.0).keep.tolist() == [
      True, False, True]


def test_drop_noisy_equals_drop_py_on_random_classes():
  rng = np.random.default_rng(0)
  num_classes, subcentres = 30, 3
  centres = rng.normal(size=(num_classes, subcentres, 8))
  labels = rng.integers(0, num_classes - 2, size=400)  # The last two classes have no images.
  # Most images near sub-centre 0 of their class, a few random.
  embeddings = centres[labels, 0] + rng.normal(size=(400, 8)) * 1.5
  cosines = subcenter_drop.subcenter_cosines(embeddings, centres, labels)
  for max_angle in (30.0, 60.0, 75.0):
    cleaning = subcenter_drop.drop_noisy(cosines, labels, num_classes, max_angle=max_angle)
    keep, new_labels, kept_classes = _by_loops(embeddings, centres, labels, num_classes,
                                               max_angle)
    assert np.flatnonzero(cleaning.keep).tolist() == keep and 0 < len(keep) < 400
    assert [cleaning.labels[i] for i in keep] == [new_labels[i] for i in keep]
    assert cleaning.num_classes == kept_classes
  # One centre per class ([C, D]): the angle to it.
  cosines = subcenter_drop.subcenter_cosines(embeddings, centres[:, 0], labels)
  assert cosines.shape == (400, 1)
  cleaning = subcenter_drop.drop_noisy(cosines, labels, num_classes)
  keep, _, _ = _by_loops(embeddings, centres[:, :1], labels, num_classes, 75.0)
  assert np.flatnonzero(cleaning.keep).tolist() == keep


def test_cosines_gather_only_the_labels_rows_of_a_split_head():
  # The run's head [C, K, D] split by rows over 8 devices: each image's K rows reach it (an
  # all-reduce of [N, K, D]); the whole head was copied to the host of every process before.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(64, 3, 32)).astype(np.float32)
  embeddings, labels = rng.normal(size=(16, 32)).astype(np.float32), np.arange(16) * 4
  with jax.set_mesh(mesh):
    head = jax.device_put(centres, jax.NamedSharding(mesh, jax.P("data")))
    hlo = subcenter_drop.subcenter_cosines.lower(embeddings, head, labels).compile().as_text()
    got = subcenter_drop.subcenter_cosines(embeddings, head, labels)
  collectives = re.findall(r"= (\S+) (all-gather|all-reduce|collective-permute|all-to-all)\(", hlo)
  assert {(shape.split("{")[0], op) for shape, op in collectives} == {
      ("f32[16,3,32]", "all-reduce")}, collectives
  np.testing.assert_allclose(got, subcenter_drop.subcenter_cosines(embeddings, centres, labels),
                             rtol=1e-6)
  # A label past the rows gives NaN, not another class's sub-centres.
  assert np.isnan(subcenter_drop.subcenter_cosines(embeddings[:1], centres, [64])).all()


def test_zero_vectors_and_bad_input():
  cosines = subcenter_drop.subcenter_cosines(np.zeros((2, 3)), np.ones((2, 2, 3)), [0, 1])
  assert cosines.tolist() == [[0, 0], [0, 0]]
  assert not subcenter_drop.drop_noisy(cosines, [0, 1], 2).keep.any()
  with pytest.raises(ValueError, match=r"`labels` must be in \[0, 2\)"):
    subcenter_drop.drop_noisy(cosines, [0, 2], 2)
  with pytest.raises(ValueError, match=r"must be \[N, K\]"):
    subcenter_drop.drop_noisy(cosines, [0, 1, 1], 2)


def test_cli_writes_the_kept_images_of_a_subcentre_run(tmp_path, cli, monkeypatch):  # noqa: F811
  data = tmp_path / "noisy"
  data.mkdir()
  _write_dataset(data, num_classes=12, per_class=4)
  config = load_config(os.path.join(RECIPES, "ms1mv3_r50.py"), f"{data},quick")
  config.num_steps, config.log_every = 2, 1
  config.loss.subcenters = 3
  config.model = dict(name="small_cnn", embedding_dim=32, kwargs=dict(widths=(8, 16, 32)))
  config.eval.bins = ()
  run = str(tmp_path / "run")
  with jax.default_prng_impl("rbg"):
    train_lib.train_and_evaluate(config, run)
  # Independently: the restored model's embeddings and sub-centres, drop.py's loops.
  experiment, state = train_lib.restore(run)
  source = data_lib.RecordIOSource(data, image_shape=experiment.image_shape)  # 32 x 32
  images = np.stack([source[i]["image"] for i in range(len(source))])
  embeddings = live_embeddings(experiment, state, images, flip=False)
  centres = np.asarray(state.params["head"])[:12]
  assert centres.shape == (12, 3, 32)
  # A threshold between two images' angles, near the median: about half are kept.
  cosines = subcenter_drop.subcenter_cosines(embeddings, centres, source.labels)
  angles = np.sort(np.degrees(np.arccos(subcenter_drop.drop_noisy(
      cosines, source.labels, 12).cosines)))
  gaps = np.diff(angles)
  middle = np.argmax(np.where(np.abs(np.arange(len(gaps)) - len(gaps) // 2) < 8, gaps, 0))
  max_angle = float(angles[middle] + angles[middle + 1]) / 2
  keep, new_labels, kept_classes = _by_loops(embeddings, centres, source.labels, 12, max_angle)
  assert 10 < len(keep) < 40

  out = tmp_path / "clean"
  cli(subcenter_drop, "--workdir", run, "--out", str(out), "--max_angle", str(max_angle),
      "--batch_size", "16")
  cleaned = data_lib.RecordIOSource(out)
  assert (len(cleaned), cleaned.num_classes, cleaned.image_shape) == (
      len(keep), kept_classes, (112, 112, 3))  # As stored.
  assert cleaned.labels.tolist() == [new_labels[i] for i in keep]
  assert [cleaned.encoded_image(i) for i in range(len(keep))] == [
      source.encoded_image(i) for i in keep]  # The stored bytes, not re-encoded.
  starts = np.searchsorted(cleaned.labels, np.arange(kept_classes)) + 1
  ends = np.searchsorted(cleaned.labels, np.arange(kept_classes), side="right") + 1
  assert cleaned.identity_ranges().tolist() == np.stack([starts, ends], 1).tolist()
  bins = sorted(f"{name}.bin" for name in recipes.VERIFICATION_SETS)  # As the recipes read them.
  assert sorted(os.listdir(out)) == [*bins, "property", "train.idx", "train.rec"]
  assert all((out / name).read_bytes() == (data / name).read_bytes() for name in bins)
  # A bfloat16 run (this one's checkpoint under a config.json saying so) is cleaned in float32,
  # unless told to use its own arithmetic.
  bf16_run = str(tmp_path / "bf16_run")
  shutil.copytree(run, bf16_run)
  stored = json.loads((tmp_path / "bf16_run" / "config.json").read_text())
  (tmp_path / "bf16_run" / "config.json").write_text(json.dumps({**stored,
                                                                 "compute_dtype": "bfloat16"}))
  expected = subcenter_drop.drop_noisy(cosines, source.labels, 12).cosines
  for kwargs, same in (({}, True), ({"compute_dtype": "run"}, False)):
    got = subcenter_drop.clean_run(bf16_run, str(tmp_path / f"bf16_{same}"), batch_size=16,
                                   max_angle=max_angle, **kwargs).cosines
    assert np.allclose(got, expected, rtol=1e-6, atol=1e-6) == same, kwargs
  with pytest.raises(app.UsageError, match="No image of .* lies within 0 degrees"):
    cli(subcenter_drop, "--workdir", run, "--out", str(tmp_path / "empty"), "--max_angle", "0")
  assert not os.path.exists(tmp_path / "empty")
  with pytest.raises(app.UsageError, match="--out is required"):
    cli(subcenter_drop, "--workdir", run)
  with pytest.raises(app.UsageError, match="--flip: this tool does not read it"):
    cli(subcenter_drop, "--workdir", run, "--out", str(tmp_path / "flipped"), "--flip")
  # The data named by its .rec file, as RecordIOSource takes it: the same dataset and .bin sets.
  from_rec = tmp_path / "clean_from_rec"
  cli(subcenter_drop, "--workdir", run, "--out", str(from_rec), "--max_angle", str(max_angle),
      "--batch_size", "16", "--data", str(data / "train.rec"))
  assert {name: (from_rec / name).read_bytes() for name in os.listdir(from_rec)} == {
      name: (out / name).read_bytes() for name in os.listdir(out)}
  # Embeddings that are not finite (a float16 network that overflowed) stop it, naming the images.
  embed = eval_lib.embed
  monkeypatch.setattr(eval_lib, "embed", lambda experiment, state, images: embed(
      experiment, state, images) * jnp.inf)
  with pytest.raises(app.UsageError, match="images 0 to 47: 48 of 48 embeddings are not finite"):
    cli(subcenter_drop, "--workdir", run, "--out", str(tmp_path / "nan"), "--batch_size", "16")
  monkeypatch.setattr(eval_lib, "embed", embed)
  # The command line's --compute_dtype reaches it (float32 unless given).
  given = []
  with monkeypatch.context() as patched:
    patched.setattr(subcenter_drop, "clean_run", lambda *args, **kwargs: given.append(
        kwargs["compute_dtype"]) or subcenter_drop.Cleaning(np.ones(1, bool), np.zeros(1), 1,
                                                            np.zeros(1), np.ones(1)))
    for args in ((), ("--compute_dtype", "run"), ("--compute_dtype", "bfloat16")):
      cli(subcenter_drop, "--workdir", run, "--out", str(tmp_path / "x"), *args)
  assert given == ["float32", "run", "bfloat16"]
  # Bad arguments are caught before the checkpoint is read.
  monkeypatch.setattr(train_lib, "restore", lambda *args, **kwargs: pytest.fail("restored"))
  with pytest.raises(app.UsageError, match="not the data the run trained on"):
    other = tmp_path / "other"
    other.mkdir()
    _write_dataset(other, num_classes=5, per_class=2)
    cli(subcenter_drop, "--workdir", run, "--out", str(tmp_path / "x"), "--data", str(other))
  with pytest.raises(app.UsageError, match="must be a positive multiple of the 8 devices"):
    cli(subcenter_drop, "--workdir", run, "--out", str(tmp_path / "x"), "--batch_size", "12")
  before = {name: (data / name).read_bytes() for name in os.listdir(data)}
  with pytest.raises(app.UsageError, match="is the folder being cleaned"):  # The run's data.
    cli(subcenter_drop, "--workdir", run, "--out", str(tmp_path / "." / "noisy"))
  with pytest.raises(app.UsageError, match="is the folder being cleaned"):  # Its .rec file's.
    cli(subcenter_drop, "--workdir", run, "--out", str(data), "--data", str(data / "train.rec"))
  assert {name: (data / name).read_bytes() for name in os.listdir(data)} == before
  (tmp_path / "a_file").write_text("")
  with pytest.raises(app.UsageError, match="a_file is a file; give a folder"):
    cli(subcenter_drop, "--workdir", run, "--out", str(tmp_path / "a_file"))
  # A run started with a relative data path, cleaned from another folder: what to do, not
  # ``No such file or directory: 'noisy'``.
  stored = json.loads((tmp_path / "run" / "config.json").read_text())
  stored["data"]["path"] = "noisy"
  (tmp_path / "run" / "config.json").write_text(json.dumps(stored))
  monkeypatch.chdir(other)
  with pytest.raises(app.UsageError, match=r"config.data.path 'noisy' is not found from here "
                                           r".*; name its RecordIO folder with --data"):
    cli(subcenter_drop, "--workdir", run, "--out", str(tmp_path / "x"))
