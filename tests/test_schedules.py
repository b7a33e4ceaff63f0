"""lcmt_jax.schedules against REFERENCE.md's formulas written in plain Python."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcmt_jax import schedules


def _ramp(t, length):
  """REFERENCE.md `ramp(t, L)`."""
  if t <= 0:
    return 0.0
  if t >= length:
    return 1.0
  return math.exp(-5.0 * (1.0 - t / length) ** 2)


def _lr(epoch, base, decay_start, decay_end):
  """REFERENCE.md: constant until `decay_start`, then linear to 0 at `decay_end`."""
  if epoch < decay_start:
    return base
  return base * (decay_end - epoch) / (decay_end - decay_start)


# (length, epochs): the consistency ramp (5 epochs, every run) and the LC ramps of
# REFERENCE.md's table, evaluated at `epoch - lc_start` as the total loss does.
RAMPS = [
    (5, [-3, 0, 1, 2, 2.5, 4, 5, 6, 1000]),
    (100, [e - 600 for e in (1, 599, 600, 601, 650, 699, 700, 701, 1000)]),  # CIFAR-10 MT+LC
    (50, [e - 300 for e in (1, 299, 300, 301, 325, 349, 350, 351, 600)]),    # SVHN MT+LC
]


@pytest.mark.parametrize('length, epochs', RAMPS)
def test_sigmoid_rampup_matches_reference_formula(length, epochs):
  got = np.asarray(schedules.sigmoid_rampup(jnp.asarray(epochs, jnp.float32), length))
  expected = [_ramp(t, length) for t in epochs]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_sigmoid_rampup_edges():
  assert float(schedules.sigmoid_rampup(0, 5)) == 0.0
  assert float(schedules.sigmoid_rampup(-1, 5)) == 0.0
  assert float(schedules.sigmoid_rampup(5, 5)) == 1.0
  assert float(schedules.sigmoid_rampup(7, 5)) == 1.0
  # Strictly inside the ramp it is neither 0 nor 1: exp(-5 * 0.8^2) at t = 1.
  np.testing.assert_allclose(float(schedules.sigmoid_rampup(1, 5)), math.exp(-3.2), rtol=1e-6)


# (decay_start, decay_end) of the four runs of REFERENCE.md's table.
DECAYS = [(800, 1000), (600, 800), (400, 600), (300, 500)]


@pytest.mark.parametrize('decay_start, decay_end', DECAYS)
def test_linear_decay_lr_matches_reference_formula(decay_start, decay_end):
  epochs = [1, 2, decay_start - 1, decay_start, decay_start + 1,
            (decay_start + decay_end) // 2, decay_end - 1, decay_end]
  got = np.asarray(schedules.linear_decay_lr(jnp.asarray(epochs, jnp.float32), 0.05,
                                             decay_start, decay_end))
  expected = [_lr(e, 0.05, decay_start, decay_end) for e in epochs]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8)
  assert got[epochs.index(decay_start)] == pytest.approx(0.05)
  assert got[-1] == pytest.approx(0.0, abs=1e-8)


def test_schedule_epoch_epoch_granularity_counts_from_one():
  spe = 359
  steps = np.array([0, 1, spe - 1, spe, spe + 1, 2 * spe - 1, 2 * spe, 999 * spe + 17])
  got = np.asarray(schedules.schedule_epoch(jnp.asarray(steps, jnp.int32), spe, 'epoch'))
  np.testing.assert_array_equal(got, [s // spe + 1 for s in steps])


def test_schedule_epoch_step_granularity_is_continuous():
  spe = 359
  steps = np.array([0, 1, 100, spe - 1, spe, spe + 180, 999 * spe + 17])
  got = np.asarray(schedules.schedule_epoch(jnp.asarray(steps, jnp.int32), spe, 'step'))
  np.testing.assert_allclose(got, [s / spe + 1 for s in steps], rtol=1e-6)


def test_schedule_granularities_agree_at_epoch_starts_only():
  spe = 7
  starts = jnp.arange(0, 10 * spe, spe)
  # XLA may divide by multiplying with 1/spe, one float32 ulp off the integer.
  np.testing.assert_allclose(schedules.schedule_epoch(starts, spe, 'epoch'),
                             schedules.schedule_epoch(starts, spe, 'step'), rtol=1e-6)
  inside = starts + 3
  assert np.all(np.asarray(schedules.schedule_epoch(inside, spe, 'step'))
                > np.asarray(schedules.schedule_epoch(inside, spe, 'epoch')))


def test_schedule_epoch_works_under_jit():
  spe = 10
  fn = jax.jit(lambda step: schedules.schedule_epoch(step, spe, 'epoch'))
  assert [float(fn(jnp.int32(s))) for s in (0, 9, 10, 25)] == [1.0, 1.0, 2.0, 3.0]


def test_schedule_epoch_rejects_unknown_granularity():
  with pytest.raises(ValueError, match='granularity'):
    schedules.schedule_epoch(0, 10, 'batch')
