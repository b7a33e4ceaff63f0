"""The training loop: data on the accelerator, many steps per compiled call, eval, checkpoints.

The whole uint8 data set is put on every device once; each compiled call runs
`steps_per_call` steps with `lax.scan`, sampling and augmenting its batches
inside `jit`, so nothing crosses the host-device boundary on the hot path but
the per-step metrics at the end of a call. Data parallelism is `jit` over a
one-axis device mesh: the batch is sharded over the 'data' axis and
everything else is replicated, so batch-norm means and the pairwise loss are
taken over the global batch exactly as on one device.

The same holds over several hosts (`lcmt_jax.distributed`): the mesh spans
every process's devices, each process holds the data set on its own devices
and computes its devices' shard of each global batch, all processes write
their shards of each checkpoint, and process 0 alone writes logs and metrics.

Runs in one process (a sweep, `evaluate` after training, the test suite) share
their traced and compiled functions where their settings are equal: the
factories below are cached on hashable settings, and so are the model and the
optimiser, which a train state holds as static fields, part of the tree
structure that jit's cache is keyed on.
"""

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcmt_jax import checkpointing
from lcmt_jax import configuration
from lcmt_jax import cpu_flags
from lcmt_jax import distributed
from lcmt_jax import errors
from lcmt_jax import input_pipeline
from lcmt_jax import losses
from lcmt_jax import metrics_log
from lcmt_jax import models
from lcmt_jax import train_state

