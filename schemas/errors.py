"""Errors that reach a user: the CLI prints them as one readable line."""


class BorderflowError(Exception):
    """A failure with a message meant for the operator (no traceback needed)."""
