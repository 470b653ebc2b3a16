"""Tests of verification ``.bin`` reading and writing, Python 2 pickles included."""

import io
import pickle
import re
import struct

import numpy as np
import PIL.Image
import pytest

from margins.data import verification_bin


def _images(count, shape=(7, 6, 3), seed=0):
  return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def _png(image):
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def _python2_pickle(bins, issame):
  """The bytes Python 2's ``pickle.dump((bins, issame), f, protocol=2)`` writes.

  In Python 2 an encoded image is a ``str``, which protocol 2 writes with the opcodes
  SHORT_BINSTRING (``U``, length < 256) or BINSTRING (``T``, 4-byte length). Python 3 writes
  ``bytes`` differently (``_codecs.encode`` at protocol 2, BINBYTES above), so such a file cannot be
  produced by Python 3's pickler; it is assembled here opcode by opcode, as Python 2 emits it
  (memo opcodes left out: they only let repeated objects be shared). Loading it in Python 3
  decodes these strings as ASCII unless ``encoding='bytes'`` is given.
  """
  out = [b"\x80\x02", b"](" ]  # PROTO 2; EMPTY_LIST, MARK.
  for data in bins:
    if len(data) < 256:
      out.append(b"U" + bytes([len(data)]) + data)
    else:
      out.append(b"T" + struct.pack("<i", len(data)) + data)
  out.append(b"e](")  # APPENDS; EMPTY_LIST, MARK.
  out.extend(b"\x88" if same else b"\x89" for same in issame)  # NEWTRUE / NEWFALSE.
  out.append(b"e\x86.")  # APPENDS; TUPLE2; STOP.
  return b"".join(out)


