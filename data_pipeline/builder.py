"""Turns the `data` and `eval` sections of a config into indexes on disk."""

import dataclasses
import os

import ml_collections
import numpy as np

from data_pipeline import array_record
from data_pipeline import pipeline
from data_pipeline import recordio
from data_pipeline import sources
from data_pipeline import synthetic

DATA_KINDS = ("image_folder", "manifest", "synthetic", "recordio",
              "array_record")
# Kinds holding encoded, already aligned crops rather than image files.
RECORD_KINDS = ("recordio", "array_record")


def synthetic_root(data: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the synthetic set lives: data.root, or <workdir>/synthetic_faces."""
  return data.root or os.path.join(workdir, "synthetic_faces")


def build_train_index(
    data: ml_collections.ConfigDict,
    workdir: str) -> sources.FaceIndex | pipeline.EncodedFaceSet:
  """Indexes the training images the `data` config section describes.

  Raises:
    sources.DataError: unknown kind or alignment, missing files, images
      without landmarks when alignment needs them.
  """
  if data.alignment not in pipeline.ALIGNMENTS:
    raise sources.DataError(
        f"unknown data.alignment {data.alignment!r}; choose one of "
        f"{pipeline.ALIGNMENTS}")
  if data.kind in RECORD_KINDS:
    return build_encoded_set(data)
  if data.kind == "synthetic":
    root = synthetic_root(data, workdir)
    synthetic.ensure_synthetic_faces(root, **data.synthetic.to_dict())
    index = sources.scan_image_folder(os.path.join(root, "train"))
  elif data.kind == "image_folder":
    index = sources.scan_image_folder(data.root)
  elif data.kind == "manifest":
    filters = [f for f in data.manifest_filters.split(",") if f.strip()]
    index = sources.read_manifest(data.manifest, data.root, filters)
  else:
    raise sources.DataError(
        f"unknown data.kind {data.kind!r}; choose one of {DATA_KINDS}")

  needs_landmarks = data.alignment == "landmarks"
  if data.landmarks:
    image_root = data.root or os.path.dirname(os.path.abspath(data.landmarks))
    table = sources.read_landmarks_csv(data.landmarks, image_root)
    index = sources.attach_landmarks(index, table, needs_landmarks)
  elif needs_landmarks:
    index = sources.attach_landmarks(index, {}, needs_landmarks)
  return index


def build_encoded_set(
    data: ml_collections.ConfigDict) -> pipeline.EncodedFaceSet:
  """Opens a RecordIO file or a converted ArrayRecord set for training.

  data.root is the `.rec` (or the folder holding `train.rec`) for
  "recordio", and the conversion's output folder (or the dataset version
  folder in it) for "array_record".

  Raises:
    sources.DataError: missing or malformed files, or settings these
      aligned, landmark-free crops cannot honour.
  """
  if data.alignment == "landmarks" or data.landmarks:
    raise sources.DataError(
        f"data.kind={data.kind!r} holds aligned crops without landmarks; set "
        "data.alignment to 'none' (or 'resize') and data.landmarks to ''")
  if not data.root:
    raise sources.DataError(
        f"data.root is empty; set it to the {data.kind} data to train on")
  if data.kind == "array_record":
    opened = array_record.open_face_images(data.root)
    return pipeline.EncodedFaceSet(opened.source, opened.num_identities,
                                   opened.dataset_dir)

  rec_path = data.root
  if not rec_path.endswith(".rec"):
    rec_path = os.path.join(rec_path, "train.rec")
  try:
    layout = recordio.read_face_layout(rec_path)
  except recordio.RecordIOError as e:
    raise sources.DataError(f"data.root {data.root!r}: {e}") from None
  source = recordio.FaceRecordSource(layout)
  num_identities = layout.num_identities
  if num_identities is None:
    # No `property` file and no header record: read every label once.
    num_identities = recordio.count_identities(source)
  return pipeline.EncodedFaceSet(source, num_identities, rec_path)


@dataclasses.dataclass(frozen=True)
class PairsSpec:
  """Where a verification set's pairs and images are."""

  name: str
  pairs: str
  image_root: str
  image_ext: str
  landmarks: dict[str, np.ndarray] | None
  alignment: str


def build_pairs_spec(config: ml_collections.ConfigDict,
                     workdir: str) -> PairsSpec | None:
  """The verification set of `config.eval`, or None when none is set.

  For synthetic data without an explicit pairs file, the generated set's
  held-out identities and pairs file are used.
  """
  spec = config.eval
  pairs, image_root, ext = spec.pairs, spec.image_root, spec.image_ext
  if not pairs and config.data.kind == "synthetic":
    root = synthetic_root(config.data, workdir)
    synthetic.ensure_synthetic_faces(root, **config.data.synthetic.to_dict())
    pairs = os.path.join(root, "pairs.txt")
    image_root, ext = os.path.join(root, "verify"), "jpg"
  if not pairs:
    return None

  if not os.path.isfile(pairs):
    raise sources.DataError(f"eval.pairs {pairs!r} does not exist")
  image_root = image_root or os.path.dirname(os.path.abspath(pairs))
  if not os.path.isdir(image_root):
    raise sources.DataError(f"eval.image_root {image_root!r} does not exist")
  landmarks = None
  if spec.landmarks:
    landmarks = sources.read_landmarks_csv(
        spec.landmarks, spec.landmarks_root or image_root)
  return PairsSpec(spec.name, pairs, image_root, ext, landmarks,
                   spec.alignment)
