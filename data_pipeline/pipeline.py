"""Grain input pipelines: decoding, alignment, BGR order, flips, batching.

Workers produce uint8 BGR crops; the model normalises them to [-1, 1] on the
device, which moves a quarter of the bytes a float32 batch would.
"""

import collections.abc
import dataclasses
import os
import signal
import sys
from typing import Any, Iterator, Sequence

from absl import logging
import cv2
import grain
import numpy as np
from PIL import Image

from data_pipeline import alignment as alignment_lib
from data_pipeline import augment as augment_lib
from data_pipeline import sources

ALIGNMENTS = ("landmarks", "none", "resize")
CORRUPT_RECORDS = ("skip", "raise")
# Batch key of the running count of corrupt records left out of the stream.
SKIPPED_RECORDS_KEY = "skipped_records"
# Element key that marks a record that could not be decoded.
_CORRUPT_KEY = "corrupt"
# Batch key, between the workers and this process only, of the messages
# naming the corrupt records a batch left out.
_SKIPPED_MESSAGES_KEY = "skipped_messages"
# A stream whose records all fail (a wrong path, an unreadable disk) must
# stop rather than skip forever.
MAX_CONSECUTIVE_SKIPS = 1000
_LOGGED_SKIPS = 20
_MIN_SHM_SIZE = 1 << 16


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
  rgb = fit_face(load_rgb(path), landmarks, image_size, alignment, path)
  # AdaFace models see BGR, like the reference's loaders.
  return np.ascontiguousarray(rgb[:, :, ::-1])


def fit_face(image: np.ndarray, landmarks: np.ndarray | None,
             image_size: int, alignment: str, name: str) -> np.ndarray:
  """Brings a decoded [h, w, 3] uint8 face (any channel order) to
  [image_size, image_size, 3] as `alignment` says (see `prepare_face`).

  Raises:
    ImageError: no landmarks to align with, or a wrong size for "none",
      naming the image.
  """
  if alignment == "landmarks":
    if landmarks is None:
      raise ImageError(f"image {name!r} has no landmarks to align with")
    image = alignment_lib.align_face(image, landmarks, image_size)
  elif alignment == "resize":
    if image.shape[:2] != (image_size, image_size):
      image = cv2.resize(image, (image_size, image_size),
                         interpolation=cv2.INTER_AREA)
  elif alignment == "none":
    if image.shape[:2] != (image_size, image_size):
      raise ImageError(
          f"image {name!r} is {image.shape[1]}x{image.shape[0]}, not "
          f"{image_size}x{image_size}; set data.alignment to 'landmarks' or "
          "'resize'")
  else:
    raise ValueError(f"unknown alignment {alignment!r}; choose {ALIGNMENTS}")
  return image


def decode_bgr(encoded: bytes, origin: str) -> np.ndarray:
  """Decodes encoded image bytes (JPEG, PNG, ...) to [h, w, 3] uint8 BGR.

  OpenCV decodes straight to BGR, the order AdaFace models take, and
  rejects truncated JPEGs instead of filling them in.

  Raises:
    ImageError: empty or undecodable bytes, naming `origin`.
  """
  if not encoded:
    raise ImageError(f"record {origin!r} holds no image bytes")
  image = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
  if image is None:
    raise ImageError(
        f"record {origin!r}: {len(encoded)} bytes do not decode as an image "
        "(truncated or corrupt)")
  return image


@dataclasses.dataclass(frozen=True)
class EncodedFaceSet:
  """Training faces stored as encoded images behind a random-access source.

  Attributes:
    source: a grain data source; `source[i]` is {"image": encoded bytes,
      "label": int, "origin": str or bytes} plus an "error" message for a
      record that could not be read.
    num_identities: the class count the data declares; every label must be
      below it.
    name: where the data is, for logs and errors.
  """

  source: Any
  num_identities: int
  name: str

  def __len__(self) -> int:
    return len(self.source)

  @property
  def identities(self) -> Sequence[str]:
    return _IdentityStandIns(self.num_identities, self.name, names_only=True)

  @property
  def records(self) -> Sequence[sources.FaceRecord]:
    """One stand-in record per identity (not per image).

    Labels are only known record by record, so the class-count check reads
    these, and each decoded record's label is checked against
    `num_identities` in the workers.
    """
    return _IdentityStandIns(self.num_identities, self.name)


class _IdentityStandIns(collections.abc.Sequence):
  """Lazy per-identity names or stand-in `FaceRecord`s."""

  def __init__(self, count: int, name: str, names_only: bool = False):
    self._count, self._name, self._names_only = count, name, names_only

  def __len__(self) -> int:
    return self._count

  def __getitem__(self, label):
    if isinstance(label, slice):
      return [self[i] for i in range(*label.indices(self._count))]
    if not -self._count <= label < self._count:
      raise IndexError(label)
    label %= self._count
    if self._names_only:
      return f"class {label}"
    return sources.FaceRecord(f"{self._name} (identity {label})", label)


