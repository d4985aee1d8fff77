"""Ablations of the paper's claims in the toy world (METHOD.md section 6): plan, run, collect.

A folder of YAML files (`configs/ablations/`) describes them:

    settings.yaml   seeds, the starting generator, the per-stage training budget, the evaluation,
                    and the `smoke` variant (a few steps, a tiny evaluation: for CI)
    <study>.yaml    one study: `kind: train` (arms = overrides of the toy stage configs, trained
                    and evaluated per seed), `kind: sweep` (sampling steps x joint text update) or
                    `kind: coevolution` (joint generation followed step by step)

`plan` turns the folder into jobs; `run` runs them as parallel subprocesses, a job as soon as
the arms it needs are trained, skipping every job whose result file exists (a killed run resumes
where it stopped: its workers exit with it; OUT/run.lock refuses a second run while one lives).
Each job writes one JSON under `OUT/results/`; `univigu.evaluation.report` turns them into the report.

Arm names are global: the same name in two studies is the same trained model (its definition
must agree), so the default recipe is trained once per seed and serves every study that has it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context, parent_process
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import yaml

from univigu.training.checkpoint import sole_run

PACKAGE = Path(__file__).resolve().parents[1]
SHIPPED_BASE = PACKAGE / "assets" / "toy-base"
SHIPPED_MODEL = PACKAGE / "assets" / "toy-model"
STAGE_CONFIGS = PACKAGE / "configs" / "toy"
KINDS = ("train", "sweep", "coevolution")
SHIPPED = "shipped"  # the model name of the shipped toy model in sampling studies
STAGES = ("recall", "refine")  # the stages an arm trains (all start from a base generator)


@dataclass
class Settings:
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    base: str | None = None  # the generator arms start from (None: the shipped toy-base)
    model: str | None = None  # the finished model sampling studies also use (None: the shipped toy-model)
    budget: dict[str, int] = field(default_factory=lambda: {"recall": 150, "refine": 450})  # steps per stage
    curve_points: int = 3  # checkpoints per stage evaluated for learning curves
    overrides: list[str] = field(default_factory=list)  # every stage of every arm
    eval: dict[str, Any] = field(default_factory=dict)  # evaluate(): split, n, seed, batch_size, num_steps
    # --smoke replaces the settings it names, and under `studies` the fields of every study that has them
    smoke: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    name: str  # the result file: results/<name>.json
    kind: str  # "train", "base", "sweep", "coevolution"
    spec: dict[str, Any]
    needs: list[str] = field(default_factory=list)  # names of train jobs that must finish first


def load_plan(folder: str | Path, smoke: bool = False) -> dict[str, Any]:
    """Settings and studies from a folder of YAML files, validated; `smoke` applies settings' `smoke`."""
    folder = Path(folder)
    if not (folder / "settings.yaml").is_file():
        raise FileNotFoundError(f"{folder} has no settings.yaml (see configs/ablations/)")
    raw = yaml.safe_load((folder / "settings.yaml").read_text()) or {}
    unknown = sorted(set(raw) - set(Settings.__dataclass_fields__))
    if unknown:
        raise ValueError(f"settings.yaml: unknown keys {unknown}")
    settings = Settings(**raw)
    study_smoke = settings.smoke.get("studies", {}) if smoke else {}
    if smoke:
        fields = asdict(settings)
        for key, value in settings.smoke.items():
            if key != "studies":  # dicts (eval) are merged, the rest replaced
                fields[key] = {**fields[key], **value} if isinstance(value, dict) else value
        settings = Settings(**{**fields, "smoke": {}})
    if len(settings.seeds) < 1 or set(settings.budget) - {"recall", "refine"}:
        raise ValueError("settings.yaml: seeds must be a non-empty list and budget a subset of recall, refine")
    studies = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.name == "settings.yaml":
            continue
        study = yaml.safe_load(path.read_text()) or {}
        if study.get("kind") not in KINDS:
            raise ValueError(f"{path.name}: kind must be one of {KINDS}, got {study.get('kind')!r}")
        study.update({k: v for k, v in study_smoke.items() if k in study})
        studies[path.stem] = study
    arms: dict[str, dict[str, Any]] = {}
    for name, study in studies.items():
        if study["kind"] != "train":
            continue
        for arm, spec in (study.get("arms") or {}).items():
            spec = {"set": list((spec or {}).get("set", [])), "stages": list((spec or {}).get("stages", STAGES))}
            if not spec["stages"] or set(spec["stages"]) - set(STAGES):
                raise ValueError(f"{name}.yaml arm {arm}: stages must be a non-empty subset of {STAGES}")
            if arm in arms and arms[arm] != spec:
                raise ValueError(f"arm {arm!r} is defined twice, differently ({name}.yaml): {arms[arm]} vs {spec}")
            arms[arm] = spec
    return {"settings": asdict(settings), "studies": studies, "arms": arms, "smoke": smoke}


