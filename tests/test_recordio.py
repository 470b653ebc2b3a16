"""Tests of the pure-Python RecordIO reader/writer, the insightface layout and the pack tool.

Expected bytes are written out by hand from the format (dmlc-core's framing, MXNet's IRHeader),
not produced by the code under test.
"""

import gc
import io
import os
import pickle
import re
import struct
import subprocess
import sys
import types

import grain
import jax
import numpy as np
import PIL.Image
import pytest

from margins import data
from margins.data import _shared_memory
from margins.data import recordio
from margins.data.image_folder import encode_image
from margins.tools import pack_recordio

MAGIC = struct.pack("<I", 0xCED7230A)


def _part(cflag, data):
  """One framed part, from the format: magic, cflag << 29 | length, data, zero padding to 4."""
  padding = b"\0" * (-len(data) % 4)
  return MAGIC + struct.pack("<I", cflag << 29 | len(data)) + data + padding


def _write(tmp_path, payloads, keys=None):
  rec, idx = str(tmp_path / "data.rec"), str(tmp_path / "data.idx")
  keys = range(len(payloads)) if keys is None else keys
  with recordio.RecordIOWriter(rec, idx) as writer:
    offsets = [writer.write(payload, key=key) for key, payload in zip(keys, payloads)]
  return rec, idx, offsets


# Framing.


def test_frame_of_a_plain_record_matches_the_format():
  assert recordio.frame(b"abcde") == (
      bytes.fromhex("0a23d7ce") + bytes.fromhex("05000000") + b"abcde" + b"\0\0\0")
  assert recordio.frame(b"abcd") == MAGIC + struct.pack("<I", 4) + b"abcd"
  assert recordio.frame(b"") == MAGIC + struct.pack("<I", 0)


def test_frame_splits_where_the_magic_word_is_4_aligned():
  payload = b"abcd" + MAGIC + b"efgh" + MAGIC + b"ij"
  assert recordio.frame(payload) == _part(1, b"abcd") + _part(2, b"efgh") + _part(3, b"ij")


@pytest.mark.parametrize("position", [1, 2, 3, 5])
def test_frame_keeps_a_magic_word_that_is_not_4_aligned(position):
  payload = b"x" * position + MAGIC + b"tail"
  assert recordio.frame(payload) == _part(0, payload)


def test_frame_edge_cases_of_splitting():
  # Magic word first: an empty first part. Last: an empty last part. Twice in a row: empty middle.
  assert recordio.frame(MAGIC + b"ab") == _part(1, b"") + _part(3, b"ab")
  assert recordio.frame(b"abcd" + MAGIC) == _part(1, b"abcd") + _part(3, b"")
  assert recordio.frame(MAGIC + MAGIC) == _part(1, b"") + _part(2, b"") + _part(3, b"")


TRICKY_PAYLOADS = [
    b"",
    b"a",
    b"abcdefg",
    MAGIC,
    MAGIC + MAGIC + MAGIC,
    b"abcd" + MAGIC + b"efgh" + MAGIC + b"ij",
    b"ab" + MAGIC + b"cd",
    b"\0" * 12 + MAGIC + b"\0" * 3,
    bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8)),
]


def test_multi_part_records_round_trip_by_key_and_in_sequence(tmp_path):
  rec, idx, offsets = _write(tmp_path, TRICKY_PAYLOADS)
  with recordio.RecordIOReader(rec, idx) as reader:
    assert [reader.read(key) for key in range(len(TRICKY_PAYLOADS))] == TRICKY_PAYLOADS
    assert list(reader.iter_records()) == list(zip(offsets, TRICKY_PAYLOADS))
  # Without the index, sequential reading still works.
  with recordio.RecordIOReader(rec) as reader:
    assert [payload for _, payload in reader.iter_records()] == TRICKY_PAYLOADS
    with pytest.raises(KeyError, match="no index"):
      reader.read(0)


def test_file_bytes_and_index_lines_match_the_format(tmp_path):
  payloads = [b"hello", b"ab" + MAGIC + b"cd", b"abcd" + MAGIC + b"efg"]
  rec, idx, _ = _write(tmp_path, payloads, keys=[7, 3, 11])
  expected = [_part(0, b"hello"), _part(0, b"ab" + MAGIC + b"cd"),
              _part(1, b"abcd") + _part(3, b"efg")]
  with open(rec, "rb") as file:
    assert file.read() == b"".join(expected)
  offsets = np.cumsum([0] + [len(part) for part in expected[:-1]])
  with open(idx) as file:
    assert file.read() == "".join(f"{key}\t{offset}\n" for key, offset in zip([7, 3, 11], offsets))
  keys, read_offsets = recordio.read_index(idx)
  assert keys.tolist() == [7, 3, 11] and read_offsets.tolist() == offsets.tolist()
  with recordio.RecordIOReader(rec, idx) as reader:  # Keys out of order: looked up all the same.
    assert [reader.read(key) for key in (3, 7, 11)] == [payloads[1], payloads[0], payloads[2]]
    with pytest.raises(KeyError, match="record key 5: not in"):
      reader.read(5)
    assert reader.key_range is None and reader.keys.tolist() == [7, 3, 11]
    assert 11 in reader and 5 not in reader
    assert reader.missing(np.arange(2, 13)).tolist() == [2, 4, 5, 6, 8, 9, 10, 12]


