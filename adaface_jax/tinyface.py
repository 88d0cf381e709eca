"""TinyFace: closed-set identification of native low-resolution faces.

Data layout: the authors' test split, which defines the protocol, and an
aligned copy of its images (AdaFace distributes one, or align them
yourself; the crops must be `image_size` squares):

  <root>/tinyface/Testing_Set/Probe/<id>_<n>.jpg
  <root>/tinyface/Testing_Set/Gallery_Match/<id>_<n>.jpg
  <root>/tinyface/Testing_Set/Gallery_Distractor/<name>.jpg
  <root>/<alignment_dir>/**/<same file stem>.<jpg|png|jpeg>

An image's identity is the integer before the first "_" of its file name;
distractors have none. Aligned crops are found by file stem anywhere under
`<alignment_dir>`, so its sub-folders do not matter.

Protocol (AdaFace's `validate_tinyface.py`): each aligned crop is embedded
with its horizontal flip and the two are fused into a unit vector
(`eval.flip_fusion`, norm-weighted add by default); the score is the inner
product. Every probe is searched against the gallery of matches and
distractors; rank-k is the share of probes with a mate in the gallery whose
mate (any of them) is within the top k. Ties with non-mates count in the
probe's favour.
"""

import dataclasses
import os
import re
from typing import Any

import numpy as np

from adaface_jax import inference
from adaface_jax import verification
from data_pipeline import pipeline
from data_pipeline import sources

SPLITS = ("Probe", "Gallery_Match", "Gallery_Distractor")
PROTOCOL_DIR = os.path.join("tinyface", "Testing_Set")
DEFAULT_ALIGNMENT_DIR = "aligned_pad_0.1_pad_high"
RANKS = (1, 5, 20)
DISTRACTOR = -1  # The label of distractor images.


@dataclasses.dataclass(frozen=True)
class TinyFaceMeta:
  """The test split, as aligned image paths and identity labels.

  Attributes:
    image_paths: [n] aligned crops: the probes, then the gallery matches,
      then the distractors.
    labels: [n] int64 identities; `DISTRACTOR` for distractors.
    num_probes: the first `num_probes` images are the probes.
  """

  image_paths: list[str]
  labels: np.ndarray
  num_probes: int

  @property
  def probe_labels(self) -> np.ndarray:
    return self.labels[:self.num_probes]

  @property
  def gallery_labels(self) -> np.ndarray:
    return self.labels[self.num_probes:]