def stage_budget(settings: dict[str, Any], stages: list[str]) -> list[tuple[str, int]]:
    """(stage, steps) for an arm's stages: every arm gets the same total; the steps of stages an arm
    leaves out go to its last stage (refine only: recall's steps are spent refining)."""
    budget = settings["budget"]
    steps = [budget.get(s, 0) for s in stages]
    steps[-1] += sum(budget.get(s, 0) for s in STAGES if s not in stages)
    return list(zip(stages, steps))


def plan(folder: str | Path, smoke: bool = False) -> tuple[dict[str, Any], list[Job]]:
    """The plan (settings, studies, arms) and its jobs, longest first."""
    p = load_plan(folder, smoke)
    settings, studies = p["settings"], p["studies"]
    curve_arms = {a for s in studies.values() if s["kind"] == "train" and s.get("curve") for a in s["arms"]}
    jobs = [Job("base", "base", {"model": settings["base"] or str(SHIPPED_BASE)})]
    for arm, spec in p["arms"].items():
        for seed in settings["seeds"]:
            jobs.append(Job(f"train-{arm}-seed{seed}", "train", {
                "arm": arm, "seed": seed, "set": spec["set"], "stages": stage_budget(settings, spec["stages"]),
                "curve": arm in curve_arms}))  # fmt: skip
    for name, study in studies.items():
        if study["kind"] == "train":
            continue
        for model in study.get("models", [SHIPPED]):
            targets = [(SHIPPED, None)] if model == SHIPPED else [(model, s) for s in settings["seeds"]]
            for arm, seed in targets:
                if arm != SHIPPED and arm not in p["arms"]:
                    raise ValueError(f"{name}.yaml: model {arm!r} is neither {SHIPPED!r} nor a trained arm")
                tag = arm if seed is None else f"{arm}-seed{seed}"
                needs = [] if seed is None else [f"train-{arm}-seed{seed}"]
                if study["kind"] == "sweep":
                    for steps in study["steps"]:
                        jobs.append(Job(f"{name}-{tag}-steps{steps}", "sweep", {
                            "arm": arm, "seed": seed, "steps": steps,
                            "text_updates": study.get("text_updates", ["ctmc"])}, needs))  # fmt: skip
                else:
                    jobs.append(Job(f"{name}-{tag}", "coevolution", {
                        "arm": arm, "seed": seed, "steps": study.get("steps_per_run")}, needs))  # fmt: skip
    return p, jobs


# ---- running ---------------------------------------------------------------------------------------


