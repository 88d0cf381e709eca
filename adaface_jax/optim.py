"""Optimiser and learning-rate schedule, with durations converted to steps."""

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


@dataclasses.dataclass(frozen=True)
class Durations:
  """Training durations in optimizer steps (one step = one global batch)."""

  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  lr_boundaries_steps: tuple[int, ...]


def resolve_durations(schedule: ml_collections.ConfigDict, num_examples: int,
                      global_batch_size: int) -> Durations:
  """Converts the config's `*_epochs` fields into steps.

  The input stream has no partial batches, so an epoch is
  floor(num_examples / global_batch_size) steps (at least one).
  """
  steps_per_epoch = max(1, num_examples // global_batch_size)
  to_steps = lambda epochs: int(round(epochs * steps_per_epoch))
  if schedule.total_steps > 0:
    total_steps = schedule.total_steps
  else:
    total_steps = to_steps(schedule.total_epochs)
  if total_steps < 1:
    raise ValueError(
        f"schedule.total_epochs={schedule.total_epochs} gives no step at "
        f"{steps_per_epoch} steps per epoch")
  boundaries = tuple(to_steps(e) for e in schedule.lr_boundaries_epochs)
  if list(boundaries) != sorted(boundaries):
    raise ValueError(
        "schedule.lr_boundaries_epochs must increase: "
        f"{schedule.lr_boundaries_epochs}")
  return Durations(steps_per_epoch, total_steps,
                   to_steps(schedule.warmup_epochs), boundaries)


def create_learning_rate_fn(base_lr: float, durations: Durations,
                            decay_factor: float) -> optax.Schedule:
  """Piecewise-constant learning rate with an optional linear warmup.

  The rate at update k (0-based) is base_lr * decay_factor^j, j the number
  of boundaries <= k, as PyTorch's MultiStepLR stepped once per epoch.
  During warmup it rises linearly from base_lr / warmup_steps to base_lr.
  """
  piecewise = optax.piecewise_constant_schedule(
      base_lr, {b: decay_factor for b in durations.lr_boundaries_steps})
  if durations.warmup_steps <= 0:
    return piecewise

  def schedule(count):
    warmup = (count + 1) / durations.warmup_steps
    return piecewise(count) * jnp.minimum(1.0, warmup)
  return schedule


def decay_mask(params) -> dict:
  """True for parameters under weight decay: all but BatchNorm scale/bias.

  BatchNorm modules are the ones whose name contains "bn" (the backbone's
  naming convention); PReLU slopes, convolution and dense weights, the dense
  bias and the head kernel are decayed, as in the reference.
  """
  flat = flax.traverse_util.flatten_dict(params)
  mask = {path: not any("bn" in part for part in path[:-1])
          for path in flat}
  return flax.traverse_util.unflatten_dict(mask)


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate_fn: optax.Schedule,
                     ) -> optax.GradientTransformation:
  """SGD with momentum and coupled L2 weight decay (added to the gradient
  before momentum, like torch.optim.SGD's weight_decay)."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
      optax.sgd(learning_rate_fn, momentum=config.momentum,
                nesterov=config.nesterov))


def steps_to_epochs(step: int, durations: Durations) -> float:
  """Fractional epoch reached after `step` updates."""
  return step / durations.steps_per_epoch


def eta_seconds(steps_left: int, seconds_per_step: float) -> float:
  """Estimated remaining wall time; inf when the rate is unknown."""
  if seconds_per_step <= 0 or math.isnan(seconds_per_step):
    return math.inf
  return steps_left * seconds_per_step


def tree_l2_norm(tree) -> jax.Array:
  """Global L2 norm of every leaf of a pytree."""
  return optax.tree.norm(tree)
