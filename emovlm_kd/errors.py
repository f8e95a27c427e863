"""Errors the command line turns into exit codes (a `UsageError` exits with status 2 and its message)."""


class UsageError(Exception):
    """A bad flag or value: the command exits with status 2 and this message."""
