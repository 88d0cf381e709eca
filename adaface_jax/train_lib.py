"""Training: the train state, one jitted step, and the loop around it."""

import collections
import dataclasses
import functools
import os
import signal
import time
from typing import Any

from absl import logging
from flax.training import train_state as train_state_lib
import grain
import jax
import jax.numpy as jnp
import ml_collections
import optax

from adaface_jax import checkpointing
from adaface_jax import classifier
from adaface_jax import distributed
from adaface_jax import eval_lib
from adaface_jax import heads
from adaface_jax import model as model_lib
from adaface_jax import optim
from adaface_jax import reporting
from adaface_jax import sharding as sharding_lib
from data_pipeline import augment
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
                       image_size: int,
                       mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """Initialises parameters, statistics and optimizer state.

  With a mesh, the state is born sharded (`sharding.state_shardings`): the
  classifier kernel and its optimizer state split along classes.
  """

  def init(rng):
    variables = model_lib.init_variables(model, rng, image_size)
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx,
        batch_stats=variables["batch_stats"])
  if mesh is None:
    return jax.jit(init)(rng)
  shardings = sharding_lib.state_shardings(jax.eval_shape(init, rng), mesh)
  return jax.jit(init, out_shardings=shardings)(rng)


def create_margin_loss(config: ml_collections.ConfigDict, num_classes: int,
                       global_batch_size: int) -> classifier.MarginSoftmax:
  """The classifier loss that `config.head` describes."""
  head = config.head
  num_sampled = head.num_sampled_classes
  if 0 < num_sampled < global_batch_size:
    raise ValueError(
        f"head.num_sampled_classes={num_sampled} must be 0 (no sampling) or "
        f"at least the global batch ({global_batch_size}), so that every "
        "positive class of a batch is kept")
  return classifier.MarginSoftmax(
      kind=head.name, num_classes=num_classes, m=head.m, h=head.h, s=head.s,
      t_alpha=head.t_alpha, per_device_norm_stats=head.per_device_norm_stats,
      num_sampled=num_sampled)


def _head_stats(batch_stats) -> dict[str, jax.Array]:
  """AdaFace's running statistics, or zeros for heads without them."""
  if "head" in batch_stats:
    return batch_stats["head"]
  zero = jnp.zeros((1,), jnp.float32)
  return {"batch_mean": zero, "batch_std": zero}


def loss_and_grads(state: TrainState, batch: dict[str, jax.Array],
                   rng: jax.Array, margin_loss):
  """Loss, gradients w.r.t. the params, and the step's side outputs.

  Args:
    state: the current train state.
    batch: "image" [batch, s, s, 3] uint8 BGR, "label" [batch] int32.
    rng: per-step key (dropout, class sampling).
    margin_loss: the (sharded) classifier loss, `MarginSoftmax.loss_fn`.

  Returns:
    loss, grads, new batch_stats (backbone BN and AdaFace statistics) and a
    dict of auxiliary outputs.
  """
  dropout_rng, sample_rng = jax.random.split(rng)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    (embeddings, feature_norms), new_model_state = state.apply_fn(
        variables, batch["image"], train=True, method="embed",
        mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    loss, aux = margin_loss(
        embeddings, feature_norms, batch["label"], params["head"]["kernel"],
        _head_stats(state.batch_stats), sample_rng)
    return loss, (new_model_state["batch_stats"], aux, feature_norms)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (batch_stats, aux, feature_norms)), grads = grad_fn(state.params)
  batch_stats = dict(batch_stats)
  if "head" in batch_stats:
    batch_stats["head"] = aux["norm_stats"]
  return loss, grads, batch_stats, dict(aux, feature_norms=feature_norms)


def train_step(state: TrainState, batch: dict[str, jax.Array],
               rng: jax.Array, learning_rate_fn: optax.Schedule,
               margin_loss):
  """One SGD update on a batch.

  Args:
    state: the current train state (donated).
    batch: "image" [batch, s, s, 3] uint8 BGR, "label" [batch] int32.
    rng: the run's base key; the step is folded in.
    learning_rate_fn: the schedule, for logging the rate used.
    margin_loss: the classifier loss (`MarginSoftmax.loss_fn(mesh)`).

  Returns:
    The new state and a dict of scalar metrics (still on device).
  """
  step_rng = jax.random.fold_in(rng, state.step)
  loss, grads, batch_stats, aux = loss_and_grads(
      state, batch, step_rng, margin_loss)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)

  feature_norms = aux["feature_norms"]
  metrics = {
      "loss": loss,
      "accuracy": aux["accuracy"],
      "lr": learning_rate_fn(state.step),
      "feature_norm_mean": jnp.mean(feature_norms),
      "feature_norm_std": jnp.std(feature_norms, ddof=1),
      "grad_norm": optim.tree_l2_norm(grads),
      "param_norm": optim.tree_l2_norm(new_state.params),
  }
  if "head" in state.batch_stats:  # Only AdaFace keeps norm statistics.
    metrics["norm_ema_mean"] = jnp.squeeze(batch_stats["head"]["batch_mean"])
    metrics["norm_ema_std"] = jnp.squeeze(batch_stats["head"]["batch_std"])
    metrics["margin_scaler_mean"] = aux["margin_scaler"]
  return new_state, metrics


