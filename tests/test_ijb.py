"""IJB-B/C: the meta files, face alignment, template features and scores (the CLI:
``tests/test_evaluate_export.py``)."""

import dataclasses

import numpy as np
import PIL.Image
import pytest
import sklearn.metrics

from margins import data as data_lib
from margins import evaluation
from margins.data import ijb
from tests.test_recordio import _smooth_image


def rot90_point(points, width):
  """Where pixel centres ``(x, y)`` of an image ``width`` wide go under ``np.rot90``."""
  points = np.asarray(points, np.float64)
  return np.stack([points[..., 1], width - 1 - points[..., 0]], axis=-1)


def test_the_template_is_insightfaces_arcface_dst():
  # Every other test draws its landmarks from this constant, so a wrong or reordered one would
  # align to itself and pass. insightface's arcface_dst (112 x 112): left eye, right eye, nose,
  # left and right mouth corners.
  np.testing.assert_array_equal(ijb.ARCFACE_LANDMARKS, [
      [38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
      [70.7299, 92.2041]])
  assert ijb.ARCFACE_SIZE == 112


def test_align_face_undoes_shifts_and_quarter_turns():
  face = _smooth_image(0, size=112)
  template = ijb.ARCFACE_LANDMARKS
  # Already aligned: the identity (Pillow's bilinear rounds to within one grey level).
  np.testing.assert_allclose(ijb.align_face(face, template), face, atol=1)
  canvas = np.zeros((140, 150, 3), np.uint8)
  canvas[9:121, 30:142] = face
  shifted = template + [30, 9]
  np.testing.assert_allclose(ijb.align_face(canvas, shifted), face, atol=1)
  turned = np.rot90(canvas)
  np.testing.assert_allclose(ijb.align_face(turned, rot90_point(shifted, 150)), face, atol=1)
  # Twice the size, each pixel a 2 x 2 block centred at 2x + 0.5: bilinear lands on the centres.
  np.testing.assert_array_equal(
      ijb.align_face(face.repeat(2, 0).repeat(2, 1), 2 * template + 0.5), face)
  # Half a pixel past the image's edge, the interpolation fades to black as OpenCV's does:
  # the last column, sampled half a pixel past the last pixel, is half white.
  white = np.full((112, 112, 3), 255, np.uint8)
  edge = ijb.align_face(white, template + [0.5, 0])
  np.testing.assert_allclose(edge[:, :-1], 255, atol=1)
  np.testing.assert_allclose(edge[:, -1], 127.5, atol=1)
  grey = face[..., :1]
  np.testing.assert_allclose(ijb.align_face(grey, template, (16, 16)).shape, (16, 16, 1))


def test_similarity_transform_recovers_a_similarity_and_never_reflects():
  rng = np.random.default_rng(0)
  angle, scale, shift = 0.3, 1.7, np.array([5.0, -2.0])
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  points = rng.normal(size=(5, 2)) * 20
  matrix = ijb.similarity_transform(points, points @ (scale * rotation).T + shift)
  np.testing.assert_allclose(matrix, np.concatenate([scale * rotation, shift[:, None]], 1),
                             atol=1e-9)
  mirrored = ijb.similarity_transform(points, points * [-1, 1])
  assert np.linalg.det(mirrored[:, :2]) > 0


def test_template_features_are_sums_of_media_means():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(12, 4))
  templates = np.array([3, 3, 3, 3, 9, 9, 5, 5, 5, 5, 5, 3])
  media = np.array([1, 1, 2, 7, 1, 1, 4, 4, 4, 8, 9, 2])
  ids, unit = evaluation.template_features(features, templates, media)
  assert ids.tolist() == [3, 5, 9]
  for template, row in zip(ids, unit):
    mine = templates == template
    total = sum(features[mine & (media == m)].mean(0) for m in set(media[mine]))
    np.testing.assert_allclose(row, total / np.linalg.norm(total), rtol=1e-12)
  # Ids of other kinds (strings, floats) group the same way.
  named_ids, named_unit = evaluation.template_features(features, [f"t{t}" for t in templates],
                                                       media.astype(float) / 2)
  assert named_ids.tolist() == ["t3", "t5", "t9"]
  np.testing.assert_array_equal(named_unit, unit)


