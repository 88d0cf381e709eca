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
import orbax.checkpoint as ocp

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


def restore(manager: ocp.CheckpointManager, state, data_iterator,
            step: int | None = None):
  """Restores the latest (or given) step into `state` and the iterator.

  Args:
    manager: the run's checkpoint manager.
    state: a TrainState with the right structure (values are replaced).
    data_iterator: grain iterator whose position is restored in place, or
      None to leave the data stream alone.
    step: the step to restore; None for the latest.

  Returns:
    The restored TrainState, or `state` unchanged when there is no
    checkpoint.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return state
  template = jax.tree.map(
      ocp.utils.to_shape_dtype_struct,
      flax.serialization.to_state_dict(state))
  items = {"state": ocp.args.StandardRestore(template)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError) as e:
    raise ValueError(
        f"checkpoint step {step} in {manager.directory} does not match the "
        f"model this config builds ({e}); use the config it was trained "
        "with, or another --workdir") from e
  logging.info("Restored checkpoint step %d from %s", step, manager.directory)
  return flax.serialization.from_state_dict(state, restored["state"])


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
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(
        f"{checkpoint_dir(workdir)!r} holds no finished checkpoint")
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = restored["state"]
  manager.close()
  return {"params": state["params"],
          "batch_stats": state["batch_stats"]}, step