def run(folder: str | Path, out: str | Path, device: str = "cpu", jobs: int = 1, smoke: bool = False,
        log=print, command: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Run every job of the plan not yet done, `jobs` at a time in subprocesses; returns the plan with
    `done` and `failed` job names (`command`, the command line, is kept in OUT/plan.json for the report).
    A failed job's log is OUT/logs/<name>.log; jobs needing it are skipped. A second run on the same OUT
    is refused while the first lives."""
    out = Path(out)
    p, todo = plan(folder, smoke)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    with sole_run(out, "univigu ablate"):
        models = {"base": p["settings"]["base"] or SHIPPED_BASE, "model": p["settings"]["model"] or SHIPPED_MODEL}
        models = {role: model_provenance(path) for role, path in models.items()}
        _check_same_models(out / "plan.json", models)
        record = {**p, "command": command, "device": device, "jobs": [asdict(j) for j in todo], "models": models}
        (out / "plan.json").write_text(json.dumps(record, indent=2))
        done = {j.name for j in todo if (out / "results" / f"{j.name}.json").exists()}
        failed: set[str] = set()
        pending = [j for j in todo if j.name not in done]
        if done:
            log(f"{len(done)} of {len(todo)} jobs already done (results exist): skipped")
        threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
        context = get_context("spawn")  # CUDA cannot be used in forked children
        running: dict[Future, Job] = {}
        start = time.perf_counter()
        pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(device, threads))
        with pool:
            while pending or running:
                for job in [j for j in pending if all(n in done for n in j.needs)]:
                    pending.remove(job)
                    running[pool.submit(run_job, job, p, str(out), device)] = job
                for job in [j for j in pending if any(n in failed for n in j.needs)]:
                    pending.remove(job)
                    failed.add(job.name)
                    log(f"skipped {job.name}: it needs a failed job")
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = running.pop(future)
                    try:
                        seconds = future.result()
                        done.add(job.name)
                        log(f"[{len(done)}/{len(todo)}] {job.name} done in {seconds:.0f} s "
                            f"({time.perf_counter() - start:.0f} s elapsed)")  # fmt: skip
                    except Exception as error:  # noqa: BLE001 -- one failed arm must not stop the others
                        failed.add(job.name)
                        log(f"FAILED {job.name}: {error!r} (log: {out / 'logs' / (job.name + '.log')})")
    return {**p, "done": sorted(done), "failed": sorted(failed), "seconds": round(time.perf_counter() - start, 1)}


def _init_worker(device: str, threads: int) -> None:
    # kill -9 of the parent runs no cleanup: without this the worker would finish its job (and write its
    # result) alongside a rerun, then wait for more work forever
    threading.Thread(target=_exit_with, args=(parent_process(),), daemon=True).start()
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # accelerate would otherwise train on a visible GPU
    import torch

    torch.set_num_threads(threads)


def _exit_with(parent: BaseProcess) -> None:
    parent.join()  # returns once the parent's end of the spawn pipe closes: it has exited, however
    os._exit(1)


def run_job(job: Job, p: dict[str, Any], out: str, device: str) -> float:
    """Run one job in this process, its output in OUT/logs/<name>.log; writes OUT/results/<name>.json."""
    out_dir = Path(out)
    start = time.perf_counter()
    with open(out_dir / "logs" / f"{job.name}.log", "a") as log, redirect_stdout(log), redirect_stderr(log):
        try:
            result = _JOBS[job.kind](job.spec, p, out_dir, device)
        except Exception:
            traceback.print_exc()
            raise
    result = {"job": job.name, "kind": job.kind, "spec": job.spec, **result,
              "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    target = out_dir / "results" / f"{job.name}.json"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, target)  # a result file is complete or absent
    return time.perf_counter() - start


def model_provenance(path: str | Path) -> dict[str, Any]:
    """Which model a run used, for its report: the path, a digest of its transformer's weights (the shipped models
    are retrained from time to time: a report names the ones it measured) and the stages it was trained with."""
    path = Path(path)
    digest = hashlib.sha256()
    for weights in sorted((path / "transformer").glob("*.safetensors")):
        with open(weights, "rb") as f:  # the files' bytes in order, read in chunks (a Wan-size base is GBs)
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    config = json.loads((path / "model_index.json").read_text()).get("config", {})
    shown = f"univigu/{path.resolve().relative_to(PACKAGE)}" if path.resolve().is_relative_to(PACKAGE) else str(path)
    return {"path": shown, "weights_sha256": digest.hexdigest()[:16], "trained": config.get("extra", {})}


def _check_same_models(plan_file: Path, models: dict[str, Any]) -> None:
    """A resumed run must measure the models its finished jobs measured (the shipped ones are retrained from time to
    time): RuntimeError naming the role whose weights changed."""
    if not plan_file.exists():
        return
    before = json.loads(plan_file.read_text()).get("models")
    changed = [role for role in models if before and before.get(role, {}).get("weights_sha256") !=
               models[role]["weights_sha256"]]  # fmt: skip
    if changed:
        raise RuntimeError(f"{plan_file.parent} was begun with other {' and '.join(changed)} weights than now (the "
                           "shipped models were retrained?): use a fresh --out, or the models it began with")


def _eval_kwargs(p: dict[str, Any]) -> dict[str, Any]:
    return {"split": "test", "n": 128, "seed": 0, "batch_size": 128, **p["settings"]["eval"]}


def _arm_model(spec: dict[str, Any], p: dict[str, Any], out: Path) -> Path:
    if spec["arm"] == SHIPPED:
        return Path(p["settings"]["model"] or SHIPPED_MODEL)
    return out / "arms" / spec["arm"] / f"seed{spec['seed']}" / "refine" / "final"


def _pipeline(path: Path, device: str):
    from univigu.pipelines.pipeline import UniViGUPipeline

    return UniViGUPipeline.from_pretrained(path, device=device)


def _base_job(spec: dict[str, Any], p: dict[str, Any], out: Path, device: str) -> dict[str, Any]:
    from univigu.evaluation.evaluate import evaluate

    return {"eval": evaluate(_pipeline(Path(spec["model"]), device), tasks=("t2v",), **_eval_kwargs(p))}


def _train_job(spec: dict[str, Any], p: dict[str, Any], out: Path, device: str) -> dict[str, Any]:
    """Train an arm's stages (resuming a stage whose run was cut), evaluate the final pipeline, and
    for learning curves the V2T accuracy of every saved checkpoint (EMA weights)."""
    from univigu.evaluation.evaluate import evaluate
    from univigu.training.config import load_config
    from univigu.training.stages import run_stage

    settings, seed = p["settings"], spec["seed"]
    arm_dir = out / "arms" / spec["arm"] / f"seed{seed}"
    init = settings["base"] or str(SHIPPED_BASE)
    curve, offset, minutes = [], 0, {}
    for stage, steps in spec["stages"]:
        overrides = [*settings["overrides"], *spec["set"], f"init_from={init}", f"train.output_dir={arm_dir / stage}",
                     f"train.max_steps={steps}", f"train.save_every={max(1, steps // settings['curve_points'])}",
                     "train.keep_last=1000", f"train.seed={seed}", f"data_seed={seed}"]  # fmt: skip
        cfg = load_config(STAGE_CONFIGS / f"{stage}.yaml", overrides)
        final = arm_dir / stage / "final"
        if not (final / "model_index.json").exists():
            t0 = time.perf_counter()
            run_stage(cfg, resume=True)
            minutes[stage] = round((time.perf_counter() - t0) / 60, 2)
        if spec["curve"]:
            for step, pipe in _checkpoint_pipelines(cfg, device):
                v2t = evaluate(pipe, tasks=("v2t",), **_eval_kwargs(p))["v2t"]["all"]
                curve.append({"step": offset + step, "stage": stage, "v2t": v2t})
        offset += steps
        init = str(final)
    pipe = _pipeline(arm_dir / "refine" / "final", device)
    results = evaluate(pipe, **_eval_kwargs(p))
    # the precision each stage trained in, as the exports record it (auto: bf16 only where the device has it)
    precision = {stage: pipe.config.extra[stage].get("mixed_precision") for stage, _ in spec["stages"]}
    return {"arm": spec["arm"], "seed": seed, "eval": results, "curve": curve, "train_minutes": minutes,
            "batch_size": cfg.train.batch_size, "mixed_precision": precision}


def _checkpoint_pipelines(cfg, device: str):
    """(step, pipeline) for each saved checkpoint of a stage run, with its EMA weights: one pipeline, its
    weights replaced by each checkpoint's in turn (use each before asking for the next)."""
    import torch

    from univigu.pipelines.pipeline import UniViGUPipeline
    from univigu.training.checkpoint import list_checkpoints
    from univigu.training.stages import build_task

    task, tokenizer, pipe_cfg = build_task(cfg)
    pipe = UniViGUPipeline(task.transformer, task.prompt_encoder, tokenizer, pipe_cfg).to(device)
    for path in list_checkpoints(Path(cfg.train.output_dir) / "checkpoints"):
        state = torch.load(path / "ema.pt", map_location=device)
        unexpected = task.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{path}/ema.pt does not match the stage's model: {unexpected[:5]}")
        step = json.loads((path / "trainer_state.json").read_text())["step"]
        yield step, pipe


def _sweep_job(spec: dict[str, Any], p: dict[str, Any], out: Path, device: str) -> dict[str, Any]:
    """T2V and V2T at a number of steps (the joint text update does not touch them), joint per text update."""
    from univigu.evaluation.evaluate import evaluate

    pipe = _pipeline(_arm_model(spec, p, out), device)
    kwargs = {**_eval_kwargs(p), "num_steps": spec["steps"]}
    results = {"single": evaluate(pipe, tasks=("t2v", "v2t"), **kwargs)}
    results["joint"] = {u: evaluate(pipe, tasks=("joint",), text_update=u, **kwargs)["joint"]
                        for u in spec["text_updates"]}  # fmt: skip
    return results


def _coevolution_job(spec: dict[str, Any], p: dict[str, Any], out: Path, device: str) -> dict[str, Any]:
    from univigu.evaluation.evaluate import coevolution

    kwargs = _eval_kwargs(p)
    kwargs.pop("num_steps", None)  # the study's steps_per_run
    return {"trajectory": coevolution(_pipeline(_arm_model(spec, p, out), device), num_steps=spec["steps"], **kwargs)}


_JOBS = {"base": _base_job, "train": _train_job, "sweep": _sweep_job, "coevolution": _coevolution_job}
