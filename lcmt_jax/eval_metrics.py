"""Scores of an evaluation: accuracies, confusion matrices, the feature distances' scale,
the purity of the local-clustering threshold's pairs.

The training loop scores each evaluation with `evaluate_splits`;
`lcmt_jax.evaluate` reports confusion matrices and per-class accuracy.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lcmt_jax import input_pipeline
from lcmt_jax import losses
from lcmt_jax import train_state

SPLITS = ('test', 'validation')
NETWORKS = ('student', 'teacher')


def accuracies(predictions: dict[str, jax.Array], labels: np.ndarray) -> dict[str, float]:
  """`{'student_accuracy': ..., 'teacher_accuracy': ...}`: top-1 accuracy of each network."""
  predictions = jax.device_get({net: predictions[net] for net in NETWORKS})
  return {f'{net}_accuracy': float(np.mean(predictions[net] == labels)) for net in NETWORKS}


def evaluate_splits(predict_fn: Callable, state: train_state.TrainState,
                    data: dict[str, jax.Array], split: input_pipeline.SplitData,
                    step_config: train_state.StepConfig | None = None) -> dict[str, float]:
  """Student and teacher accuracy on the test set and, when there is one, the validation set.

  Also, on the validation set or on the test set where there is none, the
  quantiles of the student's pairwise feature distances (eval mode), the
  scale that the local-clustering threshold is set against, and, for a
  method with a threshold (`step_config` of 'mt_lc' or 'mt'), `pair_purity`.
  """
  result, diagnostics = {}, {}
  for name in SPLITS:
    labels = getattr(split, f'{name}_labels')
    if len(labels):
      predictions = predict_fn(state, data[f'{name}_images'])
      for key, value in accuracies(predictions, labels).items():
        result[f'{name}/{key}'] = value
      features = predictions['student_features']
      quantiles = jax.device_get(_distance_quantiles(features))
      diagnostics = {f'{name}/student_distance_q{round(100 * q):02d}': float(value)
                     for q, value in zip(losses.DISTANCE_QUANTILES, quantiles)}
      if step_config is not None and step_config.use_unlabeled:
        purity = jax.device_get(pair_purity(features, data[f'{name}_labels'],
                                            step_config=step_config))
        diagnostics.update({f'{name}/student_{key}': float(value)
                            for key, value in purity.items()})
  return {**result, **diagnostics}  # The validation set's, when there is one.


_distance_quantiles = jax.jit(losses.distance_quantiles)


def _lc_distances(features: jax.Array, labels: jax.Array, lc_features: str,
                  max_rows: int) -> tuple[jax.Array, jax.Array]:
  """The LC term's view of held-out features: `(distances, labels)` of (at most `max_rows`)
  rows taken by `losses.strided_rows`, as `distance_quantiles` takes them, the features as
  `lc_features` makes them."""
  features = losses.strided_rows(features, max_rows)
  if lc_features == 'normalized':
    features = losses.unit_scaled(features)
  return (losses.pairwise_mean_squared_distances(features, features),
          losses.strided_rows(labels, max_rows))


@functools.partial(jax.jit, static_argnames=('step_config', 'max_rows'))
def pair_purity(features: jax.Array, labels: jax.Array, *, step_config: train_state.StepConfig,
                max_rows: int = 1000) -> dict[str, jax.Array]:
  """The LC threshold's pairs among eval-mode features: `{'pair_threshold', 'pairs_within',
  'pair_purity', 'pair_base_rate'}` over the distinct pairs of (at most `max_rows`) images.

  As the training step's diagnostic (`train_state.lc_diagnostics`), on held-out
  images: `T` fixed or the configured quantile of these pairs' distances; the
  pairs `i == j` are left out. `lc_pull='teacher'` is measured on the
  student's features alone.
  """
  distances, labels = _lc_distances(features, labels, step_config.lc_features, max_rows)
  threshold = jnp.asarray(step_config.lc_threshold, jnp.float32)
  if step_config.lc_threshold_quantile:
    threshold = losses.batch_threshold(distances, step_config.lc_threshold_quantile)
  within = losses.within_threshold(distances, threshold)
  purity, base_rate = losses.pair_purity(within, labels, labels, exclude_diagonal=True)
  n = distances.shape[0]
  return {'pair_threshold': threshold,
          'pairs_within': (jnp.sum(within) - jnp.trace(within)) / (n * (n - 1)),
          'pair_purity': purity, 'pair_base_rate': base_rate}


# Shares of the nearest distinct pairs that `purity_by_quantile` reports; 1.0 is every pair.
PURITY_QUANTILES = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


@functools.partial(jax.jit, static_argnames=('quantiles', 'lc_features', 'max_rows'))
def purity_by_quantile(features: jax.Array, labels: jax.Array, *,
                       quantiles: tuple[float, ...] = PURITY_QUANTILES, lc_features: str = 'raw',
                       max_rows: int = 1000) -> jax.Array:
  """The pair purity of a threshold at each quantile `q` of the distinct pairs' distances.

  Which threshold, if any, would make LC pull mostly pairs of one class: the
  share of pairs of one class among the nearest `q` of all distinct pairs of
  (at most `max_rows`) held-out images, as `pair_purity` counts it for the
  configured `T`. At `q = 1` it is the base rate; features that order the
  images by class give a purity that rises toward 1 as `q` falls.
  """
  distances, labels = _lc_distances(features, labels, lc_features, max_rows)
  def purity_at(quantile):
    within = losses.within_threshold(distances, losses.batch_threshold(distances, quantile))
    return losses.pair_purity(within, labels, labels, exclude_diagonal=True)[0]
  return jax.lax.map(purity_at, jnp.asarray(quantiles, jnp.float32))


def format_evaluation(epoch: int, evaluation: dict[str, float]) -> str:
  """One line: every error in percent, the median feature distance, the pair purity."""
  parts = [f'{k.replace("_accuracy", "")} error {100 * (1 - v):.2f}%'
           for k, v in evaluation.items() if k.endswith('_accuracy')]
  parts += [f'{k.replace("_q50", "")} median {v:.3g}' for k, v in evaluation.items()
            if k.endswith('distance_q50')]
  parts += [f'{k} {v:.3f} (base rate {evaluation[k.replace("purity", "base_rate")]:.3f})'
            for k, v in evaluation.items() if k.endswith('pair_purity')]
  return f'epoch {epoch}: ' + ', '.join(parts)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """`counts[true, predicted]`, int64."""
  flat = np.asarray(labels, np.int64) * num_classes + np.asarray(predictions, np.int64)
  return np.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def error_rate(confusion: np.ndarray) -> float:
  """`1 - trace / total`: the top-1 error."""
  return 1.0 - float(np.trace(confusion)) / float(confusion.sum())


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
  """The recall of each class: the diagonal over the row sums (NaN for an absent class)."""
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.diag(confusion) / confusion.sum(axis=1)
