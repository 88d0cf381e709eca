"""A PyTorch IR-ResNet laid out like the AdaFace reference backbone.

The module tree reproduces the reference's `state_dict` exactly (names,
order, shapes, dtypes), so that checkpoints converted by `convert` load into
it with `strict=True` and so that the Flax backbone can be checked against
PyTorch numerically. It was written from the description of the reference
network, layer by layer:

  input_layer:  Conv3x3 (no bias) -> BatchNorm2d -> PReLU
  body.<i>:     shortcut_layer (1x1 stride-s max-pool when the width is kept,
                else Conv1x1 stride s -> BatchNorm2d), then
                res_layer: BN -> Conv3x3 -> BN -> PReLU -> Conv3x3 stride s
                -> BN; output = res_layer(x) + shortcut_layer(x)
  output_layer: BatchNorm2d -> Dropout -> flatten (C, H, W) -> Linear
                -> BatchNorm1d without affine parameters

`output_layer` is registered before `body`, as in the reference, so that
the state_dict lists it first. Inputs are NCHW BGR in [-1, 1].

PyTorch is an optional dependency of the project; importing this module
without it raises an ImportError that says so.
"""

from collections.abc import Sequence

try:
  import torch
  from torch import nn
except ImportError as e:
  raise ImportError(
      "adaface_jax.torch_mirror needs PyTorch (pip install torch); the rest "
      "of adaface_jax works without it") from e

from adaface_jax import backbone

STAGE_WIDTHS = backbone.STAGE_WIDTHS


class IRUnit(nn.Module):
  """One pre-activation IR unit; the stride sits on the second 3x3 conv."""

  def __init__(self, in_channels: int, out_channels: int, stride: int):
    super().__init__()
    # The shortcut is registered first: the reference state_dict lists
    # `shortcut_layer` entries before `res_layer` ones.
    if in_channels == out_channels:
      # A 1x1 max-pool with a stride is plain strided subsampling.
      self.shortcut_layer = nn.MaxPool2d(1, stride)
    else:
      self.shortcut_layer = nn.Sequential(
          nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
          nn.BatchNorm2d(out_channels))
    self.res_layer = nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.PReLU(out_channels),
        nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels))

  def forward(self, x: "torch.Tensor") -> "torch.Tensor":
    return self.res_layer(x) + self.shortcut_layer(x)


class IRBackbone(nn.Module):
  """The reference IR-ResNet: NCHW images -> (embeddings, norms).

  Args:
    stage_units: units per stage, e.g. (2, 2, 2, 2) for ir_18.
    stage_widths: output channels per stage; the stem has the first width.
    embedding_size: size of the embedding (the Linear's output).
    dropout_rate: element-wise dropout on the last feature map (train only).
    image_size: side of the square input, 112 for the released models.
  """

  def __init__(self, stage_units: Sequence[int],
               stage_widths: Sequence[int] = STAGE_WIDTHS,
               embedding_size: int = 512, dropout_rate: float = 0.4,
               image_size: int = 112):
    super().__init__()
    if len(stage_units) != len(stage_widths):
      raise ValueError(
          f"stage_units {tuple(stage_units)} and stage_widths "
          f"{tuple(stage_widths)} must have the same length")
    stem_width, last_width = stage_widths[0], stage_widths[-1]
    map_size = backbone.feature_map_size(image_size, len(stage_units))

    self.input_layer = nn.Sequential(
        nn.Conv2d(3, stem_width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(stem_width),
        nn.PReLU(stem_width))
    self.output_layer = nn.Sequential(
        nn.BatchNorm2d(last_width),
        nn.Dropout(dropout_rate),
        nn.Flatten(),
        nn.Linear(last_width * map_size * map_size, embedding_size),
        nn.BatchNorm1d(embedding_size, affine=False))
    self.body = nn.Sequential(*_units(stem_width, stage_units, stage_widths))
    initialize_weights(self)

  def forward(self, images: "torch.Tensor"):
    """[batch, 3, s, s] -> unit embeddings [batch, d], norms [batch, 1]."""
    x = self.input_layer(images)
    x = self.body(x)
    features = self.output_layer(x)
    norms = torch.linalg.vector_norm(features, 2, dim=1, keepdim=True)
    # No epsilon, as the reference.
    return features / norms, norms


def _units(stem_width: int, stage_units: Sequence[int],
           stage_widths: Sequence[int]) -> list[IRUnit]:
  """The body's units in order; the first of every stage has stride 2."""
  units = []
  in_channels = stem_width
  for count, width in zip(stage_units, stage_widths):
    for index in range(count):
      units.append(IRUnit(in_channels, width, 2 if index == 0 else 1))
      in_channels = width
  return units


def initialize_weights(module: nn.Module) -> None:
  """The reference's init: kaiming-normal fan_out (ReLU gain) weights for
  convolutions and linear layers, zero biases, BatchNorm scale 1 and bias 0.
  PReLU slopes keep PyTorch's 0.25."""
  for layer in module.modules():
    if isinstance(layer, (nn.Conv2d, nn.Linear)):
      nn.init.kaiming_normal_(
          layer.weight, mode="fan_out", nonlinearity="relu")
      if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    elif isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm1d)) and layer.affine:
      nn.init.ones_(layer.weight)
      nn.init.zeros_(layer.bias)


def build(name: str, stage_units: Sequence[int] = (),
          stage_widths: Sequence[int] = (), embedding_size: int = 512,
          dropout_rate: float = 0.4, image_size: int = 112) -> IRBackbone:
  """The mirror of a named (ir_18/34/50/100/101) or "custom" backbone.

  Names and overrides follow `backbone.resolve_spec` (the Flax side), so a
  training config's `model` section builds the matching network.
  """
  spec = backbone.resolve_spec(name, stage_units, stage_widths)
  return IRBackbone(spec.stage_units, spec.stage_widths, embedding_size,
                    dropout_rate, image_size)


def build_from_config(model_config, image_size: int = 112) -> IRBackbone:
  """The mirror of the backbone a config's `model` section describes."""
  return build(model_config.name, model_config.stage_units,
               model_config.stage_widths, model_config.embedding_size,
               model_config.dropout_rate, image_size)

