"""Parts of docs/reference.md that no other test pins down, each against an oracle written here.

- "Model" and "Mean Teacher": dropout 0.5 after the first and second max-pools only, on
  in train mode, in the data-dependent initialisation and in the teacher's passes, off
  in eval mode.
- "Data": the labelled loader restarts, reshuffled, at every epoch start and whenever it
  runs out.
- "Evaluation and checkpoints": the checkpoint kept is the best teacher accuracy on the
  selection split, never replaced by a later, worse one.
- "Mean Teacher": the data-dependent initialisation of the student and of an
  independent teacher use different labelled batches; a copied teacher equals the student.

Networks are width 8; every compiled function is compiled once and reused. The float
checks redo one operation in NumPy (to 1e-5) or test batch statistics (to 1e-3), so the
module runs with XLA's optimisations off, as the behaviour tests do (tests/conftest.py).
"""

import functools
import importlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from configs import quickstart
from lcmt_jax import checkpointing
from lcmt_jax import eval_metrics
from lcmt_jax import experiment
from lcmt_jax import input_pipeline
from lcmt_jax import models
from lcmt_jax import train_state
from lcmt_jax import trainer

LAYERS = ('conv1a', 'conv1b', 'conv1c', 'conv2a', 'conv2b', 'conv2c', 'conv3a', 'conv3b',
          'conv3c', 'dense')
WIDTH = 8
# mean 0, std 1: normalised pixels are x / 255, so tests can read images back.
_PLAIN = input_pipeline.DatasetInfo('plain', 10, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False)


def _key(seed):
  # The 'rbg' generator compiles several times faster than threefry on CPU.
  return jax.random.key(seed, impl='rbg')


