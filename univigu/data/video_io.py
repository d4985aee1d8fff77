"""Reading and writing video files (mp4, gif, webm) as uint8 tensors `[T, H, W, 3]`."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import uuid
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch

from univigu.checks import check_int

_CODECS = {".mp4": ("libx264", "yuv420p"), ".webm": ("libvpx-vp9", "yuv420p")}
# Frame rates each format stores: GIF frame delays are whole 1/100 s (a higher rate has no delay), WebM
# timestamps are milliseconds (frames above 1000 fps share one). Below 0.01 fps a frame would show > 100 s.
_FPS_RANGE = {".gif": (0.01, 100), ".mp4": (0.01, 1000), ".webm": (0.01, 1000)}
VIDEO_FORMATS = tuple(suffix[1:] for suffix in _FPS_RANGE)  # what write_video writes


class VideoReadError(ValueError):
    """A video file is missing, unreadable, empty or not a video."""


def write_video(path: str | Path, frames: np.ndarray | torch.Tensor, fps: float = 8, scale: int = 1) -> Path:
    """Write uint8 frames `[T, H, W, 3]` to .mp4, .webm or .gif (chosen by the suffix).

    `fps` may be fractional (29.97): mp4/webm store it as a fraction; GIF frame delays are whole 1/100 s, rounded
    so that the clip lasts frames / fps (6 and 7 cs at 16 fps).
    `scale` repeats pixels (nearest neighbour) so that tiny toy videos are watchable.
    mp4/webm (yuv420p) need even sizes after scaling. The file is written beside `path` and then renamed
    over it, so a failed write leaves an existing file as it was.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _FPS_RANGE:
        raise ValueError(f"unsupported video format {suffix!r}; use .mp4, .webm or .gif")
    low, high = _FPS_RANGE[suffix]
    if not isinstance(fps, numbers.Real) or isinstance(fps, bool) or not low <= fps <= high:  # NaN fails too
        raise ValueError(f"fps must be a number from {low} to {high} for {suffix}, got {fps!r:.80}")
    check_int("scale", scale, 1)
    frames = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.size == 0:
        raise ValueError(f"expected uint8 frames [T, H, W, 3] with T > 0 and H, W > 0, got {frames.dtype} "
                         f"{frames.shape}")  # fmt: skip
    frames = np.ascontiguousarray(frames.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else frames)
    if suffix in _CODECS and (frames.shape[1] % 2 or frames.shape[2] % 2):
        raise ValueError(f"{suffix} needs an even frame size, got {frames.shape[1]}x{frames.shape[2]}; use "
                         f"scale=2 or .gif")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial{suffix}")  # suffix picks the format
    try:
        (_write_gif if suffix == ".gif" else _write_av)(partial, frames, fps)
        os.replace(partial, path)
    finally:
        with contextlib.suppress(OSError):  # a failing clean-up (a read-only folder) must not hide the write's error
            partial.unlink(missing_ok=True)
    return path


def gif_delays(num_frames: int, fps: float) -> list[int]:
    """Per-frame GIF delays in ms for `num_frames` frames at `fps`. GIF delays are whole centiseconds: frame i ends
    at round((i + 1) * 100 / fps), so the clip lasts num_frames / fps (6 cs each at 16 fps made 81 frames 4.86 s)."""
    ends = [math.floor((i + 1) * 100 / fps + 0.5) for i in range(num_frames)]
    return [10 * (end - start) for start, end in zip([0, *ends], ends)]


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    # Pillow adds the delays of the identical frames it merges
    images[0].save(path, save_all=True, append_images=images[1:], duration=gif_delays(len(images), fps), loop=0)


