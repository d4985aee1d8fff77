"""A folder of real videos with captions: listing, decoding to a fixed clip, and why a file was skipped.

Captions come from a JSONL or CSV file next to the videos, one record per video:

    {"video": "clips/0001.mp4", "prompt": "a dog runs on a beach", "caption": "A brown dog ..."}

`video` (also `path` / `file`) is relative to the folder; `prompt` (short) and `caption` (detailed)
are both optional but at least one is needed (a missing one takes the other's text; a JSONL null is a missing
value, any other value that is not a string an error naming its line). Files are UTF-8, a byte-order mark (as
Excel writes CSV) allowed. Each video is decoded with PyAV, resampled to `fps` (at each time of the target rate
from the start, the frame showing then; a clip too short for `frames` frames at that rate is an error, not
padded), resized so that it covers the target size and centre-cropped to it (aspect kept), grayscale expanded to
RGB by the decoder.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from univigu.data.video_io import VideoReadError, open_video, resize_video

__all__ = ["VideoRecord", "read_captions", "load_clip", "VideoReadError"]


@dataclass(frozen=True)
class VideoRecord:
    path: Path
    prompt: str
    caption: str


def read_captions(folder: str | os.PathLike, captions: str | os.PathLike | None = None) -> list[VideoRecord]:
    """Records of a captions file (default: the only *.jsonl or *.csv in `folder`); paths resolved in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"video folder does not exist (or is not a folder): {folder}")
    if captions is None:
        found = sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.csv"))
        if len(found) != 1:
            raise FileNotFoundError(f"{folder}: expected one captions file (*.jsonl or *.csv), found "
                                    f"{[p.name for p in found]}; name it (--captions FILE on the command line)")  # fmt: skip
        captions = found[0]
    captions = Path(captions)
    # utf-8-sig: a byte-order mark (Excel's CSV) is not part of the first column's name
    if captions.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(captions.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{captions} line {number} is not valid JSON: {error}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{captions} line {number}: expected a JSON object (video, prompt, caption), got "
                                 f"{type(row).__name__}: {line.strip()[:80]}")  # fmt: skip
            rows.append((f"line {number}", row))
    elif captions.suffix == ".csv":
        with captions.open(newline="", encoding="utf-8-sig") as f:
            rows = [(f"record {i + 1}", row) for i, row in enumerate(csv.DictReader(f))]
    else:
        raise ValueError(f"captions must be .jsonl or .csv, got {captions}")
    records = []
    for where, row in rows:
        for field in ("video", "path", "file", "prompt", "caption"):  # null (JSONL) is a missing value, as in CSV
            if row.get(field) is not None and not isinstance(row[field], str):
                raise ValueError(f"{captions} {where}: {field} is {type(row[field]).__name__}, expected text: "
                                 f"{row[field]!r}")  # fmt: skip
        name = row.get("video") or row.get("path") or row.get("file")
        prompt, caption = (row.get("prompt") or "").strip(), (row.get("caption") or "").strip()
        if not name or not (prompt or caption):
            raise ValueError(f"{captions} {where} needs a video path (field video, path or file) and a prompt or "
                             f"caption (fields prompt, caption): {row}")  # fmt: skip
        records.append(VideoRecord(folder / name, prompt or caption, caption or prompt))
    return records


def _resize_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [T, height, width, 3]: scale to cover (bilinear, antialiased), centre crop."""
    h, w = video.shape[1:3]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resize_video(video, (new_h, new_w))[:, top : top + height, left : left + width].contiguous()


def load_clip(path: str | os.PathLike, frames: int, height: int, width: int, fps: float | None = None,
              min_side: int = 16) -> torch.Tensor:  # fmt: skip
    """The first `frames` frames of a video at `fps` (None: the file's own rate), resized and centre-cropped
    to uint8 [frames, height, width, 3]. Raises VideoReadError saying why a file cannot give such a clip
    (missing, empty, corrupt or truncated, no video stream, too short, smaller than `min_side` pixels)."""
    decoded, times, last = [], [], 0.0
    later = False  # decoding stopped at a frame starting after the last target time: the clip is long enough
    with open_video(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        step = 1.0 / fps if fps else None
        # a target time takes the frame showing then: a frame starting up to `slack` later counts as started
        # (timestamps are rounded: GIF delays to whole centiseconds)
        slack = min(0.01, step / 4) if step else 0.0
        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else len(decoded) / (rate or 1.0)
            if step is not None and decoded and t - times[0] > (frames - 1) * step + slack:
                later = True
                break  # the frame showing at the last target time is in
            decoded.append(frame.to_ndarray(format="rgb24"))  # grayscale and yuv alike become RGB
            times.append(t)
            # a frame ends when the next one starts; the file's last frame lasts its stored duration (GIF writers
            # merge identical consecutive frames into one longer one; with B-frames only the last one is used)
            last = float(frame.duration * stream.time_base) if frame.duration else 1.0 / (rate or fps or 1)
            if step is None and len(decoded) >= frames:
                break
    if not decoded:
        raise VideoReadError(f"video has zero decodable frames (truncated or corrupt?): {path}")
    h, w = decoded[0].shape[:2]
    if min(h, w) < min_side:
        raise VideoReadError(f"video is {w}x{h} pixels, smaller than the {min_side}-pixel minimum: {path}")
    if fps:  # the frame showing at each target time from the first one: the last to start at or before it
        stamps = np.asarray(times) - times[0]
        targets = np.arange(frames) / fps
        index = np.searchsorted(stamps, targets + slack, side="right") - 1
        length = times[-1] + last - times[0]  # until the last frame ends, not starts
        if not later and targets[-1] - slack >= length:
            raise VideoReadError(f"video is too short: {length:.2f} s decoded, {frames} frames at {fps:g} fps need "
                                 f"more than {targets[-1] - slack:.3f} s: {path}")  # fmt: skip
    else:
        if len(decoded) < frames:
            raise VideoReadError(f"video has {len(decoded)} frames, {frames} needed: {path}")
        index = np.arange(frames)
    video = torch.from_numpy(np.stack([decoded[i] for i in index]))
    return _resize_crop(video, height, width)
