"""Tests for lcmt_jax.svhn_mat: the MAT-files SVHN comes in, and damaged or hostile ones.

The oracle for a valid file is `scipy.io.loadmat(..., mat_dtype=True)`, on files
written by `scipy.io.savemat` or by `_mat_file` below (the spec's layout, written
by hand, for what savemat never writes: big-endian files, doubles stored in
smaller types). Damaged files are loaded in child processes under a memory
limit, so a crash or a runaway allocation is seen and attributed to its file;
scipy, which crashes on some of them, runs there too, after the reader and
behind its own marker.
"""

import io
import json
import os
import struct
import time
import traceback
import zlib

import numpy as np
import pytest
from scipy import io as scipy_io

from lcmt_jax import svhn_mat
from tests import helpers

_NAMES = ('X', 'y')
# miINT8..miUINT64: the data element types of numeric data; the array classes by dtype.
_STORAGE_TYPES = {'i1': 1, 'u1': 2, 'i2': 3, 'u2': 4, 'i4': 5, 'u4': 6, 'f4': 7, 'f8': 9,
                  'i8': 12, 'u8': 13}
_CLASSES = {'f8': 6, 'f4': 7, 'i1': 8, 'u1': 9, 'i2': 10, 'u2': 11, 'i4': 12, 'u4': 13,
            'i8': 14, 'u8': 15}
_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED = 1, 5, 6, 14, 15


def _element(kind, data, order, small=True):
  """A data element: the small format when it fits in 4 bytes, else a tag and padded data."""
  if small and len(data) <= 4:
    return struct.pack(order + 'I', len(data) << 16 | kind) + data.ljust(4, b'\0')
  return struct.pack(order + 'II', kind, len(data)) + data + b'\0' * (-len(data) % 8)


def _variable(name, array, order='<', storage=None, compress=False, flags=0, data_type=None,
              dims=None, inflated_extra=b''):
  """One variable as MATLAB writes it; the keywords forge what a damaged file holds."""
  array = np.asarray(array)
  storage = np.dtype(storage or array.dtype)
  array_class = _CLASSES[array.dtype.str[1:]]
  data = np.asarray(array, storage.newbyteorder(order)).tobytes(order='F')
  body = (_element(_MI_UINT32, struct.pack(order + 'II', array_class | flags << 8, 0), order,
                   small=False)
          + _element(_MI_INT32, struct.pack(f'{order}{array.ndim}i', *(dims or array.shape)),
                     order)
          + _element(_MI_INT8, name.encode(), order)
          + _element(data_type or _STORAGE_TYPES[storage.str[1:]], data, order))
  matrix = struct.pack(order + 'II', _MI_MATRIX, len(body)) + body
  if not compress:
    return matrix
  packed = zlib.compress(matrix + inflated_extra)
  return struct.pack(order + 'II', _MI_COMPRESSED, len(packed)) + packed


def _mat_file(*variables, order='<', version=0x0100):
  header = b'MATLAB 5.0 MAT-file, written by tests/test_svhn_mat.py'.ljust(116) + bytes(8)
  return header + struct.pack(order + 'H', version) + (b'IM' if order == '<' else b'MI') + b''.join(
      variables)


def _svhn_arrays(n, y_dtype=np.float64, seed=0):
  rng = np.random.RandomState(seed)
  return (rng.randint(0, 256, (32, 32, 3, n)).astype(np.uint8),
          (rng.permutation(n) % 10 + 1).astype(y_dtype)[:, None])


def _savemat_bytes(variables, compress):
  buffer = io.BytesIO()
  scipy_io.savemat(buffer, variables, format='5', do_compression=compress, oned_as='column')
  return buffer.getvalue()


def _loadmat(path):
  return scipy_io.loadmat(path, variable_names=_NAMES, mat_dtype=True)


