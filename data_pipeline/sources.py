"""Face image indexes: image-folder trees and manifest CSV files.

Both produce a list of `FaceRecord`s (an image path, an integer identity
label and optional five-point landmarks) plus the identity names in label
order. Everything is checked when the index is built, so a bad data set
fails before any training step with an error naming the file or row.
"""

import csv
import dataclasses
import os
from typing import Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp")
LANDMARK_COLUMNS = (
    "left_eye_x", "left_eye_y", "right_eye_x", "right_eye_y",
    "nose_x", "nose_y", "mouth_left_x", "mouth_left_y",
    "mouth_right_x", "mouth_right_y")


class DataError(ValueError):
  """A data set on disk does not match what the config describes."""


@dataclasses.dataclass(frozen=True)
class FaceRecord:
  """One training image.

  Attributes:
    path: absolute path of the image file.
    label: identity index in [0, num_identities).
    landmarks: optional (10,) float32 x1, y1, ..., x5, y5 in image pixels.
  """

  path: str
  label: int
  landmarks: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class FaceIndex:
  """An indexed data set: the records and the identity names by label."""

  records: tuple[FaceRecord, ...]
  identities: tuple[str, ...]

  @property
  def num_identities(self) -> int:
    return len(self.identities)

  def __len__(self) -> int:
    return len(self.records)


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _require_dir(path: str, field: str) -> None:
  if not path:
    raise DataError(f"{field} is empty; set it to a data folder")
  if not os.path.isdir(path):
    raise DataError(f"{field} {path!r} does not exist or is not a folder")


def scan_image_folder(root: str) -> FaceIndex:
  """Indexes a `<root>/<identity>/<image>` tree.

  Identities are the sub-folders in sorted order, labelled 0, 1, ...; images
  inside each are sorted by name. Files at the top level are ignored.

  Raises:
    DataError: the root is missing, holds no identity folder, or an identity
      folder holds no image.
  """
  _require_dir(root, "data.root")
  identities = sorted(
      entry.name for entry in os.scandir(root)
      if entry.is_dir() and not entry.name.startswith("."))
  if not identities:
    raise DataError(f"data.root {root!r} holds no identity folders")

  records = []
  for label, identity in enumerate(identities):
    folder = os.path.join(root, identity)
    images = sorted(name for name in os.listdir(folder) if _is_image(name))
    if not images:
      raise DataError(
          f"identity folder {folder!r} holds no images (looked for "
          f"{', '.join(IMAGE_EXTENSIONS)})")
    records.extend(
        FaceRecord(os.path.join(folder, name), label) for name in images)
  return FaceIndex(tuple(records), tuple(identities))


def read_landmarks_csv(path: str, image_root: str) -> dict[str, np.ndarray]:
  """Reads five-point landmarks keyed by absolute image path.

  The CSV has a `path` column (relative to `image_root`) and the ten columns
  of `LANDMARK_COLUMNS`, in pixels of the stored image.
  """
  if not os.path.isfile(path):
    raise DataError(f"landmarks file {path!r} does not exist")
  landmarks = {}
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in ("path",) + LANDMARK_COLUMNS
               if c not in (reader.fieldnames or ())]
    if missing:
      raise DataError(f"landmarks file {path!r} lacks columns {missing}")
    for line, row in enumerate(reader, start=2):
      landmarks[_resolve(image_root, row["path"])] = _parse_landmarks(
          row, path, line)
  return landmarks


def _parse_landmarks(row: dict, path: str, line: int) -> np.ndarray:
  try:
    return np.array([float(row[c]) for c in LANDMARK_COLUMNS], np.float32)
  except (TypeError, ValueError) as e:
    raise DataError(f"{path}:{line}: bad landmark value ({e})") from None


def _resolve(image_root: str, path: str) -> str:
  return os.path.normpath(os.path.join(image_root, path))


