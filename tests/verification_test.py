"""Tests for the verification protocol, with answers worked out by hand."""

import numpy as np
import pytest

from adaface_jax import verification


def _pairs_by_fold(folds):
  """Flattens [(same distances, different distances)] per fold."""
  distances, is_same = [], []
  for same, different in folds:
    distances += list(same) + list(different)
    is_same += [True] * len(same) + [False] * len(different)
  return np.array(distances), np.array(is_same)


# fuse_flip and pair_distances.


def test_fuse_flip_norm_add_weighs_by_norm():
  embeddings = np.array([[1.0, 0.0], [0.6, 0.8]])
  flipped = np.array([[0.0, 1.0], [0.8, 0.6]])

  fused = verification.fuse_flip(
      embeddings, np.array([3.0, 5.0]), flipped, np.array([[4.0], [10.0]]))

  # [3, 0] + [0, 4] = [3, 4]; [3, 4] + [8, 6] = [11, 10].
  expected = np.array([[0.6, 0.8], [11.0, 10.0] / np.sqrt(221.0)])
  np.testing.assert_allclose(fused, expected, rtol=1e-12)
  assert fused.dtype == np.float64


def test_fuse_flip_add_ignores_norms():
  embeddings = np.array([[1.0, 0.0], [0.6, 0.8]])
  flipped = np.array([[0.0, 1.0], [0.8, 0.6]])

  fused = verification.fuse_flip(embeddings, None, flipped, None, "add")

  np.testing.assert_allclose(fused, np.full((2, 2), np.sqrt(0.5)), rtol=1e-12)


def test_fuse_flip_without_flip_normalises():
  fused = verification.fuse_flip(np.array([[3.0, 4.0]]), None, None, None)

  np.testing.assert_allclose(fused, [[0.6, 0.8]], rtol=1e-12)


def test_fuse_flip_rejects_bad_input():
  embeddings = np.eye(2)
  with pytest.raises(ValueError, match="'norm_add', 'add'"):
    verification.fuse_flip(embeddings, None, None, None, method="mean")
  with pytest.raises(ValueError, match="feature_norms is required"):
    verification.fuse_flip(embeddings, None, embeddings, np.ones(2))
  with pytest.raises(ValueError, match="flipped_norms must be"):
    verification.fuse_flip(embeddings, np.ones(2), embeddings, np.ones(3))
  with pytest.raises(ValueError, match="must match"):
    verification.fuse_flip(embeddings, np.ones(2), np.eye(3), np.ones(3))


