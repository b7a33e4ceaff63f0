"""CIFAR-10, 4,000 labels (or `labels=2000`), Mean Teacher only, decay [600, 800].

The released `config.py` uses [800, 1000]: `--config.decay_start=800
--config.decay_end=1000 --config.num_epochs=1000`.
"""

from configs import default


def get_config(arg=None):
  args = default.parse_arguments(arg, default.CIFAR10_LABELS)
  config = default.mean_teacher_only(default.cifar10_config(args), 600, 800)
  return default.scale_schedule(config, args.epochs)
