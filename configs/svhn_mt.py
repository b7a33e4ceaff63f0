"""SVHN, 1,000 labels (or `labels=500`), Mean Teacher only (REFERENCE.md table, "MT only").

The schedule [300, 500] is the one the reference's `config.py` gives Mean
Teacher in a comment; its released line uses [400, 600] for both methods
(`--config.decay_start=400 --config.decay_end=600 --config.num_epochs=600`).
"""

from configs import default
from configs import svhn


def get_config(arg=None):
  args = default.parse_arguments(arg, svhn.LABELS)
  config = svhn.svhn_config(args)
  config.method = 'mt'
  config.decay_start = 300.0
  config.decay_end = 500.0
  config.num_epochs = 500
  return default.scale_schedule(config, args.epochs)