def _images(n, size, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


# --- Dropout (docs/reference.md "Model" 1-3, "Mean Teacher") ------------------------------------------


def _recording_layer_calls(fn):
  """Runs `fn()` and returns `(its result, [(layer name, input, output)] in call order)`."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, models.WeightNormMeanOnlyBN) and context.method_name == '__call__':
      calls.append((context.module.name, args[0], out))
    return out

  with nn.intercept_methods(interceptor):
    result = fn()
  return result, calls


def _one_pass(calls):
  """`{layer name: (input, output)}` of one forward pass, checking the layers' order."""
  names = [name for name, _, _ in calls]
  assert names == list(LAYERS), f'layers called {names}'
  return {name: (x, out) for name, x, out in calls}


def _np_leaky_relu(x):
  x = np.asarray(x, np.float64)
  return np.where(x >= 0, x, 0.1 * x)


def _np_max_pool(x):
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _undropped_inputs(layer_outputs, images):
  """What each layer's input is, by docs/reference.md, before any dropout: built from the layer outputs."""
  act = {name: _np_leaky_relu(layer_outputs[name]) for name in LAYERS[:-1]}
  return {
      'conv1a': np.asarray(images, np.float64),
      'conv1b': act['conv1a'], 'conv1c': act['conv1b'],
      'conv2a': _np_max_pool(act['conv1c']),
      'conv2b': act['conv2a'], 'conv2c': act['conv2b'],
      'conv3a': _np_max_pool(act['conv2c']),
      'conv3b': act['conv3a'], 'conv3c': act['conv3b'],
      'dense': act['conv3c'].mean(axis=(1, 2)),
  }


def _dropped_fraction(got, undropped, rate, name):
  """Checks `got` is `undropped` with inverted dropout at `rate`; returns the zeroed fraction.

  Dropout zeroes each element with probability `rate` and scales the rest by 1 / (1 - rate).
  """
  got, undropped = np.asarray(got, np.float64), np.asarray(undropped, np.float64)
  kept = got != 0
  np.testing.assert_allclose(got[kept], undropped[kept] / (1.0 - rate), rtol=1e-4, atol=1e-6,
                             err_msg=f'{name}: kept elements are not scaled by 1 / (1 - {rate})')
  return 1.0 - kept.mean()


def _check_dropout_placement(layers, images, rate, dropout_on, context):
  """Dropout before conv2a and conv3a (after the two max-pools) when `dropout_on`; nowhere else.

  `layers` is `_one_pass`'s record of a forward pass of `images`.
  """
  inputs = {name: x for name, (x, _) in layers.items()}
  outputs = {name: out for name, (_, out) in layers.items()}
  undropped = _undropped_inputs(outputs, images)
  for name in LAYERS:
    dropped_here = dropout_on and name in ('conv2a', 'conv3a')
    if dropped_here:
      fraction = _dropped_fraction(inputs[name], undropped[name], rate, f'{context} {name}')
      assert abs(fraction - rate) < 0.06, (
          f'{context}: {fraction:.3f} of the input of {name} is zeroed, dropout rate is {rate}')
    else:
      np.testing.assert_allclose(np.asarray(inputs[name], np.float64), undropped[name],
                                 rtol=1e-5, atol=1e-6,
                                 err_msg=f'{context}: the input of {name} must not be dropped out')


@pytest.fixture(scope='module')
def dropout_model():
  return models.ConvLarge(width=WIDTH, dropout_rate=0.5)


@pytest.fixture(scope='module')
def recorded_modes(dropout_model):
  """Every layer's input and output in train, init (data-dependent) and eval mode, one compile.

  Also returns the data-dependent initialisation's new `params`. Images are 16x16, 8 of them.
  """
  model = dropout_model

  def run(variables, images, dropout_key):
    apply = functools.partial(model.apply, variables, images, rngs={'dropout': dropout_key})
    _, train = _recording_layer_calls(lambda: apply(train=True, mutable=['batch_stats']))
    (_, ddi), init = _recording_layer_calls(
        lambda: apply(train=True, init_mode=True, mutable=['params']))
    _, evaluation = _recording_layer_calls(lambda: apply(train=False))
    return {'train': _one_pass(train), 'init': _one_pass(init),
            'eval': _one_pass(evaluation)}, ddi['params']

  images = _images(8, 16, seed=1)
  variables = jax.jit(functools.partial(models.init_variables, model))(_key(0), images)
  run = jax.jit(run)
  return images, run(variables, images, _key(1)), run(variables, images, _key(2))


@pytest.mark.parametrize('mode, dropout_on', [('train', True), ('init', True), ('eval', False)])
def test_dropout_after_the_first_and_second_pool_only(recorded_modes, mode, dropout_on):
  images, (calls, _), _ = recorded_modes
  _check_dropout_placement(calls[mode], images, 0.5, dropout_on, f'{mode} mode')


def test_data_dependent_init_runs_with_dropout(recorded_modes):
  """Two dropout keys: the same g, b for block 1 (no dropout before it), different after."""
  _, (_, params_a), (_, params_b) = recorded_modes
  for name in LAYERS:
    for leaf in ('g', 'b'):
      a, b = np.asarray(params_a[name][leaf]), np.asarray(params_b[name][leaf])
      if name.startswith('conv1'):
        np.testing.assert_array_equal(a, b, err_msg=f'{name}/{leaf}')
      else:
        assert not np.allclose(a, b), (
            f'{name}/{leaf} does not depend on the dropout key: the data-dependent '
            'initialisation must run with dropout active (docs/reference.md "Model")')


def test_runs_use_the_configs_dropout_rate():
  for name in ('cifar10', 'cifar10_mt', 'svhn', 'svhn_mt'):
    config = importlib.import_module(f'configs.{name}').get_config()
    assert experiment.build_model(config, 10).dropout_rate == 0.5, name
  config = quickstart.get_config()
  config.dropout_rate = 0.3
  assert experiment.build_model(config, 10).dropout_rate == 0.3


N_LABELED, N_UNLABELED, SIZE = 8, 16, 16


@pytest.fixture(scope='module')
def step_batch():
  return {'labeled_student': _images(N_LABELED, SIZE, 10),
          'labeled_teacher': _images(N_LABELED, SIZE, 11),
          'labels': jnp.arange(N_LABELED) % 10,
          'unlabeled_student': _images(N_UNLABELED, SIZE, 12),
          'unlabeled_teacher': _images(N_UNLABELED, SIZE, 13)}


def _teacher_passes(rate, step_batch):
  """The teacher's layer calls in one `train_step` of a run with `config.dropout_rate=rate`.

  Returns `{pass: {name: (input, output)}}` for 'labeled' and 'unlabeled' under two
  different state RNG keys (the keys every step's dropout comes from).
  """
  config = quickstart.get_config()
  config.update(width=WIDTH, dropout_rate=rate, method='mt', joint_forward=False)
  model = experiment.build_model(config, 10)
  step_config = train_state.StepConfig.from_config(config, steps_per_epoch=10)
  tx = train_state.make_optimizer(config, step_config)

  def one_step(state, batch):
    _, calls = _recording_layer_calls(lambda: train_state.train_step(state, batch, step_config))
    passes = {}
    for i, (name, x, _) in enumerate(calls):
      for kind in ('labeled', 'unlabeled'):
        if name == 'conv1a' and x is batch[f'{kind}_teacher']:  # The teacher's own images.
          passes[kind] = _one_pass(calls[i:i + len(LAYERS)])
    assert set(passes) == {'labeled', 'unlabeled'}, (
        f'teacher passes found: {sorted(passes)}; conv1a must see the teacher\'s images as given')
    return passes

  state = jax.jit(functools.partial(train_state.create_train_state, model, tx,
                                    teacher_init='independent'))(
      _key(0), step_batch['labeled_student'], step_batch['labeled_teacher'])
  one_step = jax.jit(one_step)
  return [one_step(state.replace(rng=_key(seed)), step_batch) for seed in (3, 4)]


@pytest.fixture(scope='module')
def teacher_passes_with_dropout(step_batch):
  return _teacher_passes(0.3, step_batch)


@pytest.fixture(scope='module')
def teacher_passes_without_dropout(step_batch):
  return _teacher_passes(0.0, step_batch)


@pytest.mark.parametrize('kind', ['labeled', 'unlabeled'])
def test_teacher_pass_drops_out_at_the_configs_rate(teacher_passes_with_dropout, step_batch, kind):
  for passes in teacher_passes_with_dropout:
    _check_dropout_placement(passes[kind], step_batch[f'{kind}_teacher'], 0.3, True,
                             f'teacher {kind} pass, dropout_rate=0.3')


@pytest.mark.parametrize('kind', ['labeled', 'unlabeled'])
def test_teacher_outputs_depend_on_the_dropout_key_only_with_dropout(
    teacher_passes_with_dropout, teacher_passes_without_dropout, step_batch, kind):
  logits = lambda passes: np.asarray(passes[kind]['dense'][1])  # The dense layer's output.
  first, second = teacher_passes_with_dropout
  assert not np.allclose(logits(first), logits(second)), (
      'the teacher logits do not change with the step key: no dropout in the teacher pass')
  first, second = teacher_passes_without_dropout
  np.testing.assert_array_equal(logits(first), logits(second))
  _check_dropout_placement(first[kind], step_batch[f'{kind}_teacher'], 0.0, False,
                           f'teacher {kind} pass, dropout_rate=0')


# --- The labelled loader (docs/reference.md "Data") ------------------------------------------------

# 22 labelled images in batches of 4: a pass is 5 batches (20 images, the last 2 dropped).
# 59 unlabelled in batches of 8: an epoch is 7 steps (56 images), NOT a multiple of 5.
NUM_LABELED, NUM_UNLABELED, LABELED_BATCH, UNLABELED_BATCH = 22, 59, 4, 8
EPOCH_STEPS, PASS_BATCHES, EPOCHS = 7, 5, 4


@pytest.fixture(scope='module')
def loader_indices():
  """Labelled and unlabelled indices of every step of 4 epochs, from both of the pipeline's paths."""
  data = {
      'labeled_images': jnp.zeros((NUM_LABELED, 4, 4, 3), jnp.uint8),
      'labeled_labels': jnp.arange(NUM_LABELED, dtype=jnp.int32),  # The label is the index.
      'unlabeled_images': jnp.zeros((NUM_UNLABELED, 4, 4, 3), jnp.uint8),
  }
  key = jax.random.key(7)  # The trainer's kind of key.
  steps = jnp.arange(EPOCHS * EPOCH_STEPS, dtype=jnp.int32)

  @jax.jit
  def per_step():  # `sample_batch` drawing each step's shuffles itself.
    return jax.lax.map(lambda s: input_pipeline.sample_batch(
        key, s, data, _PLAIN, LABELED_BATCH, UNLABELED_BATCH)['labels'], steps)

  @jax.jit
  def drawn_once():  # `shuffles` once for the 4 epochs, then `batch_indices`, as `run_steps`.
    orders = input_pipeline.shuffles(key, 0, EPOCHS, NUM_LABELED, NUM_UNLABELED, LABELED_BATCH,
                                     UNLABELED_BATCH)
    indices = jax.vmap(lambda s: input_pipeline.batch_indices(
        orders, s, LABELED_BATCH, UNLABELED_BATCH))(steps)
    return orders, indices

  orders, (labeled, unlabeled) = drawn_once()
  return np.asarray(per_step()), np.asarray(labeled), np.asarray(unlabeled), orders


def test_one_epoch_is_seven_steps():
  assert input_pipeline.steps_per_epoch(NUM_UNLABELED, UNLABELED_BATCH) == EPOCH_STEPS


def test_both_paths_give_the_same_labelled_batches(loader_indices):
  per_step, labeled, _, _ = loader_indices
  np.testing.assert_array_equal(per_step, labeled)


def test_labelled_loader_restarts_at_every_epoch_and_when_it_runs_out(loader_indices):
  """By docs/reference.md: in each epoch, steps 0-4 are one full labelled pass, 5-6 the start of a new one."""
  labeled = loader_indices[0].reshape(EPOCHS, EPOCH_STEPS, LABELED_BATCH)
  first_passes, second_starts = [], []
  for epoch, batches in enumerate(labeled, start=1):
    first_pass = batches[:PASS_BATCHES].ravel()
    second_pass = batches[PASS_BATCHES:].ravel()  # Abandoned when the next epoch starts.
    assert len(set(first_pass.tolist())) == PASS_BATCHES * LABELED_BATCH, (
        f'epoch {epoch}: its first 5 labelled batches repeat an image ({first_pass.tolist()}): '
        'the labelled stream must restart with a fresh permutation at the epoch start')
    assert set(first_pass.tolist()) <= set(range(NUM_LABELED))
    assert len(set(second_pass.tolist())) == len(second_pass), (
        f'epoch {epoch}: the restarted pass repeats an image ({second_pass.tolist()})')
    # A restart reshuffles: the second pass does not replay the first.
    assert second_pass.tolist() != first_pass[:len(second_pass)].tolist(), f'epoch {epoch}'
    first_passes.append(tuple(first_pass.tolist()))
    second_starts.append(tuple(second_pass.tolist()))
  assert len(set(first_passes)) == EPOCHS, 'every epoch reshuffles its first labelled pass'
  # Epoch e+1 does not continue epoch e's unfinished second pass: it begins a permutation
  # of its own, which (unlike a continuation) may contain images the unfinished pass held.
  assert any(set(first_passes[e + 1][:2 * LABELED_BATCH]) & set(second_starts[e])
             for e in range(EPOCHS - 1))


def test_each_labelled_pass_is_a_permutation_with_the_last_partial_batch_dropped(loader_indices):
  _, labeled, _, orders = loader_indices
  permutations = np.asarray(orders.labeled)  # (epochs, passes in an epoch, NUM_LABELED)
  assert permutations.shape[:2] == (EPOCHS, 2)  # Ceil(7 steps / 5 batches) passes per epoch.
  for order in permutations.reshape(-1, NUM_LABELED):
    np.testing.assert_array_equal(np.sort(order), np.arange(NUM_LABELED))
  for step, batch in enumerate(labeled):
    epoch, position = divmod(step, EPOCH_STEPS)
    cycle, index = divmod(position, PASS_BATCHES)
    np.testing.assert_array_equal(
        batch, permutations[epoch, cycle, index * LABELED_BATCH:(index + 1) * LABELED_BATCH])


def test_each_epoch_is_one_pass_over_the_unlabelled_set(loader_indices):
  unlabeled = loader_indices[2].reshape(EPOCHS, -1)
  for epoch in unlabeled:
    assert len(set(epoch.tolist())) == EPOCH_STEPS * UNLABELED_BATCH  # 56 of 59, 3 dropped.
  assert len({tuple(epoch.tolist()) for epoch in unlabeled}) == EPOCHS


# --- Checkpoint selection (docs/reference.md "Evaluation and checkpoints") ------------------------


def _selection_config(selection):
  config = quickstart.get_config()
  config.update(width=WIDTH, labeled_batch_size=16, unlabeled_batch_size=256, num_epochs=4,
                eval_every_epochs=1, checkpoint_every_epochs=4, decay_start=3.0,
                decay_end=4.0, method='mt', progress_bar=False, selection=selection,
                validation_per_class=5 if selection == 'validation' else 0)
  return config


def _untrained_state(config, info, data, mesh, step_config, key):
  """A valid train state without the data-dependent pass (training is not under test)."""
  del data, mesh
  model = experiment.build_model(config, info.num_classes)
  shapes = jax.eval_shape(functools.partial(models.init_variables, model), key,
                          jnp.zeros((2, 32, 32, 3)))  # Traced only: nothing compiles.
  zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  student, teacher = zeros(), zeros()
  return train_state.TrainState.create(
      apply_fn=model.apply, params=student['params'],
      tx=train_state.make_optimizer(config, step_config), batch_stats=student['batch_stats'],
      teacher_params=teacher['params'], teacher_batch_stats=teacher['batch_stats'],
      rng=key).replace(step=jnp.int32(0))


def _scripted_run(monkeypatch, workdir, config, evaluations, first_epoch=1):
  """Runs the real training loop with training stubbed out and `evaluations` as the results.

  `first_epoch` > 1: the run resumes in `workdir` and evaluates from that epoch on.
  """
  evaluated_at_step = []

  def evaluate(predict_fn, state, data, split, step_config):
    del predict_fn, data, split, step_config
    evaluated_at_step.append(int(state.step))
    return dict(evaluations[len(evaluated_at_step) - 1])

  def run_steps(state, data, data_key, *, num_steps, **kwargs):
    del data, data_key, kwargs
    return state.replace(step=state.step + num_steps), {'loss': jnp.zeros(num_steps)}

  monkeypatch.setattr(eval_metrics, 'evaluate_splits', evaluate)
  monkeypatch.setattr(experiment, 'run_steps', run_steps)
  monkeypatch.setattr(experiment, 'build_state', _untrained_state)
  summary = trainer.train_and_evaluate(config, str(workdir))
  steps_per_epoch = evaluated_at_step[0] // first_epoch
  assert evaluated_at_step == [e * steps_per_epoch
                               for e in range(first_epoch, first_epoch + len(evaluations))]
  checkpoints = checkpointing.RunCheckpoints(str(workdir), read_only=True)
  best_epoch = checkpoints.epoch_of('best')
  best_state, best_loop = checkpoints.restore('best')
  _, latest_loop = checkpoints.restore('latest')
  checkpoints.close()
  return summary, best_epoch, int(best_state['step']) // steps_per_epoch, best_loop, latest_loop


def _evaluation(test_teacher, test_student, validation_teacher=None):
  result = {'test/teacher_accuracy': test_teacher, 'test/student_accuracy': test_student}
  if validation_teacher is not None:
    result.update({'validation/teacher_accuracy': validation_teacher,
                   'validation/student_accuracy': 0.5})
  return result


def test_best_checkpoint_is_the_best_teacher_test_accuracy(monkeypatch, tmp_path):
  # Teacher: 0.3, 0.6, 0.4, 0.5; the student peaks elsewhere (epoch 4), so it must not count.
  evaluations = [_evaluation(0.3, 0.9), _evaluation(0.6, 0.1), _evaluation(0.4, 0.2),
                 _evaluation(0.5, 0.95)]
  summary, best_epoch, best_state_epoch, best_loop, latest_loop = _scripted_run(
      monkeypatch, tmp_path, _selection_config('test'), evaluations)
  assert best_epoch == 2, f'best checkpoint from epoch {best_epoch}, the best teacher was epoch 2'
  assert best_state_epoch == 2, 'the best checkpoint holds a state of another epoch'
  assert best_loop.best_epoch == latest_loop.best_epoch == summary['best_epoch'] == 2
  assert best_loop.best_selection_accuracy == 0.6
  assert summary['best/test/teacher_error'] == pytest.approx(0.4)
  assert summary['best/test/student_error'] == pytest.approx(0.9)  # Epoch 2's student.
  assert summary['final/test/teacher_error'] == pytest.approx(0.5)
  assert summary['selection'] == 'test'
  # Saved: 1 and 2 (new bests), 4 (checkpoint epoch); the policy keeps the best and the newest.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']


def test_a_resumed_run_keeps_the_best_checkpoint_it_saved_before(monkeypatch, tmp_path):
  """After a restart the manager still knows which checkpoint is the best (its metric is on disk)."""
  evaluations = [_evaluation(0.3, 0.9), _evaluation(0.6, 0.1), _evaluation(0.4, 0.2),
                 _evaluation(0.5, 0.95)]
  config = _selection_config('test')
  config.num_epochs = 3  # The last epoch is always saved.
  _scripted_run(monkeypatch, tmp_path, config, evaluations[:3])
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '3']
  config.num_epochs = 4
  _, best_epoch, best_state_epoch, best_loop, latest_loop = _scripted_run(
      monkeypatch, tmp_path, config, evaluations[3:], first_epoch=4)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  assert (best_epoch, best_state_epoch, best_loop.epoch, latest_loop.best_epoch) == (2, 2, 2, 2)


