"""Margin-softmax classification heads: AdaFace, CosFace and ArcFace.

The pure functions reproduce the PyTorch reference heads of AdaFace (Kim,
Jain and Liu, CVPR 2022) operation by operation, clamps included, so that
their logits and gradients match the reference's golden vectors. `MarginHead`
is a thin Flax wrapper that owns the class-weight kernel and, for AdaFace,
the running statistics of the feature norms in the `batch_stats` collection.

Shapes: B is the batch size, D the embedding size, C the number of classes.
The kernel is (D, C), one column per class, like a Flax `Dense` kernel.
Everything from the cosine matmul onward runs in float32 at least (bf16
inputs are cast up, float64 stays float64), the matmul at full precision.

Labels are not checked inside the jitted computation (it cannot raise). A
label outside [0, C) gets no margin (its one-hot row is all zeros) and
`cross_entropy_loss` returns NaN, so the training loop's non-finite check
fails loudly; the data pipeline is where labels are validated.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

HEAD_KINDS = ("adaface", "cosface", "arcface")

NormStats = dict[str, jax.Array]

# torch's `renorm(2, 1, 1e-5).mul(1e5)`: columns are scaled to norm 1e-5 by
# dividing by (norm + 1e-7), then multiplied back up by 1e5.
_RENORM_MAX_NORM = 1e-5
_RENORM_EPS = 1e-7
_RENORM_UPSCALE = 1e5

# Bounds of the feature-norm clip before the statistics, as in the reference.
_NORM_MIN = 1e-3
_NORM_MAX = 100.0


def kernel_init(
    key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32
) -> jax.Array:
  """Initialises a (D, C) kernel as the reference heads do.

  Entries are drawn with `jax.random.uniform(key, shape, dtype, -1, 1)`; each
  column (L2 norm over axis 0) is then rescaled as torch's
  `renorm(2, 1, 1e-5).mul(1e5)`, which divides by `norm + 1e-7`, so the
  columns end at norm 1 - O(1e-7), not exactly 1.

  Args:
    key: PRNG key.
    shape: (embedding_dim, num_classes).
    dtype: floating dtype of the kernel.

  Returns:
    The kernel, `shape` and `dtype`.
  """
  kernel = jax.random.uniform(key, shape, dtype, minval=-1.0, maxval=1.0)
  norms = jnp.linalg.norm(kernel, axis=0, keepdims=True)

  # renorm only shrinks columns above the max norm; with U(-1, 1) entries
  # that is every column in practice, but keep the rule exact.
  scale = jnp.where(
      norms > _RENORM_MAX_NORM, _RENORM_MAX_NORM / (norms + _RENORM_EPS), 1.0)
  return (kernel * scale * _RENORM_UPSCALE).astype(dtype)


def normalize_kernel(kernel: jax.Array) -> jax.Array:
  """Divides each class column of a (D, C) kernel by its L2 norm (axis 0).

  There is no eps in the division, as in the reference: a zero column gives
  NaN. `kernel_init` keeps the columns at norm about 1, far from zero.
  """
  return kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels.

  Args:
    logits: (B, C) float.
    labels: (B,) int in [0, C).

  Returns:
    Scalar mean loss in nats, in the dtype of `logits`. NaN if any label is
    outside [0, C), so that a bad label cannot train silently.
  """
  num_classes = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
  per_example = -jnp.sum(onehot * log_probs, axis=-1)

  valid = (labels >= 0) & (labels < num_classes)
  per_example = jnp.where(valid, per_example, jnp.nan)
  return jnp.mean(per_example)


def cosface_logits(
    embeddings: jax.Array,
    labels: jax.Array,
    kernel: jax.Array,
    *,
    m: float = 0.4,
    s: float = 64.0,
    eps: float = 1e-4,
) -> jax.Array:
  """CosFace logits `s * (cos(theta) - m * onehot)`, as the reference.

  Args:
    embeddings: (B, D) unit-L2 embeddings.
    labels: (B,) int class indices.
    kernel: (D, C) class weights, normalised here per column.
    m: additive cosine margin at the target class.
    s: scale of the logits.
    eps: the cosine is clamped to [-1 + eps, 1 - eps].

  Returns:
    (B, C) logits in float32 (float64 if the inputs are float64).
  """
  _check_inputs(embeddings, labels, kernel)
  dtype = _compute_dtype(embeddings, kernel)

  cosine = _cosine(embeddings, kernel, eps, dtype)
  onehot = jax.nn.one_hot(labels, kernel.shape[1], dtype=dtype)
  return s * (cosine - m * onehot)


