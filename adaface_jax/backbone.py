"""IR-ResNet backbones with the exact structure of the AdaFace reference.

Images come in NHWC, BGR, normalised to [-1, 1]. The network follows the
reference layer by layer (pre-activation "IR" units, stride on the second
convolution, strided-subsample shortcuts, per-channel PReLU, a BN2d ->
dropout -> flatten -> dense -> BN1d output stem) so that weights convert to
and from the PyTorch state_dict one to one. Module names mirror the
state_dict structure: `input_layer`, `body_<i>`, `output_layer`.
"""

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

# Units per stage of the basic-block variants. The reference names the
# 100-layer network `ir_101`; both names build the same table.
STAGE_UNITS = {
    "ir_18": (2, 2, 2, 2),
    "ir_34": (3, 4, 6, 3),
    "ir_50": (3, 4, 14, 3),
    "ir_100": (3, 13, 30, 3),
    "ir_101": (3, 13, 30, 3),
}
STAGE_WIDTHS = (64, 128, 256, 512)

# PyTorch's kaiming_normal_(mode="fan_out", nonlinearity="relu"): a plain
# (not truncated) normal with variance 2 / fan_out.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# 3x3 convolutions pad one pixel on every side, as PyTorch's padding=1.
# Flax's "SAME" pads (0, 1) for stride 2 on even sizes, which shifts the grid.
SYMMETRIC_PAD = ((1, 1), (1, 1))

_NHWC = ("NHWC", "HWIO", "NHWC")

# Input gradient of a stride-2 3x3 convolution, one output parity at a time.
# Along one axis, input pixel 2i takes kernel tap 1 of output i, and pixel
# 2i + 1 takes tap 2 of output i and tap 0 of output i + 1: parity ->
# ((output offset, kernel tap), ...).
_PHASE_TAPS = {0: ((0, 1),), 1: ((0, 2), (1, 0))}


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides,
                         padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1,
                         precision=None) -> jax.Array:
  """`lax.conv_general_dilated` whose stride-2 3x3 case trains fast on CPU.

  XLA differentiates a strided convolution into an input-dilated one, which
  its CPU backend runs at a fraction of the speed of a plain convolution
  (about 17 vs 110 GFLOP/s on the IR-ResNet's first stride-2 layer). For
  the backbone's stride-2 3x3 convolutions (NHWC, padding 1, even input
  sizes) the input gradient is computed instead as four stride-1
  convolutions, one per output parity, interleaved: the same products,
  summed in another order. Other platforms keep XLA's own gradient; the
  forward pass and every other convolution are unchanged.
  """
  strided_3x3 = (
      tuple(window_strides) == (2, 2)
      and tuple(map(tuple, padding)) == SYMMETRIC_PAD
      and rhs.shape[:2] == (3, 3) and lhs.ndim == 4
      and lhs.shape[1] % 2 == 0 and lhs.shape[2] % 2 == 0
      and not any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
      and feature_group_count == 1 and precision is None
      and dimension_numbers == lax.conv_dimension_numbers(
          lhs.shape, rhs.shape, _NHWC))
  if strided_3x3:
    return _conv3x3_stride2(lhs, rhs)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision)