def test_best_checkpoint_follows_the_validation_split_when_selected(monkeypatch, tmp_path):
  # Validation teacher peaks at epoch 3; the test teacher at epoch 2, which must not count.
  evaluations = [_evaluation(0.3, 0.5, 0.2), _evaluation(0.6, 0.5, 0.3),
                 _evaluation(0.4, 0.5, 0.7), _evaluation(0.5, 0.5, 0.6)]
  summary, best_epoch, best_state_epoch, best_loop, _ = _scripted_run(
      monkeypatch, tmp_path, _selection_config('validation'), evaluations)
  assert (best_epoch, best_state_epoch, summary['best_epoch']) == (3, 3, 3)
  assert best_loop.best_selection_accuracy == 0.7
  assert summary['best/validation/teacher_error'] == pytest.approx(0.3)
  assert summary['best/test/teacher_error'] == pytest.approx(0.6)  # Reported, not selected on.
  assert summary['final/test/teacher_error'] == pytest.approx(0.5)


# --- Data-dependent initialisation batches (docs/reference.md "Model", "Mean Teacher") ---------------

INIT_LABELED, INIT_BATCH, INIT_SIZE = 64, 16, 16


def _init_data():
  """Labelled image i carries i in a central 5x5 block: every crop (offsets -2..2) has it at its centre.

  Around it, noise with a per-image brightness and contrast, so that the batch statistics
  of two different batches differ clearly.
  """
  rng = np.random.default_rng(0)

  def images(n, encode):
    noise = rng.normal(size=(n, INIT_SIZE, INIT_SIZE, 3))
    level = rng.uniform(40, 200, size=(n, 1, 1, 1))
    spread = rng.uniform(5, 50, size=(n, 1, 1, 1))
    out = np.clip(level + spread * noise, 0, 255).astype(np.uint8)
    if encode:
      c = INIT_SIZE // 2
      out[:, c - 2:c + 3, c - 2:c + 3] = np.stack([np.arange(n) // 256, np.arange(n) % 256,
                                       np.full(n, 7)], -1)[:, None, None, :]
    return out

  labeled = images(INIT_LABELED, encode=True)
  return labeled, {'labeled_images': jnp.asarray(labeled),
                   'labeled_labels': jnp.zeros(INIT_LABELED, jnp.int32),
                   'unlabeled_images': jnp.asarray(images(64, encode=False))}


