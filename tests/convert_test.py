"""Checkpoint conversion: layouts, exact round trips, the CLI and its errors."""

import argparse
import json
import logging
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from adaface_jax import backbone
from adaface_jax import checkpointing
from adaface_jax import convert
from adaface_jax import eval_lib
from adaface_jax import model as model_lib
from adaface_jax import optim
from adaface_jax import train_lib
from configs import common
from data_pipeline import pipeline
from data_pipeline import sources

SMALL = convert.Architecture(stage_units=(1, 2), stage_widths=(8, 16),
                             embedding_size=12, image_size=32)
REFERENCE_ARCHS = ("ir_18", "ir_50", "ir_101")
IDENTITIES = ("Ann", "Bob", "Cid")
IMAGES_PER_IDENTITY = 4
LFW_FACES = ("Abdel_Madi_Shabneh/Abdel_Madi_Shabneh_0001.jpg",
             "Abdul_Rahman/Abdul_Rahman_0001.jpg")

# Two sets, each of one matched and one mismatched pair.
TINY_PAIRS = "2 1\nAnn 1 2\nAnn 1 Bob 1\nCid 3 4\nBob 2 Cid 1\n"

TINY_CONFIG = """
from configs import common


def get_config():
  config = common.get_base_config()
  config.seed = 0
  config.data.kind = "image_folder"
  config.data.root = {root!r}
  config.data.batch_size = 4
  config.data.worker_count = 0
  config.model.name = "custom"
  config.model.stage_units = (1, 1)
  config.model.stage_widths = (8, 16)
  config.model.embedding_size = 16
  config.head.num_classes = 0
  config.schedule.total_steps = 2
  config.schedule.lr_boundaries_epochs = ()
  config.logging.log_every_steps = 1
  config.logging.progress_bar = False
  config.checkpoint.every_steps = 2
  config.eval.name = "tiny_pairs"
  config.eval.pairs = {pairs!r}
  config.eval.image_root = {root!r}
  config.eval.batch_size = 4
  return config
"""


def _variable_shapes(arch: convert.Architecture):
  model = backbone.IResNet(stage_units=arch.stage_units,
                           stage_widths=arch.stage_widths,
                           embedding_size=arch.embedding_size)
  images = jnp.zeros((1, arch.image_size, arch.image_size, 3))
  return flax.core.unfreeze(
      jax.eval_shape(model.init, jax.random.key(0), images))


