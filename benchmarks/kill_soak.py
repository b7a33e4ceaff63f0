"""Kills a small training run with SIGKILL at seeded random moments; checks it still ends exactly.

    python -m benchmarks.kill_soak [--kills 20] [--seed 0] [--epochs 8] [--workdir DIR]

The run is `configs/quickstart.py` at width 8 (the tests' `TINY_FLAGS`),
evaluating and checkpointing every epoch, with a persistent compilation cache.
It first trains once without a stop, timing its epochs, and times a start-up
(to the first epoch's record) with the cache filled. Then the same
command runs in a second workdir and is killed `--kills` times, each start
resuming the previous one from its last complete checkpoint:
- every third kill waits for orbax's temporary checkpoint directory to appear
  and kills then, while the checkpoint's arrays are being written;
- the others come at a moment drawn uniformly between the start and start-up
  plus one and a half epochs, so each start gets at most about one epoch
  further and the kills fall on start-up, steps, evaluations and saves alike.
Each kill prints when it came and what the run was doing. Then the run is
allowed to finish and compared with the uninterrupted one: train state
bitwise, loop state, metrics records (speeds aside) and the checkpoints kept.
Exit status 0 when they are all equal. Outside the test suite: it takes
minutes (BENCHMARKS.md gives a measured run).
"""

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from lcmt_jax.testing.runs import REPO, TINY_FLAGS, assert_same_run

_TMP_MARK = '.orbax-checkpoint-tmp'


def _command(epochs: int, workdir: str) -> list[str]:
  schedule = [f'--config.decay_start={epochs - 1}', f'--config.decay_end={epochs}',
              f'--config.num_epochs={epochs}']
  return [sys.executable, 'train.py', '--config=configs/quickstart.py', *TINY_FLAGS, *schedule,
          f'--workdir={workdir}']


def _start(command: list[str]) -> subprocess.Popen:
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)


def _environment(root: str) -> None:
  """Every start compiles the same programs: a persistent compilation cache keeps starts short."""
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(root, 'jax_cache'))
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')


def _records(workdir: str) -> int:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for line in f if '"kind": "train"' in line)


def _temporary_checkpoints(workdir: str) -> set[str]:
  directory = os.path.join(workdir, 'checkpoints')
  return {name for name in os.listdir(directory) if _TMP_MARK in name} if os.path.isdir(
      directory) else set()


def _uninterrupted(command: list[str], workdir: str) -> float:
  """Runs to the end; returns the seconds per epoch after the first."""
  process = _start(command)
  seen, first, last = 0, None, None
  while process.poll() is None:
    now = _records(workdir)
    if now > seen:
      seen, last = now, time.perf_counter()
      first = first or last
    time.sleep(0.02)
  if process.returncode != 0:
    sys.exit(f'the uninterrupted run failed with status {process.returncode}')
  return (last - first) / max(1, seen - 1)


def _startup_seconds(command: list[str], workdir: str) -> float:
  """Seconds from a start, compilation cache warm, to its first epoch's record."""
  start = time.perf_counter()
  process = _start(command)
  while process.poll() is None and not _records(workdir):
    time.sleep(0.02)
  process.kill()
  process.wait()
  return time.perf_counter() - start


def _wait_for_save(process: subprocess.Popen, workdir: str, leftover: set[str]) -> None:
  while process.poll() is None and not _temporary_checkpoints(workdir) - leftover:
    time.sleep(0.001)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--kills', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--epochs', type=int, default=8)
  parser.add_argument('--workdir', default='', help='where both runs go (default: a temporary folder)')
  args = parser.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix='kill_soak_')
  reference, soaked = os.path.join(root, 'uninterrupted'), os.path.join(root, 'killed')
  _environment(root)
  epoch_seconds = _uninterrupted(_command(args.epochs, reference), reference)
  startup = _startup_seconds(_command(args.epochs, os.path.join(root, 'timing')),
                             os.path.join(root, 'timing'))
  print(f'a start reaches its first epoch record in {startup:.1f} s (cache warm), then '
        f'{epoch_seconds:.1f} s per epoch; {args.kills} kills, seed {args.seed}', flush=True)

  rng = np.random.default_rng(args.seed)
  kills = during_saves = 0
  while kills < args.kills:
    before = _records(soaked)
    # A killed save leaves its temporary directory until the next start removes it.
    leftover = _temporary_checkpoints(soaked)
    process = _start(_command(args.epochs, soaked))
    start = time.perf_counter()
    if kills % 3 == 2:
      _wait_for_save(process, soaked, leftover)
      time.sleep(rng.uniform(0.0, 0.01))
    else:
      time.sleep(rng.uniform(0.0, startup + 1.5 * epoch_seconds))
    if process.poll() is not None:
      print(f'start {kills + 1}: the run finished before the kill', flush=True)
      break
    saving = bool(_temporary_checkpoints(soaked) - leftover)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kills += 1
    during_saves += saving
    doing = 'writing a checkpoint' if saving else (
        f'in epoch {_records(soaked) + 1}' if _records(soaked) > before else 'starting up or in '
        f'its first epoch ({before} epochs done before)')
    print(f'kill {kills:2d} after {time.perf_counter() - start:5.2f} s: {doing}', flush=True)

  final = subprocess.run(_command(args.epochs, soaked), cwd=REPO, capture_output=True, text=True,
                         check=False)
  if final.returncode != 0:
    print(final.stderr[-3000:])
    return 1
  assert_same_run(pathlib.Path(reference), pathlib.Path(soaked), epochs=args.epochs)
  kept = [sorted(os.listdir(os.path.join(d, 'checkpoints'))) for d in (reference, soaked)]
  assert kept[0] == kept[1], kept
  print(f'{kills} kills ({during_saves} while a checkpoint was written): the resumed run ends '
        f'bitwise equal to the uninterrupted one (state, loop, metrics, checkpoints {kept[0]})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
