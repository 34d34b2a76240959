"""Loading a config: YAML files, `--set key.path=value` overrides, and validation with every
pydantic error turned into one line naming the file, the field, the value given and what is
allowed (privmed.errors.ConfigError), with "did you mean" for a misspelt key."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from privmed.config.schema import RunConfig, SiteConfig
from privmed.errors import ConfigError


def load_site_config(path: Path | str, overrides: list[str] | None = None) -> SiteConfig:
    """Read, override and validate a hospital's YAML config; ConfigError names the bad field."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    try:
        return SiteConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("; ".join(_format_error(err, str(path), SiteConfig) for err in e.errors())) from None


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at `loc` (a pydantic error location), for 'did you mean'."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_error(err: dict, source: str, schema: type[BaseModel] | None = None) -> str:
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "config"
    if err["type"] == "extra_forbidden":
        known = _known_keys(schema or RunConfig, loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{source}: unknown key '{where}'{hint} (allowed here: {', '.join(known)})"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":
        return f"{source}: {msg}"
    given = err.get("input")
    if isinstance(given, dict):
        return f"{source}: {where}: {msg}"
    return f"{source}: {where}: {msg}, got {given!r}"


def validate_config(raw: dict | RunConfig, source: str = "config") -> RunConfig:
    """A RunConfig from a dict (or a RunConfig, returned as is); ConfigError names the bad field."""
    if isinstance(raw, RunConfig):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("; ".join(_format_error(err, source) for err in e.errors())) from None


def apply_overrides(raw: dict, overrides: list[str], source: str = "--set") -> dict:
    """A copy of `raw` with each 'a.b.c=value' applied; the value is parsed as YAML."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source}: '{item}' is not of the form key.path=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: '{key}': '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = parsed
    return out


def read_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    return raw


def load_config(path: Path | str, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML config. `name` defaults to the file's stem."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    raw.setdefault("name", path.stem)
    return validate_config(raw, source=str(path))