def test_consecutive_keys_are_a_range_and_pickle_as_offsets_only(tmp_path):
  num_records = 2000
  rec, idx, offsets = _write(tmp_path, [b"x" * 4] * num_records,
                             keys=range(5, 5 + num_records))
  reader = recordio.RecordIOReader(rec, idx)
  assert reader.key_range == range(5, 5 + num_records)
  assert reader.keys.tolist() == list(range(5, 5 + num_records))
  assert reader.offset(5 + 1234) == offsets[1234] and 4 not in reader
  assert reader.missing(np.array([3, 5, 2004, 2005])).tolist() == [3, 2005]
  assert len(pickle.dumps(reader)) < 8 * num_records + 1000  # The offsets and little else.


def test_writer_rejects_repeated_keys_and_keys_without_index(tmp_path):
  with recordio.RecordIOWriter(str(tmp_path / "a.rec"), str(tmp_path / "a.idx")) as writer:
    writer.write(b"x", key=1)
    with pytest.raises(ValueError, match="already written"):
      writer.write(b"y", key=1)
    # Keys that are not integers are refused, not written as "3.0" or "True" into the index.
    for key in (np.float64(3), 3.0, True):
      with pytest.raises(TypeError, match="`key` must be an integer"):
        writer.write(b"z", key=key)
    writer.write(b"z", key=np.int64(3))
  with recordio.RecordIOReader(str(tmp_path / "a.rec"), str(tmp_path / "a.idx")) as reader:
    assert reader.keys.tolist() == [1, 3]
  # Keys in any order, against a set: every repeat refused, every new key taken.
  rng = np.random.default_rng(0)
  written = set()
  with recordio.RecordIOWriter(str(tmp_path / "c.rec"), str(tmp_path / "c.idx")) as writer:
    for key in rng.integers(-20, 60, size=400).tolist():
      if key in written:
        with pytest.raises(ValueError, match=f"`key` {key} was already written"):
          writer.write(b"x", key=key)
      else:
        writer.write(b"x", key=key)
        written.add(key)
    assert written == set(range(-20, 60)) and len(writer._run_starts) == 1  # One run.
  assert sorted(recordio.RecordIOReader(str(tmp_path / "c.rec"),
                                        str(tmp_path / "c.idx")).keys.tolist()) == sorted(written)
  with recordio.RecordIOWriter(str(tmp_path / "b.rec")) as writer:
    assert writer.write(b"x") == 0
    with pytest.raises(ValueError, match="idx_path"):
      writer.write(b"y", key=0)


# IRHeader.


def test_pack_matches_mxnet_layout_for_scalar_and_list_labels():
  scalar = recordio.pack(recordio.IRHeader(0, 4, 2574), b"img")
  assert scalar == struct.pack("<IfQQ", 0, 4.0, 2574, 0) + b"img"
  listed = recordio.pack(recordio.IRHeader(0, [3, 7.5], 12, 1), b"img")
  assert listed == struct.pack("<IfQQ", 2, 0.0, 12, 1) + struct.pack("<2f", 3.0, 7.5) + b"img"

  header, data = recordio.unpack(scalar)
  assert (header.flag, header.label, header.id, header.id2, data) == (0, 4.0, 2574, 0, b"img")
  header, data = recordio.unpack(listed)
  assert header.flag == 2 and header.label.dtype == np.float32 and data == b"img"
  np.testing.assert_array_equal(header.label, [3.0, 7.5])


def test_unpack_rejects_short_records():
  with pytest.raises(ValueError, match="shorter than an IRHeader"):
    recordio.unpack(b"\0" * 23)
  with pytest.raises(ValueError, match="3 labels"):
    recordio.unpack(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 8)
  with pytest.raises(ValueError, match="non-empty 1-D"):
    recordio.pack(recordio.IRHeader(0, [], 0), b"")


# Corrupt and truncated files.


def test_bad_magic_names_file_and_offset(tmp_path):
  rec, idx, offsets = _write(tmp_path, [b"first", b"second", b"third"])
  with open(rec, "r+b") as file:
    file.seek(offsets[1])
    file.write(b"JUNK")
  reader = recordio.RecordIOReader(rec, idx)
  assert reader.read(0) == b"first"
  with pytest.raises(recordio.RecordIOError,
                     match=f"{re.escape(rec)}: bad magic word 0x4B4E554A at byte offset "
                           f"{offsets[1]}"):
    reader.read(1)
  with pytest.raises(recordio.RecordIOError, match=f"byte offset {offsets[1]}"):
    list(reader.iter_records())
  reader.close()


def test_truncated_payload_and_header_name_file_and_offset(tmp_path):
  rec, idx, offsets = _write(tmp_path, [b"first", b"x" * 40])
  os.truncate(rec, offsets[1] + 8 + 10)
  with recordio.RecordIOReader(rec, idx) as reader:
    with pytest.raises(recordio.RecordIOError,
                       match=f"{re.escape(rec)}: record at byte offset {offsets[1]} is "
                             "truncated: 40 bytes "
                             "announced, 10 before"):
      reader.read(1)
  os.truncate(rec, offsets[1] + 4)
  with recordio.RecordIOReader(rec) as reader:
    with pytest.raises(recordio.RecordIOError,
                       match=f"truncated record header at byte offset {offsets[1]}"):
      list(reader.iter_records())


