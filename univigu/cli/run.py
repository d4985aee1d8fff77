"""`univigu generate | caption | joint | eval | demo | export | serve`: use a checkpoint (the shipped toy model
by default); also the option checks the other command modules share (device, output paths, model loading)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from univigu.outputs import caption_stem, run_record, save_sample, save_trajectory, slug, timed_sample

MODEL_HELP = "Pipeline folder (default: the shipped toy-world model, univigu.DEFAULT_MODEL)."
DEVICE_HELP = "torch device (default: cuda when available, else cpu)."
STEPS_HELP = "Sampling steps (default: the model's)."
SEED_HELP = "Random seed: an integer from 0 to 2**64 - 1 (what torch's generators take)."
SEED_MAX = 2**64 - 1
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_HELP = "Weights and compute dtype: float32, bfloat16 or float16 (half precision: on a GPU)."
OFFLOAD_HELP = "Wan pipelines: keep the VAE and umT5 on the CPU, on --device only while they run."


def resolve_device(device: str | None) -> str:
    """`--device` checked against this machine (default: cuda when available, else cpu)."""
    import torch

    available = ["cpu", *(["cuda"] if torch.cuda.is_available() else []),
                 *(["mps"] if torch.backends.mps.is_available() else [])]  # fmt: skip
    if device is None:
        return "cuda" if "cuda" in available else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in available:
        raise typer.BadParameter(f"{device!r} is not a device this machine has ({', '.join(available)})",
                                 param_hint="--device")  # fmt: skip
    return device


def _pipeline(model: Path | None, device: str | None = None, param_hint: str = "--model", unified: str | None = None,
              dtype: str = "float32", offload: bool = False, frames: int | None = None, height: int | None = None,
              width: int | None = None):  # fmt: skip
    """Load a pipeline folder (default: the shipped model) in `dtype`, with the VAE and umT5 offloaded to the CPU
    when `offload`, sampling videos of `frames` x `height` x `width` where given (else the folder's); `unified`: what
    needs a unified model, for the usage error a base generator gets."""
    import torch

    from univigu import DEFAULT_MODEL
    from univigu.pipelines import UniViGUPipeline

    if dtype not in DTYPES:
        raise typer.BadParameter(f"one of {list(DTYPES)}, got {dtype!r}", param_hint="--dtype")
    path = Path(model) if model else Path(DEFAULT_MODEL)
    device = resolve_device(device)
    sizes = {k: v for k, v in (("frames", frames), ("height", height), ("width", width)) if v is not None}
    try:
        pipe = UniViGUPipeline.from_pretrained(path, device="cpu" if offload else device,
                                               torch_dtype=getattr(torch, dtype), **sizes)  # fmt: skip
    except (FileNotFoundError, ValueError) as error:  # a size the model cannot take names itself
        hint = " / ".join([param_hint, *(f"--{k}" for k in sizes if k in str(error))])
        raise typer.BadParameter(str(error), param_hint=hint) from error
    if offload:
        try:
            pipe.enable_model_cpu_offload(device)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--offload") from error
    if unified and not pipe.unified:
        raise typer.BadParameter(f"{unified} needs a unified model; {path} is a base generator (text to video only)",
                                 param_hint=param_hint)  # fmt: skip
    return pipe, path


def out_dir(out: Path) -> Path:
    """Make an output folder when the command line is read (a typer callback), and check that a file can be
    written in it (a read-only mount), so that a path that cannot take the outputs fails before any model is
    loaded."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise typer.BadParameter(f"cannot make the folder {out}: {error.strerror}") from error
    try:
        handle, probe = tempfile.mkstemp(dir=out, prefix=".univigu-write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise typer.BadParameter(f"cannot write in the folder {out}: {error.strerror}; name another with "
                                 f"write access") from error  # fmt: skip
    return out


def out_file(path: Path | None) -> Path | None:
    """An output file checked when the command line is read (a typer callback): not a folder, and its folder
    can be made."""
    if path is not None:
        if path.is_dir():
            raise typer.BadParameter(f"{path} is a folder; give a file name")
        out_dir(path.parent)
    return path


def refuse_existing(target: Path, overwrite: bool, param_hint: str) -> None:
    """A usage error for an output folder (or file) that exists and is not empty, unless `overwrite`."""
    if target.exists() and (target.is_file() or any(target.iterdir())) and not overwrite:
        raise typer.BadParameter(f"{target} exists; pass --overwrite to replace it, or name a new folder",
                                 param_hint=param_hint)  # fmt: skip


def _finite(param: typer.CallbackParam, value: float | None) -> float | None:
    """A typer callback: the option's number, finite (NaN guidance samples black videos)."""
    from univigu.checks import check_finite

    try:
        return None if value is None else check_finite(param.name, value)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error


@contextmanager
def _prompt_errors(param_hint: str) -> Iterator[None]:
    """A prompt longer than the model reads is a usage error (exit 2, the reason, no traceback)."""
    from univigu.pipelines import PromptError

    try:
        yield
    except PromptError as error:
        hint = "--negative-prompt" if error.argument == "negative_prompt" else param_hint
        raise typer.BadParameter(str(error), param_hint=hint) from error


def _trajectory_path(base: Path | None, i: int, n: int) -> Path | None:
    """`--trajectory OUT.html` for one sample; with several, OUT_0.html, OUT_1.html, ..."""
    if base is None or n == 1:
        return base
    return base.with_name(f"{base.stem}_{i}{base.suffix or '.html'}")


NEGATIVE_HELP = "What guidance steers away from: the null pass's prompt (default: the empty prompt)."
FRAMES_HELP = "Frames per video (default: the model's; a Wan VAE takes 4k+1)."
SIZE_HELP = "Pixels (default: the model's; a multiple of the VAE's downsampling x the patch size)."
TRAJECTORY_HELP = "Write the denoising-trajectory viewer here (one self-contained HTML page; _0, _1, ... for several)."


def generate(
    prompts: list[str] = typer.Argument(..., help="One or more prompts."),
    model: Path = typer.Option(None, help=MODEL_HELP),
    device: str = typer.Option(None, help=DEVICE_HELP),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help=SEED_HELP),
    steps: int = typer.Option(None, min=1, help=STEPS_HELP),
    guidance: float = typer.Option(None, callback=_finite, help="Classifier-free guidance scale (default: the "
                                   "model's)."),  # fmt: skip
    negative_prompt: str = typer.Option("", help=NEGATIVE_HELP),
    out: Path = typer.Option(Path("outputs/generate"), callback=out_dir, help="Output folder."),
    trajectory: Path = typer.Option(None, callback=out_file, help=TRAJECTORY_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP), offload: bool = typer.Option(False, help=OFFLOAD_HELP),
    frames: int = typer.Option(None, min=1, help=FRAMES_HELP), height: int = typer.Option(None, min=1, help=SIZE_HELP),
    width: int = typer.Option(None, min=1, help=SIZE_HELP),
) -> None:
    """Text to video."""
    load = time.perf_counter()
    pipe, path = _pipeline(model, device, dtype=dtype, offload=offload, frames=frames, height=height, width=width)
    load = time.perf_counter() - load
    with _prompt_errors("PROMPTS"):
        result, seconds, times = timed_sample(pipe, "text_to_video", prompts, seed=seed, num_steps=steps,
                                              guidance_scale=guidance, negative_prompt=negative_prompt,
                                              trajectory=trajectory is not None)  # fmt: skip
    scale = pipe.resolve_guidance_scale(guidance)
    negative_prompt = negative_prompt if scale != 1 else ""  # unused without guidance (the pipeline warns)
    for i, (prompt, video) in enumerate(zip(prompts, result.videos)):
        record = {"task": "text_to_video", "prompt": prompt, "guidance_scale": scale,
                  "negative_prompt": negative_prompt,
                  **run_record(pipe, path, seed, len(times), load, seconds, len(prompts))}  # fmt: skip
        record["files"] = save_trajectory(_trajectory_path(trajectory, i, len(prompts)), pipe, result, i,
                                            f"text to video: {prompt}", record, times)  # fmt: skip
        files = save_sample(out, f"{slug(prompt)}_seed{seed}_{i}", video, record)
        typer.echo(f"{prompt!r} -> {files['gif']}, {files['mp4']}, {files['json']}"
                   + (f" (trajectory: {files['trajectory']})" if trajectory else ""))  # fmt: skip


