"""Bad input to `train.py`, one test per case: exit status 2, a one-line error, nothing damaged.

`train.py`'s `main` runs in this process (conftest's `train_cli`; a subprocess
per case would cost seconds of start-up each).
"""

import json
import shutil

import ml_collections
import pytest

from lcmt_jax import configuration
from tests import conftest
from tests import helpers
from lcmt_jax.testing.runs import TINY_FLAGS
from tests.test_trainer import tiny_config

TINY_COMMAND = ['--config=configs/quickstart.py', *TINY_FLAGS, '--config.num_epochs=1']


@pytest.fixture
def workdir(one_epoch_run, tmp_path):
  """A private copy of the run that TINY_COMMAND describes, to run bad commands against."""
  copy = tmp_path / 'run'
  shutil.copytree(one_epoch_run[0], copy)
  return copy


def assert_refused(result, message, workdir, before):
  code, error_lines = result
  assert code == 2
  assert len(error_lines) == 1 and message in error_lines[0], error_lines
  assert helpers.directory_contents(workdir) == before  # Nothing written, moved or deleted.


# data_dir and cache_dir have no invalid value of their own (any string is a path): a missing
# data_dir or one that is a file are cases below; an unwritable cache_dir only warns
# (tests/test_data_sources.py).
@pytest.mark.parametrize('key', sorted(set(configuration.RULES) - {'data_dir', 'cache_dir'}))
def test_invalid_config_value(key):
  """Every key's check, on the config train.py would run (the CLI path: the test below)."""
  check, _ = configuration.RULES[key]
  bad = next(v for v in (-1, 'bogus', 1.5) if not check(v))
  # Untyped, so a value of another type reaches the check as a hand-written config's would.
  config = ml_collections.ConfigDict(tiny_config(num_epochs=1).to_dict(), type_safe=False)
  config[key] = bad
  with pytest.raises(configuration.ConfigError, match=f'config.{key}='):
    configuration.validate(config)


def test_invalid_config_value_on_the_command_line(train_cli, workdir):
  before = helpers.directory_contents(workdir)
  assert_refused(train_cli(*TINY_COMMAND, '--config.ema_decay=1.5', f'--workdir={workdir}'),
                 'config.ema_decay=1.5 is invalid', workdir, before)


def test_unknown_config_key(train_cli, workdir):
  before = helpers.directory_contents(workdir)
  assert_refused(train_cli(*TINY_COMMAND, '--config.learning_rat=0.1', f'--workdir={workdir}'),
                 "no config key 'learning_rat'", workdir, before)


def test_bad_config_file_argument(train_cli, workdir):
  before = helpers.directory_contents(workdir)
  command = ['--config=configs/quickstart.py:labels=2000', *TINY_COMMAND[1:]]
  assert_refused(train_cli(*command, f'--workdir={workdir}'),
                 'labels=2000 is not offered by this config', workdir, before)


def test_bug_inside_a_config_file_shows_its_traceback(tmp_path):
  """Not 'bad command line': an unknown key used by the config file itself is a bug."""
  config_file = tmp_path / 'buggy.py'
  config_file.write_text('from configs import quickstart\n\n\ndef get_config(arg=None):\n'
                         '  config = quickstart.get_config(arg)\n'
                         '  config.no_such_key.value = 1\n  return config\n')
  with pytest.raises((AttributeError, KeyError), match='no_such_key'):
    conftest.run_train(f'--config={config_file}', f'--workdir={tmp_path / "run"}')
  assert not (tmp_path / 'run').exists()


def assert_cifar10_refused(train_cli, data_dir, tmp_path, message):
  """A CIFAR-10 run from `data_dir` is refused; nothing under `tmp_path` changes."""
  before = helpers.directory_contents(tmp_path)
  assert_refused(
      train_cli(*TINY_COMMAND, '--config.dataset=cifar10', '--config.image_size=32',
                f'--config.data_dir={data_dir}', f'--workdir={tmp_path / "run"}'),
      message, tmp_path, before)


def test_missing_data_dir(train_cli, tmp_path, offline):
  pytest.importorskip('tensorflow_datasets')  # The tfds source's own message.
  assert_cifar10_refused(train_cli, tmp_path / 'no_such_dir', tmp_path, 'is not prepared')


def test_corrupt_data_dir(train_cli, cifar10_dir, tmp_path, offline):
  data_dir, version_dir = helpers.copy_of_data_dir(cifar10_dir, tmp_path)
  for record_file in version_dir.glob('*.tfrecord*'):
    record_file.write_bytes(record_file.read_bytes()[:100])
  assert_cifar10_refused(train_cli, data_dir, tmp_path, 'cannot be read')