def test_truncated_multi_part_record_names_the_part_offset(tmp_path):
  rec, idx, offsets = _write(tmp_path, [b"abcd" + MAGIC + b"efghijkl"])
  second_part = offsets[0] + len(_part(1, b"abcd"))
  os.truncate(rec, second_part + 8 + 3)
  with recordio.RecordIOReader(rec, idx) as reader:
    with pytest.raises(recordio.RecordIOError, match=f"byte offset {second_part} is truncated"):
      reader.read(0)


def test_out_of_sequence_part_flag_is_an_error(tmp_path):
  rec = str(tmp_path / "bad.rec")
  with open(rec, "wb") as file:
    file.write(_part(0, b"ok") + _part(3, b"orphan"))
  with recordio.RecordIOReader(rec) as reader:
    with pytest.raises(recordio.RecordIOError, match="part flag 3 at byte offset 12"):
      list(reader.iter_records())


def test_index_errors_name_the_index_file(tmp_path):
  rec, idx, _ = _write(tmp_path, [b"first", b"second"])
  size = os.path.getsize(rec)
  with open(idx, "a") as file:
    file.write(f"5\t{size}\n")
  with pytest.raises(recordio.RecordIOError,
                     match=f"{re.escape(idx)}: key 5 points to byte offset {size}, past the "
                           f"end of {re.escape(rec)}"):
    recordio.RecordIOReader(rec, idx)

  for text, message in [("0\t0\n1\tabc\n", "not a RecordIO index"),
                        ("0\t0\n0\t16\n", "keys repeat"),
                        ("0\t0\t9\n", "3 columns")]:
    with open(idx, "w") as file:
      file.write(text)
    with pytest.raises(recordio.RecordIOError, match=f"{re.escape(idx)}: .*{message}"):
      recordio.RecordIOReader(rec, idx)


def test_reader_pickles_without_its_file_handle(tmp_path):
  rec, idx, _ = _write(tmp_path, TRICKY_PAYLOADS)
  reader = recordio.RecordIOReader(rec, idx)
  assert reader.read(4) == TRICKY_PAYLOADS[4]  # Opens the file in this process.
  copy = pickle.loads(pickle.dumps(reader))
  assert copy._fd is None  # pylint: disable=protected-access
  assert copy.read(5) == TRICKY_PAYLOADS[5]
  reader.close()
  copy.close()


# insightface's layout and the source.


