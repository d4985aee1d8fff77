"""The oracle: recovers a scene's attributes from pixels alone.

It is how generated videos are scored, so it must hold up on rendered, noisy, blurred and
generated frames. Three steps:
1. The background is the most common background colour. Each pixel's *coverage* by an
   object colour is its position on the segment from the background colour to that colour;
   a blurred edge mixes the two linearly, so it stays on the segment. Pixels go to the
   colour whose segment is nearest (with coverage >= 0.35); an opening drops noise speckles.
2. Coverage around each object's mask gives areas, centroids and moments that blur does
   not bias and noise averages out of.
3. Scale-invariant moments give the shape (a triangle is skewed vertically; a square's
   fourth moments are lower than a circle's); straight-line fits of the centroid and of
   sqrt(area) over time give position, motion, speed and size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from univigu.data.world import (
    BACKGROUNDS,
    GROWTH,
    OBJECT_COLOURS,
    SHAPE_AREA,
    SIZE_RADIUS,
    TRAVEL,
    World,
    WorldConfig,
)

_BG_NAMES = tuple(BACKGROUNDS)
_OBJ_NAMES = tuple(OBJECT_COLOURS)
_PALETTE = np.array([*BACKGROUNDS.values(), *OBJECT_COLOURS.values()], dtype=np.float32) / 255.0
_FRAME_3X3 = np.ones((1, 3, 3), dtype=bool)  # structuring element acting within each frame
_MIN_COVERAGE = 0.35  # a pixel counts for an object from this coverage on

# Thresholds sit between the ranges measured on 1,500 clean and noisy+blurred test videos.
# Vertical skewness: |s| <= 0.08 for circles and squares, >= 0.25 for apex-up triangles.
_TRIANGLE_SKEW = 0.16
# (m40 + m04) / (6 m22): 1 for a disc (>= 0.82 pixelated), 0.6 for a square (<= 0.74 blurred).
_SQUARE_KURTOSIS = 0.78


class Oracle:
    """Reads videos and returns scene attributes in the format of `Scene.attributes()`.

    >>> Oracle(WorldConfig())(videos)  # uint8 [N, T, H, W, 3] or [T, H, W, 3]
    """

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()
        self._world = World(self.config)

    def __call__(self, videos: np.ndarray) -> list[dict[str, Any]]:
        """Attributes of uint8 videos `[N, T, H, W, 3]` (or one `[T, H, W, 3]`) of the config's frame size."""
        videos = np.asarray(videos)
        if videos.ndim == 4:
            videos = videos[None]
        # Other inputs would read silently wrong: float or bool pixels as black, another frame size with the
        # config's size thresholds and regions, a single frame as no objects (motion needs two).
        if videos.dtype != np.uint8:
            raise TypeError(f"videos must be uint8 (0..255), got {videos.dtype}; convert float [0, 1] videos "
                            f"with (videos * 255).round().astype(np.uint8)")  # fmt: skip
        H, W = self.config.height, self.config.width
        if videos.ndim != 5 or videos.shape[2:] != (H, W, 3) or videos.shape[1] < 2:
            raise ValueError(f"expected uint8 videos [N, T, H, W, 3] with H x W = {H}x{W} (the oracle's "
                             f"WorldConfig) and T >= 2, got shape {videos.shape}")  # fmt: skip
        return [self._read(video) for video in videos]

    def read(self, video: np.ndarray) -> dict[str, Any]:
        """Attributes of one video `[T, H, W, 3]` (uint8). Objects come largest first."""
        return self(np.asarray(video)[None])[0]

    def _read(self, video: np.ndarray) -> dict[str, Any]:
        x = video.astype(np.float32) / 255.0
        n_bg = len(_BG_NAMES)
        nearest = ((x[..., None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)  # [T, H, W]
        bg_index = int(np.bincount(nearest.ravel(), minlength=len(_PALETTE))[:n_bg].argmax())
        background = _PALETTE[bg_index]
        # A blurred edge mixes an object's colour with the background, so it lies on the
        # segment between them: classify pixels by their distance to each such segment.
        direction = _PALETTE[n_bg:] - background  # [C, 3]
        offset = x - background  # [T, H, W, 3]
        coverage = offset @ direction.T / (direction * direction).sum(-1)  # [T, H, W, C]
        residual = ((offset[..., None, :] - coverage[..., None] * direction) ** 2).sum(-1)
        residual[coverage < _MIN_COVERAGE] = np.inf
        label = np.where(np.isfinite(residual.min(-1)), residual.argmin(-1), -1)
        masks = {}
        for c in range(len(_OBJ_NAMES)):
            mask = label == c
            # An opening drops the speckles noise scatters over the background; pixels next
            # to the surviving core (a triangle's thin apex) are put back.
            core = ndimage.binary_opening(mask, _FRAME_3X3)
            mask &= ndimage.binary_dilation(core, _FRAME_3X3)
            if np.median(mask.sum(axis=(1, 2))) >= self._min_area():
                masks[c] = mask
        objects = []
        for c, mask in masks.items():
            # Each object owns the pixels next to its mask that are not next to another's.
            region = ndimage.binary_dilation(mask, _FRAME_3X3)
            for other, other_mask in masks.items():
                if other != c:
                    region &= ~ndimage.binary_dilation(other_mask, _FRAME_3X3)
            obj = self._describe(coverage[..., c] * region)
            if obj is not None:
                objects.append({"colour": _OBJ_NAMES[c], **obj})
        objects.sort(key=lambda o: -o.pop("_area"))
        return {"background": _BG_NAMES[bg_index], "objects": objects}

    def _min_area(self) -> float:
        """Presence threshold: 40% of the smallest object's area, in pixels."""
        small = SIZE_RADIUS["small"] * min(self.config.height, self.config.width)
        return 0.4 * min(SHAPE_AREA.values()) * small * small

    def _describe(self, coverage: np.ndarray) -> dict[str, Any] | None:
        """Attributes of one object from its coverage `[T, H, W]` in [0, 1]."""
        cfg = self.config
        T, H, W = coverage.shape
        side = min(H, W)
        small, large = SIZE_RADIUS["small"] * side, SIZE_RADIUS["large"] * side
        area = coverage.sum(axis=(1, 2))
        frames = np.flatnonzero(area >= 0.25 * min(SHAPE_AREA.values()) * small * small)
        if len(frames) < max(2, T // 2):
            return None
        w, a = coverage[frames], area[frames]
        ys = np.arange(H, dtype=np.float32)[None, :, None] + 0.5
        xs = np.arange(W, dtype=np.float32)[None, None, :] + 0.5
        cx = (w * xs).sum(axis=(1, 2)) / a
        cy = (w * ys).sum(axis=(1, 2)) / a
        dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]

        def moment(p: int, q: int) -> np.ndarray:
            return (w * dx**p * dy**q).sum(axis=(1, 2)) / a

        skew = np.median(moment(0, 3) / np.maximum(moment(0, 2), 1e-6) ** 1.5)
        kurtosis = np.median((moment(4, 0) + moment(0, 4)) / np.maximum(6 * moment(2, 2), 1e-6))
        if abs(skew) > _TRIANGLE_SKEW:
            shape = "triangle"
        else:
            shape = "square" if kurtosis < _SQUARE_KURTOSIS else "circle"

        # Straight-line fits over the clip: the value at the first frame, and the change.
        f = frames / max(T - 1, 1)
        (move_x, x0), (move_y, y0) = np.polyfit(f, cx, 1), np.polyfit(f, cy, 1)
        slope, root_area = np.polyfit(f, np.sqrt(a), 1)
        growth = (root_area + slope) / max(root_area, 1e-6)
        radius = root_area / np.sqrt(SHAPE_AREA[shape])
        size = "large" if radius > np.sqrt(small * large) else "small"

        travel_x, travel_y = move_x / cfg.width, move_y / cfg.height
        travel = max(abs(travel_x), abs(travel_y))
        if travel > TRAVEL["slow"] / 2:
            if abs(travel_x) >= abs(travel_y):
                motion = "right" if travel_x > 0 else "left"
            else:
                motion = "down" if travel_y > 0 else "up"
            speed = "fast" if travel > np.sqrt(TRAVEL["slow"] * TRAVEL["fast"]) else "slow"
        elif growth > 1 + (GROWTH["slow"] - 1) / 2:
            motion = "grow"
            speed = "fast" if growth > np.sqrt(GROWTH["slow"] * GROWTH["fast"]) else "slow"
        else:
            motion, speed = "still", None
        return {
            "shape": shape,
            "size": size,
            "motion": motion,
            "speed": speed,
            "position": self._world.region(float(x0), float(y0)),
            "_area": float(a.mean()),
        }

