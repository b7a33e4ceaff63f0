"""The command-line scaffold of `lcmt_jax.evaluate`, `plot` and `report` (and `train.py`'s errors).

Each tool defines its absl flags in a function (so importing a module defines
none) and a `main(argv, flags)`; `run` parses the command line, reports a bad
one in one line, quiets absl's INFO logging (orbax reports every step at
INFO), and turns bad input (`errors.UserInputError`) into `error: ...` on
stderr with exit status 2.
"""

from collections.abc import Callable
from typing import Any

from lcmt_jax import errors


def run(main: Callable[[list[str], Any], None], define_flags: Callable[[], Any]) -> None:
  """Defines the flags, then runs `main(argv, define_flags())` as an absl app."""
  from absl import app  # pylint: disable=import-outside-toplevel
  from absl import logging  # pylint: disable=import-outside-toplevel
  defined = define_flags()

  def main_with_errors(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    try:
      main(argv, defined)
    except errors.UserInputError as e:
      errors.exit_with_error(e)

  app.run(main_with_errors, flags_parser=errors.parse_flags_or_exit)


def config_value(config_flag: Any) -> Any:
  """The value of an ml_collections config flag; a mistake in it (a bad file, argument or
  `--config.KEY` override) exits with one line, a bug inside the file raises."""
  try:
    return config_flag.value
  except errors.BAD_FLAG_ERRORS as e:
    errors.exit_bad_command_line(e)
