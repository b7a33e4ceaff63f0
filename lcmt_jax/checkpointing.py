"""Orbax checkpoints of a run: one manager keeps the latest (for resuming), the best, and the
one a branch starts from (`lcmt_jax.branching`).

Each checkpoint, named by its epoch, holds the whole `TrainState` and a JSON
record of the loop's own state (`LoopState`: epoch, best so far, last
evaluation), so a run resumes exactly from any of them. A checkpoint saved at a new best carries its
selection accuracy as an orbax metric; the manager's preservation policy keeps
the newest checkpoint and the best one and deletes the others once a save has
completed. Orbax writes into a temporary directory and renames it when
complete, so a run killed mid-save resumes from the previous complete one.
"""

import dataclasses
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from lcmt_jax import errors

KINDS = ('latest', 'best')


@dataclasses.dataclass
class LoopState:
  """What the training loop carries from epoch to epoch beside the train state.

  `best_*` describe the evaluation with the best teacher accuracy on the
  selection split so far (the checkpoint kept as 'best'); `last_eval` is the
  newest evaluation. Evaluations map metric names to values.
  """

  epoch: int = 0
  best_epoch: int = 0
  best_selection_accuracy: float = -1.0
  train_seconds: float = 0.0
  best_eval: dict[str, float] = dataclasses.field(default_factory=dict)
  last_eval: dict[str, float] = dataclasses.field(default_factory=dict)


class CheckpointError(errors.UserInputError):
  """A checkpoint on disk cannot be read."""


class CheckpointMismatchError(CheckpointError):
  """A readable checkpoint whose arrays do not fit the train state this code builds."""


def _plain_array(leaf: Any) -> Any:
  """A typed PRNG key as its key data (how orbax stores it); any other array as it is."""
  return jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """`{'params/conv1a/v': shape, ...}` for a train state or orbax's metadata of one."""
  def name(key):
    return str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))
  def shape(leaf):  # Orbax stores a typed PRNG key as its key data.
    return tuple(jax.eval_shape(_plain_array, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)).shape)
  return {'/'.join(name(k) for k in path): shape(leaf)
          for path, leaf in jax.tree.flatten_with_path(tree)[0]}


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


# The orbax metric of a checkpoint: the selection accuracy where it is a new best, else below
# any accuracy. New bests strictly increase, so the best-metric checkpoint is unique.
_METRIC = 'new_best_selection_accuracy'
_NOT_A_BEST = -1.0


def _metric(metrics: dict) -> float:
  return metrics[_METRIC]


def checkpoint_directory(workdir: str) -> str:
  """Where a run's checkpoints are: one subdirectory per epoch, named by it."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def copy_epochs(source_workdir: str, workdir: str, epochs: list[int]) -> None:
  """Copies the complete checkpoints of `epochs` from one run's workdir to another's."""
  for epoch in epochs:
    shutil.copytree(os.path.join(checkpoint_directory(source_workdir), str(epoch)),
                    os.path.join(checkpoint_directory(workdir), str(epoch)))


class RunCheckpoints:
  """`workdir/checkpoints/<epoch>`: the newest checkpoint and the best, under one manager.

  `keep_epoch`, where given, is kept too once saved: the branch point of the run.
  """

  def __init__(self, workdir: str, read_only: bool = False, keep_epoch: int | None = None):
    """`read_only` opens a run for inspection without touching it, even while it trains."""
    directory = checkpoint_directory(workdir)
    old = [kind for kind in KINDS if os.path.isdir(os.path.join(directory, kind))]
    if old:
      raise CheckpointError(
          f'{directory} holds checkpoints in the layout of lcmt_jax before one manager kept both '
          f'kinds ({" and ".join(old)}/): evaluate or resume that run with the version that '
          'wrote it, or use a new --workdir')
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            create=not read_only, read_only=read_only,
            # A save killed midway leaves only a temporary directory: the training
            # process removes it when it starts again.
            cleanup_tmp_directories=not read_only,
            best_fn=_metric, best_mode='max',
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy([
                ocp.checkpoint_managers.LatestN(n=1),
                ocp.checkpoint_managers.BestN(get_metric_fn=_metric, n=1),
                ocp.checkpoint_managers.CustomSteps(steps=[] if keep_epoch is None
                                                    else [keep_epoch]),
            ])),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'loop': ocp.JsonCheckpointHandler()})

  def save(self, epoch: int, state: Any, loop_state: LoopState, new_best: bool) -> None:
    """Starts writing `state` and `loop_state` as checkpoint `epoch` (asynchronously).

    `new_best`: the evaluation of this epoch is the best so far
    (`loop_state.best_selection_accuracy`).
    """
    metric = loop_state.best_selection_accuracy if new_best else _NOT_A_BEST
    # `asdict` copies: the JSON is written in the background, while the loop moves on.
    self._manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(dataclasses.asdict(loop_state))),
        metrics={_METRIC: metric})

  def epochs(self) -> list[int]:
    """The epochs of the complete checkpoints on disk, in order."""
    return sorted(self._manager.all_steps())

  def epoch_of(self, kind: str) -> int | None:
    """The epoch of the `kind` checkpoint ('latest', 'best', or an epoch number such as '11',
    the branch point), None where there is none."""
    if kind.isdigit():
      return int(kind) if int(kind) in self.epochs() else None
    if kind == 'latest':
      return self._manager.latest_step()
    best = self._manager.best_step()
    if best is None or self._manager.metrics(best)[_METRIC] == _NOT_A_BEST:
      return None  # Every checkpoint predates the first evaluation.
    return best

  def restore(self, kind: str, target_state: Any | None = None) -> tuple[Any, LoopState]:
    """The `kind` checkpoint: `(state, loop_state)`.

    With `target_state` the state comes back with its structure and
    shardings; without, as a nested dict of arrays on this process's first
    device (for inspection, also of a checkpoint a multi-host run wrote).
    """
    manager = self._manager
    epoch = self.epoch_of(kind)
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
      loop_state = LoopState(**restored.loop)
    except CheckpointMismatchError:
      raise
    # Orbax and tensorstore report a damaged file as any of these (tensorstore's
    # DATA_LOSS is a ValueError, a torn JSON file a JSONDecodeError).
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
      raise CheckpointError(
          f'checkpoint {path} cannot be read ({type(e).__name__}: '
          f'{str(e).splitlines()[0] if str(e) else ""}); move it away to start that run over, '
          f'or use a new --workdir') from e
    if target_state is None:  # Plain arrays throughout: a PRNG key as its key data.
      return jax.tree.map(_plain_array, restored.state), loop_state
    return restored.state, loop_state

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