def arcface_logits(
    embeddings: jax.Array,
    labels: jax.Array,
    kernel: jax.Array,
    *,
    m: float = 0.5,
    s: float = 64.0,
    eps: float = 1e-4,
) -> jax.Array:
  """ArcFace logits `s * cos(clip(theta + m * onehot, eps, pi - eps))`.

  As in the reference, every entry goes through the acos/cos round trip and
  the angle clip replaces the usual "theta + m > pi" fallback.

  Args:
    embeddings: (B, D) unit-L2 embeddings.
    labels: (B,) int class indices.
    kernel: (D, C) class weights, normalised here per column.
    m: additive angular margin (radians) at the target class.
    s: scale of the logits.
    eps: the cosine is clamped to [-1 + eps, 1 - eps] and the angle to
      [eps, pi - eps].

  Returns:
    (B, C) logits in float32 (float64 if the inputs are float64).
  """
  _check_inputs(embeddings, labels, kernel)
  dtype = _compute_dtype(embeddings, kernel)

  cosine = _cosine(embeddings, kernel, eps, dtype)
  onehot = jax.nn.one_hot(labels, kernel.shape[1], dtype=dtype)
  return s * _shift_angle(cosine, m * onehot, eps)


def adaface_logits(
    embeddings: jax.Array,
    feature_norms: jax.Array,
    labels: jax.Array,
    kernel: jax.Array,
    norm_stats: NormStats,
    *,
    m: float = 0.4,
    h: float = 0.333,
    s: float = 64.0,
    t_alpha: float = 0.01,
    eps: float = 1e-3,
) -> tuple[jax.Array, NormStats, jax.Array]:
  """AdaFace logits, with the running feature-norm statistics updated.

  With n a sample's feature norm clipped to [1e-3, 100] and
  z = clip(h * (n - mean) / (std + eps), -1, 1) its margin scaler, the
  target logit is
  `s * (cos(clip(theta - m * z, eps, pi - eps)) - m - m * z)` and the other
  logits are `s * cos(clip(theta, eps, pi - eps))`. z = -1 (low norm, hard
  or poor image) gives ArcFace(m); z = 0 gives CosFace(m); z = +1 gives a
  negative angular margin and an additive 2m.

  The statistics are updated (weight `t_alpha` on the current batch) before
  they are used, so the batch already influences its own margins. No
  gradient reaches `feature_norms` or the statistics.

  Args:
    embeddings: (B, D) unit-L2 embeddings.
    feature_norms: (B, 1) L2 norms of the features before normalisation.
    labels: (B,) int class indices.
    kernel: (D, C) class weights, normalised here per column.
    norm_stats: {"batch_mean": (1,), "batch_std": (1,)} running statistics
      of the clipped feature norms.
    m: margin (radians for the angular part, cosine for the additive part).
    h: concentration of the margin scaler (0 turns AdaFace into CosFace).
    s: scale of the logits.
    t_alpha: weight of the current batch in the running statistics.
    eps: cosine clamp, std offset and angle clip, as in the reference.

  Returns:
    logits: (B, C) in float32 (float64 if the inputs are float64).
    new_norm_stats: the updated statistics, same keys, shapes and dtypes as
      `norm_stats`; these are also the values the logits used.
    margin_scaler: (B, 1) z in [-1, 1], in the dtype of the logits.

  Raises:
    ValueError: if a shape is inconsistent or B < 2 (the unbiased standard
      deviation needs two samples).
  """
  _check_inputs(embeddings, labels, kernel)
  _check_feature_norms(feature_norms, embeddings.shape[0])
  dtype = _compute_dtype(embeddings, kernel)

  cosine = _cosine(embeddings, kernel, eps, dtype)

  # The norm only steers the margin; the reference detaches it, so the loss
  # never pushes the norms (nor the statistics) directly.
  safe_norms = _clamp(feature_norms.astype(dtype), _NORM_MIN, _NORM_MAX)
  safe_norms = jax.lax.stop_gradient(safe_norms)
  new_norm_stats = _update_norm_stats(safe_norms, norm_stats, t_alpha)
  margin_scaler = _margin_scaler(safe_norms, new_norm_stats, h, eps)

  onehot = jax.nn.one_hot(labels, kernel.shape[1], dtype=dtype)
  cosine = _shift_angle(cosine, onehot * (-m * margin_scaler), eps)
  cosine = cosine - onehot * (m + m * margin_scaler)
  return s * cosine, new_norm_stats, margin_scaler


