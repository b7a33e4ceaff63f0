"""A run, built: config checked, device mesh, data on the devices, train state, compiled functions.

`build(config)` is the one way a run is put together; `train.py` (through
`trainer`), `lcmt_jax.evaluate`, the benchmarks and the tests all call it, so
a state is built the same way everywhere.

The whole uint8 data set is put on every device once; each compiled training
call runs `num_steps` steps with `lax.scan`, sampling and augmenting its
batches inside `jit`, so nothing crosses the host-device boundary on the hot
path but the per-step metrics at the end of a call. Data parallelism is `jit`
over a one-axis device mesh: the batch is sharded over the 'data' axis and
everything else is replicated, so batch-norm means and the pairwise loss are
taken over the global batch exactly as on one device. Over several hosts
(`lcmt_jax.distributed`) the mesh spans every process's devices and each
process holds the data set on its own.

Builds in one process (a sweep, `evaluate` after training, the test suite)
share their traced and compiled functions where their settings are equal:
the factories below are cached on hashable settings, and so are the model and
the optimiser, which a train state holds as static fields, part of the tree
structure that jit's cache is keyed on.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcmt_jax import configuration
from lcmt_jax import input_pipeline
from lcmt_jax import models
from lcmt_jax import train_state
from lcmt_jax import xla_cpu


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run computes with, before its loop starts.

  `state` is freshly initialised: a new run's start, and the target a
  checkpoint is restored into (it fixes structure, dtypes and shardings).
  `train_fn(state, data, data_key, num_steps=N, lc_active=B) -> (state, metrics)` donates
  its state; `predict_fn(state, images)` returns predictions and features.
  """

  config: ml_collections.ConfigDict
  mesh: Mesh
  split: input_pipeline.SplitData
  data: dict[str, jax.Array]
  step_config: train_state.StepConfig
  state: train_state.TrainState
  data_key: jax.Array
  train_fn: Callable
  predict_fn: Callable

  @property
  def info(self) -> input_pipeline.DatasetInfo:
    return self.split.info

  @property
  def images_per_step(self) -> int:
    unlabeled = self.config.unlabeled_batch_size if self.step_config.use_unlabeled else 0
    return self.config.labeled_batch_size + unlabeled


