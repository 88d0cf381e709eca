"""The grain stream over RecordIO and ArrayRecord: colour order, worker
independence, resuming, corrupt records, and training from a `.rec`."""

import itertools
import json
import os

import cv2
import numpy as np
import pytest

from adaface_jax import train_lib
from configs import common
from data_pipeline import array_record
from data_pipeline import augment
from data_pipeline import builder
from data_pipeline import pipeline
from data_pipeline import recordio
from data_pipeline import sources

SEED = 5


def _jpeg(bgr: np.ndarray) -> bytes:
  ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
  assert ok
  return encoded.tobytes()


@pytest.fixture(scope="module")
def aligned_faces(lfw_dir):
  """(JPEG of a 112x112 aligned BGR crop, label): 4 LFW people x 3."""
  index = sources.read_manifest(
      str(lfw_dir / "manifest.csv"), str(lfw_dir), ["roles=train"])
  table = sources.read_landmarks_csv(
      str(lfw_dir / "landmarks" / "landmarks_5pt_150px.csv"), str(lfw_dir))
  index = sources.attach_landmarks(index, table, require=True)
  by_label = {}
  for record in index.records:
    by_label.setdefault(record.label, []).append(record)
  people = [records[:3] for _, records in sorted(by_label.items())
            if len(records) >= 3][:4]
  return [(_jpeg(pipeline.prepare_face(r.path, r.landmarks, 112,
                                       "landmarks")), label)
          for label, records in enumerate(people) for r in records]


def _write_rec(path, payloads, num_identities):
  """An im2rec-style `.rec` of raw payloads, with a `property` file."""
  with recordio.RecordWriter(str(path)) as writer:
    for key, payload in enumerate(payloads):
      writer.write(key, payload)
  (path.parent / "property").write_text(f"{num_identities},112,112")
  return str(path)


