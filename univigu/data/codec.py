"""Video codecs: between uint8 videos `[B, T, H, W, 3]` and what the transformer denoises.

The toy world denoises pixels directly (`PixelCodec`); at Wan scale the Wan VAE's normalised
latents take its place, behind the same two methods.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class PixelCodec:
    """uint8 `[B, T, H, W, 3]` <-> float `[B, 3, T, H/d, W/d]` in [-1, 1].

    downsample d > 1 averages d x d pixel blocks and decodes by repeating them: the toy world's stand-in for a
    VAE's spatial compression. At d = 2 the transformer denoises 4x fewer values, and the world's oracle still
    reads the attributes of 2x-reduced videos as well as of the originals (shape 99.8%, the rest 100%:
    `univigu world check-oracle --n 1000`)."""

    channels = 3

    def __init__(self, downsample: int = 1) -> None:
        if downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        self.downsample = downsample

    def encode(self, video: Tensor) -> Tensor:
        """uint8 videos `[B, T, H, W, 3]` -> `[B, 3, T, H/d, W/d]` in [-1, 1] (d x d pixel blocks averaged)."""
        if video.dtype != torch.uint8 or video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"expected uint8 videos [B, T, H, W, 3], got {video.dtype} {tuple(video.shape)}")
        self.latent_shape(*video.shape[1:4])  # checks the size
        x = video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        d = self.downsample
        return F.avg_pool3d(x, (1, d, d)) if d > 1 else x

    def decode(self, x: Tensor) -> Tensor:
        """`[B, 3, T, H/d, W/d]` -> uint8 videos `[B, T, H, W, 3]` (each value repeated over its block, clamped)."""
        d = self.downsample
        if d > 1:
            x = x.repeat_interleave(d, dim=-2).repeat_interleave(d, dim=-1)
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """`(C, T, H, W)` of the tensor the transformer sees for a video of this size."""
        d = self.downsample
        if height % d or width % d:
            raise ValueError(f"a {height}x{width} video does not split into {d}x{d} pixel blocks (pixel_downsample)")
        return (self.channels, frames, height // d, width // d)
