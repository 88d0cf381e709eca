"""Tests of the synthetic face set generator."""

import pathlib

import numpy as np
from PIL import Image
from PIL import ImageFilter
import pytest

from data_pipeline import synthetic

SMALL = dict(num_train_identities=3, images_per_identity=3,
             num_verify_identities=6, verify_images_per_identity=3,
             num_pair_sets=2, pairs_per_set=5, seed=7)


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(path.relative_to(root)): path.read_bytes()
          for path in sorted(root.rglob("*")) if path.is_file()}


def _mtimes(root: pathlib.Path) -> dict[str, int]:
  return {str(path.relative_to(root)): path.stat().st_mtime_ns
          for path in root.rglob("*")}


def _read_pairs(path: pathlib.Path) -> tuple[list[str], list[list[str]]]:
  lines = path.read_text().splitlines()
  return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> dict:
  root = tmp_path_factory.mktemp("synthetic") / "faces"
  return synthetic.generate_synthetic_faces(root, **SMALL)


def test_same_seed_gives_identical_bytes(small_set, tmp_path):
  again = synthetic.generate_synthetic_faces(tmp_path / "again", **SMALL)

  first = _files(small_set["root"])
  second = _files(again["root"])
  assert len(first) == 3 * 3 + 6 * 3 + 2
  assert first == second


def test_different_seed_differs(small_set, tmp_path):
  other = synthetic.generate_synthetic_faces(
      tmp_path / "other", **{**SMALL, "seed": 8})

  first = _files(small_set["root"])
  second = _files(other["root"])
  assert first.keys() == second.keys()
  images = [name for name in first if name.endswith(".jpg")]
  assert all(first[name] != second[name] for name in images)
  assert first["pairs.txt"] != second["pairs.txt"]


def test_layout_and_counts(small_set):
  root = small_set["root"]
  train = sorted(p.name for p in (root / "train").iterdir())
  verify = sorted(p.name for p in (root / "verify").iterdir())

  assert train == ["synthetic_0001", "synthetic_0002", "synthetic_0003"]
  assert verify == [f"synthetic_{k:04d}" for k in range(4, 10)]
  for split, names, count in (("train", train, 3), ("verify", verify, 3)):
    for name in names:
      files = sorted(p.name for p in (root / split / name).iterdir())
      assert files == [f"{name}_{i:04d}.jpg" for i in range(1, count + 1)]
  assert small_set["num_train_images"] == 9
  assert small_set["num_verify_images"] == 18
  assert small_set["num_pairs"] == 20
  assert small_set["generated"]


def test_images_are_112_rgb_jpeg(small_set):
  for path in sorted(small_set["root"].rglob("*.jpg")):
    with Image.open(path) as image:
      assert (image.format, image.mode, image.size) == (
          "JPEG", "RGB", (112, 112))


def test_marker_records_provenance_and_parameters(small_set):
  text = small_set["marker_path"].read_text()

  assert "synthetic" in text.lower()
  assert "seed: 7\n" in text
  assert "pairs_per_set: 5\n" in text
  assert f"generator_version: {synthetic.GENERATOR_VERSION}\n" in text


def test_pairs_file_structure(small_set):
  root = small_set["root"]
  header, rows = _read_pairs(small_set["pairs_path"])

  assert header == ["2", "5"]
  assert len(rows) == 2 * 2 * 5
  fold_names = []
  for fold in range(2):
    matched = rows[10 * fold:10 * fold + 5]
    mismatched = rows[10 * fold + 5:10 * fold + 10]
    assert all(len(row) == 3 for row in matched)
    assert all(len(row) == 4 for row in mismatched)
    assert all(row[1] != row[2] for row in matched)
    assert all(row[0] != row[2] for row in mismatched)
    fold_names.append({row[0] for row in matched}
                      | {row[k] for row in mismatched for k in (0, 2)})

  # Like LFW's folds, the sets share no identity.
  assert not fold_names[0] & fold_names[1]
  for row in rows:
    images = ([(row[0], row[1]), (row[0], row[2])] if len(row) == 3
              else [(row[0], row[1]), (row[2], row[3])])
    for name, index in images:
      assert 1 <= int(index) <= 3
      assert (root / "verify" / name / f"{name}_{int(index):04d}.jpg").is_file()


def test_pairs_are_distinct_when_enough_exist(small_set):
  _, rows = _read_pairs(small_set["pairs_path"])

  assert len({tuple(row) for row in rows}) == len(rows)


def test_ensure_does_not_rewrite_a_matching_set(tmp_path):
  root = tmp_path / "faces"
  first = synthetic.ensure_synthetic_faces(root, **SMALL)
  before = _mtimes(root)

  second = synthetic.ensure_synthetic_faces(root, **SMALL)

  assert first["generated"] and not second["generated"]
  assert _mtimes(root) == before
  assert {k: v for k, v in first.items() if k != "generated"} == {
      k: v for k, v in second.items() if k != "generated"}
  # Nothing is left beside the set from the staging directory.
  assert [p.name for p in tmp_path.iterdir()] == ["faces"]