def _decode(images):
  c = INIT_SIZE // 2
  centre = np.round(np.asarray(images)[:, c, c] * 255).astype(np.int64)
  assert np.all(centre[:, 2] == 7), 'not an image of the labelled set'
  return centre[:, 0] * 256 + centre[:, 1]


@pytest.fixture(scope='module')
def initial_states():
  """`experiment.initial_state` with an independent and with a copied teacher (one compile).

  Returns the two states and the image batches each passed to `create_train_state`.
  """
  labeled, data = _init_data()
  configs = {}
  for teacher_init in ('independent', 'copy'):
    config = quickstart.get_config()
    config.update(width=WIDTH, labeled_batch_size=INIT_BATCH, teacher_init=teacher_init)
    configs[teacher_init] = config
  model = experiment.build_model(configs['copy'], 10)
  real_create = train_state.create_train_state

  def both(data, key):
    results = {}
    for teacher_init, config in configs.items():
      seen = {}

      def spy(model, tx, key, student_init_images, teacher_init_images, teacher_init):
        seen.update(student=student_init_images, teacher=teacher_init_images, mode=teacher_init)
        return real_create(model, tx, key, student_init_images, teacher_init_images,
                           teacher_init)

      with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_state, 'create_train_state', spy)
        state = experiment.initial_state(
            data, key, model=model, tx=optax.identity(), info=_PLAIN,
            labeled_batch_size=config.labeled_batch_size,
            unlabeled_batch_size=config.unlabeled_batch_size, teacher_init=teacher_init)
      assert seen['mode'] == teacher_init
      results[teacher_init] = (state, seen['student'], seen['teacher'])
    return results

  return model, labeled, jax.jit(both)(data, _key(0))


