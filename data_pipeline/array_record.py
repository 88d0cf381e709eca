"""Face data sets converted once to ArrayRecord, through a TFDS builder.

The builder stores each face's encoded image bytes as they are (no decoding
or re-encoding, and no TensorFlow: TFDS only needs TensorFlow to encode
numpy images), its integer label and where it came from:

    {"image": Image (encoded bytes), "label": ClassLabel, "origin": Text}

Reading needs no builder code either:

    builder = tfds.builder_from_directory(dataset_dir)
    source = builder.as_data_source("train")  # Decoded to RGB numpy.

Training reads the bytes with `open_face_images`, which skips TFDS decoding
so the grain workers decode (to BGR) and augment themselves.

    python -m data_pipeline.array_record --input train.rec \\
        --output_dir /data/ms1mv2_array_record
    python -m data_pipeline.array_record --input faces/ --output_dir out/

The input is a face `.rec` (with its `.idx`), a folder holding `train.rec`,
or an image-folder tree `<identity>/<image>`.
"""

import argparse
import collections
import dataclasses
import os
import sys
import tempfile
import time
from typing import Iterator, Sequence

import cv2
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from data_pipeline import recordio
from data_pipeline import sources

SPLIT = "train"
DATASET_INFO = "dataset_info.json"


class ConversionError(ValueError):
  """An input cannot be converted (missing files, labels out of range)."""


@dataclasses.dataclass(frozen=True)
class EncodedFace:
  """One face of an input: encoded bytes, label and where it came from.

  `error` is set instead of a usable image when the record is unreadable.
  """

  origin: str
  image: bytes
  label: int
  error: str = ""


class FaceInput:
  """A data set to convert: a length, identities and faces in order."""

  description: str
  num_identities: int
  identity_names: Sequence[str] | None = None

  def __len__(self) -> int:
    raise NotImplementedError

  def __iter__(self) -> Iterator[EncodedFace]:
    raise NotImplementedError


class RecInput(FaceInput):
  """The image records of a face `.rec`, in `.idx` order."""

  def __init__(self, rec_path: str):
    self.description = rec_path
    layout = recordio.read_face_layout(rec_path)
    self._source = recordio.FaceRecordSource(layout)
    self.num_identities = layout.num_identities
    if self.num_identities is None:
      # No `property` file and no header record: the labels say.
      self.num_identities = recordio.count_identities(self._source)

  def __len__(self) -> int:
    return len(self._source)

  def __iter__(self) -> Iterator[EncodedFace]:
    for i in range(len(self._source)):
      record = self._source[i]
      yield EncodedFace(record["origin"], record["image"], record["label"],
                        record.get("error", ""))


class FolderInput(FaceInput):
  """An image-folder tree, identities labelled in sorted order."""

  def __init__(self, root: str):
    self.description = root
    self._index = sources.scan_image_folder(root)
    self.num_identities = self._index.num_identities
    self.identity_names = self._index.identities

  def __len__(self) -> int:
    return len(self._index)

  def __iter__(self) -> Iterator[EncodedFace]:
    for record in self._index.records:
      try:
        with open(record.path, "rb") as f:
          image, error = f.read(), ""
      except OSError as e:
        image, error = b"", f"cannot read: {e}"
      yield EncodedFace(record.path, image, record.label, error)


def open_input(path: str) -> FaceInput:
  """A `.rec` file, a folder holding `train.rec`, or an image folder.

  Raises:
    ConversionError: the path is none of these.
  """
  if os.path.isfile(path) and path.endswith(".rec"):
    return RecInput(path)
  if os.path.isfile(os.path.join(path, "train.rec")):
    return RecInput(os.path.join(path, "train.rec"))
  if os.path.isdir(path):
    return FolderInput(path)
  raise ConversionError(
      f"input {path!r} is neither a .rec file, a folder holding train.rec, "
      "nor an image folder")


@dataclasses.dataclass
class ConversionSummary:
  """What a conversion wrote and left out."""

  dataset_dir: str = ""
  images: int = 0
  identities: int = 0
  image_bytes: int = 0
  output_bytes: int = 0
  skipped: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  skipped_examples: list[str] = dataclasses.field(default_factory=list)
  seconds: float = 0.0

  def format(self) -> str:
    lines = [
        f"Wrote {self.images:,} images of {self.identities:,} identities "
        f"({self.image_bytes / 2**20:,.1f} MiB of encoded images, "
        f"{self.output_bytes / 2**20:,.1f} MiB on disk) in "
        f"{self.seconds:.1f} s to {self.dataset_dir}",
        f"Skipped {sum(self.skipped.values()):,} records"
        + ("" if not self.skipped else ": " + ", ".join(
            f"{count} {reason}" for reason, count in self.skipped.items())),
    ]
    lines.extend(f"  {example}" for example in self.skipped_examples)
    return "\n".join(lines)


_MAX_SKIPPED_EXAMPLES = 10


