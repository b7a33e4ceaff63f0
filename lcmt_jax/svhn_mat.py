"""Numeric arrays read from a MATLAB Level 5 MAT-file (SVHN's `*_32x32.mat`), every size checked.

`scipy.io.loadmat` trusts the file's type codes and flags: a data element of an
unknown type, or a uint8 array flagged complex with no imaginary part, makes it
read past its buffers and the process dies (segfault, bus error) instead of
raising. This module reads only what SVHN needs, the real numeric arrays named
by the caller (`X`, `y`), and checks every field before using it.

The format (MathWorks, "MAT-File Format", Level 5), as read here:

- a 128-byte header: text (whose first 4 bytes are never 0; a 0 there marks a
  v4 file), then at byte 124 the version 0x0100 and the endian marker `IM`
  (little-endian) or `MI` (big-endian). Version 0x0200 is a v7.3 file: HDF5,
  refused with a message saying so, as scipy refuses it;
- then one data element per variable: an 8-byte tag (type, byte count), then
  its bytes: an miMATRIX, or an miCOMPRESSED whose zlib stream inflates to one;
- an miMATRIX holds sub-elements, each padded to 8 bytes: array flags (class
  in the low byte, complex/global/logical bits above), dims (int32, column-major),
  the name, then the real part, stored in any numeric type MATLAB chooses (a
  double array of small integers is written as miUINT8). A sub-element of at
  most 4 bytes may use the small format: byte count and type packed in the
  tag's first word, the data in its second.

Bounds: an element's byte count must fit in what the file has left; an array's
data must be exactly what its dims and storage type imply, checked before it
is read; a compressed element is inflated only as far as the reads ask
(`decompressobj().decompress(data, max_length)`), so a zip bomb inflates no
further than the dims it declares, and the data behind them must be real.
Variables not asked for are skipped after their name is read. Anything else
raises `MatFileError` with one line saying what.
"""

import os
import struct
import zlib
from collections.abc import Collection
from typing import BinaryIO

import numpy as np

_HEADER_BYTES = 128
_TAG_BYTES = 8
_VERSION_5 = 0x0100
_VERSION_73 = 0x0200  # MATLAB's -v7.3: an HDF5 file behind the same 128-byte header.
_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED, _MI_UTF8 = 1, 5, 6, 14, 15, 16
# Storage (data element) types of numeric data, and the classes (mxCLASS) of numeric arrays.
_STORAGE = {1: 'i1', 2: 'u1', 3: 'i2', 4: 'u2', 5: 'i4', 6: 'u4', 7: 'f4', 9: 'f8', 12: 'i8',
            13: 'u8'}
_NUMERIC_CLASSES = {6: 'f8', 7: 'f4', 8: 'i1', 9: 'u1', 10: 'i2', 11: 'u2', 12: 'i4', 13: 'u4',
                    14: 'i8', 15: 'u8'}
_OTHER_CLASSES = {1: 'a cell array', 2: 'a struct', 3: 'an object', 4: 'a char array',
                  5: 'a sparse matrix', 16: 'a function handle', 17: 'an opaque object'}
_OPAQUE_CLASS = 17  # Its header has no dims: the name follows the flags.
_COMPLEX_FLAG = 0x08
_CHUNK = 1 << 20  # Compressed bytes read from the file at a time.


class MatFileError(ValueError):
  """The file is not a MAT-file this reader reads; the message says why, in one line."""


class _Stream:
  """The bytes of one variable, `remaining` of them left; `read(n)` refuses to go past them."""

  remaining = 0

  def read(self, n: int) -> bytearray:
    if n > self.remaining:
      raise MatFileError(f'an element asks for {n} bytes where its variable has {self.remaining} '
                         'left')
    self.remaining -= n
    return self._read(n)

  def _read(self, n: int) -> bytearray:
    raise NotImplementedError


class _Stored(_Stream):
  """An miMATRIX element read straight from the file (its size already checked against it)."""

  def __init__(self, f: BinaryIO, size: int):
    self._f = f
    self.remaining = size

  def _read(self, n: int) -> bytearray:
    data = bytearray(n)
    if self._f.readinto(data) != n:
      raise MatFileError('it ends inside a variable: it is truncated')
    return data


