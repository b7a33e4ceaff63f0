"""The one exception type for bad input at the program's boundary."""


class UserInputError(Exception):
  """A bad config value, data set, workdir or file.

  The message is one line that says what is wrong and what to do; `train.py`
  prints it and exits with status 2 instead of a traceback.
  """
