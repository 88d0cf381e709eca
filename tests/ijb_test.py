"""Tests for the IJB protocol: answers worked out by hand, and a small IJB
layout built from LFW identities."""

import csv
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaface_jax import backbone as backbone_lib
from adaface_jax import ijb
from adaface_jax import inference
from adaface_jax import verification
from data_pipeline import pipeline
from data_pipeline import sources


# Template pooling, image features and pair scores.


def test_template_features_average_media_then_sum():
  # Template 7: media 1 holds [1, 0] and [0, 1] (mean [0.5, 0.5]), media 2
  # holds [1, 1]; the sum [1.5, 1.5] normalises to [1, 1] / sqrt(2).
  # Template 3: one image [3, 4] -> [0.6, 0.8]. Rows are interleaved and
  # read two at a time, so pooling must cross chunk boundaries.
  features = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0], [0.0, 1.0]])
  templates = np.array([7, 3, 7, 7])
  medias = np.array([1, 5, 2, 1])

  ids, pooled = ijb.template_features(features, templates, medias,
                                      chunk_rows=2)

  np.testing.assert_array_equal(ids, [3, 7])
  np.testing.assert_allclose(pooled, [[0.6, 0.8], [0.5**0.5, 0.5**0.5]],
                             rtol=1e-12)


def test_template_features_media_ids_are_per_template():
  # Media 1 of template 1 and media 1 of template 2 are different media.
  features = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 1.0]])

  ids, pooled = ijb.template_features(features, np.array([1, 2, 1]),
                                      np.array([1, 1, 1]))

  np.testing.assert_array_equal(ids, [1, 2])
  np.testing.assert_allclose(pooled, [[0.5**0.5, 0.5**0.5], [0.0, 1.0]])


def test_template_features_reject_misaligned_ids():
  with pytest.raises(ValueError, match="one id per image"):
    ijb.template_features(np.ones((3, 2)), np.arange(2), np.arange(3))


def _columns():
  return {
      "embeddings": np.array([[1.0, 0.0], [0.6, 0.8]]),
      "feature_norms": np.array([2.0, 10.0]),
      "flipped_embeddings": np.array([[0.0, 1.0], [0.8, 0.6]]),
      "flipped_feature_norms": np.array([3.0, 5.0]),
  }


def test_image_features_of_each_fusion_and_protocol():
  columns = _columns()
  faceness = np.array([0.5, 1.0])

  norm_add = ijb.ImageFeatures(columns, "norm_add")[0:2]
  weighted = ijb.ImageFeatures(columns, "norm_add", faceness)[0:2]
  added = ijb.ImageFeatures(columns, "add")[0:2]
  alone = ijb.ImageFeatures(columns, "none")[1:2]

  # [2, 0] + [0, 3]; [6, 8] + [4, 3].
  np.testing.assert_allclose(norm_add, [[2.0, 3.0], [10.0, 11.0]])
  np.testing.assert_allclose(weighted, [[1.0, 1.5], [10.0, 11.0]])
  np.testing.assert_allclose(
      added, [[0.5**0.5, 0.5**0.5], [0.5**0.5, 0.5**0.5]])
  np.testing.assert_allclose(alone, [[6.0, 8.0]])
  with pytest.raises(ValueError, match="flipped"):
    ijb.ImageFeatures({k: columns[k] for k in ("embeddings",
                                               "feature_norms")}, "add")


def test_pair_scores_are_template_cosines():
  ids = np.array([2, 5, 9])
  features = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])

  scores = ijb.pair_scores(ids, features, np.array([[2, 5], [9, 5], [2, 9]]))

  np.testing.assert_allclose(scores, [0.6, 0.8, 0.0])
  with pytest.raises(ValueError, match="1 template ids have no features"):
    ijb.pair_scores(ids, features, np.array([[2, 4]]))


# 1:1 TAR at FAR.


