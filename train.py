"""Trains Mean Teacher with Local Clustering: `python train.py --config=configs/cifar10.py`.

Thin entry point in the style of the Flax examples: parse flags, call the
trainer. Bad input
(config, data, workdir) ends with a one-line error and exit status 2.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from lcmt_jax import errors
from lcmt_jax import trainer

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/quickstart.py', 'Config file; `file.py:improved` selects the fixed quirks.',
    lock_config=True)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except (flags.Error, ValueError, AttributeError, KeyError) as e:
    print(f'error: {e}'.splitlines()[0], file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  workdir = _WORKDIR.value or f'workdirs/{_CONFIG.value.dataset}_{_CONFIG.value.method}'
  try:
    trainer.train_and_evaluate(_CONFIG.value, workdir)
  except errors.UserInputError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
