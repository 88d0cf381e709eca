"""Verification `.bin` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

A `.bin` is a pickle of `(bins, issame)`: 2P encoded images, pair i being
`bins[2i]` and `bins[2i + 1]`, and P same-identity flags. The released files
were pickled by Python 2, whose byte strings Python 3 only reads with
`encoding="bytes"`; newer files hold `cv2.imencode` uint8 arrays instead of
bytes. Both are accepted.

Loading uses an unpickler that only rebuilds numpy arrays and scalars, so a
`.bin` from elsewhere cannot run code.
"""

import importlib
import io
import pickle
from typing import Sequence

import cv2
import numpy as np

_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_ALLOWED = {
    **{(m, "_reconstruct"): "_reconstruct" for m in _NUMPY_CORE},
    **{(m, "scalar"): "scalar" for m in _NUMPY_CORE},
    ("numpy", "ndarray"): None,
    ("numpy", "dtype"): None,
    ("_codecs", "encode"): None,
}


class BinFormatError(ValueError):
  """A `.bin` file does not hold (encoded images, same flags)."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
  """Rebuilds builtin containers and numpy arrays, and nothing else."""

  def find_class(self, module, name):
    if (module, name) not in _ALLOWED:
      raise pickle.UnpicklingError(
          f"refusing to load {module}.{name}: a verification .bin holds "
          "only encoded images and flags")
    if module in _NUMPY_CORE:
      # numpy 2 renamed numpy.core; files written by numpy 1 still name it.
      try:
        module = importlib.import_module("numpy._core.multiarray")
      except ImportError:
        module = importlib.import_module("numpy.core.multiarray")
      return getattr(module, name)
    return getattr(importlib.import_module(module), name)


def _load(data: bytes, encoding: str):
  return _ArraysOnlyUnpickler(io.BytesIO(data), encoding=encoding).load()


def read_bin(path: str) -> tuple[list[bytes], np.ndarray]:
  """Reads a verification `.bin`.

  Returns:
    (2P encoded images as bytes, issame: bool [P]).

  Raises:
    BinFormatError: the file is missing, not a pickle of the expected
      structure, or its counts disagree; the message names the file.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise BinFormatError(f"verification file {path!r} does not exist") from None
  try:
    try:
      content = _load(data, "ASCII")
    except UnicodeDecodeError:
      # Python 2 byte strings (the released files).
      content = _load(data, "bytes")
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
    raise BinFormatError(
        f"{path}: not a verification .bin pickle ({e})") from None

  if not isinstance(content, (tuple, list)) or len(content) != 2:
    raise BinFormatError(
        f"{path}: expected a pickled (images, issame) pair, got "
        f"{type(content).__name__}")
  bins, issame = content
  images = [_as_bytes(item, path, i) for i, item in enumerate(bins)]
  issame = np.asarray(issame, dtype=bool).reshape(-1)
  if len(images) != 2 * len(issame):
    raise BinFormatError(
        f"{path}: {len(images)} images for {len(issame)} pairs; expected "
        f"{2 * len(issame)}")
  return images, issame


def _as_bytes(item, path: str, position: int) -> bytes:
  if isinstance(item, (bytes, bytearray)):
    return bytes(item)
  if isinstance(item, np.ndarray) and item.dtype == np.uint8:
    return item.tobytes()
  if isinstance(item, str):  # A Python 2 string read as text.
    return item.encode("latin-1")
  raise BinFormatError(
      f"{path}: image {position} is a {type(item).__name__}, not encoded "
      "bytes or a uint8 array")


def write_bin(path: str, images: Sequence[bytes | np.ndarray],
              issame: Sequence[bool],
              protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
  """Writes `(images, issame)` as a verification `.bin`.

  Args:
    path: the file to write.
    images: 2P encoded images (bytes, or uint8 arrays as `cv2.imencode`
      returns them, stored as given).
    issame: P flags, True where pair i shows one identity.
    protocol: the pickle protocol.
  """
  images = list(images)
  issame = [bool(flag) for flag in issame]
  if len(images) != 2 * len(issame):
    raise ValueError(
        f"{len(images)} images for {len(issame)} pairs; expected "
        f"{2 * len(issame)}")
  with open(path, "wb") as f:
    pickle.dump((images, issame), f, protocol=protocol)


def decode_image(encoded: bytes, image_size: int = 112) -> np.ndarray:
  """Decodes one image to [image_size, image_size, 3] uint8 BGR.

  Images that are not image_size square get their short side resized to
  image_size (bicubic) and are centre-cropped.

  Raises:
    BinFormatError: the bytes do not decode.
  """
  buffer = np.frombuffer(encoded, np.uint8)
  image = cv2.imdecode(buffer, cv2.IMREAD_COLOR) if buffer.size else None
  if image is None:
    raise BinFormatError(f"{len(encoded)} bytes do not decode as an image")
  height, width = image.shape[:2]
  if (height, width) == (image_size, image_size):
    return image
  scale = image_size / min(height, width)
  size = (max(image_size, round(width * scale)),
          max(image_size, round(height * scale)))
  image = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
  top = (image.shape[0] - image_size) // 2
  left = (image.shape[1] - image_size) // 2
  return image[top:top + image_size, left:left + image_size]


def decode_images(images: Sequence[bytes], image_size: int = 112) -> np.ndarray:
  """Decodes a `.bin`'s images: uint8 BGR [len(images), s, s, 3].

  BGR is the order AdaFace models take.
  """
  out = np.empty((len(images), image_size, image_size, 3), np.uint8)
  for i, encoded in enumerate(images):
    try:
      out[i] = decode_image(encoded, image_size)
    except BinFormatError as e:
      raise BinFormatError(f"image {i}: {e}") from None
  return out