def _write_av(path: Path, frames: np.ndarray, fps: float) -> None:
    H, W = frames.shape[1:3]
    codec, pix_fmt = _CODECS[path.suffix]
    with av.open(str(path), mode="w") as container:
        # PyAV takes a rate as an int or Fraction; 1001 keeps NTSC rates (30000/1001) exact.
        stream = container.add_stream(codec, rate=Fraction(float(fps)).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "12"}  # near-lossless: tiny videos, exact colours matter
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@contextlib.contextmanager
def open_video(path: str | Path) -> Iterator[av.container.InputContainer]:
    """`path` opened with PyAV, checked to hold a video stream. A missing, empty or corrupt file, and a
    decoding error inside the block, raise VideoReadError."""
    path = Path(path)
    if path.is_dir():
        raise VideoReadError(f"{path} is a folder, not a video file")
    if not path.is_file():
        raise VideoReadError(f"video file not found: {path}")
    if path.stat().st_size == 0:  # checked here: PyAV's own error for it is vaguer
        raise VideoReadError(f"video file is empty (0 bytes): {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"no video stream in {path}")
            yield container
    except av.error.FFmpegError as error:
        raise VideoReadError(f"cannot decode {path} (corrupt or truncated?): {error}") from error


def resize_video(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 `[T, H, W, 3]` resized to (height, width): bilinear, antialiased."""
    if tuple(size) == tuple(video.shape[1:3]):
        return video
    x = torch.nn.functional.interpolate(video.permute(0, 3, 1, 2).float(), size=tuple(size), mode="bilinear",
                                        antialias=True)  # fmt: skip
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _rate(stream: av.video.stream.VideoStream) -> float:
    return float(stream.average_rate or stream.guessed_rate or 25)


def _header_length(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    """Seconds the file's header says the video lasts (the video stream's own, else the container's when it holds
    nothing else), or None."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration and len(container.streams) == 1:
        return container.duration / av.time_base
    return None


def read_video(
    path: str | Path, num_frames: int | None = None, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Read a video file to uint8 `[T, H, W, 3]`.

    num_frames: sample this many frames evenly over the clip (repeating frames of a shorter
    clip). size: (height, width) to resize to (bilinear, antialiased).
    Frames play for their stored durations, so a GIF (whose writers merge identical
    consecutive frames) reads back frame for frame; a GIF whose frames are all identical
    holds one frame, so pass `num_frames` to get a fixed length.
    Raises VideoReadError for a missing, corrupt or empty file; warns when fewer frames decode than the file's
    header says (a truncated file).
    """
    if num_frames is not None:
        check_int("num_frames", num_frames, 1)
    if size is not None:
        if not isinstance(size, (tuple, list)) or len(size) != 2:
            raise TypeError(f"size must be (height, width), got {size!r:.80}")
        size = (check_int("size height", size[0], 1), check_int("size width", size[1], 1))
    with open_video(path) as container:
        stream = container.streams.video[0]
        decoded, durations, end = [], [], 0.0
        for f in container.decode(stream):
            frame = torch.from_numpy(f.to_ndarray(format="rgb24"))
            # resized as decoded: a long high-resolution clip never has all its full-size frames in memory at once
            decoded.append(frame if size is None else resize_video(frame[None], size)[0])
            durations.append(f.duration or 0)
            if f.time is not None:
                end = f.time + float((f.duration or 0) * stream.time_base)
        length = _header_length(container, stream)
        cut_gif = container.format.name == "gif" and not _ends_with_gif_trailer(path)
    if not decoded:
        raise VideoReadError(f"video has zero frames: {path}")
    if stream.frames > len(decoded) or length and end and length - end > max(0.05 * length, 2 / _rate(stream)):
        # Decoding stops quietly where some files were cut (a WebM, for one): the clip is read from what
        # is left, so say so rather than caption part of a video as if it were all of it.
        header = f"{stream.frames} frames" if stream.frames > len(decoded) else f"{length:.2f} s"
        warnings.warn(f"{path}: decoded {len(decoded)} frames ({end:.2f} s) where its header says {header}; the "
                      f"file looks truncated, and only what was decoded is used", stacklevel=2)  # fmt: skip
    elif cut_gif:  # a GIF's header holds no length: its last byte tells
        warnings.warn(f"{path}: decoded {len(decoded)} frames ({end:.2f} s) but it has no GIF trailer; the file "
                      f"looks truncated, and only what was decoded is used", stacklevel=2)  # fmt: skip
    # GIF writers merge identical consecutive frames into one longer frame: show each frame
    # for as many base periods as it lasts, as a viewer would.
    shown = np.repeat(np.arange(len(decoded)), _repeats(durations))  # the decoded frame at each clip position
    if num_frames is not None:
        shown = shown[torch.linspace(0, len(shown) - 1, num_frames).round().long().numpy()]
    return torch.stack([decoded[i] for i in shown])


def _repeats(durations: list[int]) -> list[int]:
    """How many base periods each frame shows for. GIF delays are whole centiseconds, so a rate is written as uneven
    delays (6 and 7 cs at 16 fps): the period is the mean of the frames shorter than 1.5 times the shortest (the
    unmerged ones), so that a long merged run of 6.25 cs frames is not taken for more frames of 6 cs."""
    shortest = min((d for d in durations if d > 0), default=0)
    if not shortest:
        return [1] * len(durations)
    period = float(np.mean([d for d in durations if 0 < d < 1.5 * shortest]))
    return [max(1, round(d / period)) for d in durations]


def _ends_with_gif_trailer(path: str | Path) -> bool:
    """Whether the file ends with the byte 0x3B (';') that ends every whole GIF, before any padding (NUL bytes,
    white space: a GIF with a trailing newline is whole)."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - 4096)
            f.seek(start)
            left = f.read(end - start).rstrip(b"\0\r\n \t")
            if left:
                return left.endswith(b";")
            end = start
    return False
