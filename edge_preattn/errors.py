"""The one exception type users see as a sentence instead of a traceback."""


class UserError(Exception):
    """Bad input or environment: the message names the problem and the fix, on one line.

    The CLI prints it as `edge-preattn: error: <message>` and exits with status 2.
    """
