"""Train state and the pure, jit-compiled training and evaluation steps.

One step does what docs/reference.md "Mean Teacher" and "Losses" list: student and
teacher forward passes in train mode, cross-entropy + ramped consistency +
gated, ramped local clustering, an SGD step on the student, then the EMA
update of the teacher, which is kept as its own parameter pytree.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from lcmt_jax import losses
from lcmt_jax import models
from lcmt_jax import schedules

METHODS = ('mt_lc', 'mt', 'supervised')
TEACHER_INITS = ('independent', 'copy')  # Quirk 3: the reference's teacher is 'independent'.
WEIGHT_DECAY_PARAMS = ('all', 'kernels')  # Quirk 6: the reference decays 'all'.

class TrainState(train_state.TrainState):
  """Student (`params`, `opt_state` from the base class), teacher, both BN states, RNG.

  `rng` is a base key; each step derives its dropout keys from it and the
  step number, so a restored state continues with the same randomness.
  """

  batch_stats: Any
  teacher_params: Any
  teacher_batch_stats: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static hyper-parameters of `train_step` (hashable, so jit can specialise on them)."""

  steps_per_epoch: int
  schedule_granularity: str
  base_learning_rate: float
  lr_schedule: str  # 'linear' (the reference) | 'cosine'.
  decay_start: float
  decay_end: float
  consistency_weight: float
  consistency_rampup: float
  lc_weight: float  # 0 turns local clustering off (Mean Teacher only).
  lc_start: float
  lc_rampup: float
  lc_threshold: float
  lc_threshold_quantile: float  # 0: the fixed lc_threshold; else T from each batch.
  lc_features: str  # losses.LC_FEATURES: 'raw' (the reference) | 'normalized'.
  lc_pull: str  # losses.LC_PULLS: 'student' (the reference) | 'teacher'.
  lc_pair_weight: str  # losses.LC_PAIR_WEIGHTS: 'none' (the reference) | 'teacher_agreement'.
  ema_decay: float
  joint_forward: bool
  use_unlabeled: bool  # False for the supervised-only baseline.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, steps_per_epoch: int) -> 'StepConfig':
    semi_supervised = config.method != 'supervised'
    return cls(
        steps_per_epoch=steps_per_epoch,
        schedule_granularity=config.schedule_granularity,
        base_learning_rate=float(config.learning_rate),
        lr_schedule=config.lr_schedule,
        decay_start=float(config.decay_start),
        decay_end=float(config.decay_end),
        consistency_weight=float(config.consistency_weight) if semi_supervised else 0.0,
        consistency_rampup=float(config.consistency_rampup),
        lc_weight=float(config.lc_weight) if config.method == 'mt_lc' else 0.0,
        lc_start=float(config.lc_start),
        lc_rampup=float(config.lc_rampup),
        lc_threshold=float(config.lc_threshold),
        lc_threshold_quantile=float(config.lc_threshold_quantile),
        lc_features=config.lc_features,
        lc_pull=config.lc_pull,
        lc_pair_weight=config.lc_pair_weight,
        ema_decay=float(config.ema_decay),
        joint_forward=bool(config.joint_forward),
        use_unlabeled=semi_supervised,
    )

  def epoch(self, step: jax.Array) -> jax.Array:
    """The epoch number the schedules see at optimiser step `step`."""
    return schedules.schedule_epoch(step, self.steps_per_epoch, self.schedule_granularity)

  def learning_rate(self, step: jax.Array) -> jax.Array:
    """The learning rate of optimiser step `step`; also the optax schedule."""
    return schedules.learning_rate(self.lr_schedule, self.epoch(step), self.base_learning_rate,
                                   self.decay_start, self.decay_end)


def make_optimizer(config: ml_collections.ConfigDict, step_config: StepConfig) -> optax.GradientTransformation:
  """SGD with Nesterov momentum and PyTorch's coupled weight decay.

  `add_decayed_weights` before `sgd` makes the momentum buffer accumulate
  `grad + wd * param`, as `torch.optim.SGD(weight_decay=...)` does. The
  reference decays every parameter, `g` and `b` included (quirk 6);
  `weight_decay_params='kernels'` restricts it to the kernels (every
  parameter of more than one dimension: ConvLarge's directions `v`).
  """
  return _optimizer(step_config, float(config.weight_decay), config.weight_decay_params,
                    float(config.momentum), bool(config.nesterov))


