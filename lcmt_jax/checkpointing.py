"""Orbax checkpoints of a run: the latest (for resuming) and the best (for reporting).

Each checkpoint holds the whole `TrainState` and a JSON record of the loop's
own state (epoch, best-so-far), so that resuming continues exactly. Orbax
writes into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint as the latest complete one.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from lcmt_jax import errors

KINDS = ('latest', 'best')


class CheckpointError(errors.UserInputError):
  """A checkpoint on disk cannot be read."""


class CheckpointMismatchError(CheckpointError):
  """A readable checkpoint whose arrays do not fit the train state this code builds."""


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """`{'params/conv1a/v': shape, ...}` for a train state or orbax's metadata of one."""
  def name(key):
    return str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))
  return {'/'.join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _structure_mismatch(stored: Any, target: Any) -> str | None:
  """The first difference between the stored arrays and the target's, or None."""
  stored, target = _leaf_shapes(stored), _leaf_shapes(target)
  for path in sorted(set(stored) | set(target)):
    if path not in stored:
      return f'{path} is not in the checkpoint'
    if path not in target:
      return f'the checkpoint has {path}, which this code does not build'
    if stored[path] != target[path]:
      return f'{path} has shape {stored[path]} there and {target[path]} here'
  return None


class RunCheckpoints:
  """`workdir/checkpoints/latest` (the newest checkpoint) and `best` (the two newest).

  `best` keeps the previous best too: a run killed after writing a new best but
  before the `latest` of that epoch resumes from the older `latest`, drops the
  newer best (`discard_after`) and still has the best its loop state names.
  """

  def __init__(self, workdir: str, read_only: bool = False):
    """`read_only` opens a run for inspection without touching it, even while it trains."""
    self._managers = {
        kind: ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), 'checkpoints', kind),
            # A save killed midway leaves only a temporary directory: the training
            # process removes it when it starts again.
            options=ocp.CheckpointManagerOptions(
                max_to_keep=2 if kind == 'best' else 1, create=not read_only,
                read_only=read_only,
                cleanup_tmp_directories=not read_only,
                # Both managers save the same epoch at once; in a multi-process run their
                # barriers, named after the epoch, would collide without a prefix.
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix=kind)),
            item_handlers={'state': ocp.StandardCheckpointHandler(),
                           'loop': ocp.JsonCheckpointHandler()})
        for kind in KINDS
    }

  def save(self, kind: str, epoch: int, state: Any, loop_state: dict) -> None:
    """Starts writing `state` and `loop_state` as checkpoint `epoch` of `kind` (asynchronously)."""
    self._managers[kind].save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop_state)))

  def discard_after(self, epoch: int) -> None:
    """Deletes checkpoints newer than `epoch`: those a killed run wrote after its last `latest`.

    The resumed run replays those epochs (deterministically) and saves them again.
    """
    for manager in self._managers.values():
      for newer in [e for e in manager.all_steps() if e > epoch]:
        manager.delete(newer)

  def latest_epoch(self, kind: str) -> int | None:
    return self._managers[kind].latest_step()

  def restore(self, kind: str, target_state: Any | None = None) -> tuple[Any, dict]:
    """The newest `kind` checkpoint: `(state, loop_state)`.

    With `target_state` the state comes back with its structure and
    shardings; without, as a nested dict of arrays on this process's first
    device (for inspection, also of a checkpoint a multi-host run wrote).
    """
    manager = self._managers[kind]
    epoch = manager.latest_step()
    path = manager.directory / str(epoch)
    try:
      stored = manager.item_metadata(epoch).state
      if not jax.tree.leaves(stored):  # Its array metadata is gone.
        raise ValueError('the checkpoint lists no arrays')
      if target_state is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                stored)
      else:
        mismatch = _structure_mismatch(stored, target_state)
        if mismatch:
          raise CheckpointMismatchError(
              f'checkpoint {path} holds a different train state than this code and config '
              f'build ({mismatch}): resume it with the code and config that wrote it, or use a '
              f'new --workdir')
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
      restored = manager.restore(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), loop=ocp.args.JsonRestore()))
    except CheckpointMismatchError:
      raise
    # Orbax and tensorstore report a damaged file as any of these (tensorstore's
    # DATA_LOSS is a ValueError, a torn JSON file a JSONDecodeError).
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
      raise CheckpointError(
          f'checkpoint {path} cannot be read ({type(e).__name__}: '
          f'{str(e).splitlines()[0] if str(e) else ""}); move it away to start that run over, '
          f'or use a new --workdir') from e
    return restored.state, restored.loop

  def wait_until_finished(self) -> None:
    for manager in self._managers.values():
      manager.wait_until_finished()

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()
