"""CIFAR-10 batches read by walking the pickle's opcodes: no object of the file's choosing is built.

`pickle.load`, even with a restricted `find_class`, hands file data to NumPy's
`dtype.__setstate__` and `_reconstruct` (through BUILD and REDUCE), which do not
validate it: a structured dtype with an object field past its itemsize crashes the
process, an object array of any length exhausts memory. This module never calls
them. It interprets the opcodes that `pickletools.genops` yields and accepts only
what a CIFAR-10 batch is made of:

- a dict with str or bytes keys whose values are strings, lists of ints, lists of
  strings, and exactly one uint8 array of shape (N, 3072) under `data`, with N
  `labels` in 0..9;
- the array in the forms NumPy writes it: `_reconstruct(ndarray, (0,), b'b')`
  then BUILD with `(1, shape, dtype('u1'), is_fortran, raw bytes)` (protocols 2
  to 4; the original Python 2 files hold the bytes as BINSTRING, Python 3 at
  protocol 2 as `_codecs.encode(str, 'latin1')`), or `_frombuffer(bytes,
  dtype('u1'), shape, order)` (protocol 5);
- globals matched by name only (NumPy < 2 and >= 2 spell its modules differently);
  nothing is imported or called on a pickle's say-so.

Every size is bounded by the file's: a batch of N images takes at least 3072 N
bytes and a few opcodes per image, so more opcodes than `_max_opcodes` allows, or
more decoded bytes than the file holds, is refused before memory grows; the
array is `np.frombuffer` over bytes read from the file, its length checked
against its shape. Anything else raises `NotABatchError` with one line saying what.
"""

import pickletools
from typing import Any

import numpy as np

_ROW_BYTES = 3072  # 32 x 32 pixels x 3 channel planes.
_NUM_CLASSES = 10
# uint8, as NumPy pickles it: `dtype('u1', False, True)` (Python 2: 0, 1), then this state.
_UINT8_ARGS = ('u1', b'u1')
_UINT8_STATE = (3, '|', None, None, None, -1, -1, 0)
_RECONSTRUCT = 'reconstruct'
_FROMBUFFER = 'frombuffer'
_NDARRAY = 'ndarray'
_DTYPE = 'dtype'
_ENCODE = 'encode'
# The only globals a batch names, by the name it is written under: what each stands for here.
_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'): _RECONSTRUCT,  # NumPy < 2 (the original files).
    ('numpy._core.multiarray', '_reconstruct'): _RECONSTRUCT,  # NumPy >= 2.
    ('numpy.core.numeric', '_frombuffer'): _FROMBUFFER,  # Protocol 5, NumPy < 2.
    ('numpy._core.numeric', '_frombuffer'): _FROMBUFFER,  # Protocol 5, NumPy >= 2.
    ('numpy', 'ndarray'): _NDARRAY,
    ('numpy', 'dtype'): _DTYPE,
    ('_codecs', 'encode'): _ENCODE,  # Python 3 writes bytes this way at protocol 2.
}
_STRINGS = (str, bytes)
_BYTES = (bytes, bytearray)
_OPCODES_PER_IMAGE = 8  # A label and a file name, each with its memo entry, and slack.
_OPCODES_FIXED = 1024  # The dict, its keys, the array's reconstruction, batch_label.


class NotABatchError(ValueError):
  """The bytes are not a CIFAR-10 batch this reader accepts; the message says why, in one line."""


class _Global:
  """A global the pickle names, by what it stands for (a key of `_GLOBALS`' values)."""

  def __init__(self, kind: str):
    self.kind = kind


class _Dtype:
  """`dtype('u1')`, usable once BUILD has given it NumPy's uint8 state."""

  def __init__(self):
    self.built = False


class _Array:
  """The batch's uint8 array: set by BUILD (`_reconstruct`) or at once (`_frombuffer`)."""

  def __init__(self, array: np.ndarray | None = None):
    self.array = array


def _is_int(value: Any) -> bool:
  return type(value) is int  # pylint: disable=unidiomatic-typecheck  # Not True or False.


def _uint8_array(raw: Any, shape: Any, fortran: bool) -> np.ndarray:
  """`raw` as a uint8 array of `shape` (two ints), checked to hold exactly its bytes."""
  if not (isinstance(raw, _BYTES) and isinstance(shape, tuple) and len(shape) == 2
          and all(_is_int(n) and n >= 0 for n in shape)):
    raise NotABatchError('its array is not a 2-D uint8 array of bytes in the file')
  if shape[0] * shape[1] != len(raw):
    raise NotABatchError(f'its array of shape {shape} holds {len(raw)} bytes, not '
                         f'{shape[0] * shape[1]}')
  return np.frombuffer(raw, np.uint8).reshape(shape, order='F' if fortran else 'C')


def _printable(text: str) -> str:
  """`text` cut to 100 characters, with newlines and other controls escaped: one line."""
  return text[:100].encode('unicode_escape').decode('ascii')


