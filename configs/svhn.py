"""SVHN (train split, not extra), 1,000 labels, Mean Teacher + Local Clustering."""

from configs import default


def get_config(variant=None):
  config = default.get_config(variant)
  config.dataset = 'svhn'
  config.labeled_per_class = 100
  config.ema_decay = 0.995
  config.decay_start = 400
  config.decay_end = 600
  config.num_epochs = 600
  config.lc_start = 300
  config.lc_rampup = 50
  config.lc_weight = 20.0
  config.lc_threshold = 50.0
  if config.validation_per_class:
    config.validation_per_class = 100
  return config
