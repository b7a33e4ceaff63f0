"""Data: the labelled/unlabelled split, on-device augmentation and batches.

docs/reference.md "Data" is the spec; `data_sources` reads the files. Images stay
uint8 on the host and on the accelerator; `sample_batch` picks, augments
(twice: student and teacher view) and normalises a step's batch inside the
jitted training step, as a pure function of an RNG key and the step number.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lcmt_jax import data_sources
from lcmt_jax import errors

_CROP_PADDING = 2


class DataRequestError(errors.UserInputError, ValueError):
  """A split or batch larger than the data allows."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a data set (docs/reference.md "Data"), as the on-device pipeline needs them."""

  name: str
  num_classes: int
  mean: tuple[float, float, float]  # Per channel, of images scaled to [0, 1].
  std: tuple[float, float, float]
  random_flip: bool


DATASETS: dict[str, DatasetInfo] = {
    'cifar10': DatasetInfo(
        'cifar10', 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True
    ),
    'svhn': DatasetInfo(
        'svhn', 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False
    ),
    # Mean and std of the 1,297 training images of `data_sources`' digits, images
    # scaled to [0, 1], rounded to 4 places (the test suite recomputes them).
    'digits': DatasetInfo('digits', 10, (0.3053,) * 3, (0.3758,) * 3, False),
}


@dataclasses.dataclass(frozen=True)
class SplitData:
  """Host-side arrays of one split: images uint8 (N, H, W, 3), labels int32.

  The unlabelled labels are kept for diagnostics only; the validation arrays
  are empty unless a validation split was asked for. The index arrays point
  into the training set in the source's order (`data_sources`).
  """

  info: DatasetInfo
  source: str
  class_names: tuple[str, ...]
  num_train: int
  labeled_indices: np.ndarray
  validation_indices: np.ndarray
  labeled_images: np.ndarray
  labeled_labels: np.ndarray
  unlabeled_images: np.ndarray
  unlabeled_labels: np.ndarray
  validation_images: np.ndarray
  validation_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def dataset_info(config: Any, data: data_sources.TrainTest) -> DatasetInfo:
  """The run's `DatasetInfo`: the reference's constants, overridden by the config's keys.

  An image folder's normalisation comes from its training images unless
  `config.image_mean` / `config.image_std` give it; its flip is on unless
  `config.random_flip` says otherwise.
  """
  known = DATASETS.get(config.dataset)
  if known is None:
    pixels = data.train_images.reshape(-1, data.train_images.shape[-1])
    mean, std = channel_statistics(pixels)
    known = DatasetInfo(config.dataset, len(data.class_names), mean, std, True)
  flip = known.random_flip if config.random_flip is None else bool(config.random_flip)
  return DatasetInfo(known.name, known.num_classes,
                     tuple(config.image_mean) or known.mean, tuple(config.image_std) or known.std,
                     flip)


