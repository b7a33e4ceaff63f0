"""Every config file and argument against docs/reference.md's tables, values written out by hand.

Loading a config builds a ConfigDict and nothing else, so this whole file runs in
about a second.
"""

import importlib
import json
import math

import pytest

from configs import default
from lcmt_jax import configuration
from lcmt_jax import train_state
from lcmt_jax import workdir

CONFIG_FILES = ('cifar10', 'cifar10_mt', 'svhn', 'svhn_mt')


def _load(name, arg=None):
  return importlib.import_module(f'configs.{name}').get_config(arg)


# Every run of docs/reference.md (Data; Mean Teacher; Losses; Optimiser and schedule).
COMMON = {
    'split_seed': 2,
    'labeled_batch_size': 32,
    'unlabeled_batch_size': 128,
    'width': 128,  # ConvLarge, 3.1 M parameters.
    'dropout_rate': 0.5,
    'bn_momentum': 0.001,
    'consistency_weight': 100.0,
    'consistency_rampup': 5.0,
    'learning_rate': 0.05,
    'momentum': 0.9,
    'nesterov': True,
    'weight_decay': 1e-4,
    'eval_every_epochs': 5,  # "Every 5 epochs".
    'validation_per_class': 0,  # Faithful: selection on the test set.
    # The quirks, at the reference's behaviour.
    'selection': 'test',
    'schedule_granularity': 'epoch',
    'teacher_init': 'independent',
    'joint_forward': False,
    'weight_decay_params': 'all',
}

# docs/reference.md's table, one row per config file; the MT-only rows use the
# schedules of the reference's comments ([600, 800] and [300, 500]).
TABLE = {
    'cifar10': {'dataset': 'cifar10', 'method': 'mt_lc', 'decay_start': 800, 'decay_end': 1000,
                'lc_start': 600, 'lc_rampup': 100, 'lc_weight': 10.0, 'ema_decay': 0.99},
    'cifar10_mt': {'dataset': 'cifar10', 'method': 'mt', 'decay_start': 600, 'decay_end': 800,
                   'ema_decay': 0.99},
    'svhn': {'dataset': 'svhn', 'method': 'mt_lc', 'decay_start': 400, 'decay_end': 600,
             'lc_start': 300, 'lc_rampup': 50, 'lc_weight': 20.0, 'ema_decay': 0.995},
    'svhn_mt': {'dataset': 'svhn', 'method': 'mt', 'decay_start': 300, 'decay_end': 500,
                'ema_decay': 0.995},
}

# labels argument -> (labelled images per class, LC threshold T of the MT+LC run).
# CIFAR-10 has 5,000 train images per class: 8 % is 400, 4 % is 200; T is 50 for
# 4,000 labels and 40 for 2,000. SVHN: 100 or 50 per class, T 50 in both.
LABELS = {
    'cifar10': {None: (400, 50.0), 4000: (400, 50.0), 2000: (200, 40.0)},
    'svhn': {None: (100, 50.0), 1000: (100, 50.0), 500: (50, 50.0)},
}
LABELS['cifar10_mt'], LABELS['svhn_mt'] = LABELS['cifar10'], LABELS['svhn']

CASES = [(name, labels) for name in CONFIG_FILES for labels in LABELS[name]]
CASE_IDS = [f'{name}-labels={labels}' for name, labels in CASES]

QUIRK_SWITCHES = {  # docs/reference.md "Quirks" 1, 2, 3, 5 and 6, at their fixes.
    'selection': 'validation',
    'schedule_granularity': 'step',
    'teacher_init': 'copy',
    'joint_forward': True,
    'weight_decay_params': 'kernels',
}


def _argument(labels, *more):
  return ','.join(([f'labels={labels}'] if labels else []) + list(more)) or None


@pytest.mark.parametrize('name, labels', CASES, ids=CASE_IDS)
def test_config_matches_the_reference_table(name, labels):
  config = _load(name, _argument(labels))
  row = TABLE[name]
  per_class, threshold = LABELS[name][labels]
  expected = {**COMMON, **row, 'labeled_per_class': per_class}
  if row['method'] == 'mt_lc':
    expected['lc_threshold'] = threshold
  for key, value in expected.items():
    assert config[key] == value, f'{name}:{_argument(labels)}: config.{key}={config[key]!r}, docs/reference.md: {value!r}'
  assert config.labeled_per_class * 10 == (labels or per_class * 10)  # Ten classes.
  # "training stops after epoch decay_end".
  assert config.num_epochs == row['decay_end'] and isinstance(config.num_epochs, int)
  configuration.validate(config)
  step_config = train_state.StepConfig.from_config(config, steps_per_epoch=359)
  # Mean Teacher only: no local-clustering term, whatever the lc_* keys hold.
  assert step_config.lc_weight == (row['lc_weight'] if row['method'] == 'mt_lc' else 0.0)
  assert step_config.use_unlabeled


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_default_label_count_is_the_first_offered(name):
  first = {'cifar10': 4000, 'cifar10_mt': 4000, 'svhn': 1000, 'svhn_mt': 1000}[name]
  assert _load(name).to_dict() == _load(name, f'labels={first}').to_dict()
  assert _load(name, 'faithful').to_dict() == _load(name).to_dict()


