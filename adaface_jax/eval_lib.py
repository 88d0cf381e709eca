"""Verification of a trained model on an LFW-format pairs file."""

import json
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from adaface_jax import checkpointing
from adaface_jax import model as model_lib
from adaface_jax import verification
from data_pipeline import builder
from data_pipeline import pipeline
from data_pipeline import sources

RESULTS_FILE = "eval_results.json"


def make_embed_fn(backbone, variables: dict[str, Any], with_flip: bool):
  """A jitted [batch, s, s, 3] uint8 -> embeddings, norms (and flipped ones).

  The flipped copy is made on the device, mirrored along the width axis.
  """
  variables = jax.device_put(variables)

  @jax.jit
  def embed(images):
    images = model_lib.normalize_images(images)
    outputs = backbone.apply(variables, images, train=False)
    if not with_flip:
      return outputs
    flipped = backbone.apply(variables, images[:, :, ::-1], train=False)
    return outputs + flipped
  return embed


def embed_images(embed_fn, paths, landmarks, *, batch_size, image_size,
                 alignment, with_flip, desc="embedding"):
  """Embeds every image once; returns fused unit embeddings [n, d] and the
  fused feature norms [n, 1] (float64 numpy)."""
  chunks = []
  batches = pipeline.iterate_eval_batches(
      paths, landmarks, batch_size=batch_size, image_size=image_size,
      alignment=alignment)
  total = -(-len(paths) // batch_size)
  for images, count in tqdm.tqdm(batches, total=total, desc=desc, unit="batch",
                                 disable=None, leave=False):
    outputs = jax.device_get(embed_fn(images))
    chunks.append([np.asarray(x[:count], np.float64) for x in outputs])
  columns = [np.concatenate(c) for c in zip(*chunks)]
  return columns


def fuse(columns, method: str):
  """Applies the flip fusion to (emb, norms[, flip_emb, flip_norms])."""
  if len(columns) == 2 or method == "none":
    return verification.fuse_flip(columns[0], columns[1], None, None)
  return verification.fuse_flip(*columns, method=method)


def _pair_landmarks(spec: builder.PairsSpec, paths: list[str]):
  """Landmarks for each path, or a clear error when alignment needs them."""
  if spec.alignment != "landmarks":
    return [None] * len(paths)
  if spec.landmarks is None:
    raise sources.DataError(
        f"eval.alignment is 'landmarks' but eval.landmarks is empty for "
        f"{spec.name}")
  points = []
  for path in paths:
    found = spec.landmarks.get(os.path.normpath(path))
    if found is None:
      raise sources.DataError(
          f"image {path!r} of {spec.name} has no landmarks in eval.landmarks")
    points.append(found)
  return points


def verify_pairs(embed_fn, spec: builder.PairsSpec,
                 config: ml_collections.ConfigDict):
  """Scores every pair of `spec` once.

  Returns:
    A JSON-ready dict of figures and the `verification.KFoldAccuracy`.
  """
  pair_list = verification.read_lfw_pairs(spec.pairs, image_ext=spec.image_ext)
  relative = sorted({p for pair in pair_list.pairs for p in pair[:2]})
  paths = [os.path.join(spec.image_root, p) for p in relative]
  position = {p: i for i, p in enumerate(relative)}
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise sources.DataError(
        f"{len(missing)} images of {spec.pairs!r} are missing under "
        f"{spec.image_root!r}, e.g. {missing[0]!r}")

  start = time.perf_counter()
  columns = embed_images(
      embed_fn, paths, _pair_landmarks(spec, paths),
      batch_size=config.eval.batch_size, image_size=config.data.image_size,
      alignment=spec.alignment,
      with_flip=config.eval.flip_fusion != "none", desc=spec.name)
  embeddings = fuse(columns, config.eval.flip_fusion)

  first = [position[p[0]] for p in pair_list.pairs]
  second = [position[p[1]] for p in pair_list.pairs]
  distances = verification.pair_distances(embeddings[first],
                                          embeddings[second])
  num_folds = config.eval.num_folds or pair_list.num_folds
  accuracy = verification.kfold_accuracy(
      distances, pair_list.is_same, num_folds=num_folds)
  return {
      "name": spec.name,
      "pairs": len(pair_list.pairs),
      "images": len(paths),
      "num_folds": num_folds,
      "accuracy_mean": accuracy.accuracy_mean,
      "accuracy_std": accuracy.accuracy_std,
      "fold_accuracies": accuracy.fold_accuracies.tolist(),
      "fold_thresholds": accuracy.fold_thresholds.tolist(),
      "best_threshold": accuracy.best_threshold,
      "best_threshold_accuracy": accuracy.best_threshold_accuracy,
      "flip_fusion": config.eval.flip_fusion,
      "seconds": time.perf_counter() - start,
  }, accuracy


def write_results(workdir: str, step: int, results: dict[str, Any]) -> str:
  """Adds `results` (keyed by set name) to <workdir>/eval_results.json."""
  path = os.path.join(workdir, RESULTS_FILE)
  history = {}
  if os.path.exists(path):
    try:
      with open(path) as f:
        history = json.load(f)
    except json.JSONDecodeError:
      logging.warning("%s is not valid JSON; keeping it as %s.bak", path,
                      path)
      os.replace(path, path + ".bak")
  history.setdefault("latest", {})
  for name, result in results.items():
    history["latest"][name] = dict(result, step=step)
    history.setdefault("history", []).append(dict(result, step=step))
  with open(path + ".tmp", "w") as f:
    json.dump(history, f, indent=2)
  os.replace(path + ".tmp", path)
  return path


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             step: int | None = None) -> dict[str, Any]:
  """Evaluates the latest (or given) checkpoint of `workdir`.

  Prints a table and records the figures in <workdir>/eval_results.json.

  Returns:
    {set name: result dict}; empty when the config names no set.
  """
  spec = builder.build_pairs_spec(config, workdir)
  if spec is None:
    logging.warning("No verification set configured (eval.pairs is empty).")
    return {}
  variables, step = checkpointing.load_variables(workdir, step)
  backbone = model_lib.create_backbone(config.model)
  embed_fn = make_embed_fn(
      backbone,
      {"params": variables["params"]["backbone"],
       "batch_stats": variables["batch_stats"]["backbone"]},
      with_flip=config.eval.flip_fusion != "none")

  result, accuracy = verify_pairs(embed_fn, spec, config)
  results = {spec.name: result}
  print(f"Verification at step {step} ({config.eval.flip_fusion} flip "
        f"fusion, {result['num_folds']} folds, {result['pairs']} pairs):")
  print(verification.format_table({spec.name: accuracy}))
  path = write_results(workdir, step, results)
  logging.info("Wrote %s", path)
  return results