def build(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Experiment:
  """Checks `config`, puts its split data on `mesh`, builds the state and compiled functions.

  Raises `errors.UserInputError` subclasses for a bad config or data set.
  """
  mesh = mesh or make_mesh()
  configuration.validate(config, mesh.size)
  split = input_pipeline.load_split(config)
  data = put_data_on_device(split, mesh)
  step_config = build_step_config(config, split)
  state_key, data_key = jax.random.split(jax.random.key(config.seed))
  return Experiment(
      config=config, mesh=mesh, split=split, data=data, step_config=step_config,
      state=build_state(config, split.info, data, mesh, step_config, state_key),
      data_key=data_key, train_fn=make_train_fn(config, step_config, split.info, mesh),
      predict_fn=make_predict_fn(config, split.info, mesh))


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh named 'data' over `devices` (default: every device).

  The axis is `Auto`: jit propagates the shardings that `run_steps` pins with
  `with_sharding_constraint`.
  """
  devices = devices or jax.devices()
  return jax.make_mesh((len(devices),), ('data',), (jax.sharding.AxisType.Auto,),
                       devices=devices)


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  """The network `config.model` at the config's width, dropout, BN momentum and compute dtype."""
  return models.create_model(config.model, num_classes=num_classes, width=config.width,
                             dropout_rate=config.dropout_rate, bn_momentum=config.bn_momentum,
                             dtype=config.compute_dtype)


def put_data_on_device(split: input_pipeline.SplitData, mesh: Mesh) -> dict[str, jax.Array]:
  """Every split's uint8 images and labels, replicated on every device.

  Each process copies its host's arrays to its own devices, so this works
  for a mesh spanning several processes as well as for one. The unlabelled
  images' labels serve the training diagnostics only (`train_state.lc_diagnostics`).
  """
  arrays = {
      'labeled_images': split.labeled_images, 'labeled_labels': split.labeled_labels,
      'unlabeled_images': split.unlabeled_images, 'unlabeled_labels': split.unlabeled_labels,
      'test_images': split.test_images, 'test_labels': split.test_labels,
      'validation_images': split.validation_images,
      'validation_labels': split.validation_labels,
  }
  replicated = NamedSharding(mesh, PartitionSpec())
  return {name: jax.make_array_from_callback(array.shape, replicated,
                                             lambda index, array=array: array[index])
          for name, array in arrays.items()}


def build_step_config(config: ml_collections.ConfigDict,
                      split: input_pipeline.SplitData) -> train_state.StepConfig:
  """The run's static step hyper-parameters; an epoch is one pass over the unlabelled images."""
  steps_per_epoch = input_pipeline.steps_per_epoch(len(split.unlabeled_images),
                                                   config.unlabeled_batch_size)
  return train_state.StepConfig.from_config(config, steps_per_epoch)


def initial_state(data: dict[str, jax.Array], key: jax.Array, *, model,
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


def build_state(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo,
                data: dict[str, jax.Array], mesh: Mesh, step_config: train_state.StepConfig,
                key: jax.Array) -> train_state.TrainState:
  """The run's freshly initialised train state, replicated over `mesh`."""
  return cached_jit(initial_state, out_shardings=NamedSharding(mesh, PartitionSpec()),
                    model=build_model(config, info.num_classes),
                    tx=train_state.make_optimizer(config, step_config), info=info,
                    labeled_batch_size=config.labeled_batch_size,
                    unlabeled_batch_size=config.unlabeled_batch_size,
                    teacher_init=config.teacher_init)(data, key)


def run_steps(state: train_state.TrainState, data: dict[str, jax.Array], data_key: jax.Array, *,
              num_steps: int, step_config: train_state.StepConfig,
              info: input_pipeline.DatasetInfo, labeled_batch_size: int,
              unlabeled_batch_size: int, batch_sharding: NamedSharding, lc_active: bool = True):
  """`num_steps` training steps in one `lax.scan`; returns the state and per-step metrics.

  `lc_active` (static; `train_state.lc_active_in`) False compiles the steps
  without the local-clustering term, for the calls before `lc_start`.

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
    return train_state.train_step(state, batch, step_config, lc_active)

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


def make_train_fn(config: ml_collections.ConfigDict, step_config: train_state.StepConfig,
                  info: input_pipeline.DatasetInfo, mesh: Mesh) -> Callable:
  """`run_steps` compiled for `mesh`: `fn(state, data, data_key, num_steps=N, lc_active=B)
  -> (state, metrics)`, one program per `(N, B)`.

  The state is donated; batches are sharded over the mesh, the rest replicated.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  return cached_jit(run_steps, out_shardings=(replicated, replicated),
                    static_argnames=('num_steps', 'lc_active'), donate_argnums=0,
                    step_config=step_config, info=info,
                    labeled_batch_size=config.labeled_batch_size,
                    unlabeled_batch_size=config.unlabeled_batch_size,
                    batch_sharding=NamedSharding(mesh, PartitionSpec('data')))


def make_predict_fn(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo,
                    mesh: Mesh) -> Callable:
  """`predict` compiled for `mesh`: `fn(state, images) -> predictions and features`."""
  return cached_jit(predict, out_shardings=NamedSharding(mesh, PartitionSpec()),
                    batch_size=config.eval_batch_size, info=info,
                    batch_sharding=NamedSharding(mesh, PartitionSpec('data')))


def clear_compiled() -> None:
  """Forgets the cached compiled functions, for a process that changes JAX's compile settings."""
  cached_jit.cache_clear()


@functools.cache
def cached_jit(fun: Callable, *, out_shardings, static_argnames=(), donate_argnums=(),
               **settings) -> Callable:
  """`jit(partial(fun, **settings))`, one per distinct hashable `fun` and settings."""
  return jax.jit(functools.partial(fun, **settings), out_shardings=out_shardings,
                 static_argnames=static_argnames, donate_argnums=donate_argnums,
                 compiler_options=xla_cpu.compiler_options())
