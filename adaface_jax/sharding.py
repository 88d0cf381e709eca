"""The device mesh and the shardings of the train state and the batches.

The mesh has two axes: `data` and `model`. Batches are split over both
(every device runs the backbone on its own slice), the backbone parameters
are replicated, and the classifier kernel `[embedding, classes]` with its
optimizer state is split along classes over `model`.
"""

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

DATA_AXIS = "data"
MODEL_AXIS = "model"
BATCH_AXES = (DATA_AXIS, MODEL_AXIS)


def create_mesh(config: ml_collections.ConfigDict,
                devices=None) -> jax.sharding.Mesh:
  """A (data, model) mesh; -1 in `config.data` or `config.model` takes the
  remaining devices.

  Raises:
    ValueError: the sizes do not multiply to the device count.
  """
  devices = jax.devices() if devices is None else devices
  count = len(devices)
  data, model = config.data, config.model
  if data == -1 and model == -1:
    raise ValueError("mesh.data and mesh.model cannot both be -1")
  if model == -1:
    model = count // data if data > 0 and count % data == 0 else 0
  if data == -1:
    data = count // model if model > 0 and count % model == 0 else 0
  if data < 1 or model < 1 or data * model != count:
    raise ValueError(
        f"mesh (data={config.data}, model={config.model}) does not fit the "
        f"{count} devices; their product must equal the device count")
  grid = np.asarray(devices).reshape(data, model)
  return jax.sharding.Mesh(grid, BATCH_AXES)


def padded_class_count(num_classes: int, mesh: jax.sharding.Mesh) -> int:
  """Classes rounded up to a multiple of the model axis (equal blocks)."""
  shards = mesh.shape[MODEL_AXIS]
  return -(-num_classes // shards) * shards


def is_classifier_leaf(path) -> bool:
  """True for the head kernel and the optimizer states shaped like it."""
  keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return any(a == "head" and b == "kernel" for a, b in zip(keys, keys[1:]))


def state_shardings(abstract_state, mesh: jax.sharding.Mesh):
  """Shardings for every leaf of a (possibly abstract) train state."""
  classes = NamedSharding(mesh, P(None, MODEL_AXIS))
  replicated = NamedSharding(mesh, P())

  def sharding(path, leaf):
    if is_classifier_leaf(path) and getattr(leaf, "ndim", 0) == 2:
      return classes
    return replicated
  return jax.tree_util.tree_map_with_path(sharding, abstract_state)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Assembles this process's slice of a batch into global arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)
