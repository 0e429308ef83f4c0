"""The one base class for input problems the CLI reports as a single line (exit code 2)."""


class UserError(ValueError):
    """Bad input or environment the user can fix: a message of one line, no traceback."""