@functools.cache
def _optimizer(step_config: StepConfig, weight_decay: float, weight_decay_params: str,
               momentum: float, nesterov: bool) -> optax.GradientTransformation:
  # Cached: equal settings give the same object, so states built for equal runs have the
  # same tree structure and share jit's cache entries (lcmt_jax/trainer.py).
  mask = None
  if weight_decay_params == 'kernels':
    mask = lambda params: jax.tree.map(lambda leaf: leaf.ndim > 1, params)
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=mask),
      optax.sgd(step_config.learning_rate, momentum=momentum, nesterov=nesterov),
  )


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       student_init_images: jax.Array, teacher_init_images: jax.Array,
                       teacher_init: str) -> TrainState:
  """Random init plus data-dependent init of the student and of the teacher.

  `teacher_init='independent'` gives the teacher its own random and
  data-dependent initialisation from its own batch, as the reference does
  (quirk 3); `'copy'` starts it as an exact copy of the student.
  """
  if teacher_init not in TEACHER_INITS:
    raise ValueError(f'teacher_init must be one of {TEACHER_INITS}, got {teacher_init!r}')
  student_key, teacher_key, student_ddi_key, teacher_ddi_key, rng = jax.random.split(key, 5)
  student = models.initialize(model, student_key, student_init_images, student_ddi_key)
  teacher = student
  if teacher_init == 'independent':
    teacher = models.initialize(model, teacher_key, teacher_init_images, teacher_ddi_key)
  return TrainState.create(
      apply_fn=model.apply, params=student['params'], tx=tx,
      batch_stats=student['batch_stats'], teacher_params=teacher['params'],
      teacher_batch_stats=teacher['batch_stats'], rng=rng)


def _forward_train(apply_fn, params, batch_stats, labeled, unlabeled, key, joint):
  """Train-mode forward of one network on the labelled and (optionally) unlabelled images.

  The reference runs two separate passes, so their batch means differ and the
  running mean is updated twice (quirk 5); `joint=True` runs one pass over the
  concatenation. Returns `((logits_l, feats_l), (logits_u, feats_u) | None, batch_stats)`.
  """
  labeled_key, unlabeled_key = jax.random.split(key)
  if unlabeled is None:
    logits, feats, batch_stats = models.apply_with_features(
        apply_fn, {'params': params, 'batch_stats': batch_stats}, labeled, train=True,
        dropout_key=labeled_key)
    return (logits, feats), None, batch_stats
  if joint:
    n = labeled.shape[0]
    logits, feats, batch_stats = models.apply_with_features(
        apply_fn, {'params': params, 'batch_stats': batch_stats},
        jnp.concatenate([labeled, unlabeled]), train=True, dropout_key=labeled_key)
    return (logits[:n], feats[:n]), (logits[n:], feats[n:]), batch_stats
  logits_l, feats_l, batch_stats = models.apply_with_features(
      apply_fn, {'params': params, 'batch_stats': batch_stats}, labeled, train=True,
      dropout_key=labeled_key)
  logits_u, feats_u, batch_stats = models.apply_with_features(
      apply_fn, {'params': params, 'batch_stats': batch_stats}, unlabeled, train=True,
      dropout_key=unlabeled_key)
  return (logits_l, feats_l), (logits_u, feats_u), batch_stats


def loss_weights(step: jax.Array, cfg: StepConfig) -> tuple[jax.Array, jax.Array]:
  """`(consistency weight, local-clustering weight)` at `step`, ramps included."""
  epoch = cfg.epoch(step)
  consistency = cfg.consistency_weight * schedules.sigmoid_rampup(epoch, cfg.consistency_rampup)
  lc = jnp.where(epoch >= cfg.lc_start,
                 cfg.lc_weight * schedules.sigmoid_rampup(epoch - cfg.lc_start, cfg.lc_rampup), 0.0)
  return consistency, lc


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def lc_active_in(cfg: StepConfig, first_step: int, num_steps: int) -> bool:
  """Whether a compiled call of steps `first_step ..` needs the LC term: `[t >= t_LC]`
  (docs/reference.md "Losses") at its last step, epochs only growing.

  Chosen on the host for each call (in NumPy: no device work), so a run
  compiles at most two programs (before LC, with LC) and the steps of neither
  branch on the device; a call that straddles `lc_start` computes the term, at
  weight 0 before it.
  """
  return bool(cfg.lc_weight) and float(cfg.epoch(first_step + num_steps - 1)) >= cfg.lc_start


