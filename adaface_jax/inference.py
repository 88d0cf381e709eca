"""Face embeddings and quality scores from a trained model: API and CLI.

The backbone maps an aligned 112x112 face to a unit embedding and the norm
of the feature before normalisation. AdaFace trains its margin on that
norm because it tracks how recognisable a face is: blurred, tiny, occluded
or badly aligned faces get small norms. The feature norm is therefore
exposed as the image's quality score (a positive float; its scale depends
on the model, so compare norms of one model only).

`Embedder` runs a backbone (optionally also on the horizontal flip of each
image) over uint8 BGR batches; `load_embedder` builds one from a training
run folder or from a PyTorch `.ckpt`/`.pt`. `embed_faces` returns the unit
embeddings and quality scores of crops or image files; `embed_items` keeps
every backbone output in memory, `embed_to_disk` streams them into `.npy`
files that a rerun reuses (and an interrupted run resumes).

Command line:

  python -m adaface_jax.inference --checkpoint RUN_DIR_OR_CKPT \
      --images FOLDER_OR_LIST --output OUT_DIR [--landmarks CSV] \
      [--alignment none|landmarks|resize] [--flip_fusion none|norm_add|add] \
      [--config CFG] [--step N] [--batch_size 64]

writes OUT_DIR/embeddings.npy ([n, d] float32 unit vectors, flip-fused
when asked), OUT_DIR/feature_norms.npy ([n] float32, the quality score of
the unflipped image) and OUT_DIR/index.csv (row, path, feature_norm).
"""

import argparse
from collections.abc import Callable, Iterator, Mapping, Sequence
import csv
import dataclasses
import functools
import hashlib
import json
import os
import pickle
import sys
import types
from typing import Any

from absl import logging
from flax import traverse_util
import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np
import tqdm

from adaface_jax import backbone as backbone_lib
from adaface_jax import checkpointing
from adaface_jax import host_memory
from adaface_jax import model as model_lib
from adaface_jax import reporting
from adaface_jax import verification
from data_pipeline import pipeline
from data_pipeline import sources

# Per image: the unit embedding and feature norm of the image and, when the
# flip is on, of its horizontal mirror.
COLUMNS = ("embeddings", "feature_norms", "flipped_embeddings",
           "flipped_feature_norms")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")
FLIP_FUSIONS = ("none",) + verification.FUSION_METHODS
PROGRESS_FILE = "features.json"

Columns = dict[str, np.ndarray]


def _embed(backbone: nn.Module, with_flip: bool, variables: Any,
           images: jax.Array) -> dict[str, jax.Array]:
  """[batch, s, s, 3] uint8 BGR -> the `COLUMNS` of the batch."""
  images = model_lib.normalize_images(images)
  embeddings, feature_norms = backbone.apply(variables, images, train=False)
  outputs = {"embeddings": embeddings, "feature_norms": feature_norms[:, 0]}
  if with_flip:
    # NHWC: axis 2 is the width, so this mirrors left and right.
    flipped, flipped_norms = backbone.apply(
        variables, images[:, :, ::-1], train=False)
    outputs["flipped_embeddings"] = flipped
    outputs["flipped_feature_norms"] = flipped_norms[:, 0]
  return outputs


