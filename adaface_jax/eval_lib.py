"""Evaluation of a trained model on the benchmark sets the config declares.

Set kinds (`config.eval`, see configs/common.py):

  pairs     an LFW-format pairs file over an image folder (the top-level
            `eval.name`, `eval.pairs`, ... fields);
  bin       an insightface verification `.bin` (LFW, CFP-FP, AgeDB-30,
            CALFW, CPLFW): aligned 112x112 images, pair i being images 2i
            and 2i + 1;
  ijb       IJB-B or IJB-C in the insightface release layout (see `ijb`);
  tinyface  TinyFace closed-set identification (see `tinyface`).

Verification (pairs, bin): every image is embedded once, with its
horizontal flip fused in as `eval.flip_fusion` says; a pair's score is the
squared L2 distance of its two unit vectors; accuracy is the mean of the
k-fold accuracies (thresholds 0 to 3.99 chosen on the other folds) and
VAL@FAR=1e-3 is reported beside it (see `verification`). Padding rows of
the last batch are dropped, so every pair is scored exactly once whatever
the batch size.

`evaluate` (eval.py, and the end of training) prints the tables, records
every figure in `<workdir>/eval_results.json` and draws ROC curves into
`<workdir>/eval_plots/`. `TrainingEvaluator` runs the sets whose
`every_steps` is positive during training, logs them with the training
metrics and keeps the backbone of the step with the best mean verification
accuracy in `<workdir>/best` (a checkpoint folder `eval.py --workdir
<workdir>/best` reads).
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import json
import math
import os
import shutil
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from adaface_jax import checkpointing
from adaface_jax import ijb
from adaface_jax import inference
from adaface_jax import model as model_lib
from adaface_jax import roc_plots
from adaface_jax import tinyface
from adaface_jax import verification
from data_pipeline import builder
from data_pipeline import pipeline
from data_pipeline import sources
from data_pipeline import verification_bin

RESULTS_FILE = "eval_results.json"
METRICS_FILE = "metrics.jsonl"
PLOTS_SUBDIR = "eval_plots"
FEATURES_SUBDIR = "eval_features"
BEST_SUBDIR = "best"
BEST_FILE = "best.json"
SET_KINDS = ("bin", "ijb", "tinyface")  # Kinds of `eval.sets` entries.
VERIFICATION_KINDS = ("pairs", "bin")
VAL_FAR_TARGET = 1e-3


@dataclasses.dataclass
class SetResult:
  """What one set's evaluation gives.

  Attributes:
    figures: JSON-ready numbers, with "kind" among them.
    rocs: curve label -> ROC, for the plots.
    accuracy: k-fold accuracy (verification sets only).
    val: VAL@FAR, when every fold allows it (verification sets only).
  """

  figures: dict[str, Any]
  rocs: dict[str, verification.Roc]
  accuracy: verification.KFoldAccuracy | None = None
  val: verification.ValAtFar | None = None

  @property
  def kind(self) -> str:
    return self.figures["kind"]


# Verification sets.


def score_pairs(embeddings: np.ndarray, first: np.ndarray, second: np.ndarray,
                is_same: np.ndarray, num_folds: int,
                figures: dict[str, Any]) -> SetResult:
  """Verification figures of pairs of fused unit embeddings.

  Args:
    embeddings: [num_images, dim] unit embeddings.
    first, second: [num_pairs] rows of each pair's two images.
    is_same: [num_pairs] booleans.
    num_folds: contiguous folds for the threshold selection.
    figures: figures to report besides (name, kind, counts...).
  """
  is_same = np.asarray(is_same, bool)
  distances = verification.pair_distances(embeddings[first],
                                          embeddings[second])
  accuracy = verification.kfold_accuracy(distances, is_same,
                                         num_folds=num_folds)
  try:
    val = verification.val_at_far(distances, is_same, num_folds=num_folds,
                                  far_target=VAL_FAR_TARGET)
  except ValueError as e:
    logging.warning("No VAL@FAR for %s: %s", figures.get("name"), e)
    val = None
  figures = dict(
      figures,
      pairs=int(len(distances)),
      num_folds=num_folds,
      accuracy_mean=accuracy.accuracy_mean,
      accuracy_std=accuracy.accuracy_std,
      fold_accuracies=accuracy.fold_accuracies.tolist(),
      fold_thresholds=accuracy.fold_thresholds.tolist(),
      best_threshold=accuracy.best_threshold,
      best_threshold_accuracy=accuracy.best_threshold_accuracy,
      val_at_far=None if val is None else {
          "far_target": val.far_target, "val_mean": val.val_mean,
          "val_std": val.val_std, "far_mean": val.far_mean})
  rocs = {}
  if is_same.any() and not is_same.all():
    # Smaller distances mean more alike: the ROC wants similarities.
    rocs[figures["name"]] = verification.roc_curve(-distances, is_same)
  return SetResult(figures, rocs, accuracy, val)


class PairsSet:
  """An LFW-format pairs file over an image folder (`builder.PairsSpec`)."""

  kind = "pairs"

  def __init__(self, spec: builder.PairsSpec, num_folds: int,
               every_steps: int):
    self.name = spec.name
    self.every_steps = every_steps
    self._alignment = spec.alignment
    pair_list = verification.read_lfw_pairs(spec.pairs,
                                            image_ext=spec.image_ext)
    relative = sorted({p for pair in pair_list.pairs for p in pair[:2]})
    self._paths = [os.path.join(spec.image_root, p) for p in relative]
    missing = [p for p in self._paths if not os.path.isfile(p)]
    if missing:
      raise sources.DataError(
          f"{len(missing)} images of {spec.pairs!r} are missing under "
          f"{spec.image_root!r}, e.g. {missing[0]!r}")
    self._landmarks = _pair_landmarks(spec, self._paths)
    position = {p: i for i, p in enumerate(relative)}
    self._first = np.array([position[p[0]] for p in pair_list.pairs])
    self._second = np.array([position[p[1]] for p in pair_list.pairs])
    self._is_same = pair_list.is_same
    self._num_folds = num_folds or pair_list.num_folds

  def run(self, embedder: inference.Embedder, flip_fusion: str,
          feature_dir: str) -> SetResult:
    del feature_dir  # A pairs set is small enough for memory.
    start = time.perf_counter()
    load = pipeline.LoadEvalFace(embedder.image_size, self._alignment)
    columns = inference.embed_items(
        embedder, list(zip(self._paths, self._landmarks)), load, self.name)
    embeddings = inference.fused_embeddings(columns, flip_fusion)
    result = score_pairs(
        embeddings, self._first, self._second, self._is_same,
        self._num_folds, {"name": self.name, "kind": self.kind,
                          "images": len(self._paths),
                          "flip_fusion": flip_fusion})
    result.figures["seconds"] = time.perf_counter() - start
    return result


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


class BinSet:
  """An insightface verification `.bin` of aligned, encoded image pairs.

  The encoded images stay in memory (tens of MB for 6,000 pairs) and are
  decoded batch by batch at each evaluation.
  """

  kind = "bin"

  def __init__(self, name: str, path: str, num_folds: int, every_steps: int):
    self.name = name
    self.every_steps = every_steps
    self._path = path
    self._images, self._is_same = verification_bin.read_bin(path)
    if not self._images:
      raise sources.DataError(f"{path}: the .bin holds no pairs")
    self._num_folds = num_folds

  def run(self, embedder: inference.Embedder, flip_fusion: str,
          feature_dir: str) -> SetResult:
    del feature_dir
    start = time.perf_counter()
    load = functools.partial(verification_bin.decode_image,
                             image_size=embedder.image_size)
    columns = inference.embed_items(embedder, self._images, load, self.name)
    embeddings = inference.fused_embeddings(columns, flip_fusion)
    num_pairs = len(self._is_same)
    result = score_pairs(
        embeddings, 2 * np.arange(num_pairs), 2 * np.arange(num_pairs) + 1,
        self._is_same, self._num_folds,
        {"name": self.name, "kind": self.kind, "images": len(self._images),
         "flip_fusion": flip_fusion})
    result.figures["seconds"] = time.perf_counter() - start
    return result


class IjbSet:
  """IJB-B or IJB-C: both protocols, 1:1 and (when listed) 1:N."""

  kind = "ijb"

  def __init__(self, name: str, root: str, subset: str,
               protocols: Sequence[str], every_steps: int):
    self.name = name
    self.every_steps = every_steps
    self._protocols = tuple(protocols)
    self._meta = ijb.read_meta(root, subset)

  def run(self, embedder: inference.Embedder, flip_fusion: str,
          feature_dir: str) -> SetResult:
    start = time.perf_counter()
    figures, rocs = ijb.evaluate(embedder, self._meta, feature_dir,
                                 flip_fusion=flip_fusion,
                                 protocols=self._protocols)
    return SetResult(
        {"name": self.name, "kind": self.kind, "subset": self._meta.subset,
         "flip_fusion": flip_fusion, "protocols": figures,
         "seconds": time.perf_counter() - start},
        {f"{self.name} {protocol}": roc for protocol, roc in rocs.items()})


class TinyFaceSet:
  """TinyFace rank-1/5/20 identification."""

  kind = "tinyface"

  def __init__(self, name: str, root: str, alignment_dir: str,
               every_steps: int):
    self.name = name
    self.every_steps = every_steps
    self._meta = tinyface.read_meta(root, alignment_dir)

  def run(self, embedder: inference.Embedder, flip_fusion: str,
          feature_dir: str) -> SetResult:
    start = time.perf_counter()
    figures = tinyface.evaluate(embedder, self._meta, feature_dir,
                                flip_fusion=flip_fusion)
    figures.update(name=self.name, kind=self.kind,
                   seconds=time.perf_counter() - start)
    return SetResult(figures, {})


# Building the sets from the config.


def _check_set_config(name: str, settings: ml_collections.ConfigDict):
  if settings.kind not in SET_KINDS:
    raise ValueError(
        f"eval.sets.{name}.kind is {settings.kind!r}; choose one of "
        f"{SET_KINDS}")
  if settings.every_steps < 0:
    raise ValueError(
        f"eval.sets.{name}.every_steps={settings.every_steps} must be >= 0")
  if not os.path.exists(settings.path):
    raise sources.DataError(
        f"eval.sets.{name}.path {settings.path!r} does not exist")


def _build_named_set(name: str, settings: ml_collections.ConfigDict):
  _check_set_config(name, settings)
  if settings.kind == "bin":
    return BinSet(name, settings.path, settings.num_folds,
                  settings.every_steps)
  if settings.kind == "ijb":
    protocols = [p.strip() for p in settings.protocols.split(",")
                 if p.strip()]
    return IjbSet(name, settings.path, settings.subset, protocols,
                  settings.every_steps)
  return TinyFaceSet(name, settings.path, settings.alignment_dir,
                     settings.every_steps)


def declared_sets(config: ml_collections.ConfigDict
                  ) -> dict[str, tuple[str, int]]:
  """name -> (kind, every_steps) of every enabled set, without reading it.

  Enabled: the pairs set when `eval.pairs` is set (or the data is
  synthetic), and each `eval.sets` entry whose path is not empty.

  Raises:
    ValueError: two enabled sets share a name.
  """
  declared = {}
  if config.eval.pairs or config.data.kind == "synthetic":
    declared[config.eval.name] = ("pairs", config.eval.every_steps)
  for name, settings in config.eval.sets.items():
    if not settings.path:
      continue
    if name in declared:
      raise ValueError(
          f"eval.sets.{name} and the pairs set eval.name={name!r} are both "
          "enabled; rename one (e.g. --config.eval.name=lfw_pairs)")
    declared[name] = (settings.kind, settings.every_steps)
  return declared


def build_sets(config: ml_collections.ConfigDict, workdir: str,
               names: Sequence[str] | None = None,
               in_training: bool = False) -> dict[str, Any]:
  """Reads the lists of the enabled sets (see `declared_sets`).

  Args:
    config: the run's config.
    workdir: the run's folder (synthetic data lives there).
    names: only these sets (each must be enabled); None for all.
    in_training: only the sets with every_steps > 0.

  Returns:
    name -> set object with `name`, `kind`, `every_steps` and
    `run(embedder, flip_fusion, feature_dir) -> SetResult`.
  """
  declared = declared_sets(config)
  if names is not None:
    unknown = [n for n in names if n not in declared]
    if unknown:
      raise ValueError(
          f"evaluation sets {unknown} are not enabled in the config; "
          f"enabled: {sorted(declared)}")
    declared = {n: declared[n] for n in names}
  if in_training:
    declared = {n: d for n, d in declared.items() if d[1] > 0}

  built = {}
  for name, (kind, every_steps) in declared.items():
    if kind == "pairs":
      if every_steps < 0:
        raise ValueError(
            f"eval.every_steps={every_steps} must be >= 0")
      spec = builder.build_pairs_spec(config, workdir)
      built[name] = PairsSet(spec, config.eval.num_folds, every_steps)
    else:
      built[name] = _build_named_set(name, config.eval.sets[name])
  return built


# Running and reporting.


def make_embedder(config: ml_collections.ConfigDict,
                  variables: Mapping[str, Any]) -> inference.Embedder:
  """An embedder of the backbone `config.model` builds.

  Args:
    config: the run's config (model, data.image_size, eval).
    variables: the backbone's {"params", "batch_stats"}.
  """
  flip_fusion = config.eval.flip_fusion
  if flip_fusion not in inference.FLIP_FUSIONS:
    raise ValueError(
        f"unknown eval.flip_fusion {flip_fusion!r}; choose one of "
        f"{inference.FLIP_FUSIONS}")
  return inference.Embedder(
      model_lib.create_backbone(config.model), variables,
      image_size=config.data.image_size,
      batch_size=config.eval.batch_size,
      with_flip=flip_fusion != "none")


def backbone_shapes(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"params", "batch_stats"} of ShapeDtypeStructs of the backbone that
  `config.model` builds, computed without allocating it."""
  backbone = model_lib.create_backbone(config.model)
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: backbone.init(jax.random.key(0), x, train=False), images)
  return {"params": shapes["params"], "batch_stats": shapes["batch_stats"]}


