"""Data sets from disk as uint8 arrays, chosen by `config.dataset` and what `config.data_dir` holds.

| dataset | data_dir holds | read with |
|---|---|---|
| `cifar10` | `cifar-10-batches-py/` (or is it) | `cifar10_pickle`: opcodes read, no object built |
| `svhn` | `train_32x32.mat`, `test_32x32.mat` | `svhn_mat`: MAT v5 read with NumPy, sizes checked |
| `image_folder` | `train/<class>/*`, `test/<class>/*` (PNG, JPEG) | Pillow, once: then a cache |
| `cifar10`, `svhn` | anything else, or `''` | tensorflow-datasets, where installed |
| `digits` | - (embedded in scikit-learn) | scikit-learn |

Training images come in the order of the source's files (the reference's
label split indexes into that order); for image folders: class folders
sorted by name, then file names sorted within a class. Nothing here imports
TensorFlow or tfds unless the tfds source is chosen.
"""

import concurrent.futures
import dataclasses
import hashlib
import io
import os
import socket
import sys
import zipfile
from typing import Any, Callable

import numpy as np

from lcmt_jax import cifar10_pickle
from lcmt_jax import errors
from lcmt_jax import files
from lcmt_jax import svhn_mat
from lcmt_jax import tf_cpu

DATASETS = ('cifar10', 'svhn', 'image_folder', 'digits')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
CACHE_DIRNAME = '.lcmt_jax_cache'
_CIFAR10_FOLDER = 'cifar-10-batches-py'
_CIFAR10_TRAIN_FILES = tuple(f'data_batch_{i}' for i in range(1, 6))
_CIFAR10_FILES = (*_CIFAR10_TRAIN_FILES, 'test_batch')
_SVHN_FILES = ('train_32x32.mat', 'test_32x32.mat')
# tfds name and the host its files are downloaded from, per data set.
_TFDS_SOURCES = {'cifar10': ('cifar10', 'www.cs.toronto.edu'),
                 'svhn': ('svhn_cropped', 'ufldl.stanford.edu')}
_PROBE_TIMEOUT_S = 3.0
_DIGITS_TEST_SIZE = 500


class DatasetNotFoundError(errors.UserInputError):
  """The data set is not on disk and cannot be downloaded from here."""


class DatasetUnreadableError(errors.UserInputError):
  """The data set's files are damaged, incomplete or not what the format holds."""


@dataclasses.dataclass(frozen=True)
class TrainTest:
  """A data set's training and test images (uint8 NHWC) and labels (int32), as read."""

  source: str  # Which reader produced it: see `SOURCES`.
  class_names: tuple[str, ...]
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


SOURCES = ('cifar10_pickles', 'svhn_mat', 'image_folder', 'tfds', 'digits')
_CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                    'ship', 'truck')
_DIGIT_CLASSES = tuple(str(d) for d in range(10))


def load(dataset: str, data_dir: str, *, image_size: int = 32, cache_dir: str = '') -> TrainTest:
  """Reads `dataset` from the source that `data_dir` holds (module docstring)."""
  if dataset not in DATASETS:
    raise errors.UserInputError(f'unknown data set {dataset!r}: set config.dataset to one of '
                                f'{list(DATASETS)}')
  if data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise errors.UserInputError(f'config.data_dir {data_dir!r} is a file, not a directory: set it '
                                'to the folder that holds the data set')
  if dataset == 'digits':
    return _load_digits(image_size)
  if dataset == 'image_folder':
    return load_image_folder(data_dir, image_size=image_size, cache_dir=cache_dir)
  if dataset == 'cifar10':
    folder = _cifar10_folder(data_dir)
    if folder:
      return read_cifar10_pickles(folder)
  if dataset == 'svhn' and data_dir and any(
      os.path.exists(os.path.join(data_dir, name)) for name in _SVHN_FILES):
    return read_svhn_mat(data_dir)
  return _load_tfds(dataset, data_dir)


def _looked_for(dataset: str) -> str:
  return {'cifar10': f'{_CIFAR10_FOLDER}/', 'svhn': ' and '.join(_SVHN_FILES)}[dataset]


# --- CIFAR-10 python pickles --------------------------------------------------------------------

