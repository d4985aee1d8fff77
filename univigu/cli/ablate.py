"""`univigu ablate CONFIGS` (train and evaluate every arm, then write the report) and `univigu ablate-report`."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer


def ablate(
    configs: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder of ablation YAMLs."),
    out: Path = typer.Option(Path("runs/ablations"), help="Run folder: arms, logs, results/*.json (resumable)."),
    device: str = typer.Option("cpu", help="cuda or cpu: where every job trains and samples."),
    jobs: int = typer.Option(2, "--jobs", min=1, help="Jobs run at once, each in its own subprocess."),
    smoke: bool = typer.Option(False, "--smoke", help="The settings' smoke variant: 2 steps, tiny evaluation."),
    report: Path = typer.Option(None, help="Folder for ablations.md, ablations.json, plots (default: OUT/report)."),
) -> None:
    """Run the ablations of the paper's claims (jobs whose results exist are skipped), then write the report."""
    from univigu.evaluation.ablation import run
    from univigu.evaluation.report import write_report
    from univigu.training.checkpoint import RunFolderInUse

    if device not in ("cpu", "cuda"):
        raise typer.BadParameter(f"device must be cuda or cpu, got {device!r}", param_hint="--device")
    command = shlex.join(["univigu", "ablate", str(configs), "--out", str(out), "--device", device, "--jobs", str(jobs)]
                         + (["--smoke"] if smoke else []) + (["--report", str(report)] if report else []))  # fmt: skip
    try:
        done = run(configs, out, device=device, jobs=jobs, smoke=smoke, log=typer.echo, command=command)
    except RunFolderInUse as error:
        raise typer.BadParameter(str(error), param_hint="--out") from error
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error), param_hint="CONFIGS") from error
    path = write_report(out, report or out / "report")
    typer.echo(f"{len(done['done'])} jobs done in {done['seconds']:.0f} s; report: {path}")
    if done["failed"]:
        typer.echo(f"failed: {', '.join(done['failed'])} (logs in {out / 'logs'})", err=True)
        raise typer.Exit(1)


def ablate_report(
    out: Path = typer.Argument(..., exists=True, file_okay=False, help="A run folder of `univigu ablate`."),
    report: Path = typer.Option(None, help="Where the report goes (default: OUT/report)."),
) -> None:
    """Write the report again from a run folder's results (no training, no sampling)."""
    from univigu.evaluation.report import write_report

    typer.echo(f"report: {write_report(out, report or out / 'report')}")
