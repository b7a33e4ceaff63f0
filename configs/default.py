"""Every knob of a run, at the reference's CIFAR-10 MT+LC values (docs/reference.md).

Other configs import this and change only what differs. Config files take
the big_vision-style argument of `--config=configs/X.py:ARG`, comma-separated
(`parse_arguments`):
- 'faithful' (default) reproduces every quirk of the reference; 'improved'
  switches each quirk listed in docs/reference.md "Quirks" to its fix;
- 'labels=N': one of the paper's label counts for the data set (CIFAR-10
  4000 or 2000, SVHN 1000 or 500), with the threshold the reference gives it;
- 'epochs=N': the whole schedule compressed (or stretched) in proportion
  (`scale_schedule`);
- 'recipe=NAME', in config files that offer several training recipes
  (configs/cifar10_wrn.py).
"""

from typing import NamedTuple

import ml_collections
from ml_collections import config_dict

VARIANTS = ('faithful', 'improved')
# Keys counted in epochs that scale with the length of the run.
SCHEDULE_KEYS = ('consistency_rampup', 'lc_start', 'lc_rampup', 'decay_start', 'decay_end')
INTERVAL_KEYS = ('eval_every_epochs', 'checkpoint_every_epochs')
CIFAR10_LABELS = (4000, 2000)  # The paper's two CIFAR-10 settings; the first is the default.


class Arguments(NamedTuple):
  variant: str
  labels: int | None  # None: the config file's own label count.
  epochs: int | None  # None: the config file's own schedule.
  recipe: str | None = None  # One of the config file's recipes; None where it offers none.


def parse_arguments(arg: str | None, label_counts: tuple[int, ...] = (),
                    recipes: tuple[str, ...] = ()) -> Arguments:
  """Parses 'improved,labels=2000,epochs=80'; `label_counts` are those the config file offers,
  `recipes` the names it takes as 'recipe=NAME' (the first is the default)."""
  parsed = {'variant': 'faithful', 'labels': None, 'epochs': None,
            'recipe': recipes[0] if recipes else None}
  for token in filter(None, (arg or '').split(',')):
    name, equals, value = token.partition('=')
    if not equals:
      if token not in VARIANTS:
        raise ValueError(f'unknown config argument {token!r}: use one of {VARIANTS}, '
                         'labels=N or epochs=N' + (', recipe=NAME' if recipes else '')
                         + ', separated by commas')
      parsed['variant'] = token
    elif name in ('labels', 'epochs') and value.isdigit() and int(value) > 0:
      parsed[name] = int(value)
    elif name == 'recipe' and recipes:
      if value not in recipes:
        raise ValueError(f'bad config argument {token!r}: recipe is one of {recipes}')
      parsed['recipe'] = value
    else:
      raise ValueError(f'bad config argument {token!r}: use labels=N or epochs=N with a '
                       'positive integer N' + (f', or recipe= one of {recipes}' if recipes else ''))
  if parsed['labels'] is not None and parsed['labels'] not in label_counts:
    raise ValueError(f'labels={parsed["labels"]} is not offered by this config (offered: '
                     f'{label_counts or "none"}); set --config.labeled_per_class for other counts')
  return Arguments(**parsed)


def scale_schedule(config: ml_collections.ConfigDict, epochs: int | None) -> ml_collections.ConfigDict:
  """Shortens (or stretches) the whole schedule to `epochs`, every part in proportion.

  Ramps, the LC start and the learning-rate decay keep their fractions of the
  run; evaluation and checkpoint intervals scale too (at least every epoch).
  A schedule other than the config's own moves its ramps per step, since
  its 5-epoch consistency ramp would otherwise be a single jump once it is
  shorter than a few epochs; `--config.schedule_granularity=epoch` after the
  argument restores the reference's per-epoch steps.
  """
  if epochs is None or epochs == config.num_epochs:
    return config
  # Multiplying first keeps decay_end == num_epochs exact.
  for key in SCHEDULE_KEYS:
    config[key] = config[key] * epochs / config.num_epochs
  for key in INTERVAL_KEYS:
    config[key] = max(1, round(config[key] * epochs / config.num_epochs))
  config.num_epochs = epochs
  config.schedule_granularity = 'step'
  return config


def mean_teacher_only(config: ml_collections.ConfigDict, decay_start: float,
                      decay_end: float) -> ml_collections.ConfigDict:
  """The table's "MT only" row of a data set: no LC term, and the schedule the
  reference's `config.py` gives Mean Teacher in a comment (its released line
  keeps the MT+LC schedule for both methods)."""
  config.method = 'mt'
  config.decay_start = float(decay_start)
  config.decay_end = float(decay_end)
  config.num_epochs = int(decay_end)
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """CIFAR-10, 4,000 labels (or `labels=2000`), MT+LC: the reference's main run."""
  args = parse_arguments(arg, CIFAR10_LABELS)
  return scale_schedule(cifar10_config(args), args.epochs)


def cifar10_config(args: Arguments) -> ml_collections.ConfigDict:
  """The CIFAR-10 MT+LC run at `args`' variant and label count, before any schedule scaling."""
  config = base_config(args.variant)
  if args.labels == 2000:
    config.labeled_per_class = 200  # 4% of each class.
    config.lc_threshold = 40.0  # The reference's value for 2,000 labels.
  return config


