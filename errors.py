"""Errors that are the user's input, not a bug: the CLI prints them as one line."""


class UserError(Exception):
    """Bad input (arch, shards, model, database, checkpoint...). The message is the whole story."""