def _random_variables(arch: convert.Architecture, seed: int = 0):
  """Backbone variables of `arch` filled with random values, no compute."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: rng.standard_normal(s.shape, np.float32),
      _variable_shapes(arch))


def _zero_variables(arch: convert.Architecture):
  return jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                      _variable_shapes(arch))


def _assert_trees_equal(actual, expected):
  flat_actual = flax.traverse_util.flatten_dict(actual)
  flat_expected = flax.traverse_util.flatten_dict(expected)
  assert set(flat_actual) == set(flat_expected)
  for path, value in flat_expected.items():
    np.testing.assert_array_equal(np.asarray(flat_actual[path]), value,
                                  err_msg="/".join(path))
    assert np.asarray(flat_actual[path]).dtype == np.asarray(value).dtype


# ---------------------------------------------------------------------------
# Layouts and exact round trips.


@pytest.mark.parametrize("arch", [
    SMALL,
    convert.Architecture((1, 1, 1), (8, 8, 16), 8, 48),  # Equal widths.
    convert.named_architecture("ir_18"),
])
def test_flax_torch_flax_round_trip_is_exact(arch):
  variables = _random_variables(arch)
  state_dict = convert.flax_to_torch_state_dict(variables, arch)
  _assert_trees_equal(convert.torch_state_dict_to_flax(state_dict, arch),
                      variables)


def test_torch_flax_torch_round_trip_is_exact():
  rng = np.random.default_rng(1)
  state_dict = {
      key: (np.zeros(shape, np.int64) if dtype == "int64"
            else rng.standard_normal(shape, np.float32))
      for key, shape, dtype in convert.torch_layout(SMALL)}
  round_trip = convert.flax_to_torch_state_dict(
      convert.torch_state_dict_to_flax(state_dict, SMALL), SMALL)
  assert list(round_trip) == list(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(round_trip[key], value, err_msg=key)


def test_layouts_transpose_convolutions_and_the_linear():
  variables = _random_variables(SMALL)
  state_dict = convert.flax_to_torch_state_dict(variables, SMALL)
  kernel = variables["params"]["body_1"]["res_conv1"]["kernel"]  # HWIO.
  weight = state_dict["body.1.res_layer.1.weight"]  # OIHW.
  assert weight[5, 3, 0, 2] == kernel[0, 2, 3, 5]
  dense = variables["params"]["output_layer_dense"]["kernel"]  # (in, out).
  assert state_dict["output_layer.3.weight"][7, 100] == dense[100, 7]
  assert state_dict["output_layer.4.num_batches_tracked"].dtype == np.int64
  assert "output_layer.4.weight" not in state_dict  # Affine-free BN1d.


@pytest.mark.parametrize("name", REFERENCE_ARCHS)
def test_converted_state_dict_matches_reference_layout(reference_dir, name):
  with open(reference_dir / f"{name}_state_dict.json") as f:
    rows = [(k, tuple(s), d) for k, s, d in json.load(f)]
  arch = convert.named_architecture(name)
  assert convert.torch_layout(arch) == rows

  state_dict = convert.flax_to_torch_state_dict(_zero_variables(arch), arch)
  assert [(k, v.shape, str(v.dtype)) for k, v in state_dict.items()] == rows


@pytest.mark.parametrize("name", REFERENCE_ARCHS)
def test_torch_mirror_matches_reference_layout(reference_dir, name):
  pytest.importorskip("torch")
  from adaface_jax import torch_mirror
  with open(reference_dir / f"{name}_state_dict.json") as f:
    rows = [(k, tuple(s), d) for k, s, d in json.load(f)]
  mirror = torch_mirror.build(name)
  layout = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in mirror.state_dict().items()]
  assert layout == rows


def test_infer_architecture_reads_units_widths_and_embedding():
  state_dict = dict(convert.flax_to_torch_state_dict(
      _zero_variables(convert.named_architecture("ir_50")),
      convert.named_architecture("ir_50")))
  assert convert.infer_architecture(state_dict) == (
      convert.named_architecture("ir_50"))
  assert convert.infer_architecture({"input_layer.0.weight": 0}) is None


# ---------------------------------------------------------------------------
# Numerical agreement of the converted weights with the PyTorch mirror.


def test_mirror_and_flax_agree_on_lfw_faces(lfw_dir):
  torch = pytest.importorskip("torch")
  from adaface_jax import torch_mirror
  landmarks = sources.read_landmarks_csv(
      str(lfw_dir / "landmarks/landmarks_5pt_150px.csv"), str(lfw_dir))
  faces = []
  for name in LFW_FACES:
    path = str(lfw_dir / "images" / name)
    faces.append(pipeline.prepare_face(path, landmarks[path], 112,
                                       "landmarks"))
  images = (np.stack(faces).astype(np.float32) / 255.0 - 0.5) / 0.5

  # Equal consecutive widths put a strided max-pool shortcut between
  # stages. Random BatchNorm statistics and affines keep every layer busy.
  arch = convert.Architecture((1, 1, 2), (8, 8, 16), 32, 112)
  variables = _random_variables(arch, seed=3)
  stats = flax.traverse_util.flatten_dict(variables["batch_stats"])
  variables["batch_stats"] = flax.traverse_util.unflatten_dict({
      path: np.abs(value) + 0.5 if path[-1] == "var" else value
      for path, value in stats.items()})
  model = backbone.IResNet(stage_units=arch.stage_units,
                           stage_widths=arch.stage_widths,
                           embedding_size=arch.embedding_size)
  embeddings, norms = model.apply(variables, jnp.asarray(images))

  mirror = torch_mirror.build("custom", arch.stage_units, arch.stage_widths,
                              arch.embedding_size)
  mirror.load_state_dict(convert.to_torch(
      convert.flax_to_torch_state_dict(variables, arch)), strict=True)
  mirror.eval()
  with torch.no_grad():
    expected, expected_norms = mirror(
        torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  np.testing.assert_allclose(embeddings, expected.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(norms, expected_norms.numpy(), rtol=1e-5)
  # Different faces, different embeddings: the check is not vacuous.
  assert abs(float(np.dot(embeddings[0], embeddings[1]))) < 0.99


# ---------------------------------------------------------------------------
# The command line on a checkpoint of a real (tiny) training run.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A two-step training run on random images; returns its paths."""
  root = tmp_path_factory.mktemp("tiny_run")
  images = root / "images"
  rng = np.random.default_rng(0)
  for identity in IDENTITIES:
    (images / identity).mkdir(parents=True)
    for number in range(1, IMAGES_PER_IDENTITY + 1):
      pixels = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(
          images / identity / f"{identity}_{number:04d}.jpg")
  pairs = root / "pairs.txt"
  pairs.write_text(TINY_PAIRS)
  config_file = root / "tiny_config.py"
  config_file.write_text(
      TINY_CONFIG.format(root=str(images), pairs=str(pairs)))

  config = convert.load_config(str(config_file))
  workdir = root / "run"
  train_lib.train(config, str(workdir))
  return argparse.Namespace(config=config, config_file=config_file,
                            workdir=workdir, root=root)