@dataclasses.dataclass(frozen=True)
class LoadTrainingFace(grain.transforms.RandomMap):
  """Record -> {"image": [s, s, 3] uint8 BGR, "label": int32}, randomly flipped.

  The random generator comes from grain per record (seed and position in the
  stream), so a given epoch yields the same bytes for any worker count.
  """

  image_size: int
  alignment: str
  random_flip: bool
  augmentation: augment_lib.AugmentParams = augment_lib.AugmentParams()

  def random_map(self, record: sources.FaceRecord, rng: np.random.Generator):
    try:
      rgb = load_rgb(record.path)
    except ImageError as e:
      return {_CORRUPT_KEY: str(e)}
    rgb = fit_face(rgb, record.landmarks, self.image_size, self.alignment,
                   record.path)
    # Same bytes as rgb[:, :, ::-1], without numpy's slow strided copy.
    image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    return _augment_and_flip(image, record.label, rng, self.augmentation,
                             self.random_flip)


@dataclasses.dataclass(frozen=True)
class DecodeTrainingFace(grain.transforms.RandomMap):
  """Encoded record -> {"image": [s, s, 3] uint8 BGR, "label": int32}.

  Like `LoadTrainingFace`, for the records of an `EncodedFaceSet`. A record
  that cannot be read or decoded becomes a corrupt marker, which batching
  replaces (see `make_train_dataset`) and the main process counts or raises
  on.
  """

  image_size: int
  alignment: str
  random_flip: bool
  num_identities: int
  augmentation: augment_lib.AugmentParams = augment_lib.AugmentParams()

  def random_map(self, record: dict, rng: np.random.Generator):
    origin = record.get("origin", "")
    if isinstance(origin, bytes):
      origin = origin.decode("utf-8", "replace")
    if record.get("error"):
      return {_CORRUPT_KEY: f"record {origin!r}: {record['error']}"}
    try:
      image = decode_bgr(record["image"], origin)
    except ImageError as e:
      return {_CORRUPT_KEY: str(e)}
    label = int(record["label"])
    if not 0 <= label < self.num_identities:
      raise sources.DataError(
          f"record {origin!r} has label {label}, outside the "
          f"{self.num_identities} identities the data set declares")
    image = fit_face(image, None, self.image_size, self.alignment, origin)
    return _augment_and_flip(image, label, rng, self.augmentation,
                             self.random_flip)


def _augment_and_flip(image: np.ndarray, label: int, rng: np.random.Generator,
                      augmentation: augment_lib.AugmentParams,
                      random_flip: bool) -> dict[str, np.ndarray]:
  """The reference's order: crop, low resolution, photometric, then flip."""
  image = augment_lib.augment(image, rng, augmentation)
  if random_flip and rng.random() < 0.5:
    # Same bytes as image[:, ::-1] made contiguous, dozens of times faster.
    image = cv2.flip(image, 1)
  return {"image": np.ascontiguousarray(image), "label": np.int32(label)}


def epoch_order(num_records: int, seed: int, epoch: int) -> np.ndarray:
  """The record read at each position of one epoch: a permutation.

  Drawn by numpy's PCG64 from (seed, epoch). numpy keeps `shuffle`'s stream
  fixed within its stability policy; a different numpy version may order an
  epoch differently (resuming then reads a different remainder of the epoch,
  still each record once).

  Returns:
    [num_records] int32 (int64 past 2**31 records).
  """
  dtype = np.int32 if num_records < 2**31 else np.int64
  order = np.arange(num_records, dtype=dtype)
  np.random.default_rng([seed, epoch]).shuffle(order)
  return order


class _EpochShuffle(grain.MapDataset):
  """Endless stream over the parent's records, each epoch reshuffled.

  Position p reads record `epoch_order(n, seed, p // n)[p % n]`. grain's
  `shuffle()` computes each position with a keyed bijection (about 25 us a
  call here, a tenth of a worker's time per image); a permutation computed
  once per epoch costs a lookup. Each process keeps the orders of the two
  most recent epochs it read (a batch may straddle two): 4 bytes a record
  each, 23 MB for 5.8M images.
  """

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._seed = seed
    self._num_records = len(parent)
    self._orders: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"_EpochShuffle(seed={self._seed})"

  def _record(self, position: int) -> int:
    epoch, offset = divmod(position, self._num_records)
    if epoch not in self._orders:
      if len(self._orders) == 2:
        del self._orders[min(self._orders)]
      self._orders[epoch] = epoch_order(self._num_records, self._seed, epoch)
    return int(self._orders[epoch][offset])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._record(index)]

  def _getitems(self, indices: Sequence[int]):
    records = [self._record(index) for index in indices]
    return self._parent._getitems(records)  # pylint: disable=protected-access


