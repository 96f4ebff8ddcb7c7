"""The one exception type users see: a message that names the problem and the fix."""


class SvdqError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits non-zero."""
