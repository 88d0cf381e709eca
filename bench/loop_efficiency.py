"""Training-loop throughput with the real input pipeline vs the bare step.

  python bench/loop_efficiency.py
  python bench/loop_efficiency.py --workers 0,1 --steps 160 --batch 32

The model is the first-run config's small network (`configs/synthetic.py`:
IR units (1, 1, 1, 1), widths (16, 32, 64, 128)) on its synthetic JPEG
faces, written to a temporary folder once.

- pure step: the compiled train step called back to back on one batch that
  already sits on the device (the ceiling for the loop).
- loop: `train_lib.train` as a user runs it: grain decoding in `--workers`
  processes (0: threads of this process), device prefetch, the step,
  metrics every `--log_every` steps. Its throughput is the median of the
  images/s it logs (`metrics.jsonl`), leaving out the first interval
  (worker start-up); compilation, the final checkpoint and evaluation fall
  outside the logged intervals.

Pure-step and loop runs alternate `--repeats` times; medians are printed
with the loop's share of the pure step. Figures are reported, never
asserted.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

# Run as a script from the repository root or from bench/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import jax
import numpy as np

from adaface_jax import host_memory
from adaface_jax import reporting
from adaface_jax import sharding as sharding_lib
from adaface_jax import train_lib
from configs import synthetic as synthetic_config
from data_pipeline import builder


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=120,
                      help="train steps per loop run")
  parser.add_argument("--log_every", type=int, default=20)
  parser.add_argument("--workers", default="1",
                      help="comma-separated decoding worker counts")
  parser.add_argument("--repeats", type=int, default=2)
  return parser.parse_args()


def make_config(args, data_root: str, workers: int):
  config = synthetic_config.get_config()
  config.data.kind = "synthetic"
  config.data.root = data_root
  config.data.batch_size = args.batch
  config.data.worker_count = workers
  config.schedule.total_steps = args.steps
  config.logging.log_every_steps = args.log_every
  config.logging.progress_bar = False
  config.checkpoint.every_steps = 10 * args.steps  # Only the final save.
  config.eval.after_training = False
  return config


def pure_step_images_per_second(config, data_root: str, steps: int) -> float:
  """The loop's own step, without the loop: one device batch, back to back."""
  index = builder.build_train_index(config.data, data_root)
  num_classes = index.num_identities
  setup = train_lib.create_setup(config, len(index), num_classes,
                                 jax.random.key(0))
  mesh, state = setup.mesh, setup.state
  step = train_lib.compile_train_step(
      setup.learning_rate_fn, setup.margin_loss, mesh, state)

  rng = np.random.default_rng(0)
  size = config.data.image_size
  batch = sharding_lib.global_batch({
      "image": rng.integers(0, 256, (config.data.batch_size, size, size, 3),
                            np.uint8),
      "label": rng.integers(0, num_classes, config.data.batch_size).astype(
          np.int32)}, mesh)
  step_rng = jax.random.key(1)
  state, metrics = step(state, batch, step_rng)  # Compiles.
  jax.block_until_ready(metrics)

  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch, step_rng)
  jax.block_until_ready((state, metrics))
  return steps * config.data.batch_size / (time.perf_counter() - start)


def loop_images_per_second(config, workdir: str) -> float:
  """Median logged images/s of a `train_lib.train` run, first interval out."""
  train_lib.train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  rates = [row["images_per_second"] for row in rows[1:]]
  if not rates:
    raise ValueError("no logged interval after the first; raise --steps or "
                     "lower --log_every")
  return statistics.median(rates)


def main():
  args = parse_args()
  host_memory.keep_freed_memory()  # As train.py does, before the backend.
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags.
  reporting.quiet_library_logs()
  worker_counts = [int(w) for w in args.workers.split(",") if w]

  with tempfile.TemporaryDirectory() as tmp:
    data_root = os.path.join(tmp, "faces")
    pure, loops = [], {w: [] for w in worker_counts}
    for repeat in range(args.repeats):
      pure.append(pure_step_images_per_second(
          make_config(args, data_root, 0), data_root, args.steps))
      for workers in worker_counts:
        workdir = os.path.join(tmp, f"run_{workers}_{repeat}")
        loops[workers].append(loop_images_per_second(
            make_config(args, data_root, workers), workdir))

  pure_rate = statistics.median(pure)
  config = make_config(args, "", 0)
  print(f"model {config.model.name} units {config.model.stage_units} widths "
        f"{config.model.stage_widths} batch {args.batch} on "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"{len(os.sched_getaffinity(0))} cores; {args.steps} steps per run, "
        f"{args.repeats} alternating repetitions, medians")
  print(f"{'setting':<28}{'images/s':>10}{'of pure step':>14}")
  print(f"{'pure step':<28}{pure_rate:>10.1f}{'100.0%':>14}")
  for workers, rates in loops.items():
    rate = statistics.median(rates)
    label = f"loop, {workers} decoding workers"
    print(f"{label:<28}{rate:>10.1f}{100 * rate / pure_rate:>13.1f}%")


if __name__ == "__main__":
  main()
