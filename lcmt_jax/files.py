"""Files written whole or not at all: a reader, or a run killed mid-write, never sees half of one.

Every file the project writes into a workdir or a cache goes through
`write_atomically`: the bytes go to a new temporary file beside the target,
created with `O_EXCL | O_NOFOLLOW` (by `tempfile.mkstemp`, so a planted link
or file of the same name is never written through), flushed to disk, then
renamed over the target. A kill at any byte leaves the old file as it was and
at most a stray temporary, which the next write does not reuse.
"""

import os
import tempfile


def write_atomically(path: str, data: str | bytes, mode: int = 0o644) -> None:
  """Replaces `path` with `data` in one rename; `mode` (less the umask) is the new file's."""
  directory, name = os.path.split(os.path.abspath(path))
  fd, temporary = tempfile.mkstemp(dir=directory, prefix=f'.{name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(temporary, mode & ~_umask())
    os.replace(temporary, path)
  finally:
    if os.path.lexists(temporary):  # A failed write; after the rename it is gone.
      os.unlink(temporary)


def _umask() -> int:
  current = os.umask(0)
  os.umask(current)
  return current
