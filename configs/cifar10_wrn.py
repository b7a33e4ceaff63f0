"""CIFAR-10, 4,000 labels (or `labels=2000`), MT+LC on WRN-28-2, under one of two recipes.

    python train.py --config=configs/cifar10_wrn.py:recipe=wrn,epochs=80 --workdir=...

`recipe=` picks how the network is trained; everything else (data, batches of
32 + 128, Mean Teacher's consistency weight and EMA, the local-clustering
term, `--config.method=mt|supervised` for the other rows) is the reference's,
as in configs/cifar10.py. Both recipes set WRN-28-2's own model keys: no
dropout, batch norm momentum 0.001 (the semi-supervised WRN code's 0.999 in
TensorFlow's convention).

| | `recipe=reference` (default) | `recipe=wrn` |
|---|---|---|
| optimiser | SGD, Nesterov momentum 0.9 | SGD, Nesterov momentum 0.9 |
| learning rate | 0.05 | 0.03 |
| weight decay | 1e-4 on every parameter (quirk 6) | 5e-4 on kernels only |
| schedule | constant, linear to 0 over epochs 800-1000 | cosine from the first step, `lr cos(7 pi p / 16)` |
| schedule moves | once per epoch (quirk 2) | every step |
| source | docs/reference.md "Optimiser and schedule" | FixMatch (Sohn et al. 2020) for WRN-28-2 on CIFAR-10 |

`epochs=N` compresses either schedule in proportion (`default.scale_schedule`);
`improved` switches the reference's quirks to their fixes (for `recipe=wrn` it
leaves the recipe's own optimiser settings alone).
"""

import ml_collections

from configs import default

RECIPES = ('reference', 'wrn')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = default.parse_arguments(arg, default.CIFAR10_LABELS, RECIPES)
  config = default.cifar10_config(args)
  config.model = 'wrn28_2'
  config.width = 128  # WRN-28-2: stem 16, groups 32, 64, 128; 1.47 M parameters.
  config.dropout_rate = 0.0
  config.bn_momentum = 0.001
  if args.recipe == 'wrn':
    config.learning_rate = 0.03
    config.weight_decay = 5e-4
    config.weight_decay_params = 'kernels'
    config.lr_schedule = 'cosine'
    config.decay_start = 0.0
    config.schedule_granularity = 'step'
  return default.scale_schedule(config, args.epochs)
