"""The one exception type soljax raises for bad user input.

The CLI turns a :class:`SoljaxError` into a single line on stderr and a non-zero exit code; any
other exception is a bug and keeps its traceback.
"""


class SoljaxError(Exception):
    """A problem with the user's input or environment, explained in one line."""