def base_config(variant: str = 'faithful') -> ml_collections.ConfigDict:
  """Every key at the reference's CIFAR-10 MT+LC value, with `variant`'s quirk switches."""
  config = ml_collections.ConfigDict()

  # Data (docs/reference.md "Data"; README "Data" lists each source's folder layout).
  config.dataset = 'cifar10'  # 'cifar10' | 'svhn' | 'image_folder' | 'digits' (embedded, offline).
  # cifar-10-batches-py/, SVHN's .mat files, train/ + test/ class folders, or a tfds
  # data_dir; '' means tfds's default (~/tensorflow_datasets).
  config.data_dir = ''
  config.cache_dir = ''  # Decoded image-folder cache; '' = data_dir/.lcmt_jax_cache.
  # Image folders: every image must be this many pixels square. The 8x8 digits are enlarged
  # to it (a multiple of 8); CIFAR-10 and SVHN are 32.
  config.image_size = 32
  config.random_flip = config_dict.placeholder(bool)  # None = the data set's (image folders: on).
  config.image_mean = ()  # Per channel, images in [0, 1]; () = the data set's (folders: computed).
  config.image_std = ()
  config.labeled_per_class = 400  # 8% of each CIFAR-10 class: 4,000 labels.
  config.validation_per_class = 0  # Held out of the training set; 0 = none.
  config.split_seed = 2
  config.labeled_batch_size = 32
  config.unlabeled_batch_size = 128

  # Model (docs/reference.md "Model").
  config.model = 'convlarge'  # A name in lcmt_jax.models.MODELS.
  # Size of the feature vector (ConvLarge: 3.1 M parameters; wrn28_2: 1.47 M, a multiple
  # of 8); tests use 8-16.
  config.width = 128
  config.dropout_rate = 0.5  # ConvLarge: before blocks 2 and 3; WRN: inside each block.
  config.bn_momentum = 0.001  # Weight of the batch's statistics in the running ones.
  config.compute_dtype = 'float32'  # 'bfloat16' computes in bf16; params stay float32.

  # Method and losses (docs/reference.md "Losses").
  config.method = 'mt_lc'  # 'mt_lc' | 'mt' (Mean Teacher only) | 'supervised' (labelled data only).
  config.consistency_weight = 100.0
  config.consistency_rampup = 5.0  # Epochs.
  config.ema_decay = 0.99
  config.lc_weight = 10.0
  config.lc_start = 600.0  # First epoch with the LC term (its ramp is 0 there).
  config.lc_rampup = 100.0
  config.lc_threshold = 50.0  # 40 for 2,000 labels (`labels=2000`).
  # Not in the reference: q in (0, 1) replaces the fixed T by the q-quantile of each
  # unlabelled batch's pairwise feature distances, a T that follows the features'
  # scale across widths; 0 keeps the fixed lc_threshold.
  config.lc_threshold_quantile = 0.0
  # Not in the reference, off by default ('raw', 'student' are the reference's LC):
  # 'normalized' computes LC on each feature vector scaled to unit length (times sqrt(width)),
  # so a pair's distance is that of unit vectors, in [0, 4], and T (fixed, or the batch
  # quantile) lives on that scale, which the network cannot shrink; 'raw' uses them as they are.
  config.lc_features = 'raw'
  # 'teacher' pulls each student feature toward the teacher's (constant) features of its
  # neighbours: pairs (student f_i, teacher f_j), the mask from their distances;
  # 'student' pairs the student's features among themselves.
  config.lc_pull = 'student'
  # 'teacher_agreement' weighs each pair inside T by the teacher's probability that its two
  # images share a class (p_j[y_i] for labelled i, p_i . p_j for unlabelled ones), so LC pulls
  # the pairs the teacher believes are one class; 'none' weighs them all 1.
  config.lc_pair_weight = 'none'

  # Optimiser (docs/reference.md "Optimiser and schedule").
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4
  # 'linear' (the reference): constant until decay_start, then linear to 0 at decay_end;
  # 'cosine' (FixMatch's, for WRN-28-2): lr * cos(7 pi p / 16) with p going 0 -> 1 from
  # decay_start to decay_end (lcmt_jax.schedules.cosine_decay_lr).
  config.lr_schedule = 'linear'
  config.decay_start = 800.0  # Epoch where the decay begins.
  config.decay_end = 1000.0  # Epoch where the decay ends (linear: the learning rate is 0).
  config.num_epochs = 1000  # The reference trains until decay_end.

  # Quirks of the reference (docs/reference.md "Quirks"), at their faithful values.
  config.selection = 'test'  # Checkpoint selection: 'test' (quirk 1) | 'validation'.
  config.schedule_granularity = 'epoch'  # Ramps and lr move per 'epoch' (quirk 2) | 'step'.
  config.teacher_init = 'independent'  # Quirk 3 | 'copy' of the student.
  config.joint_forward = False  # Separate labelled/unlabelled passes (quirk 5) | one pass.
  config.weight_decay_params = 'all'  # Decay g and b too (quirk 6) | 'kernels' (v only).

  # Loop, evaluation, checkpoints.
  config.seed = 0
  config.steps_per_call = 0  # Steps per compiled call (lax.scan); 0 = an epoch.
  config.eval_every_epochs = 5
  config.eval_batch_size = 500
  config.checkpoint_every_epochs = 5
  config.progress_bar = True

  return apply_variant(config, variant)


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Sets the quirk switches for `variant` ('faithful' keeps the reference's behaviour)."""
  if variant == 'improved':
    config.selection = 'validation'
    config.validation_per_class = 500
    config.schedule_granularity = 'step'
    config.teacher_init = 'copy'
    config.joint_forward = True
    config.weight_decay_params = 'kernels'
  return config