def _max_opcodes(size: int) -> int:
  return _OPCODES_FIXED + _OPCODES_PER_IMAGE * (size // _ROW_BYTES)


class _Machine:
  """The pickle machine's stack, marks and memo over the values this module allows."""

  def __init__(self, size: int):
    self.stack: list[Any] = []
    self.marks: list[int] = []
    self.memo: dict[int, Any] = {}
    self.bytes_budget = size  # What `_codecs.encode` may produce in all: the file's size.
    self.arrays = 0

  def pop(self) -> Any:
    if len(self.stack) <= (self.marks[-1] if self.marks else 0):
      raise NotABatchError('an opcode finds its stack empty')
    return self.stack.pop()

  def pop_mark(self) -> list[Any]:
    if not self.marks:
      raise NotABatchError('an opcode finds no MARK')
    start = self.marks.pop()
    items = self.stack[start:]
    del self.stack[start:]
    return items

  def top(self) -> Any:
    if len(self.stack) <= (self.marks[-1] if self.marks else 0):
      raise NotABatchError('an opcode finds its stack empty')
    return self.stack[-1]

  def step(self, name: str, arg: Any) -> None:
    """Runs one opcode (`pickletools` name and decoded argument) on the stack."""
    if name in ('SHORT_BINSTRING', 'BINSTRING'):  # Python 2 str, bytes under encoding='bytes'.
      self.stack.append(arg.encode('latin1'))
    elif name in ('BINUNICODE', 'SHORT_BINUNICODE', 'BINUNICODE8', 'SHORT_BINBYTES', 'BINBYTES',
                  'BINBYTES8', 'BYTEARRAY8', 'BININT', 'BININT1', 'BININT2'):
      self.stack.append(arg)
    elif name in ('NONE', 'NEWTRUE', 'NEWFALSE'):
      self.stack.append({'NONE': None, 'NEWTRUE': True, 'NEWFALSE': False}[name])
    elif name in ('EMPTY_DICT', 'EMPTY_LIST', 'EMPTY_TUPLE'):
      self.stack.append({'EMPTY_DICT': {}, 'EMPTY_LIST': [], 'EMPTY_TUPLE': ()}[name])
    elif name == 'MARK':
      self.marks.append(len(self.stack))
    elif name == 'TUPLE':
      self.stack.append(tuple(self.pop_mark()))
    elif name in ('TUPLE1', 'TUPLE2', 'TUPLE3'):
      items = [self.pop() for _ in range(int(name[-1]))]
      self.stack.append(tuple(reversed(items)))
    elif name in ('APPEND', 'APPENDS'):
      items = [self.pop()] if name == 'APPEND' else self.pop_mark()
      target = self.top()
      if not isinstance(target, list):
        raise NotABatchError(f'{name} on something that is not a list')
      target.extend(items)
    elif name in ('SETITEM', 'SETITEMS'):
      items = list(reversed([self.pop(), self.pop()])) if name == 'SETITEM' else self.pop_mark()
      target = self.top()
      if not isinstance(target, dict) or len(items) % 2:
        raise NotABatchError(f'{name} on something that is not a dict, or with a key and no value')
      for key, value in zip(items[::2], items[1::2]):
        if not isinstance(key, _STRINGS):
          raise NotABatchError('a dict key is not a string')
        target[key] = value
    elif name in ('BINPUT', 'LONG_BINPUT', 'MEMOIZE'):
      self.memo[len(self.memo) if name == 'MEMOIZE' else arg] = self.top()
    elif name in ('BINGET', 'LONG_BINGET'):
      if arg not in self.memo:
        raise NotABatchError(f'{name} of memo entry {arg}, which was never stored')
      self.stack.append(self.memo[arg])
    elif name in ('GLOBAL', 'STACK_GLOBAL'):
      if name == 'GLOBAL':
        module, _, attribute = arg.partition(' ')
      else:
        attribute, module = self.pop(), self.pop()
        if not (isinstance(module, str) and isinstance(attribute, str)):
          raise NotABatchError('STACK_GLOBAL of something that is not two strings')
      if (module, attribute) not in _GLOBALS:
        raise NotABatchError(
            f'refused: it names {_printable(module)}.{_printable(attribute)}, and loading that '
            'could run code (a batch names only NumPy array and dtype reconstructors)')
      self.stack.append(_Global(_GLOBALS[module, attribute]))
    elif name == 'REDUCE':
      args = self.pop()
      self.stack.append(self.reduce(self.pop(), args))
    elif name == 'BUILD':
      state = self.pop()
      self.build(self.top(), state)
    else:
      raise NotABatchError(f'it holds the opcode {name}, which a CIFAR-10 batch does not')

  def reduce(self, function: Any, args: Any) -> Any:
    """What REDUCE builds, for the three calls a batch makes; anything else is refused."""
    kind = function.kind if isinstance(function, _Global) else None
    if not isinstance(args, tuple):
      raise NotABatchError('REDUCE with arguments that are not a tuple')
    if kind == _ENCODE and len(args) == 2 and isinstance(args[0], str) and args[1] == 'latin1':
      if len(args[0]) > self.bytes_budget:
        raise NotABatchError('its strings decode to more bytes than the file holds')
      self.bytes_budget -= len(args[0])
      try:
        return args[0].encode('latin1')
      except UnicodeEncodeError:
        raise NotABatchError('a byte string holds a character beyond latin1') from None
    if kind == _DTYPE and len(args) == 3 and args[0] in _UINT8_ARGS and args[1:] == (0, 1):
      return _Dtype()
    if (kind == _RECONSTRUCT and len(args) == 3 and isinstance(args[0], _Global)
        and args[0].kind == _NDARRAY and args[1] == (0,) and args[2] in ('b', b'b')):
      self.count_array()
      return _Array()
    if kind == _FROMBUFFER and len(args) == 4 and self.is_uint8(args[1]) and args[3] in ('C', 'F'):
      self.count_array()
      return _Array(_uint8_array(args[0], args[2], args[3] == 'F'))
    raise NotABatchError('it calls a function with arguments a CIFAR-10 batch does not hold')

  def build(self, target: Any, state: Any) -> None:
    """BUILD: NumPy's uint8 dtype state, or an array's (version, shape, dtype, fortran, bytes)."""
    if isinstance(target, _Dtype) and not target.built and state in (
        _UINT8_STATE, (*_UINT8_STATE[:1], b'|', *_UINT8_STATE[2:])):
      target.built = True
    elif (isinstance(target, _Array) and target.array is None and isinstance(state, tuple)
          and len(state) == 5 and state[0] == 1 and self.is_uint8(state[2])
          and state[3] in (0, 1)):
      target.array = _uint8_array(state[4], state[1], bool(state[3]))
    else:
      raise NotABatchError('BUILD with a state that is not a uint8 array or dtype')

  def count_array(self) -> None:
    self.arrays += 1
    if self.arrays > 1:
      raise NotABatchError('it holds more than one array')

  @staticmethod
  def is_uint8(dtype: Any) -> bool:
    return isinstance(dtype, _Dtype) and dtype.built


def _run(raw: bytes) -> Any:
  """The object the pickle's opcodes build, over this module's values."""
  machine = _Machine(len(raw))
  max_opcodes = _max_opcodes(len(raw))
  frame_end = None  # Where the current FRAME's bytes end: no opcode may straddle it.
  try:
    for count, (opcode, arg, position) in enumerate(pickletools.genops(raw)):
      if count >= max_opcodes:
        raise NotABatchError(f'it holds more than {max_opcodes} opcodes, more than a batch of '
                             f'{len(raw)} bytes can')
      if frame_end is not None and position >= frame_end:
        if position > frame_end:
          raise NotABatchError('an opcode straddles the end of its frame')
        frame_end = None
      if opcode.name == 'PROTO' or count == 0:
        if not (opcode.name == 'PROTO' and 2 <= arg <= 5):
          raise NotABatchError('it is not a pickle of protocol 2 to 5')
      elif opcode.name == 'FRAME':
        if frame_end is not None or position + 9 + arg > len(raw):
          raise NotABatchError('a frame begins inside another or ends past the file')
        frame_end = position + 9 + arg
      elif opcode.name == 'STOP':
        break
      else:
        machine.step(opcode.name, arg)
  # What `pickletools` raises for a truncated or garbled pickle (UnicodeDecodeError included).
  except ValueError as e:
    if isinstance(e, NotABatchError):
      raise
    why = (str(e).splitlines() or [type(e).__name__])[0]
    raise NotABatchError(f'it is damaged or truncated ({_printable(why)})') from None
  if machine.marks or len(machine.stack) != 1:
    raise NotABatchError('its pickle does not end with one object')
  return machine.stack[0]


def read_batch(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
  """A batch file's uint8 rows (N, 3072, channel-major) and int32 labels (N,), from its bytes."""
  batch = _run(raw)
  if not isinstance(batch, dict):
    raise NotABatchError('it does not hold a dict')
  fields = {k.decode('latin1') if isinstance(k, bytes) else k: v for k, v in batch.items()}
  for key, value in fields.items():
    if not (isinstance(value, _STRINGS) or isinstance(value, _Array) and key == 'data'
            or isinstance(value, list) and (all(map(_is_int, value))
                                            or all(isinstance(v, _STRINGS) for v in value))):
      raise NotABatchError(f'its {key[:100]!r} is not a string, a list of ints or strings, or '
                           'the array "data"')
  data, labels = fields.get('data'), fields.get('labels')
  if not (isinstance(data, _Array) and data.array is not None and data.array.shape[1] == _ROW_BYTES
          and isinstance(labels, list) and len(labels) == len(data.array)
          and all(_is_int(v) and 0 <= v < _NUM_CLASSES for v in labels)):
    raise NotABatchError('it must hold a dict with uint8 "data" of shape (N, 3072) and N '
                         '"labels" in 0..9')
  return data.array, np.asarray(labels, np.int32)
