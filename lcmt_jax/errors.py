"""The one exception type for bad input at the program's boundary, and bad command lines."""

import sys
from collections.abc import Sequence
from typing import NoReturn


class UserInputError(Exception):
  """A bad config value, data set, workdir or file.

  The message is one line that says what is wrong and what to do; `train.py`
  prints it and exits with status 2 instead of a traceback.
  """


# What absl and ml_collections raise for a bad flag, `--config.KEY=VALUE` override or
# config file argument; `exit_bad_command_line` re-raises those that are bugs.
BAD_FLAG_ERRORS = (AttributeError, KeyError, OSError)


def command_line_mistake(error: Exception, argv: Sequence[str]) -> str | None:
  """The one-line message for a mistake on the command line `argv`, or None for a bug.

  An unknown key is a mistake only when the command line names it in a
  `--config.KEY` override; raised from inside a config file it is a bug. A
  config file's own `ValueError` (a bad `FILE.py:ARG`) is a mistake; any
  other exception inside it is a bug.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  # ml_collections answers `--config.NO_SUCH_KEY=...` with a KeyError, or an AttributeError holding one.
  if isinstance(error, AttributeError) and error.args and isinstance(error.args[0], KeyError):
    error = error.args[0]
  if isinstance(error, KeyError):
    # "'KEY'", then a line "Did you mean ...?" where a key is close.
    name, *hint = str(error.args[0] if error.args else '').splitlines()
    name = name.strip('\'"')
    overrides = [arg.split('=')[0].split('.')[1:] for arg in argv if arg.startswith('--config.')]
    if any(name in path for path in overrides):
      hint = f' ({hint[0][0].lower()}{hint[0][1:]})' if hint else ''
      return f"no config key '{name}'{hint}; configs/default.py lists every key"
    return None
  lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [repr(error)]
  if isinstance(error, OSError):  # A config file that fails to load says why on its last line.
    return lines[-1]
  if isinstance(error, flags.Error):
    if 'Error whilst parsing config file' in lines[0]:  # The file's traceback follows.
      return lines[-1].removeprefix('ValueError: ') if lines[-1].startswith('ValueError: ') else None
    return lines[0]
  return None


def exit_with_error(message: object) -> NoReturn:
  """Ends the program the way bad input ends it: `error: MESSAGE` on stderr, exit status 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def exit_bad_command_line(error: Exception) -> NoReturn:
  """Prints a command-line mistake as one line and exits with status 2; re-raises a bug."""
  message = command_line_mistake(error, sys.argv)
  if message is None:
    raise error
  exit_with_error(f'bad command line ({message})')


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """An `absl.app.run` flags parser that reports a bad command line with `exit_bad_command_line`."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flags.FLAGS(argv)
  except (flags.Error, *BAD_FLAG_ERRORS) as e:
    exit_bad_command_line(e)
