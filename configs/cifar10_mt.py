"""CIFAR-10, 4,000 labels, Mean Teacher only (REFERENCE.md table, "MT only")."""

from configs import default


def get_config(variant=None):
  config = default.get_config(variant)
  config.method = 'mt'
  config.decay_start = 600
  config.decay_end = 800
  config.num_epochs = 800
  return config
