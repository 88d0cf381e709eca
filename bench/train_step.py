"""Train and inference steps of the JAX model against PyTorch eager.

  python bench/train_step.py --model ir_50 --batch 32
  python bench/train_step.py --model ir_101 --batch 256 --dtype bfloat16 \
      --frameworks jax
  python bench/train_step.py --model ir_18 --batch 8 --profile 25

Both frameworks run the same network with the same weights: the PyTorch side
is `torch_mirror` loaded with the Flax initial weights through `convert`,
trained with the same AdaFace loss (written out below from the method's
definition) and SGD with momentum and weight decay. Both get the same uint8
batch and normalise it inside the step. PyTorch gets as many threads as this
process may use cores, the pool XLA's CPU client sizes itself to.

Each repetition times `--steps` consecutive calls of every step in turn (JAX
train, PyTorch train, JAX inference, PyTorch inference), each block after
one untimed call, so load from elsewhere on the machine falls on both; the
table gives the median over repetitions, the spread, and the JAX/PyTorch
throughput ratio (above 1: JAX is faster). Like train.py, the script first
sets the process's C allocator to keep freed memory (`host_memory`), for
both frameworks.

FLOPs per image come from XLA's cost analysis of the compiled steps; MFU is
printed where the device's peak for the dtype is known (`PEAK_TFLOPS`, or
`--peak_tflops`). Memory: the device's peak where it reports one (GPU, TPU),
XLA's compiled footprint of the train step, and the process's peak RSS.

`--profile N` traces one JAX train step and prints the thread time per kind
of XLA operation and the N costliest operations. Figures are reported, never
asserted.
"""

import argparse
import collections
import glob
import math
import os
import re
import resource
import statistics
import sys
import tempfile
import time

# Run as a script from the repository root or from bench/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from adaface_jax import convert
from adaface_jax import host_memory
from adaface_jax import model as model_lib
from adaface_jax import optim
from adaface_jax import sharding as sharding_lib
from adaface_jax import train_lib
from configs import common

# Dense peak TFLOP/s per device for (device kind substring, dtype). H100 SXM:
# NVIDIA's datasheet (bf16 dense). H200: the planning figure this project
# measures against. Unknown devices (CPUs included) get no MFU.
PEAK_TFLOPS = {
    ("H100", "bfloat16"): 989.0,
    ("H200", "bfloat16"): 790.0,
}


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="ir_50")
  parser.add_argument("--stage_units", default="")
  parser.add_argument("--stage_widths", default="")
  parser.add_argument("--embedding", type=int, default=512)
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=32,
                      help="global batch (split over all devices)")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--remat", default="",
                      help="comma-separated stages to rematerialise")
  parser.add_argument("--frameworks", default="jax,torch")
  parser.add_argument("--modes", default="train,inference")
  parser.add_argument("--steps", type=int, default=1,
                      help="timed calls per repetition")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="device peak for MFU when not in the table")
  parser.add_argument("--profile", type=int, default=0,
                      help="trace one JAX train step; show this many ops")
  parser.add_argument("--cpu_options", default="project",
                      choices=("project", "none"),
                      help="XLA:CPU options: the project's "
                      "(train_lib.CPU_COMPILER_OPTIONS) or XLA's defaults")
  return parser.parse_args()


def make_config(args):
  config = common.get_base_config()
  config.model.name = args.model
  ints = lambda text: tuple(int(v) for v in text.split(",") if v)
  config.model.stage_units = ints(args.stage_units)
  config.model.stage_widths = ints(args.stage_widths)
  config.model.embedding_size = args.embedding
  config.model.dtype = args.dtype
  config.model.remat = ints(args.remat)
  config.head.num_classes = args.classes
  config.data.batch_size = args.batch
  return config


def random_batch(batch_size: int, num_classes: int) -> dict[str, np.ndarray]:
  """uint8 BGR faces and int32 labels, as the input pipeline delivers."""
  rng = np.random.default_rng(0)
  return {
      "image": rng.integers(0, 256, (batch_size, 112, 112, 3), np.uint8),
      "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
  }


# ---------------------------------------------------------------------------
# JAX.