# Keys that may change between a run and its resumption: they do not change what is computed.
RESUMABLE_KEYS = frozenset({'data_dir', 'cache_dir', 'num_epochs', 'steps_per_call',
                            'eval_every_epochs', 'eval_batch_size', 'checkpoint_every_epochs',
                            'progress_bar'})


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh named 'data' over `devices` (default: every device).

  The axis is `Auto`: jit propagates the shardings that `run_steps` pins with
  `with_sharding_constraint`.
  """
  devices = devices or jax.devices()
  return jax.make_mesh((len(devices),), ('data',), (jax.sharding.AxisType.Auto,),
                       devices=devices)


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> models.ConvLarge:
  return _cached_model(num_classes=num_classes, width=config.width,
                       dropout_rate=config.dropout_rate, bn_momentum=config.bn_momentum,
                       dtype=jnp.dtype(config.compute_dtype))


# One object per distinct set of fields: a train state holds the model's `apply`.
_cached_model = functools.cache(models.ConvLarge)


def put_data_on_device(split: input_pipeline.SplitData, mesh: Mesh) -> dict[str, jax.Array]:
  """Every split's uint8 images and labels, replicated on every device.

  Each process copies its host's arrays to its own devices, so this works
  for a mesh spanning several processes as well as for one.
  """
  arrays = {
      'labeled_images': split.labeled_images, 'labeled_labels': split.labeled_labels,
      'unlabeled_images': split.unlabeled_images,
      'test_images': split.test_images, 'test_labels': split.test_labels,
      'validation_images': split.validation_images,
      'validation_labels': split.validation_labels,
  }
  replicated = NamedSharding(mesh, PartitionSpec())
  return {name: jax.make_array_from_callback(array.shape, replicated,
                                             lambda index, array=array: array[index])
          for name, array in arrays.items()}


def run_steps(state: train_state.TrainState, data: dict[str, jax.Array], data_key: jax.Array, *,
              num_steps: int, step_config: train_state.StepConfig,
              info: input_pipeline.DatasetInfo, labeled_batch_size: int,
              unlabeled_batch_size: int, batch_sharding: NamedSharding):
  """`num_steps` training steps in one `lax.scan`; returns the state and per-step metrics.

  Batches are a pure function of `data_key` and the global step, so a resumed
  run sees exactly the batches an uninterrupted one would. The loaders'
  shuffles of every epoch the call reaches are drawn once, before the steps.
  """
  with jax.named_scope('sample_batch'):
    epoch_steps = input_pipeline.steps_per_epoch(data['unlabeled_images'].shape[0],
                                                 unlabeled_batch_size)
    # Steps s .. s + num_steps - 1 reach at most this many epochs (one for a single step).
    orders = input_pipeline.shuffles(
        data_key, state.step // epoch_steps, (num_steps + epoch_steps - 2) // epoch_steps + 1,
        data['labeled_images'].shape[0], data['unlabeled_images'].shape[0], labeled_batch_size,
        unlabeled_batch_size)

  def one_step(state, _):
    with jax.named_scope('sample_batch'):
      batch = input_pipeline.sample_batch(data_key, state.step, data, info, labeled_batch_size,
                                          unlabeled_batch_size, orders)
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return train_state.train_step(state, batch, step_config)

  if num_steps == 1:  # A loop of one step would only add the loop.
    state, metrics = one_step(state, None)
    return state, jax.tree.map(lambda x: x[None], metrics)
  return jax.lax.scan(one_step, state, length=num_steps)


def predict(state: train_state.TrainState, images: jax.Array, *, batch_size: int,
            info: input_pipeline.DatasetInfo, batch_sharding: NamedSharding) -> dict[str, jax.Array]:
  """Eval-mode class predictions and features of student and teacher."""
  n = images.shape[0]
  padded = -n % batch_size
  images = jnp.pad(images, ((0, padded), (0, 0), (0, 0), (0, 0)))
  batches = images.reshape(-1, batch_size, *images.shape[1:])

  def one_batch(batch):
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    out = train_state.eval_step(state, input_pipeline.normalize(batch, info.mean, info.std))
    return {'student': jnp.argmax(out['student_logits'], -1),
            'teacher': jnp.argmax(out['teacher_logits'], -1),
            'student_features': out['student_features'],
            'teacher_features': out['teacher_features']}

  outputs = jax.lax.map(one_batch, batches)
  return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:n], outputs)


def accuracies(predictions: dict[str, jax.Array], labels: np.ndarray) -> dict[str, float]:
  predictions = jax.device_get({net: predictions[net] for net in ('student', 'teacher')})
  return {f'{net}_accuracy': float(np.mean(predictions[net] == labels))
          for net in ('student', 'teacher')}


class TrainingDivergedError(errors.UserInputError):
  """A loss term became NaN or infinite; the checkpoints on disk are the last good ones."""


def _check_finite(metrics: dict[str, np.ndarray], first_step: int, loop: dict) -> None:
  """Stops the run at the first step with a non-finite metric, naming the step and the terms.

  The metrics include the norm of the updated parameters, so a step whose
  update diverges is caught before its parameters can be checkpointed.
  """
  bad_steps = {name: np.flatnonzero(~np.isfinite(values)) for name, values in metrics.items()}
  bad_steps = {name: steps[0] for name, steps in bad_steps.items() if steps.size}
  if not bad_steps:
    return
  step = min(bad_steps.values())
  terms = ', '.join(f'{name}={metrics[name][step]}' for name in sorted(bad_steps)
                    if bad_steps[name] == step)
  kept = (f'the checkpoints of epoch {loop["epoch"]} and before are kept' if loop['epoch']
          else 'no checkpoint had been written')
  raise TrainingDivergedError(
      f'{terms} at step {first_step + step}: training stopped and {kept}; lower the learning '
      f'rate or the loss weights and start a new --workdir')


def _check_workdir_config(config: ml_collections.ConfigDict, workdir: str,
                          allow_config_change: bool) -> list[str]:
  """The keys (beyond RESUMABLE_KEYS) in which `config` differs from the run in `workdir`.

  Refuses to resume a run written with a different config unless
  `allow_config_change`. Reads only: nothing is written before the data loads.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserInputError(f'--workdir {workdir} is a file, not a directory: give a '
                                'directory (it is created if missing)')
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return []
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserInputError(
        f'{path} cannot be read ({type(e).__name__}: {e}); put back the config.json of that run, '
        f'or use a new --workdir') from e
  current = json.loads(config.to_json_best_effort())
  changed = sorted(k for k in set(saved) | set(current)
                   if k not in RESUMABLE_KEYS and saved.get(k) != current.get(k))
  if changed and not allow_config_change:
    raise errors.UserInputError(
        f'workdir {workdir} holds a run with a different config (differs in: {", ".join(changed)}); '
        f'use a new --workdir, restore those values, or pass --allow_config_change to resume '
        f'it with the new values')
  return changed


def _record_config(config: ml_collections.ConfigDict, workdir: str, changed: list[str]) -> None:
  """Writes `workdir/config.json` for a new run, or for one resumed with `changed` keys.

  A config it replaces is kept as `config.<UTC time>.json`, so the run's history stays readable.
  """
  path = os.path.join(workdir, 'config.json')
  if not distributed.is_lead_process() or (os.path.exists(path) and not changed):
    return
  os.makedirs(workdir, exist_ok=True)
  if os.path.exists(path):
    os.replace(path, os.path.join(workdir, time.strftime('config.%Y%m%d-%H%M%S.json',
                                                         time.gmtime())))
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(path + '.tmp', path)


