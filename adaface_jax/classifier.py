"""Margin-softmax cross-entropy with the classes split over devices.

Each device of the `model` axis owns a contiguous block of class columns.
The embeddings of the devices in a `model` row are gathered (a
[batch / data, embedding] slice, small), every device computes cosines
against its own block only, the margin is applied where the target class
lives, and the softmax's max and sum are reduced across `model`. Neither the
[global_batch, classes] logits nor the full kernel ever sits on one device.
On a 1x1 mesh this is exactly the single-device head.

AdaFace's feature-norm statistics are computed over the global batch by
default (identical on every device). `per_device_norm_stats` reproduces the
reference's data-parallel behaviour instead: each device standardises its
own samples with statistics of its own batch slice, and the stored running
values are those of the first device (what PyTorch DDP's buffer broadcast
leaves on every rank).
"""

import dataclasses

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from adaface_jax import heads
from adaface_jax import sharding as sharding_lib

MODEL = sharding_lib.MODEL_AXIS
DATA = sharding_lib.DATA_AXIS
ALL = sharding_lib.BATCH_AXES


@dataclasses.dataclass(frozen=True)
class MarginSoftmax:
  """Static description of the classifier loss.

  Attributes:
    kind: "adaface", "cosface" or "arcface".
    num_classes: real classes; columns past it are padding.
    m, h, s, t_alpha: head hyper-parameters (h and t_alpha: AdaFace only).
    per_device_norm_stats: AdaFace statistics per device, as the reference.
    num_sampled: if > 0, negative class columns kept per shard and step
      (Partial-FC sampling); every positive of the global batch is kept.
  """

  kind: str
  num_classes: int
  m: float
  h: float = 0.333
  s: float = 64.0
  t_alpha: float = 0.01
  per_device_norm_stats: bool = False
  num_sampled: int = 0

  @property
  def eps(self) -> float:
    return heads.default_eps(self.kind)

  def loss_fn(self, mesh: jax.sharding.Mesh):
    """The sharded loss, a function of global arrays.

    Returns:
      fn(embeddings [B, D], feature_norms [B, 1], labels [B],
      kernel [D, C_padded], norm_stats, rng) -> (loss, aux) where aux holds
      the new `norm_stats`, `accuracy` and the mean `margin_scaler`.
      Batch arrays are split over (data, model); the kernel over model.
    """
    stats_spec = {"batch_mean": P(), "batch_std": P()}
    aux_spec = {"norm_stats": stats_spec, "accuracy": P(),
                "margin_scaler": P()}
    return jax.shard_map(
        self._local_loss, mesh=mesh,
        in_specs=(P(ALL), P(ALL), P(ALL), P(None, MODEL), stats_spec, P()),
        out_specs=(P(), aux_spec))

  def _local_loss(self, embeddings, feature_norms, labels, kernel,
                  norm_stats, rng):
    """Per-device body: local batch slice and local class block."""
    scaler, new_stats = self._margin_scalers(feature_norms, norm_stats)
    batch_size = lax.psum(scaler.shape[0], ALL)
    mean_scaler = lax.psum(jnp.sum(scaler), ALL) / batch_size

    # Every device of a model row sees the same rows: its peers' samples.
    rows = lambda x: lax.all_gather(x, MODEL, axis=0, tiled=True)
    embeddings, labels, scaler = rows(embeddings), rows(labels), rows(scaler)

    block = kernel.shape[1]
    first_class = lax.axis_index(MODEL) * block
    local_labels = labels - first_class
    class_ids = first_class + jnp.arange(block)
    if self.num_sampled > 0:
      kernel, local_labels, class_ids = self._sample_classes(
          kernel, local_labels, class_ids, rng)

    cosine = heads.clamped_cosine(embeddings, kernel, self.eps)
    # A label owned by another block is outside [0, block): all-zero row.
    onehot = jax.nn.one_hot(local_labels, kernel.shape[1], dtype=cosine.dtype)
    logits = heads.apply_margin(self.kind, cosine, onehot, scaler, m=self.m,
                                s=self.s, eps=self.eps)
    # Padding columns (and unsampled ones) never receive probability.
    logits = jnp.where(class_ids < self.num_classes, logits, -jnp.inf)

    # The max only shifts the exponentials; logsumexp does not depend on it.
    row_max = lax.pmax(lax.stop_gradient(jnp.max(logits, axis=1)), MODEL)
    sum_exp = lax.psum(
        jnp.sum(jnp.exp(logits - row_max[:, None]), axis=1), MODEL)
    target = lax.psum(
        jnp.sum(jnp.where(onehot > 0, logits, 0.0), axis=1), MODEL)
    per_example = jnp.log(sum_exp) + row_max - target

    loss = lax.psum(jnp.sum(per_example), DATA) / batch_size
    correct = lax.stop_gradient(target >= row_max).astype(jnp.float32)
    accuracy = lax.psum(jnp.sum(correct), DATA) / batch_size
    aux = {"norm_stats": new_stats, "accuracy": accuracy,
           "margin_scaler": mean_scaler}
    return loss, aux

  def _margin_scalers(self, feature_norms, norm_stats):
    """AdaFace z of the local samples, and the new running statistics."""
    if self.kind != "adaface":
      return jnp.zeros_like(feature_norms, jnp.float32), norm_stats

    safe_norms = heads.clip_feature_norms(feature_norms.astype(jnp.float32))
    if self.per_device_norm_stats:
      mean = jnp.mean(safe_norms)
      std = jnp.std(safe_norms, ddof=1)
    else:
      count = lax.psum(safe_norms.shape[0], ALL)
      mean = lax.psum(jnp.sum(safe_norms), ALL) / count
      squares = lax.psum(jnp.sum(jnp.square(safe_norms - mean)), ALL)
      std = jnp.sqrt(squares / (count - 1))

    new_stats = heads.update_norm_stats(mean, std, norm_stats, self.t_alpha)
    scaler = heads.margin_scaler(safe_norms, new_stats, self.h, self.eps)
    if self.per_device_norm_stats:
      new_stats = _from_first_device(new_stats)
    return scaler, new_stats

  def _sample_classes(self, kernel, local_labels, class_ids, rng):
    """Keeps the positives of the batch and random negatives, static size.

    Returns the gathered kernel columns [D, num_sampled], the labels
    re-indexed into them (out of range when owned elsewhere) and the global
    class ids of the kept columns.
    """
    block = kernel.shape[1]
    keep = min(self.num_sampled, block)
    all_labels = lax.all_gather(local_labels, DATA, axis=0, tiled=True)
    positive = jnp.zeros(block, bool).at[
        jnp.where((all_labels >= 0) & (all_labels < block), all_labels,
                  block)].set(True, mode="drop")

    # Positives score 2, negatives U(0, 1): top-k keeps every positive
    # (the config checks keep >= the global batch) plus random negatives.
    shard_rng = jax.random.fold_in(rng, lax.axis_index(MODEL))
    scores = jnp.where(positive, 2.0, jax.random.uniform(shard_rng, (block,)))
    _, kept = lax.top_k(scores, keep)
    kept = jnp.sort(kept)

    position = jnp.searchsorted(kept, local_labels)
    position = jnp.clip(position, 0, keep - 1)
    found = kept[position] == local_labels
    new_labels = jnp.where(found, position, -1)
    return kernel[:, kept], new_labels, class_ids[kept]


def _from_first_device(tree):
  """The values of device (0, 0), broadcast to every device."""
  first = (lax.axis_index(DATA) == 0) & (lax.axis_index(MODEL) == 0)
  return jax.tree.map(
      lambda x: lax.psum(jnp.where(first, x, jnp.zeros_like(x)), ALL), tree)
