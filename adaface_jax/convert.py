"""Checkpoint conversion between this project and the PyTorch reference.

Backbone variables map one to one onto the reference's `state_dict`:

  Flax (NHWC model)                      PyTorch state_dict
  conv `kernel` (kh, kw, in, out)        `weight` (out, in, kh, kw)
  dense `kernel` (in, out), `bias`       `weight` (out, in), `bias`
  BatchNorm `scale`, `bias`              `weight`, `bias`
  batch_stats `mean`, `var`              `running_mean`, `running_var`
  (not stored)                           `num_batches_tracked`, int64
  PReLU `slope` (C,)                     `weight` (C,)

The Flax backbone flattens its last feature map in (C, H, W) order, as the
reference does, so the dense kernel is the plain transpose of the Linear
weight. `num_batches_tracked` only matters to PyTorch BatchNorm without a
momentum; it is written as zero and ignored on the way in. The final
BatchNorm1d has no affine parameters, only running statistics.

Released AdaFace checkpoints are `{"state_dict": {...}}` with the backbone
under `model.` and the AdaFace head under `head.`: `kernel` (D, C), `t` (1,)
(unused), `batch_mean` (1,) and `batch_std` (1,).

Command line (the config is the training config file, `path.py[:arg]`):

  python -m adaface_jax.convert to-torch --checkpoint RUN_DIR \
      --output model.ckpt [--backbone-output backbone.pt] [--config CFG]
  python -m adaface_jax.convert from-torch --input adaface_ir50.ckpt \
      --config CFG --workdir OUT_DIR [--step 0] [--num-classes N] \
      [--trust-pickle]

`to-torch` reads `<RUN_DIR>/config.json` when --config is omitted. The
`from-torch` output is a checkpoint like the ones training writes
(`OUT_DIR/checkpoints/<step>/state`) holding the converted weights, the
converted (or a fresh) head and a freshly initialised optimizer state:
`eval.py --workdir OUT_DIR` evaluates it, and its `state` item restores into
the train state that the same config builds. It holds no input-pipeline
position (`data` item), since the converted model never read this project's
data stream.

PyTorch is imported only by the functions that read or write `.ckpt`/`.pt`
files; the state_dict conversions work on numpy arrays without it.
"""

import argparse
import collections
import dataclasses
import importlib.util
import json
import os
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from adaface_jax import backbone
from adaface_jax import checkpointing
from adaface_jax import model as model_lib
from adaface_jax import optim
from adaface_jax import reporting
from adaface_jax import train_lib

BACKBONE_PREFIX = "model."
HEAD_PREFIX = "head."
COUNTER_SUFFIX = "num_batches_tracked"

# Head entries of a released AdaFace checkpoint beside the kernel; `t` is a
# buffer the reference registers and never uses.
_ADAFACE_HEAD_STATS = ("batch_mean", "batch_std")