def test_tar_at_far_reads_the_nearest_roc_point():
  # Sorted by score: G G I G I I I I G I I I I I (G genuine, I impostor).
  # At FAR 0 two of four genuine pairs pass; at FAR 1/10 three do.
  genuine = [0.95, 0.9, 0.7, 0.2]
  impostor = [0.8, 0.6, 0.5, 0.4, 0.3, 0.1, 0.05, 0.0, -0.1, -0.2]
  scores = np.array(genuine + impostor)
  labels = np.array([True] * 4 + [False] * 10)

  figures, roc = ijb.verification_figures(scores, labels)

  assert figures["tar_at_far"] == {
      "1e-06": 0.5, "1e-05": 0.5, "1e-04": 0.5, "1e-03": 0.5, "1e-02": 0.5,
      "1e-01": 0.75}
  assert figures["pairs"] == 14 and figures["genuine_pairs"] == 4
  # Points (FAR, TAR): the origin, one per distinct score up to the first
  # impostor; the straight run of impostors 0.6 ... 0.3 keeps its ends only.
  np.testing.assert_allclose(roc.fpr[:6], [0.0, 0.0, 0.0, 0.1, 0.1, 0.5])
  np.testing.assert_allclose(roc.tpr[:6], [0.0, 0.25, 0.5, 0.5, 0.75, 0.75])


def test_roc_curve_keeps_ties_together():
  roc = verification.roc_curve(np.array([0.5, 0.5, 0.1]),
                               np.array([True, False, False]),
                               drop_intermediate=False)

  np.testing.assert_allclose(roc.fpr, [0.0, 0.5, 1.0])
  np.testing.assert_allclose(roc.tpr, [0.0, 1.0, 1.0])
  assert roc.thresholds[0] == np.inf


# 1:N identification.


def test_search_gallery_ranks_and_tpir_by_hand():
  # An identity gallery: a probe's features are its similarities to the
  # gallery templates of subjects 10, 20 and 30.
  gallery = np.eye(3)
  mated = np.array([[0.9, 0.1, 0.2],    # subject 10: mate first
                    [0.7, 0.5, 0.1],    # subject 20: one non-mate above
                    [0.2, 0.3, 0.6]])   # subject 30: mate first
  nonmated = np.array([[0.95, 0.0, 0.0], [0.1, 0.62, 0.0]]
                      + [[0.1, 0.0, 0.0]] * 18)
  probes = np.concatenate([mated, nonmated])
  subjects = np.array([10, 20, 30] + [99] * 20)

  search = ijb.search_gallery(probes, subjects, gallery, np.array([10, 20,
                                                                   30]))

  np.testing.assert_array_equal(search.mate_ranks, [1, 2, 1])
  np.testing.assert_array_equal(search.mate_first, [True, False, True])
  # FPIR 0.01 of 20: the best non-mated score, 0.95, beats every mate.
  assert search.tpir_at_fpir(0.01) == (0.0, 0.95)
  # FPIR 0.1 of 20: the second best, 0.62; only the 0.9 mate is above.
  assert search.tpir_at_fpir(0.1) == (pytest.approx(1 / 3), 0.62)


def test_identification_figures_pool_ranks_and_average_tpir():
  first = ijb.GallerySearch(
      mate_ranks=np.array([1, 3, 12]), mate_first=np.array([True, False,
                                                            False]),
      mate_scores=np.array([0.9, 0.5, 0.2]),
      nonmated_best=np.array([0.8, 0.3]))
  second = ijb.GallerySearch(
      mate_ranks=np.array([1]), mate_first=np.array([True]),
      mate_scores=np.array([0.4]), nonmated_best=np.array([0.1, 0.7]))

  figures = ijb.identification_figures({"G1": first, "G2": second})

  # Ranks 1, 3, 12, 1 over both galleries.
  assert figures["rank_1"] == 0.5
  assert figures["rank_5"] == 0.75
  assert figures["rank_10"] == 0.75
  # Thresholds 0.8 and 0.7: 1/3 of G1's mates and none of G2's pass.
  assert figures["tpir_at_fpir"] == {"0.01": pytest.approx(1 / 6),
                                     "0.1": pytest.approx(1 / 6)}
  assert figures["mated_probes"] == {"G1": 3, "G2": 1}


