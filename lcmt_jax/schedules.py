"""Ramps and the learning-rate decay (docs/reference.md "Losses", "Optimiser and schedule").

The reference moves its schedules once per epoch, with epochs counted from 1
(quirk 2). `schedule_epoch` turns the global step into that epoch number, or
into a continuous one that agrees with it at each epoch's first step.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# Learning-rate schedules (`config.lr_schedule`): the reference's, and FixMatch's for WRN-28-2.
LR_SCHEDULES = ('linear', 'cosine')
# How often the schedules move: once per epoch, as the reference (quirk 2), or every step.
GRANULARITIES = ('epoch', 'step')


def schedule_epoch(step: jax.Array | int, steps_per_epoch: int, granularity: str) -> jax.Array:
  """The epoch number the schedules see at optimiser step `step` (0-based).

  'epoch': `step // steps_per_epoch + 1`, as the reference; 'step':
  `step / steps_per_epoch + 1`, which moves every step. A Python `int` step
  is computed with NumPy, on the host (the trainer's per-call choices), an
  array step with `jax.numpy` (inside the compiled step).
  """
  if granularity not in GRANULARITIES:
    raise ValueError(f'schedule granularity must be one of {GRANULARITIES}, '
                     f'got {granularity!r}')
  xp = np if isinstance(step, int) else jnp
  if granularity == 'epoch':
    return (xp.asarray(step) // steps_per_epoch + 1).astype(xp.float32)
  return xp.asarray(step, xp.float32) / steps_per_epoch + 1.0


def sigmoid_rampup(t: jax.Array, length: float) -> jax.Array:
  """`exp(-5 (1 - t/L)^2)` for `0 < t < L`, 1 from `t >= L` on, 0 for `t <= 0`.

  The reference tests `t >= L` first, so a zero-length ramp is 1 from `t = 0`.
  """
  t = jnp.asarray(t, jnp.float32)
  if length <= 0:
    return jnp.where(t >= length, 1.0, 0.0)
  phase = 1.0 - t / length
  return jnp.where(t >= length, 1.0, jnp.where(t <= 0, 0.0, jnp.exp(-5.0 * phase**2)))


def linear_decay_lr(epoch: jax.Array, base_lr: float, decay_start: float,
                    decay_end: float) -> jax.Array:
  """`base_lr` before `decay_start`, then `base_lr * (decay_end - epoch) / (decay_end - decay_start)`.

  It reaches 0 at `decay_end`, the last epoch trained, as in the reference,
  and stays there: with per-step schedules the last epoch runs from
  `decay_end` to `decay_end + 1`, where the formula would turn negative.
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  if decay_end <= decay_start:
    return jnp.full_like(epoch, base_lr)
  decayed = base_lr * (decay_end - epoch) / (decay_end - decay_start)
  return jnp.where(epoch < decay_start, base_lr, jnp.maximum(decayed, 0.0))


def cosine_decay_lr(epoch: jax.Array, base_lr: float, decay_start: float,
                    decay_end: float) -> jax.Array:
  """`base_lr * cos(7 pi p / 16)`, `p = (epoch - decay_start) / (decay_end - decay_start)`
  clipped to [0, 1]: FixMatch's cosine decay (Sohn et al. 2020, section 4; its WRN-28-2 runs
  decay from the first step, `decay_start = 0`), which ends at `cos(7 pi / 16)`, 0.195 of
  `base_lr`, rather than at 0."""
  epoch = jnp.asarray(epoch, jnp.float32)
  if decay_end <= decay_start:
    return jnp.full_like(epoch, base_lr)
  progress = jnp.clip((epoch - decay_start) / (decay_end - decay_start), 0.0, 1.0)
  return base_lr * jnp.cos(7.0 * math.pi / 16.0 * progress)


def learning_rate(schedule: str, epoch: jax.Array, base_lr: float, decay_start: float,
                  decay_end: float) -> jax.Array:
  """The learning rate of `schedule` (one of `LR_SCHEDULES`) at `epoch`."""
  if schedule not in LR_SCHEDULES:
    raise ValueError(f'lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}')
  decay = linear_decay_lr if schedule == 'linear' else cosine_decay_lr
  return decay(epoch, base_lr, decay_start, decay_end)
