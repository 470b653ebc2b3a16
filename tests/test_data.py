"""Tests of the offline sources (arrays, digits, synthetic identities) and the grain pipeline."""

import pickle
import time

from absl import flags
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest
from sklearn.datasets import load_digits

from margins import data


def _indexed_source(num_examples=24, shape=(6, 5, 3), seed=0):
  """Random images whose label is their index, so a batch tells which examples it holds."""
  images = np.random.default_rng(seed).integers(0, 256, (num_examples, *shape), dtype=np.uint8)
  return data.ArraySource(images, np.arange(num_examples))


def _labels(batches):
  return np.concatenate([batch["label"] for batch in batches]).tolist()


def _normalized_reference(images):
  """(x / 255 - 0.5) / 0.5 in float64, written from the formula."""
  return (images.astype(np.float64) / 255.0 - 0.5) / 0.5


# ArraySource.


def test_array_source_records_and_checks():
  images = np.zeros((3, 4, 5, 1), np.uint8)
  images[2] = 7
  source = data.ArraySource(images, np.array([0, 2, 1], np.int64), class_names=["a", "b", "c"])
  assert (len(source), source.num_classes, source.image_shape) == (3, 3, (4, 5, 1))
  record = source[2]
  assert record["image"].dtype == np.uint8 and record["image"].shape == (4, 5, 1)
  assert int(record["image"][0, 0, 0]) == 7
  assert record["label"].dtype == np.int32 and record["label"].shape == () and record["label"] == 1
  assert source.class_names == ["a", "b", "c"]
  assert pickle.loads(pickle.dumps(source))[1]["label"] == 2
  with pytest.raises(TypeError, match="`images`"):
    data.ArraySource(np.zeros((3, 4, 4, 1), np.float32), np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="`images`"):
    data.ArraySource(np.zeros((3, 4, 4), np.uint8), np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="`labels`"):
    data.ArraySource(images, np.zeros(2, np.int32))
  with pytest.raises(ValueError, match="`labels`"):
    data.ArraySource(images, np.array([0, 1, 5]), num_classes=3)
  with pytest.raises(ValueError, match="`class_names`"):
    data.ArraySource(images, np.array([0, 1, 1]), class_names=["a"])


def test_array_source_refuses_what_no_model_reads_and_names_classes_by_label():
  # Two channels, no image at all and negative labels are each refused with the argument named
  # (unchecked, an empty source would fail in NumPy's max, and a label of -1 would pass).
  with pytest.raises(ValueError, match="`images`"):
    data.ArraySource(np.zeros((3, 4, 4, 2), np.uint8), np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="`images`"):
    data.ArraySource(np.zeros((0, 4, 4, 1), np.uint8), np.zeros(0, np.int32))
  with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\)"):
    data.ArraySource(np.zeros((3, 4, 4, 1), np.uint8), np.array([0, -1, 2]), num_classes=3)
  source = data.ArraySource(np.zeros((3, 4, 4, 3), np.uint8), np.array([2, 0, 1]))
  assert source.class_names == ["0", "1", "2"]  # str(label) by default


# Digits.


@pytest.fixture(scope="module")
def sklearn_digits():
  bunch = load_digits()
  return bunch.images, bunch.target


def test_digits_closed_set_split_is_stratified_disjoint_and_covering(sklearn_digits):
  images, target = sklearn_digits
  train, test = data.digits("train", image_size=8), data.digits("test", image_size=8)
  assert len(train) + len(test) == len(target) == 1797
  assert train.num_classes == test.num_classes == 10
  assert train.class_names == [str(d) for d in range(10)]
  expected_test_counts = np.round(0.2 * np.bincount(target)).astype(int)
  np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), expected_test_counts)
  np.testing.assert_array_equal(np.bincount(train.labels, minlength=10),
                                np.bincount(target) - expected_test_counts)
  # The two splits partition the data set: as multisets of (pixels, label), train + test = all.
  pixels = np.round(images * 255.0 / 16.0).astype(np.uint8)
  keys = lambda images, labels: sorted((x.tobytes(), int(y)) for x, y in zip(images, labels))
  assert keys(np.concatenate([train.images[..., 0], test.images[..., 0]]),
              np.concatenate([train.labels, test.labels])) == keys(pixels, target)
  # The seed picks the test examples; the same seed picks the same ones.
  test_seed_0 = data.digits("test", seed=0).images
  np.testing.assert_array_equal(data.digits("test", seed=0).images, test_seed_0)
  assert not np.array_equal(data.digits("test", seed=1).images, test_seed_0)
  assert len(data.digits("test", test_fraction=0.5)) == np.round(0.5 * np.bincount(target)).sum()


