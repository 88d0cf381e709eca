"""End-to-end training, resuming, evaluation and bad-input handling."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from adaface_jax import checkpointing
from adaface_jax import eval_lib
from adaface_jax import train_lib
from adaface_jax import verification
from configs import common
from data_pipeline import sources

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_faces(root, identities=4, images=6, seed=0):
  """Identity-coloured noise images: enough signal to learn something."""
  rng = np.random.default_rng(seed)
  for i in range(identities):
    base = rng.integers(0, 256, (1, 1, 3))
    for j in range(1, images + 1):
      noise = rng.integers(-40, 40, (112, 112, 3))
      rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
      folder = os.path.join(root, f"id{i}")
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(rgb).save(os.path.join(folder, f"id{i}_{j:04d}.jpg"))
  return str(root)


def _tiny_config(data_root, pairs=""):
  config = common.get_base_config()
  config.seed = 1
  config.data.root = data_root
  config.data.batch_size = 8
  config.data.worker_count = 0
  config.model.name = "custom"
  config.model.stage_units = (1, 1)
  config.model.stage_widths = (4, 8)
  config.model.embedding_size = 16
  config.head.num_classes = 0
  config.schedule.total_steps = 4
  config.schedule.lr_boundaries_epochs = (2,)
  config.logging.log_every_steps = 2
  config.logging.progress_bar = False
  config.checkpoint.every_steps = 2
  config.eval.pairs = pairs
  config.eval.image_root = data_root
  config.eval.batch_size = 5
  return config


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
  root = _make_faces(tmp_path_factory.mktemp("faces"))
  pairs = os.path.join(root, "pairs.txt")
  matched = [(f"id{i}", 1, 2) for i in range(4)]
  mismatched = [(f"id{i}", 3, f"id{(i + 1) % 4}", 4) for i in range(4)]
  verification.write_lfw_pairs(pairs, [(matched, mismatched)] * 2)
  return root, pairs


def _params(state):
  return jax.tree.leaves(jax.device_get(state.params))


def test_train_writes_checkpoints_metrics_and_evaluates(faces, tmp_path):
  root, pairs = faces
  config = _tiny_config(root, pairs)
  workdir = str(tmp_path / "run")
  results = train_lib.train_and_evaluate(config, workdir)

  assert sorted(os.listdir(checkpointing.checkpoint_dir(workdir))) == [
      "2", "4"]
  rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
  assert [row["step"] for row in rows] == [2, 4]
  for key in ("loss", "lr", "images_per_second", "norm_ema_mean",
              "norm_ema_std", "eta_seconds"):
    assert key in rows[-1]
  assert np.isfinite(rows[-1]["loss"])

  result = results[config.eval.name]
  assert result["pairs"] == 16 and result["num_folds"] == 2
  assert 0.0 <= result["accuracy_mean"] <= 1.0
  saved = json.load(open(f"{workdir}/{eval_lib.RESULTS_FILE}"))
  assert saved["latest"][config.eval.name]["step"] == 4
  assert json.load(open(f"{workdir}/config.json"))["head"]["m"] == 0.4


def test_resumed_run_continues_step_and_data_stream(faces, tmp_path):
  root, _ = faces
  config = _tiny_config(root)
  config.schedule.total_steps = 6
  straight = train_lib.train(config, str(tmp_path / "straight"))

  # Stop after 3 steps (checkpoint at 3), then rerun to 6.
  interrupted_dir = str(tmp_path / "interrupted")
  config.schedule.total_steps = 3
  first = train_lib.train(config, interrupted_dir)
  assert int(first.step) == 3
  config.schedule.total_steps = 6
  resumed = train_lib.train(config, interrupted_dir)
  assert int(resumed.step) == 6

  # Same step count, same data: the resumed parameters equal the
  # uninterrupted run's exactly.
  for a, b in zip(_params(straight), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  rows = [json.loads(line) for line in open(f"{interrupted_dir}/metrics.jsonl")]
  assert [row["step"] for row in rows] == [2, 3, 4, 6]


def test_rerun_after_finishing_keeps_checkpoints(faces, tmp_path):
  root, _ = faces
  config = _tiny_config(root)
  workdir = str(tmp_path / "run")
  train_lib.train(config, workdir)
  before = sorted(os.listdir(checkpointing.checkpoint_dir(workdir)))
  state = train_lib.train(config, workdir)
  assert int(state.step) == 4
  assert sorted(os.listdir(checkpointing.checkpoint_dir(workdir))) == before


def test_class_count_mismatch_is_named(faces, tmp_path):
  root, _ = faces
  config = _tiny_config(root)
  config.head.num_classes = 3
  with pytest.raises(sources.DataError, match="head.num_classes=3"):
    train_lib.train(config, str(tmp_path / "run"))


def test_changed_model_does_not_destroy_checkpoints(faces, tmp_path):
  root, _ = faces
  config = _tiny_config(root)
  workdir = str(tmp_path / "run")
  train_lib.train(config, workdir)
  config.model.embedding_size = 32
  with pytest.raises(ValueError, match="does not match the model"):
    train_lib.train(config, workdir)
  assert sorted(os.listdir(checkpointing.checkpoint_dir(workdir))) == [
      "2", "4"]

  # Evaluation names the first differing backbone array too, and a step
  # that was never saved lists the saved ones.
  with pytest.raises(ValueError,
                     match=r"does not match the model.*has shape"):
    eval_lib.evaluate(config, workdir)
  config.model.embedding_size = 16
  with pytest.raises(FileNotFoundError,
                     match="no checkpoint at step 3; it holds steps 2, 4"):
    eval_lib.evaluate(config, workdir, step=3)


def test_interrupt_during_set_up_stops_cleanly(faces, tmp_path,
                                               monkeypatch):
  """A Ctrl-C while the data is indexed lets that stage finish, then stops
  before anything is compiled (an exception inside XLA's compiler would
  crash the exiting interpreter)."""
  from data_pipeline import builder  # pylint: disable=g-import-not-at-top
  build = builder.build_train_index

  def build_then_interrupt(*args):
    index = build(*args)
    os.kill(os.getpid(), signal.SIGINT)
    return index

  monkeypatch.setattr(builder, "build_train_index", build_then_interrupt)
  workdir = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt, match="before building the model"):
    train_lib.train(_tiny_config(faces[0]), str(workdir))
  assert not os.path.exists(checkpointing.checkpoint_dir(str(workdir)))
  # The handlers are restored: a later Ctrl-C interrupts as usual.
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interrupt_during_training_saves_the_step_and_resumes(
    faces, tmp_path, monkeypatch):
  from adaface_jax import reporting  # pylint: disable=g-import-not-at-top
  tick = reporting.Reporter.tick

  def tick_then_interrupt(self, step):
    tick(self, step)
    if step == 1:
      os.kill(os.getpid(), signal.SIGINT)

  config = _tiny_config(faces[0])
  workdir = str(tmp_path / "run")
  monkeypatch.setattr(reporting.Reporter, "tick", tick_then_interrupt)
  with pytest.raises(KeyboardInterrupt, match="training stopped at step 1"):
    train_lib.train(config, workdir)
  assert os.listdir(checkpointing.checkpoint_dir(workdir)) == ["1"]

  monkeypatch.setattr(reporting.Reporter, "tick", tick)
  assert int(train_lib.train(config, workdir).step) == 4


def _run_script(*args):
  return subprocess.run(
      [sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
      timeout=300)


def test_cli_rejects_config_typo(tmp_path):
  result = _run_script("train.py", "--config", "configs/synthetic.py",
                       "--workdir", str(tmp_path / "run"),
                       "--config.head.mm=0.5")
  assert result.returncode != 0
  # One line naming the flag, not a traceback.
  assert result.stderr.strip().splitlines() == [
      "Error: --config.head.mm: the config has no field 'mm'; see the "
      "config file for its fields"]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")

  result = _run_script("eval.py", "--config", "configs/synthetic.py",
                       "--workdir", str(tmp_path / "run"),
                       "--config.data.batch_sise=4")
  assert result.returncode != 0
  assert "'batch_sise'; did you mean 'batch_size'?" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag, message", [
    ("--config=configs/nowhere.py",
     "Error: --config: cannot load the config file: [Errno 2] No such file "
     "or directory: 'configs/nowhere.py'"),
    ("--config.data.batch_size=0",
     "Error: data.batch_size=0 must be a positive integer"),
    ("--config.head.name=sphereface",
     "Error: unknown head.name 'sphereface'; choose one of ('adaface', "
     "'cosface', 'arcface')"),
])
def test_cli_bad_settings_fail_in_one_line_writing_nothing(
    tmp_path, flag, message):
  workdir = tmp_path / "run"
  result = _run_script("train.py", "--config", "configs/synthetic.py", flag,
                       "--workdir", str(workdir))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [message]
  assert not workdir.exists()


def test_cli_missing_data_root_is_named(tmp_path):
  result = _run_script("train.py", "--config", "configs/adaface_ir101.py",
                       "--workdir", str(tmp_path / "run"),
                       f"--config.data.root={tmp_path}/nowhere")
  assert result.returncode != 0
  assert "data.root" in result.stderr and "nowhere" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()