def _assert_same_arrays(ours, theirs):
  assert set(ours) == set(_NAMES) and set(theirs) >= set(_NAMES)
  for name in _NAMES:
    assert ours[name].shape == theirs[name].shape
    assert ours[name].dtype == theirs[name].dtype.newbyteorder('=')  # scipy keeps the file's order.
    np.testing.assert_array_equal(ours[name], theirs[name])


_EXTRAS = {'before': np.eye(3), 'text': 'not a number', 'cell': np.array([1, 'a'], dtype=object),
           'struct': {'a': np.arange(4)}, 'after': np.arange(7, dtype=np.int16)}


@pytest.mark.parametrize('n', [1, 5])  # N=1 stores y in the small format (uint8), N=5 not.
@pytest.mark.parametrize('y_dtype', [np.float64, np.uint8])
@pytest.mark.parametrize('compress', [False, True])
def test_reads_savemat_files_as_loadmat_reads_them(tmp_path, compress, y_dtype, n):
  x, y = _svhn_arrays(n, y_dtype)
  path = tmp_path / 'train_32x32.mat'
  path.write_bytes(_savemat_bytes({'before': _EXTRAS['before'], 'text': _EXTRAS['text'],
                                   'cell': _EXTRAS['cell'], 'X': x, 'struct': _EXTRAS['struct'],
                                   'y': y, 'after': _EXTRAS['after']}, compress))
  ours = svhn_mat.read_numeric_arrays(str(path), _NAMES)
  _assert_same_arrays(ours, _loadmat(str(path)))
  np.testing.assert_array_equal(ours['X'], x)
  np.testing.assert_array_equal(ours['y'], y)
  assert ours['X'].flags.writeable and ours['y'].dtype == y_dtype


@pytest.mark.parametrize('compress', [False, True])
@pytest.mark.parametrize('order', ['<', '>'])
@pytest.mark.parametrize('storage', list(_STORAGE_TYPES))
def test_doubles_in_every_storage_type_and_byte_order(tmp_path, storage, order, compress):
  """MATLAB stores a double array of small integers in the smallest type that holds them."""
  x, y = _svhn_arrays(6)
  path = tmp_path / 'test_32x32.mat'
  path.write_bytes(_mat_file(_variable('extra', np.arange(5.0)[None], order, compress=compress),
                             _variable('X', x, order, compress=compress),
                             _variable('y', y, order, storage=storage, compress=compress),
                             order=order))
  ours = svhn_mat.read_numeric_arrays(str(path), _NAMES)
  _assert_same_arrays(ours, _loadmat(str(path)))
  np.testing.assert_array_equal(ours['y'], y)
  assert ours['y'].dtype == np.float64 and ours['y'].dtype.isnative


def test_hand_written_file_matches_savemat_byte_for_byte():
  """The test's writer lays out files as scipy does: what its other files are checked by."""
  x, y = _svhn_arrays(3)
  assert (_mat_file(_variable('X', x), _variable('y', y))[128:]
          == _savemat_bytes({'X': x, 'y': y}, compress=False)[128:])


@pytest.mark.filterwarnings('ignore:Duplicate variable name')  # scipy's, on the second y.
def test_first_variable_of_a_name_counts_and_absent_names_are_absent(tmp_path):
  x, y = _svhn_arrays(2)
  path = tmp_path / 'a.mat'
  path.write_bytes(_mat_file(_variable('y', y), _variable('y', y + 1), _variable('z', x)))
  ours = svhn_mat.read_numeric_arrays(str(path), _NAMES)
  theirs = _loadmat(str(path))
  assert set(ours) == {'y'} and 'X' not in theirs
  np.testing.assert_array_equal(ours['y'], theirs['y'])
  np.testing.assert_array_equal(ours['y'], y)


