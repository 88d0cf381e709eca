"""Two real processes (loopback coordinator, gloo CPU collectives) train
together and agree with one process holding the same four devices."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
from PIL import Image

from adaface_jax import checkpointing

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = textwrap.dedent("""
    from configs import common

    def get_config():
      config = common.get_base_config()
      config.seed = 3
      config.data.root = {root!r}
      config.data.batch_size = 8
      config.data.worker_count = 0
      config.model.name = "custom"
      config.model.stage_units = (1, 1)
      config.model.stage_widths = (4, 8)
      config.model.embedding_size = 16
      # Dropout masks follow batch positions, and the two layouts order a
      # global batch differently; everything else is order-free.
      config.model.dropout_rate = 0.0
      config.head.num_classes = 0
      config.mesh.model = 2
      config.optimizer.lr = 0.01
      config.schedule.total_steps = 3
      config.logging.log_every_steps = 1
      config.logging.progress_bar = False
      config.checkpoint.every_steps = 3
      config.eval.after_training = False
      return config
""")


def _make_faces(root, identities=5, images=4):
  rng = np.random.default_rng(0)
  for i in range(identities):
    os.makedirs(os.path.join(root, f"id{i}"))
    for j in range(images):
      rgb = rng.integers(0, 256, (112, 112, 3), np.uint8)
      Image.fromarray(rgb).save(os.path.join(root, f"id{i}", f"{j}.png"))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(config_path, workdir, devices, extra=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen(
      [sys.executable, "train.py", f"--config={config_path}",
       f"--workdir={workdir}", *extra],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def _wait(process):
  try:
    out, err = process.communicate(timeout=600)
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  assert process.returncode == 0, err[-3000:]
  return err


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def test_two_processes_match_one(tmp_path):
  _make_faces(str(tmp_path / "faces"))
  config_path = tmp_path / "config.py"
  config_path.write_text(CONFIG.format(root=str(tmp_path / "faces")))

  single = _launch(config_path, tmp_path / "single", devices=4)
  _wait(single)

  port = _free_port()
  workers = [
      _launch(config_path, tmp_path / "multi", devices=2, extra=(
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
          f"--process_id={rank}"))
      for rank in range(2)]
  logs = [_wait(worker) for worker in workers]
  assert "Process 1 of 2" in logs[1]

  np.testing.assert_allclose(_losses(tmp_path / "multi"),
                             _losses(tmp_path / "single"), rtol=1e-5)
  multi, step = checkpointing.load_variables(str(tmp_path / "multi"))
  single_vars, _ = checkpointing.load_variables(str(tmp_path / "single"))
  assert step == 3
  flat_multi = jax_leaves(multi)
  flat_single = jax_leaves(single_vars)
  assert len(flat_multi) == len(flat_single)
  scale = max(np.abs(x).max() for x in flat_single)
  worst = max(np.abs(a - b).max() for a, b in zip(flat_multi, flat_single))
  assert worst / scale < 1e-5, worst / scale


def jax_leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
