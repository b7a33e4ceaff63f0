"""SVHN, 1,000 labels, Mean Teacher only (REFERENCE.md table, "MT only")."""

from configs import svhn


def get_config(variant=None):
  config = svhn.get_config(variant)
  config.method = 'mt'
  config.decay_start = 300
  config.decay_end = 500
  config.num_epochs = 500
  return config