class JaxSteps:
  """The compiled train and inference steps of the project's model."""

  def __init__(self, config, host_batch, cpu_options: str = "project"):
    self.mesh = sharding_lib.create_mesh(config.mesh)
    if cpu_options == "none":
      # XLA's defaults, for comparison: the train step then compiles
      # without the project's options too.
      train_lib.compiler_options = lambda mesh: None
    options = train_lib.compiler_options(self.mesh)
    self.compiler_options = options
    num_classes = config.head.num_classes
    model = model_lib.create_model(
        config, sharding_lib.padded_class_count(num_classes, self.mesh))
    model = train_lib.with_remat(model, config.model.remat)
    durations = optim.Durations(1000, 1000, 0, ())
    lr_fn = optim.create_learning_rate_fn(0.1, durations, 0.1)
    tx = optim.create_optimizer(config.optimizer, lr_fn)
    self.state = train_lib.create_train_state(
        model, tx, jax.random.key(0), 112, self.mesh)
    margin_loss = train_lib.create_margin_loss(
        config, num_classes, config.data.batch_size).loss_fn(self.mesh)
    self.batch = sharding_lib.global_batch(host_batch, self.mesh)
    self.rng = jax.random.key(1)

    jitted = train_lib.compile_train_step(
        lr_fn, margin_loss, self.mesh, self.state)
    start = time.perf_counter()
    self.train_fn = jitted.lower(self.state, self.batch, self.rng).compile()
    self.compile_seconds = time.perf_counter() - start

    embed = jax.jit(lambda variables, images: model.apply(
        variables, images, method=model.embed), compiler_options=options)
    self.infer_fn = embed.lower(self.variables(), self.batch["image"]
                                ).compile()

  def variables(self):
    return {"params": self.state.params,
            "batch_stats": self.state.batch_stats}

  def train(self):
    self.state, metrics = self.train_fn(self.state, self.batch, self.rng)
    jax.block_until_ready(metrics)

  def infer(self):
    jax.block_until_ready(
        self.infer_fn(self.variables(), self.batch["image"]))


def flops_of(compiled) -> float:
  """XLA's FLOP count of a compiled function (0 when it gives none)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX: one per device.
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def footprint_bytes(compiled) -> int:
  """Arguments + outputs + temporaries of a compiled function, less what
  donation lets the outputs reuse (per device)."""
  m = compiled.memory_analysis()
  if m is None:
    return 0
  return (m.argument_size_in_bytes + m.output_size_in_bytes
          + m.temp_size_in_bytes - m.alias_size_in_bytes)


def peak_tflops(device, dtype: str, override: float) -> float:
  """The device's dense peak for `dtype`, or 0 when unknown."""
  if override > 0:
    return override
  for (kind, peak_dtype), value in PEAK_TFLOPS.items():
    if kind in device.device_kind and peak_dtype == dtype:
      return value
  return 0.0


# ---------------------------------------------------------------------------
# PyTorch.


def adaface_loss_torch(torch, embeddings, norms, labels, kernel, stats,
                       m=0.4, h=0.333, s=64.0, t_alpha=0.01, eps=1e-3):
  """AdaFace cross-entropy; `stats` ([mean, std] tensor) is updated."""
  functional = torch.nn.functional
  cosine = embeddings @ (kernel / kernel.norm(dim=0, keepdim=True))
  cosine = cosine.clamp(-1 + eps, 1 - eps)

  safe_norms = norms.clamp(eps, 100).detach()
  with torch.no_grad():
    stats[0] = t_alpha * safe_norms.mean() + (1 - t_alpha) * stats[0]
    stats[1] = t_alpha * safe_norms.std() + (1 - t_alpha) * stats[1]
  z = ((safe_norms - stats[0]) / (stats[1] + eps) * h).clamp(-1, 1)

  onehot = functional.one_hot(labels, kernel.shape[1]).to(cosine.dtype)
  theta = torch.acos(cosine) + onehot * (-m * z)
  theta = theta.clamp(eps, math.pi - eps)
  logits = s * (torch.cos(theta) - onehot * (m + m * z))
  return functional.cross_entropy(logits, labels)


