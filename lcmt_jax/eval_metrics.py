"""Scores of an evaluation: accuracies, confusion matrices, the feature distances' scale.

The training loop scores each evaluation with `evaluate_splits`;
`lcmt_jax.evaluate` reports confusion matrices and per-class accuracy.
"""

from collections.abc import Callable

import jax
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
                    data: dict[str, jax.Array],
                    split: input_pipeline.SplitData) -> dict[str, float]:
  """Student and teacher accuracy on the test set and, when there is one, the validation set.

  Also the quantiles of the student's pairwise feature distances (eval mode)
  on the validation set, or on the test set where there is none: the scale
  that the local-clustering threshold is set against.
  """
  result, distances = {}, {}
  for name in SPLITS:
    labels = getattr(split, f'{name}_labels')
    if len(labels):
      predictions = predict_fn(state, data[f'{name}_images'])
      for key, value in accuracies(predictions, labels).items():
        result[f'{name}/{key}'] = value
      quantiles = jax.device_get(_distance_quantiles(predictions['student_features']))
      distances = {f'{name}/student_distance_q{round(100 * q):02d}': float(value)
                   for q, value in zip(losses.DISTANCE_QUANTILES, quantiles)}
  return {**result, **distances}  # The validation set's distances, when there is one.


_distance_quantiles = jax.jit(losses.distance_quantiles)


def format_evaluation(epoch: int, evaluation: dict[str, float]) -> str:
  """One line: every error in percent and the median feature distance."""
  parts = [f'{k.replace("_accuracy", "")} error {100 * (1 - v):.2f}%'
           for k, v in evaluation.items() if k.endswith('_accuracy')]
  parts += [f'{k.replace("_q50", "")} median {v:.3g}' for k, v in evaluation.items()
            if k.endswith('distance_q50')]
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
