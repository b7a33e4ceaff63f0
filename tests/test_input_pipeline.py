"""Tests for lcmt_jax.input_pipeline (docs/reference.md "Data")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from lcmt_jax import data_sources
from lcmt_jax import input_pipeline

# mean 0, std 1: normalised pixels are x / 255, so tests can read images back.
_PLAIN = input_pipeline.DatasetInfo('plain', 10, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False)


def _to_uint8(images, info):
  images = (np.asarray(images) * np.array(info.std) + np.array(info.mean)) * 255
  return np.round(images).astype(np.uint8)


def _reference_labeled_indices(labels, k, seed):
  """The reference's draw, global RNG and all, restoring the RNG afterwards."""
  state = np.random.get_state()
  np.random.seed(seed)
  drawn = [np.random.choice(np.where(labels == c)[0], k, replace=False) for c in np.unique(labels)]
  np.random.set_state(state)
  return np.sort(np.concatenate(drawn))


def _synthetic_labels(num_per_class=60, num_classes=10):
  return np.random.RandomState(0).permutation(np.repeat(np.arange(num_classes), num_per_class))


def _coordinate_image():
  """32x32x3 uint8 image whose pixels are (row + 1, col + 1, 255): never zero."""
  rows, cols = np.meshgrid(np.arange(1, 33), np.arange(1, 33), indexing='ij')
  return np.stack([rows, cols, np.full_like(rows, 255)], axis=-1).astype(np.uint8)


def _crop_offsets_and_flips(images, info):
  """Identifies each augmented image as one padded window, flipped or not."""
  padded = np.pad(_coordinate_image(), ((2, 2), (2, 2), (0, 0)))
  windows = {
      (dy, dx, flipped): window[:, ::-1] if flipped else window
      for dy in range(5)
      for dx in range(5)
      for flipped in (False, True)
      for window in [padded[dy : dy + 32, dx : dx + 32]]
  }
  found = []
  for image in _to_uint8(images, info):
    matches = [k for k, window in windows.items() if np.array_equal(image, window)]
    assert len(matches) == 1
    found.append(matches[0])
  return found


