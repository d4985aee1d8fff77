"""`univigu generate | caption | joint | eval`: use a checkpoint (the shipped toy model by default)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

MODEL_HELP = "Pipeline folder (default: the shipped toy-world model, univigu.DEFAULT_MODEL)."
DEVICE_HELP = "torch device (default: cuda when available, else cpu)."


def _pipeline(model: Path | None, device: str | None = None):
    import torch

    from univigu import DEFAULT_MODEL
    from univigu.pipelines import UniViGUPipeline

    path = Path(model) if model else Path(DEFAULT_MODEL)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return UniViGUPipeline.from_pretrained(path, device=device), path
    except (FileNotFoundError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--model") from error


def _save(out: Path, stem: str, video, record: dict) -> dict[str, str]:
    """Write a video as gif + mp4 (pixels scaled for viewing) and a sidecar JSON."""
    from univigu.data.video_io import write_video

    files = {}
    if video is not None:
        scale = max(1, 128 // max(video.shape[1:3]))
        files = {ext: str(write_video(out / f"{stem}.{ext}", video, fps=record.get("fps", 8), scale=scale))
                 for ext in ("gif", "mp4")}  # fmt: skip
    record = {**record, "files": files}
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    return files


def _slug(text: str) -> str:
    return "-".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())[:48] or "sample"


def generate(
    prompts: list[str] = typer.Argument(..., help="One or more prompts."),
    model: Path = typer.Option(None, help=MODEL_HELP),
    device: str = typer.Option(None, help=DEVICE_HELP),
    seed: int = typer.Option(0), steps: int = typer.Option(None, help="Sampling steps (default: the model's)."),
    guidance: float = typer.Option(None, help="Classifier-free guidance scale (default: the model's)."),
    out: Path = typer.Option(Path("outputs/generate"), help="Output folder."),
) -> None:
    """Text to video."""
    pipe, path = _pipeline(model, device)
    start = time.perf_counter()
    videos = pipe.text_to_video(prompts, seed=seed, num_steps=steps, guidance_scale=guidance).videos
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, video) in enumerate(zip(prompts, videos)):
        record = {"task": "text_to_video", "prompt": prompt, "seed": seed, "steps": steps or pipe.config.num_steps,
                  "guidance_scale": pipe._scale(guidance), "model": str(path), "seconds": round(seconds, 2),
                  "fps": pipe.config.fps}  # fmt: skip
        files = _save(out, f"{_slug(prompt)}_seed{seed}_{i}", video, record)
        typer.echo(f"{prompt!r} -> {files['gif']}")


def caption(
    videos: list[Path] = typer.Argument(..., help="Video files (mp4, gif, webm)."),
    model: Path = typer.Option(None, help=MODEL_HELP),
    device: str = typer.Option(None, help=DEVICE_HELP),
    seed: int = typer.Option(0), steps: int = typer.Option(None),
    instruction: str = typer.Option(None, help="A question or instruction as the prompt condition."),
    out: Path = typer.Option(Path("outputs/caption"), help="Where the sidecar JSON files go."),
) -> None:
    """Video to text: a detailed caption per video file."""
    import numpy as np

    from univigu.data.video_io import VideoReadError, read_video

    pipe, path = _pipeline(model, device)
    c = pipe.config
    try:
        frames = np.stack([read_video(v, num_frames=c.frames, size=(c.height, c.width)).numpy() for v in videos])
    except VideoReadError as error:
        raise typer.BadParameter(str(error), param_hint="VIDEOS") from error
    start = time.perf_counter()
    texts = pipe.video_to_text(frames, seed=seed, num_steps=steps, instruction=instruction).texts
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    for video, text in zip(videos, texts):
        record = {"task": "video_to_text", "video": str(video), "caption": text, "instruction": instruction,
                  "seed": seed, "steps": steps or c.num_steps, "model": str(path), "seconds": round(seconds, 2)}  # fmt: skip
        _save(out, f"{Path(video).stem}_caption_seed{seed}", None, record)
        typer.echo(f"{video}: {text}")


def joint(
    prompts: list[str] = typer.Argument(..., help="One or more prompts."),
    model: Path = typer.Option(None, help=MODEL_HELP),
    device: str = typer.Option(None, help=DEVICE_HELP),
    seed: int = typer.Option(0), steps: int = typer.Option(None), guidance: float = typer.Option(None),
    text_update: str = typer.Option("ctmc", help="'ctmc' or the released 'linear-resample' heuristic."),
    out: Path = typer.Option(Path("outputs/joint"), help="Output folder."),
) -> None:
    """Joint generation: a video and its caption per prompt, denoised together."""
    pipe, path = _pipeline(model, device)
    start = time.perf_counter()
    result = pipe.generate(prompts, seed=seed, num_steps=steps, guidance_scale=guidance, text_update=text_update)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, video, text) in enumerate(zip(prompts, result.videos, result.texts)):
        record = {"task": "joint", "prompt": prompt, "caption": text, "seed": seed,
                  "steps": steps or pipe.config.num_steps, "guidance_scale": pipe._scale(guidance),
                  "text_update": text_update, "model": str(path), "seconds": round(seconds, 2), "fps": pipe.config.fps}  # fmt: skip
        files = _save(out, f"{_slug(prompt)}_joint_seed{seed}_{i}", video, record)
        typer.echo(f"{prompt!r} -> {files['gif']}\n  caption: {text}")


def evaluate(
    checkpoint: Path = typer.Argument(None, help=MODEL_HELP),
    device: str = typer.Option(None, help=DEVICE_HELP),
    split: str = typer.Option("test", help="test or heldout (or val)."),
    n: int = typer.Option(256, "--n", min=1), seed: int = typer.Option(0),
    steps: int = typer.Option(None, help="Sampling steps (default: the model's)."),
    batch_size: int = typer.Option(64),
    base: Path = typer.Option(None, help="Base generator folder, to compare T2V accuracy before recall."),
    tasks: str = typer.Option("t2v,v2t,joint", help="Comma-separated subset of t2v, v2t, joint."),
    json_out: Path = typer.Option(None, "--json", help="Write the results here."),
) -> None:
    """Attribute accuracies (oracle + parser), BLEU-4, CIDEr and joint consistency."""
    from univigu.evaluation.evaluate import evaluate as run_eval
    from univigu.evaluation.evaluate import summary_table

    pipe, path = _pipeline(checkpoint, device)
    base_pipe = _pipeline(base, device)[0] if base else None
    chosen = tuple(t for t in tasks.split(",") if t)
    if not pipe.unified:
        chosen = tuple(t for t in chosen if t == "t2v")
    results = run_eval(pipe, split=split, n=n, seed=seed, num_steps=steps, batch_size=batch_size,
                       base_pipeline=base_pipe, tasks=chosen)  # fmt: skip
    results["checkpoint"] = str(path)
    typer.echo(summary_table(results))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2))


def demo(
    prompt: str = typer.Option("a red circle moves right", help="Prompt for text-to-video and joint generation."),
    model: Path = typer.Option(None, help=MODEL_HELP),
    device: str = typer.Option(None, help=DEVICE_HELP),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("outputs/demo"), help="Output folder."),
) -> None:
    """The main job on the shipped toy-world model: a generated video, a caption for a freshly rendered
    world video, and a joint video + caption."""
    from univigu.data.world import World, WorldConfig

    pipe, path = _pipeline(model, device)
    c = pipe.config
    if not pipe.unified:
        raise typer.BadParameter("the demo needs a unified model (text to video and video to text)",
                                 param_hint="--model")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    video = pipe.text_to_video([prompt], seed=seed, progress=False).videos[0]
    common = {"seed": seed, "steps": c.num_steps, "model": str(path), "fps": c.fps}
    t2v = _save(out, "text_to_video", video, {"task": "text_to_video", "prompt": prompt, **common})

    world = World(WorldConfig(height=c.height, width=c.width, frames=c.frames))
    scene = world.scenes("test", [seed])[0]  # a test-split scene: never trained on
    rendered = world.render([scene])
    caption = pipe.video_to_text(rendered, seed=seed, progress=False).texts[0]
    v2t = _save(out, "video_to_text", rendered[0], {"task": "video_to_text", "caption": caption,
                                                   "true_caption": scene.caption, **common})  # fmt: skip

    both = pipe.generate([prompt], seed=seed, progress=False)
    joint_files = _save(out, "joint", both.videos[0], {"task": "joint", "prompt": prompt, "caption": both.texts[0],
                                                        **common})  # fmt: skip
    typer.echo(f"model: {path}")
    typer.echo(f"text to video   {prompt!r}\n  -> {t2v['gif']}, {t2v['mp4']}")
    typer.echo(f"video to text   {v2t['gif']} (a freshly rendered world video)\n  generated: {caption}\n"
               f"  true:      {scene.caption}")  # fmt: skip
    typer.echo(f"joint           {prompt!r}\n  -> {joint_files['gif']}, {joint_files['mp4']}\n"
               f"  caption: {both.texts[0]}")  # fmt: skip
    typer.echo(f"done in {time.perf_counter() - start:.1f} s; sidecar JSON files beside each video in {out}")


def export(
    source: Path = typer.Argument(..., help="Pipeline folder to copy."),
    target: Path = typer.Argument(..., help="New pipeline folder."),
    dtype: str = typer.Option("float16", help="Stored weight dtype: float16, bfloat16 or float32."),
) -> None:
    """Copy a pipeline folder with its weights stored in another dtype (loading casts back to float32)."""
    import torch

    if dtype not in ("float16", "bfloat16", "float32"):
        raise typer.BadParameter(f"dtype must be float16, bfloat16 or float32, got {dtype!r}", param_hint="--dtype")
    pipe, _ = _pipeline(source, "cpu")
    pipe.save_pretrained(target, dtype=getattr(torch, dtype))
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    typer.echo(f"wrote {target} ({size / 2**20:.1f} MiB, {dtype} weights)")
