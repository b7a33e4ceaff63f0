"""A run's workdir files beside its checkpoints and metrics: `config.json` and `split.json`.

`config.json` records the config a run was trained with; a later command on
the same workdir is checked against it (a resume with other values is
refused unless asked for) and `lcmt_jax.evaluate` rebuilds the run from it.
`split.json` records which training images were labelled and held out.
"""

import json
import os
import time
from typing import Any

import ml_collections

from lcmt_jax import distributed
from lcmt_jax import errors
from lcmt_jax import files
from lcmt_jax import input_pipeline

# Keys that may change between a run and its resumption: they do not change what is computed.
RESUMABLE_KEYS = frozenset({'data_dir', 'cache_dir', 'num_epochs', 'steps_per_call',
                            'eval_every_epochs', 'eval_batch_size', 'checkpoint_every_epochs',
                            'progress_bar'})
# Keys added to the config after runs were first recorded, each with the value that
# reproduces those runs: a config.json without them reads as if it held these.
ADDED_KEYS = {
    'cache_dir': '', 'image_size': 32, 'random_flip': None, 'image_mean': [], 'image_std': [],
    'lc_threshold_quantile': 0.0, 'lc_features': 'raw', 'lc_pull': 'student',
    'lc_pair_weight': 'none', 'lr_schedule': 'linear', 'model': 'convlarge',
}


class RunNotFoundError(errors.UserInputError):
  """The workdir does not exist or holds no run config."""


def check_config(config: ml_collections.ConfigDict, workdir: str,
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
  changed = changed_keys(_read_config_json(path), config)
  if changed and not allow_config_change:
    raise errors.UserInputError(
        f'workdir {workdir} holds a run with a different config (differs in: {", ".join(changed)}); '
        f'use a new --workdir, restore those values, or pass --allow_config_change to resume '
        f'it with the new values')
  return changed


def changed_keys(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """The keys beyond RESUMABLE_KEYS whose values differ between a recorded config and `config`."""
  current = json.loads(config.to_json_best_effort())
  return sorted(k for k in set(saved) | set(current)
                if k not in RESUMABLE_KEYS and saved.get(k) != current.get(k))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with, from `workdir/config.json`."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isdir(workdir):
    raise RunNotFoundError(f'no such workdir: {workdir}')
  if not os.path.isfile(path):
    raise RunNotFoundError(f'{workdir} holds no config.json: it is not a run workdir written by '
                           'train.py')
  return ml_collections.ConfigDict(_read_config_json(path))


def _read_config_json(path: str) -> dict:
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserInputError(
        f'{path} cannot be read ({type(e).__name__}: {e}); put back the config.json of that run, '
        f'or use a new --workdir') from e
  if not isinstance(saved, dict):
    raise errors.UserInputError(f'{path} does not hold a config (a JSON object); put back the '
                                'config.json of that run, or use a new --workdir')
  return {**ADDED_KEYS, **saved}


def record_config(config: ml_collections.ConfigDict, workdir: str, changed: list[str]) -> None:
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
  files.write_atomically(path, config.to_json_best_effort(indent=2))


def record_split(config: ml_collections.ConfigDict, workdir: str,
                 split: input_pipeline.SplitData) -> None:
  """Writes `workdir/split.json`: which training images were labelled and held out."""
  if distributed.is_lead_process():
    files.write_atomically(os.path.join(workdir, 'split.json'),
                           json.dumps(input_pipeline.split_record(config.dataset, split)))
