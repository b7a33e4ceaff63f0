"""lcmt_jax.train_state against docs/reference.md "Mean Teacher", "Losses" and "Optimiser".

The oracles are NumPy (EMA, PyTorch's SGD) and an independent composition of the loss
from the public model and loss functions with hand-computed weights. A width-8
ConvLarge on 16x16 images keeps every compile and step small.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lcmt_jax import losses
from lcmt_jax import models
from lcmt_jax import train_state

pytestmark = pytest.mark.numerics

N_LABELED, N_UNLABELED, SIZE = 8, 16, 16
# Long epochs keep the trajectory's 15 steps in epoch 1, where the objective is fixed.
STEPS_PER_EPOCH = 100
TRAIN_STEP = jax.jit(train_state.train_step, static_argnums=2)


def _key(seed):
  # The 'rbg' generator compiles several times faster than threefry on CPU.
  return jax.random.key(seed, impl='rbg')


def _config(**overrides):
  config = ml_collections.ConfigDict({
      'method': 'mt_lc',
      'schedule_granularity': 'epoch',
      'learning_rate': 0.02,
      'lr_schedule': 'linear',
      'decay_start': 2,
      'decay_end': 5,
      'consistency_weight': 100.0,
      'consistency_rampup': 5,
      'lc_weight': 10.0,
      'lc_start': 0.0,
      'lc_rampup': 3,
      'lc_threshold': 50.0,
      'lc_threshold_quantile': 0.0,
      'lc_features': 'raw',
      'lc_pull': 'student',
      'lc_pair_weight': 'none',
      'ema_decay': 0.9,
      'joint_forward': False,
      'weight_decay_params': 'all',
      'weight_decay': 1e-2,  # Larger than the reference's 1e-4, so its effect is measurable.
      'momentum': 0.9,
      'nesterov': True,
  })
  config.update(overrides)
  return config


def _ramp(t, length):
  """docs/reference.md `ramp(t, L)`."""
  if t <= 0:
    return 0.0
  if t >= length:
    return 1.0
  return math.exp(-5.0 * (1.0 - t / length) ** 2)


def _hand_weights(step, config, steps_per_epoch=STEPS_PER_EPOCH):
  """docs/reference.md's total-loss weights at `step`, epoch counted from 1."""
  epoch = step // steps_per_epoch + 1
  consistency = config.consistency_weight * _ramp(epoch, config.consistency_rampup)
  lc = 0.0
  if epoch >= config.lc_start:
    lc = config.lc_weight * _ramp(epoch - config.lc_start, config.lc_rampup)
  return consistency, lc


def _np_tree(tree):
  return jax.tree.map(lambda t: np.asarray(t, np.float64), tree)


def _leaves_with_names(tree):
  return [(jax.tree_util.keystr(path), np.asarray(leaf))
          for path, leaf in jax.tree.leaves_with_path(tree)]


@pytest.fixture(scope='module')
def model():
  return models.ConvLarge(width=8, dropout_rate=0.0)


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  images = lambda n: jnp.asarray(rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32))
  return {'labeled_student': images(N_LABELED), 'labeled_teacher': images(N_LABELED),
          'labels': jnp.asarray(rng.integers(0, 10, size=N_LABELED)),
          'unlabeled_student': images(N_UNLABELED), 'unlabeled_teacher': images(N_UNLABELED),
          'unlabeled_labels': jnp.asarray(rng.integers(0, 10, size=N_UNLABELED))}


def _create_both(model, config, batch):
  """States from `teacher_init='independent'` and `'copy'` with the same key and batches."""
  step_config = train_state.StepConfig.from_config(config, STEPS_PER_EPOCH)
  tx = train_state.make_optimizer(config, step_config)

  def create(key, student_images, teacher_images):  # One compile for both.
    return tuple(train_state.create_train_state(model, tx, key, student_images, teacher_images,
                                                teacher_init)
                 for teacher_init in ('independent', 'copy'))

  return jax.jit(create)(_key(0), batch['labeled_student'], batch['labeled_teacher'])


@pytest.fixture(scope='module')
def config():
  return _config()


@pytest.fixture(scope='module')
def step_config(config):
  return train_state.StepConfig.from_config(config, STEPS_PER_EPOCH)


@pytest.fixture(scope='module')
def initial_states(model, config, batch):
  return _create_both(model, config, batch)


