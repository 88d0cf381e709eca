"""The face recognition model: an IR-ResNet backbone and a margin head."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from adaface_jax import backbone as backbone_lib
from adaface_jax import heads

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [-1, 1]: (x / 255 - 0.5) / 0.5, per channel."""
  return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5


class FaceRecognitionModel(nn.Module):
  """Backbone under `backbone`, head (kernel and norm statistics) under `head`.

  `__call__` returns the head's logits for training; `embed` returns the
  embeddings and feature norms alone and never touches the head.
  """

  backbone: nn.Module
  head: nn.Module

  def __call__(self, images: jax.Array, labels: jax.Array, train: bool):
    """Logits for a batch of faces.

    Args:
      images: [batch, s, s, 3] uint8 BGR (or floats already in [-1, 1]).
      labels: [batch] int32 identity labels.
      train: batch statistics, dropout and norm-statistic updates.

    Returns:
      logits: [batch, num_classes] float32, already times the scale s.
      aux: feature_norms [batch, 1] and the head's auxiliary outputs.
    """
    embeddings, feature_norms = self.embed(images, train)
    logits, head_aux = self.head(embeddings, feature_norms, labels)
    return logits, dict(head_aux, feature_norms=feature_norms)

  def embed(self, images: jax.Array, train: bool = False):
    """[batch, s, s, 3] -> embeddings [batch, d] (unit), norms [batch, 1]."""
    if images.dtype == jnp.uint8:
      images = normalize_images(images)
    return self.backbone(images, train=train)


def create_backbone(config: ml_collections.ConfigDict) -> nn.Module:
  """Builds the IR-ResNet that `config.model` describes."""
  spec = backbone_lib.resolve_spec(
      config.name, config.stage_units, config.stage_widths)
  if config.dtype not in DTYPES:
    raise ValueError(
        f"unknown model.dtype {config.dtype!r}; choose {sorted(DTYPES)}")
  return backbone_lib.IResNet(
      stage_units=spec.stage_units,
      stage_widths=spec.stage_widths,
      embedding_size=config.embedding_size,
      dropout_rate=config.dropout_rate,
      dtype=DTYPES[config.dtype],
      unbiased_running_var=config.unbiased_bn_running_var)


def create_head(config: ml_collections.ConfigDict,
                num_classes: int) -> nn.Module:
  """Builds the margin head that `config.head` describes."""
  return heads.MarginHead(
      kind=config.name, num_classes=num_classes, m=config.m, h=config.h,
      s=config.s, t_alpha=config.t_alpha,
      batch_mean_init=config.batch_mean_init,
      batch_std_init=config.batch_std_init)


def create_model(config: ml_collections.ConfigDict,
                 num_classes: int) -> FaceRecognitionModel:
  """The full model for `config` with a head of `num_classes` identities."""
  return FaceRecognitionModel(
      backbone=create_backbone(config.model),
      head=create_head(config.head, num_classes))


def init_variables(model: FaceRecognitionModel, rng: jax.Array,
                   image_size: int) -> dict[str, Any]:
  """Initial `params` and `batch_stats` from a dummy batch.

  Two images, since AdaFace's unbiased norm std needs a pair; the head does
  not store statistics during init.
  """
  images = jnp.zeros((2, image_size, image_size, 3), jnp.uint8)
  labels = jnp.zeros((2,), jnp.int32)
  return model.init({"params": rng}, images, labels, train=False)
