"""Errors a user can act on: the CLI prints them without a traceback, exit 2."""


class UserError(Exception):
    """A file, key, name or database state the user must fix; the message says which."""
