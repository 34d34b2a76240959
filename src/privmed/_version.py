"""privmed's version, on its own so that modules below the package's entry points can name it
without importing `privmed` itself (whose lazy `run` is the API above them)."""

__version__ = "0.1.0"
