"""RecordIO ``.rec`` + ``.idx`` files (MXNet, dmlc-core) in pure Python, and insightface's datasets.

MXNet does not install beside NumPy 2, so the format is read and written here byte for byte.

**Records.** A ``.rec`` file is a sequence of records, each framed as little-endian
``u32 magic = 0xCED7230A``, ``u32 lrec = cflag << 29 | length``, ``length`` payload bytes and zero
padding to a multiple of 4 bytes. The magic word never appears 4-aligned inside a frame: a writer
cuts the payload wherever it does, drops that word and writes the pieces as parts with
``cflag`` 1 (first), 2 (middle), 3 (last); a reader joins the parts with the magic word between
them. ``cflag`` 0 is a record in one piece.

**Index.** A ``.idx`` file has one text line ``key<TAB>byte_offset`` per record.

**Image records.** The payload starts with an ``IRHeader`` (``struct '<IfQQ'``: flag, label, id,
id2). When ``flag > 0``, ``flag`` float32 labels follow and the header's label is 0. The encoded
image (JPEG/PNG) is the rest. Labels being float32, class ids are exact up to ``2**24``
(16,777,216 classes; WebFace42M has 2,059,906), which ``pack_recordio`` checks.

**insightface's layout** (MS1MV2/V3, Glint360K, WebFace42M: ``train.rec``, ``train.idx``,
``property``): key 0 is a header record whose labels ``[N + 1, N + 1 + K]`` give the range of
identity keys; keys ``1..N`` are images (label: the class, or a list starting with it); keys
``N + 1..N + K`` hold each identity's ``[start, end)`` range of image keys; ``property`` holds
``num_classes,height,width``. Without a header record (``flag == 0`` at key 0), every key is an
image, as in MXNet's ``im2rec`` output.
"""

import bisect
import functools
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Callable, NamedTuple

import numpy as np

from margins._checks import check_int
from margins.data import _shared_memory
from margins.data import image_folder

MAGIC = 0xCED7230A
MAX_PART_LENGTH = (1 << 29) - 1

_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")
_CFLAG_SHIFT = 29
_HEADS_PER_READ = 1 << 16  # Records whose headers RecordIOSource.labels reads at once.
_WHOLE, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3


class RecordIOError(ValueError):
  """A ``.rec`` or ``.idx`` file is corrupt or truncated; the message names the file and offset."""


class IRHeader(NamedTuple):
  """The header MXNet puts in front of an image record.

  Attributes:
    flag: number of float32 labels that follow the header (0: the label is ``label``).
    label: a float, or a float32 array when there are several labels.
    id: the record's id (insightface: its key).
    id2: high bits of the id, usually 0.
  """
  flag: int
  label: float | np.ndarray
  id: int
  id2: int = 0


def _padded(length: int) -> int:
  return (length + 3) & ~3


def pack(header: IRHeader, data: bytes) -> bytes:
  """Prepends an :class:`IRHeader` (and its labels) to ``data``.

  A scalar ``header.label`` is stored in the header (flag 0); a sequence or array is stored as
  ``flag = len(label)`` float32 values after the header, and the header's label becomes 0.
  ``header.flag`` is ignored, as in MXNet.

  Args:
    header: the header.
    data: usually an encoded image.

  Returns:
    The record payload.

  >>> from margins.data import recordio
  >>> payload = recordio.pack(recordio.IRHeader(0, [3.0, 7.0], 12), b"jpeg")
  >>> len(payload)  # 24-byte header, two float32 labels, the data
  36
  >>> recordio.unpack(payload)
  (IRHeader(flag=2, label=array([3., 7.], dtype=float32), id=12, id2=0), b'jpeg')

  References:
    MXNet, ``mxnet.recordio.pack``.
  """
  if np.ndim(header.label) == 0:
    return _IR_HEADER.pack(0, float(header.label), header.id, header.id2) + bytes(data)
  labels = np.asarray(header.label, dtype="<f4")
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(
        f"`header.label` must be a number or a non-empty 1-D sequence, got {labels!r}.")
  return _IR_HEADER.pack(labels.size, 0.0, header.id, header.id2) + labels.tobytes() + bytes(data)


