"""Structure of the IR-ResNet backbones: parameter counts, shapes, padding."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaface_jax import backbone


def _variables(model, size=112):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name, expected", [
    ("ir_18", 24_020_352),
    ("ir_50", 43_585_600),
    ("ir_101", 65_150_912),
    ("ir_100", 65_150_912),
])
def test_parameter_count_equals_reference(name, expected):
  model = backbone.IResNet(stage_units=backbone.STAGE_UNITS[name])
  assert _count(_variables(model)["params"]) == expected


def test_ir_18_layout():
  variables = _variables(backbone.IResNet(stage_units=(2, 2, 2, 2)))
  params = variables["params"]
  body = sorted(k for k in params if k.startswith("body_"))
  assert len(body) == 8
  # Shortcut convolutions only where the width changes: stages 2-4.
  with_shortcut = [k for k in body if "shortcut_conv" in params[k]]
  assert with_shortcut == ["body_2", "body_4", "body_6"]
  assert params["input_layer_prelu"]["slope"].shape == (64,)
  assert params["output_layer_dense"]["kernel"].shape == (512 * 7 * 7, 512)
  assert params["output_layer_dense"]["bias"].shape == (512,)
  # The final BatchNorm has no affine parameters, only running statistics.
  assert "output_layer_bn1d" not in params
  assert variables["batch_stats"]["output_layer_bn1d"]["var"].shape == (512,)


def test_outputs_are_unit_embeddings_and_norms():
  model = backbone.IResNet(stage_units=(1, 1), stage_widths=(8, 16),
                           embedding_size=32)
  images = jax.random.uniform(jax.random.key(1), (3, 112, 112, 3), minval=-1)
  variables = model.init(jax.random.key(0), images)
  embeddings, norms = model.apply(variables, images)
  assert embeddings.shape == (3, 32) and norms.shape == (3, 1)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, rtol=1e-5)
  assert np.all(np.asarray(norms) > 0)


def test_init_matches_reference_conventions():
  model = backbone.IResNet(stage_units=(1, 1), stage_widths=(16, 32),
                           embedding_size=64)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 112, 112, 3)))
  params = variables["params"]
  np.testing.assert_array_equal(params["input_layer_prelu"]["slope"], 0.25)
  np.testing.assert_array_equal(params["input_layer_bn"]["scale"], 1.0)
  np.testing.assert_array_equal(params["output_layer_dense"]["bias"], 0.0)
  # Kaiming normal, fan_out: std sqrt(2 / (out * kh * kw)), not truncated.
  kernel = np.asarray(params["body_1"]["res_conv1"]["kernel"])
  expected_std = np.sqrt(2 / (32 * 3 * 3))
  assert abs(kernel.std() / expected_std - 1) < 0.05
  assert np.abs(kernel).max() > 2.5 * expected_std


def test_strided_conv_pads_symmetrically():
  # A stride-2 3x3 convolution with pad (1, 1) sees the first row/column
  # centred on pixel 0; Flax "SAME" would centre on pixel 1.
  model = backbone.IResNet(stage_units=(1,), stage_widths=(4,),
                           embedding_size=8)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  conv = flax.linen.Conv(4, (3, 3), 2, padding=backbone.SYMMETRIC_PAD,
                         use_bias=False)
  x = jnp.zeros((1, 8, 8, 1)).at[0, 0, 0, 0].set(1.0)
  kernel = jnp.arange(9.0).reshape(3, 3, 1, 1) * jnp.ones((1, 1, 1, 4))
  y = conv.apply({"params": {"kernel": kernel}}, x)
  assert y.shape == (1, 4, 4, 4)
  # Output (0, 0) sees input (0, 0) at kernel tap (1, 1) = 4.
  assert float(y[0, 0, 0, 0]) == 4.0
  del variables


def test_train_mode_updates_running_statistics_unbiased():
  norm = backbone.BatchNorm()
  x = jax.random.normal(jax.random.key(0), (4, 3)) * 2 + 1
  variables = norm.init(jax.random.key(1), x, train=False)
  _, updated = norm.apply(variables, x, train=True, mutable=["batch_stats"])
  stats = updated["batch_stats"]
  xs = np.asarray(x, np.float64)
  np.testing.assert_allclose(stats["mean"], 0.1 * xs.mean(0), rtol=1e-5)
  np.testing.assert_allclose(
      stats["var"], 0.9 + 0.1 * xs.var(0, ddof=1), rtol=1e-5)


def test_resolve_spec_errors():
  with pytest.raises(ValueError, match="unknown model.name 'ir_99'"):
    backbone.resolve_spec("ir_99")
  with pytest.raises(ValueError, match="same length"):
    backbone.resolve_spec("custom", (1, 1), (8,))
  assert backbone.resolve_spec("ir_50").stage_units == (3, 4, 14, 3)
  assert backbone.resolve_spec("ir_18", None, (8, 16, 32, 64)).stage_widths == (
      8, 16, 32, 64)


@pytest.mark.parametrize("size", [(8, 10), (14, 14)])
def test_stride2_conv_gradients_equal_xla(size):
  """The stride-2 3x3 convolution's own input gradient (four stride-1
  convolutions, one per output parity) equals XLA's, as does the rest."""
  keys = jax.random.split(jax.random.key(0), 3)
  images = jax.random.normal(keys[0], (2, *size, 5))
  kernel = jax.random.normal(keys[1], (3, 3, 5, 7))
  numbers = jax.lax.conv_dimension_numbers(images.shape, kernel.shape,
                                           ("NHWC", "HWIO", "NHWC"))

  def conv_with(conv_fn):
    return lambda x, k: conv_fn(x, k, (2, 2), backbone.SYMMETRIC_PAD,
                                dimension_numbers=numbers)

  xla_conv = conv_with(jax.lax.conv_general_dilated)
  own_conv = conv_with(backbone.conv_general_dilated)
  output_grads = jax.random.normal(keys[2], xla_conv(images, kernel).shape)

  def grads(conv):
    loss = lambda x, k: jnp.sum(conv(x, k) * output_grads)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(images, kernel)

  np.testing.assert_allclose(own_conv(images, kernel),
                             xla_conv(images, kernel), rtol=1e-5, atol=1e-5)
  for own, xla in zip(grads(own_conv), grads(xla_conv)):
    np.testing.assert_allclose(own, xla, rtol=1e-5, atol=1e-5)

  # The custom gradient is really taken: XLA's would differentiate into an
  # input-dilated convolution.
  compiled = jax.jit(jax.grad(lambda x: jnp.sum(own_conv(x, kernel)))).lower(
      images).compile().as_text()
  assert "lhs_dilate" not in compiled or jax.default_backend() != "cpu"
