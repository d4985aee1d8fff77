"""Video codecs: between uint8 videos `[B, T, H, W, 3]` and what the transformer denoises.

The toy world denoises pixels directly (`PixelCodec`); at Wan scale the Wan VAE's normalised
latents take its place, behind the same two methods.
"""

from __future__ import annotations

import torch
from torch import Tensor


class PixelCodec:
    """uint8 `[B, T, H, W, 3]` <-> float `[B, 3, T, H, W]` in [-1, 1]."""

    channels = 3

    def encode(self, video: Tensor) -> Tensor:
        if video.dtype != torch.uint8 or video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"expected uint8 videos [B, T, H, W, 3], got {video.dtype} {tuple(video.shape)}")
        return video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0

    def decode(self, x: Tensor) -> Tensor:
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """`(C, T, H, W)` of the tensor the transformer sees for a video of this size."""
        return (self.channels, frames, height, width)