def read_manifest(path: str, image_root: str = "",
                  filters: Sequence[str] = ()) -> FaceIndex:
  """Indexes the images listed in a manifest CSV.

  Columns: `path` (relative to `image_root`, or to the manifest's folder when
  `image_root` is empty) and `identity` (a name); optionally `label` (an
  integer that then fixes the label instead of the sorted-name order) and
  the ten `LANDMARK_COLUMNS`. Other columns are kept for filtering.

  Args:
    path: the CSV file.
    image_root: folder the `path` column is relative to.
    filters: `column=value` conditions a row must meet to be used; a value
      matches a column holding a `;`-separated list when it is one of them.

  Raises:
    DataError: a missing file or column, a malformed row, an image listed
      twice, or no row left after filtering.
  """
  if not os.path.isfile(path):
    raise DataError(f"data.manifest {path!r} does not exist")
  image_root = image_root or os.path.dirname(os.path.abspath(path))
  conditions = [_parse_filter(f) for f in filters]

  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    columns = reader.fieldnames or ()
    for required in ("path", "identity") + tuple(c for c, _ in conditions):
      if required not in columns:
        raise DataError(f"manifest {path!r} has no {required!r} column")
    has_landmarks = all(c in columns for c in LANDMARK_COLUMNS)
    rows = [(line, row) for line, row in enumerate(reader, start=2)
            if all(_matches(row[c], v) for c, v in conditions)]
  if not rows:
    raise DataError(f"manifest {path!r} has no rows matching {list(filters)}")

  labels = _manifest_labels(rows, "label" in columns, path)
  # Position = label; labels an explicit `label` column skips stay unnamed.
  identities = [""] * (max(labels.values()) + 1)
  for name, label in labels.items():
    identities[label] = name
  records, seen = [], set()
  for line, row in rows:
    image = _resolve(image_root, row["path"])
    if image in seen:
      raise DataError(f"{path}:{line}: image {row['path']!r} listed twice")
    seen.add(image)
    landmarks = _parse_landmarks(row, path, line) if has_landmarks else None
    records.append(FaceRecord(image, labels[row["identity"]], landmarks))
  return FaceIndex(tuple(records), tuple(identities))


def _parse_filter(text: str) -> tuple[str, str]:
  column, sep, value = text.partition("=")
  if not sep or not column:
    raise DataError(f"manifest filter {text!r} is not of the form column=value")
  return column.strip(), value.strip()


def _matches(cell: str, value: str) -> bool:
  return value in (part.strip() for part in (cell or "").split(";"))


def _manifest_labels(rows, explicit: bool, path: str) -> dict[str, int]:
  """Maps identity names to labels: sorted order, or the `label` column."""
  if not explicit:
    names = sorted({row["identity"] for _, row in rows})
    return {name: i for i, name in enumerate(names)}

  labels = {}
  for line, row in rows:
    try:
      label = int(row["label"])
    except ValueError:
      raise DataError(
          f"{path}:{line}: label {row['label']!r} is not an integer") from None
    if label < 0:
      raise DataError(f"{path}:{line}: label {label} is negative")
    if labels.setdefault(row["identity"], label) != label:
      raise DataError(
          f"{path}:{line}: identity {row['identity']!r} has labels "
          f"{labels[row['identity']]} and {label}")
  return labels


def attach_landmarks(index: FaceIndex, landmarks: dict[str, np.ndarray],
                     require: bool) -> FaceIndex:
  """Adds landmarks from a path-keyed table to records that lack them.

  Raises:
    DataError: `require` is set and an image has no landmarks.
  """
  records = []
  for record in index.records:
    points = record.landmarks
    if points is None:
      points = landmarks.get(os.path.normpath(record.path))
    if points is None and require:
      raise DataError(
          f"image {record.path!r} has no landmarks, and data.alignment is "
          "'landmarks'; add it to data.landmarks or set data.alignment")
    records.append(dataclasses.replace(record, landmarks=points))
  return FaceIndex(tuple(records), index.identities)


def check_num_classes(index: FaceIndex, num_classes: int) -> None:
  """Fails when any label falls outside the head's class count."""
  max_label = max(record.label for record in index.records)
  if max_label >= num_classes:
    example = next(r for r in index.records if r.label == max_label)
    raise DataError(
        f"label {max_label} (identity {index.identities[max_label]!r}, e.g. "
        f"{example.path!r}) is outside head.num_classes={num_classes}; the "
        f"data has {max_label + 1} identities: set "
        f"--config.head.num_classes={max_label + 1}")
