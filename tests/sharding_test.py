"""The class-sharded classifier on simulated devices equals one device."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from adaface_jax import classifier
from adaface_jax import heads
from adaface_jax import sharding as sharding_lib

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def mesh_report():
  """Runs tests/mesh_equivalence.py with 8 simulated CPU devices."""
  result = subprocess.run(
      [sys.executable, os.path.join(TESTS_DIR, "mesh_equivalence.py"),
       "--devices", "8", "--steps", "3"],
      capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


# Tolerances, relative to the largest value of each tensor group: float32
# sums in a different order on each mesh give errors of a few 1e-7.
TOLERANCES = {"loss": 1e-6, "grads": 1e-5, "params": 1e-5, "momentum": 1e-5,
              "backbone_batch_stats": 1e-5, "adaface_stats": 1e-6}


@pytest.mark.parametrize("mesh", ["(8, 1)", "(4, 2)", "(2, 4)", "(1, 8)"])
def test_three_steps_match_single_device(mesh_report, mesh):
  errors = mesh_report["meshes"][mesh]
  for group, tolerance in TOLERANCES.items():
    assert errors[group] <= tolerance, (group, errors[group])
  model_shards = int(mesh.strip("()").split(",")[1])
  # 101 classes are padded to 104 on 8 shards, to 102 on 2, 104 on 4.
  expected = 101 if model_shards == 1 else -(-101 // model_shards)
  assert errors["kernel_shard_shape"] == [24, expected]


def test_no_collective_carries_the_class_dimension(mesh_report):
  assert "all-reduce" in mesh_report["collectives"]
  assert mesh_report["collectives_with_class_dim"] == []


def test_checkpoint_restores_onto_other_meshes(mesh_report):
  assert mesh_report["restore_max_abs_diff"] == 0.0
  assert mesh_report["restore_kernel_shard_shapes"] == {
      "(2, 4)": [24, 26], "(1, 1)": [24, 101]}


def _one_device_mesh():
  return sharding_lib.create_mesh(
      ml_collections.ConfigDict({"data": 1, "model": 1}), jax.devices()[:1])


def _inputs(batch=6, dim=8, classes=5, seed=0):
  rng = np.random.default_rng(seed)
  embeddings = rng.normal(size=(batch, dim)).astype(np.float32)
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  norms = rng.uniform(5, 40, (batch, 1)).astype(np.float32)
  labels = rng.integers(0, classes, batch).astype(np.int32)
  kernel = rng.normal(size=(dim, classes)).astype(np.float32)
  stats = {"batch_mean": np.full((1,), 20.0, np.float32),
           "batch_std": np.full((1,), 100.0, np.float32)}
  return embeddings, norms, labels, kernel, stats


@pytest.mark.parametrize("kind", ["adaface", "cosface", "arcface"])
def test_padded_classes_receive_no_probability(kind):
  embeddings, norms, labels, kernel, stats = _inputs()
  loss_fn = classifier.MarginSoftmax(kind, 5, m=0.4).loss_fn(
      _one_device_mesh())
  loss, aux = jax.jit(loss_fn)(embeddings, norms, labels, kernel, stats,
                               jax.random.key(0))
  padded = np.concatenate([kernel, np.ones((8, 3), np.float32)], axis=1)
  padded_loss, _ = jax.jit(loss_fn)(embeddings, norms, labels, padded, stats,
                                    jax.random.key(0))
  np.testing.assert_allclose(padded_loss, loss, rtol=1e-6)

  eps = heads.default_eps(kind)
  if kind == "adaface":
    logits, new_stats, _ = heads.adaface_logits(
        embeddings, norms, labels, kernel, stats)
    np.testing.assert_allclose(aux["norm_stats"]["batch_std"],
                               new_stats["batch_std"], rtol=1e-6)
  elif kind == "cosface":
    logits = heads.cosface_logits(embeddings, labels, kernel, eps=eps)
  else:
    logits = heads.arcface_logits(embeddings, labels, kernel, m=0.4, eps=eps)
  np.testing.assert_allclose(
      loss, heads.cross_entropy_loss(logits, labels), rtol=1e-6)


def test_sampling_keeps_positives_and_matches_full_softmax_when_complete():
  embeddings, norms, labels, kernel, stats = _inputs(classes=7)
  mesh = _one_device_mesh()
  full = classifier.MarginSoftmax("adaface", 7, m=0.4).loss_fn(mesh)
  every = classifier.MarginSoftmax(
      "adaface", 7, m=0.4, num_sampled=7).loss_fn(mesh)
  args = (embeddings, norms, labels, kernel, stats, jax.random.key(3))
  np.testing.assert_allclose(jax.jit(every)(*args)[0], jax.jit(full)(*args)[0],
                             rtol=1e-6)

  # With fewer columns than classes the loss drops the unsampled negatives
  # but keeps every positive: it is finite and below the full loss.
  some = classifier.MarginSoftmax(
      "adaface", 7, m=0.4, num_sampled=6).loss_fn(mesh)
  sampled_loss = jax.jit(some)(*args)[0]
  assert np.isfinite(sampled_loss)
  assert sampled_loss < jax.jit(full)(*args)[0]


def test_per_device_statistics_use_the_local_batch():
  embeddings, norms, labels, kernel, stats = _inputs()
  loss_fn = classifier.MarginSoftmax(
      "adaface", 5, m=0.4, per_device_norm_stats=True).loss_fn(
          _one_device_mesh())
  _, aux = jax.jit(loss_fn)(embeddings, norms, labels, kernel, stats,
                            jax.random.key(0))
  expected = 0.01 * np.std(norms, ddof=1) + 0.99 * 100.0
  np.testing.assert_allclose(aux["norm_stats"]["batch_std"], [expected],
                             rtol=1e-6)


def test_mesh_shape_errors():
  config = ml_collections.ConfigDict({"data": 3, "model": -1})
  with pytest.raises(ValueError, match="does not fit the 1 devices"):
    sharding_lib.create_mesh(config, jax.devices()[:1])
  assert sharding_lib.padded_class_count(
      101, sharding_lib.create_mesh(
          ml_collections.ConfigDict({"data": -1, "model": 1}),
          jax.devices()[:1])) == 101