class ConversionError(ValueError):
  """A checkpoint does not match the architecture it is converted for."""


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What fixes a backbone's state_dict layout.

  Attributes:
    stage_units: units per stage, e.g. (2, 2, 2, 2) for ir_18.
    stage_widths: output channels per stage; the stem has the first width.
    embedding_size: output size of the final Linear.
    image_size: side of the input; sets the Linear's input size.
  """

  stage_units: tuple[int, ...]
  stage_widths: tuple[int, ...] = backbone.STAGE_WIDTHS
  embedding_size: int = 512
  image_size: int = 112

  def describe(self) -> str:
    names = [n for n, u in backbone.STAGE_UNITS.items()
             if u == self.stage_units]
    # The reference's name for the 100-layer table is the last, ir_101.
    named = (f"{names[-1]}, " if names
             and self.stage_widths == backbone.STAGE_WIDTHS else "")
    return (f"{named}stage units {self.stage_units}, widths "
            f"{self.stage_widths}, embedding {self.embedding_size}, "
            f"{self.image_size}px input")


def architecture_from_config(config: ml_collections.ConfigDict
                             ) -> Architecture:
  """The backbone architecture of a training config (`model`, `data`)."""
  spec = backbone.resolve_spec(
      config.model.name, config.model.stage_units, config.model.stage_widths)
  return Architecture(spec.stage_units, spec.stage_widths,
                      int(config.model.embedding_size),
                      int(config.data.image_size))


def named_architecture(name: str, embedding_size: int = 512,
                       image_size: int = 112) -> Architecture:
  """ir_18, ir_34, ir_50, ir_100 or ir_101 with the reference widths."""
  spec = backbone.resolve_spec(name)
  return Architecture(spec.stage_units, spec.stage_widths, embedding_size,
                      image_size)


# ---------------------------------------------------------------------------
# The layout: one entry per state_dict key, with its Flax counterpart.


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One state_dict entry and where it lives in the Flax variables.

  `transform` is "conv" (OIHW <-> HWIO), "linear" ((out, in) <-> (in, out)),
  "same" or "counter" (num_batches_tracked: no Flax counterpart).
  """

  key: str
  shape: tuple[int, ...]
  dtype: str
  collection: str | None = None
  path: tuple[str, ...] = ()
  transform: str = "same"

  @property
  def flax_shape(self) -> tuple[int, ...]:
    if self.transform == "conv":
      out_c, in_c, kh, kw = self.shape
      return (kh, kw, in_c, out_c)
    if self.transform == "linear":
      return self.shape[::-1]
    return self.shape

  @property
  def flax_name(self) -> str:
    return "/".join((self.collection,) + self.path)


def _conv(key, module, in_c, out_c, size):
  return [_Entry(f"{key}.weight", (out_c, in_c, size, size), "float32",
                 "params", (*module, "kernel"), "conv")]


def _batch_norm(key, module, channels, affine=True):
  entries = []
  if affine:
    entries += [
        _Entry(f"{key}.weight", (channels,), "float32", "params",
               (*module, "scale")),
        _Entry(f"{key}.bias", (channels,), "float32", "params",
               (*module, "bias")),
    ]
  return entries + [
      _Entry(f"{key}.running_mean", (channels,), "float32", "batch_stats",
             (*module, "mean")),
      _Entry(f"{key}.running_var", (channels,), "float32", "batch_stats",
             (*module, "var")),
      _Entry(f"{key}.{COUNTER_SUFFIX}", (), "int64", transform="counter"),
  ]


def _prelu(key, module, channels):
  return [_Entry(f"{key}.weight", (channels,), "float32", "params",
                 (*module, "slope"))]


def _linear(key, module, in_features, out_features):
  return [
      _Entry(f"{key}.weight", (out_features, in_features), "float32",
             "params", (*module, "kernel"), "linear"),
      _Entry(f"{key}.bias", (out_features,), "float32", "params",
             (*module, "bias")),
  ]


def _unit_entries(index, in_c, out_c):
  """Entries of body unit `index`: shortcut first, as registered."""
  key, unit = f"body.{index}", (f"body_{index}",)
  entries = []
  if in_c != out_c:
    entries += _conv(f"{key}.shortcut_layer.0", (*unit, "shortcut_conv"),
                     in_c, out_c, 1)
    entries += _batch_norm(f"{key}.shortcut_layer.1", (*unit, "shortcut_bn"),
                           out_c)
  res = f"{key}.res_layer"
  entries += _batch_norm(f"{res}.0", (*unit, "res_bn1"), in_c)
  entries += _conv(f"{res}.1", (*unit, "res_conv1"), in_c, out_c, 3)
  entries += _batch_norm(f"{res}.2", (*unit, "res_bn2"), out_c)
  entries += _prelu(f"{res}.3", (*unit, "res_prelu"), out_c)
  entries += _conv(f"{res}.4", (*unit, "res_conv2"), out_c, out_c, 3)
  entries += _batch_norm(f"{res}.5", (*unit, "res_bn3"), out_c)
  return entries


