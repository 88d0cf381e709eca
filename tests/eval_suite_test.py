"""The evaluation suite end to end: verification arithmetic by hand, the set
declarations of the config, and a tiny network trained on real LFW faces
evaluated through eval.py on a `.bin`, an LFW pairs file, an IJB layout and
a TinyFace split (all built from LFW by the tests)."""

import json
import os
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest

from adaface_jax import checkpointing
from adaface_jax import eval_lib
from adaface_jax import roc_plots
from adaface_jax import train_lib
from adaface_jax import verification
from configs import common
from data_pipeline import pipeline
from data_pipeline import sources
from data_pipeline import verification_bin
# Builders of the IJB and TinyFace layouts from LFW, shared with their own
# tests (pytest puts the tests folder on the import path).
import ijb_test
import tinyface_test

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Verification figures of fixed embeddings.


def test_score_pairs_by_hand():
  # Unit vectors at 0, 90 and 180 degrees: squared distances 0, 2 and 4.
  embeddings = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  # Two folds of four pairs: same pairs at distance 0, different ones at 4,
  # except one same pair at 4 in fold 1 (its only error).
  first = np.array([0, 1, 0, 1, 0, 0, 0, 1])
  second = np.array([0, 1, 2, 1, 2, 2, 2, 1])
  is_same = np.array([True, True, False, False, True, False, False, True])
  # Fold 0: distances 0, 0, 4, 0 -- pair 3 is different at distance 0.
  # Fold 1: 4 (same), 4, 4, 0.

  result = eval_lib.score_pairs(embeddings, first, second, is_same, 2,
                                {"name": "toy", "kind": "bin"})

  # Each fold's threshold is learnt on the other: fold 1's pairs put it at
  # 0.01 (0 -> same, 4 -> different: 3 of 4 right), fold 0's at 0.01 too.
  np.testing.assert_allclose(result.accuracy.fold_thresholds, [0.01, 0.01])
  np.testing.assert_allclose(result.accuracy.fold_accuracies, [0.75, 0.75])
  assert result.figures["accuracy_mean"] == 0.75
  assert result.figures["accuracy_std"] == 0.0
  assert result.figures["pairs"] == 8 and result.figures["num_folds"] == 2
  # VAL@FAR=1e-3. Fold 0 learns on fold 1, whose different pairs sit at 4,
  # out of the grid's reach: the last threshold, 3.999, accepts fold 0's
  # three pairs at 0 (VAL 2/2, FAR 1/2). Fold 1 learns on fold 0, where FAR
  # jumps from 0 to 1/2 after threshold 0: interpolated, 2e-6 accepts only
  # distance 0 (VAL 1/2, FAR 0).
  val = result.figures["val_at_far"]
  assert val["val_mean"] == pytest.approx(0.75)
  assert val["far_mean"] == pytest.approx(0.25)
  np.testing.assert_allclose(result.val.fold_thresholds, [3.999, 2e-6])
  np.testing.assert_allclose(result.rocs["toy"].fpr[-1], 1.0)


def test_score_pairs_without_val_when_a_fold_lacks_a_kind():
  embeddings = np.eye(2)
  result = eval_lib.score_pairs(
      embeddings, np.array([0, 0, 0, 0]), np.array([0, 0, 1, 1]),
      np.array([True, True, False, False]), 2, {"name": "toy", "kind": "bin"})

  assert result.val is None and result.figures["val_at_far"] is None
  # Each fold's threshold is learnt on the other fold, of the other kind:
  # 0 (reject all) for the same pairs, 0.01 (accept 0) for the different.
  np.testing.assert_allclose(result.accuracy.fold_accuracies, [0.0, 1.0])


def test_plot_rocs_writes_a_png(tmp_path):
  rng = np.random.default_rng(0)
  is_same = rng.random(100_000) < 0.1
  roc = verification.roc_curve(rng.normal(is_same * 2.0), is_same)

  path = roc_plots.plot_rocs(str(tmp_path / "plots" / "roc.png"),
                             {"toy": roc}, "A toy ROC")

  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="no ROC curve"):
    roc_plots.plot_rocs(str(tmp_path / "empty.png"), {}, "nothing")


# The config's set declarations.


def test_declared_sets_and_their_errors(tmp_path):
  config = common.get_base_config()
  assert eval_lib.declared_sets(config) == {}

  config.eval.pairs = "pairs.txt"
  config.eval.sets.cfp_fp.path = "cfp_fp.bin"
  config.eval.sets.cfp_fp.every_steps = 500
  config.eval.sets.ijbc.path = "/data/IJB_release"
  assert eval_lib.declared_sets(config) == {
      "lfw": ("pairs", 0), "cfp_fp": ("bin", 500), "ijbc": ("ijb", 0)}

  config.eval.sets.lfw.path = "lfw.bin"
  with pytest.raises(ValueError, match="eval.name='lfw' are both enabled"):
    eval_lib.declared_sets(config)
  config.eval.name = "lfw_pairs"
  with pytest.raises(ValueError, match=r"sets \['agedb_30'\] are not enabled"):
    eval_lib.build_sets(config, str(tmp_path), names=["agedb_30"])
  with pytest.raises(sources.DataError,
                     match="eval.sets.cfp_fp.path 'cfp_fp.bin' does not exist"):
    eval_lib.build_sets(config, str(tmp_path), names=["cfp_fp"])
  config.eval.sets.cfp_fp.kind = "roc"
  with pytest.raises(ValueError, match="eval.sets.cfp_fp.kind is 'roc'"):
    eval_lib.build_sets(config, str(tmp_path), names=["cfp_fp"])


