"""SVHN, 1,000 labels (or `labels=500`), Mean Teacher only, decay [300, 500].

The released `config.py` uses [400, 600]: `--config.decay_start=400
--config.decay_end=600 --config.num_epochs=600`.
"""

from configs import default
from configs import svhn


def get_config(arg=None):
  args = default.parse_arguments(arg, svhn.LABELS)
  config = default.mean_teacher_only(svhn.svhn_config(args), 300, 500)
  return default.scale_schedule(config, args.epochs)