def _init_worker(worker_index: int, worker_count: int) -> None:
  del worker_index, worker_count
  # Parallelism comes from the worker processes; OpenCV's own threads on
  # 112x112 images only contend with them.
  cv2.setNumThreads(1)
  # A terminal's Ctrl-C reaches the whole process group. The training loop
  # turns it into a checkpoint and a clean stop; a worker that died of it
  # first would take the batches that checkpoint needs with it.
  signal.signal(signal.SIGINT, signal.SIG_IGN)


class _FaceBatches(grain.MapDataset):
  """Fixed-size batches of decoded faces, corrupt records replaced.

  Batch k holds the faces at positions [k * B, (k + 1) * B) of the parent
  stream, so it depends on k alone, not on which worker builds it. A
  position whose record failed to decode is left out, and its slot takes the
  next readable face found reading forward from (k + 1) * B; that face then
  also appears, identically augmented, in the batch that owns its position.
  Each batch names the corrupt records of its own positions, so the names
  summed over batches 0..k cover every corrupt position up to (k + 1) * B
  exactly once.
  """

  def __init__(self, parent: grain.MapDataset, batch_size: int,
               replace_corrupt: bool):
    super().__init__(parent)
    self._batch_size = batch_size
    # Without replacement the first corrupt record ends the batch: the main
    # process raises on it.
    self._replace_corrupt = replace_corrupt

  def __len__(self) -> int:
    return len(self._parent) // self._batch_size

  def __str__(self) -> str:
    return f"_FaceBatches(batch_size={self._batch_size})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    end = (index + 1) * self._batch_size
    # One call down the chain for the batch: the record source reads it in
    # one go, and each layer's per-call overhead is paid once. grain's own
    # batching reads through the same method.
    faces = self._parent._getitems(  # pylint: disable=protected-access
        list(range(end - self._batch_size, end)))
    skipped = [face[_CORRUPT_KEY] for face in faces if _CORRUPT_KEY in face]
    if skipped and not self._replace_corrupt:
      return {_SKIPPED_MESSAGES_KEY: skipped[:1]}
    if skipped:
      faces = self._fill_corrupt_slots(faces, end)
    return {"image": np.stack([face["image"] for face in faces]),
            "label": np.array([face["label"] for face in faces], np.int32),
            _SKIPPED_MESSAGES_KEY: skipped}

  def _fill_corrupt_slots(self, faces: list[dict],
                          position: int) -> list[dict]:
    """Puts the readable faces from `position` on into the corrupt slots.

    Raises:
      sources.DataError: MAX_CONSECUTIVE_SKIPS records in a row are corrupt.
    """
    consecutive = 0
    for face in reversed(faces):
      if _CORRUPT_KEY not in face:
        break
      consecutive += 1
    filled = []
    for face in faces:
      while _CORRUPT_KEY in face:
        if consecutive >= MAX_CONSECUTIVE_SKIPS:
          raise sources.DataError(
              f"{consecutive} records in a row failed to decode; the data "
              f"looks unreadable (last: {face[_CORRUPT_KEY]})")
        face = self._parent[position]
        position += 1
        consecutive = consecutive + 1 if _CORRUPT_KEY in face else 0
      filled.append(face)
    return filled


class _CountSkippedIterator(grain.DatasetIterator):
  """Adds up the corrupt records the batches left out; raises on them when
  asked to.

  Each batch carries the running count under SKIPPED_RECORDS_KEY, so it
  reaches the training loop with the batch, and the count is part of the
  state, so a restored iterator continues it.
  """

  def __init__(self, parent: grain.DatasetIterator, corrupt_records: str):
    super().__init__(parent)
    self._raise = corrupt_records == "raise"
    self._skipped = 0

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    messages = batch.pop(_SKIPPED_MESSAGES_KEY)
    if messages and self._raise:
      raise ImageError(
          f"{messages[0]} (set data.corrupt_records='skip' to leave such "
          "records out)")
    for message in messages:
      self._skipped += 1
      if self._skipped <= _LOGGED_SKIPS:
        logging.warning(
            "Skipping corrupt record %d (the next readable record takes its "
            "place): %s", self._skipped, message)
    batch[SKIPPED_RECORDS_KEY] = np.full(len(batch["label"]), self._skipped,
                                         np.int64)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(),
            SKIPPED_RECORDS_KEY: self._skipped}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._skipped = int(state[SKIPPED_RECORDS_KEY])


