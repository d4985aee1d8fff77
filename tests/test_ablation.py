"""Ablations: the text_ffn switch, the scratch init, the plan, the verdict rule, and `univigu ablate --smoke`
end to end on the committed configs (the command that makes reports/ablations.md)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from threads import torch_threads
from typer.testing import CliRunner

from univigu import UniViGUTransformer
from univigu.cli import app
from univigu.evaluation.ablation import SHIPPED_BASE, plan, run, run_job, stage_budget
from univigu.evaluation.report import _stats, compare, verdict
from univigu.models.transformer import parameter_breakdown
from univigu.training.config import load_config
from univigu.training.stages import build_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "ablations"
TOY = Path(__file__).resolve().parents[1] / "univigu" / "configs" / "toy"


def test_shared_text_ffn_has_no_experts_and_routes_text_through_the_video_ffn(tiny_parts, tmp_path):
    wan, expert = tiny_parts["wan"], tiny_parts["unified"]
    shared = UniViGUTransformer.from_wan(wan, text_vocab_size=expert.config.text_vocab_size, text_ffn="shared")
    assert all(b.ffn_t is None and b.text_ffn is b.ffn for b in shared.blocks)
    ffn_t = sum(p.numel() for n, p in expert.named_parameters() if ".ffn_t." in n)
    assert parameter_breakdown(expert)["text"] - parameter_breakdown(shared)["text"] == ffn_t > 0
    # same text weights as the expert model: at init (ffn_t a copy of ffn) both compute the same thing
    shared.load_state_dict({k: v for k, v in expert.state_dict().items() if ".ffn_t." not in k})
    args = (torch.randn(2, 3, 4, 8, 8), torch.randint(0, 20, (2, 5)), torch.tensor([900.0, 100.0]),
            torch.tensor([500.0, 0.0]), torch.randn(2, 3, 32))  # fmt: skip
    with torch.no_grad():
        for a, b in zip(expert(*args), shared(*args)):
            torch.testing.assert_close(a, b)
    shared.save_pretrained(tmp_path)
    assert UniViGUTransformer.from_pretrained(tmp_path).config.text_ffn == "shared"
    with pytest.raises(ValueError, match="text_ffn"):
        UniViGUTransformer(num_layers=1, num_attention_heads=1, attention_head_dim=12, ffn_dim=8, text_dim=8,
                           text_vocab_size=4, text_ffn="none")  # fmt: skip


def test_scratch_init_keeps_the_architecture_not_the_weights():
    def transformer(init):
        cfg = load_config(TOY / "recall.yaml", [f"init_from={SHIPPED_BASE}", f"init={init}"])
        return build_task(cfg)[0].transformer

    prior, scratch = transformer("generator"), transformer("scratch")
    assert prior.config == scratch.config
    base = UniViGUTransformer.from_wan(SHIPPED_BASE / "transformer", text_vocab_size=prior.config.text_vocab_size)
    torch.testing.assert_close(prior.patch_embedding.weight, base.patch_embedding.weight)
    assert not torch.allclose(scratch.patch_embedding.weight, base.patch_embedding.weight)
    with pytest.raises(ValueError, match="init must be"):
        load_config(TOY / "recall.yaml", [f"init_from={SHIPPED_BASE}", "init=random"])


def test_plan_shares_the_default_arm_and_gives_every_arm_the_same_budget(tmp_path):
    p, jobs = plan(CONFIGS)
    names = [j.name for j in jobs]
    assert names.count("train-default-seed0") == 1  # the recipe serves four studies, trained once per seed
    assert {"default", "shared_ffn", "scratch", "refine_only"} <= set(p["arms"])
    totals = {sum(s for _, s in stage_budget(p["settings"], a["stages"])) for a in p["arms"].values()}
    assert totals == {sum(p["settings"]["budget"].values())}
    assert all(j.needs == ["train-default-seed1"] for j in jobs if j.name.startswith("sampler-default-seed1"))
    (tmp_path / "settings.yaml").write_text("seeds: [0]\n")
    (tmp_path / "a.yaml").write_text("kind: train\narms: {x: {set: [text_ffn=shared]}}\n")
    (tmp_path / "b.yaml").write_text("kind: train\narms: {x: {set: [init=scratch]}}\n")
    with pytest.raises(ValueError, match="defined twice"):
        plan(tmp_path)
    (tmp_path / "b.yaml").write_text("kind: nonsense\n")
    with pytest.raises(ValueError, match="kind must be one of"):
        plan(tmp_path)


def test_verdict_rule_reads_differences_against_the_seed_spread():
    tight_high, tight_low = _stats([0.50, 0.52]), _stats([0.40, 0.41])
    assert compare(tight_high, tight_low)["outcome"] == "better"
    assert compare(tight_low, tight_high)["outcome"] == "worse"
    noisy = _stats([0.30, 0.60])  # spread larger than the difference
    assert compare(tight_high, noisy)["outcome"] == "tie"
    assert verdict([compare(tight_high, tight_low)]) == "supported"
    assert verdict([compare(tight_low, tight_high)]) == "not supported"
    assert verdict([compare(tight_high, tight_low), compare(tight_low, tight_high)]) == "inconclusive"


def test_ablate_smoke_end_to_end_resumes_and_regenerates_the_report(tmp_path):
    runner = CliRunner()
    out, report = tmp_path / "run", tmp_path / "report"
    args = ["ablate", str(CONFIGS), "--out", str(out), "--smoke", "--jobs", "2", "--report", str(report)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    md = (report / "ablations.md").read_text()
    assert "SMOKE RUN" in md and f"--out {out}" in md
    # what was measured: the batch the arms trained at (smoke: 2) and which shipped models, by weights digest
    from univigu.evaluation.ablation import SHIPPED_BASE, SHIPPED_MODEL, model_provenance

    base = model_provenance(SHIPPED_BASE)
    import torch

    from univigu.training.trainer import native_bf16

    precision = "bf16" if native_bf16(torch.device("cpu")) else "no"  # the toy stages' auto, on this machine
    assert f"steps at batch 2 in {'float32' if precision == 'no' else precision} from" in md
    trained = json.loads((out / "results" / "train-default-seed0.json").read_text())["mixed_precision"]
    assert trained == {"recall": precision, "refine": precision}
    assert f"- Base generator: `univigu/assets/toy-base`, transformer weights sha256 {base['weights_sha256']}" in md
    model = model_provenance(SHIPPED_MODEL)
    assert f"- Finished model (sampling studies): `univigu/assets/toy-model`, transformer weights sha256 " \
           f"{model['weights_sha256']} (base {model['trained']['base']['steps']} steps" in md
    summary = json.loads((report / "ablations.json").read_text())
    assert [c["claim"] for c in summary["claims"]] == [1, 2, 3, 4]
    assert all(c["verdict"] in ("supported", "not supported", "inconclusive") for c in summary["claims"])
    for name in ("learning_curve.png", "sampler_steps.png", "coevolution.png"):
        assert (report / name).stat().st_size > 1000
    # the report's numbers are the per-seed results: V2T of the default arm, mean over its seeds
    v2t = [json.loads((out / "results" / f"train-default-seed{s}.json").read_text())["eval"]["v2t"]["all"]
           for s in (0, 1)]  # fmt: skip
    assert summary["arms"]["default"]["stats"]["v2t"]["mean"] == pytest.approx(sum(v2t) / 2)
    assert len(summary["arms"]["default"]["curve"]["steps"]) == 2  # one checkpoint per stage

    again = runner.invoke(app, args)  # resumable: nothing left to run, the same report
    assert again.exit_code == 0, again.output
    assert "already done" in again.output
    assert (report / "ablations.md").read_text() == md
    rewritten = runner.invoke(app, ["ablate-report", str(out), "--report", str(tmp_path / "again")])
    assert rewritten.exit_code == 0, rewritten.output
    assert (tmp_path / "again" / "ablations.md").read_text() == md


def test_a_run_resumed_with_other_model_weights_is_refused(tmp_path):
    """A run records the weights it measured; resuming it after the shipped models were retrained would report
    old and new results as one."""
    from univigu.evaluation.ablation import SHIPPED_BASE, _check_same_models, model_provenance

    models = {"base": model_provenance(SHIPPED_BASE)}
    plan = tmp_path / "plan.json"
    _check_same_models(plan, models)  # a fresh run
    plan.write_text(json.dumps({"models": models}))
    _check_same_models(plan, models)  # the same weights
    plan.write_text(json.dumps({"models": {"base": {**models["base"], "weights_sha256": "0" * 16}}}))
    with pytest.raises(RuntimeError, match="begun with other base weights"):
        _check_same_models(plan, models)


def test_killed_ablate_takes_its_workers_along_and_a_rerun_finishes_its_job(tmp_path):
    configs, out = tmp_path / "configs", tmp_path / "run"
    configs.mkdir()
    (configs / "settings.yaml").write_text("seeds: [0]\neval: {n: 2, batch_size: 2, num_steps: 2}\n")  # one job: base
    main = subprocess.Popen([sys.executable, "-m", "univigu", "ablate", str(configs), "--out", str(out), "--jobs", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    children = []
    try:
        deadline = time.monotonic() + 60
        while not (out / "logs" / "base.log").exists():  # the worker has started the job
            assert main.poll() is None and time.monotonic() < deadline, "the run ended before its job started"
            time.sleep(0.05)
        children = psutil.Process(main.pid).children(recursive=True)  # the worker, the resource tracker
        os.kill(main.pid, signal.SIGKILL)
        main.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"orphaned: {[' '.join(c.cmdline()) for c in alive]}"
    finally:
        for child in children:
            if child.is_running():
                child.kill()

    lock = out / "run.lock"
    assert lock.read_text() == str(main.pid)  # the killed run's lock, left behind
    lock.write_text(str(os.getpid()))  # a live owner's: refused
    with pytest.raises(ValueError, match=f"in use by another univigu ablate \\(process {os.getpid()}\\)"):
        run(configs, out, log=lambda _: None)
    refused = CliRunner().invoke(app, ["ablate", str(configs), "--out", str(out)])
    assert refused.exit_code == 2 and "Invalid value for --out" in refused.output
    lock.write_text(str(main.pid))  # a dead owner's: taken over
    assert run(configs, out, log=lambda _: None)["done"] == ["base"]
    assert not lock.exists()
    # the job run uninterrupted, in this process (a worker's start is seconds of imports) on a worker's threads
    p, (job,) = plan(configs)
    for folder in ("logs", "results"):
        (tmp_path / "uninterrupted" / folder).mkdir(parents=True)
    with torch_threads(os.cpu_count() or 1):
        run_job(job, p, str(tmp_path / "uninterrupted"), "cpu")

    def scores(folder: Path) -> dict:
        result = json.loads((folder / "results" / "base.json").read_text())["eval"]
        return {k: v for k, v in result.items() if k != "seconds"}

    assert scores(out) == scores(tmp_path / "uninterrupted")


def test_stats_spread_is_the_sample_standard_deviation_and_half_gain_step_is_one_based():
    from univigu.evaluation.report import _half_gain_step

    s = _stats([0.50, 0.52, 0.60])
    assert s["mean"] == pytest.approx(0.54) and s["std"] == pytest.approx(0.052915, abs=1e-6) and s["n"] == 3
    assert _stats([0.4])["std"] == 0.0
    assert _half_gain_step([0.0, 0.2, 0.6, 1.0]) == 3
    assert _half_gain_step([1.0, 0.4, 0.2]) == 2  # a falling curve


def test_collect_measures_the_t2v_drop_from_the_base_and_claim_1_reads_it(tmp_path):
    from univigu.evaluation.report import _claims, collect

    (tmp_path / "results").mkdir()
    study = {"kind": "train", "claim": 1, "arms": {"moe": {}, "shared": {}}}
    (tmp_path / "plan.json").write_text(json.dumps({"studies": {"moe": study}}))

    def result(name, kind, **fields):
        (tmp_path / "results" / f"{name}.json").write_text(json.dumps({"kind": kind, "spec": {}, **fields}))

    result("base", "base", eval={"t2v": {"all": 0.8}})
    for arm, t2v, v2t in (("moe", 0.6, 0.9), ("shared", 0.3, 0.2)):
        for seed in (0, 1):
            ev = {"t2v": {"all": t2v}, "v2t": {"all": v2t, "bleu4": 0.1, "cider": 0.2},
                  "joint": {"consistency": 0.5, "t2v": 0.5}}  # fmt: skip
            result(f"train-{arm}-seed{seed}", "train", arm=arm, seed=seed, eval=ev, curve=[])
    data = collect(tmp_path)
    assert data["base_t2v"] == 0.8
    assert data["arms"]["moe"]["stats"]["t2v_drop"]["mean"] == pytest.approx(0.2)  # base - arm
    assert data["arms"]["moe"]["seeds"] == [0, 1]
    # better than the other arm on both, but 20 points of T2V lost from the base: not supported
    (claim,) = _claims(data)
    assert claim["verdict"] == "not supported" and "(lost)" in claim["evidence"]


def test_smoke_merges_its_eval_settings_into_the_full_ones(tmp_path):
    from univigu.evaluation.ablation import load_plan

    (tmp_path / "settings.yaml").write_text("seeds: [0, 1]\neval: {split: heldout, n: 64}\n"
                                            "smoke: {seeds: [0], eval: {n: 2}}\n")  # fmt: skip
    settings = load_plan(tmp_path, smoke=True)["settings"]
    assert settings["eval"] == {"split": "heldout", "n": 2} and settings["seeds"] == [0]
    assert load_plan(tmp_path)["settings"]["eval"] == {"split": "heldout", "n": 64}


def test_the_report_names_the_training_precision_and_says_when_some_results_do_not_record_it():
    from univigu.evaluation.report import _batch

    new = {"batch_size": 2, "mixed_precision": {"recall": "no", "refine": "no"}}
    assert _batch({"results": {"a": new}}) == "batch 2 in float32"
    assert _batch({"results": {"a": new, "old": {"batch_size": 2}}}) == "batch 2 in float32, unrecorded precision"
    assert _batch({"results": {"old": {"batch_size": 2}}}) == "batch 2"  # results from before it was recorded
