"""Tests of the TFDS source on a tiny dataset prepared here with TFDS itself, without TensorFlow.

Skipped when the optional extra (tensorflow-datasets, array_record) is not installed.
"""

import io
import pickle
import sys
import tempfile

import numpy as np
import PIL.Image
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

from margins.data import tfds_source  # noqa: E402  (after the optional imports)

NUM_CLASSES = 3


@pytest.fixture(autouse=True)
def _tfds_temporaries_in_tmp_path(tmp_path, monkeypatch):
  # A builder's constructor makes an empty tempfile.mkdtemp("tfds") to copy dataset info from
  # TFDS's bucket into (none here), and leaves it.
  temporaries = tmp_path / "temporaries"
  temporaries.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temporaries))


def _image(index, shape):
  return np.random.default_rng(index).integers(0, 256, shape, dtype=np.uint8)


def _png(image):
  buffer = io.BytesIO()
  PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
  return buffer.getvalue()


def _prepare(data_dir, *, dataset_name, image_shape, sizes, with_count=False):
  """Prepares ``dataset_name`` in ``data_dir``, with one image per entry of ``sizes``.

  Example ``i`` holds image ``_image(i, sizes[i])`` and label ``i % 3`` (and ``count = i``);
  TFDS writes it as ``array_record`` shards. Images are given to TFDS PNG-encoded: encoding a
  NumPy array would need TensorFlow.
  """
  with tfds.core.registered.skip_registration():  # Read back from disk, not through the class.

    class Builder(tfds.core.GeneratorBasedBuilder):
      name = dataset_name
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        features = {"face": tfds.features.Image(shape=image_shape),
                    "identity": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}
        if with_count:
          features["count"] = tfds.features.Scalar(dtype=np.int64)
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for index, size in enumerate(sizes):
          example = {"face": _png(_image(index, size)), "identity": index % NUM_CLASSES}
          if with_count:
            example["count"] = index
          yield index, example

  Builder(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_source_reads_a_prepared_dataset_without_tensorflow(tmp_path):
  shapes = [(6, 5, 3)] * 7
  _prepare(tmp_path, dataset_name="tiny_faces", image_shape=(6, 5, 3), sizes=shapes)
  assert "tensorflow" not in sys.modules

  source = tfds_source.TfdsSource("tiny_faces", split="train", data_dir=tmp_path,
                                  image_key="face", label_key="identity")
  assert (len(source), source.num_classes, source.image_shape) == (7, NUM_CLASSES, (6, 5, 3))
  # TFDS shuffles examples when writing; find each one by its pixels.
  seen = set()
  for index in range(len(source)):
    record = source[index]
    assert set(record) == {"image", "label"}
    assert record["image"].dtype == np.uint8 and record["image"].shape == (6, 5, 3)
    assert record["label"].dtype == np.int32 and record["label"].shape == ()
    matches = [i for i in range(7) if np.array_equal(record["image"], _image(i, (6, 5, 3)))]
    assert len(matches) == 1 and record["label"] == matches[0] % NUM_CLASSES
    seen.add(matches[0])
  assert seen == set(range(7))
  assert source.labels.dtype == np.int32
  assert source.labels.tolist() == [source[i]["label"] for i in range(7)]

  copy = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(copy[3]["image"], source[3]["image"])
  assert copy[3]["label"] == source[3]["label"]

  half = tfds_source.TfdsSource("tiny_faces", split="train[:3]", data_dir=tmp_path,
                                image_key="face", label_key="identity", image_shape=(4, 4, 1))
  assert len(half) == 3 and half[0]["image"].shape == (4, 4, 1)
  assert "tensorflow" not in sys.modules


def test_source_with_unknown_image_size_and_non_class_label(tmp_path):
  _prepare(tmp_path, dataset_name="varied_faces", image_shape=(None, None, 3),
           sizes=[(6, 5, 3), (9, 4, 3)], with_count=True)
  source = tfds_source.TfdsSource("varied_faces", data_dir=tmp_path, image_key="face",
                                  label_key="identity")
  first = source[0]["image"]
  assert source.image_shape == (*first.shape[:2], 3)
  assert source[1]["image"].shape == source.image_shape  # Resized to the first image's size.

  with pytest.raises(ValueError, match="'count' is not a ClassLabel; pass `num_classes`"):
    tfds_source.TfdsSource("varied_faces", data_dir=tmp_path, image_key="face", label_key="count")
  by_count = tfds_source.TfdsSource("varied_faces", data_dir=tmp_path, image_key="face",
                                    label_key="count", num_classes=2)
  assert sorted(int(by_count[i]["label"]) for i in range(2)) == [0, 1]
  too_few = tfds_source.TfdsSource("varied_faces", data_dir=tmp_path, image_key="face",
                                   label_key="count", num_classes=1)
  with pytest.raises(ValueError, match="has label 1, outside \\[0, 1\\)"):
    [too_few[i] for i in range(2)]


@pytest.mark.parametrize("feature_shape", [(None, None, 1), (6, 5, 1)])
def test_grey_images_keep_one_channel_and_their_height_and_width(tmp_path, feature_shape):
  # Greyscale and not square: the first image's (height, width) and the feature's one channel,
  # each image read back as stored, without a resize or a conversion to RGB.
  _prepare(tmp_path, dataset_name="grey_faces", image_shape=feature_shape,
           sizes=[(6, 5, 1)] * 4)
  source = tfds_source.TfdsSource("grey_faces", data_dir=tmp_path, image_key="face",
                                  label_key="identity")
  assert source.image_shape == (6, 5, 1)
  stored = [_image(i, (6, 5, 1)) for i in range(4)]
  for index in range(4):
    image = source[index]["image"]
    assert image.shape == (6, 5, 1)
    assert sum(np.array_equal(image, expected) for expected in stored) == 1


def test_missing_features_and_datasets(tmp_path):
  _prepare(tmp_path, dataset_name="tiny_faces", image_shape=(6, 5, 3), sizes=[(6, 5, 3)])
  with pytest.raises(ValueError, match="no feature 'image'; features are \\['face', 'identity'\\]"):
    tfds_source.TfdsSource("tiny_faces", data_dir=tmp_path, label_key="identity")
  with pytest.raises(ValueError, match="'identity' is a ClassLabel, expected an Image"):
    tfds_source.TfdsSource("tiny_faces", data_dir=tmp_path, image_key="identity",
                           label_key="identity")
  with pytest.raises(ValueError, match="not found"):
    tfds_source.TfdsSource("absent_faces", data_dir=tmp_path)