def _backbone_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """The backbone's part of a whole model's {"params", "batch_stats"}."""
  return {"params": variables["params"]["backbone"],
          "batch_stats": variables["batch_stats"]["backbone"]}


def feature_root(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where streamed features go: eval.feature_dir or <workdir>/eval_features."""
  return config.eval.feature_dir or os.path.join(workdir, FEATURES_SUBDIR)


def run_sets(eval_sets: Mapping[str, Any], embedder: inference.Embedder,
             config: ml_collections.ConfigDict,
             workdir: str) -> dict[str, SetResult]:
  """Evaluates `embedder` on each set, in order."""
  features = feature_root(config, workdir)
  return {name: eval_set.run(embedder, config.eval.flip_fusion,
                             os.path.join(features, name))
          for name, eval_set in eval_sets.items()}


def format_report(results: Mapping[str, SetResult], step: int,
                  flip_fusion: str) -> str:
  """The text tables of all sets, grouped by kind."""
  lines = [f"Evaluation at step {step} ({flip_fusion} flip fusion):"]
  verification_results = {
      name: {"accuracy": r.accuracy, "val_at_far": r.val}
      for name, r in results.items() if r.kind in VERIFICATION_KINDS}
  if verification_results:
    lines += ["", "Verification: mean k-fold accuracy, VAL at FAR",
              verification.format_table(verification_results)]
  ijb_results = {name: r.figures["protocols"] for name, r in results.items()
                 if r.kind == "ijb"}
  if ijb_results:
    lines += ["", "IJB: 1:1 TAR at FAR, 1:N rank-k and TPIR at FPIR (%)",
              ijb.format_table(ijb_results)]
  tinyface_results = {name: r.figures for name, r in results.items()
                      if r.kind == "tinyface"}
  if tinyface_results:
    lines += ["", "TinyFace: closed-set identification (%)",
              tinyface.format_table(tinyface_results)]
  return "\n".join(lines)


def write_plots(workdir: str, step: int,
                results: Mapping[str, SetResult]) -> list[str]:
  """ROC PNGs in <workdir>/eval_plots: the verification sets in one, one
  per IJB set; returns their paths."""
  folder = os.path.join(workdir, PLOTS_SUBDIR)
  paths = []
  curves = {}
  for result in results.values():
    if result.kind in VERIFICATION_KINDS:
      curves.update(result.rocs)
  if curves:
    paths.append(roc_plots.plot_rocs(
        os.path.join(folder, "roc_verification.png"), curves,
        f"Verification ROC, step {step}"))
  for name, result in results.items():
    if result.kind == "ijb" and result.rocs:
      paths.append(roc_plots.plot_rocs(
          os.path.join(folder, f"roc_{name}.png"), result.rocs,
          f"{name} 1:1 ROC, step {step}"))
  return paths


def _json_safe(value):
  """NaN and infinities become None, which JSON can hold."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def write_results(workdir: str, step: int, results: dict[str, Any]) -> str:
  """Adds `results` (set name -> figures) to <workdir>/eval_results.json.

  The file keeps the latest figures of each set under "latest" and every
  evaluation under "history".
  """
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
    history["latest"][name] = _json_safe(dict(result, step=step))
    history.setdefault("history", []).append(
        _json_safe(dict(result, step=step)))
  with open(path + ".tmp", "w") as f:
    json.dump(history, f, indent=2)
  os.replace(path + ".tmp", path)
  return path


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             step: int | None = None,
             sets: Sequence[str] | None = None) -> dict[str, Any]:
  """Evaluates the latest (or given) checkpoint of `workdir`.

  Prints the tables, records the figures in <workdir>/eval_results.json
  and, when eval.roc_plots is set, draws the ROC curves.

  Args:
    config: the config the run was trained with.
    workdir: the run folder (or `<run>/best`).
    step: the checkpoint step; the newest by default.
    sets: names of the sets to run; all enabled ones by default.

  Returns:
    {set name: figures}; empty when no set is enabled.
  """
  # The checkpoint first: a wrong --workdir or --step, or a config that
  # does not build the trained model, fails before any set is prepared.
  variables, step = checkpointing.load_variables(workdir, step)
  backbone_variables = _backbone_variables(variables)
  checkpointing.check_variables_fit(
      backbone_shapes(config), backbone_variables, step,
      checkpointing.checkpoint_dir(workdir))
  eval_sets = build_sets(config, workdir, sets)
  if not eval_sets:
    logging.warning("No evaluation set is enabled (eval.pairs and every "
                    "eval.sets.*.path are empty).")
    return {}
  embedder = make_embedder(config, backbone_variables)
  results = run_sets(eval_sets, embedder, config, workdir)

  print(format_report(results, step, config.eval.flip_fusion))
  figures = {name: result.figures for name, result in results.items()}
  logging.info("Wrote %s", write_results(workdir, step, figures))
  if config.eval.roc_plots:
    for path in write_plots(workdir, step, results):
      print(f"ROC curves: {path}")
  return figures