def channel_statistics(pixels: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of uint8 `pixels` (P, C) scaled to [0, 1], in float64 chunks."""
  count = len(pixels)
  sums = np.zeros(pixels.shape[-1])
  squares = np.zeros(pixels.shape[-1])
  for chunk in np.array_split(pixels, max(1, count // 1_000_000)):
    chunk = chunk.astype(np.float64) / 255.0
    sums += chunk.sum(axis=0)
    squares += (chunk**2).sum(axis=0)
  mean = sums / count
  std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
  return tuple(map(float, mean)), tuple(map(float, std))


def split_indices(
    labels: np.ndarray,
    num_classes: int,
    labeled_per_class: int,
    validation_per_class: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns sorted `(labeled_idx, unlabeled_idx, validation_idx)` into `labels`.

  The labelled draw is the reference's (docs/reference.md "Data"): NumPy's legacy
  RNG seeded once with `seed`, then `choice(class_indices, k, replace=False)`
  per class in sorted order. `RandomState(seed)` draws exactly what
  `np.random.seed(seed)` does, without touching the global RNG. The optional
  validation draw (docs/reference.md "Quirks" 1) comes after it from the class's
  remaining indices with its own RNG, so it never changes the labelled set.
  Unlabelled is every index in neither.
  """
  if labeled_per_class < 1 or validation_per_class < 0:
    raise DataRequestError(
        f'labeled_per_class={labeled_per_class} and validation_per_class='
        f'{validation_per_class}: need at least 1 label per class and a '
        'validation size of 0 (none) or more.'
    )
  class_indices = [np.flatnonzero(labels == c) for c in range(num_classes)]
  for c, indices in enumerate(class_indices):
    if labeled_per_class + validation_per_class > len(indices):
      raise DataRequestError(
          f'Class {c} has {len(indices)} training examples but '
          f'{labeled_per_class} labelled + {validation_per_class} validation '
          'were asked for: lower labeled_per_class or validation_per_class.'
      )

  labeled_rng = np.random.RandomState(seed)
  labeled = [
      labeled_rng.choice(indices, labeled_per_class, replace=False) for indices in class_indices
  ]
  validation_rng = np.random.RandomState(seed + 1)
  validation = [
      validation_rng.choice(np.setdiff1d(indices, taken), validation_per_class, replace=False)
      for indices, taken in zip(class_indices, labeled)
  ]
  labeled_idx = np.sort(np.concatenate(labeled))
  validation_idx = np.sort(np.concatenate(validation))
  unlabeled_idx = np.setdiff1d(np.arange(len(labels)), np.union1d(labeled_idx, validation_idx))
  return labeled_idx, unlabeled_idx, validation_idx


def load_split(config: Any) -> SplitData:
  """Loads `config.dataset` and splits its training set as `split_indices` does.

  Uses `config.dataset`, `data_dir`, `image_size`, `cache_dir`, `labeled_per_class`,
  `validation_per_class` (0 for none), `split_seed`, `random_flip`, `image_mean`
  and `image_std`.
  """
  data = data_sources.load(config.dataset, config.data_dir, image_size=config.image_size,
                           cache_dir=config.cache_dir)
  info = dataset_info(config, data)
  labeled, unlabeled, validation = split_indices(
      data.train_labels,
      info.num_classes,
      config.labeled_per_class,
      config.validation_per_class,
      config.split_seed,
  )
  train_images, train_labels = data.train_images, data.train_labels
  return SplitData(
      info=info,
      source=data.source,
      class_names=data.class_names,
      num_train=len(train_labels),
      labeled_indices=labeled,
      validation_indices=validation,
      labeled_images=train_images[labeled],
      labeled_labels=train_labels[labeled],
      unlabeled_images=train_images[unlabeled],
      unlabeled_labels=train_labels[unlabeled],
      validation_images=train_images[validation],
      validation_labels=train_labels[validation],
      test_images=data.test_images,
      test_labels=data.test_labels,
  )


def split_record(dataset: str, split: SplitData) -> dict[str, Any]:
  """What `split.json` holds: which training images (source order) were labelled and held out."""
  return {'dataset': dataset, 'source': split.source, 'num_train': split.num_train,
          'classes': list(split.class_names),
          'labeled': split.labeled_indices.tolist(),
          'validation': split.validation_indices.tolist()}


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 images to float32 `(x / 255 - mean) / std`: torchvision's ToTensor + Normalize."""
  images = images.astype(jnp.float32) / 255.0
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(key: jax.Array, images: jax.Array, info: DatasetInfo) -> jax.Array:
  """Random crop after 2-pixel zero padding, a random flip if `info.random_flip`, normalise.

  docs/reference.md "Data", train augmentation: torchvision's
  `RandomCrop(32, padding=2)` pads the uint8 image with zeros before
  normalisation, and every offset in [0, 4] is equally likely.
  """
  crop_key, flip_key = jax.random.split(key)
  batch, height, width, channels = images.shape
  padding = ((0, 0), (_CROP_PADDING, _CROP_PADDING), (_CROP_PADDING, _CROP_PADDING), (0, 0))
  padded = jnp.pad(images, padding)
  offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * _CROP_PADDING + 1)

  def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

  images = jax.vmap(crop)(padded, offsets)
  if info.random_flip:
    flip = jax.random.bernoulli(flip_key, 0.5, (batch, 1, 1, 1))
    images = jnp.where(flip, images[:, :, ::-1], images)
  return normalize(images, info.mean, info.std)


def steps_per_epoch(num_unlabeled: int, unlabeled_batch_size: int) -> int:
  """One epoch is one pass over the unlabelled set, the last partial batch dropped."""
  if num_unlabeled < unlabeled_batch_size:
    raise DataRequestError(
        f'{num_unlabeled} unlabelled images do not fill one batch of '
        f'{unlabeled_batch_size}: lower the unlabelled batch size or label fewer images.'
    )
  return num_unlabeled // unlabeled_batch_size


class Shuffles(NamedTuple):
  """The loaders' shuffles of consecutive epochs from `first_epoch` (see `shuffles`)."""

  first_epoch: jax.Array
  labeled: jax.Array  # (epochs, labelled passes per epoch, num_labeled)
  unlabeled: jax.Array  # (epochs, num_unlabeled)