def test_v73_hdf5_file_is_refused_saying_so(tmp_path):
  """MATLAB's -v7.3: an HDF5 file whose 512-byte user block starts with the MAT header."""
  h5py = pytest.importorskip('h5py')
  path = tmp_path / 'train_32x32.mat'
  with h5py.File(path, 'w', userblock_size=512) as f:
    f['X'] = np.zeros((2, 3, 32, 32), np.uint8)
  with open(path, 'r+b') as f:
    f.write(_mat_file(order='<', version=0x0200).replace(b'5.0', b'7.3'))
  with pytest.raises(NotImplementedError, match='v7.3'):
    scipy_io.loadmat(str(path))
  with pytest.raises(svhn_mat.MatFileError, match=r'v7\.3 MAT-file \(HDF5\)'):
    svhn_mat.read_numeric_arrays(str(path), _NAMES)


def _damaged_x(compress, **forged):
  x, y = _svhn_arrays(2)
  return _mat_file(_variable('X', x, compress=compress, **forged),
                   _variable('y', y, compress=compress))


def _bomb():
  """A compressed X whose dims claim 4 GiB, with a short real stream behind a forged size."""
  matrix = _variable('X', np.zeros((32, 32, 3, 1), np.uint8), dims=(32, 32, 3, 1398101))
  matrix = (struct.pack('<II', _MI_MATRIX, 0xffff_fff0) + matrix[8:56]  # Tag, flags, dims, name.
            + struct.pack('<II', 2, 3072 * 1398101) + matrix[64:])
  packed = zlib.compress(matrix)
  return _mat_file(struct.pack('<II', _MI_COMPRESSED, len(packed)) + packed)


# Files forged from the patterns that crashed `scipy.io.loadmat` in the fuzz (samples u0175,
# u0529: segfault; u0412: bus error), and other hostile ones, with what the reader says.
CRAFTED = {
    **{f'{name}_{"compressed" if compress else "stored"}': (
        _damaged_x(compress, **forged), message)
       for compress in (False, True) for name, forged, message in (
           ('data_type_42', {'data_type': 42}, "the data of its 'X' is of type 42"),  # u0175
           ('data_type_0x8502', {'data_type': 0x8502}, 'is of type 34050'),  # u0412
           ('complex_flag_without_imaginary_part', {'flags': 0xf9}, "its 'X' is complex"),  # u0529
           ('dims_beyond_the_data', {'dims': (32, 32, 3, 1 << 30)}, 'needs 3298534883328 bytes'),
           ('negative_dims', {'dims': (32, 32, -3, 2)}, "its 'X' has negative dims"),
           ('integer_class_stored_as_double', {'storage': 'f8'}, 'holds floating-point data'),
       )},
    'zip_bomb_dims': (_bomb(), 'inflates to fewer bytes than its elements declare'),
    'variable_past_the_end': (_mat_file(struct.pack('<II', _MI_MATRIX, 1 << 31) + bytes(64)),
                              'claims 2147483648 bytes, past the end of the file'),
    'small_element_of_8_bytes': (_mat_file(_variable('X', np.zeros((1, 1), np.uint8))[:48]
                                           + struct.pack('<I', 8 << 16 | 2) + bytes(12)),
                                 'a small data element claims 8 bytes'),
    'x_is_a_cell': (_savemat_bytes({'X': _EXTRAS['cell']}, False), "its 'X' is a cell array"),
    'v4': (b'\0\0\0\0' + _damaged_x(False)[4:], 'not a MAT-file of version 5 or later'),
    'no_endian_marker': (_damaged_x(False)[:126] + b'XX' + _damaged_x(False)[128:],
                         'no MAT-file endian marker'),
    'v73_header': (_mat_file(version=0x0200) + bytes(400), 'v7.3 MAT-file (HDF5)'),
    'truncated_header': (_damaged_x(False)[:100], 'shorter than a MAT-file header'),
    'not_zlib': (_mat_file(struct.pack('<II', _MI_COMPRESSED, 16) + b'\x78\x9c' + bytes(14)),
                 'a compressed variable is damaged (zlib'),
}