def compile_train_step(learning_rate_fn, margin_loss, mesh, abstract_state):
  """jit of `train_step` with the mesh's shardings, the state donated.

  On CPU it compiles with `CPU_COMPILER_OPTIONS`.
  """
  state_shardings = sharding_lib.state_shardings(abstract_state, mesh)
  replicated = sharding_lib.replicated(mesh)
  return jax.jit(
      functools.partial(train_step, learning_rate_fn=learning_rate_fn,
                        margin_loss=margin_loss),
      in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh),
                    replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,),
      compiler_options=compiler_options(mesh))


# XLA:CPU options of the project's compiled steps. This JAX release's CPU
# compiler hands convolutions, dots and reductions to YNNPACK. For the
# IR-ResNet's convolution weight gradients (a 3x3 output window whose
# "kernel" is a whole feature map) YNNPACK runs 2-3x slower than XLA's Eigen
# convolutions, and those gradients dominated the CPU train step. Listing
# the YNNPACK fusion types without INDIVIDUAL_CONVOLUTION leaves every
# convolution to Eigen and keeps YNNPACK for dots and reductions, where it
# beats XLA's own loops. The compiled program is the one that
# XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution
# gives, but scoped to these steps. CPU compilations only; an XLA that does
# not know the option compiles without it (with a warning).
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


def compiler_options(mesh: jax.sharding.Mesh) -> dict[str, str] | None:
  """XLA options for a step compiled for `mesh`'s devices: on CPU,
  `CPU_COMPILER_OPTIONS` when the installed XLA accepts them; else None."""
  if mesh.devices.flat[0].platform != "cpu" or not _cpu_options_accepted():
    return None
  return dict(CPU_COMPILER_OPTIONS)


@functools.cache
def _cpu_options_accepted() -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(
        jax.ShapeDtypeStruct((), jnp.float32)).compile()
  except jax.errors.JaxRuntimeError as e:
    logging.warning("XLA does not accept %s (%s); compiling without them",
                    CPU_COMPILER_OPTIONS, e)
    return False
  return True


def enable_compilation_cache(cache_dir: str) -> None:
  """Keeps compiled programs in `cache_dir` (created) across processes.

  A rerun or resume with the same model, shapes, devices and JAX version
  loads the train step from there instead of compiling it. Programs are
  cached whatever their compile time. "" leaves JAX's setting as it is.
  """
  if not cache_dir:
    return
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def with_remat(model: model_lib.FaceRecognitionModel,
               stages) -> model_lib.FaceRecognitionModel:
  """The model with the backbone stages `stages` rematerialised.

  Raises:
    ValueError: naming `model.remat` when a stage does not exist.
  """
  stages = tuple(int(s) for s in stages)
  num_stages = len(model.backbone.stage_units)
  if any(not 0 <= s < num_stages for s in stages):
    raise ValueError(
        f"model.remat={stages} names stages outside 0..{num_stages - 1}")
  if not stages:
    return model
  return model.clone(backbone=model.backbone.clone(remat_stages=stages))


class CompileOnFirstCall:
  """A jitted function compiled ahead of its first call, the time logged.

  Later calls go straight to the compiled executable, so a changed input
  shape or sharding is an error instead of a silent recompilation.
  """

  def __init__(self, jitted, name: str, log=logging.info):
    self._jitted = jitted
    self._name = name
    self._log = log
    self._compiled = None
    self.compile_seconds = None

  def __call__(self, *args):
    if self._compiled is None:
      start = time.perf_counter()
      self._compiled = self._jitted.lower(*args).compile()
      self.compile_seconds = time.perf_counter() - start
      cache_dir = jax.config.jax_compilation_cache_dir
      cache = f"; compilation cache {cache_dir}" if cache_dir else ""
      self._log(f"Compiled the {self._name} in {self.compile_seconds:.1f} s"
                f"{cache}")
    return self._compiled(*args)


