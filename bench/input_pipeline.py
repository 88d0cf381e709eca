"""Images/s of decode + augment + batch: our grain pipeline vs. the reference.

  python bench/input_pipeline.py --input ../shared/data/lfw/images \
      --limit 1024 --batch 64 --batches 40 --workers 1,2

The input (a face `.rec`, a folder holding `train.rec`, or an image folder)
is first written as 112x112 JPEG crops (quality 95) to a temporary `.rec`
and converted to ArrayRecord, so both pipelines read the same bytes from the
same files:

- grain: `pipeline.make_train_dataset` over the ArrayRecord set, OpenCV
  decoding to BGR, AdaFace's augmentations, the flip and the stacking into
  uint8 batches in worker processes, which hand over whole batches (the
  model normalises on the device).
- PyTorch: a DataLoader running the reference's recipe as it is written
  (decode to RGB like `mx.image.imdecode`, reverse to BGR, a PIL image,
  `np.random` coins, torch-RNG crop box, jitter and flip, then ToTensor and
  Normalize to float32 CHW), shuffled, with the same worker count.

Both use each augmentation's probability `--probability` (0.2 in the
reference's scripts). The first batch of each worker (start-up) is not
timed; each setting runs --repeats times, alternating pipelines, and the
best run counts (other load on the machine only ever slows a run down).
Figures are reported, never asserted, with the machine's 1-minute load.
"""

import argparse
import os
import tempfile
import time

from absl import flags
import cv2
import numpy as np
from PIL import Image
from PIL import ImageEnhance
import torch
from torch.utils import data as torch_data

from data_pipeline import array_record
from data_pipeline import augment
from data_pipeline import pipeline
from data_pipeline import recordio


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--input", required=True,
                      help=".rec, folder with train.rec, or image folder")
  parser.add_argument("--limit", type=int, default=1024,
                      help="images taken from the input")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=40,
                      help="timed batches per run")
  parser.add_argument("--workers", default="1,2")
  parser.add_argument("--probability", type=float, default=0.2)
  parser.add_argument("--repeats", type=int, default=3,
                      help="runs per setting, alternating; the best counts")
  return parser.parse_args()


