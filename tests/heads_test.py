"""Tests for the margin heads, against the PyTorch reference's golden vectors.

Each golden file holds five successive calls of one reference head (batch 8,
embedding 16, classes 10): inputs, logits, loss and gradients, and for
AdaFace the running norm statistics around each call.

Tolerances. float32: logits are s * cos with |cos| <= 1, and the matmul plus
the acos/cos round trip (applied to every entry, as in the reference) cost a
few ulp of a cosine (ulp(1) = 1.2e-7); allow 1e-6 of a cosine, times s
(measured: 1.4e-5 absolute on the logits). Gradients go through
acos' = -1 / sqrt(1 - cos^2), up to 22 at the 1e-3 clamp, which amplifies
those ulp; allow 1e-4 relative plus 1e-5 of the tensor's largest entry
(measured: below 2e-6 of it). float64: the same computation agrees to about
1e-13 relative; allow 1e-10.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaface_jax import heads

_ADAFACE_F32 = "adaface_talpha0.01_float32.npz"
_ADAFACE_F64 = "adaface_talpha0.01_float64.npz"
_ARCFACE_F32 = "arcface_float32.npz"
_COSFACE_F32 = "cosface_float32.npz"
_FLOAT32_FILES = (_ADAFACE_F32, _ARCFACE_F32, _COSFACE_F32)

_FLOAT32_TOL = {
    "logits": {"atol": 64.0 * 1e-6},
    "loss": {"rtol": 1e-6},
    "grads": {"rtol": 1e-4, "atol_of_max": 1e-5},
    "stats": {"rtol": 1e-6},
    "margin_scaler": {"atol": 1e-6},
}
_FLOAT64_TOL = {
    group: {"rtol": 1e-10, "atol_of_max": 1e-12} for group in _FLOAT32_TOL}


def _load(golden_dir, name):
  with np.load(golden_dir / name) as golden:
    return {key: golden[key] for key in golden.files}


def _assert_close(got, want, tol, what):
  """allclose with `tol` = {rtol, atol, atol_of_max (times max |want|)}."""
  want = np.asarray(want, np.float64)
  atol = tol.get("atol", 0.0)
  atol += tol.get("atol_of_max", 0.0) * float(np.max(np.abs(want)))
  np.testing.assert_allclose(
      np.asarray(got, np.float64), want, rtol=tol.get("rtol", 0.0),
      atol=atol, err_msg=what)


def _head_fn(golden):
  """The pure head function of a golden file, with its hyperparameters."""
  kind = str(golden["kind"])
  m, s = float(golden["m"]), float(golden["s"])
  if kind == "adaface":
    hparams = dict(
        m=m, h=float(golden["h"]), s=s, t_alpha=float(golden["t_alpha"]))

    def head(embeddings, feature_norms, labels, kernel, norm_stats):
      return heads.adaface_logits(
          embeddings, feature_norms, labels, kernel, norm_stats, **hparams)

    return head

  margin_logits = {
      "cosface": heads.cosface_logits, "arcface": heads.arcface_logits}[kind]

  def head(embeddings, feature_norms, labels, kernel, norm_stats):
    del feature_norms
    logits = margin_logits(embeddings, labels, kernel, m=m, s=s)
    return logits, norm_stats, None

  return head


def _golden_step_fns(golden):
  """Jitted (loss, aux, grads) from embeddings and grad wrt raw features."""
  head = _head_fn(golden)

  def loss_from_embeddings(embeddings, kernel, feature_norms, labels, stats):
    logits, new_stats, margin_scaler = head(
        embeddings, feature_norms, labels, kernel, stats)
    loss = heads.cross_entropy_loss(logits, labels)
    return loss, (logits, new_stats, margin_scaler)

  def loss_from_raw(raw, kernel, labels, stats):
    # The norms are differentiated through the normalisation, as in the
    # backbone; the head itself must stop their gradient.
    feature_norms = jnp.linalg.norm(raw, axis=1, keepdims=True)
    embeddings = raw / feature_norms
    return loss_from_embeddings(
        embeddings, kernel, feature_norms, labels, stats)[0]

  grad_embeddings = jax.jit(
      jax.value_and_grad(loss_from_embeddings, (0, 1), has_aux=True))
  grad_raw = jax.jit(jax.grad(loss_from_raw))
  return grad_embeddings, grad_raw


def _initial_stats(golden):
  if str(golden["kind"]) != "adaface":
    return None
  return {
      "batch_mean": jnp.asarray(golden["batch_mean_init"]),
      "batch_std": jnp.asarray(golden["batch_std_init"]),
  }


def _check_golden_steps(golden, tol):
  """Runs the five steps in order, carrying the statistics between them."""
  grad_embeddings_fn, grad_raw_fn = _golden_step_fns(golden)
  kernel = jnp.asarray(golden["kernel"])
  stats = _initial_stats(golden)

  for step in range(int(golden["n_steps"])):
    key = f"step{step}_"
    labels = jnp.asarray(golden[key + "labels"])
    raw = jnp.asarray(golden[key + "raw"])
    (loss, (logits, new_stats, margin_scaler)), grads = grad_embeddings_fn(
        jnp.asarray(golden[key + "embeddings"]), kernel,
        jnp.asarray(golden[key + "norms"]), labels, stats)
    grad_raw = grad_raw_fn(raw, kernel, labels, stats)

    assert logits.dtype == golden[key + "logits"].dtype
    _assert_close(logits, golden[key + "logits"], tol["logits"], key + "logits")
    _assert_close(loss, golden[key + "loss"], tol["loss"], key + "loss")
    _assert_close(grads[0], golden[key + "grad_embeddings"], tol["grads"],
                  key + "grad_embeddings")
    _assert_close(grads[1], golden[key + "grad_kernel"], tol["grads"],
                  key + "grad_kernel")

    # grad_raw carries a 1/norm factor (norms span 5e-4 to 250 at step 3);
    # compare it with that factor removed so one tolerance fits every row.
    norms = golden[key + "norms"]
    _assert_close(grad_raw * norms, golden[key + "grad_raw"] * norms,
                  tol["grads"], key + "grad_raw")

    if stats is not None:
      for name in ("batch_mean", "batch_std"):
        _assert_close(stats[name], golden[key + name + "_before"],
                      tol["stats"], key + name + "_before")
        _assert_close(new_stats[name], golden[key + name + "_after"],
                      tol["stats"], key + name + "_after")
      _assert_close(margin_scaler, golden[key + "margin_scaler"],
                    tol["margin_scaler"], key + "margin_scaler")
    stats = new_stats


@pytest.mark.parametrize("name", _FLOAT32_FILES)
def test_heads_match_golden_float32(golden_dir, name):
  _check_golden_steps(_load(golden_dir, name), _FLOAT32_TOL)


def test_adaface_matches_golden_float64(golden_dir):
  golden = _load(golden_dir, _ADAFACE_F64)
  with jax.enable_x64(True):
    _check_golden_steps(golden, _FLOAT64_TOL)


@pytest.mark.parametrize("name", _FLOAT32_FILES)
def test_margin_head_module_matches_golden(golden_dir, name):
  golden = _load(golden_dir, name)
  kind = str(golden["kind"])
  head = heads.MarginHead(
      kind=kind, num_classes=int(golden["classnum"]), m=float(golden["m"]),
      h=float(golden.get("h", 0.333)), s=float(golden["s"]),
      t_alpha=float(golden.get("t_alpha", 0.01)))
  variables = head.init(
      jax.random.key(0), jnp.asarray(golden["step0_embeddings"]),
      jnp.asarray(golden["step0_norms"]), jnp.asarray(golden["step0_labels"]))
  variables = {**variables, "params": {"kernel": jnp.asarray(golden["kernel"])}}
  apply = jax.jit(
      lambda variables, *batch: head.apply(
          variables, *batch, mutable=["batch_stats"]))

  for step in range(int(golden["n_steps"])):
    key = f"step{step}_"
    (logits, aux), updates = apply(
        variables, jnp.asarray(golden[key + "embeddings"]),
        jnp.asarray(golden[key + "norms"]), jnp.asarray(golden[key + "labels"]))
    variables = {**variables, **updates}

    _assert_close(logits, golden[key + "logits"], _FLOAT32_TOL["logits"],
                  key + "logits")
    if kind == "adaface":
      _assert_close(aux["margin_scaler"], golden[key + "margin_scaler"],
                    _FLOAT32_TOL["margin_scaler"], key + "margin_scaler")
      _assert_close(aux["batch_mean"], golden[key + "batch_mean_after"][0],
                    _FLOAT32_TOL["stats"], key + "aux batch_mean")
    else:
      assert not updates
      np.testing.assert_array_equal(
          aux["margin_scaler"], np.zeros((logits.shape[0], 1)))

  if kind == "adaface":
    stored = variables["batch_stats"]
    for name in ("batch_mean", "batch_std"):
      assert stored[name].dtype == jnp.float32
      _assert_close(stored[name], golden[f"step4_{name}_after"],
                    _FLOAT32_TOL["stats"], "stored " + name)


def _random_batch(seed, batch=8, dim=16, num_classes=10, dtype=np.float32):
  """Unit embeddings, norms in [5, 40], labels and a (dim, C) kernel."""
  rng = np.random.default_rng(seed)
  raw = rng.normal(size=(batch, dim))
  embeddings = raw / np.linalg.norm(raw, axis=1, keepdims=True)
  feature_norms = rng.uniform(5.0, 40.0, size=(batch, 1))
  labels = rng.integers(0, num_classes, size=(batch,))
  kernel = rng.uniform(-1.0, 1.0, size=(dim, num_classes))

  # One embedding on its class column, so the +1 cosine clamp is exercised.
  embeddings[0] = kernel[:, labels[0]] / np.linalg.norm(kernel[:, labels[0]])
  return (jnp.asarray(embeddings, dtype), jnp.asarray(feature_norms, dtype),
          jnp.asarray(labels, jnp.int32), jnp.asarray(kernel, dtype))


def _stats(mean, std):
  return {"batch_mean": jnp.array([mean], jnp.float32),
          "batch_std": jnp.array([std], jnp.float32)}


def test_margin_head_init_leaves_initial_statistics():
  embeddings, feature_norms, labels, _ = _random_batch(0)
  head = heads.MarginHead(kind="adaface", num_classes=10, m=0.4)
  variables = head.init(jax.random.key(0), embeddings, feature_norms, labels)

  assert variables["params"]["kernel"].shape == (16, 10)
  np.testing.assert_array_equal(
      variables["batch_stats"]["batch_mean"], np.array([20.0], np.float32))
  np.testing.assert_array_equal(
      variables["batch_stats"]["batch_std"], np.array([100.0], np.float32))


def test_margin_head_without_mutable_uses_but_does_not_store():
  embeddings, feature_norms, labels, _ = _random_batch(1)
  head = heads.MarginHead(kind="adaface", num_classes=10, m=0.4, t_alpha=0.5)
  variables = head.init(jax.random.key(0), embeddings, feature_norms, labels)

  (logits_mutable, aux_mutable), updates = head.apply(
      variables, embeddings, feature_norms, labels, mutable=["batch_stats"])
  logits, aux = head.apply(variables, embeddings, feature_norms, labels)

  np.testing.assert_array_equal(logits, logits_mutable)
  np.testing.assert_array_equal(aux["batch_mean"], aux_mutable["batch_mean"])
  np.testing.assert_array_equal(
      updates["batch_stats"]["batch_mean"], aux["batch_mean"][None])
  assert float(aux["batch_mean"]) != 20.0


def test_margin_head_cosface_has_no_statistics():
  embeddings, feature_norms, labels, _ = _random_batch(2)
  head = heads.MarginHead(kind="cosface", num_classes=10, m=0.4)
  variables = head.init(jax.random.key(0), embeddings, feature_norms, labels)
  assert set(variables) == {"params"}


def test_margin_head_rejects_unknown_kind():
  with pytest.raises(ValueError, match="sphereface.*adaface"):
    heads.MarginHead(kind="sphereface", num_classes=10, m=0.4)


def test_adaface_with_zero_scaler_is_cosface():
  embeddings, feature_norms, labels, kernel = _random_batch(3)
  logits, _, margin_scaler = heads.adaface_logits(
      embeddings, feature_norms, labels, kernel, _stats(20.0, 100.0), h=0.0)

  # Same cosine clamp as AdaFace (the reference's CosFace uses 1e-4), so the
  # two differ only by AdaFace's acos/cos round trip.
  cosface = heads.cosface_logits(embeddings, labels, kernel, eps=1e-3)

  np.testing.assert_array_equal(margin_scaler, np.zeros((8, 1)))
  np.testing.assert_allclose(logits, cosface, rtol=0.0, atol=64.0 * 1e-6)


def test_adaface_at_minus_one_is_arcface():
  embeddings, feature_norms, labels, kernel = _random_batch(4)

  # Far-above-batch mean, frozen (t_alpha=0): every h * z is below -1.
  logits, _, margin_scaler = heads.adaface_logits(
      embeddings, feature_norms, labels, kernel, _stats(1e4, 1.0), t_alpha=0.0)
  arcface = heads.arcface_logits(embeddings, labels, kernel, m=0.4, eps=1e-3)

  np.testing.assert_array_equal(margin_scaler, -np.ones((8, 1)))
  np.testing.assert_allclose(logits, arcface, rtol=0.0, atol=64.0 * 1e-6)


def test_adaface_at_plus_one_gives_negative_angle_and_double_additive():
  embeddings, feature_norms, labels, kernel = _random_batch(5)
  m, s, eps = 0.4, 64.0, 1e-3
  logits, _, margin_scaler = heads.adaface_logits(
      embeddings, feature_norms, labels, kernel, _stats(0.0, 1e-3),
      m=m, s=s, t_alpha=0.0, eps=eps)

  cosine = np.clip(
      np.asarray(embeddings, np.float64)
      @ np.asarray(heads.normalize_kernel(kernel), np.float64),
      -1 + eps, 1 - eps)
  rows = np.arange(8)
  theta = np.arccos(cosine[rows, labels])
  target = s * (np.cos(np.clip(theta - m, eps, math.pi - eps)) - 2 * m)

  np.testing.assert_array_equal(margin_scaler, np.ones((8, 1)))
  np.testing.assert_allclose(
      logits[rows, labels], target, rtol=0.0, atol=s * 1e-5)


def test_no_gradient_reaches_feature_norms_or_statistics():
  embeddings, feature_norms, labels, kernel = _random_batch(6)

  def loss(feature_norms, norm_stats):
    logits, _, _ = heads.adaface_logits(
        embeddings, feature_norms, labels, kernel, norm_stats, t_alpha=0.5)
    return heads.cross_entropy_loss(logits, labels)

  # With these statistics h * z is inside (-1, 1), so a missing
  # stop_gradient would give non-zero gradients.
  grad_norms, grad_stats = jax.grad(loss, (0, 1))(
      feature_norms, _stats(20.0, 10.0))

  np.testing.assert_array_equal(grad_norms, np.zeros((8, 1)))
  np.testing.assert_array_equal(grad_stats["batch_mean"], np.zeros(1))
  np.testing.assert_array_equal(grad_stats["batch_std"], np.zeros(1))


def test_adaface_statistics_clip_norms_and_use_unbiased_std():
  embeddings, _, labels, kernel = _random_batch(7)
  feature_norms = jnp.array(
      [[5e-4], [250.0], [10.0], [30.0], [12.0], [7.0], [44.0], [3.0]])
  old = _stats(20.0, 100.0)
  _, new, _ = heads.adaface_logits(
      embeddings, feature_norms, labels, kernel, old, t_alpha=0.25)

  clipped = np.clip(np.asarray(feature_norms, np.float64), 1e-3, 100.0)
  expected_mean = 0.25 * clipped.mean() + 0.75 * 20.0
  expected_std = 0.25 * clipped.std(ddof=1) + 0.75 * 100.0
  np.testing.assert_allclose(new["batch_mean"], [expected_mean], rtol=1e-6)
  np.testing.assert_allclose(new["batch_std"], [expected_std], rtol=1e-6)
  assert new["batch_mean"].dtype == jnp.float32


def test_cross_entropy_matches_log_softmax():
  rng = np.random.default_rng(8)
  logits = rng.normal(scale=20.0, size=(6, 10))
  labels = rng.integers(0, 10, size=(6,))
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  expected = -log_probs[np.arange(6), labels].mean()

  loss = heads.cross_entropy_loss(
      jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize("bad_label", [-1, 10])
def test_out_of_range_label_gets_no_margin_and_nan_loss(bad_label):
  embeddings, _, labels, kernel = _random_batch(9)
  labels = labels.at[2].set(bad_label)
  logits = heads.cosface_logits(embeddings, labels, kernel)
  plain = heads.cosface_logits(embeddings, labels, kernel, m=0.0)

  np.testing.assert_array_equal(logits[2], plain[2])
  assert np.isnan(heads.cross_entropy_loss(logits, labels))
  assert np.isfinite(heads.cross_entropy_loss(logits, labels.at[2].set(0)))


def test_bfloat16_embeddings_are_computed_in_float32():
  embeddings, feature_norms, labels, kernel = _random_batch(10)
  embeddings_bf16 = embeddings.astype(jnp.bfloat16)
  logits, stats, _ = heads.adaface_logits(
      embeddings_bf16, feature_norms.astype(jnp.bfloat16), labels, kernel,
      _stats(20.0, 100.0))
  expected, _, _ = heads.adaface_logits(
      embeddings_bf16.astype(jnp.float32),
      feature_norms.astype(jnp.bfloat16).astype(jnp.float32), labels,
      kernel, _stats(20.0, 100.0))

  assert logits.dtype == jnp.float32
  assert stats["batch_mean"].dtype == jnp.float32
  np.testing.assert_array_equal(logits, expected)


def test_kernel_init_matches_torch_renorm():
  torch = pytest.importorskip("torch")
  key = jax.random.key(11)
  kernel = heads.kernel_init(key, (16, 10))
  uniform = np.array(jax.random.uniform(key, (16, 10), jnp.float32, -1, 1))
  expected = torch.from_numpy(uniform).renorm(2, 1, 1e-5).mul(1e5).numpy()

  assert kernel.dtype == jnp.float32
  np.testing.assert_allclose(kernel, expected, rtol=1e-6, atol=0.0)
  column_norms = np.linalg.norm(np.asarray(kernel, np.float64), axis=0)
  np.testing.assert_allclose(column_norms, np.ones(10), rtol=0.0, atol=1e-6)


def test_normalize_kernel_gives_unit_columns():
  kernel = jnp.asarray(np.random.default_rng(12).normal(size=(16, 10)) * 3.0)
  column_norms = np.linalg.norm(heads.normalize_kernel(kernel), axis=0)
  np.testing.assert_allclose(column_norms, np.ones(10), rtol=1e-6)


def test_inconsistent_shapes_raise():
  embeddings, feature_norms, labels, kernel = _random_batch(13)
  stats = _stats(20.0, 100.0)
  with pytest.raises(ValueError, match="feature_norms"):
    heads.adaface_logits(embeddings, feature_norms[:, 0], labels, kernel, stats)
  with pytest.raises(ValueError, match="kernel"):
    heads.arcface_logits(embeddings, labels, kernel[:8])
  with pytest.raises(ValueError, match="labels"):
    heads.cosface_logits(embeddings, labels[:4], kernel)
  with pytest.raises(ValueError, match="batch >= 2"):
    heads.adaface_logits(
        embeddings[:1], feature_norms[:1], labels[:1], kernel, stats)