def test_data_dir_that_is_a_file(train_cli, tmp_path):
  (tmp_path / 'tfds').write_text('not a directory')
  assert_cifar10_refused(train_cli, tmp_path / 'tfds', tmp_path, 'is a file, not a directory')


def test_workdir_of_a_different_config(train_cli, workdir):
  before = helpers.directory_contents(workdir)
  assert_refused(train_cli(*TINY_COMMAND, '--config.lc_weight=3', f'--workdir={workdir}'),
                 'different config (differs in: lc_weight)', workdir, before)


def test_allow_config_change_resumes_with_the_new_values(train_cli, workdir):
  old_config = (workdir / 'config.json').read_text()
  code, error_lines = train_cli(*TINY_COMMAND, '--config.lc_weight=3', '--config.num_epochs=2',
                                '--allow_config_change', f'--workdir={workdir}')
  assert (code, error_lines) == (0, [])
  assert json.loads((workdir / 'config.json').read_text())['lc_weight'] == 3
  (kept,) = workdir.glob('config.*-*.json')  # The config the run was started with.
  assert kept.read_text() == old_config
  records = (workdir / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line)['epoch'] for line in records] == [1, 1, 2, 2]


def test_branch_from_a_run_that_trains_nothing_before_lc(train_cli, workdir, tmp_path):
  """TINY_COMMAND's LC starts in epoch 1: there is no branch point (tests/test_branching.py)."""
  before = helpers.directory_contents(workdir)
  assert_refused(train_cli(*TINY_COMMAND, '--config.method=mt', f'--workdir={tmp_path / "branch"}',
                           f'--branch_from={workdir}'),
                 'no epoch is trained before local clustering starts', workdir, before)
  assert not (tmp_path / 'branch').exists()


def test_unreadable_config_record(train_cli, workdir):
  (workdir / 'config.json').write_text('{"width": 8, ')
  before = helpers.directory_contents(workdir)
  assert_refused(train_cli(*TINY_COMMAND, f'--workdir={workdir}'), 'config.json cannot be read',
                 workdir, before)


@pytest.mark.parametrize('damage', ['truncated', 'deleted'])
def test_corrupt_checkpoint(train_cli, workdir, damage):
  checkpoint = max((workdir / 'checkpoints').iterdir(), key=lambda p: int(p.name))  # The latest.
  for path in (checkpoint / 'state').rglob('*'):
    if path.is_file() and damage == 'truncated':
      path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 3])
    elif path.is_file():
      path.unlink()
  before = helpers.directory_contents(workdir)
  assert_refused(train_cli(*TINY_COMMAND, '--config.num_epochs=2', f'--workdir={workdir}'),
                 'cannot be read', workdir, before)


def test_checkpoint_of_a_different_network(train_cli, workdir):
  """A readable checkpoint that does not fit the code's train state is named as such, not 'damaged'."""
  before = helpers.directory_contents(workdir)
  code, error_lines = train_cli(*TINY_COMMAND, '--config.width=16', '--allow_config_change',
                                f'--workdir={workdir}')
  assert_refused((code, error_lines), 'holds a different train state', workdir, before)
  assert 'has shape' in error_lines[0] and 'cannot be read' not in error_lines[0]


def test_workdir_that_is_a_file(train_cli, tmp_path):
  (tmp_path / 'run').write_text('not a directory')
  before = helpers.directory_contents(tmp_path)
  assert_refused(train_cli(*TINY_COMMAND, f'--workdir={tmp_path / "run"}'), 'is a file',
                 tmp_path, before)


def test_unknown_flag(train_cli, workdir):
  before = helpers.directory_contents(workdir)
  assert_refused(train_cli(*TINY_COMMAND, '--num_process=2', f'--workdir={workdir}'),
                 'bad command line', workdir, before)


def test_checkpoints_in_the_layout_of_an_older_version(train_cli, workdir):
  """Before one manager kept both kinds, checkpoints lived in checkpoints/latest and best."""
  old = workdir / 'checkpoints' / 'latest'
  old.mkdir()
  for checkpoint in (workdir / 'checkpoints').iterdir():
    if checkpoint.name.isdigit():
      checkpoint.rename(old / checkpoint.name)
  before = helpers.directory_contents(workdir)
  assert_refused(train_cli(*TINY_COMMAND, '--config.num_epochs=2', f'--workdir={workdir}'),
                 'in the layout of lcmt_jax before', workdir, before)