def unpack(payload: bytes) -> tuple[IRHeader, bytes]:
  """Splits a record payload into its :class:`IRHeader` and the data after it.

  Args:
    payload: a record as read from a ``.rec`` file.

  Returns:
    ``(header, data)``; ``header.label`` is a float when ``flag == 0`` and a float32 array of
    ``flag`` labels otherwise.

  Raises:
    ValueError: the payload is shorter than its header says.

  >>> from margins.data import recordio
  >>> recordio.unpack(recordio.pack(recordio.IRHeader(0, 5, 1), b"png"))
  (IRHeader(flag=0, label=5.0, id=1, id2=0), b'png')

  References:
    MXNet, ``mxnet.recordio.unpack``.
  """
  if len(payload) < _IR_HEADER.size:
    raise ValueError(f"record of {len(payload)} bytes is shorter than an IRHeader "
                     f"({_IR_HEADER.size} bytes).")
  header = IRHeader(*_IR_HEADER.unpack_from(payload))
  data_start = _IR_HEADER.size + 4 * header.flag
  if header.flag > 0:
    if len(payload) < data_start:
      raise ValueError(f"record of {len(payload)} bytes is too short for the {header.flag} "
                       f"labels its IRHeader announces.")
    labels = np.frombuffer(payload, dtype="<f4", count=header.flag, offset=_IR_HEADER.size)
    header = header._replace(label=labels.astype(np.float32))
  return header, bytes(payload[data_start:])


