"""A torch Dataset over the toy world, rendering on the fly in batches."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from univigu.data.world import World, WorldConfig


class WorldDataset(Dataset):
    """`size` samples of one split; item i is (video, prompt, caption, attributes).

    video is uint8 `[T, H, W, 3]`. DataLoader fetches whole batches through `__getitems__`,
    so a batch is rendered in one vectorised call.
    """

    def __init__(self, split: str = "train", size: int = 10_000, seed: int = 0,
                 config: WorldConfig | None = None) -> None:  # fmt: skip
        self.world = World(config)
        self.split, self.size, self.seed = split, size, seed
        self.world.scene(split, 0, seed)  # fail early on a bad split

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        for i in indices:
            if not 0 <= i < self.size:
                raise IndexError(f"index {i} out of range for a dataset of {self.size}")
        scenes = self.world.scenes(self.split, indices, self.seed)
        videos = torch.from_numpy(np.ascontiguousarray(self.world.render(scenes)))
        return [
            {"video": video, "prompt": s.prompt, "caption": s.caption, "attributes": s.attributes()}
            for video, s in zip(videos, scenes)
        ]


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack videos `[B, T, H, W, 3]`; keep texts and attributes as lists."""
    return {
        "video": torch.stack([it["video"] for it in items]),
        "prompt": [it["prompt"] for it in items],
        "caption": [it["caption"] for it in items],
        "attributes": [it["attributes"] for it in items],
    }