@pytest.fixture(scope='module')
def initial_state(initial_states):
  return initial_states[0]  # The reference's independent teacher.


@pytest.fixture(scope='module')
def trajectory(initial_state, batch, step_config):
  """States 0..15 and the metrics of steps 0..14 of training on one fixed batch."""
  states, metrics = [initial_state], []
  for _ in range(15):
    state, step_metrics = TRAIN_STEP(states[-1], batch, step_config)
    states.append(state)
    metrics.append(jax.device_get(step_metrics))
  return states, metrics


def _oracle_loss(model, params, teacher_params, batch_stats, teacher_batch_stats, batch,
                 consistency_weight, lc_weight, threshold):
  """docs/reference.md's total loss from separate train-mode passes, and the running means."""
  def run(p, stats, images):
    return models.apply_with_features(model.apply, {'params': p, 'batch_stats': stats},
                                      images, train=True)

  zl, fl, after_labeled = run(params, batch_stats, batch['labeled_student'])
  zu, fu, after_both = run(params, after_labeled, batch['unlabeled_student'])
  tl, _, teacher_after_labeled = run(teacher_params, teacher_batch_stats, batch['labeled_teacher'])
  tu, _, teacher_after_both = run(teacher_params, teacher_after_labeled,
                                  batch['unlabeled_teacher'])
  total = (losses.cross_entropy_loss(zl, batch['labels'])
           + consistency_weight * losses.consistency_loss(zl, tl, zu, tu)
           + lc_weight * losses.local_clustering_loss(fl, fu, threshold))
  return total, {'student_after_labeled': after_labeled, 'student_after_both': after_both,
                 'teacher_after_both': teacher_after_both, 'labeled_features': fl,
                 'unlabeled_features': fu, 'teacher_unlabeled_logits': tu}


@pytest.fixture(scope='module')
def oracle(model, config, batch):
  """`(loss, stats), (grad wrt student, grad wrt teacher)` of the oracle loss at a state."""
  fn = jax.jit(jax.value_and_grad(functools.partial(_oracle_loss, model), argnums=(0, 1),
                                  has_aux=True))

  def at(state):
    consistency_weight, lc_weight = _hand_weights(int(state.step), config)
    return fn(state.params, state.teacher_params, state.batch_stats, state.teacher_batch_stats,
              batch, consistency_weight, lc_weight, config.lc_threshold)

  return at


# --- Optimiser --------------------------------------------------------------------------------