def frame(payload: bytes) -> bytes:
  """The bytes a RecordIO writer stores for one record (one or more framed parts).

  The payload is cut wherever the magic word sits at a 4-aligned offset, and that word is
  dropped; each piece is written as ``magic, cflag << 29 | length, piece, zero padding to 4``.

  Args:
    payload: the record.

  Returns:
    The framed bytes, a multiple of 4 long.

  >>> from margins.data import recordio
  >>> recordio.frame(b"abcde").hex(" ", 4)
  '0a23d7ce 05000000 61626364 65000000'

  References:
    dmlc-core, ``RecordIOWriter::WriteRecord`` (``src/recordio.cc``).
  """
  payload = bytes(payload)
  words = np.frombuffer(payload, dtype="<u4", count=len(payload) // 4)
  cuts = (4 * np.flatnonzero(words == MAGIC)).tolist()
  starts = [0] + [cut + 4 for cut in cuts]
  ends = cuts + [len(payload)]
  cflags = [_FIRST] + [_MIDDLE] * (len(cuts) - 1) + [_LAST] if cuts else [_WHOLE]
  pieces = []
  for cflag, start, end in zip(cflags, starts, ends):
    if end - start > MAX_PART_LENGTH:
      raise ValueError(f"a RecordIO record part holds at most {MAX_PART_LENGTH} bytes, "
                       f"got {end - start}.")
    pieces.append(_FRAME.pack(MAGIC, cflag << _CFLAG_SHIFT | (end - start)))
    pieces.append(payload[start:end])
    pieces.append(bytes(_padded(end - start) - (end - start)))
  return b"".join(pieces)


def read_index(idx_path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
  """Reads a ``.idx`` file: lines ``key<TAB>byte_offset``.

  Args:
    idx_path: the index.

  Returns:
    ``(keys, offsets)``, ``int64 [N]`` each, in file order.

  Raises:
    RecordIOError: a line is not two integers, or a key repeats.

  >>> import os, tempfile
  >>> from margins.data import recordio
  >>> tmp = tempfile.TemporaryDirectory()
  >>> with open(os.path.join(tmp.name, "a.idx"), "w") as f:
  ...   _ = f.write("0\\t0\\n1\\t32\\n")
  >>> keys, offsets = recordio.read_index(os.path.join(tmp.name, "a.idx"))
  >>> keys.tolist(), offsets.tolist()
  ([0, 1], [0, 32])
  >>> tmp.cleanup()

  References:
    MXNet, ``mxnet.recordio.MXIndexedRecordIO``.
  """
  idx_path = os.fspath(idx_path)
  if os.path.getsize(idx_path) == 0:
    return np.zeros([0], np.int64), np.zeros([0], np.int64)
  try:
    table = np.loadtxt(idx_path, dtype=np.int64, ndmin=2)
  except ValueError as error:
    raise RecordIOError(f"{idx_path}: not a RecordIO index ({error}).") from error
  if table.shape[1] != 2:
    raise RecordIOError(f"{idx_path}: index lines must be 'key<TAB>byte_offset', found "
                        f"{table.shape[1]} columns.")
  keys, offsets = table[:, 0].copy(), table[:, 1].copy()
  if not np.all(keys[1:] > keys[:-1]):  # Keys written in order cannot repeat (no sort needed).
    unique, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
      raise RecordIOError(f"{idx_path}: keys repeat, e.g. {unique[counts > 1][:5].tolist()}.")
  return keys, offsets


class RecordIOWriter:
  """Writes a ``.rec`` file, and its ``.idx`` index when ``idx_path`` is given.

  >>> import os, tempfile
  >>> from margins.data import recordio
  >>> tmp = tempfile.TemporaryDirectory()
  >>> rec, idx = os.path.join(tmp.name, "a.rec"), os.path.join(tmp.name, "a.idx")
  >>> with recordio.RecordIOWriter(rec, idx) as writer:
  ...   [writer.write(payload, key=key) for key, payload in enumerate([b"first", b"second"])]
  [0, 16]
  >>> with recordio.RecordIOReader(rec, idx) as reader:
  ...   reader.read(1), [payload for _, payload in reader.iter_records()]
  (b'second', [b'first', b'second'])
  >>> tmp.cleanup()

  References:
    MXNet, ``mxnet.recordio.MXRecordIO`` / ``MXIndexedRecordIO`` (``write``, ``write_idx``).
  """

  def __init__(self, rec_path: str | os.PathLike[str],
               idx_path: str | os.PathLike[str] | None = None):
    """Creates (truncates) the files.

    Args:
      rec_path: the ``.rec`` file.
      idx_path: the ``.idx`` file, or ``None`` to write records without an index.
    """
    self.rec_path = os.fspath(rec_path)
    self.idx_path = None if idx_path is None else os.fspath(idx_path)
    self._rec = open(self.rec_path, "wb")
    self._idx = None if idx_path is None else open(self.idx_path, "w", encoding="ascii")
    self._offset = 0
    # The keys written, as sorted disjoint runs [start, end): one run while keys count up, so
    # 42.5 million keys in order (WebFace42M) take two integers, where a set took gigabytes.
    self._run_starts: list[int] = []
    self._run_ends: list[int] = []

  def write(self, payload: bytes, *, key: int | None = None) -> int:
    """Appends a record; with ``key``, adds the line ``key<TAB>offset`` to the index.

    Args:
      payload: the record (e.g. from :func:`pack`).
      key: the record's key in the index (integers, unique).

    Returns:
      The byte offset of the record in the ``.rec`` file.
    """
    if key is not None:
      if self._idx is None:
        raise ValueError("`key` needs an index: pass `idx_path` to RecordIOWriter.")
      key = check_int(key, "key", minimum=np.iinfo(np.int64).min)  # The index holds int64.
      self._add_key(key)
    offset = self._offset
    framed = frame(payload)
    self._rec.write(framed)
    self._offset += len(framed)
    if key is not None:
      self._idx.write(f"{key}\t{offset}\n")
    return offset

  def _add_key(self, key: int) -> None:
    """Records ``key`` among the written keys; raises if it is one already."""
    starts, ends = self._run_starts, self._run_ends
    run = bisect.bisect_right(starts, key) - 1  # The last run starting at or before `key`.
    if run >= 0 and key < ends[run]:
      raise ValueError(f"`key` {key} was already written to {self.idx_path}.")
    joins_previous = run >= 0 and ends[run] == key
    joins_next = run + 1 < len(starts) and starts[run + 1] == key + 1
    if joins_previous and joins_next:
      ends[run] = ends.pop(run + 1)
      del starts[run + 1]
    elif joins_previous:
      ends[run] = key + 1
    elif joins_next:
      starts[run + 1] = key
    else:
      starts.insert(run + 1, key)
      ends.insert(run + 1, key + 1)

  def close(self) -> None:
    """Flushes and closes the files."""
    self._rec.close()
    if self._idx is not None:
      self._idx.close()

  def __enter__(self) -> "RecordIOWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class RecordIOReader:
  """Reads records of a ``.rec`` file: by key through its ``.idx``, or in sequence without one.

  The file is opened lazily, once per process, and read with ``os.pread`` (no shared file
  position), so one reader can be used from several threads, be pickled into grain's worker
  processes (the handle is not pickled) and survive a fork. The index is parsed once, when the
  reader is created.

  Consecutive keys in order (what writers produce) are held as a ``range``: lookups need no
  search, and a reader pickled into each worker carries only the offsets (``8 N`` bytes: 340 MB
  for WebFace42M's index, not three times that). From 2M records on, the offsets live in shared
  memory (grain's ``SharedMemoryArray``, freed with the reader): a worker process maps the
  creating process's copy instead of unpickling its own (+711 MB per worker at WebFace42M's
  size before), where ``/dev/shm`` has the room (a container's default 64 MB has not).

  Attributes:
    rec_path: the ``.rec`` file.
    idx_path: the ``.idx`` file, or ``None``.
    offsets: ``int64 [N]`` byte offset of each key's record, in index order.
    key_range: the keys, when they are consecutive and in index order; else ``None``.

  See :class:`RecordIOWriter` for an example.

  References:
    dmlc-core, ``RecordIOReader::ReadRecord`` (``src/recordio.cc``); MXNet,
    ``mxnet.recordio.MXIndexedRecordIO``.
  """

  _fd: int | None = None  # This process's file descriptor, opened on the first read.
  _close_fd = staticmethod(os.close)  # Still reachable in __del__ at interpreter exit.

  def __init__(self, rec_path: str | os.PathLike[str],
               idx_path: str | os.PathLike[str] | None = None):
    """Parses the index and checks that every offset lies inside the ``.rec`` file.

    Args:
      rec_path: the ``.rec`` file.
      idx_path: its ``.idx`` file, or ``None`` for sequential reading only.

    Raises:
      RecordIOError: the index is malformed or points past the end of the ``.rec`` file.
    """
    self.rec_path = os.fspath(rec_path)
    self.idx_path = None if idx_path is None else os.fspath(idx_path)
    size = os.path.getsize(self.rec_path)
    if self.idx_path is None:
      keys, self.offsets = np.zeros([0], np.int64), np.zeros([0], np.int64)
    else:
      keys, self.offsets = read_index(self.idx_path)
    bad = (self.offsets < 0) | (self.offsets >= size)
    if bad.any():
      first = int(np.flatnonzero(bad)[0])
      raise RecordIOError(
          f"{self.idx_path}: key {keys[first]} points to byte offset {self.offsets[first]}, "
          f"past the end of {self.rec_path} ({size} bytes).")
    self.offsets = _shared_memory.shared(self.offsets)
    in_order = bool(np.all(keys[1:] > keys[:-1]))
    self._order = None if in_order else np.argsort(keys)
    self.key_range, self._sorted_keys = None, keys if in_order else keys[self._order]
    if in_order and (not keys.size or int(keys[-1] - keys[0]) == keys.size - 1):
      start = int(keys[0]) if keys.size else 0
      self.key_range, self._sorted_keys = range(start, start + keys.size), None

  @property
  def keys(self) -> np.ndarray:
    """``int64 [N]`` keys in index order (empty without an index)."""
    if self.key_range is None:
      return self._sorted_keys if self._order is None else self._sorted_keys[
          np.argsort(self._order)]
    return _key_array(self.key_range)

  def __contains__(self, key: int) -> bool:
    """Whether the index lists ``key``."""
    return self._position(key) is not None

  def missing(self, keys: np.ndarray) -> np.ndarray:
    """The ``keys`` that the index does not list (a binary search each: fast for sorted
    ``keys``, as a set difference of tens of millions of keys is not)."""
    if self.key_range is not None:
      return keys[(keys < self.key_range.start) | (keys >= self.key_range.stop)]
    positions = np.minimum(np.searchsorted(self._sorted_keys, keys), len(self._sorted_keys) - 1)
    return keys[self._sorted_keys[positions] != keys]

  def offset(self, key: int) -> int:
    """Byte offset of the record with this key (``KeyError`` when the index lacks it)."""
    position = self._position(key)
    if position is None:
      where = "no index was given" if self.idx_path is None else f"not in {self.idx_path}"
      raise KeyError(f"record key {key}: {where}.")
    return int(self.offsets[position if self._order is None else self._order[position]])

  def offsets_of(self, keys: np.ndarray) -> np.ndarray:
    """``int64 [N]`` byte offsets of the records with these ``keys``, each one the index lists."""
    if self.key_range is not None:
      return self.offsets[keys - self.key_range.start]
    positions = np.searchsorted(self._sorted_keys, keys)
    return self.offsets[positions if self._order is None else self._order[positions]]

  def payload_heads(self, offsets: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``length`` payload bytes of the records at ``offsets``, gathered at once from a
    memory map of the file (for the headers of millions of records, which :meth:`read_at` reads
    one by one in minutes).

    Args:
      offsets: ``int64 [N]`` byte offsets of records.
      length: bytes to read from the start of each payload.

    Returns:
      ``(heads, sizes)``: ``uint8 [N, length]``, and ``int64 [N]`` each payload's size where the
      record is framed in one piece and the file holds all of it and ``length`` bytes past its
      frame, else -1. Bytes past a payload's size, and the heads of rows with -1, mean nothing:
      read those records with :meth:`read_at`, whose errors name what is wrong.
    """
    file_size = os.path.getsize(self.rec_path)
    span = offsets[:, None] + np.arange(_FRAME.size + length)
    raw = np.memmap(self.rec_path, np.uint8, mode="r")[np.minimum(span, file_size - 1)]
    magic, lrec = np.ascontiguousarray(raw[:, :_FRAME.size]).view("<u4").T
    lengths = (lrec & MAX_PART_LENGTH).astype(np.int64)
    # The whole payload in the file: a record the file cuts short is read (and refused) by read_at.
    whole = ((span[:, -1] < file_size) & (magic == MAGIC) & (lrec >> _CFLAG_SHIFT == _WHOLE)
             & (offsets + _FRAME.size + lengths <= file_size))
    sizes = np.where(whole, lengths, -1)
    return raw[:, _FRAME.size:], sizes

  def _position(self, key: int) -> int | None:
    """Where ``key`` is among the sorted keys, or ``None``."""
    key = int(key)
    if self.key_range is not None:
      return key - self.key_range.start if key in self.key_range else None
    position = int(np.searchsorted(self._sorted_keys, key))
    if position == len(self._sorted_keys) or self._sorted_keys[position] != key:
      return None
    return position

  def read(self, key: int) -> bytes:
    """The payload of the record with this key."""
    payload, _ = self.read_at(self.offset(key))
    return payload

  def read_at(self, offset: int) -> tuple[bytes, int]:
    """Reads the record starting at byte ``offset``.

    Returns:
      ``(payload, next_offset)``: the record (parts joined) and where the next record starts.

    Raises:
      RecordIOError: bad magic word, bad part sequence or truncated record; the message names
      the file and the byte offset.
    """
    if self._fd is None:
      self._fd = os.open(self.rec_path, os.O_RDONLY)
    parts, position = [], offset
    while True:
      head = os.pread(self._fd, _FRAME.size, position)
      if len(head) < _FRAME.size:
        raise RecordIOError(f"{self.rec_path}: truncated record header at byte offset {position} "
                            f"({len(head)} of {_FRAME.size} bytes before the end of the file).")
      magic, lrec = _FRAME.unpack(head)
      if magic != MAGIC:
        raise RecordIOError(f"{self.rec_path}: bad magic word 0x{magic:08X} at byte offset "
                            f"{position} (expected 0x{MAGIC:08X}): corrupt file or wrong offset.")
      cflag, length = lrec >> _CFLAG_SHIFT, lrec & MAX_PART_LENGTH
      allowed = (_MIDDLE, _LAST) if parts else (_WHOLE, _FIRST)
      if cflag not in allowed:
        raise RecordIOError(f"{self.rec_path}: part flag {cflag} at byte offset {position}, "
                            f"expected one of {allowed}: corrupt file.")
      data = os.pread(self._fd, length, position + _FRAME.size)
      if len(data) < length:
        raise RecordIOError(f"{self.rec_path}: record at byte offset {position} is truncated: "
                            f"{length} bytes announced, {len(data)} before the end of the file.")
      parts.append(data)
      position += _FRAME.size + _padded(length)
      if cflag in (_WHOLE, _LAST):
        return _MAGIC_BYTES.join(parts), position

  def iter_records(self) -> Iterator[tuple[int, bytes]]:
    """Yields ``(byte_offset, payload)`` of every record in file order; needs no index."""
    size = os.path.getsize(self.rec_path)
    offset = 0
    while offset < size:
      payload, next_offset = self.read_at(offset)
      yield offset, payload
      offset = next_offset

  def close(self) -> None:
    """Closes this process's file handle (reading again reopens it)."""
    if self._fd is not None:
      self._close_fd(self._fd)
      self._fd = None

  def __enter__(self) -> "RecordIOReader":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __del__(self):
    self.close()

  def __getstate__(self) -> dict:
    state = self.__dict__.copy()
    state.pop("_fd", None)  # A descriptor means nothing in another process.
    return state


def _column(heads: np.ndarray, start: int, dtype: str) -> np.ndarray:
  """``[N]`` values of a 4-byte ``dtype`` at byte ``start`` of each row of ``uint8 [N, L]``."""
  return np.ascontiguousarray(heads[:, start:start + 4]).view(dtype)[:, 0]


def _key_array(keys: range | np.ndarray) -> np.ndarray:
  """``int64 [N]`` keys, from a ``range`` of them or as they are."""
  if isinstance(keys, range):
    return np.arange(keys.start, keys.stop, dtype=np.int64)
  return keys


def dataset_files(path: str | os.PathLike[str]) -> tuple[str, str]:
  """``(rec path, idx path)`` of a dataset: a folder's ``train.rec`` and ``train.idx``, or a
  ``.rec`` file and the ``.idx`` beside it with the same stem."""
  path = os.fspath(path)
  rec_path = os.path.join(path, "train.rec") if os.path.isdir(path) else path
  return rec_path, os.path.splitext(rec_path)[0] + ".idx"


def _read_property(path: str) -> tuple[int, int, int]:
  with open(path, "rb") as file:
    text = file.read().decode("utf-8", errors="replace").strip()
  try:
    num_classes, height, width = (int(field) for field in text.split(","))
  except ValueError as error:
    raise RecordIOError(
        f"{path}: expected 'num_classes,height,width', got {text[:80]!r}.") from error
  if min(num_classes, height, width) <= 0:
    raise RecordIOError(f"{path}: expected 'num_classes,height,width' of positive integers, got "
                        f"{text[:80]!r}.")
  return num_classes, height, width


class RecordIOSource:
  """Grain random-access source over an insightface RecordIO dataset (or any image ``.rec``).

  Records are ``{"image": uint8 [H, W, C], "label": int32 []}``: the image is decoded (and resized
  when its size differs from ``image_shape``) in ``__getitem__``; the label is the record's
  label, or the first of its labels (stored as float32: one that is not a whole number in
  ``[0, num_classes)`` raises :class:`RecordIOError`). The source pickles into grain's worker
  processes without its file handle (each process opens the file once).

  Attributes:
    rec_path, idx_path: the files read.
    image_keys: ``int64 [N]`` keys of the image records, in order: ``source[i]`` reads key
      ``image_keys[i]``.
    num_classes: number of identities.
    image_shape: ``(H, W, C)`` of every image returned.

  >>> import os, tempfile, numpy as np
  >>> from margins.data import recordio
  >>> from margins.data.image_folder import encode_image
  >>> tmp = tempfile.TemporaryDirectory()
  >>> image = encode_image(np.zeros((4, 4, 3), np.uint8), image_format="png")
  >>> with recordio.RecordIOWriter(os.path.join(tmp.name, "train.rec"),
  ...                              os.path.join(tmp.name, "train.idx")) as writer:
  ...   _ = writer.write(recordio.pack(recordio.IRHeader(0, [3, 5], 0), b""), key=0)
  ...   for key, label in [(1, 0), (2, 1)]:
  ...     _ = writer.write(recordio.pack(recordio.IRHeader(0, label, key), image), key=key)
  ...   _ = writer.write(recordio.pack(recordio.IRHeader(0, [1, 2], 3), b""), key=3)
  ...   _ = writer.write(recordio.pack(recordio.IRHeader(0, [2, 3], 4), b""), key=4)
  >>> source = recordio.RecordIOSource(tmp.name)
  >>> len(source), source.num_classes, source.image_shape, int(source[1]["label"])
  (2, 2, (4, 4, 3), 1)
  >>> source.identity_ranges().tolist()
  [[1, 2], [2, 3]]
  >>> tmp.cleanup()

  References:
    insightface, ``recognition/arcface_torch/dataset.py`` (``MXFaceDataset``).
  """

  def __init__(self, path: str | os.PathLike[str], *,
               image_shape: Sequence[int] | None = None, num_classes: int | None = None):
    """Opens a dataset.

    Args:
      path: a folder holding ``train.rec``, ``train.idx`` (and ``property``), or a ``.rec`` file
        whose index is the ``.idx`` file beside it with the same stem.
      image_shape: ``(H, W, C)`` of the returned images (C = 1 or 3). ``None``: ``(H, W, 3)``
        from ``property``, else the size of the first image.
      num_classes: ``None``: from ``property`` (a file beside the ``.rec``), else from the
        identity range of the header record (the two must agree); give it for files that have
        neither.

    Raises:
      RecordIOError: a file is malformed, an image key is missing from the index, or
        ``property`` and the identity records give different class counts.
      ValueError: ``num_classes`` is not given and the files do not say it.
    """
    self.rec_path, self.idx_path = dataset_files(path)
    self.reader = RecordIOReader(self.rec_path, self.idx_path)

    # The header record: key 0, with labels and no image (MXFaceDataset checks only flag > 0;
    # an image record at key 0 with several labels, as im2rec writes, has data after them).
    header, data = self._unpack(0) if 0 in self.reader else (None, None)
    self._identity_keys = None
    if header is not None and header.flag > 0 and not data:
      image_end = self._stored_key(
          header.label[0], lambda key: key not in self.reader or self._is_identity_record(key))
      self._image_keys = range(1, image_end)
      # The index holds num_keys keys, key 0 among them: a header announcing more images has 6 or
      # more of keys 1..num_keys + 5 missing, and is refused without listing them all (a corrupt
      # 1e9 would take gigabytes).
      num_keys = len(self.reader.offsets)
      missing = self.reader.missing(
          np.arange(1, min(image_end, num_keys + 6), dtype=np.int64))
      if missing.size:
        raise RecordIOError(
            f"{self.idx_path}: the header record (key 0) announces image keys 1..{image_end - 1}, "
            f"but keys {missing[:5].tolist()} are not in the index.")
      if image_end > 1 and self._is_identity_record(image_end - 1):
        raise RecordIOError(
            f"{self.rec_path}: the header record (key 0) announces image keys 1..{image_end - 1}, "
            f"but key {image_end - 1} is an identity record (labels, no image).")
      # Identity records [N + 1, N + 1 + K), when the header gives their range and they exist
      # (some tools write labels [N + 1, K] and no identity records).
      identity_end = image_end if header.flag < 2 else self._stored_key(
          header.label[1], lambda key: key not in self.reader or not self._is_identity_record(key),
          lowest=image_end)
      # More identity keys than the index holds: some are missing (and not listed, as above).
      identity_keys = np.arange(image_end, identity_end, dtype=np.int64) if (
          0 < identity_end - image_end <= num_keys) else np.zeros([0], np.int64)
      if identity_keys.size and not self.reader.missing(identity_keys).size:
        if not self._is_identity_record(image_end):
          raise RecordIOError(
              f"{self.rec_path}: the header record (key 0) announces identity records from key "
              f"{image_end} on, but key {image_end} is an image record.")
        self._identity_keys = identity_keys
    else:
      self._image_keys = self.reader.key_range or self.reader.keys
    if len(self._image_keys) == 0:
      raise RecordIOError(f"{self.idx_path}: the index lists no image records.")

    property_path = os.path.join(os.path.dirname(self.rec_path), "property")
    stored = _read_property(property_path) if os.path.exists(property_path) else None
    if num_classes is None:
      if stored is not None and self._identity_keys is not None and (
          stored[0] != len(self._identity_keys)):
        raise RecordIOError(
            f"{property_path} gives {stored[0]} classes, but {self.rec_path}'s header record lists "
            f"{len(self._identity_keys)} identities: they describe different datasets. Pass "
            "`num_classes` (train.py: config.data.num_classes) to choose.")
      if stored is not None:
        num_classes = stored[0]
      elif self._identity_keys is not None:
        num_classes = len(self._identity_keys)
      else:
        raise ValueError(f"`num_classes` is needed (train.py: config.data.num_classes): "
                         f"{self.rec_path} has no `property` file beside it and no header record "
                         "with identity ranges.")
    if num_classes <= 0:
      raise ValueError(f"`num_classes` must be positive, got {num_classes}.")
    self.num_classes = int(num_classes)
    if image_shape is None:
      if stored is not None:
        image_shape = (stored[1], stored[2], 3)
      else:
        key = int(self._image_keys[0])
        image_shape = self._decode(key, self._unpack(key)[1], None).shape
    self.image_shape = image_folder.check_image_shape(image_shape)

  @property
  def image_keys(self) -> np.ndarray:
    """``int64 [N]`` keys of the image records, in order: ``source[i]`` reads key
    ``image_keys[i]`` (held as a ``range`` when consecutive)."""
    return _key_array(self._image_keys)

  def __len__(self) -> int:
    return len(self._image_keys)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    key = int(self._image_keys[index])
    header, data = self._unpack(key)
    return {"image": self._decode(key, data, self.image_shape),
            "label": self._label(key, header)}

  def encoded_image(self, index: int) -> bytes:
    """The image of ``source[index]`` as stored (e.g. JPEG bytes), not decoded."""
    return self._unpack(int(self._image_keys[index]))[1]

  @functools.cached_property
  def labels(self) -> np.ndarray:
    """``int32 [N]`` label of every image record, read from the record headers (no decoding)."""
    labels = np.empty(len(self), np.int32)
    for start in range(0, len(self), _HEADS_PER_READ):
      block = _key_array(self._image_keys[start:start + _HEADS_PER_READ])
      # The IRHeader and the first of the labels that may follow it.
      heads, sizes = self.reader.payload_heads(self.reader.offsets_of(block),
                                               _IR_HEADER.size + 4)
      flag = _column(heads, 0, "<u4").astype(np.int64)
      stored = np.where(flag == 0, _column(heads, 4, "<f4"),
                        _column(heads, _IR_HEADER.size, "<f4")).astype(np.float64)
      is_class = (0 <= stored) & (stored < self.num_classes) & (stored == np.floor(stored))
      labels[start:start + len(block)] = np.where(is_class, stored, 0)
      # Records framed in parts or shorter than their labels, and labels that are no class: read
      # one by one, which names the fault.
      readable = sizes >= _IR_HEADER.size + 4 * flag
      for row in np.flatnonzero(~(readable & is_class)):
        key = int(block[row])
        labels[start + row] = self._label(key, self._unpack(key)[0])
    return labels

  def _label(self, key: int, header: IRHeader) -> np.int32:
    label = header.label if header.flag == 0 else header.label[0]
    if not (0 <= label < self.num_classes and label == int(label)):
      raise RecordIOError(f"{self.rec_path}: record key {key} (byte offset "
                          f"{self.reader.offset(key)}) has label {label}, not a class: an "
                          f"integer in [0, {self.num_classes}).")
    return np.int32(label)

  def identity_ranges(self) -> np.ndarray | None:
    """``int64 [K, 2]``: identity ``k``'s images are keys ``[start, end)``; ``None`` when the
    files hold no identity records.

    As stored: float32, so keys past ``2**24`` may be off by the rounding of the writer.
    """
    if self._identity_keys is None:
      return None
    ranges = [self._unpack(int(key))[0].label[:2] for key in self._identity_keys]
    return np.asarray(ranges, dtype=np.int64).reshape(-1, 2)

  def _stored_key(self, stored: float, is_key: Callable[[int], bool], *, lowest: int = 1) -> int:
    """The key that a header record's float32 label ``stored`` names.

    float32 holds every integer up to ``2**24``; past that (Glint360K's 17.1M images, WebFace42M's
    42.5M) the writer rounded the key to the nearest float32, and the key is the first one, from
    ``lowest`` on, within that rounding of ``stored`` for which ``is_key`` holds.
    """
    if not np.isfinite(stored):
      raise RecordIOError(f"{self.rec_path}: the header record (key 0) has label {stored}, not "
                          "a record key.")
    rounding = int(np.spacing(np.float32(stored))) // 2
    if not rounding:  # Exact.
      return int(stored)
    for key in range(max(lowest, int(stored) - rounding), int(stored) + rounding + 1):
      if is_key(key):
        return key
    raise RecordIOError(
        f"{self.rec_path}: the header record (key 0) names key {int(stored)} (a float32, "
        f"exact to +-{rounding}), but no key near it starts or ends the identity records.")

  def _is_identity_record(self, key: int) -> bool:
    header, data = self._unpack(key)
    return header.flag > 0 and not data

  def _unpack(self, key: int) -> tuple[IRHeader, bytes]:
    try:
      return unpack(self.reader.read(key))
    except ValueError as error:
      if isinstance(error, RecordIOError):
        raise
      raise RecordIOError(f"{self.rec_path}: record key {key} (byte offset "
                          f"{self.reader.offset(key)}): {error}") from error

  def _decode(self, key: int, data: bytes,
              image_shape: tuple[int, int, int] | None) -> np.ndarray:
    try:
      return image_folder.decode_image(data, image_shape=image_shape)
    except ValueError as error:
      raise RecordIOError(f"{self.rec_path}: record key {key} (byte offset "
                          f"{self.reader.offset(key)}): {error}") from error

  def __repr__(self) -> str:
    return (f"RecordIOSource({self.rec_path!r}, {len(self)} images, {self.num_classes} classes, "
            f"image_shape={self.image_shape})")
