"""Branching a run: a new run that starts from another's checkpoint before local clustering.

Until `lc_start` an MT+LC step is a Mean Teacher step (the LC term is not
computed there), so two runs that differ only in the method (`mt`, `mt_lc`)
or in local clustering's settings (`lc_*`) train alike up to the epoch in
which LC starts. A paired comparison need not train those epochs twice:
every such run keeps its checkpoint of the last of them (the branch point),
and `train.py --branch_from=RUN` starts a new workdir from it, with the
source's split and metric records up to it. The branch's records before the
branch point, the pair-purity diagnostics among them, are the source's.
"""

import dataclasses
import json
import math
import os
import shutil
from typing import Any, Mapping

import jax
from jax.experimental import multihost_utils
import ml_collections

from lcmt_jax import checkpointing
from lcmt_jax import configuration
from lcmt_jax import distributed
from lcmt_jax import errors
from lcmt_jax import files
from lcmt_jax import metrics_log
from lcmt_jax import workdir as workdir_files

# The methods whose steps before `lc_start` are one program: a branch may switch between them.
BRANCHABLE_METHODS = ('mt', 'mt_lc')


@dataclasses.dataclass(frozen=True)
class Branch:
  """A checked branch: its source workdir, the epoch it starts after, the config keys it changes."""

  source: str
  epoch: int
  changed: list[str]


def branch_epoch(config: Mapping[str, Any]) -> int | None:
  """The epoch whose checkpoint a branch starts from: the last one trained before `lc_start`.

  Epoch k (from 1) is schedule epoch k, or spans schedule epochs [k, k + 1)
  where the schedules move per step (`lcmt_jax.schedules.schedule_epoch`).
  None where there is none to share: LC acting in the first epoch, a run no
  longer than the branch point, or a supervised run.
  """
  if config['method'] not in BRANCHABLE_METHODS:
    return None
  if config['schedule_granularity'] == 'epoch':
    epoch = math.ceil(config['lc_start']) - 1
  else:
    epoch = math.floor(config['lc_start']) - 1
  return epoch if 0 < epoch < config['num_epochs'] else None


def check_branch(config: ml_collections.ConfigDict, source: str, workdir: str) -> Branch:
  """The branch of `source` that `config` describes, or a one-line error; writes nothing."""
  if os.path.lexists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    raise errors.UserInputError(f'--workdir {workdir} already exists: a branch starts a new run in '
                                'a new workdir (to resume a branch, leave out --branch_from)')
  saved_config = workdir_files.load_config(source)
  try:
    configuration.validate(saved_config)
  except configuration.ConfigError as e:
    raise errors.UserInputError(f'--branch_from {source}: its config.json is not a valid run '
                                f'config ({e}); put back the config.json of that run') from e
  saved = json.loads(saved_config.to_json_best_effort())
  changed = workdir_files.changed_keys(saved, config)
  methods = {saved['method'], config.method}
  unshared = [k for k in changed if not k.startswith('lc_') and not (
      k == 'method' and methods <= set(BRANCHABLE_METHODS))]
  if unshared:
    raise errors.UserInputError(
        f'--branch_from {source}: the two runs differ in {", ".join(unshared)}, which changes '
        f'training before local clustering starts; a branch may change only the method '
        f'({" or ".join(BRANCHABLE_METHODS)}) and the lc_* settings')
  epochs = [branch_epoch(c) for c in (saved, config)]
  if None in epochs:
    raise errors.UserInputError(
        f'--branch_from {source}: no epoch is trained before local clustering starts in both '
        f'runs (lc_start {saved["lc_start"]} and {config.lc_start}, method {saved["method"]} '
        f'and {config.method}): train the run from the start')
  epoch = min(epochs)
  source_checkpoints = checkpointing.RunCheckpoints(source, read_only=True)
  try:
    stored = source_checkpoints.epochs()
  finally:
    source_checkpoints.close()
  if epoch not in stored:
    raise errors.UserInputError(
        f'--branch_from {source}: it holds no checkpoint of epoch {epoch}, the last before local '
        f'clustering starts (it has {", ".join(map(str, stored)) or "none"}); train it past '
        f'epoch {epoch}, or branch from a run that was')
  missing = [name for name in ('split.json', 'metrics.jsonl')
             if not os.path.isfile(os.path.join(source, name))]
  if missing:
    raise errors.UserInputError(f'--branch_from {source}: it holds no {" or ".join(missing)}; '
                                'put back the files of that run')
  metrics_log.read_records(os.path.join(source, 'metrics.jsonl'))  # Damage is an error here.
  return Branch(source=source, epoch=epoch, changed=changed)


def write_branch(config: ml_collections.ConfigDict, branch: Branch, workdir: str) -> None:
  """Creates `workdir` as `branch` describes, in one rename (a killed copy leaves no run).

  It holds the source's checkpoints up to the branch point, its split and
  metric records up to it, `config` as the run's config (the source's kept
  as its history), and `branch.json`, which says where it came from.
  """
  if distributed.is_lead_process():
    staging = os.path.abspath(workdir).rstrip(os.sep) + '.branching'
    shutil.rmtree(staging, ignore_errors=True)  # Left by a branch killed midway.
    try:
      _stage(config, branch, staging)
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
    if os.path.isdir(workdir):
      os.rmdir(workdir)  # Empty, as `check_branch` found it.
    os.replace(staging, workdir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('branch written')


def _stage(config: ml_collections.ConfigDict, branch: Branch, staging: str) -> None:
  """Writes the branch's files into `staging`."""
  os.makedirs(checkpointing.checkpoint_directory(staging))
  source_checkpoints = checkpointing.RunCheckpoints(branch.source, read_only=True)
  try:
    kept = [e for e in source_checkpoints.epochs() if e <= branch.epoch]
  finally:
    source_checkpoints.close()
  checkpointing.copy_epochs(branch.source, staging, kept)
  for name in ('config.json', 'split.json'):
    shutil.copy2(os.path.join(branch.source, name), staging)
  records = metrics_log.read_records(os.path.join(branch.source, 'metrics.jsonl'))
  files.write_atomically(os.path.join(staging, 'metrics.jsonl'), ''.join(
      json.dumps(r) + '\n' for r in records if r['epoch'] <= branch.epoch))
  workdir_files.record_config(config, staging, branch.changed)
  files.write_atomically(os.path.join(staging, 'branch.json'), json.dumps(
      {'source': os.path.abspath(branch.source), 'epoch': branch.epoch,
       'changed': branch.changed}, indent=2))
