"""SVHN (train split, not extra), 1,000 labels (or `labels=500`), Mean Teacher + Local Clustering."""

from configs import default

LABELS = (1000, 500)  # The paper's two SVHN settings; the first is the default.


def get_config(arg=None):
  args = default.parse_arguments(arg, LABELS)
  return default.scale_schedule(svhn_config(args), args.epochs)


def svhn_config(args: default.Arguments):
  """The SVHN MT+LC run at `args`' variant and label count, before any schedule scaling."""
  config = default.base_config(args.variant)
  config.dataset = 'svhn'
  config.labeled_per_class = 50 if args.labels == 500 else 100
  config.ema_decay = 0.995
  config.decay_start = 400.0
  config.decay_end = 600.0
  config.num_epochs = 600
  config.lc_start = 300.0
  config.lc_rampup = 50.0
  config.lc_weight = 20.0
  config.lc_threshold = 50.0  # The reference gives no other value for 500 labels.
  if config.validation_per_class:
    config.validation_per_class = 100
  return config
