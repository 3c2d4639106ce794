"""The one exception type for mistakes a user can fix (bad config, bad data, bad paths).

The CLI turns a `UserError` into a one-paragraph message on stderr and exit code 2, with no
traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input: the message says what, where, and what to do."""
