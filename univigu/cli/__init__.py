"""The `univigu` command line. Each command group lives in its own module."""

from __future__ import annotations

import warnings

import typer

from univigu.cli import ablate as ablate_cli
from univigu.cli import model as model_cli
from univigu.cli import run as run_cli
from univigu.cli import train as train_cli
from univigu.cli import wan as wan_cli
from univigu.cli import world as world_cli

app = typer.Typer(
    name="univigu",
    help="Uni-ViGU: generate video from text, and text from video, with one diffusion transformer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(world_cli.app, name="world")
app.add_typer(model_cli.app, name="model")
app.command("demo")(run_cli.demo)
app.command("generate")(run_cli.generate)
app.command("caption")(run_cli.caption)
app.command("joint")(run_cli.joint)
app.command("eval")(run_cli.evaluate)
app.command("export")(run_cli.export)
app.command("serve")(run_cli.serve)
_EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
app.command("train", context_settings=_EXTRA_ARGS)(train_cli.train)
app.command("train-all", context_settings=_EXTRA_ARGS)(train_cli.train_all)
app.command("ablate")(ablate_cli.ablate)
app.command("ablate-report")(ablate_cli.ablate_report)
app.command("cache-latents")(wan_cli.cache_latents)
app.command("convert-official")(wan_cli.convert_official)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    # on the command line a warning is for the user: its message, not the source line that raised it
    kind = "warning" if category is UserWarning else category.__name__
    return f"{kind}: {message}\n"


def main() -> None:
    warnings.formatwarning = _format_warning
    app()
