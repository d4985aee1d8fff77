"""`univigu world ...`: render, inspect and measure the toy video world."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

app = typer.Typer(help="The procedurally rendered toy video world.", no_args_is_help=True)


def _config(height: int, width: int, frames: int):
    from univigu.data.world import WorldConfig

    return WorldConfig(height=height, width=width, frames=frames)


@app.command()
def render(
    n: int = typer.Option(16, "--n", min=1, help="Number of samples."),
    split: str = typer.Option("train", help="train, val, test or heldout."),
    seed: int = typer.Option(0, help="World seed."),
    out: Path = typer.Option(Path("outputs/world"), help="Output folder."),
    height: int = typer.Option(32, help="Frame height in pixels."), width: int = typer.Option(32, help="Frame width "
                               "in pixels."), frames: int = typer.Option(16, help="Frames per video."),  # fmt: skip
    fmt: str = typer.Option("mp4,gif", "--format", help="Comma-separated: mp4, gif, webm."),
    scale: int = typer.Option(4, min=1, help="Pixel repeat factor for the written files."),
) -> None:
    """Write videos, samples.jsonl (prompt, caption, attributes) and a contact sheet."""
    from univigu.data.video_io import VIDEO_FORMATS, write_video
    from univigu.data.world import SPLITS, World

    formats = [ext.strip().lstrip(".") for ext in fmt.split(",") if ext.strip()]
    if not formats or set(formats) - set(VIDEO_FORMATS):
        raise typer.BadParameter(f"a comma-separated subset of {', '.join(VIDEO_FORMATS)}, got {fmt!r}",
                                 param_hint="--format")  # fmt: skip
    if split not in SPLITS:
        raise typer.BadParameter(f"one of {list(SPLITS)}, got {split!r}", param_hint="--split")
    try:
        world = World(_config(height, width, frames))
        scenes = world.scenes(split, range(n), seed)
    except (TypeError, ValueError) as error:
        raise typer.BadParameter(str(error)) from error
    videos = world.render(scenes)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    records = []
    for i, (scene, video) in enumerate(zip(scenes, videos)):
        files = {ext: str(write_video(out / "videos" / f"{split}_{i:06d}.{ext}", video, scale=scale))
                 for ext in formats}  # fmt: skip
        records.append({"index": i, "split": split, "seed": seed, "files": files, "prompt": scene.prompt,
                        "caption": scene.caption, "attributes": scene.attributes()})  # fmt: skip
    (out / "samples.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    sheet = contact_sheet(videos, [s.prompt for s in scenes], out / "contact_sheet.png")
    typer.echo(f"wrote {n} {split} samples to {out} (samples.jsonl, videos/, {sheet.name})")


def contact_sheet(videos, captions: list[str], path: Path, columns: int = 8, scale: int = 3) -> Path:
    """A PNG with one row per video: `columns` evenly spaced frames and the caption beneath."""
    import numpy as np
    from PIL import Image, ImageDraw

    videos = np.asarray(videos)
    N, T, H, W, _ = videos.shape
    columns = min(columns, T)
    picks = np.linspace(0, T - 1, columns).round().astype(int)
    cell_h, cell_w, text_h = H * scale, W * scale, 14
    sheet = Image.new("RGB", (columns * (cell_w + 2), N * (cell_h + text_h + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, (video, caption) in enumerate(zip(videos, captions)):
        top = row * (cell_h + text_h + 4)
        for col, t in enumerate(picks):
            frame = Image.fromarray(np.ascontiguousarray(video[t])).resize((cell_w, cell_h), Image.NEAREST)
            sheet.paste(frame, (col * (cell_w + 2), top))
        draw.text((2, top + cell_h + 1), caption, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


@app.command("check-oracle")
def check_oracle(
    n: int = typer.Option(1000, "--n", min=1, help="Number of freshly rendered test videos."),
    seed: int = typer.Option(0, help="Seed of the test scenes and the noise."),
    noise: float = typer.Option(0.1, help="Gaussian pixel noise std, in 0..1 units."),
    blur: int = typer.Option(3, help="Box blur size in pixels (applied before the noise)."),
    downsample: int = typer.Option(2, min=1, help="Also on videos reduced to d x d pixel blocks, as a toy "
                                   "pipeline with pixel_downsample d sees and decodes them."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results here."),
) -> None:
    """Oracle attribute accuracy on clean, noisy, blurred, noisy+blurred and block-reduced test videos."""
    import torch

    from univigu.data.codec import PixelCodec
    from univigu.data.oracle import Oracle
    from univigu.data.world import World, accuracy, attribute_matches, degrade

    world, oracle = World(), Oracle()
    if world.config.height % downsample or world.config.width % downsample:
        raise typer.BadParameter(f"must divide the world's {world.config.height}x{world.config.width} frames, got "
                                 f"{downsample}", param_hint="--downsample")  # fmt: skip
    scenes = world.scenes("test", range(n), seed)
    videos = world.render(scenes)
    conditions = {
        "clean": videos,
        f"noise {noise}": degrade(videos, noise_std=noise, seed=seed + 1),
        f"blur {blur}x{blur}": degrade(videos, blur=blur),
        f"noise {noise} + blur {blur}x{blur}": degrade(videos, noise_std=noise, blur=blur, seed=seed + 1),
    }
    if downsample > 1:
        codec = PixelCodec(downsample)
        conditions[f"{downsample}x{downsample} blocks"] = codec.decode(codec.encode(torch.from_numpy(videos))).numpy()
    results = {}
    for name, vids in conditions.items():
        preds = oracle(vids)
        results[name] = accuracy(attribute_matches(s.attributes(), p) for s, p in zip(scenes, preds))
    keys = list(next(iter(results.values())))
    typer.echo(f"oracle accuracy on {n} test videos (seed {seed})")
    typer.echo(f"{'condition':<28}" + "".join(f"{k:>11}" for k in keys))
    for name, acc in results.items():
        typer.echo(f"{name:<28}" + "".join(f"{100 * acc[k]:>10.2f}%" for k in keys))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"n": n, "seed": seed, "results": results}, indent=2))


@app.command()
def bench(
    n: int = typer.Option(8192, "--n", min=1, help="Videos to sample and render."),
    batch: int = typer.Option(1024, min=1, help="Videos rendered per call."),
    height: int = typer.Option(32, help="Frame height in pixels."), width: int = typer.Option(32, help="Frame width "
                               "in pixels."), frames: int = typer.Option(16, help="Frames per video."),  # fmt: skip
) -> None:
    """Scene sampling + rendering throughput on one thread (videos/s).

    Rendering is numpy element-wise work, which runs on a single thread.
    """
    from univigu.data.world import World

    world = World(_config(height, width, frames))
    world.render(world.scenes("train", range(min(batch, 64))))  # warm-up
    start = time.perf_counter()
    sample_time = 0.0
    for first in range(0, n, batch):
        t0 = time.perf_counter()
        scenes = world.scenes("train", range(first, min(first + batch, n)))
        sample_time += time.perf_counter() - t0
        world.render(scenes)
    total = time.perf_counter() - start
    typer.echo(
        f"{n} videos of {frames}x{height}x{width} in {total:.2f}s on one thread: "
        f"{n / total:.0f} videos/s (sampling {sample_time:.2f}s, rendering {total - sample_time:.2f}s)"
    )


@app.command()
def tokenizer(out: Path = typer.Argument(..., help="Folder to write tokenizer.json into.")) -> None:
    """Build the world's word-level tokenizer and save it."""
    from univigu.data.tokenizer import build_world_tokenizer

    tok = build_world_tokenizer()
    tok.save_pretrained(str(out))
    typer.echo(f"wrote a {len(tok)}-token world tokenizer to {out}")

