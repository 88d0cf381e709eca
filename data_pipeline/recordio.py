"""MXNet RecordIO files (`.rec` + `.idx`) read and written without MXNet.

A `.rec` file is a sequence of chunks: a little-endian uint32 magic, a
uint32 whose top 3 bits are a continuation flag and low 29 bits a length,
the payload, and zero padding to 4 bytes. Writers split a record wherever
the magic appears at a 4-byte-aligned offset of its payload, dropping those
4 bytes; readers join the parts and put the magic back. The `.idx` file is
text, `<key>\\t<byte offset>` per line.

A face record's payload is a 24-byte header (uint32 flag, float32 label,
uint64 id, uint64 id2), then `flag` float32 labels when flag > 0, then the
encoded image. InsightFace data sets (MS1MV2, MS1MV3, Glint360K, WebFace)
add a header record 0 whose label is the key range [N + 1, N + K + 1) of K
identity records (one per class, holding its image key range); images are
keys 1..N. Files made by `im2rec` have no header record: every key is an
image.

    python -m data_pipeline.recordio pack FOLDER OUT.rec   # image folder
    python -m data_pipeline.recordio info IN.rec
"""

import argparse
import dataclasses
import os
import struct
import sys
from typing import Iterable, Iterator, Sequence
import warnings

import numpy as np

from data_pipeline import sources

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_BITS = 29
MAX_CHUNK_LENGTH = (1 << LENGTH_BITS) - 1
# Continuation flags of a chunk.
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3

HEADER = struct.Struct("<IfQQ")
IDENTITY_RECORD_FLAG = 2
# float32 holds integers exactly up to 2**24; past it the key ranges of the
# header and identity records are rounded by at most a few units.
FLOAT32_EXACT_LIMIT = 1 << 24
_BOUNDARY_SEARCH = 64


class RecordIOError(ValueError):
  """A `.rec`, `.idx` or `property` file is malformed."""


def _padding(length: int) -> int:
  return -length % 4


# Framing.


def split_payload(payload: bytes) -> list[bytes]:
  """Splits a payload at every 4-byte-aligned magic, dropping the magic.

  Returns:
    One part for a payload without an aligned magic, else k + 1 parts for k
    occurrences (parts may be empty).
  """
  parts, start, position = [], 0, payload.find(MAGIC_BYTES)
  while position >= 0:
    if position % 4 == 0:
      parts.append(payload[start:position])
      start = position + 4
      position = payload.find(MAGIC_BYTES, start)
    else:
      position = payload.find(MAGIC_BYTES, position + 1)
  parts.append(payload[start:])
  return parts


def frame_record(payload: bytes) -> bytes:
  """The chunks that store one record, padding included."""
  parts = split_payload(payload)
  if len(parts) == 1:
    flags = [WHOLE]
  else:
    flags = [FIRST] + [MIDDLE] * (len(parts) - 2) + [LAST]
  chunks = []
  for flag, part in zip(flags, parts):
    if len(part) > MAX_CHUNK_LENGTH:
      raise RecordIOError(
          f"a record part of {len(part)} bytes exceeds the RecordIO limit "
          f"of {MAX_CHUNK_LENGTH} bytes")
    chunks.append(struct.pack("<II", MAGIC, (flag << LENGTH_BITS) | len(part)))
    chunks.append(part)
    chunks.append(b"\0" * _padding(len(part)))
  return b"".join(chunks)


