"""Tests for the inference API and command line."""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from adaface_jax import eval_lib
from adaface_jax import inference
from adaface_jax import model as model_lib
from configs import common
from data_pipeline import sources

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config():
  config = common.get_base_config()
  config.model.name = "custom"
  config.model.stage_units = (1, 1)
  config.model.stage_widths = (4, 8)
  config.model.embedding_size = 16
  return config


@pytest.fixture(scope="module")
def backbone_and_variables():
  backbone = model_lib.create_backbone(_tiny_config().model)
  variables = backbone.init(jax.random.key(3), jnp.zeros((1, 112, 112, 3)),
                            train=False)
  return backbone, jax.device_get(variables)


@pytest.fixture(scope="module")
def faces():
  """Seven 112x112 uint8 BGR images with some structure."""
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (7, 1, 1, 3))
  ramp = np.linspace(-60, 60, 112)[None, None, :, None]
  noise = rng.integers(-30, 30, (7, 112, 112, 3))
  return np.clip(base + ramp + noise, 0, 255).astype(np.uint8)


class _Count:
  """Counts batches through an embedder."""

  def __init__(self, embedder):
    self.calls = 0
    original = embedder.embed_batch

    def counted(images):
      self.calls += 1
      return original(images)
    embedder.embed_batch = counted


def test_embedder_returns_unit_embeddings_norms_and_flips(
    backbone_and_variables, faces):
  backbone, variables = backbone_and_variables
  embedder = inference.Embedder(backbone, variables, batch_size=7,
                                with_flip=True)

  columns = embedder.embed_batch(faces)

  expected, norms = backbone.apply(
      variables, model_lib.normalize_images(faces), train=False)
  mirrored, mirrored_norms = backbone.apply(
      variables, model_lib.normalize_images(faces[:, :, ::-1]), train=False)
  np.testing.assert_allclose(columns["embeddings"], expected, atol=1e-6)
  np.testing.assert_allclose(columns["feature_norms"], norms[:, 0],
                             rtol=1e-6)
  np.testing.assert_allclose(columns["flipped_embeddings"], mirrored,
                             atol=1e-6)
  np.testing.assert_allclose(columns["flipped_feature_norms"],
                             mirrored_norms[:, 0], rtol=1e-6)
  np.testing.assert_allclose(
      np.linalg.norm(columns["embeddings"], axis=1), 1.0, rtol=1e-5)
  assert np.all(columns["feature_norms"] > 0)
  with pytest.raises(ValueError, match=r"\[batch, 112, 112, 3\]"):
    embedder.embed_batch(faces[:, :64])


def test_embed_faces_gives_unit_embeddings_and_quality(
    backbone_and_variables, faces):
  backbone, variables = backbone_and_variables
  embedder = inference.Embedder(backbone, variables, batch_size=4,
                                with_flip=True)

  features = inference.embed_faces(embedder, faces, flip_fusion="norm_add")

  columns = inference.embed_items(embedder, list(range(7)), faces.__getitem__)
  np.testing.assert_allclose(
      features.embeddings, inference.fused_embeddings(columns, "norm_add"),
      atol=1e-6)
  # The quality score is the unflipped image's feature norm.
  np.testing.assert_array_equal(features.quality, columns["feature_norms"])
  assert features.embeddings.dtype == np.float32
  with pytest.raises(ValueError, match="uint8 BGR"):
    inference.embed_faces(embedder, faces.astype(np.float32))
  with pytest.raises(ValueError, match="uint8 BGR pixels"):
    embedder.embed_batch(faces[:4].astype(np.float32))


