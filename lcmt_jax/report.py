"""A markdown table of many runs: per setting, mean ± std over seeds of the test errors.

    python -m lcmt_jax.report runs/quickstart [MORE_DIRS ...] [--out RESULTS_TABLE.md]
    python -m lcmt_jax.report runs/lc_variant runs/mt --against=mt

Each DIR is a run workdir or a directory holding run workdirs at any depth.
A run's numbers come from its summary.json; a run without one (still
training, or stopped) is read from metrics.jsonl and config.json instead:
its last evaluation is 'final' and the evaluation with the best teacher
accuracy on the config's selection split is 'best', as the trainer picks it.

Runs share a row when their config.json agree in everything but the seed and
the keys that do not change what is computed (paths, progress, checkpoints);
a row names the keys that set it apart. `--against=METHOD` adds a paired
comparison: each row against the METHOD row of the same settings, seed by
seed, as a difference in final teacher test error with a paired t-test.
"""

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import stats

from lcmt_jax import cli
from lcmt_jax import errors
from lcmt_jax import files
from lcmt_jax import metrics_log
from lcmt_jax import workdir as workdir_lib

# (summary key, column title), every column in percent.
COLUMNS = (
    ('final/test/teacher_error', 'final teacher'),
    ('final/test/student_error', 'final student'),
    ('best/test/teacher_error', 'best teacher'),
    ('best/test/student_error', 'best student'),
)
_METHOD_ORDER = ('mt_lc', 'mt', 'supervised')
# The paired comparison's measure: the honest number (the last evaluation).
PAIRED_KEY = 'final/test/teacher_error'
# Config keys that do not set a run apart: those a resume may change (where it reads and
# writes, how it reports), but for its length and evaluation interval, which change its
# numbers; and the seed, over which a row takes its mean.
_RUN_KEYS = workdir_lib.RESUMABLE_KEYS - {'num_epochs', 'eval_every_epochs'} | {'seed'}
# Config keys a method never reads (train_state.StepConfig zeroes the weights of their terms).
_UNUSED_PREFIXES = {'mt': ('lc_',), 'supervised': ('lc_', 'consistency_')}


class NoRunsError(errors.UserInputError):
  """A directory does not exist or holds no run."""


@dataclasses.dataclass(frozen=True)
class Run:
  workdir: str
  summary: dict  # As summary.json: dataset, method, seed, epochs, 'final/...', 'best/...'.
  complete: bool  # False when rebuilt from metrics.jsonl.
  config: dict  # As config.json, with workdir_lib.ADDED_KEYS; empty where there is none.

  def setting(self) -> dict:
    """The config keys that shape this run, without those its method never reads."""
    unused = _UNUSED_PREFIXES.get(self.summary['method'], ())
    return {key: value for key, value in self.config.items()
            if key not in _RUN_KEYS and key != 'method' and not key.startswith(unused)}


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


def summary_from_metrics(workdir: str, config: dict) -> dict:
  """What summary.json would say, rebuilt from metrics.jsonl and the run's `config`."""
  records = metrics_log.read_records(os.path.join(workdir, 'metrics.jsonl'))
  evals = [r for r in records if r['kind'] == 'eval']
  selection = f'{config.get("selection", "test")}/teacher_accuracy'
  # The first of equal bests, as the trainer keeps it (it replaces only on a strict gain).
  best = max(evals, key=lambda r: (r.get(selection, -1.0), -r['epoch'])) if evals else {}
  return metrics_log.run_summary(config, epochs=max((r['epoch'] for r in records), default=0),
                                 best_epoch=best.get('epoch'),
                                 last_eval=evals[-1] if evals else {}, best_eval=best)


def load_run(workdir: str) -> Run:
  config = (workdir_lib.load_config(workdir).to_dict()
            if os.path.isfile(os.path.join(workdir, 'config.json')) else {})
  path = os.path.join(workdir, 'summary.json')
  if os.path.isfile(path):
    with open(path) as f:
      return Run(workdir, json.load(f), complete=True, config=config)
  return Run(workdir, summary_from_metrics(workdir, config), complete=False, config=config)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """The mean and the sample standard deviation (n - 1; NaN for one value)."""
  values = np.asarray(values, float)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float('nan')