def _entries(arch: Architecture) -> list[_Entry]:
  """The reference state_dict of `arch`, in its registration order."""
  stem, last = arch.stage_widths[0], arch.stage_widths[-1]
  map_size = backbone.feature_map_size(arch.image_size,
                                       len(arch.stage_units))
  entries = (
      _conv("input_layer.0", ("input_layer_conv",), 3, stem, 3)
      + _batch_norm("input_layer.1", ("input_layer_bn",), stem)
      + _prelu("input_layer.2", ("input_layer_prelu",), stem)
      # The reference registers output_layer before body.
      + _batch_norm("output_layer.0", ("output_layer_bn2d",), last)
      + _linear("output_layer.3", ("output_layer_dense",),
                last * map_size * map_size, arch.embedding_size)
      + _batch_norm("output_layer.4", ("output_layer_bn1d",),
                    arch.embedding_size, affine=False))
  in_c, index = stem, 0
  for units, width in zip(arch.stage_units, arch.stage_widths):
    for _ in range(units):
      entries += _unit_entries(index, in_c, width)
      in_c, index = width, index + 1
  return entries


def torch_layout(arch: Architecture) -> list[tuple[str, tuple[int, ...], str]]:
  """The reference backbone's state_dict as ordered (key, shape, dtype).

  For ir_18/50/101 this is exactly the reference's published key list.
  """
  return [(e.key, e.shape, e.dtype) for e in _entries(arch)]


# ---------------------------------------------------------------------------
# Backbone state_dict <-> Flax variables.


def flax_to_torch_state_dict(variables: Mapping[str, Any],
                             arch: Architecture) -> dict[str, np.ndarray]:
  """Backbone variables -> the reference's state_dict, as numpy arrays.

  Args:
    variables: {"params": ..., "batch_stats": ...} of the backbone alone
      (the `backbone` subtrees of the full model's variables).
    arch: the backbone's architecture.

  Returns:
    An ordered {key: array} with the reference's keys, shapes and dtypes
    (float32; int64 zeros for `num_batches_tracked`). Use `to_torch` for
    tensors.

  Raises:
    ConversionError: naming the first missing, extra or misshapen variable.
  """
  entries = _entries(arch)
  flat = _flatten_variables(variables)
  _check_flax_leaves(flat, entries, arch)

  state_dict = collections.OrderedDict()
  for entry in entries:
    if entry.transform == "counter":
      state_dict[entry.key] = np.zeros((), np.int64)
      continue
    value = np.asarray(flat[(entry.collection, *entry.path)], np.float32)
    state_dict[entry.key] = _to_torch_layout(value, entry.transform)
  return state_dict


def torch_state_dict_to_flax(state_dict: Mapping[str, Any],
                             arch: Architecture) -> dict[str, Any]:
  """A bare backbone state_dict (no `model.` prefix) -> Flax variables.

  Args:
    state_dict: {key: torch tensor or array} in the reference layout.
      `num_batches_tracked` entries may be absent (older PyTorch).
    arch: the architecture the variables are for.

  Returns:
    {"params": ..., "batch_stats": ...} nested dicts of float32 numpy
    arrays, ready for `backbone.IResNet(...).apply`.

  Raises:
    ConversionError: naming the first missing, extra or misshapen key, and
      describing the architecture the state_dict seems to hold when it is
      not `arch`.
  """
  entries = _entries(arch)
  _check_state_dict(state_dict, entries, arch)

  flat = {}
  for entry in entries:
    if entry.transform == "counter":
      continue
    value = _as_numpy(state_dict[entry.key]).astype(np.float32)
    flat[(entry.collection, *entry.path)] = _to_flax_layout(
        value, entry.transform)
  return flax.traverse_util.unflatten_dict(flat)


def _to_torch_layout(value: np.ndarray, transform: str) -> np.ndarray:
  if transform == "conv":
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
  if transform == "linear":
    return np.ascontiguousarray(value.T)
  return value


def _to_flax_layout(value: np.ndarray, transform: str) -> np.ndarray:
  if transform == "conv":
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if transform == "linear":
    return np.ascontiguousarray(value.T)
  return value


