"""evaluate, plot and report on one tiny real run (digits, width 8, one epoch)."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from lcmt_jax import checkpointing
from lcmt_jax import errors
from lcmt_jax import eval_metrics
from lcmt_jax import evaluate
from lcmt_jax import experiment
from lcmt_jax import input_pipeline
from lcmt_jax import metrics_log
from lcmt_jax import models
from lcmt_jax import plot
from lcmt_jax import report
from lcmt_jax import train_state
from lcmt_jax import torch_import
from tests import helpers
from lcmt_jax.testing.runs import REPO
from tests.test_trainer import tiny_config


@pytest.fixture(scope='module')
def restored(one_epoch_run):
  return evaluate.restore_run(one_epoch_run[0], 'latest')


def _cli(*args, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


def test_evaluate_equals_an_independent_recomputation(one_epoch_run, restored):
  workdir, config, summary = one_epoch_run
  results = evaluate.evaluate(restored)
  assert set(results) == {'test'}  # tiny_config holds out no validation split.

  # Recompute from the raw checkpoint (no target state, no trainer code) and scikit-learn.
  checkpoints = checkpointing.RunCheckpoints(workdir, read_only=True)
  raw, _ = checkpoints.restore('latest')
  checkpoints.close()
  split = input_pipeline.load_split(config)
  model = experiment.build_model(config, split.info.num_classes)
  images = input_pipeline.normalize(split.test_images, split.info.mean, split.info.std)
  for network, prefix in (('student', ''), ('teacher', 'teacher_')):
    variables = {'params': raw[f'{prefix}params'], 'batch_stats': raw[f'{prefix}batch_stats']}
    logits, _, _ = models.apply_with_features(model.apply, variables, images, train=False)
    expected = sk_metrics.confusion_matrix(split.test_labels, np.argmax(logits, -1),
                                           labels=range(10))
    confusion = results['test'][network]
    np.testing.assert_array_equal(confusion, expected)
    np.testing.assert_array_equal(confusion.sum(axis=1), np.bincount(split.test_labels))
    accuracy = np.trace(confusion) / confusion.sum()
    assert eval_metrics.error_rate(confusion) == pytest.approx(1 - accuracy, abs=1e-12)
    assert 1 - accuracy == pytest.approx(summary[f'final/test/{network}_error'], abs=1e-6)
    np.testing.assert_allclose(eval_metrics.per_class_accuracy(confusion),
                               np.diag(confusion) / np.bincount(split.test_labels))


def test_evaluate_cli_prints_errors_and_confusion_tables(one_epoch_run):
  workdir, _, summary = one_epoch_run
  result = _cli('-m', 'lcmt_jax.evaluate', f'--workdir={workdir}', '--checkpoint=best')
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert f'teacher error {100 * summary["best/test/teacher_error"]:.2f}%' in out
  assert f'student error {100 * summary["best/test/student_error"]:.2f}%' in out
  assert out.count('true\\pred') == 2 and 'epoch 1' in out
  purity_rows = [line.split() for line in out.split('pair purity')[1].splitlines()
                 if line.startswith('test ')]
  assert [row[1] for row in purity_rows] == ['student', 'teacher']
  assert all(len(row) == 2 + len(eval_metrics.PURITY_QUANTILES) for row in purity_rows)


def test_evaluate_an_epoch_on_disk_and_name_the_ones_there(one_epoch_run, restored):
  by_epoch = evaluate.restore_run(one_epoch_run[0], '1')
  assert 'epoch 1' in by_epoch.description
  np.testing.assert_array_equal(evaluate.evaluate(by_epoch)['test']['teacher'],
                                evaluate.evaluate(restored)['test']['teacher'])
  with pytest.raises(evaluate.CheckpointNotFoundError,
                     match=r'has no checkpoint of epoch 7 \(.*which holds 1\)'):
    evaluate.restore_run(one_epoch_run[0], '7')
  with pytest.raises(evaluate.CheckpointNotFoundError, match='neither'):
    evaluate.restore_run(one_epoch_run[0], 'newest')


def test_nearest_pair_purity_is_that_of_each_network_s_features(restored):
  purity = evaluate.nearest_pair_purity(restored)['test']
  labels = restored.labels('test')
  for network in ('student', 'teacher'):
    features = restored.predict('test')[f'{network}_features']
    np.testing.assert_array_equal(purity[network], eval_metrics.purity_by_quantile(
        features, labels, lc_features=restored.config.lc_features))
  # The last column, every pair, is the base rate of the strided rows.
  rows = labels[::-(-len(labels) // 1000)]
  same = rows[:, None] == rows[None, :]
  base_rate = (same.sum() - len(rows)) / (len(rows) * (len(rows) - 1))
  np.testing.assert_allclose(purity['student'][-1], base_rate, rtol=1e-6)


def test_evaluate_torch_checkpoint_equals_the_exported_teacher(one_epoch_run, restored, tmp_path):
  torch = pytest.importorskip('torch')
  teacher = jax.device_get({'params': restored.state.teacher_params,
                            'batch_stats': restored.state.teacher_batch_stats})
  path = tmp_path / 'teacher.pth'
  torch.save({'state_dict': {k: torch.as_tensor(np.array(v)) for k, v in
                             torch_import.to_reference_state_dict(teacher).items()}}, path)
  imported = evaluate.import_torch_checkpoint(one_epoch_run[1], str(path))
  confusion = evaluate.evaluate(imported)['test']['model']
  np.testing.assert_array_equal(confusion, evaluate.evaluate(restored)['test']['teacher'])


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.makedirs, (self.marker,))


def _unreadable_torch_file(path, case):
  """A `.pth` file that is not a readable reference ConvLarge checkpoint."""
  torch = pytest.importorskip('torch')
  if case == 'bad':
    path.write_bytes(b'not a torch file')
  elif case == 'truncated':
    torch.save({'state_dict': {k: torch.zeros(8) for k in 'abcdefgh'}}, path)
    path.write_bytes(path.read_bytes()[:200])
  elif case == 'code':  # Loading it with a plain unpickler would create the marker file.
    torch.save({'state_dict': _RunsCode(str(path.parent / 'code_ran'))}, path)
  else:  # 'foreign': a readable checkpoint of another network.
    torch.save({'state_dict': {'fc.weight': torch.zeros(3, 3)}}, path)
  return path


@pytest.mark.parametrize('case, message', [
    ('missing_workdir', 'no such workdir'),
    ('no_checkpoint', 'has no best checkpoint'),
    ('bad_torch_file', 'cannot read'),
])
def test_evaluate_bad_input_exits_2_with_one_line(tmp_path, case, message):
  if case == 'bad_torch_file':
    path = _unreadable_torch_file(tmp_path / 'model.pth', 'bad')
    args = [f'--torch_checkpoint={path}', '--config=configs/quickstart.py']
  elif case == 'missing_workdir':
    args = [f'--workdir={tmp_path / "nope"}']
  elif case == 'no_checkpoint':
    (tmp_path / 'config.json').write_text(tiny_config().to_json())
    args = [f'--workdir={tmp_path}']
  before = helpers.directory_contents(tmp_path)
  result = _cli('-m', 'lcmt_jax.evaluate', *args)
  assert result.returncode == 2, result.stderr[-3000:]
  error_lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-3000:]
  assert helpers.directory_contents(tmp_path) == before


@pytest.mark.parametrize('case', ['truncated', 'foreign', 'code'])
def test_unreadable_torch_checkpoints_are_one_line_user_errors(tmp_path, case):
  # The command line turns these into `error: ...` and exit 2, as for the bad file above.
  path = _unreadable_torch_file(tmp_path / 'model.pth', case)
  before = helpers.directory_contents(tmp_path)
  with pytest.raises(evaluate.TorchCheckpointError, match='^cannot read ') as error:
    evaluate.import_torch_checkpoint(tiny_config(), str(path))
  assert '\n' not in str(error.value)
  assert helpers.directory_contents(tmp_path) == before  # No code ran: no marker appeared.


def test_plot_writes_png_files(one_epoch_run, tmp_path):
  workdir = one_epoch_run[0]
  other = tmp_path / 'other_run'  # A second run to overlay: the same curves, another label.
  other.mkdir()
  shutil.copy(os.path.join(workdir, 'metrics.jsonl'), other / 'metrics.jsonl')
  out = tmp_path / 'figures'
  paths = plot.make_figures([workdir], str(out), checkpoint='latest')
  paths.append(plot.plot_learning_curves([workdir, str(other)], str(out / 'overlaid.png')))
  assert [os.path.basename(p) for p in paths] == [
      'learning_curves.png', 'pca_mt_lc_seed0.png', 'overlaid.png']
  for path in paths:
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert 0 < os.path.getsize(path) < 200_000


def test_plot_draws_the_pair_purity_beside_its_base_rate(one_epoch_run):
  records = metrics_log.read_records(os.path.join(one_epoch_run[0], 'metrics.jsonl'))
  drawn = {(key, reference) for _, key, _, reference in plot.available_panels([records])}
  assert {('lc_purity_lu', 'lc_base_rate_lu'), ('lc_purity_uu', 'lc_base_rate_uu'),
          ('test/student_pair_purity', 'test/student_pair_base_rate')} <= drawn
  assert all(reference is None or any(reference in r for r in records)
             for _, reference in drawn)


def _distinct_pairs(features, labels, lc_features):
  """The oracle: `(distances, same class)` of every pair `i < j`, in float64, by a double loop."""
  features = features.astype(np.float64)
  if lc_features == 'normalized':
    features = features / np.linalg.norm(features, axis=1, keepdims=True) * np.sqrt(features.shape[1])
  n = len(features)
  pairs = [(np.mean((features[i] - features[j]) ** 2), labels[i] == labels[j])
           for i in range(n) for j in range(i + 1, n)]
  return tuple(np.asarray(x) for x in zip(*pairs))


@pytest.mark.parametrize('quantile, lc_features', [(0.0, 'raw'), (0.15, 'raw'),
                                                   (0.15, 'normalized')])
def test_eval_pair_purity_counts_the_pairs_inside_t(quantile, lc_features):
  """`eval_metrics.pair_purity` against counting the distinct pairs of a strided subsample."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, size=90)
  # Classes apart from each other, so the purity is well above the base rate.
  features = (rng.normal(size=(90, 5)) + 2.0 * np.eye(5)[labels]).astype(np.float32)
  config = tiny_config(lc_threshold_quantile=quantile, lc_features=lc_features,
                       lc_threshold=1.0)
  step_config = train_state.StepConfig.from_config(config, steps_per_epoch=10)
  got = jax.device_get(eval_metrics.pair_purity(jnp.asarray(features), jnp.asarray(labels),
                                                step_config=step_config, max_rows=30))
  distances, same = _distinct_pairs(features[::3], labels[::3], lc_features)
  threshold = np.quantile(distances, quantile) if quantile else 1.0
  inside = distances <= threshold
  np.testing.assert_allclose(got['pair_threshold'], threshold, rtol=1e-5)
  np.testing.assert_allclose(got['pairs_within'], inside.mean(), rtol=1e-6)
  np.testing.assert_allclose(got['pair_purity'], same[inside].mean(), rtol=1e-6)
  np.testing.assert_allclose(got['pair_base_rate'], same.mean(), rtol=1e-6)
  assert got['pair_purity'] > got['pair_base_rate'] + 0.1


