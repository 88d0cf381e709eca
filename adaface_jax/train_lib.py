"""Training: the train state, one jitted step, and the loop around it."""

import functools
import os
import signal
from typing import Any

from absl import logging
from flax.training import train_state as train_state_lib
import jax
import jax.numpy as jnp
import ml_collections
import optax

from adaface_jax import checkpointing
from adaface_jax import eval_lib
from adaface_jax import heads
from adaface_jax import model as model_lib
from adaface_jax import optim
from adaface_jax import reporting
from data_pipeline import builder
from data_pipeline import pipeline
from data_pipeline import sources


class TrainState(train_state_lib.TrainState):
  """Params, optimizer state and step, plus the mutable `batch_stats`.

  `batch_stats` holds the backbone's BatchNorm running statistics under
  `backbone` and AdaFace's running feature-norm mean/std under `head`.
  """

  batch_stats: Any


def create_train_state(model: model_lib.FaceRecognitionModel,
                       tx: optax.GradientTransformation, rng: jax.Array,
                       image_size: int) -> TrainState:
  """Initialises parameters, statistics and optimizer state on device."""

  @jax.jit
  def init(rng):
    variables = model_lib.init_variables(model, rng, image_size)
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx,
        batch_stats=variables["batch_stats"])
  return init(rng)


def train_step(state: TrainState, batch: dict[str, jax.Array],
               rng: jax.Array, learning_rate_fn: optax.Schedule):
  """One SGD update on a batch.

  Args:
    state: the current train state (donated).
    batch: "image" [batch, s, s, 3] uint8 BGR, "label" [batch] int32.
    rng: the run's base key; the step is folded in for dropout.
    learning_rate_fn: the schedule, for logging the rate used.

  Returns:
    The new state and a dict of scalar metrics (still on device).
  """
  dropout_rng = jax.random.fold_in(rng, state.step)
  labels = batch["label"]

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    (logits, aux), new_model_state = state.apply_fn(
        variables, batch["image"], labels, train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    loss = heads.cross_entropy_loss(logits, labels)
    return loss, (new_model_state, logits, aux)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (new_model_state, logits, aux)), grads = grad_fn(state.params)
  new_state = state.apply_gradients(
      grads=grads, batch_stats=new_model_state["batch_stats"])

  feature_norms = aux["feature_norms"]
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
      "lr": learning_rate_fn(state.step),
      "feature_norm_mean": jnp.mean(feature_norms),
      "feature_norm_std": jnp.std(feature_norms, ddof=1),
      "grad_norm": optim.tree_l2_norm(grads),
      "param_norm": optim.tree_l2_norm(new_state.params),
  }
  if "head" in state.batch_stats:  # Only AdaFace keeps norm statistics.
    metrics["norm_ema_mean"] = jnp.squeeze(aux["batch_mean"])
    metrics["norm_ema_std"] = jnp.squeeze(aux["batch_std"])
  return new_state, metrics


def resolve_num_classes(config: ml_collections.ConfigDict,
                        index: sources.FaceIndex) -> int:
  """head.num_classes, or the data's identity count when it is 0."""
  if config.head.num_classes < 0:
    raise ValueError(
        f"head.num_classes={config.head.num_classes} must be >= 0")
  num_classes = config.head.num_classes or index.num_identities
  sources.check_num_classes(index, num_classes)
  if num_classes > index.num_identities:
    logging.warning(
        "head.num_classes=%d but the data has %d identities; the extra "
        "classes only ever act as negatives", num_classes,
        index.num_identities)
  return num_classes