class DevicePrefetch(grain.DatasetIterator):
  """Host batches turned into global device arrays `size` steps ahead.

  The transfer of the next batches then overlaps the running step. Keys in
  `host_keys` stay host numpy. The checkpointed state is that of the last
  batch handed out, not of the ones waiting, so a resume neither skips nor
  repeats data.
  """

  def __init__(self, parent: grain.DatasetIterator, mesh: jax.sharding.Mesh,
               size: int, host_keys=()):
    super().__init__(parent)
    self._mesh = mesh
    self._size = max(int(size), 0)
    self._host_keys = tuple(host_keys)
    self._queue = collections.deque()
    self._state = parent.get_state()

  def _put(self, host_batch: dict) -> dict:
    device = {k: v for k, v in host_batch.items() if k not in self._host_keys}
    batch = sharding_lib.global_batch(device, self._mesh)
    batch.update({k: host_batch[k] for k in self._host_keys
                  if k in host_batch})
    return batch

  def __next__(self) -> dict:
    while len(self._queue) <= self._size:
      batch = self._put(next(self._parent))
      self._queue.append((batch, self._parent.get_state()))
    batch, self._state = self._queue.popleft()
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._state

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)
    self._queue.clear()
    self._state = state


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
    logging.warning("Stop requested: stopping at the next safe point, with "
                    "a checkpoint once training has begun (signal again to "
                    "stop at once)")

  def stop_if_requested(self, stage: str) -> None:
    """Raises KeyboardInterrupt when a stop came before `stage` began.

    A signal raised as an exception would stop the set-up anywhere, XLA's
    compiler threads included, which then crash the exiting interpreter;
    set-up runs to the next of these points instead.
    """
    if self.requested:
      raise KeyboardInterrupt(f"stopped before {stage}")

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
  """Trains (or resumes training) in `workdir` and returns the final state.

  SIGINT and SIGTERM stop it cleanly from the start: during set-up at the
  next stage, during training after the step in progress, with a
  checkpoint (see `_StopRequest`).
  """
  with _StopRequest() as stop:
    return _train(config, workdir, stop)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails on settings that cannot train, before anything is written.

  Raises:
    ValueError: naming the field and the value.
  """
  for field in ("data.batch_size", "logging.log_every_steps",
                "checkpoint.every_steps"):
    section, name = field.split(".")
    value = config[section][name]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{field}={value!r} must be a positive integer")
  if config.head.name not in heads.HEAD_KINDS:
    raise ValueError(f"unknown head.name {config.head.name!r}; choose one "
                     f"of {heads.HEAD_KINDS}")
  if config.data.corrupt_records not in pipeline.CORRUPT_RECORDS:
    raise ValueError(
        f"data.corrupt_records={config.data.corrupt_records!r}; choose one "
        f"of {pipeline.CORRUPT_RECORDS}")
  model_lib.create_backbone(config.model)  # Raises on unknown names, shapes.


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run's train step is built from."""

  mesh: jax.sharding.Mesh
  durations: optim.Durations
  learning_rate_fn: optax.Schedule
  state: TrainState  # Initial, sharded over `mesh`.
  margin_loss: Any  # (params, embeddings, norms, labels, stats) -> loss.


def create_setup(config: ml_collections.ConfigDict, num_examples: int,
                 num_classes: int, init_rng: jax.Array) -> Setup:
  """The mesh, schedule, initial state and loss of a run.

  Args:
    config: the run's config.
    num_examples: images in one epoch of the data (for the schedule).
    num_classes: identities; the kernel gets equal class blocks per device,
      padding columns masked out of the softmax.
    init_rng: key of the parameters' initialisation.
  """
  mesh = sharding_lib.create_mesh(config.mesh)
  if config.data.batch_size % mesh.size:
    raise ValueError(
        f"data.batch_size={config.data.batch_size} is not divisible by the "
        f"{mesh.size} devices of the mesh")
  durations = optim.resolve_durations(
      config.schedule, num_examples, config.data.batch_size)
  learning_rate_fn = optim.create_learning_rate_fn(
      config.optimizer.lr, durations, config.schedule.lr_decay_factor)

  model = model_lib.create_model(
      config, sharding_lib.padded_class_count(num_classes, mesh))
  model = with_remat(model, config.model.remat)
  tx = optim.create_optimizer(config.optimizer, learning_rate_fn)
  state = create_train_state(model, tx, init_rng, config.data.image_size,
                             mesh)
  margin_loss = create_margin_loss(
      config, num_classes, config.data.batch_size).loss_fn(mesh)
  return Setup(mesh, durations, learning_rate_fn, state, margin_loss)