def test_cli_to_torch_writes_released_layout(tiny_run, tmp_path):
  torch = pytest.importorskip("torch")
  ckpt, bare = tmp_path / "model.ckpt", tmp_path / "backbone.pt"
  # No --config: the run's config.json; a step folder as the source.
  convert.main(["to-torch", "--checkpoint",
                str(tiny_run.workdir / "checkpoints" / "2"),
                "--output", str(ckpt), "--backbone-output", str(bare)])

  contents = torch.load(ckpt, weights_only=True)
  assert list(contents) == ["state_dict"]
  state_dict = contents["state_dict"]
  arch = convert.architecture_from_config(tiny_run.config)
  layout = convert.torch_layout(arch)
  head_keys = ["head.kernel", "head.t", "head.batch_mean", "head.batch_std"]
  assert list(state_dict) == ["model." + k for k, _, _ in layout] + head_keys
  for key, shape, dtype in layout:
    assert tuple(state_dict["model." + key].shape) == shape, key
    assert str(state_dict["model." + key].dtype) == f"torch.{dtype}", key

  variables, step = checkpointing.load_variables(str(tiny_run.workdir))
  assert step == 2
  np.testing.assert_array_equal(
      state_dict["head.kernel"].numpy(), variables["params"]["head"]["kernel"])
  assert state_dict["head.kernel"].shape == (16, len(IDENTITIES))
  np.testing.assert_array_equal(state_dict["head.t"].numpy(), [0.0])
  for name in ("batch_mean", "batch_std"):
    # Two steps moved the norm statistics away from their 20 / 100 init.
    value = variables["batch_stats"]["head"][name]
    np.testing.assert_array_equal(state_dict[f"head.{name}"].numpy(), value)
    assert value.shape == (1,) and value[0] not in (20.0, 100.0)
  np.testing.assert_array_equal(
      state_dict["model.input_layer.0.weight"].numpy(),
      np.transpose(variables["params"]["backbone"]["input_layer_conv"]
                   ["kernel"], (3, 2, 0, 1)))

  bare_state_dict = torch.load(bare, weights_only=True)
  assert list(bare_state_dict) == [k for k, _, _ in layout]


def test_cli_to_torch_names_a_missing_checkpoint(tmp_path):
  missing = tmp_path / "no_run"
  with pytest.raises(FileNotFoundError,
                     match=r"--checkpoint .*no_run.*: no checkpoints in"):
    convert.main(["to-torch", "--checkpoint", str(missing), "--output",
                  str(tmp_path / "model.ckpt")])
  assert not (tmp_path / "model.ckpt").exists()


def test_cli_round_trip_restores_training_and_evaluates(tiny_run, tmp_path):
  pytest.importorskip("torch")
  ckpt, out = tmp_path / "model.ckpt", tmp_path / "converted"
  convert.main(["to-torch", "--checkpoint", str(tiny_run.workdir),
                "--config", str(tiny_run.config_file), "--output", str(ckpt)])
  convert.main(["from-torch", "--input", str(ckpt), "--config",
                str(tiny_run.config_file), "--workdir", str(out),
                "--step", "2"])

  original, _ = checkpointing.load_variables(str(tiny_run.workdir))
  converted, step = checkpointing.load_variables(str(out))
  assert step == 2
  _assert_trees_equal(jax.tree.map(np.asarray, converted),
                      jax.tree.map(np.asarray, original))

  # The `state` item restores into the train state the config builds, with
  # a fresh (zero) momentum.
  config = tiny_run.config
  model = model_lib.create_model(config, len(IDENTITIES))
  tx = optim.create_optimizer(config.optimizer, lambda step: 0.1)
  template = train_lib.create_train_state(model, tx, jax.random.key(1), 112)
  manager = checkpointing.create_manager(str(out), 1, read_only=True)
  state = checkpointing.restore(manager, template, None)
  manager.close()
  assert int(state.step) == 2
  assert all(not np.any(x) for x in jax.tree.leaves(state.opt_state))

  # What eval.py --workdir runs; timings aside, the figures are the same.
  results = [eval_lib.evaluate(config, str(workdir))["tiny_pairs"]
             for workdir in (out, tiny_run.workdir)]
  for result in results:
    del result["seconds"]
  assert results[0] == results[1]


