"""The exception types a user's input can cause.

`UserError`: a mistake in the command (bad paths, bad CSVs, bad flags); command-line
modules print its message as one line and exit non-zero.
`RejectedFile`: one input file that cannot become a record; the converter writes its
message to rejects.csv and goes on, the web page answers 422 with it.
"""


class UserError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""


class RejectedFile(Exception):
    """A file that cannot become a record; the message is the reason written to rejects.csv."""