def _train(config: ml_collections.ConfigDict, workdir: str,
           stop: _StopRequest) -> TrainState:
  check_config(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise FileExistsError(f"--workdir {workdir!r} is a file, not a folder")
  new_workdir = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  enable_compilation_cache(config.compilation_cache_dir)
  try:
    index = builder.build_train_index(config.data, workdir)
  except (sources.DataError, FileNotFoundError, ValueError):
    # Refused data: leave no empty run folder behind.
    if new_workdir and not os.listdir(workdir):
      os.rmdir(workdir)
    raise
  stop.stop_if_requested("building the model")
  num_classes = resolve_num_classes(config, index)
  # Recorded in config.json, so conversion and evaluation know the real
  # count when the config said 0 (from the data).
  config = config.copy_and_resolve_references()
  config.head.num_classes = num_classes

  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  setup = create_setup(config, len(index), num_classes, init_rng)
  mesh, durations, state = setup.mesh, setup.durations, setup.state
  process_count = jax.process_count()
  local_batch_size = config.data.batch_size // process_count

  worker_count = config.data.worker_count
  if worker_count < 0:
    worker_count = pipeline.default_worker_count()
  dataset = pipeline.make_train_dataset(
      index, batch_size=local_batch_size, seed=config.seed,
      image_size=config.data.image_size, alignment=config.data.alignment,
      random_flip=config.data.random_flip, worker_count=worker_count,
      shard_index=jax.process_index(), shard_count=process_count,
      augmentation=augment.from_config(config.data),
      corrupt_records=config.data.corrupt_records)
  data_iterator = iter(dataset)

  manager = checkpointing.create_manager(
      workdir, config.checkpoint.max_to_keep)
  state = checkpointing.restore(manager, state, data_iterator, num_classes)
  start_step = int(jax.device_get(state.step))
  stop.stop_if_requested(f"training step {start_step + 1}")
  if distributed.is_primary():
    write_config(config, workdir, start_step)

  reporter = reporting.Reporter(
      workdir, durations, config.data.batch_size,
      show_progress=config.logging.progress_bar,
      enabled=distributed.is_primary())
  reporter.describe_run(config, index, num_classes, state, start_step, mesh)

  p_train_step = CompileOnFirstCall(
      compile_train_step(setup.learning_rate_fn, setup.margin_loss, mesh,
                         state),
      "train step", reporter.message)
  data_iterator = DevicePrefetch(
      data_iterator, mesh, config.data.device_prefetch,
      host_keys=(pipeline.SKIPPED_RECORDS_KEY,))
  state = _run_loop(config, state, data_iterator, p_train_step, step_rng,
                    manager, reporter, start_step, durations.total_steps,
                    stop)
  manager.wait_until_finished()
  manager.close()
  reporter.close()
  return state


def _run_loop(config, state, data_iterator, p_train_step, step_rng, manager,
              reporter, start_step, total_steps, stop):
  """Steps from `start_step` to `total_steps`, logging and checkpointing;
  stops with a checkpoint after the step in progress when `stop` is
  requested."""
  log_every = config.logging.log_every_steps
  ckpt_every = config.checkpoint.every_steps
  pending_metrics = []
  step = start_step
  logged_skipped = 0
  evaluator = eval_lib.TrainingEvaluator(
      config, os.path.dirname(os.fspath(manager.directory)))
  for step in range(start_step + 1, total_steps + 1):
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      # Already global device arrays (`DevicePrefetch`).
      batch = next(data_iterator)
      # Corrupt records left out so far (this process, a host array); the
      # iterator's checkpointed state keeps the count.
      skipped_records = int(batch.pop(pipeline.SKIPPED_RECORDS_KEY)[-1])
      state, metrics = p_train_step(state, batch, step_rng)
    pending_metrics.append(metrics)
    reporter.tick(step)

    if step % log_every == 0 or step == total_steps or stop.requested:
      # The only host synchronisation of the loop.
      logged = [dict(m, skipped_records=skipped_records)
                for m in jax.device_get(pending_metrics)]
      reporter.log_train(step, logged)
      if skipped_records > logged_skipped:
        reporter.message(f"{skipped_records} corrupt records skipped so far")
        logged_skipped = skipped_records
      pending_metrics = []
    if step % ckpt_every == 0 or step == total_steps or stop.requested:
      checkpointing.save(manager, state, data_iterator)
    if not stop.requested and evaluator.is_due(step):
      # Before the next step donates the state's buffers. The steps in
      # flight count as training time; the evaluation's own does not.
      jax.block_until_ready(state)
      with reporter.paused():
        evaluator.maybe_evaluate(step, state, reporter.message)
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
  if not config.eval.after_training:
    return {}
  if jax.process_count() > 1:
    # TODO: evaluate across processes; each one would need the same
    # checkpoint reads and only the first should write reports.
    logging.warning("Skipping the evaluation after training with %d "
                    "processes; run eval.py in one process.",
                    jax.process_count())
    return {}
  return eval_lib.evaluate(config, workdir)