def test_ensure_regenerates_when_parameters_change(tmp_path):
  root = tmp_path / "faces"
  synthetic.ensure_synthetic_faces(root, **SMALL)

  summary = synthetic.ensure_synthetic_faces(root, **{**SMALL, "seed": 9})

  assert summary["generated"]
  assert "seed: 9\n" in (root / "SYNTHETIC.txt").read_text()
  assert [p.name for p in tmp_path.iterdir()] == ["faces"]


def test_ensure_regenerates_a_set_without_marker(tmp_path):
  root = tmp_path / "faces"
  synthetic.ensure_synthetic_faces(root, **SMALL)
  (root / "SYNTHETIC.txt").write_text("synthetic, but the wrong version\n")

  summary = synthetic.ensure_synthetic_faces(root, **SMALL)

  assert summary["generated"]
  assert "seed: 7\n" in (root / "SYNTHETIC.txt").read_text()


def test_refuses_to_replace_a_foreign_directory(tmp_path):
  root = tmp_path / "real_faces"
  root.mkdir()
  (root / "keep.jpg").write_bytes(b"not ours")

  with pytest.raises(FileExistsError, match="real_faces"):
    synthetic.ensure_synthetic_faces(root, **SMALL)
  assert (root / "keep.jpg").read_bytes() == b"not ours"


@pytest.mark.parametrize("field, value, error", [
    ("verify_images_per_identity", 1, ValueError),
    ("num_verify_identities", 3, ValueError),
    ("pairs_per_set", 0, ValueError),
    ("seed", -1, ValueError),
    ("images_per_identity", 2.5, TypeError),
])
def test_bad_arguments_name_the_field(tmp_path, field, value, error):
  with pytest.raises(error, match=field):
    synthetic.generate_synthetic_faces(tmp_path / "faces",
                                       **{**SMALL, field: value})
  assert not (tmp_path / "faces").exists()


def test_ensure_rejects_unknown_arguments(tmp_path):
  with pytest.raises(TypeError, match="num_identities"):
    synthetic.ensure_synthetic_faces(tmp_path / "faces", num_identities=3)


def test_command_line_writes_a_set(tmp_path):
  summary = synthetic.main([
      "--root", str(tmp_path / "faces"), "--num-train-identities", "2",
      "--images-per-identity", "2", "--num-verify-identities", "2",
      "--verify-images-per-identity", "2", "--num-pair-sets", "1",
      "--pairs-per-set", "3", "--seed", "5"])

  assert summary["num_train_images"] == 4
  assert len(list((tmp_path / "faces").rglob("*.jpg"))) == 8
  assert "seed: 5\n" in (tmp_path / "faces" / "SYNTHETIC.txt").read_text()


def test_render_face_is_deterministic_per_rng():
  identity = synthetic.sample_identity(np.random.default_rng(3))

  first = synthetic.render_face(identity, np.random.default_rng(10))
  again = synthetic.render_face(identity, np.random.default_rng(10))
  other = synthetic.render_face(identity, np.random.default_rng(11))

  assert first.shape == (112, 112, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, again)
  # Per-image variation is more than noise: a clear mean difference.
  difference = np.abs(first.astype(np.float32) - other.astype(np.float32))
  assert difference.mean() > 8.0


def test_identities_sit_near_the_alignment_template():
  for seed in range(20):
    identity = synthetic.sample_identity(np.random.default_rng(seed))

    landmarks = synthetic.identity_landmarks(identity)

    assert landmarks.shape == (5, 2)
    offsets = np.linalg.norm(landmarks - synthetic.TEMPLATE_LANDMARKS, axis=1)
    assert offsets.max() < 5.5


def _blurred(pixels: np.ndarray) -> np.ndarray:
  # Blurring then shrinking keeps the layout of colours and drops the noise
  # and fine detail, so distances measure who is drawn, not the grain.
  image = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(3))
  return np.asarray(image.resize((28, 28), Image.Resampling.BILINEAR),
                    np.float32).ravel()


def test_images_of_one_identity_are_closer_than_of_two():
  num_identities, num_images = 10, 5
  features = []
  for k in range(num_identities):
    identity = synthetic.sample_identity(np.random.default_rng([1, k]))
    features.append([
        _blurred(synthetic.render_face(
            identity, np.random.default_rng([2, k, i])))
        for i in range(num_images)])
  features = np.asarray(features)  # [identities, images, pixels]

  flat = features.reshape(num_identities * num_images, -1)
  distances = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
  labels = np.repeat(np.arange(num_identities), num_images)
  same = labels[:, None] == labels[None]
  off_diagonal = ~np.eye(len(flat), dtype=bool)
  within = distances[same & off_diagonal].mean()
  between = distances[~same].mean()

  # Identity shows in the pixels, and the images of one identity still
  # differ: neither collapsed nor indistinguishable.
  assert within < 0.75 * between
  assert within > 0.2 * between
