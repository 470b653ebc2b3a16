"""Tests of the image codec and the image-folder source."""

import gc
import io
import os
import pickle
import re
import types

import grain
import numpy as np
import PIL.Image
import pytest

from margins import data
from margins.data import _shared_memory
from margins.data import image_folder


def _random_image(seed, shape=(6, 5, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _save(path, image, image_format="PNG"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  PIL.Image.fromarray(image).save(path, format=image_format)


# Codec.


def test_png_round_trip_is_exact_and_jpeg_is_a_jpeg():
  image = _random_image(0)
  png = image_folder.encode_image(image, image_format="png")
  assert png.startswith(b"\x89PNG")
  np.testing.assert_array_equal(image_folder.decode_image(png), image)
  grey = image[:, :, :1]
  np.testing.assert_array_equal(
      image_folder.decode_image(image_folder.encode_image(grey, image_format="png"),
                                image_shape=(6, 5, 1)), grey)
  assert image_folder.encode_image(image, quality=50).startswith(b"\xff\xd8\xff")


def test_decode_converts_and_resizes_like_pillow():
  image = _random_image(1, (8, 12, 3))
  png = image_folder.encode_image(image, image_format="png")
  # Independent reference: Pillow called directly.
  pil = PIL.Image.fromarray(image)
  expected_grey = np.asarray(pil.convert("L"))[:, :, None]
  np.testing.assert_array_equal(image_folder.decode_image(png, image_shape=(8, 12, 1)),
                                expected_grey)
  np.testing.assert_array_equal(image_folder.decode_image(png, channels=1), expected_grey)
  expected_small = np.asarray(pil.resize((6, 4), PIL.Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(image_folder.decode_image(png, image_shape=(4, 6, 3)),
                                expected_small)


def test_decode_resizes_to_the_transposed_size_of_a_non_square_image():
  # 8 high, 12 wide, asked for 12 high, 8 wide: the stored size read as (H, W) would match it
  # and skip the resize, returning the image as stored.
  image = _random_image(3, (8, 12, 3))
  png = image_folder.encode_image(image, image_format="png")
  expected = np.asarray(PIL.Image.fromarray(image).resize((8, 12), PIL.Image.Resampling.BILINEAR))
  assert expected.shape == (12, 8, 3)
  np.testing.assert_array_equal(image_folder.decode_image(png, image_shape=(12, 8, 3)), expected)
  np.testing.assert_array_equal(image_folder.decode_image(png, image_shape=(8, 12, 3)), image)


def test_jpeg_quality_reaches_the_encoder():
  # Pillow's default quality is 75: a quality dropped on the way would go unnoticed in a decode.
  image = _random_image(4, (16, 16, 3))
  for quality in (30, 95):
    expected = io.BytesIO()
    PIL.Image.fromarray(image).save(expected, format="JPEG", quality=quality)
    assert image_folder.encode_image(image, quality=quality) == expected.getvalue(), quality
  assert image_folder.encode_image(image, quality=30) != image_folder.encode_image(image)


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_greyscale_png_is_scaled_to_8_bits(channels):
  # As OpenCV and MXNet decode it: the high byte (Pillow's own conversion clips at 255).
  grey = np.arange(0, 256, 16, dtype=np.uint8).reshape(2, 8)
  encoded = io.BytesIO()
  PIL.Image.fromarray(grey.astype(np.uint16) * 256 + 100).save(encoded, format="PNG")
  decoded = image_folder.decode_image(encoded.getvalue(), image_shape=(2, 8, channels))
  np.testing.assert_array_equal(decoded, np.repeat(grey[:, :, None], channels, axis=2))


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_exif_orientation_turns_the_image_upright(image_format):
  # As a camera stores a photo taken turned: the pixels as sensed, the turn in the EXIF tag.
  image = _random_image(2, (6, 8, 3))
  turns = {1: lambda a: a, 3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1),
           8: lambda a: np.rot90(a, 1), 2: lambda a: a[:, ::-1]}
  for orientation, turn in turns.items():
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    encoded = io.BytesIO()
    PIL.Image.fromarray(image).save(encoded, format=image_format, exif=exif)
    with PIL.Image.open(io.BytesIO(encoded.getvalue())) as stored:  # The pixels as stored.
      sensed = np.asarray(stored.convert("RGB"))
    np.testing.assert_array_equal(image_folder.decode_image(encoded.getvalue()), turn(sensed),
                                  err_msg=f"orientation {orientation}")


def test_codec_rejects_bad_input(monkeypatch):
  with pytest.raises(ValueError, match="cannot decode image \\(7 bytes\\)"):
    image_folder.decode_image(b"garbage")
  # A header claiming billions of pixels (a damaged one) got past the callers that name the
  # file or record: Pillow's DecompressionBombError, here for 64 pixels against a limit of 10.
  monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10)
  png = image_folder.encode_image(np.zeros((8, 8, 3), np.uint8), image_format="png")
  with pytest.raises(ValueError, match="cannot decode image .*exceeds limit"):
    image_folder.decode_image(png)
  with pytest.raises(ValueError, match="`image_shape`"):
    image_folder.decode_image(b"", image_shape=(4, 4, 2))
  with pytest.raises(ValueError, match="`channels` must be 1 or 3, got 4"):
    image_folder.decode_image(b"", channels=4)
  with pytest.raises(TypeError, match="uint8"):
    image_folder.encode_image(np.zeros((2, 2, 3), np.float32))
  with pytest.raises(ValueError, match="`image`"):
    image_folder.encode_image(np.zeros((2, 2, 4), np.uint8))
  with pytest.raises(ValueError, match="`image_format`"):
    image_folder.encode_image(np.zeros((2, 2, 3), np.uint8), image_format="gif")
  with pytest.raises(ValueError, match="`quality`"):
    image_folder.encode_image(np.zeros((2, 2, 3), np.uint8), quality=0)
  # Fractional sizes were truncated (112.9 -> 112).
  with pytest.raises(TypeError, match="`image_shape` must be"):
    image_folder.check_image_shape((112.9, 112, 3))
  with pytest.raises(ValueError, match="`image_shape` must be"):
    image_folder.check_image_shape((0, 112, 3))


# Listing.


def test_listing_sorts_identities_and_images_and_filters_extensions(tmp_path):
  for name in ["zed/b.JPG", "zed/a.png", "amy/nested/x.jpeg", "amy/c.bmp", "amy/readme.txt",
               ".hidden/a.png", "mid/1.webp", "mid/._1.webp", "zed/.thumbs/a.png"]:
    os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
    (tmp_path / name).touch()
  (tmp_path / "stray.png").touch()  # Files at the top level are not identities.
  # Hidden files and folders inside identities (macOS's AppleDouble ``._*``) are not images.
  paths, labels, names = image_folder.list_image_folder(tmp_path)
  assert names == ["amy", "mid", "zed"]
  assert [os.path.relpath(path, tmp_path) for path in paths] == [
      "amy/c.bmp", "amy/nested/x.jpeg", "mid/1.webp", "zed/a.png", "zed/b.JPG"]
  assert labels.dtype == np.int32 and labels.tolist() == [0, 0, 1, 2, 2]


def test_listing_reads_a_folder_reached_twice_once(tmp_path):
  # A link back up (a loop) listed every image about 40 times, down to the OS's limit on links.
  for name in ("alice/1.png", "alice/sub/2.png", "bob/1.png"):
    os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
    (tmp_path / name).touch()
  os.symlink(tmp_path / "alice", tmp_path / "alice" / "sub" / "back")
  paths, labels, _ = image_folder.list_image_folder(tmp_path)
  assert [os.path.relpath(path, tmp_path) for path in paths] == [
      "alice/1.png", "alice/sub/2.png", "bob/1.png"]
  assert labels.tolist() == [0, 0, 1]


def test_listing_takes_extensions_in_any_case_and_follows_linked_folders(tmp_path):
  # Extensions given in upper case match names in any case; a folder linked into an identity is
  # read as a folder of it (a dataset assembled from links to the originals).
  for name in ("photos/1.png", "photos/2.PNG", "photos/3.jpg", "ann/0.Png"):
    os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
    (tmp_path / name).touch()
  os.makedirs(tmp_path / "faces")
  os.symlink(tmp_path / "ann", tmp_path / "faces" / "ann")  # An identity that is a link.
  os.makedirs(tmp_path / "faces" / "bob")
  os.symlink(tmp_path / "photos", tmp_path / "faces" / "bob" / "linked")
  paths, labels, names = image_folder.list_image_folder(tmp_path / "faces", extensions=[".PNG"])
  assert names == ["ann", "bob"] and labels.tolist() == [0, 1, 1]
  assert [os.path.relpath(path, tmp_path / "faces") for path in paths] == [
      "ann/0.Png", "bob/linked/1.png", "bob/linked/2.PNG"]


@pytest.mark.parametrize("lister", [image_folder.list_image_folder,
                                    image_folder.ImageFolderSource])
def test_listing_errors(tmp_path, lister):
  with pytest.raises(ValueError, match="`root` must be a folder"):
    lister(tmp_path / "missing")
  with pytest.raises(ValueError, match="no identity sub-folders"):
    lister(tmp_path)
  os.makedirs(tmp_path / "a")
  (tmp_path / "a" / "x.png").touch()
  # A single string would be taken as its characters, each a suffix ("g" matched "log").
  with pytest.raises(TypeError, match="`extensions` must be a sequence of suffixes"):
    lister(tmp_path, extensions=".png")
  os.makedirs(tmp_path / "b")
  (tmp_path / "b" / "notes.txt").touch()
  with pytest.raises(ValueError, match="1 identity folder\\(s\\) hold no image.*\\['b'\\]"):
    lister(tmp_path)


# Source.


def _folder(tmp_path, shapes):
  """``tmp/<identity>/<k>.png`` with random images; returns them by (identity, k)."""
  images = {}
  for identity, identity_shapes in shapes.items():
    for k, shape in enumerate(identity_shapes):
      images[identity, k] = _random_image(len(images), shape)
      _save(str(tmp_path / identity / f"{k}.png"), images[identity, k])
  return images


def test_source_contract_and_values(tmp_path):
  images = _folder(tmp_path, {"b": [(6, 5, 3)], "a": [(6, 5, 3), (6, 5, 3)]})
  source = image_folder.ImageFolderSource(tmp_path)
  assert (len(source), source.num_classes, source.image_shape) == (3, 2, (6, 5, 3))
  assert list(source.class_names) == ["a", "b"]
  expected = [(images["a", 0], 0), (images["a", 1], 0), (images["b", 0], 1)]
  for index, (image, label) in enumerate(expected):
    record = source[index]
    assert set(record) == {"image", "label"}
    assert record["image"].dtype == np.uint8 and record["label"].dtype == np.int32
    assert record["label"].shape == () and record["label"] == label
    np.testing.assert_array_equal(record["image"], image)

  copy = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(copy[2]["image"], source[2]["image"])
  assert copy[2]["label"] == source[2]["label"]


def test_source_resizes_images_to_image_shape(tmp_path):
  images = _folder(tmp_path, {"a": [(6, 5, 3), (9, 7, 3)]})
  source = image_folder.ImageFolderSource(tmp_path)  # Shape of the first image.
  assert source.image_shape == (6, 5, 3)
  expected = np.asarray(
      PIL.Image.fromarray(images["a", 1]).resize((5, 6), PIL.Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(source[1]["image"], expected)
  grey = image_folder.ImageFolderSource(tmp_path, image_shape=(4, 4, 1))
  assert grey[0]["image"].shape == (4, 4, 1) and grey[1]["image"].shape == (4, 4, 1)


def test_source_names_an_undecodable_file(tmp_path):
  _folder(tmp_path, {"a": [(4, 4, 3)]})
  with open(tmp_path / "a" / "1.jpg", "wb") as file:
    file.write(b"not a jpeg")
  source = image_folder.ImageFolderSource(tmp_path)
  path = re.escape(str(tmp_path / "a" / "1.jpg"))
  with pytest.raises(ValueError, match=f"{path}: cannot decode image"):
    source[1]


def _write_images(root, names):
  """Random PNGs at ``root/<name>`` (``str`` or ``bytes`` names); returns them by name."""
  images = {}
  for name in names:
    path = os.path.join(os.fsencode(root), os.fsencode(name))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    images[name] = _random_image(len(images))
    with open(path, "wb") as file:
      file.write(image_folder.encode_image(images[name], image_format="png"))
  return images


# Non-ASCII names, a name that is not UTF-8 (read as os.fsdecode does) and nested folders.
_ODD_NAMES = ["zoë/été.png", "zoë/深/1.png", "bob/0.png", b"bob/\xff.png", "bob/a/b/2.png"]


def test_source_packs_its_paths_and_reads_what_the_listing_lists(tmp_path):
  images = _write_images(tmp_path, _ODD_NAMES)
  source = image_folder.ImageFolderSource(tmp_path)
  paths, labels, names = image_folder.list_image_folder(tmp_path)
  assert [os.fsencode(os.path.relpath(path, tmp_path)) for path in paths] == [
      b"bob/0.png", b"bob/a/b/2.png", b"bob/\xff.png", "zoë/été.png".encode(),
      "zoë/深/1.png".encode()]
  assert list(source.paths) == paths and source.paths[-1] == paths[-1]
  assert source.paths[1:4:2] == paths[1:4:2] and source.paths[::-1] == paths[::-1]
  assert source.labels.tolist() == labels.tolist() == [0, 0, 0, 1, 1]
  assert list(source.class_names) == names == ["bob", "zoë"]
  # One byte buffer of the paths relative to the root, and where each ends.
  relative = [os.fsencode(os.path.relpath(path, tmp_path)) for path in paths]
  assert source.paths.data.tobytes() == b"".join(relative)
  assert source.paths.offsets.tolist() == np.cumsum([0] + [len(r) for r in relative]).tolist()
  copy = pickle.loads(pickle.dumps(source))
  for index, path in enumerate(paths):
    name = os.path.relpath(path, tmp_path)
    image = images[name if name in images else os.fsencode(name)]
    np.testing.assert_array_equal(source[index]["image"], image)
    np.testing.assert_array_equal(copy[index]["image"], image)
    assert copy[index]["label"] == labels[index] and copy.paths[index] == path
  assert list(copy.class_names) == names
  with pytest.raises(IndexError):
    source.paths[len(paths)]
  # Packed without the prefix, which each string must have (else it would lose its start).
  with pytest.raises(ValueError, match="'/other/b.png' does not begin with the prefix '/data/'"):
    image_folder.PackedStrings(["/data/a.png", "/other/b.png"], prefix="/data/")


def test_source_pickles_far_smaller_than_a_list_of_its_paths(tmp_path):
  # Each grain worker unpickled the source's list of full paths: 4 to 5 GB at WebFace42M's size.
  root = tmp_path / ("a_long_dataset_folder_name_" * 4)
  for identity in range(100):
    os.makedirs(root / f"{identity:03d}")
    for image in range(30):
      (root / f"{identity:03d}" / f"{image:03d}.jpg").touch()
  source = image_folder.ImageFolderSource(root, image_shape=(4, 4, 3))  # Nothing decoded.
  paths, labels, _ = image_folder.list_image_folder(root)
  assert len(source) == len(paths) == 3000 and list(source.paths) == paths
  relative_bytes = 3000 * len("000/000.jpg")
  # The relative paths, 8-byte offsets and 4-byte labels, the names and their offsets, the root
  # (twice: the source's and the paths' prefix), and about a kilobyte of the rest.
  packed = relative_bytes + 3000 * (8 + 4) + 100 * (len("000") + 8) + 2 * len(str(root))
  assert len(pickle.dumps(source)) < packed + 2048
  assert len(pickle.dumps(source)) < len(pickle.dumps(paths)) / 3
  copy = pickle.loads(pickle.dumps(source))
  assert list(copy.paths) == paths and copy.labels.tolist() == labels.tolist()


def test_source_of_a_root_given_with_a_trailing_slash(tmp_path):
  # "--config.data.path=/data/faces/": the paths are packed without the folder all the same.
  images = _write_images(tmp_path, ["a/1.png", "b/2.png"])
  root = str(tmp_path) + os.sep
  source = image_folder.ImageFolderSource(root)
  assert list(source.paths) == image_folder.list_image_folder(root)[0]
  np.testing.assert_array_equal(source[1]["image"], images["b/2.png"])


def test_shared_memory_needs_room_for_the_array_twice_over(monkeypatch):
  # grain's batches pass through /dev/shm too: writing past its room would be a SIGBUS.
  monkeypatch.setattr(_shared_memory, "MIN_BYTES", 0)
  array = np.arange(1024, dtype=np.int64)  # 8 KiB
  def room(blocks):
    return lambda path: types.SimpleNamespace(f_bavail=blocks, f_frsize=4096)

  monkeypatch.setattr(_shared_memory.os, "statvfs", room(3))  # Room for 1.5 copies.
  assert type(_shared_memory.shared(array)) is np.ndarray
  monkeypatch.setattr(_shared_memory.os, "statvfs", room(4))  # Twice over.
  shared = _shared_memory.shared(array)
  assert isinstance(shared, grain.multiprocessing.SharedMemoryArray)
  np.testing.assert_array_equal(shared, array)


def test_large_listings_share_their_arrays_with_grain_workers(tmp_path, monkeypatch):
  monkeypatch.setattr(_shared_memory, "MIN_BYTES", 0)  # As from 16 MiB on (2M images).
  _write_images(tmp_path, _ODD_NAMES[:4])
  source = image_folder.ImageFolderSource(tmp_path)
  def arrays(source):
    return [source.paths.data, source.paths.offsets, source.labels, source.class_names.data,
            source.class_names.offsets]

  assert all(isinstance(array, grain.multiprocessing.SharedMemoryArray) for array in arrays(source))
  names = [array.shm.name for array in arrays(source)]
  copy = pickle.loads(pickle.dumps(source))  # What a worker process receives: the names.
  assert [array.shm.name for array in arrays(copy)] == names
  assert len(pickle.dumps(source)) < 2048 and list(copy.paths) == list(source.paths)
  assert list(copy.class_names) == list(source.class_names) == ["bob", "zoë"]
  batches = [list(data.train_dataset(source, batch_size=2, num_epochs=1, seed=3, shard_index=0,
                                     shard_count=1, worker_count=workers)) for workers in (0, 1)]
  for here, there in zip(*batches, strict=True):
    for key in ("image", "label"):
      np.testing.assert_array_equal(here[key], there[key])
  del source, copy, batches
  gc.collect()
  assert not any(os.path.exists(os.path.join("/dev/shm", name)) for name in names)