def write_ijb(root, *, image_size=112):
  """An ``IJBC`` folder of 3 identities x 6 crops: each crop is its identity's face shifted into
  a larger canvas and turned by a quarter turn or not; 6 templates (2 per identity, 2 media each)
  and all 15 template pairs. Returns ``(folder, identity of each template)``."""
  folder = root / "IJBC"
  (folder / "loose_crop").mkdir(parents=True)
  (folder / "meta").mkdir()
  rng = np.random.default_rng(2)
  scored, grouped, owners = [], [], {}
  for index in range(18):
    identity, template = index // 6, 10 + index // 3
    owners[template] = identity
    face = _smooth_image(100 + identity, size=image_size)
    canvas = np.zeros((image_size + 30, image_size + 40, 3), np.uint8)
    dx, dy = rng.integers(0, 30), rng.integers(0, 20)
    canvas[dy:dy + image_size, dx:dx + image_size] = face
    points = ijb.ARCFACE_LANDMARKS * image_size / 112 + [dx, dy]
    if index % 2:
      canvas, points = np.rot90(canvas), rot90_point(points, canvas.shape[1])
    name = f"{index}.png"
    PIL.Image.fromarray(np.ascontiguousarray(canvas)).save(folder / "loose_crop" / name)
    score = 0.5 + index / 36
    scored.append(" ".join([name, *(f"{v:.4f}" for v in points.reshape(-1)), f"{score}"]))
    grouped.append(f"{name} {template} {index % 3 // 2}")  # media 0, 0, 1 per template
  pairs = [f"{a} {b} {int(owners[a] == owners[b])}"
           for a in sorted(owners) for b in sorted(owners) if a < b]
  for name, lines in (("name_5pts_score", scored), ("face_tid_mid", grouped),
                      ("template_pair_label", pairs)):
    (folder / "meta" / f"ijbc_{name}.txt").write_text("\n".join(lines) + "\n")
  return folder, owners


