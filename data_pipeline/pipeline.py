"""Grain input pipelines: decoding, alignment, BGR order, flips, batching.

Workers produce uint8 BGR crops; the model normalises them to [-1, 1] on the
device, which moves a quarter of the bytes a float32 batch would.
"""

import dataclasses
import os
from typing import Iterator, Sequence

import cv2
import grain
import numpy as np
from PIL import Image

from data_pipeline import alignment as alignment_lib
from data_pipeline import sources

ALIGNMENTS = ("landmarks", "none", "resize")


class ImageError(ValueError):
  """An image file cannot be read or decoded."""


def load_rgb(path: str) -> np.ndarray:
  """Decodes an image file into [height, width, 3] uint8 RGB.

  Grayscale images are repeated over three channels. Truncated or corrupt
  files raise rather than decode partially.

  Raises:
    ImageError: naming the file.
  """
  try:
    with Image.open(path) as image:
      image.load()
      return np.asarray(image.convert("RGB"))
  except FileNotFoundError:
    raise ImageError(f"image {path!r} does not exist") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError(f"cannot decode image {path!r}: {e}") from None


def prepare_face(path: str, landmarks: np.ndarray | None, image_size: int,
                 alignment: str) -> np.ndarray:
  """Loads one face as an [image_size, image_size, 3] uint8 BGR crop.

  Args:
    path: image file.
    landmarks: (10,) five-point landmarks, needed when alignment is
      "landmarks".
    image_size: side of the crop in pixels.
    alignment: "landmarks" (similarity warp onto the template), "none" (the
      file must already be image_size square) or "resize" (plain resize).
  """
  rgb = load_rgb(path)
  if alignment == "landmarks":
    if landmarks is None:
      raise ImageError(f"image {path!r} has no landmarks to align with")
    rgb = alignment_lib.align_face(rgb, landmarks, image_size)
  elif alignment == "resize":
    if rgb.shape[:2] != (image_size, image_size):
      rgb = cv2.resize(rgb, (image_size, image_size),
                       interpolation=cv2.INTER_AREA)
  elif alignment == "none":
    if rgb.shape[:2] != (image_size, image_size):
      raise ImageError(
          f"image {path!r} is {rgb.shape[1]}x{rgb.shape[0]}, not "
          f"{image_size}x{image_size}; set data.alignment to 'landmarks' or "
          "'resize'")
  else:
    raise ValueError(f"unknown alignment {alignment!r}; choose {ALIGNMENTS}")
  # AdaFace models see BGR, like the reference's loaders.
  return np.ascontiguousarray(rgb[:, :, ::-1])


@dataclasses.dataclass(frozen=True)
class LoadTrainingFace(grain.transforms.RandomMap):
  """Record -> {"image": [s, s, 3] uint8 BGR, "label": int32}, randomly flipped.

  The random generator comes from grain per record (seed and position in the
  stream), so a given epoch yields the same bytes for any worker count.
  """

  image_size: int
  alignment: str
  random_flip: bool

  def random_map(self, record: sources.FaceRecord, rng: np.random.Generator):
    image = prepare_face(
        record.path, record.landmarks, self.image_size, self.alignment)
    if self.random_flip and rng.random() < 0.5:
      image = np.ascontiguousarray(image[:, ::-1])
    return {"image": image, "label": np.int32(record.label)}


def make_train_dataset(index: sources.FaceIndex, *, batch_size: int,
                       seed: int, image_size: int, alignment: str,
                       random_flip: bool, worker_count: int,
                       shard_index: int = 0, shard_count: int = 1,
                       read_threads: int = 8) -> grain.IterDataset:
  """An endless stream of fixed-size training batches.

  Each epoch is a fresh global shuffle of the records (seeded), split into
  `shard_count` interleaved shards of which this process reads one. Decoding
  runs in `worker_count` processes (0 decodes in threads of this process);
  batching comes after the worker prefetch so no element is lost between
  workers.

  Args:
    index: the records to read.
    batch_size: images per batch on this process.
    seed: shuffle and augmentation seed.
    image_size: crop size in pixels.
    alignment: see `prepare_face`.
    random_flip: flip each image horizontally with probability 1/2.
    worker_count: decoding processes.
    shard_index, shard_count: this process's slice of every epoch.
    read_threads: threads per process reading records.

  Returns:
    A grain IterDataset of {"image": [batch, s, s, 3] uint8, "label":
    [batch] int32} whose iterators can be checkpointed.
  """
  if len(index) < batch_size * shard_count:
    raise sources.DataError(
        f"the data set has {len(index)} images, fewer than one global batch "
        f"of {batch_size * shard_count}; lower data.batch_size")
  dataset = grain.MapDataset.source(list(index.records))
  dataset = dataset.seed(seed).shuffle().repeat(None)
  dataset = dataset[shard_index::shard_count]
  dataset = dataset.random_map(
      LoadTrainingFace(image_size, alignment, random_flip))

  stream = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads,
                        prefetch_buffer_size=4 * batch_size))
  if worker_count > 0:
    stream = stream.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count))
  return stream.batch(batch_size, drop_remainder=True)


@dataclasses.dataclass(frozen=True)
class LoadEvalFace(grain.transforms.Map):
  """(path, landmarks) -> [s, s, 3] uint8 BGR crop."""

  image_size: int
  alignment: str

  def map(self, item):
    path, landmarks = item
    return prepare_face(path, landmarks, self.image_size, self.alignment)


def iterate_eval_batches(
    paths: Sequence[str], landmarks: Sequence[np.ndarray | None], *,
    batch_size: int, image_size: int, alignment: str,
    read_threads: int = 4) -> Iterator[tuple[np.ndarray, int]]:
  """Yields ([batch_size, s, s, 3] uint8 BGR, number of real images).

  The last batch is padded with zeros to the full size, so one compiled
  function serves every batch; the count says how many rows are real.
  """
  dataset = grain.MapDataset.source(list(zip(paths, landmarks)))
  dataset = dataset.map(LoadEvalFace(image_size, alignment))
  stream = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads,
                        prefetch_buffer_size=2 * batch_size))
  for batch in stream.batch(batch_size):
    count = len(batch)
    if count < batch_size:
      padding = np.zeros((batch_size - count,) + batch.shape[1:], batch.dtype)
      batch = np.concatenate([batch, padding])
    yield batch, count


def default_worker_count() -> int:
  """Decoding processes to use when the config says -1: one per spare core."""
  return max(0, min(8, (os.cpu_count() or 1) - 1))