class TorchSteps:
  """The same network in PyTorch eager, with the JAX model's weights."""

  def __init__(self, config, jax_steps: JaxSteps, host_batch, threads: int):
    import torch  # pylint: disable=g-import-not-at-top
    from adaface_jax import torch_mirror  # pylint: disable=g-import-not-at-top
    self.torch = torch
    torch.set_num_threads(threads)

    variables = jax.device_get(jax_steps.variables())
    arch = convert.architecture_from_config(config)
    backbone_vars = {k: v["backbone"] for k, v in variables.items()}
    state_dict = convert.flax_to_torch_state_dict(backbone_vars, arch)
    self.net = torch_mirror.build_from_config(config.model)
    self.net.load_state_dict(convert.to_torch(state_dict))

    kernel = np.asarray(variables["params"]["head"]["kernel"])
    kernel = kernel[:, :config.head.num_classes]
    self.kernel = torch.nn.Parameter(torch.tensor(kernel))
    self.stats = torch.tensor([20.0, 100.0])
    decayed = [p for n, p in self.net.named_parameters()
               if not _is_batch_norm(self.net, n)] + [self.kernel]
    plain = [p for n, p in self.net.named_parameters()
             if _is_batch_norm(self.net, n)]
    self.optimizer = torch.optim.SGD(
        [{"params": decayed, "weight_decay": 5e-4},
         {"params": plain, "weight_decay": 0.0}], lr=0.1, momentum=0.9)
    self.images = torch.from_numpy(host_batch["image"])
    self.labels = torch.from_numpy(host_batch["label"]).long()

  def _normalised(self):
    # (x / 255 - 0.5) / 0.5 in NCHW, as the reference's input transform.
    images = self.images.permute(0, 3, 1, 2).contiguous().float()
    return images / 127.5 - 1.0

  def train(self):
    self.net.train()
    embeddings, norms = self.net(self._normalised())
    loss = adaface_loss_torch(self.torch, embeddings, norms, self.labels,
                              self.kernel, self.stats)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()

  def infer(self):
    self.net.eval()
    with self.torch.inference_mode():
      self.net(self._normalised())


def _is_batch_norm(net, parameter_name: str) -> bool:
  module = net.get_submodule(parameter_name.rsplit(".", 1)[0])
  return "BatchNorm" in type(module).__name__


# ---------------------------------------------------------------------------
# Timing and reporting.


def time_alternating(calls: dict, steps: int, repeats: int) -> dict:
  """Seconds per call of each function, one entry per repetition.

  Repetitions are interleaved. Each block of `steps` timed calls follows one
  untimed call of the same function: the first step after the other
  framework ran pays for memory the other one took (seen here: a JAX IR-50
  step 3-6 s slower right after a PyTorch step), which a training loop,
  running one framework, never does.
  """
  seconds = collections.defaultdict(list)
  for _ in range(repeats):
    for name, fn in calls.items():
      fn()
      start = time.perf_counter()
      for _ in range(steps):
        fn()
      seconds[name].append((time.perf_counter() - start) / steps)
  return dict(seconds)


def print_table(args, samples: dict, flops: dict, peak: float):
  """One row per step: medians, and the spread over repetitions."""
  medians = {name: statistics.median(v) for name, v in samples.items()}
  print(f"{'step':<16}{'ms/step':>10}{'images/s':>10}{'GFLOP/img':>11}"
        f"{'TFLOP/s':>9}{'MFU':>7}  ms/step min-max")
  for name, seconds in medians.items():
    per_image = flops.get(name, 0.0) / args.batch
    rate = args.batch / seconds
    achieved = per_image * rate / 1e12
    mfu = f"{100 * achieved / peak:.1f}%" if peak and per_image else "-"
    gflop = f"{per_image / 1e9:.2f}" if per_image else "-"
    tflops = f"{achieved:.3f}" if per_image else "-"
    spread = f"{1000 * min(samples[name]):.0f}-{1000 * max(samples[name]):.0f}"
    print(f"{name:<16}{1000 * seconds:>10.1f}{rate:>10.2f}{gflop:>11}"
          f"{tflops:>9}{mfu:>7}  {spread}")
  for mode in ("train", "inference"):
    jax_s, torch_s = medians.get(f"jax {mode}"), medians.get(f"torch {mode}")
    if jax_s and torch_s:
      print(f"ratio JAX/PyTorch {mode} (throughput): {torch_s / jax_s:.3f}")


def print_memory(jax_steps: JaxSteps):
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    print(f"device peak memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
  print(f"train step compiled footprint (per device): "
        f"{footprint_bytes(jax_steps.train_fn) / 2**30:.2f} GiB")
  # ru_maxrss is in KiB on Linux.
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"process peak RSS (all frameworks): {rss:.2f} GiB")


# ---------------------------------------------------------------------------
# Profile: thread time per XLA operation of one train step.


def profile_train_step(jax_steps: JaxSteps, top: int):
  """Traces one train step and prints where the threads spent their time."""
  hlo_ops = _entry_ops(jax_steps.train_fn.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    jax_steps.train()
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"),
                     recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)

  per_op = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in hlo_ops:
          per_op[event.name] += event.duration_ns / 1e6
  per_kind = collections.Counter()
  for name, ms in per_op.items():
    per_kind[hlo_ops[name][0]] += ms
  total = sum(per_kind.values())
  print(f"\nprofile of one train step: {total:.0f} ms of thread time in "
        "traced XLA operations (operations without trace events, such as "
        "XLA:CPU's Eigen convolutions, are not counted)")
  for kind, ms in per_kind.most_common():
    print(f"  {kind:<22}{ms:>9.1f} ms {100 * ms / total:>5.1f}%")
  for name, ms in per_op.most_common(top):
    kind, shape, where = hlo_ops[name]
    print(f"  {ms:>8.1f} ms  {kind:<20} {shape:<28} {where}")