def read_record_at(fd: int, offset: int, path: str = "") -> tuple[bytes, int]:
  """Reads the record whose first chunk starts at byte `offset`.

  Uses positional reads, so threads may share the descriptor.

  Args:
    fd: an open file descriptor of the `.rec` file.
    offset: byte offset of the record's first chunk.
    path: the file's name, for error messages.

  Returns:
    (payload with its parts joined, offset just past the record).

  Raises:
    RecordIOError: a wrong magic, a cut-short chunk or a continuation flag
      out of sequence, naming the file and byte offset.
  """
  parts, position = [], offset
  while True:
    head = os.pread(fd, 8, position)
    if len(head) < 8:
      raise RecordIOError(
          f"{path}: the record at byte {offset} is cut short at byte "
          f"{position} (end of file)")
    magic, word = struct.unpack("<II", head)
    if magic != MAGIC:
      raise RecordIOError(
          f"{path}: no RecordIO magic at byte {position} (found "
          f"{magic:#010x}); the file or its .idx offsets are corrupt")
    flag, length = word >> LENGTH_BITS, word & MAX_CHUNK_LENGTH
    expected = (WHOLE, FIRST) if not parts else (MIDDLE, LAST)
    if flag not in expected:
      raise RecordIOError(
          f"{path}: chunk at byte {position} has continuation flag {flag}, "
          f"expected one of {expected}")
    data = os.pread(fd, length, position + 8)
    if len(data) < length:
      raise RecordIOError(
          f"{path}: the chunk at byte {position} declares {length} bytes but "
          "the file ends first")
    parts.append(data)
    position += 8 + length + _padding(length)
    if flag in (WHOLE, LAST):
      return MAGIC_BYTES.join(parts), position


def iter_records(path: str) -> Iterator[tuple[int, bytes]]:
  """Yields (offset, payload) of every record of a `.rec` file in order."""
  fd = _open(path)
  try:
    size = os.fstat(fd).st_size
    offset = 0
    while offset < size:
      payload, end = read_record_at(fd, offset, path)
      yield offset, payload
      offset = end
  finally:
    os.close(fd)


def _open(path: str) -> int:
  try:
    return os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    raise RecordIOError(f"RecordIO file {path!r} does not exist") from None


# Index files.


def idx_path_for(rec_path: str) -> str:
  """`train.rec` -> `train.idx`."""
  return os.path.splitext(rec_path)[0] + ".idx"