def test_every_image_is_embedded_once_whatever_the_batch_size(
    backbone_and_variables, faces):
  backbone, variables = backbone_and_variables
  items = list(range(len(faces)))

  results = []
  for batch_size in (3, 7, 10):
    embedder = inference.Embedder(backbone, variables, batch_size=batch_size)
    counter = _Count(embedder)
    results.append(inference.embed_items(embedder, items, faces.__getitem__))
    assert counter.calls == -(-len(faces) // batch_size)

  for result in results:
    assert result["embeddings"].shape == (7, 16)
    np.testing.assert_allclose(result["embeddings"],
                               results[0]["embeddings"], atol=1e-6)


def test_fused_embeddings(backbone_and_variables, faces):
  backbone, variables = backbone_and_variables
  embedder = inference.Embedder(backbone, variables, batch_size=7,
                                with_flip=True)
  columns = embedder.embed_batch(faces)

  fused = inference.fused_embeddings(columns, "norm_add")

  raw = (columns["embeddings"] * columns["feature_norms"][:, None]
         + columns["flipped_embeddings"]
         * columns["flipped_feature_norms"][:, None])
  np.testing.assert_allclose(
      fused, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
  np.testing.assert_allclose(
      inference.fused_embeddings(columns, "none"), columns["embeddings"],
      atol=1e-6)
  with pytest.raises(ValueError, match="unknown flip fusion 'max'"):
    inference.fused_embeddings(columns, "max")
  single = {k: columns[k] for k in ("embeddings", "feature_norms")}
  with pytest.raises(ValueError, match="with_flip=True"):
    inference.fused_embeddings(single, "add")


def test_embed_to_disk_reuses_and_resumes(backbone_and_variables, faces,
                                          tmp_path):
  backbone, variables = backbone_and_variables
  embedder = inference.Embedder(backbone, variables, batch_size=2)
  counter = _Count(embedder)
  items = list(range(len(faces)))
  out = str(tmp_path / "features")

  first = inference.embed_to_disk(embedder, items, faces.__getitem__, out,
                                  flush_every_batches=1)
  assert counter.calls == 4
  expected = np.array(first["embeddings"])
  assert np.load(os.path.join(out, "embeddings.npy")).shape == (7, 16)

  again = inference.embed_to_disk(embedder, items, faces.__getitem__, out)
  assert counter.calls == 4
  np.testing.assert_array_equal(again["embeddings"], expected)

  # An interrupted run: progress says 4 of 7 images were written.
  progress_path = os.path.join(out, inference.PROGRESS_FILE)
  progress = json.load(open(progress_path))
  json.dump(dict(progress, done=4), open(progress_path, "w"))
  resumed = inference.embed_to_disk(embedder, items, faces.__getitem__, out)
  assert counter.calls == 6  # Images 4-5, then 6.
  np.testing.assert_allclose(resumed["embeddings"], expected, atol=1e-6)

  # Other weights: everything again.
  embedder.set_variables(jax.tree.map(lambda x: x * 1.5, variables))
  inference.embed_to_disk(embedder, items, faces.__getitem__, out)
  assert counter.calls == 10


# Loading checkpoints.


def _save_run(workdir, variables, config):
  """A run folder holding one checkpoint of the backbone and config.json."""
  eval_lib.BestBackbone(workdir).update(5, 0.5, variables, {})
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())


def test_load_embedder_from_a_run_folder(backbone_and_variables, faces,
                                         tmp_path):
  backbone, variables = backbone_and_variables
  workdir = str(tmp_path / "run")
  _save_run(workdir, variables, _tiny_config())

  embedder = inference.load_embedder(workdir, batch_size=7)

  expected, _ = backbone.apply(variables, model_lib.normalize_images(faces),
                               train=False)
  np.testing.assert_allclose(embedder.embed_batch(faces)["embeddings"],
                             expected, atol=1e-6)
  assert embedder.image_size == 112
  with pytest.raises(FileNotFoundError, match="does not exist"):
    inference.load_embedder(str(tmp_path / "nowhere"))


def test_load_embedder_from_a_pytorch_checkpoint(backbone_and_variables,
                                                 faces, tmp_path):
  torch = pytest.importorskip("torch")
  from adaface_jax import convert  # pylint: disable=g-import-not-at-top
  backbone, variables = backbone_and_variables
  arch = convert.architecture_from_config(_tiny_config())
  state_dict = convert.flax_to_torch_state_dict(variables, arch)
  path = str(tmp_path / "adaface_tiny.ckpt")
  torch.save({"state_dict": {f"model.{k}": torch.from_numpy(np.array(v))
                             for k, v in state_dict.items()}}, path)

  embedder = inference.load_embedder(path, batch_size=7)

  expected, norms = backbone.apply(
      variables, model_lib.normalize_images(faces), train=False)
  columns = embedder.embed_batch(faces)
  np.testing.assert_allclose(columns["embeddings"], expected, atol=1e-5)
  np.testing.assert_allclose(columns["feature_norms"], norms[:, 0],
                             rtol=1e-5)


# Image lists and the command line.


def test_list_images_of_a_folder_and_a_list(tmp_path):
  for name in ("b/2.png", "b/1.jpg", "a.jpg", "notes.txt", "b/.hidden.jpg"):
    path = tmp_path / "images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
  (tmp_path / "list.txt").write_text("# faces\nimages/a.jpg\n\n/abs/x.png\n")

  assert inference.list_images(str(tmp_path / "images")) == (
      str(tmp_path / "images"), ["a.jpg", "b/1.jpg", "b/2.png"])
  assert inference.list_images(str(tmp_path / "list.txt")) == (
      str(tmp_path), ["images/a.jpg", "/abs/x.png"])
  with pytest.raises(FileNotFoundError, match="nowhere"):
    inference.list_images(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(sources.DataError, match="no images"):
    inference.list_images(str(tmp_path / "empty"))


def _lfw_images(lfw_dir, tmp_path, count=5):
  """Raw LFW images (150 px) copied under one folder, with a landmarks CSV
  relative to it."""
  landmarks = sources.read_landmarks_csv(
      str(lfw_dir / "landmarks" / "landmarks_5pt_150px.csv"), str(lfw_dir))
  with open(lfw_dir / "manifest.csv", newline="") as f:
    paths = [row["path"] for row in csv.DictReader(f)][:count]
  folder = tmp_path / "raw"
  rows = []
  for path in paths:
    target = folder / os.path.basename(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((lfw_dir / path).read_bytes())
    points = landmarks[os.path.normpath(str(lfw_dir / path))]
    rows.append([target.name] + [f"{x:.2f}" for x in points])
  csv_path = tmp_path / "landmarks.csv"
  with open(csv_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("path",) + sources.LANDMARK_COLUMNS)
    writer.writerows(rows)
  return folder, csv_path


def test_cli_writes_embeddings_norms_and_index(lfw_dir, backbone_and_variables,
                                               tmp_path, capsys):
  _, variables = backbone_and_variables
  workdir = str(tmp_path / "run")
  _save_run(workdir, variables, _tiny_config())
  folder, landmarks = _lfw_images(lfw_dir, tmp_path)
  out = tmp_path / "out"

  inference.main(["--checkpoint", workdir, "--images", str(folder),
                  "--output", str(out), "--alignment", "landmarks",
                  "--landmarks", str(landmarks), "--flip_fusion", "norm_add",
                  "--batch_size", "4"])

  embeddings = np.load(out / "embeddings.npy")
  feature_norms = np.load(out / "feature_norms.npy")
  assert embeddings.shape == (5, 16) and feature_norms.shape == (5,)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0,
                             rtol=1e-5)
  rows = list(csv.DictReader(open(out / "index.csv")))
  assert [row["path"] for row in rows] == sorted(os.listdir(folder))
  np.testing.assert_allclose([float(row["feature_norm"]) for row in rows],
                             feature_norms, rtol=1e-5)
  assert "Wrote 5 embeddings of size 16" in capsys.readouterr().out

  # The same faces through the API.
  embedder = inference.load_embedder(workdir, batch_size=4, with_flip=True)
  items = inference.image_items(str(folder), sorted(os.listdir(folder)),
                                "landmarks", str(landmarks))
  features = inference.embed_faces(
      embedder, [path for path, _ in items],
      landmarks=[points for _, points in items], alignment="landmarks",
      flip_fusion="norm_add")
  np.testing.assert_allclose(embeddings, features.embeddings, atol=1e-6)
  np.testing.assert_allclose(feature_norms, features.quality, rtol=1e-6)


def test_image_items_need_landmarks_for_alignment(tmp_path):
  with pytest.raises(ValueError, match="needs a landmarks CSV"):
    inference.image_items(str(tmp_path), ["a.jpg"], "landmarks")
  (tmp_path / "marks.csv").write_text(
      "path," + ",".join(sources.LANDMARK_COLUMNS) + "\n")
  with pytest.raises(sources.DataError, match="1 images have no landmarks"):
    inference.image_items(str(tmp_path), ["a.jpg"], "landmarks",
                          str(tmp_path / "marks.csv"))


def test_cli_reports_a_missing_checkpoint(tmp_path):
  Image.new("RGB", (112, 112)).save(tmp_path / "a.png")

  result = subprocess.run(
      [sys.executable, "-m", "adaface_jax.inference", "--checkpoint",
       str(tmp_path / "nowhere"), "--images", str(tmp_path), "--output",
       str(tmp_path / "out")], cwd=REPO_ROOT, capture_output=True, text=True,
      timeout=120)

  assert result.returncode != 0
  assert "nowhere" in result.stderr and "does not exist" in result.stderr