def _entry_ops(hlo_text: str) -> dict:
  """{op name: (kind, shape, source)} for the entry computation's ops."""
  bodies, entry, current = {}, [], None
  for line in hlo_text.splitlines():
    if line and not line.startswith(" "):
      current = [] if line.startswith("ENTRY") else bodies.setdefault(
          line.split(" ")[0].lstrip("%"), [])
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None:
      current.append(line)
  ops = {}
  for line in entry:
    match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
    if not match:
      continue
    name, shape, opcode = match.groups()
    called = re.search(r"calls=%([\w.\-]+)", line)
    body = bodies.get(called.group(1), []) if called else []
    source = re.search(r'op_name="([^"]*)"', line)
    source = source.group(1) if source else ""
    ops[name] = (_op_kind(opcode, line, body, source), shape,
                 _module_path(source))
  return ops


def _module_path(source: str) -> str:
  """"jit(f)/jvp(...)/backbone/body_0/res_conv2/conv" -> "body_0/res_conv2"."""
  parts = source.split("/")[:-1]
  if "backbone" in parts:
    return "/".join(parts[parts.index("backbone") + 1:])
  return parts[-1] if parts else ""


def _op_kind(opcode: str, line: str, body: list, source: str) -> str:
  text = "\n".join([line] + body)
  if " convolution(" in text:
    window = re.search(r"window=\{size=(\d+)x(\d+)([^}]*)\}", text)
    size = max(int(window.group(1)), int(window.group(2))) if window else 1
    # The model's kernels are at most 3x3: a larger window is a feature
    # map acting as the kernel, i.e. the gradient w.r.t. the weights.
    if size > 3 or (window and "rhs_dilate" in window.group(3)):
      return "conv kernel-grad"
    if "transpose(" in source or (window and "lhs_dilate" in window.group(3)):
      return "conv input-grad"
    return "conv forward"
  if " dot(" in text:
    return "dot"
  if opcode in ("copy", "transpose") or " transpose(" in text:
    return "copy/transpose"
  if " reduce(" in text or " reduce-window(" in text:
    return "reduction"
  return "elementwise/other"


def main():
  args = parse_args()
  host_memory.keep_freed_memory()  # As train.py does, before the backend.
  config = make_config(args)
  frameworks = args.frameworks.split(",")
  modes = args.modes.split(",")
  host_batch = random_batch(args.batch, args.classes)
  threads = len(os.sched_getaffinity(0))

  jax_steps = JaxSteps(config, host_batch, args.cpu_options)
  calls = {}
  if "train" in modes:
    calls["jax train"] = jax_steps.train
  if "torch" in frameworks:
    torch_steps = TorchSteps(config, jax_steps, host_batch, threads)
    if "train" in modes:
      calls["torch train"] = torch_steps.train
  if "inference" in modes:
    calls["jax inference"] = jax_steps.infer
    if "torch" in frameworks:
      calls["torch inference"] = torch_steps.infer
  if "jax" not in frameworks:
    calls = {k: v for k, v in calls.items() if not k.startswith("jax")}

  device = jax.devices()[0]
  print(f"model {args.model} units {config.model.stage_units or 'table'} "
        f"widths {config.model.stage_widths or 'default'} batch {args.batch} "
        f"dtype {args.dtype} remat {args.remat or 'none'} on "
        f"{jax.device_count()} x {device.device_kind}; {threads} CPU threads "
        f"for PyTorch if run; {args.repeats} alternating repetitions of "
        f"{args.steps} step(s), medians")
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; compiler options "
        f"{jax_steps.compiler_options or 'none'}")
  print(f"compile (train step): {jax_steps.compile_seconds:.1f} s")

  samples = time_alternating(calls, args.steps, args.repeats)
  flops = {"jax train": flops_of(jax_steps.train_fn),
           "jax inference": flops_of(jax_steps.infer_fn)}
  # The same network and loss: PyTorch does the same arithmetic.
  flops["torch train"] = flops["jax train"]
  flops["torch inference"] = flops["jax inference"]
  # FLOPs are per device under SPMD; the rate is global.
  flops = {k: v * jax.device_count() for k, v in flops.items()}
  peak = peak_tflops(device, args.dtype, args.peak_tflops)
  peak *= jax.device_count()
  print_table(args, samples, flops, peak)
  print_memory(jax_steps)
  if args.profile:
    profile_train_step(jax_steps, args.profile)


if __name__ == "__main__":
  main()
