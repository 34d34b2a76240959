"""Rendering the report: the template filled with the context, figures embedded as data URIs."""

from __future__ import annotations

import functools
from pathlib import Path

import jinja2

from privmed.report.context import context
from privmed.report.figure import FigureOut
from privmed.report.run_files import RunFiles


def render(run: RunFiles, figures: list[FigureOut]) -> str:
    """The report page as one HTML string, figures embedded as data URIs."""
    return _template().render(**context(run, figures))


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("template.html.j2")
