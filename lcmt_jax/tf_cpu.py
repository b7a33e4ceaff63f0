"""TensorFlow for tfds only, kept off the accelerators."""

from typing import Any


def import_tensorflow() -> Any:
  """Imports TensorFlow with its GPUs hidden, so it never takes accelerator memory from JAX."""
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  return tf
