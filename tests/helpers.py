"""Small helpers shared by several test modules."""

import contextlib
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
from typing import Callable

import jax
import numpy as np

from lcmt_jax.testing.runs import REPO


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


def load_in_children(module: str, paths: list[str], per_child: int) -> dict[str, dict]:
  """`{path: result}` of `tests.<module>._load_each(paths)`, run in child processes.

  `_load_each` prints `<stage> <i>` as it starts each stage of file `i` (`start`
  first) and the file's result as one JSON line (`{'i': i, ...}`) after it. A
  child that dies in a stage records the death in that file's result (the
  result `{'crash': 'exit status N'}` at `start`, `result[stage]` later), and
  the next child goes on after that file: a crash is attributed, not fatal.
  """
  results, begin = {}, 0
  while begin < len(paths):
    chunk = paths[begin:begin + per_child]
    child = subprocess.run(
        [sys.executable, '-c', f'import sys; from tests import {module} as t; '
         't._load_each(sys.argv[1:])', *chunk], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, 'OPENBLAS_NUM_THREADS': '1'}, check=False)
    stage = started = None
    for line in child.stdout.splitlines():
      if line.startswith('{'):
        result = json.loads(line)
        results[chunk[result['i']]] = result
        stage = None
      else:
        stage, started = line.split()[0], int(line.split()[1])
    if not child.returncode:
      begin += len(chunk)
      continue
    assert stage is not None, child.stderr[-2000:]  # A death between files: a bug here.
    crash = f'exit status {child.returncode}'
    if stage == 'start':
      results[chunk[started]] = {'crash': crash, 'stderr': child.stderr[-500:]}
    else:
      results[chunk[started]][stage] = crash
    begin += started + 1
  return results


def write_numbered(directory: pathlib.Path, blobs) -> list[str]:
  """Writes each of `blobs` (bytes) to `directory/00000`, `00001`, ...; returns the paths."""
  paths = []
  for i, raw in enumerate(blobs):
    paths.append(str(directory / f'{i:05d}'))
    pathlib.Path(paths[-1]).write_bytes(raw)
  return paths


@contextlib.contextmanager
def lowered_programs():
  """The names of the jitted functions JAX lowers inside the block, one per program (cache
  misses of the in-memory cache; a persistent-cache hit is lowered too), from JAX's public
  monitoring events."""
  names = []

  def listener(event: str, duration: float, **kwargs) -> None:
    del duration
    if event == '/jax/core/compile/jaxpr_to_mlir_module_duration':
      names.append(kwargs.get('fun_name'))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def damage_bytes(raw: bytearray, kind: int, position: Callable[[], int],
                 rng: np.random.RandomState) -> None:
  """A fuzz mutation of 1 to 3 bytes at `position()`: kind 0 flips a bit, kind 1 sets the byte
  to an edge value (each draws from `rng` in the order the fuzz tests' counts were taken)."""
  for _ in range(rng.randint(1, 4)):
    if kind == 0:
      raw[position()] ^= 1 << rng.randint(8)
    else:
      raw[position()] = rng.choice([0, 1, 0x7f, 0x80, 0xff, rng.randint(256)])


def cap_address_space(paths: list[str]) -> None:
  """Caps this process's address space at its size now plus 16 MiB and 32 times the largest of
  `paths`: a fuzz child's reader that allocates beyond a few times a file's size fails there."""
  with open('/proc/self/status') as f:
    vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmSize'))
  limit = vm_size + (16 << 20) + 32 * max(os.path.getsize(p) for p in paths)
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