def test_eval_set_rejects_unknown_fields():
  with pytest.raises(KeyError, match="'folds' does not exist"):
    common.eval_set("bin", folds=10)


# Real faces: fixtures built from LFW.


def _aligned_crops(lfw_dir, relative_paths):
  """LFW image (path under images/) -> aligned 112x112 uint8 BGR crop."""
  landmarks = sources.read_landmarks_csv(
      str(lfw_dir / "landmarks" / "landmarks_5pt_150px.csv"), str(lfw_dir))
  crops = {}
  for relative in sorted(set(relative_paths)):
    path = os.path.normpath(str(lfw_dir / "images" / relative))
    crops[relative] = pipeline.prepare_face(path, landmarks[path], 112,
                                            "landmarks")
  return crops


def _png(bgr):
  # cv2 encodes a BGR array as a colour-correct PNG, which decodes (cv2 or
  # PIL) to the same pixels: the .bin path sees exactly the crops the
  # pairs-file path computes.
  ok, encoded = cv2.imencode(".png", bgr)
  assert ok
  return encoded.tobytes()


@pytest.fixture(scope="module")
def lfw_sets(lfw_dir, tmp_path_factory):
  """The folds 1-2 pairs as a .bin, a 40-pair .bin for in-training
  evaluation, an IJB-C layout and a TinyFace split."""
  root = tmp_path_factory.mktemp("lfw_sets")
  pairs_file = lfw_dir / "pairs_view2_folds01-02.txt"
  pair_list = verification.read_lfw_pairs(pairs_file)
  crops = _aligned_crops(
      lfw_dir, [p for pair in pair_list.pairs for p in pair[:2]])
  encoded = {path: _png(crop) for path, crop in crops.items()}

  full_bin = str(root / "lfw_folds01-02.bin")
  verification_bin.write_bin(
      full_bin, [encoded[p] for pair in pair_list.pairs for p in pair[:2]],
      pair_list.is_same)
  # Matched pairs 0-19 and mismatched 300-319, alternating, so that every
  # one of 10 folds holds both kinds.
  mini = [pair_list.pairs[i + offset] for i in range(20) for offset in (0,
                                                                        300)]
  mini_bin = str(root / "lfw_mini.bin")
  verification_bin.write_bin(
      mini_bin, [encoded[p] for pair in mini for p in pair[:2]],
      [pair[2] for pair in mini])

  return {
      "pairs": str(pairs_file),
      "full_bin": full_bin,
      "mini_bin": mini_bin,
      "ijb": ijb_test.build_lfw_ijb(lfw_dir, str(root / "ijb")),
      "tinyface": tinyface_test.build_lfw_tinyface(lfw_dir,
                                                   str(root / "tinyface")),
  }


def _overrides(lfw_dir, lfw_sets):
  """Dotted config fields of the tiny real-face run (training + in-training
  evaluation of the 40-pair .bin at steps 2 and 4)."""
  return {
      "seed": 0,
      "data.kind": "manifest",
      "data.root": str(lfw_dir),
      "data.manifest": str(lfw_dir / "manifest.csv"),
      "data.manifest_filters": "roles=train",
      "data.landmarks": str(lfw_dir / "landmarks" /
                            "landmarks_5pt_150px.csv"),
      "data.alignment": "landmarks",
      "data.batch_size": 16,
      "data.worker_count": 0,
      "model.name": "custom",
      "model.stage_units": (1, 1),
      "model.stage_widths": (4, 8),
      "model.embedding_size": 16,
      "head.num_classes": 0,
      "schedule.total_steps": 4,
      "schedule.lr_boundaries_epochs": (100,),
      "logging.log_every_steps": 2,
      "logging.progress_bar": False,
      "checkpoint.every_steps": 2,
      "eval.batch_size": 32,
      "eval.after_training": False,
      "eval.name": "lfw_pairs",
      "eval.pairs": lfw_sets["pairs"],
      "eval.image_root": str(lfw_dir / "images"),
      "eval.landmarks": str(lfw_dir / "landmarks" /
                            "landmarks_5pt_150px.csv"),
      "eval.landmarks_root": str(lfw_dir),
      "eval.alignment": "landmarks",
      "eval.sets.lfw.path": lfw_sets["mini_bin"],
      "eval.sets.lfw.every_steps": 2,
  }


