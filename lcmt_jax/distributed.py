"""Joining a multi-process (multi-host) run with `jax.distributed`.

A run spans several processes when flags say so (`--num_processes` and the
rest) or when the environment describes one: `JAX_COORDINATOR_ADDRESS`, or a
SLURM job step with more than one task, whose coordinator address, process
count and process id `jax.distributed.initialize` reads from SLURM's
variables. Every process then sees the global device mesh; the training code
is the same SPMD program as on one host.
"""

import os

import jax

from lcmt_jax import errors


def multi_process_environment() -> bool:
  """Whether the environment (not flags) describes a run of several processes."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  return 'SLURM_JOB_ID' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Connects this process to the others of its run; a no-op for a one-process run.

  Must run before anything touches a JAX device. Values not given are read
  from the environment by `jax.distributed.initialize` (SLURM, Open MPI, ...).
  """
  if (coordinator_address is None and num_processes in (None, 1) and process_id is None
      and not multi_process_environment()):
    return
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except (ValueError, TypeError, RuntimeError) as e:
    message = ' '.join(str(e).split())
    raise errors.UserInputError(
        f'cannot join the multi-process run ({message}); give --coordinator_address=HOST:PORT, '
        f'--num_processes and --process_id, or launch under SLURM with srun') from e


def is_lead_process() -> bool:
  """Process 0 alone writes logs, metrics and the config record; all write checkpoints."""
  return jax.process_index() == 0
