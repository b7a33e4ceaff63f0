"""metrics.jsonl and the TensorBoard scalars beside it."""

import json
import subprocess
import sys

import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from tests.test_trainer import REPO

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

  accumulator = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'))
  accumulator.Reload()
  scalars = {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
                   for e in accumulator.Tensors(tag)] for tag in accumulator.Tags()['tensors']}
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  want = {}
  for r in records:
    for key, value in r.items():
      if key not in ('epoch', 'kind', 'wall_time'):
        want.setdefault(f'{r["kind"]}/{key}', []).append((r['epoch'], value))
  assert scalars.keys() == want.keys()
  for tag, events in want.items():
    np.testing.assert_allclose(scalars[tag], events, rtol=1e-6)  # Written as float32.
