"""Per-device memory and step time of the class-sharded AdaFace head.

  python bench/classifier_sharding.py                # 8 simulated devices
  python bench/classifier_sharding.py --classes 85742 --batch 128

For each class count, compiles one SGD step of the head alone (cosines,
margin, distributed softmax cross-entropy, gradient, momentum update) with
the kernel and its momentum split over the `model` axis, and prints the
classifier state each device holds (from the compiled memory analysis), the
share of the total it is, the temporary memory and the median step time.
"""

import argparse
import os
import statistics
import sys
import time


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", type=int, default=8,
                      help="simulated CPU devices (ignored on accelerators)")
  parser.add_argument("--model_axis", type=int, default=8)
  parser.add_argument("--classes", type=int, nargs="+",
                      default=[85742, 205990, 617970, 2059906])
  parser.add_argument("--batch", type=int, default=64, help="global batch")
  parser.add_argument("--embedding", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
      "--max_run_gb", type=float, default=1.5,
      help="time the step only when kernel + momentum (all devices) stay "
      "under this; larger heads are compiled for the memory figures only "
      "(simulated devices share this machine's memory)")
  return parser.parse_args()


ARGS = _parse()
if "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={ARGS.devices}")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from adaface_jax import classifier  # noqa: E402
from adaface_jax import sharding as sharding_lib  # noqa: E402


def head_step(loss_fn, kernel, momentum, embeddings, norms, labels, stats,
              rng):
  """SGD with momentum 0.9 and weight decay 5e-4 on the kernel alone."""
  def loss_of_kernel(kernel):
    return loss_fn(embeddings, norms, labels, kernel, stats, rng)

  (loss, aux), grad = jax.value_and_grad(loss_of_kernel, has_aux=True)(kernel)
  momentum = 0.9 * momentum + grad + 5e-4 * kernel
  return kernel - 0.1 * momentum, momentum, loss, aux["norm_stats"]


def bench(num_classes, mesh):
  """Returns (state bytes per device, temp bytes, median seconds)."""
  padded = sharding_lib.padded_class_count(num_classes, mesh)
  classes = jax.sharding.NamedSharding(mesh, jax.P(None, "model"))
  batch = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  loss_fn = classifier.MarginSoftmax("adaface", num_classes, m=0.4).loss_fn(
      mesh)

  shape = (ARGS.embedding, padded)
  run = 2 * 4 * ARGS.embedding * padded <= ARGS.max_run_gb * 1e9
  if run:
    kernel = jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32),
                     out_shardings=classes)(jax.random.key(0))
    momentum = jax.jit(lambda: jnp.zeros(shape, jnp.float32),
                       out_shardings=classes)()
  else:
    kernel = momentum = jax.ShapeDtypeStruct(shape, jnp.float32,
                                             sharding=classes)
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(ARGS.batch, ARGS.embedding)).astype(np.float32)
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  inputs = (
      jax.device_put(embeddings, batch),
      jax.device_put(rng.uniform(5, 40, (ARGS.batch, 1)).astype(np.float32),
                     batch),
      jax.device_put(rng.integers(0, num_classes, ARGS.batch).astype(
          np.int32), batch),
      jax.device_put({"batch_mean": np.full((1,), 20.0, np.float32),
                      "batch_std": np.full((1,), 100.0, np.float32)},
                     replicated),
      jax.device_put(jax.random.key(1), replicated))

  step = jax.jit(
      lambda k, m, *rest: head_step(loss_fn, k, m, *rest),
      in_shardings=(classes, classes, batch, batch, batch, replicated,
                    replicated),
      out_shardings=(classes, classes, replicated, replicated),
      donate_argnums=(0, 1))
  compiled = step.lower(kernel, momentum, *inputs).compile()
  memory = compiled.memory_analysis()
  # What the compiled step's arguments hold per device, less the batch
  # slices and scalars: the classifier state the device keeps.
  other_bytes = sum(
      x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(inputs[:4]))
  other_bytes += 8  # The threefry key: two uint32 words.
  state_bytes = memory.argument_size_in_bytes - other_bytes
  if not run:
    return (state_bytes, memory.argument_size_in_bytes,
            memory.temp_size_in_bytes, float("nan"), padded)

  times = []
  for _ in range(ARGS.repeats + 1):
    start = time.perf_counter()
    kernel, momentum, loss, _ = compiled(kernel, momentum, *inputs)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
  return (state_bytes, memory.argument_size_in_bytes,
          memory.temp_size_in_bytes, statistics.median(times[1:]), padded)


def main():
  config = ml_collections.ConfigDict(
      {"data": -1, "model": ARGS.model_axis})
  mesh = sharding_lib.create_mesh(config)
  print(f"{jax.device_count()} {jax.devices()[0].platform} devices, mesh "
        f"{dict(mesh.shape)}, global batch {ARGS.batch}, embedding "
        f"{ARGS.embedding}, float32 kernel + momentum")
  header = (f"{'classes':>10} {'padded':>10} {'total state MB':>15} "
            f"{'per device MB':>14} {'share':>8} {'args MB':>9} "
            f"{'temp MB':>9} {'step ms':>9}")
  print(header)
  print("-" * len(header))
  for num_classes in ARGS.classes:
    state, arguments, temp, seconds, padded = bench(num_classes, mesh)
    total = 2 * 4 * ARGS.embedding * num_classes
    print(f"{num_classes:>10,} {padded:>10,} {total / 1e6:>15.1f} "
          f"{state / 1e6:>14.1f} {state / total:>8.4f} "
          f"{arguments / 1e6:>9.1f} {temp / 1e6:>9.1f} "
          f"{1000 * seconds:>9.1f}")
  print("step ms nan: compiled for the memory figures only (see --max_run_gb).")
  print(f"share: per-device state / total; ideal 1/{mesh.shape['model']} = "
        f"{1 / mesh.shape['model']:.4f}. args: all arguments of the compiled "
        "step on one device (memory analysis).")


if __name__ == "__main__":
  main()