def test_digits_pixels_and_upscaling_match_sklearn_and_pillow(sklearn_digits):
  images, target = sklearn_digits
  open_test = data.digits("open_test", image_size=8)
  held_out = np.isin(target, [6, 7, 8, 9])
  expected = np.round(images[held_out] * 255.0 / 16.0).astype(np.uint8)[..., None]
  np.testing.assert_array_equal(open_test.images, expected)
  big = data.digits("open_test", image_size=20)
  assert big.images.dtype == np.uint8 and big.image_shape == (20, 20, 1)
  assert big.images.min() == 0 and big.images.max() == 255
  reference = np.asarray(PIL.Image.fromarray(expected[3, :, :, 0]).resize(
      (20, 20), PIL.Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(big[3]["image"][:, :, 0], reference)
  record = data.digits("train")[0]
  assert record["image"].shape == (32, 32, 1) and record["label"].dtype == np.int32


def test_digits_open_set_holds_out_classes_and_remaps_labels(sklearn_digits):
  _, target = sklearn_digits
  open_train, open_test = data.digits("open_train"), data.digits("open_test")
  assert (open_train.num_classes, open_test.num_classes) == (6, 4)
  assert open_train.class_names == ["0", "1", "2", "3", "4", "5"]
  assert open_test.class_names == ["6", "7", "8", "9"]
  open_val = data.digits("open_val")
  assert open_val.class_names == open_train.class_names
  assert len(open_train) + len(open_val) == np.isin(target, range(6)).sum()
  # open_val holds the closed-set test examples of the training digits.
  test = data.digits("test", image_size=8)
  np.testing.assert_array_equal(
      data.digits("open_val", image_size=8).images, test.images[test.labels < 6])
  assert len(open_test) == np.isin(target, range(6, 10)).sum()
  np.testing.assert_array_equal(open_test.labels, target[target >= 6] - 6)
  # A custom list, unsorted: labels follow ascending digit order.
  custom = data.digits("open_train", open_set_train_classes=(7, 2, 9), image_size=8)
  assert custom.class_names == ["2", "7", "9"]
  digit_of_label = np.array([2, 7, 9])
  custom_val = data.digits("open_val", open_set_train_classes=(7, 2, 9), image_size=8)
  np.testing.assert_array_equal(
      np.sort(np.concatenate([digit_of_label[custom.labels], digit_of_label[custom_val.labels]])),
      np.sort(target[np.isin(target, [2, 7, 9])]))
  rest = data.digits("open_test", open_set_train_classes=(7, 2, 9))
  assert rest.class_names == ["0", "1", "3", "4", "5", "6", "8"]
  assert set(rest.class_names).isdisjoint(custom.class_names)


def test_digits_rejects_bad_arguments():
  with pytest.raises(ValueError, match="`split`"):
    data.digits("validation")
  for classes in [(), (1, 1), (3, 10), tuple(range(10))]:
    with pytest.raises(ValueError, match="`open_set_train_classes`"):
      data.digits("open_train", open_set_train_classes=classes)
  with pytest.raises(ValueError, match="`open_set_train_classes`"):
    data.digits("open_train", open_set_train_classes=(-1,))
  with pytest.raises(TypeError, match="`open_set_train_classes`"):
    data.digits("open_train", open_set_train_classes=(1.5,))
  with pytest.raises(ValueError, match="`test_fraction`"):
    data.digits("test", test_fraction=1.0)
  with pytest.raises(ValueError, match="`test_fraction`"):  # An empty "test" split.
    data.digits("train", test_fraction=0.0)
  with pytest.raises(ValueError, match="`image_size`"):
    data.digits("train", image_size=0)


# Synthetic identities.


def _centered_unit(image):
  x = image.astype(np.float64).ravel()
  x -= x.mean()
  return x / np.linalg.norm(x)


def test_synthetic_is_a_pure_function_of_seed_and_index():
  source = data.SyntheticSource(num_classes=7, num_images=50, image_shape=(16, 24, 3), seed=3)
  again = pickle.loads(pickle.dumps(data.SyntheticSource(
      num_classes=7, num_images=50, image_shape=(16, 24, 3), seed=3)))
  assert (len(source), source.num_classes, source.image_shape) == (50, 7, (16, 24, 3))
  for index in (0, 13, 49):
    record = source[index]
    assert record["image"].dtype == np.uint8 and record["image"].shape == (16, 24, 3)
    assert record["label"].dtype == np.int32 and int(record["label"]) == index % 7
    np.testing.assert_array_equal(record["image"], again[index]["image"])
  np.testing.assert_array_equal(source[-1]["image"], source[49]["image"])
  assert source.labels.dtype == np.int32
  np.testing.assert_array_equal(source.labels, [source[i]["label"] for i in range(50)])
  other_seed = data.SyntheticSource(num_classes=7, num_images=50, image_shape=(16, 24, 3), seed=4)
  assert not np.array_equal(source[0]["image"], other_seed[0]["image"])
  assert not np.array_equal(source[0]["image"], source[7]["image"])  # same identity, new sample
  grey = data.SyntheticSource(num_classes=2, num_images=4, image_shape=(8, 8, 1))
  assert grey[3]["image"].shape == (8, 8, 1)
  huge = data.SyntheticSource(num_classes=2_000_000, num_images=20_000_000)
  assert int(huge[19_999_999]["label"]) == 19_999_999 % 2_000_000
  with pytest.raises(IndexError):
    source[50]


def test_synthetic_identities_differ_and_are_learnable():
  num_classes, per_class = 20, 6
  source = data.SyntheticSource(
      num_classes=num_classes, num_images=num_classes * per_class, image_shape=(32, 32, 3))
  features = np.stack([_centered_unit(source[i]["image"]) for i in range(len(source))])
  labels = np.array([int(source[i]["label"]) for i in range(len(source))])
  similarity = features @ features.T
  same = labels[:, None] == labels[None, :]
  off_diagonal = ~np.eye(len(source), dtype=bool)
  assert similarity[same & off_diagonal].mean() > similarity[~same].mean() + 0.5
  # Every identity's pattern differs from every other's (mean images far apart).
  means = np.stack([features[labels == k].mean(0) for k in range(num_classes)])
  distances = np.linalg.norm(means[:, None] - means[None, :], axis=-1)
  assert distances[~np.eye(num_classes, dtype=bool)].min() > 0.3
  # Learnability proxy: nearest class mean (from 4 samples each) classifies the other 2.
  train = np.arange(len(source)) < num_classes * 4
  class_means = np.stack([features[train & (labels == k)].mean(0) for k in range(num_classes)])
  predicted = np.argmax(features[~train] @ class_means.T, axis=1)
  assert np.mean(predicted == labels[~train]) >= 0.9


def test_synthetic_rejects_bad_arguments():
  with pytest.raises(ValueError, match="`num_classes`"):
    data.SyntheticSource(num_classes=0)
  with pytest.raises(ValueError, match="`num_images`"):
    data.SyntheticSource(num_images=-1)
  with pytest.raises(TypeError, match="`num_images`"):
    data.SyntheticSource(num_images=2.5)
  with pytest.raises(ValueError, match="`image_shape`"):
    data.SyntheticSource(image_shape=(8, 8, 2))
  with pytest.raises(ValueError, match="`image_shape`"):  # Images of no pixel.
    data.SyntheticSource(image_shape=(0, 8, 3))
  with pytest.raises(ValueError, match="`seed`"):
    data.SyntheticSource(seed=-1)


# Training pipeline.


def test_normalize_images_on_the_host_and_on_the_device():
  images = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
  want = _normalized_reference(images)
  on_host = data.normalize_images(images)
  assert type(on_host) is np.ndarray and on_host.dtype == np.float32
  np.testing.assert_allclose(on_host, want, rtol=0, atol=1e-6)
  on_device = data.normalize_images(jnp.asarray(images))
  traced = jax.jit(data.normalize_images)(jnp.asarray(images))
  for out in (on_device, traced):
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, on_host)
  for bad in (want.astype(np.float32), jnp.asarray(want, jnp.float32), images.astype(np.int32)):
    with pytest.raises(TypeError, match="`images` must be uint8"):
      data.normalize_images(bad)
  with pytest.raises(TypeError, match="`images` must be uint8"):
    jax.jit(data.normalize_images)(jnp.asarray(want, jnp.float32))


def test_train_batches_are_uint8_shuffled_permutations_of_each_epoch():
  source = _indexed_source(num_examples=12)
  batches = list(data.train_dataset(
      source, batch_size=4, num_epochs=2, seed=0, shard_index=0, shard_count=1))
  assert len(batches) == 6
  for batch in batches:
    assert set(batch) == {"image", "label"}
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 6, 5, 3)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (4,)
    np.testing.assert_array_equal(batch["image"], source.images[batch["label"]])
  labels = _labels(batches)
  first, second = labels[:12], labels[12:]
  assert sorted(first) == sorted(second) == list(range(12))
  assert first != list(range(12)) and first != second  # shuffled, and reshuffled each epoch
  unshuffled = data.train_dataset(source, batch_size=4, num_epochs=1, shuffle=False,
                                  shard_index=0, shard_count=1)
  assert _labels(unshuffled) == list(range(12))