def _lax_conv3x3_stride2(images: jax.Array, kernel: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(images, kernel, (2, 2), SYMMETRIC_PAD,
                                  dimension_numbers=_NHWC)


@jax.custom_vjp
def _conv3x3_stride2(images: jax.Array, kernel: jax.Array) -> jax.Array:
  return _lax_conv3x3_stride2(images, kernel)


def _conv3x3_stride2_fwd(images, kernel):
  return _lax_conv3x3_stride2(images, kernel), (images, kernel)


def _conv3x3_stride2_bwd(residuals, grads):
  images, kernel = residuals
  _, kernel_vjp = jax.vjp(lambda k: _lax_conv3x3_stride2(images, k), kernel)
  (kernel_grads,) = kernel_vjp(grads)
  image_spec = jax.ShapeDtypeStruct(images.shape, images.dtype)

  def xla_image_grads(grads, kernel):
    transpose = jax.linear_transpose(
        lambda x: _lax_conv3x3_stride2(x, kernel), image_spec)
    return transpose(grads)[0]

  image_grads = lax.platform_dependent(
      grads, kernel, cpu=_stride2_image_grads, default=xla_image_grads)
  return image_grads, kernel_grads


_conv3x3_stride2.defvjp(_conv3x3_stride2_fwd, _conv3x3_stride2_bwd)


def _stride2_image_grads(grads: jax.Array, kernel: jax.Array) -> jax.Array:
  """Input gradient of a stride-2 3x3 convolution (padding 1).

  Args:
    grads: [batch, h, w, out] gradient w.r.t. the convolution's output.
    kernel: [3, 3, in, out].

  Returns:
    [batch, 2h, 2w, in]: for each parity (a, b) a stride-1 convolution of
    `grads` with the taps `_PHASE_TAPS` gives pixels (2i + a, 2j + b).
  """
  def phase(a, b):
    rows, cols = _PHASE_TAPS[a], _PHASE_TAPS[b]
    taps = jnp.stack([jnp.stack([kernel[kh, kw] for _, kw in cols])
                      for _, kh in rows])
    # Output channels are contracted: the taps' in/out axes swap.
    taps = jnp.swapaxes(taps, 2, 3)
    # Offset 1 reads the next output, zero past the last one.
    padding = ((0, len(rows) - 1), (0, len(cols) - 1))
    return lax.conv_general_dilated(grads, taps, (1, 1), padding,
                                    dimension_numbers=_NHWC)

  batch, height, width, _ = grads.shape
  # [batch, h, 2 (row parity), w, 2 (column parity), in].
  phases = jnp.stack(
      [jnp.stack([phase(a, 0), phase(a, 1)], axis=3) for a in (0, 1)],
      axis=2)
  return phases.reshape(batch, 2 * height, 2 * width, kernel.shape[2])


class BatchNorm(nn.Module):
  """Batch normalisation with PyTorch's conventions.

  Normalises with the batch's biased variance in training and with the
  running statistics in evaluation, like `torch.nn.BatchNorm*d`. The running
  variance is updated with the unbiased batch variance (n / (n - 1)) when
  `unbiased_running_var` is set, as PyTorch does; Flax's own BatchNorm uses
  the biased one. Statistics are computed in float32 whatever the input
  dtype. Under `jit` with a batch sharded over devices the means are global.

  Attributes:
    momentum: weight of the running value (PyTorch momentum 0.1 is 0.9 here).
    epsilon: added to the variance inside the square root.
    use_affine: learn a per-channel `scale` and `bias`.
    unbiased_running_var: update the running variance as PyTorch does.
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  use_affine: bool = True
  unbiased_running_var: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    reduce_axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable(
        "batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
    ra_var = self.variable(
        "batch_stats", "var", lambda: jnp.ones(features, jnp.float32))

    x32 = x.astype(jnp.float32)
    if train:
      mean = jnp.mean(x32, axis=reduce_axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=reduce_axes)
      if not self.is_initializing():
        count = x.size // features
        running_var = var * count / max(count - 1, 1)
        if not self.unbiased_running_var:
          running_var = var
        ra_mean.value = (
            self.momentum * ra_mean.value + (1 - self.momentum) * mean)
        ra_var.value = (
            self.momentum * ra_var.value + (1 - self.momentum) * running_var)
    else:
      mean, var = ra_mean.value, ra_var.value

    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_affine:
      scale = self.param("scale", nn.initializers.ones, (features,))
      bias = self.param("bias", nn.initializers.zeros, (features,))
      y = y * scale + bias
    return y.astype(x.dtype)


class PReLU(nn.Module):
  """PReLU with one slope per channel, initialised to 0.25 (as PyTorch).

  Flax's own PReLU has a single scalar slope initialised to 0.01.
  """

  init_slope: float = 0.25

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    slope = self.param(
        "slope", nn.initializers.constant(self.init_slope), (x.shape[-1],))
    return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


class IRUnit(nn.Module):
  """One pre-activation IR unit: BN-conv-BN-PReLU-conv(stride)-BN + shortcut.

  The stride sits on the second 3x3 convolution. The shortcut is a strided
  subsample when the width does not change (the reference's 1x1 max-pool),
  else a strided 1x1 convolution followed by BN. No activation after the add.
  """

  features: int
  strides: int
  dtype: jnp.dtype = jnp.float32
  unbiased_running_var: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda features, kernel, strides, padding, name: nn.Conv(
        features, kernel, strides, padding=padding, use_bias=False,
        kernel_init=kaiming_fan_out, dtype=self.dtype,
        conv_general_dilated=conv_general_dilated, name=name)
    norm = lambda name: BatchNorm(
        unbiased_running_var=self.unbiased_running_var, name=name)

    residual = norm("res_bn1")(x, train)
    residual = conv(self.features, (3, 3), 1, SYMMETRIC_PAD, "res_conv1")(
        residual)
    residual = norm("res_bn2")(residual, train)
    residual = PReLU(name="res_prelu")(residual)
    residual = conv(
        self.features, (3, 3), self.strides, SYMMETRIC_PAD, "res_conv2")(
            residual)
    residual = norm("res_bn3")(residual, train)

    # A strided 1x1 convolution reads every `strides`-th pixel: subsampling
    # first is the same arithmetic, and its gradient is a plain matrix
    # product instead of an input-dilated convolution.
    shortcut = x[:, ::self.strides, ::self.strides, :]
    if x.shape[-1] != self.features:
      shortcut = conv(self.features, (1, 1), 1, "VALID", "shortcut_conv")(
          shortcut)
      shortcut = norm("shortcut_bn")(shortcut, train)
    return residual + shortcut


class IResNet(nn.Module):
  """IR-ResNet face embedding network.

  Attributes:
    stage_units: units per stage, e.g. (3, 4, 14, 3) for ir_50.
    stage_widths: output channels per stage; the stem has the first width.
    embedding_size: size of the face embedding.
    dropout_rate: element-wise dropout on the last feature map in training.
    dtype: computation dtype of convolutions and the dense layer; batch
      statistics and parameters stay float32.
    unbiased_running_var: BatchNorm running variance as PyTorch updates it.
    remat_stages: stages (0-based) whose units recompute their activations
      in the backward pass instead of keeping them (memory for compute).
  """

  stage_units: Sequence[int] = STAGE_UNITS["ir_50"]
  stage_widths: Sequence[int] = STAGE_WIDTHS
  embedding_size: int = 512
  dropout_rate: float = 0.4
  dtype: jnp.dtype = jnp.float32
  unbiased_running_var: bool = True
  remat_stages: Sequence[int] = ()

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False):
    """Embeds a batch of aligned faces.

    Args:
      images: [batch, 112, 112, 3] BGR images in [-1, 1].
      train: batch statistics and dropout (needs a "dropout" rng) when True.

    Returns:
      embeddings: [batch, embedding_size] float32 unit vectors.
      feature_norms: [batch, 1] float32 L2 norms of the features before
        normalisation (the AdaFace image-quality proxy).
    """
    norm = lambda name: BatchNorm(
        unbiased_running_var=self.unbiased_running_var, name=name)
    x = images.astype(self.dtype)

    stem_width = self.stage_widths[0]
    x = nn.Conv(stem_width, (3, 3), 1, padding=SYMMETRIC_PAD, use_bias=False,
                kernel_init=kaiming_fan_out, dtype=self.dtype,
                name="input_layer_conv")(x)
    x = norm("input_layer_bn")(x, train)
    x = PReLU(name="input_layer_prelu")(x)

    index = 0
    for stage, (units, width) in enumerate(
        zip(self.stage_units, self.stage_widths)):
      unit_type = IRUnit
      if stage in self.remat_stages:
        # `train` (argument 2, counting the module) steers Python control
        # flow, so it must stay static under the checkpoint.
        unit_type = nn.remat(IRUnit, static_argnums=(2,))
      for unit in range(units):
        x = unit_type(width, 2 if unit == 0 else 1, self.dtype,
                      self.unbiased_running_var, name=f"body_{index}")(
                          x, train)
        index += 1

    x = norm("output_layer_bn2d")(x, train)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # The reference flattens NCHW feature maps channel-major; flattening in
    # the same order keeps the dense kernel identical to the PyTorch one.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = nn.Dense(self.embedding_size, kernel_init=kaiming_fan_out,
                 dtype=self.dtype, name="output_layer_dense")(x)
    features = BatchNorm(use_affine=False,
                         unbiased_running_var=self.unbiased_running_var,
                         name="output_layer_bn1d")(x, train)

    features = features.astype(jnp.float32)
    feature_norms = jnp.linalg.norm(features, axis=-1, keepdims=True)
    # No epsilon, as the reference: a zero feature vector is not expected
    # after an affine-free BatchNorm.
    embeddings = features / feature_norms
    return embeddings, feature_norms


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """Resolved architecture of a named or custom IR-ResNet."""

  stage_units: tuple[int, ...]
  stage_widths: tuple[int, ...]


def resolve_spec(name: str, stage_units=None,
                 stage_widths=None) -> BackboneSpec:
  """Looks up `name` and applies optional width/depth overrides.

  Args:
    name: one of `STAGE_UNITS`, or "custom" (then both overrides are needed).
    stage_units: optional units per stage replacing the table's.
    stage_widths: optional stage widths replacing (64, 128, 256, 512).
  """
  if name == "custom":
    if not stage_units or not stage_widths:
      raise ValueError(
          "model.name='custom' needs model.stage_units and model.stage_widths")
  elif name not in STAGE_UNITS:
    raise ValueError(
        f"unknown model.name {name!r}; choose one of "
        f"{sorted(STAGE_UNITS)} or 'custom'")
  units = tuple(stage_units or STAGE_UNITS[name])
  widths = tuple(stage_widths or STAGE_WIDTHS)
  if len(units) != len(widths):
    raise ValueError(
        f"model.stage_units {units} and model.stage_widths {widths} must "
        "have the same length")
  if any(u < 1 for u in units) or any(w < 1 for w in widths):
    raise ValueError(f"stage units {units} and widths {widths} must be >= 1")
  return BackboneSpec(units, widths)


def feature_map_size(image_size: int, num_stages: int) -> int:
  """Spatial size of the last feature map: each stage halves (rounding up)."""
  size = image_size
  for _ in range(num_stages):
    size = (size + 1) // 2
  return size
