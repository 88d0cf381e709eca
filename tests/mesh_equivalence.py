"""Runs a few training steps on several meshes and compares them (a script).

Started by `sharding_test.py` in its own process, because the number of
simulated CPU devices is fixed when JAX starts. Prints one JSON object with
the largest differences against a single-device run of the plain
(unsharded) heads, per mesh and tensor group, and the collectives found in
a compiled step.

  python tests/mesh_equivalence.py --devices 8
"""

import argparse
import json
import os
import re
import sys


def _parse():
  parser = argparse.ArgumentParser()
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  return parser.parse_args()


ARGS = _parse()
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={ARGS.devices}")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

from adaface_jax import heads  # noqa: E402
from adaface_jax import model as model_lib  # noqa: E402
from adaface_jax import optim  # noqa: E402
from adaface_jax import sharding as sharding_lib  # noqa: E402
from adaface_jax import train_lib  # noqa: E402
from configs import common  # noqa: E402

NUM_CLASSES = 101  # Not divisible by 8: padded to 104 on 8 model shards.
BATCH = 16
EMBEDDING = 24
MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))


def make_config():
  config = common.get_base_config()
  config.model.name = "custom"
  config.model.stage_units = (1, 1)
  config.model.stage_widths = (4, 8)
  config.model.embedding_size = EMBEDDING
  config.head.num_classes = NUM_CLASSES
  config.data.batch_size = BATCH
  return config


def make_batches(steps):
  rng = np.random.default_rng(0)
  return [{"image": rng.integers(0, 256, (BATCH, 112, 112, 3), np.uint8),
           "label": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)}
          for _ in range(steps)]


def reference_run(config, batches, tx, lr_fn, rng):
  """Single device, the plain MarginHead and cross-entropy: the baseline."""
  model = model_lib.create_model(config, NUM_CLASSES)
  state = train_lib.create_train_state(model, tx, jax.random.key(0), 112)
  initial = state

  @jax.jit
  def step(state, batch):
    step_rng = jax.random.fold_in(rng, state.step)
    dropout_rng, _ = jax.random.split(step_rng)

    def loss_fn(params):
      (logits, aux), new_model_state = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats},
          batch["image"], batch["label"], train=True,
          mutable=["batch_stats"], rngs={"dropout": dropout_rng})
      return heads.cross_entropy_loss(logits, batch["label"]), (
          new_model_state, aux)

    (loss, (new_model_state, aux)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(
        grads=grads, batch_stats=new_model_state["batch_stats"])
    return new_state, loss, grads

  states, losses, grads = [state], [], []
  for batch in batches:
    state, loss, g = step(state, batch)
    states.append(state)
    losses.append(loss)
    grads.append(g)
  del lr_fn, initial
  return jax.device_get(states), losses, grads


def pad_classes(tree, columns):
  """Pads every classifier leaf of a host tree to `columns` classes."""
  def pad(path, x):
    if sharding_lib.is_classifier_leaf(path) and np.ndim(x) == 2:
      extra = columns - x.shape[1]
      return np.pad(np.asarray(x), ((0, 0), (0, extra)), constant_values=1.0)
    return x
  return jax.tree_util.tree_map_with_path(pad, tree)


def unpad(tree):
  def cut(path, x):
    x = np.asarray(x)
    if sharding_lib.is_classifier_leaf(path) and x.ndim == 2:
      return x[:, :NUM_CLASSES]
    return x
  return jax.tree_util.tree_map_with_path(cut, jax.device_get(tree))


def max_relative(a_tree, b_tree):
  """Largest |a - b| over a tensor group, relative to the group's largest
  |b| (gradients that vanish in theory, such as biases in front of a
  BatchNorm, are float noise and would make per-leaf ratios meaningless)."""
  a_leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(a_tree)]
  b_leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(b_tree)]
  assert len(a_leaves) == len(b_leaves)
  scale = max(max(np.max(np.abs(b)) for b in b_leaves), 1e-30)
  return max(float(np.max(np.abs(a - b))) for a, b in zip(a_leaves, b_leaves)
             ) / scale


def sharded_run(config, mesh_shape, reference_states, batches, tx, lr_fn,
                rng):
  """Each step starts from the reference's state before that step, so the
  comparison measures one step's error, not chaos accumulated over steps
  (a parameter change of 1e-7 can flip a PReLU input across zero)."""
  config.mesh.data, config.mesh.model = mesh_shape
  mesh = sharding_lib.create_mesh(config.mesh)
  columns = sharding_lib.padded_class_count(NUM_CLASSES, mesh)
  model = model_lib.create_model(config, columns)
  template = train_lib.create_train_state(
      model, tx, jax.random.key(0), 112, mesh)
  shardings = sharding_lib.state_shardings(template, mesh)
  margin_loss = train_lib.create_margin_loss(
      config, NUM_CLASSES, BATCH).loss_fn(mesh)
  grad_fn = jax.jit(lambda s, b, r: train_lib.loss_and_grads(
      s, b, jax.random.fold_in(r, s.step), margin_loss))
  step_fn = train_lib.compile_train_step(lr_fn, margin_loss, mesh, template)

  states, losses, grads = [], [], []
  for host, batch in zip(reference_states, batches):
    host = pad_classes(host, columns)
    state = jax.device_put(
        template.replace(step=host.step, params=host.params,
                         batch_stats=host.batch_stats,
                         opt_state=host.opt_state), shardings)
    global_batch = sharding_lib.global_batch(batch, mesh)
    _, g, _, _ = grad_fn(state, global_batch, rng)
    grads.append(unpad(g))
    state, metrics = step_fn(state, global_batch, rng)
    states.append(unpad(state))
    losses.append(metrics["loss"])
  return states, state, losses, grads, step_fn, global_batch


