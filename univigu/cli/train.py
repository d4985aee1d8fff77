"""`univigu train CONFIG [key=value ...]` and `univigu train-all`."""

from __future__ import annotations

from pathlib import Path

import typer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "toy"


def train(
    ctx: typer.Context,
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="A stage YAML (see univigu/configs/toy/)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's latest checkpoint."),
) -> None:
    """Train one stage. Extra arguments override the YAML: `--train.max_steps=100 --mix.v2t=2`."""
    from univigu.training.stages import load_config, run_stage

    try:
        cfg = load_config(config, ctx.args)
    except (ValueError, TypeError) as error:
        raise typer.BadParameter(str(error), param_hint="CONFIG / overrides") from error
    final = run_stage(cfg, resume=resume)
    typer.echo(f"stage {cfg.stage} done: {final}")


def train_all(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/toy"), help="Folder for the three stage runs."),
    configs: Path = typer.Option(CONFIG_DIR, help="Folder with base.yaml, recall.yaml, refine.yaml."),
    resume: bool = typer.Option(False, "--resume", help="Resume each stage from its latest checkpoint."),
) -> None:
    """Train base -> recall -> refine, each stage starting from the previous one's export.
    Extra `stage.key=value` arguments override one stage: `--base.train.max_steps=10`."""
    from univigu.training.stages import STAGES, load_config, run_stage

    previous = None
    for stage in STAGES:
        prefix = f"{stage}."
        overrides = [a.lstrip("-")[len(prefix):] for a in ctx.args if a.lstrip("-").startswith(prefix)]
        overrides.append(f"train.output_dir={out / stage}")
        if previous is not None:
            overrides.append(f"init_from={previous}")
        final = out / stage / "final"
        if resume and (final / "model_index.json").exists():
            typer.echo(f"stage {stage}: already done ({final})")
        else:
            try:
                cfg = load_config(configs / f"{stage}.yaml", overrides)
            except (ValueError, TypeError) as error:
                raise typer.BadParameter(str(error), param_hint=f"{stage} overrides") from error
            final = run_stage(cfg, resume=resume)
            typer.echo(f"stage {stage} done: {final}")
        previous = final