def _load_each(paths):
  """The child process: loads each file under a memory limit, one JSON line per file.

  `start I` goes out before the reader reads file I, `scipy I` before scipy
  (the oracle) reads a file the reader loaded, so a crash is attributed to the
  reader or to scipy. The limit is this process's address space now plus
  16 MiB and 32 times the largest file: the reader keeps within a few times a
  file's size (a compressed file's data may inflate 1032-fold, and these hold
  random pixels).
  """
  helpers.cap_address_space(paths)
  for i, path in enumerate(paths):
    print(f'start {i}', flush=True)
    result = {'i': i}
    try:
      ours = svhn_mat.read_numeric_arrays(path, _NAMES)
      result['loaded'] = sorted(ours)
      result['consistent'] = all(a.ndim >= 2 and a.dtype.isnative for a in ours.values())
    except svhn_mat.MatFileError as e:
      result['refused'] = str(e)
    except BaseException as e:  # pylint: disable=broad-except  # What the test reports.
      result['other'] = ''.join(traceback.format_exception_only(e)).strip()[-300:]
    if 'loaded' in result:
      print(json.dumps(result), flush=True)
      print(f'scipy {i}', flush=True)
      try:
        theirs = scipy_io.loadmat(path, variable_names=_NAMES, mat_dtype=True)
        result['same'] = set(ours) == set(_NAMES) & set(theirs) and all(
            a.shape == theirs[n].shape and np.array_equal(a, theirs[n], equal_nan=True)
            for n, a in ours.items())
        result['scipy'] = 'loaded'
      except Exception as e:  # pylint: disable=broad-except  # Any refusal by scipy.
        result['scipy'] = type(e).__name__
    print(json.dumps(result), flush=True)


def _load_in_children(paths, per_child=1000):
  """`{path: result}` from `_load_each` in child processes (`helpers.load_in_children`)."""
  return helpers.load_in_children('test_svhn_mat', paths, per_child)


@pytest.fixture(scope='module')
def crafted_results(tmp_path_factory):
  """Every crafted file's result, from one child process."""
  folder = tmp_path_factory.mktemp('crafted')
  for name, (raw, _) in CRAFTED.items():
    (folder / name).write_bytes(raw)
  results = _load_in_children([str(folder / name) for name in CRAFTED])
  return {os.path.basename(path): result for path, result in results.items()}


@pytest.mark.parametrize('name', list(CRAFTED))
def test_crafted_file_is_refused_in_one_line(name, crafted_results):
  result, message = crafted_results[name], CRAFTED[name][1]
  assert 'refused' in result, result
  assert '\n' not in result['refused'] and message in result['refused'], result


def test_skipped_compressed_variable_is_not_inflated(tmp_path):
  """Only a skipped variable's header is inflated: damage past it, or 64 MiB of zeros, is unread."""
  x, y = _svhn_arrays(2)
  skipped = _variable('big', np.zeros((1 << 20, 16), np.uint8), compress=True)
  damaged = skipped[:60] + bytes(len(skipped) - 60)  # The zlib stream is broken after its header.
  path = tmp_path / 'a.mat'
  path.write_bytes(_mat_file(damaged, _variable('X', x, compress=True, inflated_extra=bytes(
      64 << 20)), _variable('y', y)))
  result = _load_in_children([str(path)])[str(path)]
  assert result.get('loaded') == ['X', 'y'], result


def _structure_positions(raw):
  """Offsets outside the pixel data of `raw`'s X, where there is one: tags, flags, dims, names."""
  order = '>' if raw[126:128] == b'MI' else '<'
  pixels = raw.find(struct.pack(order + 'II', 2, 3072))
  if pixels < 0:
    return list(range(len(raw)))
  return [i for i in range(len(raw)) if not pixels + 16 <= i < pixels + 8 + 3072]


_FIELD_VALUES = (0, 1, 2, 4, 7, 8, 9, 15, 16, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 0x0001_0002,
                 0x0004_0002, 0x0008_0009)