def collectives_with_classes(step_fn, state, batch, rng):
  """Collective ops of the compiled step whose shapes mention the class
  count (padded or not)."""
  text = step_fn.lower(state, batch, rng).compile().as_text()
  found, offending = [], []
  pattern = re.compile(
      r"= (\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|"
      r"collective-permute)(-start)?\(")
  for line in text.splitlines():
    match = pattern.search(line)
    if not match:
      continue
    found.append(match.group(2))
    dims = [int(d) for d in re.findall(r"\d+", match.group(1))]
    if NUM_CLASSES in dims or 104 in dims:
      offending.append(line.strip()[:200])
  return found, offending


def restore_across_meshes(config, tx, final_host):
  """Saves on (8, 1), restores on (2, 4) and on a single device.

  Returns the largest absolute difference of any restored (unpadded) array
  and the kernel shard shapes seen.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  from adaface_jax import checkpointing  # pylint: disable=g-import-not-at-top

  def state_on(mesh_shape, devices=None):
    config.mesh.data, config.mesh.model = mesh_shape
    mesh = sharding_lib.create_mesh(config.mesh, devices)
    columns = sharding_lib.padded_class_count(NUM_CLASSES, mesh)
    model = model_lib.create_model(config, columns)
    return train_lib.create_train_state(
        model, tx, jax.random.key(1), 112, mesh), columns

  workdir = tempfile.mkdtemp()
  saved, columns = state_on((8, 1))
  host = pad_classes(final_host, columns)
  saved = jax.device_put(
      saved.replace(step=host.step, params=host.params,
                    batch_stats=host.batch_stats, opt_state=host.opt_state),
      sharding_lib.state_shardings(saved, sharding_lib.create_mesh(
          config.mesh)))
  manager = checkpointing.create_manager(workdir, 2)
  checkpointing.save(manager, saved, None)
  manager.wait_until_finished()

  worst, shapes = 0.0, {}
  for mesh_shape, devices in (((2, 4), None), ((1, 1), jax.devices()[:1])):
    template, _ = state_on(mesh_shape, devices)
    restored = checkpointing.restore(manager, template, None, NUM_CLASSES)
    shapes[str(mesh_shape)] = list(
        restored.params["head"]["kernel"].addressable_shards[0].data.shape)
    for a, b in zip(jax.tree.leaves(unpad(restored)),
                    jax.tree.leaves(final_host)):
      worst = max(worst, float(np.max(np.abs(
          np.asarray(a, np.float64) - np.asarray(b, np.float64)))))
  return worst, shapes


def main():
  config = make_config()
  durations = optim.Durations(10, 10, 0, ())
  lr_fn = optim.create_learning_rate_fn(0.1, durations, 0.1)
  tx = optim.create_optimizer(config.optimizer, lr_fn)
  rng = jax.random.key(7)
  batches = make_batches(ARGS.steps)
  ref_states, ref_losses, ref_grads = reference_run(
      config, batches, tx, lr_fn, rng)
  ref_grads = jax.device_get(ref_grads)

  report = {"devices": jax.device_count(), "meshes": {}}
  for mesh_shape in MESHES:
    states, state, losses, grads, step_fn, last_batch = sharded_run(
        config.copy_and_resolve_references(), mesh_shape, ref_states[:-1],
        batches, tx, lr_fn, rng)
    worst = lambda fn: max(fn(a, b) for a, b in zip(states, ref_states[1:]))
    report["meshes"][str(mesh_shape)] = {
        "loss": max_relative(losses, ref_losses),
        "grads": max(max_relative(a, b) for a, b in zip(grads, ref_grads)),
        "params": worst(lambda a, b: max_relative(a.params, b.params)),
        "momentum": worst(lambda a, b: max_relative(a.opt_state, b.opt_state)),
        "backbone_batch_stats": worst(lambda a, b: max_relative(
            a.batch_stats["backbone"], b.batch_stats["backbone"])),
        "adaface_stats": worst(lambda a, b: max_relative(
            a.batch_stats["head"], b.batch_stats["head"])),
        "kernel_shard_shape": list(
            state.params["head"]["kernel"].addressable_shards[0].data.shape),
    }
    if mesh_shape == (1, 8):
      found, offending = collectives_with_classes(
          step_fn, state, last_batch, rng)
      report["collectives"] = sorted(set(found))
      report["collectives_with_class_dim"] = offending
  config.mesh.data, config.mesh.model = -1, 1
  worst, shapes = restore_across_meshes(config, tx, ref_states[-1])
  report["restore_max_abs_diff"] = worst
  report["restore_kernel_shard_shapes"] = shapes
  print(json.dumps(report))


if __name__ == "__main__":
  main()
