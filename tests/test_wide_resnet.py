"""lcmt_jax.models.WideResNet against the PyTorch WRN-28-2 of lcmt_jax/testing/torch_reference.py,
and configs/cifar10_wrn.py trained end to end.

Both sides get the same weights (random, batch-norm scales, biases and running
statistics included, so that no parameter is at a value that hides a mistake),
a width-16 network (stem 2, groups 4/8/16: the standard shape, narrow) and
six 32x32 images.

Tolerances, from the spread measured on the project's CPU (AMD EPYC, float32,
seeds 0-4; `python -m tests.test_wide_resnet` prints the figures): in train
mode the logits (of size ~1) differ by at most 3.6e-7 and the features by
3.0e-7; in eval mode, where random running statistics leave the activations
unnormalised and the logits reach 20-120, by 2.6e-7 of the largest logit; the
updated running statistics by 1.4e-6 relative. Asserted: 1e-5 absolute in
train mode, 1e-5 of the largest value in eval mode, 2e-5 relative for the
statistics. A lost BN, a shortcut from the wrong tensor or PyTorch's padding of
the strided convs changes the logits by 1e-2 or more.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_wrn
from lcmt_jax import evaluate
from lcmt_jax import experiment
from lcmt_jax import models
from lcmt_jax import trainer
from lcmt_jax.testing.runs import TINY_SETTINGS

try:
  import torch
  from lcmt_jax.testing import torch_reference as ref
except ImportError:  # The parity tests skip themselves (`needs_torch`); the rest run.
  torch = ref = None

pytestmark = pytest.mark.numerics


@pytest.fixture(scope='module')
def needs_torch():
  pytest.importorskip('torch', reason='torch is needed only for the parity tests against the '
                      'PyTorch port')

WIDTH = 16
BN_MOMENTUM = 0.001
TRAIN_ATOL = 1e-5  # Logits and features in train mode.
EVAL_TOLERANCE = 1e-5  # Of the largest logit or feature, in eval mode.
STATS_RTOL = 2e-5


def _random_variables(model, images, seed):
  """Every parameter and running statistic random: He-scaled kernels, BN scales in [0.5, 1.5],
  biases and running means N(0, 0.1^2), running variances in [0.5, 2]."""
  shapes = jax.eval_shape(functools.partial(models.init_variables, model), jax.random.key(0),
                          images[:1])
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = np.prod(leaf.shape[:-1])
      return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
    if name == 'scale':
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name == 'var':
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)  # bias, mean

  return jax.tree.map_with_path(fill, shapes)


def _torch_model(variables):
  model = ref.WideResNet(width=WIDTH, bn_momentum=BN_MOMENTUM)
  missing, unexpected = model.load_state_dict(
      ref.load_numpy_state_dict(ref.wide_resnet_state_dict(variables)), strict=False)
  assert not unexpected and all(name.endswith('num_batches_tracked') for name in missing)
  return model


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(3).normal(size=(6, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def model():
  return models.create_model('wrn28_2', num_classes=10, width=WIDTH, dropout_rate=0.0,
                             bn_momentum=BN_MOMENTUM, dtype='float32')


@pytest.fixture(scope='module')
def variables(model, images):
  return _random_variables(model, images, seed=5)


@pytest.fixture(scope='module')
def jax_train(model, variables, images):
  """JAX train mode: `(logits, features, updated batch_stats)`."""
  return jax.jit(functools.partial(models.apply_with_features, model.apply, train=True))(
      variables, images)


@pytest.fixture(scope='module')
def torch_train(needs_torch, variables, images):
  """The port in train mode: `(logits, features, its module with updated running stats)`."""
  port = _torch_model(variables).train()
  with torch.no_grad():
    features, logits = port(ref.images_from_nhwc(images))
  return logits.numpy(), features.numpy(), port


def max_differences(model, variables, images, jax_train, torch_train):
  """The figures the tolerances above come from."""
  (logits, features, stats), (t_logits, t_features, port) = jax_train, torch_train
  updated = {'params': variables['params'], 'batch_stats': stats}
  eval_logits = jax.jit(functools.partial(model.apply, train=False))(updated, images)
  with torch.no_grad():
    _, t_eval_logits = _torch_model(updated).eval()(ref.images_from_nhwc(images))
  stat_errors = [np.max(np.abs(got - want) / np.abs(want))
                 for got, want in zip(*_running_stats(stats, variables, images, port))]
  return {'train logits': np.abs(logits - t_logits).max(),
          'eval logits': np.abs(np.asarray(eval_logits) - t_eval_logits.numpy()).max(),
          'features': np.abs(features - t_features).max(),
          'running stats (relative)': max(stat_errors),
          'train logit scale': np.abs(t_logits).max(),
          'eval logit scale': np.abs(t_eval_logits.numpy()).max()}


def _running_stats(stats, variables, images, port):
  """JAX's updated running statistics and the port's, the variance brought to Flax's form.

  PyTorch moves the running variance by the unbiased batch variance, Flax by the
  biased one; with `n` values per channel, Flax's is PyTorch's increment times
  `(n - 1) / n`. `n` is the batch times the layer's input height and width.
  """
  t_state = port.state_dict()
  got, want = [], []
  for name, leaf in ref.wide_resnet_state_dict({'params': {}, 'batch_stats': stats}).items():
    got.append(leaf)
    if name.endswith('running_mean'):
      want.append(t_state[name].numpy())
      continue
    old = ref.wide_resnet_state_dict({'params': {}, 'batch_stats': variables['batch_stats']})[name]
    n = images.shape[0] * _input_side(name, images.shape[1]) ** 2
    increment = (t_state[name].numpy() - (1 - BN_MOMENTUM) * old) * (n - 1) / n
    want.append((1 - BN_MOMENTUM) * old + increment)
  return got, want


def _input_side(name, image_side):
  """The height (and width) of the input of batch norm `name`: each group after the first
  halves it in its first conv, so its first block's `bn1` still sees the previous size."""
  if name.startswith('bn_final'):
    return image_side // 4
  group, block, norm = int(name[5]), int(name[12]), name.split('.')[1]
  return image_side >> (group - 1 - (group > 1 and block == 1 and norm == 'bn1'))