def _cifar10_folder(data_dir: str) -> str | None:
  """`data_dir/cifar-10-batches-py`, or `data_dir` itself when it holds the batches."""
  if not data_dir:
    return None
  for folder in (os.path.join(data_dir, _CIFAR10_FOLDER), data_dir):
    if os.path.isdir(folder) and (folder != data_dir or any(
        os.path.exists(os.path.join(folder, name)) for name in _CIFAR10_FILES)):
      return folder
  return None


def _read_file(path: str, read: Callable[[str], Any], what: str, remedy: str,
               damaged: tuple[type[Exception], ...]) -> Any:
  """`read(path)`, with a missing file and a damaged one each said in one line with `remedy`.

  `damaged` lists what `read` raises for a file that is damaged, truncated or not
  in its format; each means the same to the user. Anything else is a bug and
  keeps its traceback.
  """
  if not os.path.isfile(path):
    raise DatasetUnreadableError(f'{path} is missing: {remedy}')
  try:
    return read(path)
  # These say what is wrong in their own words.
  except (cifar10_pickle.NotABatchError, svhn_mat.MatFileError) as e:
    raise DatasetUnreadableError(f'{path} is not {what}: {e}; {remedy}') from None
  except damaged as e:
    raise DatasetUnreadableError(f'{path} cannot be read as {what} ({type(e).__name__}): it is '
                                 f'damaged or truncated; {remedy}') from e


def _read_bytes(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()  # From memory, a damaged length field cannot ask for gigabytes.


def _read_cifar10_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """One batch file: uint8 rows (N, 3072, channel-major) and labels, as NHWC images and labels."""
  rows, labels = _read_file(
      path, lambda p: cifar10_pickle.read_batch(_read_bytes(p)), 'a CIFAR-10 batch',
      'replace it with the file from cifar-10-python.tar.gz (a cifar-10-batches-py/ folder '
      f'needs {", ".join(_CIFAR10_FILES)})', (OSError,))
  images = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # Channel planes to NHWC.
  return np.ascontiguousarray(images), labels


def read_cifar10_pickles(folder: str) -> TrainTest:
  """`data_batch_1..5` then `test_batch`, each a pickled dict of uint8 rows and labels.

  The files come from Python 2 (keys are bytes once loaded); their order is the
  reference's training order, which its seeded label split indexes.
  """
  batches = [_read_cifar10_batch(os.path.join(folder, name)) for name in _CIFAR10_FILES]
  train_images, train_labels = (np.concatenate(a) for a in zip(*batches[:-1]))
  return TrainTest('cifar10_pickles', _CIFAR10_CLASSES, train_images, train_labels, *batches[-1])


def _read_svhn_file(path: str) -> tuple[np.ndarray, np.ndarray]:
  """`X` (32, 32, 3, N) uint8 and `y` (N, 1) in 1..10, as NHWC images and labels 0..9."""
  mat = _read_file(path, lambda p: svhn_mat.read_numeric_arrays(p, ('X', 'y')),
                   'a MAT-file of version 5 to 7',
                   f'SVHN needs both {" and ".join(_SVHN_FILES)} in config.data_dir; download '
                   'them from http://ufldl.stanford.edu/housenumbers/', (OSError,))
  images, labels = mat.get('X'), mat.get('y')
  if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
          and images.shape[:3] == (32, 32, 3) and isinstance(labels, np.ndarray)
          and labels.size == images.shape[3] and np.issubdtype(labels.dtype, np.number)):
    raise DatasetUnreadableError(
        f'{path} is not an SVHN file: it must hold uint8 "X" of shape (32, 32, 3, N) and N '
        'labels "y"; download it again from http://ufldl.stanford.edu/housenumbers/')
  labels = labels.reshape(-1)
  if not np.all((labels == np.round(labels)) & (labels >= 0) & (labels <= 10)):
    raise DatasetUnreadableError(f'{path} holds labels that are not digits (1..10, or 0): '
                                 'download it again from http://ufldl.stanford.edu/housenumbers/')
  labels = labels.astype(np.int32)
  labels[labels == 10] = 0  # SVHN writes the digit 0 as 10; the reference maps it back.
  return np.ascontiguousarray(images.transpose(3, 0, 1, 2)), labels


def read_svhn_mat(folder: str) -> TrainTest:
  """`train_32x32.mat` and `test_32x32.mat`; label 10 is the digit 0."""
  train, test = (_read_svhn_file(os.path.join(folder, name)) for name in _SVHN_FILES)
  return TrainTest('svhn_mat', _DIGIT_CLASSES, *train, *test)


# --- Image folders ------------------------------------------------------------------------------