def _apply(config, overrides):
  for dotted, value in overrides.items():
    *parents, field = dotted.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[field] = value
  return config


@pytest.fixture(scope="module")
def trained_run(lfw_dir, lfw_sets, tmp_path_factory):
  overrides = _overrides(lfw_dir, lfw_sets)
  config = _apply(common.get_base_config(), overrides)
  workdir = str(tmp_path_factory.mktemp("run"))
  train_lib.train(config, workdir)
  return config, workdir, overrides


def test_in_training_evaluation_keeps_the_best_backbone(trained_run):
  _, workdir, _ = trained_run

  rows = [json.loads(line) for line in open(
      os.path.join(workdir, eval_lib.METRICS_FILE))]
  evals = {row["step"]: row for row in rows if "eval/val_acc" in row}
  assert sorted(evals) == [2, 4]
  for row in evals.values():
    assert row["eval/val_acc"] == row["eval/lfw/accuracy"]
    assert 0.0 <= row["eval/lfw/val_at_far"] <= 1.0
  # Ties keep the earlier step.
  best_step = 4 if evals[4]["eval/val_acc"] > evals[2]["eval/val_acc"] else 2

  best_dir = os.path.join(workdir, eval_lib.BEST_SUBDIR)
  record = json.load(open(os.path.join(best_dir, eval_lib.BEST_FILE)))
  assert record["step"] == best_step
  assert record["val_acc"] == evals[best_step]["eval/val_acc"]
  best, step = checkpointing.load_variables(best_dir)
  saved, _ = checkpointing.load_variables(workdir, best_step)
  assert step == best_step
  for a, b in zip(jax.tree.leaves(best["params"]["backbone"]),
                  jax.tree.leaves(saved["params"]["backbone"])):
    np.testing.assert_array_equal(a, b)
  # The figures are also in the evaluation history.
  history = json.load(open(os.path.join(workdir, eval_lib.RESULTS_FILE)))
  assert [h["step"] for h in history["history"]] == [2, 4]


def test_batch_size_does_not_change_the_figures(trained_run):
  config, workdir, _ = trained_run
  figures = []
  for batch_size in (5, 32):
    config.eval.batch_size = batch_size
    result = eval_lib.evaluate(config, workdir, sets=["lfw"])["lfw"]
    del result["seconds"]
    figures.append(result)
  assert figures[0]["pairs"] == 40 and figures[0]["images"] == 80
  assert figures[0] == figures[1]


def _config_file(path, overrides):
  lines = ["from configs import common", "", "", "def get_config():",
           "  config = common.get_base_config()"]
  lines += [f"  config.{key} = {value!r}" for key, value in overrides.items()]
  lines += ["  return config", ""]
  path.write_text("\n".join(lines))
  return str(path)


def test_eval_py_runs_every_kind_and_bin_matches_pairs_file(
    trained_run, lfw_sets, tmp_path):
  _, workdir, overrides = trained_run
  overrides = dict(overrides, **{
      "eval.sets.lfw.path": lfw_sets["full_bin"],
      # The pairs file's two sets of 600 pairs are its folds.
      "eval.sets.lfw.num_folds": 2,
      "eval.sets.ijbc.path": lfw_sets["ijb"],
      "eval.sets.tinyface.path": lfw_sets["tinyface"],
  })
  config_path = _config_file(tmp_path / "suite_config.py", overrides)

  result = subprocess.run(
      [sys.executable, "eval.py", "--config", config_path, "--workdir",
       workdir], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)

  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "Evaluation at step 4 (norm_add flip fusion)" in out
  for line_start in ("lfw_pairs ", "lfw ", "ijbc / adaface ",
                     "ijbc / insightface ", "tinyface "):
    assert any(line.startswith(line_start) for line in out.splitlines()), out

  latest = json.load(open(os.path.join(workdir,
                                       eval_lib.RESULTS_FILE)))["latest"]
  assert {name: latest[name]["step"] for name in
          ("lfw_pairs", "lfw", "ijbc", "tinyface")} == dict.fromkeys(
              ("lfw_pairs", "lfw", "ijbc", "tinyface"), 4)
  pairs, binary = latest["lfw_pairs"], latest["lfw"]
  assert pairs["pairs"] == binary["pairs"] == 1200
  assert pairs["images"] < binary["images"] == 2400
  # Identical crops through both paths: identical folds, thresholds and
  # accuracies.
  for key in ("fold_accuracies", "fold_thresholds", "accuracy_mean",
              "accuracy_std", "val_at_far"):
    assert pairs[key] == binary[key], key

  ijbc = latest["ijbc"]["protocols"]
  assert ijbc["adaface"]["pairs"] == 66
  assert set(ijbc["insightface"]["tar_at_far"]) == {
      "1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"}
  assert latest["tinyface"]["mated_probes"] == 6
  for name in ("roc_verification.png", "roc_ijbc.png"):
    with open(os.path.join(workdir, eval_lib.PLOTS_SUBDIR, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