# ---------------------------------------------------------------------------
# Errors.


def _small_state_dict():
  return dict(convert.flax_to_torch_state_dict(_random_variables(SMALL),
                                               SMALL))


def test_missing_extra_and_misshapen_keys_are_named():
  state_dict = _small_state_dict()
  del state_dict["body.1.res_layer.4.weight"]
  with pytest.raises(convert.ConversionError,
                     match=r"lacks 'body.1.res_layer.4.weight'"):
    convert.torch_state_dict_to_flax(state_dict, SMALL)

  state_dict = _small_state_dict()
  state_dict["body.0.res_layer.9.weight"] = np.zeros(3, np.float32)
  with pytest.raises(convert.ConversionError,
                     match=r"unexpected key 'body.0.res_layer.9.weight'"):
    convert.torch_state_dict_to_flax(state_dict, SMALL)

  state_dict = _small_state_dict()
  state_dict["input_layer.2.weight"] = np.zeros(9, np.float32)
  with pytest.raises(convert.ConversionError,
                     match=r"'input_layer.2.weight' of shape \(9,\)"):
    convert.torch_state_dict_to_flax(state_dict, SMALL)


def test_missing_num_batches_tracked_is_tolerated():
  state_dict = {k: v for k, v in _small_state_dict().items()
                if not k.endswith("num_batches_tracked")}
  variables = convert.torch_state_dict_to_flax(state_dict, SMALL)
  assert "output_layer_bn1d" in variables["batch_stats"]


def test_wrong_architecture_is_described():
  ir_50 = convert.named_architecture("ir_50")
  state_dict = convert.flax_to_torch_state_dict(_zero_variables(ir_50), ir_50)
  with pytest.raises(convert.ConversionError,
                     match=r"lacks 'body.2.shortcut_layer.0.weight'.*ir_18"
                           r".*looks like ir_50"):
    convert.torch_state_dict_to_flax(state_dict,
                                     convert.named_architecture("ir_18"))

  with pytest.raises(convert.ConversionError,
                     match=r"lack params/body_1/shortcut_conv/kernel \(for "
                           r"body.1.shortcut_layer.0.weight\)"):
    convert.flax_to_torch_state_dict(
        _random_variables(convert.Architecture((1,), (8,), 12, 32)), SMALL)
  wide = convert.Architecture((1, 2), (8, 32), 12, 32)
  with pytest.raises(convert.ConversionError,
                     match=r"params/output_layer_bn2d/scale has shape "
                           r"\(32,\), expected \(16,\)"):
    convert.flax_to_torch_state_dict(_random_variables(wide), SMALL)


def test_released_checkpoint_prefixes_are_split():
  backbone_sd = _small_state_dict()
  released = {"model." + k: v for k, v in backbone_sd.items()}
  released["head.kernel"] = np.zeros((12, 5), np.float32)
  backbone_part, head_part = convert.split_checkpoint_state_dict(released)
  assert list(backbone_part) == list(backbone_sd)
  assert list(head_part) == ["kernel"]
  assert convert.split_checkpoint_state_dict(backbone_sd)[0].keys() == (
      backbone_sd.keys())
  with pytest.raises(convert.ConversionError, match=r"'optimizer.lr'"):
    convert.split_checkpoint_state_dict(
        dict(released, **{"optimizer.lr": 0.1}))


def _write_released(path, state_dict, head_kernel, extra=None):
  torch = pytest.importorskip("torch")
  full = {"model." + k: v for k, v in state_dict.items()}
  full["head.kernel"] = head_kernel
  full["head.t"] = np.zeros(1, np.float32)
  full["head.batch_mean"] = np.full(1, 17.0, np.float32)
  full["head.batch_std"] = np.full(1, 3.0, np.float32)
  torch.save(dict({"state_dict": convert.to_torch(full)}, **(extra or {})),
             path)


