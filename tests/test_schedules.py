"""lcmt_jax.schedules and the per-step learning rate against docs/reference.md's formulas in plain Python."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import quickstart
from lcmt_jax import configuration
from lcmt_jax import schedules
from lcmt_jax import train_state

pytestmark = pytest.mark.numerics


def _ramp(t, length):
  """docs/reference.md `ramp(t, L)`."""
  if t <= 0:
    return 0.0
  if t >= length:
    return 1.0
  return math.exp(-5.0 * (1.0 - t / length) ** 2)


def _lr(epoch, base, decay_start, decay_end):
  """docs/reference.md: constant until `decay_start`, then linear to 0 at `decay_end`."""
  if epoch < decay_start:
    return base
  return base * (decay_end - epoch) / (decay_end - decay_start)


# (length, epochs): the consistency ramp (5 epochs, every run) and the LC ramps of
# docs/reference.md's table, evaluated at `epoch - lc_start` as the total loss does.
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


# (decay_start, decay_end) of the four runs of docs/reference.md's table.
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


# --- The learning rate of every step (train_state.StepConfig, the optax schedule) ---------------

SPE, DECAY_START, DECAY_END, NUM_EPOCHS, BASE_LR = 7, 3, 6, 6, 0.05
STEPS = np.arange(NUM_EPOCHS * SPE)  # Every step of the run.


def _hand_lr(step, granularity):
  """docs/reference.md's lr at a 0-based step, by hand: a straight line through (3, 0.05) and (6, 0).

  The epoch counts from 1; 'epoch' moves it once per epoch (the reference), 'step' by
  1/7 each step. Before epoch 3 the line is held at 0.05; past epoch 6 (the last
  epoch's inside steps, with 'step') at 0: a learning rate is never negative.
  """
  epoch = step // SPE + 1 if granularity == 'epoch' else 1 + step / SPE
  return float(np.interp(epoch, [DECAY_START, DECAY_END], [BASE_LR, 0.0]))


def _lr_config(granularity):
  """A complete, valid run of 6 epochs whose decay runs from epoch 3 to 6; plain SGD."""
  config = quickstart.get_config()
  config.update(schedule_granularity=granularity, learning_rate=BASE_LR,
                decay_start=float(DECAY_START), decay_end=float(DECAY_END),
                num_epochs=NUM_EPOCHS, weight_decay=0.0, momentum=0.0, nesterov=False)
  configuration.validate(config)
  return config


def test_hand_lr_table():
  """The oracle itself, at the steps that matter, written out."""
  assert [_hand_lr(s, 'epoch') for s in (0, 13, 14, 20, 21, 27, 28, 34, 35, 41)] == pytest.approx(
      [0.05, 0.05, 0.05, 0.05, 0.05 * 2 / 3, 0.05 * 2 / 3, 0.05 / 3, 0.05 / 3, 0.0, 0.0])
  assert [_hand_lr(s, 'step') for s in (13, 14, 15, 28, 34, 35, 36, 41)] == pytest.approx(
      [0.05, 0.05, 0.05 * (1 - 1 / 21), 0.05 / 3, 0.05 * 1 / 21, 0.0, 0.0, 0.0])


@pytest.mark.parametrize('granularity', ['epoch', 'step'])
def test_learning_rate_at_every_step_matches_hand_computation(granularity):
  step_config = train_state.StepConfig.from_config(_lr_config(granularity), SPE)
  got = np.asarray(jax.jit(jax.vmap(step_config.learning_rate))(jnp.asarray(STEPS)))
  expected = [_hand_lr(s, granularity) for s in STEPS]
  assert np.all(got >= 0.0), (
      f'negative learning rate at steps {STEPS[got < 0].tolist()} ({granularity}): '
      f'{got[got < 0].tolist()}')
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8)
  last_epoch = STEPS >= (NUM_EPOCHS - 1) * SPE
  np.testing.assert_allclose(got[last_epoch], 0.0, atol=1e-8)  # Epoch decay_end trains at lr 0.
  # Constant through epoch 2, and at the first step of the decay's first epoch.
  np.testing.assert_allclose(got[:2 * SPE + 1], BASE_LR, rtol=1e-6)


@pytest.mark.parametrize('granularity', ['epoch', 'step'])
def test_optimizer_applies_the_learning_rate_of_each_step(granularity):
  """SGD without momentum or decay moves a parameter by exactly -lr(step) * grad at each step."""
  config = _lr_config(granularity)
  step_config = train_state.StepConfig.from_config(config, SPE)
  tx = train_state.make_optimizer(config, step_config)
  params = {'v': jnp.zeros(())}

  def one_step(carry, _):
    params, opt_state = carry
    updates, opt_state = tx.update({'v': jnp.ones(())}, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), -updates['v']

  _, applied = jax.jit(lambda: jax.lax.scan(one_step, (params, tx.init(params)), None,
                                            length=len(STEPS)))()
  np.testing.assert_allclose(np.asarray(applied), [_hand_lr(s, granularity) for s in STEPS],
                             rtol=1e-5, atol=1e-8)


def test_validate_rejects_training_past_decay_end():
  config = quickstart.get_config()
  configuration.validate(config)  # num_epochs == decay_end: the reference's own stop.
  config.num_epochs = int(config.decay_end) + 1
  with pytest.raises(configuration.ConfigError) as error:
    configuration.validate(config)
  message = str(error.value)
  assert '\n' not in message
  assert f'num_epochs={config.num_epochs}' in message and 'decay_end' in message, message
  config.num_epochs, config.decay_end = 6, 6.0  # At the edge: allowed.
  config.decay_start = 3.0
  configuration.validate(config)


# --- The cosine schedule (config.lr_schedule='cosine', configs/cifar10_wrn.py:recipe=wrn) -------


def test_cosine_decay_lr_hand_computed():
  """FixMatch's `lr cos(7 pi p / 16)` over epochs [0, 16], written out: cos(0) = 1,
  cos(7 pi / 64) = 0.94154, cos(7 pi / 32) = 0.77301, cos(7 pi / 16) = 0.19509; held
  outside the decay."""
  epochs = jnp.asarray([-1.0, 0.0, 4.0, 8.0, 16.0, 17.0])
  got = np.asarray(schedules.cosine_decay_lr(epochs, 0.03, 0.0, 16.0))
  expected = 0.03 * np.array([1.0, 1.0, 0.941544, 0.773010, 0.195090, 0.195090])
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # decay_end <= decay_start: no decay, as the linear schedule.
  np.testing.assert_allclose(schedules.cosine_decay_lr(epochs, 0.03, 5.0, 5.0), 0.03)


def test_learning_rate_dispatches_on_the_schedule_name():
  epoch = jnp.float32(8.0)
  assert float(schedules.learning_rate('cosine', epoch, 0.03, 0.0, 16.0)) == pytest.approx(
      0.03 * 0.773010, rel=1e-5)
  assert float(schedules.learning_rate('linear', epoch, 0.03, 0.0, 16.0)) == pytest.approx(0.015)
  with pytest.raises(ValueError, match='lr schedule'):
    schedules.learning_rate('step', epoch, 0.03, 0.0, 16.0)


def test_step_config_follows_the_cosine_schedule_every_step():
  """Per step over 2 epochs of 4 steps from epoch 1 (the first step) to 3 (after the last)."""
  config = _lr_config('step')
  config.update(lr_schedule='cosine', learning_rate=0.03, decay_start=1.0, decay_end=3.0,
                num_epochs=2)
  configuration.validate(config)
  step_config = train_state.StepConfig.from_config(config, 4)
  got = np.asarray(jax.vmap(step_config.learning_rate)(jnp.arange(8)))
  # Step s is at epoch 1 + s / 4, so p = s / 8.
  expected = [0.03 * math.cos(7 * math.pi / 16 * s / 8) for s in range(8)]
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_validate_rejects_an_unknown_lr_schedule():
  config = quickstart.get_config()
  config.lr_schedule = 'exponential'
  with pytest.raises(configuration.ConfigError, match="lr_schedule='exponential'"):
    configuration.validate(config)
