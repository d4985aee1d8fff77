"""`univigu train CONFIG [key=value ...]` and `univigu train-all`."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import typer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "toy"
DEFAULT_STAGES = "base,refine"


def _run(cfg, resume: bool, stage: str | None = None) -> Path:
    """Train a stage; an output folder that already holds a run, a checkpoint the config cannot continue, or a
    latent cache the stage cannot use, is a usage error (each is found before any step runs). `stage`: run by
    train-all, whose overrides name their stage."""
    from univigu.data.latent_cache import CacheError
    from univigu.training import ResumeError
    from univigu.training.checkpoint import RunFolderInUse
    from univigu.training.cuda_memory import prefer_growable_segments
    from univigu.training.stages import run_stage

    prefer_growable_segments()  # before the Accelerator touches CUDA
    try:
        return run_stage(cfg, resume=resume)
    except (FileExistsError, ResumeError, RunFolderInUse) as error:
        message = str(error)
        if stage is not None and getattr(error, "continue_with", ()):
            message += "\n  (train-all: " + " ".join(f"--{stage}.{o}" for o in error.continue_with) + ")"
        raise typer.BadParameter(message, param_hint="--resume / " + ("--out" if stage else "train.output_dir")) \
            from error
    except CacheError as error:
        raise typer.BadParameter(str(error), param_hint="data / pipeline") from error
    except KeyboardInterrupt:  # its checkpoints are kept: nothing is lost but the steps since the last
        from univigu.training.checkpoint import list_checkpoints

        again = "the same train-all call with --resume" if stage else "univigu train with --resume"
        folder = Path(cfg.train.output_dir)
        where = f"the last checkpoint in {folder}" if list_checkpoints(folder / "checkpoints") else \
            f"the start (no checkpoint was written yet in {folder})"  # fmt: skip
        _say(f"interrupted: {again} continues from {where}")
        raise typer.Exit(130) from None


def _check_folder_can_be_made(path: Path, param_hint: str) -> None:
    """An output folder that cannot be made (a file in its way, no permission) is a usage error now, not a traceback
    once training starts. Nothing is made here: a call refused later leaves no folder behind."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise typer.BadParameter(f"{path}: {existing} is a file, not a folder", param_hint=param_hint)
    if existing != Path(path) and not os.access(existing, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"{path}: no permission to make a folder in {existing}", param_hint=param_hint)


def _say(text: str) -> None:
    """Print once per run, not once per process (accelerate / torchrun set RANK)."""
    from univigu.training.stages import is_main_process

    if is_main_process():
        typer.echo(text)


def _steps_done(final: Path, stage: str) -> int | None:
    """The steps a stage's exported pipeline was trained for (its provenance); None when there is none."""
    index = final / "model_index.json"
    if not index.is_file():
        return None
    return json.loads(index.read_text()).get("config", {}).get("extra", {}).get(stage, {}).get("steps")


def _has_run(folder: Path) -> bool:
    """A stage folder holds a run (a folder with only a refused run's record holds none)."""
    from univigu.training.checkpoint import list_checkpoints

    return (folder / "final").exists() or bool(list_checkpoints(folder / "checkpoints"))


def _check_world_sizes_follow(stage_configs: dict, finished: dict) -> None:
    """A toy-world stage trains on videos of the size of the pipeline it starts from: that of the stage before it,
    whose export this call makes (its world's size). Checked before any stage trains (the stage's own check reads
    the export, there only once the stage before has trained)."""
    from univigu.data.world import WorldConfig

    stages = list(stage_configs)
    for before, stage in zip(stages, stages[1:]):
        first, then = stage_configs[before], stage_configs[stage]
        if finished[before] or "latent_cache" in (first.data.get("kind"), then.data.get("kind")):
            continue
        world = WorldConfig(**first.world)  # the size of the pipeline the stage before exports
        differ = then.world_size_mismatch({k: getattr(world, k) for k in ("frames", "height", "width")})
        if differ:
            sizes = "; ".join(f"world.{k} {ours} vs {theirs}" for k, (ours, theirs) in differ.items())
            flags = " ".join(f"--{stage}.world.{k}={theirs}" for k, (_, theirs) in differ.items())
            raise typer.BadParameter(f"stage {stage} trains on videos of another size than stage {before}'s model "
                                     f"makes ({sizes}): give both stages one size, e.g. {flags}",
                                     param_hint=f"{stage} overrides")  # fmt: skip


