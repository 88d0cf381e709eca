"""Mixed precision: bfloat16 backbone compute, float32 everything else.

Tolerance. The backbone's activations lose all but 8 significant bits in
bfloat16 (relative spacing 2^-8, about 0.4%); the head recomputes the cosine
in float32. On the tiny network below the bf16 and float32 losses of the
same four steps (same initial weights, same batches, a small learning rate)
differ by at most about 0.1% of the loss; the test allows 1%.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaface_jax import classifier
from adaface_jax import model as model_lib
from adaface_jax import optim
from adaface_jax import sharding as sharding_lib
from adaface_jax import train_lib
from configs import common

LOSS_RTOL = 1e-2
NUM_STEPS = 4
BATCH = 8
NUM_CLASSES = 16
IMAGE_SIZE = 32  # Small faces keep the test fast.
# Small enough that four steps do not amplify rounding differences the way
# a chaotic large-rate trajectory would.
LEARNING_RATE = 0.001


def _config(dtype: str, num_classes: int = NUM_CLASSES):
  config = common.get_base_config()
  config.model.name = "custom"
  config.model.stage_units = (1, 1)
  config.model.stage_widths = (8, 16)
  config.model.embedding_size = 16
  config.model.dtype = dtype
  config.head.num_classes = num_classes
  config.data.batch_size = BATCH
  config.mesh.data = 1
  return config


def _setup(config):
  """(state, jitted step) of the project's train step for `config`."""
  mesh = sharding_lib.create_mesh(config.mesh, jax.devices()[:1])
  num_classes = config.head.num_classes
  model = model_lib.create_model(config, num_classes)
  durations = optim.Durations(100, 100, 0, ())
  lr_fn = optim.create_learning_rate_fn(LEARNING_RATE, durations, 0.1)
  tx = optim.create_optimizer(config.optimizer, lr_fn)
  state = train_lib.create_train_state(model, tx, jax.random.key(0),
                                       IMAGE_SIZE, mesh)
  margin_loss = train_lib.create_margin_loss(
      config, num_classes, BATCH).loss_fn(mesh)
  step = train_lib.compile_train_step(lr_fn, margin_loss, mesh, state)
  return state, step, mesh


def _batches(num_classes: int):
  rng = np.random.default_rng(0)
  for _ in range(NUM_STEPS):
    yield {"image": rng.integers(
        0, 256, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
           "label": rng.integers(0, num_classes, BATCH).astype(np.int32)}


def _train(dtype: str):
  """Losses of NUM_STEPS steps, the final state and the step function."""
  state, step, mesh = _setup(_config(dtype))
  losses = []
  for host_batch in _batches(NUM_CLASSES):
    batch = sharding_lib.global_batch(host_batch, mesh)
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  return np.array(losses), state, step, batch


@pytest.fixture(scope="module")
def runs():
  return {dtype: _train(dtype) for dtype in ("float32", "bfloat16")}


def test_bf16_and_float32_losses_agree_over_steps(runs):
  losses32, *_ = runs["float32"]
  losses16, *_ = runs["bfloat16"]
  assert np.all(np.isfinite(losses16))
  np.testing.assert_allclose(losses16, losses32, rtol=LOSS_RTOL)
  # The runs do differ: bf16 really computed something else.
  assert not np.array_equal(losses16, losses32)


def test_bf16_keeps_parameters_and_optimizer_state_float32(runs):
  _, state, _, _ = runs["bfloat16"]
  leaves = jax.tree.leaves((state.params, state.opt_state, state.batch_stats))
  floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)


def test_bf16_convolutions_run_in_bf16(runs):
  _, state, step, batch = runs["bfloat16"]
  hlo = step.lower(state, batch, jax.random.key(1)).as_text()
  convolutions = [line for line in hlo.splitlines()
                  if "stablehlo.convolution" in line]
  assert convolutions and all("bf16" in line for line in convolutions)


def _cosface_loss_numpy(embeddings, kernel, labels, m, s):
  """Mean CosFace cross-entropy in float64 with the margin at `labels`."""
  kernel = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
  cosine = np.clip(embeddings @ kernel, -1 + 1e-4, 1 - 1e-4)
  rows = np.arange(len(labels))
  cosine[rows, labels] -= m
  logits = s * cosine
  top = logits.max(axis=1, keepdims=True)
  log_sum = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
  return float(np.mean(log_sum - logits[rows, labels]))


def test_labels_above_float16_range_select_their_class():
  # 65,504 is float16's largest value and bf16 holds integers exactly only
  # up to 256: a label that went through a 16-bit float would land on a
  # neighbouring class and change the loss.
  num_classes = 70_000
  labels = np.array([65_505, 69_999, 65_761, 3], np.int32)
  rng = np.random.default_rng(1)
  embeddings = rng.normal(size=(4, 4))
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  kernel = rng.normal(size=(4, num_classes))
  kernel[:, labels] = embeddings.T

  mesh = sharding_lib.create_mesh(_config("bfloat16").mesh, jax.devices()[:1])
  head = classifier.MarginSoftmax(kind="cosface", num_classes=num_classes,
                                  m=0.4, s=64.0)
  stats = {"batch_mean": jnp.zeros((1,)), "batch_std": jnp.zeros((1,))}
  loss, _ = jax.jit(head.loss_fn(mesh))(
      jnp.asarray(embeddings, jnp.bfloat16).astype(jnp.float32),
      jnp.ones((4, 1)), jnp.asarray(labels), jnp.asarray(kernel, jnp.float32),
      stats, jax.random.key(0))

  embeddings_used = np.asarray(
      jnp.asarray(embeddings, jnp.bfloat16).astype(jnp.float32), np.float64)
  expected = _cosface_loss_numpy(embeddings_used, kernel, labels, 0.4, 64.0)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
  shifted = _cosface_loss_numpy(embeddings_used, kernel, labels - 1, 0.4, 64.)
  assert abs(shifted - expected) > 1.0


def test_labels_above_float16_range_in_bf16_model_logits():
  # The model path: a bfloat16 backbone, a 70,000-class AdaFace head. The
  # margin is applied at exactly the label's column.
  num_classes = 70_000
  config = _config("bfloat16", num_classes)
  config.model.embedding_size = 4
  model = model_lib.create_model(config, num_classes)
  variables = jax.jit(model_lib.init_variables, static_argnums=(0, 2))(
      model, jax.random.key(0), IMAGE_SIZE)
  images = np.random.default_rng(2).integers(
      0, 256, (4, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  labels = jnp.array([65_505, 69_999, 65_761, 3], jnp.int32)

  logits, _ = jax.jit(model.apply, static_argnames="train")(
      variables, images, labels, train=False)
  embeddings, _ = jax.jit(lambda v, x: model.apply(v, x, method=model.embed))(
      variables, images)
  kernel = variables["params"]["head"]["kernel"]
  kernel = kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True)
  plain = 64.0 * jnp.clip(embeddings @ kernel, -1 + 1e-3, 1 - 1e-3)

  assert logits.dtype == jnp.float32
  # Off the label, AdaFace only round-trips through acos/cos (~1e-5 * s).
  changed = np.argwhere(np.abs(np.asarray(logits - plain)) > 1e-2)
  np.testing.assert_array_equal(changed[:, 0], np.arange(4))
  np.testing.assert_array_equal(changed[:, 1], np.asarray(labels))