def _small_config(num_classes):
  config = common.get_base_config()
  config.model.name = "custom"
  config.model.stage_units = SMALL.stage_units
  config.model.stage_widths = SMALL.stage_widths
  config.model.embedding_size = SMALL.embedding_size
  config.data.image_size = SMALL.image_size
  config.head.num_classes = num_classes
  return config


def test_head_with_other_class_count_is_dropped(tmp_path, caplog):
  pytest.importorskip("torch")
  ckpt = tmp_path / "released.ckpt"
  kernel = np.random.default_rng(0).standard_normal((12, 7), np.float32)
  _write_released(ckpt, _small_state_dict(), kernel)

  kept = convert.import_checkpoint(str(ckpt), _small_config(7),
                                   str(tmp_path / "same"))
  np.testing.assert_array_equal(kept.params["head"]["kernel"], kernel)
  np.testing.assert_array_equal(kept.batch_stats["head"]["batch_mean"], [17])

  with caplog.at_level(logging.WARNING):
    dropped = convert.import_checkpoint(str(ckpt), _small_config(5),
                                        str(tmp_path / "other"))
  assert "Dropping the head" in caplog.text and "(12, 7)" in caplog.text
  assert dropped.params["head"]["kernel"].shape == (12, 5)
  np.testing.assert_array_equal(dropped.batch_stats["head"]["batch_mean"],
                                [20.0])

  with pytest.raises(ValueError, match="already holds checkpoints"):
    convert.import_checkpoint(str(ckpt), _small_config(5),
                              str(tmp_path / "other"))


def test_head_entries_follow_the_head_kind(tmp_path):
  kernel = np.ones((12, 5), np.float32)
  stats = {"batch_mean": np.full(1, 21.0), "batch_std": np.full(1, 4.0)}
  adaface = convert.head_to_torch({"kernel": kernel}, stats, "adaface")
  assert list(adaface) == ["kernel", "t", "batch_mean", "batch_std"]
  assert adaface["batch_std"].dtype == np.float32
  assert list(convert.head_to_torch({"kernel": kernel}, None, "cosface")) == [
      "kernel"]
  with pytest.raises(convert.ConversionError, match="batch_mean"):
    convert.head_to_torch({"kernel": kernel}, {}, "adaface")

  # A CosFace config takes the kernel and keeps no norm statistics, as the
  # train state of a CosFace run has none.
  pytest.importorskip("torch")
  ckpt = tmp_path / "released.ckpt"
  _write_released(ckpt, _small_state_dict(), kernel)
  config = _small_config(5)
  config.head.name = "cosface"
  state = convert.import_checkpoint(str(ckpt), config, str(tmp_path / "cos"))
  assert "head" not in state.batch_stats
  np.testing.assert_array_equal(state.params["head"]["kernel"], kernel)


def test_pickled_objects_need_trust_pickle(tmp_path):
  pytest.importorskip("torch")
  ckpt = tmp_path / "lightning.ckpt"
  _write_released(ckpt, _small_state_dict(),
                  np.zeros((12, 5), np.float32),
                  extra={"hyper_parameters": argparse.Namespace(lr=0.1)})
  with pytest.raises(convert.ConversionError, match="--trust-pickle"):
    convert.load_torch_file(str(ckpt))
  contents = convert.load_torch_file(str(ckpt), trust_pickle=True)
  assert contents["hyper_parameters"].lr == 0.1

  garbage = tmp_path / "garbage.ckpt"
  garbage.write_bytes(b"not a checkpoint")
  with pytest.raises(convert.ConversionError, match="garbage.ckpt"):
    convert.load_torch_file(str(garbage))


def test_cli_reports_errors_without_a_traceback(tmp_path):
  config_file = tmp_path / "config.py"
  config_file.write_text(
      "from configs import common\n\n\ndef get_config():\n"
      "  return common.get_base_config()\n")
  result = subprocess.run(
      [sys.executable, "-m", "adaface_jax.convert", "from-torch", "--input",
       str(tmp_path / "absent.ckpt"), "--config", str(config_file),
       "--workdir", str(tmp_path / "out")],
      capture_output=True, text=True, check=False)
  assert result.returncode == 1
  assert "absent.ckpt" in result.stderr and "does not exist" in result.stderr
  assert "Traceback" not in result.stderr
