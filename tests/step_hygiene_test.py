"""The train step compiles once, donates its state, never syncs the host,
and is fed device batches ahead of time; rematerialisation and the
persistent compilation cache work."""

import json
import os
import re
import subprocess
import sys
import textwrap

import chex
import grain
import jax
import numpy as np
import pytest

from adaface_jax import model as model_lib
from adaface_jax import optim
from adaface_jax import sharding as sharding_lib
from adaface_jax import train_lib
from configs import common

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 4
IMAGE_SIZE = 32  # Small faces keep the test fast.
NUM_CLASSES = 8


def _config(widths=(4, 8)):
  config = common.get_base_config()
  config.model.name = "custom"
  config.model.stage_units = (1, 1)
  config.model.stage_widths = widths
  config.model.embedding_size = 8
  config.head.num_classes = NUM_CLASSES
  config.data.batch_size = BATCH
  config.mesh.data = 1
  return config


def _setup(remat=(), widths=(4, 8)):
  config = _config(widths)
  mesh = sharding_lib.create_mesh(config.mesh, jax.devices()[:1])
  model = model_lib.create_model(config, NUM_CLASSES)
  model = train_lib.with_remat(model, remat)
  durations = optim.Durations(100, 100, 0, ())
  lr_fn = optim.create_learning_rate_fn(0.01, durations, 0.1)
  tx = optim.create_optimizer(config.optimizer, lr_fn)
  state = train_lib.create_train_state(model, tx, jax.random.key(0),
                                       IMAGE_SIZE, mesh)
  margin_loss = train_lib.create_margin_loss(
      config, NUM_CLASSES, BATCH).loss_fn(mesh)
  return state, lr_fn, margin_loss, mesh


def _host_batch(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3),
                                np.uint8),
          "label": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)}


def test_train_step_traces_once_and_donates_state(monkeypatch):
  state, lr_fn, margin_loss, mesh = _setup()
  monkeypatch.setattr(train_lib, "train_step",
                      chex.assert_max_traces(train_lib.train_step, n=1))
  step = train_lib.compile_train_step(lr_fn, margin_loss, mesh, state)

  for seed in range(3):  # New batch arrays each step, same shapes.
    batch = sharding_lib.global_batch(_host_batch(seed), mesh)
    previous = state
    state, _ = step(state, batch, jax.random.key(1))
    # Donated: the old state's buffers now belong to the new state.
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(previous.params))
  assert int(state.step) == 3


def test_cpu_train_step_leaves_convolutions_to_eigen():
  # CPU_COMPILER_OPTIONS keep YNNPACK off convolutions: no YNNPACK fusion
  # of the compiled step may contain one, while convolutions remain. (XLA
  # leaves convolutions of fewer than 32 channels to Eigen anyway.)
  state, lr_fn, margin_loss, mesh = _setup(widths=(32, 64))
  if mesh.devices.flat[0].platform != "cpu":
    pytest.skip("the options apply to CPU compilations only")
  step = train_lib.compile_train_step(lr_fn, margin_loss, mesh, state)
  batch = sharding_lib.global_batch(_host_batch(0), mesh)
  hlo = step.lower(state, batch, jax.random.key(1)).compile().as_text()

  bodies = {block.strip().split(" ", 1)[0].lstrip("%"): block
            for block in hlo.split("\n\n")}
  ynn_bodies = [
      bodies[re.search(r"calls=%([\w.\-]+)", line).group(1)]
      for line in hlo.splitlines()
      if "__ynn_fusion" in line and "calls=" in line]
  assert ynn_bodies  # YNNPACK still runs the reductions.
  assert " convolution(" in hlo
  assert not any(" convolution(" in body for body in ynn_bodies)


def test_steps_between_log_steps_never_read_back_to_host():
  state, lr_fn, margin_loss, mesh = _setup()
  step = train_lib.compile_train_step(lr_fn, margin_loss, mesh, state)
  batches = [sharding_lib.global_batch(_host_batch(s), mesh)
             for s in range(3)]
  pending = []
  # Any implicit device-to-host read (float(), int(), np.asarray of a
  # device array) inside this block raises.
  with jax.transfer_guard_device_to_host("disallow"):
    for batch in batches:
      state, metrics = step(state, batch, jax.random.key(1))
      pending.append(metrics)
  logged = jax.device_get(pending)  # The explicit read at a log step.
  assert len(logged) == 3 and np.isfinite(logged[-1]["loss"])