def caption(
    videos: list[Path] = typer.Argument(..., help="Video files (mp4, gif, webm)."),
    model: Path = typer.Option(None, help=MODEL_HELP),
    device: str = typer.Option(None, help=DEVICE_HELP),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help=SEED_HELP),
    steps: int = typer.Option(None, min=1, help=STEPS_HELP),
    instruction: str = typer.Option(None, help="A question or instruction as the prompt condition (for models "
                                    "trained with them, as the released Uni-ViGU; univigu's own stages train none: "
                                    "a model they trained warns)."),
    out: Path = typer.Option(Path("outputs/caption"), callback=out_dir, help="Where the sidecar JSON files go."),
    trajectory: Path = typer.Option(None, callback=out_file, help=TRAJECTORY_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP), offload: bool = typer.Option(False, help=OFFLOAD_HELP),
) -> None:
    """Video to text: a detailed caption per video file."""
    import numpy as np

    from univigu.data.video_folder import VideoReadError

    load = time.perf_counter()
    pipe, path = _pipeline(model, device, unified="captioning", dtype=dtype, offload=offload)
    load = time.perf_counter() - load
    try:  # read as cache-latents makes training clips
        frames = np.stack([pipe.load_video(v) for v in videos])
    except VideoReadError as error:
        raise typer.BadParameter(str(error), param_hint="VIDEOS") from error
    # with the video's position, as generate names its samples: a caption's noise depends on it
    stems = [f"{caption_stem(v, seed, instruction)}_{i}" for i, v in enumerate(videos)]
    with _prompt_errors("--instruction"):
        result, seconds, times = timed_sample(pipe, "video_to_text", frames, seed=seed, num_steps=steps,
                                              instruction=instruction, trajectory=trajectory is not None)  # fmt: skip
    for i, (video, text) in enumerate(zip(videos, result.texts)):
        record = {"task": "video_to_text", "video": str(video), "caption": text, "instruction": instruction,
                  **run_record(pipe, path, seed, len(times), load, seconds, len(videos))}  # fmt: skip
        record["files"] = save_trajectory(_trajectory_path(trajectory, i, len(videos)), pipe, result, i,
                                            f"video to text: {Path(video).name}", record, times,
                                            video=frames[i])  # fmt: skip
        files = save_sample(out, stems[i], None, record)
        typer.echo(f"{video}: {text}\n  -> {files['json']}"
                   + (f" (trajectory: {files['trajectory']})" if trajectory else ""))  # fmt: skip


