"""Multi-process training over `jax.distributed`: two CPU processes on localhost against one."""

import os
import socket
import subprocess
import sys

import jax
import pytest

from lcmt_jax import distributed
from lcmt_jax import errors
from tests import conftest
from lcmt_jax.testing.runs import REPO, TINY_FLAGS, assert_same_run


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  """Two processes of one CPU device each against one process with two devices.

  The global batch and its sharding over two devices are the same, so the
  compiled program is the same and the results are equal bit for bit. (One
  device against several agrees only to float32 round-off, which this tiny
  network's hard LC threshold amplifies within an epoch; see test_trainer.)
  """
  command = [sys.executable, 'train.py', '--config=configs/quickstart.py', *TINY_FLAGS,
             '--config.num_epochs=2']
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=conftest.subprocess_xla_flags())
  coordinator = f'localhost:{free_port()}'
  two = [subprocess.Popen([*command, f'--workdir={tmp_path / "two"}',
                           f'--coordinator_address={coordinator}', '--num_processes=2',
                           f'--process_id={i}'],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) for i in range(2)]
  one = subprocess.run([*command, f'--workdir={tmp_path / "one"}'], cwd=REPO,
                       env=dict(env, XLA_FLAGS=conftest.subprocess_xla_flags(
                           '--xla_force_host_platform_device_count=2')),
                       capture_output=True, text=True, timeout=600)
  outputs = [process.communicate(timeout=600) for process in two]
  for process, (_, stderr) in zip(two, outputs):
    assert process.returncode == 0, stderr[-3000:]
  assert one.returncode == 0, one.stderr[-3000:]

  # Only process 0 reports (gloo's own connection line aside).
  assert 'epoch 2:' in outputs[0][0] and 'Finished' in outputs[0][0]
  assert 'epoch' not in outputs[1][0] and 'Finished' not in outputs[1][0]
  assert_same_run(tmp_path / 'one', tmp_path / 'two', epochs=2)


def test_one_process_run_does_not_initialize(monkeypatch):
  for name in ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'SLURM_NTASKS'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a: pytest.fail('initialized'))
  distributed.initialize(None, None, None)
  distributed.initialize(None, 1, None)


@pytest.mark.parametrize('env, expected', [
    ({}, False),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}, False),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}, True),
    ({'JAX_COORDINATOR_ADDRESS': 'node1:1234'}, True),
])
def test_multi_process_environment_is_read_from_slurm_or_jax(monkeypatch, env, expected):
  for name in ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'SLURM_NTASKS'):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert distributed.multi_process_environment() == expected


def test_incomplete_flags_are_a_one_line_error(monkeypatch):
  for name in ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'SLURM_NTASKS'):
    monkeypatch.delenv(name, raising=False)
  # No process id, and nothing in the environment to read it from.
  with pytest.raises(errors.UserInputError, match='cannot join the multi-process run') as e:
    distributed.initialize('localhost:1', 2, None)
  assert '\n' not in str(e.value)
