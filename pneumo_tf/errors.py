"""The one exception type for mistakes a user can make (bad paths, bad CSVs, bad flags).

Command-line modules catch it, print its message as one line and exit non-zero.
"""


class UserError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""