def joint(
    prompts: list[str] = typer.Argument(..., help="One or more prompts."),
    model: Path = typer.Option(None, help=MODEL_HELP),
    device: str = typer.Option(None, help=DEVICE_HELP),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help=SEED_HELP),
    steps: int = typer.Option(None, min=1, help=STEPS_HELP),
    guidance: float = typer.Option(None, callback=_finite, help="Classifier-free guidance scale on the video "
                                   "(default: the model's)."),  # fmt: skip
    negative_prompt: str = typer.Option("", help=NEGATIVE_HELP),
    text_update: str = typer.Option(None, help="'ctmc' or the released 'linear-resample' (default: the model's)."),
    out: Path = typer.Option(Path("outputs/joint"), callback=out_dir, help="Output folder."),
    trajectory: Path = typer.Option(None, callback=out_file, help=TRAJECTORY_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP), offload: bool = typer.Option(False, help=OFFLOAD_HELP),
    frames: int = typer.Option(None, min=1, help=FRAMES_HELP), height: int = typer.Option(None, min=1, help=SIZE_HELP),
    width: int = typer.Option(None, min=1, help=SIZE_HELP),
) -> None:
    """Joint generation: a video and its caption per prompt, denoised together."""
    from univigu.flow.samplers import TEXT_UPDATES

    if text_update is not None and text_update not in TEXT_UPDATES:
        raise typer.BadParameter(f"must be one of {list(TEXT_UPDATES)}, got {text_update!r}",
                                 param_hint="--text-update")  # fmt: skip
    load = time.perf_counter()
    pipe, path = _pipeline(model, device, unified="joint generation", dtype=dtype, offload=offload, frames=frames,
                           height=height, width=width)  # fmt: skip
    load = time.perf_counter() - load
    with _prompt_errors("PROMPTS"):
        result, seconds, times = timed_sample(pipe, "generate", prompts, seed=seed, num_steps=steps,
                                              guidance_scale=guidance, negative_prompt=negative_prompt,
                                              text_update=text_update, trajectory=trajectory is not None)  # fmt: skip
    scale = pipe.resolve_guidance_scale(guidance)
    negative_prompt = negative_prompt if scale != 1 else ""  # unused without guidance (the pipeline warns)
    for i, (prompt, video, text) in enumerate(zip(prompts, result.videos, result.texts)):
        record = {"task": "joint", "prompt": prompt, "caption": text, "guidance_scale": scale,
                  "negative_prompt": negative_prompt,
                  "text_update": text_update or pipe.config.text_update,
                  **run_record(pipe, path, seed, len(times), load, seconds, len(prompts))}  # fmt: skip
        record["files"] = save_trajectory(_trajectory_path(trajectory, i, len(prompts)), pipe, result, i,
                                            f"joint generation: {prompt}", record, times)  # fmt: skip
        files = save_sample(out, f"{slug(prompt)}_joint_seed{seed}_{i}", video, record)
        typer.echo(f"{prompt!r} -> {files['gif']}, {files['mp4']}, {files['json']}"
                   + (f" (trajectory: {files['trajectory']})" if trajectory else "") + f"\n  caption: {text}")