class MarginHead(nn.Module):
  """A margin-softmax head: AdaFace, CosFace or ArcFace.

  Owns the param `kernel` (D, C), initialised with `kernel_init`. For AdaFace
  it also owns `batch_mean` and `batch_std`, shape (1,) float32, in the
  `batch_stats` collection (initial values 20 and 100, as the reference).

  As in the reference, AdaFace updates the statistics on every call, in
  training and evaluation alike, and the logits use the updated values. They
  are written back only when `batch_stats` is mutable (e.g.
  `apply(..., mutable=["batch_stats"])`); otherwise the updated values are
  used for this call's logits and then dropped. `init` never writes them, so
  freshly initialised statistics are exactly the initial values.

  The cosine clamp eps is the reference's: 1e-3 for AdaFace, 1e-4 for the
  other two heads.

  Attributes:
    kind: one of `HEAD_KINDS`.
    num_classes: C.
    m: margin (AdaFace and ArcFace: radians, CosFace: cosine).
    h: AdaFace margin-scaler concentration.
    s: logit scale.
    t_alpha: AdaFace weight of the current batch in the running statistics.
    batch_mean_init: initial running mean of the feature norms.
    batch_std_init: initial running standard deviation of the feature norms.
  """

  kind: str
  num_classes: int
  m: float
  h: float = 0.333
  s: float = 64.0
  t_alpha: float = 0.01
  batch_mean_init: float = 20.0
  batch_std_init: float = 100.0

  def __post_init__(self):
    if self.kind not in HEAD_KINDS:
      raise ValueError(
          f"MarginHead kind={self.kind!r} is not one of {HEAD_KINDS}")
    super().__post_init__()

  @nn.compact
  def __call__(
      self,
      embeddings: jax.Array,
      feature_norms: jax.Array,
      labels: jax.Array,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Computes the logits of the head.

    Args:
      embeddings: (B, D) unit-L2 embeddings, any float dtype.
      feature_norms: (B, 1) pre-normalisation norms (used by AdaFace only).
      labels: (B,) int class indices.

    Returns:
      logits: (B, C), float32 at least.
      aux: {"margin_scaler": (B, 1), "batch_mean": (), "batch_std": ()}.
        For AdaFace these are z and the statistics the logits used. CosFace
        and ArcFace have neither; they return zeros so that every head gives
        the same structure.
    """
    kernel = self.param(
        "kernel", kernel_init, (embeddings.shape[-1], self.num_classes))

    if self.kind == "adaface":
      return self._adaface(embeddings, feature_norms, labels, kernel)
    if self.kind == "cosface":
      logits = cosface_logits(embeddings, labels, kernel, m=self.m, s=self.s)
    else:
      logits = arcface_logits(embeddings, labels, kernel, m=self.m, s=self.s)
    return logits, _zero_aux(logits)

  def _adaface(self, embeddings, feature_norms, labels, kernel):
    batch_mean = self.variable(
        "batch_stats", "batch_mean",
        lambda: jnp.full((1,), self.batch_mean_init, jnp.float32))
    batch_std = self.variable(
        "batch_stats", "batch_std",
        lambda: jnp.full((1,), self.batch_std_init, jnp.float32))
    norm_stats = {"batch_mean": batch_mean.value, "batch_std": batch_std.value}

    logits, new_norm_stats, margin_scaler = adaface_logits(
        embeddings, feature_norms, labels, kernel, norm_stats,
        m=self.m, h=self.h, s=self.s, t_alpha=self.t_alpha)

    # The dummy batch of `init` must not move the statistics.
    if (self.is_mutable_collection("batch_stats")
        and not self.is_initializing()):
      batch_mean.value = new_norm_stats["batch_mean"]
      batch_std.value = new_norm_stats["batch_std"]

    aux = {
        "margin_scaler": margin_scaler,
        "batch_mean": new_norm_stats["batch_mean"][0],
        "batch_std": new_norm_stats["batch_std"][0],
    }
    return logits, aux


def clamped_cosine(embeddings: jax.Array, kernel: jax.Array,
                   eps: float) -> jax.Array:
  """(B, C) cosines of unit embeddings and kernel columns, clamped to
  [-1 + eps, 1 - eps], in float32 at least (the heads' first step)."""
  return _cosine(embeddings, kernel, eps, _compute_dtype(embeddings, kernel))


def clip_feature_norms(feature_norms: jax.Array) -> jax.Array:
  """Feature norms clipped to [1e-3, 100], without gradient (AdaFace)."""
  safe_norms = _clamp(feature_norms, _NORM_MIN, _NORM_MAX)
  return jax.lax.stop_gradient(safe_norms)


def update_norm_stats(batch_mean: jax.Array, batch_std: jax.Array,
                      norm_stats: NormStats, t_alpha: float) -> NormStats:
  """Running statistics moved towards a batch's mean and (unbiased) std.

  The building block of `adaface_logits` for callers that compute the batch
  moments themselves, e.g. over a batch sharded across devices.
  """
  norm_stats = jax.lax.stop_gradient(norm_stats)
  new_mean = t_alpha * batch_mean + (1.0 - t_alpha) * norm_stats["batch_mean"]
  new_std = t_alpha * batch_std + (1.0 - t_alpha) * norm_stats["batch_std"]
  return {
      "batch_mean": new_mean.astype(norm_stats["batch_mean"].dtype),
      "batch_std": new_std.astype(norm_stats["batch_std"].dtype),
  }


def margin_scaler(safe_norms: jax.Array, norm_stats: NormStats, h: float,
                  eps: float = 1e-3) -> jax.Array:
  """(B, 1) AdaFace image-quality indicator z in [-1, 1]."""
  return _margin_scaler(safe_norms, norm_stats, h, eps)


def apply_margin(kind: str, cosine: jax.Array, onehot: jax.Array,
                 scaler: jax.Array | None, *, m: float, s: float,
                 eps: float) -> jax.Array:
  """Scaled logits from clamped cosines, with the margin at the target.

  Args:
    kind: one of `HEAD_KINDS`.
    cosine: (B, C) clamped cosines (`clamped_cosine`).
    onehot: (B, C) target indicator; an all-zero row gets no margin (a
      class block that does not own the sample's label).
    scaler: (B, 1) AdaFace margin scaler z; ignored by the other heads.
    m, s, eps: margin, scale and angle clip of the head.

  Returns:
    (B, C) logits, exactly as the corresponding `*_logits` function.
  """
  if kind == "adaface":
    cosine = _shift_angle(cosine, onehot * (-m * scaler), eps)
    return s * (cosine - onehot * (m + m * scaler))
  if kind == "cosface":
    return s * (cosine - m * onehot)
  if kind == "arcface":
    return s * _shift_angle(cosine, m * onehot, eps)
  raise ValueError(f"head kind={kind!r} is not one of {HEAD_KINDS}")


def default_eps(kind: str) -> float:
  """The reference's clamp eps: 1e-3 for AdaFace, 1e-4 for the others."""
  return 1e-3 if kind == "adaface" else 1e-4


def _compute_dtype(*arrays: jax.Array) -> Any:
  """float32 at least: bf16 inputs are cast up, float64 stays float64."""
  return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def _clamp(x: jax.Array, low: float, high: float) -> jax.Array:
  """Clips like torch.clamp: the gradient passes at the bounds themselves.

  jnp.clip would halve the gradient at an exact tie with a bound.
  """
  return jnp.where(x < low, low, jnp.where(x > high, high, x))


def _cosine(
    embeddings: jax.Array, kernel: jax.Array, eps: float, dtype: Any
) -> jax.Array:
  """(B, C) cosines between embeddings and class columns, clamped."""
  kernel_norm = normalize_kernel(kernel.astype(dtype))

  # Full float precision: on accelerators the default matmul precision may
  # round to bf16/tf32, an error comparable to the margins and clamps here.
  cosine = jnp.dot(
      embeddings.astype(dtype), kernel_norm,
      precision=jax.lax.Precision.HIGHEST)

  # acos has an infinite slope at +-1; the clamp keeps its gradient finite.
  return _clamp(cosine, -1.0 + eps, 1.0 - eps)


def _shift_angle(
    cosine: jax.Array, angle: jax.Array, eps: float
) -> jax.Array:
  """cos(clip(acos(cosine) + angle, eps, pi - eps)) on every entry.

  The clip keeps the angle inside [0, pi], where cos is monotonic, instead of
  ArcFace's usual "theta + m > pi" fallback (the reference has none).
  """
  theta = jnp.arccos(cosine)
  return jnp.cos(_clamp(theta + angle, eps, math.pi - eps))


def _update_norm_stats(
    safe_norms: jax.Array, norm_stats: NormStats, t_alpha: float
) -> NormStats:
  """Moves the running statistics towards this batch (weight `t_alpha`)."""
  # Running statistics are state, not parameters: the loss must not move them.
  norm_stats = jax.lax.stop_gradient(norm_stats)
  batch_mean = jnp.mean(safe_norms)

  # Unbiased (ddof=1) std: torch's default, which the reference uses.
  batch_std = jnp.std(safe_norms, ddof=1)

  new_mean = t_alpha * batch_mean + (1.0 - t_alpha) * norm_stats["batch_mean"]
  new_std = t_alpha * batch_std + (1.0 - t_alpha) * norm_stats["batch_std"]
  return {
      "batch_mean": new_mean.astype(norm_stats["batch_mean"].dtype),
      "batch_std": new_std.astype(norm_stats["batch_std"].dtype),
  }


def _margin_scaler(
    safe_norms: jax.Array, norm_stats: NormStats, h: float, eps: float
) -> jax.Array:
  """(B, 1) image-quality indicator z, in [-1, 1]."""
  mean = norm_stats["batch_mean"].astype(safe_norms.dtype)
  std = norm_stats["batch_std"].astype(safe_norms.dtype)
  z = (safe_norms - mean) / (std + eps)

  # The clip bounds the margins: angular in [-m, m], additive in [0, 2m].
  return _clamp(h * z, -1.0, 1.0)


def _zero_aux(logits: jax.Array) -> dict[str, jax.Array]:
  """The AdaFace aux structure, all zeros, for heads without statistics."""
  zero = jnp.zeros((), logits.dtype)
  return {
      "margin_scaler": jnp.zeros((logits.shape[0], 1), logits.dtype),
      "batch_mean": zero,
      "batch_std": zero,
  }


def _check_inputs(
    embeddings: jax.Array, labels: jax.Array, kernel: jax.Array
) -> None:
  """Raises ValueError on inconsistent (static) shapes."""
  if embeddings.ndim != 2:
    raise ValueError(
        "embeddings must be (batch, embedding_dim), got shape "
        f"{embeddings.shape}")
  if kernel.ndim != 2 or kernel.shape[0] != embeddings.shape[1]:
    raise ValueError(
        f"kernel must be (embedding_dim={embeddings.shape[1]}, num_classes), "
        f"got shape {kernel.shape}")
  if labels.shape != (embeddings.shape[0],):
    raise ValueError(
        f"labels must be (batch={embeddings.shape[0]},), got shape "
        f"{labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")


def _check_feature_norms(feature_norms: jax.Array, batch: int) -> None:
  """Raises ValueError unless feature_norms is (B, 1) with B >= 2."""
  if feature_norms.shape != (batch, 1):
    raise ValueError(
        f"feature_norms must be (batch={batch}, 1), got shape "
        f"{feature_norms.shape}")
  if batch < 2:
    raise ValueError(
        f"AdaFace needs batch >= 2 for the unbiased norm std, got {batch}")
