"""`univigu world ...`: render, inspect and measure the toy video world."""

from __future__ import annotations

import typer

app = typer.Typer(help="The procedurally rendered toy video world.", no_args_is_help=True)


def demo() -> None:
    """Run the main job on the embedded default."""
    raise typer.Exit(1)