def test_train_order_is_deterministic_by_seed():
  source = _indexed_source(num_examples=40)
  make = lambda seed: data.train_dataset(source, batch_size=8, num_epochs=2, seed=seed,
                                         random_flip=True, crop_padding=1, shard_index=0,
                                         shard_count=1)
  run_a, run_b, other = list(make(5)), list(make(5)), list(make(6))
  for batch_a, batch_b in zip(run_a, run_b, strict=True):
    np.testing.assert_array_equal(batch_a["image"], batch_b["image"])
    np.testing.assert_array_equal(batch_a["label"], batch_b["label"])
  assert _labels(run_a) != _labels(other)
  # Seeds 5 and 6 are unrelated: epoch 1 of seed 5 is not epoch 0 of seed 6.
  assert _labels(run_a)[40:80] != _labels(other)[:40]


def test_drop_remainder_and_infinite_repeat():
  source = _indexed_source(num_examples=10)
  kwargs = dict(batch_size=4, num_epochs=1, shard_index=0, shard_count=1)
  assert [len(b["label"]) for b in data.train_dataset(source, **kwargs)] == [4, 4]
  assert [len(b["label"]) for b in data.train_dataset(source, drop_remainder=False, **kwargs)] == [
      4, 4, 2]
  iterator = iter(data.train_dataset(source, batch_size=4, shard_index=0, shard_count=1))
  labels = _labels([next(iterator) for _ in range(10)])  # 4 epochs
  assert [sorted(labels[i:i + 10]) for i in range(0, 40, 10)] == [list(range(10))] * 4


