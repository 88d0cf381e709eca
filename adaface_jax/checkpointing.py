"""Orbax checkpoints of the train state and the input pipeline position.

A checkpoint step directory holds two items: `state` (step, params,
batch_stats, opt_state as plain nested dicts) and `data` (the grain
iterator's state), so a resumed run continues the same data stream.
"""

import os
from typing import Any

from absl import logging
import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from adaface_jax import sharding as sharding_lib

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def create_manager(workdir: str, max_to_keep: int,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """A manager for `<workdir>/checkpoints`, saving asynchronously."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), item_names=("state", "data"), options=options)


def save(manager: ocp.CheckpointManager, state, data_iterator) -> None:
  """Starts saving `state` (a TrainState) and the iterator at state.step.

  The write finishes in the background; call `manager.wait_until_finished()`
  before relying on it.
  """
  step = int(jax.device_get(state.step))
  items = {"state": ocp.args.StandardSave(flax.serialization.to_state_dict(
      state))}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def _saved_metadata(manager: ocp.CheckpointManager, step: int):
  """The tree of array metadata (shape, dtype) of a step's `state` item."""
  directory = os.path.join(str(manager.directory), str(step), "state")
  metadata = ocp.StandardCheckpointer().metadata(directory)
  return getattr(metadata, "item_metadata", metadata)


def _saved_shapes(manager: ocp.CheckpointManager, step: int):
  """{path: shape} of the arrays saved in a step's `state` item."""
  flat = jax.tree_util.tree_flatten_with_path(
      _saved_metadata(manager, step),
      is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def _check_shapes(template, saved: dict, step: int, directory) -> None:
  """Fails, naming the first differing array, when a checkpoint does not fit
  the model the config builds."""
  flat = jax.tree_util.tree_flatten_with_path(template)[0]
  for path, leaf in flat:
    key = jax.tree_util.keystr(path)
    if key not in saved:
      problem = "is missing from the checkpoint"
    elif saved[key] != tuple(leaf.shape):
      problem = (f"has shape {saved[key]} in the checkpoint but "
                 f"{tuple(leaf.shape)} in this model")
    else:
      continue
    raise ValueError(
        f"checkpoint step {step} in {directory} does not match the model "
        f"this config builds: {key} {problem}; use the config it was trained "
        "with, or another --workdir")


def check_variables_fit(template, variables, step: int, directory) -> None:
  """Fails, naming the first differing array, when loaded `variables` do not
  fit the `template` tree of shapes (e.g. `jax.eval_shape` of an init)."""
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  saved = {jax.tree_util.keystr(path): tuple(np.shape(leaf))
           for path, leaf in flat}
  _check_shapes(template, saved, step, directory)


def _fit_classes(array: jax.Array, num_columns: int, sharding) -> jax.Array:
  """Pads (with ones) or cuts the class axis (last) to `num_columns`."""
  def fit(x):
    if x.shape[-1] >= num_columns:
      return x[..., :num_columns]
    padding = [(0, 0)] * (x.ndim - 1) + [(0, num_columns - x.shape[-1])]
    # Ones, not zeros: a zero column has no direction to normalise.
    return jnp.pad(x, padding, constant_values=1.0)
  return jax.jit(fit, out_shardings=sharding)(array)


def restore(manager: ocp.CheckpointManager, state, data_iterator,
            num_classes: int | None = None, step: int | None = None):
  """Restores the latest (or given) step into `state` and the iterator.

  Arrays are placed with the shardings of `state`, so a checkpoint saved on
  one mesh restores onto another. The classifier's class axis is padded to
  a multiple of the model-axis size, which depends on the mesh: when the
  saved padding differs, the real `num_classes` columns are kept and the
  padding is redone.

  Args:
    manager: the run's checkpoint manager.
    state: a TrainState with the right structure (values are replaced).
    data_iterator: grain iterator whose position is restored in place, or
      None to leave the data stream alone.
    num_classes: real classes of the head (needed to re-pad).
    step: the step to restore; None for the latest.

  Returns:
    The restored TrainState, or `state` unchanged when there is no
    checkpoint.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return state
  saved = _saved_shapes(manager, step)
  refit = {}

  def leaf_template(path, leaf):
    target = ocp.utils.to_shape_dtype_struct(leaf)
    key = jax.tree_util.keystr(path)
    shape = saved.get(key)
    if (shape is not None and shape != target.shape and num_classes
        and sharding_lib.is_classifier_leaf(path)
        and shape[:-1] == target.shape[:-1] and shape[-1] >= num_classes):
      refit[key] = target
      # TODO: this restores the whole classifier on every device before
      # re-padding; a 2M-class kernel needs a sharded read instead.
      replicated = jax.sharding.NamedSharding(target.sharding.mesh,
                                              jax.sharding.PartitionSpec())
      return jax.ShapeDtypeStruct(shape, target.dtype, sharding=replicated)
    return target

  template = jax.tree_util.tree_map_with_path(
      leaf_template, flax.serialization.to_state_dict(state))
  _check_shapes(template, saved, step, manager.directory)
  items = {"state": ocp.args.StandardRestore(template)}
  if data_iterator is not None:
    if os.path.isdir(os.path.join(str(manager.directory), str(step), "data")):
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    else:  # E.g. converted from PyTorch: there is no stream to continue.
      logging.warning("Checkpoint step %d has no input-pipeline state; the "
                      "data stream starts from its beginning.", step)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError) as e:
    raise ValueError(
        f"checkpoint step {step} in {manager.directory} does not match the "
        f"model this config builds ({e}); use the config it was trained "
        "with, or another --workdir") from e

  def refit_leaf(path, leaf):
    target = refit.get(jax.tree_util.keystr(path))
    if target is None:
      return leaf
    fitted = _fit_classes(leaf[..., :num_classes], target.shape[-1],
                          target.sharding)
    return fitted
  restored_state = jax.tree_util.tree_map_with_path(
      refit_leaf, restored["state"])
  logging.info("Restored checkpoint step %d from %s", step, manager.directory)
  return flax.serialization.from_state_dict(state, restored_state)


def load_variables(workdir: str, step: int | None = None) -> tuple[
    dict[str, Any], int]:
  """Reads params and batch_stats of a run without building its optimizer.

  Args:
    workdir: the training run's folder (or its checkpoints folder).
    step: the step to load; None for the latest.

  Returns:
    ({"params": ..., "batch_stats": ...} as numpy arrays, the step).
  """
  if os.path.basename(os.path.normpath(workdir)) == CHECKPOINT_SUBDIR:
    workdir = os.path.dirname(os.path.normpath(workdir))
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise FileNotFoundError(
        f"no checkpoints in {checkpoint_dir(workdir)!r}; train first with "
        "the same --workdir")
  manager = create_manager(workdir, max_to_keep=1, read_only=True)
  saved_steps = sorted(manager.all_steps())
  if not saved_steps:
    raise FileNotFoundError(
        f"{checkpoint_dir(workdir)!r} holds no finished checkpoint")
  step = saved_steps[-1] if step is None else step
  if step not in saved_steps:
    raise FileNotFoundError(
        f"{checkpoint_dir(workdir)!r} has no checkpoint at step {step}; it "
        f"holds steps {', '.join(map(str, saved_steps))}")
  # The run may have used another device topology: read every array onto
  # this process's first device.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  template = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                        sharding=device),
      _saved_metadata(manager, step), is_leaf=lambda x: hasattr(x, "shape"))
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template)))
  state = jax.device_get(restored["state"])
  manager.close()
  return {"params": state["params"],
          "batch_stats": state["batch_stats"]}, step