@pytest.mark.parametrize('lc_features', ['raw', 'normalized'])
def test_purity_by_quantile_counts_the_nearest_pairs(lc_features):
  """`eval_metrics.purity_by_quantile` against counting the distinct pairs of a strided subsample."""
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, size=90)
  features = (rng.normal(size=(90, 5)) + 3.0 * np.eye(5)[labels]).astype(np.float32)
  quantiles = (0.01, 0.1, 0.5, 1.0)
  got = jax.device_get(eval_metrics.purity_by_quantile(
      jnp.asarray(features), jnp.asarray(labels), quantiles=quantiles, lc_features=lc_features,
      max_rows=45))
  distances, same = _distinct_pairs(features[::2], labels[::2], lc_features)
  expected = [same[distances <= np.quantile(distances, q)].mean() for q in quantiles]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert got[0] > got[-1] + 0.2  # Nearer pairs are purer for these clustered features.


def test_pca_projection_equals_scikit_learn_up_to_sign():
  from sklearn import decomposition  # pylint: disable=import-outside-toplevel
  features = np.random.default_rng(0).normal(size=(400, 6)) * np.array([10.0, 3, 1, .5, .2, .1])
  points = plot.project_pca(features)
  expected = decomposition.PCA(n_components=2).fit_transform(features)
  signs = np.sign(np.sum(points * expected, axis=0))
  np.testing.assert_allclose(points * signs, expected, atol=1e-8)


