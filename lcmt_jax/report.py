"""A markdown table of many runs: per (dataset, method), mean ± std over seeds of the test errors.

    python -m lcmt_jax.report runs/quickstart [MORE_DIRS ...] [--out RESULTS_TABLE.md]

Each DIR is a run workdir or a directory holding run workdirs at any depth.
A run's numbers come from its summary.json; a run without one (still
training, or stopped) is read from metrics.jsonl and config.json instead:
its last evaluation is 'final' and the evaluation with the best teacher
accuracy on the config's selection split is 'best', as the trainer picks it.
Reads JSON only; it does not load JAX.
"""

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from lcmt_jax import cli
from lcmt_jax import errors
from lcmt_jax import files
from lcmt_jax import metrics_log

# (summary key, column title), every column in percent.
COLUMNS = (
    ('final/test/teacher_error', 'final teacher'),
    ('final/test/student_error', 'final student'),
    ('best/test/teacher_error', 'best teacher'),
    ('best/test/student_error', 'best student'),
)
_METHOD_ORDER = ('mt_lc', 'mt', 'supervised')


class NoRunsError(errors.UserInputError):
  """A directory does not exist or holds no run."""


@dataclasses.dataclass(frozen=True)
class Run:
  workdir: str
  summary: dict  # As summary.json: dataset, method, seed, epochs, 'final/...', 'best/...'.
  complete: bool  # False when rebuilt from metrics.jsonl.


def _is_run(path: str) -> bool:
  return os.path.isfile(os.path.join(path, 'summary.json')) or (
      os.path.isfile(os.path.join(path, 'metrics.jsonl'))
      and os.path.isfile(os.path.join(path, 'config.json')))


def find_runs(paths: Iterable[str]) -> list[str]:
  """Every run workdir at or under each of `paths`, sorted, without duplicates."""
  found = set()
  for path in paths:
    if not os.path.isdir(path):
      raise NoRunsError(f'no such directory: {path}')
    before = len(found)
    for root, dirs, _ in os.walk(path):
      if _is_run(root):
        found.add(os.path.normpath(root))
        dirs[:] = []  # A run's checkpoints and tensorboard hold no runs.
      else:
        dirs.sort()
    if len(found) == before:
      raise NoRunsError(f'{path} holds no run (no summary.json, nor metrics.jsonl with '
                        'config.json, at any depth)')
  return sorted(found)


def summary_from_metrics(workdir: str) -> dict:
  """What summary.json would say, rebuilt from metrics.jsonl and config.json."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  records = metrics_log.read_records(os.path.join(workdir, 'metrics.jsonl'))
  evals = [r for r in records if r['kind'] == 'eval']
  selection = f'{config.get("selection", "test")}/teacher_accuracy'
  # The first of equal bests, as the trainer keeps it (it replaces only on a strict gain).
  best = max(evals, key=lambda r: (r.get(selection, -1.0), -r['epoch'])) if evals else {}
  return metrics_log.run_summary(config, epochs=max((r['epoch'] for r in records), default=0),
                                 best_epoch=best.get('epoch'),
                                 last_eval=evals[-1] if evals else {}, best_eval=best)


def load_run(workdir: str) -> Run:
  path = os.path.join(workdir, 'summary.json')
  if os.path.isfile(path):
    with open(path) as f:
      return Run(workdir, json.load(f), complete=True)
  return Run(workdir, summary_from_metrics(workdir), complete=False)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """The mean and the sample standard deviation (n - 1; NaN for one value)."""
  values = np.asarray(values, float)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float('nan')


def _cell(values: Sequence[float]) -> str:
  if not values:
    return '–'
  mean, std = mean_std([100 * v for v in values])
  return f'{mean:.2f}' if np.isnan(std) else f'{mean:.2f} ± {std:.2f}'


def _group_key(run: Run) -> tuple:
  method = run.summary['method']
  order = _METHOD_ORDER.index(method) if method in _METHOD_ORDER else len(_METHOD_ORDER)
  return run.summary['dataset'], order, method


def build_table(runs: Sequence[Run]) -> str:
  """The markdown table: a row per (dataset, method), test errors in percent, mean ± std."""
  groups: dict[tuple, list[Run]] = {}
  for run in sorted(runs, key=_group_key):
    groups.setdefault(_group_key(run), []).append(run)
  lines = ['| dataset | method | seeds | epochs | ' + ' | '.join(
               f'{title} test error (%)' for _, title in COLUMNS) + ' |',
           '|---|---|---|---|' + '---|' * len(COLUMNS)]
  for (dataset, _, method), members in groups.items():
    seeds = sorted(run.summary['seed'] for run in members)
    epochs = sorted({run.summary.get('epochs', 0) for run in members})
    incomplete = sum(not run.complete for run in members)
    seed_text = f'{len(seeds)} ({", ".join(map(str, seeds))})' + (
        f', {incomplete} without summary.json' if incomplete else '')
    cells = [_cell([run.summary[key] for run in members if key in run.summary])
             for key, _ in COLUMNS]
    lines.append(f'| {dataset} | {method} | {seed_text} | {"/".join(map(str, epochs))} | '
                 + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def report(paths: Sequence[str]) -> str:
  """The table of every run under `paths`, with a note on how to read it."""
  runs = [load_run(workdir) for workdir in find_runs(paths)]
  selections = sorted({run.summary.get('selection', 'test') for run in runs})
  note = ('Test error in percent, mean ± sample standard deviation (n − 1) over seeds. '
          "'final': the last evaluation; 'best': the evaluation with the best teacher "
          f'accuracy on the {"/".join(selections)} split (selection of the run\'s config).')
  return build_table(runs) + '\n\n' + note + '\n'


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('out', None, 'Also write the table to this markdown file.')


def main(argv: list[str], _) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  if len(argv) < 2:
    raise errors.UserInputError('give one or more run directories: python -m lcmt_jax.report DIR')
  text = report(argv[1:])
  print(text, end='')
  if flags.FLAGS.out:
    files.write_atomically(flags.FLAGS.out, text)


if __name__ == '__main__':
  cli.run(main, _define_flags)
