"""`univigu eval`: how well a checkpoint generates, understands, and stays consistent.

- T2V prompt-attribute accuracy: the oracle reads each generated video; the prompt's colour,
  shape and motion of its main object are checked (the colour counts right when an object
  of that colour is there).
- V2T detailed-caption attribute accuracy: generated captions of rendered videos are parsed
  and compared with the true attributes (every attribute of every object, the background and
  the object count), plus BLEU-4 and CIDEr against the true caption.
- Joint consistency: for joint generation, the oracle's reading of the generated video
  against the parse of the generated caption.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from univigu.data.oracle import Oracle
from univigu.data.world import SPLITS, World, accuracy, attribute_matches, parse_caption, tokenize_caption

PROMPT_ATTRIBUTES = ("colour", "shape", "motion")
TASKS = ("t2v", "v2t", "joint")


def _check_pairs(wanted: Sequence[Any], got: Sequence[Any], what: str) -> None:
    """Scores need one item of each list per sample: zip would silently drop the extras of the longer."""
    if len(wanted) != len(got):
        raise ValueError(f"{what}: {len(wanted)} vs {len(got)} items; they must pair up one to one")
    if not wanted:
        raise ValueError(f"{what}: nothing to score (both lists are empty)")


def _check_samples(split: str, n: int, batch_size: int) -> None:
    """Refuse what would score nothing (n < 1) or fail deep inside the samplers, before any work."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if n < 1:
        raise ValueError(f"n (the number of samples) must be at least 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def prompt_accuracy(prompt_attributes: Sequence[dict[str, Any]], readings: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy of the main-object attributes a prompt names, per attribute, overall and per sample (all three)."""
    _check_pairs(prompt_attributes, readings, "prompt_accuracy(prompt_attributes, readings)")
    right = {k: 0 for k in PROMPT_ATTRIBUTES}
    whole = 0
    for want, got in zip(prompt_attributes, readings):
        match = next((o for o in got["objects"] if o["colour"] == want["colour"]), None)
        hits = {k: match is not None and match.get(k) == want[k] for k in PROMPT_ATTRIBUTES}  # parses may lack keys
        for k, hit in hits.items():
            right[k] += int(hit)
        whole += int(all(hits.values()))
    n = len(prompt_attributes)
    out = {k: v / n for k, v in right.items()}
    out["all"] = sum(right.values()) / (n * len(PROMPT_ATTRIBUTES))
    out["exact"] = whole / n
    return out


def caption_scores(references: Sequence[str], candidates: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D (pycocoevalcap) of candidates against one reference each."""
    _check_pairs(references, candidates, "caption_scores(references, candidates)")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    def tokens(text: str) -> str:  # the parser's tokenisation: words and punctuation apart
        return " ".join(tokenize_caption(text)) or "empty"

    gts = {i: [tokens(r)] for i, r in enumerate(references)}
    res = {i: [tokens(c)] for i, c in enumerate(candidates)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def check_base_pipeline(pipeline: Any, base_pipeline: Any) -> None:
    """A base to compare T2V with makes videos of the pipeline's size (one oracle reads both); ValueError else."""
    sizes = [tuple(getattr(p.config, k) for k in ("frames", "height", "width")) for p in (pipeline, base_pipeline)]
    if sizes[0] != sizes[1]:
        raise ValueError(f"the base makes videos of {'x'.join(map(str, sizes[1]))} (frames x height x width) and the "
                         f"pipeline of {'x'.join(map(str, sizes[0]))}: compare with a base of the same size")


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def evaluate(
    pipeline: Any,
    split: str = "test",
    n: int = 256,
    seed: int = 0,
    num_steps: int | None = None,
    batch_size: int = 64,
    base_pipeline: Any = None,
    tasks: Sequence[str] = ("t2v", "v2t", "joint"),
    progress: bool = False,
    text_update: str | None = None,
) -> dict[str, Any]:
    """Evaluate a pipeline on `n` world samples of `split`; returns a JSON-able dict. `text_update`: the
    joint sampler's text rule ("ctmc" or the released "linear-resample"; None: the pipeline's)."""
    if not tasks or set(tasks) - set(TASKS):
        raise ValueError(f"tasks must be a non-empty collection of {TASKS}, got {tasks!r}")
    _check_samples(split, n, batch_size)
    if base_pipeline is not None and "t2v" in tasks:  # the base serves T2V only
        check_base_pipeline(pipeline, base_pipeline)
    cfg = pipeline.config
    world = World.sized_like(cfg)
    oracle = Oracle(world.config)
    scenes = world.scenes(split, range(n), seed)
    prompts = [s.prompt for s in scenes]
    mains = [s.objects[0].attributes() for s in scenes]
    text_update = text_update or cfg.text_update
    results: dict[str, Any] = {"split": split, "n": n, "seed": seed, "num_steps": cfg.steps_for("generate", num_steps),
                               "caption_steps": cfg.steps_for("video_to_text", num_steps)}  # fmt: skip

    def t2v(pipe) -> dict[str, float]:
        readings = []
        for part in _batches(n, batch_size):
            videos = pipe.text_to_video(prompts[part], seed=seed + part.start, num_steps=num_steps, progress=progress)
            readings += oracle(videos.videos)
        return prompt_accuracy(mains, readings)

    start = time.perf_counter()
    if "t2v" in tasks:
        results["t2v"] = t2v(pipeline)
    if base_pipeline is not None and "t2v" in tasks:
        results["t2v_base"] = t2v(base_pipeline)
        results["t2v_drop_from_base"] = results["t2v_base"]["all"] - results["t2v"]["all"]
    if "v2t" in tasks:
        captions = []
        for part in _batches(n, batch_size):
            videos = world.render(scenes[part])
            captions += pipeline.video_to_text(videos, seed=seed + part.start, num_steps=num_steps,
                                               progress=progress).texts  # fmt: skip
        scores = [attribute_matches(s.attributes(), parse_caption(c)) for s, c in zip(scenes, captions)]
        results["v2t"] = {**accuracy(scores), **caption_scores([s.caption for s in scenes], captions)}
        results["v2t_examples"] = [{"true": s.caption, "generated": c} for s, c in zip(scenes[:5], captions)]
    if "joint" in tasks:
        agreement, examples = [], []
        readings = []
        for part in _batches(n, batch_size):
            out = pipeline.generate(prompts[part], seed=seed + part.start, num_steps=num_steps, progress=progress,
                                    text_update=text_update)  # fmt: skip
            seen = oracle(out.videos)
            readings += seen
            agreement += [attribute_matches(r, parse_caption(t)) for r, t in zip(seen, out.texts)]
            examples += out.texts
        results["joint"] = {"text_update": text_update, "consistency": accuracy(agreement)["all"],
                            "t2v": prompt_accuracy(mains, readings)["all"]}  # fmt: skip
        results["joint_examples"] = [{"prompt": p, "caption": c} for p, c in zip(prompts[:5], examples[:5])]
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results


def coevolution(
    pipeline: Any,
    split: str = "test",
    n: int = 64,
    seed: int = 0,
    num_steps: int | None = None,
    batch_size: int = 64,
    text_update: str | None = None,
) -> dict[str, Any]:
    """Joint generation followed step by step (METHOD section 6, claim 4), on the prompts of `n` scenes.

    Per step: `video` the prompt accuracy of the oracle's reading of the clean-video estimate, `text` the
    prompt accuracy of the parse of the current text, `consistency` the oracle's reading against the parse;
    `shuffled` is the final consistency of mismatched pairs (video i, caption i+1): the chance level.
    Returns those per-step lists (length num_steps) and the chance level.
    """
    _check_samples(split, n, batch_size)
    cfg = pipeline.config
    text_update = text_update or cfg.text_update
    world = World.sized_like(cfg)
    oracle = Oracle(world.config)
    scenes = world.scenes(split, range(n), seed)
    prompts = [s.prompt for s in scenes]
    mains = [s.objects[0].attributes() for s in scenes]
    readings: list[list[dict[str, Any]]] = []  # [step][sample]
    parses: list[list[dict[str, Any]]] = []
    for part in _batches(n, batch_size):
        out = pipeline.generate(prompts[part], seed=seed + part.start, num_steps=num_steps, progress=False,
                                text_update=text_update, return_trajectory=True)  # fmt: skip
        steps = len(out.text_trajectory)
        if not readings:
            readings, parses = [[] for _ in range(steps)], [[] for _ in range(steps)]
        for i in range(steps):
            readings[i] += oracle(out.video_trajectory[i])
            parses[i] += [parse_caption(t) for t in out.text_trajectory[i]]

    def agree(videos: list[dict[str, Any]], texts: list[dict[str, Any]]) -> float:
        return accuracy(attribute_matches(r, p) for r, p in zip(videos, texts))["all"]

    return {
        "split": split, "n": n, "seed": seed, "num_steps": len(readings), "text_update": text_update,
        "video": [prompt_accuracy(mains, r)["all"] for r in readings],
        "text": [prompt_accuracy(mains, p)["all"] for p in parses],
        "consistency": [agree(r, p) for r, p in zip(readings, parses)],
        "shuffled": agree(readings[-1], parses[-1][1:] + parses[-1][:1]),
    }  # fmt: skip


def summary_table(results: dict[str, Any]) -> str:
    """The headline numbers as a small text table."""
    rows = []
    if "t2v" in results:
        rows.append(("T2V prompt-attribute accuracy", results["t2v"]["all"]))
    if "t2v_base" in results:
        rows.append(("T2V accuracy of the base generator", results["t2v_base"]["all"]))
    if "v2t" in results:
        rows.append(("V2T caption-attribute accuracy", results["v2t"]["all"]))
        rows.append(("V2T BLEU-4", results["v2t"]["bleu4"]))
        rows.append(("V2T CIDEr", results["v2t"]["cider"]))
    if "joint" in results:
        rows.append(("joint consistency (video vs caption)", results["joint"]["consistency"]))
        rows.append(("joint T2V prompt accuracy", results["joint"]["t2v"]))
    width = max(len(r[0]) for r in rows) if rows else 0
    head = f"{results['split']} split, n={results['n']}, {results['num_steps']} steps"
    if "v2t" in results and results.get("caption_steps", results["num_steps"]) != results["num_steps"]:
        head += f" ({results['caption_steps']} for captions)"
    lines = [head] + [f"{name:<{width}}  {value * 100:6.2f}" if "BLEU" not in name and "CIDEr" not in name
                      else f"{name:<{width}}  {value:6.3f}" for name, value in rows]  # fmt: skip
    return "\n".join(lines)
