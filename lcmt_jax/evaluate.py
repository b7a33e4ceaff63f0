"""Evaluates a finished run, or a checkpoint of the PyTorch reference: errors, per-class accuracy,
confusion matrices, and the pair purity of each network's nearest pairs of features.

    python -m lcmt_jax.evaluate --workdir=runs/quickstart/mt_lc_seed0 [--checkpoint=best|latest|EPOCH]
    python -m lcmt_jax.evaluate --torch_checkpoint=model.pth --config=configs/cifar10.py

A run is rebuilt from its `config.json`: the same split, the same
initialised state as the trainer builds it (the restore target), then its
checkpoint. A reference checkpoint holds one network; it is evaluated as
'model'. Bad input (no such workdir, no checkpoint, an unreadable file) ends
with a one-line error and exit status 2, as `train.py` does.
"""

import dataclasses
import os
import pickle
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lcmt_jax import checkpointing
from lcmt_jax import cli
from lcmt_jax import errors
from lcmt_jax import eval_metrics
from lcmt_jax import experiment
from lcmt_jax import input_pipeline
from lcmt_jax import torch_import
from lcmt_jax import train_state
from lcmt_jax import workdir as workdir_files
from lcmt_jax import xla_cpu


class CheckpointNotFoundError(errors.UserInputError):
  """The run has no checkpoint of the asked kind."""


class TorchCheckpointError(errors.UserInputError):
  """A PyTorch checkpoint cannot be read or does not fit the config."""


@dataclasses.dataclass(frozen=True)
class Evaluable:
  """A state ready to evaluate, the data to evaluate it on, and which networks it holds.

  `networks` maps a reported name to the state's network that computes it:
  a run has 'student' and 'teacher'; an imported reference checkpoint is
  loaded as both and reported once, as 'model'.
  """

  config: ml_collections.ConfigDict
  split: input_pipeline.SplitData
  data: dict[str, jax.Array]
  state: train_state.TrainState
  predict_fn: Callable[..., dict[str, jax.Array]]
  networks: dict[str, str]
  description: str
  _predictions: dict[str, dict[str, np.ndarray]] = dataclasses.field(
      default_factory=dict, repr=False, compare=False)

  def predict(self, split_name: str) -> dict[str, np.ndarray]:
    """Host copies of the class predictions ('student', 'teacher') and features
    ('student_features', 'teacher_features'), computed once per split."""
    if split_name not in self._predictions:
      self._predictions[split_name] = jax.device_get(
          self.predict_fn(self.state, self.data[f'{split_name}_images']))
    return self._predictions[split_name]

  def labels(self, split_name: str) -> np.ndarray:
    return getattr(self.split, f'{split_name}_labels')


def restore_run(workdir: str, kind: str = 'best') -> Evaluable:
  """The run in `workdir` with its newest `kind` checkpoint ('best' or 'latest'), or with its
  checkpoint of an epoch (`kind` '11': one still on disk, such as the branch point)."""
  if kind not in checkpointing.KINDS and not kind.isdigit():
    raise CheckpointNotFoundError(f'--checkpoint={kind} is neither one of {checkpointing.KINDS} '
                                  'nor an epoch number')
  config = workdir_files.load_config(workdir)
  xla_cpu.configure(config.compute_dtype)  # Before the first JAX array.
  directory = os.path.join(workdir, 'checkpoints')
  # Orbax creates a missing directory even for a read-only manager, so look first.
  checkpoints = (checkpointing.RunCheckpoints(workdir, read_only=True)
                 if os.path.isdir(directory) else None)
  try:
    if checkpoints is None or checkpoints.epoch_of(kind) is None:
      on_disk = checkpoints.epochs() if checkpoints is not None else []
      wanted = f'checkpoint of epoch {kind}' if kind.isdigit() else f'{kind} checkpoint'
      raise CheckpointNotFoundError(
          f'{workdir} has no {wanted} (looked in {directory}, which holds '
          f'{", ".join(map(str, on_disk)) or "none"}); train the run first, or pick another '
          '--checkpoint')
    run = experiment.build(config)
    state, loop = checkpoints.restore(kind, run.state)
  finally:
    if checkpoints is not None:
      checkpoints.close()
  which = 'checkpoint' if kind.isdigit() else f'{kind} checkpoint'
  description = (f'{workdir}: {which} of epoch {loop.epoch}, {config.method} on '
                 f'{config.dataset}, seed {config.seed}')
  return Evaluable(config, run.split, run.data, state, run.predict_fn,
                   {'student': 'student', 'teacher': 'teacher'}, description)


