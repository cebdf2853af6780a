"""The one base of every error a user can cause and fix: a bad config value, data file,
model folder, ledger, adapter, certificate or run folder. Entry points (the CLI, the
ClientApp) catch it once and report its message, one line naming the file, field or key;
anything else is a bug and keeps its traceback."""


class PrivatuneError(ValueError):
    """A user error, reported as one line."""


class ModelError(PrivatuneError):
    """The configured model cannot be found locally, or cannot do what the config asks."""
