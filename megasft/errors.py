"""The configuration error every layer raises before any compute (kept in a module of its own so
the tables that config.py reads — model presets — need not import config.py back)."""


class ConfigError(ValueError):
    """A configuration value or combination that cannot work; the message says how to fix it."""
