"""Tests for lcmt_jax.cifar10_pickle: every pickle form a batch is saved in, and hostile files.

The oracle for a valid file is `pickle.loads` of a file this test wrote itself;
hostile and mutated files are loaded only by the reader under test, in child
processes with a memory limit, so a crash or a runaway allocation is seen and
attributed to its file.
"""

import io
import json
import os
import pickle
import pickletools
import struct
import time
import traceback
import types

import numpy as np
import pytest

from lcmt_jax import cifar10_pickle
from tests import helpers

_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


class _Python2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes what Python 2 wrote into cifar-10-python.tar.gz (protocol 2, str as byte strings).

  Every str and bytes becomes a BINSTRING (bytes again under `encoding='bytes'`),
  and NumPy's array reconstructor is named as NumPy < 2 named it.
  """

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access
  _NUMPY_NAMES = {_RECONSTRUCT: ('numpy.core.multiarray', '_reconstruct'),
                  np.ndarray: ('numpy', 'ndarray'), np.dtype: ('numpy', 'dtype')}

  def __init__(self, file):
    super().__init__(file, protocol=2, fix_imports=False)

  def save_byte_string(self, obj):
    if isinstance(obj, str):
      obj = obj.encode('latin1')
    if len(obj) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
    else:
      self.write(pickle.BINSTRING + struct.pack('<i', len(obj)) + obj)
    self.memoize(obj)

  dispatch[str] = save_byte_string
  dispatch[bytes] = save_byte_string

  def save_global(self, obj, name=None):
    if obj not in self._NUMPY_NAMES:
      return super().save_global(obj, name)
    module, name = self._NUMPY_NAMES[obj]
    self.write(pickle.GLOBAL + f'{module}\n{name}\n'.encode())
    self.memoize(obj)
    return None

  def reducer_override(self, obj):
    if isinstance(obj, np.ndarray):
      return (_RECONSTRUCT, *obj.__reduce__()[1:])
    if isinstance(obj, np.dtype):  # Python 2's NumPy wrote 0 and 1 for the flags.
      cls, (kind, align, copy), state = obj.__reduce__()
      return cls, (kind, int(align), int(copy)), state
    return NotImplemented


def python2_pickle(obj) -> bytes:
  buffer = io.BytesIO()
  _Python2Pickler(buffer).dump(obj)
  return buffer.getvalue()


class _NumPy1Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Python 3's pickle of NumPy < 2's names (`numpy.core`), at any protocol, from NumPy >= 2."""

  _NAMES = {_RECONSTRUCT: ('numpy.core.multiarray', '_reconstruct'),
            _FROMBUFFER: ('numpy.core.numeric', '_frombuffer')}
  # `_Pickler.dispatch` holds its own `save_global` for Python functions (`_frombuffer`).
  dispatch = {**pickle._Pickler.dispatch,  # pylint: disable=protected-access
              types.FunctionType: lambda self, obj: self.save_global(obj)}

  def save_global(self, obj, name=None):
    if obj not in self._NAMES:
      return super().save_global(obj, name)
    module, name = self._NAMES[obj]
    if self.proto >= 4:
      self.save(module)
      self.save(name)
      self.write(pickle.STACK_GLOBAL)
    else:
      self.write(pickle.GLOBAL + f'{module}\n{name}\n'.encode())
    self.memoize(obj)
    return None


def _numpy1_pickle(obj, protocol) -> bytes:
  buffer = io.BytesIO()
  _NumPy1Pickler(buffer, protocol=protocol).dump(obj)
  return buffer.getvalue()


def cifar10_batch(images, labels, name):
  """A batch file's dict: channel-major rows (R plane, G plane, B plane, each row-major)."""
  rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
  return {'batch_label': f'{name} of 5', 'labels': [int(v) for v in labels], 'data': rows,
          'filenames': [f'{name}_{i}.png' for i in range(len(images))]}


def _batch(n=3, seed=0, fortran=False):
  rng = np.random.RandomState(seed)
  batch = cifar10_batch(rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8),
                        rng.randint(0, 10, n), 'data_batch_1')
  if fortran:
    batch['data'] = np.asfortranarray(batch['data'])
  return batch