def _list_split(data_dir: str, split: str) -> tuple[list[str], list[list[str]]]:
  """Class names (sorted) and each class's image files (sorted), checked for what they hold."""
  root = os.path.join(data_dir, split)
  if not os.path.isdir(root):
    raise DatasetNotFoundError(
        f'config.dataset=image_folder needs {root}/<class>/<image files>, and there is no {root}: '
        'set config.data_dir to a folder holding train/ and test/')
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
  if not classes:
    raise DatasetNotFoundError(f'{root} holds no class folders: put the images of each class '
                               f'into {root}/<class name>/')
  files = []
  for name in classes:
    folder = os.path.join(root, name)
    entries = sorted(e.name for e in os.scandir(folder) if not e.name.startswith('.'))
    others = [e for e in entries if os.path.splitext(e)[1].lower() not in IMAGE_EXTENSIONS]
    if others:
      raise DatasetUnreadableError(
          f'{os.path.join(folder, others[0])} is not a PNG or JPEG file: image folders hold '
          f'only {"/".join(IMAGE_EXTENSIONS)} files; move it out')
    if not entries:
      raise DatasetUnreadableError(f'class folder {folder} is empty: put its images there or '
                                   'remove the folder')
    files.append([os.path.join(folder, e) for e in entries])
  return classes, files


def _fingerprint(data_dir: str, paths: list[str], image_size: int) -> str:
  """A hash of every file's path, size, mtime, inode and ctime: a changed folder changes it.

  `cp -p`, `rsync -t` and `tar x` restore a replaced file's mtime (and a file of
  the same size keeps its size), but none can restore its inode number or ctime,
  which the kernel sets on every write or rename. This costs one stat per file;
  a hash of the contents would be as safe against that, but would read every
  image on every load, the work the cache exists to skip.
  """
  digest = hashlib.sha256(f'v2 {image_size}'.encode())
  for path in paths:
    stat = os.stat(path)
    digest.update(f'\0{os.path.relpath(path, data_dir)}\0{stat.st_size}\0{stat.st_mtime_ns}'
                  f'\0{stat.st_ino}\0{stat.st_ctime_ns}'.encode())
  return digest.hexdigest()[:20]


def _decode_image(path: str, image_size: int) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(path) as image:
      array = np.asarray(image.convert('RGB'))
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
          Image.DecompressionBombError) as e:
    raise DatasetUnreadableError(f'{path} cannot be read as an image ({type(e).__name__}): '
                                 'replace or remove it') from e
  if array.shape != (image_size, image_size, 3):
    raise DatasetUnreadableError(
        f'{path} is {array.shape[1]}x{array.shape[0]} pixels, not the {image_size}x{image_size} '
        f'of config.image_size: resize the images or set config.image_size')
  return array


def _decode_all(paths: list[str], image_size: int) -> np.ndarray:
  """Decodes in threads (Pillow releases the GIL while decoding); the first bad file fails."""
  images = np.empty((len(paths), image_size, image_size, 3), np.uint8)
  with concurrent.futures.ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
    for i, array in enumerate(pool.map(lambda p: _decode_image(p, image_size), paths)):
      images[i] = array
  return images


def load_image_folder(data_dir: str, *, image_size: int, cache_dir: str = '') -> TrainTest:
  """`train/<class>/*` and `test/<class>/*`, decoded once into a uint8 cache checked on every load.

  The cache (`<cache_dir or data_dir/.lcmt_jax_cache>/image_folder-<folder>-<fingerprint>.npz`)
  is used while every file keeps its path, size and modification time; otherwise the
  folder is decoded again and the old cache replaced. A data folder that cannot be
  written to is read without a cache, with a warning.
  """
  if not data_dir:
    raise DatasetNotFoundError('config.dataset=image_folder needs config.data_dir: the folder '
                               'that holds train/<class>/ and test/<class>/')
  classes, train_files = _list_split(data_dir, 'train')
  test_classes, test_files = _list_split(data_dir, 'test')
  if test_classes != classes:
    extra = sorted(set(test_classes) ^ set(classes))
    raise DatasetUnreadableError(
        f'{data_dir}/train and {data_dir}/test have different class folders ({extra[0]!r} is in '
        'only one): give both the same classes')
  paths = [p for files in train_files + test_files for p in files]
  cache_root = cache_dir or os.path.join(data_dir, CACHE_DIRNAME)
  folder_id = hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:8]
  cache_path = os.path.join(cache_root,
                            f'image_folder-{folder_id}-'
                            f'{_fingerprint(data_dir, paths, image_size)}.npz')
  images = _read_cache(cache_path, (len(paths), image_size, image_size, 3))
  if images is None:
    images = _decode_all(paths, image_size)
    _write_cache(cache_root, cache_path, f'image_folder-{folder_id}-', images)
  labels = np.concatenate([np.full(len(f), c, np.int32) for c, f in enumerate(train_files)]
                          + [np.full(len(f), c, np.int32) for c, f in enumerate(test_files)])
  num_train = sum(map(len, train_files))
  return TrainTest('image_folder', tuple(classes), images[:num_train], labels[:num_train],
                   images[num_train:], labels[num_train:])


