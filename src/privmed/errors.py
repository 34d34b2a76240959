"""Errors a user can fix. The CLI prints their message on one line and exits with code 2."""

import difflib
from collections.abc import Iterable


class PrivmedError(Exception):
    """Bad input: the message names the file or field, the value given and what is allowed."""


class ConfigError(PrivmedError):
    """A config key, type or value is not allowed."""


class DataError(PrivmedError):
    """A data file is missing, corrupt or inconsistent."""


class TrainingDiverged(PrivmedError):
    """A round left a model whose weights or outputs are not finite numbers."""

    ADVICE = ("every completed round is in the run directory. Lower training.lr or federation.server_lr, "
              "or, if a site may send bad updates, choose a robust federation.aggregator")


class RunDirError(PrivmedError):
    """The output directory cannot be used (it holds another run, or nothing to resume)."""


def unknown_name(field: str, kind: str, name: object, known: Iterable[str]) -> str:
    """One line for a name not in a registry, with the closest known name, e.g.
    "model.name: unknown model 'resnet19'; did you mean 'resnet18'? (known: cnn, resnet18)"."""
    known = sorted(known)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{field}: unknown {kind} '{name}'{hint} (known: {', '.join(known)})"
