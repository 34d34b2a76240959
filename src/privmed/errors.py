"""Errors a user can fix. The CLI prints their message on one line and exits with code 2."""


class PrivmedError(Exception):
    """Bad input: the message names the file or field, the value given and what is allowed."""


class ConfigError(PrivmedError):
    """A config key, type or value is not allowed."""


class DataError(PrivmedError):
    """A data file is missing, corrupt or inconsistent."""


class RunDirError(PrivmedError):
    """The output directory cannot be used (it holds another run, or nothing to resume)."""