class FaceImages(tfds.core.GeneratorBasedBuilder):
  """Encoded face crops with identity labels, one `train` split.

  Pass `faces` to write (`download_and_prepare`); without it the builder
  only reads what an earlier conversion wrote under `data_dir`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Encoded image bytes, labels and origins."}
  # Nothing is downloaded, so there is no checksums file to look for beside
  # this code; looking needs `importlib_resources`, which TFDS 4.9 uses on
  # Python >= 3.9 without declaring it.
  code_path = None

  def __init__(self, *, faces: FaceInput | None = None,
               check_images: bool = False, progress: bool = True, **kwargs):
    self._faces = faces
    self._check_images = check_images
    self._progress = progress
    self.summary = ConversionSummary()
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    faces = self._faces
    if faces is None:
      label = tfds.features.ClassLabel()  # Restored from the files.
    elif faces.identity_names:
      label = tfds.features.ClassLabel(names=list(faces.identity_names))
    else:
      label = tfds.features.ClassLabel(num_classes=faces.num_identities)
    return tfds.core.DatasetInfo(
        builder=self,
        description="Aligned face crops for face recognition training.",
        features=tfds.features.FeaturesDict({
            # Shapes vary by input; the bytes are stored as given.
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format="jpeg"),
            "label": label,
            "origin": tfds.features.Text(),
        }),
        # Grain shuffles globally at read time; writing in input order
        # saves TFDS a shuffling pass over the whole set.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._faces is None:
      raise ConversionError("FaceImages needs `faces` to write a data set")
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self):
    faces, summary = self._faces, self.summary
    start = time.perf_counter()
    bar = tqdm.tqdm(total=len(faces), unit="img", disable=not self._progress,
                    desc="Converting", dynamic_ncols=True)
    for key, face in enumerate(faces):
      bar.update(1)
      reason = self._skip_reason(face)
      if reason:
        summary.skipped[reason] += 1
        if len(summary.skipped_examples) < _MAX_SKIPPED_EXAMPLES:
          summary.skipped_examples.append(
              f"{face.origin}: {face.error or reason}")
        continue
      summary.images += 1
      summary.image_bytes += len(face.image)
      yield key, {"image": face.image, "label": face.label,
                  "origin": face.origin}
    bar.close()
    summary.identities = faces.num_identities
    summary.seconds = time.perf_counter() - start
    self.info.metadata.update(
        source=faces.description,
        skipped_records=sum(summary.skipped.values()),
        skipped_by_reason=dict(summary.skipped))

  def _skip_reason(self, face: EncodedFace) -> str:
    if face.error:
      return "unreadable"
    if not face.image:
      return "empty"
    if not 0 <= face.label < self._faces.num_identities:
      raise ConversionError(
          f"{face.origin}: label {face.label} is outside the "
          f"{self._faces.num_identities} identities the input declares")
    if self._check_images and cv2.imdecode(
        np.frombuffer(face.image, np.uint8), cv2.IMREAD_COLOR) is None:
      return "undecodable"
    return ""


def convert(input_path: str, output_dir: str, *, check_images: bool = False,
            progress: bool = True) -> ConversionSummary:
  """Converts a `.rec` or an image folder into `<output_dir>/face_images/`.

  Records that are unreadable or empty (and, with `check_images`, that do
  not decode) are left out and counted in the summary.

  Raises:
    ConversionError: a bad input, or an output that already holds a set.
  """
  faces = open_input(input_path)
  builder = FaceImages(faces=faces, check_images=check_images,
                       progress=progress, data_dir=output_dir)
  if os.path.exists(os.path.join(builder.data_dir, DATASET_INFO)):
    raise ConversionError(
        f"{builder.data_dir} already holds a converted data set; choose "
        "another --output_dir or delete it")
  with tempfile.TemporaryDirectory() as downloads:
    # Nothing is downloaded; this keeps TFDS's download folder out of the
    # output.
    builder.download_and_prepare(download_dir=downloads)
  summary = builder.summary
  summary.dataset_dir = str(builder.data_dir)
  summary.output_bytes = sum(
      entry.stat().st_size for entry in os.scandir(summary.dataset_dir)
      if entry.is_file())
  return summary


def find_dataset_dir(path: str) -> str:
  """The folder holding `dataset_info.json`: `path` or the newest version
  of `face_images` below it.

  Raises:
    sources.DataError: none found.
  """
  if os.path.isfile(os.path.join(path, DATASET_INFO)):
    return path
  root = os.path.join(path, FaceImages.name)
  versions = []
  if os.path.isdir(root):
    for name in os.listdir(root):
      if os.path.isfile(os.path.join(root, name, DATASET_INFO)):
        versions.append(tfds.core.Version(name))
  if not versions:
    raise sources.DataError(
        f"data.root {path!r} holds no converted data set (no {DATASET_INFO} "
        f"there or in {FaceImages.name}/<version>/); convert one with "
        "python -m data_pipeline.array_record")
  return os.path.join(root, str(max(versions)))


@dataclasses.dataclass(frozen=True)
class FaceImagesSource:
  """Random access to a converted set's records, images left encoded.

  `source[i]` is {"image": bytes, "label": int, "origin": bytes}.
  """

  source: Sequence[dict]
  num_identities: int
  dataset_dir: str


def open_face_images(path: str) -> FaceImagesSource:
  """Opens a converted set (`path` as `find_dataset_dir` takes it)."""
  dataset_dir = find_dataset_dir(path)
  builder = tfds.builder_from_directory(dataset_dir)
  source = builder.as_data_source(
      SPLIT, decoders={"image": tfds.decode.SkipDecoding()})
  num_identities = builder.info.features["label"].num_classes
  return FaceImagesSource(source, num_identities, dataset_dir)


def _main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m data_pipeline.array_record",
      description="Convert a face .rec or image folder to ArrayRecord.")
  parser.add_argument("--input", required=True,
                      help=".rec file, folder with train.rec, or image folder")
  parser.add_argument("--output_dir", required=True,
                      help="TFDS data folder to write face_images/ into")
  parser.add_argument("--check_images", action="store_true",
                      help="decode every image and leave out those that fail")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)

  tfds.display_progress_bar(False)  # This module draws its own.
  try:
    summary = convert(args.input, args.output_dir,
                      check_images=args.check_images,
                      progress=not args.no_progress)
  except (ConversionError, recordio.RecordIOError, sources.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(summary.format())
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
