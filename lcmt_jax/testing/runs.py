"""The tiny run of the tests and the kill soak, and the check that two runs ended alike."""

import os
import pathlib

import jax
import numpy as np

from lcmt_jax import checkpointing
from lcmt_jax import metrics_log

# The checkout's root: where `train.py` and `configs/` are.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# `configs/quickstart.py` made tiny: 16x16 digits (the network runs four times faster than at
# 32x32), width 8, two epochs of schedule with LC from the first.
TINY_SETTINGS = dict(
    image_size=16, width=8, labeled_batch_size=16, unlabeled_batch_size=128, eval_every_epochs=1,
    checkpoint_every_epochs=1, lc_start=1, lc_rampup=1, lc_weight=1.0, lc_threshold=2.0,
    decay_start=2, decay_end=3, progress_bar=False, eval_batch_size=250)
TINY_FLAGS = [f'--config.{k}={v}' for k, v in TINY_SETTINGS.items()]


def latest_state(workdir: str) -> tuple:
  """The latest checkpoint of `workdir` as host arrays, and its loop state."""
  checkpoints = checkpointing.RunCheckpoints(workdir, read_only=True)
  state, loop = checkpoints.restore('latest')
  checkpoints.close()
  return jax.device_get(state), loop


def assert_same_run(workdir_a: pathlib.Path, workdir_b: pathlib.Path, epochs: int,
                    unrecorded: tuple[str, ...] = ()) -> None:
  """Both runs ended at `epochs` with bitwise equal states, loop records and metrics.

  `unrecorded`: metrics that one run's records may lack and the other's hold.
  """
  state_a, loop_a = latest_state(str(workdir_a))
  state_b, loop_b = latest_state(str(workdir_b))
  assert loop_a.epoch == epochs
  assert loop_a.__class__(**{**vars(loop_b), 'train_seconds': loop_a.train_seconds}) == loop_a
  assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(a, b)
  without_speed = lambda records: [
      {k: v for k, v in r.items() if k not in ('images_per_second', 'wall_time', *unrecorded)}
      for r in records]
  assert without_speed(metrics_log.read_records(workdir_a / 'metrics.jsonl')) == (
      without_speed(metrics_log.read_records(workdir_b / 'metrics.jsonl')))
