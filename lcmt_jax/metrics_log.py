"""What a run tells a person: a progress bar, metrics.jsonl, TensorBoard scalars, a summary.

TensorBoard scalars are written by the `tensorboard` package's own event-file
writer, on tensorboard's TensorFlow stub even where TensorFlow is installed.
"""

import json
import os
import sys
import time
import types
from collections.abc import Mapping
from typing import Any

import numpy as np
import tqdm
from tensorboard import summary as tensorboard_summary

from lcmt_jax import errors
from lcmt_jax import files

_BAR_METRICS = ('loss', 'ce_loss', 'consistency_loss', 'lc_loss')


class MetricsLog:
  """Appends one JSON record per (epoch, kind) to `workdir/metrics.jsonl` and to TensorBoard.

  Each record carries its `wall_time` (Unix seconds), so the time a run spends
  on training, evaluation and checkpoints can be read back
  (`benchmarks/protocol_time.py`).

  On resumption the records after the restored epoch (written by the
  interrupted run after its last checkpoint) are dropped, so the file holds
  each epoch once; so is a last line torn by a kill in the middle of its write
  (`read_records`). A disabled log (on every process but the lead one of a
  multi-process run) writes nothing.
  """

  def __init__(self, workdir: str, resume_after_epoch: int = 0, enabled: bool = True):
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._workdir = workdir
    self._enabled = enabled
    if enabled and os.path.exists(self._path):
      kept = [r for r in read_records(self._path) if r['epoch'] <= resume_after_epoch]
      files.write_atomically(self._path, ''.join(json.dumps(r) + '\n' for r in kept))
    self._tensorboard = None

  def write(self, epoch: int, kind: str, values: dict[str, float]) -> None:
    if not self._enabled:
      return
    with open(self._path, 'a') as f:
      f.write(json.dumps({'epoch': epoch, 'kind': kind, **values, 'wall_time': time.time()}) + '\n')
    if self._tensorboard is None:
      _use_tensorboards_tensorflow_stub()
      self._tensorboard = tensorboard_summary.Writer(os.path.join(self._workdir, 'tensorboard'))
    for key, value in values.items():
      self._tensorboard.add_scalar(f'{kind}/{key}', value, epoch)
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None

  def write_summary(self, summary: dict[str, Any]) -> None:
    if not self._enabled:
      return
    files.write_atomically(os.path.join(self._workdir, 'summary.json'),
                           json.dumps(summary, indent=2))


def _use_tensorboards_tensorflow_stub() -> None:
  """Keeps tensorboard's writer from importing TensorFlow for its file system.

  Importing TensorFlow costs about 3 s at every start and would claim the GPUs;
  tensorboard's own stub writes local files the same. An importable
  `tensorboard.compat.notf` is tensorboard's switch for the stub (see
  `tensorboard.compat.tf`); it changes nothing once TensorFlow was chosen.
  """
  sys.modules.setdefault('tensorboard.compat.notf', types.ModuleType('tensorboard.compat.notf'))


class MetricsFileError(errors.UserInputError):
  """A metrics.jsonl line other than the last is not a record."""


def _record(line: bytes) -> dict[str, Any] | None:
  """The record on a whole `line` (newline included), or None where it is not one."""
  if not line.endswith(b'\n'):
    return None
  try:
    record = json.loads(line)
  except ValueError:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8.
    return None
  if not (isinstance(record, dict) and isinstance(record.get('epoch'), int)
          and isinstance(record.get('kind'), str)):
    return None
  return record


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file, in order, less a torn last line.

  Records are appended one line at a time, so a run killed in the middle of a
  write (or a file read while a run writes it) can end in part of a line: an
  unterminated or unparseable last line is that, and is left out. Such a line
  anywhere else is damage, which raises `MetricsFileError` naming it.
  """
  records, torn = [], None
  with open(path, 'rb') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      if torn is not None:
        raise MetricsFileError(
            f'{path} line {torn} is not a metrics record, and lines follow it (only the last line '
            'can be cut short by a kill): repair or remove that line, or use a new --workdir')
      record = _record(line)
      if record is None:
        torn = number
      else:
        records.append(record)
  return records


class Progress:
  """A tqdm bar over the run's steps showing steps/s, images/s and the loss terms.

  `silent` (every process but the lead one) turns off the bar and the printed lines.
  """

  def __init__(self, total_steps: int, done_steps: int, show_bar: bool, silent: bool = False):
    self._silent = silent
    self._bar = tqdm.tqdm(total=total_steps, initial=done_steps, unit='step',
                          disable=silent or not show_bar, dynamic_ncols=True, smoothing=0.3)

  def update(self, num_steps: int, seconds: float, images_per_step: int,
             metrics: dict[str, np.ndarray]) -> None:
    postfix = {k: f'{float(np.mean(metrics[k])):.4f}' for k in _BAR_METRICS if k in metrics}
    postfix['img/s'] = f'{num_steps * images_per_step / seconds:.0f}'
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(num_steps)

  def print(self, line: str) -> None:
    if not self._silent:
      tqdm.tqdm.write(line)

  def close(self) -> None:
    self._bar.close()


def run_summary(config: Mapping[str, Any], *, epochs: int, best_epoch: int | None,
                last_eval: Mapping[str, float], best_eval: Mapping[str, float],
                train_seconds: float | None = None) -> dict[str, Any]:
  """What `summary.json` holds: the run, and test (and validation) errors of two evaluations.

  'final' is the last evaluation; 'best' the one with the best teacher
  accuracy on the config's selection split.
  """
  summary = {'dataset': config['dataset'], 'method': config['method'], 'seed': config['seed'],
             'epochs': epochs, 'best_epoch': best_epoch,
             'selection': config.get('selection', 'test')}
  if train_seconds is not None:
    summary['train_seconds'] = train_seconds
  for prefix, evaluation in (('final', last_eval), ('best', best_eval)):
    for key, value in evaluation.items():
      if key.endswith('_accuracy'):
        summary[f'{prefix}/{key.replace("_accuracy", "_error")}'] = 1.0 - value
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """The end-of-run report: final and best errors of student and teacher, wall time."""
  lines = [f'Finished {summary["method"]} on {summary["dataset"]} (seed {summary["seed"]}) after '
           f'{summary["epochs"]} epochs, {summary["train_seconds"]:.0f} s of training.']
  for prefix in ('final', 'best'):
    errors = {k.split('/', 1)[1]: v for k, v in summary.items() if k.startswith(prefix + '/')}
    if errors:
      where = '' if prefix == 'final' else (
          f' (epoch {summary["best_epoch"]}, selected by {summary["selection"]} accuracy)')
      lines.append(f'  {prefix}{where}: ' + ', '.join(
          f'{k.replace("_error", "")} error {100 * v:.2f}%' for k, v in sorted(errors.items())))
  return '\n'.join(lines)