def _np_torch_sgd(params, grads_per_step, lrs, momentum, weight_decay, decayed):
  """torch.optim.SGD(momentum, nesterov=True, weight_decay) on a flat dict, in float64."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buffers = {}
  for grads, lr in zip(grads_per_step, lrs):
    for k in params:
      d_p = grads[k] + (weight_decay * params[k] if decayed(k) else 0.0)
      buffers[k] = d_p if k not in buffers else momentum * buffers[k] + d_p
      params[k] = params[k] - lr * (d_p + momentum * buffers[k])
  return params


@pytest.mark.parametrize('weight_decay_params', ['all', 'kernels'])
def test_make_optimizer_is_torch_sgd_nesterov_with_coupled_decay(weight_decay_params):
  config = _config(learning_rate=0.05, weight_decay=1e-2,
                   weight_decay_params=weight_decay_params, decay_start=2, decay_end=5)
  step_config = train_state.StepConfig.from_config(config, steps_per_epoch=1)
  tx = train_state.make_optimizer(config, step_config)
  rng = np.random.default_rng(1)
  params = {'layer': {'v': rng.normal(size=(3, 2)).astype(np.float32),
                      'g': rng.uniform(1, 2, size=2).astype(np.float32),
                      'b': rng.normal(size=2).astype(np.float32)}}
  grads = [jax.tree.map(lambda p: rng.normal(scale=0.1, size=p.shape).astype(np.float32),
                                  params) for _ in range(3)]

  state, current = tx.init(params), params
  for g in grads:
    updates, state = tx.update(g, state, current)
    current = jax.tree.map(lambda p, u: p + u, current, updates)

  # One step per epoch: epochs 1, 2, 3 give lr 0.05, 0.05 and 0.05 * (5 - 3) / 3.
  lrs = [0.05, 0.05, 0.05 * 2 / 3]
  decayed = (lambda k: True) if weight_decay_params == 'all' else (lambda k: k == 'v')
  expected = _np_torch_sgd(params['layer'], [g['layer'] for g in grads], lrs, 0.9, 1e-2, decayed)
  without_decay = _np_torch_sgd(params['layer'], [g['layer'] for g in grads], lrs, 0.9, 0.0,
                                decayed)
  for k, value in current['layer'].items():
    np.testing.assert_allclose(value, expected[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # Which parameters the decay reaches is visible in the result.
    decay_moved_it = not np.allclose(expected[k], without_decay[k], rtol=1e-5, atol=0)
    assert decay_moved_it == decayed(k), k


def test_weight_decay_on_kernels_only_leaves_g_and_b_alone():
  config = _config(weight_decay_params='kernels')
  tx = train_state.make_optimizer(config, train_state.StepConfig.from_config(config, 1))
  params = {'conv': {'v': np.ones((3, 3, 2, 4), np.float32), 'g': np.ones(4, np.float32),
                     'b': np.ones(4, np.float32)}}
  zero_grads = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  assert np.all(np.asarray(updates['conv']['v']) < 0)
  np.testing.assert_array_equal(updates['conv']['g'], 0.0)
  np.testing.assert_array_equal(updates['conv']['b'], 0.0)


def test_student_steps_are_torch_sgd_on_the_reference_loss(trajectory, oracle, config):
  """Two steps of `train_step` against the oracle loss's gradient and PyTorch's SGD."""
  states, metrics = trajectory
  (loss0, _), (grads0, _) = oracle(states[0])
  (loss1, _), (grads1, _) = oracle(states[1])
  np.testing.assert_allclose(metrics[0]['loss'], loss0, rtol=1e-5)
  np.testing.assert_allclose(metrics[1]['loss'], loss1, rtol=1e-5)

  names = [name for name, _ in _leaves_with_names(states[0].params)]
  flat = lambda tree: dict(zip(names, (leaf for _, leaf in _leaves_with_names(tree))))
  lr = config.learning_rate  # Steps 0 and 1 are in epoch 1.
  expected = _np_torch_sgd(flat(states[0].params), [_np_tree(flat(grads0)), _np_tree(flat(grads1))],
                           [lr, lr], 0.9, config.weight_decay, lambda k: True)
  got = flat(states[2].params)
  start = flat(states[0].params)
  for name in names:
    moved = expected[name] - start[name]
    # Measured agreement is ~5e-5 of the largest move; leaving out the weight decay
    # (1e-2 here) changes the moves by over 1e-3 of it, Nesterov's term by ~0.3.
    np.testing.assert_allclose(got[name] - start[name], moved, rtol=1e-4,
                               atol=2e-4 * np.abs(moved).max(), err_msg=name)


@pytest.mark.parametrize('lc_pull', ['student', 'teacher'])
def test_teacher_receives_no_gradient(initial_states, batch, lc_pull):
  """The loss `train_step` minimises passes no gradient into the teacher's parameters.

  The library's own step is differentiated: the loss it reports, as a function
  of the teacher's parameters (its logits are the consistency targets; with
  `lc_pull='teacher'` its features are the LC targets too), has a gradient of
  exactly zero, with an independent teacher and with one equal to the
  student, although its value depends on the teacher.
  """
  independent, copied = initial_states
  step_config = train_state.StepConfig.from_config(_config(lc_pull=lc_pull), STEPS_PER_EPOCH)

  def reported_loss(teacher_params):
    _, metrics = train_state.train_step(independent.replace(teacher_params=teacher_params),
                                        batch, step_config)
    # Only what is asserted on: XLA then drops the rest of the step (the student's backward pass).
    return metrics['loss'], {k: metrics[k] for k in ('consistency_weight', 'consistency_loss',
                                                     'lc_weight', 'lc_loss')}

  loss_and_grad = jax.jit(jax.value_and_grad(reported_loss, has_aux=True))
  losses_seen = []
  for teacher_params in (independent.teacher_params, copied.teacher_params):
    (loss, metrics), grads = loss_and_grad(teacher_params)
    assert metrics['consistency_weight'] > 0 and metrics['consistency_loss'] > 0
    assert metrics['lc_weight'] > 0 and metrics['lc_loss'] > 0
    for name, grad in _leaves_with_names(grads):
      np.testing.assert_array_equal(grad, 0.0, err_msg=name)
    losses_seen.append(float(loss))
  # The teacher is used: a zero gradient here is a stopped one, not a missing dependence.
  assert abs(losses_seen[0] - losses_seen[1]) > 1e-3 * abs(losses_seen[0])


def test_teacher_is_ema_of_updated_student(trajectory, config):
  states, _ = trajectory
  for before, after in zip(states[:2], states[1:3]):
    expected = jax.tree.map(
        lambda t, s: config.ema_decay * t + (1 - config.ema_decay) * s,
        _np_tree(before.teacher_params), _np_tree(after.params))
    for (name, got), (_, want) in zip(_leaves_with_names(after.teacher_params),
                                      _leaves_with_names(expected)):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_running_means_move_once_per_separate_pass(trajectory, oracle):
  states, _ = trajectory
  (_, stats), _ = oracle(states[0])
  after_both = dict(_leaves_with_names(stats['student_after_both']))
  after_labeled = dict(_leaves_with_names(stats['student_after_labeled']))
  for name, got in _leaves_with_names(states[1].batch_stats):
    np.testing.assert_allclose(got, after_both[name], rtol=1e-5, atol=1e-8, err_msg=name)
    assert not np.allclose(got, after_labeled[name], rtol=1e-4, atol=0), name  # Moved twice.
  # The teacher runs in train mode: its running means move with its own batches.
  teacher_before = dict(_leaves_with_names(states[0].teacher_batch_stats))
  teacher_after = dict(_leaves_with_names(stats['teacher_after_both']))
  for name, got in _leaves_with_names(states[1].teacher_batch_stats):
    np.testing.assert_allclose(got, teacher_after[name], rtol=1e-5, atol=1e-8, err_msg=name)
    assert not np.allclose(got, teacher_before[name], rtol=1e-4, atol=0), name


def test_joint_forward_uses_one_pass_over_both_batches(model, initial_state, batch, trajectory):
  joint_config = train_state.StepConfig.from_config(_config(joint_forward=True), STEPS_PER_EPOCH)
  state, _ = TRAIN_STEP(initial_state, batch, joint_config)
  images = jnp.concatenate([batch['labeled_student'], batch['unlabeled_student']])
  _, _, joint_stats = jax.jit(functools.partial(
      models.apply_with_features, model.apply, train=True))(
          {'params': initial_state.params, 'batch_stats': initial_state.batch_stats}, images)
  separate = trajectory[0][1]
  for (name, got), (_, want), (_, other) in zip(_leaves_with_names(state.batch_stats),
                                                _leaves_with_names(joint_stats),
                                                _leaves_with_names(separate.batch_stats)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8, err_msg=name)
    assert not np.allclose(got, other, rtol=1e-4, atol=0), name


@pytest.fixture(scope='module')
def metrics_at_later_steps(initial_state, batch, step_config):
  """Metrics of one step taken from `initial_state` with its step counter moved forward."""
  steps = [0, 99, 100, 250, 399, 400, 450]
  return steps, [jax.device_get(TRAIN_STEP(initial_state.replace(step=initial_state.step + s),
                                           batch, step_config)[1]) for s in steps]


def test_learning_rate_metric_follows_schedule(metrics_at_later_steps, config):
  steps, metrics = metrics_at_later_steps
  # Decay from epoch 2 to 5: lr = base * (5 - epoch) / 3 from epoch 2 on.
  base = config.learning_rate
  epochs = [s // STEPS_PER_EPOCH + 1 for s in steps]
  expected = [base if e < 2 else base * (5 - e) / 3 for e in epochs]
  assert expected[-1] == 0.0 and expected[3] < base
  np.testing.assert_allclose([m['learning_rate'] for m in metrics], expected, rtol=1e-6,
                             atol=1e-9)


def test_loss_weight_metrics_follow_hand_formula(metrics_at_later_steps, config):
  steps, metrics = metrics_at_later_steps
  for step, m in zip(steps, metrics):
    consistency, lc = _hand_weights(step, config)
    np.testing.assert_allclose(m['consistency_weight'], consistency, rtol=1e-5, err_msg=str(step))
    np.testing.assert_allclose(m['lc_weight'], lc, rtol=1e-5, err_msg=str(step))


def test_training_on_a_fixed_batch_lowers_the_loss(trajectory):
  _, metrics = trajectory
  # All 15 steps are in epoch 1: the loss weights, hence the objective, do not change.
  assert len({float(m['consistency_weight']) for m in metrics}) == 1
  assert metrics[-1]['loss'] < 0.8 * metrics[0]['loss']
  assert metrics[-1]['student_labeled_accuracy'] > metrics[0]['student_labeled_accuracy']
  for m in metrics:
    assert all(np.all(np.isfinite(v)) for v in m.values())


@pytest.mark.parametrize('granularity', ['epoch', 'step'])
def test_loss_weights_match_hand_formula(granularity):
  config = _config(schedule_granularity=granularity, consistency_rampup=5, lc_start=3,
                   lc_rampup=4, lc_weight=10.0)
  spe = 10
  step_config = train_state.StepConfig.from_config(config, spe)
  steps = [0, 5, 9, 10, 19, 20, 25, 29, 30, 45, 60, 65, 70, 200]
  consistency, lc = train_state.loss_weights(jnp.asarray(steps), step_config)
  for i, step in enumerate(steps):
    epoch = step // spe + 1 if granularity == 'epoch' else step / spe + 1
    want_lc = 10.0 * _ramp(epoch - 3, 4) if epoch >= 3 else 0.0
    np.testing.assert_allclose(consistency[i], 100.0 * _ramp(epoch, 5), rtol=1e-5, atol=1e-6,
                               err_msg=str(step))
    np.testing.assert_allclose(lc[i], want_lc, rtol=1e-5, atol=1e-6, err_msg=str(step))


@pytest.mark.parametrize('method, has_consistency, has_lc', [
    ('mt_lc', True, True), ('mt', True, False), ('supervised', False, False)])
def test_metrics_depend_on_method(initial_state, batch, method, has_consistency, has_lc):
  step_config = train_state.StepConfig.from_config(_config(method=method), STEPS_PER_EPOCH)
  keys = []
  for lc_active in (False, True):
    _, metrics = jax.eval_shape(functools.partial(train_state.train_step, cfg=step_config,
                                                  lc_active=lc_active), initial_state, batch)
    assert 'ce_loss' in metrics and 'loss' in metrics
    assert ('consistency_loss' in metrics) == has_consistency
    assert ('lc_loss' in metrics) == has_lc
    # The diagnostics of the threshold: every method with unlabelled images (Mean Teacher too).
    assert {'lc_threshold', 'lc_within_lu', 'lc_purity_uu', 'lc_base_rate_lu'} <= set(
        metrics) or not has_consistency
    assert 'lc_within_lu' not in metrics or has_consistency
    keys.append(set(metrics))
  assert keys[0] == keys[1]  # Both programs of a run log the same metrics.


def _states_equal_bitwise(a, b):
  for (name, got), (_, want) in zip(
      _leaves_with_names((a.params, a.opt_state, a.teacher_params, a.batch_stats,
                          a.teacher_batch_stats, a.step)),
      _leaves_with_names((b.params, b.opt_state, b.teacher_params, b.batch_stats,
                          b.teacher_batch_stats, b.step))):
    np.testing.assert_array_equal(got, want, err_msg=name)


def test_steps_before_lc_start_never_compute_the_lc_term(initial_state, batch, monkeypatch):
  """Until `lc_start` an MT+LC run is a Mean Teacher run, bit for bit: its program has no LC
  term, so an LC term that gives NaN cannot reach it (the reference computes none there), and
  its checkpoints can continue as Mean Teacher (RESULTS.md, the full protocol's first 600
  epochs)."""
  monkeypatch.setattr(losses, 'lc_loss_of_distances', lambda *args: jnp.float32(jnp.nan))

  def two_steps(method, lc_active):
    # A fresh partial: traced now, with the NaN-giving LC term.
    step = jax.jit(functools.partial(
        train_state.train_step,
        cfg=train_state.StepConfig.from_config(_config(method=method, lc_start=3),
                                               STEPS_PER_EPOCH),
        lc_active=lc_active))
    state, _ = step(initial_state, batch)
    return step(state, batch)

  mt_lc, mt_lc_metrics = two_steps('mt_lc', lc_active=False)
  mt, mt_metrics = two_steps('mt', lc_active=False)
  _, with_lc_metrics = two_steps('mt_lc', lc_active=True)
  assert np.isnan(with_lc_metrics['lc_loss']) and np.isnan(with_lc_metrics['loss'])
  assert mt_lc_metrics['lc_weight'] == 0.0 and mt_lc_metrics['lc_loss'] == 0.0
  assert all(np.all(np.isfinite(v)) for v in mt_lc_metrics.values())
  moved = jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a) - np.asarray(b))),
                       mt.params, initial_state.params)
  assert max(jax.tree.leaves(moved)) > 1e-4  # The steps change the student.
  _states_equal_bitwise(mt_lc, mt)
  assert mt_lc_metrics['loss'] == mt_metrics['loss']


@pytest.mark.parametrize('granularity, lc_start, calls', [
    # Epochs counted from 1, ten steps each: epoch 3 is steps 20 to 29.
    ('epoch', 3.0, [(0, 10, False), (10, 10, False), (20, 10, True), (13, 7, False),
                    (14, 7, True)]),
    # Per-step epochs: step s is at epoch 1 + s / 10, so epoch 2.5 is step 15.
    ('step', 2.5, [(0, 10, False), (5, 10, False), (6, 10, True), (15, 1, True)]),
])
def test_lc_active_in_a_call_is_t_at_least_t_lc_at_its_last_step(granularity, lc_start, calls):
  step_config = train_state.StepConfig.from_config(
      _config(schedule_granularity=granularity, lc_start=lc_start), steps_per_epoch=10)
  for first_step, num_steps, expected in calls:
    assert train_state.lc_active_in(step_config, first_step, num_steps) == expected, first_step
  mt = train_state.StepConfig.from_config(_config(method='mt', lc_start=0), steps_per_epoch=10)
  assert not train_state.lc_active_in(mt, 100, 10)  # No LC term to compute.


@pytest.mark.parametrize('lc_pair_weight', ['none', 'teacher_agreement'])
def test_unlabeled_labels_change_the_purity_and_nothing_else(initial_state, batch, lc_pair_weight):
  """The true labels of the unlabelled images serve the diagnostics only: permuting them
  leaves the new state bitwise equal and moves the purity."""
  # A fifth of the pairs inside T: a mask of every pair would have the base rate's purity.
  step_config = train_state.StepConfig.from_config(
      _config(lc_threshold_quantile=0.2, lc_pair_weight=lc_pair_weight), STEPS_PER_EPOCH)
  state, metrics = TRAIN_STEP(initial_state, batch, step_config)
  rng = np.random.default_rng(3)
  purities = {float(metrics['lc_purity_uu'])}
  for _ in range(3):
    permuted = dict(batch, unlabeled_labels=rng.permutation(batch['unlabeled_labels']))
    other_state, other_metrics = TRAIN_STEP(initial_state, permuted, step_config)
    _states_equal_bitwise(state, other_state)
    for name in ('loss', 'lc_loss', 'lc_threshold', 'lc_within_lu', 'lc_within_uu',
                 'lc_base_rate_uu'):
      assert metrics[name] == other_metrics[name], name
    purities.add(float(other_metrics['lc_purity_uu']))
  assert len(purities) > 1


def test_quantile_threshold_is_that_quantile_of_the_unlabeled_batch(model, initial_state, batch):
  """`lc_threshold_quantile=q`: T is the q-quantile of the student's distinct unlabelled pairs."""
  quantile = 0.3
  config = _config(lc_threshold_quantile=quantile)
  _, metrics = TRAIN_STEP(initial_state, batch,
                          train_state.StepConfig.from_config(config, STEPS_PER_EPOCH))
  oracle_loss = jax.jit(functools.partial(_oracle_loss, model))
  state = initial_state
  args = (state.params, state.teacher_params, state.batch_stats, state.teacher_batch_stats, batch,
          *_hand_weights(0, config))
  features = np.asarray(oracle_loss(*args, 1.0)[1]['unlabeled_features'], np.float64)
  pairs = [np.mean((features[i] - features[j]) ** 2)
           for i in range(N_UNLABELED) for j in range(i + 1, N_UNLABELED)]
  threshold = np.quantile(pairs, quantile)
  np.testing.assert_allclose(metrics['lc_threshold'], threshold, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], oracle_loss(*args, threshold)[0], rtol=1e-5)
  # The diagonal (d_ii = 0) counts among the unlabelled pairs inside T.
  inside = (N_UNLABELED + 2 * np.sum(np.asarray(pairs) <= threshold)) / N_UNLABELED**2
  np.testing.assert_allclose(metrics['lc_within_uu'], inside, rtol=1e-6)
  # The purity and the base rate leave the diagonal out.
  labels = np.asarray(batch['unlabeled_labels'])
  same = [labels[i] == labels[j] for i in range(N_UNLABELED) for j in range(i + 1, N_UNLABELED)]
  chosen = np.asarray(pairs) <= threshold
  np.testing.assert_allclose(metrics['lc_purity_uu'], np.mean(np.asarray(same)[chosen]),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics['lc_base_rate_uu'], np.mean(same), rtol=1e-6)


