"""The ablation report: tables (mean and spread over seeds), plots, and a verdict per claim.

`write_report(OUT, DIR)` reads what `univigu ablate` left in OUT (plan.json, results/*.json) and
writes DIR/ablations.md, DIR/ablations.json (the raw results and every aggregate the report shows)
and DIR/*.png. Nothing here trains or samples: the same results always give the same report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

MIN_MARGIN = 0.02  # two accuracy points: below this a difference is not read as one
RULE = (
    f"A difference between two arms counts when it exceeds the margin max(2 x s, {MIN_MARGIN}), s the larger "
    "standard deviation over seeds of the two arms (for a paired difference: the standard deviation of that "
    "difference over seeds). A claim is **supported** when every comparison it names goes its way by more "
    "than the margin, **not supported** when none does and at least one goes the other way by more than the "
    "margin (or, for claim 1, when the MoE model loses the base generator's T2V accuracy by more than the "
    "margin), and **inconclusive** otherwise. Two seeds give a rough spread: read the margins with that in mind."
)
METRICS = {  # name: (label, path in an evaluate() result)
    "t2v": ("T2V acc.", ("t2v", "all")),
    "t2v_drop": ("T2V drop from base", None),
    "v2t": ("V2T acc.", ("v2t", "all")),
    "bleu4": ("BLEU-4", ("v2t", "bleu4")),
    "cider": ("CIDEr", ("v2t", "cider")),
    "joint": ("joint consistency", ("joint", "consistency")),
    "joint_t2v": ("joint T2V acc.", ("joint", "t2v")),
}


def _stats(values: list[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()) if len(v) else math.nan, "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "n": len(v), "values": [float(x) for x in v]}  # fmt: skip


def _fmt(s: dict[str, Any], points: bool = True) -> str:
    if not s["n"]:
        return "n/a"
    if points:
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def compare(a: dict[str, Any], b: dict[str, Any], higher_is_better: bool = True) -> dict[str, Any]:
    """a vs b (stats over seeds): difference of means, margin, and "better" / "worse" / "tie" for a."""
    diff = a["mean"] - b["mean"]
    margin = max(2 * max(a["std"], b["std"]), MIN_MARGIN)
    signed = diff if higher_is_better else -diff
    outcome = "better" if signed > margin else "worse" if signed < -margin else "tie"
    return {"diff": diff, "margin": margin, "outcome": outcome}


def verdict(comparisons: list[dict[str, Any]]) -> str:
    outcomes = [c["outcome"] for c in comparisons]
    if outcomes and all(o == "better" for o in outcomes):
        return "supported"
    if "worse" in outcomes and "better" not in outcomes:
        return "not supported"
    return "inconclusive"


# ---- collecting ------------------------------------------------------------------------------------


def collect(out: str | Path) -> dict[str, Any]:
    """Plan, raw results and aggregates of a run folder."""
    out = Path(out)
    plan = json.loads((out / "plan.json").read_text())
    results = {p.stem: json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))}
    base = results.get("base", {}).get("eval", {}).get("t2v", {}).get("all")
    arms: dict[str, dict[str, Any]] = {}
    for r in results.values():
        if r["kind"] != "train":
            continue
        arm = arms.setdefault(r["arm"], {"seeds": [], "metrics": {k: [] for k in METRICS}, "curves": []})
        arm["seeds"].append(r["seed"])
        for key, (_, path) in METRICS.items():
            if path is not None:
                arm["metrics"][key].append(r["eval"][path[0]][path[1]])
        if base is not None:
            arm["metrics"]["t2v_drop"].append(base - r["eval"]["t2v"]["all"])
        arm["curves"].append(r["curve"])
    for arm in arms.values():
        arm["stats"] = {k: _stats(v) for k, v in arm["metrics"].items()}
        arm["curve"] = _curve(arm["curves"])
    sweeps: dict[str, dict[int, list[dict[str, Any]]]] = {}
    coevolution: dict[str, list[dict[str, Any]]] = {}
    for r in results.values():
        model = r["spec"].get("arm")
        if r["kind"] == "sweep":
            sweeps.setdefault(model, {}).setdefault(r["spec"]["steps"], []).append(r)
        elif r["kind"] == "coevolution":
            coevolution.setdefault(model, []).append(r["trajectory"])
    return {"plan": plan, "results": results, "base_t2v": base, "arms": arms, "sweeps": sweeps,
            "coevolution": coevolution}  # fmt: skip


def _curve(curves: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Per step over seeds: V2T mean and std, and per seed the mean over the steps (the area under the curve)."""
    steps = sorted({p["step"] for c in curves for p in c})
    at = [_stats([p["v2t"] for c in curves for p in c if p["step"] == s]) for s in steps]
    area = _stats([float(np.mean([p["v2t"] for p in c])) for c in curves if c])
    return {"steps": steps, "v2t": at, "area": area}


