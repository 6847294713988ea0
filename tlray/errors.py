"""The one error type that means "the user's input is wrong" (exit code 2)."""


class UserError(Exception):
    """Bad input — spec, data or paths. The CLI prints the message, no traceback, and exits 2."""
