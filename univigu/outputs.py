"""Where results go: a name from the prompt (or input file) and seed, the video as gif + mp4 with
pixels scaled for viewing, and a sidecar JSON with the prompt, seed, steps, model and timings."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe form of a prompt: lower case words joined by single '-'. Distinct prompts get distinct
    names: a plain prompt ("a red circle", at most `limit` characters) keeps its bare name; when the words lose
    anything of the exact prompt (case, punctuation, other characters, spacing, the end past `limit`), '--' and 8
    hex digits of a hash of the prompt follow the first `limit` characters of them ("sample" when none are left):
    "A red circle!" -> "a-red-circle--" + 8 hex digits. A bare name never holds '--', so the two kinds never meet;
    a name is at most `limit` + 10 characters."""
    words = "-".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())
    if words.replace("-", " ") == text and 0 < len(words) <= limit:
        return words
    return f"{words[:limit].rstrip('-') or 'sample'}--{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def caption_stem(video: str | Path, seed: int, instruction: str | None = None) -> str:
    """The name of a caption's files: the video file's stem, '--' and 8 hex digits of a hash of its full path and
    the instruction (clip.mp4 and clip.gif, two folders' clip.mp4, or one clip asked two questions never share
    files; a rerun of the same replaces its own), then the seed: "clip--1a2b3c4d_caption_seed0"."""
    key = str(Path(video).resolve()) + ("" if instruction is None else "\n" + instruction)
    return f"{Path(video).stem}--{hashlib.sha256(key.encode()).hexdigest()[:8]}_caption_seed{seed}"


def save_sample(out: str | Path, stem: str, video: np.ndarray | None, record: dict[str, Any]) -> dict[str, str]:
    """Write `stem.gif`, `stem.mp4` (uint8 video `[T, H, W, 3]`, when given) and `stem.json` (the record plus
    the written files, under "files") in `out`. Returns the files by kind (gif, mp4, json)."""
    from univigu.data.video_io import write_video

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    if video is not None:
        scale = max(1, 128 // max(video.shape[1:3]))
        files = {ext: str(write_video(out / f"{stem}.{ext}", video, fps=record.get("fps", 8), scale=scale))
                 for ext in ("gif", "mp4")}  # fmt: skip
    files.update(record.get("files", {}))
    sidecar = out / f"{stem}.json"
    sidecar.write_text(json.dumps({**record, "files": files}, indent=2))
    return {**files, "json": str(sidecar)}


def run_record(pipe: Any, model: str | Path, seed: int, steps: int, load_s: float, sample_s: float,
               n: int = 1) -> dict[str, Any]:  # fmt: skip
    """Sidecar fields of every run: seed, the steps it ran, model, its dtype and timings (loading; sampling per
    sample)."""
    c = pipe.config
    return {"seed": seed, "steps": steps, "model": str(model), "dtype": str(pipe.dtype).split(".")[-1],
            "frames": c.frames, "height": c.height, "width": c.width, "load_seconds": round(load_s, 2),
            "seconds": round(sample_s / n, 2), "fps": c.fps}  # fmt: skip


def timed_sample(
    pipe: Any, method: str, *args: Any, trajectory: bool = False, on_step: Callable[[int], None] | None = None,
    **kwargs: Any,
) -> tuple[Any, float, list[float]]:
    """`pipe.<method>(*args, **kwargs)` timed: (output, seconds, the noise level s each step started from).
    `trajectory` records the denoising trajectory; `on_step(i)` is called after step i (progress bars)."""
    times: list[float] = []

    def step(i: int, s: float, video: Any, text: Any) -> None:
        times.append(s)
        if on_step is not None:
            on_step(i)

    start = time.perf_counter()
    result = getattr(pipe, method)(*args, return_trajectory=trajectory, callback=step, **kwargs)
    return result, time.perf_counter() - start, times


def save_trajectory(path: str | Path | None, pipe: Any, result: Any, i: int, title: str, record: dict[str, Any],
                    times: list[float], video: np.ndarray | None = None) -> dict[str, str]:  # fmt: skip
    """Write the trajectory viewer page of sample i of `result` (nothing when `path` is None); returns it as a
    sidecar `files` entry. `video`: the input video `[T, H, W, 3]` of a caption run."""
    if path is None:
        return {}
    from univigu import viewer

    settings = {k: v for k, v in record.items() if k not in ("files", "fps")}
    page = viewer.from_output(result, i, title, settings, times, video=video, fps=record.get("fps", 8))
    return {"trajectory": str(viewer.write_trajectory(path, page, pipe.text_canvas))}
