"""Indexes, alignment, decoding and the grain training stream."""

import os

import numpy as np
from PIL import Image
import pytest

from adaface_jax import model as model_lib
from data_pipeline import alignment
from data_pipeline import pipeline
from data_pipeline import sources


def _write_image(path, rgb):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(rgb).save(path)


def _make_folder(root, identities=3, images=4, size=112, seed=0):
  rng = np.random.default_rng(seed)
  for i in range(identities):
    for j in range(images):
      rgb = rng.integers(0, 256, (size, size, 3), np.uint8)
      _write_image(os.path.join(root, f"person_{i}", f"{j:03d}.png"), rgb)
  return str(root)


def test_scan_image_folder_labels_sorted_identities(tmp_path):
  root = _make_folder(tmp_path / "faces")
  index = sources.scan_image_folder(root)
  assert index.identities == ("person_0", "person_1", "person_2")
  assert len(index) == 12
  assert [r.label for r in index.records] == [0] * 4 + [1] * 4 + [2] * 4
  assert index.records[5].path.endswith(os.path.join("person_1", "001.png"))


def test_scan_image_folder_errors(tmp_path):
  with pytest.raises(sources.DataError, match="does not exist"):
    sources.scan_image_folder(str(tmp_path / "missing"))
  root = _make_folder(tmp_path / "faces")
  os.makedirs(os.path.join(root, "person_empty"))
  with pytest.raises(sources.DataError, match="person_empty.*holds no images"):
    sources.scan_image_folder(root)


def test_read_manifest_filters_labels_and_landmarks(tmp_path):
  manifest = tmp_path / "m.csv"
  manifest.write_text(
      "path,identity,roles\n"
      "a/1.jpg,bob,train\n"
      "a/2.jpg,alice,train;val\n"
      "a/3.jpg,carol,val\n")
  index = sources.read_manifest(str(manifest), filters=["roles=train"])
  assert index.identities == ("alice", "bob")
  assert [r.label for r in index.records] == [1, 0]
  assert index.records[0].path == os.path.join(str(tmp_path), "a", "1.jpg")

  with pytest.raises(sources.DataError, match="no rows matching"):
    sources.read_manifest(str(manifest), filters=["roles=test"])
  with pytest.raises(sources.DataError, match="no 'split' column"):
    sources.read_manifest(str(manifest), filters=["split=train"])


def test_read_manifest_explicit_labels_and_errors(tmp_path):
  manifest = tmp_path / "m.csv"
  manifest.write_text("path,identity,label\nx.jpg,bob,4\ny.jpg,amy,0\n")
  index = sources.read_manifest(str(manifest))
  assert [r.label for r in index.records] == [4, 0]
  assert index.num_identities == 5
  with pytest.raises(sources.DataError, match="outside head.num_classes=4"):
    sources.check_num_classes(index, 4)
  sources.check_num_classes(index, 5)

  manifest.write_text("path,identity,label\nx.jpg,bob,four\n")
  with pytest.raises(sources.DataError, match=r"m.csv:2: label 'four'"):
    sources.read_manifest(str(manifest))
  manifest.write_text("path,identity\nx.jpg,bob\nx.jpg,bob\n")
  with pytest.raises(sources.DataError, match="listed twice"):
    sources.read_manifest(str(manifest))


def test_missing_landmarks_named(tmp_path):
  root = _make_folder(tmp_path / "faces", identities=1, images=2)
  index = sources.scan_image_folder(root)
  table = {os.path.normpath(index.records[0].path): np.zeros(10, np.float32)}
  with pytest.raises(sources.DataError, match="001.png.*has no landmarks"):
    sources.attach_landmarks(index, table, require=True)
  loose = sources.attach_landmarks(index, table, require=False)
  assert loose.records[0].landmarks is not None
  assert loose.records[1].landmarks is None


def test_lfw_manifest_train_role(lfw_dir):
  index = sources.read_manifest(
      str(lfw_dir / "manifest.csv"), str(lfw_dir), ["roles=train"])
  assert (len(index), index.num_identities) == (3245, 253)
  table = sources.read_landmarks_csv(
      str(lfw_dir / "landmarks" / "landmarks_5pt_150px.csv"), str(lfw_dir))
  index = sources.attach_landmarks(index, table, require=True)
  assert all(r.landmarks.shape == (10,) for r in index.records)


def test_similarity_estimate_recovers_transform():
  angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
  rotation = np.array([[np.cos(angle), -np.sin(angle)],
                       [np.sin(angle), np.cos(angle)]])
  source = np.random.default_rng(0).uniform(0, 100, (5, 2))
  target = scale * source @ rotation.T + shift
  matrix = alignment.estimate_similarity(source, target)
  np.testing.assert_allclose(matrix[:, :2], scale * rotation, atol=1e-10)
  np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-8)


