"""Training logs: a console line per log step, a JSONL file and a progress bar.

The console line gives what a user watches: step, epoch, loss, learning
rate, throughput, step time, ETA and the AdaFace feature-norm statistics.
Every logged value also goes to `<workdir>/metrics.jsonl`.
"""

import contextlib
import datetime
import json
import logging as logging_std
import math
import os
import re
import sys
import time

from absl import logging
import jax
import numpy as np
import tqdm

from adaface_jax import optim


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  return str(datetime.timedelta(seconds=int(seconds)))


def parameter_count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


class Reporter:
  """Collects timing and metrics of one training run and writes them out."""

  def __init__(self, workdir: str, durations: optim.Durations,
               global_batch_size: int, show_progress: bool = True,
               enabled: bool = True):
    """`enabled=False` (processes other than the first) writes nothing."""
    self._enabled = enabled
    self._durations = durations
    self._global_batch_size = global_batch_size
    self._metrics_file = None
    if enabled:
      self._metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._bar = None
    if enabled and show_progress and sys.stderr.isatty():
      self._bar = tqdm.tqdm(total=durations.total_steps, unit="step",
                            dynamic_ncols=True, leave=False)
    self._loop_start = time.perf_counter()
    self._interval_start = None
    self._interval_steps = 0
    self._last_step = None

  def message(self, text: str) -> None:
    """A line for the user that does not break the progress bar."""
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      logging.info(text)

  def describe_run(self, config, index, num_classes, state, start_step,
                   mesh=None):
    """Logs once what is about to be trained."""
    d = self._durations
    params = state.params
    backbone = parameter_count(params.get("backbone", {}))
    head = parameter_count(params.get("head", {}))
    self.message(
        f"Data: {len(index)} images of {index.num_identities} identities "
        f"({config.data.kind}); head: {config.head.name} over {num_classes} "
        f"classes")
    self.message(
        f"Model: {config.model.name} backbone {backbone:,} parameters, head "
        f"{head:,}; devices: {jax.device_count()} "
        f"({jax.devices()[0].platform}), mesh "
        f"{dict(mesh.shape) if mesh is not None else '-'}, processes: "
        f"{jax.process_count()}")
    self.message(
        f"Schedule: {d.total_steps} steps of {self._global_batch_size} images "
        f"({d.steps_per_epoch} steps per epoch), lr boundaries at steps "
        f"{list(d.lr_boundaries_steps)}, warmup {d.warmup_steps} steps")
    if start_step:
      self.message(f"Resuming from step {start_step}.")
    if self._bar is not None:
      self._bar.update(start_step)
    self._start_step = start_step

  @contextlib.contextmanager
  def paused(self):
    """Leaves the time spent inside out of the throughput and ETA."""
    start = time.perf_counter()
    try:
      yield
    finally:
      if self._interval_start is not None:
        self._interval_start += time.perf_counter() - start

  def tick(self, step: int) -> None:
    """Called after each step is dispatched."""
    now = time.perf_counter()
    if self._interval_start is None:
      # The first step of a run includes compilation: time it apart.
      self.message(f"First step (compilation included) took "
                   f"{now - self._loop_start:.1f} s")
      self._interval_start = now
      self._interval_steps = 0
    else:
      self._interval_steps += 1
    self._last_step = step
    if self._bar is not None:
      self._bar.update(1)

  def log_train(self, step: int, metrics: list[dict]) -> None:
    """Averages the metrics since the last log step and writes them out.

    Raises:
      FloatingPointError: the loss or the feature norms stopped being
        finite somewhere in the logged steps.
    """
    now = time.perf_counter()
    summary = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
    summary["lr"] = float(metrics[-1]["lr"])
    if not all(math.isfinite(summary[k])
               for k in ("loss", "feature_norm_mean")):
      raise FloatingPointError(
          f"non-finite loss or feature norm between steps "
          f"{step - len(metrics) + 1} and {step}: {summary}")

    seconds_per_step = math.nan
    if self._interval_steps > 0:
      seconds_per_step = (now - self._interval_start) / self._interval_steps
    images_per_second = self._global_batch_size / seconds_per_step
    eta = optim.eta_seconds(self._durations.total_steps - step,
                            seconds_per_step)
    self._interval_start, self._interval_steps = now, 0

    epoch = optim.steps_to_epochs(step, self._durations)
    summary.update(step=step, epoch=epoch, images_per_second=images_per_second,
                   step_time_ms=1000 * seconds_per_step, eta_seconds=eta)
    self._write_jsonl(summary)
    self.message(self._format_line(summary))

  def _format_line(self, s: dict) -> str:
    total = self._durations.total_steps
    parts = [
        f"step {s['step']:>{len(str(total))}}/{total}",
        f"epoch {s['epoch']:.2f}",
        f"loss {s['loss']:.4f}",
        f"acc {s['accuracy']:.3f}",
        f"lr {s['lr']:.4g}",
        f"{s['images_per_second']:.1f} img/s",
        f"{s['step_time_ms']:.0f} ms/step",
        f"ETA {format_duration(s['eta_seconds'])}",
        f"norm {s['feature_norm_mean']:.2f}±{s['feature_norm_std']:.2f}",
    ]
    if "norm_ema_mean" in s:
      parts.append(
          f"ema {s['norm_ema_mean']:.2f}/{s['norm_ema_std']:.2f}")
    return " | ".join(parts)

  def _write_jsonl(self, summary: dict) -> None:
    if self._metrics_file is None:
      return
    row = {k: (v if math.isfinite(v) else None) if isinstance(v, float) else v
           for k, v in summary.items()}
    self._metrics_file.write(json.dumps(row) + "\n")
    self._metrics_file.flush()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._metrics_file is not None:
      self._metrics_file.close()


