"""RecordIO framing, headers, index files and the InsightFace layout."""

import os
import struct
import subprocess
import sys

import cv2
import numpy as np
import pytest

from data_pipeline import recordio
from data_pipeline import sources

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAGIC = struct.pack("<I", 0xCED7230A)


def _with_magic_comment(jpeg: bytes, copies: int = 2) -> bytes:
  """The JPEG with a comment segment holding the RecordIO magic `copies`
  times at offsets that stay 4-byte aligned behind the 24-byte header."""
  # SOI (2) + marker (2) + length (2) + 2 filler bytes = offset 8.
  comment = b"ab" + (MAGIC + b"pad!") * copies
  segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
  return jpeg[:2] + segment + jpeg[2:]


def _chunk_flags(rec_path: str, offset: int) -> list[int]:
  """Continuation flags of the chunks of the record at `offset`, parsed
  straight from the file bytes."""
  data = open(rec_path, "rb").read()
  flags = []
  while True:
    magic, word = struct.unpack_from("<II", data, offset)
    assert magic == 0xCED7230A
    flag, length = word >> 29, word & ((1 << 29) - 1)
    flags.append(flag)
    offset += 8 + length + (-length % 4)
    if flag in (0, 3):
      return flags


@pytest.fixture(scope="module")
def lfw_faces(lfw_dir):
  """(file bytes, label, path) of 5 LFW identities, 3 images each."""
  index = sources.read_manifest(
      str(lfw_dir / "manifest.csv"), str(lfw_dir), ["roles=train"])
  by_label = {}
  for record in index.records:
    by_label.setdefault(record.label, []).append(record.path)
  chosen = [paths[:3] for _, paths in sorted(by_label.items())
            if len(paths) >= 3][:5]
  faces = []
  for label, paths in enumerate(chosen):
    for path in paths:
      with open(path, "rb") as f:
        faces.append((f.read(), label, path))
  return faces


def test_split_payload_only_at_aligned_magic():
  payload = b"abcd" + MAGIC + b"ef" + MAGIC + b"gh"  # Second one unaligned.
  assert recordio.split_payload(payload) == [b"abcd", b"ef" + MAGIC + b"gh"]
  assert recordio.split_payload(MAGIC) == [b"", b""]
  assert recordio.split_payload(b"x" + MAGIC) == [b"x" + MAGIC]


def test_frame_layout_and_round_trip(tmp_path):
  payload = b"12345678" + MAGIC + b"tail!"
  framed = recordio.frame_record(payload)
  # Part 1: 8 bytes, flag 1; part 2: 5 bytes, flag 3, padded to 8.
  assert struct.unpack_from("<II", framed, 0) == (0xCED7230A, (1 << 29) | 8)
  assert struct.unpack_from("<II", framed, 16) == (0xCED7230A, (3 << 29) | 5)
  assert len(framed) == 8 + 8 + 8 + 8
  path = tmp_path / "one.rec"
  path.write_bytes(framed + recordio.frame_record(b"abc"))
  assert [p for _, p in recordio.iter_records(str(path))] == [payload, b"abc"]


def test_pack_unpack_scalar_and_array_labels():
  payload = recordio.pack(7, b"JPEG", record_id=3)
  assert len(payload) == 24 + 4
  assert struct.unpack_from("<IfQQ", payload) == (0, 7.0, 3, 0)
  header, image = recordio.unpack(payload)
  assert (header.flag, header.class_label, image) == (0, 7, b"JPEG")

  payload = recordio.pack([5.0, 9.0, 1.5], b"IMG")
  header, image = recordio.unpack(payload)
  assert header.flag == 3 and image == b"IMG"
  np.testing.assert_array_equal(header.label, [5.0, 9.0, 1.5])
  assert header.class_label == 5
  with pytest.raises(recordio.RecordIOError, match="3 labels"):
    recordio.unpack(payload[:30])
  with pytest.raises(recordio.RecordIOError, match="shorter than"):
    recordio.unpack(b"")


def test_lfw_rec_reads_back_byte_exact(lfw_faces, tmp_path):
  faces = [(image, label) for image, label, _ in lfw_faces]
  # A face whose bytes hold the magic at aligned offsets: a 3-part record.
  special = _with_magic_comment(faces[4][0])
  assert cv2.imdecode(np.frombuffer(special, np.uint8), 1) is not None
  faces[4] = (special, faces[4][1])
  rec_path = str(tmp_path / "train.rec")
  assert recordio.write_face_rec(rec_path, faces) == 15

  layout = recordio.read_face_layout(rec_path)
  assert layout.has_header and layout.num_identities == 5
  assert layout.image_keys.tolist() == list(range(1, 16))
  source = recordio.FaceRecordSource(layout)
  for i, (image, label) in enumerate(faces):
    record = source[i]
    assert record["image"] == image and record["label"] == label
    assert record["origin"] == f"{rec_path}#{i + 1}"
  assert _chunk_flags(rec_path, int(layout.image_offsets[4])) == [1, 2, 3]
  assert _chunk_flags(rec_path, int(layout.image_offsets[0])) == [0]
  assert (tmp_path / "property").read_text() == "5,112,112"