def _fake_run(root, name, dataset, method, seed, errors, config=None):
  workdir = root / name
  workdir.mkdir(parents=True)
  summary = {'dataset': dataset, 'method': method, 'seed': seed, 'epochs': 30, 'best_epoch': 25,
             'selection': 'test', 'train_seconds': 1.0}
  for key, value in zip([k for k, _ in report.COLUMNS], errors):
    summary[key] = value
  (workdir / 'summary.json').write_text(json.dumps(summary))
  if config is not None:
    config = {'dataset': dataset, 'method': method, 'seed': seed, **config}
    (workdir / 'config.json').write_text(json.dumps(config))


def _table_rows(text, first_column):
  return [[c.strip() for c in line.split('|')[1:-1]]
          for line in text.splitlines() if line.startswith(f'| {first_column}')]


def test_report_aggregates_seeds_to_mean_and_std(tmp_path):
  # final teacher 10% and 14%: mean 12, sample std sqrt(((10-12)^2 + (14-12)^2) / 1) = 2.83.
  # final student 20% and 20%: mean 20, std 0. best teacher 8% and 9%: 8.50 ± 0.71.
  # best student 30% and 33%: 31.50 ± 2.12.
  _fake_run(tmp_path / 'a', 'mt_seed0', 'digits', 'mt', 0, [0.10, 0.20, 0.08, 0.30])
  _fake_run(tmp_path / 'b' / 'deeper', 'mt_seed1', 'digits', 'mt', 1, [0.14, 0.20, 0.09, 0.33])
  _fake_run(tmp_path / 'a', 'sup_seed0', 'digits', 'supervised', 0, [0.5, 0.6, 0.4, 0.45])
  table = report.report([str(tmp_path / 'a'), str(tmp_path / 'b')])
  rows = {row[1]: row[2:] for row in _table_rows(table, 'digits')}
  assert rows['mt'] == ['–', '2 (0, 1)', '30', '12.00 ± 2.83', '20.00 ± 0.00', '8.50 ± 0.71',
                        '31.50 ± 2.12']
  assert rows['supervised'] == ['–', '1 (0)', '30', '50.00', '60.00', '40.00', '45.00']