# ---- claims ----------------------------------------------------------------------------------------


def _claims(data: dict[str, Any]) -> list[dict[str, Any]]:
    arms, studies = data["arms"], data["plan"]["studies"]
    claims = []
    for name, study in studies.items():
        claim = study.get("claim")
        if claim is None:
            continue
        names = list(study.get("arms") or {})
        if study["kind"] == "train" and any(a not in arms for a in names):
            claims.append({"claim": claim, "study": name, "verdict": "inconclusive", "evidence": "arms missing"})
            continue
        if claim == 1:
            a, b = (arms[n]["stats"] for n in names)
            drop = a["t2v_drop"]
            kept = drop["mean"] <= max(2 * drop["std"], MIN_MARGIN)
            comps = [compare(a["t2v"], b["t2v"]), compare(a["v2t"], b["v2t"])]
            v = "not supported" if not kept else verdict(comps)
            evidence = (f"{names[0]}: T2V drop from base {_pts(drop['mean'])} ({'kept' if kept else 'lost'}); vs "
                        f"{names[1]}: T2V {_cmp(comps[0])}, V2T {_cmp(comps[1])}")  # fmt: skip
        elif claim == 2:
            a, b = (arms[n] for n in names)
            comps = [compare(a["stats"]["v2t"], b["stats"]["v2t"]), compare(a["curve"]["area"], b["curve"]["area"])]
            v = verdict(comps)
            evidence = f"{names[0]} vs {names[1]}: final V2T {_cmp(comps[0])}; mean V2T over the curve {_cmp(comps[1])}"
        elif claim == 3:
            a, b = (arms[n]["stats"] for n in names)
            comps = [compare(a["v2t"], b["v2t"])]
            v = verdict(comps)
            evidence = f"{names[0]} vs {names[1]}: V2T {_cmp(comps[0])} (T2V {_cmp(compare(a['t2v'], b['t2v']))})"
        elif claim == 4:
            v, evidence = _coevolution_verdict(data["coevolution"], study)
        else:
            continue
        claims.append({"claim": claim, "study": name, "title": study.get("title", name), "verdict": v,
                       "evidence": evidence})  # fmt: skip
    return sorted(claims, key=lambda c: c["claim"])


def _coevolution_verdict(runs: dict[str, list[dict[str, Any]]], study: dict[str, Any]) -> tuple[str, str]:
    """On the trained arm (every seed): both curves rise, at the same time, to a pair more consistent
    than mismatched pairs."""
    arm = next((m for m in study.get("models", []) if m != "shipped"), None)
    trajectories = runs.get(arm, [])
    if not trajectories:
        return "inconclusive", "no trajectories of a trained arm"
    gain = {k: _stats([t[k][-1] - t[k][0] for t in trajectories]) for k in ("video", "text")}
    half = {k: float(np.mean([_half_gain_step(t[k]) for t in trajectories])) for k in ("video", "text")}
    steps = trajectories[0]["num_steps"]
    over_chance = _stats([t["consistency"][-1] - t["shuffled"] for t in trajectories])
    rises = [compare(gain[k], _stats([0.0] * gain[k]["n"])) for k in ("video", "text")]
    together = abs(half["video"] - half["text"]) <= steps / 4
    consistent = compare(over_chance, _stats([0.0] * over_chance["n"]))
    comps = rises + [consistent] + [{"outcome": "better" if together else "tie"}]
    evidence = (f"{arm}: video acc. gain {_pts(gain['video']['mean'])}, text acc. gain {_pts(gain['text']['mean'])} "
                f"over the steps; half of each gain reached at step {half['video']:.1f} (video) and "
                f"{half['text']:.1f} (text) of {steps} ({'together' if together else 'not together'}: within "
                f"{steps / 4:.1f} steps?); final consistency over mismatched pairs {_cmp(consistent)}")  # fmt: skip
    return verdict(comps), evidence