def evaluate(
    checkpoint: Path = typer.Argument(None, help=MODEL_HELP),
    device: str = typer.Option(None, help=DEVICE_HELP),
    split: str = typer.Option("test", help="World split: test, heldout (attribute pairs never seen in training), "
                              "val or train."),  # fmt: skip
    n: int = typer.Option(256, "--n", min=1, help="Scenes per task."),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help=SEED_HELP),
    steps: int = typer.Option(None, min=1, help=STEPS_HELP),
    batch_size: int = typer.Option(64, min=1, help="Samples per batch."),
    base: Path = typer.Option(None, help="Base generator folder: its T2V accuracy too, and the unified model's drop "
                              "from it (is generation kept?)."),  # fmt: skip
    tasks: str = typer.Option("t2v,v2t,joint", help="Comma-separated subset of t2v, v2t, joint."),
    json_out: Path = typer.Option(None, "--json", callback=out_file, help="Write the results here."),
) -> None:
    """Attribute accuracies (oracle + parser), BLEU-4, CIDEr and joint consistency."""
    from univigu.data.world import SPLITS
    from univigu.evaluation.evaluate import TASKS, check_base_pipeline, summary_table
    from univigu.evaluation.evaluate import evaluate as run_eval

    chosen = tuple(dict.fromkeys(t.strip() for t in tasks.split(",") if t.strip()))
    if not chosen or set(chosen) - set(TASKS):
        raise typer.BadParameter(f"a comma-separated subset of {', '.join(TASKS)}, got {tasks!r}",
                                 param_hint="--tasks")  # fmt: skip
    if split not in SPLITS:
        raise typer.BadParameter(f"one of {list(SPLITS)}, got {split!r}", param_hint="--split")
    if seed + n - 1 > SEED_MAX:  # sample i is drawn with seed + i
        raise typer.BadParameter(f"sample i is drawn with seed + i, so seed + n - 1 must be at most 2**64 - 1; "
                                 f"got {seed} with --n {n}", param_hint="--seed")  # fmt: skip
    pipe, path = _pipeline(checkpoint, device, param_hint="CHECKPOINT")
    base_pipe = _pipeline(base, device, param_hint="--base")[0] if base else None
    dropped = [t for t in chosen if t != "t2v"]
    if not pipe.unified and dropped:
        if "t2v" not in chosen:
            raise typer.BadParameter(f"{path} is a base generator: it has only t2v", param_hint="--tasks")
        typer.echo(f"{path} is a base generator: {', '.join(dropped)} left out (text to video only)", err=True)
        chosen = ("t2v",)
    if base_pipe is not None and "t2v" in chosen:  # the base serves T2V only
        try:
            check_base_pipeline(pipe, base_pipe)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--base") from None
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
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help=SEED_HELP),
    out: Path = typer.Option(Path("outputs/demo"), callback=out_dir, help="Output folder."),
) -> None:
    """The main job on the shipped toy-world model: a generated video, a caption for a freshly rendered
    world video, and a joint video + caption."""
    from univigu.data.world import World

    load = time.perf_counter()
    pipe, path = _pipeline(model, device, unified="the demo (text to video and video to text)")
    load = time.perf_counter() - load
    c = pipe.config
    start = time.perf_counter()
    with _prompt_errors("--prompt"):
        result, seconds, times = timed_sample(pipe, "text_to_video", [prompt], seed=seed, progress=False)
    record = {"task": "text_to_video", "prompt": prompt, **run_record(pipe, path, seed, len(times), load, seconds)}
    t2v = save_sample(out, "text_to_video", result.videos[0], record)

    world = World.sized_like(c)
    scene = world.scenes("test", [seed])[0]  # a test-split scene: never trained on
    rendered = world.render([scene])
    result, seconds, times = timed_sample(pipe, "video_to_text", rendered, seed=seed, progress=False)
    caption = result.texts[0]
    record = {"task": "video_to_text", "caption": caption, "true_caption": scene.caption,
              **run_record(pipe, path, seed, len(times), load, seconds)}  # fmt: skip
    v2t = save_sample(out, "video_to_text", rendered[0], record)

    both, seconds, times = timed_sample(pipe, "generate", [prompt], seed=seed, progress=False)
    record = {"task": "joint", "prompt": prompt, "caption": both.texts[0],
              **run_record(pipe, path, seed, len(times), load, seconds)}  # fmt: skip
    joint_files = save_sample(out, "joint", both.videos[0], record)
    typer.echo(f"model: {path}")
    typer.echo(f"text to video   {prompt!r}\n  -> {t2v['gif']}, {t2v['mp4']}")
    typer.echo(f"video to text   {v2t['gif']} (a freshly rendered world video)\n  generated: {caption}\n"
               f"  true:      {scene.caption}")  # fmt: skip
    typer.echo(f"joint           {prompt!r}\n  -> {joint_files['gif']}, {joint_files['mp4']}\n"
               f"  caption: {both.texts[0]}")  # fmt: skip
    typer.echo(f"done in {time.perf_counter() - start:.1f} s; sidecar JSON files beside each video in {out}")