@pytest.mark.parametrize('name, labels', CASES, ids=CASE_IDS)
def test_improved_flips_exactly_the_quirk_switches(name, labels):
  faithful = _load(name, _argument(labels)).to_dict()
  improved = _load(name, _argument(labels, 'improved')).to_dict()
  changed = {k for k in faithful if faithful[k] != improved[k]}
  assert set(improved) == set(faithful)
  assert changed == set(QUIRK_SWITCHES) | {'validation_per_class'}, (
      f"'improved' changed {sorted(changed)}; it must change exactly the quirk switches "
      f'{sorted(QUIRK_SWITCHES)} and add a validation split')
  for key, value in QUIRK_SWITCHES.items():
    assert improved[key] == value, key
  assert improved['validation_per_class'] > 0
  configuration.validate(_load(name, _argument(labels, 'improved')))


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_argument_order_does_not_matter(name):
  labels = {'cifar10': 2000, 'cifar10_mt': 2000, 'svhn': 500, 'svhn_mt': 500}[name]
  tokens = ['improved', f'labels={labels}', 'epochs=40']
  first = _load(name, ','.join(tokens)).to_dict()
  assert _load(name, ','.join(reversed(tokens))).to_dict() == first
  assert _load(name, ','.join(tokens) + ',').to_dict() == first  # A trailing comma is harmless.


BAD_ARGUMENTS = [
    ('cifar10', 'labels=3', 'labels=3'),
    ('cifar10', 'labels=500', 'labels=500'),  # SVHN's count, not CIFAR-10's.
    ('cifar10_mt', 'labels=1000', 'labels=1000'),
    ('svhn', 'labels=4000', 'labels=4000'),
    ('svhn_mt', 'labels=2000', 'labels=2000'),
    ('quickstart', 'labels=4000', 'labels=4000'),  # Offers no label count at all.
    ('cifar10', 'bogus', 'bogus'),
    ('svhn', 'improved,bogus', 'bogus'),
    ('cifar10', 'epochs=0', 'epochs=0'),
    ('svhn_mt', 'epochs=-5', 'epochs=-5'),
    ('cifar10_mt', 'epochs=ten', 'epochs=ten'),
    ('cifar10', 'epochs=', 'epochs='),
    ('svhn', 'labels=1e3', 'labels=1e3'),
    ('cifar10', 'width=8', 'width=8'),  # Keys are set with --config.KEY, not here.
]