def _index_encoded_images(n):
  """Image i is constant (i // 256, i % 256, 1); crops keep its centre pixel."""
  values = np.stack([np.arange(n) // 256, np.arange(n) % 256, np.ones(n)], axis=-1)
  return np.broadcast_to(values[:, None, None, :], (n, 32, 32, 3)).astype(np.uint8)


def _decode_indices(images):
  centre = _to_uint8(images, _PLAIN)[:, 16, 16].astype(np.int64)
  return centre[:, 0] * 256 + centre[:, 1]


def _encoded_data(num_labeled, num_unlabeled):
  return {
      'labeled_images': jnp.asarray(_index_encoded_images(num_labeled)),
      'labeled_labels': jnp.arange(num_labeled, dtype=jnp.int32),
      'unlabeled_images': jnp.asarray(_index_encoded_images(num_unlabeled)),
  }


@pytest.mark.parametrize('seed', [2, 7])
def test_split_reproduces_the_reference_draw(seed):
  labels = _synthetic_labels()
  labeled, _, validation = input_pipeline.split_indices(labels, 10, 8, 0, seed)
  np.testing.assert_array_equal(labeled, _reference_labeled_indices(labels, 8, seed))
  assert validation.size == 0


def test_split_is_disjoint_and_complete():
  labels = _synthetic_labels()
  labeled, unlabeled, validation = input_pipeline.split_indices(labels, 10, 8, 5, 2)
  assert (labeled.size, validation.size, unlabeled.size) == (80, 50, 600 - 130)
  assert np.array_equal(np.sort(np.concatenate([labeled, unlabeled, validation])), np.arange(600))
  assert np.all(np.bincount(labels[labeled]) == 8) and np.all(np.bincount(labels[validation]) == 5)


def test_validation_split_leaves_the_labelled_set_unchanged():
  labels = _synthetic_labels()
  without = input_pipeline.split_indices(labels, 10, 8, 0, 2)[0]
  with_validation = input_pipeline.split_indices(labels, 10, 8, 5, 2)[0]
  np.testing.assert_array_equal(without, with_validation)


@pytest.mark.parametrize(
    'labeled_per_class, validation_per_class, match',
    [(61, 0, 'Class 0 has 60'), (50, 11, 'Class 0 has 60'), (0, 0, 'at least 1'),
     (4, -1, 'at least 1')],
)
def test_bad_split_requests_are_refused(labeled_per_class, validation_per_class, match):
  labels = _synthetic_labels()
  with pytest.raises(ValueError, match=match):
    input_pipeline.split_indices(labels, 10, labeled_per_class, validation_per_class, 2)


def test_load_split_on_digits():
  config = default.get_config()
  config.update(dataset='digits', labeled_per_class=10, validation_per_class=5)
  split = input_pipeline.load_split(config)
  assert split.info == input_pipeline.DATASETS['digits']
  assert (split.source, split.num_train) == ('digits', 1297)
  assert split.class_names == tuple(str(d) for d in range(10))
  train_labels = data_sources.load('digits', '').train_labels
  np.testing.assert_array_equal(split.labeled_indices,
                                _reference_labeled_indices(train_labels, 10, 2))
  np.testing.assert_array_equal(split.labeled_labels, train_labels[split.labeled_indices])
  assert np.intersect1d(split.labeled_indices, split.validation_indices).size == 0
  assert split.labeled_images.shape == (100, 32, 32, 3)
  assert split.validation_images.shape == (50, 32, 32, 3)
  assert split.unlabeled_images.shape == (1297 - 150, 32, 32, 3)
  assert split.test_images.shape == (500, 32, 32, 3)
  assert np.all(np.bincount(split.labeled_labels) == 10)


def test_normalize_centres_the_mean_image():
  info = input_pipeline.DATASETS['cifar10']
  mean_pixel = np.round(np.array(info.mean) * 255).astype(np.uint8)
  normalised = input_pipeline.normalize(jnp.asarray(mean_pixel), info.mean, info.std)
  assert normalised.dtype == jnp.float32
  np.testing.assert_allclose(normalised, 0.0, atol=0.01)


def test_crops_are_windows_of_the_zero_padded_image():
  images = jnp.asarray(np.repeat(_coordinate_image()[None], 400, axis=0))
  found = _crop_offsets_and_flips(input_pipeline.augment(jax.random.key(0), images, _PLAIN), _PLAIN)
  assert {(dy, dx) for dy, dx, _ in found} == {(dy, dx) for dy in range(5) for dx in range(5)}
  assert not any(flipped for _, _, flipped in found)


@pytest.mark.parametrize('name, flips', [('cifar10', True), ('svhn', False), ('digits', False)])
def test_flips_only_where_the_reference_flips(name, flips):
  info = input_pipeline.DATASETS[name]
  images = jnp.asarray(np.repeat(_coordinate_image()[None], 400, axis=0))
  found = _crop_offsets_and_flips(input_pipeline.augment(jax.random.key(1), images, info), info)
  num_flipped = sum(flipped for _, _, flipped in found)
  if flips:
    assert 150 < num_flipped < 250
  else:
    assert num_flipped == 0


def test_sample_batch_shapes_and_independent_views():
  data = _encoded_data(40, 100)
  batch = input_pipeline.sample_batch(jax.random.key(0), jnp.int32(3), data, _PLAIN, 8, 16)
  assert batch['labeled_student'].shape == (8, 32, 32, 3)
  assert batch['labeled_student'].dtype == jnp.float32
  assert batch['unlabeled_teacher'].shape == (16, 32, 32, 3) and batch['labels'].dtype == jnp.int32
  # Constant images look alike under any crop; the zero border tells the views apart.
  assert not np.array_equal(batch['labeled_student'], batch['labeled_teacher'])
  assert not np.array_equal(batch['unlabeled_student'], batch['unlabeled_teacher'])
  np.testing.assert_array_equal(_decode_indices(batch['labeled_student']), batch['labels'])


def test_sample_batch_is_a_pure_function_of_key_and_step():
  data = _encoded_data(40, 100)
  sample = jax.jit(input_pipeline.sample_batch, static_argnums=(3, 4, 5))
  # The trainer's kind of key.
  first = sample(jax.random.key(0), jnp.int32(5), data, _PLAIN, 8, 16)
  again = sample(jax.random.key(0), jnp.int32(5), data, _PLAIN, 8, 16)
  later = sample(jax.random.key(0), jnp.int32(6), data, _PLAIN, 8, 16)
  for name in first:
    np.testing.assert_array_equal(first[name], again[name])
  assert not np.array_equal(first['unlabeled_student'], later['unlabeled_student'])


def test_epochs_visit_every_unlabelled_image_once_and_labelled_passes_reshuffle():
  num_labeled, num_unlabeled, labeled_batch, unlabeled_batch = 20, 64, 8, 16
  data = _encoded_data(num_labeled, num_unlabeled)
  epoch_steps = input_pipeline.steps_per_epoch(num_unlabeled, unlabeled_batch)
  assert epoch_steps == 4
  assert input_pipeline.steps_per_epoch(num_unlabeled + 15, unlabeled_batch) == 4  # Drops the rest.

  def body(carry, step):
    batch = input_pipeline.sample_batch(
        jax.random.key(3), step, data, _PLAIN, labeled_batch, unlabeled_batch)
    return carry, (batch['labels'], batch['unlabeled_student'], batch['unlabeled_teacher'])

  steps = jnp.arange(2 * epoch_steps, dtype=jnp.int32)
  _, (labels, student, teacher) = jax.lax.scan(body, None, steps)
  unlabeled_idx = _decode_indices(student.reshape(-1, 32, 32, 3))
  np.testing.assert_array_equal(unlabeled_idx, _decode_indices(teacher.reshape(-1, 32, 32, 3)))
  unlabeled_idx = unlabeled_idx.reshape(2, -1)
  for epoch in unlabeled_idx:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(num_unlabeled))
  assert not np.array_equal(unlabeled_idx[0], unlabeled_idx[1])
  # Two labelled batches per pass: each pass holds no repeats, and passes reshuffle.
  labeled_passes = np.asarray(labels).reshape(-1, 2 * labeled_batch)
  assert all(len(set(p.tolist())) == 2 * labeled_batch for p in labeled_passes)
  assert len({tuple(p.tolist()) for p in labeled_passes}) == len(labeled_passes)


def test_batches_too_large_for_the_data_are_refused():
  with pytest.raises(ValueError, match='do not fill one batch'):
    input_pipeline.steps_per_epoch(100, 128)
  with pytest.raises(ValueError, match='labelled images do not fill one batch'):
    input_pipeline.sample_batch(
        jax.random.key(0), jnp.int32(0), _encoded_data(4, 100), _PLAIN, 8, 16)


@pytest.mark.parametrize('first_step, num_steps', [(0, 8), (5, 9), (13, 1)])
def test_shuffles_drawn_once_give_the_batches_of_the_per_step_draw(first_step, num_steps):
  """`run_steps` draws its epochs' shuffles once; every step must still see its own batch."""
  data = _encoded_data(20, 64)  # 4 steps an epoch, labelled passes of 2 batches.
  epoch_steps = input_pipeline.steps_per_epoch(64, 16)
  key = jax.random.key(5)
  orders = input_pipeline.shuffles(key, first_step // epoch_steps,
                                   (num_steps - 1) // epoch_steps + 2, 20, 64, 8, 16)
  for step in range(first_step, first_step + num_steps):
    once = input_pipeline.sample_batch(key, jnp.int32(step), data, _PLAIN, 8, 16, orders)
    per_step = input_pipeline.sample_batch(key, jnp.int32(step), data, _PLAIN, 8, 16)
    for name in per_step:
      np.testing.assert_array_equal(once[name], per_step[name])
