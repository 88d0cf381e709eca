"""IJB-B and IJB-C: template verification (1:1) and identification (1:N).

Data layout, as the insightface IJB release ships it (`<p>` is `ijbb` or
`ijbc`; galleries are S1/S2 for IJB-B and G1/G2 for IJB-C):

  <root>/IJBB|IJBC/loose_crop/<image>          loose face crops, not aligned
  <root>/IJBB|IJBC/meta/<p>_face_tid_mid.txt   "<image> <template> <media>"
  <root>/IJBB|IJBC/meta/<p>_name_5pts_score.txt
      "<image> x1 y1 ... x5 y5 <faceness>", same rows in the same order
  <root>/IJBB|IJBC/meta/<p>_template_pair_label.txt
      "<template1> <template2> <1 genuine | 0 impostor>"
  <root>/IJBB|IJBC/meta/<p>_1N_gallery_<G1|S1>.csv, ..._<G2|S2>.csv,
  <root>/IJBB|IJBC/meta/<p>_1N_probe_mixed.csv
      comma-separated with a header row: template id, subject id, ...

(the 1:N files are optional). A row of the face list is one image in one
template; rows, not files, are the unit of the protocol.

Protocol. Each loose crop is aligned with its five landmarks onto the
112x112 template and embedded with its horizontal flip. An image's feature
keeps its norm: for the default "norm_add" flip fusion it is the sum of the
two raw features (unit embedding times feature norm), which is AdaFace's
fused unit vector multiplied back by its fused norm. The two scoring
protocols differ only in the weight of each image:

  adaface:      the feature as is (norm-weighted, faceness unused), as the
                AdaFace evaluation script does;
  insightface:  the feature times the detector's faceness score, as the
                insightface scripts do by default.

Images of one media (video) in a template are averaged, the media features
are summed and the sum is L2-normalised into the template feature. 1:1:
cosine of the two templates of each listed pair; TAR is read at the ROC
point whose FAR is nearest to each of 1e-6 ... 1e-1. 1:N, for each of the
two galleries: probes whose subject the gallery holds are mated, the others
non-mated; rank-k is the share of mated probes whose mate is within the top
k (pooled over both galleries); TPIR at an FPIR is the share of mated probes
whose mate scores first and above the threshold that lets that share of the
non-mated probes' best scores through, averaged over the two galleries (as
insightface's `ijb_evals.py -N`).

Colour order is the model's (BGR for AdaFace models) under either
protocol. Features stream to `<feature_dir>` (see `inference.embed_to_disk`)
so the 469k IJB-C images never sit in host memory together, and a rerun
with the same weights reuses them.
"""

import csv
import dataclasses
import os
from typing import Any

import numpy as np

from adaface_jax import inference
from adaface_jax import verification
from data_pipeline import pipeline
from data_pipeline import sources

GALLERIES = {"IJBB": ("S1", "S2"), "IJBC": ("G1", "G2")}
PROTOCOLS = ("adaface", "insightface")
FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIR_TARGETS = (0.01, 0.1)
RANKS = (1, 5, 10)

# Keeps an all-zero template feature finite.
_NORM_FLOOR = 1e-12
# Rows of features or pairs handled at once, to bound host memory.
_CHUNK_ROWS = 1 << 14


@dataclasses.dataclass(frozen=True)
class Identification:
  """The 1:N lists, one entry per template.

  Attributes:
    gallery_templates: gallery name ("G1", "S2", ...) -> [g] sorted
      template ids.
    gallery_subjects: gallery name -> [g] subject id of each template.
    probe_templates: [p] sorted template ids of the mixed probes.
    probe_subjects: [p] subject id of each probe template.
  """

  gallery_templates: dict[str, np.ndarray]
  gallery_subjects: dict[str, np.ndarray]
  probe_templates: np.ndarray
  probe_subjects: np.ndarray


