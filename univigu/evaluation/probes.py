"""Probes of what a trained transformer has learned, beyond task accuracies."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from univigu.data.world import World


@torch.no_grad()
def position_sensitivity(
    pipeline: Any, n: int = 16, noise_levels: Sequence[float] = (0.0, 0.5, 0.9), seed: int = 0
) -> dict[str, Any]:
    """How much the video output depends on where patches are, not only on what they hold.

    Test-split world videos, noised to each level s (x_s = (1 - s) x0 + s e), go through the
    transformer as they are and with their columns of patches shuffled (one random permutation).
    A network that ignores positions is permutation-equivariant: its output on the shuffled input is
    the shuffled output. Returns, per level, `mean |f(P x) - P f(x)| / mean |f(x)|`: near 0 means the
    positions are unused; shapes, places and motions need them.
    """
    cfg = pipeline.config
    world = World.sized_like(cfg)
    scenes = world.scenes("test", range(n), seed)
    device = pipeline.device
    x0 = pipeline.codec.encode(torch.as_tensor(world.render(scenes)).to(device))  # [B, C, T, H, W]
    states = pipeline.encode_prompts([s.prompt for s in scenes])
    patch_w = pipeline.transformer.config.patch_size[2]
    columns = x0.shape[-1] // patch_w
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(columns, generator=g)
    if torch.equal(perm, torch.arange(columns)):
        perm = perm.roll(1)  # a shuffle that moves something

    def shuffle(z: torch.Tensor) -> torch.Tensor:
        return z.unflatten(-1, (columns, -1))[..., perm, :].flatten(-2)

    text = torch.zeros(n, 0, dtype=torch.long, device=device)

    def video_output(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # unified model or plain Wan base
        if pipeline.unified:
            return pipeline.transformer(x, text, t, t, states)[0]
        return pipeline.transformer(hidden_states=x, timestep=t, encoder_hidden_states=states, return_dict=False)[0]

    result: dict[str, Any] = {"n": n, "seed": seed, "columns": columns, "relative_error": {}}
    for s in noise_levels:
        noise = torch.randn(x0.shape, generator=g).to(device, x0.dtype)
        x_s = (1 - s) * x0 + s * noise
        t = torch.full((n,), s * 1000.0, device=device)
        out, out_shuffled = video_output(x_s, t), video_output(shuffle(x_s), t)
        error = (out_shuffled - shuffle(out)).abs().mean() / out.abs().mean()
        result["relative_error"][f"{s:g}"] = float(error)
    return result
