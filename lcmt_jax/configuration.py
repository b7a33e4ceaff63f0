"""Config validation: every key checked before any work starts.

Unknown keys and impossible values raise `ConfigError` with one line naming
the key, the value and what is allowed.
"""

from typing import Any, Callable

import ml_collections

from lcmt_jax import data_sources
from lcmt_jax import errors
from lcmt_jax import losses
from lcmt_jax import models
from lcmt_jax import schedules
from lcmt_jax import train_state


class ConfigError(errors.UserInputError):
  """A config key is unknown or its value is impossible."""


def _one_of(*choices: Any) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v in choices), f'one of {choices}'


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f'an integer >= {low}'


def _number_in(low: float, high: float, *, low_open: bool = False,
               high_open: bool = False) -> tuple[Callable[[Any], bool], str]:
  def check(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      return False
    return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
  brackets = ('(' if low_open else '[') + f'{low}, {high}' + (')' if high_open else ']')
  return check, f'a number in {brackets}'


def _channel_values(positive: bool) -> tuple[Callable[[Any], bool], str]:
  def check(v):
    return isinstance(v, (tuple, list)) and len(v) in (0, 3) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool)
        and (x > 0 or not positive and x == 0) for x in v)
  sign = 'positive' if positive else 'non-negative'
  return check, f'() for the data set\'s own, or 3 {sign} numbers, one per channel'


_BOOL = ((lambda v: isinstance(v, bool)), 'True or False')
_OPTIONAL_BOOL = ((lambda v: v is None or isinstance(v, bool)),
                  'None (the data set\'s), True or False')
_STRING = ((lambda v: isinstance(v, str)), 'a string')
_INF = float('inf')

RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    'dataset': _one_of(*data_sources.DATASETS),
    'data_dir': _STRING,
    'cache_dir': _STRING,
    'image_size': _int_at_least(12),  # ConvLarge's 3x3 'VALID' convolution after two poolings.
    'random_flip': _OPTIONAL_BOOL,
    'image_mean': _channel_values(positive=False),
    'image_std': _channel_values(positive=True),
    'labeled_per_class': _int_at_least(1),
    'validation_per_class': _int_at_least(0),
    'split_seed': _int_at_least(0),
    'labeled_batch_size': _int_at_least(1),
    'unlabeled_batch_size': _int_at_least(1),
    'model': _one_of(*models.MODELS),
    'width': _int_at_least(1),
    'dropout_rate': _number_in(0.0, 1.0, high_open=True),
    'bn_momentum': _number_in(0.0, 1.0, low_open=True),
    'compute_dtype': _one_of('float32', 'bfloat16'),
    'method': _one_of(*train_state.METHODS),
    'consistency_weight': _number_in(0.0, _INF),
    'consistency_rampup': _number_in(0.0, _INF, high_open=True),
    'ema_decay': _number_in(0.0, 1.0),
    'lc_weight': _number_in(0.0, _INF),
    'lc_start': _number_in(0.0, _INF, high_open=True),
    'lc_rampup': _number_in(0.0, _INF, high_open=True),
    'lc_threshold': _number_in(0.0, _INF, low_open=True, high_open=True),
    'lc_threshold_quantile': _number_in(0.0, 1.0, high_open=True),
    'lc_features': _one_of(*losses.LC_FEATURES),
    'lc_pull': _one_of(*losses.LC_PULLS),
    'lc_pair_weight': _one_of(*losses.LC_PAIR_WEIGHTS),
    'learning_rate': _number_in(0.0, _INF, low_open=True, high_open=True),
    'momentum': _number_in(0.0, 1.0, high_open=True),
    'nesterov': _BOOL,
    'weight_decay': _number_in(0.0, _INF, high_open=True),
    'lr_schedule': _one_of(*schedules.LR_SCHEDULES),
    'decay_start': _number_in(0.0, _INF, high_open=True),
    'decay_end': _number_in(0.0, _INF, high_open=True),
    'num_epochs': _int_at_least(1),
    'selection': _one_of('test', 'validation'),
    'schedule_granularity': _one_of(*schedules.GRANULARITIES),
    'teacher_init': _one_of(*train_state.TEACHER_INITS),
    'joint_forward': _BOOL,
    'weight_decay_params': _one_of(*train_state.WEIGHT_DECAY_PARAMS),
    'seed': _int_at_least(0),
    'steps_per_call': _int_at_least(0),
    'eval_every_epochs': _int_at_least(1),
    'eval_batch_size': _int_at_least(1),
    'checkpoint_every_epochs': _int_at_least(1),
    'progress_bar': _BOOL,
}


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises `ConfigError` for the first unknown key, missing key or impossible value.

  `num_devices` is the size of the data-parallel mesh, which every batch size
  must divide.
  """
  unknown = sorted(set(config.keys()) - set(RULES))
  if unknown:
    raise ConfigError(f'unknown config key {unknown[0]!r}; valid keys are listed in configs/default.py')
  missing = sorted(set(RULES) - set(config.keys()))
  if missing:
    raise ConfigError(f'config key {missing[0]!r} is missing; start from configs/default.py')
  for key, (check, allowed) in RULES.items():
    if not check(config[key]):
      raise ConfigError(f'config.{key}={config[key]!r} is invalid: it must be {allowed}')
  if config.decay_end < config.decay_start:
    raise ConfigError(f'config.decay_end={config.decay_end:g} is before config.decay_start='
                      f'{config.decay_start:g}: the learning rate decays from decay_start to decay_end')
  if config.num_epochs > config.decay_end:
    raise ConfigError(f'config.num_epochs={config.num_epochs} goes past config.decay_end='
                      f'{config.decay_end:g}, where the learning-rate decay ends (linear: at 0): set '
                      f'config.decay_end >= num_epochs, or train fewer epochs')
  if config.model == 'wrn28_2' and config.width % 8:
    raise ConfigError(f'config.width={config.width} does not suit wrn28_2: its stem has width / 8 '
                      'channels, so the width must be a multiple of 8 (128 is WRN-28-2)')
  if config.dataset in ('cifar10', 'svhn') and config.image_size != 32:
    raise ConfigError(f'config.image_size={config.image_size} does not apply to {config.dataset}, '
                      'whose images are 32x32: leave it at 32')
  if config.dataset == 'digits' and config.image_size % 8:
    raise ConfigError(f'config.image_size={config.image_size} is not a multiple of 8: the 8x8 '
                      'digits are enlarged by whole pixels (16, 24, 32, ...)')
  if config.selection == 'validation' and config.validation_per_class == 0:
    raise ConfigError('config.selection=validation needs a validation split: set '
                      'config.validation_per_class > 0, or use config.selection=test')
  for key in ('labeled_batch_size', 'unlabeled_batch_size', 'eval_batch_size'):
    if config[key] % num_devices:
      raise ConfigError(f'config.{key}={config[key]} does not divide over {num_devices} devices: '
                        f'use a multiple of {num_devices}')