def _read_torch_variables(path: str, key: str) -> dict:
  if not os.path.isfile(path):
    raise TorchCheckpointError(f'no such PyTorch checkpoint file: {path}')
  try:
    return torch_import.load_reference_state_dict(path, key=key)
  # What torch.load(weights_only=True) raises for a damaged, truncated or foreign file (a
  # refused global: UnpicklingError; a broken zip: RuntimeError), and the import's own checks.
  except (ImportError, OSError, EOFError, RuntimeError, ValueError,
          pickle.UnpicklingError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise TorchCheckpointError(f'cannot read {path} as a reference ConvLarge checkpoint: '
                               f'{reason}') from e


def import_torch_checkpoint(config: ml_collections.ConfigDict, path: str,
                            key: str = 'state_dict') -> Evaluable:
  """A reference checkpoint's network as both student and teacher, evaluated on `config`'s data.

  The width follows the checkpoint; its class count must match the data set's.
  """
  xla_cpu.configure(config.compute_dtype)  # Before the first JAX array.
  variables = _read_torch_variables(path, key)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = 'convlarge'
  config.width = int(variables['params']['conv1a']['v'].shape[-1])
  num_classes = int(variables['params']['dense']['v'].shape[-1])
  run = experiment.build(config)
  if num_classes != run.info.num_classes:
    raise TorchCheckpointError(f'{path} has {num_classes} outputs but {config.dataset} has '
                               f'{run.info.num_classes} classes: pass the matching --config')
  replicated = NamedSharding(run.mesh, PartitionSpec())
  params, batch_stats = (jax.device_put(variables[c], replicated) for c in ('params', 'batch_stats'))
  if jax.tree.structure(params) != jax.tree.structure(run.state.params):
    raise TorchCheckpointError(f'{path} does not hold a ConvLarge of this project')
  state = run.state.replace(params=params, batch_stats=batch_stats, teacher_params=params,
                            teacher_batch_stats=batch_stats)
  description = f'{path}: PyTorch reference checkpoint (width {config.width}) on {config.dataset}'
  return Evaluable(config, run.split, run.data, state, run.predict_fn, {'model': 'teacher'},
                   description)


def evaluate(evaluable: Evaluable) -> dict[str, dict[str, np.ndarray]]:
  """Confusion matrices `{split: {network: counts[true, predicted]}}` of every non-empty split."""
  num_classes = evaluable.split.info.num_classes
  results = {}
  for split_name in eval_metrics.SPLITS:
    labels = evaluable.labels(split_name)
    if len(labels):
      predictions = evaluable.predict(split_name)
      results[split_name] = {
          name: eval_metrics.confusion_matrix(labels, predictions[network], num_classes)
          for name, network in evaluable.networks.items()}
  return results


def nearest_pair_purity(evaluable: Evaluable) -> dict[str, dict[str, np.ndarray]]:
  """`{split: {network: purity at each eval_metrics.PURITY_QUANTILES}}` of every non-empty split.

  Whether the networks' features put images of one class nearest each other,
  and how near a local-clustering threshold must be to pull mostly such
  pairs: the features as the run's `lc_features` makes them.
  """
  results = {}
  for split_name in eval_metrics.SPLITS:
    labels = evaluable.labels(split_name)
    if len(labels):
      predictions = evaluable.predict(split_name)
      results[split_name] = {name: np.asarray(eval_metrics.purity_by_quantile(
          predictions[f'{network}_features'], labels, lc_features=evaluable.config.lc_features))
                             for name, network in evaluable.networks.items()}
  return results


def format_purity(lc_features: str, results: dict[str, dict[str, np.ndarray]]) -> str:
  """One row per split and network: the purity of the nearest `q` of the distinct pairs."""
  quantiles = eval_metrics.PURITY_QUANTILES
  header = ''.join(f'{"all" if q == 1 else f"{100 * q:g}%":>8}' for q in quantiles)
  lines = [f'pair purity: the share of one-class pairs among the nearest q of the distinct pairs '
           f'of features ({lc_features}; "all" is the base rate)',
           f'{"split":<11}{"network":<9}{header}']
  for split_name, by_network in results.items():
    for name, purity in by_network.items():
      lines.append(f'{split_name:<11}{name:<9}' + ''.join(f'{p:8.3f}' for p in purity))
  return '\n'.join(lines)


def format_confusion(confusion: np.ndarray) -> str:
  """A fixed-width table: one row per true class, one column per predicted class, then recall."""
  classes = range(confusion.shape[0])
  width = max(5, len(str(confusion.max())) + 1)
  lines = ['true\\pred' + ''.join(f'{c:>{width}}' for c in classes) + '  accuracy']
  recall = eval_metrics.per_class_accuracy(confusion)
  for c, (row, accuracy) in enumerate(zip(confusion, recall)):
    lines.append(f'{c:>9}' + ''.join(f'{n:>{width}}' for n in row) + f'  {100 * accuracy:7.2f}%')
  return '\n'.join(lines)


def format_results(description: str, results: dict[str, dict[str, np.ndarray]]) -> str:
  lines = [description]
  for split_name, by_network in results.items():
    total = int(next(iter(by_network.values())).sum())
    lines.append(f'{split_name} ({total} images): ' + ', '.join(
        f'{name} error {100 * eval_metrics.error_rate(c):.2f}%' for name, c in by_network.items()))
  for split_name, by_network in results.items():
    for name, confusion in by_network.items():
      lines += ['', f'{name} on {split_name}: confusion matrix and per-class accuracy',
                format_confusion(confusion)]
  return '\n'.join(lines)


def _define_flags() -> Any:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('workdir', None, 'A run directory written by train.py.')
  flags.DEFINE_string('checkpoint', 'best',
                      "Which of the run's checkpoints to evaluate: 'best', 'latest' or an epoch "
                      'number still on disk (the branch point, the last epoch before LC).')
  flags.DEFINE_string('torch_checkpoint', None,
                      'A PyTorch reference checkpoint to evaluate instead of a run (needs --config).')
  flags.DEFINE_string('torch_key', 'state_dict',
                      'The entry of the PyTorch checkpoint dict that holds the state dict.')
  return config_flags.DEFINE_config_file(
      'config', None, 'Config whose data set a --torch_checkpoint is evaluated on.')


def main(argv: list[str], config_flag: Any) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise errors.UserInputError(f'unexpected arguments: {" ".join(argv[1:])}')
  workdir, torch_path = flags.FLAGS.workdir, flags.FLAGS.torch_checkpoint
  if (workdir is None) == (torch_path is None):
    raise errors.UserInputError(
        'give exactly one of --workdir=DIR or --torch_checkpoint=FILE --config=CONFIG.py')
  if workdir is not None:
    evaluable = restore_run(workdir, flags.FLAGS.checkpoint)
  else:
    config = cli.config_value(config_flag)
    if config is None:
      raise errors.UserInputError(
          '--torch_checkpoint needs --config=CONFIG.py naming the data set to evaluate on')
    evaluable = import_torch_checkpoint(config, torch_path, flags.FLAGS.torch_key)
  print(format_results(evaluable.description, evaluate(evaluable)), flush=True)
  print('\n' + format_purity(evaluable.config.lc_features, nearest_pair_purity(evaluable)),
        flush=True)


if __name__ == '__main__':
  cli.run(main, _define_flags)