def _mutate(raw, rng):
  """One damaged copy of `raw`: bit flips, bytes or 32-bit fields set, truncation, splices."""
  raw = bytearray(raw)
  structure = _structure_positions(raw)
  position = lambda: structure[rng.randint(len(structure))] if rng.rand() < 0.85 else (
      rng.randint(len(raw)))
  kind = rng.randint(5)
  if kind in (0, 1):
    helpers.damage_bytes(raw, kind, position, rng)
  elif kind == 2:
    at = position() & ~3
    raw[at:at + 4] = struct.pack('<I', int(rng.choice(_FIELD_VALUES)))
  elif kind == 3 or len(raw) < 144:
    del raw[rng.randint(len(raw)):]
  else:
    a, b = sorted(rng.randint(128, len(raw), 2) & ~7)
    raw[a:a] = raw[a:b]  # A run of elements repeated.
  return bytes(raw)


def _mutations(stored, count, seed=0):
  """Damaged copies of the `stored` files, half of them compressed after the damage.

  Damage inside a compressed file's zlib stream mostly breaks its checksum; damage
  to the inflated variables, compressed again, reaches the structure behind it.
  """
  rng = np.random.RandomState(seed)
  for _ in range(count):
    raw = _mutate(stored[rng.randint(len(stored))], rng)
    if rng.rand() < 0.5:
      yield raw
      continue
    order = '<' if raw[126:128] == b'IM' else '>'
    variables, position = [], 128
    while position + 8 <= len(raw):  # Each variable as its own element, as savemat writes them.
      size = struct.unpack(order + 'I', raw[position + 4:position + 8])[0]
      variables.append(raw[position:position + 8 + size])
      position += 8 + size
    packed = [zlib.compress(v) for v in variables]
    compressed = raw[:128] + b''.join(struct.pack(order + 'II', _MI_COMPRESSED, len(p)) + p
                                      for p in packed)
    if rng.rand() < 0.2:
      compressed = _mutate(compressed, rng)
    yield compressed


def test_fuzzed_files_never_crash_and_load_as_scipy_loads_them(tmp_path):
  x, y = _svhn_arrays(1)
  stored = [_savemat_bytes({'X': x, 'y': y}, False),
            _savemat_bytes({'X': x, 'y': y.astype(np.uint8)}, False),
            _savemat_bytes({'s': 'text', 'X': x, 'c': _EXTRAS['cell'], 'y': y}, False),
            _mat_file(_variable('X', x, '>'), _variable('y', y, '>', storage='u1'), order='>'),
            _mat_file(_variable('y', y, storage='i2'), _variable('X', x))]
  bases = [*stored, _savemat_bytes({'X': x, 'y': y}, True),
           _savemat_bytes({'X': x, 'y': y.astype(np.uint8)}, True)]
  files = [*bases, *_mutations(stored, 4000)]
  paths = helpers.write_numbered(tmp_path, files)
  began = time.perf_counter()
  results = _load_in_children(paths)
  elapsed = time.perf_counter() - began
  bad = {p: r for p, r in results.items() if not ('refused' in r or r.get('consistent'))}
  assert not bad, list(bad.items())[:5]
  assert all('\n' not in r['refused'] for r in results.values() if 'refused' in r)
  differ = {p: r for p, r in results.items() if r.get('scipy') == 'loaded' and 'same' in r
            and not r['same']}
  assert not differ, list(differ.items())[:5]
  assert all(results[p].get('same') for p in paths[:len(bases)])  # The bases themselves.
  loaded = sum('loaded' in r for r in results.values())
  checked = sum(r.get('scipy') == 'loaded' for r in results.values())
  print(f'{len(paths)} files ({loaded} loaded, {checked} of them equal to what scipy loads; '
        f'{len(paths) - loaded} refused) in {elapsed:.1f} s')