def _check_later_stages_start_from_this_run(out: Path, stage_configs: dict) -> None:
    """A resumed train-all continues a stage's run only if it began from the export this chain gives it (a run begun
    in another --stages chain is refused), and once a stage trains (further, or afresh), a later stage's run, begun
    from its old export, is refused too. Finished stages that are kept as they are pass."""
    import yaml

    def finished(stage: str) -> bool:
        done = _steps_done(out / stage / "final", stage)
        return done is not None and done >= stage_configs[stage].train.max_steps

    stages = list(stage_configs)
    for stage, cfg in stage_configs.items():
        record = out / stage / "stage_config.yaml"
        if cfg.init_from is None or finished(stage) or not _has_run(out / stage) or not record.is_file():
            continue
        began = (yaml.safe_load(record.read_text()) or {}).get("init_from")
        if began is None:
            continue
        # a run moved with its chain recorded paths that are gone: the same stage's export is the same chain
        moved = not Path(began).exists() and Path(began).parts[-2:] == Path(cfg.init_from).parts[-2:]
        if Path(began).resolve() != Path(cfg.init_from).resolve() and not moved:
            raise typer.BadParameter(f"{out / stage} began from {began}, and this chain ({', '.join(stages)}) would "
                                     f"continue it from {cfg.init_from}: move it away to train it again, or resume "
                                     "with the stages it was trained in", param_hint="--stages / --resume")  # fmt: skip
    for i, stage in enumerate(stages):
        if finished(stage):
            continue
        done = _steps_done(out / stage / "final", stage)
        stale = [s for s in stages[i + 1:] if _has_run(out / s)]
        if stale:
            trains = "from scratch" if done is None else f"from {done} to {stage_configs[stage].train.max_steps} steps"
            unchanged = f"--{stage}.train.max_steps={done}"
            keep = "" if done is None else f", or resume with {stage}'s steps unchanged ({unchanged})"
            raise typer.BadParameter(
                f"stage {stage} would train {trains}, but {', '.join(str(out / s) for s in stale)} already "
                f"{'hold runs' if len(stale) > 1 else 'holds a run'} begun before this {stage} export: move "
                f"{'them' if len(stale) > 1 else 'it'} away to train again from the new {stage}{keep}",
                param_hint="--resume")  # fmt: skip
        return