def _smooth_image(seed, size=16):
  """A smooth RGB image, so that JPEG keeps it within a few grey levels."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:size, 0:size] / size
  channels = [rng.uniform(60, 190) + rng.uniform(10, 60) * np.sin(np.pi * (a * x + b * y))
              for a, b in rng.uniform(0.2, 1.0, (3, 2))]
  return np.stack(channels, axis=-1).clip(0, 255).round().astype(np.uint8)


def _make_folder(root, counts, size=16):
  """``root/<identity>/<k>.png``; returns {identity: [images]} in sorted order."""
  images = {}
  for identity, count in counts.items():
    os.makedirs(root / identity)
    images[identity] = []
    for k in range(count):
      image = _smooth_image(10 * sum(map(ord, identity)) + k, size)
      with open(root / identity / f"{k}.png", "wb") as file:
        file.write(encode_image(image, image_format="png"))
      images[identity].append(image)
  return dict(sorted(images.items()))


COUNTS = {"carol": 1, "alice": 3, "bob": 2}


def test_pack_tool_writes_the_insightface_layout(tmp_path):
  images = _make_folder(tmp_path / "faces", COUNTS)
  num_images, num_classes = pack_recordio.pack_image_folder(
      tmp_path / "faces", str(tmp_path / "train"), quality=95, num_threads=2)
  assert (num_images, num_classes) == (6, 3)
  with open(tmp_path / "property") as file:
    assert file.read() == "3,16,16"

  # Read the raw files without the reader: index lines, then the header and identity records.
  with open(tmp_path / "train.idx") as file:
    index = dict(tuple(int(field) for field in line.split("\t")) for line in file)
  assert sorted(index) == list(range(1 + 6 + 3))
  with open(tmp_path / "train.rec", "rb") as file:
    data = file.read()

  def header_at(key):
    magic, lrec, flag, label, record_id, _ = struct.unpack_from("<IIIfQQ", data, index[key])
    assert magic == 0xCED7230A and lrec >> 29 == 0
    labels = struct.unpack_from(f"<{flag}f", data, index[key] + 32)
    return flag, label, record_id, labels

  assert header_at(0) == (2, 0.0, 0, (7.0, 10.0))  # Identity keys 7..9.
  # Identities sorted by name: alice (keys 1-3), bob (4-5), carol (6).
  assert [header_at(key)[3] for key in (7, 8, 9)] == [(1.0, 4.0), (4.0, 6.0), (6.0, 7.0)]
  assert [header_at(key) for key in range(1, 7)] == [
      (0, 0.0, 1, ()), (0, 0.0, 2, ()), (0, 0.0, 3, ()), (0, 1.0, 4, ()), (0, 1.0, 5, ()),
      (0, 2.0, 6, ())]

  source = recordio.RecordIOSource(tmp_path)
  assert (len(source), source.num_classes, source.image_shape) == (6, 3, (16, 16, 3))
  np.testing.assert_array_equal(source.identity_ranges(), [[1, 4], [4, 6], [6, 7]])
  expected = [(image, label) for label, identity in enumerate(images)
              for image in images[identity]]
  for index, (image, label) in enumerate(expected):
    record = source[index]
    assert record["image"].dtype == np.uint8 and record["image"].shape == (16, 16, 3)
    assert record["label"].dtype == np.int32 and record["label"].shape == ()
    assert record["label"] == label
    error = np.abs(record["image"].astype(int) - image.astype(int))
    assert error.mean() < 2 and error.max() < 24  # JPEG (4:2:0 chroma) of a smooth image.
  assert source.labels.dtype == np.int32
  assert source.labels.tolist() == [label for _, label in expected]


def test_pack_tool_stores_each_image_as_a_jpeg_at_the_quality_given(tmp_path, monkeypatch):
  # The payload after each image record's 24-byte IRHeader, read from the raw files, is Pillow's
  # JPEG of the decoded image at that quality: not the default 75, 95, nor a lossless PNG. The
  # images are encoded 2 at a time here (1024 in use): each, in order, once.
  monkeypatch.setattr(pack_recordio, "_CHUNK", 2)
  images = _make_folder(tmp_path / "faces", {"b": 1, "a": 2, "c": 2})
  pack_recordio.pack_image_folder(tmp_path / "faces", str(tmp_path / "train"), quality=40,
                                  num_threads=2)
  with open(tmp_path / "train.idx") as file:
    index = dict(tuple(int(field) for field in line.split("\t")) for line in file)
  with open(tmp_path / "train.rec", "rb") as file:
    data = file.read()
  expected = [image for identity in ("a", "b", "c") for image in images[identity]]
  assert sorted(index) == list(range(1 + 5 + 3))
  for key, image in enumerate(expected, start=1):
    magic, lrec, flag = struct.unpack_from("<III", data, index[key])
    assert magic == 0xCED7230A and lrec >> 29 == 0 and flag == 0
    payload = data[index[key] + 8 + 24:index[key] + 8 + (lrec & (2**29 - 1))]
    jpeg = io.BytesIO()
    PIL.Image.fromarray(image).save(jpeg, format="JPEG", quality=40)
    assert payload == jpeg.getvalue(), key


def test_pack_tool_command_line(tmp_path):
  _make_folder(tmp_path / "faces", {"a": 2, "b": 1}, size=20)
  result = subprocess.run(
      [sys.executable, "-m", "margins.tools.pack_recordio", "--image_dir",
       str(tmp_path / "faces"), "--output", str(tmp_path / "new" / "ds"), "--quality", "90",
       "--image_size", "12,10"],
      capture_output=True, text=True, check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  assert "Packed 3 images of 2 identities" in result.stdout
  source = recordio.RecordIOSource(tmp_path / "new" / "ds.rec")
  assert (len(source), source.num_classes, source.image_shape) == (3, 2, (12, 10, 3))
  assert [int(source[i]["label"]) for i in range(3)] == [0, 0, 1]
  with pytest.raises(SystemExit):
    pack_recordio.main(["--image_dir", "x", "--output", "y", "--image_size", "12"])


def test_pack_tool_writes_into_a_folder_given_as_output(tmp_path, capsys):
  # An existing folder, or a path ending in a separator: its train.rec, train.idx and property,
  # what RecordIOSource reads from a folder (not hidden .rec / .idx files, or files beside it).
  _make_folder(tmp_path / "faces", {"a": 1})
  os.makedirs(tmp_path / "existing")
  for output in (tmp_path / "existing", str(tmp_path / "new") + os.sep):
    pack_recordio.main(["--image_dir", str(tmp_path / "faces"), "--output", str(output)])
    assert sorted(os.listdir(output)) == ["property", "train.idx", "train.rec"]
    assert len(recordio.RecordIOSource(output)) == 1
    assert os.path.join(output, "train.rec") in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path)) == ["existing", "faces", "new"]


def test_pack_tool_rejects_mixed_sizes_without_image_size(tmp_path, capsys):
  _make_folder(tmp_path / "faces", {"a": 1}, size=16)
  pack_recordio.pack_image_folder(tmp_path / "faces", tmp_path / "train")
  before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
  _make_folder(tmp_path / "faces", {"b": 1}, size=12)
  with pytest.raises(ValueError, match=r"b/0.png: image is \(12, 12\).*--image_size"):
    pack_recordio.pack_image_folder(tmp_path / "faces", tmp_path / "train")
  # Neither a half-written dataset nor a clobbered one: the earlier one is there as it was.
  assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before
  with pytest.raises(ValueError, match="image is"):  # Nor empty folders made for the files.
    pack_recordio.pack_image_folder(tmp_path / "faces", tmp_path / "new" / "deeper" / "train")
  assert not os.path.exists(tmp_path / "new")
  # The command line says what is wrong, without a traceback, and checks --quality first.
  for args, message in (([], "b/0.png: image is (12, 12)"),
                        (["--quality", "0"], "--quality must lie in [1, 100], got 0"),
                        (["--image_dir", str(tmp_path / "none")],
                         f"--image_dir {tmp_path / 'none'} is not a folder")):
    with pytest.raises(SystemExit, match="2"):
      pack_recordio.main(["--image_dir", str(tmp_path / "faces"), "--output",
                          str(tmp_path / "train"), *args])
    assert message in capsys.readouterr().err


def test_write_identity_dataset_rejects_labels_that_do_not_match_the_images(tmp_path):
  image = encode_image(_smooth_image(0, 8), image_format="png")
  prefix = tmp_path / "train"
  for labels, images, error, match in (
      ([0, 1], [image] * 5, ValueError, "2 labels but more images"),
      ([0, 1, 1], [image] * 2, ValueError, "3 labels but 2 images"),
      ([0.0, 0.7, 1.9], [image] * 3, TypeError, "must be integers of shape"),
      ([1, 0], [image] * 2, ValueError, "non-decreasing"),
      (np.array([1, 0], np.uint8), [image] * 2, ValueError, "non-decreasing"),  # Not by diff.
      ([0, 2], [image] * 2, ValueError, r"non-decreasing in \[0, 2\)")):
    with pytest.raises(error, match=match):
      pack_recordio.write_identity_dataset(prefix, np.array(labels), iter(images),
                                           num_classes=2, image_size=(8, 8))
    assert not list(tmp_path.iterdir())  # Nothing left behind, not even a partial file.
  # Float32 labels would merge classes past 2**24 (16777217 was read back as 16777216).
  with pytest.raises(ValueError, match=r"exact for up to 2\*\*24 classes; got 16777217"):
    pack_recordio.write_identity_dataset(prefix, np.array([0, 2**24]), [image] * 2,
                                         num_classes=2**24 + 1, image_size=(8, 8))
  assert not list(tmp_path.iterdir())
  pack_recordio.write_identity_dataset(prefix, np.array([0, 1, 1], np.uint8), [image] * 3,
                                       num_classes=2, image_size=(8, 8))
  source = recordio.RecordIOSource(str(prefix) + ".rec")
  assert [int(source[i]["label"]) for i in range(3)] == [0, 1, 1]
  assert source.identity_ranges().tolist() == [[1, 2], [2, 4]]


def test_source_is_picklable_and_the_copy_reads_the_same(tmp_path):
  _make_folder(tmp_path / "faces", COUNTS)
  pack_recordio.pack_image_folder(tmp_path / "faces", tmp_path / "train")
  source = recordio.RecordIOSource(tmp_path / "train.rec")
  first = source[4]  # The file is now open in this process.
  copy = pickle.loads(pickle.dumps(source))
  again = copy[4]
  np.testing.assert_array_equal(again["image"], first["image"])
  assert again["label"] == first["label"] and again["label"].dtype == np.int32
  assert copy.image_keys.tolist() == list(range(1, len(source) + 1))  # After the header record.


def test_large_indexes_share_their_offsets_with_grain_workers(tmp_path, monkeypatch):
  # WebFace42M's 44.5M offsets were unpickled by each grain worker: +711 MB of private memory
  # each. From _shared_memory.MIN_BYTES on (here from any size) they are mapped from shared
  # memory.
  monkeypatch.setattr(_shared_memory, "MIN_BYTES", 0)
  _make_folder(tmp_path / "faces", COUNTS)
  pack_recordio.pack_image_folder(tmp_path / "faces", tmp_path / "train")
  source = recordio.RecordIOSource(tmp_path / "train.rec")
  offsets = source.reader.offsets
  assert isinstance(offsets, grain.multiprocessing.SharedMemoryArray)
  name = offsets.shm.name
  copy = pickle.loads(pickle.dumps(source))  # What a worker process receives: the name.
  assert copy.reader.offsets.shm.name == name
  np.testing.assert_array_equal(copy[4]["image"], source[4]["image"])
  batches = [list(data.train_dataset(source, batch_size=4, num_epochs=1, seed=3, shard_index=0,
                                     shard_count=1, worker_count=workers)) for workers in (0, 1)]
  for here, there in zip(*batches, strict=True):
    jax.tree.map(np.testing.assert_array_equal, here, there)
  del copy, offsets, source, batches
  gc.collect()
  assert not os.path.exists(os.path.join("/dev/shm", name))  # Freed with the reader.
  # Where shared memory lacks the room (or there is none), the offsets stay private.
  monkeypatch.setattr(_shared_memory, "FOLDER", str(tmp_path / "no-shm"))
  assert type(recordio.RecordIOSource(tmp_path / "train.rec").reader.offsets) is np.ndarray
  monkeypatch.setattr(_shared_memory.os, "statvfs", lambda path: types.SimpleNamespace(
      f_bavail=0, f_frsize=4096))
  monkeypatch.setattr(_shared_memory, "FOLDER", "/dev/shm")
  assert type(recordio.RecordIOSource(tmp_path / "train.rec").reader.offsets) is np.ndarray


def _write_image_records(tmp_path, labels, *, header=None, size=8):
  """Image records at keys 0.. (or 1.. after a header record), PNG-encoded."""
  rec, idx = str(tmp_path / "plain.rec"), str(tmp_path / "plain.idx")
  images = [_smooth_image(k, size) for k in range(len(labels))]
  with recordio.RecordIOWriter(rec, idx) as writer:
    if header is not None:
      writer.write(recordio.pack(recordio.IRHeader(0, header, 0), b""), key=0)
    first_key = 0 if header is None else 1
    for key, (label, image) in enumerate(zip(labels, images), start=first_key):
      png = encode_image(image, image_format="png")
      writer.write(recordio.pack(recordio.IRHeader(0, label, key), png), key=key)
  return rec, images


def test_source_without_header_record_reads_every_key_and_list_labels(tmp_path):
  rec, images = _write_image_records(tmp_path, [[2, 9.0], [0, 5.0], [1, 1.0]])
  with pytest.raises(ValueError, match="`num_classes` is needed"):
    recordio.RecordIOSource(rec)
  source = recordio.RecordIOSource(rec, num_classes=3)
  assert source.image_keys.tolist() == [0, 1, 2] and source.identity_ranges() is None
  assert [int(source[i]["label"]) for i in range(3)] == [2, 0, 1]  # The first label of each.
  for i in range(3):
    np.testing.assert_array_equal(source[i]["image"], images[i])  # PNG: exact.


def test_source_header_variants(tmp_path):
  # Image keys 1..3 announced, only 1..2 written.
  rec, _ = _write_image_records(tmp_path, [0, 1], header=[4, 4])
  with pytest.raises(recordio.RecordIOError, match="keys \\[3\\] are not in the index"):
    recordio.RecordIOSource(rec, num_classes=2)
  # Labels [N + 1, K] and no identity records, as some packing scripts write: keys 1..N are the
  # images, and num_classes must come from elsewhere.
  rec, _ = _write_image_records(tmp_path, [0, 1], header=[3, 2])
  source = recordio.RecordIOSource(rec, num_classes=2)
  assert source.image_keys.tolist() == [1, 2] and source.identity_ranges() is None


def test_corrupt_header_record_is_refused_naming_the_file(tmp_path):
  # A header label of 1e9 listed a billion image keys (8 GB, minutes) before finding them missing,
  # NaN or inf failed in int() without naming the file, and a header one key short made the last
  # image an "identity record": it was dropped from the images and identity_ranges() failed with a
  # TypeError; one key long took the first identity record for an image, labelled. An identity
  # range of 2**40 keys raised MemoryError.
  for header in ([1e9, 1e9 + 4], [2.0**40, 2.0**40]):
    rec, _ = _write_image_records(tmp_path, [0, 1], header=header)
    with pytest.raises(recordio.RecordIOError, match=f"{re.escape(rec[:-4])}.idx: the header"):
      recordio.RecordIOSource(rec, num_classes=2)
  rec, _ = _write_image_records(tmp_path, [0, 1], header=[3, 2.0**40])  # Identities: not there.
  assert recordio.RecordIOSource(rec, num_classes=2).identity_ranges() is None
  for header in ([float("nan"), 4], [float("inf"), 4]):
    rec, _ = _write_image_records(tmp_path, [0, 1], header=header)
    with pytest.raises(recordio.RecordIOError, match=f"{re.escape(rec)}: the header record"):
      recordio.RecordIOSource(rec, num_classes=2)
  _make_folder(tmp_path / "faces", {"alice": 2, "bob": 1})
  pack_recordio.pack_image_folder(tmp_path / "faces", str(tmp_path / "train"))
  rec = str(tmp_path / "train.rec")
  for header, match in [([3, 5], "key 3 is an image record"),
                        ([5, 7], "key 4 is an identity record")]:
    with open(rec, "r+b") as file:  # Same frame length: the header record is rewritten in place.
      file.write(recordio.frame(recordio.pack(recordio.IRHeader(0, header, 0), b"")))
    with pytest.raises(recordio.RecordIOError, match=f"{re.escape(rec)}: .*{match}"):
      recordio.RecordIOSource(tmp_path)


def test_property_that_disagrees_with_the_identity_records_is_refused(tmp_path):
  # A `property` from another dataset: too many classes trained unused rows of W without a word,
  # too few failed at the first record past them, mid-run.
  _make_folder(tmp_path / "faces", COUNTS)
  pack_recordio.pack_image_folder(tmp_path / "faces", str(tmp_path / "train"))
  for num_classes in (2, 5):
    (tmp_path / "property").write_text(f"{num_classes},16,16")
    with pytest.raises(recordio.RecordIOError,
                       match=f"gives {num_classes} classes, but .* lists 3 identities"):
      recordio.RecordIOSource(tmp_path)
    assert recordio.RecordIOSource(tmp_path, num_classes=5).num_classes == 5  # Chosen.
  (tmp_path / "property").unlink()
  assert recordio.RecordIOSource(tmp_path).num_classes == 3


def test_source_past_2_to_the_24_images_where_float32_header_labels_are_rounded(tmp_path):
  # Glint360K and WebFace42M have more than 2**24 images, so the header's float32 labels
  # [N + 1, N + 1 + K] are rounded: here 2**24 + 3 is stored as 2**24 + 4. Every image key
  # points to one image record, so that only the index is large.
  num_images, num_identities = 2**24 + 2, 2
  first_identity = num_images + 1
  header = recordio.IRHeader(0, [first_identity, first_identity + num_identities], 0)
  assert recordio.unpack(recordio.pack(header, b""))[0].label[0] == first_identity + 1
  rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
  with open(rec, "wb") as file:
    file.write(recordio.frame(recordio.pack(header, b"")))
    image_offset = file.tell()
    image = encode_image(_smooth_image(0, 8), image_format="png")
    file.write(recordio.frame(recordio.pack(recordio.IRHeader(0, 1.0, 1), image)))
    identity_offsets = [file.tell()]
    file.write(recordio.frame(recordio.pack(recordio.IRHeader(0, [1, 2], 0), b"")))
    identity_offsets.append(file.tell())
    file.write(recordio.frame(recordio.pack(recordio.IRHeader(0, [2, first_identity], 0), b"")))
  with open(idx, "w") as file:
    file.write("0\t0\n")
    file.write(f"\t{image_offset}\n".join(map(str, range(1, first_identity))))
    file.write(f"\t{image_offset}\n")
    file.writelines(f"{first_identity + k}\t{offset}\n" for k, offset in
                    enumerate(identity_offsets))
  source = recordio.RecordIOSource(str(rec), num_classes=2)
  assert len(source) == num_images and source.image_keys[-1] == num_images
  assert int(source[num_images - 1]["label"]) == 1  # The last image, not an identity record.
  assert source.identity_ranges().tolist() == [[1, 2], [2, first_identity + 1]]  # As stored.


def test_end_of_identities_is_never_searched_among_the_image_keys():
  # Past 2**25 images a float32 key is off by up to 2: with N = 2**25 images and one identity,
  # the end of the identity records, N + 2, is stored as 2**25, two keys into the images.
  num_images = 2**25
  image_end = num_images + 1  # The one identity record's key.
  stored = recordio.unpack(recordio.pack(recordio.IRHeader(0, [image_end, num_images + 2], 0),
                                         b""))[0].label[1]
  assert stored == 2**25
  ends_identities = lambda key: key != image_end  # An image, or past the identity records.
  source = types.SimpleNamespace(rec_path="train.rec")
  assert recordio.RecordIOSource._stored_key(
      source, stored, ends_identities, lowest=image_end) == num_images + 2


def test_source_without_images_is_an_error(tmp_path):
  rec, idx = str(tmp_path / "empty.rec"), str(tmp_path / "empty.idx")
  with recordio.RecordIOWriter(rec, idx) as writer:
    writer.write(recordio.pack(recordio.IRHeader(0, [1, 1], 0), b""), key=0)
  with pytest.raises(recordio.RecordIOError, match=f"{re.escape(idx)}: .*no image records"):
    recordio.RecordIOSource(rec, num_classes=1)


def test_source_resizes_to_image_shape_and_converts_channels(tmp_path):
  rec, _ = _write_image_records(tmp_path, [0, 1], header=[3, 3])
  source = recordio.RecordIOSource(rec, image_shape=(5, 7, 1), num_classes=2)
  record = source[1]
  assert record["image"].shape == (5, 7, 1) and record["image"].dtype == np.uint8
  # Pillow's luma conversion, then a bilinear resize of the whole 8 x 8 image (not a crop).
  want = PIL.Image.fromarray(_smooth_image(1, 8)).convert("L").resize(
      (7, 5), PIL.Image.Resampling.BILINEAR)
  np.testing.assert_array_equal(record["image"][:, :, 0], np.asarray(want))


def test_labels_read_at_once_equal_the_records_read_one_by_one(tmp_path, monkeypatch):
  # `labels` gathers the headers from a memory map, in blocks (of 3 here); records framed in
  # parts, or that end where the file does before the bytes it gathers, are read one by one.
  monkeypatch.setattr(recordio, "_HEADS_PER_READ", 3)
  magic = struct.pack("<I", recordio.MAGIC)
  records = {  # key: (IRHeader label, data); the index lists the keys out of order.
      7: (4, b"jpeg"), 2: ([1, 8.0], b"png!"), 9: (0, b"ab" + magic + magic + b"cdefgh"),
      3: ([3, 0.0, 5.0], b""), 4: (2, b"x" * 40), 8: ([0], magic * 3), 5: (1, b"")}
  rec, idx = str(tmp_path / "odd.rec"), str(tmp_path / "odd.idx")
  with recordio.RecordIOWriter(rec, idx) as writer:
    for key, (label, body) in records.items():
      writer.write(recordio.pack(recordio.IRHeader(0, label, key), body), key=key)
  source = recordio.RecordIOSource(rec, num_classes=5, image_shape=(4, 4, 3))
  assert source.reader.key_range is None
  read_one_by_one = []
  monkeypatch.setattr(source.reader, "read",
                      lambda key: read_one_by_one.append(key) or recordio.RecordIOReader.read(
                          source.reader, key))
  expected = [np.atleast_1d(records[key][0])[0] for key in source.image_keys]
  assert source.labels.dtype == np.int32 and source.labels.tolist() == expected
  # Key 8's data is three magic words at a 4-aligned offset, so it is framed in four parts
  # (key 9's words sit at offset 26, not aligned, so it is whole); key 5, 24 bytes and last
  # in the file, ends before the 28 bytes gathered.
  assert sorted(read_one_by_one) == [5, 8]


@pytest.mark.parametrize("payload, match", [
    (struct.pack("<IfQQ", 0, 4.0, 1, 0) + b"data", r"key 1 \(byte offset 36\) has label 4.0"),
    (struct.pack("<IfQQf", 3, 0.0, 1, 0, 1.0), "too short for the 3 labels"),
    (struct.pack("<IfQQ", 0, float("nan"), 1, 0) + b"data", "has label nan, not a class"),
    (struct.pack("<IfQQ", 0, 3.0, 1, 0) + b"data", r"has label 3.0, not a class"),
    (struct.pack("<IfQQ", 0, 1.5, 1, 0) + b"data", r"has label 1.5, not a class"),
    (struct.pack("<IfQQff", 3, 0.0, 1, 0, 1.0, 2.0), "too short for the 3 labels"),
], ids=["outside", "labels cut short", "nan", "num_classes", "not an integer",
        "one label short"])
def test_labels_name_the_record_that_has_no_class(tmp_path, payload, match):
  rec, idx = str(tmp_path / "bad.rec"), str(tmp_path / "bad.idx")
  with recordio.RecordIOWriter(rec, idx) as writer:
    writer.write(recordio.pack(recordio.IRHeader(0, 1, 0), b"data"), key=0)
    writer.write(payload, key=1)
    writer.write(recordio.pack(recordio.IRHeader(0, 2, 2), b"data"), key=2)
  source = recordio.RecordIOSource(rec, num_classes=3, image_shape=(4, 4, 3))
  with pytest.raises(recordio.RecordIOError, match=match):
    source.labels


def test_labels_read_at_once_from_keys_that_start_past_zero_and_single_list_labels(
    tmp_path, monkeypatch):
  # Consecutive keys from 5 (a key range not at 0), and labels stored as one-element lists
  # (flag 1, the header's label 0), whole records all: every label comes from the memory map.
  monkeypatch.setattr(recordio, "_HEADS_PER_READ", 3)
  labels = [4, 1, 3, 0, 2, 4, 1]
  rec, idx = str(tmp_path / "range.rec"), str(tmp_path / "range.idx")
  with recordio.RecordIOWriter(rec, idx) as writer:
    for key, label in enumerate(labels, start=5):
      stored = [float(label)] if key % 2 else label
      writer.write(recordio.pack(recordio.IRHeader(0, stored, key), b"x" * 40), key=key)
  source = recordio.RecordIOSource(rec, num_classes=5, image_shape=(4, 4, 3))
  assert source.reader.key_range == range(5, 5 + len(labels))
  monkeypatch.setattr(source.reader, "read", lambda key: pytest.fail(f"read key {key}"))
  assert source.labels.tolist() == labels


def test_source_rejects_labels_outside_num_classes(tmp_path):
  rec, _ = _write_image_records(tmp_path, [0, 4])
  source = recordio.RecordIOSource(rec, num_classes=3)
  assert int(source[0]["label"]) == 0
  with pytest.raises(recordio.RecordIOError,
                     match=f"{re.escape(rec)}: record key 1 \\(byte offset \\d+\\) has "
                           "label 4.0, not a class"):
    source[1]


@pytest.mark.parametrize("label", [1.5, [2.75, 0.0]])
def test_source_rejects_labels_that_are_not_integers(tmp_path, label):
  # Stored in the header (flag 0) or as the first of several labels: 1.5 is no class, where
  # truncating it would train on class 1 without a word.
  rec, idx = str(tmp_path / "train.rec"), str(tmp_path / "train.idx")
  image = encode_image(np.zeros((4, 4, 3), np.uint8), image_format="png")
  with recordio.RecordIOWriter(rec, idx) as writer:
    for key, stored in enumerate([2.0, label]):
      writer.write(recordio.pack(recordio.IRHeader(0, stored, key), image), key=key)
  source = recordio.RecordIOSource(rec, num_classes=3)
  assert int(source[0]["label"]) == 2
  with pytest.raises(recordio.RecordIOError, match=r"record key 1 .* has label (1.5|2.75), not"):
    source[1]


def test_source_names_the_record_of_an_undecodable_image(tmp_path):
  rec, idx = str(tmp_path / "bad.rec"), str(tmp_path / "bad.idx")
  with recordio.RecordIOWriter(rec, idx) as writer:
    writer.write(recordio.pack(recordio.IRHeader(0, 0, 0), b"not an image"), key=0)
  with pytest.raises(recordio.RecordIOError,
                     match=f"{re.escape(rec)}: record key 0 \\(byte offset 0\\): cannot decode"):
    recordio.RecordIOSource(rec, num_classes=1)


def test_property_file_gives_num_classes_and_shape(tmp_path):
  rec, _ = _write_image_records(tmp_path, [0, 1], size=8)
  with open(tmp_path / "property", "w") as file:
    file.write("10,6,4\n")
  source = recordio.RecordIOSource(rec)
  assert source.num_classes == 10 and source.image_shape == (6, 4, 3)
  assert source[0]["image"].shape == (6, 4, 3)
  with open(tmp_path / "property", "w") as file:
    file.write("10;6;4")
  with pytest.raises(recordio.RecordIOError, match="property: expected 'num_classes,height"):
    recordio.RecordIOSource(rec)
  # A size of 0 or less and bytes that are not UTF-8 raised errors that named no file (`image_shape`
  # must be >= 1; UnicodeDecodeError).
  for text in (b"10,0,4", b"10,6,-4", b"0,6,4", b"\xff\xfe1,2,3"):
    (tmp_path / "property").write_bytes(text)
    with pytest.raises(recordio.RecordIOError, match="property: expected 'num_classes,height"):
      recordio.RecordIOSource(rec)


def test_labels_refuse_a_last_record_the_file_cuts_short(tmp_path):
  # A partly copied train.rec: the last record's frame and the header gathered are there, its
  # payload is not. Read one by one, `labels` raised; the memory map must not take its label.
  rec, idx = str(tmp_path / "cut.rec"), str(tmp_path / "cut.idx")
  with recordio.RecordIOWriter(rec, idx) as writer:
    for key in range(3):
      writer.write(recordio.pack(recordio.IRHeader(0, key % 2, key), b"x" * 100), key=key)
  with open(rec, "r+b") as f:
    f.truncate(os.path.getsize(rec) - 60)
  source = recordio.RecordIOSource(rec, num_classes=2, image_shape=(4, 4, 3))
  with pytest.raises(recordio.RecordIOError, match="is truncated: 124 bytes announced"):
    source.labels