# In-training evaluation.


def summarize(figures: Mapping[str, Any]) -> dict[str, float]:
  """The headline numbers of one set's figures, flat, for the metrics log."""
  kind = figures["kind"]
  if kind in VERIFICATION_KINDS:
    summary = {"accuracy": figures["accuracy_mean"]}
    if figures["val_at_far"] is not None:
      summary["val_at_far"] = figures["val_at_far"]["val_mean"]
    return summary
  if kind == "ijb":
    summary = {}
    for protocol, numbers in figures["protocols"].items():
      for far, tar in numbers["tar_at_far"].items():
        summary[f"{protocol}/tar_at_far_{far}"] = tar
      for k in ijb.RANKS:
        if f"rank_{k}" in numbers:
          summary[f"{protocol}/rank_{k}"] = numbers[f"rank_{k}"]
    return summary
  return {f"rank_{k}": figures[f"rank_{k}"] for k in tinyface.RANKS}


class BestBackbone:
  """Keeps the backbone of the best step in its own checkpoint folder.

  `<directory>/checkpoints/<step>/state` holds {"params": {"backbone"},
  "batch_stats": {"backbone"}}, what `checkpointing.load_variables` reads,
  and `<directory>/best.json` the step and its score. The training run's own
  checkpoints (and their rotation) are left alone.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self.record = None
    path = os.path.join(directory, BEST_FILE)
    if os.path.isfile(path):
      with open(path) as f:
        self.record = json.load(f)

  @property
  def value(self) -> float | None:
    return None if self.record is None else self.record["val_acc"]

  def update(self, step: int, value: float, variables: Mapping[str, Any],
             details: Mapping[str, Any]) -> bool:
    """Saves `variables` (the backbone's) when `value` beats the record.

    Returns:
      Whether this step is the new best (ties keep the earlier step).
    """
    if self.value is not None and value <= self.value:
      return False
    # One step at a time: clearing first also drops a stale best of a later
    # step left by a run that was resumed from an earlier checkpoint.
    shutil.rmtree(checkpointing.checkpoint_dir(self.directory),
                  ignore_errors=True)
    manager = checkpointing.create_manager(self.directory, max_to_keep=1)
    item = {"params": {"backbone": variables["params"]},
            "batch_stats": {"backbone": variables["batch_stats"]}}
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(item)), force=True)
    manager.wait_until_finished()
    manager.close()

    self.record = {"step": step, "val_acc": value, "sets": dict(details)}
    path = os.path.join(self.directory, BEST_FILE)
    with open(path + ".tmp", "w") as f:
      json.dump(_json_safe(self.record), f, indent=2)
    os.replace(path + ".tmp", path)
    return True


class TrainingEvaluator:
  """Runs the sets with every_steps > 0 during training.

  At a step that is a multiple of a set's every_steps the set is evaluated
  with the current backbone. Figures go to eval_results.json, a summary row
  to metrics.jsonl and a line to the log. When every verification set
  evaluated in training is due at a step, their mean accuracy (`val_acc`,
  as the reference names it) competes for `<workdir>/best`.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self._config = config
    self._workdir = workdir
    self._sets = build_sets(config, workdir, in_training=True)
    if self._sets and jax.process_count() > 1:
      # Host-side scoring would need the backbone gathered on every process.
      logging.warning("In-training evaluation runs in single-process "
                      "training only; skipping %s", sorted(self._sets))
      self._sets = {}
    self._verification = {name for name, s in self._sets.items()
                          if s.kind in VERIFICATION_KINDS}
    self._embedder = None
    self.best = BestBackbone(os.path.join(workdir, BEST_SUBDIR))

  def is_due(self, step: int) -> bool:
    """Whether any set is evaluated at `step`."""
    return any(step % s.every_steps == 0 for s in self._sets.values())

  def maybe_evaluate(self, step: int, state: Any,
                     message: Callable[[str], None] = logging.info
                     ) -> dict[str, Any] | None:
    """Evaluates the sets due at `step` on `state`'s backbone.

    Args:
      step: the number of updates applied.
      state: the train state (`params` and `batch_stats` with a
        "backbone" entry).
      message: where the one-line summary goes.

    Returns:
      {set name: figures} of the sets run, or None when none was due.
    """
    due = {name: s for name, s in self._sets.items()
           if step % s.every_steps == 0}
    if not due:
      return None
    variables = _backbone_variables(
        {"params": state.params, "batch_stats": state.batch_stats})
    if self._embedder is None:
      self._embedder = make_embedder(self._config, variables)
    else:
      self._embedder.set_variables(variables)

    start = time.perf_counter()
    results = run_sets(due, self._embedder, self._config, self._workdir)
    figures = {name: result.figures for name, result in results.items()}
    write_results(self._workdir, step, figures)
    row = {f"eval/{name}/{key}": value for name, numbers in figures.items()
           for key, value in summarize(numbers).items()}

    accuracies = {name: figures[name]["accuracy_mean"]
                  for name in self._verification if name in due}
    if accuracies and set(accuracies) == self._verification:
      val_acc = float(np.mean(list(accuracies.values())))
      row["eval/val_acc"] = val_acc
      if self.best.update(step, val_acc, variables, accuracies):
        row["eval/best_step"] = step
    row["eval/seconds"] = time.perf_counter() - start
    self._append_metrics(step, row)
    message(_summary_line(step, row))
    return figures

  def _append_metrics(self, step: int, row: dict[str, Any]) -> None:
    path = os.path.join(self._workdir, METRICS_FILE)
    with open(path, "a") as f:
      f.write(json.dumps(_json_safe(dict(row, step=step))) + "\n")


def _summary_line(step: int, row: Mapping[str, Any]) -> str:
  parts = [f"eval step {step}"]
  for key, value in row.items():
    if key in ("eval/seconds", "eval/best_step"):
      continue
    parts.append(f"{key.removeprefix('eval/')} {100 * value:.2f}")
  parts.append(f"{row['eval/seconds']:.1f} s")
  if "eval/best_step" in row:
    parts.append("new best")
  return " | ".join(parts)