def test_report_rows_by_setting_and_pairs_each_with_its_baseline(tmp_path):
  mt_lc = {'labeled_per_class': 400, 'consistency_weight': 100.0, 'lc_pull': 'teacher'}
  mt = {**mt_lc, 'lc_pull': 'student', 'lc_pair_weight': 'teacher_agreement'}
  for seed, (plain, weighted, baseline) in enumerate([(0.38, 0.42, 0.40), (0.47, 0.50, 0.50),
                                                      (0.44, 0.44, 0.45)]):
    # Where a run writes and its seed do not split rows; a config.json from before a key was
    # added reads with the key's old value ('none'), as seed 2 of the plain rule shows.
    plain_config = {**mt_lc, 'data_dir': f'/data{seed}', 'lc_pair_weight': 'none'}
    if seed == 2:
      del plain_config['lc_pair_weight']
    _fake_run(tmp_path, f'lc_seed{seed}', 'digits', 'mt_lc', seed, [plain] * 4, plain_config)
    _fake_run(tmp_path, f'weighted_seed{seed}', 'digits', 'mt_lc', seed, [weighted] * 4,
              {**mt_lc, 'lc_pair_weight': 'teacher_agreement'})
    # Mean Teacher reads no lc_ key: its rows are the baseline of both rules.
    _fake_run(tmp_path, f'mt_seed{seed}', 'digits', 'mt', seed, [baseline] * 4, mt)
  _fake_run(tmp_path, 'mt_200_seed0', 'digits', 'mt', 0, [0.6] * 4,
            {**mt, 'labeled_per_class': 200})
  # The supervised baseline reads neither lc_ nor consistency_ keys.
  _fake_run(tmp_path, 'supervised_seed0', 'digits', 'supervised', 0, [0.55] * 4,
            {**mt, 'consistency_weight': 0.0})
  text = report.report([str(tmp_path)], against='mt')
  table, paired = text.split('Test error in percent')
  assert [row[1:4] for row in _table_rows(table, 'digits')] == [
      ['mt_lc', 'labeled_per_class=400, lc_pair_weight=none', '3 (0, 1, 2)'],
      ['mt_lc', 'labeled_per_class=400, lc_pair_weight=teacher_agreement', '3 (0, 1, 2)'],
      ['mt', 'labeled_per_class=200', '1 (0)'],
      ['mt', 'labeled_per_class=400', '3 (0, 1, 2)'],
      ['supervised', 'labeled_per_class=400', '1 (0)']]
  # Differences -2, -3, -1 points: mean -2, std 1, t = -2 / (1 / sqrt 3); with two degrees
  # of freedom the two-sided p is 1 - |t| / sqrt(2 + t^2). Then +2, 0, -1: mean 1/3, std
  # sqrt(((5/3)^2 + (1/3)^2 + (4/3)^2) / 2) = sqrt(7/3).
  def p(t):
    return f'{1 - abs(t) / math.sqrt(2 + t * t):.3f}'

  t_plain, std = -2 * math.sqrt(3), math.sqrt(7 / 3)
  t_weighted = (1 / 3) / (std / math.sqrt(3))
  assert [row[3:] for row in _table_rows(paired, 'digits')] == [
      ['mt', '3 (0, 1, 2)', '-2.00 ± 1.00', '2.00', f'{t_plain:.2f}', p(t_plain), '3 of 3'],
      ['mt', '3 (0, 1, 2)', f'+0.33 ± {std:.2f}', f'{1 / 3 / std:.2f}', f'{t_weighted:.2f}',
       p(t_weighted), '1 of 3'],
      ['mt', '1 (0)', '+15.00', '–', '–', '–', '0 of 1']]