def export(
    source: Path = typer.Argument(..., help="Pipeline folder to copy."),
    target: Path = typer.Argument(..., help="New pipeline folder (absent or empty, unless --overwrite)."),
    dtype: str = typer.Option("float16", help="Stored weight dtype: float16, bfloat16 or float32."),
    overwrite: bool = typer.Option(False, help="Replace TARGET if it exists (it is replaced whole, only once the "
                                   "copy is written)."),  # fmt: skip
) -> None:
    """Copy a pipeline folder with its weights stored in another dtype (loading casts back to float32)."""
    import torch

    if dtype not in DTYPES:
        raise typer.BadParameter(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", param_hint="--dtype")
    if target.exists() and target.resolve() == source.resolve():
        raise typer.BadParameter("is SOURCE itself: its weights would be rewritten in place", param_hint="TARGET")
    if target.resolve() in source.resolve().parents:
        raise typer.BadParameter(f"{target} contains SOURCE ({source}), which replacing it would delete; name a "
                                 f"folder outside it", param_hint="TARGET")  # fmt: skip
    if source.resolve() in target.resolve().parents:
        raise typer.BadParameter(f"{target} is inside SOURCE ({source}); name a folder outside it",
                                 param_hint="TARGET")  # fmt: skip
    refuse_existing(target, overwrite, "TARGET")
    pipe, _ = _pipeline(source, "cpu", param_hint="SOURCE")
    # nothing of an older folder (its card, evaluations) stays beside the new weights
    from univigu.training.checkpoint import write_replacing

    out_dir(target.parent)
    write_replacing(target, lambda folder: pipe.save_pretrained(folder, dtype=getattr(torch, dtype)), "export")
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    typer.echo(f"wrote {target} ({size / 2**20:.1f} MiB, {dtype} weights)")


def serve(
    model: Path = typer.Option(None, help=MODEL_HELP),
    device: str = typer.Option(None, help=DEVICE_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 opens the app to the network)."),
    port: int = typer.Option(7860, min=1, max=65535, help="Port to serve on."),
    out: Path = typer.Option(Path("outputs/serve"), callback=out_dir, help="Output folder."),
) -> None:
    """The local demo app (Gradio; install with `pip install 'univigu\\[app]'`): text to video, video to text
    and joint generation in three tabs."""  # \\[: rich would read [app] as markup and drop it
    from univigu import app

    try:
        app.require_gradio()
    except ImportError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from error
    try:
        demo = app.Demo(model, device, out)
    except (FileNotFoundError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--model") from error
    app.serve(demo, host, port)