def test_reads_aligns_and_scores_a_benchmark(tmp_path):
  folder, owners = write_ijb(tmp_path)
  source = data_lib.IJBSource(folder)
  protocol = source.protocol
  assert (protocol.name, len(source), protocol.pairs.shape) == ("ijbc", 18, (15, 2))
  assert protocol.issame.sum() == 3 and protocol.landmarks.shape == (18, 5, 2)
  # Every aligned crop is its identity's face again.
  for index in range(len(source)):
    np.testing.assert_allclose(source[index]["image"], _smooth_image(100 + index // 6, 112),
                               atol=1)
  # Pixels as features: scores against an independent computation of insightface's recipe.
  features = np.stack([source[i]["image"].reshape(-1) for i in range(len(source))]) / 255.0
  features = features + np.random.default_rng(3).normal(size=features.shape) * 0.1
  result = evaluation.evaluate_ijb(features, protocol)
  weighted = features * protocol.detector_scores[:, None]
  for (first, second), score in zip(protocol.pairs, result.scores):
    mine = []
    for template in (first, second):
      images = protocol.templates == template
      total = sum(weighted[images & (protocol.media == m)].mean(0)
                  for m in np.unique(protocol.media[images]))
      mine.append(total / np.linalg.norm(total))
    assert score == pytest.approx(mine[0] @ mine[1], rel=1e-12)
  assert result.auc == 1.0 and result.tar_at_far[1e-1] == 1.0
  assert np.isnan(result.tar_at_far[1e-2])  # 12 different pairs resolve a FAR of 1/12 at best.
  assert "TAR@FAR=1e-01: 1.00000" in evaluation.format_ijb("ijbc", result)
  # insightface's reading: the ROC point nearest FAR 1e-2 is at FAR 0, never n/a.
  nearest = evaluation.evaluate_ijb(features, protocol, operating_point="nearest")
  assert nearest.tar_at_far[1e-2] == 1.0 and nearest.tar_at_far[1e-1] == 1.0
  # The meta files name the benchmark, whatever the folder is called.
  renamed = folder.rename(tmp_path / "release")
  assert data_lib.read_ijb(renamed).name == "ijbc" == ijb.benchmark_name(renamed)


def _eval_ijbc_tar_at_far(issame, scores, far_targets):
  """insightface's ``eval_ijbc.py`` loop, written out as it reads: the ROC reversed, then per
  target the first of its points with the smallest distance to it."""
  fpr, tpr, _ = sklearn.metrics.roc_curve(issame, scores)
  fpr, tpr = np.flipud(fpr), np.flipud(tpr)
  tars = {}
  for far in far_targets:
    _, index = min(zip(abs(fpr - far), range(len(fpr))))
    tars[far] = tpr[index]
  return tars


def test_nearest_operating_point_reads_the_roc_as_eval_ijbc():
  rng = np.random.default_rng(0)
  issame = rng.random(20_000) < 0.05
  # Scores on a coarse grid: ties, vertical and collinear runs that scikit-learn's ROC drops.
  scores = np.round(rng.normal(issame * 2.0, 1.0) * 8) / 8
  # On top, 10 scores each shared by a same and a different pair: a diagonal run of the ROC from
  # (1/N, 1/P) to (10/N, 10/P), whose 8 inner points scikit-learn drops, so FAR 4/N reads its
  # start and 6/N its end (rather than its 4th and 6th points).
  issame = np.concatenate([np.tile([True, False], 10), issame])
  scores = np.concatenate([np.repeat(10 + np.arange(10.0), 2), scores])
  num_different = int(np.sum(~issame))
  # Targets between ROC points, on them, and halfway between two (a tie: the larger FAR wins).
  fpr, _, _ = sklearn.metrics.roc_curve(issame, scores)
  far_targets = [1e-4, 1e-3, 3e-3, 1e-2, 0.1, 0.3, float(fpr[5]), float(fpr[6] + fpr[7]) / 2,
                 4 / num_different, 6 / num_different]
  nearest = evaluation.nearest_tar_at_far(issame, scores, far_targets)
  assert nearest == _eval_ijbc_tar_at_far(issame, scores, far_targets)
  full_fpr, full_tpr, _ = sklearn.metrics.roc_curve(issame, scores, drop_intermediate=False)
  end = np.max(full_tpr[np.round(full_fpr * num_different) == 10])  # Best TAR at FAR 10/N.
  assert nearest[4 / num_different] == 1 / np.sum(issame)
  assert nearest[6 / num_different] == end >= 10 / np.sum(issame)
  at_most = evaluation.verification.tar_at_far(full_fpr, full_tpr, num_different, far_targets)
  # Mostly higher than the highest TAR at FAR <= target, but lower where a dropped point was it.
  assert any(nearest[far] > at_most[far] for far in far_targets)
  assert nearest[4 / num_different] < at_most[4 / num_different] == 4 / np.sum(issame)


def test_bad_benchmarks_give_clear_errors(tmp_path):
  folder, _ = write_ijb(tmp_path)
  protocol = data_lib.read_ijb(folder)
  with pytest.raises(ValueError, match=r"must be \[18, D\]"):
    evaluation.evaluate_ijb(np.ones((17, 4)), protocol)
  with pytest.raises(ValueError, match="`operating_point` must be one of"):
    evaluation.evaluate_ijb(np.ones((18, 4)), protocol, operating_point="closest")
  with pytest.raises(ValueError, match="`image_features` must be finite"):
    evaluation.evaluate_ijb(np.full((18, 4), np.nan), protocol)
  scores = protocol.detector_scores.copy()
  scores[3] = np.inf
  with pytest.raises(ValueError, match="detector scores must be finite"):
    evaluation.evaluate_ijb(np.ones((18, 4)), dataclasses.replace(protocol, detector_scores=scores))
  # Without the detector scores, theirs are not read.
  evaluation.evaluate_ijb(np.ones((18, 4)), dataclasses.replace(protocol, detector_scores=scores),
                          detector_scores=False)
  for issame in np.zeros_like(protocol.issame), np.ones_like(protocol.issame):
    with pytest.raises(ValueError, match="both same and different pairs"):
      evaluation.evaluate_ijb(np.ones((18, 4)), dataclasses.replace(protocol, issame=issame))
  # issame as 0/1, as insightface's eval_ijbc.py builds it: the same result, booleans kept (ints
  # made `~issame` negative, so TAR@FAR below 1 / different pairs was a number, not NaN).
  features = np.random.default_rng(0).normal(size=(18, 4))
  want = evaluation.evaluate_ijb(features, protocol, far_targets=(1e-3, 0.5))
  got = evaluation.evaluate_ijb(features, dataclasses.replace(
      protocol, issame=protocol.issame.astype(np.int64)), far_targets=(1e-3, 0.5))
  assert np.isnan(got.tar_at_far[1e-3]) and got.tar_at_far[0.5] == want.tar_at_far[0.5]
  assert got.issame.dtype == bool
  with pytest.raises(TypeError, match="`issame` must be booleans"):
    evaluation.evaluate_ijb(features, dataclasses.replace(protocol, issame=protocol.issame * 0.5))
  for far in (0.0, -1.0, 2.0, np.nan):
    with pytest.raises(ValueError, match=r"`far_targets` must be in \(0, 1\]"):
      evaluation.evaluate_ijb(features, protocol, far_targets=(far,))
    with pytest.raises(ValueError, match=r"`far_targets` must be in \(0, 1\]"):
      evaluation.nearest_tar_at_far(protocol.issame, np.zeros(len(protocol.issame)), (far,))
  # template_features alone: 1-D features were read as one feature per template, [] raised an
  # IndexError and NaN scikit-learn's message.
  for bad, message in ((np.ones(2), r"\[N, D\] with N >= 1, got \(2,\)"),
                       (np.ones((0, 2)), r"\[N, D\] with N >= 1, got \(0, 2\)"),
                       (np.full((2, 2), np.nan), "must be finite")):
    with pytest.raises(ValueError, match=message):
      evaluation.template_features(bad, [1, 2][:len(bad)], [1, 2][:len(bad)])
  meta = folder / "meta"
  pairs = meta / "ijbc_template_pair_label.txt"
  pairs.write_text(pairs.read_text() + "10 99 0\n")
  with pytest.raises(ValueError, match="templates without images"):
    evaluation.evaluate_ijb(np.ones((18, 4)), data_lib.read_ijb(folder))
  grouped = meta / "ijbc_face_tid_mid.txt"
  lines = grouped.read_text().splitlines()
  grouped.write_text("\n".join(lines[1:] + lines[:1]) + "\n")
  with pytest.raises(ValueError, match="list different images"):
    data_lib.read_ijb(folder)
  grouped.write_text("0.png 10\n")
  with pytest.raises(ValueError, match="line 1 has 2 fields, not 3"):
    data_lib.read_ijb(folder)
  with pytest.raises(FileNotFoundError, match="ijbb_name_5pts_score.txt not found"):
    data_lib.read_ijb(folder, "IJBB")
  # An empty meta file raised an IndexError, and a field that is no number (or past int64) NumPy's
  # error, neither naming the file.
  grouped.write_text("\n".join(lines) + "\n")
  pairs_text = pairs.read_text()
  for path, text, message in [
      (pairs, "", "ijbc_template_pair_label.txt: the file is empty"),
      (pairs, "10 11 x\n", "ijbc_template_pair_label.txt: line 1 has 'x', not a number"),
      (pairs, "10 99999999999999999999 1\n", "pair_label.txt: line 1 has '99999999999999999999'"),
      (grouped, "\n".join([lines[0], lines[1].replace(" 10 ", " 10.0 "), *lines[2:]]),
       "ijbc_face_tid_mid.txt: line 2 has '10.0', not a number of type int64")]:
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
      data_lib.read_ijb(folder)
    pairs.write_text(pairs_text)
    grouped.write_text("\n".join(lines) + "\n")
  scored = meta / "ijbc_name_5pts_score.txt"
  first, *rest = scored.read_text().splitlines()
  scored.write_text("\n".join([" ".join([first.split()[0], "abc", *first.split()[2:]]), *rest]))
  with pytest.raises(ValueError, match="ijbc_name_5pts_score.txt: line 1 has 'abc', not a"):
    data_lib.read_ijb(folder)


def test_crops_are_decoded_upright_as_every_other_source(tmp_path):
  # insightface's eval_ijbc.py reads crops with cv2.imread, which turns them upright by their
  # EXIF orientation (as decode_image does for every other source); the landmarks are upright.
  folder, _ = write_ijb(tmp_path)
  path = folder / "loose_crop" / "0.png"
  with PIL.Image.open(path) as opened:
    upright = np.asarray(opened.convert("RGB"))
  stored = PIL.Image.fromarray(np.ascontiguousarray(np.rot90(upright)))  # stored a quarter off
  exif = stored.getexif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
  stored.save(path, exif=exif)
  source = data_lib.IJBSource(folder)
  np.testing.assert_allclose(source[0]["image"], _smooth_image(100, 112), atol=1)
  grey = data_lib.IJBSource(folder, image_shape=(112, 112, 1))[0]["image"]
  np.testing.assert_allclose(grey[..., 0], np.asarray(PIL.Image.fromarray(
      _smooth_image(100, 112)).convert("L")), atol=1)


def test_read_ijb_takes_each_column_where_the_meta_files_put_it(tmp_path):
  # Every column holds values no other column does, so a column read from the wrong place shows:
  # the scores and templates and media are what the scoring trusts, and the scoring test above
  # reads them back from the protocol, so it cannot tell.
  meta = tmp_path / "IJBC" / "meta"
  meta.mkdir(parents=True)
  (meta / "ijbc_name_5pts_score.txt").write_text(
      "a.jpg 1 2 3 4 5 6 7 8 9 10 0.25\n"
      "b.jpg 11 12 13 14 15 16 17 18 19 20 0.75\n")
  (meta / "ijbc_face_tid_mid.txt").write_text("a.jpg 301 4001\nb.jpg 302 4002\n")
  (meta / "ijbc_template_pair_label.txt").write_text("301 302 0\n302 301 1\n")
  protocol = data_lib.read_ijb(tmp_path / "IJBC")
  assert protocol.files == ["a.jpg", "b.jpg"]
  # x1 y1 ... x5 y5: landmark k is (x_k, y_k).
  np.testing.assert_array_equal(protocol.landmarks[0], [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]])
  np.testing.assert_array_equal(protocol.landmarks[1, 4], [19, 20])
  assert protocol.detector_scores.tolist() == [0.25, 0.75]
  assert protocol.templates.tolist() == [301, 302] and protocol.media.tolist() == [4001, 4002]
  assert protocol.pairs.tolist() == [[301, 302], [302, 301]]
  assert protocol.issame.tolist() == [False, True]