def test_align_face_puts_landmarks_on_template():
  # Dots at landmark positions of a 150x150 image, scaled and shifted from
  # the template; after alignment they must sit on the template points.
  template = alignment.ARCFACE_TEMPLATE_112
  landmarks = template * 1.2 + np.array([7.0, 11.0])
  image = np.zeros((150, 150, 3), np.uint8)
  for x, y in np.round(landmarks).astype(int):
    image[y - 1:y + 2, x - 1:x + 2] = 255
  aligned = alignment.align_face(image, landmarks.reshape(-1), 112)
  assert aligned.shape == (112, 112, 3)
  for x, y in template:
    patch = aligned[int(round(y)) - 1:int(round(y)) + 2,
                    int(round(x)) - 1:int(round(x)) + 2, 0]
    assert patch.max() > 100, (x, y)


def test_prepare_face_bgr_grayscale_and_sizes(tmp_path):
  rgb = np.zeros((112, 112, 3), np.uint8)
  rgb[..., 2] = 200  # Blue plane distinct.
  rgb[..., 0] = 10
  _write_image(str(tmp_path / "blue.png"), rgb)
  bgr = pipeline.prepare_face(str(tmp_path / "blue.png"), None, 112, "none")
  assert bgr[0, 0].tolist() == [200, 0, 10]

  gray = np.arange(92 * 112, dtype=np.uint8).reshape(112, 92)
  Image.fromarray(gray, "L").save(tmp_path / "gray.pgm")
  out = pipeline.prepare_face(str(tmp_path / "gray.pgm"), None, 112, "resize")
  assert out.shape == (112, 112, 3)
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  with pytest.raises(pipeline.ImageError, match="gray.pgm.*92x112"):
    pipeline.prepare_face(str(tmp_path / "gray.pgm"), None, 112, "none")


def test_corrupt_images_raise_with_path(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (112, 112, 3), np.uint8)
  Image.fromarray(rgb).save(tmp_path / "ok.jpg", quality=90)
  data = (tmp_path / "ok.jpg").read_bytes()
  (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
  (tmp_path / "empty.jpg").write_bytes(b"")
  for name in ("truncated.jpg", "empty.jpg"):
    with pytest.raises(pipeline.ImageError, match=name):
      pipeline.load_rgb(str(tmp_path / name))
  with pytest.raises(pipeline.ImageError, match="does not exist"):
    pipeline.load_rgb(str(tmp_path / "nope.jpg"))


def test_orl_grayscale_faces_load_as_three_channels(orl_dir):
  out = pipeline.prepare_face(str(orl_dir / "s1" / "1.pgm"), None, 112,
                              "resize")
  assert out.shape == (112, 112, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[..., 0], out[..., 1])


def _stream(index, **kwargs):
  options = dict(batch_size=4, seed=3, image_size=112, alignment="none",
                 random_flip=True, worker_count=0)
  options.update(kwargs)
  return iter(pipeline.make_train_dataset(index, **options))


def test_train_stream_is_seeded_and_covers_each_epoch(tmp_path):
  index = sources.scan_image_folder(_make_folder(tmp_path / "faces"))
  first = [next(_stream(index))["label"].tolist() for _ in range(2)]
  assert first[0] == first[1]

  stream = _stream(index)
  epoch = np.concatenate([next(stream)["label"] for _ in range(3)])
  assert sorted(epoch.tolist()) == sorted(r.label for r in index.records)
  batch = next(stream)
  assert batch["image"].shape == (4, 112, 112, 3)
  assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32

  other_seed = _stream(index, seed=4)
  assert [next(other_seed)["label"].tolist() for _ in range(3)] != [
      epoch[i:i + 4].tolist() for i in range(0, 12, 4)]


def test_train_stream_resumes_from_saved_state(tmp_path):
  index = sources.scan_image_folder(_make_folder(tmp_path / "faces"))
  stream = _stream(index)
  for _ in range(2):
    next(stream)
  state = stream.get_state()
  expected = [next(stream) for _ in range(3)]

  resumed = _stream(index)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_worker_count_does_not_change_batches(tmp_path):
  index = sources.scan_image_folder(_make_folder(tmp_path / "faces"))
  in_process = _stream(index, worker_count=0)
  with_worker = _stream(index, worker_count=1)
  for _ in range(3):
    a, b = next(in_process), next(with_worker)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_too_small_dataset_is_named(tmp_path):
  index = sources.scan_image_folder(
      _make_folder(tmp_path / "faces", identities=1, images=2))
  with pytest.raises(sources.DataError, match="fewer than one global batch"):
    _stream(index)


def test_normalize_images_maps_to_minus_one_one():
  pixels = np.array([0, 51, 255], np.uint8)
  np.testing.assert_allclose(
      model_lib.normalize_images(pixels), [-1.0, 51 / 127.5 - 1, 1.0],
      rtol=1e-6)