def shuffles(key: jax.Array, first_epoch: jax.Array, num_epochs: int, num_labeled: int,
             num_unlabeled: int, labeled_batch_size: int, unlabeled_batch_size: int) -> Shuffles:
  """The shuffles of `num_epochs` epochs from `first_epoch`, drawn once for many steps.

  Mirrors the reference's loaders (docs/reference.md "Data"): epoch `e` is a fresh
  shuffle of the unlabelled set; the labelled loader is rebuilt at the start
  of each epoch and reshuffled whenever it runs out within it. `key` is the one
  given to `sample_batch`. A shuffle of the 46,000 CIFAR-10 images is a sort,
  so a compiled call of many steps draws its epochs' shuffles once, not per step.
  """
  if num_labeled < labeled_batch_size:
    raise DataRequestError(
        f'{num_labeled} labelled images do not fill one batch of '
        f'{labeled_batch_size}: lower the labelled batch size or label more images.'
    )
  epoch_steps = steps_per_epoch(num_unlabeled, unlabeled_batch_size)
  passes = -(-epoch_steps // (num_labeled // labeled_batch_size))
  unlabeled_key, labeled_key = jax.random.split(jax.random.split(key)[0])

  def one_epoch(epoch):
    labeled_epoch_key = jax.random.fold_in(labeled_key, epoch)
    labeled = jax.vmap(lambda cycle: jax.random.permutation(
        jax.random.fold_in(labeled_epoch_key, cycle), num_labeled))(jnp.arange(passes))
    return labeled, jax.random.permutation(jax.random.fold_in(unlabeled_key, epoch), num_unlabeled)

  first_epoch = jnp.asarray(first_epoch, jnp.int32)
  labeled, unlabeled = jax.vmap(one_epoch)(first_epoch + jnp.arange(num_epochs, dtype=jnp.int32))
  return Shuffles(first_epoch, labeled, unlabeled)


def batch_indices(orders: Shuffles, step: jax.Array, labeled_batch_size: int,
                  unlabeled_batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Returns `(labeled_idx, unlabeled_idx)` of global step `step` (0-based), which `orders` covers.

  Both loaders drop their last partial batch.
  """
  num_labeled, num_unlabeled = orders.labeled.shape[-1], orders.unlabeled.shape[-1]
  epoch, position = jnp.divmod(jnp.asarray(step, jnp.int32),
                               steps_per_epoch(num_unlabeled, unlabeled_batch_size))
  cycle, labeled_position = jnp.divmod(position, num_labeled // labeled_batch_size)
  epoch = epoch - orders.first_epoch
  return (
      jax.lax.dynamic_slice_in_dim(
          orders.labeled[epoch, cycle], labeled_position * labeled_batch_size, labeled_batch_size
      ),
      jax.lax.dynamic_slice_in_dim(
          orders.unlabeled[epoch], position * unlabeled_batch_size, unlabeled_batch_size
      ),
  )


def sample_batch(
    key: jax.Array,
    step: jax.Array,
    data: dict[str, jax.Array],
    info: DatasetInfo,
    labeled_batch_size: int,
    unlabeled_batch_size: int,
    orders: Shuffles | None = None,
) -> dict[str, jax.Array]:
  """The training batch of step `step`: two independent augmented views per image.

  `data` holds the on-device uint8 'labeled_images', 'labeled_labels' and
  'unlabeled_images', and may hold 'unlabeled_labels': the batch then carries
  the true labels of its unlabelled images, which serve the training
  diagnostics only (`train_state.lc_diagnostics`), never the loss. Pure in
  `(key, step)`, so it can run inside a jitted
  `lax.scan` over steps; `orders`, from `shuffles` with the same key and an
  epoch range that holds `step`, only saves drawing the step's shuffles again.
  """
  num_labeled, num_unlabeled = data['labeled_images'].shape[0], data['unlabeled_images'].shape[0]
  if orders is None:
    epoch = jnp.asarray(step, jnp.int32) // steps_per_epoch(num_unlabeled, unlabeled_batch_size)
    orders = shuffles(key, epoch, 1, num_labeled, num_unlabeled, labeled_batch_size,
                      unlabeled_batch_size)
  labeled_idx, unlabeled_idx = batch_indices(orders, step, labeled_batch_size,
                                             unlabeled_batch_size)
  labeled = data['labeled_images'][labeled_idx]
  unlabeled = data['unlabeled_images'][unlabeled_idx]
  keys = jax.random.split(jax.random.fold_in(jax.random.split(key)[1], step), 4)
  batch = {
      'labeled_student': augment(keys[0], labeled, info),
      'labeled_teacher': augment(keys[1], labeled, info),
      'labels': data['labeled_labels'][labeled_idx].astype(jnp.int32),
      'unlabeled_student': augment(keys[2], unlabeled, info),
      'unlabeled_teacher': augment(keys[3], unlabeled, info),
  }
  if 'unlabeled_labels' in data:
    batch['unlabeled_labels'] = data['unlabeled_labels'][unlabeled_idx].astype(jnp.int32)
  return batch
