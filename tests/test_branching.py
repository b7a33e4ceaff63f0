"""Branching a run from another's checkpoint before local clustering starts."""

import json
import os
import shutil

import pytest

from configs import quickstart
from lcmt_jax import branching
from lcmt_jax import checkpointing
from lcmt_jax import errors
from lcmt_jax import train_state
from lcmt_jax import trainer
from lcmt_jax.testing.runs import TINY_SETTINGS, assert_same_run
from tests import helpers

# Three epochs with LC from the second: epoch 1 is the branch point. It is neither evaluated nor
# on the checkpoint interval, so only the branch point's rule writes and keeps it. The threshold
# is this module's own, and so are its compiled functions: tests/test_trainer.py counts the
# programs another config compiles, in whichever order the tests run.
SETTINGS = dict(TINY_SETTINGS, num_epochs=3, lc_start=2, lc_threshold=1.5, eval_every_epochs=3,
                checkpoint_every_epochs=5)


def config(**overrides):
  config = quickstart.get_config()
  config.update(SETTINGS)
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def mean_teacher_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('mt')
  trainer.train_and_evaluate(config(method='mt'), str(workdir))
  return workdir


def test_a_run_keeps_its_checkpoint_at_the_branch_point(mean_teacher_run):
  checkpoints = checkpointing.RunCheckpoints(str(mean_teacher_run), read_only=True)
  assert checkpoints.epochs() == [1, 3]
  checkpoints.close()


@pytest.mark.parametrize('method, lc_start, num_epochs, granularity, expected', [
    ('mt_lc', 600.0, 1000, 'epoch', 599),  # The reference: LC from epoch 600.
    ('mt', 6.5, 10, 'epoch', 6),           # Epoch 7 is the first at or past 6.5.
    ('mt', 6.5, 10, 'step', 5),            # Epoch 6 spans 6.5.
    ('mt_lc', 12.0, 20, 'step', 11),
    ('mt_lc', 1.0, 3, 'epoch', None),      # LC from the first epoch.
    ('mt_lc', 12.0, 11, 'step', None),     # Nothing after the branch point.
    ('supervised', 600.0, 1000, 'epoch', None),
])
def test_branch_epoch_is_the_last_epoch_before_lc_start(method, lc_start, num_epochs, granularity,
                                                         expected):
  config = dict(method=method, lc_start=lc_start, num_epochs=num_epochs,
                schedule_granularity=granularity)
  assert branching.branch_epoch(config) == expected


@pytest.mark.parametrize('granularity', ['epoch', 'step'])
def test_the_branch_point_is_the_last_epoch_whose_calls_run_without_lc(granularity):
  """Against the trainer's own choice of program per call (`lc_active_in`)."""
  for lc_start in (2.0, 2.5, 3.0, 3.75):
    settings = dict(method='mt_lc', lc_start=lc_start, num_epochs=6,
                    schedule_granularity=granularity)
    cfg = train_state.StepConfig.from_config(config(**settings), steps_per_epoch=4)
    free = [k for k in range(1, 7) if not train_state.lc_active_in(cfg, (k - 1) * 4, 4)]
    assert branching.branch_epoch(settings) == max(free), lc_start


def test_mt_lc_branched_from_mean_teacher_ends_where_it_ends_trained_from_the_start(
    mean_teacher_run, tmp_path):
  trainer.train_and_evaluate(config(), str(tmp_path / 'from_start'))
  trainer.train_and_evaluate(config(), str(tmp_path / 'branch'), branch_from=str(mean_teacher_run))
  # The branch's record of epoch 1 is Mean Teacher's, which has no LC loss.
  assert_same_run(tmp_path / 'from_start', tmp_path / 'branch', epochs=3, unrecorded=('lc_loss',))
  assert json.loads((tmp_path / 'branch' / 'branch.json').read_text()) == {
      'source': str(mean_teacher_run), 'epoch': 1, 'changed': ['method']}
  assert json.loads((tmp_path / 'branch' / 'config.json').read_text())['method'] == 'mt_lc'
  history = [n for n in os.listdir(tmp_path / 'branch') if n.startswith('config.2')]
  assert [json.loads((tmp_path / 'branch' / n).read_text())['method'] for n in history] == ['mt']
  assert not os.path.exists(str(tmp_path / 'branch') + '.branching')


@pytest.mark.parametrize('overrides, message', [
    (dict(seed=5), 'differ in seed, which changes training before local clustering'),
    (dict(method='supervised'), 'differ in method,'),
    (dict(lc_start=1), 'no epoch is trained before local clustering starts in both runs'),
])
def test_a_branch_that_would_not_train_alike_is_refused_before_anything_is_written(
    mean_teacher_run, tmp_path, overrides, message):
  before = helpers.directory_contents(mean_teacher_run)
  with pytest.raises(errors.UserInputError, match=message):
    trainer.train_and_evaluate(config(**overrides), str(tmp_path / 'branch'),
                               branch_from=str(mean_teacher_run))
  assert os.listdir(tmp_path) == []
  assert helpers.directory_contents(mean_teacher_run) == before


def test_a_branch_from_a_run_without_the_branch_point_is_refused(mean_teacher_run, tmp_path):
  source = tmp_path / 'source'
  shutil.copytree(mean_teacher_run, source)
  shutil.rmtree(source / 'checkpoints' / '1')
  with pytest.raises(errors.UserInputError, match='no checkpoint of epoch 1, the last before local '
                     'clustering starts \\(it has 3\\)'):
    trainer.train_and_evaluate(config(), str(tmp_path / 'branch'), branch_from=str(source))
  assert sorted(os.listdir(tmp_path)) == ['source']


def test_a_branch_from_a_run_with_a_crafted_config_is_refused(mean_teacher_run, tmp_path):
  source = tmp_path / 'source'
  shutil.copytree(mean_teacher_run, source)
  saved = json.loads((source / 'config.json').read_text())
  (source / 'config.json').write_text(json.dumps({**saved, 'lc_start': 'soon'}))
  with pytest.raises(errors.UserInputError, match="config.json is not a valid run config "
                     "\\(config.lc_start='soon' is invalid"):
    trainer.train_and_evaluate(config(), str(tmp_path / 'branch'), branch_from=str(source))
  assert sorted(os.listdir(tmp_path)) == ['source']


def test_a_branch_into_an_existing_run_is_refused(mean_teacher_run, tmp_path):
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(errors.UserInputError, match='already exists: a branch starts a new run'):
    trainer.train_and_evaluate(config(), str(tmp_path), branch_from=str(mean_teacher_run))
  assert os.listdir(tmp_path) == ['config.json']


def test_a_branch_from_a_missing_run_is_refused(tmp_path):
  with pytest.raises(errors.UserInputError, match='no such workdir'):
    trainer.train_and_evaluate(config(), str(tmp_path / 'branch'),
                               branch_from=str(tmp_path / 'missing'))