# Every form a batch is saved in: the original files, and Python 3 re-saves by NumPy >= 2
# (numpy._core names, the installed NumPy) and NumPy < 2 (numpy.core names).
_FORMS = {
    'python2': python2_pickle,
    **{f'numpy2_protocol{p}': lambda batch, p=p: pickle.dumps(batch, protocol=p)
       for p in range(2, 6)},
    **{f'numpy1_protocol{p}': lambda batch, p=p: _numpy1_pickle(batch, p) for p in range(2, 6)},
}
# What marks each form, read from `pickletools.dis` of the files the forms write.
_FORM_MARKS = {
    'python2': ['GLOBAL', 'numpy.core.multiarray _reconstruct', 'BINSTRING'],
    'numpy2_protocol2': ['GLOBAL', 'numpy._core.multiarray _reconstruct', '_codecs encode'],
    'numpy2_protocol3': ['numpy._core.multiarray _reconstruct', 'BINBYTES'],
    'numpy2_protocol4': ['STACK_GLOBAL', "'numpy._core.multiarray'", 'BINBYTES'],
    'numpy2_protocol5': ['STACK_GLOBAL', "'numpy._core.numeric'", "'_frombuffer'", 'BYTEARRAY8'],
    'numpy1_protocol2': ['numpy.core.multiarray _reconstruct', '_codecs encode'],
    'numpy1_protocol3': ['numpy.core.multiarray _reconstruct', 'BINBYTES'],
    'numpy1_protocol4': ['STACK_GLOBAL', "'numpy.core.multiarray'", 'BINBYTES'],
    'numpy1_protocol5': ['STACK_GLOBAL', "'numpy.core.numeric'", "'_frombuffer'", 'BYTEARRAY8'],
}


def _disassembly(raw):
  out = io.StringIO()
  pickletools.dis(raw, out=out)
  return out.getvalue()


@pytest.mark.filterwarnings('ignore:numpy.core.numeric is deprecated')  # The numpy1 forms.
@pytest.mark.parametrize('fortran', [False, True])
@pytest.mark.parametrize('form', list(_FORMS))
def test_every_form_reads_as_pickle_reads_it(form, fortran):
  raw = _FORMS[form](_batch(fortran=fortran))
  listing = _disassembly(raw)
  assert all(mark in listing for mark in _FORM_MARKS[form]), listing
  expected = pickle.loads(raw, encoding='bytes')  # The test wrote it: safe to unpickle.
  expected = {k.decode() if isinstance(k, bytes) else k: v for k, v in expected.items()}
  rows, labels = cifar10_pickle.read_batch(raw)
  assert rows.dtype == np.uint8 and labels.dtype == np.int32
  np.testing.assert_array_equal(rows, expected['data'])
  np.testing.assert_array_equal(labels, expected['labels'])


def test_reads_a_full_size_batch_as_pickle_reads_it():
  """A batch of the real files' size (10,000 images, 30 MB), with BINSTRING's 4-byte length."""
  batch = _batch(n=10_000)
  raw = python2_pickle(batch)
  rows, labels = cifar10_pickle.read_batch(raw)
  np.testing.assert_array_equal(rows, batch['data'])
  np.testing.assert_array_equal(labels, batch['labels'])


class _Reduce:
  """Pickles as `function(*args)` then BUILD `state`: how the crafted files are written."""

  def __init__(self, function, args, state=None):
    self.reduced = (function, args) if state is None else (function, args, state)

  def __reduce__(self):
    return self.reduced


def _array(dtype, shape, raw, dtype_args=None):
  """`_reconstruct` + BUILD of an array whose dtype is built from `dtype` (a state, or a dtype)."""
  kind, align, copy = dtype_args or np.dtype(dtype).__reduce__()[1]
  crafted_dtype = _Reduce(np.dtype, (kind, align, copy), dtype.__reduce__()[2]
                          if isinstance(dtype, np.dtype) else dtype)
  return _Reduce(_RECONSTRUCT, (np.ndarray, (0,), b'b'), (1, shape, crafted_dtype, False, raw))


def _crafted(data, labels=(0,)):
  return pickle.dumps({'data': data, 'labels': list(labels)}, protocol=3)


