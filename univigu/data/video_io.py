"""Reading and writing video files (mp4, gif, webm) as uint8 tensors `[T, H, W, 3]`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch

_CODECS = {".mp4": ("libx264", "yuv420p"), ".webm": ("libvpx-vp9", "yuv420p")}


class VideoReadError(ValueError):
    """A video file is missing, unreadable, empty or not a video."""


def write_video(path: str | Path, frames: np.ndarray | torch.Tensor, fps: int = 8, scale: int = 1) -> Path:
    """Write uint8 frames `[T, H, W, 3]` to .mp4, .webm or .gif (chosen by the suffix).

    `scale` repeats pixels (nearest neighbour) so that tiny toy videos are watchable.
    mp4/webm (yuv420p) need even sizes after scaling.
    """
    path = Path(path)
    frames = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames [T, H, W, 3] with T > 0, got {frames.dtype} {frames.shape}")
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    frames = np.ascontiguousarray(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path
    if suffix not in _CODECS:
        raise ValueError(f"unsupported video format {suffix!r}; use .mp4, .webm or .gif")
    T, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise ValueError(f"{suffix} needs an even frame size, got {H}x{W}; use scale=2 or .gif")
    codec, pix_fmt = _CODECS[suffix]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "12"}  # near-lossless: tiny videos, exact colours matter
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@contextlib.contextmanager
def open_video(path: str | Path) -> Iterator[av.container.InputContainer]:
    """`path` opened with PyAV, checked to hold a video stream. A missing, empty or corrupt file, and a
    decoding error inside the block, raise VideoReadError."""
    path = Path(path)
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


def read_video(
    path: str | Path, num_frames: int | None = None, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Read a video file to uint8 `[T, H, W, 3]`.

    num_frames: sample this many frames evenly over the clip (repeating frames of a shorter
    clip). size: (height, width) to resize to (bilinear, antialiased).
    Frames play for their stored durations, so a GIF (whose writers merge identical
    consecutive frames) reads back frame for frame; a GIF whose frames are all identical
    holds one frame, so pass `num_frames` to get a fixed length.
    Raises VideoReadError for a missing, corrupt or empty file.
    """
    with open_video(path) as container:
        decoded = [(f.to_ndarray(format="rgb24"), f.duration or 0) for f in container.decode(video=0)]
    if not decoded:
        raise VideoReadError(f"video has zero frames: {path}")
    frames, durations = zip(*decoded)
    # GIF writers merge identical consecutive frames into one longer frame: show each frame
    # for as many base periods as it lasts, as a viewer would.
    shortest = min((d for d in durations if d > 0), default=0)
    repeats = [max(1, round(d / shortest)) if shortest else 1 for d in durations]
    video = torch.from_numpy(np.stack(frames)).repeat_interleave(torch.tensor(repeats), dim=0)
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        index = torch.linspace(0, len(video) - 1, num_frames).round().long()
        video = video[index]
    return video if size is None else resize_video(video, size)
