"""The one error type the CLI prints as a single line (exit code 2) instead of a traceback."""


class ScopeError(Exception):
    """Bad input or state: the message names the file, column or key and what was expected."""
