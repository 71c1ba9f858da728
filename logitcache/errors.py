"""The one exception type a user sees as a single red line (see cli.py)."""


class LogitcacheError(Exception):
    """A problem with the user's input or environment, stated so they can fix it."""
