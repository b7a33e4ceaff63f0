"""metrics.jsonl and the TensorBoard scalars beside it."""

import json
import subprocess
import sys

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