def test_search_gallery_rejects_duplicate_subjects():
  with pytest.raises(ValueError, match="gallery subjects must be unique"):
    ijb.search_gallery(np.eye(2), np.array([1, 2]), np.eye(2),
                       np.array([4, 4]))


# Reading and writing the release layout.


def _write_small_meta(root, subset="IJBC", **overrides):
  fields = dict(
      images=["1.jpg", "2.jpg", "3.jpg"],
      landmarks=np.arange(30, dtype=np.float64).reshape(3, 10),
      faceness=np.array([0.9, 0.5, 1.0]),
      templates=np.array([11, 11, 12]), medias=np.array([1, 2, 3]),
      pairs=np.array([[11, 12]]), pair_labels=np.array([0]))
  fields.update(overrides)
  ijb.write_meta(str(root), subset, **fields)
  return fields


def test_meta_round_trip(tmp_path):
  identification = ijb.Identification(
      gallery_templates={"S1": np.array([11]), "S2": np.array([12])},
      gallery_subjects={"S1": np.array([5]), "S2": np.array([6])},
      probe_templates=np.array([11, 12]), probe_subjects=np.array([5, 6]))
  fields = _write_small_meta(tmp_path, "IJBB", identification=identification)

  meta = ijb.read_meta(str(tmp_path), "IJBB")

  assert meta.image_paths == [
      os.path.join(str(tmp_path), "IJBB", "loose_crop", name)
      for name in fields["images"]]
  np.testing.assert_allclose(meta.landmarks, fields["landmarks"])
  np.testing.assert_allclose(meta.faceness, fields["faceness"])
  np.testing.assert_array_equal(meta.templates, fields["templates"])
  np.testing.assert_array_equal(meta.medias, fields["medias"])
  np.testing.assert_array_equal(meta.pairs, fields["pairs"])
  np.testing.assert_array_equal(meta.pair_labels, [False])
  np.testing.assert_array_equal(
      meta.identification.gallery_templates["S2"], [12])
  np.testing.assert_array_equal(meta.identification.probe_subjects, [5, 6])


def test_read_meta_names_bad_files(tmp_path):
  _write_small_meta(tmp_path, pairs=np.array([[11, 13]]))
  with pytest.raises(sources.DataError, match="pair_label.txt names 1 "
                     "templates no image belongs to"):
    ijb.read_meta(str(tmp_path), "IJBC")

  _write_small_meta(tmp_path)
  landmarks = tmp_path / "IJBC" / "meta" / "ijbc_name_5pts_score.txt"
  lines = landmarks.read_text().splitlines()
  landmarks.write_text("\n".join([lines[0], "9.jpg" + lines[1][5:],
                                  lines[2]]) + "\n")
  with pytest.raises(sources.DataError, match="row 2 names '2.jpg'"):
    ijb.read_meta(str(tmp_path), "IJBC")

  landmarks.write_text("\n".join([lines[0], lines[1] + " 7", lines[2]]))
  with pytest.raises(sources.DataError, match=r"5pts_score.txt:2: expected "
                     "12 fields, got 13"):
    ijb.read_meta(str(tmp_path), "IJBC")

  with pytest.raises(ValueError, match="unknown IJB subset 'IJBA'"):
    ijb.read_meta(str(tmp_path), "IJBA")


# A small IJB-C built from LFW identities, with a random tiny network.


def _lfw_identities(lfw_dir, count, min_images):
  """The first `count` verification identities with enough images."""
  by_identity = {}
  with open(lfw_dir / "manifest.csv", newline="") as f:
    for row in csv.DictReader(f):
      if row["roles"].startswith("verify"):
        by_identity.setdefault(row["identity"], []).append(row["path"])
  chosen = [(name, sorted(paths)[:min_images])
            for name, paths in sorted(by_identity.items())
            if len(paths) >= min_images]
  return chosen[:count]