def read_idx(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads an `.idx` file.

  Returns:
    (keys, offsets), both int64 [num_records], in file order.

  Raises:
    RecordIOError: a missing file or a malformed line, naming it.
  """
  if not os.path.isfile(path):
    raise RecordIOError(
        f"index file {path!r} does not exist; write one with "
        "recordio.write_idx_from_scan(rec_path)")
  with open(path) as f:
    text = f.read()
  lines = text.count("\n") + (not text.endswith("\n"))
  try:
    # One C-level parse: index files of large sets have tens of millions
    # of lines.
    with warnings.catch_warnings():
      warnings.simplefilter("error", DeprecationWarning)
      values = np.fromstring(text, np.int64, sep=" ")
  except ValueError:
    values = None
  if values is not None and values.size == 2 * lines:
    return values[0::2].copy(), values[1::2].copy()
  return _read_idx_lines(path, text)


def _read_idx_lines(path: str, text: str) -> tuple[np.ndarray, np.ndarray]:
  """The slow parse, which names the first bad line."""
  keys, offsets = [], []
  for line_number, line in enumerate(text.split("\n"), start=1):
    if not line.strip():
      continue
    try:
      key, offset = (int(v) for v in line.split())
    except ValueError:
      raise RecordIOError(
          f"{path}:{line_number}: expected '<key>\\t<offset>', got "
          f"{line.strip()!r}") from None
    keys.append(key)
    offsets.append(offset)
  return np.array(keys, np.int64), np.array(offsets, np.int64)


def write_idx_from_scan(rec_path: str, idx_path: str | None = None) -> str:
  """Writes an `.idx` for a `.rec` without one, keying records 0, 1, ...

  Returns:
    The path written.
  """
  idx_path = idx_path or idx_path_for(rec_path)
  with open(idx_path, "w") as f:
    for key, (offset, _) in enumerate(iter_records(rec_path)):
      f.write(f"{key}\t{offset}\n")
  return idx_path


# Payload header.


@dataclasses.dataclass(frozen=True)
class RecordHeader:
  """The header in front of a record's image bytes.

  Attributes:
    flag: 0 for a scalar label, else the number of float32 labels.
    label: the scalar label (flag 0) or a float32 [flag] array.
    id, id2: uint64 fields; InsightFace sets id2 = 1 in its header record.
  """

  flag: int
  label: float | np.ndarray
  id: int = 0
  id2: int = 0

  @property
  def class_label(self) -> int:
    """The identity label: the scalar, or the first of an array label."""
    if self.flag == 0:
      return int(self.label)
    return int(self.label[0])


def pack(label: float | Sequence[float] | np.ndarray, image: bytes,
         record_id: int = 0, record_id2: int = 0) -> bytes:
  """Builds a record payload: header, optional label array, image bytes.

  A scalar label goes in the header (flag 0); an array of k labels follows
  the header as float32 with flag k.
  """
  if np.ndim(label) == 0:
    header = HEADER.pack(0, float(label), record_id, record_id2)
    return header + bytes(image)
  labels = np.asarray(label, "<f4").reshape(-1)
  header = HEADER.pack(labels.size, 0.0, record_id, record_id2)
  return header + labels.tobytes() + bytes(image)


def unpack(payload: bytes) -> tuple[RecordHeader, bytes]:
  """Splits a record payload into its header and the image bytes.

  Raises:
    RecordIOError: the payload is shorter than its header says.
  """
  if len(payload) < HEADER.size:
    raise RecordIOError(
        f"record of {len(payload)} bytes is shorter than the "
        f"{HEADER.size}-byte header")
  flag, label, id_, id2 = HEADER.unpack_from(payload)
  start = HEADER.size
  if flag > 0:
    end = start + 4 * flag
    if len(payload) < end:
      raise RecordIOError(
          f"record header announces {flag} labels but the record has "
          f"{len(payload)} bytes")
    label = np.frombuffer(payload, "<f4", flag, start).astype(np.float32)
    start = end
  return RecordHeader(flag, label, id_, id2), payload[start:]


# Writing.


class RecordWriter:
  """Writes a `.rec` file and its `.idx` side by side.

  Use as a context manager; `write` returns the record's byte offset.
  """

  def __init__(self, rec_path: str, idx_path: str | None = None):
    self.rec_path = rec_path
    self.idx_path = idx_path or idx_path_for(rec_path)
    self._rec = open(rec_path, "wb")
    self._idx = open(self.idx_path, "w")
    self._keys = set()

  def write(self, key: int, payload: bytes) -> int:
    if key in self._keys:
      raise RecordIOError(f"{self.rec_path}: key {key} written twice")
    self._keys.add(key)
    offset = self._rec.tell()
    self._rec.write(frame_record(payload))
    self._idx.write(f"{key}\t{offset}\n")
    return offset

  def close(self) -> None:
    self._rec.close()
    self._idx.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def write_face_rec(rec_path: str, faces: Iterable[tuple[bytes, int]], *,
                   layout: str = "insightface",
                   image_shape: tuple[int, int] = (112, 112)) -> int:
  """Writes encoded faces and their labels as a face data set `.rec`.

  Args:
    rec_path: the `.rec` to write; the `.idx` and (for the InsightFace
      layout) a `property` file go beside it.
    faces: (encoded image bytes, label) pairs. The InsightFace layout needs
      them grouped by label in increasing order, labels 0..K-1.
    layout: "insightface" (header record 0, images at keys 1..N, identity
      records after them) or "im2rec" (images at keys 0..N-1, no header).
    image_shape: (height, width) written to `property`.

  Returns:
    The number of images written.
  """
  if layout not in ("insightface", "im2rec"):
    raise ValueError(f"unknown layout {layout!r}; choose insightface or im2rec")
  first_key = 1 if layout == "insightface" else 0
  ranges = []  # [label, first key, end key) per identity.
  with RecordWriter(rec_path) as writer:
    key = first_key
    for image, label in faces:
      label = int(label)
      if layout == "insightface":
        ranges = _extend_ranges(ranges, label, key, rec_path)
      writer.write(key, pack(label, image))
      key += 1
    count = key - first_key
    if layout == "insightface":
      _write_identity_records(writer, ranges, key)
  if layout == "insightface":
    directory = os.path.dirname(os.path.abspath(rec_path))
    with open(os.path.join(directory, "property"), "w") as f:
      f.write(f"{len(ranges)},{image_shape[0]},{image_shape[1]}")
  return count


def _extend_ranges(ranges, label, key, rec_path):
  if ranges and ranges[-1][0] == label:
    ranges[-1][2] = key + 1
  elif label == len(ranges):
    ranges.append([label, key, key + 1])
  else:
    raise RecordIOError(
        f"{rec_path}: the InsightFace layout needs labels 0, 1, ... in "
        f"order, grouped; got label {label} after {len(ranges)} identities")
  return ranges


def _write_identity_records(writer, ranges, first_identity_key):
  # The header (record 0) is written last but keyed 0; readers seek by key.
  for i, (_, start, end) in enumerate(ranges):
    writer.write(first_identity_key + i, pack([start, end], b""))
  end_key = first_identity_key + len(ranges)
  writer.write(0, pack([first_identity_key, end_key], b"", record_id2=1))


def pack_image_folder(root: str, rec_path: str,
                      layout: str = "insightface") -> int:
  """Packs a `<root>/<identity>/<image>` tree into a `.rec` (bytes as is).

  Identities are labelled in sorted order like `sources.scan_image_folder`.

  Returns:
    The number of images written.
  """
  index = sources.scan_image_folder(root)

  def faces():
    for record in index.records:
      with open(record.path, "rb") as f:
        yield f.read(), record.label

  return write_face_rec(rec_path, faces(), layout=layout)


# Reading face data sets.


@dataclasses.dataclass(frozen=True)
class FaceRecLayout:
  """Where the images of a face `.rec` are.

  Attributes:
    rec_path: the `.rec` file.
    image_keys: int64 [N] keys of the image records.
    image_offsets: int64 [N] their byte offsets.
    num_identities: the class count (from `property` or the identity
      records), or None when the file says nothing about it.
    has_header: whether record 0 is an InsightFace header record.
  """

  rec_path: str
  image_keys: np.ndarray
  image_offsets: np.ndarray
  num_identities: int | None
  has_header: bool

  def __len__(self) -> int:
    return len(self.image_keys)


def read_property(directory: str) -> int | None:
  """The class count in `<directory>/property`, or None without the file."""
  path = os.path.join(directory, "property")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    text = f.read().strip()
  try:
    return int(text.split(",")[0])
  except ValueError:
    raise RecordIOError(
        f"{path}: expected '<num_classes>,<height>,<width>', got "
        f"{text!r}") from None


def read_face_layout(rec_path: str,
                     idx_path: str | None = None) -> FaceRecLayout:
  """Finds the image records of a face `.rec` through its `.idx`.

  With an InsightFace header, images are the keys below the first identity
  record. Past 2**24 images the header's float32 key range is rounded, so
  the exact boundary is found by reading the records around it.

  Raises:
    RecordIOError: missing or malformed files, or a header whose key range
      does not match the records.
  """
  keys, offsets = read_idx(idx_path or idx_path_for(rec_path))
  if not len(keys):
    raise RecordIOError(f"{rec_path}: the index lists no records")
  offset_by_key = dict(zip(keys.tolist(), offsets.tolist()))
  num_identities = read_property(os.path.dirname(os.path.abspath(rec_path)))

  fd = _open(rec_path)
  try:
    header = None
    if 0 in offset_by_key:
      try:
        header, image = unpack(
            read_record_at(fd, offset_by_key[0], rec_path)[0])
      except RecordIOError:
        image = b""  # A broken first image of an im2rec file.
      if header is not None and (header.flag == 0 or image):
        header = None  # An im2rec file: record 0 is an image.
    if header is None:
      return FaceRecLayout(rec_path, keys, offsets, num_identities, False)
    boundary = _identity_boundary(fd, rec_path, header, offset_by_key)
  finally:
    os.close(fd)

  is_image = (keys >= 1) & (keys < boundary)
  if num_identities is None:
    num_identities = int(np.count_nonzero(keys >= boundary))
  return FaceRecLayout(rec_path, keys[is_image], offsets[is_image],
                       num_identities, True)


def _identity_boundary(fd, rec_path, header, offset_by_key) -> int:
  """The first identity record's key (= number of images + 1)."""
  approximate = int(round(float(header.label[0])))

  def is_identity(key):
    if key not in offset_by_key:
      return None
    record_header, image = unpack(
        read_record_at(fd, offset_by_key[key], rec_path)[0])
    return record_header.flag == IDENTITY_RECORD_FLAG and not image

  if approximate < FLOAT32_EXACT_LIMIT:
    candidates = [approximate]
  else:  # Nearest first.
    candidates = sorted(
        range(approximate - _BOUNDARY_SEARCH, approximate + _BOUNDARY_SEARCH),
        key=lambda k: abs(k - approximate))
  for key in candidates:
    if key >= 1 and is_identity(key) and (
        key == 1 or is_identity(key - 1) is False):
      return key
  if approximate < FLOAT32_EXACT_LIMIT and all(
      k < approximate for k in offset_by_key):
    return approximate  # A header without identity records.
  raise RecordIOError(
      f"{rec_path}: the header record says identity records start at key "
      f"{approximate}, but no identity record follows the images there")


class FaceRecordSource:
  """Random access to the faces of a `.rec`: a grain data source.

  `source[i]` is {"image": encoded bytes, "label": int, "origin": str}. A
  record that cannot be parsed comes back with an "error" message, an empty
  image and label -1, so the pipeline can skip and count it instead of
  stopping. Files are opened lazily in each process and read with
  positional reads, so threads and worker processes can share the source.
  """

  def __init__(self, layout: FaceRecLayout):
    self._layout = layout
    self._fd = None
    self._pid = None

  def __len__(self) -> int:
    return len(self._layout)

  def __getitem__(self, index: int) -> dict:
    key = int(self._layout.image_keys[index])
    origin = f"{self._layout.rec_path}#{key}"
    try:
      payload, _ = read_record_at(
          self._descriptor(), int(self._layout.image_offsets[index]),
          self._layout.rec_path)
      header, image = unpack(payload)
      return {"image": image, "label": header.class_label, "origin": origin}
    except RecordIOError as e:
      return {"image": b"", "label": -1, "origin": origin, "error": str(e)}

  def _descriptor(self) -> int:
    if self._fd is None or self._pid != os.getpid():
      self._fd = _open(self._layout.rec_path)
      self._pid = os.getpid()
    return self._fd

  def __getstate__(self):
    return {"layout": self._layout}

  def __setstate__(self, state):
    self.__init__(state["layout"])

  def __repr__(self) -> str:
    return (f"FaceRecordSource({self._layout.rec_path!r}, "
            f"{len(self)} images)")


def count_identities(source: FaceRecordSource) -> int:
  """Largest label + 1, reading every record (for files without metadata)."""
  labels = [source[i]["label"] for i in range(len(source))]
  return max(labels) + 1 if labels else 0


# Command line.


def _main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m data_pipeline.recordio",
      description="Pack an image folder into a face .rec, or describe one.")
  commands = parser.add_subparsers(dest="command", required=True)
  pack_parser = commands.add_parser(
      "pack", help="<folder>/<identity>/<image> -> .rec/.idx/property")
  pack_parser.add_argument("folder")
  pack_parser.add_argument("rec")
  pack_parser.add_argument("--layout", default="insightface",
                           choices=("insightface", "im2rec"))
  info_parser = commands.add_parser("info", help="describe a face .rec")
  info_parser.add_argument("rec")
  args = parser.parse_args(argv)

  try:
    if args.command == "pack":
      count = pack_image_folder(args.folder, args.rec, args.layout)
      print(f"Wrote {count} images to {args.rec} ({args.layout} layout)")
    else:
      layout = read_face_layout(args.rec)
      identities = layout.num_identities
      print(f"{args.rec}: {len(layout)} images, "
            f"{'unknown' if identities is None else identities} identities, "
            f"{'InsightFace header' if layout.has_header else 'no header'}")
  except (RecordIOError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