class _Inflated(_Stream):
  """An miCOMPRESSED element, inflated only as far as reads ask: at most what they take."""

  def __init__(self, f: BinaryIO, size: int):
    self._f = f
    self._compressed_left = size
    self._inflater = zlib.decompressobj()
    self.remaining = _TAG_BYTES  # Until the inflated miMATRIX tag gives its size.

  def _read(self, n: int) -> bytearray:
    out = bytearray()
    while len(out) < n:
      data = self._inflater.unconsumed_tail
      if not data and self._compressed_left and not self._inflater.eof:
        data = self._f.read(min(_CHUNK, self._compressed_left))
        if not data:
          raise MatFileError('it ends inside a compressed variable: it is truncated')
        self._compressed_left -= len(data)
      try:
        piece = self._inflater.decompress(data, n - len(out))
      except zlib.error as e:
        raise MatFileError(f'a compressed variable is damaged (zlib: {e})') from None
      if not (piece or data):
        raise MatFileError(f'a compressed variable inflates to fewer bytes than its elements '
                           f'declare ({len(out)} of {n} for one)')
      out += piece
    return out


def _read_tag(stream: _Stream, order: str) -> tuple[int, int, bytearray | None]:
  """(type, byte count, data): data only for the small format, where the tag holds it."""
  tag = stream.read(_TAG_BYTES)
  first, second = struct.unpack(order + 'II', tag)
  if first >> 16:  # Small format: byte count in the upper half of the first word.
    size = first >> 16
    if size > 4:
      raise MatFileError(f'a small data element claims {size} bytes (at most 4 fit)')
    return first & 0xffff, size, tag[4:4 + size]
  return first, second, None


def _read_element(stream: _Stream, order: str, expected: tuple[int, ...],
                  what: str) -> bytearray:
  """The data of the next sub-element, whose type must be in `expected`; its padding skipped."""
  kind, size, data = _read_tag(stream, order)
  if kind not in expected:
    raise MatFileError(f'{what} is an element of type {kind}, not '
                       f'{" or ".join(map(str, expected))}')
  if data is None:
    data = stream.read(size)
    stream.read(min(-size % 8, stream.remaining))
  return data


def _read_header(stream: _Stream, order: str) -> tuple[int, int, tuple[int, ...], str]:
  """An miMATRIX's class, flag bits, dims and name: what is read of every variable."""
  flags = _read_element(stream, order, (_MI_UINT32,), 'the array flags')
  if len(flags) != 8:
    raise MatFileError(f'the array flags take {len(flags)} bytes, not 8')
  word = struct.unpack(order + 'I', flags[:4])[0]
  array_class, flag_bits = word & 0xff, (word >> 8) & 0xff
  dims = ()
  if array_class != _OPAQUE_CLASS:
    raw = _read_element(stream, order, (_MI_INT32,), 'the dims')
    if len(raw) % 4 or len(raw) < 8:
      raise MatFileError(f'the dims take {len(raw)} bytes, not 4 for each of 2 or more')
    dims = struct.unpack(f'{order}{len(raw) // 4}i', raw)
  name = _read_element(stream, order, (_MI_INT8, _MI_UTF8), 'the name').decode('latin1')
  return array_class, flag_bits, dims, name


def _read_array(stream: _Stream, order: str, array_class: int, flag_bits: int,
                dims: tuple[int, ...], name: str) -> np.ndarray:
  """The real numeric array after the header, in its class's dtype (as MATLAB would load it)."""
  if array_class not in _NUMERIC_CLASSES:
    raise MatFileError(f'its {name!r} is {_OTHER_CLASSES.get(array_class, "of no MATLAB class")} '
                       f'(class {array_class}), not a numeric array')
  if flag_bits & _COMPLEX_FLAG:
    raise MatFileError(f'its {name!r} is complex, not a real array')
  if any(n < 0 for n in dims):
    raise MatFileError(f'its {name!r} has negative dims {dims}')
  kind, size, data = _read_tag(stream, order)
  if kind not in _STORAGE:
    raise MatFileError(f'the data of its {name!r} is of type {kind}, not a numeric type')
  storage = np.dtype(_STORAGE[kind]).newbyteorder(order)
  target = np.dtype(_NUMERIC_CLASSES[array_class])
  count = int(np.prod(dims, dtype=object))
  if size != count * storage.itemsize:
    raise MatFileError(f'its {name!r} of dims {dims} needs {count * storage.itemsize} bytes of '
                       f'{storage.name}, and its data holds {size}')
  if target.kind != 'f' and storage.kind == 'f':
    raise MatFileError(f'its {name!r}, of an integer class, holds floating-point data')
  if data is None:
    data = stream.read(size)
  with np.errstate(over='ignore'):  # A double stored in a single: inf, as MATLAB loads it.
    array = np.frombuffer(data, storage).astype(target, copy=False)
  return array.reshape(dims, order='F')