class _OwnInfoOnly(logging_std.Filter):
  """Keeps INFO lines of this project and warnings or worse from libraries.

  Orbax and grain log every checkpoint step at INFO, which buries the
  training lines a user watches.
  """

  _OWN = (f"{os.sep}adaface_jax{os.sep}", f"{os.sep}data_pipeline{os.sep}",
          f"{os.sep}train.py", f"{os.sep}eval.py")

  # Warnings Orbax gives for situations this project creates on purpose.
  _NOISE = ("Given directory is read only", "Metadata file does not exist",
            "CheckpointManagerOptions.read_only=True")

  def filter(self, record: logging_std.LogRecord) -> bool:
    if record.levelno >= logging_std.WARNING:
      message = record.getMessage()
      return not any(noise in message for noise in self._NOISE)
    return any(part in record.pathname for part in self._OWN)


# Errors that describe bad input completely in their message; a traceback
# would only bury it. The project raises ValueError for bad settings, each
# message naming the field.
USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError)
# Set to 1 to see the traceback of a user error too.
TRACEBACK_ENV = "ADAFACE_TRACEBACK"


def exit_on_user_error(fn, *args):
  """Runs fn(*args); a user error or an interrupt exits with its message.

  Data and image errors (`data_pipeline.sources.DataError`, `ImageError`),
  bad settings (ValueError) and missing files print one line and exit with
  status 1 (`ADAFACE_TRACEBACK=1` keeps the traceback); an interrupted run
  (its checkpoint already saved) exits with status 130.
  """
  from data_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  from data_pipeline import sources  # pylint: disable=g-import-not-at-top
  try:
    return fn(*args)
  except KeyboardInterrupt as e:
    print(f"Interrupted: {e}" if str(e) else "Interrupted.", file=sys.stderr)
    raise SystemExit(130) from None
  except (sources.DataError, pipeline.ImageError) + USER_ERRORS as e:
    if os.environ.get(TRACEBACK_ENV) == "1":
      raise
    print(f"Error: {e}", file=sys.stderr)
    raise SystemExit(1) from None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, for `app.run(..., flags_parser=parse_flags)`.

  ml_collections reports an override of a field the config lacks
  (`--config.head.mm=0.3`) with a bare traceback ending in
  `AttributeError: "'mm'"`; this names the flag in one line instead.
  Other flag errors print as absl prints them.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    remaining = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      # ml_collections defers a config file's loading error to first use.
      flags.FLAGS.config.keys()
    return remaining
  except OSError as e:
    # The last line of the loader's report names the file and the reason.
    reason = str(e.__cause__ or e).strip().splitlines()[-1].strip()
    print(f"Error: --config: cannot load the config file: {reason}",
          file=sys.stderr)
    raise SystemExit(1) from None
  except flags.Error as e:
    print(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull "
          "to see help on flags.", file=sys.stderr)
    raise SystemExit(1) from None
  except (AttributeError, KeyError) as e:
    # The message holds the field in quotes, and sometimes a suggestion.
    text = str(e).replace("\\", "")
    field = re.search(r"'(\w+)'", text)
    field = field.group(1) if field else text
    suggestion = re.search(r'Did you mean "(\w+)"', text)
    overrides = [arg.split("=", 1)[0] for arg in argv[1:]
                 if arg.startswith("--config.")]
    named = [flag for flag in overrides if field in flag.split(".")]
    flag = named[0] if named else "--config override"
    hint = (f"did you mean {suggestion.group(1)!r}?" if suggestion
            else "see the config file for its fields")
    print(f"Error: {flag}: the config has no field {field!r}; {hint}",
          file=sys.stderr)
    raise SystemExit(1) from None


def quiet_library_logs() -> None:
  """Installs `_OwnInfoOnly` on the absl logger (call once in a main)."""
  for target in (logging.get_absl_logger(), logging.get_absl_handler()):
    if not any(isinstance(f, _OwnInfoOnly) for f in target.filters):
      target.addFilter(_OwnInfoOnly())
