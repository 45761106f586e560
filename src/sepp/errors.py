"""One exception type for every user-facing failure.

The CLI prints ``error: <message>`` on one line and exits with status 2; library users catch it.
Messages say what was wrong and what to do about it.
"""


class SeppError(Exception):
    """A problem with the user's input, data or files, explained in one line."""