def test_sharding_is_disjoint_covering_and_matches_the_global_batch():
  source = _indexed_source(num_examples=26)
  shard_count, batch_size = 3, 4
  common = dict(seed=2, num_epochs=2, random_flip=True, crop_padding=1)
  shards = [list(data.train_dataset(source, batch_size=batch_size, shard_index=i,
                                    shard_count=shard_count, **common))
            for i in range(shard_count)]
  # 52 positions cut to 51: 17 per process, 4 full batches each.
  assert [len(shard) for shard in shards] == [4, 4, 4]
  single = list(data.train_dataset(source, batch_size=batch_size * shard_count, shard_index=0,
                                   shard_count=1, **common))
  # Step t of the processes together is global batch t of one process: same examples, same
  # augmentation. Positions are disjoint across processes.
  for step, global_batch in enumerate(single[:4]):
    per_process = [
        (int(label), image.tobytes())
        for shard in shards
        for label, image in zip(shard[step]["label"], shard[step]["image"])]
    expected = [(int(label), image.tobytes())
                for label, image in zip(global_batch["label"], global_batch["image"])]
    assert sorted(per_process) == sorted(expected)
  # One epoch, no drop: every example read by exactly one process.
  one_epoch = [_labels(data.train_dataset(source, batch_size=3, num_epochs=1, seed=2,
                                          drop_remainder=False, shard_index=i, shard_count=2))
               for i in range(2)]
  assert set(one_epoch[0]).isdisjoint(one_epoch[1])
  assert sorted(one_epoch[0] + one_epoch[1]) == list(range(26))