def test_teacher_agreement_weights_the_steps_lc_pairs(model, initial_state, batch):
  """`lc_pair_weight='teacher_agreement'`: the step's LC term and weighted purity are those of
  a NumPy double loop over the oracle's features and teacher logits."""
  config = _config(lc_threshold_quantile=0.3, lc_pair_weight='teacher_agreement')
  _, metrics = TRAIN_STEP(initial_state, batch,
                          train_state.StepConfig.from_config(config, STEPS_PER_EPOCH))
  state = initial_state
  _, aux = jax.jit(functools.partial(_oracle_loss, model))(
      state.params, state.teacher_params, state.batch_stats, state.teacher_batch_stats, batch,
      *_hand_weights(0, config), 1.0)
  fl, fu = (np.asarray(aux[k], np.float64) for k in ('labeled_features', 'unlabeled_features'))
  p = np.exp(np.asarray(aux['teacher_unlabeled_logits'], np.float64))
  p /= p.sum(axis=1, keepdims=True)
  labels, labels_u = np.asarray(batch['labels']), np.asarray(batch['unlabeled_labels'])
  d = lambda a, b: np.mean((a - b) ** 2)
  threshold = np.quantile([d(fu[i], fu[j]) for i in range(N_UNLABELED)
                           for j in range(i + 1, N_UNLABELED)], 0.3)
  lc_loss, same, mass = 0.0, 0.0, 0.0
  for rows, weight_of in ((fl, lambda i, j: p[j, labels[i]]), (fu, lambda i, j: p[i] @ p[j])):
    numerator = denominator = 0.0
    for i, row in enumerate(rows):
      for j in range(N_UNLABELED):
        if d(row, fu[j]) <= threshold:
          numerator += weight_of(i, j) * d(row, fu[j]) * np.exp(-d(row, fu[j]) / threshold)
          denominator += weight_of(i, j)
          if rows is fu and i != j:
            same += weight_of(i, j) * (labels_u[i] == labels_u[j])
            mass += weight_of(i, j)
    lc_loss += numerator / denominator
  np.testing.assert_allclose(metrics['lc_threshold'], threshold, rtol=1e-5)
  np.testing.assert_allclose(metrics['lc_loss'], lc_loss, rtol=1e-4)
  np.testing.assert_allclose(metrics['lc_weighted_purity_uu'], same / mass, rtol=1e-4)
  assert 'lc_weighted_purity_lu' in metrics