class _UntrustedCacheError(ValueError):
  """The cache, or its folder, is not this user's alone: anyone else could have written it."""


def _check_owned(path: str) -> None:
  """Refuses `path` unless the current user owns it and no one else may write to it."""
  stat = os.lstat(path)
  if stat.st_uid != os.getuid() or stat.st_mode & 0o022:
    raise _UntrustedCacheError(f'{path} is owned by uid {stat.st_uid} with mode '
                               f'{stat.st_mode & 0o777:o}, not yours and private')


def _read_cache(cache_path: str, shape: tuple[int, ...]) -> np.ndarray | None:
  """The cached images, or None (with a warning, unless there is none) to decode the folder again.

  The cache is trusted only when this user owns it and its folder and no one
  else can write either; it is read without pickle, and its header's shape and
  dtype are checked before any pixel is allocated, so a planted file (or a
  decompression bomb) costs a rebuild, not the run.
  """
  if not os.path.lexists(cache_path):
    return None
  try:
    _check_owned(os.path.dirname(cache_path))
    _check_owned(cache_path)
    with open(cache_path, 'rb', opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW)) as f, \
        zipfile.ZipFile(f) as archive, archive.open('images.npy') as member:
      read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                     (2, 0): np.lib.format.read_array_header_2_0}.get(
                         np.lib.format.read_magic(member))
      header = read_header(member) if read_header else 'an unknown .npy version'
      if header != (shape, False, np.dtype(np.uint8)):
        raise ValueError(f'it holds {header}, not uint8 images of shape {shape}')
      images = np.empty(shape, np.uint8)  # The folder's shape: the file cannot choose it.
      if member.readinto(memoryview(images).cast('B')) != images.size or member.read(1):
        raise ValueError('its pixel data is not the size of its header')
      return images
  # What a damaged, planted or oversized cache raises: each means decoding the folder again.
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, MemoryError) as e:
    print(f'warning: not using the decoded-image cache {cache_path} ({type(e).__name__}: '
          f'{str(e).splitlines()[0] if str(e) else "unreadable"}); decoding the images again',
          file=sys.stderr)
    return None


def _write_cache(cache_root: str, cache_path: str, prefix: str, images: np.ndarray) -> None:
  """Writes the cache atomically (never through a planted link) and removes older caches."""
  try:
    os.makedirs(cache_root, mode=0o755, exist_ok=True)
    stale = [n for n in os.listdir(cache_root)
             if n.startswith(prefix) and n != os.path.basename(cache_path)]
    buffer = io.BytesIO()
    np.savez(buffer, images=images)
    files.write_atomically(cache_path, buffer.getvalue(), mode=0o644)
    for name in stale:
      os.remove(os.path.join(cache_root, name))
  except OSError as e:
    print(f'warning: cannot write the decoded-image cache in {cache_root} ({e.strerror}); '
          'set config.cache_dir to a writable folder to skip decoding next time',
          file=sys.stderr)


# --- tensorflow-datasets ------------------------------------------------------------------------