@pytest.mark.parametrize("num_epochs", [None, 2])
def test_the_processes_batches_one_after_the_other_are_the_global_batch_in_order(num_epochs):
  """Not only the same examples: the same order, which decides the micro-batches (rows ``i, i +
  k, ...``) of ``config.micro_batches = k``, so that a run trains the same on any number of
  processes. A finite stream's last, smaller global batch is split the same way."""
  source = _indexed_source(num_examples=26)
  common = dict(seed=2, num_epochs=num_epochs, random_flip=True, crop_padding=1,
                drop_remainder=False)
  shards = [data.train_dataset(source, batch_size=4, shard_index=i, shard_count=3, **common)
            for i in range(3)]
  single = data.train_dataset(source, batch_size=12, shard_index=0, shard_count=1, **common)
  sizes = []
  for global_batch, *parts in zip(single, *shards):
    together = {key: np.concatenate([part[key] for part in parts]) for key in ("label", "image")}
    sizes.append(len(together["label"]))
    for key, value in together.items():  # One process reads all 52 positions, three 51.
      np.testing.assert_array_equal(value, global_batch[key][:len(value)])
    if len(sizes) == 6:
      break
  assert sizes == ([12] * 6 if num_epochs is None else [12] * 4 + [3])


def test_each_process_gets_exactly_one_batch_at_the_limit():
  """``batch_size`` examples per process is enough for ``drop_remainder``: one batch each."""
  source = _indexed_source(num_examples=11)  # 11 cut to 10: 5 per process.
  shards = [_labels(data.train_dataset(source, batch_size=5, num_epochs=1, shard_index=i,
                                       shard_count=2)) for i in range(2)]
  assert [len(shard) for shard in shards] == [5, 5]
  assert set(shards[0]).isdisjoint(shards[1])


def test_flip_gives_the_mirrored_image():
  source = _indexed_source(num_examples=32)
  batches = data.train_dataset(source, batch_size=8, num_epochs=1, random_flip=True, seed=0,
                               shard_index=0, shard_count=1)
  flipped = 0
  for batch in batches:
    for label, image in zip(batch["label"], batch["image"]):
      original = source.images[label]
      if np.array_equal(image, original[:, ::-1]):
        flipped += 1
      else:
        np.testing.assert_array_equal(image, original)
  assert 4 <= flipped <= 28  # about half, by chance


def test_flip_probability_is_one_half():
  # insightface's RandomHorizontalFlip mirrors with probability 1/2. 1000 images, each black on
  # the left and white on the right, so that its first pixel tells whether it was mirrored: at
  # 1/2, 500 +- 16 are; the test above also passed at 1/4.
  images = np.zeros((1000, 2, 3, 1), np.uint8)
  images[:, :, 2] = 255
  source = data.ArraySource(images, np.arange(1000))
  for seed in (0, 1):
    batch, = data.train_dataset(source, batch_size=1000, num_epochs=1, random_flip=True,
                                seed=seed, shard_index=0, shard_count=1)
    flipped = batch["image"][:, 0, 0, 0] == 255
    assert np.all(batch["image"][flipped, :, ::-1] == images[0])  # Mirrored, or as they were.
    assert np.all(batch["image"][~flipped] == images[0])
    assert 440 <= flipped.sum() <= 560, flipped.sum()


def test_random_crop_is_a_shift_of_the_zero_padded_image():
  source = _indexed_source(num_examples=30, shape=(7, 6, 1))
  padding = 2
  batches = data.train_dataset(source, batch_size=10, num_epochs=1, crop_padding=padding,
                               seed=4, shard_index=0, shard_count=1)
  offsets = set()
  for batch in batches:
    for label, image in zip(batch["label"], batch["image"]):
      padded = np.pad(source.images[label], ((padding, padding), (padding, padding), (0, 0)))
      matches = [(top, left) for top in range(2 * padding + 1) for left in range(2 * padding + 1)
                 if np.array_equal(padded[top:top + 7, left:left + 6], image)]
      assert matches, f"example {label} is no crop of its padded image"
      offsets.update(matches)
  assert len(offsets) > 5  # offsets vary


def test_random_crop_offsets_cover_every_shift_uniformly():
  # Each of the 2p + 1 offsets a side, the extremes included: a crop that never shifted by +p
  # still produced most offsets and passed the test above.
  padding, image = 2, np.arange(1, 43, dtype=np.uint8).reshape(7, 6, 1)
  crop = data.RandomFlipAndCrop(random_flip=False, crop_padding=padding)
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  tops, lefts = [], []
  for seed in range(400):
    cropped = crop.random_map({"image": image, "label": 0}, np.random.default_rng(seed))["image"]
    (top, left), = [(top, left) for top in range(2 * padding + 1)
                    for left in range(2 * padding + 1)
                    if np.array_equal(padded[top:top + 7, left:left + 6], cropped)]
    tops.append(top)
    lefts.append(left)
  for offsets in (tops, lefts):
    counts = np.bincount(offsets, minlength=2 * padding + 1)
    assert len(counts) == 2 * padding + 1 and counts.min() > 50, counts  # 80 expected each.