def _record_split(config: ml_collections.ConfigDict, workdir: str,
                  split: input_pipeline.SplitData) -> None:
  """Writes `workdir/split.json`: which training images were labelled and held out."""
  if not distributed.is_lead_process():
    return
  path = os.path.join(workdir, 'split.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(input_pipeline.split_record(config.dataset, split), f)
  os.replace(path + '.tmp', path)


def initial_state(data: dict[str, jax.Array], key: jax.Array, *, model: models.ConvLarge,
                  tx: optax.GradientTransformation, info: input_pipeline.DatasetInfo,
                  labeled_batch_size: int, unlabeled_batch_size: int,
                  teacher_init: str) -> train_state.TrainState:
  """Data-dependent init from one augmented labelled batch per network, as the reference."""
  init_key, student_batch_key, teacher_batch_key = jax.random.split(key, 3)
  student_batch = input_pipeline.sample_batch(
      student_batch_key, 0, data, info, labeled_batch_size,
      unlabeled_batch_size)['labeled_student']
  teacher_batch = input_pipeline.sample_batch(
      teacher_batch_key, 0, data, info, labeled_batch_size,
      unlabeled_batch_size)['labeled_student']
  return train_state.create_train_state(model, tx, init_key, student_batch, teacher_batch,
                                        teacher_init)


def build_step_config(config: ml_collections.ConfigDict,
                      split: input_pipeline.SplitData) -> train_state.StepConfig:
  """The run's static step hyper-parameters; an epoch is one pass over the unlabelled images."""
  steps_per_epoch = input_pipeline.steps_per_epoch(len(split.unlabeled_images),
                                                   config.unlabeled_batch_size)
  return train_state.StepConfig.from_config(config, steps_per_epoch)


def build_state(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo,
                data: dict[str, jax.Array], mesh: Mesh, step_config: train_state.StepConfig,
                key: jax.Array) -> train_state.TrainState:
  """The run's freshly initialised train state, replicated over `mesh`.

  Also the target a checkpoint is restored into: it fixes the structure,
  dtypes and shardings of the restored state.
  """
  return _jit(initial_state, out_shardings=NamedSharding(mesh, PartitionSpec()),
              model=build_model(config, info.num_classes),
              tx=train_state.make_optimizer(config, step_config), info=info,
              labeled_batch_size=config.labeled_batch_size,
              unlabeled_batch_size=config.unlabeled_batch_size,
              teacher_init=config.teacher_init)(data, key)


def make_train_fn(config: ml_collections.ConfigDict, step_config: train_state.StepConfig,
                  info: input_pipeline.DatasetInfo, mesh: Mesh):
  """`run_steps` compiled for `mesh`: `fn(state, data, data_key, num_steps=N) -> (state, metrics)`.

  The state is donated; batches are sharded over the mesh, the rest replicated.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  return _jit(run_steps, out_shardings=(replicated, replicated), static_argnames='num_steps',
              donate_argnums=0, step_config=step_config, info=info,
              labeled_batch_size=config.labeled_batch_size,
              unlabeled_batch_size=config.unlabeled_batch_size,
              batch_sharding=NamedSharding(mesh, PartitionSpec('data')))


def make_predict_fn(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo,
                    mesh: Mesh):
  """`predict` compiled for `mesh`: `fn(state, images) -> predictions and features`."""
  return _jit(predict, out_shardings=NamedSharding(mesh, PartitionSpec()),
              batch_size=config.eval_batch_size, info=info,
              batch_sharding=NamedSharding(mesh, PartitionSpec('data')))


@functools.cache
def _jit(fun, *, out_shardings, static_argnames=(), donate_argnums=(), **settings):
  """`jit(partial(fun, **settings))`, one per distinct hashable `fun` and settings."""
  return jax.jit(functools.partial(fun, **settings), out_shardings=out_shardings,
                 static_argnames=static_argnames, donate_argnums=donate_argnums,
                 compiler_options=cpu_flags.compiler_options())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Trains (or resumes) the run described by `config` in `workdir`; returns its summary.

  Every check of the input (config, workdir, data) comes before the first
  write to `workdir`, so bad input leaves it as it was.
  """
  mesh = make_mesh()
  configuration.validate(config, mesh.size)
  changed_keys = _check_workdir_config(config, workdir, allow_config_change)
  split = input_pipeline.load_split(config)
  info = split.info
  data = put_data_on_device(split, mesh)

  step_config = build_step_config(config, split)
  steps_per_epoch = step_config.steps_per_epoch
  state_key, data_key = jax.random.split(jax.random.key(config.seed))
  state = build_state(config, info, data, mesh, step_config, state_key)

  lead = distributed.is_lead_process()
  checkpoints = checkpointing.RunCheckpoints(workdir)
  loop = {'epoch': 0, 'best_epoch': 0, 'best_selection_accuracy': -1.0, 'train_seconds': 0.0}
  if checkpoints.epoch_of('latest') is not None:
    state, loop = checkpoints.restore('latest', state)
  _record_config(config, workdir, changed_keys)  # Once the checkpoint has proved readable.
  _record_split(config, workdir, split)
  log = metrics_log.MetricsLog(workdir, resume_after_epoch=loop['epoch'], enabled=lead)

  steps_per_call = config.steps_per_call or steps_per_epoch
  train_fn = make_train_fn(config, step_config, info, mesh)
  predict_fn = make_predict_fn(config, info, mesh)
  images_per_step = config.labeled_batch_size + (
      config.unlabeled_batch_size if step_config.use_unlabeled else 0)
  progress = metrics_log.Progress(total_steps=config.num_epochs * steps_per_epoch,
                                  done_steps=loop['epoch'] * steps_per_epoch,
                                  show_bar=config.progress_bar, silent=not lead)
  if loop['epoch']:
    progress.print(f'Resuming {workdir} from epoch {loop["epoch"]}' + (
        f' with changed {", ".join(changed_keys)}.' if changed_keys else '.'))

  # Saves still being written finish even when the run stops with an error, so the
  # checkpoints on disk are complete.
  try:
    for epoch in range(loop['epoch'] + 1, config.num_epochs + 1):
      epoch_start = time.perf_counter()
      step_metrics = []
      for start in range(0, steps_per_epoch, steps_per_call):
        num_steps = min(steps_per_call, steps_per_epoch - start)
        call_start = time.perf_counter()
        state, metrics = train_fn(state, data, data_key, num_steps=num_steps)
        metrics = jax.device_get(metrics)
        _check_finite(metrics, first_step=(epoch - 1) * steps_per_epoch + start, loop=loop)
        step_metrics.append(metrics)
        progress.update(num_steps, time.perf_counter() - call_start, images_per_step, metrics)
      loop['train_seconds'] += time.perf_counter() - epoch_start
      record = {k: float(np.mean(np.concatenate([m[k] for m in step_metrics])))
                for k in step_metrics[0]}
      record['images_per_second'] = images_per_step * steps_per_epoch / (
          time.perf_counter() - epoch_start)
      log.write(epoch, 'train', record)

      new_best = False
      if epoch % config.eval_every_epochs == 0 or epoch == config.num_epochs:
        evaluation = evaluate_splits(predict_fn, state, data, split)
        log.write(epoch, 'eval', evaluation)
        progress.print(_format_eval(epoch, evaluation))
        selection = evaluation[f'{config.selection}/teacher_accuracy']
        new_best = selection > loop['best_selection_accuracy']
        if new_best:
          loop.update(best_epoch=epoch, best_selection_accuracy=selection,
                      best_eval=evaluation)
        loop['last_eval'] = evaluation
      loop['epoch'] = epoch
      if new_best or epoch % config.checkpoint_every_epochs == 0 or epoch == config.num_epochs:
        checkpoints.save(epoch, state, loop, new_best)
  finally:
    checkpoints.wait_until_finished()
    checkpoints.close()
    progress.close()
    log.close()
  summary = metrics_log.run_summary(
      config, epochs=loop['epoch'], best_epoch=loop['best_epoch'],
      last_eval=loop.get('last_eval', {}), best_eval=loop.get('best_eval', {}),
      train_seconds=loop['train_seconds'])
  log.write_summary(summary)
  if lead:
    print(metrics_log.format_summary(summary), flush=True)
  return summary


def evaluate_splits(predict_fn: Any, state: train_state.TrainState, data: dict[str, jax.Array],
                    split: input_pipeline.SplitData) -> dict[str, float]:
  """Student and teacher accuracy on the test set and, when there is one, the validation set.

  Also the quantiles of the student's pairwise feature distances (eval mode)
  on the validation set, or on the test set where there is none: the scale
  that the local-clustering threshold is set against.
  """
  result = {}
  for name in ('test', 'validation'):
    labels = getattr(split, f'{name}_labels')
    if len(labels):
      predictions = predict_fn(state, data[f'{name}_images'])
      for key, value in accuracies(predictions, labels).items():
        result[f'{name}/{key}'] = value
      quantiles = jax.device_get(_distance_quantiles(predictions['student_features']))
      distances = {f'{name}/student_distance_q{round(100 * q):02d}': float(value)
                   for q, value in zip(losses.DISTANCE_QUANTILES, quantiles)}
  return {**result, **distances}  # The validation set's, when there is one.


_distance_quantiles = jax.jit(losses.distance_quantiles)


def _format_eval(epoch: int, evaluation: dict[str, float]) -> str:
  parts = [f'{k.replace("_accuracy", "")} error {100 * (1 - v):.2f}%'
           for k, v in evaluation.items() if k.endswith('_accuracy')]
  parts += [f'{k.replace("_q50", "")} median {v:.3g}' for k, v in evaluation.items()
            if k.endswith('distance_q50')]
  return f'epoch {epoch}: ' + ', '.join(parts)