class Embedder:
  """A backbone and its variables, embedding batches of aligned faces.

  The jitted function takes the variables as an argument, so new weights
  (`set_variables`, e.g. during training) reuse the compiled program.

  Attributes:
    backbone: the IR-ResNet module.
    image_size: side of the square input crops, in pixels.
    batch_size: images per device call; the last batch is zero-padded.
    with_flip: also embed each image's horizontal flip.
  """

  def __init__(self, backbone: nn.Module, variables: Mapping[str, Any], *,
               image_size: int = 112, batch_size: int = 64,
               with_flip: bool = False):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.backbone = backbone
    self.image_size = image_size
    self.batch_size = batch_size
    self.with_flip = with_flip
    self._apply = jax.jit(functools.partial(_embed, backbone, with_flip))
    self.set_variables(variables)

  def set_variables(self, variables: Mapping[str, Any]) -> None:
    """Swaps in new {"params", "batch_stats"} of the same structure."""
    missing = {"params", "batch_stats"} - set(variables)
    if missing:
      raise ValueError(
          f"backbone variables lack {sorted(missing)}; got {sorted(variables)}")
    self._variables = {"params": variables["params"],
                       "batch_stats": variables["batch_stats"]}
    self._fingerprint = None

  @property
  def variables(self) -> dict[str, Any]:
    """The backbone's {"params", "batch_stats"} in use."""
    return self._variables

  def embed_batch(self, images: np.ndarray) -> Columns:
    """Embeds [batch_size, s, s, 3] uint8 BGR images.

    Returns:
      {"embeddings": [batch, d] float32 unit vectors, "feature_norms":
      [batch] float32 and, with the flip, the same two for the mirrored
      images as "flipped_embeddings" and "flipped_feature_norms"}.
    """
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise ValueError(
          f"images must be [batch, {self.image_size}, {self.image_size}, 3], "
          f"got {images.shape}")
    if images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 BGR pixels, got {images.dtype}")
    outputs = jax.device_get(self._apply(self._variables, images))
    return {name: np.asarray(value) for name, value in outputs.items()}

  def fingerprint(self) -> str:
    """A digest of the architecture, the weights and the flip setting."""
    if self._fingerprint is None:
      digest = hashlib.sha1()
      digest.update(repr(self.backbone).encode())
      digest.update(f"{self.image_size} {self.with_flip}".encode())
      flat = traverse_util.flatten_dict(
          jax.device_get(self._variables), sep="/")
      for name in sorted(flat):
        value = np.ascontiguousarray(flat[name])
        digest.update(f"{name} {value.dtype} {value.shape}".encode())
        digest.update(value.tobytes())
      self._fingerprint = digest.hexdigest()
    return self._fingerprint


def iterate_batches(items: Sequence[Any], load: Callable[[Any], np.ndarray],
                    batch_size: int, read_threads: int = 4
                    ) -> Iterator[tuple[np.ndarray, int]]:
  """Loads `items` in threads and yields (padded batch, real count).

  Args:
    items: what `load` takes, one per image, in output order.
    load: item -> [s, s, 3] uint8 BGR crop: a function or a grain Map
      transform such as `pipeline.LoadEvalFace`.
    batch_size: rows per batch; the last batch is zero-padded to it, so one
      compiled function serves every batch.
    read_threads: loading threads.
  """
  if not items:
    return
  dataset = grain.MapDataset.source(list(items)).map(load)
  stream = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads,
                        prefetch_buffer_size=2 * batch_size))
  for batch in stream.batch(batch_size):
    count = len(batch)
    if count < batch_size:
      padding = np.zeros((batch_size - count,) + batch.shape[1:], batch.dtype)
      batch = np.concatenate([batch, padding])
    yield batch, count


