"""CIFAR-10, 4,000 labels (or `labels=2000`), Mean Teacher only (REFERENCE.md table, "MT only").

The schedule [600, 800] is the one the reference's `config.py` gives Mean
Teacher in a comment; its released line uses [800, 1000] for both methods
(`--config.decay_start=800 --config.decay_end=1000 --config.num_epochs=1000`).
"""

from configs import default


def get_config(arg=None):
  args = default.parse_arguments(arg, default.CIFAR10_LABELS)
  config = default.cifar10_config(args)
  config.method = 'mt'
  config.decay_start = 600.0
  config.decay_end = 800.0
  config.num_epochs = 800
  return default.scale_schedule(config, args.epochs)