def test_insightface_header_and_identity_records(lfw_faces, tmp_path):
  rec_path = str(tmp_path / "train.rec")
  recordio.write_face_rec(rec_path, [(i, l) for i, l, _ in lfw_faces])
  keys, offsets = recordio.read_idx(recordio.idx_path_for(rec_path))
  by_key = dict(zip(keys.tolist(), offsets.tolist()))
  fd = os.open(rec_path, os.O_RDONLY)
  try:
    def read(key):
      return recordio.unpack(recordio.read_record_at(fd, by_key[key])[0])
    header, image = read(0)
    assert header.flag == 2 and image == b"" and header.id2 == 1
    np.testing.assert_array_equal(header.label, [16, 21])
    for label in range(5):  # Identity records: image key range per class.
      identity, image = read(16 + label)
      assert image == b""
      np.testing.assert_array_equal(
          identity.label, [1 + 3 * label, 4 + 3 * label])
  finally:
    os.close(fd)


def test_im2rec_layout_without_header(tmp_path):
  rec_path = str(tmp_path / "data.rec")
  faces = [(b"img%d" % i, i % 3) for i in range(6)]
  recordio.write_face_rec(rec_path, faces, layout="im2rec")
  layout = recordio.read_face_layout(rec_path)
  assert not layout.has_header and layout.num_identities is None
  assert layout.image_keys.tolist() == list(range(6))
  source = recordio.FaceRecordSource(layout)
  assert [source[i]["image"] for i in range(6)] == [f for f, _ in faces]
  assert recordio.count_identities(source) == 3


def test_key_ranges_past_float32_precision(tmp_path):
  # Keys above 2**24: float32(16777221) == 16777220, so the header points
  # at an image key; the reader must find the real first identity record.
  first_image, num_images = 2**24, 5
  boundary = first_image + num_images  # 16777221.
  assert float(np.float32(boundary)) == boundary - 1
  rec_path = str(tmp_path / "big.rec")
  with recordio.RecordWriter(rec_path) as writer:
    writer.write(0, recordio.pack([boundary, boundary + 2], b"", 0, 1))
    for key in range(first_image, boundary):
      writer.write(key, recordio.pack(key % 2, b"face%d" % key))
    for label in range(2):
      writer.write(boundary + label,
                   recordio.pack([first_image, boundary], b""))
  layout = recordio.read_face_layout(rec_path)
  assert layout.image_keys.tolist() == list(range(first_image, boundary))
  assert layout.num_identities == 2


def test_idx_scan_and_errors(tmp_path):
  rec_path = str(tmp_path / "scan.rec")
  with recordio.RecordWriter(rec_path, str(tmp_path / "ignored.idx")) as w:
    for key in range(3):
      w.write(key, recordio.pack(key, b"x" * (key + 1)))
  idx_path = recordio.write_idx_from_scan(rec_path)
  keys, offsets = recordio.read_idx(idx_path)
  assert keys.tolist() == [0, 1, 2]
  # Chunk header 8 + header 24 + image 1, padded to 36; then 36 + 36.
  assert offsets.tolist() == [0, 36, 72]

  (tmp_path / "bad.idx").write_text("0\t0\n1\tnope\n")
  with pytest.raises(recordio.RecordIOError, match=r"bad.idx:2"):
    recordio.read_idx(str(tmp_path / "bad.idx"))
  with pytest.raises(recordio.RecordIOError, match="does not exist"):
    recordio.read_idx(str(tmp_path / "missing.idx"))

  data = bytearray(open(rec_path, "rb").read())
  data[36:40] = b"\0\0\0\0"  # Breaks the second record's magic.
  (tmp_path / "broken.rec").write_bytes(bytes(data[:90]))  # Cuts the third.
  fd = os.open(str(tmp_path / "broken.rec"), os.O_RDONLY)
  try:
    with pytest.raises(recordio.RecordIOError, match="no RecordIO magic at "
                       "byte 36"):
      recordio.read_record_at(fd, 36, "broken.rec")
    with pytest.raises(recordio.RecordIOError, match="file ends first"):
      recordio.read_record_at(fd, 72, "broken.rec")
  finally:
    os.close(fd)


def test_source_marks_unreadable_records(tmp_path):
  rec_path = str(tmp_path / "train.rec")
  with recordio.RecordWriter(rec_path) as writer:
    writer.write(0, recordio.pack(0, b"fine"))
    writer.write(1, b"")  # A zero-length record: not even a header.
  source = recordio.FaceRecordSource(recordio.read_face_layout(rec_path))
  assert source[0]["image"] == b"fine"
  broken = source[1]
  assert broken["image"] == b"" and broken["label"] == -1
  assert "shorter than the 24-byte header" in broken["error"]


def test_pack_and_info_command_line(tmp_path):
  folder = tmp_path / "faces"
  for name in ("bob", "amy"):
    (folder / name).mkdir(parents=True)
    ok, jpeg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    assert ok
    (folder / name / "1.jpg").write_bytes(jpeg.tobytes())
  rec_path = str(tmp_path / "out" / "train.rec")
  os.makedirs(os.path.dirname(rec_path))
  for args in (["pack", str(folder), rec_path], ["info", rec_path]):
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline.recordio", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
  assert "2 images, 2 identities, InsightFace header" in result.stdout
  source = recordio.FaceRecordSource(recordio.read_face_layout(rec_path))
  assert [source[i]["label"] for i in range(2)] == [0, 1]  # amy, bob.
