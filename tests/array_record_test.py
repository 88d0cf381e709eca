"""Conversion to ArrayRecord through the TFDS builder, reading it back
without TensorFlow, and training from it with train.py."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipeline import array_record
from data_pipeline import recordio
from data_pipeline import sources

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def lfw_rec(lfw_dir, tmp_path_factory):
  """A `.rec` of 4 LFW people x 3 images (150x150 JPEG files as they are)
  plus, in identity 0, a record without image bytes and, in identity 1, a
  truncated JPEG. Returns (rec path, [(image bytes, label)] as written)."""
  index = sources.read_manifest(
      str(lfw_dir / "manifest.csv"), str(lfw_dir), ["roles=train"])
  by_label = {}
  for record in index.records:
    by_label.setdefault(record.label, []).append(record.path)
  people = [paths[:3] for _, paths in sorted(by_label.items())
            if len(paths) >= 3][:4]
  faces = []
  for label, paths in enumerate(people):
    for path in paths:
      with open(path, "rb") as f:
        faces.append((f.read(), label))
  faces.insert(1, (b"", 0))
  faces.insert(5, (faces[5][0][:1000], 1))  # Truncated.
  rec_path = str(tmp_path_factory.mktemp("lfw_rec") / "train.rec")
  recordio.write_face_rec(rec_path, faces)
  return rec_path, faces


@pytest.fixture(scope="module")
def converted(lfw_rec, tmp_path_factory):
  rec_path, _ = lfw_rec
  output = str(tmp_path_factory.mktemp("out"))
  return output, array_record.convert(rec_path, output, progress=False)


def test_conversion_summary(converted, lfw_rec):
  _, faces = lfw_rec
  _, summary = converted
  assert summary.images == 13 and summary.identities == 4
  assert summary.skipped == {"empty": 1}
  assert summary.image_bytes == sum(len(image) for image, _ in faces)
  assert summary.output_bytes > summary.image_bytes
  assert summary.skipped_examples == [f"{lfw_rec[0]}#2: empty"]
  text = summary.format()
  assert "Wrote 13 images of 4 identities" in text
  assert "Skipped 1 records: 1 empty" in text


def test_read_back_without_tensorflow(converted, lfw_rec):
  output, summary = converted
  _, faces = lfw_rec
  kept = [face for face in faces if face[0]]

  dataset_dir = array_record.find_dataset_dir(output)
  assert dataset_dir == summary.dataset_dir
  assert dataset_dir.endswith(os.path.join("face_images", "1.0.0"))
  restored = tfds.builder_from_directory(dataset_dir)
  assert restored.info.metadata["skipped_records"] == 1
  assert restored.info.features["label"].num_classes == 4

  # Bytes exactly as converted, in input order, with their origins.
  opened = array_record.open_face_images(output)
  assert len(opened.source) == 13 and opened.num_identities == 4
  for i, (image, label) in enumerate(kept):
    record = opened.source[i]
    assert record["image"] == image and record["label"] == label
  assert opened.source[0]["origin"].decode().endswith("train.rec#1")

  # The usual TFDS way, decoding to RGB numpy (PIL/OpenCV, no TensorFlow).
  decoded = array_record.FaceImages(data_dir=output).as_data_source("train")
  expected = cv2.imdecode(np.frombuffer(kept[0][0], np.uint8), 1)[..., ::-1]
  np.testing.assert_array_equal(decoded[0]["image"], expected)
  assert decoded[0]["image"].shape == (150, 150, 3)


def test_check_images_leaves_out_undecodable(lfw_rec, tmp_path):
  summary = array_record.convert(lfw_rec[0], str(tmp_path), progress=False,
                                 check_images=True)
  assert summary.images == 12
  assert summary.skipped == {"empty": 1, "undecodable": 1}


def test_image_folder_keeps_identity_names(tmp_path):
  for name in ("zoe", "adam"):
    (tmp_path / "faces" / name).mkdir(parents=True)
    for i in range(2):
      ok, png = cv2.imencode(".png", np.full((112, 112, 3), i, np.uint8))
      assert ok
      (tmp_path / "faces" / name / f"{i}.png").write_bytes(png.tobytes())
  summary = array_record.convert(str(tmp_path / "faces"),
                                 str(tmp_path / "out"), progress=False)
  assert summary.images == 4
  info = tfds.builder_from_directory(summary.dataset_dir).info
  assert info.features["label"].names == ["adam", "zoe"]


def test_bad_inputs_are_named(tmp_path):
  with pytest.raises(array_record.ConversionError, match="nowhere"):
    array_record.convert(str(tmp_path / "nowhere"), str(tmp_path / "out"))
  with pytest.raises(sources.DataError, match="holds no converted data set"):
    array_record.find_dataset_dir(str(tmp_path))


def _run(*args):
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300)


def test_cli_then_train_py_from_array_record(lfw_rec, tmp_path):
  output = str(tmp_path / "array_record")
  convert = ("-m", "data_pipeline.array_record", "--input", lfw_rec[0],
             "--output_dir", output)
  result = _run(*convert)
  assert result.returncode == 0, result.stderr
  assert "Wrote 13 images of 4 identities" in result.stdout
  assert "Skipped 1 records: 1 empty" in result.stdout
  again = _run(*convert)
  assert again.returncode == 1 and "already holds" in again.stderr

  # The truncated JPEG is skipped and counted; training goes on.
  workdir = str(tmp_path / "run")
  result = _run(
      "train.py", "--config", "configs/synthetic.py", "--workdir", workdir,
      "--config.data.kind=array_record", f"--config.data.root={output}",
      "--config.data.alignment=resize", "--config.data.batch_size=8",
      "--config.data.worker_count=0", "--config.model.stage_units=(1,1)",
      "--config.model.stage_widths=(4,8)", "--config.model.embedding_size=16",
      "--config.schedule.total_steps=2", "--config.logging.log_every_steps=1",
      "--config.logging.progress_bar=False")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Skipping corrupt record 1" in result.stderr
  rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
  assert [row["step"] for row in rows] == [1, 2]
  # 16 good images need the whole first epoch, truncated JPEG included.
  assert rows[-1]["skipped_records"] >= 1
  assert all(np.isfinite(row["loss"]) for row in rows)