def test_unknown_lc_pair_weight_is_rejected(initial_state, batch):
  step_config = train_state.StepConfig.from_config(_config(lc_pair_weight='teacher'),
                                                   STEPS_PER_EPOCH)
  with pytest.raises(ValueError, match='lc_pair_weight must be one of'):
    TRAIN_STEP(initial_state, batch, step_config)


def test_teacher_init_copy_and_independent(initial_states):
  initial_state, copied = initial_states
  for (name, student), (_, teacher) in zip(
      _leaves_with_names((copied.params, copied.batch_stats)),
      _leaves_with_names((copied.teacher_params, copied.teacher_batch_stats))):
    np.testing.assert_array_equal(teacher, student, err_msg=name)
  for (name, student), (_, teacher) in zip(_leaves_with_names(initial_state.params),
                                           _leaves_with_names(initial_state.teacher_params)):
    assert not np.allclose(teacher, student), name


def test_unknown_teacher_init_is_rejected(model, config, batch):
  with pytest.raises(ValueError, match='teacher_init'):
    train_state.create_train_state(model, optax.identity(), _key(0), batch['labeled_student'],
                                   batch['labeled_teacher'], 'shared')



def test_param_norm_metric_is_the_updated_students_norm(trajectory):
  states, metrics = trajectory
  for state, step_metrics in zip(states[1:4], metrics[:3]):
    want = np.sqrt(sum(np.sum(np.square(p.astype(np.float64)))
                       for _, p in _leaves_with_names(state.params)))
    np.testing.assert_allclose(step_metrics['param_norm'], want, rtol=1e-5)