def test_augmentation_differs_between_epochs():
  source = data.ArraySource(np.arange(20 * 16, dtype=np.uint8).reshape(20, 4, 4, 1),
                            np.arange(20))
  batches = list(data.train_dataset(source, batch_size=20, num_epochs=2, crop_padding=1,
                                    random_flip=True, seed=0, shard_index=0, shard_count=1))
  by_label = [dict(zip(batch["label"].tolist(), batch["image"])) for batch in batches]
  changed = sum(not np.array_equal(by_label[0][k], by_label[1][k]) for k in range(20))
  assert changed >= 10


def test_checkpoint_restores_the_exact_position(tmp_path):
  source = _indexed_source(num_examples=20)
  make = lambda: iter(data.train_dataset(source, batch_size=3, seed=1, random_flip=True,
                                         crop_padding=1, shard_index=0, shard_count=1))
  iterator = make()
  for _ in range(8):  # crosses an epoch boundary
    next(iterator)
  state = iterator.get_state()
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(8, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = [next(iterator) for _ in range(5)]
    from_state = make()
    from_state.set_state(state)
    from_orbax = make()
    manager.restore(8, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(from_orbax)))
  for restored in (from_state, from_orbax):
    for want in expected:
      got = next(restored)
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])


def test_one_example_per_process_streams_forever():
  # A global batch of one example per process (``config.batch_size`` = the process count): grain
  # gives an endless stream the length ``sys.maxsize``, which batches of one overflowed.
  source = _indexed_source(num_examples=7)
  shards = [iter(data.train_dataset(source, batch_size=1, seed=3, shard_index=i, shard_count=2))
            for i in range(2)]
  single = iter(data.train_dataset(source, batch_size=2, seed=3, shard_index=0, shard_count=1))
  for _ in range(10):  # Almost 3 epochs.
    assert [int(next(shard)["label"][0]) for shard in shards] == next(single)["label"].tolist()


def test_an_endless_stream_ignores_drop_remainder():
  # drop_remainder concerns only the end of a finite stream; passed on to an endless one, it
  # would overflow grain's length in batches of one.
  source = _indexed_source(num_examples=7)
  shards = [iter(data.train_dataset(source, batch_size=1, seed=3, drop_remainder=False,
                                    shard_index=i, shard_count=2)) for i in range(2)]
  # Positions 2t and 2t + 1 at step t: two epochs, each a permutation of the 7 examples.
  labels = [int(next(shard)["label"][0]) for _ in range(7) for shard in shards]
  assert sorted(labels[:7]) == sorted(labels[7:]) == list(range(7))


def test_start_batch_resumes_the_stream_on_any_number_of_processes():
  source = _indexed_source(num_examples=20)
  common = dict(seed=5, random_flip=True, crop_padding=1)
  # A run of 2 processes x 3 examples that stopped after 4 steps (crossing an epoch boundary)...
  whole = [list(data.train_dataset(source, batch_size=3, num_epochs=2, shard_index=i,
                                   shard_count=2, **common)) for i in range(2)]
  for i in range(2):
    resumed = list(data.train_dataset(source, batch_size=3, num_epochs=2, shard_index=i,
                                      shard_count=2, start_batch=4, **common))
    assert len(resumed) == len(whole[i]) - 4
    for got, want in zip(resumed, whole[i][4:]):
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])
  # ... resumes on one process with the same global batch: step 5 holds the same examples,
  # augmented the same way.
  step_5 = next(iter(data.train_dataset(source, batch_size=6, shard_index=0, shard_count=1,
                                        start_batch=4, **common)))
  expected = sorted((int(label), image.tobytes()) for shard in whole
                    for label, image in zip(shard[4]["label"], shard[4]["image"]))
  assert sorted((int(label), image.tobytes())
                for label, image in zip(step_5["label"], step_5["image"])) == expected
  with pytest.raises(ValueError, match="`start_batch` = 7 is past the end"):
    data.train_dataset(source, batch_size=3, num_epochs=1, start_batch=7, shard_index=0,
                       shard_count=1)
  with pytest.raises(ValueError, match="`start_batch`"):
    data.train_dataset(source, batch_size=3, start_batch=-1)