@contextlib.contextmanager
def _usage_errors(stage: str) -> Iterator[None]:
    """A config or input a train-all stage cannot use: a usage error naming the stage's overrides."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error), param_hint=f"{stage} overrides") from error


def _write_text(path: Path, text: str) -> None:
    """Whole or not at all: written beside, then renamed over."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _leave_process_group() -> None:
    """End a distributed run together: a process that exits with its process group open can abort in the
    group's teardown (gloo: "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def train(
    ctx: typer.Context,
    config: Path = typer.Argument(..., exists=True, dir_okay=False,
                                  help="A stage YAML (univigu/configs/toy/, univigu/configs/wan/)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's latest checkpoint."),
) -> None:
    """Train one stage. Extra arguments override the YAML: `--train.max_steps=100 --mix.v2t=2`."""
    from univigu.training.config import load_config

    try:
        cfg = load_config(config, ctx.args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error), param_hint="CONFIG / overrides") from error
    # a run's own record (its paths absolute), read after the run was moved: it would resume (or start) elsewhere
    run_dir = config.resolve().parent
    given = any(a.lstrip("-").startswith("train.output_dir") for a in ctx.args)
    if resume and config.name == "stage_config.yaml" and (run_dir / "checkpoints").is_dir() and not given \
            and Path(cfg.train.output_dir).resolve() != run_dir:
        raise typer.BadParameter(f"{config} records a run in {cfg.train.output_dir}, and it lies in {run_dir}: was "
                                 f"the run moved? pass --train.output_dir={run_dir} (and --init_from= if what it "
                                 "began from moved too)", param_hint="CONFIG")  # fmt: skip
    try:
        cfg.check_inputs()
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error), param_hint="CONFIG / overrides") from error
    _check_folder_can_be_made(Path(cfg.train.output_dir), "train.output_dir")
    final = _run(cfg, resume)
    _leave_process_group()
    _say(f"stage {cfg.stage} done: {final}\n  use it: univigu generate \"PROMPT\" --model {final}"
         f"  (or start a stage from it: --init_from={final})")  # fmt: skip


def train_all(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/toy"), help="Folder for the stage runs."),
    configs: Path = typer.Option(None, help="Folder with base.yaml, recall.yaml, refine.yaml [default: the toy "
                                 "configs; resumed: the chain's]."),
    stages: str = typer.Option(None, help="Comma-separated, in order: base,recall,refine (the paper's schedule) or "
                               f"the toy default {DEFAULT_STAGES} (see reports/ablations.md, claim 3) [default: "
                               f"{DEFAULT_STAGES}; resumed: the chain's]."),
    resume: bool = typer.Option(False, "--resume", help="Resume each stage from its latest checkpoint, with the "
                                "chain's first call's --configs, --stages and overrides (OUT/train_all.json) and this "
                                "call's on top: they need no repeating."),
) -> None:
    """Train the stages in order, each starting from the previous one's export (the toy default skips
    Knowledge Recall: at the same budget, refine alone captions better in the toy world).
    Extra `stage.key=value` arguments override one stage: `--base.train.max_steps=10`."""
    from univigu.training.checkpoint import restore_interrupted
    from univigu.training.config import STAGES, load_config
    from univigu.training.stages import is_main_process

    _check_folder_can_be_made(out, "--out")
    record, recorded, earlier = out / "train_all.json", [], {}
    if resume and record.is_file():  # the chain's earlier calls: what this call does not give again
        earlier = json.loads(record.read_text())
        if configs is None:
            configs = earlier["configs"] and Path(earlier["configs"])
        stages = earlier["stages"] if stages is None else stages
        recorded = earlier["overrides"]
        _say(f"train-all: resumed with the settings in {record}, this call's on top")
    # the shipped configs are recorded as none: a reinstalled univigu's are found where they are now
    given_configs = configs and str(Path(configs).resolve())
    configs, stages = configs or CONFIG_DIR, DEFAULT_STAGES if stages is None else stages  # "": refused below
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    if not chosen or any(s not in STAGES for s in chosen) or chosen != sorted(chosen, key=STAGES.index) \
            or len(set(chosen)) != len(chosen):
        raise typer.BadParameter(f"stages must be distinct and in the order of {STAGES}, got {stages!r}",
                                 param_hint="--stages")  # fmt: skip
    # this call's overrides after the earlier calls' (later ones win), less those for stages this chain leaves out
    args = [a for a in recorded if a.lstrip("-").split(".")[0] in chosen] + list(ctx.args)
    stray = [a for a in args if not any(a.lstrip("-").startswith(f"{stage}.") for stage in chosen)]
    if stray:
        raise typer.BadParameter(f"{stray}: an override names its stage, one of {chosen} "
                                 f"(--{chosen[-1]}.train.max_steps=10)", param_hint="overrides")  # fmt: skip
    lacking = [f"{stage}.yaml" for stage in chosen if not (Path(configs) / f"{stage}.yaml").is_file()]
    if lacking:
        raise typer.BadParameter(f"{configs} holds no {', '.join(lacking)} (a folder of stage YAMLs, as "
                                 f"{CONFIG_DIR} is)", param_hint="--configs")  # fmt: skip
    # every stage's config is checked before any trains: a typo in the last must not wait for the first to finish
    stage_configs, previous = {}, None
    for stage in chosen:
        prefix = f"{stage}."
        overrides = [a.lstrip("-")[len(prefix):] for a in args if a.lstrip("-").startswith(prefix)]
        overrides.append(f"train.output_dir={out / stage}")
        if previous is not None:
            overrides.append(f"init_from={previous}")
        with _usage_errors(stage):
            stage_configs[stage] = load_config(configs / f"{stage}.yaml", overrides)
        previous = out / stage / "final"
    if resume:
        for stage in stage_configs:  # a stage's export cut between its two renames: the export before it
            restore_interrupted(out / stage / "final")
        _check_later_stages_start_from_this_run(out, stage_configs)
    done = {stage: _steps_done(out / stage / "final", stage) for stage in stage_configs}  # none trained yet
    finished = {stage: resume and done[stage] is not None and done[stage] >= cfg.train.max_steps
                for stage, cfg in stage_configs.items()}  # fmt: skip
    for stage, cfg in stage_configs.items():  # the data of a stage that will train: not only once the earlier trained
        if not finished[stage]:
            with _usage_errors(stage):
                cfg.check_data()
    _check_world_sizes_follow(stage_configs, finished)
    # recorded for --resume: by a fresh chain, or a resume of the recorded one (not a fresh call over runs, which is
    # refused, nor a resume of another chain of stages in the folder); put back if this call is refused
    before = record.read_text() if record.is_file() else None
    if is_main_process() and (earlier.get("stages") == ",".join(chosen) if earlier else
                              not any(_has_run(out / stage) for stage in chosen) or resume):  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        _write_text(record, json.dumps({"configs": given_configs, "stages": ",".join(chosen), "overrides": args},
                                       indent=1))  # fmt: skip
    try:
        for stage, cfg in stage_configs.items():
            final = out / stage / "final"
            if finished[stage]:
                _say(f"stage {stage}: already done ({final})")
                continue
            if resume and done[stage] is not None:
                _say(f"stage {stage}: {done[stage]} steps done, continuing to {cfg.train.max_steps}")
            with _usage_errors(stage):
                cfg.check_inputs()  # its init_from is the previous stage's final/, there only now
            final = _run(cfg, resume, stage)
            _say(f"stage {stage} done: {final}")
    except typer.BadParameter:
        if is_main_process() and before is not None:
            _write_text(record, before)
        raise
    _leave_process_group()