def test_report_refuses_to_pair_two_runs_of_one_seed(tmp_path):
  for name in ('a', 'b'):
    _fake_run(tmp_path, f'mt_lc_{name}', 'digits', 'mt_lc', 0, [0.4] * 4, {})
  _fake_run(tmp_path, 'mt', 'digits', 'mt', 0, [0.4] * 4, {})
  assert '2 (0, 0)' in report.report([str(tmp_path)])
  with pytest.raises(errors.UserInputError, match='two runs of seed 0 have the same settings'):
    report.report([str(tmp_path)], against='mt')


def test_report_falls_back_to_metrics_jsonl(one_epoch_run, tmp_path):
  workdir, _, summary = one_epoch_run
  copy = tmp_path / 'copy'
  copy.mkdir()
  for name in ('metrics.jsonl', 'config.json'):
    shutil.copy(os.path.join(workdir, name), copy / name)
  rebuilt = report.load_run(str(copy))
  assert not rebuilt.complete
  for key, _ in report.COLUMNS:
    assert rebuilt.summary[key] == pytest.approx(summary[key], abs=1e-12)


def test_report_cli_writes_the_table_and_rejects_a_missing_dir(one_epoch_run, tmp_path):
  out = tmp_path / 'table.md'
  result = _cli('-m', 'lcmt_jax.report', one_epoch_run[0], '--out', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  assert out.read_text() == result.stdout and '| digits | mt_lc | – | 1 (0) |' in result.stdout
  result = _cli('-m', 'lcmt_jax.report', one_epoch_run[0], '--against=mt')
  assert result.returncode == 0 and 'No row has a mt row of the same settings' in result.stdout
  result = _cli('-m', 'lcmt_jax.report', str(tmp_path / 'nope'))
  assert result.returncode == 2 and result.stderr.startswith('error: no such directory')