def test_start_batch_at_the_end_resumes_a_finished_run_with_no_batch():
  # 10 examples in batches of 3 make 3 batches: a run that drew all 3 resumes with none, and
  # only a start past them is refused.
  source = _indexed_source(num_examples=10)
  kwargs = dict(batch_size=3, num_epochs=1, shard_index=0, shard_count=1)
  assert list(data.train_dataset(source, start_batch=3, **kwargs)) == []
  with pytest.raises(ValueError, match="`start_batch` = 4 is past the end"):
    data.train_dataset(source, start_batch=4, **kwargs)


@pytest.fixture
def unparsed_absl_flags():
  """As in a notebook: nobody parsed absl's flags, which grain reads when it starts workers."""
  was_parsed = flags.FLAGS.is_parsed()
  flags.FLAGS.unparse_flags()
  yield
  if was_parsed:
    flags.FLAGS.mark_as_parsed()
  else:
    flags.FLAGS.unparse_flags()


def test_worker_processes_give_the_same_batches_and_resume(unparsed_absl_flags):
  del unparsed_absl_flags
  source = _indexed_source(num_examples=16)
  make = lambda workers: data.train_dataset(
      source, batch_size=4, num_epochs=1, seed=3, random_flip=True, shard_index=0,
      shard_count=1, worker_count=workers)
  in_process = list(make(0))
  iterator = iter(make(2))
  try:
    with_workers = [next(iterator), next(iterator)]
    position = iterator.get_state()
    with_workers += list(iterator)
  finally:
    iterator.close()
  resumed = iter(make(2))
  try:
    resumed.set_state(position)
    rest = list(resumed)
  finally:
    resumed.close()
  # grain's state fits only the same worker count (``start_batch`` resumes with any, as the
  # batches do not depend on it).
  with pytest.raises(KeyError):
    iter(make(0)).set_state(position)
  assert len(with_workers) == len(in_process) == 4 and len(rest) == 2
  for got, want in zip(with_workers + rest, in_process + in_process[2:]):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_train_rejects_bad_arguments():
  source = _indexed_source(num_examples=10)
  with pytest.raises(ValueError, match="`batch_size`"):
    data.train_dataset(source, batch_size=0)
  with pytest.raises(TypeError, match="`batch_size`"):
    data.train_dataset(source, batch_size=2.0)
  with pytest.raises(ValueError, match="`num_epochs`"):
    data.train_dataset(source, batch_size=2, num_epochs=0)
  for seed in (-1, 2**32):
    with pytest.raises(ValueError, match="`seed`"):
      data.train_dataset(source, batch_size=2, seed=seed)
  with pytest.raises(ValueError, match="both `shard_index` and `shard_count`"):
    data.train_dataset(source, batch_size=2, shard_index=0)
  with pytest.raises(ValueError, match="`shard_index`"):
    data.train_dataset(source, batch_size=2, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="`crop_padding`"):
    data.train_dataset(source, batch_size=2, crop_padding=-1)
  with pytest.raises(ValueError, match="`crop_padding` must be smaller"):
    data.train_dataset(source, batch_size=2, crop_padding=5)
  with pytest.raises(ValueError, match="`worker_count`"):
    data.train_dataset(source, batch_size=2, worker_count=-1)
  with pytest.raises(ValueError, match="fewer than `batch_size`"):
    data.train_dataset(source, batch_size=6, num_epochs=1, shard_index=0, shard_count=2)
  with pytest.raises(TypeError, match="`source`"):
    data.train_dataset(np.zeros((4, 2, 2, 1), np.uint8), batch_size=2)


class _EmptySource:
  image_shape = (4, 4, 1)

  def __len__(self):
    return 0

  def __getitem__(self, index):
    raise IndexError(index)


def test_an_empty_source_is_refused():
  # Refused by name: unchecked, it would give no batch at all.
  for make in (data.train_dataset, data.eval_dataset):
    with pytest.raises(ValueError, match="`source` is empty"):
      make(_EmptySource(), batch_size=2, shard_index=0, shard_count=1)


