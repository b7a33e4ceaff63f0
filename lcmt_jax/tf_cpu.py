"""TensorFlow for tfds and TensorBoard only, kept off the accelerators."""

import importlib.util
from typing import Any


def import_tensorflow() -> Any:
  """Imports TensorFlow with its GPUs hidden, so it never takes accelerator memory from JAX."""
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  return tf


def hide_gpus_if_installed() -> None:
  """Where TensorFlow is installed, tensorboard's writer imports it: keep it off the GPUs first."""
  if importlib.util.find_spec('tensorflow') is not None:
    import_tensorflow()
