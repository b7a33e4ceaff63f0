"""Data: loading, the labelled/unlabelled split, on-device augmentation and batches.

REFERENCE.md "Data" is the spec. Images stay uint8 on the host and on the
accelerator; `sample_batch` picks, augments (twice: student and teacher view)
and normalises a step's batch inside the jitted training step, as a pure
function of an RNG key and the step number.
"""

import dataclasses
import os
import socket
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcmt_jax import errors
from lcmt_jax import tf_cpu

_CROP_PADDING = 2
_PROBE_TIMEOUT_S = 3.0


class DatasetNotFoundError(errors.UserInputError):
  """The data set is not on disk and cannot be downloaded from here."""


class DatasetUnreadableError(errors.UserInputError):
  """The prepared data set's files are damaged, e.g. by an interrupted copy."""


class DataRequestError(errors.UserInputError, ValueError):
  """An unknown data set, or a split or batch larger than the data allows."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a data set (REFERENCE.md "Data")."""

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
    # Mean and std of the 1,297 training images from `_load_digits`, images
    # scaled to [0, 1], rounded to 4 places (the test suite recomputes them).
    'digits': DatasetInfo('digits', 10, (0.3053,) * 3, (0.3758,) * 3, False),
}

# tfds name and the host its files are downloaded from, per data set.
_TFDS_SOURCES = {
    'cifar10': ('cifar10', 'www.cs.toronto.edu'),
    'svhn': ('svhn_cropped', 'ufldl.stanford.edu'),
}

_DIGITS_TEST_SIZE = 500


@dataclasses.dataclass(frozen=True)
class SplitData:
  """Host-side arrays of one split: images uint8 (N, 32, 32, 3), labels int32.

  The unlabelled labels are kept for diagnostics only; the validation arrays
  are empty unless a validation split was asked for.
  """

  info: DatasetInfo
  labeled_images: np.ndarray
  labeled_labels: np.ndarray
  unlabeled_images: np.ndarray
  unlabeled_labels: np.ndarray
  validation_images: np.ndarray
  validation_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def get_info(name: str) -> DatasetInfo:
  """Returns the `DatasetInfo` of `name`, or says which names exist."""
  if name not in DATASETS:
    raise DataRequestError(
        f'Unknown data set {name!r}: set config.dataset to one of {sorted(DATASETS)}.'
    )
  return DATASETS[name]