def test_parameter_count_of_wrn28_2(needs_torch):
  """1,467,610 for 10 classes, counted by hand: a 3x3x3x16 stem; per group of output width
  c (32, 64, 128) from input width c_in, a first block of two 3x3 convs, a 1x1 projection and
  two BNs (2 parameters per channel), then three blocks of two c x c convs and two BNs; a final
  BN of 128 and a 128 x 10 dense layer with bias."""
  expected = 3 * 3 * 3 * 16
  for c_in, c in ((16, 32), (32, 64), (64, 128)):
    expected += 9 * c_in * c + 9 * c * c + c_in * c + 2 * c_in + 2 * c
    expected += 3 * (2 * 9 * c * c + 2 * 2 * c)
  expected += 2 * 128 + 128 * 10 + 10
  assert expected == 1_467_610

  shapes = jax.eval_shape(functools.partial(models.init_variables, models.WideResNet()),
                          jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
  count = sum(np.prod(t.shape) for t in jax.tree.leaves(shapes['params']))
  assert count == expected
  assert sum(p.numel() for p in ref.WideResNet().parameters()) == expected
  # A running mean and variance beside each of the 25 batch norms: per group, bn1 of the first
  # block sees c_in channels, the seven others c; then the final 128.
  bn_channels = sum(c_in + 7 * c for c_in, c in ((16, 32), (32, 64), (64, 128))) + 128
  assert sum(np.prod(t.shape) for t in jax.tree.leaves(shapes['batch_stats'])) == 2 * bn_channels


def test_train_mode_logits_and_features_match_the_port(jax_train, torch_train):
  logits, features, _ = jax_train
  t_logits, t_features, _ = torch_train
  assert features.shape == (6, WIDTH) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, t_logits, rtol=0, atol=TRAIN_ATOL)
  np.testing.assert_allclose(features, t_features, rtol=0, atol=TRAIN_ATOL)


def test_running_statistics_move_as_the_port_moves_them(variables, images, jax_train,
                                                         torch_train):
  got, want = _running_stats(jax_train[2], variables, images, torch_train[2])
  assert len(got) == 2 * 25
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=STATS_RTOL)
  moved = jax.tree.map(lambda new, old: np.abs(new - old).max(), jax_train[2],
                       variables['batch_stats'])
  assert min(jax.tree.leaves(moved)) > 1e-5  # Every statistic moved: the test can see it.


def test_eval_mode_after_a_train_step_matches_the_port(model, variables, images, jax_train,
                                                       torch_train):
  """Eval mode normalises by the running statistics the train step left."""
  updated = {'params': variables['params'], 'batch_stats': jax_train[2]}
  logits, features, stats = jax.jit(functools.partial(
      models.apply_with_features, model.apply, train=False))(updated, images)
  port = _torch_model(updated).eval()
  with torch.no_grad():
    t_features, t_logits = port(ref.images_from_nhwc(images))
  for got, want in ((logits, t_logits.numpy()), (features, t_features.numpy())):
    np.testing.assert_allclose(got, want, rtol=0, atol=EVAL_TOLERANCE * np.abs(want).max())
  assert jax.tree.all(jax.tree.map(np.array_equal, stats, updated['batch_stats']))
  # Eval mode differs from train mode: the running statistics are not the batch's.
  assert np.abs(np.asarray(logits) - np.asarray(jax_train[0])).max() > 1e-2