def test_template_scores_average_within_media_as_the_meta_files_group_them(tmp_path):
  # One template of three images, two of them frames of one video: its feature is the photo's
  # plus the mean of the frames, (1, 0) + ((0, 1) + (0, 3)) / 2 = (1, 2), not the mean of all
  # three; the other template is one image at (2, 1). Cosine of (1, 2) and (2, 1): 4 / 5.
  meta = tmp_path / "IJBC" / "meta"
  meta.mkdir(parents=True)
  (meta / "ijbc_name_5pts_score.txt").write_text(
      "".join(f"{name}.jpg" + " 50" * 10 + " 1.0\n" for name in "abcd"))
  (meta / "ijbc_face_tid_mid.txt").write_text(
      "a.jpg 1 10\nb.jpg 1 11\nc.jpg 1 11\nd.jpg 2 12\n")
  (meta / "ijbc_template_pair_label.txt").write_text("1 2 1\n2 1 0\n")
  protocol = data_lib.read_ijb(tmp_path / "IJBC")
  features = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [2.0, 1.0]])
  result = evaluation.evaluate_ijb(features, protocol, far_targets=(1.0,))
  np.testing.assert_allclose(result.scores, [0.8, 0.8], rtol=1e-12)


def test_tar_at_far_keeps_the_operating_points_of_tied_scores():
  # Template 0 at angle 0; templates 2k + 1 (same as 0) and 2k + 2 (different) both at angle
  # 10 (k + 1) degrees: each score is shared by one same and one different pair, so the ROC
  # climbs the diagonal through (k / 8, k / 8), every point a real threshold. The highest TAR at
  # FAR <= 1/2 is 1/2 (accept scores >= cos 40 degrees); a ROC without the collinear inner points
  # (scikit-learn's default) has none between (0, 0) and (1, 1), and read 0.
  angles = np.radians(np.concatenate([[0.0], np.repeat(10.0 * np.arange(1, 9), 2)]))
  features = np.stack([np.cos(angles), np.sin(angles)], 1)
  pairs = np.array([[0, k] for k in range(1, 17)])
  issame = np.arange(1, 17) % 2 == 1
  protocol = data_lib.IJBProtocol(
      folder="", name="toy", files=[f"{k}.jpg" for k in range(17)],
      landmarks=np.zeros((17, 5, 2)), detector_scores=np.ones(17), templates=np.arange(17),
      media=np.arange(17), pairs=pairs, issame=issame)
  result = evaluation.evaluate_ijb(features, protocol, far_targets=(0.125, 0.5, 0.75))
  # Brute force: accept the pairs scoring at least t, for every score t.
  scores = np.cos(angles[1:])
  points = [(np.mean(scores[~issame] >= t), np.mean(scores[issame] >= t)) for t in scores]
  for target in (0.125, 0.5, 0.75):
    want = max([0.0] + [tar for far, tar in points if far <= target + 1e-12])
    assert result.tar_at_far[target] == pytest.approx(want, abs=1e-12), target
  assert result.tar_at_far == pytest.approx({0.125: 0.125, 0.5: 0.5, 0.75: 0.75}, abs=1e-12)
  np.testing.assert_allclose(result.fpr, np.arange(9) / 8, atol=1e-12)
  np.testing.assert_allclose(result.tpr, np.arange(9) / 8, atol=1e-12)