def load_dataset(
    name: str, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Returns `(train_images, train_labels, test_images, test_labels)`.

  Images are uint8 NHWC, labels int32, the training images in the order of
  the original files, which the reference's label split indexes into.
  """
  get_info(name)
  if name == 'digits':
    return _load_digits()
  tfds_name, host = _TFDS_SOURCES[name]
  return _load_tfds(tfds_name, host, data_dir or None)


def _load_tfds(
    tfds_name: str, host: str, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  # tfds takes a file for an empty data_dir: it says the data set is missing, or
  # fails writing the download into it.
  if data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise errors.UserInputError(
        f'config.data_dir {data_dir!r} is a file, not a directory: set it to the tfds '
        "data directory, or to '' for tfds's default (~/tensorflow_datasets)."
    )
  tf = tf_cpu.import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from google.protobuf import json_format  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  # What a damaged dataset_info.json raises: text that is not the JSON expected
  # (ParseError), bytes that are not UTF-8 (UnicodeDecodeError, rewrapped by tfds
  # as RuntimeError), a file that cannot be read (tfds's DatasetInfoFileError, an
  # OSError), a version (AssertionError) or file format (ValueError) the code lacks.
  except (json_format.ParseError, RuntimeError, OSError, AssertionError, ValueError) as e:
    root = data_dir or tfds.core.constants.DATA_DIR
    version = tfds.builder_cls(tfds_name).VERSION
    raise _unreadable_error(tfds_name, os.path.join(root, tfds_name, str(version)), e) from e
  # Without a network, tfds retries a download for minutes before failing.
  if not builder.is_prepared():
    if not _network_reachable(host):
      root = builder.data_dir_root
      raise DatasetNotFoundError(
          f'Data set {tfds_name!r} is not prepared in {builder.data_dir} and '
          f'{host} cannot be reached to download it. On a machine with a '
          'network run `python -c "import tensorflow_datasets as tfds; '
          f"tfds.builder('{tfds_name}', data_dir='{root}').download_and_prepare()\"`, "
          f'then copy the folder {root}/{tfds_name} into the directory given '
          'as config.data_dir here.'
      )
    builder.download_and_prepare()
  try:
    return (*_read_split(tfds, builder, 'train'), *_read_split(tfds, builder, 'test'))
  # What damaged record files raise: truncated or garbage records (DataLossError),
  # fewer records than dataset_info.json counts (FailedPreconditionError), a
  # missing file (NotFoundError).
  except (tf.errors.DataLossError, tf.errors.FailedPreconditionError, tf.errors.NotFoundError) as e:
    raise _unreadable_error(tfds_name, builder.data_dir, e) from e


def _unreadable_error(tfds_name: str, version_dir: str, error: Exception) -> DatasetUnreadableError:
  return DatasetUnreadableError(
      f'Data set {tfds_name!r} in {version_dir} cannot be read ({type(error).__name__}): '
      f'its files are damaged or incomplete. Delete {version_dir} and run again to '
      'download and prepare it afresh.'
  )


def _network_reachable(host: str) -> bool:
  try:
    with socket.create_connection((host, 443), timeout=_PROBE_TIMEOUT_S):
      return True
  except OSError:
    return False


def _read_split(tfds: Any, builder: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
  # Batched iteration, not `batch_size=-1`, which aborts under tfds's mock_data.
  ids, images, labels = [], [], []
  for batch in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False).batch(1024)):
    ids.append(batch['id'])
    images.append(batch['image'])
    labels.append(batch['label'])
  # tfds stores examples in hashed order; the zero-padded ids ('train_00042')
  # sort back to the file order the reference (torchvision, scipy) reads.
  order = np.argsort(np.concatenate(ids), kind='stable')
  return (
      np.concatenate(images)[order].astype(np.uint8),
      np.concatenate(labels)[order].astype(np.int32),
  )


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits as 32x32x3 uint8 images: a real data set offline."""
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)
  images = images.repeat(4, axis=1).repeat(4, axis=2)
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  train_idx, test_idx = model_selection.train_test_split(
      np.arange(len(labels)), test_size=_DIGITS_TEST_SIZE, stratify=labels, random_state=0
  )
  train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
  return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def split_indices(
    labels: np.ndarray,
    num_classes: int,
    labeled_per_class: int,
    validation_per_class: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns sorted `(labeled_idx, unlabeled_idx, validation_idx)` into `labels`.

  The labelled draw is the reference's (REFERENCE.md "Data"): NumPy's legacy
  RNG seeded once with `seed`, then `choice(class_indices, k, replace=False)`
  per class in sorted order. `RandomState(seed)` draws exactly what
  `np.random.seed(seed)` does, without touching the global RNG. The optional
  validation draw (REFERENCE.md "Quirks" 1) comes after it from the class's
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

  Uses `config.dataset`, `config.data_dir`, `config.labeled_per_class`,
  `config.validation_per_class` (0 for none) and `config.split_seed`.
  """
  info = get_info(config.dataset)
  train_images, train_labels, test_images, test_labels = load_dataset(
      config.dataset, config.data_dir
  )
  labeled, unlabeled, validation = split_indices(
      train_labels,
      info.num_classes,
      config.labeled_per_class,
      config.validation_per_class,
      config.split_seed,
  )
  return SplitData(
      info=info,
      labeled_images=train_images[labeled],
      labeled_labels=train_labels[labeled],
      unlabeled_images=train_images[unlabeled],
      unlabeled_labels=train_labels[unlabeled],
      validation_images=train_images[validation],
      validation_labels=train_labels[validation],
      test_images=test_images,
      test_labels=test_labels,
  )


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 images to float32 `(x / 255 - mean) / std`: torchvision's ToTensor + Normalize."""
  images = images.astype(jnp.float32) / 255.0
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(key: jax.Array, images: jax.Array, info: DatasetInfo) -> jax.Array:
  """Random crop after 2-pixel zero padding, a random flip if `info.random_flip`, normalise.

  REFERENCE.md "Data", train augmentation: torchvision's
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


def batch_indices(
    key: jax.Array,
    step: jax.Array,
    num_labeled: int,
    num_unlabeled: int,
    labeled_batch_size: int,
    unlabeled_batch_size: int,
) -> tuple[jax.Array, jax.Array]:
  """Returns `(labeled_idx, unlabeled_idx)` of global step `step` (0-based).

  Mirrors the reference's loaders (REFERENCE.md "Data"): epoch `e` is a fresh
  shuffle of the unlabelled set; the labelled loader is rebuilt at the start
  of each epoch and reshuffled whenever it runs out within it. Both drop their
  last partial batch.
  """
  if num_labeled < labeled_batch_size:
    raise DataRequestError(
        f'{num_labeled} labelled images do not fill one batch of '
        f'{labeled_batch_size}: lower the labelled batch size or label more images.'
    )
  epoch_steps = steps_per_epoch(num_unlabeled, unlabeled_batch_size)
  epoch, position = jnp.divmod(jnp.asarray(step, jnp.int32), epoch_steps)
  cycle, labeled_position = jnp.divmod(position, num_labeled // labeled_batch_size)

  unlabeled_key, labeled_key = jax.random.split(key)
  unlabeled_key = jax.random.fold_in(unlabeled_key, epoch)
  labeled_key = jax.random.fold_in(jax.random.fold_in(labeled_key, epoch), cycle)
  labeled_order = jax.random.permutation(labeled_key, num_labeled)
  unlabeled_order = jax.random.permutation(unlabeled_key, num_unlabeled)
  return (
      jax.lax.dynamic_slice_in_dim(
          labeled_order, labeled_position * labeled_batch_size, labeled_batch_size
      ),
      jax.lax.dynamic_slice_in_dim(
          unlabeled_order, position * unlabeled_batch_size, unlabeled_batch_size
      ),
  )


def sample_batch(
    key: jax.Array,
    step: jax.Array,
    data: dict[str, jax.Array],
    info: DatasetInfo,
    labeled_batch_size: int,
    unlabeled_batch_size: int,
) -> dict[str, jax.Array]:
  """The training batch of step `step`: two independent augmented views per image.

  `data` holds the on-device uint8 'labeled_images', 'labeled_labels' and
  'unlabeled_images'. Pure in `(key, step)`, so it can run inside a jitted
  `lax.scan` over steps.
  """
  index_key, augment_key = jax.random.split(key)
  labeled_idx, unlabeled_idx = batch_indices(
      index_key,
      step,
      data['labeled_images'].shape[0],
      data['unlabeled_images'].shape[0],
      labeled_batch_size,
      unlabeled_batch_size,
  )
  labeled = data['labeled_images'][labeled_idx]
  unlabeled = data['unlabeled_images'][unlabeled_idx]
  keys = jax.random.split(jax.random.fold_in(augment_key, step), 4)
  return {
      'labeled_student': augment(keys[0], labeled, info),
      'labeled_teacher': augment(keys[1], labeled, info),
      'labels': data['labeled_labels'][labeled_idx].astype(jnp.int32),
      'unlabeled_student': augment(keys[2], unlabeled, info),
      'unlabeled_teacher': augment(keys[3], unlabeled, info),
  }