def test_compile_on_first_call_logs_once_and_refuses_new_shapes():
  messages = []
  fn = train_lib.CompileOnFirstCall(
      jax.jit(lambda x: x * 2), "doubler", messages.append)
  for _ in range(3):
    np.testing.assert_array_equal(fn(np.ones(3, np.float32)), 2.0)
  assert len(messages) == 1 and "Compiled the doubler in" in messages[0]
  assert fn.compile_seconds >= 0
  with pytest.raises(TypeError):
    fn(np.ones(4, np.float32))


def _records(count: int) -> grain.MapDataset:
  """Batches of two elements, every entry holding the batch number."""
  return grain.MapDataset.range(count).map(
      lambda i: {"image": np.full((2, 3, 3, 3), i, np.uint8),
                 "label": np.full(2, i, np.int32),
                 "skipped": np.full(2, i, np.int64)})


def test_device_prefetch_keeps_order_and_checkpoints_consumed_position():
  mesh = sharding_lib.create_mesh(_config().mesh, jax.devices()[:1])
  iterator = train_lib.DevicePrefetch(
      iter(_records(10).to_iter_dataset()), mesh, size=2,
      host_keys=("skipped",))
  first = [next(iterator) for _ in range(3)]
  assert [int(b["label"][0]) for b in first] == [0, 1, 2]
  assert isinstance(first[0]["image"], jax.Array)
  assert isinstance(first[0]["skipped"], np.ndarray)

  # Two more batches wait in the queue, but the state is after batch 2.
  state = iterator.get_state()
  plain = iter(_records(10).to_iter_dataset())
  for _ in range(3):
    next(plain)
  assert state == plain.get_state()

  restored = train_lib.DevicePrefetch(
      iter(_records(10).to_iter_dataset()), mesh, size=2)
  restored.set_state(state)
  assert int(next(restored)["label"][0]) == 3


def test_remat_gives_the_same_loss_and_gradients():
  batch = _host_batch(0)
  results = []
  for remat in ((), (0, 1)):
    state, _, margin_loss, mesh = _setup(remat)
    loss, grads, _, _ = jax.jit(train_lib.loss_and_grads, static_argnums=3)(
        state, sharding_lib.global_batch(batch, mesh), jax.random.key(1),
        margin_loss)
    results.append((loss, grads))
    jaxpr = str(jax.make_jaxpr(
        train_lib.loss_and_grads, static_argnums=3)(
            state, batch, jax.random.key(1), margin_loss))
    assert ("remat" in jaxpr or "checkpoint" in jaxpr) == bool(remat)

  (loss, grads), (remat_loss, remat_grads) = results
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_remat_of_a_missing_stage_is_named():
  model = model_lib.create_model(_config(), NUM_CLASSES)
  with pytest.raises(ValueError, match="model.remat"):
    train_lib.with_remat(model, (2,))


_CACHE_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import jax.numpy as jnp
    from adaface_jax import train_lib
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event.endswith("cache_hits")))
    train_lib.enable_compilation_cache(sys.argv[1])
    jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((16, 16))).block_until_ready()
    print("HITS", sum(hits))
""")


def test_compilation_cache_is_populated_and_reused(tmp_path):
  cache_dir = tmp_path / "xla_cache"

  def run():
    result = subprocess.run(
        [sys.executable, "-c", _CACHE_SCRIPT, str(cache_dir)], cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=300, check=True)
    return int(result.stdout.split("HITS")[-1])

  assert run() == 0
  entries = os.listdir(cache_dir)
  assert entries
  assert run() > 0  # The rerun loads the programs instead of compiling.
  assert sorted(os.listdir(cache_dir)) == sorted(entries)


def test_time_paused_for_evaluation_is_left_out_of_throughput(
    tmp_path, monkeypatch):
  """With a fake clock: 4 steps of 1 s, then 10 s paused (an in-training
  evaluation), then 4 more steps of 1 s: both intervals log 1 s a step."""
  from adaface_jax import reporting  # pylint: disable=g-import-not-at-top
  clock = [0.0]
  monkeypatch.setattr(reporting.time, "perf_counter", lambda: clock[0])
  reporter = reporting.Reporter(str(tmp_path), optim.Durations(8, 8, 0, ()),
                                global_batch_size=4, show_progress=False)
  metrics = [{"loss": 1.0, "accuracy": 0.5, "lr": 0.1,
              "feature_norm_mean": 20.0, "feature_norm_std": 1.0}]
  step = 0
  for interval in range(2):
    for _ in range(4):
      clock[0] += 1.0
      step += 1
      reporter.tick(step)
    reporter.log_train(step, metrics)
    if interval == 0:
      with reporter.paused():
        clock[0] += 10.0

  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  # The first tick starts the clock (compilation is timed apart): 3 steps in
  # the first interval, 4 in the second.
  assert [row["step_time_ms"] for row in rows] == [1000.0, 1000.0]
  assert rows[-1]["images_per_second"] == 4.0
