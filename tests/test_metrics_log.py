"""metrics.jsonl and the TensorBoard scalars beside it."""

import json
import os
import re
import subprocess
import sys

import pytest

from lcmt_jax import metrics_log
from lcmt_jax import report
from tests import helpers
from lcmt_jax.testing.runs import REPO

WRITE_SCRIPT = '''
import json, sys
from lcmt_jax import metrics_log
log = metrics_log.MetricsLog(sys.argv[1])
log.write(1, 'train', {'loss': 2.5, 'lc_within_uu': 0.125})
log.write(1, 'eval', {'test/teacher_accuracy': 0.75})
log.write(2, 'train', {'loss': 1.25, 'lc_within_uu': 0.5})
log.close()
print(json.dumps(sorted(m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules)))
'''


def test_scalars_equal_the_records_and_need_no_tensorflow(tmp_path):
  """Even where TensorFlow is installed, writing TensorBoard scalars does not import it (3 s)."""
  result = subprocess.run([sys.executable, '-c', WRITE_SCRIPT, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout) == []

  helpers.assert_scalars_hold_the_records(
      tmp_path, helpers.tensorboard_scalars(str(tmp_path / 'tensorboard')))


RECORDS = [{'epoch': 1, 'kind': 'train', 'loss': 2.5, 'wall_time': 10.0},
           {'epoch': 1, 'kind': 'eval', 'test/teacher_accuracy': 0.75, 'wall_time': 11.0},
           {'epoch': 2, 'kind': 'train', 'loss': 1.25, 'wall_time': 12.0}]
WHOLE = ''.join(json.dumps(r) + '\n' for r in RECORDS).encode()
NEXT = json.dumps({'epoch': 2, 'kind': 'eval', 'test/teacher_accuracy': 0.875,
                   'wall_time': 13.0}).encode()

# What a kill (or a crash of the machine) can leave after the last whole line.
TORN_TAILS = {
    'half a record': NEXT[:len(NEXT) // 2],
    'a record but its newline': NEXT,
    'a record cut inside a number': NEXT[:NEXT.index(b'0.875') + 3],
    'zeros': bytes(40),
    'half a record, then blank lines': NEXT[:20] + b'\n\n \n',
    'a line of JSON that is no record': b'[1, 2]\n',
    'bytes that are not UTF-8': b'{"epoch": 2, "kind": "\xff\xfe"}\n',
}


@pytest.mark.parametrize('tail', TORN_TAILS.values(), ids=TORN_TAILS.keys())
def test_a_torn_last_line_is_left_out_and_dropped_on_resume(tmp_path, tail):
  path = tmp_path / 'metrics.jsonl'
  path.write_bytes(WHOLE + tail)
  assert metrics_log.read_records(path) == RECORDS
  metrics_log.MetricsLog(str(tmp_path), resume_after_epoch=2, enabled=True)
  assert path.read_bytes() == WHOLE
  path.write_bytes(WHOLE + tail)
  metrics_log.MetricsLog(str(tmp_path), resume_after_epoch=1, enabled=True)
  assert path.read_bytes() == b''.join(WHOLE.splitlines(keepends=True)[:2])


@pytest.mark.parametrize('tail', TORN_TAILS.values(), ids=TORN_TAILS.keys())
def test_a_torn_line_before_others_is_an_error_that_names_it_and_changes_nothing(tmp_path, tail):
  path = tmp_path / 'metrics.jsonl'
  lines = WHOLE.splitlines(keepends=True)
  # A tail without its newline runs into the line after it; another line follows.
  damaged = b''.join(lines[:2]) + tail + lines[2] + NEXT + b'\n'
  path.write_bytes(damaged)
  message = f'{path} line 3 is not a metrics record'
  with pytest.raises(metrics_log.MetricsFileError, match=re.escape(message)) as error:
    metrics_log.read_records(path)
  assert '\n' not in str(error.value)
  with pytest.raises(metrics_log.MetricsFileError, match=re.escape(message)):
    metrics_log.MetricsLog(str(tmp_path), resume_after_epoch=1, enabled=True)
  assert path.read_bytes() == damaged


def test_report_reads_a_run_whose_last_line_is_torn(tmp_path):
  """A run still writing its metrics (or killed) is reported from its whole records."""
  (tmp_path / 'config.json').write_text(json.dumps(
      {'dataset': 'digits', 'method': 'mt_lc', 'seed': 3}))
  (tmp_path / 'metrics.jsonl').write_bytes(WHOLE + NEXT[:30])
  run = report.load_run(str(tmp_path))
  assert not run.complete
  assert run.summary['epochs'] == 2 and run.summary['best_epoch'] == 1
  assert run.summary['final/test/teacher_error'] == run.summary['best/test/teacher_error'] == 0.25


def test_write_summary_replaces_the_file_whole(tmp_path):
  path = tmp_path / 'summary.json'
  path.write_text('{"old": true}')
  metrics_log.MetricsLog(str(tmp_path)).write_summary({'epochs': 3, 'best_epoch': 2})
  assert json.loads(path.read_text()) == {'epochs': 3, 'best_epoch': 2}
  assert sorted(os.listdir(tmp_path)) == ['summary.json']