def _flatten_variables(variables: Mapping[str, Any]) -> dict:
  for collection in ("params", "batch_stats"):
    if collection not in variables:
      raise ConversionError(
          f"backbone variables lack the {collection!r} collection (got "
          f"{sorted(variables)}); pass {{'params': ..., 'batch_stats': ...}} "
          "of the backbone")
  tree = {c: flax.core.unfreeze(variables[c])
          for c in ("params", "batch_stats")}
  return flax.traverse_util.flatten_dict(tree)


def _check_flax_leaves(flat: dict, entries: list[_Entry],
                       arch: Architecture) -> None:
  expected = {(e.collection, *e.path): e for e in entries
              if e.transform != "counter"}
  for path, entry in expected.items():
    if path not in flat:
      raise ConversionError(
          f"the Flax variables lack {entry.flax_name} (for {entry.key}); "
          f"they do not hold a backbone of {arch.describe()}")
  for path in flat:
    if path not in expected:
      raise ConversionError(
          f"unexpected Flax variable {'/'.join(path)}: the variables hold "
          f"more than a backbone of {arch.describe()}")
  for path, entry in expected.items():
    shape = tuple(np.shape(flat[path]))
    if shape != entry.flax_shape:
      raise ConversionError(
          f"Flax variable {entry.flax_name} has shape {shape}, expected "
          f"{entry.flax_shape} for {arch.describe()}")


def _check_state_dict(state_dict: Mapping[str, Any], entries: list[_Entry],
                      arch: Architecture) -> None:
  problem = _first_state_dict_problem(state_dict, entries)
  if problem is not None:
    raise ConversionError(
        f"the state_dict {problem}: it does not hold a backbone of "
        f"{arch.describe()}{_guess_suffix(state_dict, arch)}")


def _first_state_dict_problem(state_dict: Mapping[str, Any],
                              entries: list[_Entry]) -> str | None:
  """The first missing key, else the first extra key, else the first shape
  mismatch, in words; None when the state_dict fits."""
  expected = {e.key: e for e in entries}
  for entry in entries:
    # Older PyTorch wrote no `num_batches_tracked`; it carries nothing here.
    if entry.key not in state_dict and entry.transform != "counter":
      return f"lacks {entry.key!r}"
  for key in state_dict:
    if key not in expected:
      return f"has the unexpected key {key!r}"
  for key, value in state_dict.items():
    shape = tuple(np.shape(_as_numpy(value)))
    if shape != expected[key].shape:
      return f"has {key!r} of shape {shape}, expected {expected[key].shape}"
  return None


def infer_architecture(state_dict: Mapping[str, Any],
                       image_size: int = 112) -> Architecture | None:
  """Reads the architecture off a bare backbone state_dict's keys and shapes.

  A stage starts at the first unit and at every unit with a shortcut
  convolution, so consecutive stages of equal width read as one stage.
  Returns None when the keys do not look like an IR backbone.
  """
  units = {}
  for key, value in state_dict.items():
    match = re.fullmatch(r"body\.(\d+)\.res_layer\.4\.weight", key)
    if match:
      units[int(match.group(1))] = int(np.shape(_as_numpy(value))[0])
  linear = state_dict.get("output_layer.3.weight")
  if not units or linear is None or sorted(units) != list(range(len(units))):
    return None

  stage_units, stage_widths = [], []
  for index in range(len(units)):
    if index == 0 or f"body.{index}.shortcut_layer.0.weight" in state_dict:
      stage_units.append(0)
      stage_widths.append(units[index])
    stage_units[-1] += 1
  embedding_size = int(np.shape(_as_numpy(linear))[0])
  return Architecture(tuple(stage_units), tuple(stage_widths),
                      embedding_size, image_size)


def _guess_suffix(state_dict: Mapping[str, Any], arch: Architecture) -> str:
  guess = infer_architecture(state_dict, arch.image_size)
  if guess is None or guess == arch:
    return ""
  return f"; it looks like {guess.describe()}"


