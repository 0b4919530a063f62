"""User-facing errors: the CLI prints these as one line and exits non-zero (no traceback)."""


class VlmkitError(Exception):
    """A mistake the user can fix (bad path, bad key, bad data). The message says what and how."""


class DataError(VlmkitError):
    """Input data that cannot be used: a missing manifest, no usable rows, too many bad rows."""


class ConfigError(VlmkitError):
    """An unknown model or recipe name, or an override key that does not exist."""


class NoSupervisedTokensError(DataError):
    """A training batch in which no token is supervised: usually a chat template that does not match the
    data, so the loss would silently train on nothing."""
