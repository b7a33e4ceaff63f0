"""The training loop: many steps per compiled call, evaluation, checkpoints, metrics.

`train_and_evaluate` builds the run (`lcmt_jax.experiment`), resumes it from
its newest checkpoint if there is one (or branches it from another run's,
`lcmt_jax.branching`), and trains epoch by epoch: each epoch is one compiled
call (or `steps_per_call` steps per call; the calls before `lc_start` run a
program without the local-clustering term), followed by its metrics record,
an evaluation every `eval_every_epochs`, and a checkpoint every
`checkpoint_every_epochs`, at each new best and at the branch point. Over
several hosts every process runs the same loop; process 0 alone writes logs
and metrics, all write their shards of each checkpoint.
"""

import time
from typing import Any

import jax
import ml_collections
import numpy as np

from lcmt_jax import branching
from lcmt_jax import checkpointing
from lcmt_jax import configuration
from lcmt_jax import distributed
from lcmt_jax import errors
from lcmt_jax import eval_metrics
from lcmt_jax import experiment
from lcmt_jax import metrics_log
from lcmt_jax import train_state
from lcmt_jax import workdir as workdir_files


class TrainingDivergedError(errors.UserInputError):
  """A loss term became NaN or infinite; the checkpoints on disk are the last good ones."""


def _check_finite(metrics: dict[str, np.ndarray], first_step: int, last_good_epoch: int) -> None:
  """Stops the run at the first step with a non-finite metric, naming the step and the terms.

  The metrics include the norm of the updated parameters, so a step whose
  update diverges is caught before its parameters can be checkpointed.
  """
  bad_steps = {name: np.flatnonzero(~np.isfinite(values)) for name, values in metrics.items()}
  bad_steps = {name: steps[0] for name, steps in bad_steps.items() if steps.size}
  if not bad_steps:
    return
  step = min(bad_steps.values())
  terms = ', '.join(f'{name}={metrics[name][step]}' for name in sorted(bad_steps)
                    if bad_steps[name] == step)
  kept = (f'the checkpoints of epoch {last_good_epoch} and before are kept' if last_good_epoch
          else 'no checkpoint had been written')
  raise TrainingDivergedError(
      f'{terms} at step {first_step + step}: training stopped and {kept}; lower the learning '
      f'rate or the loss weights and start a new --workdir')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False,
                       branch_from: str | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run described by `config` in `workdir`; returns its summary.

  `branch_from`: a run whose checkpoint before `lc_start` starts this one, in
  a new `workdir` (`lcmt_jax.branching`). Every check of the input (config,
  workdir, data) comes before the first write to `workdir`, so bad input
  leaves it as it was.
  """
  mesh = experiment.make_mesh()
  configuration.validate(config, mesh.size)
  if branch_from is None:
    branch = None
    changed_keys = workdir_files.check_config(config, workdir, allow_config_change)
  else:
    branch = branching.check_branch(config, branch_from, workdir)
    changed_keys = []  # The branch writes the config.
  run = experiment.build(config, mesh)
  state, steps_per_epoch = run.state, run.step_config.steps_per_epoch
  if branch is not None:
    branching.write_branch(config, branch, workdir)

  lead = distributed.is_lead_process()
  branch_epoch = branching.branch_epoch(config)
  checkpoints = checkpointing.RunCheckpoints(workdir, keep_epoch=branch_epoch)
  loop = checkpointing.LoopState()
  if checkpoints.epoch_of('latest') is not None:
    state, loop = checkpoints.restore('latest', state)
  workdir_files.record_config(config, workdir, changed_keys)  # Once the checkpoint proved readable.
  workdir_files.record_split(config, workdir, run.split)
  log = metrics_log.MetricsLog(workdir, resume_after_epoch=loop.epoch, enabled=lead)

  steps_per_call = config.steps_per_call or steps_per_epoch
  progress = metrics_log.Progress(total_steps=config.num_epochs * steps_per_epoch,
                                  done_steps=loop.epoch * steps_per_epoch,
                                  show_bar=config.progress_bar, silent=not lead)
  if branch is not None:
    progress.print(f'Branching {workdir} from {branch.source} at epoch {branch.epoch}' + (
        f' with changed {", ".join(branch.changed)}.' if branch.changed else '.'))
  elif loop.epoch:
    progress.print(f'Resuming {workdir} from epoch {loop.epoch}' + (
        f' with changed {", ".join(changed_keys)}.' if changed_keys else '.'))

  # Saves still being written finish even when the run stops with an error, so the
  # checkpoints on disk are complete.
  try:
    for epoch in range(loop.epoch + 1, config.num_epochs + 1):
      epoch_start = time.perf_counter()
      step_metrics = []
      for start in range(0, steps_per_epoch, steps_per_call):
        num_steps = min(steps_per_call, steps_per_epoch - start)
        first_step = (epoch - 1) * steps_per_epoch + start
        call_start = time.perf_counter()
        state, metrics = run.train_fn(
            state, run.data, run.data_key, num_steps=num_steps,
            lc_active=train_state.lc_active_in(run.step_config, first_step, num_steps))
        metrics = jax.device_get(metrics)
        _check_finite(metrics, first_step=first_step, last_good_epoch=loop.epoch)
        step_metrics.append(metrics)
        progress.update(num_steps, time.perf_counter() - call_start, run.images_per_step, metrics)
      loop.train_seconds += time.perf_counter() - epoch_start
      record = {k: float(np.mean(np.concatenate([m[k] for m in step_metrics])))
                for k in step_metrics[0]}
      record['images_per_second'] = run.images_per_step * steps_per_epoch / (
          time.perf_counter() - epoch_start)
      log.write(epoch, 'train', record)

      new_best = False
      if epoch % config.eval_every_epochs == 0 or epoch == config.num_epochs:
        evaluation = eval_metrics.evaluate_splits(run.predict_fn, state, run.data, run.split,
                                                  run.step_config)
        log.write(epoch, 'eval', evaluation)
        progress.print(eval_metrics.format_evaluation(epoch, evaluation))
        selection = evaluation[f'{config.selection}/teacher_accuracy']
        new_best = selection > loop.best_selection_accuracy
        if new_best:
          loop.best_epoch, loop.best_selection_accuracy = epoch, selection
          loop.best_eval = evaluation
        loop.last_eval = evaluation
      loop.epoch = epoch
      if (new_best or epoch % config.checkpoint_every_epochs == 0
          or epoch in (branch_epoch, config.num_epochs)):
        checkpoints.save(epoch, state, loop, new_best)
  finally:
    checkpoints.wait_until_finished()
    checkpoints.close()
    progress.close()
    log.close()
  summary = metrics_log.run_summary(
      config, epochs=loop.epoch, best_epoch=loop.best_epoch, last_eval=loop.last_eval,
      best_eval=loop.best_eval, train_seconds=loop.train_seconds)
  log.write_summary(summary)
  if lead:
    print(metrics_log.format_summary(summary), flush=True)
  return summary