@pytest.mark.parametrize('name, arg, named', BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_the_token(name, arg, named):
  with pytest.raises(ValueError) as error:
    _load(name, arg)
  message = str(error.value)
  assert named in message, f'{arg!r} -> {message!r} does not name {named!r}'
  assert '\n' not in message


# --- epochs=N ---------------------------------------------------------------------------------

# Counted in epochs and scaled with the run (the brief of `epochs=N`), written out here.
SCALED_KEYS = ('consistency_rampup', 'lc_start', 'lc_rampup', 'decay_start', 'decay_end')
INTERVALS = ('eval_every_epochs', 'checkpoint_every_epochs')
# 29 (cifar10_mt), 79 (svhn) and 1001 (cifar10, svhn_mt) are run lengths where
# `decay_end * (N / num_epochs)` rounds below N in floating point.
EPOCHS = (1, 7, 29, 79, 80, 123, 333, 1001, 2000)
SCALE_FILES = CONFIG_FILES + ('quickstart',)


def test_schedule_keys_are_the_epoch_counted_keys():
  assert set(default.SCHEDULE_KEYS) == set(SCALED_KEYS)
  assert set(default.INTERVAL_KEYS) == set(INTERVALS)


@pytest.mark.parametrize('name', SCALE_FILES)
@pytest.mark.parametrize('epochs', EPOCHS)
def test_epochs_scales_every_schedule_key_in_proportion(name, epochs):
  base = _load(name)
  for variant in ('faithful', 'improved'):
    unscaled = _load(name, variant)
    config = _load(name, f'{variant},epochs={epochs}')
    assert config.num_epochs == epochs and isinstance(config.num_epochs, int)
    for key in SCALED_KEYS:
      assert isinstance(config[key], float), key
      assert config[key] / epochs == pytest.approx(unscaled[key] / unscaled.num_epochs,
                                                   rel=1e-12), key
    for key in INTERVALS:  # Rounded to the nearest whole epoch, at least 1.
      exact = unscaled[key] * epochs / unscaled.num_epochs
      assert isinstance(config[key], int) and config[key] >= 1, key
      assert config[key] == 1 or abs(config[key] - exact) <= 0.5, (key, config[key], exact)
      if exact < 1:
        assert config[key] == 1, key
    if epochs != base.num_epochs:
      assert config.schedule_granularity == 'step'
    untouched = set(SCALED_KEYS) | set(INTERVALS) | {'num_epochs', 'schedule_granularity'}
    for key in set(unscaled.keys()) - untouched:
      assert config[key] == unscaled[key], key


@pytest.mark.parametrize('name', SCALE_FILES)
@pytest.mark.parametrize('epochs', EPOCHS)
def test_scaled_schedule_is_a_valid_run_until_decay_end(name, epochs):
  """An accepted `epochs=N` gives a config that validates and, as the reference, trains until decay_end.

  A length too short to scale to may instead be refused when the config loads, with a
  ValueError naming the argument.
  """
  try:
    config = _load(name, f'epochs={epochs}')
  except ValueError as e:
    assert f'epochs={epochs}' in str(e), str(e)
    return
  decay_end, num_epochs = config.decay_end, config.num_epochs
  assert decay_end == pytest.approx(num_epochs, rel=1e-12)
  assert decay_end >= num_epochs, (
      f'configs/{name}.py:epochs={epochs} gives decay_end={decay_end!r} < '
      f'num_epochs={num_epochs}: floating-point rounding of decay_end * (N / num_epochs) '
      'falls below N, so configuration.validate rejects the run as going past decay_end; the '
      'scaled decay_end must be exactly num_epochs')
  try:
    configuration.validate(config)
  except configuration.ConfigError as e:
    pytest.fail(f'configs/{name}.py:epochs={epochs} is accepted when the config loads but does '
                f'not validate: {e}')


@pytest.mark.parametrize('name', SCALE_FILES)
def test_epochs_equal_to_the_configs_own_changes_nothing(name):
  unscaled = _load(name)
  same = _load(name, f'epochs={unscaled.num_epochs}')
  assert same.to_dict() == unscaled.to_dict()
  assert same.schedule_granularity == 'epoch'


def test_epochs_hand_computed_examples():
  """Two compressions written out in full (CIFAR-10 MT+LC, 1,000 epochs; SVHN MT, 500)."""
  config = _load('cifar10', 'epochs=100')  # Everything / 10.
  assert (config.consistency_rampup, config.lc_start, config.lc_rampup, config.decay_start,
          config.decay_end, config.num_epochs) == pytest.approx((0.5, 60, 10, 80, 100, 100))
  assert (config.eval_every_epochs, config.checkpoint_every_epochs) == (1, 1)  # 0.5 -> at least 1.
  config = _load('svhn_mt', 'epochs=1500')  # Everything * 3.
  assert (config.consistency_rampup, config.decay_start, config.decay_end,
          config.num_epochs) == pytest.approx((15, 900, 1500, 1500))
  assert (config.eval_every_epochs, config.checkpoint_every_epochs) == (15, 15)
  assert config.schedule_granularity == 'step'
  assert math.isclose(config.lc_start / config.num_epochs, 300 / 500)


def test_batch_sizes_must_divide_over_the_devices():
  config = default.get_config()  # CIFAR-10's.
  configuration.validate(config, num_devices=4)  # 32, 128 and 500 all divide by 4.
  with pytest.raises(configuration.ConfigError,
                     match='labeled_batch_size=32 does not divide over 3 devices'):
    configuration.validate(config, num_devices=3)
  config.eval_batch_size = 498
  with pytest.raises(configuration.ConfigError, match='eval_batch_size=498 does not divide over 4'):
    configuration.validate(config, num_devices=4)


# --- configs/cifar10_wrn.py: WRN-28-2 under the reference's recipe or WRN's usual one ----------

# The recipes of the config's docstring, written out: the reference's (docs/reference.md
# "Optimiser and schedule") and FixMatch's for WRN-28-2 on CIFAR-10.
WRN_RECIPES = {
    'reference': {'learning_rate': 0.05, 'weight_decay': 1e-4, 'weight_decay_params': 'all',
                  'lr_schedule': 'linear', 'decay_start': 800.0, 'decay_end': 1000.0,
                  'schedule_granularity': 'epoch'},
    'wrn': {'learning_rate': 0.03, 'weight_decay': 5e-4, 'weight_decay_params': 'kernels',
            'lr_schedule': 'cosine', 'decay_start': 0.0, 'decay_end': 1000.0,
            'schedule_granularity': 'step'},
}
WRN_MODEL = {'model': 'wrn28_2', 'width': 128, 'dropout_rate': 0.0, 'bn_momentum': 0.001}


@pytest.mark.parametrize('recipe', sorted(WRN_RECIPES))
def test_cifar10_wrn_recipes(recipe):
  config = _load('cifar10_wrn', f'recipe={recipe}')
  for key, value in {**WRN_MODEL, **WRN_RECIPES[recipe], 'momentum': 0.9, 'nesterov': True,
                     'method': 'mt_lc', 'labeled_per_class': 400, 'num_epochs': 1000}.items():
    assert config[key] == value, f'recipe={recipe}: config.{key}={config[key]!r}, not {value!r}'
  configuration.validate(config)
  # Apart from the model and the recipe's keys, everything is configs/cifar10.py's.
  reference = _load('cifar10')
  differs = {k for k in reference.keys() if reference[k] != config[k]}
  assert differs == {k for k in {**WRN_MODEL, **WRN_RECIPES[recipe]} if reference[k] != config[k]}
  assert step_lr(config, 0) == pytest.approx(WRN_RECIPES[recipe]['learning_rate'])


def step_lr(config, step):
  return float(train_state.StepConfig.from_config(config, steps_per_epoch=359).learning_rate(step))


def test_cifar10_wrn_default_recipe_is_the_reference_and_arguments_combine():
  assert _load('cifar10_wrn').to_dict() == _load('cifar10_wrn', 'recipe=reference').to_dict()
  config = _load('cifar10_wrn', 'recipe=wrn,labels=2000,epochs=80,improved')
  assert (config.labeled_per_class, config.lc_threshold, config.num_epochs) == (200, 40.0, 80)
  assert (config.decay_start, config.decay_end, config.lr_schedule) == (0.0, 80.0, 'cosine')
  assert config.teacher_init == 'copy' and config.learning_rate == 0.03
  configuration.validate(config)
  # The cosine schedule ends at cos(7 pi / 16) of the base rate.
  assert step_lr(config, 80 * 359 - 1) == pytest.approx(0.03 * math.cos(7 * math.pi / 16),
                                                        rel=1e-3)


@pytest.mark.parametrize('arg', ['recipe=fixmatch', 'recipe='])
def test_cifar10_wrn_rejects_an_unknown_recipe(arg):
  with pytest.raises(ValueError, match='recipe'):
    _load('cifar10_wrn', arg)


def test_recipe_is_refused_by_configs_without_recipes():
  with pytest.raises(ValueError, match='recipe=wrn'):
    _load('cifar10', 'recipe=wrn')


def test_wrn_width_must_be_a_multiple_of_8():
  config = _load('cifar10_wrn')
  config.width = 12
  with pytest.raises(configuration.ConfigError, match='multiple of 8'):
    configuration.validate(config)
  config.model = 'convlarge'  # ConvLarge takes any width.
  configuration.validate(config)


# The keys config.json held when train.py first wrote it; every later key needs an
# entry in workdir.ADDED_KEYS, or older runs could no longer be resumed or evaluated.
FIRST_RECORDED_KEYS = {
    'bn_momentum', 'checkpoint_every_epochs', 'compute_dtype', 'consistency_rampup',
    'consistency_weight', 'data_dir', 'dataset', 'decay_end', 'decay_start', 'dropout_rate',
    'ema_decay', 'eval_batch_size', 'eval_every_epochs', 'joint_forward', 'labeled_batch_size',
    'labeled_per_class', 'lc_rampup', 'lc_start', 'lc_threshold', 'lc_weight', 'learning_rate',
    'method', 'momentum', 'nesterov', 'num_epochs', 'progress_bar', 'schedule_granularity',
    'seed', 'selection', 'split_seed', 'steps_per_call', 'teacher_init',
    'unlabeled_batch_size', 'validation_per_class', 'weight_decay', 'weight_decay_params',
    'width'}


def test_every_key_added_since_the_first_config_json_has_its_old_value():
  added = set(default.base_config()) - FIRST_RECORDED_KEYS
  assert added == set(workdir.ADDED_KEYS), (
      'give each new config key an entry in workdir.ADDED_KEYS: the value that reproduces '
      'runs recorded before it')


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_a_run_recorded_before_the_added_keys_resumes_and_loads_unchanged(name, tmp_path):
  config = _load(name)
  recorded = {k: v for k, v in json.loads(config.to_json_best_effort()).items()
              if k not in workdir.ADDED_KEYS}
  (tmp_path / 'config.json').write_text(json.dumps(recorded))
  assert workdir.check_config(config, str(tmp_path), allow_config_change=False) == []
  assert workdir.load_config(str(tmp_path)).to_dict() == json.loads(config.to_json_best_effort())
