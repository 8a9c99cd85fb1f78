"""The `spo` command: one module of this package per command group, each adding its commands to the app.

`recipe` (validate, resolve, schema, new), `train`, `plot`, `experiment` and `eval` each have a
`register(app)` function. Those modules import only typer and the standard library at import time and load
the library (and torch, transformers) inside the command bodies, so `spo validate` stays light. Each body
parses, calls one function of the package below, and prints; errors become one line and an exit code.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

import typer

COMMAND_MODULES = (
    "spo_align.cli.recipe",
    "spo_align.cli.train",
    "spo_align.cli.plot",
    "spo_align.cli.eval",
    "spo_align.cli.experiment",
    "spo_align.cli.models",
)

app = typer.Typer(
    name="spo",
    help="Declarative preference fine-tuning recipes built around Stable Preference Optimization.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# The HTTP clients under the judge: httpcore's DEBUG traces dump raw headers and bytes, so they stay
# off; httpx logs one INFO line per request, kept for `-v` only.
_QUIET_LOGGERS = ("httpcore", "httpcore2")
_VERBOSE_ONLY_LOGGERS = ("httpx", "httpx2")


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
) -> None:
    from spo_align.eval.redact import redact_handlers

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in _QUIET_LOGGERS + (() if verbose else _VERBOSE_ONLY_LOGGERS):
        logging.getLogger(name).setLevel(logging.WARNING)
    redact_handlers(logging.getLogger())  # every record that reaches the log is scrubbed of API keys


def _register_all() -> None:
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(app)


_register_all()


def main() -> None:
    app()