def crops_112(input_path: str, limit: int):
  """(112x112 JPEG bytes, label) of the first `limit` decodable faces."""
  faces, labels = [], {}
  for face in array_record.open_input(input_path):
    if len(faces) == limit:
      break
    image = cv2.imdecode(np.frombuffer(face.image, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
      continue
    if image.shape[:2] != (112, 112):
      image = cv2.resize(image, (112, 112), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    # Labels renumbered 0.. in order of appearance, keeping groups.
    faces.append((jpeg.tobytes(), labels.setdefault(face.label, len(labels))))
  return faces


class ReferenceRecipe(torch_data.Dataset):
  """The reference's record data set and augmenter, written out here."""

  def __init__(self, source, probability: float):
    self._source = source
    self._p = probability

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    record = self._source[index]
    bgr = cv2.imdecode(np.frombuffer(record["image"], np.uint8),
                       cv2.IMREAD_COLOR)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # What mx.image.imdecode gives.
    sample = Image.fromarray(np.ascontiguousarray(rgb[:, :, ::-1]))
    sample = self._augment(sample)
    if torch.rand(1).item() < 0.5:
      sample = sample.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    tensor = torch.from_numpy(np.array(sample)).permute(2, 0, 1)
    tensor = tensor.float().div(255)
    return (tensor - 0.5) / 0.5, int(record["label"])

  def _augment(self, sample):
    if np.random.random() < self._p:
      array = np.array(sample)
      top, left, height, width = self._crop_box(*array.shape[:2])
      canvas = np.zeros_like(array)
      canvas[top:top + height, left:left + width] = array[
          top:top + height, left:left + width]
      sample = Image.fromarray(canvas)
    if np.random.random() < self._p:
      array = np.array(sample)
      side = int(np.random.uniform(0.2, 1.0) * array.shape[0])
      down = np.random.choice(augment.INTERPOLATIONS)
      small = cv2.resize(array, (side, side), interpolation=int(down))
      up = np.random.choice(augment.INTERPOLATIONS)
      sample = Image.fromarray(cv2.resize(
          small, array.shape[1::-1], interpolation=int(up)))
    if np.random.random() < self._p:
      order = torch.randperm(4).tolist()
      factors = [torch.empty(1).uniform_(0.5, 1.5).item() for _ in range(3)]
      enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast,
                   ImageEnhance.Color)
      for i in order:
        if i < 3:  # Hue (3) is off in the recipe.
          sample = enhancers[i](sample).enhance(factors[i])
    return sample

  @staticmethod
  def _crop_box(height, width):
    area = height * width
    log_ratio = torch.log(torch.tensor([3 / 4, 4 / 3]))
    for _ in range(10):
      target = area * torch.empty(1).uniform_(0.2, 1.0).item()
      aspect = torch.exp(torch.empty(1).uniform_(*log_ratio.tolist())).item()
      w = int(round((target * aspect) ** 0.5))
      h = int(round((target / aspect) ** 0.5))
      if 0 < w <= width and 0 < h <= height:
        top = torch.randint(0, height - h + 1, (1,)).item()
        left = torch.randint(0, width - w + 1, (1,)).item()
        return top, left, h, w
    return 0, 0, height, width


def time_batches(iterator, batches: int, batch_size: int,
                 workers: int) -> float:
  """Images/s over `batches` batches after one untimed batch per worker.

  Workers hand out batches in turn, so the second worker's start-up would
  otherwise fall into the timed batches.
  """
  for _ in range(max(workers, 1)):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch_size / (time.perf_counter() - start)


def grain_rate(face_set, workers, args):
  params = augment.AugmentParams(args.probability, args.probability,
                                 args.probability)
  stream = pipeline.make_train_dataset(
      face_set, batch_size=args.batch, seed=0, image_size=112,
      alignment="none", random_flip=True, worker_count=workers,
      augmentation=params)
  iterator = iter(stream)
  rate = time_batches(iterator, args.batches, args.batch, workers)
  iterator.close()
  return rate


def torch_rate(source, workers, args):
  loader = torch_data.DataLoader(
      ReferenceRecipe(source, args.probability), batch_size=args.batch,
      shuffle=True, num_workers=workers, drop_last=True,
      # A forked worker would inherit the ArrayRecord reader's threads.
      multiprocessing_context="spawn" if workers else None,
      # The timed batches span epochs; starting workers anew for each would
      # time their start-up.
      persistent_workers=workers > 0)

  def endless():
    while True:
      yield from loader

  return time_batches(endless(), args.batches, args.batch, workers)


def main():
  args = parse_args()
  flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags.
  torch.set_num_threads(1)
  with tempfile.TemporaryDirectory() as scratch:
    rec_path = os.path.join(scratch, "train.rec")
    faces = crops_112(args.input, args.limit)
    recordio.write_face_rec(rec_path, faces, layout="im2rec")
    converted = array_record.convert(rec_path, os.path.join(scratch, "ar"),
                                     progress=False)
    opened = array_record.open_face_images(converted.dataset_dir)
    face_set = pipeline.EncodedFaceSet(opened.source, opened.num_identities,
                                       opened.dataset_dir)
    print(f"{len(face_set)} images of {face_set.num_identities} identities, "
          f"batch {args.batch}, {args.batches} timed batches, augmentation "
          f"probability {args.probability}, {os.cpu_count()} CPUs, 1-minute "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"{'workers':>7} | {'grain img/s':>11} | {'torch img/s':>11} | "
          f"{'ratio':>5}")
    for workers in (int(w) for w in args.workers.split(",")):
      ours = theirs = 0.0
      for _ in range(args.repeats):
        ours = max(ours, grain_rate(face_set, workers, args))
        theirs = max(theirs, torch_rate(opened.source, workers, args))
      print(f"{workers:>7} | {ours:>11.0f} | {theirs:>11.0f} | "
            f"{ours / theirs:>5.2f}")
    # Other processes slow both pipelines down, not always equally.
    print(f"1-minute load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
