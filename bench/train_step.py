"""Times the jitted train step and the inference step on random data.

  python bench/train_step.py --model ir_50 --batch 32
  python bench/train_step.py --model custom --stage_units 2,2,2,2 \
      --stage_widths 16,32,64,128 --embedding 128 --batch 64

Prints images/s and milliseconds per step (medians over repetitions, the
compilation excluded). Figures are reported, never asserted.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from adaface_jax import optim
from adaface_jax import train_lib
from configs import common


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="ir_50")
  parser.add_argument("--stage_units", default="")
  parser.add_argument("--stage_widths", default="")
  parser.add_argument("--embedding", type=int, default=512)
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--steps", type=int, default=5, help="steps per repeat")
  parser.add_argument("--repeats", type=int, default=3)
  return parser.parse_args()


def make_config(args):
  config = common.get_base_config()
  config.model.name = args.model
  ints = lambda text: tuple(int(v) for v in text.split(",") if v)
  config.model.stage_units = ints(args.stage_units)
  config.model.stage_widths = ints(args.stage_widths)
  config.model.embedding_size = args.embedding
  config.model.dtype = args.dtype
  config.head.num_classes = args.classes
  return config


def time_steps(fn, state, batch, steps):
  """Median seconds per call of `fn` over `steps` calls after one warm-up."""
  state, out = fn(state, batch)
  jax.block_until_ready(out)
  durations = []
  for _ in range(steps):
    start = time.perf_counter()
    state, out = fn(state, batch)
    jax.block_until_ready(out)
    durations.append(time.perf_counter() - start)
  return state, statistics.median(durations)


def main():
  args = parse_args()
  config = make_config(args)
  from adaface_jax import model as model_lib
  model = model_lib.create_model(config, args.classes)
  durations = optim.Durations(1000, 1000, 0, ())
  lr_fn = optim.create_learning_rate_fn(0.1, durations, 0.1)
  tx = optim.create_optimizer(config.optimizer, lr_fn)
  state = train_lib.create_train_state(model, tx, jax.random.key(0), 112)

  rng = np.random.default_rng(0)
  batch = {
      "image": jnp.asarray(
          rng.integers(0, 256, (args.batch, 112, 112, 3), np.uint8)),
      "label": jnp.asarray(rng.integers(0, args.classes, args.batch),
                           jnp.int32),
  }
  step_rng = jax.random.key(1)
  train_fn = jax.jit(
      lambda s, b: train_lib.train_step(s, b, step_rng, lr_fn),
      donate_argnums=(0,))
  embed_fn = jax.jit(lambda s, b: (s, model.apply(
      {"params": s.params, "batch_stats": s.batch_stats}, b["image"],
      method=model.embed)))

  start = time.perf_counter()
  jax.block_until_ready(train_fn.lower(state, batch).compile())
  compile_seconds = time.perf_counter() - start

  train_times, infer_times = [], []
  for _ in range(args.repeats):
    state, seconds = time_steps(train_fn, state, batch, args.steps)
    train_times.append(seconds)
    state, seconds = time_steps(embed_fn, state, batch, args.steps)
    infer_times.append(seconds)

  train_s = statistics.median(train_times)
  infer_s = statistics.median(infer_times)
  print(f"model {args.model} units {config.model.stage_units or 'table'} "
        f"widths {config.model.stage_widths or 'default'} batch {args.batch} "
        f"dtype {args.dtype} on {jax.devices()[0].platform} "
        f"({jax.device_count()} devices)")
  print(f"compile (train step): {compile_seconds:.1f} s")
  print(f"train step: {1000 * train_s:.1f} ms, "
        f"{args.batch / train_s:.1f} images/s")
  print(f"inference:  {1000 * infer_s:.1f} ms, "
        f"{args.batch / infer_s:.1f} images/s")


if __name__ == "__main__":
  main()