def _load_tfds(dataset: str, data_dir: str) -> TrainTest:
  tfds_name, host = _TFDS_SOURCES[dataset]
  try:
    tf = tf_cpu.import_tensorflow()
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    from google.protobuf import json_format  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    where = (f'{data_dir} holds no {_looked_for(dataset)}' if data_dir
             else 'config.data_dir is empty')
    # A broken install raises a plain ImportError with no module name.
    why = (f'{e.name} is not installed' if e.name else
           f'importing it failed: {(str(e).strip().splitlines() or [type(e).__name__])[0]}')
    raise DatasetNotFoundError(
        f'{where}, and the tfds source cannot be used ({why}): set '
        f'config.data_dir to a folder holding {_looked_for(dataset)}, or run `pip install '
        'tensorflow-datasets tensorflow-cpu`') from e
  data_dir = data_dir or None
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  # What a damaged dataset_info.json raises: text that is not the JSON expected
  # (ParseError), bytes that are not UTF-8 (UnicodeDecodeError, rewrapped by tfds
  # as RuntimeError), a file that cannot be read (tfds's DatasetInfoFileError, an
  # OSError), a version (AssertionError) or file format (ValueError) the code lacks.
  except (json_format.ParseError, RuntimeError, OSError, AssertionError, ValueError) as e:
    root = data_dir or tfds.core.constants.DATA_DIR
    version = tfds.builder_cls(tfds_name).VERSION
    raise _tfds_unreadable_error(tfds_name, os.path.join(root, tfds_name, str(version)), e) from e
  # Without a network, tfds retries a download for minutes before failing.
  if not builder.is_prepared():
    if not network_reachable(host):
      root = builder.data_dir_root
      raise DatasetNotFoundError(
          f'Data set {tfds_name!r} is not prepared in {builder.data_dir}, {root} holds no '
          f'{_looked_for(dataset)}, and {host} cannot be reached to download it. Put '
          f'{_looked_for(dataset)} into config.data_dir, or on a machine with a network run '
          '`python -c "import tensorflow_datasets as tfds; '
          f"tfds.builder('{tfds_name}', data_dir='{root}').download_and_prepare()\"`, "
          f'then copy the folder {root}/{tfds_name} into the directory given as config.data_dir '
          'here.')
    builder.download_and_prepare()
  try:
    return TrainTest('tfds', _class_names(dataset), *_read_tfds_split(tfds, builder, 'train'),
                     *_read_tfds_split(tfds, builder, 'test'))
  # What damaged record files raise: truncated or garbage records (DataLossError),
  # fewer records than dataset_info.json counts (FailedPreconditionError), a
  # missing file (NotFoundError).
  except (tf.errors.DataLossError, tf.errors.FailedPreconditionError, tf.errors.NotFoundError) as e:
    raise _tfds_unreadable_error(tfds_name, builder.data_dir, e) from e


def _class_names(dataset: str) -> tuple[str, ...]:
  return _CIFAR10_CLASSES if dataset == 'cifar10' else _DIGIT_CLASSES


def _tfds_unreadable_error(tfds_name: str, version_dir: str,
                           error: Exception) -> DatasetUnreadableError:
  return DatasetUnreadableError(
      f'Data set {tfds_name!r} in {version_dir} cannot be read ({type(error).__name__}): '
      f'its files are damaged or incomplete. Delete {version_dir} and run again to '
      'download and prepare it afresh.')


def network_reachable(host: str) -> bool:
  try:
    with socket.create_connection((host, 443), timeout=_PROBE_TIMEOUT_S):
      return True
  except OSError:
    return False


def _read_tfds_split(tfds: Any, builder: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
  # Batched iteration, not `batch_size=-1`, which aborts under tfds's mock_data.
  ids, images, labels = [], [], []
  for batch in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False).batch(1024)):
    ids.append(batch['id'])
    images.append(batch['image'])
    labels.append(batch['label'])
  # tfds stores examples in hashed order; the zero-padded ids ('train_00042')
  # sort back to the file order the reference (torchvision, scipy) reads.
  order = np.argsort(np.concatenate(ids), kind='stable')
  return (np.concatenate(images)[order].astype(np.uint8),
          np.concatenate(labels)[order].astype(np.int32))


# --- The embedded digits ------------------------------------------------------------------------

def _load_digits(image_size: int = 32) -> TrainTest:
  """scikit-learn's 8x8 digits as uint8 RGB images: a real data set offline.

  Each pixel becomes an `image_size // 8` square block (32x32 by default;
  16x16 runs the network four times faster, as the tests do).
  """
  from sklearn import datasets, model_selection  # pylint: disable=import-outside-toplevel

  digits = datasets.load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)
  scale = image_size // 8
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  train_idx, test_idx = model_selection.train_test_split(
      np.arange(len(labels)), test_size=_DIGITS_TEST_SIZE, stratify=labels, random_state=0)
  train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
  return TrainTest('digits', _DIGIT_CLASSES, images[train_idx], labels[train_idx],
                   images[test_idx], labels[test_idx])