@pytest.fixture(scope="module")
def corrupt_rec(aligned_faces, tmp_path_factory):
  """8 good faces and, at keys 2, 5 and 9, a truncated JPEG, a record
  with a header but no image bytes, and a zero-length record."""
  good = [recordio.pack(label, image) for image, label in aligned_faces[:8]]
  truncated = aligned_faces[8][0][:len(aligned_faces[8][0]) // 2]
  payloads = list(good)
  payloads.insert(2, recordio.pack(2, truncated))
  payloads.insert(5, recordio.pack(1, b""))
  payloads.insert(9, b"")
  path = tmp_path_factory.mktemp("corrupt") / "train.rec"
  labels = [recordio.unpack(p)[0].class_label if p else -1 for p in payloads]
  return _write_rec(path, payloads, 4), labels, {2, 5, 9}


def _expected_batches(labels, corrupt, batch_size, count):
  """(labels of each of the first `count` batches, running count of skipped
  records after each), in the pipeline's seeded shuffle order over epochs.

  Batch k takes positions [k * batch_size, (k + 1) * batch_size); the slot
  of a corrupt record there takes the next good record after them.
  """
  epochs = [pipeline.epoch_order(len(labels), SEED, epoch)
            for epoch in range(batch_size * (count + 4) // len(labels) + 2)]
  order = np.concatenate(epochs)
  batch_labels, counts, skipped = [], [], 0
  for k in range(count):
    end = (k + 1) * batch_size
    span = [order[i] for i in range(end - batch_size, end)]
    spares = (order[i] for i in itertools.count(end)
              if order[i] not in corrupt)
    batch_labels.append([labels[next(spares) if i in corrupt else i]
                         for i in span])
    skipped += sum(i in corrupt for i in span)
    counts.append(skipped)
  return batch_labels, counts


def _data_config(kind, root):
  data = common.get_base_config().data
  data.kind, data.root, data.alignment = kind, root, "none"
  return data


def _stream(face_set, worker_count=0, **kwargs):
  options = dict(batch_size=4, seed=SEED, image_size=112, alignment="none",
                 random_flip=True, worker_count=worker_count)
  options.update(kwargs)
  return iter(pipeline.make_train_dataset(face_set, **options))


@pytest.fixture(scope="module")
def converted(aligned_faces, tmp_path_factory):
  """The 12 aligned faces as a `.rec`, converted to ArrayRecord."""
  root = tmp_path_factory.mktemp("converted")
  rec_path = str(root / "train.rec")
  recordio.write_face_rec(rec_path, aligned_faces)
  summary = array_record.convert(rec_path, str(root / "array_record"),
                                 progress=False)
  assert summary.images == 12
  return str(root / "array_record")


@pytest.mark.parametrize("kind", ["recordio", "array_record"])
def test_model_sees_bgr(kind, tmp_path):
  rgb = np.zeros((112, 112, 3), np.uint8)
  rgb[..., 2] = 200  # A distinct blue plane.
  rgb[..., 0] = 10
  ok, png = cv2.imencode(".png", rgb[:, :, ::-1])  # cv2 encodes from BGR.
  assert ok
  rec_path = str(tmp_path / "train.rec")
  recordio.write_face_rec(rec_path, [(png.tobytes(), i // 4) for i in range(8)])
  root = rec_path
  if kind == "array_record":
    root = str(tmp_path / "converted")
    array_record.convert(rec_path, root, progress=False)
  face_set = builder.build_train_index(_data_config(kind, root), "")

  batch = next(_stream(face_set))
  assert batch["image"].shape == (4, 112, 112, 3)
  assert (batch["image"][..., 0] == 200).all()  # Blue first: BGR.
  assert (batch["image"][..., 2] == 10).all()


def test_worker_count_does_not_change_batches(converted):
  face_set = builder.build_train_index(
      _data_config("array_record", converted), "")
  params = augment.AugmentParams(crop_prob=0.5, low_res_prob=0.5,
                                 photometric_prob=0.5)
  in_process = _stream(face_set, 0, augmentation=params)
  with_workers = _stream(face_set, 2, augmentation=params)
  for _ in range(4):  # Past the 12-image epoch.
    a, b = next(in_process), next(with_workers)
    for key in ("image", "label", pipeline.SKIPPED_RECORDS_KEY):
      np.testing.assert_array_equal(a[key], b[key])
  plain = next(_stream(face_set, 0))
  first = next(_stream(face_set, 0, augmentation=params))
  assert not np.array_equal(plain["image"], first["image"])


def test_restored_iterator_continues_mid_epoch(converted):
  face_set = builder.build_train_index(
      _data_config("array_record", converted), "")
  stream = _stream(face_set)
  next(stream)  # 4 of the epoch's 12 images.
  state = json.loads(json.dumps(stream.get_state()))  # As checkpoints do.
  expected = [next(stream) for _ in range(2)]

  resumed = _stream(face_set)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in ("image", "label", pipeline.SKIPPED_RECORDS_KEY):
      np.testing.assert_array_equal(got[key], want[key])


def test_corrupt_records_are_skipped_and_counted(corrupt_rec):
  rec_path, labels, corrupt = corrupt_rec
  face_set = builder.build_train_index(_data_config("recordio", rec_path), "")
  assert len(face_set) == 11 and face_set.num_identities == 4
  stream = _stream(face_set)
  batches = [next(stream) for _ in range(6)]  # 24 positions: into epoch 3.

  want_labels, want_counts = _expected_batches(labels, corrupt, 4, 6)
  assert want_counts[-1] >= 6  # Epochs 1 and 2, 3 corrupt records each.
  assert [b["label"].tolist() for b in batches] == want_labels
  for batch, count in zip(batches, want_counts):
    assert batch["image"].shape == (4, 112, 112, 3)
    assert batch[pipeline.SKIPPED_RECORDS_KEY].tolist() == [count] * 4

  # Slots are filled batch by batch in the workers, so neither the worker
  # count nor a restore changes the batches or the count.
  with_workers = _stream(face_set, 2)
  for want in batches:
    got = next(with_workers)
    for key in ("image", "label", pipeline.SKIPPED_RECORDS_KEY):
      np.testing.assert_array_equal(got[key], want[key])
  state = json.loads(json.dumps(with_workers.get_state()))
  assert state[pipeline.SKIPPED_RECORDS_KEY] == want_counts[-1]
  expected = next(with_workers)
  resumed = _stream(face_set, 2)
  resumed.set_state(state)
  got = next(resumed)
  for key in ("image", "label", pipeline.SKIPPED_RECORDS_KEY):
    np.testing.assert_array_equal(got[key], expected[key])

  order = pipeline.epoch_order(len(labels), SEED, 0)
  first = next(i for i in order if i in corrupt)
  strict = _stream(face_set, corrupt_records="raise")
  with pytest.raises(pipeline.ImageError, match=f"train.rec#{first}'"):
    for _ in range(3):
      next(strict)


def test_unreadable_data_stops_the_stream(tmp_path, monkeypatch):
  # A lower bound than the real one keeps the search short (in-process).
  monkeypatch.setattr(pipeline, "MAX_CONSECUTIVE_SKIPS", 30)
  rec_path = _write_rec(tmp_path / "train.rec",
                        [recordio.pack(0, b"")] * 6, 1)
  face_set = builder.build_train_index(_data_config("recordio", rec_path), "")
  stream = _stream(face_set, read_threads=1)
  with pytest.raises(sources.DataError, match=r"30 records in a row failed "
                     r"to decode.*train.rec#\d' holds no image bytes"):
    next(stream)


def test_train_from_rec_skips_corrupt_records(corrupt_rec, tmp_path):
  rec_path, labels, corrupt = corrupt_rec
  config = common.get_base_config()
  config.seed = SEED
  config.data.kind = "recordio"
  config.data.root = rec_path
  config.data.batch_size = 8
  config.data.worker_count = 0
  config.model.name = "custom"
  config.model.stage_units = (1, 1)
  config.model.stage_widths = (4, 8)
  config.model.embedding_size = 16
  config.head.num_classes = 0
  config.schedule.total_steps = 2
  config.logging.log_every_steps = 1
  config.logging.progress_bar = False
  workdir = str(tmp_path / "run")
  state = train_lib.train(config, workdir)
  assert int(state.step) == 2

  rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
  assert [row["step"] for row in rows] == [1, 2]
  expected = _expected_batches(labels, corrupt, 8, 2)[1]
  assert [row["skipped_records"] for row in rows] == expected
  assert expected[-1] >= 3  # 16 positions hold all of epoch 1.
  saved = os.path.join(workdir, "checkpoints", "2", "data",
                       "process_0-of-1.json")
  assert json.load(open(saved))[pipeline.SKIPPED_RECORDS_KEY] == expected[-1]


def test_bad_labels_and_settings_are_named(aligned_faces, tmp_path):
  payloads = [recordio.pack(label, image) for image, label in aligned_faces]
  payloads[3] = recordio.pack(7, aligned_faces[3][0])
  rec_path = _write_rec(tmp_path / "train.rec", payloads, 4)
  face_set = builder.build_train_index(_data_config("recordio", rec_path), "")
  with pytest.raises(sources.DataError, match=r"train.rec#3' has label 7, "
                     "outside the 4 identities"):
    stream = _stream(face_set)
    for _ in range(3):  # The whole 12-record epoch.
      next(stream)

  data = _data_config("recordio", rec_path)
  data.alignment = "landmarks"
  with pytest.raises(sources.DataError, match="data.alignment to 'none'"):
    builder.build_train_index(data, "")
  with pytest.raises(ValueError, match="data.corrupt_records='ignore'"):
    _stream(face_set, corrupt_records="ignore")
