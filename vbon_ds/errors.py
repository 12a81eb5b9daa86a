"""The one exception type the CLI turns into a one-line message and exit code 2."""


class VbonError(Exception):
    """A user-facing error: bad config, bad input data, missing file. The message says what to fix."""
