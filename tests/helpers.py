"""Small helpers shared by several test modules."""

import json
import pathlib
import shutil

import numpy as np


def copy_of_data_dir(cifar10_dir, tmp_path: pathlib.Path):
  """A private copy of the `cifar10_dir` fixture's data_dir, to damage, and its version directory."""
  data_dir = tmp_path / 'tfds'
  shutil.copytree(cifar10_dir[0], data_dir)
  (version_dir,) = (data_dir / 'cifar10').iterdir()
  return data_dir, version_dir


def directory_contents(directory: pathlib.Path) -> dict:
  """Every path under `directory` with its bytes (None for a directory), to compare before and after."""
  return {p: p.read_bytes() if p.is_file() else None for p in sorted(directory.rglob('*'))}


def tensorboard_scalars(board: str) -> dict[str, list[list[float]]]:
  """Every scalar tag of a TensorBoard log directory, as `[[step, value], ...]`."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  from tensorboard.util import tensor_util  # pylint: disable=import-outside-toplevel
  accumulator = event_accumulator.EventAccumulator(board)
  accumulator.Reload()
  return {tag: [[e.step, float(tensor_util.make_ndarray(e.tensor_proto))]
                for e in accumulator.Tensors(tag)] for tag in accumulator.Tags()['tensors']}


def assert_scalars_hold_the_records(workdir: pathlib.Path, scalars: dict) -> None:
  """`scalars` are the values of `workdir/metrics.jsonl`: tag `kind/key`, step `epoch`."""
  want = {}
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    for key, value in record.items():
      if key not in ('epoch', 'kind', 'wall_time'):  # Record keys, not scalars.
        want.setdefault(f'{record["kind"]}/{key}', []).append([record['epoch'], value])
  assert scalars.keys() == want.keys()
  for tag, events in want.items():
    np.testing.assert_allclose(scalars[tag], events, rtol=1e-6)  # Written as float32.