def _half_gain_step(curve: list[float]) -> int:
    """The first step (1-based) at which a curve has made half its total gain."""
    target = curve[0] + (curve[-1] - curve[0]) / 2
    rising = curve[-1] >= curve[0]
    return next(i + 1 for i, v in enumerate(curve) if (v >= target if rising else v <= target))


def _pts(x: float) -> str:
    return f"{100 * x:+.1f} pts"


def _cmp(c: dict[str, Any]) -> str:
    return f"{_pts(c['diff'])} (margin {100 * c['margin']:.1f}: {c['outcome']})"


# ---- plots -----------------------------------------------------------------------------------------


def _plots(data: dict[str, Any], folder: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    files = {}
    curve_arms = [a for s in data["plan"]["studies"].values() if s.get("curve") for a in s["arms"]]
    if any(data["arms"].get(a, {}).get("curve", {}).get("steps") for a in curve_arms):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for a in curve_arms:
            c = data["arms"][a]["curve"]
            mean = np.array([s["mean"] for s in c["v2t"]])
            std = np.array([s["std"] for s in c["v2t"]])
            ax.plot(c["steps"], 100 * mean, marker="o", label=a)
            ax.fill_between(c["steps"], 100 * (mean - std), 100 * (mean + std), alpha=0.2)
        ax.set(xlabel="training steps (recall, then refine)", ylabel="V2T caption-attribute acc. (%)",
               title="Learning curve: generator prior vs scratch")  # fmt: skip
        ax.legend()
        files["curve"] = _save(fig, folder / "learning_curve.png")
    if data["sweeps"]:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        for model, by_steps in sorted(data["sweeps"].items()):
            steps = sorted(by_steps)
            series = _sweep_series(by_steps)
            axes[0].plot(steps, [100 * series["t2v"][s]["mean"] for s in steps], marker="o", label=model)
            axes[1].plot(steps, [100 * series["v2t"][s]["mean"] for s in steps], marker="o", label=model)
            for update in series["joint"]:
                axes[2].plot(steps, [100 * series["joint"][update][s]["mean"] for s in steps], marker="o",
                             label=f"{model}, {update}")  # fmt: skip
        for ax, title in zip(axes, ("T2V acc. (%)", "V2T acc. (%)", "joint consistency (%)")):
            ax.set(xlabel="sampling steps", title=title, xscale="log", xticks=steps, xticklabels=steps)
            ax.minorticks_off()
            ax.legend(fontsize=7)
        files["sweep"] = _save(fig, folder / "sampler_steps.png")
    if data["coevolution"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (model, runs), colour in zip(sorted(data["coevolution"].items()), ("C0", "C1", "C2", "C3")):
            x = np.arange(1, runs[0]["num_steps"] + 1)
            for key, style in (("video", "-"), ("text", "--"), ("consistency", ":")):
                ax.plot(x, 100 * np.mean([r[key] for r in runs], axis=0), style, color=colour,
                        label=f"{model}: {key}")  # fmt: skip
        ax.set(xlabel="joint denoising step", ylabel="accuracy / agreement (%)",
               title="Co-evolution: video estimate vs current text")  # fmt: skip
        ax.legend(fontsize=7)
        files["coevolution"] = _save(fig, folder / "coevolution.png")
    return files


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def _sweep_series(by_steps: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per step count, stats over seeds: t2v, v2t, and joint consistency per text update."""
    out: dict[str, Any] = {"t2v": {}, "v2t": {}, "joint": {}}
    for steps, runs in by_steps.items():
        out["t2v"][steps] = _stats([r["single"]["t2v"]["all"] for r in runs])
        out["v2t"][steps] = _stats([r["single"]["v2t"]["all"] for r in runs])
        for update in runs[0]["joint"]:
            out["joint"].setdefault(update, {})[steps] = _stats([r["joint"][update]["consistency"] for r in runs])
    return out


# ---- the report ------------------------------------------------------------------------------------


def write_report(out: str | Path, folder: str | Path) -> Path:
    """Write FOLDER/ablations.md, ablations.json and the plots from the run folder OUT; returns the .md path."""
    data = collect(out)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan, settings = data["plan"], data["plan"]["settings"]
    claims = _claims(data)
    plots = _plots(data, folder)
    lines = ["# Ablations: the paper's claims, reproduced in small", ""]
    if plan.get("smoke"):
        lines += ["> **SMOKE RUN**: 2 training steps and a tiny evaluation, to test the pipeline. These numbers",
                  "> mean nothing about the method.", ""]  # fmt: skip
    seconds = sum(r.get("seconds", 0) for r in data["results"].values())
    lines += [
        f"Made by `{plan.get('command') or 'univigu ablate'}` (then `univigu ablate-report` rewrites this file from "
        f"the results), device {plan.get('device')}; raw results and every aggregate: `ablations.json`.",
        "",
        f"Budget: each arm trains {_budget(settings)} steps at {_batch(data)} from "
        f"{'the base generator' if not settings['base'] else settings['base']} (scratch: the same "
        f"architecture, fresh weights), seeds {settings['seeds']} (train.seed = data_seed); every model is "
        f"evaluated with `univigu eval`'s code on the {settings['eval'].get('split', 'test')} split, "
        f"n = {settings['eval'].get('n')}, evaluation seed {settings['eval'].get('seed', 0)} (the same scenes "
        f"and noise for all). {len(data['results'])} jobs, {seconds / 60:.1f} job-minutes in all.",
        "",
        *_models(plan),
        "Accuracies in percentage points, mean ± standard deviation over seeds.",
        "",
        "## Verdicts",
        "",
        "| claim | verdict | evidence |",
        "|---|---|---|",
    ]
    lines += [f"| {c['claim']}. {c.get('title', c['study'])} | **{c['verdict']}** | {c['evidence']} |" for c in claims]
    lines += ["", f"Rule: {RULE}", ""]
    order = sorted(plan["studies"], key=lambda n: (plan["studies"][n].get("claim") or 99, n))  # claims first
    for name in order:
        lines += _study_section(name, plan["studies"][name], data, plots)
    lines += ["## Jobs", "", "| job | seconds |", "|---|---|"]
    lines += [f"| {k} | {r.get('seconds', 0):.0f} |" for k, r in data["results"].items()]
    (folder / "ablations.md").write_text("\n".join(lines) + "\n")
    summary = {"claims": claims, "base_t2v": data["base_t2v"], "plan": plan, "results": data["results"],
               "arms": {k: {"seeds": v["seeds"], "stats": v["stats"], "curve": v["curve"]}
                        for k, v in data["arms"].items()},
               "sweeps": {m: _sweep_series(b) for m, b in data["sweeps"].items()}}  # fmt: skip
    (folder / "ablations.json").write_text(json.dumps(summary, indent=2, default=str))
    return folder / "ablations.md"


def _batch(data: dict[str, Any]) -> str:
    """The batch and precision the arms trained at, as their results record them (results made before they did:
    not known)."""
    trained = [r for r in data["results"].values() if "batch_size" in r]  # the train jobs
    sizes = sorted({r["batch_size"] for r in trained})
    names = {"no": "float32", None: "unrecorded precision"}
    precisions = sorted({names.get(v, v) for r in trained for v in r.get("mixed_precision", {None: None}).values()})
    batch = f"batch {', '.join(map(str, sizes))}" if sizes else "the stage configs' batch"
    return batch + (f" in {', '.join(precisions)}" if precisions not in ([], ["unrecorded precision"]) else "")


def _models(plan: dict[str, Any]) -> list[str]:
    """Lines naming the base generator and finished model the run measured (plans made before they were recorded:
    none)."""
    roles = {"base": "Base generator", "model": "Finished model (sampling studies)"}
    lines = []
    for role, info in plan.get("models", {}).items():
        trained = ", ".join(f"{stage} {s['steps']} steps" for stage, s in info["trained"].items()
                            if isinstance(s, dict) and "steps" in s)  # fmt: skip
        lines.append(f"- {roles[role]}: `{info['path']}`, transformer weights sha256 {info['weights_sha256']}"
                     f"{f' ({trained})' if trained else ''}.")  # fmt: skip
    return lines + [""] if lines else []


def _budget(settings: dict[str, Any]) -> str:
    b = settings["budget"]
    return " + ".join(f"{b[s]} {s}" for s in ("recall", "refine") if s in b)


def _study_section(name: str, study: dict[str, Any], data: dict[str, Any], plots: dict[str, str]) -> list[str]:
    title = study.get("title", name)
    head = f"## {study['claim']}. {title}" if study.get("claim") else f"## {title}"
    lines = [head, "", f"`configs/ablations/{name}.yaml`", ""]
    if study["kind"] == "train":
        keys = ["t2v", "t2v_drop", "v2t", "bleu4", "cider", "joint", "joint_t2v"]
        lines += ["| arm | overrides | seeds | " + " | ".join(METRICS[k][0] for k in keys) + " |",
                  "|---|---|---|" + "---|" * len(keys)]  # fmt: skip
        for arm, spec in study["arms"].items():
            spec = spec or {}
            stages = [f"stages: {'+'.join(spec['stages'])}"] if "stages" in spec else []
            what = ", ".join(spec.get("set", []) + stages)
            if arm not in data["arms"]:
                lines.append(f"| {arm} | {what or 'default'} | 0 | " + " | ".join("n/a" for _ in keys) + " |")
                continue
            s = data["arms"][arm]["stats"]
            cells = [_fmt(s[k], points=k not in ("bleu4", "cider")) for k in keys]
            seeds = len(data["arms"][arm]["seeds"])
            lines.append(f"| {arm} | {what or 'the recipe'} | {seeds} | " + " | ".join(cells) + " |")
        if data["base_t2v"] is not None:
            lines += ["", f"Base generator T2V accuracy (the same evaluation): {100 * data['base_t2v']:.1f}."]
        trained = [a for a in study["arms"] if a in data["arms"]]
        if not study.get("claim") and trained:
            best = max(trained, key=lambda a: data["arms"][a]["stats"]["v2t"]["mean"])
            lines += ["", f"Highest mean V2T accuracy: **{best}** (a default changes only by a margin the rule "
                      "above would count)."]  # fmt: skip
        if study.get("curve") and "curve" in plots:
            steps = data["arms"][next(iter(study["arms"]))]["curve"]["steps"]
            lines += ["", "V2T accuracy of the saved checkpoints (EMA weights):", "",
                      "| arm | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
            for arm in study["arms"]:
                c = data["arms"][arm]["curve"]
                lines.append(f"| {arm} | " + " | ".join(_fmt(s) for s in c["v2t"]) + " |")
            lines += ["", f"![learning curve]({plots['curve']})"]
    elif study["kind"] == "sweep":
        updates = study.get("text_updates", ["ctmc"])
        lines += ["| model | steps | T2V acc. | V2T acc. | " + " | ".join(f"joint consistency, {u}" for u in updates)
                  + " | " + " | ".join(f"joint T2V, {u}" for u in updates) + " |",
                  "|---|---|---|---|" + "---|" * (2 * len(updates))]  # fmt: skip
        for model, by_steps in sorted(data["sweeps"].items()):
            series = _sweep_series(by_steps)
            for steps in sorted(by_steps):
                joint_t2v = [_fmt(_stats([r["joint"][u]["t2v"] for r in by_steps[steps]])) for u in updates]
                lines.append(f"| {model} | {steps} | {_fmt(series['t2v'][steps])} | {_fmt(series['v2t'][steps])} | "
                             + " | ".join(_fmt(series["joint"][u][steps]) for u in updates) + " | "
                             + " | ".join(joint_t2v) + " |")  # fmt: skip
        if "ctmc" in updates and "linear-resample" in updates:
            for model, by_steps in sorted(data["sweeps"].items()):
                joint = _sweep_series(by_steps)["joint"]
                gap = np.mean([joint["ctmc"][k]["mean"] - joint["linear-resample"][k]["mean"] for k in by_steps])
                lines += ["", f"{model}: joint consistency with CTMC text updates minus the released linear "
                          f"re-sampling, averaged over the step counts: {_pts(float(gap))}."]  # fmt: skip
        if "sweep" in plots:
            lines += ["", f"![sampling steps]({plots['sweep']})"]
    else:
        lines += ["| model | runs | video acc. first -> last step | text acc. first -> last | consistency "
                  "first -> last | mismatched pairs |", "|---|---|---|---|---|---|"]  # fmt: skip
        for model, runs in sorted(data["coevolution"].items()):
            cells = [f"{_fmt(_stats([r[k][0] for r in runs]))} -> {_fmt(_stats([r[k][-1] for r in runs]))}"
                     for k in ("video", "text", "consistency")]  # fmt: skip
            chance = _fmt(_stats([r["shuffled"] for r in runs]))
            lines.append(f"| {model} | {len(runs)} | " + " | ".join(cells) + f" | {chance} |")
        lines += ["", "video: prompt accuracy of the oracle's reading of the clean-video estimate; text: prompt "
                  "accuracy of the parse of the current text; consistency: their agreement on every attribute; "
                  "mismatched pairs: the final video against another sample's caption (chance agreement)."]  # fmt: skip
        if "coevolution" in plots:
            lines += ["", f"![co-evolution]({plots['coevolution']})"]
    return lines + [""]
