"""Tests for lcmt_jax.data_sources: every source read back against files the test wrote itself."""

import builtins
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from configs import default
from lcmt_jax import data_sources
from lcmt_jax import errors
from lcmt_jax import input_pipeline
from lcmt_jax import trainer
from tests import helpers
from tests import test_cifar10_pickle
from tests.test_input_pipeline import _reference_labeled_indices
from lcmt_jax.testing.runs import REPO, TINY_FLAGS
from tests.test_trainer import tiny_config

TINY_COMMAND = ['--config=configs/quickstart.py', *TINY_FLAGS, '--config.num_epochs=1']


def _one_line(error):
  message = str(error.value)
  assert '\n' not in message, message
  return message


# --- tensorflow-datasets ------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['cifar10', 'svhn'])
def test_load_reads_mocked_tfds(name, monkeypatch, tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')  # Absent on the GPU image.
  # Under mock_data the builder is never prepared and download_and_prepare is a no-op.
  monkeypatch.setattr(data_sources, 'network_reachable', lambda host: True)
  with tfds.testing.mock_data(num_examples=6):
    loaded = data_sources.load(name, str(tmp_path))
  assert loaded.source == 'tfds' and len(loaded.class_names) == 10
  for images, labels in [(loaded.train_images, loaded.train_labels),
                         (loaded.test_images, loaded.test_labels)]:
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (6,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < 10


def test_load_restores_the_tfds_file_order(monkeypatch, tmp_path):
  tf = pytest.importorskip('tensorflow')
  tfds = pytest.importorskip('tensorflow_datasets')  # Absent on the GPU image.

  # tfds yields examples in hashed order; the ids carry the original position.
  stored = np.random.RandomState(0).permutation(12)

  def as_dataset(self, *args, **kwargs):
    del self, args, kwargs
    return tf.data.Dataset.from_tensor_slices({
        'id': [f'train_{i:05d}'.encode() for i in stored],
        'image': np.broadcast_to(stored[:, None, None, None], (12, 32, 32, 3)).astype(np.uint8),
        'label': stored % 10,
    })

  monkeypatch.setattr(data_sources, 'network_reachable', lambda host: True)
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    loaded = data_sources.load('cifar10', str(tmp_path))
  np.testing.assert_array_equal(loaded.train_images[:, 0, 0, 0], np.arange(12))
  np.testing.assert_array_equal(loaded.train_labels, np.arange(12) % 10)


def test_missing_data_fails_at_once_with_instructions(offline, tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(data_sources.DatasetNotFoundError) as error:
    data_sources.load('cifar10', str(tmp_path))
  message = _one_line(error)
  assert "'cifar10'" in message and str(tmp_path) in message
  assert f"tfds.builder('cifar10', data_dir='{tmp_path}').download_and_prepare()" in message


def _assert_unreadable_in_one_line(data_dir, version_dir, cause):
  before = helpers.directory_contents(data_dir)
  with pytest.raises(data_sources.DatasetUnreadableError) as error:
    data_sources.load('cifar10', str(data_dir))
  message = _one_line(error)
  assert "'cifar10'" in message and f'({cause})' in message
  assert f'Delete {version_dir} and' in message
  assert helpers.directory_contents(data_dir) == before  # Nothing deleted or rewritten.


def test_load_reads_a_real_tfds_directory_in_file_order(cifar10_dir, offline):
  tfds = pytest.importorskip('tensorflow_datasets')  # Absent on the GPU image.

  data_dir, written = cifar10_dir
  loaded = data_sources.load('cifar10', str(data_dir))
  assert loaded.source == 'tfds'
  got = (loaded.train_images, loaded.train_labels, loaded.test_images, loaded.test_labels)
  for got_array, want in zip(got, written, strict=True):
    assert got_array.dtype == want.dtype
    np.testing.assert_array_equal(got_array, want)
  # Only a test if tfds stored the examples out of order.
  stored = tfds.builder('cifar10', data_dir=str(data_dir)).as_dataset(split='train')
  ids = [example['id'] for example in tfds.as_numpy(stored)]
  assert ids != sorted(ids)


# Each damage to every record file, and the TensorFlow error it raises.
_RECORD_DAMAGE = {
    'truncated': (lambda data: data[:-10], 'DataLossError'),  # Inside the last record.
    'garbage': (lambda data: b'\xde\xad' * (len(data) // 2), 'DataLossError'),
    'emptied': (lambda data: b'', 'FailedPreconditionError'),
    'deleted': (None, 'NotFoundError'),
}


@pytest.mark.parametrize('damage', list(_RECORD_DAMAGE))
def test_damaged_records_are_reported_in_one_line(damage, cifar10_dir, tmp_path, offline):
  data_dir, version_dir = helpers.copy_of_data_dir(cifar10_dir, tmp_path)
  rewrite, cause = _RECORD_DAMAGE[damage]
  for path in version_dir.glob('*.tfrecord-*'):
    if rewrite is None:
      path.unlink()
    else:
      path.write_bytes(rewrite(path.read_bytes()))
  _assert_unreadable_in_one_line(data_dir, version_dir, cause)


# Each damage to dataset_info.json, and the error tfds raises for it.
_INFO_DAMAGE = {
    'not_json': (b'not json {', 'ParseError'),
    'truncated': (b'{"name": "cifar10", "spli', 'ParseError'),
    'not_utf8': (b'\xff\xfe\x00\x9c', 'RuntimeError'),
    'no_version': (b'{}', 'AssertionError'),
    'unreadable': (None, 'DatasetInfoFileError'),  # A directory in its place.
}


@pytest.mark.parametrize('damage', list(_INFO_DAMAGE))
def test_damaged_dataset_info_is_reported_in_one_line(damage, cifar10_dir, tmp_path, offline):
  data_dir, version_dir = helpers.copy_of_data_dir(cifar10_dir, tmp_path)
  content, cause = _INFO_DAMAGE[damage]
  info = version_dir / 'dataset_info.json'
  if content is None:
    info.unlink()
    info.mkdir()
  else:
    info.write_bytes(content)
  _assert_unreadable_in_one_line(data_dir, version_dir, cause)


def test_data_dir_that_is_a_file_is_refused_in_one_line(tmp_path, monkeypatch):
  # Reachable, so that without the check tfds would try to download into the file.
  monkeypatch.setattr(data_sources, 'network_reachable', lambda host: True)
  data_file = tmp_path / 'tfds'
  data_file.write_text('not a directory')
  with pytest.raises(errors.UserInputError, match='is a file, not a directory') as error:
    data_sources.load('cifar10', str(data_file))
  assert str(data_file) in _one_line(error)
  assert data_file.read_text() == 'not a directory'


def test_unknown_dataset_is_refused_as_user_input():
  with pytest.raises(errors.UserInputError, match='unknown data set') as error:
    data_sources.load('imagenet', '')
  assert "'imagenet'" in _one_line(error)


@pytest.mark.parametrize('dataset', ['cifar10', 'svhn'])
def test_tfds_source_without_tfds_says_what_to_install(dataset, monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # As if not installed.
  for data_dir in ('', str(tmp_path)):
    with pytest.raises(data_sources.DatasetNotFoundError) as error:
      data_sources.load(dataset, data_dir)
    message = _one_line(error)
    assert 'pip install tensorflow-datasets' in message
    assert 'is not installed' in message  # tensorflow's or tensorflow_datasets' name.
    assert (data_dir or 'config.data_dir is empty') in message


# --- The embedded digits ------------------------------------------------------------------------

def test_digits_loads_offline():
  loaded = data_sources.load('digits', '')
  assert loaded.source == 'digits' and loaded.class_names == tuple('0123456789')
  assert loaded.train_images.shape == (1297, 32, 32, 3)
  assert loaded.test_images.shape == (500, 32, 32, 3)
  assert loaded.train_images.dtype == np.uint8 and loaded.train_labels.dtype == np.int32
  assert loaded.train_images.max() == 255
  assert np.array_equal(loaded.train_images[..., 0], loaded.train_images[..., 2])
  assert np.all(np.bincount(loaded.test_labels, minlength=10) >= 48)


@pytest.mark.parametrize('image_size', [16, 24])
def test_digits_at_another_size_are_the_same_pixels_in_other_blocks(image_size):
  default = data_sources.load('digits', '')
  resized = data_sources.load('digits', '', image_size=image_size)
  scale = image_size // 8
  for name in ('train_images', 'test_images'):
    original = getattr(default, name)[:, ::4, ::4]  # The 8x8 digits: 32x32 is 4x4 blocks.
    np.testing.assert_array_equal(getattr(resized, name),
                                  original.repeat(scale, axis=1).repeat(scale, axis=2))
  np.testing.assert_array_equal(resized.train_labels, default.train_labels)
  np.testing.assert_array_equal(resized.test_labels, default.test_labels)


def test_digits_statistics_match_the_constants():
  train_images = data_sources.load('digits', '').train_images / 255.0
  info = input_pipeline.DATASETS['digits']
  np.testing.assert_allclose(train_images.mean(axis=(0, 1, 2)), info.mean, atol=1e-4)
  np.testing.assert_allclose(train_images.std(axis=(0, 1, 2)), info.std, atol=1e-4)


# --- CIFAR-10 python pickles --------------------------------------------------------------------

_python2_pickle = test_cifar10_pickle.python2_pickle
_cifar10_batch = test_cifar10_pickle.cifar10_batch


def _write_cifar10_pickles(parent, per_file=6, test_size=5, seed=0):
  """`parent/cifar-10-batches-py/` with tiny batches; returns (train images, labels, test ...).

  Each training batch holds `per_file` images whose labels are a shuffled run of
  classes, so each class is in several files and the file order matters.
  """
  rng = np.random.RandomState(seed)
  folder = parent / 'cifar-10-batches-py'
  folder.mkdir(parents=True)
  written = []
  for i, name in enumerate((*(f'data_batch_{i}' for i in range(1, 6)), 'test_batch')):
    n = test_size if name == 'test_batch' else per_file
    images = rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    labels = rng.permutation((np.arange(n) + i * n) % 10)
    (folder / name).write_bytes(_python2_pickle(_cifar10_batch(images, labels, name)))
    written.append((images, labels))
  (folder / 'batches.meta').write_bytes(_python2_pickle({'label_names': ['airplane'] * 10}))
  train_images, train_labels = (np.concatenate(a) for a in zip(*written[:-1]))
  return folder, (train_images, train_labels, *written[-1])


def test_python2_pickle_fixture_has_the_real_format():
  raw = _python2_pickle(_cifar10_batch(np.zeros((1, 32, 32, 3), np.uint8), [3], 'data_batch_1'))
  assert raw.startswith(b'\x80\x02}')  # Protocol 2, a dict.
  assert b'cnumpy.core.multiarray\n_reconstruct\n' in raw and b'U\x04data' in raw
  loaded = pickle.loads(raw, encoding='bytes')
  assert set(loaded) == {b'batch_label', b'labels', b'data', b'filenames'}
  assert loaded[b'data'].dtype == np.uint8 and loaded[b'data'].shape == (1, 3072)


@pytest.mark.parametrize('where', ['parent', 'folder'])
def test_cifar10_pickles_in_file_order_and_pixel_order(tmp_path, where):
  folder, (train_images, train_labels, test_images, test_labels) = _write_cifar10_pickles(
      tmp_path)
  loaded = data_sources.load('cifar10', str(tmp_path if where == 'parent' else folder))
  assert loaded.source == 'cifar10_pickles'
  assert loaded.class_names[:2] == ('airplane', 'automobile') and len(loaded.class_names) == 10
  assert loaded.train_images.dtype == np.uint8 and loaded.train_labels.dtype == np.int32
  np.testing.assert_array_equal(loaded.train_images, train_images)
  np.testing.assert_array_equal(loaded.train_labels, train_labels)
  np.testing.assert_array_equal(loaded.test_images, test_images)
  np.testing.assert_array_equal(loaded.test_labels, test_labels)
  # The layout spelled out on the file's own rows: R plane, G plane, B plane, rows of 32.
  rows = pickle.loads((folder / 'data_batch_2').read_bytes(), encoding='bytes')[b'data']
  image = loaded.train_images[6 + 1]  # The second image of the second file.
  assert (image[0, 1, 0], image[1, 0, 0], image[0, 0, 1], image[31, 31, 2]) == (
      rows[1, 1], rows[1, 32], rows[1, 1024], rows[1, 3071])


@pytest.mark.parametrize('where', ['parent', 'folder'])
def test_cifar10_pickles_split_is_the_reference_draw(tmp_path, where):
  folder, (train_images, train_labels, test_images, _) = _write_cifar10_pickles(tmp_path)
  config = default.get_config()
  config.update(dataset='cifar10', data_dir=str(tmp_path if where == 'parent' else folder),
                labeled_per_class=2)
  split = input_pipeline.load_split(config)
  expected = _reference_labeled_indices(train_labels, 2, 2)
  np.testing.assert_array_equal(split.labeled_indices, expected)
  np.testing.assert_array_equal(split.labeled_images, train_images[expected])
  unlabeled = np.setdiff1d(np.arange(30), expected)
  np.testing.assert_array_equal(split.unlabeled_images, train_images[unlabeled])
  np.testing.assert_array_equal(split.test_images, test_images)
  assert split.info == input_pipeline.DATASETS['cifar10']
  assert (split.source, split.num_train) == ('cifar10_pickles', 30)


class _RunsCode:
  """Unpickling this calls `function(argument)`: what a hostile data folder could ship."""

  def __init__(self, function, argument):
    self.function, self.argument = function, argument

  def __reduce__(self):
    return self.function, (self.argument,)


@pytest.mark.parametrize('payload', ['os.system', 'builtins.exec'])
def test_cifar10_pickle_that_would_run_code_is_refused(tmp_path, payload):
  folder, _ = _write_cifar10_pickles(tmp_path / 'data')
  marker = tmp_path / 'code_ran'
  function, argument = {'os.system': (os.system, f'touch {marker}'),
                        'builtins.exec': (builtins.exec, f'open({str(marker)!r}, "w").close()')
                        }[payload]
  batch = _cifar10_batch(np.zeros((6, 32, 32, 3), np.uint8), np.arange(6), 'data_batch_3')
  batch['data'] = _RunsCode(function, argument)
  (folder / 'data_batch_3').write_bytes(_python2_pickle(batch))

  with pytest.raises(data_sources.DatasetUnreadableError) as error:
    data_sources.load('cifar10', str(tmp_path / 'data'))
  message = _one_line(error)
  assert str(folder / 'data_batch_3') in message and 'refused' in message
  assert f'{function.__module__}.{function.__name__}' in message  # posix.system, builtins.exec.
  assert not marker.exists()
  # The file is live: an unrestricted load runs its code.
  pickle.loads((folder / 'data_batch_3').read_bytes(), encoding='bytes')
  assert marker.exists()


@pytest.mark.parametrize('name', ['data_batch_4', 'test_batch'])
def test_cifar10_missing_batch_file_is_named(tmp_path, name):
  folder, _ = _write_cifar10_pickles(tmp_path)
  (folder / name).unlink()
  with pytest.raises(data_sources.DatasetUnreadableError) as error:
    data_sources.load('cifar10', str(tmp_path))
  message = _one_line(error)
  assert str(folder / name) in message and 'is missing' in message


_PICKLE_DAMAGE = {
    'truncated': lambda raw: raw[:len(raw) // 2],
    'cut_in_the_header': lambda raw: raw[:20],
    'garbage': lambda raw: np.random.RandomState(0).bytes(len(raw)),
    'empty': lambda raw: b'',
    'wrong_shape': lambda raw: _python2_pickle(
        {'data': np.zeros((6, 1024), np.uint8), 'labels': [0] * 6}),
    'wrong_keys': lambda raw: _python2_pickle({'images': np.zeros((6, 3072), np.uint8)}),
    'label_out_of_range': lambda raw: _python2_pickle(
        {'data': np.zeros((6, 3072), np.uint8), 'labels': [0, 1, 2, 3, 4, 10]}),
    'not_a_dict': lambda raw: _python2_pickle([1, 2, 3]),
}


@pytest.mark.parametrize('damage', list(_PICKLE_DAMAGE))
def test_cifar10_damaged_batch_file_is_named(tmp_path, damage):
  folder, _ = _write_cifar10_pickles(tmp_path)
  path = folder / 'data_batch_2'
  path.write_bytes(_PICKLE_DAMAGE[damage](path.read_bytes()))
  with pytest.raises(data_sources.DatasetUnreadableError) as error:
    data_sources.load('cifar10', str(tmp_path))
  assert str(path) in _one_line(error)


# --- SVHN .mat files ----------------------------------------------------------------------------

def _write_svhn(folder, sizes=(12, 7), seed=0, compress=False):
  """`train_32x32.mat` and `test_32x32.mat` as SVHN writes them: X (32, 32, 3, N), y in 1..10."""
  from scipy import io as scipy_io  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(seed)
  written = []
  for name, n in zip(('train_32x32.mat', 'test_32x32.mat'), sizes):
    x = rng.randint(0, 256, (32, 32, 3, n)).astype(np.uint8)
    y = (np.arange(n) % 10 + 1).astype(np.uint8)[rng.permutation(n)][:, None]
    scipy_io.savemat(str(folder / name), {'X': x, 'y': y}, do_compression=compress)
    written.append((x, y))
  return written


@pytest.mark.parametrize('compress', [False, True])
def test_svhn_mat_labels_and_pixel_order(tmp_path, compress):
  (train_x, train_y), (test_x, test_y) = _write_svhn(tmp_path, compress=compress)
  loaded = data_sources.load('svhn', str(tmp_path))
  assert loaded.source == 'svhn_mat' and loaded.class_names == tuple('0123456789')
  assert loaded.train_images.shape == (12, 32, 32, 3) and loaded.train_images.dtype == np.uint8
  assert loaded.train_labels.dtype == np.int32
  for images, labels, x, y in ((loaded.train_images, loaded.train_labels, train_x, train_y),
                               (loaded.test_images, loaded.test_labels, test_x, test_y)):
    np.testing.assert_array_equal(labels, np.where(y[:, 0] == 10, 0, y[:, 0]))
    for i in range(len(images)):
      np.testing.assert_array_equal(images[i], x[:, :, :, i])
  assert 0 in loaded.train_labels and 10 not in loaded.train_labels
  assert loaded.train_images[3, 5, 7, 2] == train_x[5, 7, 2, 3]  # Row, column, channel.


def test_svhn_split_keeps_the_reference_constants(tmp_path):
  (_, train_y), _ = _write_svhn(tmp_path, sizes=(30, 5))
  config = default.get_config()
  config.update(dataset='svhn', data_dir=str(tmp_path), labeled_per_class=2)
  split = input_pipeline.load_split(config)
  assert split.info == input_pipeline.DATASETS['svhn'] and not split.info.random_flip
  labels = np.where(train_y[:, 0] == 10, 0, train_y[:, 0])
  np.testing.assert_array_equal(split.labeled_indices, _reference_labeled_indices(labels, 2, 2))
  config.random_flip = True
  assert input_pipeline.load_split(config).info.random_flip


@pytest.mark.parametrize('name', ['train_32x32.mat', 'test_32x32.mat'])
@pytest.mark.parametrize('damage', ['missing', 'truncated'])
def test_svhn_missing_or_damaged_file_is_named(tmp_path, name, damage):
  _write_svhn(tmp_path)
  path = tmp_path / name
  if damage == 'missing':
    path.unlink()
  else:
    path.write_bytes(path.read_bytes()[:300])
  with pytest.raises(data_sources.DatasetUnreadableError) as error:
    data_sources.load('svhn', str(tmp_path))
  message = _one_line(error)
  assert str(path) in message
  assert ('is missing' in message) == (damage == 'missing')


@pytest.mark.parametrize('content', [
    {'X': np.zeros((32, 32, 5), np.uint8), 'y': np.ones((5, 1), np.uint8)},
    {'X': np.zeros((32, 32, 3, 5), np.uint8), 'y': np.ones((4, 1), np.uint8)},
    {'X': np.zeros((32, 32, 3, 5), np.uint8), 'y': np.full((5, 1), 11, np.uint8)},
    {'images': np.zeros((32, 32, 3, 5), np.uint8), 'y': np.ones((5, 1), np.uint8)},
], ids=['wrong_shape', 'label_count', 'label_11', 'wrong_keys'])
def test_svhn_file_with_the_wrong_content_is_named(tmp_path, content):
  from scipy import io as scipy_io  # pylint: disable=g-import-not-at-top
  _write_svhn(tmp_path)
  scipy_io.savemat(str(tmp_path / 'test_32x32.mat'), content)
  with pytest.raises(data_sources.DatasetUnreadableError) as error:
    data_sources.load('svhn', str(tmp_path))
  assert str(tmp_path / 'test_32x32.mat') in _one_line(error)


@pytest.mark.parametrize('damage, reason', [
    # MATLAB's -v7.3 header (HDF5 follows it), and the flags that crashed scipy.io.loadmat.
    (lambda raw: raw[:124] + b'\x00\x02' + raw[126:], 'MATLAB v7.3 MAT-file (HDF5)'),
    (lambda raw: raw[:145] + b'\xf9' + raw[146:], "its 'X' is complex"),
], ids=['v7.3', 'complex_flag'])
def test_svhn_mat_file_refused_says_why(tmp_path, damage, reason):
  _write_svhn(tmp_path)
  path = tmp_path / 'train_32x32.mat'
  path.write_bytes(damage(path.read_bytes()))
  with pytest.raises(data_sources.DatasetUnreadableError) as error:
    data_sources.load('svhn', str(tmp_path))
  message = _one_line(error)
  assert message.startswith(f'{path} is not a MAT-file of version 5 to 7: ')
  assert reason in message and 'ufldl.stanford.edu/housenumbers' in message


# --- Image folders ------------------------------------------------------------------------------

# Created in this order; sorted, they are ant, moth, zebra.
_CLASSES = ('zebra', 'ant', 'moth')


def _write_png(path, pixels):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(pixels).save(path, format='PNG')


def _write_image_folder(root, train_per_class=9, test_per_class=2, jpeg=True, seed=0):
  """train/ and test/ class folders; returns per split `(paths, labels)` in the expected order.

  Files are created in a shuffled order, and every third one is a JPEG when
  `jpeg`; the expected order is classes sorted by name, then file names sorted.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(seed)
  expected = {}
  for split, count in (('train', train_per_class), ('test', test_per_class)):
    created = []
    for name in _CLASSES:
      (root / split / name).mkdir(parents=True)
      for i in rng.permutation(count):
        path = root / split / name / f'img_{i:02d}.{"jpg" if jpeg and i % 3 == 2 else "png"}'
        pixels = rng.randint(0, 256, (32, 32, 3)).astype(np.uint8)
        if path.suffix == '.png':
          _write_png(path, pixels)
        else:
          Image.fromarray(pixels).save(path, format='JPEG')
        created.append((path, pixels))
    ordered = sorted(created, key=lambda item: (item[0].parent.name, item[0].name))
    expected[split] = ([p for p, _ in ordered], [px for _, px in ordered],
                       np.array([sorted(_CLASSES).index(p.parent.name) for p, _ in ordered]))
  return expected


def _assert_images_as_written(images, paths, pixels):
  assert images.shape == (len(paths), 32, 32, 3) and images.dtype == np.uint8
  for image, path, want in zip(images, paths, pixels, strict=True):
    if path.suffix == '.png':  # JPEG is lossy: its shape and label are what can be checked.
      np.testing.assert_array_equal(image, want)


def test_image_folder_order_labels_and_pixels(tmp_path):
  expected = _write_image_folder(tmp_path)
  loaded = data_sources.load('image_folder', str(tmp_path))
  assert loaded.source == 'image_folder' and loaded.class_names == ('ant', 'moth', 'zebra')
  for split in ('train', 'test'):
    paths, pixels, labels = expected[split]
    np.testing.assert_array_equal(getattr(loaded, f'{split}_labels'), labels)
    assert getattr(loaded, f'{split}_labels').dtype == np.int32
    _assert_images_as_written(getattr(loaded, f'{split}_images'), paths, pixels)
  assert any(p.suffix == '.jpg' for p in expected['train'][0])


def _image_folder_config(data_dir, **overrides):
  config = default.get_config()
  config.update(dataset='image_folder', data_dir=str(data_dir), labeled_per_class=2)
  config.update(overrides)
  return config


def test_image_folder_statistics_come_from_the_training_images(tmp_path):
  expected = _write_image_folder(tmp_path, jpeg=False)
  train = np.stack(expected['train'][1]).astype(np.float64) / 255.0
  info = input_pipeline.load_split(_image_folder_config(tmp_path)).info
  assert info.num_classes == 3
  np.testing.assert_allclose(info.mean, train.mean(axis=(0, 1, 2)), rtol=0, atol=1e-9)
  np.testing.assert_allclose(info.std, train.std(axis=(0, 1, 2)), rtol=0, atol=1e-9)
  test = np.stack(expected['test'][1]).astype(np.float64) / 255.0
  assert not np.allclose(info.mean, test.mean(axis=(0, 1, 2)), rtol=1e-6)  # Not the test set's.
  given = _image_folder_config(tmp_path, image_mean=(0.1, 0.2, 0.3), image_std=(0.4, 0.5, 0.6))
  info = input_pipeline.load_split(given).info
  assert (info.mean, info.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


def test_image_folder_flips_by_default_and_can_be_switched_off(tmp_path):
  _write_image_folder(tmp_path, jpeg=False)
  assert input_pipeline.load_split(_image_folder_config(tmp_path)).info.random_flip
  off = input_pipeline.load_split(_image_folder_config(tmp_path, random_flip=False)).info
  assert not off.random_flip


def _reference_validation_indices(labels, labeled, k, seed):
  """The validation draw input_pipeline documents: RandomState(seed + 1), per class."""
  rng = np.random.RandomState(seed + 1)
  return np.sort(np.concatenate([
      rng.choice(np.setdiff1d(np.flatnonzero(labels == c), labeled), k, replace=False)
      for c in range(labels.max() + 1)]))


def test_image_folder_run_writes_split_json(tmp_path):
  expected = _write_image_folder(tmp_path / 'data')
  config = tiny_config(dataset='image_folder', data_dir=str(tmp_path / 'data'), image_size=32,
                       labeled_per_class=2, validation_per_class=1, labeled_batch_size=4,
                       unlabeled_batch_size=8, eval_batch_size=4, num_epochs=1)
  trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  record = json.loads((tmp_path / 'run' / 'split.json').read_text())
  assert set(record) == {'dataset', 'source', 'num_train', 'classes', 'labeled', 'validation'}
  labels = expected['train'][2]
  labeled = _reference_labeled_indices(labels, 2, 2)
  assert record['dataset'] == 'image_folder' and record['source'] == 'image_folder'
  assert record['num_train'] == 27 and record['classes'] == ['ant', 'moth', 'zebra']
  assert record['labeled'] == labeled.tolist()
  assert record['validation'] == _reference_validation_indices(labels, labeled, 1, 2).tolist()


def _cache_files(cache_root):
  return sorted(p.name for p in cache_root.iterdir()) if cache_root.exists() else []


def test_image_folder_cache_is_used_the_second_time(tmp_path, monkeypatch):
  expected = _write_image_folder(tmp_path, train_per_class=3, test_per_class=1)
  first = data_sources.load('image_folder', str(tmp_path))
  assert len(_cache_files(tmp_path / data_sources.CACHE_DIRNAME)) == 1

  def no_decoding(*args):
    raise AssertionError(f'decoded again: {args[0][:1]}')

  monkeypatch.setattr(data_sources, '_decode_all', no_decoding)
  second = data_sources.load('image_folder', str(tmp_path))
  np.testing.assert_array_equal(second.train_images, first.train_images)
  np.testing.assert_array_equal(second.test_labels, expected['test'][2])
  _assert_images_as_written(second.train_images, *expected['train'][:2])


def test_image_folder_cache_is_refreshed_when_a_file_changes(tmp_path):
  expected = _write_image_folder(tmp_path, train_per_class=3, test_per_class=1, jpeg=False)
  cache_root = tmp_path / data_sources.CACHE_DIRNAME
  data_sources.load('image_folder', str(tmp_path))
  (old_cache,) = _cache_files(cache_root)

  paths, pixels, _ = expected['train']
  changed = np.random.RandomState(9).randint(0, 256, (32, 32, 3)).astype(np.uint8)
  _write_png(paths[4], changed)
  mtime = os.stat(paths[4]).st_mtime + 100
  os.utime(paths[4], (mtime, mtime))
  reloaded = data_sources.load('image_folder', str(tmp_path))
  np.testing.assert_array_equal(reloaded.train_images[4], changed)
  _assert_images_as_written(reloaded.train_images, paths, [*pixels[:4], changed, *pixels[5:]])
  (new_cache,) = _cache_files(cache_root)
  assert new_cache != old_cache


@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_image_folder_damaged_cache_is_rebuilt(tmp_path, capsys, damage):
  expected = _write_image_folder(tmp_path, train_per_class=3, test_per_class=1)
  data_sources.load('image_folder', str(tmp_path))
  (cache,) = (tmp_path / data_sources.CACHE_DIRNAME).iterdir()
  raw = cache.read_bytes()
  cache.write_bytes(raw[:len(raw) // 2] if damage == 'truncated' else b'\x93NUMPY garbage')
  loaded = data_sources.load('image_folder', str(tmp_path))
  _assert_images_as_written(loaded.train_images, *expected['train'][:2])
  assert [p.name for p in (tmp_path / data_sources.CACHE_DIRNAME).iterdir()] == [cache.name]
  with np.load(cache) as rebuilt:  # Written afresh, and kept.
    np.testing.assert_array_equal(rebuilt['images'],
                                  np.concatenate([loaded.train_images, loaded.test_images]))
  (warning,) = [line for line in capsys.readouterr().err.splitlines() if 'warning' in line]
  assert str(cache) in warning and 'decoding the images again' in warning


def _cached_twice(root, capsys):
  """Loads `root` once, which writes its cache; returns the cache's path, stderr cleared."""
  data_sources.load('image_folder', str(root))
  (cache,) = (root / data_sources.CACHE_DIRNAME).iterdir()
  capsys.readouterr()
  return cache


def test_image_folder_cache_is_not_used_for_a_same_size_file_with_its_mtime_restored(tmp_path):
  expected = _write_image_folder(tmp_path, train_per_class=3, test_per_class=1, jpeg=False)
  data_sources.load('image_folder', str(tmp_path))
  paths, pixels, _ = expected['train']
  before = os.stat(paths[4])
  changed = pixels[4][::-1].copy()  # Another image of the same size, as `cp -p` would bring it.
  _write_png(paths[4], changed)
  os.utime(paths[4], ns=(before.st_atime_ns, before.st_mtime_ns))
  assert os.stat(paths[4]).st_size == before.st_size
  reloaded = data_sources.load('image_folder', str(tmp_path))
  np.testing.assert_array_equal(reloaded.train_images[4], changed)


@pytest.mark.parametrize('plant', ['other_owner', 'group_writable', 'world_writable_folder'])
def test_image_folder_cache_not_yours_alone_is_rebuilt_with_a_warning(tmp_path, capsys, plant):
  expected = _write_image_folder(tmp_path, train_per_class=3, test_per_class=1)
  cache = _cached_twice(tmp_path, capsys)
  with np.load(cache) as cached:
    planted = cached['images'].copy()
  planted[0] = 255 - planted[0]  # What someone else put there.
  with open(cache, 'wb') as f:
    np.savez(f, images=planted)
  if plant == 'other_owner':
    os.chown(cache, os.getuid() + 1, -1)
  elif plant == 'group_writable':
    os.chmod(cache, 0o664)
  else:
    os.chmod(cache.parent, 0o777)
  loaded = data_sources.load('image_folder', str(tmp_path))
  _assert_images_as_written(loaded.train_images, *expected['train'][:2])
  (warning,) = [line for line in capsys.readouterr().err.splitlines() if 'warning' in line]
  assert str(cache) in warning or str(cache.parent) in warning


def test_image_folder_cache_is_not_written_through_a_planted_link(tmp_path, capsys):
  expected = _write_image_folder(tmp_path / 'data', train_per_class=3, test_per_class=1)
  cache = _cached_twice(tmp_path / 'data', capsys)
  cache.unlink()
  victim = tmp_path / 'victim'
  victim.write_text('not to be overwritten')
  cache.symlink_to(victim)
  (cache.parent / (cache.name + '.tmp')).symlink_to(victim)  # Where a temporary used to go.
  loaded = data_sources.load('image_folder', str(tmp_path / 'data'))
  _assert_images_as_written(loaded.train_images, *expected['train'][:2])
  assert victim.read_text() == 'not to be overwritten'
  assert not cache.is_symlink() and cache.is_file()


def test_image_folder_decompression_bomb_cache_is_rebuilt_with_a_warning(tmp_path, capsys):
  expected = _write_image_folder(tmp_path, train_per_class=3, test_per_class=1)
  cache = _cached_twice(tmp_path, capsys)
  header = io.BytesIO()  # An .npy header claiming 3 TB of pixels, in a zip of a few hundred bytes.
  np.lib.format.write_array_header_1_0(
      header, {'descr': '|u1', 'fortran_order': False, 'shape': (1 << 20, 1 << 20, 3)})
  with zipfile.ZipFile(cache, 'w', zipfile.ZIP_DEFLATED) as archive:
    archive.writestr('images.npy', header.getvalue() + bytes(1 << 16))
  loaded = data_sources.load('image_folder', str(tmp_path))
  _assert_images_as_written(loaded.train_images, *expected['train'][:2])
  (warning,) = [line for line in capsys.readouterr().err.splitlines() if 'warning' in line]
  assert str(cache) in warning


def test_image_folder_with_an_unwritable_cache_dir_warns_and_loads(tmp_path, capsys):
  expected = _write_image_folder(tmp_path / 'data', train_per_class=3, test_per_class=1)
  not_a_folder = tmp_path / 'cache'
  not_a_folder.write_text('a file')
  for _ in range(2):
    loaded = data_sources.load('image_folder', str(tmp_path / 'data'),
                               cache_dir=str(not_a_folder))
    _assert_images_as_written(loaded.train_images, *expected['train'][:2])
    warnings = [line for line in capsys.readouterr().err.splitlines() if 'warning' in line]
    assert len(warnings) == 1 and str(not_a_folder) in warnings[0]
    assert 'config.cache_dir' in warnings[0]
  assert not_a_folder.read_text() == 'a file'
  assert not (tmp_path / 'data' / data_sources.CACHE_DIRNAME).exists()


def test_image_folder_cache_dir_holds_the_cache(tmp_path, monkeypatch):
  _write_image_folder(tmp_path / 'data', train_per_class=3, test_per_class=1)
  before = helpers.directory_contents(tmp_path / 'data')
  data_sources.load('image_folder', str(tmp_path / 'data'), cache_dir=str(tmp_path / 'cache'))
  assert len(_cache_files(tmp_path / 'cache')) == 1
  assert helpers.directory_contents(tmp_path / 'data') == before
  monkeypatch.setattr(data_sources, '_decode_all', lambda *args: pytest.fail('decoded again'))
  data_sources.load('image_folder', str(tmp_path / 'data'), cache_dir=str(tmp_path / 'cache'))


# Bad image folders through train.py: each a change to a good folder, and what the error says.
def _wrong_size(root):
  _write_png(root / 'train' / 'moth' / 'img_01.png', np.zeros((32, 31, 3), np.uint8))
  _write_png(root / 'train' / 'ant' / 'img_05.png', np.zeros((30, 32, 3), np.uint8))
  return f'{root / "train" / "ant" / "img_05.png"} is 32x30 pixels'


def _empty_class(root):
  (root / 'train' / 'beetle').mkdir()
  return f'class folder {root / "train" / "beetle"} is empty'


def _not_an_image(root):
  (root / 'train' / 'moth' / 'notes.txt').write_text('not an image')
  return f'{root / "train" / "moth" / "notes.txt"} is not a PNG or JPEG file'


def _damaged_image(root):
  (root / 'test' / 'zebra' / 'img_00.png').write_bytes(b'\x89PNG not really')
  return f'{root / "test" / "zebra" / "img_00.png"} cannot be read as an image'


def _no_test_folder(root):
  shutil.rmtree(root / 'test')
  return f'there is no {root / "test"}'


def _different_classes(root):
  (root / 'test' / 'ant').rename(root / 'test' / 'bee')
  return 'have different class folders'


@pytest.mark.parametrize('damage', [_wrong_size, _empty_class, _not_an_image, _damaged_image,
                                    _no_test_folder, _different_classes],
                         ids=lambda f: f.__name__.strip('_'))
def test_bad_image_folder_exits_2_with_one_line(train_cli, tmp_path, damage):
  _write_image_folder(tmp_path / 'data', train_per_class=6, test_per_class=1)
  message = damage(tmp_path / 'data')
  before = helpers.directory_contents(tmp_path)
  code, error_lines = train_cli(*TINY_COMMAND, '--config.dataset=image_folder',
                                '--config.image_size=32', f'--config.data_dir={tmp_path / "data"}',
                                f'--workdir={tmp_path / "run"}')
  assert code == 2
  assert len(error_lines) == 1 and message in error_lines[0], error_lines
  assert helpers.directory_contents(tmp_path) == before  # No workdir, no cache.


@pytest.mark.parametrize('dataset, data_dir', [('cifar10', 'empty'), ('svhn', 'empty'),
                                               ('cifar10', ''), ('image_folder', '')])
def test_data_dir_holding_no_source_exits_2_with_one_line(train_cli, tmp_path, monkeypatch,
                                                          dataset, data_dir):
  for module in ('tensorflow', 'tensorflow_datasets'):
    monkeypatch.setitem(sys.modules, module, None)  # As on a machine without them.
  if data_dir:
    (tmp_path / data_dir).mkdir()
    data_dir = str(tmp_path / data_dir)
  before = helpers.directory_contents(tmp_path)
  code, error_lines = train_cli(*TINY_COMMAND, f'--config.dataset={dataset}',
                                '--config.image_size=32', f'--config.data_dir={data_dir}',
                                f'--workdir={tmp_path / "run"}')
  assert code == 2 and len(error_lines) == 1, error_lines
  if dataset == 'image_folder':
    assert 'needs config.data_dir' in error_lines[0]
  else:
    assert 'pip install tensorflow-datasets' in error_lines[0]
    assert (f'{data_dir} holds no' if data_dir else 'config.data_dir is empty') in error_lines[0]
  assert helpers.directory_contents(tmp_path) == before


# --- Without TensorFlow -------------------------------------------------------------------------

# Runs train.py's main once per command in one process where TensorFlow and
# tfds cannot be imported (None in sys.modules: `import` fails with
# ModuleNotFoundError and `importlib.util.find_spec` answers None, as when
# they are not installed); then reads each workdir's TensorBoard events back.
NO_TENSORFLOW_DRIVER = textwrap.dedent('''
    import json, os, sys
    for module in ('tensorflow', 'tensorflow_datasets'):
      sys.modules[module] = None

    from absl import flags
    import train
    from lcmt_jax import errors

    commands, result_path = json.loads(sys.argv[1]), sys.argv[2]
    results = []
    for args in commands:
      argv = ['train.py', *args]
      flags.FLAGS.unparse_flags()
      for name in [n for n in flags.FLAGS if n.startswith('config.')]:
        delattr(flags.FLAGS, name)
      sys.argv = argv
      try:
        train.main(errors.parse_flags_or_exit(argv))
        code = 0
      except SystemExit as e:
        code = e.code
      results.append({'code': code})

    from tests import helpers
    for args, result in zip(commands, results):
      workdir = next(a.split('=', 1)[1] for a in args if a.startswith('--workdir='))
      board = os.path.join(workdir, 'tensorboard')
      if os.path.isdir(board):
        result['scalars'] = helpers.tensorboard_scalars(board)
    result_ok = all(sys.modules.get(m) is None for m in ('tensorflow', 'tensorflow_datasets'))
    with open(result_path, 'w') as f:
      json.dump({'runs': results, 'no_tensorflow': result_ok}, f)
''')


@pytest.mark.slow
def test_runs_without_tensorflow(tmp_path):
  _write_cifar10_pickles(tmp_path / 'cifar', per_file=10, test_size=10)
  cifar_flags = dict(width=8, labeled_per_class=1, labeled_batch_size=8, unlabeled_batch_size=16,
                     eval_batch_size=10, num_epochs=1, eval_every_epochs=1, lc_start=1,
                     progress_bar=False)
  commands = [
      [*TINY_COMMAND, f'--workdir={tmp_path / "quickstart"}'],
      ['--config=configs/cifar10.py', f'--config.data_dir={tmp_path / "cifar"}',
       *(f'--config.{k}={v}' for k, v in cifar_flags.items()), f'--workdir={tmp_path / "cifar10"}'],
      ['--config=configs/cifar10.py', '--config.data_dir=', f'--workdir={tmp_path / "tfds"}'],
  ]
  result = subprocess.run(
      [sys.executable, '-c', NO_TENSORFLOW_DRIVER, json.dumps(commands),
       str(tmp_path / 'out.json')],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads((tmp_path / 'out.json').read_text())
  assert out['no_tensorflow']
  assert [run['code'] for run in out['runs']] == [0, 0, 2], result.stderr[-3000:]
  for name, run in zip(('quickstart', 'cifar10'), out['runs']):
    records = (tmp_path / name / 'metrics.jsonl').read_text().splitlines()
    assert {json.loads(r)['kind'] for r in records} == {'train', 'eval'}
    helpers.assert_scalars_hold_the_records(tmp_path / name, run['scalars'])
  split = json.loads((tmp_path / 'cifar10' / 'split.json').read_text())
  assert split['source'] == 'cifar10_pickles' and split['num_train'] == 50
  error_lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(error_lines) == 1 and 'pip install tensorflow-datasets' in error_lines[0], error_lines
  assert 'config.data_dir is empty' in error_lines[0]
  assert not (tmp_path / 'tfds').exists()
