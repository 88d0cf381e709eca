"""Tests for TinyFace identification: ranks by hand and a TinyFace-style
split built from LFW."""

import csv
import os
import shutil

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaface_jax import backbone as backbone_lib
from adaface_jax import inference
from adaface_jax import tinyface
from data_pipeline import pipeline
from data_pipeline import sources

D = tinyface.DISTRACTOR


def test_identification_ranks_by_hand():
  # An identity gallery: a probe's features are its scores against the
  # gallery entries, labelled 1, 1, 2 and two distractors.
  gallery_labels = np.array([1, 1, 2, D, D])
  probes = np.array([
      [0.2, 0.8, 0.1, 0.5, 0.3],   # label 1: best mate 0.8 on top: rank 1
      [0.1, 0.2, 0.3, 0.9, 0.35],  # label 2: 0.9 and 0.35 above: rank 3
      [0.4, 0.1, 0.6, 0.7, 0.5],   # label 1: 0.6, 0.7, 0.5 above: rank 4
      [0.9, 0.9, 0.9, 0.9, 0.9],   # label 7: no mate, left out
      [0.5, 0.1, 0.5, 0.2, 0.1],   # label 2: a tie with a non-mate: rank 1
  ])
  probe_labels = np.array([1, 2, 1, 7, 2])

  figures = tinyface.identification(probes, probe_labels, np.eye(5),
                                    gallery_labels, ranks=(1, 3, 4),
                                    chunk_rows=2)

  assert figures == {"rank_1": 0.5, "rank_3": 0.75, "rank_4": 1.0,
                     "mated_probes": 4, "probes": 5}


def test_distractors_never_match_even_with_equal_labels():
  # A probe labelled like the distractors still has no mate.
  figures = tinyface.identification(
      np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([D, 3]), np.eye(2),
      np.array([D, 3]), ranks=(1,))

  assert figures == {"rank_1": 1.0, "mated_probes": 1, "probes": 2}


# A TinyFace-style split built from LFW.


def build_lfw_tinyface(lfw_dir, root, num_identities=6, num_distractors=6):
  """Probes: the first image of each identity; gallery matches: its next
  two; distractors: two images each of further identities. The protocol
  folders hold the raw LFW files, the aligned folder 112x112 PNG crops."""
  landmarks = sources.read_landmarks_csv(
      str(lfw_dir / "landmarks" / "landmarks_5pt_150px.csv"), str(lfw_dir))
  by_identity = {}
  with open(lfw_dir / "manifest.csv", newline="") as f:
    for row in csv.DictReader(f):
      if row["roles"].startswith("verify"):
        by_identity.setdefault(row["identity"], []).append(row["path"])
  identities = [sorted(paths) for _, paths in sorted(by_identity.items())
                if len(paths) >= 3]

  def add(split, name, lfw_path):
    source = str(lfw_dir / lfw_path)
    protocol = os.path.join(root, tinyface.PROTOCOL_DIR, split)
    aligned = os.path.join(root, tinyface.DEFAULT_ALIGNMENT_DIR, split)
    os.makedirs(protocol, exist_ok=True)
    os.makedirs(aligned, exist_ok=True)
    shutil.copy(source, os.path.join(protocol, f"{name}.jpg"))
    face = pipeline.prepare_face(
        source, landmarks[os.path.normpath(source)], 112, "landmarks")
    # PNG is lossless, and cv2 writes BGR arrays as colour-correct files.
    cv2.imwrite(os.path.join(aligned, f"{name}.png"), face)

  for identity, paths in enumerate(identities[:num_identities], start=1):
    add("Probe", f"{identity}_1", paths[0])
    add("Gallery_Match", f"{identity}_2", paths[1])
    add("Gallery_Match", f"{identity}_3", paths[2])
  distractors = identities[num_identities:num_identities + num_distractors]
  for index, paths in enumerate(distractors):
    add("Gallery_Distractor", f"distractor{2 * index}", paths[0])
    add("Gallery_Distractor", f"distractor{2 * index + 1}", paths[1])
  return root


@pytest.fixture(scope="module")
def lfw_tinyface(lfw_dir, tmp_path_factory):
  return build_lfw_tinyface(lfw_dir, str(tmp_path_factory.mktemp("tiny")))


