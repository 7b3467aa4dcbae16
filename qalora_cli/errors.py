"""The one exception type for mistakes a user can cause and fix.

The CLI's error boundary prints its message as one line and exits with code 2; any other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the cause and the fix."""
