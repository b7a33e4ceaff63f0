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

_BAR_METRICS = ('loss', 'ce_loss', 'consistency_loss', 'lc_loss')


class MetricsLog:
  """Appends one JSON record per (epoch, kind) to `workdir/metrics.jsonl` and to TensorBoard.

  Each record carries its `wall_time` (Unix seconds), so the time a run spends
  on training, evaluation and checkpoints can be read back
  (`benchmarks/protocol_time.py`).

  On resumption the records after the restored epoch (written by the
  interrupted run after its last checkpoint) are dropped, so the file holds
  each epoch once. A disabled log (on every process but the lead one of a
  multi-process run) writes nothing.
  """

  def __init__(self, workdir: str, resume_after_epoch: int = 0, enabled: bool = True):
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._workdir = workdir
    self._enabled = enabled
    if enabled and os.path.exists(self._path):
      kept = [line for line in read_records(self._path) if line['epoch'] <= resume_after_epoch]
      with open(self._path + '.tmp', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
      os.replace(self._path + '.tmp', self._path)
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
    path = os.path.join(self._workdir, 'summary.json')
    with open(path + '.tmp', 'w') as f:
      json.dump(summary, f, indent=2)
    os.replace(path + '.tmp', path)


def _use_tensorboards_tensorflow_stub() -> None:
  """Keeps tensorboard's writer from importing TensorFlow for its file system.

  Importing TensorFlow costs about 3 s at every start and would claim the GPUs;
  tensorboard's own stub writes local files the same. An importable
  `tensorboard.compat.notf` is tensorboard's switch for the stub (see
  `tensorboard.compat.tf`); it changes nothing once TensorFlow was chosen.
  """
  sys.modules.setdefault('tensorboard.compat.notf', types.ModuleType('tensorboard.compat.notf'))


def read_records(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file, in order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


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