# The files an audit crafted against `pickle` with a NumPy-only `find_class`, and what the
# reader now says of each. None of them is ever unpickled here.
CRAFTED = {
    # A structured dtype whose object field lies 1 MiB past its 8-byte itemsize: NumPy's
    # dtype.__setstate__ accepts it and reading the field segfaults.
    'object_field_past_itemsize': (_crafted(_array(
        (3, '|', None, ('f',), {'f': (np.dtype('O'), 1 << 20)}, 8, 1, 0x3f), (1,), [(0,)],
        ('V8', False, True))), 'with arguments a CIFAR-10 batch does not hold'),
    # An object array over bytes from the file: the bytes become object pointers.
    'object_pointers_from_file_bytes': (_crafted(_array(np.dtype('O'), (4,), b'\x41' * 32)),
                                        'with arguments a CIFAR-10 batch does not hold'),
    # An object array of 2**30 items: memory is the only limit.
    'huge_object_array': (_crafted(_array(np.dtype('O'), (1 << 30,), []), labels=()),
                          'with arguments a CIFAR-10 batch does not hold'),
    # A dtype whose itemsize asks for 4 MB per item, from a file of a few hundred bytes.
    'itemsize_beyond_the_file': (_crafted(_array(
        (3, '|', None, None, None, 4_000_000, 1, 0), (16,), b'\0' * 64,
        ('V4000000', False, True))),
        'with arguments a CIFAR-10 batch does not hold'),
    # uint8, with a shape that asks for far more bytes than the file holds.
    'shape_beyond_the_bytes': (_crafted(_array(np.dtype('u1'), (1 << 20, 3072), b'\0' * 3072)),
                               'holds 3072 bytes, not 3221225472'),
    # uint8 whose dtype state is not NumPy's (an itemsize of 20,000 for a 1-byte type).
    'uint8_with_a_forged_itemsize': (_crafted(_array(
        (3, '|', None, None, None, 20_000, 1, 0), (1, 3072), b'\0' * 3072, ('u1', False, True))),
        'BUILD with a state that is not a uint8 array or dtype'),
    # Two arrays: the second may be anything.
    'two_arrays': (pickle.dumps({'data': np.zeros((1, 3072), np.uint8), 'labels': [0],
                                 'more': np.zeros((1, 3072), np.uint8)}, protocol=2),
                   'more than one array'),
    # Nested far deeper than Python's recursion limit.
    'deep_nesting': (b'\x80\x02' + b'(' * 50_000 + b')' + b't' * 50_000 + b'.',
                     'opcodes, more than a batch of 100004 bytes can'),
    # One list appended to itself through the memo, many times.
    'self_referencing_list': (b'\x80\x02}q\x00(X\x06\x00\x00\x00labels]q\x01' + b'h\x01a' * 300
                              + b'u.', "its 'labels' is not a string, a list of ints"),
    'not_a_pickle_protocol_0': (b'(dp0\n.', 'not a pickle of protocol 2 to 5'),
    'os_system': (pickle.dumps({'data': _Reduce(os.system, ('true',)), 'labels': [0]},
                               protocol=2), 'refused: it names posix.system'),
}


