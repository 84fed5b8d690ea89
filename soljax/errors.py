"""The exception type soljax raises for bad user input, and the one for a stop request.

The CLI turns a :class:`SoljaxError` into a single line on stderr and a non-zero exit code; any
other exception is a bug and keeps its traceback.
"""


class SoljaxError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM while a long job runs (a preempted VM, a scheduler's time limit, ``kill``): handled
    like Ctrl-C, so the job saves what it has and stops; the CLI exits with 143 (128 + SIGTERM)."""