class _CountSkipped(grain.IterDataset):
  """See `_CountSkippedIterator`."""

  def __init__(self, parent: grain.IterDataset, corrupt_records: str):
    super().__init__(parent)
    self._corrupt_records = corrupt_records

  def __iter__(self) -> _CountSkippedIterator:
    return _CountSkippedIterator(self._parent.__iter__(),
                                 self._corrupt_records)


def make_train_dataset(index: sources.FaceIndex | EncodedFaceSet, *,
                       batch_size: int, seed: int, image_size: int,
                       alignment: str, random_flip: bool, worker_count: int,
                       shard_index: int = 0, shard_count: int = 1,
                       read_threads: int | None = None,
                       augmentation: augment_lib.AugmentParams | None = None,
                       corrupt_records: str = "skip") -> grain.IterDataset:
  """An endless stream of fixed-size training batches.

  Each epoch is a fresh global shuffle of the records (seeded, see
  `epoch_order`), split into
  `shard_count` interleaved shards of which this process reads one. Batch k
  is built from positions [k * batch_size, (k + 1) * batch_size) of this
  process's stream by one of `worker_count` processes (0: threads of this
  process), which decode, augment and stack it and hand it over whole. Each
  record's randomness comes from its position in the global stream, so the
  batches are the same for any worker count.

  A record that fails to read or decode is skipped: it is left out of its
  batch k, and its slot takes the next readable record not yet used by the
  batch, reading this process's stream forward from position
  (k + 1) * batch_size (that record thus also appears in a later batch,
  identically augmented). The skipped count is the number of corrupt
  records at the positions of the batches handed out so far (records met
  while filling a slot count with their own batch); every batch carries it
  (int64 [batch], all entries equal) under SKIPPED_RECORDS_KEY, the first
  20 are logged with their origin, and the iterator's checkpointed state
  keeps it.

  Args:
    index: image files (a FaceIndex) or encoded records (an
      EncodedFaceSet).
    batch_size: images per batch on this process.
    seed: shuffle and augmentation seed.
    image_size: crop size in pixels.
    alignment: see `prepare_face`.
    random_flip: flip each image horizontally with probability 1/2.
    worker_count: decoding processes.
    shard_index, shard_count: this process's slice of every epoch.
    read_threads: threads building batches in each process that decodes;
      None: 8 without workers, none in each worker (there the processes
      are the parallelism).
    augmentation: AdaFace augmentations before the flip; None for none.
    corrupt_records: "skip" (replace and count, as above) or "raise" (an
      ImageError naming the first corrupt record met).

  Returns:
    A grain IterDataset of {"image": [batch, s, s, 3] uint8, "label":
    [batch] int32, SKIPPED_RECORDS_KEY: [batch] int64} whose iterators can
    be checkpointed.

  Raises:
    sources.DataError: on iteration, when MAX_CONSECUTIVE_SKIPS records in
      a row fail to decode.
  """
  if corrupt_records not in CORRUPT_RECORDS:
    raise ValueError(
        f"data.corrupt_records={corrupt_records!r}; choose one of "
        f"{CORRUPT_RECORDS}")
  augmentation = augmentation or augment_lib.AugmentParams()
  if len(index) < batch_size * shard_count:
    raise sources.DataError(
        f"the data set has {len(index)} images, fewer than one global batch "
        f"of {batch_size * shard_count}; lower data.batch_size")
  if isinstance(index, EncodedFaceSet):
    dataset = grain.MapDataset.source(index.source)
    load = DecodeTrainingFace(image_size, alignment, random_flip,
                              index.num_identities, augmentation)
  else:
    dataset = grain.MapDataset.source(list(index.records))
    load = LoadTrainingFace(image_size, alignment, random_flip, augmentation)
  dataset = _EpochShuffle(dataset, seed)
  dataset = dataset.random_map(load, seed=seed)
  # Sharding after the random map keeps each record's randomness tied to its
  # position in the global stream, so the union of the processes' batches
  # is the single-process batch whatever the process count (corrupt records
  # aside: each process fills their slots from its own shard).
  dataset = dataset[shard_index::shard_count]
  # Whole batches cross from the workers: one transfer per image capped
  # the stream at a few thousand images/s.
  dataset = _FaceBatches(dataset, batch_size, corrupt_records == "skip")

  if read_threads is None:
    read_threads = 0 if worker_count > 0 else 8
  stream = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads,
                        prefetch_buffer_size=read_threads))
  if worker_count > 0:
    # A batch of images crosses faster in a shared-memory segment than
    # pickled through the worker's pipe; labels are too small to gain.
    stream = grain.experimental.WithOptionsIterDataset(
        stream, grain.experimental.DatasetOptions(min_shm_size=_MIN_SHM_SIZE))
    stream = stream.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count),
        worker_init_fn=_init_worker)
  return _CountSkipped(stream, corrupt_records)


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