def _as_numpy(value: Any) -> np.ndarray:
  """A torch tensor (any device, bf16 included) or array-like -> numpy."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if value.is_floating_point() and value.dtype.itemsize < 4:
      value = value.float()
    return value.numpy()
  return np.asarray(value)


# ---------------------------------------------------------------------------
# The head and whole checkpoints.


def head_to_torch(head_params: Mapping[str, Any] | None,
                  head_stats: Mapping[str, Any] | None,
                  head_kind: str) -> dict[str, np.ndarray]:
  """The head's entries (without the `head.` prefix) for a released .ckpt.

  AdaFace gives `kernel` (D, C), `t` (1,) zero, `batch_mean` and `batch_std`
  (1,); CosFace and ArcFace give `kernel` alone, as the reference's heads.
  An absent head gives no entries.
  """
  if not head_params:
    return {}
  state_dict = collections.OrderedDict(
      kernel=np.asarray(head_params["kernel"], np.float32))
  if head_kind == "adaface":
    head_stats = head_stats or {}
    missing = [k for k in _ADAFACE_HEAD_STATS if k not in head_stats]
    if missing:
      raise ConversionError(
          f"the AdaFace head lacks its batch_stats {missing}; is the config's "
          "head.name the one the run was trained with?")
    state_dict["t"] = np.zeros((1,), np.float32)
    for name in _ADAFACE_HEAD_STATS:
      state_dict[name] = np.asarray(head_stats[name], np.float32).reshape(1)
  return state_dict


def split_checkpoint_state_dict(state_dict: Mapping[str, Any]
                                ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits a state_dict into (backbone, head) entries without prefixes.

  Accepts a released/Lightning state_dict (`model.` and `head.` keys) or a
  bare backbone state_dict.

  Raises:
    ConversionError: on a key that is neither, in a prefixed state_dict.
  """
  prefixed = any(k.startswith(BACKBONE_PREFIX) for k in state_dict)
  backbone_sd, head_sd = collections.OrderedDict(), collections.OrderedDict()
  for key, value in state_dict.items():
    if key.startswith(HEAD_PREFIX):
      head_sd[key[len(HEAD_PREFIX):]] = value
    elif not prefixed:
      backbone_sd[key] = value
    elif key.startswith(BACKBONE_PREFIX):
      backbone_sd[key[len(BACKBONE_PREFIX):]] = value
    else:
      raise ConversionError(
          f"the state_dict has the key {key!r}, neither under "
          f"{BACKBONE_PREFIX!r} nor under {HEAD_PREFIX!r}")
  return backbone_sd, head_sd