def test_pair_distances():
  embeddings1 = np.array([[1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])
  embeddings2 = np.array([[0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])

  distances = verification.pair_distances(embeddings1, embeddings2)

  np.testing.assert_allclose(distances, [2.0, 0.0, 4.0], atol=1e-12)
  with pytest.raises(ValueError, match="must match"):
    verification.pair_distances(embeddings1, embeddings2[:2])


# Folds and k-fold accuracy.


def test_contiguous_folds_give_extra_pairs_to_first_folds():
  folds = verification.contiguous_folds(23, 10)

  assert [len(fold) for fold in folds] == [3, 3, 3] + [2] * 7
  np.testing.assert_array_equal(np.concatenate(folds), np.arange(23))


def test_contiguous_folds_reject_bad_counts():
  with pytest.raises(ValueError, match="exceeds the number of pairs"):
    verification.contiguous_folds(5, 6)
  with pytest.raises(ValueError, match="at least 1"):
    verification.contiguous_folds(5, 0)


def test_kfold_accuracy_perfect_separation_at_one():
  # Fold k holds pairs 2k (same) and 2k + 1 (different). Two folds hold a
  # same pair at 0.995 and two a different pair at exactly 1.0, so every
  # training split is separated by 1.00 and by no other grid threshold.
  same = [0.995, 0.995, 0.1, 0.5, 0.7, 0.2, 0.9, 0.3, 0.6, 0.8]
  different = [1.0, 1.0, 1.2, 3.9, 2.0, 1.5, 1.05, 2.5, 3.0, 1.7]
  distances, is_same = _pairs_by_fold(zip([[d] for d in same],
                                          [[d] for d in different]))

  result = verification.kfold_accuracy(distances, is_same)

  np.testing.assert_array_equal(result.fold_accuracies, np.ones(10))
  np.testing.assert_allclose(result.fold_thresholds, np.ones(10), atol=1e-12)
  assert result.accuracy_mean == 1.0
  assert result.accuracy_std == 0.0
  assert result.best_threshold == pytest.approx(1.0, abs=1e-12)
  assert result.best_threshold_accuracy == 1.0
  # One step either side costs the two pairs at 0.995 or at 1.0.
  np.testing.assert_allclose(
      verification.accuracy_per_threshold(
          distances, is_same, np.array([0.99, 1.0, 1.01])),
      [18 / 20, 1.0, 18 / 20])


def test_kfold_accuracy_one_fold_with_two_errors():
  distances, is_same = _pairs_by_fold([
      ([0.995, 0.4, 0.6], [1.0, 2.0]),
      ([0.995, 0.2], [1.0, 1.3, 3.0]),
      # A same pair far apart and a different pair close together.
      ([2.5, 0.5], [0.3, 1.8, 2.2]),
      ([0.7, 0.9, 0.3], [1.1, 1.6]),
  ])

  result = verification.kfold_accuracy(distances, is_same, num_folds=4)

  np.testing.assert_allclose(result.fold_accuracies, [1.0, 1.0, 0.6, 1.0])
  np.testing.assert_allclose(result.fold_thresholds, np.ones(4), atol=1e-12)
  assert result.accuracy_mean == pytest.approx(0.9)
  # Deviations 0.1, 0.1, -0.3, 0.1: variance 0.12 / 4.
  assert result.accuracy_std == pytest.approx(np.sqrt(0.03))
  assert result.best_threshold_accuracy == pytest.approx(18 / 20)


def test_kfold_accuracy_uneven_folds():
  # 7 pairs in 3 folds: [0, 1, 2], [3, 4], [5, 6]. The different pair at 0.3
  # is the only error, in the first (larger) fold.
  distances = np.array([0.995, 0.5, 0.3, 0.995, 1.0, 0.2, 1.0])
  is_same = np.array([True, True, False, True, False, True, False])

  result = verification.kfold_accuracy(distances, is_same, num_folds=3)

  np.testing.assert_allclose(result.fold_accuracies, [2 / 3, 1.0, 1.0])
  assert result.accuracy_mean == pytest.approx(8 / 9)
  np.testing.assert_allclose(result.fold_thresholds, np.ones(3), atol=1e-12)


def test_kfold_accuracy_takes_first_best_threshold():
  # Every threshold in (0.5, 2.0] is perfect; the first on the grid wins.
  distances = np.array([0.5, 2.0, 0.5, 2.0])
  is_same = np.array([True, False, True, False])

  result = verification.kfold_accuracy(distances, is_same, num_folds=2)

  np.testing.assert_allclose(result.fold_thresholds, [0.51, 0.51])
  assert result.best_threshold == pytest.approx(0.51)


def test_kfold_accuracy_single_fold_uses_all_pairs():
  distances = np.array([0.2, 1.4, 0.9, 0.6, 1.9])
  is_same = np.array([True, True, False, False, False])

  result = verification.kfold_accuracy(distances, is_same, num_folds=1)

  # At 0.21 only the pair at 1.4 is wrong; no threshold does better.
  assert result.best_threshold == pytest.approx(0.21)
  assert result.best_threshold_accuracy == pytest.approx(4 / 5)
  np.testing.assert_allclose(result.fold_accuracies, [4 / 5])
  np.testing.assert_allclose(result.fold_thresholds, [0.21])
  assert result.accuracy_std == 0.0


def test_kfold_accuracy_rejects_bad_input():
  distances = np.array([0.2, 1.4, 0.9])
  with pytest.raises(ValueError, match="exceeds the number of pairs"):
    verification.kfold_accuracy(distances, [True, False, True], num_folds=4)
  with pytest.raises(ValueError, match="must match"):
    verification.kfold_accuracy(distances, [True, False])
  with pytest.raises(ValueError, match="booleans or 0/1"):
    verification.kfold_accuracy(distances, [2, 0, 1], num_folds=3)
  with pytest.raises(ValueError, match="non-finite"):
    verification.kfold_accuracy([0.2, np.nan, 1.0], [1, 0, 1], num_folds=3)


# VAL@FAR.


def test_threshold_at_far_interpolates_between_grid_points():
  thresholds = np.arange(5.0)
  is_same = np.zeros(4, bool)
  # FAR on the grid 0..4: 0, 0.25, 0.5, 0.75, 1.
  distances = np.array([0.5, 1.5, 2.5, 3.5])

  def threshold(far_target):
    return verification.threshold_at_far(
        distances, is_same, thresholds, far_target)

  assert threshold(0.375) == pytest.approx(1.5)
  assert threshold(0.1) == pytest.approx(0.4)
  assert threshold(0.25) == pytest.approx(1.0)
  assert threshold(1.0) == pytest.approx(4.0)


def test_threshold_at_far_takes_the_end_of_a_plateau():
  thresholds = np.arange(5.0)
  is_same = np.zeros(4, bool)
  # FAR on the grid 0..4: 0, 0.5, 0.5, 0.75, 1.
  distances = np.array([0.5, 0.6, 2.5, 3.5])

  threshold = verification.threshold_at_far(
      distances, is_same, thresholds, 0.5)
  above = verification.threshold_at_far(distances, is_same, thresholds, 0.6)

  assert threshold == pytest.approx(2.0)
  assert above == pytest.approx(2.0 + 0.1 / 0.25)


def test_val_at_far_two_folds():
  distances, is_same = _pairs_by_fold([
      ([0.2, 0.4, 0.9, 1.6], [0.5, 0.6, 2.5, 3.5]),
      ([0.1, 1.7, 2.2, 3.0], [0.8, 1.8, 2.8, 3.8]),
  ])

  result = verification.val_at_far(
      distances, is_same, num_folds=2, far_target=0.375,
      thresholds=np.arange(5.0))

  # Fold 0 trains on fold 1 (FAR 0, .25, .5, .75, 1 -> threshold 1.5): three
  # same pairs accepted, two different ones. Fold 1 trains on fold 0 (FAR
  # 0, .5, .5, .75, 1 -> 0.75): one same pair accepted, no different one.
  np.testing.assert_allclose(result.fold_thresholds, [1.5, 0.75])
  np.testing.assert_allclose(result.fold_vals, [0.75, 0.25])
  np.testing.assert_allclose(result.fold_fars, [0.5, 0.0])
  assert result.val_mean == pytest.approx(0.5)
  assert result.val_std == pytest.approx(0.25)
  assert result.far_mean == pytest.approx(0.25)
  assert result.far_target == 0.375


def test_val_at_far_default_grid_on_separable_pairs():
  # Every fold holds the same distances, so no held-out different pair can
  # fall below the training ones. The closest sits between grid points: the
  # interpolated threshold lands a little above the last FAR = 0 point.
  same = np.linspace(0.2, 0.9, 30)
  different = np.linspace(1.1005, 3.5, 30)
  distances, is_same = _pairs_by_fold([(same, different)] * 10)

  result = verification.val_at_far(distances, is_same)

  np.testing.assert_array_equal(result.fold_vals, np.ones(10))
  np.testing.assert_array_equal(result.fold_fars, np.zeros(10))


def test_val_at_far_rejects_bad_input():
  distances = np.array([0.2, 1.4, 0.9, 0.6])
  with pytest.raises(ValueError, match="fold 0 .* both same and different"):
    verification.val_at_far(distances, [True, True, False, False], 2)
  with pytest.raises(ValueError, match="strictly increasing"):
    verification.val_at_far(distances, [True, False, True, False], 2,
                            thresholds=np.array([0.0, 2.0, 1.0]))
  with pytest.raises(ValueError, match="far_target"):
    verification.val_at_far(distances, [True, False, True, False], 2,
                            far_target=1.5)


# LFW pairs files.


def test_read_lfw_pairs(tmp_path):
  path = tmp_path / "pairs.txt"
  path.write_text(
      "2\t2\n"
      "Ann_Lee\t1\t2\n"
      "Bo  3 14\n"
      "Ann_Lee\t1\tCy_Di\t2\n"
      "Bo 2 Ann_Lee 10\n"
      "Cy_Di 1 2\n"
      "Cy_Di 2 3\n"
      "Bo 1 Cy_Di 3\n"
      "Ann_Lee 2 Bo 1\n"
      "\n")

  pair_list = verification.read_lfw_pairs(path, image_ext="png")

  assert pair_list.num_folds == 2
  assert len(pair_list.pairs) == 8
  assert pair_list.pairs[0] == (
      "Ann_Lee/Ann_Lee_0001.png", "Ann_Lee/Ann_Lee_0002.png", True)
  assert pair_list.pairs[1] == ("Bo/Bo_0003.png", "Bo/Bo_0014.png", True)
  assert pair_list.pairs[3] == (
      "Bo/Bo_0002.png", "Ann_Lee/Ann_Lee_0010.png", False)
  np.testing.assert_array_equal(
      pair_list.is_same, [True, True, False, False] * 2)


@pytest.mark.parametrize("text, message", [
    ("1\t1\nA 1 2\nA 1 B\n", r"pairs\.txt:3: expected a mismatched pair"),
    ("1\t1\nA 1 B 2\nA 1 B 2\n", r"pairs\.txt:2: expected a matched pair"),
    ("1\t1\nA 1 x\nA 1 B 2\n", r"pairs\.txt:2: image number 'x'"),
    ("1\t1\nA 1 0\nA 1 B 2\n", r"pairs\.txt:2: image number '0'"),
    ("ten 300\n", r"pairs\.txt:1: header"),
    ("1\t2\nA 1 2\nA 1 3\nA 1 B 2\n", r"announces 1 sets .* has 3 pair lines"),
    ("1\t1\nA 1 2\nA 1 B 2\nA 1 3\n", r"has 3 pair lines"),
    ("\n", r"empty pairs file"),
])
def test_read_lfw_pairs_rejects_malformed_files(tmp_path, text, message):
  path = tmp_path / "pairs.txt"
  path.write_text(text)

  with pytest.raises(ValueError, match=message):
    verification.read_lfw_pairs(path)


def test_lfw_pairs_round_trip(tmp_path):
  sets = [
      ([("Ann_Lee", 1, 2), ("Bo", 3, 14)],
       [("Ann_Lee", 1, "Cy_Di", 2), ("Bo", 2, "Ann_Lee", 10)]),
      ([("Cy_Di", 1, 2), ("Cy_Di", 2, 3)],
       [("Bo", 1, "Cy_Di", 3), ("Ann_Lee", 2, "Bo", 1)]),
  ]
  path = tmp_path / "pairs.txt"

  verification.write_lfw_pairs(path, sets)
  pair_list = verification.read_lfw_pairs(path)

  expected = []
  for matched, mismatched in sets:
    for name, first, second in matched:
      expected.append((verification.lfw_image_path(name, first),
                       verification.lfw_image_path(name, second), True))
    for name1, first, name2, second in mismatched:
      expected.append((verification.lfw_image_path(name1, first),
                       verification.lfw_image_path(name2, second), False))
  assert pair_list.pairs == expected
  assert pair_list.num_folds == 2
  assert path.read_text().splitlines()[0] == "2\t2"


def test_write_lfw_pairs_rejects_bad_sets(tmp_path):
  path = tmp_path / "pairs.txt"
  with pytest.raises(ValueError, match="set 1 has 1 matched and 2"):
    verification.write_lfw_pairs(path, [
        ([("A", 1, 2)], [("A", 1, "B", 1)]),
        ([("A", 1, 3)], [("A", 1, "B", 1), ("A", 2, "B", 1)]),
    ])
  with pytest.raises(ValueError, match="name 'Ann Lee'"):
    verification.write_lfw_pairs(path, [([("Ann Lee", 1, 2)],
                                          [("A", 1, "B", 1)])])
  with pytest.raises(ValueError, match="image number 0"):
    verification.write_lfw_pairs(path, [([("A", 0, 2)], [("A", 1, "B", 1)])])


def test_read_lfw_view2_folds(lfw_dir):
  pair_list = verification.read_lfw_pairs(
      lfw_dir / "pairs_view2_folds01-02.txt")

  assert pair_list.num_folds == 2
  assert len(pair_list.pairs) == 1200
  is_same = pair_list.is_same.reshape(2, 2, 300)
  assert is_same[:, 0].all() and not is_same[:, 1].any()
  missing = [
      path for first, second, _ in pair_list.pairs for path in (first, second)
      if not (lfw_dir / "images" / path).is_file()]
  assert not missing


# The results table.


def _accuracy(fold_accuracies, fold_thresholds):
  return verification.KFoldAccuracy(
      fold_accuracies=np.array(fold_accuracies),
      fold_thresholds=np.array(fold_thresholds),
      accuracy_mean=float(np.mean(fold_accuracies)),
      accuracy_std=float(np.std(fold_accuracies)),
      best_threshold=1.0,
      best_threshold_accuracy=1.0)


def test_format_table_without_val():
  table = verification.format_table({
      "lfw": _accuracy([0.99, 1.0], [1.2, 1.4]),
      "cfp_fp": {"accuracy": _accuracy([0.9, 0.95], [1.5, 1.6])},
  })

  lines = table.splitlines()
  assert len(lines) == 4
  assert "VAL" not in table
  assert lines[2].split() == ["lfw", "99.50", "±", "0.50", "1.300"]
  assert lines[3].split() == ["cfp_fp", "92.50", "±", "2.50", "1.550"]
  assert len({len(line) for line in lines}) == 1


def test_format_table_with_val():
  val = verification.ValAtFar(
      far_target=1e-3, fold_vals=np.array([0.9, 0.8]),
      fold_fars=np.array([0.001, 0.0]), fold_thresholds=np.array([1.0, 1.1]),
      val_mean=0.85, val_std=0.05, far_mean=0.0005)

  table = verification.format_table({
      "lfw": {"accuracy": _accuracy([0.99, 1.0], [1.2, 1.4]),
              "val_at_far": val},
      "agedb_30": _accuracy([0.97, 0.98], [1.3, 1.3]),
  })

  lines = table.splitlines()
  assert "VAL (%) @ FAR" in lines[0]
  assert lines[2].endswith("85.00 ± 5.00 @ 1e-03")
  assert lines[3].endswith("-")
  with pytest.raises(ValueError, match="'lfw'"):
    verification.format_table({"lfw": 0.99})


def test_kfold_accuracy_matches_a_plain_loop():
  rng = np.random.default_rng(0)
  is_same = rng.random(233) < 0.5
  distances = np.where(is_same, rng.normal(0.9, 0.3, 233),
                       rng.normal(1.4, 0.3, 233)).clip(0, 4)
  thresholds = verification.ACCURACY_THRESHOLDS

  def accuracy(threshold, pairs):
    predicted = distances[pairs] < threshold
    return np.mean(predicted == is_same[pairs])

  expected_accuracies, expected_thresholds = [], []
  for test in np.array_split(np.arange(233), 10):
    train = np.setdiff1d(np.arange(233), test)
    scores = [accuracy(threshold, train) for threshold in thresholds]
    threshold = thresholds[np.argmax(scores)]
    expected_thresholds.append(threshold)
    expected_accuracies.append(accuracy(threshold, test))

  result = verification.kfold_accuracy(distances, is_same)

  np.testing.assert_allclose(result.fold_thresholds, expected_thresholds)
  np.testing.assert_allclose(result.fold_accuracies, expected_accuracies)
  assert result.accuracy_std == pytest.approx(np.std(expected_accuracies))