@dataclasses.dataclass(frozen=True)
class IjbMeta:
  """One IJB subset's lists.

  Attributes:
    subset: "IJBB" or "IJBC".
    image_paths: [n] absolute paths of the loose crops, one per row.
    landmarks: [n, 10] float32 x1, y1, ..., x5, y5 in crop pixels.
    faceness: [n] float32 detector scores.
    templates: [n] int64 template id of each row.
    medias: [n] int64 media id of each row.
    pairs: [num_pairs, 2] int64 template ids.
    pair_labels: [num_pairs] bool, True for genuine pairs.
    identification: the 1:N lists, or None when the files are absent.
  """

  subset: str
  image_paths: list[str]
  landmarks: np.ndarray
  faceness: np.ndarray
  templates: np.ndarray
  medias: np.ndarray
  pairs: np.ndarray
  pair_labels: np.ndarray
  identification: Identification | None


def _meta_path(root: str, subset: str, name: str) -> str:
  return os.path.join(root, subset, "meta", f"{subset.lower()}_{name}")


def _check_subset(subset: str) -> None:
  if subset not in GALLERIES:
    raise ValueError(
        f"unknown IJB subset {subset!r}; choose one of {sorted(GALLERIES)}")


def _read_table(path: str, num_fields: int,
                dtype) -> tuple[list[str], np.ndarray]:
  """A name column and `num_fields - 1` numeric columns per line.

  Returns:
    (names, [rows, num_fields - 1] numbers). The numbers are parsed by
    numpy's C reader: the IJB-C lists have 469k lines.
  """
  if not os.path.isfile(path):
    raise sources.DataError(f"IJB list {path!r} does not exist")
  names = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) != num_fields:
        raise sources.DataError(
            f"{path}:{number}: expected {num_fields} fields, got "
            f"{len(fields)}: {line.strip()!r}")
      names.append(fields[0])
  if not names:
    raise sources.DataError(f"IJB list {path!r} is empty")
  try:
    numbers = np.loadtxt(path, dtype=dtype, usecols=range(1, num_fields),
                         ndmin=2)
  except ValueError as e:
    raise sources.DataError(f"{path}: non-numeric field ({e})") from None
  return names, numbers


def _read_pairs(path: str) -> tuple[np.ndarray, np.ndarray]:
  """[num_pairs, 2] template ids and [num_pairs] bool labels."""
  if not os.path.isfile(path):
    raise sources.DataError(f"IJB pair list {path!r} does not exist")
  try:
    # loadtxt parses the 15.7M IJB-C lines in C; a Python loop would not.
    table = np.loadtxt(path, dtype=np.int64, ndmin=2)
  except ValueError as e:
    raise sources.DataError(f"{path}: malformed pair list ({e})") from None
  if table.shape[1] != 3 or table.shape[0] == 0:
    raise sources.DataError(
        f"{path}: expected rows '<template1> <template2> <label>', got "
        f"{table.shape[1]} columns")
  labels = table[:, 2]
  if not np.all((labels == 0) | (labels == 1)):
    raise sources.DataError(
        f"{path}: labels must be 0 or 1, got {np.unique(labels)}")
  return table[:, :2], labels.astype(bool)