def test_read_meta_of_the_lfw_split(lfw_tinyface):
  meta = tinyface.read_meta(lfw_tinyface)

  assert meta.num_probes == 6
  np.testing.assert_array_equal(meta.probe_labels, np.arange(1, 7))
  np.testing.assert_array_equal(
      meta.gallery_labels, np.repeat(np.arange(1, 7), 2).tolist() + [D] * 12)
  assert all(path.endswith(".png") for path in meta.image_paths)
  assert os.path.basename(meta.image_paths[6]) == "1_2.png"


def test_read_meta_names_missing_crops_and_bad_names(lfw_tinyface, tmp_path):
  missing = str(tmp_path / "missing")
  shutil.copytree(lfw_tinyface, missing)
  os.remove(os.path.join(missing, tinyface.DEFAULT_ALIGNMENT_DIR,
                         "Gallery_Match", "3_2.png"))
  with pytest.raises(sources.DataError, match="3_2.jpg' has no aligned crop"):
    tinyface.read_meta(missing)

  unlabelled = str(tmp_path / "unlabelled")
  shutil.copytree(lfw_tinyface, unlabelled)
  for folder, old_name, new_name in [
      (tinyface.PROTOCOL_DIR, "2_1.jpg", "x_1.jpg"),
      (tinyface.DEFAULT_ALIGNMENT_DIR, "2_1.png", "x_1.png")]:
    probes = os.path.join(unlabelled, folder, "Probe")
    os.rename(os.path.join(probes, old_name), os.path.join(probes, new_name))
  with pytest.raises(sources.DataError, match="x_1.jpg'.* integer identity"):
    tinyface.read_meta(unlabelled)

  with pytest.raises(sources.DataError, match="does not exist"):
    tinyface.read_meta(str(tmp_path / "nowhere"))


@pytest.fixture(scope="module")
def embedder():
  backbone = backbone_lib.IResNet(stage_units=(1, 1), stage_widths=(4, 8),
                                  embedding_size=16)
  variables = backbone.init(jax.random.key(1),
                            jnp.zeros((1, 112, 112, 3)), train=False)
  return inference.Embedder(backbone, variables, batch_size=8,
                            with_flip=True)


def _cmc_by_sorting(features, meta, ranks):
  """Rank-k as the reference reads it off each probe's sorted gallery."""
  probes = features[:meta.num_probes]
  gallery = features[meta.num_probes:]
  hits = {k: 0 for k in ranks}
  for probe, label in zip(probes, meta.probe_labels):
    order = np.argsort(-(gallery @ probe), kind="stable")
    is_mate = meta.gallery_labels[order] == label
    for k in ranks:
      hits[k] += bool(is_mate[:k].any())
  return {k: hits[k] / meta.num_probes for k in ranks}


def test_evaluate_on_the_lfw_split(lfw_tinyface, embedder, tmp_path):
  meta = tinyface.read_meta(lfw_tinyface)
  feature_dir = str(tmp_path / "features")

  figures = tinyface.evaluate(embedder, meta, feature_dir)

  assert figures["probes"] == figures["mated_probes"] == 6
  assert figures["gallery"] == 24 and figures["distractors"] == 12
  columns = inference.embed_items(
      embedder, [(p, None) for p in meta.image_paths],
      pipeline.LoadEvalFace(112, "none"))
  expected = _cmc_by_sorting(
      inference.fused_embeddings(columns, "norm_add"), meta, tinyface.RANKS)
  for k in tinyface.RANKS:
    assert figures[f"rank_{k}"] == pytest.approx(expected[k])
  assert figures["rank_20"] == 1.0  # 24 entries, two mates each.
  assert os.path.isfile(os.path.join(feature_dir, "flipped_embeddings.npy"))


def test_format_table():
  table = tinyface.format_table({"tinyface": {
      "mated_probes": 6, "gallery": 24, "rank_1": 0.5, "rank_5": 0.75,
      "rank_20": 1.0}})

  assert table.splitlines()[2].split() == [
      "tinyface", "6", "24", "50.00", "75.00", "100.00"]