def _restricted_pickle_loads(raw):
  """pickle, naming only what the reader accepts: the oracle for files the reader accepted."""
  names = {('numpy.core.multiarray', '_reconstruct'): _RECONSTRUCT,
           ('numpy._core.multiarray', '_reconstruct'): _RECONSTRUCT,
           ('numpy.core.numeric', '_frombuffer'): _FROMBUFFER,
           ('numpy._core.numeric', '_frombuffer'): _FROMBUFFER,
           ('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
           ('_codecs', 'encode'): __import__('codecs').encode}

  class Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
      return names[module, name]

  batch = Unpickler(io.BytesIO(raw), encoding='bytes').load()
  return {k.decode('latin1') if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _load_each(paths):
  """The child process: loads each file under a memory limit, one JSON line per file.

  `start I` goes out before file I is read, so a crash is attributed to that file.
  The limit is this process's address space now plus 16 MiB and 32 times the
  largest file: the reader's own bound is a few times a file's size.
  """
  helpers.cap_address_space(paths)
  for i, path in enumerate(paths):
    print(f'start {i}', flush=True)
    with open(path, 'rb') as f:
      raw = f.read()
    result = {'i': i}
    try:
      rows, labels = cifar10_pickle.read_batch(raw)
      expected = _restricted_pickle_loads(raw)  # Safe: the reader accepted its structure.
      result['loaded'] = (np.array_equal(rows, expected['data'])
                          and np.array_equal(labels, expected['labels'])
                          and rows.shape == (len(labels), 3072))
    except cifar10_pickle.NotABatchError as e:
      result['refused'] = str(e)
    except BaseException as e:  # pylint: disable=broad-except  # What the test reports.
      result['other'] = ''.join(traceback.format_exception_only(e)).strip()[-300:]
    print(json.dumps(result), flush=True)


def _load_in_children(paths, per_child=2000):
  """`{path: result}` from `_load_each` in child processes (`helpers.load_in_children`)."""
  return helpers.load_in_children('test_cifar10_pickle', paths, per_child)


@pytest.mark.parametrize('name', list(CRAFTED))
def test_crafted_file_is_refused_in_one_line(name, tmp_path):
  raw, message = CRAFTED[name]
  path = tmp_path / name
  path.write_bytes(raw)
  result = _load_in_children([str(path)])[str(path)]
  assert 'refused' in result, result
  assert '\n' not in result['refused'] and message in result['refused'], result


def _opcode_spans(raw):
  """(start, end) of each opcode in `raw`."""
  starts = [pos for _, _, pos in pickletools.genops(raw)] + [len(raw)]
  return list(zip(starts[:-1], starts[1:]))


def _mutations(bases, count, seed=0):
  """`count` damaged copies of the `bases`: bit flips, bytes set, truncations, opcode edits.

  Flips and bytes land outside the pixel bytes four times in five, where they
  change the pickle's structure rather than an image.
  """
  rng = np.random.RandomState(seed)
  spans = [_opcode_spans(raw) for raw in bases]
  for _ in range(count):
    which = rng.randint(len(bases))
    raw, ops = bytearray(bases[which]), spans[which]
    pixels = max(ops, key=lambda span: span[1] - span[0])
    structure = [i for i in range(len(raw)) if not pixels[0] + 8 < i < pixels[1]]
    kind = rng.randint(7)
    position = lambda: structure[rng.randint(len(structure))] if rng.rand() < 0.8 else (
        rng.randint(len(raw)))
    if kind in (0, 1):
      helpers.damage_bytes(raw, kind, position, rng)
    elif kind == 2:
      del raw[rng.randint(len(raw)):]
    else:
      a, b = ops[rng.randint(len(ops))]
      if kind == 3:  # Splice in an opcode of any base.
        donor = rng.randint(len(bases))
        c, d = spans[donor][rng.randint(len(spans[donor]))]
        raw[a:a] = bases[donor][c:d]
      elif kind == 4:  # Repeat one.
        raw[a:b] = raw[a:b] * rng.randint(2, 60)
      elif kind == 5:
        del raw[a:b]
      else:  # Swap two.
        c, d = ops[rng.randint(len(ops))]
        if b <= c:
          raw[a:d] = raw[c:d] + raw[b:c] + raw[a:b]
    yield bytes(raw)


def test_fuzzed_batches_never_crash_and_fail_in_one_line(tmp_path):
  batch = _batch(n=1)
  bases = [form(batch) for form in _FORMS.values()]
  files = [*bases, *(raw for raw, _ in CRAFTED.values()), *_mutations(bases, 10_000)]
  paths = helpers.write_numbered(tmp_path, files)
  began = time.perf_counter()
  results = _load_in_children(paths)
  elapsed = time.perf_counter() - began
  bad = {p: r for p, r in results.items() if not (r.get('loaded') or 'refused' in r)}
  assert not bad, list(bad.items())[:5]
  assert all('\n' not in r['refused'] for r in results.values() if 'refused' in r)
  assert all(results[p].get('loaded') for p in paths[:len(bases)])  # The bases themselves.
  loaded = sum('loaded' in r for r in results.values())
  print(f'{len(paths)} files ({loaded} loaded, {len(paths) - loaded} refused) in {elapsed:.1f} s')