def test_the_shard_defaults_to_this_jax_process(monkeypatch):
  # Faked as process 0, then 1, of 2: each reads its own part without being told which.
  source = _indexed_source(num_examples=8)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    train = data.train_dataset(source, batch_size=2, num_epochs=1, shuffle=False)
    # Global batches [0, 1, 2, 3] and [4, 5, 6, 7]: process i reads 2 of each, from 2i.
    assert [batch["label"].tolist() for batch in train] == [
        [2 * index, 2 * index + 1], [4 + 2 * index, 5 + 2 * index]]
    # Evaluation deals the examples out position by position: i, i + 2, ...
    evaluation = data.eval_dataset(source, batch_size=2)
    assert np.concatenate([batch["index"] for batch in evaluation]).tolist() == list(
        range(index, 8, 2))


# Evaluation pipeline.


def test_eval_covers_every_example_once_with_mask():
  source = _indexed_source(num_examples=23)
  shard_count, batch_size = 2, 4
  shards = [list(data.eval_dataset(source, batch_size=batch_size, shard_index=i,
                                   shard_count=shard_count))
            for i in range(shard_count)]
  assert [len(shard) for shard in shards] == [3, 3]  # 23 padded to 24, 12 per process
  seen = []
  for shard in shards:
    for batch in shard:
      assert batch["image"].shape == (4, 6, 5, 3) and batch["mask"].dtype == np.bool_
      assert batch["index"].dtype == np.int32 and batch["label"].dtype == np.int32
      valid = batch["mask"]
      np.testing.assert_array_equal(valid, batch["index"] < 23)
      indices = batch["index"][valid]
      seen.extend(indices.tolist())
      np.testing.assert_array_equal(batch["label"][valid], source.labels[indices])
      assert batch["image"].dtype == np.uint8
      np.testing.assert_array_equal(batch["image"][valid], source.images[indices])
      assert not batch["image"][~valid].any()  # black padding
  assert sorted(seen) == list(range(23))
  single = list(data.eval_dataset(source, batch_size=10, shard_index=0, shard_count=1))
  assert [b["mask"].sum() for b in single] == [10, 10, 3]
  assert np.concatenate([b["index"] for b in single]).tolist() == list(range(30))
  # The same every pass.
  again = list(data.eval_dataset(source, batch_size=10, shard_index=0, shard_count=1))
  np.testing.assert_array_equal(again[2]["image"], single[2]["image"])


def test_pipeline_runs_on_digits_and_synthetic_sources():
  digits_batch = next(iter(data.train_dataset(data.digits("open_train", image_size=16),
                                              batch_size=8, crop_padding=2, seed=0)))
  assert digits_batch["image"].shape == (8, 16, 16, 1)
  assert digits_batch["label"].max() < 6
  synthetic = data.SyntheticSource(num_classes=100, num_images=64, image_shape=(12, 12, 3))
  batch = next(iter(data.eval_dataset(synthetic, batch_size=16)))
  assert batch["image"].shape == (16, 12, 12, 3) and batch["image"].dtype == np.uint8
  assert batch["image"].min() < 64 and batch["image"].max() > 192  # pixels, not [-1, 1]


def test_measure_throughput_counts_images():
  source = _indexed_source(num_examples=12)
  iterator = iter(data.train_dataset(source, batch_size=4, shard_index=0, shard_count=1))
  assert data.measure_throughput(iterator, 3) > 0.0
  assert iterator.get_state() == {"next_index": 4}  # one warm-up batch, three timed
  finite = iter(data.train_dataset(source, batch_size=4, num_epochs=1, shard_index=0,
                                   shard_count=1))
  with pytest.raises(ValueError, match="ended"):
    data.measure_throughput(finite, 3)
  with pytest.raises(ValueError, match="`num_batches`"):
    data.measure_throughput(finite, 0)


def test_measure_throughput_is_the_timed_images_over_the_timed_seconds(monkeypatch):
  # A clock that moves 0.25 s with each batch drawn: after a warm-up batch of 7 images, 3 + 5 +
  # 2 images (batches of 6 x 5 pixels, not to be counted as images) in 0.75 s, 13.33 images/s.
  drawn = [0]

  def batches():
    for size in (7, 3, 5, 2):
      drawn[0] += 1
      yield {"image": np.zeros((size, 6, 5, 3), np.uint8)}

  monkeypatch.setattr(time, "perf_counter", lambda: 0.25 * drawn[0])
  assert data.measure_throughput(batches(), 3) == pytest.approx(10 / 0.75)
