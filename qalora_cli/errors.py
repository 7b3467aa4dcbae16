"""The one exception type for mistakes a user can cause and fix.

The CLI's error boundary prints its message as one line and exits with code 2; any other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the cause and the fix."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, for a one-line refusal; its type's name when
    the message is empty (str(e).splitlines()[0] would fail on it)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def root_cause(e: BaseException) -> BaseException:
    """The innermost `raise ... from` cause: libraries such as `datasets` wrap the telling error."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e
