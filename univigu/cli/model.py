"""`univigu model ...`: inspect and benchmark the unified transformer."""

from __future__ import annotations

import typer

app = typer.Typer(help="Inspect and benchmark the unified transformer.", no_args_is_help=True)
