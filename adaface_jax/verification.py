"""Face verification on image pairs: flip fusion, k-fold accuracy, VAL@FAR.

The protocol is the one the field reports on LFW, CFP-FP, AgeDB-30, CALFW and
CPLFW. Every image is embedded with and without a horizontal flip and the two
are fused into one unit vector. A pair's score is the squared L2 distance
between its two fused vectors (0 to 4), and a pair is predicted "same" when
that distance is below a threshold. The threshold is chosen by k-fold cross
validation over contiguous folds of pairs. Also here: ROC curves and the
true accept rate at fixed false accept rates (the IJB 1:1 protocol), the
mate ranks of 1:N identification (IJB 1:N, TinyFace), reading and writing
LFW `pairs.txt` files, and text tables of the results.

Everything runs on the host in numpy, in float64.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import os
import re

import numpy as np

FUSION_METHODS = ("norm_add", "add")

# The reference grids: 0.00 to 3.99 for accuracy, a finer one for VAL@FAR.
ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)

# Keeps a fused vector finite if a feature and its flip cancel exactly.
_NORM_FLOOR = 1e-12

MatchedPair = tuple[str, int, int]
MismatchedPair = tuple[str, int, str, int]
PairSet = tuple[Sequence[MatchedPair], Sequence[MismatchedPair]]


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
  """Scales each row of an [n, dim] array to unit L2 norm (float64)."""
  embeddings = np.asarray(embeddings, np.float64)
  norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
  return embeddings / np.maximum(norms, _NORM_FLOOR)


def _as_embeddings(name: str, embeddings: np.ndarray) -> np.ndarray:
  embeddings = np.asarray(embeddings, np.float64)
  if embeddings.ndim != 2:
    raise ValueError(
        f"{name} must be [num_images, embedding_dim], got shape "
        f"{embeddings.shape}")
  return embeddings


def _as_norms(name: str, feature_norms: np.ndarray,
              num_images: int) -> np.ndarray:
  """Returns [num_images, 1] float64 norms from [n] or [n, 1] input."""
  if feature_norms is None:
    raise ValueError(f"{name} is required for method 'norm_add'")
  feature_norms = np.asarray(feature_norms, np.float64)
  if feature_norms.shape not in ((num_images,), (num_images, 1)):
    raise ValueError(
        f"{name} must be [{num_images}] or [{num_images}, 1], got shape "
        f"{feature_norms.shape}")
  return feature_norms.reshape(num_images, 1)


def fuse_flip(embeddings: np.ndarray,
              feature_norms: np.ndarray | None,
              flipped_embeddings: np.ndarray | None,
              flipped_norms: np.ndarray | None,
              method: str = "norm_add") -> np.ndarray:
  """Fuses the features of images and their horizontal flips.

  Args:
    embeddings: [n, dim] unit embeddings of the images, as the backbone
      returns them.
    feature_norms: [n] or [n, 1] L2 norms of the features before
      normalisation; needed by "norm_add" only.
    flipped_embeddings: [n, dim] unit embeddings of the flipped images, or
      None when the flip is not used.
    flipped_norms: [n] or [n, 1] norms of the flipped features; needed by
      "norm_add" only.
    method: "norm_add" adds `embedding * norm` of the image and of its flip
      (the raw features, so the more confident view weighs more), as the
      AdaFace reference does; "add" adds the two unit embeddings.

  Returns:
    [n, dim] float64 unit embeddings. Without a flip: `embeddings`
    renormalised.
  """
  if method not in FUSION_METHODS:
    raise ValueError(
        f"unknown fusion method {method!r}; choose one of {FUSION_METHODS}")
  embeddings = _as_embeddings("embeddings", embeddings)
  if flipped_embeddings is None:
    return l2_normalize(embeddings)

  flipped_embeddings = _as_embeddings("flipped_embeddings", flipped_embeddings)
  if flipped_embeddings.shape != embeddings.shape:
    raise ValueError(
        f"flipped_embeddings has shape {flipped_embeddings.shape}, "
        f"embeddings {embeddings.shape}; they must match")

  if method == "add":
    fused = l2_normalize(embeddings) + l2_normalize(flipped_embeddings)
  else:
    num_images = len(embeddings)
    fused = (
        embeddings * _as_norms("feature_norms", feature_norms, num_images)
        + flipped_embeddings
        * _as_norms("flipped_norms", flipped_norms, num_images))
  return l2_normalize(fused)


def pair_distances(embeddings1: np.ndarray,
                   embeddings2: np.ndarray) -> np.ndarray:
  """Squared L2 distance of each pair: [n, dim] x [n, dim] -> [n] float64.

  For unit embeddings this is `2 - 2 * cosine`, in [0, 4].
  """
  embeddings1 = _as_embeddings("embeddings1", embeddings1)
  embeddings2 = _as_embeddings("embeddings2", embeddings2)
  if embeddings1.shape != embeddings2.shape:
    raise ValueError(
        f"embeddings1 has shape {embeddings1.shape}, embeddings2 "
        f"{embeddings2.shape}; they must match")
  return np.sum(np.square(embeddings1 - embeddings2), axis=1)


def contiguous_folds(num_pairs: int, num_folds: int) -> list[np.ndarray]:
  """Indices of each held-out fold, contiguous and unshuffled.

  The first `num_pairs % num_folds` folds get one pair more than the others,
  as scikit-learn's `KFold(num_folds, shuffle=False)` splits them.
  """
  if num_folds < 1:
    raise ValueError(f"num_folds must be at least 1, got {num_folds}")
  if num_folds > num_pairs:
    raise ValueError(
        f"num_folds ({num_folds}) exceeds the number of pairs ({num_pairs}); "
        "every fold needs at least one pair")
  fold_sizes = np.full(num_folds, num_pairs // num_folds)
  fold_sizes[:num_pairs % num_folds] += 1
  stops = np.cumsum(fold_sizes)
  return [np.arange(stop - size, stop) for size, stop in zip(fold_sizes, stops)]


def _check_scores(distances: np.ndarray, is_same: np.ndarray,
                  thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
  """Validates and converts the inputs shared by the two protocols."""
  distances = np.asarray(distances, np.float64)
  if distances.ndim != 1 or distances.size == 0:
    raise ValueError(
        f"distances must be a non-empty [num_pairs] array, got shape "
        f"{distances.shape}")
  if not np.all(np.isfinite(distances)):
    raise ValueError(
        f"distances hold {np.sum(~np.isfinite(distances))} non-finite "
        "values; check the embeddings for NaN")

  is_same = np.asarray(is_same)
  if is_same.shape != distances.shape:
    raise ValueError(
        f"is_same has shape {is_same.shape}, distances {distances.shape}; "
        "they must match")
  if is_same.dtype != bool and not np.all((is_same == 0) | (is_same == 1)):
    raise ValueError(
        f"is_same must be booleans or 0/1, got values {np.unique(is_same)}")

  thresholds = np.asarray(thresholds, np.float64)
  if thresholds.ndim != 1 or thresholds.size == 0:
    raise ValueError(
        f"thresholds must be a non-empty 1-D array, got shape "
        f"{thresholds.shape}")
  return distances, is_same.astype(bool), thresholds


def _accept_counts(distances: np.ndarray,
                   thresholds: np.ndarray) -> np.ndarray:
  """Per threshold, how many of `distances` are strictly below it."""
  # Sorting once turns the [pairs, thresholds] comparison into a search.
  return np.searchsorted(np.sort(distances), thresholds, side="left")


def accuracy_per_threshold(distances: np.ndarray, is_same: np.ndarray,
                           thresholds: np.ndarray) -> np.ndarray:
  """Share of pairs classified right at each threshold, [num_thresholds].

  A pair is predicted "same" when its distance is strictly below the
  threshold.

  Args:
    distances: [num_pairs] squared L2 distances.
    is_same: [num_pairs] booleans, True for pairs of the same identity.
    thresholds: [num_thresholds] candidate thresholds.
  """
  return _accuracies(*_check_scores(distances, is_same, thresholds))


def _accuracies(distances: np.ndarray, is_same: np.ndarray,
                thresholds: np.ndarray) -> np.ndarray:
  true_accepts = _accept_counts(distances[is_same], thresholds)
  false_accepts = _accept_counts(distances[~is_same], thresholds)
  true_rejects = np.sum(~is_same) - false_accepts
  return (true_accepts + true_rejects) / distances.size


@dataclasses.dataclass(frozen=True)
class KFoldAccuracy:
  """Verification accuracy under k-fold threshold selection.

  Attributes:
    fold_accuracies: [num_folds] accuracy on each held-out fold, in [0, 1].
    fold_thresholds: [num_folds] distance threshold chosen for each fold.
    accuracy_mean: mean of `fold_accuracies`, the number the field reports.
    accuracy_std: population standard deviation of `fold_accuracies`.
    best_threshold: the threshold that is best on all pairs at once.
    best_threshold_accuracy: the accuracy over all pairs at that threshold,
      an optimistic bound since the threshold sees the test pairs.
  """
  fold_accuracies: np.ndarray
  fold_thresholds: np.ndarray
  accuracy_mean: float
  accuracy_std: float
  best_threshold: float
  best_threshold_accuracy: float

  @property
  def threshold_mean(self) -> float:
    """Mean of the per-fold thresholds (what the reference logs)."""
    return float(np.mean(self.fold_thresholds))


def kfold_accuracy(distances: np.ndarray,
                   is_same: np.ndarray,
                   num_folds: int = 10,
                   thresholds: np.ndarray = ACCURACY_THRESHOLDS,
                   ) -> KFoldAccuracy:
  """Accuracy with the threshold chosen on the other folds.

  The pairs are split into `num_folds` contiguous folds (see
  `contiguous_folds`). For each fold, the threshold with the highest
  accuracy on the other folds (the first one in `thresholds` on a tie) is
  applied to the held-out fold. With `num_folds=1` there is nothing to hold
  out: the single fold uses the threshold that is best on all pairs, so its
  accuracy equals `best_threshold_accuracy`.

  Args:
    distances: [num_pairs] squared L2 distances (see `pair_distances`).
    is_same: [num_pairs] booleans, True for pairs of the same identity.
    num_folds: number of folds, between 1 and num_pairs.
    thresholds: [num_thresholds] candidate thresholds, searched in order.

  Returns:
    The per-fold accuracies and thresholds and their summaries.
  """
  distances, is_same, thresholds = _check_scores(
      distances, is_same, thresholds)
  folds = contiguous_folds(distances.size, num_folds)

  all_accuracies = _accuracies(distances, is_same, thresholds)
  best = int(np.argmax(all_accuracies))

  fold_accuracies = np.zeros(num_folds)
  fold_thresholds = np.zeros(num_folds)
  for fold, test in enumerate(folds):
    train = np.ones(distances.size, bool)
    if num_folds > 1:
      train[test] = False
    train_accuracies = _accuracies(
        distances[train], is_same[train], thresholds)
    threshold = thresholds[np.argmax(train_accuracies)]
    fold_thresholds[fold] = threshold
    fold_accuracies[fold] = _accuracies(
        distances[test], is_same[test], np.array([threshold]))[0]

  return KFoldAccuracy(
      fold_accuracies=fold_accuracies,
      fold_thresholds=fold_thresholds,
      accuracy_mean=float(np.mean(fold_accuracies)),
      accuracy_std=float(np.std(fold_accuracies)),
      best_threshold=float(thresholds[best]),
      best_threshold_accuracy=float(all_accuracies[best]))


def _val_far(distances: np.ndarray, is_same: np.ndarray,
             threshold: float) -> tuple[float, float]:
  """True accept rate and false accept rate at one threshold."""
  accepted = distances < threshold
  val = np.sum(accepted & is_same) / np.sum(is_same)
  far = np.sum(accepted & ~is_same) / np.sum(~is_same)
  return float(val), float(far)


def _check_far_grid(thresholds: np.ndarray, far_target: float) -> None:
  if not 0 <= far_target <= 1:
    raise ValueError(f"far_target must be in [0, 1], got {far_target}")
  if np.any(np.diff(thresholds) <= 0):
    raise ValueError("thresholds must be strictly increasing for VAL@FAR")


def threshold_at_far(distances: np.ndarray, is_same: np.ndarray,
                     thresholds: np.ndarray, far_target: float) -> float:
  """The threshold whose false accept rate is `far_target`, interpolated.

  FAR grows with the threshold in steps. Let `low` be the last grid
  threshold with FAR <= target and `high` the next one (FAR > target): the
  result interpolates linearly between them at the target FAR. When even
  the last threshold stays within the target it is returned as is; when
  even the first exceeds it, the first is returned.

  Args:
    distances: [num_pairs] distances, with at least one different pair.
    is_same: [num_pairs] booleans.
    thresholds: [num_thresholds] strictly increasing grid.
    far_target: the wanted false accept rate, in [0, 1].
  """
  distances, is_same, thresholds = _check_scores(
      distances, is_same, thresholds)
  _check_far_grid(thresholds, far_target)
  different = distances[~is_same]
  if different.size == 0:
    raise ValueError("FAR needs at least one different pair; got none")
  fars = _accept_counts(different, thresholds) / different.size
  within = np.flatnonzero(fars <= far_target)
  if within.size == 0:
    return float(thresholds[0])
  low = within[-1]
  if low == thresholds.size - 1:
    return float(thresholds[low])

  high = low + 1
  fraction = (far_target - fars[low]) / (fars[high] - fars[low])
  return float(thresholds[low]
               + fraction * (thresholds[high] - thresholds[low]))


@dataclasses.dataclass(frozen=True)
class ValAtFar:
  """Verification rate at a fixed false accept rate, per held-out fold.

  Attributes:
    far_target: the false accept rate aimed at on the training folds.
    fold_vals: [num_folds] true accept rate on each held-out fold.
    fold_fars: [num_folds] false accept rate measured on each held-out fold.
    fold_thresholds: [num_folds] thresholds found on the training folds.
    val_mean: mean of `fold_vals`.
    val_std: population standard deviation of `fold_vals`.
    far_mean: mean of `fold_fars`.
  """
  far_target: float
  fold_vals: np.ndarray
  fold_fars: np.ndarray
  fold_thresholds: np.ndarray
  val_mean: float
  val_std: float
  far_mean: float


def val_at_far(distances: np.ndarray,
               is_same: np.ndarray,
               num_folds: int = 10,
               far_target: float = 1e-3,
               thresholds: np.ndarray = VAL_THRESHOLDS) -> ValAtFar:
  """VAL (true accept rate) at a target FAR, with k-fold thresholds.

  For each of the contiguous folds, the threshold giving FAR = `far_target`
  on the other folds is found by `threshold_at_far`, and VAL and FAR are
  measured with it on the held-out fold ("same" when distance < threshold).
  With `num_folds=1` the threshold is found on all pairs and measured on
  them too.

  This follows the insightface protocol, with two differences where it is
  ill-defined: the interpolation uses only the two grid points around the
  target (the reference interpolates over a FAR curve with repeated
  values), and when no grid threshold reaches the target the largest one
  is used (the reference falls back to 0, accepting nothing).

  Args:
    distances: [num_pairs] squared L2 distances.
    is_same: [num_pairs] booleans; every fold must hold both kinds of pair.
    num_folds: number of folds, between 1 and num_pairs.
    far_target: the false accept rate to aim at, in [0, 1].
    thresholds: [num_thresholds] strictly increasing grid.

  Returns:
    Per-fold VAL, FAR and thresholds and their summaries.
  """
  distances, is_same, thresholds = _check_scores(
      distances, is_same, thresholds)
  _check_far_grid(thresholds, far_target)
  folds = contiguous_folds(distances.size, num_folds)

  fold_vals = np.zeros(num_folds)
  fold_fars = np.zeros(num_folds)
  fold_thresholds = np.zeros(num_folds)
  for fold, test in enumerate(folds):
    train = np.ones(distances.size, bool)
    if num_folds > 1:
      train[test] = False
    if is_same[test].all() or not is_same[test].any():
      raise ValueError(
          f"fold {fold} (pairs {test[0]} to {test[-1]}) needs both same and "
          "different pairs to measure VAL and FAR")
    if is_same[train].all():
      raise ValueError(
          f"the training folds of fold {fold} hold no different pairs, so "
          "FAR is undefined there")

    threshold = threshold_at_far(
        distances[train], is_same[train], thresholds, far_target)
    fold_thresholds[fold] = threshold
    fold_vals[fold], fold_fars[fold] = _val_far(
        distances[test], is_same[test], threshold)

  return ValAtFar(
      far_target=float(far_target),
      fold_vals=fold_vals,
      fold_fars=fold_fars,
      fold_thresholds=fold_thresholds,
      val_mean=float(np.mean(fold_vals)),
      val_std=float(np.std(fold_vals)),
      far_mean=float(np.mean(fold_fars)))


def _check_labelled_scores(scores: np.ndarray,
                           is_same: np.ndarray) -> tuple[np.ndarray, ...]:
  """Validates [num_pairs] finite scores and matching labels of both kinds."""
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1 or scores.size == 0:
    raise ValueError(
        f"scores must be a non-empty [num_pairs] array, got shape "
        f"{scores.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError(
        f"scores hold {np.sum(~np.isfinite(scores))} non-finite values")
  is_same = np.asarray(is_same)
  if is_same.shape != scores.shape:
    raise ValueError(
        f"is_same has shape {is_same.shape}, scores {scores.shape}; they "
        "must match")
  if is_same.dtype != bool and not np.all((is_same == 0) | (is_same == 1)):
    raise ValueError(
        f"is_same must be booleans or 0/1, got values {np.unique(is_same)}")
  is_same = is_same.astype(bool)
  if is_same.all() or not is_same.any():
    raise ValueError(
        "a ROC needs both same and different pairs; got "
        f"{int(is_same.sum())} same of {is_same.size}")
  return scores, is_same


@dataclasses.dataclass(frozen=True)
class Roc:
  """A receiver operating characteristic of scored pairs.

  Attributes:
    fpr: [num_points] false accept rates, non-decreasing from 0 to 1.
    tpr: [num_points] true accept rates, non-decreasing from 0 to 1.
    thresholds: [num_points] decreasing score thresholds; a pair is
      accepted when its score is >= the threshold. The first is +inf
      (nothing accepted).
  """
  fpr: np.ndarray
  tpr: np.ndarray
  thresholds: np.ndarray


def roc_curve(scores: np.ndarray, is_same: np.ndarray,
              drop_intermediate: bool = True) -> Roc:
  """The ROC of similarity scores (higher is more alike), as scikit-learn's.

  One point per distinct score, in decreasing order of score, after a first
  point (0, 0) at +inf. With `drop_intermediate`, a point is dropped when
  the true and the false accept counts both step by the same amount into
  it and out of it (the middle of a straight run), as scikit-learn does by
  default. The IJB protocols read TAR off that reduced curve, so the option
  changes reported numbers.

  Args:
    scores: [num_pairs] similarity scores.
    is_same: [num_pairs] booleans; both kinds must occur.
    drop_intermediate: drop the middle points of straight runs.
  """
  scores, is_same = _check_labelled_scores(scores, is_same)
  # Stable sort, reversed: the order scikit-learn uses.
  order = np.argsort(scores, kind="mergesort")[::-1]
  scores, is_same = scores[order], is_same[order]
  last_of_score = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
  true_accepts = np.cumsum(is_same)[last_of_score]
  false_accepts = 1 + last_of_score - true_accepts
  thresholds = scores[last_of_score]

  if drop_intermediate and thresholds.size > 2:
    corners = np.r_[True, np.logical_or(np.diff(false_accepts, 2),
                                        np.diff(true_accepts, 2)), True]
    true_accepts = true_accepts[corners]
    false_accepts = false_accepts[corners]
    thresholds = thresholds[corners]

  true_accepts = np.r_[0, true_accepts]
  false_accepts = np.r_[0, false_accepts]
  return Roc(fpr=false_accepts / false_accepts[-1],
             tpr=true_accepts / true_accepts[-1],
             thresholds=np.r_[np.inf, thresholds])


def tar_at_far(roc: Roc, far_targets: Sequence[float]) -> np.ndarray:
  """TAR at the ROC point whose FAR is nearest to each target.

  No interpolation, as the IJB protocol reports it. Of equally near
  points, the one with the highest TAR wins (the reference searches the
  curve from its far end).

  Args:
    roc: the curve, from `roc_curve`.
    far_targets: the false accept rates to read at, each in [0, 1].

  Returns:
    [num_targets] float64 true accept rates.
  """
  tars = []
  for target in far_targets:
    if not 0 <= target <= 1:
      raise ValueError(f"FAR target must be in [0, 1], got {target}")
    gaps = np.abs(roc.fpr - target)
    nearest = gaps.size - 1 - int(np.argmin(gaps[::-1]))
    tars.append(roc.tpr[nearest])
  return np.array(tars, np.float64)


# Identification (1:N): probes searched against a gallery.


def mate_ranks(similarity: np.ndarray, is_mate: np.ndarray) -> np.ndarray:
  """The rank of each probe's best-scoring mate among the gallery.

  Rank 1 is the top. Non-mates that tie with the best mate do not push it
  down (a tie counts in the probe's favour).

  Args:
    similarity: [num_probes, gallery_size] scores, higher is more alike.
    is_mate: [num_probes, gallery_size] booleans, True where the gallery
      entry is of the probe's identity.

  Returns:
    [num_probes] int64: 1 + the number of non-mates scoring strictly above
    the best mate; 0 for a probe with no mate in the gallery.
  """
  similarity = np.asarray(similarity, np.float64)
  is_mate = np.asarray(is_mate, bool)
  if similarity.ndim != 2 or similarity.shape != is_mate.shape:
    raise ValueError(
        f"similarity {similarity.shape} and is_mate {is_mate.shape} must be "
        "matching [num_probes, gallery_size] arrays")
  best_mate = np.where(is_mate, similarity, -np.inf).max(axis=1)
  above = np.sum((similarity > best_mate[:, None]) & ~is_mate, axis=1)
  return np.where(is_mate.any(axis=1), 1 + above, 0).astype(np.int64)


def identification_rates(ranks: np.ndarray,
                         rank_cutoffs: Sequence[int]) -> dict[int, float]:
  """Share of mated probes whose mate is within each rank (a CMC reading).

  Args:
    ranks: [num_probes] from `mate_ranks`; probes of rank 0 (no mate) are
      left out.
    rank_cutoffs: the ranks k to read, e.g. (1, 5, 10).

  Returns:
    {k: rate in [0, 1]}.
  """
  ranks = np.asarray(ranks)
  mated = ranks[ranks > 0]
  if mated.size == 0:
    raise ValueError("no probe has a mate in the gallery")
  return {int(k): float(np.mean(mated <= k)) for k in rank_cutoffs}


@dataclasses.dataclass(frozen=True)
class PairList:
  """The pairs of an LFW-style pairs file.

  Attributes:
    pairs: (relpath1, relpath2, is_same) per pair, in file order, with
      paths relative to the image root (`name/name_0001.jpg`).
    num_folds: number of sets in the file; each set is one fold of
      contiguous pairs.
  """
  pairs: list[tuple[str, str, bool]]
  num_folds: int

  @property
  def is_same(self) -> np.ndarray:
    """[num_pairs] booleans, True for matched pairs."""
    return np.array([same for _, _, same in self.pairs], bool)


def lfw_image_path(name: str, number: int, image_ext: str = "jpg") -> str:
  """Relative path of an LFW image: `name/name_0007.jpg` for number 7."""
  return f"{name}/{name}_{number:04d}.{image_ext.lstrip('.')}"


def _parse_image_number(text: str, where: str) -> int:
  if not re.fullmatch(r"\d+", text) or int(text) < 1:
    raise ValueError(f"{where}: image number {text!r} is not an integer >= 1")
  return int(text)


def _parse_header(fields: list[str], where: str) -> tuple[int, int]:
  """(num_sets, pairs_per_set); a lone count means one set (View 1 files)."""
  if len(fields) not in (1, 2) or not all(
      re.fullmatch(r"\d+", field) for field in fields):
    raise ValueError(
        f"{where}: header must be '<num_sets> <pairs_per_set>', got "
        f"{' '.join(fields)!r}")
  counts = [int(field) for field in fields]
  num_sets, pairs_per_set = counts if len(counts) == 2 else [1, counts[0]]
  if num_sets < 1 or pairs_per_set < 1:
    raise ValueError(f"{where}: header counts must be positive, got {counts}")
  return num_sets, pairs_per_set


def _parse_pair(fields: list[str], matched: bool, where: str,
                image_ext: str) -> tuple[str, str, bool]:
  if matched:
    if len(fields) != 3:
      raise ValueError(
          f"{where}: expected a matched pair 'name n1 n2', got "
          f"{len(fields)} fields {fields}")
    name, first, second = fields
    return (
        lfw_image_path(name, _parse_image_number(first, where), image_ext),
        lfw_image_path(name, _parse_image_number(second, where), image_ext),
        True)

  if len(fields) != 4:
    raise ValueError(
        f"{where}: expected a mismatched pair 'name1 n1 name2 n2', got "
        f"{len(fields)} fields {fields}")
  name1, first, name2, second = fields
  return (
      lfw_image_path(name1, _parse_image_number(first, where), image_ext),
      lfw_image_path(name2, _parse_image_number(second, where), image_ext),
      False)


def read_lfw_pairs(path: str | os.PathLike[str],
                   image_ext: str = "jpg") -> PairList:
  """Reads an LFW `pairs.txt` file.

  Format: a header `<num_sets> <pairs_per_set>` (or a lone count, meaning
  one set), then for each set `pairs_per_set` matched lines `name n1 n2`
  followed by `pairs_per_set` mismatched lines `name1 n1 name2 n2`. Fields
  are separated by tabs or spaces; blank lines are ignored.

  Args:
    path: the pairs file.
    image_ext: extension of the image files, without the dot.

  Returns:
    The pairs with image paths relative to the image root, and one fold per
    set.

  Raises:
    ValueError: naming the file and line of a malformed line, or when the
      number of pairs differs from what the header announces.
  """
  with open(path, encoding="utf-8") as stream:
    lines = [(number, line.split())
             for number, line in enumerate(stream, start=1) if line.strip()]
  if not lines:
    raise ValueError(f"{path}: empty pairs file")

  header_number, header_fields = lines[0]
  num_sets, pairs_per_set = _parse_header(
      header_fields, f"{path}:{header_number}")
  expected = 2 * num_sets * pairs_per_set
  body = lines[1:]
  if len(body) != expected:
    raise ValueError(
        f"{path}: header announces {num_sets} sets of {pairs_per_set} "
        f"matched and {pairs_per_set} mismatched pairs ({expected} lines), "
        f"but the file has {len(body)} pair lines")

  pairs = []
  for index, (number, fields) in enumerate(body):
    matched = index % (2 * pairs_per_set) < pairs_per_set
    pairs.append(
        _parse_pair(fields, matched, f"{path}:{number}", image_ext))
  return PairList(pairs=pairs, num_folds=num_sets)


def _check_name(name: str, where: str) -> str:
  if not isinstance(name, str) or not name or re.search(r"\s", name):
    raise ValueError(f"{where}: name {name!r} must be non-empty, no spaces")
  return name


def _check_number(number: int, where: str) -> int:
  if isinstance(number, bool) or not isinstance(number, (int, np.integer)):
    raise ValueError(f"{where}: image number {number!r} is not an integer")
  if number < 1:
    raise ValueError(f"{where}: image number {number} must be >= 1")
  return int(number)


def _set_lines(matched: Sequence[MatchedPair],
               mismatched: Sequence[MismatchedPair],
               where: str) -> list[str]:
  lines = []
  for name, first, second in matched:
    lines.append("\t".join([
        _check_name(name, where), str(_check_number(first, where)),
        str(_check_number(second, where))]))
  for name1, first, name2, second in mismatched:
    lines.append("\t".join([
        _check_name(name1, where), str(_check_number(first, where)),
        _check_name(name2, where), str(_check_number(second, where))]))
  return lines


def write_lfw_pairs(path: str | os.PathLike[str],
                    sets: Sequence[PairSet]) -> None:
  """Writes an LFW `pairs.txt` file, the inverse of `read_lfw_pairs`.

  Args:
    path: the file to write (overwritten).
    sets: one (matched, mismatched) entry per set, where matched holds
      (name, n1, n2) tuples and mismatched (name1, n1, name2, n2) tuples,
      with 1-based image numbers. Every set must hold the same number of
      matched and of mismatched pairs, since the header gives one count.
  """
  if not sets:
    raise ValueError(f"{path}: no sets to write")
  pairs_per_set = len(sets[0][0])
  lines = [f"{len(sets)}\t{pairs_per_set}"]
  for index, (matched, mismatched) in enumerate(sets):
    where = f"{path}: set {index}"
    if not len(matched) == len(mismatched) == pairs_per_set:
      raise ValueError(
          f"{where} has {len(matched)} matched and {len(mismatched)} "
          f"mismatched pairs; the header holds one count, so every set "
          f"needs {pairs_per_set} of each (as set 0)")
    if pairs_per_set == 0:
      raise ValueError(f"{where} holds no pairs")
    lines.extend(_set_lines(matched, mismatched, where))

  with open(path, "w", encoding="utf-8") as stream:
    stream.write("\n".join(lines) + "\n")


def _percent(mean: float, std: float) -> str:
  return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _table_row(name: str, result: object) -> list[str]:
  """Cells of one benchmark: name, accuracy, threshold, VAL@FAR or None."""
  if isinstance(result, KFoldAccuracy):
    result = {"accuracy": result}
  accuracy = (result.get("accuracy")
              if isinstance(result, Mapping) else None)
  if not isinstance(accuracy, KFoldAccuracy):
    raise ValueError(
        f"result for {name!r} must be a KFoldAccuracy or a mapping with "
        f"'accuracy' (and optionally 'val_at_far'), got {result!r}")

  cells = [name, _percent(accuracy.accuracy_mean, accuracy.accuracy_std),
           f"{accuracy.threshold_mean:.3f}"]
  val = result.get("val_at_far")
  if val is None:
    return cells + [None]
  if not isinstance(val, ValAtFar):
    raise ValueError(
        f"'val_at_far' for {name!r} must be a ValAtFar, got {val!r}")
  return cells + [f"{_percent(val.val_mean, val.val_std)} "
                  f"@ {val.far_target:.0e}"]


def format_table(results: Mapping[str, object]) -> str:
  """A fixed-width text table of verification results, one row a benchmark.

  Args:
    results: benchmark name -> either a `KFoldAccuracy`, or a mapping with
      key "accuracy" (a `KFoldAccuracy`) and optionally "val_at_far" (a
      `ValAtFar`).

  Returns:
    Lines of: name, accuracy mean ± std in %, mean fold threshold, and
    VAL mean ± std in % at its FAR when any result has one.
  """
  header = ["benchmark", "accuracy (%)", "threshold", "VAL (%) @ FAR"]
  rows = [_table_row(name, result) for name, result in results.items()]
  if all(row[-1] is None for row in rows):
    header, rows = header[:-1], [row[:-1] for row in rows]
  else:
    rows = [row[:-1] + [row[-1] or "-"] for row in rows]

  return format_columns(header, rows)


def format_columns(header: Sequence[str],
                   rows: Sequence[Sequence[str]]) -> str:
  """A fixed-width text table: a header, a rule, then one line per row.

  The first column (names) is left-aligned, the others (numbers) right-
  aligned; every row must have as many cells as the header.
  """
  table = [list(header)] + [list(row) for row in rows]
  for row in table[1:]:
    if len(row) != len(header):
      raise ValueError(
          f"table row {row} has {len(row)} cells, the header {len(header)}")
  widths = [max(len(row[column]) for row in table)
            for column in range(len(header))]
  lines = []
  for row in table:
    cells = [row[0].ljust(widths[0])]
    cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
    lines.append("  ".join(cells).rstrip())
  lines.insert(1, "  ".join("-" * width for width in widths))
  return "\n".join(lines)
