"""Trains Mean Teacher with Local Clustering: `python train.py --config=configs/cifar10.py`.

Thin entry point in the style of the Flax examples: parse flags, call the
trainer. Bad input (command line, config, data, workdir) ends with a
one-line error and exit status 2.
"""


from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lcmt_jax import cli
from lcmt_jax import distributed
from lcmt_jax import errors
from lcmt_jax import trainer
from lcmt_jax import xla_cpu

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False,
    'Resume a workdir even though it was written with different config values.')
_BRANCH_FROM = flags.DEFINE_string(
    'branch_from', None, "Start the new --workdir from this run's checkpoint at its last epoch "
    'before local clustering starts; the two may differ only in method (mt, mt_lc) and lc_*.')
# A multi-process run; under SLURM (srun) all three come from the environment.
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0 of a multi-process run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.', lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "This process's index, 0 to "
                                   'num_processes - 1.', lower_bound=0)
try:
  # ml_collections applies `--config.KEY=VALUE` overrides here already.
  _CONFIG = config_flags.DEFINE_config_file(
      'config', 'configs/quickstart.py',
      'Config file; `FILE.py:improved` switches the reference quirks to their fixes.',
      lock_config=True)
except errors.BAD_FLAG_ERRORS as e:
  errors.exit_bad_command_line(e)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # Orbax reports every save at INFO.
  config = cli.config_value(_CONFIG)
  xla_cpu.configure(config.compute_dtype)  # Before JAX starts.
  workdir = _WORKDIR.value or f'workdirs/{config.dataset}_{config.method}'
  try:
    distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    trainer.train_and_evaluate(config, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                               branch_from=_BRANCH_FROM.value)
  except errors.UserInputError as e:
    errors.exit_with_error(e)


if __name__ == '__main__':
  app.run(main, flags_parser=errors.parse_flags_or_exit)