def test_features_are_the_pooled_activated_output_of_the_last_group(model, variables, images):
  _, state = jax.jit(functools.partial(
      model.apply, train=False, mutable=['intermediates'],
      capture_intermediates=lambda m, name: m.name == 'bn_final'))(variables, images)
  normed = np.asarray(state['intermediates']['bn_final']['__call__'][0], np.float64)
  features = np.asarray(state['intermediates'][models.FEATURES][0])
  np.testing.assert_allclose(features, np.where(normed >= 0, normed, 0.1 * normed).mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  dense = variables['params']['dense']
  logits = model.apply(variables, images, train=False)
  np.testing.assert_allclose(logits, features @ dense['kernel'] + dense['bias'], rtol=1e-5,
                             atol=1e-5)


def test_bfloat16_wrn_keeps_float32_params_and_close_logits(variables, images):
  bf16_model = models.create_model('wrn28_2', num_classes=10, width=WIDTH, dropout_rate=0.0,
                                   bn_momentum=BN_MOMENTUM, dtype='bfloat16')
  shapes = jax.eval_shape(functools.partial(models.init_variables, bf16_model),
                          jax.random.key(0), images[:2])
  assert {t.dtype for t in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  fp32_model = models.create_model('wrn28_2', num_classes=10, width=WIDTH, dropout_rate=0.0,
                                   bn_momentum=BN_MOMENTUM, dtype='float32')
  fp32 = np.asarray(fp32_model.apply(variables, images, train=True, mutable=['batch_stats'])[0])
  bf16, state = bf16_model.apply(variables, images, train=True, mutable=['batch_stats'])
  assert bf16.dtype == jnp.float32
  assert {t.dtype for t in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}
  bf16 = np.asarray(bf16)
  assert not np.array_equal(bf16, fp32)  # It really computed in bfloat16.
  assert np.abs(bf16 - fp32).max() < 0.1 * fp32.std()


def test_width_must_be_a_multiple_of_8(images):
  with pytest.raises(ValueError, match='multiple of 8'):
    models.WideResNet(width=12).init(jax.random.key(0), images[:1], train=False)


# --- configs/cifar10_wrn.py, end to end on the digits -----------------------------------------


def tiny_wrn_config(recipe, **overrides):
  """configs/cifar10_wrn.py's `recipe` compressed to one epoch, on the 16x16 digits at width 8
  (stem 1, groups 2/4/8): every setting of the recipe but the data and the size."""
  config = cifar10_wrn.get_config(f'recipe={recipe},epochs=1')
  schedule = {key: config[key] for key in ('decay_start', 'decay_end', 'lc_start', 'lc_rampup')}
  config.update(dataset='digits', labeled_per_class=5, **TINY_SETTINGS)
  config.update(schedule, num_epochs=1, **overrides)  # The recipe's schedule, not the tiny one.
  return config


def test_wrn_recipe_trains_an_epoch_and_restores(tmp_path):
  # One recipe end to end (a 28-layer network compiles slowly on a CPU): the reference recipe
  # differs only in optimiser settings, which tests/test_configs.py and the ConvLarge runs cover.
  config = tiny_wrn_config('wrn')
  summary = trainer.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= summary['final/test/teacher_error'] <= 1.0
  run = evaluate.restore_run(str(tmp_path), 'latest')
  assert run.config.model == 'wrn28_2' and run.config.lr_schedule == config.lr_schedule
  assert 'group3_block4' in run.state.params and 'bn_final' in run.state.batch_stats
  predictions = run.predict_fn(run.state, run.data['test_images'])
  assert predictions['teacher_features'].shape[-1] == 8
  assert np.all(np.isfinite(np.asarray(predictions['teacher_features'])))


def test_bfloat16_build_steps_with_float32_state():
  run = experiment.build(tiny_wrn_config('wrn', compute_dtype='bfloat16'))
  state, metrics = run.train_fn(run.state, run.data, run.data_key, num_steps=2)
  assert {leaf.dtype for leaf in jax.tree.leaves((state.params, state.batch_stats))} == {
      jnp.dtype(jnp.float32)}
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(metrics))
  assert int(state.step) == 2


if __name__ == '__main__':
  _images = np.random.default_rng(3).normal(size=(6, 32, 32, 3)).astype(np.float32)
  _model = models.create_model('wrn28_2', num_classes=10, width=WIDTH, dropout_rate=0.0,
                               bn_momentum=BN_MOMENTUM, dtype='float32')
  for _seed in range(5):
    _variables = _random_variables(_model, _images, seed=_seed)
    _jax = jax.jit(functools.partial(models.apply_with_features, _model.apply, train=True))(
        _variables, _images)
    _port = _torch_model(_variables).train()
    with torch.no_grad():
      _f, _l = _port(ref.images_from_nhwc(_images))
    print(_seed, {k: f'{v:.2e}' for k, v in max_differences(
        _model, _variables, _images, _jax, (_l.numpy(), _f.numpy(), _port)).items()})