class _StopRequest:
  """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so an
  interrupted run saves a checkpoint instead of dying mid-write."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread: leave signals alone.
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # A second signal stops at once.
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      raise KeyboardInterrupt
    self.requested = True
    logging.warning("Stop requested: saving a checkpoint after this step "
                    "(signal again to stop at once)")

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def write_config(config: ml_collections.ConfigDict, workdir: str,
                 step: int) -> None:
  """Records the run's config; an earlier different one is kept as is."""
  path = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    path = os.path.join(workdir, f"config.step{step}.json")
    logging.warning("The config differs from the one this workdir started "
                    "with; recording it as %s", path)
  with open(path, "w") as f:
    f.write(text)


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes training) in `workdir` and returns the final state."""
  os.makedirs(workdir, exist_ok=True)
  index = builder.build_train_index(config.data, workdir)
  num_classes = resolve_num_classes(config, index)

  process_count = jax.process_count()
  if config.data.batch_size % process_count:
    raise ValueError(
        f"data.batch_size={config.data.batch_size} is not divisible by the "
        f"{process_count} processes")
  local_batch_size = config.data.batch_size // process_count
  durations = optim.resolve_durations(
      config.schedule, len(index), config.data.batch_size)
  learning_rate_fn = optim.create_learning_rate_fn(
      config.optimizer.lr, durations, config.schedule.lr_decay_factor)

  model = model_lib.create_model(config, num_classes)
  tx = optim.create_optimizer(config.optimizer, learning_rate_fn)
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  state = create_train_state(model, tx, init_rng, config.data.image_size)

  worker_count = config.data.worker_count
  if worker_count < 0:
    worker_count = pipeline.default_worker_count()
  dataset = pipeline.make_train_dataset(
      index, batch_size=local_batch_size, seed=config.seed,
      image_size=config.data.image_size, alignment=config.data.alignment,
      random_flip=config.data.random_flip, worker_count=worker_count,
      shard_index=jax.process_index(), shard_count=process_count)
  data_iterator = iter(dataset)

  manager = checkpointing.create_manager(
      workdir, config.checkpoint.max_to_keep)
  state = checkpointing.restore(manager, state, data_iterator)
  start_step = int(jax.device_get(state.step))
  write_config(config, workdir, start_step)

  reporter = reporting.Reporter(
      workdir, durations, config.data.batch_size,
      show_progress=config.logging.progress_bar)
  reporter.describe_run(config, index, num_classes, state, start_step)

  p_train_step = jax.jit(
      functools.partial(train_step, learning_rate_fn=learning_rate_fn),
      donate_argnums=(0,))
  state = _run_loop(config, state, data_iterator, p_train_step, step_rng,
                    manager, reporter, start_step, durations.total_steps)
  manager.wait_until_finished()
  manager.close()
  reporter.close()
  return state


def _run_loop(config, state, data_iterator, p_train_step, step_rng, manager,
              reporter, start_step, total_steps):
  """Steps from `start_step` to `total_steps`, logging and checkpointing."""
  log_every = config.logging.log_every_steps
  ckpt_every = config.checkpoint.every_steps
  pending_metrics = []
  step = start_step
  with _StopRequest() as stop:
    for step in range(start_step + 1, total_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = jax.device_put(next(data_iterator))
        state, metrics = p_train_step(state, batch, step_rng)
      pending_metrics.append(metrics)
      reporter.tick(step)

      if step % log_every == 0 or step == total_steps or stop.requested:
        # The only host synchronisation of the loop.
        reporter.log_train(step, jax.device_get(pending_metrics))
        pending_metrics = []
      if step % ckpt_every == 0 or step == total_steps or stop.requested:
        checkpointing.save(manager, state, data_iterator)
      if stop.requested:
        manager.wait_until_finished()
        reporter.message(f"Stopped at step {step}; rerun the same command "
                         "to resume.")
        raise KeyboardInterrupt(f"training stopped at step {step}")
  if start_step >= total_steps:
    reporter.message(
        f"Nothing to train: the checkpoint is at step {start_step} of "
        f"{total_steps}.")
  return state


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains, then runs the configured verification set (if any)."""
  state = train(config, workdir)
  del state
  if config.eval.after_training:
    return eval_lib.evaluate(config, workdir)
  return {}