def _mean_std_text(mean: float, std: float, signed: bool = False) -> str:
  text = f'{mean:+.2f}' if signed else f'{mean:.2f}'
  return text if np.isnan(std) else f'{text} ± {std:.2f}'


def _cell(values: Sequence[float]) -> str:
  return _mean_std_text(*mean_std([100 * v for v in values])) if values else '–'


def _canonical(setting: dict) -> str:
  return json.dumps(setting, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class Group:
  """The runs of one setting: one dataset, one method, one config but for the seed."""
  dataset: str
  method: str
  setting: dict
  runs: tuple[Run, ...]

  def errors_by_seed(self, key: str) -> dict[int, float]:
    """`key` of each run by seed; two runs of one seed cannot be paired with anything."""
    runs_by_seed: dict[int, Run] = {}
    for run in self.runs:
      seed = run.summary['seed']
      if seed in runs_by_seed:
        raise errors.UserInputError(
            f'two runs of seed {seed} have the same settings, {runs_by_seed[seed].workdir} and '
            f'{run.workdir}: give only one of them to pair with another method')
      runs_by_seed[seed] = run
    return {seed: run.summary[key] for seed, run in runs_by_seed.items() if key in run.summary}


def group_runs(runs: Sequence[Run]) -> list[Group]:
  """The runs grouped by (dataset, method, setting), in dataset and method order."""
  groups: dict[tuple, list[Run]] = {}
  for run in runs:
    key = (run.summary['dataset'], run.summary['method'], _canonical(run.setting()))
    groups.setdefault(key, []).append(run)

  def order(key: tuple) -> tuple:
    dataset, method, setting = key
    rank = _METHOD_ORDER.index(method) if method in _METHOD_ORDER else len(_METHOD_ORDER)
    return dataset, rank, method, setting

  return [Group(key[0], key[1], members[0].setting(), tuple(members))
          for key, members in sorted(groups.items(), key=lambda item: order(item[0]))]


def setting_labels(groups: Sequence[Group]) -> list[str]:
  """Each group's 'key=value' for the keys whose value differs between groups ('–': none)."""
  values: dict[str, set[str]] = {}
  for group in groups:
    for key, value in group.setting.items():
      values.setdefault(key, set()).add(json.dumps(value))
  differing = sorted(key for key, seen in values.items() if len(seen) > 1 and key != 'dataset')
  return [', '.join(f'{key}={group.setting[key]}' for key in differing if key in group.setting)
          or '–' for group in groups]


def build_table(groups: Sequence[Group]) -> str:
  """The markdown table: a row per group, test errors in percent, mean ± std over seeds."""
  lines = ['| dataset | method | setting | seeds | epochs | ' + ' | '.join(
               f'{title} test error (%)' for _, title in COLUMNS) + ' |',
           '|---|---|---|---|---|' + '---|' * len(COLUMNS)]
  for group, label in zip(groups, setting_labels(groups)):
    seeds = sorted(run.summary['seed'] for run in group.runs)
    epochs = sorted({run.summary.get('epochs', 0) for run in group.runs})
    incomplete = sum(not run.complete for run in group.runs)
    seed_text = f'{len(seeds)} ({", ".join(map(str, seeds))})' + (
        f', {incomplete} without summary.json' if incomplete else '')
    cells = [_cell([run.summary[key] for run in group.runs if key in run.summary])
             for key, _ in COLUMNS]
    lines.append(f'| {group.dataset} | {group.method} | {label} | {seed_text} | '
                 f'{"/".join(map(str, epochs))} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


@dataclasses.dataclass(frozen=True)
class PairedComparison:
  """A group's final teacher test error minus the baseline's, seed by seed, in points."""
  seeds: tuple[int, ...]
  differences: tuple[float, ...]

  @property
  def mean_std(self) -> tuple[float, float]:
    return mean_std(self.differences)

  @property
  def mean_over_std(self) -> float:
    """|mean| / std of the differences, the issue's yardstick (NaN for one seed or std 0)."""
    mean, std = self.mean_std
    return abs(mean) / std if std > 0 else float('nan')

  @property
  def t_and_p(self) -> tuple[float, float]:
    """The paired t statistic and its two-sided p-value (NaN for fewer than two seeds)."""
    if len(self.differences) < 2:
      return float('nan'), float('nan')
    result = stats.ttest_1samp(self.differences, 0.0)
    return float(result.statistic), float(result.pvalue)


def compare(group: Group, baseline: Group) -> PairedComparison:
  """`group` against `baseline` on the seeds both ran."""
  ours, theirs = group.errors_by_seed(PAIRED_KEY), baseline.errors_by_seed(PAIRED_KEY)
  seeds = tuple(sorted(set(ours) & set(theirs)))
  return PairedComparison(seeds, tuple(100 * (ours[s] - theirs[s]) for s in seeds))


def baseline_of(group: Group, groups: Sequence[Group], method: str) -> Group | None:
  """The `method` group run as `group` was in every key that both methods read."""
  unused = _UNUSED_PREFIXES.get(method, ()) + _UNUSED_PREFIXES.get(group.method, ())

  def shared(setting: dict) -> str:
    return _canonical({k: v for k, v in setting.items() if not k.startswith(unused)})

  return next((other for other in groups
               if other.method == method and other.dataset == group.dataset
               and shared(other.setting) == shared(group.setting)), None)


def _number(value: float, digits: int = 2) -> str:
  return '–' if np.isnan(value) else f'{value:.{digits}f}'


def build_paired_table(groups: Sequence[Group], method: str) -> str:
  """Each group against its `method` baseline: the differences and a paired t-test."""
  lines = ['| dataset | method | setting | against | seeds | difference (points) | '
           'difference / std | paired t | p (two-sided) | lower on |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for group, label in zip(groups, setting_labels(groups)):
    baseline = baseline_of(group, groups, method) if group.method != method else None
    if baseline is None:
      continue
    comparison = compare(group, baseline)
    if not comparison.seeds:
      continue
    mean, std = comparison.mean_std
    t, p = comparison.t_and_p
    lower = sum(d < 0 for d in comparison.differences)
    lines.append(
        f'| {group.dataset} | {group.method} | {label} | {method} | '
        f'{len(comparison.seeds)} ({", ".join(map(str, comparison.seeds))}) | '
        f'{_mean_std_text(mean, std, signed=True)} | {_number(comparison.mean_over_std)} | '
        f'{_number(t)} | {_number(p, 3)} | {lower} of {len(comparison.seeds)} |')
  if len(lines) == 2:
    return (f'No row has a {method} row of the same settings (and a seed in common) to be '
            'compared with.')
  return '\n'.join(lines)


def report(paths: Sequence[str], against: str | None = None) -> str:
  """The table of every run under `paths`, with a note on how to read it; with `against`,
  also each setting's paired comparison with the `against` method's."""
  runs = [load_run(workdir) for workdir in find_runs(paths)]
  groups = group_runs(runs)
  selections = sorted({run.summary.get('selection', 'test') for run in runs})
  text = build_table(groups) + '\n\n' + (
      'Test error in percent, mean ± sample standard deviation (n − 1) over seeds. '
      "'final': the last evaluation; 'best': the evaluation with the best teacher "
      f'accuracy on the {"/".join(selections)} split (selection of the run\'s config).\n')
  if against:
    text += '\n' + build_paired_table(groups, against) + '\n\n' + (
        f'Final teacher test error of each row minus that of the {against} row run with the '
        'same settings, seed by seed, in points: mean ± sample standard deviation; negative '
        'is better. "lower on": the seeds where the row is better.\n')
  return text


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('out', None, 'Also write the table to this markdown file.')
  flags.DEFINE_string('against', None, 'Also compare each setting, seed by seed, with the '
                      'runs of this method (mt_lc, mt or supervised) at the same settings.')


def main(argv: list[str], _) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  if len(argv) < 2:
    raise errors.UserInputError('give one or more run directories: python -m lcmt_jax.report DIR')
  text = report(argv[1:], flags.FLAGS.against)
  print(text, end='')
  if flags.FLAGS.out:
    files.write_atomically(flags.FLAGS.out, text)


if __name__ == '__main__':
  cli.run(main, _define_flags)