def _byte_order(header: bytes) -> str:
  """'<' or '>' from a v5 header; v4, v7.3 and anything else refused."""
  if 0 in header[:4]:
    raise MatFileError('it is not a MAT-file of version 5 or later (a v4 MAT-file, or not a '
                       'MAT-file at all)')
  marker = header[126:128]
  if marker not in (b'IM', b'MI'):
    raise MatFileError(f'it has no MAT-file endian marker (IM or MI) at byte 126, but {marker!r}')
  order = '<' if marker == b'IM' else '>'
  version = struct.unpack(order + 'H', header[124:126])[0]
  if version == _VERSION_73:
    raise MatFileError('it is a MATLAB v7.3 MAT-file (HDF5), which this reader does not read: '
                       "save it in MATLAB with save(..., '-v7')")
  if version != _VERSION_5:
    raise MatFileError(f'its MAT-file version is 0x{version:04x}, not 0x0100 (v5 to v7)')
  return order


def _open_variable(f: BinaryIO, order: str, position: int, file_size: int) -> tuple[_Stream, int]:
  """The variable whose tag is at `position`, and where the next one starts."""
  f.seek(position)
  tag = f.read(_TAG_BYTES)
  if len(tag) < _TAG_BYTES:
    raise MatFileError(f'it ends inside the tag at byte {position}: it is truncated')
  kind, size = struct.unpack(order + 'II', tag)
  if size > file_size - position - _TAG_BYTES:
    raise MatFileError(f'the variable at byte {position} claims {size} bytes, past the end of the '
                       f'file ({file_size} bytes): it is truncated')
  if kind == _MI_MATRIX:
    return _Stored(f, size), position + _TAG_BYTES + size
  if kind != _MI_COMPRESSED:
    raise MatFileError(f'the element at byte {position} is of type {kind}, not a variable '
                       f'(miMATRIX {_MI_MATRIX} or miCOMPRESSED {_MI_COMPRESSED})')
  stream = _Inflated(f, size)
  inner_kind, inner_size, _ = _read_tag(stream, order)
  if inner_kind != _MI_MATRIX:
    raise MatFileError(f'the compressed variable at byte {position} inflates to an element of '
                       f'type {inner_kind}, not miMATRIX {_MI_MATRIX}')
  stream.remaining = inner_size
  return stream, position + _TAG_BYTES + size


def read_numeric_arrays(path: str, names: Collection[str]) -> dict[str, np.ndarray]:
  """The variables `names` that `path` holds (each real and numeric), by name; others skipped.

  An array comes in its MATLAB class's dtype (`scipy.io.loadmat(...,
  mat_dtype=True)`), shaped by its dims in column-major order. The first
  variable of a name counts; reading stops once every name is found. A name
  the file does not hold is absent from the result.
  """
  found: dict[str, np.ndarray] = {}
  with open(path, 'rb') as f:
    file_size = os.fstat(f.fileno()).st_size
    header = f.read(_HEADER_BYTES)
    if len(header) < _HEADER_BYTES:
      raise MatFileError(f'it is {len(header)} bytes long, shorter than a MAT-file header')
    order = _byte_order(header)
    position = _HEADER_BYTES
    while position < file_size and len(found) < len(names):
      stream, position = _open_variable(f, order, position, file_size)
      array_class, flag_bits, dims, name = _read_header(stream, order)
      if name in names and name not in found:
        found[name] = _read_array(stream, order, array_class, flag_bits, dims, name)
  return found
