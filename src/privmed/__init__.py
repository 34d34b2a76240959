"""privmed: train medical-imaging models across hospitals without moving patient data."""

from privmed._version import __version__
from privmed.errors import PrivmedError

__all__ = ["PrivmedError", "__version__", "run", "load_config"]


def __getattr__(name):  # lazy: `import privmed` stays cheap (no torch import) for the CLI's --help
    if name == "run":
        from privmed.api import run

        return run
    if name == "load_config":
        from privmed.config import load_config

        return load_config
    raise AttributeError(f"module 'privmed' has no attribute {name!r}")