def test_python2_pickle_loads(tmp_path):
  images = _images(4)
  bins = [_png(image) for image in images]
  bins[1] = _png(_images(1, (40, 40, 3), seed=1)[0])  # Over 255 bytes: the BINSTRING opcode.
  data = _python2_pickle(bins, [True, False])
  # The fixture behaves as a Python 2 file does in Python 3: the default ASCII decoding of its
  # strings fails, and encoding='bytes' gives back the encoded images.
  with pytest.raises(UnicodeDecodeError):
    pickle.loads(data)
  assert pickle.loads(data, encoding="bytes") == (bins, [True, False])
  path = tmp_path / "py2.bin"
  path.write_bytes(data)

  loaded, issame = verification_bin.load_bin(path, image_size=(7, 6))
  assert loaded.dtype == np.uint8 and loaded.shape == (4, 7, 6, 3)
  assert issame.dtype == bool and issame.tolist() == [True, False]
  np.testing.assert_array_equal(loaded[[0, 2, 3]], images[[0, 2, 3]])
  expected = np.asarray(PIL.Image.open(io.BytesIO(bins[1])).resize(
      (6, 7), PIL.Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(loaded[1], expected)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("object_array", [False, True])  # Indexed as insightface reads it.
def test_python3_pickles_load(tmp_path, protocol, object_array):
  images = _images(6)
  path = tmp_path / "py3.bin"
  bins = [_png(image) for image in images]
  if object_array:
    bins = np.array(bins + [None])[:-1]  # Not an array of fixed-width bytes: objects.
    assert bins.dtype == object
  with open(path, "wb") as file:
    pickle.dump((bins, [False, True, True]), file, protocol=protocol)
  loaded, issame = verification_bin.load_bin(path)
  np.testing.assert_array_equal(loaded, images)
  assert issame.tolist() == [False, True, True]


@pytest.mark.parametrize("protocol", [2, 4, 5])  # 5 pickles arrays through ``_frombuffer``
@pytest.mark.parametrize("column", [False, True])
def test_numpy_buffers_and_bool_array_load(tmp_path, protocol, column):
  images = _images(2)
  # As cv2.imencode returns them: [N] arrays, and [N, 1] from OpenCV 3 (CFP-FP's, AgeDB-30's).
  bins = [np.frombuffer(_png(image), np.uint8) for image in images]
  bins = [data[:, None] for data in bins] if column else bins
  path = tmp_path / "np.bin"
  with open(path, "wb") as file:
    pickle.dump((bins, np.array([True])), file, protocol=protocol)
  loaded, issame = verification_bin.load_bin(path)
  np.testing.assert_array_equal(loaded, images)
  assert issame.tolist() == [True]


def test_grey_images_are_pillows_luma_of_each_image_resized(tmp_path):
  # channels=1 (a grey model): each image converted by Pillow's luma (L = R * 299/1000 +
  # G * 587/1000 + B * 114/1000), then resized bilinearly, pair order and labels kept.
  images = _images(4)
  path = tmp_path / "grey.bin"
  with open(path, "wb") as file:
    pickle.dump(([_png(image) for image in images], [False, True]), file)
  loaded, issame = verification_bin.load_bin(path, image_size=(5, 4), channels=1)
  assert loaded.dtype == np.uint8 and loaded.shape == (4, 5, 4, 1)
  assert issame.tolist() == [False, True]
  for image, grey in zip(images, loaded):
    want = PIL.Image.fromarray(image).convert("L").resize((4, 5), PIL.Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(grey[:, :, 0], np.asarray(want))
  # At the stored size, the luma by its formula (Pillow rounds it to within one grey level).
  same_size, _ = verification_bin.load_bin(path, image_size=(7, 6), channels=1)
  luma = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(same_size[..., 0], luma, atol=1)


def test_write_bin_round_trip(tmp_path):
  images = _images(4)
  path = tmp_path / "pairs.bin"
  verification_bin.write_bin(path, images, [True, False], image_format="png")
  assert path.read_bytes()[:2] == b"\x80\x04"  # Protocol 4: Python 3.4 and later read it.
  with open(path, "rb") as file:
    bins, issame = pickle.load(file)  # insightface's layout, readable by plain pickle.
  assert len(bins) == 4 and all(isinstance(data, bytes) for data in bins)
  assert issame == [True, False]
  loaded, loaded_issame = verification_bin.load_bin(path)
  np.testing.assert_array_equal(loaded, images)
  assert loaded_issame.tolist() == [True, False]

  verification_bin.write_bin(path, images, [True, False])  # JPEG, as the real files.
  with open(path, "rb") as file:
    assert all(data.startswith(b"\xff\xd8\xff") for data in pickle.load(file)[0])
  assert verification_bin.load_bin(path)[0].shape == (4, 7, 6, 3)


def test_write_bin_rejects_bad_input(tmp_path):
  path = tmp_path / "x.bin"
  with pytest.raises(ValueError, match="`images`.*\\[2P, H, W, 3\\]"):
    verification_bin.write_bin(path, np.zeros((2, 4, 4), np.uint8), [True])
  with pytest.raises(ValueError, match="4 images but `issame` has 1 pairs"):
    verification_bin.write_bin(path, _images(4), [True])
  with pytest.raises(TypeError, match="`issame`"):
    verification_bin.write_bin(path, _images(2), [1])


def _dump(path, obj):
  with open(path, "wb") as file:
    pickle.dump(obj, file)


def test_bad_files_name_the_file(tmp_path):
  path = tmp_path / "bad.bin"
  cases = [
      (b"not a pickle at all", "not a verification .bin pickle"),
      (b"", "not a verification .bin pickle"),
  ]
  for content, message in cases:
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: .*{message}"):
      verification_bin.load_bin(path)

  png = _png(_images(1)[0])
  for obj, message in [
      ({"bins": []}, "expected a pickled pair"),
      (([png], [True]), "1 images for 1 pairs"),
      (([png, png, png], [True]), "3 images for 1 pairs"),  # One image too many: refused too.
      (([png, png], [[True]]), "`issame` must be a list of P booleans"),
      (([png, png], [0.5]), "`issame` must be a list of P booleans"),
      (([png, b"junk"], [True]), "image 1: cannot decode image"),
      (([png, 3], [True]), "image 1: expected encoded image bytes, got int"),
      (([png, _png(_images(1, (9, 9, 3))[0])], [True]), "image 1 is \\(9, 9\\) but image 0"),
      (([], []), "holds no pairs"),
      ((png, [True]), "must be a list of encoded images, got bytes"),
      (([png, png], True), "`issame` must be a list of P booleans"),
  ]:
    _dump(path, obj)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: .*{message}"):
      verification_bin.load_bin(path)


def test_bad_image_size(tmp_path):
  with pytest.raises(ValueError, match="`image_size` must be \\(height, width\\)"):
    verification_bin.load_bin(tmp_path / "unused.bin", image_size=(112, 112, 3))


class _Exploit:

  def __reduce__(self):
    return (print, ("this must not run",))


def test_pickles_that_would_run_code_are_refused(tmp_path, capsys):
  path = tmp_path / "evil.bin"
  _dump(path, ([_Exploit()], [True]))
  with pytest.raises(ValueError,
                     match=f"{re.escape(str(path))}: .*may not reference builtins.print"):
    verification_bin.load_bin(path)
  assert "must not run" not in capsys.readouterr().out