def _batch_columns(embedder: Embedder, items, load, desc: str,
                   transform: Callable[[Columns], Columns] | None):
  """Yields the (transformed) columns of each batch, padding rows dropped."""
  total = -(-len(items) // embedder.batch_size)
  batches = iterate_batches(items, load, embedder.batch_size)
  for images, count in tqdm.tqdm(batches, total=total, desc=desc,
                                 unit="batch", disable=None, leave=False):
    columns = {k: v[:count] for k, v in embedder.embed_batch(images).items()}
    yield transform(columns) if transform else columns


def embed_items(embedder: Embedder, items: Sequence[Any],
                load: Callable[[Any], np.ndarray], desc: str = "embedding",
                transform: Callable[[Columns], Columns] | None = None
                ) -> Columns:
  """Embeds every item once, in order, into in-memory arrays.

  Args:
    embedder: the model.
    items: one per image, for `load`.
    load: item -> [s, s, 3] uint8 BGR crop (function or grain Map).
    desc: progress bar label.
    transform: optional map applied to each batch's columns (e.g. flip
      fusion) before they are kept.

  Returns:
    {column name: [len(items), ...] array}, see `Embedder.embed_batch`.
  """
  chunks = list(_batch_columns(embedder, items, load, desc, transform))
  if not chunks:
    raise ValueError("no images to embed")
  return {name: np.concatenate([c[name] for c in chunks])
          for name in chunks[0]}


def _describe(function: Any) -> str:
  """A description of a loader or transform that is stable across runs
  (a plain repr of a function holds its memory address)."""
  if isinstance(function, functools.partial):
    return (f"partial({_describe(function.func)}, {function.args!r}, "
            f"{sorted(function.keywords.items())!r})")
  if isinstance(function, (types.FunctionType, types.BuiltinFunctionType)):
    return f"{function.__module__}.{function.__qualname__}"
  return repr(function)


def _items_digest(items: Sequence[Any]) -> str:
  digest = hashlib.sha1()
  # In slices, so that 469k items never pickle into one buffer.
  for start in range(0, len(items), 4096):
    digest.update(pickle.dumps(list(items[start:start + 4096]), protocol=4))
  return digest.hexdigest()


def _read_progress(out_dir: str) -> dict[str, Any]:
  path = os.path.join(out_dir, PROGRESS_FILE)
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    logging.warning("Ignoring unreadable %s; embedding again", path)
    return {}


def _write_progress(out_dir: str, progress: dict[str, Any]) -> None:
  path = os.path.join(out_dir, PROGRESS_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(progress, f, indent=2)
  os.replace(path + ".tmp", path)


def _open_arrays(out_dir: str, shapes: Mapping[str, Sequence[int]],
                 mode: str) -> dict[str, np.ndarray]:
  arrays = {}
  for name, shape in shapes.items():
    path = os.path.join(out_dir, f"{name}.npy")
    if mode == "w+":
      arrays[name] = np.lib.format.open_memmap(
          path, mode="w+", dtype=np.float32, shape=tuple(shape))
    else:
      arrays[name] = np.load(path, mmap_mode=mode)
  return arrays


def _resumable(progress: dict[str, Any], key: str, out_dir: str) -> bool:
  if progress.get("key") != key:
    return False
  return all(os.path.isfile(os.path.join(out_dir, f"{name}.npy"))
             for name in progress.get("shapes", {}))


def embed_to_disk(embedder: Embedder, items: Sequence[Any],
                  load: Callable[[Any], np.ndarray], out_dir: str, *,
                  desc: str = "embedding",
                  transform: Callable[[Columns], Columns] | None = None,
                  flush_every_batches: int = 32) -> Columns:
  """Embeds every item once into `<out_dir>/<column>.npy`, resumably.

  Rows are written batch by batch into memory-mapped float32 `.npy` files,
  so no more than a batch of features sits in host memory. Progress is
  recorded in `<out_dir>/features.json` together with a key of the model
  weights, the items and the loader: a rerun with the same key reuses the
  files (resuming where an interrupted run stopped), any other key starts
  afresh.

  Args:
    embedder: the model.
    items: one per image, for `load`; must pickle (paths, landmarks, bytes).
    load: item -> [s, s, 3] uint8 BGR crop (function or grain Map); its
      description (qualified name, or repr of a transform) enters the key.
    out_dir: folder of the arrays (created).
    desc: progress bar label.
    transform: optional map applied to each batch's columns before they are
      written; its qualified name enters the key.
    flush_every_batches: how often the files and the progress are synced.

  Returns:
    {column name: read-only memory map [len(items), ...]}.
  """
  if not items:
    raise ValueError("no images to embed")
  os.makedirs(out_dir, exist_ok=True)
  key = hashlib.sha1(" ".join([
      embedder.fingerprint(), _items_digest(items), _describe(load),
      _describe(transform)]).encode()).hexdigest()
  progress = _read_progress(out_dir)
  done = 0
  arrays = None
  if _resumable(progress, key, out_dir):
    done = int(progress["done"])
    if done >= len(items):
      logging.info("Reusing the features in %s", out_dir)
      return _open_arrays(out_dir, progress["shapes"], "r")
    arrays = _open_arrays(out_dir, progress["shapes"], "r+")
    logging.info("Resuming the features in %s at image %d of %d", out_dir,
                 done, len(items))

  batches = _batch_columns(embedder, items[done:], load, desc, transform)
  for index, columns in enumerate(batches, start=1):
    if arrays is None:
      shapes = {name: [len(items), *value.shape[1:]]
                for name, value in columns.items()}
      arrays = _open_arrays(out_dir, shapes, "w+")
      progress = {"key": key, "num_images": len(items), "done": 0,
                  "shapes": shapes}
    count = len(next(iter(columns.values())))
    for name, value in columns.items():
      arrays[name][done:done + count] = value
    done += count
    if index % flush_every_batches == 0 or done == len(items):
      for array in arrays.values():
        array.flush()
      _write_progress(out_dir, dict(progress, done=done))
  return _open_arrays(out_dir, progress["shapes"], "r")


def fused_embeddings(columns: Mapping[str, np.ndarray],
                     flip_fusion: str) -> np.ndarray:
  """[n, d] float64 unit embeddings with the flip fused by `flip_fusion`.

  "none" uses the unflipped image alone; "norm_add" and "add" are the
  `verification.fuse_flip` methods and need the flipped columns.
  """
  if flip_fusion not in FLIP_FUSIONS:
    raise ValueError(
        f"unknown flip fusion {flip_fusion!r}; choose one of {FLIP_FUSIONS}")
  if flip_fusion == "none":
    return verification.fuse_flip(columns["embeddings"], None, None, None)
  if "flipped_embeddings" not in columns:
    raise ValueError(
        f"flip fusion {flip_fusion!r} needs features of the flipped images; "
        "embed with with_flip=True")
  return verification.fuse_flip(
      columns["embeddings"], columns["feature_norms"],
      columns["flipped_embeddings"], columns["flipped_feature_norms"],
      method=flip_fusion)


@dataclasses.dataclass(frozen=True)
class FaceFeatures:
  """Embeddings of faces and their quality scores.

  Attributes:
    embeddings: [n, d] float32 unit vectors (flip-fused when asked).
    feature_norms: [n] float32 norms of the unflipped images' features.
  """

  embeddings: np.ndarray
  feature_norms: np.ndarray

  @property
  def quality(self) -> np.ndarray:
    """[n] quality scores: the feature norms; higher is a better face."""
    return self.feature_norms


def embed_faces(embedder: Embedder, faces: np.ndarray | Sequence[str], *,
                landmarks: Sequence[np.ndarray] | None = None,
                alignment: str = "none",
                flip_fusion: str = "none") -> FaceFeatures:
  """Embeds faces given as pixels or as image files.

  Args:
    embedder: the model (`with_flip=True` when `flip_fusion` is not
      "none").
    faces: [n, s, s, 3] uint8 BGR aligned crops, or n image paths.
    landmarks: for paths with alignment "landmarks": n (10,) five-point
      landmarks in image pixels.
    alignment: for paths: "none" (aligned crops), "landmarks" or "resize".
    flip_fusion: "none", "norm_add" or "add" (see `fused_embeddings`).

  Returns:
    The unit embeddings and the feature norms (quality scores).
  """
  if isinstance(faces, np.ndarray):
    if faces.ndim != 4 or faces.dtype != np.uint8:
      raise ValueError(
          f"faces must be [n, s, s, 3] uint8 BGR, got {faces.shape} "
          f"{faces.dtype}")
    items, load = list(range(len(faces))), faces.__getitem__
  else:
    paths = list(faces)
    if landmarks is None:
      landmarks = [None] * len(paths)
    if len(landmarks) != len(paths):
      raise ValueError(
          f"{len(landmarks)} landmarks for {len(paths)} images")
    items = list(zip(paths, landmarks))
    load = pipeline.LoadEvalFace(embedder.image_size, alignment)
  columns = embed_items(embedder, items, load,
                        transform=_final_columns(flip_fusion))
  return FaceFeatures(columns["embeddings"], columns["feature_norms"])


def _final_columns(flip_fusion: str) -> Callable[[Columns], Columns]:
  """The per-batch map from backbone columns to unit embeddings and the
  unflipped images' feature norms."""
  if flip_fusion not in FLIP_FUSIONS:
    raise ValueError(
        f"unknown flip fusion {flip_fusion!r}; choose one of {FLIP_FUSIONS}")

  def final_columns(columns: Columns) -> Columns:
    embeddings = fused_embeddings(columns, flip_fusion)
    return {"embeddings": embeddings.astype(np.float32),
            "feature_norms": columns["feature_norms"]}
  final_columns.__qualname__ = f"final_columns[{flip_fusion}]"
  return final_columns


# Loading checkpoints.


def _load_config(spec: str) -> ml_collections.ConfigDict:
  # Deferred: the conversion module pulls in the training code.
  from adaface_jax import convert  # pylint: disable=g-import-not-at-top
  return convert.load_config(spec)


def _backbone_variables(variables: Mapping[str, Any], where: str):
  params, stats = variables["params"], variables["batch_stats"]
  if "backbone" not in params:
    raise ValueError(
        f"{where} holds no backbone parameters (params has {sorted(params)})")
  return {"params": params["backbone"],
          "batch_stats": stats.get("backbone", {})}


def _load_run(workdir: str, config: ml_collections.ConfigDict | None,
              step: int | None):
  """Backbone, variables and image size of a training run's checkpoint."""
  if os.path.basename(os.path.normpath(workdir)) == (
      checkpointing.CHECKPOINT_SUBDIR):
    workdir = os.path.dirname(os.path.normpath(workdir))
  if config is None:
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
      raise FileNotFoundError(
          f"{workdir!r} has no config.json; pass the training config")
    config = _load_config(config_path)
  variables, step = checkpointing.load_variables(workdir, step)
  logging.info("Loaded step %d of %s", step, workdir)
  backbone = model_lib.create_backbone(config.model)
  return (backbone, _backbone_variables(variables, workdir),
          int(config.data.image_size))


def _load_torch(path: str, config: ml_collections.ConfigDict | None,
                trust_pickle: bool):
  """Backbone, variables and image size of a PyTorch AdaFace checkpoint."""
  from adaface_jax import convert  # pylint: disable=g-import-not-at-top
  state_dict = convert.checkpoint_state_dict(
      convert.load_torch_file(path, trust_pickle), path)
  backbone_sd, _ = convert.split_checkpoint_state_dict(state_dict)
  if config is not None:
    arch = convert.architecture_from_config(config)
  else:
    arch = convert.infer_architecture(backbone_sd)
    if arch is None:
      raise ValueError(
          f"{path!r} does not hold an IR-ResNet backbone state_dict")
  variables = convert.torch_state_dict_to_flax(backbone_sd, arch)
  backbone = backbone_lib.IResNet(
      stage_units=arch.stage_units, stage_widths=arch.stage_widths,
      embedding_size=arch.embedding_size)
  return backbone, variables, arch.image_size


def load_embedder(checkpoint: str, *,
                  config: ml_collections.ConfigDict | None = None,
                  step: int | None = None, batch_size: int = 64,
                  with_flip: bool = False,
                  trust_pickle: bool = False) -> Embedder:
  """An `Embedder` for a saved model.

  Args:
    checkpoint: a training run folder (or its `checkpoints` folder), whose
      `config.json` gives the architecture unless `config` does; or a
      PyTorch `.ckpt`/`.pt`/`.pth` file in the AdaFace reference layout,
      whose architecture is read off its keys unless `config` gives it.
    config: the training config, to override the defaults above.
    step: the checkpoint step of a run folder; the newest by default.
    batch_size: images per device call.
    with_flip: also embed the horizontal flips.
    trust_pickle: let PyTorch unpickle arbitrary objects (trusted files
      only).
  """
  if os.path.isfile(checkpoint):
    if not checkpoint.endswith(TORCH_SUFFIXES):
      raise ValueError(
          f"checkpoint {checkpoint!r} is a file but not {TORCH_SUFFIXES}; "
          "pass a training run folder or a PyTorch checkpoint")
    loaded = _load_torch(checkpoint, config, trust_pickle)
  elif os.path.isdir(checkpoint):
    loaded = _load_run(checkpoint, config, step)
  else:
    raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
  backbone, variables, image_size = loaded
  return Embedder(backbone, variables, image_size=image_size,
                  batch_size=batch_size, with_flip=with_flip)


# Image lists and the command line.


def list_images(images: str) -> tuple[str, list[str]]:
  """(root, relative paths) of a folder (recursively) or a list file.

  A list file holds one path per line (blank lines and `#` comments
  skipped), absolute or relative to the list's folder.
  """
  if os.path.isdir(images):
    found = []
    for folder, subfolders, names in os.walk(images):
      subfolders.sort()
      found.extend(
          os.path.relpath(os.path.join(folder, name), images)
          for name in sorted(names)
          if name.lower().endswith(sources.IMAGE_EXTENSIONS)
          and not name.startswith("."))
    if not found:
      raise sources.DataError(f"no images under {images!r}")
    return images, found

  if not os.path.isfile(images):
    raise FileNotFoundError(f"--images {images!r} does not exist")
  with open(images, encoding="utf-8") as f:
    lines = [line.strip() for line in f]
  paths = [line for line in lines if line and not line.startswith("#")]
  if not paths:
    raise sources.DataError(f"image list {images!r} lists no image")
  return os.path.dirname(os.path.abspath(images)), paths


def image_items(root: str, paths: Sequence[str], alignment: str,
                landmarks_csv: str = "") -> list[tuple[str, Any]]:
  """(absolute path, landmarks or None) items for `pipeline.LoadEvalFace`.

  Args:
    root: what relative `paths` are relative to.
    paths: the images.
    alignment: "none" (aligned crops), "landmarks" or "resize".
    landmarks_csv: five-point landmarks (`sources.read_landmarks_csv`
      format, paths relative to `root`); required for "landmarks".
  """
  if alignment not in pipeline.ALIGNMENTS:
    raise ValueError(
        f"unknown alignment {alignment!r}; choose one of {pipeline.ALIGNMENTS}")
  absolute = [os.path.normpath(os.path.join(root, p)) for p in paths]
  if alignment != "landmarks":
    return [(path, None) for path in absolute]
  if not landmarks_csv:
    raise ValueError("alignment 'landmarks' needs a landmarks CSV")
  table = sources.read_landmarks_csv(landmarks_csv, root)
  missing = [p for p in absolute if p not in table]
  if missing:
    raise sources.DataError(
        f"{len(missing)} images have no landmarks in {landmarks_csv!r}, e.g. "
        f"{missing[0]!r}")
  return [(path, table[path]) for path in absolute]


def write_index(out_dir: str, paths: Sequence[str],
                feature_norms: np.ndarray) -> str:
  """Writes `<out_dir>/index.csv`: row, path, feature_norm per image."""
  path = os.path.join(out_dir, "index.csv")
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["row", "path", "feature_norm"])
    for row, (image, norm) in enumerate(zip(paths, feature_norms)):
      writer.writerow([row, image, f"{float(norm):.6g}"])
  return path


def run_cli(checkpoint: str, images: str, output: str, *,
            config: ml_collections.ConfigDict | None = None,
            step: int | None = None, landmarks: str = "",
            alignment: str = "none", flip_fusion: str = "none",
            batch_size: int = 64, trust_pickle: bool = False) -> Columns:
  """Embeds `images` with `checkpoint` and writes the `.npy` files + index.

  Returns:
    {"embeddings": [n, d], "feature_norms": [n]} as written (memory maps).
  """
  transform = _final_columns(flip_fusion)
  root, paths = list_images(images)
  items = image_items(root, paths, alignment, landmarks)
  embedder = load_embedder(checkpoint, config=config, step=step,
                           batch_size=batch_size,
                           with_flip=flip_fusion != "none",
                           trust_pickle=trust_pickle)
  load = pipeline.LoadEvalFace(embedder.image_size, alignment)
  outputs = embed_to_disk(embedder, items, load, output, transform=transform)
  write_index(output, paths, outputs["feature_norms"])
  return outputs


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m adaface_jax.inference",
      description="Embed face images with a trained model; writes "
                  "embeddings.npy, feature_norms.npy (the quality score) and "
                  "index.csv.")
  parser.add_argument(
      "--checkpoint", required=True,
      help="training run folder, or a PyTorch .ckpt/.pt of the reference "
           "layout")
  parser.add_argument(
      "--images", required=True,
      help="folder of images (searched recursively) or a text file listing "
           "one image path per line")
  parser.add_argument("--output", required=True, help="folder to write")
  parser.add_argument(
      "--config", help="training config (file.py[:arg] or config.json); "
                       "default: the run's config.json, or the PyTorch "
                       "checkpoint's own layout")
  parser.add_argument("--step", type=int, help="checkpoint step; default: "
                                               "the newest")
  parser.add_argument(
      "--landmarks", default="",
      help="CSV of five-point landmarks (path + 10 columns, paths relative "
           "to the image folder) for --alignment landmarks")
  parser.add_argument(
      "--alignment", default="none", choices=pipeline.ALIGNMENTS,
      help="none: aligned 112x112 crops; landmarks: warp raw images with "
           "their five points; resize: plain resize")
  parser.add_argument(
      "--flip_fusion", default="none", choices=FLIP_FUSIONS,
      help="fuse each embedding with its horizontal flip's")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument(
      "--trust_pickle", action="store_true",
      help="let PyTorch unpickle arbitrary objects: trusted files only")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the command line; argv excludes the program name."""
  args = _parse_args(argv)
  config = _load_config(args.config) if args.config else None
  outputs = run_cli(
      args.checkpoint, args.images, args.output, config=config,
      step=args.step, landmarks=args.landmarks, alignment=args.alignment,
      flip_fusion=args.flip_fusion, batch_size=args.batch_size,
      trust_pickle=args.trust_pickle)
  print(f"Wrote {len(outputs['embeddings'])} embeddings of size "
        f"{outputs['embeddings'].shape[1]} and their feature norms to "
        f"{args.output}")


if __name__ == "__main__":
  host_memory.keep_freed_memory()  # Before JAX starts its backend.
  logging.set_verbosity(logging.INFO)
  reporting.quiet_library_logs()
  try:
    main()
  except (ValueError, FileNotFoundError, ImportError) as error:
    sys.exit(f"error: {error}")