def build_lfw_ijb(lfw_dir, root, subset="IJBC", num_identities=6):
  """An IJB layout: per identity, template A (two images of one media) and
  template B (two images, two media); A templates form the galleries, B
  templates the probes; every template pair is listed."""
  landmarks = sources.read_landmarks_csv(
      str(lfw_dir / "landmarks" / "landmarks_5pt_150px.csv"), str(lfw_dir))
  crops = os.path.join(root, subset, "loose_crop")
  os.makedirs(crops, exist_ok=True)
  images, points, templates, medias, faceness = [], [], [], [], []
  for i, (_, paths) in enumerate(_lfw_identities(lfw_dir, num_identities, 4)):
    for j, path in enumerate(paths):
      name = f"{4 * i + j + 1}.jpg"
      shutil.copy(lfw_dir / path, os.path.join(crops, name))
      images.append(name)
      points.append(landmarks[os.path.normpath(str(lfw_dir / path))])
      templates.append(2 * i + 1 + j // 2)
      medias.append(100 * i if j < 2 else 100 * i + j)
      faceness.append(0.5 + 0.1 * j)
  ids = sorted(set(templates))
  pairs = np.array([(a, b) for a in ids for b in ids if a < b])
  labels = (pairs[:, 0] - 1) // 2 == (pairs[:, 1] - 1) // 2
  half = num_identities // 2
  galleries = GALLERY_NAMES[subset]
  identification = ijb.Identification(
      gallery_templates={galleries[0]: np.arange(half) * 2 + 1,
                         galleries[1]: np.arange(half, num_identities) * 2 + 1},
      gallery_subjects={galleries[0]: np.arange(half),
                        galleries[1]: np.arange(half, num_identities)},
      probe_templates=np.arange(num_identities) * 2 + 2,
      probe_subjects=np.arange(num_identities))
  ijb.write_meta(root, subset, images, np.array(points), np.array(faceness),
                 np.array(templates), np.array(medias), pairs, labels,
                 identification)
  return root


GALLERY_NAMES = ijb.GALLERIES


@pytest.fixture(scope="module")
def lfw_ijb(lfw_dir, tmp_path_factory):
  return build_lfw_ijb(lfw_dir, str(tmp_path_factory.mktemp("ijb")))


@pytest.fixture(scope="module")
def embedder():
  backbone = backbone_lib.IResNet(stage_units=(1, 1), stage_widths=(4, 8),
                                  embedding_size=16)
  variables = backbone.init(jax.random.key(0),
                            jnp.zeros((1, 112, 112, 3)), train=False)
  return inference.Embedder(backbone, variables, batch_size=8,
                            with_flip=True)


def _reference_pair_scores(embedder, meta):
  """The protocol written out plainly: align, embed one by one, fuse,
  pool template by template, media by media."""
  features = []
  for path, points in zip(meta.image_paths, meta.landmarks):
    image = pipeline.prepare_face(path, points, 112, "landmarks")[None]
    padded = np.concatenate([image, np.zeros((7, 112, 112, 3), np.uint8)])
    out = {k: v[:1].astype(np.float64)
           for k, v in embedder.embed_batch(padded).items()}
    features.append(out["embeddings"][0] * out["feature_norms"][0]
                    + out["flipped_embeddings"][0]
                    * out["flipped_feature_norms"][0])
  features = np.array(features)
  pooled = {}
  for template in np.unique(meta.templates):
    rows = meta.templates == template
    media_means = [features[rows & (meta.medias == media)].mean(axis=0)
                   for media in np.unique(meta.medias[rows])]
    total = np.sum(media_means, axis=0)
    pooled[template] = total / np.linalg.norm(total)
  return np.array([pooled[a] @ pooled[b] for a, b in meta.pairs])


def test_lfw_ijb_protocols(lfw_ijb, embedder, tmp_path):
  meta = ijb.read_meta(lfw_ijb, "IJBC")
  feature_dir = str(tmp_path / "features")

  figures, rocs = ijb.evaluate(embedder, meta, feature_dir)

  assert sorted(figures) == ["adaface", "insightface"]
  for protocol, numbers in figures.items():
    assert numbers["pairs"] == 66 and numbers["genuine_pairs"] == 6
    assert numbers["images"] == 24 and numbers["templates"] == 12
    assert numbers["mated_probes"] == {"G1": 3, "G2": 3}
    assert numbers["nonmated_probes"] == {"G1": 3, "G2": 3}
    for value in list(numbers["tar_at_far"].values()) + [
        numbers["rank_1"], numbers["tpir_at_fpir"]["0.1"]]:
      assert 0.0 <= value <= 1.0
    assert numbers["rank_1"] <= numbers["rank_5"] <= numbers["rank_10"]
    assert rocs[protocol].fpr[-1] == 1.0
  # Three templates per gallery: every mate is within the top 5.
  assert figures["adaface"]["rank_5"] == 1.0
  assert np.load(os.path.join(feature_dir, "embeddings.npy")).shape == (24,
                                                                        16)

  # The streamed, chunked pipeline equals the protocol written plainly.
  columns = ijb.embed_meta(embedder, meta, feature_dir)
  ids, pooled = ijb.template_features(
      ijb.ImageFeatures(columns, "norm_add"), meta.templates, meta.medias)
  np.testing.assert_allclose(
      ijb.pair_scores(ids, pooled, meta.pairs),
      _reference_pair_scores(embedder, meta), atol=1e-6)


def test_lfw_ijb_faceness_only_matters_to_insightface(lfw_ijb, embedder,
                                                      tmp_path):
  meta = ijb.read_meta(lfw_ijb, "IJBC")
  columns = ijb.embed_meta(embedder, meta, str(tmp_path / "features"))

  def scores(protocol_meta, weights):
    ids, pooled = ijb.template_features(
        ijb.ImageFeatures(columns, "norm_add", weights),
        protocol_meta.templates, protocol_meta.medias)
    return ijb.pair_scores(ids, pooled, protocol_meta.pairs)

  adaface = scores(meta, None)
  # Faceness differs within the two-media templates: the scores move.
  assert not np.allclose(adaface, scores(meta, meta.faceness))
  # A constant weight scales every template feature alike: no change.
  np.testing.assert_allclose(
      adaface, scores(meta, np.full(len(meta.faceness), 0.3)), atol=1e-12)


def test_lfw_ijb_features_are_reused(lfw_ijb, embedder, tmp_path):
  meta = ijb.read_meta(lfw_ijb, "IJBC")
  feature_dir = str(tmp_path / "features")
  first, _ = ijb.evaluate(embedder, meta, feature_dir)

  class NoModel(inference.Embedder):
    def embed_batch(self, images):
      raise AssertionError("features should have been reused")

  reused = NoModel(embedder.backbone, embedder.variables, batch_size=8,
                   with_flip=True)
  second, _ = ijb.evaluate(reused, meta, feature_dir)

  assert second == first


def test_format_table_lists_each_protocol():
  numbers = {"tar_at_far": {f"{far:.0e}": 0.5 for far in ijb.FAR_TARGETS},
             "rank_1": 0.25, "rank_5": 0.5, "rank_10": 1.0,
             "tpir_at_fpir": {"0.01": 0.125}}

  table = ijb.format_table({"ijbc": {"adaface": numbers,
                                     "insightface": {"tar_at_far": {}}}})

  one_to_one, one_to_n = [part.splitlines() for part in table.split("\n\n")]
  assert one_to_one[0].split()[:5] == ["1:1", "set", "/", "protocol",
                                       "TAR@1e-06"]
  assert one_to_one[2].split() == ["ijbc", "/", "adaface"] + ["50.00"] * 6
  assert one_to_one[3].split() == ["ijbc", "/", "insightface"] + ["-"] * 6
  # Only the protocol with 1:N figures has a 1:N row.
  assert len(one_to_n) == 3
  assert one_to_n[2].split() == ["ijbc", "/", "adaface", "25.00", "50.00",
                                 "100.00", "12.50", "-"]
