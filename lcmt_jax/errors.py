"""The one exception type for bad input at the program's boundary, and bad command lines."""

import sys
from typing import NoReturn


class UserInputError(Exception):
  """A bad config value, data set, workdir or file.

  The message is one line that says what is wrong and what to do; `train.py`
  prints it and exits with status 2 instead of a traceback.
  """


# What absl and ml_collections raise for a bad flag or `--config.KEY=VALUE` override.
BAD_FLAG_ERRORS = (ValueError, TypeError, AttributeError, KeyError, OSError)


def exit_bad_command_line(error: Exception) -> NoReturn:
  """Prints a bad command line's error as one line and exits with status 2."""
  # ml_collections answers `--config.NO_SUCH_KEY=...` with an AttributeError holding a KeyError.
  missing_key = error.args[0] if error.args and isinstance(error.args[0], KeyError) else None
  if missing_key is not None:
    print(f'error: bad command line (no config key {missing_key.args[0]}; configs/default.py lists '
          'every key)', file=sys.stderr)
    sys.exit(2)
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  # A config file that fails to load says why on its last line.
  message = (lines[-1] if isinstance(error, OSError) else lines[0]) if lines else repr(error)
  print(f'error: bad command line ({message})', file=sys.stderr)
  sys.exit(2)


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """An `absl.app.run` flags parser that reports a bad command line with `exit_bad_command_line`."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flags.FLAGS(argv)
  except (flags.Error, *BAD_FLAG_ERRORS) as e:
    exit_bad_command_line(e)
