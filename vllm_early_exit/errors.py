"""The plugin's two errors: a bad setting, and a model or engine setting early exit cannot run with."""


class EarlyExitConfigError(ValueError):
    """An early-exit setting is invalid. The message names the key and what is allowed."""


class EarlyExitUnsupportedError(ValueError):
    """The model or an engine setting cannot be combined with early exit (the message says why)."""