def _list_split(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    raise sources.DataError(f"TinyFace folder {folder!r} does not exist")
  names = sorted(name for name in os.listdir(folder)
                 if name.lower().endswith(sources.IMAGE_EXTENSIONS)
                 and not name.startswith("."))
  if not names:
    raise sources.DataError(f"TinyFace folder {folder!r} holds no images")
  return names


def _stem(name: str) -> str:
  return os.path.splitext(os.path.basename(name))[0]


def _identity(name: str, folder: str) -> int:
  match = re.match(r"(\d+)_", name)
  if not match:
    raise sources.DataError(
        f"{os.path.join(folder, name)!r}: the file name does not start with "
        "an integer identity and '_'")
  return int(match.group(1))


def _index_aligned(aligned_root: str) -> dict[str, str]:
  """File stem -> path of every image under `aligned_root`."""
  if not os.path.isdir(aligned_root):
    raise sources.DataError(
        f"aligned TinyFace folder {aligned_root!r} does not exist")
  found = {}
  for folder, subfolders, names in os.walk(aligned_root):
    subfolders.sort()
    for name in sorted(names):
      if name.lower().endswith(sources.IMAGE_EXTENSIONS):
        found.setdefault(_stem(name), os.path.join(folder, name))
  return found


def read_meta(root: str,
              alignment_dir: str = DEFAULT_ALIGNMENT_DIR) -> TinyFaceMeta:
  """Lists the test split of `root` (layout in the module doc).

  Raises:
    sources.DataError: a missing folder, a probe or match whose name holds
      no identity, an image without an aligned crop, or no probe with a mate.
  """
  protocol = os.path.join(root, PROTOCOL_DIR)
  aligned = _index_aligned(os.path.join(root, alignment_dir))
  paths, labels, num_probes = [], [], 0
  for split in SPLITS:
    folder = os.path.join(protocol, split)
    for name in _list_split(folder):
      path = aligned.get(_stem(name))
      if path is None:
        raise sources.DataError(
            f"{os.path.join(folder, name)!r} has no aligned crop named "
            f"{_stem(name)}.* under {os.path.join(root, alignment_dir)!r}")
      paths.append(path)
      labels.append(DISTRACTOR if split == "Gallery_Distractor"
                    else _identity(name, folder))
    if split == "Probe":
      num_probes = len(paths)

  labels = np.array(labels, np.int64)
  if not np.isin(labels[:num_probes], labels[num_probes:]).any():
    raise sources.DataError(
        f"no probe of {protocol!r} has a mate in Gallery_Match")
  return TinyFaceMeta(paths, labels, num_probes)


def identification(probe_features: np.ndarray, probe_labels: np.ndarray,
                   gallery_features: np.ndarray, gallery_labels: np.ndarray,
                   ranks: tuple[int, ...] = RANKS,
                   chunk_rows: int = 64) -> dict[str, Any]:
  """Closed-set rank-k rates of probes searched against a gallery.

  Args:
    probe_features: [p, dim] unit features.
    probe_labels: [p] identities.
    gallery_features: [g, dim] unit features of matches and distractors.
    gallery_labels: [g] identities; `DISTRACTOR` never matches.
    ranks: the k to report.
    chunk_rows: probes scored at once (bounds the [chunk, g] score matrix).

  Returns:
    {"rank_<k>": rate in [0, 1], "mated_probes": count, "probes": count}.
  """
  gallery_labels = np.asarray(gallery_labels)
  gallery_features = np.asarray(gallery_features, np.float32)
  mate_ranks = []
  for start in range(0, len(probe_features), chunk_rows):
    probes = np.asarray(probe_features[start:start + chunk_rows], np.float32)
    similarity = probes @ gallery_features.T
    is_mate = ((probe_labels[start:start + chunk_rows, None]
                == gallery_labels[None, :])
               & (gallery_labels[None, :] != DISTRACTOR))
    mate_ranks.append(verification.mate_ranks(similarity, is_mate))
  mate_ranks = np.concatenate(mate_ranks)
  rates = verification.identification_rates(mate_ranks, ranks)
  figures = {f"rank_{k}": rate for k, rate in rates.items()}
  figures.update(mated_probes=int(np.sum(mate_ranks > 0)),
                 probes=int(len(mate_ranks)))
  return figures


def evaluate(embedder: inference.Embedder, meta: TinyFaceMeta,
             feature_dir: str, *, flip_fusion: str = "norm_add"
             ) -> dict[str, Any]:
  """Embeds (or reuses) the split's features and reports rank-1/5/20."""
  items = [(path, None) for path in meta.image_paths]
  load = pipeline.LoadEvalFace(embedder.image_size, "none")
  columns = inference.embed_to_disk(embedder, items, load, feature_dir,
                                    desc="tinyface")
  features = np.empty(columns["embeddings"].shape, np.float32)
  # Fusing in chunks keeps the float64 intermediates small.
  for start in range(0, len(features), 1 << 16):
    rows = slice(start, start + (1 << 16))
    features[rows] = inference.fused_embeddings(
        {name: value[rows] for name, value in columns.items()}, flip_fusion)
  figures = identification(
      features[:meta.num_probes], meta.probe_labels,
      features[meta.num_probes:], meta.gallery_labels)
  figures.update(gallery=int(len(meta.gallery_labels)),
                 distractors=int(np.sum(meta.gallery_labels == DISTRACTOR)),
                 flip_fusion=flip_fusion)
  return figures


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """One row per set: probes, gallery size and rank-k rates in %."""
  header = ["set", "probes", "gallery"] + [f"rank-{k}" for k in RANKS]
  rows = []
  for name, figures in results.items():
    rows.append([name, str(figures["mated_probes"]), str(figures["gallery"])]
                + [f"{100 * figures[f'rank_{k}']:.2f}" for k in RANKS])
  return verification.format_columns(header, rows)
