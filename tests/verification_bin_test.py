"""Verification `.bin` files: reading, writing, Python 2 pickles, decoding."""

import os
import pickle
import struct

import cv2
import numpy as np
import pytest

from data_pipeline import verification_bin


def _python2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
  """(images, issame) as Python 2's pickle (protocol 2) writes it: images
  as byte *strings* (BINSTRING), which Python 3 reads as text by default."""
  out = [b"\x80\x02", b"]", b"("]  # PROTO 2, EMPTY_LIST, MARK.
  for image in images:
    out.append(b"T" + struct.pack("<i", len(image)) + image)
  out += [b"e", b"]", b"("]  # APPENDS, then the flags list.
  out += [b"\x88" if flag else b"\x89" for flag in issame]
  out += [b"e", b"\x86", b"."]  # APPENDS, TUPLE2, STOP.
  return b"".join(out)


@pytest.fixture(scope="module")
def lfw_pairs(lfw_dir):
  """Encoded images and flags of 2 matched and 2 mismatched LFW pairs."""
  lines = (lfw_dir / "pairs_view2_folds01-02.txt").read_text().splitlines()
  matched = [line.split() for line in lines[1:] if len(line.split()) == 3]
  mismatched = [line.split() for line in lines[1:] if len(line.split()) == 4]

  def read(name, number):
    path = lfw_dir / "images" / name / f"{name}_{int(number):04d}.jpg"
    return path.read_bytes()

  images, issame = [], []
  for name, a, b in matched[:2]:
    images += [read(name, a), read(name, b)]
    issame.append(True)
  for name1, a, name2, b in mismatched[:2]:
    images += [read(name1, a), read(name2, b)]
    issame.append(False)
  return images, issame


def test_write_read_round_trip_real_images(lfw_pairs, tmp_path):
  images, issame = lfw_pairs
  path = str(tmp_path / "lfw.bin")
  verification_bin.write_bin(path, images, issame)
  read_images, read_issame = verification_bin.read_bin(path)
  assert read_images == images
  assert read_issame.dtype == bool
  assert read_issame.tolist() == [True, True, False, False]

  faces = verification_bin.decode_images(read_images, 112)
  assert faces.shape == (8, 112, 112, 3) and faces.dtype == np.uint8
  # LFW files are 150x150: resized (bicubic) and centre-cropped, BGR.
  expected = cv2.resize(cv2.imdecode(np.frombuffer(images[0], np.uint8), 1),
                        (112, 112), interpolation=cv2.INTER_CUBIC)
  np.testing.assert_array_equal(faces[0], expected)


def test_python2_pickle_and_uint8_arrays(lfw_pairs, tmp_path):
  images, issame = lfw_pairs
  path = tmp_path / "py2.bin"
  path.write_bytes(_python2_pickle(images, issame))
  with pytest.raises(UnicodeDecodeError):
    pickle.loads(path.read_bytes())  # What a plain Python 3 load does.
  read_images, read_issame = verification_bin.read_bin(str(path))
  assert read_images == images
  assert read_issame.tolist() == issame

  # Newer files: cv2.imencode arrays ([n, 1] uint8) and numpy bools.
  arrays = [np.frombuffer(image, np.uint8).reshape(-1, 1) for image in images]
  with open(tmp_path / "arrays.bin", "wb") as f:
    pickle.dump((arrays, np.array(issame)), f)
  read_images, read_issame = verification_bin.read_bin(
      str(tmp_path / "arrays.bin"))
  assert read_images == images
  assert read_issame.tolist() == issame


def test_decoded_images_are_bgr(tmp_path):
  rgb = np.zeros((112, 112, 3), np.uint8)
  rgb[..., 2] = 200  # A distinct blue plane.
  rgb[..., 0] = 10
  ok, png = cv2.imencode(".png", rgb[:, :, ::-1])  # cv2 writes from BGR.
  assert ok
  path = str(tmp_path / "blue.bin")
  verification_bin.write_bin(path, [png.tobytes()] * 2, [True])
  faces = verification_bin.decode_images(verification_bin.read_bin(path)[0])
  assert faces[0, 0, 0].tolist() == [200, 0, 10]


def test_bad_files_are_named(tmp_path):
  with pytest.raises(verification_bin.BinFormatError, match="does not exist"):
    verification_bin.read_bin(str(tmp_path / "missing.bin"))

  path = tmp_path / "counts.bin"
  path.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True])))
  with pytest.raises(verification_bin.BinFormatError,
                     match=r"counts.bin: 3 images for 1 pairs"):
    verification_bin.read_bin(str(path))

  path = tmp_path / "evil.bin"
  path.write_bytes(pickle.dumps((os.system, [True])))
  with pytest.raises(verification_bin.BinFormatError,
                     match=r"evil.bin.*refusing to load posix.system"):
    verification_bin.read_bin(str(path))

  with pytest.raises(verification_bin.BinFormatError, match="image 1:"):
    verification_bin.decode_images([cv2.imencode(".png", np.zeros(
        (4, 4, 3), np.uint8))[1].tobytes(), b"\xff\xd8broken"], 4)
  with pytest.raises(ValueError, match="3 images for 1 pairs"):
    verification_bin.write_bin(str(tmp_path / "w.bin"), [b"a"] * 3, [True])