def train_step(state: TrainState, batch: dict[str, jax.Array], cfg: StepConfig,
               lc_active: bool = True) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step of the student, then the teacher's EMA update.

  `batch` holds 'labeled_student', 'labeled_teacher', 'labels',
  'unlabeled_student', 'unlabeled_teacher' (two augmentations of each image)
  and, for the pair-purity diagnostic only, 'unlabeled_labels' (a batch
  without them, a benchmark's, gets no purity metrics). `lc_active` (static)
  False leaves the LC term out of the program, as the reference leaves it out
  before `lc_start` (`lc_active_in`): its metric 'lc_loss' is then 0.
  """
  student_key, teacher_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
  unlabeled_student = batch['unlabeled_student'] if cfg.use_unlabeled else None
  unlabeled_teacher = batch['unlabeled_teacher'] if cfg.use_unlabeled else None
  compute_lc = bool(cfg.lc_weight) and lc_active

  # The teacher is a target: its outputs carry no gradient (the student's
  # parameters never enter its computation), but its running means move.
  # Named scopes label the parts of a step in profiles (benchmarks/profile_summary.py).
  with jax.named_scope('teacher_forward'):
    (teacher_logits_l, _), teacher_u, teacher_batch_stats = _forward_train(
        state.apply_fn, state.teacher_params, state.teacher_batch_stats,
        batch['labeled_teacher'], unlabeled_teacher, teacher_key, cfg.joint_forward)
  consistency_weight, lc_weight = loss_weights(state.step, cfg)

  def loss_fn(params):
    (logits_l, feats_l), student_u, batch_stats = _forward_train(
        state.apply_fn, params, state.batch_stats, batch['labeled_student'], unlabeled_student,
        student_key, cfg.joint_forward)
    terms, pairs = {'ce_loss': losses.cross_entropy_loss(logits_l, batch['labels'])}, None
    if cfg.use_unlabeled:
      (logits_u, feats_u), (teacher_logits_u, _) = student_u, teacher_u
      terms['consistency_loss'] = losses.consistency_loss(
          logits_l, teacher_logits_l, logits_u, teacher_logits_u)
    if compute_lc:
      with jax.named_scope('local_clustering'):
        pairs = _lc_pairs(cfg, feats_l, feats_u, teacher_u, batch['labels'])
        terms['lc_loss'] = losses.lc_loss_of_distances(*pairs)
    elif cfg.lc_weight:
      terms['lc_loss'] = jnp.zeros((), jnp.float32)  # Both programs of a run log the same keys.
    total = (terms['ce_loss'] + consistency_weight * terms.get('consistency_loss', 0.0)
             + lc_weight * terms.get('lc_loss', 0.0))
    return total, (terms, logits_l, feats_l, student_u, batch_stats, pairs)

  learning_rate = cfg.learning_rate(state.step)
  with jax.named_scope('student'):
    (loss, (terms, logits_l, feats_l, student_u, batch_stats, pairs)), grads = (
        jax.value_and_grad(loss_fn, has_aux=True)(state.params))
  with jax.named_scope('optimizer'):
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  with jax.named_scope('ema_update'):
    state = state.replace(
        teacher_params=update_teacher(state.teacher_params, state.params, cfg.ema_decay),
        teacher_batch_stats=teacher_batch_stats)

  metrics = {
      **terms,
      'loss': loss,
      'consistency_weight': consistency_weight,
      'lc_weight': lc_weight,
      'learning_rate': learning_rate,
      # Of the updated student: the non-finite guard sees a diverged update in its own step.
      'param_norm': optax.tree.norm(state.params),
      'student_labeled_accuracy': _accuracy(logits_l, batch['labels']),
      'teacher_labeled_accuracy': _accuracy(teacher_logits_l, batch['labels']),
  }
  if cfg.use_unlabeled:
    with jax.named_scope('lc_diagnostics'):
      # The pairs inside T of the method's threshold, whether or not LC is on (Mean Teacher:
      # the config's T), from constants: nothing here reaches the loss.
      if pairs is None:
        pairs = _lc_pairs(cfg, *jax.lax.stop_gradient((feats_l, student_u[1], teacher_u)),
                          batch['labels'])
      metrics.update(lc_diagnostics(*jax.lax.stop_gradient(pairs), batch))
  return state, metrics


def _lc_pairs(cfg: StepConfig, feats_l: jax.Array, feats_u: jax.Array,
              teacher_u: tuple[jax.Array, jax.Array], labels: jax.Array,
              ) -> tuple[losses.LcPairs, jax.Array, losses.LcPairs | None]:
  """The LC term's pair distances, its threshold `T` and its pair weights (None: all 1).

  `teacher_u` is the teacher's `(logits, features)` of the unlabelled images.
  """
  teacher_logits_u, teacher_feats_u = teacher_u
  distances = losses.lc_distances(feats_l, feats_u, teacher_feats_u, features=cfg.lc_features,
                                  pull=cfg.lc_pull)
  if cfg.lc_pair_weight not in losses.LC_PAIR_WEIGHTS:
    raise ValueError(f'lc_pair_weight must be one of {losses.LC_PAIR_WEIGHTS}, '
                     f'got {cfg.lc_pair_weight!r}')
  weights = None
  if cfg.lc_pair_weight == 'teacher_agreement':
    weights = losses.teacher_agreement(labels, teacher_logits_u)
  return distances, jnp.asarray(lc_threshold(cfg, distances.uu), jnp.float32), weights


def lc_diagnostics(distances: losses.LcPairs, threshold: jax.Array,
                   weights: losses.LcPairs | None,
                   batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """T, the fractions of pairs inside it and, given the unlabelled images' true labels,
  its pair purity beside the base rate (`losses.pair_purity`).

  'lc_within_uu' counts the uu diagonal as the loss does; the purity and base
  rate leave it out (an image, or its teacher view, paired with itself). With
  pair `weights`, 'lc_weighted_purity_*' is the purity of the pull the loss
  applies: each pair inside `T` counted by its weight.
  """
  within_lu = losses.within_threshold(distances.lu, threshold)
  within_uu = losses.within_threshold(distances.uu, threshold)
  metrics = {'lc_threshold': threshold, 'lc_within_lu': jnp.mean(within_lu),
             'lc_within_uu': jnp.mean(within_uu)}
  if 'unlabeled_labels' in batch:
    labels_l, labels_u = batch['labels'], batch['unlabeled_labels']
    metrics['lc_purity_lu'], metrics['lc_base_rate_lu'] = losses.pair_purity(
        within_lu, labels_l, labels_u)
    metrics['lc_purity_uu'], metrics['lc_base_rate_uu'] = losses.pair_purity(
        within_uu, labels_u, labels_u, exclude_diagonal=True)
    if weights is not None:
      metrics['lc_weighted_purity_lu'], _ = losses.pair_purity(
          within_lu * weights.lu, labels_l, labels_u)
      metrics['lc_weighted_purity_uu'], _ = losses.pair_purity(
          within_uu * weights.uu, labels_u, labels_u, exclude_diagonal=True)
  return metrics


def lc_threshold(cfg: StepConfig, unlabeled_distances: jax.Array) -> float | jax.Array:
  """The fixed `T` (the reference), or the configured quantile of this batch's distances."""
  if cfg.lc_threshold_quantile:
    return losses.batch_threshold(unlabeled_distances, cfg.lc_threshold_quantile,
                                  symmetric=cfg.lc_pull == 'student')
  return cfg.lc_threshold


def update_teacher(teacher_params: Any, student_params: Any, decay: float) -> Any:
  """`teacher = decay * teacher + (1 - decay) * student`, leaf by leaf (no decay warm-up)."""
  return optax.incremental_update(student_params, teacher_params, step_size=1.0 - decay)


def eval_step(state: TrainState, images: jax.Array) -> dict[str, jax.Array]:
  """Eval-mode (running means, no dropout) logits and features of student and teacher."""
  student_logits, student_features, _ = models.apply_with_features(
      state.apply_fn, {'params': state.params, 'batch_stats': state.batch_stats}, images,
      train=False)
  teacher_logits, teacher_features, _ = models.apply_with_features(
      state.apply_fn, {'params': state.teacher_params, 'batch_stats': state.teacher_batch_stats},
      images, train=False)
  return {'student_logits': student_logits, 'teacher_logits': teacher_logits,
          'student_features': student_features, 'teacher_features': teacher_features}