def _block1_outputs(model, params, batch_stats, images):
  """Eval-mode outputs of conv1a-c (before any dropout) of a network on `images`."""
  _, state = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=False,
                         capture_intermediates=True, mutable=['intermediates'])
  return [state['intermediates'][name]['__call__'][0] for name in ('conv1a', 'conv1b', 'conv1c')]


def _normalised(outputs):
  """Whether every channel of every output has mean 0 and variance 1 over batch and space.

  docs/reference.md's data-dependent init sets g, b so that the init batch leaves each layer
  normalised (init_scale 1), and leaves the running means at 0, so eval mode reproduces it.
  """
  for out in outputs:
    out = np.asarray(out, np.float64)
    mean, var = out.mean(axis=(0, 1, 2)), out.var(axis=(0, 1, 2))
    if not (np.allclose(mean, 0.0, atol=1e-3) and np.allclose(var, 1.0, atol=2e-3)):
      return False
  return True


def test_student_and_independent_teacher_are_initialised_on_different_labelled_batches(
    initial_states):
  model, labeled, states = initial_states
  state, student_images, teacher_images = states['independent']
  student_idx, teacher_idx = _decode(student_images), _decode(teacher_images)
  for idx in (student_idx, teacher_idx):  # A batch of distinct labelled images.
    assert len(idx) == INIT_BATCH == len(set(idx.tolist()))
    assert set(idx.tolist()) <= set(range(INIT_LABELED))
  assert set(student_idx.tolist()) != set(teacher_idx.tolist()), (
      'the teacher is initialised on the same labelled images as the student')
  # Augmented (cropped) views, not the raw images.
  assert not np.allclose(np.asarray(student_images), labeled[student_idx] / 255.0), (
      'the student is initialised on raw labelled images, not on an augmented view')

  outputs = jax.jit(functools.partial(_block1_outputs, model))
  student = lambda images: outputs(state.params, state.batch_stats, images)
  teacher = lambda images: outputs(state.teacher_params, state.teacher_batch_stats, images)
  assert _normalised(student(student_images)), 'the student was not initialised on its batch'
  assert _normalised(teacher(teacher_images)), 'the teacher was not initialised on its batch'
  assert not _normalised(student(teacher_images)), 'the student was initialised on the teacher batch'
  assert not _normalised(teacher(student_images)), 'the teacher was initialised on the student batch'
  # Its own random initialisation too (docs/reference.md quirk 3).
  assert not np.allclose(state.params['conv1a']['v'], state.teacher_params['conv1a']['v'])


def test_copied_teacher_equals_the_student(initial_states):
  _, _, states = initial_states
  copied = states['copy'][0]
  independent = states['independent'][0]
  for student, teacher, reference in zip(
      jax.tree.leaves((copied.params, copied.batch_stats)),
      jax.tree.leaves((copied.teacher_params, copied.teacher_batch_stats)),
      jax.tree.leaves((independent.params, independent.batch_stats))):
    np.testing.assert_array_equal(teacher, student)
    np.testing.assert_array_equal(student, reference)  # Same student either way.


def test_improved_variant_copies_the_teacher():
  assert default.base_config('improved').teacher_init == 'copy'
  assert default.base_config().teacher_init == 'independent'