def _read_template_subjects(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Unique templates (sorted) and their subject ids from a 1:N CSV."""
  templates, subjects = [], []
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    next(reader, None)  # The header row.
    for number, row in enumerate(reader, start=2):
      if not row:
        continue
      try:
        templates.append(int(row[0]))
        subjects.append(int(row[1]))
      except (IndexError, ValueError):
        raise sources.DataError(
            f"{path}:{number}: expected '<template>,<subject>,...', got "
            f"{row}") from None
  if not templates:
    raise sources.DataError(f"1:N list {path!r} is empty")
  templates, subjects = np.array(templates), np.array(subjects)
  unique, first = np.unique(templates, return_index=True)
  for template in unique:
    if len(np.unique(subjects[templates == template])) > 1:
      raise sources.DataError(
          f"{path}: template {template} is listed with several subjects")
  return unique, subjects[first]


def _read_identification(root: str, subset: str) -> Identification | None:
  names = [f"1N_gallery_{g}.csv" for g in GALLERIES[subset]]
  names.append("1N_probe_mixed.csv")
  paths = [_meta_path(root, subset, name) for name in names]
  present = [os.path.isfile(p) for p in paths]
  if not any(present):
    return None
  if not all(present):
    missing = [p for p, here in zip(paths, present) if not here]
    raise sources.DataError(f"incomplete IJB 1:N lists: missing {missing}")
  gallery_templates, gallery_subjects = {}, {}
  for gallery, path in zip(GALLERIES[subset], paths):
    gallery_templates[gallery], gallery_subjects[gallery] = (
        _read_template_subjects(path))
  probe_templates, probe_subjects = _read_template_subjects(paths[-1])
  return Identification(gallery_templates, gallery_subjects,
                        probe_templates, probe_subjects)


def read_meta(root: str, subset: str) -> IjbMeta:
  """Reads the lists of `<root>/<subset>` (the layout in the module doc).

  Raises:
    sources.DataError: naming the file (and line) of a missing or malformed
      list, rows of the two image lists that disagree, or pairs and 1:N
      templates that no image belongs to.
  """
  _check_subset(subset)
  face_path = _meta_path(root, subset, "face_tid_mid.txt")
  landmark_path = _meta_path(root, subset, "name_5pts_score.txt")
  images, ids = _read_table(face_path, 3, np.int64)
  point_images, points = _read_table(landmark_path, 12, np.float32)
  if len(images) != len(point_images):
    raise sources.DataError(
        f"{face_path} has {len(images)} rows but {landmark_path} "
        f"{len(point_images)}; they must list the same images in the same "
        "order")
  for number, (image, point_image) in enumerate(
      zip(images, point_images), start=1):
    if image != point_image:
      raise sources.DataError(
          f"row {number} names {image!r} in {face_path} but "
          f"{point_image!r} in {landmark_path}")

  crops = os.path.join(root, subset, "loose_crop")
  image_paths = [os.path.join(crops, image) for image in images]
  templates, medias = ids[:, 0], ids[:, 1]
  landmarks, faceness = points[:, :10], points[:, 10]

  pairs_path = _meta_path(root, subset, "template_pair_label.txt")
  pairs, pair_labels = _read_pairs(pairs_path)
  _check_known(pairs.ravel(), templates, pairs_path)
  identification = _read_identification(root, subset)
  if identification is not None:
    for gallery, ids in identification.gallery_templates.items():
      _check_known(ids, templates, f"the 1:N gallery {gallery}")
    _check_known(identification.probe_templates, templates,
                 "the 1:N probe list")
  return IjbMeta(subset, image_paths, landmarks, faceness, templates, medias,
                 pairs, pair_labels, identification)


def _check_known(ids: np.ndarray, templates: np.ndarray, where: str) -> None:
  unknown = np.setdiff1d(ids, templates)
  if unknown.size:
    raise sources.DataError(
        f"{where} names {unknown.size} templates no image belongs to, e.g. "
        f"{unknown[:5].tolist()}")


def write_meta(root: str, subset: str, images: list[str],
               landmarks: np.ndarray, faceness: np.ndarray,
               templates: np.ndarray, medias: np.ndarray, pairs: np.ndarray,
               pair_labels: np.ndarray,
               identification: Identification | None = None) -> None:
  """Writes the meta lists of `<root>/<subset>` in the release format.

  The inverse of `read_meta` for the lists (the images themselves go to
  `<root>/<subset>/loose_crop/<image>`, which the caller provides).

  Args:
    root: the release root.
    subset: "IJBB" or "IJBC".
    images: [n] file names relative to `loose_crop`, one per row.
    landmarks: [n, 10] five-point landmarks in crop pixels.
    faceness: [n] detector scores.
    templates, medias: [n] integer ids of each row.
    pairs: [num_pairs, 2] template ids; pair_labels: [num_pairs] 0/1.
    identification: optional 1:N lists (one row per template is written).
  """
  _check_subset(subset)
  meta = os.path.join(root, subset, "meta")
  os.makedirs(meta, exist_ok=True)
  landmarks = np.asarray(landmarks, np.float64).reshape(len(images), 10)
  with open(_meta_path(root, subset, "face_tid_mid.txt"), "w") as f:
    for image, template, media in zip(images, templates, medias):
      f.write(f"{image} {int(template)} {int(media)}\n")
  with open(_meta_path(root, subset, "name_5pts_score.txt"), "w") as f:
    for image, points, score in zip(images, landmarks, faceness):
      coordinates = " ".join(f"{x:.3f}" for x in points)
      f.write(f"{image} {coordinates} {float(score):.3f}\n")
  with open(_meta_path(root, subset, "template_pair_label.txt"), "w") as f:
    for (first, second), label in zip(pairs, pair_labels):
      f.write(f"{int(first)} {int(second)} {int(label)}\n")
  if identification is None:
    return

  def write_list(name, ids, subjects):
    with open(_meta_path(root, subset, name), "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["TEMPLATE_ID", "SUBJECT_ID"])
      writer.writerows([int(t), int(s)] for t, s in zip(ids, subjects))

  for gallery in GALLERIES[subset]:
    write_list(f"1N_gallery_{gallery}.csv",
               identification.gallery_templates[gallery],
               identification.gallery_subjects[gallery])
  write_list("1N_probe_mixed.csv", identification.probe_templates,
             identification.probe_subjects)


# Image and template features.


class ImageFeatures:
  """The per-image features of one protocol, computed on slicing.

  Wraps the backbone columns (memory maps on disk) so that template pooling
  can read them chunk by chunk: `features[start:stop]` is a [rows, dim]
  float64 array.

  Attributes:
    flip_fusion: "norm_add" (sum of the raw features of image and flip, so
      the norm is kept), "add" (sum of the unit embeddings, normalised: the
      norm is dropped) or "none" (the image's raw feature).
    weights: optional [n] per-image factors (the faceness scores).
  """

  def __init__(self, columns: dict[str, np.ndarray], flip_fusion: str,
               weights: np.ndarray | None = None):
    if flip_fusion not in inference.FLIP_FUSIONS:
      raise ValueError(
          f"unknown flip fusion {flip_fusion!r}; choose one of "
          f"{inference.FLIP_FUSIONS}")
    if flip_fusion != "none" and "flipped_embeddings" not in columns:
      raise ValueError(
          f"flip fusion {flip_fusion!r} needs the flipped images' features")
    self._columns = columns
    self.flip_fusion = flip_fusion
    self.weights = weights
    self.shape = columns["embeddings"].shape

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, rows: slice) -> np.ndarray:
    names = inference.COLUMNS if self.flip_fusion != "none" else (
        inference.COLUMNS[:2])
    chunk = {name: np.asarray(self._columns[name][rows], np.float64)
             for name in names}
    if self.flip_fusion == "add":
      features = inference.fused_embeddings(chunk, "add")
    else:
      features = chunk["embeddings"] * chunk["feature_norms"][:, None]
      if self.flip_fusion == "norm_add":
        features = features + (chunk["flipped_embeddings"]
                               * chunk["flipped_feature_norms"][:, None])
    if self.weights is not None:
      features = features * np.asarray(self.weights[rows],
                                        np.float64)[:, None]
    return features


def _l2_normalize(features: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  return features / np.maximum(norms, _NORM_FLOOR)


def _sum_by_group(values: np.ndarray, groups: np.ndarray, sums: np.ndarray):
  """sums[g] += sum of the rows of `values` whose group is g."""
  order = np.argsort(groups, kind="stable")
  sorted_groups = groups[order]
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
  sums[sorted_groups[starts]] += np.add.reduceat(values[order], starts, axis=0)


def template_features(image_features, templates: np.ndarray,
                      medias: np.ndarray,
                      chunk_rows: int = _CHUNK_ROWS
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Pools image features into unit template features.

  Within a template, the images of each media are averaged; the media
  averages are summed and the sum is L2-normalised.

  Args:
    image_features: [n, dim] array, or anything sliceable by row ranges
      that has `shape` (e.g. `ImageFeatures`); read in chunks.
    templates: [n] template id of each row.
    medias: [n] media id of each row.
    chunk_rows: rows read at once.

  Returns:
    (template ids [t] sorted, features [t, dim] float64 unit rows).
  """
  templates = np.asarray(templates, np.int64)
  medias = np.asarray(medias, np.int64)
  num_images, dim = image_features.shape
  if templates.shape != (num_images,) or medias.shape != (num_images,):
    raise ValueError(
        f"templates {templates.shape} and medias {medias.shape} must give "
        f"one id per image ({num_images})")

  media_keys, media_of_image = np.unique(
      np.stack([templates, medias], axis=1), axis=0, return_inverse=True)
  media_of_image = media_of_image.reshape(-1)
  media_sums = np.zeros((len(media_keys), dim))
  for start in range(0, num_images, chunk_rows):
    rows = slice(start, min(start + chunk_rows, num_images))
    _sum_by_group(np.asarray(image_features[rows], np.float64),
                  media_of_image[rows], media_sums)
  media_counts = np.bincount(media_of_image, minlength=len(media_keys))
  media_means = media_sums / media_counts[:, None]

  template_ids, template_of_media = np.unique(media_keys[:, 0],
                                              return_inverse=True)
  template_sums = np.zeros((len(template_ids), dim))
  _sum_by_group(media_means, template_of_media.reshape(-1), template_sums)
  return template_ids, _l2_normalize(template_sums)


def _rows_of(template_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Row of each id in the sorted `template_ids`; every id must be there."""
  rows = np.searchsorted(template_ids, ids)
  rows = np.minimum(rows, len(template_ids) - 1)
  unknown = template_ids[rows] != ids
  if np.any(unknown):
    raise ValueError(
        f"{int(unknown.sum())} template ids have no features, e.g. "
        f"{ids[unknown][:5].tolist()}")
  return rows


def pair_scores(template_ids: np.ndarray, features: np.ndarray,
                pairs: np.ndarray) -> np.ndarray:
  """Cosine similarity of each pair of templates.

  Args:
    template_ids: [t] sorted ids, from `template_features`.
    features: [t, dim] unit template features.
    pairs: [num_pairs, 2] template ids.

  Returns:
    [num_pairs] float64 scores in [-1, 1].
  """
  pairs = np.asarray(pairs, np.int64)
  scores = np.empty(len(pairs))
  for start in range(0, len(pairs), _CHUNK_ROWS):
    chunk = pairs[start:start + _CHUNK_ROWS]
    first = features[_rows_of(template_ids, chunk[:, 0])]
    second = features[_rows_of(template_ids, chunk[:, 1])]
    scores[start:start + len(chunk)] = np.einsum("ij,ij->i", first, second)
  return scores


def verification_figures(scores: np.ndarray, labels: np.ndarray
                         ) -> tuple[dict[str, Any], verification.Roc]:
  """TAR at each of `FAR_TARGETS` (nearest ROC point) and the ROC."""
  roc = verification.roc_curve(scores, labels)
  tars = verification.tar_at_far(roc, FAR_TARGETS)
  figures = {
      "tar_at_far": {f"{far:.0e}": float(tar)
                     for far, tar in zip(FAR_TARGETS, tars)},
      "pairs": int(len(labels)),
      "genuine_pairs": int(np.sum(labels)),
  }
  return figures, roc


@dataclasses.dataclass(frozen=True)
class GallerySearch:
  """One gallery's 1:N search results.

  Attributes:
    mate_ranks: [num_mated] rank of each mated probe's mate (1 is top).
    mate_first: [num_mated] True when the mate outscores every non-mate.
    mate_scores: [num_mated] the mate's score.
    nonmated_best: [num_nonmated] best score of each non-mated probe.
  """

  mate_ranks: np.ndarray
  mate_first: np.ndarray
  mate_scores: np.ndarray
  nonmated_best: np.ndarray

  def tpir_at_fpir(self, fpir: float) -> tuple[float, float] | None:
    """(TPIR, threshold) at `fpir`, or None without non-mated probes.

    The threshold is the k-th highest non-mated best score with k =
    int(num_nonmated * fpir) (at least 1), as insightface computes it; a
    mated probe counts when its mate is first and scores strictly above.
    """
    if not self.nonmated_best.size or not self.mate_scores.size:
      return None
    best = np.sort(self.nonmated_best)[::-1]
    threshold = best[max(int(best.size * fpir) - 1, 0)]
    hits = self.mate_first & (self.mate_scores > threshold)
    return float(np.mean(hits)), float(threshold)


def search_gallery(probe_features: np.ndarray, probe_subjects: np.ndarray,
                   gallery_features: np.ndarray,
                   gallery_subjects: np.ndarray) -> GallerySearch:
  """Scores every probe against one gallery (cosine of unit features).

  Args:
    probe_features: [p, dim] unit template features.
    probe_subjects: [p] subject ids.
    gallery_features: [g, dim] unit template features.
    gallery_subjects: [g] subject ids, each at most once.
  """
  subjects, counts = np.unique(gallery_subjects, return_counts=True)
  if np.any(counts > 1):
    raise ValueError(
        f"gallery subjects must be unique; {subjects[counts > 1][:5].tolist()} "
        "have several templates")
  ranks, firsts, mate_scores, nonmated = [], [], [], []
  for start in range(0, len(probe_features), 4096):
    similarity = probe_features[start:start + 4096] @ gallery_features.T
    subjects_chunk = probe_subjects[start:start + 4096]
    is_mate = subjects_chunk[:, None] == gallery_subjects[None, :]
    mated = is_mate.any(axis=1)
    chunk_ranks = verification.mate_ranks(similarity, is_mate)
    mate_score = np.where(is_mate, similarity, -np.inf).max(axis=1)
    nonmate_best = np.where(is_mate, -np.inf, similarity).max(axis=1)
    ranks.append(chunk_ranks[mated])
    firsts.append((mate_score > nonmate_best)[mated])
    mate_scores.append(mate_score[mated])
    nonmated.append(similarity[~mated].max(axis=1, initial=-np.inf))
  return GallerySearch(np.concatenate(ranks), np.concatenate(firsts),
                       np.concatenate(mate_scores), np.concatenate(nonmated))


def identification_figures(searches: dict[str, GallerySearch]
                           ) -> dict[str, Any]:
  """Rank-k pooled over the galleries, TPIR@FPIR averaged over them."""
  ranks = np.concatenate([s.mate_ranks for s in searches.values()])
  figures = {"mated_probes": {g: int(s.mate_ranks.size)
                              for g, s in searches.items()},
             "nonmated_probes": {g: int(s.nonmated_best.size)
                                 for g, s in searches.items()}}
  if ranks.size:
    rates = verification.identification_rates(ranks, RANKS)
    figures.update({f"rank_{k}": rate for k, rate in rates.items()})
  tpirs = {}
  for fpir in FPIR_TARGETS:
    per_gallery = [s.tpir_at_fpir(fpir) for s in searches.values()]
    if all(value is not None for value in per_gallery):
      tpirs[f"{fpir:g}"] = float(np.mean([v[0] for v in per_gallery]))
  figures["tpir_at_fpir"] = tpirs
  return figures


def identify(template_ids: np.ndarray, features: np.ndarray,
             lists: Identification) -> dict[str, Any]:
  """The 1:N figures of one protocol's template features."""
  probe_features = features[_rows_of(template_ids, lists.probe_templates)]
  searches = {}
  for gallery, ids in lists.gallery_templates.items():
    searches[gallery] = search_gallery(
        probe_features, lists.probe_subjects,
        features[_rows_of(template_ids, ids)],
        lists.gallery_subjects[gallery])
  return identification_figures(searches)


# The whole protocol.


def embed_meta(embedder: inference.Embedder, meta: IjbMeta,
               feature_dir: str) -> dict[str, np.ndarray]:
  """Aligns and embeds every row's crop into `feature_dir` (reused)."""
  items = list(zip(meta.image_paths, meta.landmarks))
  load = pipeline.LoadEvalFace(embedder.image_size, "landmarks")
  return inference.embed_to_disk(embedder, items, load, feature_dir,
                                 desc=meta.subset)


def evaluate_features(columns: dict[str, np.ndarray], meta: IjbMeta, *,
                      flip_fusion: str = "norm_add",
                      protocols: tuple[str, ...] = PROTOCOLS
                      ) -> tuple[dict[str, Any], dict[str, verification.Roc]]:
  """Scores both protocols from the per-image backbone columns.

  Returns:
    ({protocol: {"tar_at_far": {...}, "rank_1": ..., "tpir_at_fpir":
    {...}, ...}}, {protocol: ROC of the 1:1 pairs}).
  """
  unknown = set(protocols) - set(PROTOCOLS)
  if unknown:
    raise ValueError(
        f"unknown IJB protocols {sorted(unknown)}; choose from {PROTOCOLS}")
  figures, rocs = {}, {}
  for protocol in protocols:
    weights = meta.faceness if protocol == "insightface" else None
    features = ImageFeatures(columns, flip_fusion, weights)
    template_ids, template_feats = template_features(
        features, meta.templates, meta.medias)
    scores = pair_scores(template_ids, template_feats, meta.pairs)
    figures[protocol], rocs[protocol] = verification_figures(
        scores, meta.pair_labels)
    if meta.identification is not None:
      figures[protocol].update(
          identify(template_ids, template_feats, meta.identification))
  return figures, rocs


def evaluate(embedder: inference.Embedder, meta: IjbMeta, feature_dir: str,
             *, flip_fusion: str = "norm_add",
             protocols: tuple[str, ...] = PROTOCOLS
             ) -> tuple[dict[str, Any], dict[str, verification.Roc]]:
  """Embeds (or reuses) the features of `meta` and scores the protocols."""
  columns = embed_meta(embedder, meta, feature_dir)
  figures, rocs = evaluate_features(columns, meta, flip_fusion=flip_fusion,
                                    protocols=protocols)
  for protocol in figures:
    figures[protocol]["images"] = len(meta.image_paths)
    figures[protocol]["templates"] = int(len(np.unique(meta.templates)))
  return figures, rocs


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """Text tables in %: 1:1 TAR at each FAR, then (when any set has 1:N
  lists) rank-k and TPIR at each FPIR; one row per (set, protocol).

  Args:
    results: set name -> {protocol: figures from `evaluate`}.
  """
  names = [(f"{name} / {protocol}", figures)
           for name, protocols in results.items()
           for protocol, figures in protocols.items()]
  verification_rows = [
      [label] + [_percent(figures["tar_at_far"].get(f"{far:.0e}"))
                 for far in FAR_TARGETS]
      for label, figures in names]
  tables = [verification.format_columns(
      ["1:1 set / protocol"] + [f"TAR@{far:.0e}" for far in FAR_TARGETS],
      verification_rows)]

  identified = [(label, figures) for label, figures in names
                if "tpir_at_fpir" in figures]
  if identified:
    rows = [[label] + [_percent(figures.get(f"rank_{k}")) for k in RANKS]
            + [_percent(figures["tpir_at_fpir"].get(f"{fpir:g}"))
               for fpir in FPIR_TARGETS]
            for label, figures in identified]
    tables.append(verification.format_columns(
        ["1:N set / protocol"] + [f"rank-{k}" for k in RANKS]
        + [f"TPIR@{fpir:g}" for fpir in FPIR_TARGETS], rows))
  return "\n\n".join(tables)


def _percent(value: float | None) -> str:
  return "-" if value is None else f"{100 * value:.2f}"