def to_torch(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """{key: numpy array} -> an ordered {key: torch tensor} (needs torch)."""
  torch = _import_torch()
  return collections.OrderedDict(
      (k, torch.from_numpy(np.array(v))) for k, v in state_dict.items())


def load_torch_file(path: str, trust_pickle: bool = False) -> Any:
  """Reads a .ckpt/.pt file on the CPU.

  Tries `weights_only=True` first (tensors and plain containers only). Full
  Lightning checkpoints also pickle Python objects (hyper-parameters); those
  load only with `trust_pickle`, which unpickles arbitrary code.

  Raises:
    FileNotFoundError: no such file.
    ConversionError: not a PyTorch file, or one that needs `trust_pickle`.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"PyTorch checkpoint {path!r} does not exist")
  torch = _import_torch()
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    if not trust_pickle:
      raise ConversionError(
          f"{path!r} holds Python objects besides tensors "
          f"({_unpickler_reason(e)}), which weights_only=True refuses. If "
          "the file comes from a source you trust (e.g. a full Lightning "
          "checkpoint), rerun with --trust-pickle (trust_pickle=True); "
          "unpickling can run arbitrary code") from None
  # What torch raises on files that are not its checkpoints.
  except (EOFError, KeyError, OSError, RuntimeError, ValueError) as e:
    raise ConversionError(
        f"cannot read {path!r} as a PyTorch checkpoint: {e!r}") from None
  logging.warning("Loading %s with weights_only=False (trusted pickle).",
                  path)
  return torch.load(path, map_location="cpu", weights_only=False)


def _unpickler_reason(error: Exception) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  for line in lines:
    if "Unsupported global" in line or "WeightsUnpickler error" in line:
      return line
  return lines[-1] if lines else type(error).__name__


def _import_torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        "reading or writing PyTorch checkpoints needs PyTorch "
        "(pip install torch)") from e
  return torch


def checkpoint_state_dict(file_contents: Any, path: str) -> dict[str, Any]:
  """The state_dict of a loaded .ckpt (`{"state_dict": ...}`) or .pt file."""
  if isinstance(file_contents, Mapping) and "state_dict" in file_contents:
    file_contents = file_contents["state_dict"]
  if not isinstance(file_contents, Mapping) or not file_contents:
    raise ConversionError(
        f"{path!r} holds neither a {{'state_dict': ...}} checkpoint nor a "
        f"non-empty state_dict (got {type(file_contents).__name__})")
  return dict(file_contents)


def resolve_checkpoint_path(path: str, step: int | None = None
                            ) -> tuple[str, int | None]:
  """(workdir, step) of a run folder, its `checkpoints` folder or a step
  folder `<workdir>/checkpoints/<step>`."""
  path = os.path.normpath(os.path.abspath(path))
  parent = os.path.dirname(path)
  if (os.path.basename(path).isdigit()
      and os.path.basename(parent) == checkpointing.CHECKPOINT_SUBDIR):
    folder_step = int(os.path.basename(path))
    if step is not None and step != folder_step:
      raise ValueError(
          f"--step {step} contradicts the step folder {path!r}")
    return os.path.dirname(parent), folder_step
  if os.path.basename(path) == checkpointing.CHECKPOINT_SUBDIR:
    return parent, step
  return path, step


def export_checkpoint(checkpoint: str, config: ml_collections.ConfigDict,
                      output: str, backbone_output: str | None = None,
                      step: int | None = None) -> dict[str, np.ndarray]:
  """Orbax checkpoint -> a released-style AdaFace `.ckpt` (needs torch).

  Args:
    checkpoint: a run folder, its `checkpoints` folder or a step folder.
    config: the config the run was trained with.
    output: the `.ckpt` to write: {"state_dict": {model.*, head.*}}.
    backbone_output: optionally, a `.pt` with the bare backbone state_dict
      (what deployment code loads into the reference `Backbone`).
    step: the step to export; the newest (or the step folder's) by default.

  Returns:
    The written state_dict as numpy arrays.
  """
  workdir, step = resolve_checkpoint_path(checkpoint, step)
  variables, step = checkpointing.load_variables(workdir, step)
  params, stats = variables["params"], variables["batch_stats"]
  if "backbone" not in params:
    raise ConversionError(
        f"the checkpoint in {workdir!r} has no params/backbone (got "
        f"{sorted(params)})")
  backbone_sd = flax_to_torch_state_dict(
      {"params": params["backbone"],
       "batch_stats": stats.get("backbone", {})},
      architecture_from_config(config))
  head_params = params.get("head")
  num_classes = config.head.num_classes
  if head_params is not None and 0 < num_classes < np.shape(
      head_params["kernel"])[-1]:
    # Training pads the class axis to a multiple of the model-axis size;
    # the padding columns are not classes.
    kernel = np.asarray(head_params["kernel"])[:, :num_classes]
    head_params = dict(head_params, kernel=kernel)
  head_sd = head_to_torch(head_params, stats.get("head"), config.head.name)

  state_dict = collections.OrderedDict(
      [(BACKBONE_PREFIX + k, v) for k, v in backbone_sd.items()]
      + [(HEAD_PREFIX + k, v) for k, v in head_sd.items()])
  torch = _import_torch()
  _make_parent(output)
  torch.save({"state_dict": to_torch(state_dict)}, output)
  if backbone_output:
    _make_parent(backbone_output)
    torch.save(to_torch(backbone_sd), backbone_output)
  logging.info("Wrote step %d of %s to %s", step, workdir, output)
  return state_dict


def import_checkpoint(path: str, config: ml_collections.ConfigDict,
                      workdir: str, step: int = 0,
                      num_classes: int | None = None,
                      trust_pickle: bool = False) -> train_lib.TrainState:
  """A PyTorch checkpoint -> an Orbax checkpoint like training writes.

  Writes `<workdir>/checkpoints/<step>/state` (step, params, batch_stats,
  opt_state) and `<workdir>/config.json`. The optimizer state is freshly
  initialised for `config.optimizer` (zero momentum), so fine-tuning starts
  from the converted weights with a fresh optimizer and, at step 0, the
  schedule's start. The head keeps the file's kernel (and AdaFace norm
  statistics) when its class count is the config's; otherwise, or when the
  file has no head, a fresh head is initialised (seed `config.seed`).

  Args:
    path: a released `.ckpt` ({"state_dict": ...}), a Lightning checkpoint,
      or a bare backbone state_dict file (keys with or without `model.`).
    config: the training config of the converted model.
    workdir: the run folder to create; must hold no checkpoint yet.
    step: the step to record.
    num_classes: the head's class count; default `config.head.num_classes`,
      or the file's head when that is 0 (taken from the data in training).
    trust_pickle: allow unpickling Python objects (see `load_torch_file`).

  Returns:
    The written train state.
  """
  target = checkpointing.checkpoint_dir(workdir)
  if os.path.isdir(target) and os.listdir(target):
    raise ValueError(
        f"{target!r} already holds checkpoints; choose a new --workdir")

  state_dict = checkpoint_state_dict(load_torch_file(path, trust_pickle), path)
  backbone_sd, head_sd = split_checkpoint_state_dict(state_dict)
  backbone_vars = torch_state_dict_to_flax(
      backbone_sd, architecture_from_config(config))
  num_classes = _resolve_num_classes(config, head_sd, num_classes, path)
  head_vars = _import_head(head_sd, config, num_classes, path)

  state = _fresh_train_state(config, backbone_vars, head_vars, step)
  manager = checkpointing.create_manager(workdir, max_to_keep=1)
  checkpointing.save(manager, state, None)
  manager.wait_until_finished()
  manager.close()
  train_lib.write_config(config, workdir, step)
  logging.info("Wrote %s as step %d of %s", path, step, workdir)
  return state


def _resolve_num_classes(config, head_sd, num_classes, path) -> int:
  if num_classes:
    return num_classes
  if config.head.num_classes > 0:
    return config.head.num_classes
  if "kernel" in head_sd:
    return int(np.shape(_as_numpy(head_sd["kernel"]))[1])
  raise ConversionError(
      f"config head.num_classes is 0 (taken from the data in training) and "
      f"{path!r} has no head; pass the class count (--num-classes)")


def _import_head(head_sd, config, num_classes, path) -> dict[str, Any]:
  """{"params": ..., "batch_stats": ...} of the head: the file's or fresh."""
  head = model_lib.create_head(config.head, num_classes)
  embedding_size = config.model.embedding_size
  # A dummy pair of unit embeddings: AdaFace's std needs two samples.
  embeddings = jnp.full((2, embedding_size), embedding_size**-0.5)
  fresh = head.init(jax.random.key(config.seed), embeddings,
                    jnp.ones((2, 1)), jnp.zeros((2,), jnp.int32))
  fresh = jax.tree.map(np.asarray, flax.core.unfreeze(fresh))
  fresh.setdefault("batch_stats", {})
  if "kernel" not in head_sd:
    logging.warning("%s has no head; initialising a fresh %s head of %d "
                    "classes", path, config.head.name, num_classes)
    return fresh

  kernel = _as_numpy(head_sd["kernel"]).astype(np.float32)
  if kernel.shape != fresh["params"]["kernel"].shape:
    logging.warning(
        "Dropping the head of %s: head.kernel has shape %s but the config "
        "wants (%d, %d) (embedding, classes); initialising a fresh %s head "
        "(kernel and norm statistics)", path, kernel.shape, embedding_size,
        num_classes, config.head.name)
    return fresh

  imported = {"params": {"kernel": kernel}, "batch_stats": {}}
  for name, value in fresh["batch_stats"].items():
    if name in head_sd:
      value = _as_numpy(head_sd[name]).astype(np.float32).reshape(
          value.shape)
    imported["batch_stats"][name] = value
  return imported


def _fresh_train_state(config, backbone_vars, head_vars, step):
  """A TrainState of the converted variables with a new optimizer state."""
  params = {"backbone": backbone_vars["params"], "head": head_vars["params"]}
  batch_stats = {"backbone": backbone_vars["batch_stats"]}
  # Only AdaFace has head statistics; training's tree has no empty entry.
  if head_vars["batch_stats"]:
    batch_stats["head"] = head_vars["batch_stats"]
  # The schedule's values do not enter the optimizer state, only its shape:
  # a callable schedule gives the same state structure training has.
  learning_rate_fn = optax.constant_schedule(config.optimizer.lr)
  tx = optim.create_optimizer(config.optimizer, learning_rate_fn)
  params = jax.tree.map(jnp.asarray, params)
  state = train_lib.TrainState.create(
      apply_fn=None, params=params, tx=tx,
      batch_stats=jax.tree.map(jnp.asarray, batch_stats))
  return state.replace(step=jnp.asarray(step, jnp.int32))


def _make_parent(path: str) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)


# ---------------------------------------------------------------------------
# Command line.


def load_config(spec: str) -> ml_collections.ConfigDict:
  """A config from `file.py` (its `get_config()`), `file.py:arg`
  (`get_config(arg)`) or a run's `config.json`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  if path.endswith(".json"):
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  module_spec = importlib.util.spec_from_file_location("_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config()")
  return module.get_config(arg) if arg else module.get_config()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m adaface_jax.convert",
      description="Convert checkpoints between adaface_jax (Orbax) and the "
                  "PyTorch AdaFace reference (.ckpt).")
  commands = parser.add_subparsers(dest="command", required=True)

  to_torch_parser = commands.add_parser(
      "to-torch", help="Orbax checkpoint -> released-style .ckpt")
  to_torch_parser.add_argument(
      "--checkpoint", required=True,
      help="run folder, its checkpoints/ folder or a checkpoints/<step> one")
  to_torch_parser.add_argument(
      "--config", help="training config (file.py[:arg]); default: the run's "
                       "config.json")
  to_torch_parser.add_argument("--output", required=True,
                               help=".ckpt to write")
  to_torch_parser.add_argument(
      "--backbone-output", help="also write the bare backbone state_dict")
  to_torch_parser.add_argument("--step", type=int, help="default: newest")

  from_torch_parser = commands.add_parser(
      "from-torch", help=".ckpt or backbone state_dict -> Orbax checkpoint")
  from_torch_parser.add_argument("--input", required=True,
                                 help=".ckpt or .pt file")
  from_torch_parser.add_argument("--config", required=True,
                                 help="training config (file.py[:arg])")
  from_torch_parser.add_argument("--workdir", required=True,
                                 help="run folder to create")
  from_torch_parser.add_argument("--step", type=int, default=0)
  from_torch_parser.add_argument(
      "--num-classes", type=int,
      help="head classes; default: the config's (or the file's if 0)")
  from_torch_parser.add_argument(
      "--trust-pickle", action="store_true",
      help="allow torch.load(weights_only=False): only for trusted files")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the command line; argv excludes the program name."""
  args = _parse_args(argv)
  if args.command == "to-torch":
    workdir = resolve_checkpoint_path(args.checkpoint, args.step)[0]
    if not os.path.isdir(checkpointing.checkpoint_dir(workdir)):
      raise FileNotFoundError(
          f"--checkpoint {args.checkpoint!r}: no checkpoints in "
          f"{checkpointing.checkpoint_dir(workdir)!r}")
    config_spec = args.config or os.path.join(workdir, "config.json")
    export_checkpoint(args.checkpoint, load_config(config_spec), args.output,
                      args.backbone_output, args.step)
  else:
    import_checkpoint(args.input, load_config(args.config), args.workdir,
                      args.step, args.num_classes, args.trust_pickle)


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  reporting.quiet_library_logs()
  try:
    main()
  except (ConversionError, FileNotFoundError, ImportError, ValueError) as error:
    sys.exit(f"error: {error}")
