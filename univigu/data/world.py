"""The toy video world: coloured shapes that move, with prompts, detailed captions and a parser.

It is both the training data and the measuring instrument of the project, so everything in
it is exact and deterministic: sample `i` of a split is a pure function of (seed, split, i),
rendering is vectorised over a batch, and every caption parses back to its attributes.

A scene has a background colour and one or two objects. Each object has a shape, a colour,
a size, a motion, a speed (None when it stays still) and a start position (a cell of a 3x3
grid). Objects never touch, so the oracle can always recover them from pixels.
"""

from __future__ import annotations

import functools
import itertools
import numbers
import re
import types
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from univigu.checks import check_int

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (190, 60, 220),
    "cyan": (40, 210, 230),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (100, 100, 100),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
MOTIONS = ("left", "right", "up", "down", "grow", "still")
SPEEDS = ("slow", "fast")
POSITIONS = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)  # fmt: skip
ATTRIBUTES = ("colour", "shape", "size", "motion", "speed", "position")
SPLITS = {"train": 0, "val": 1, "test": 2, "heldout": 3}

# Geometry, in units of the object radius r. The centre of every shape is its centroid, so
# the oracle's pixel centroid measures it directly.
SIZE_RADIUS = {"small": 0.14, "large": 0.22}  # fraction of min(H, W)
SQUARE_HALF = 0.9  # square half-side
TRIANGLE_TOP, TRIANGLE_BOTTOM = 1.2, 0.6  # apex above, base below the centroid; half-base = 1
SHAPE_AREA = {"circle": np.pi, "square": (2 * SQUARE_HALF) ** 2, "triangle": 0.5 * 2 * 1.8}
TRAVEL = {"slow": 0.25, "fast": 0.5}  # displacement over the clip, fraction of the frame side
GROWTH = {"slow": 1.4, "fast": 1.8}  # radius at the last frame over the first
_DIRECTION = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_GAP = 3.0  # pixels between objects, so blur never merges them
_MARGIN = 0.5  # pixels between an object and the frame's edge
# Rendering holds several bytes per pixel of each video (masks, float intermediates): a video of more
# pixels than this (3 GiB as uint8 RGB) cannot be rendered in memory, so it is refused at configuration.
MAX_VIDEO_PIXELS = 2**30

DEFAULT_HELDOUT: tuple[dict[str, str], ...] = (
    {"colour": "red", "shape": "triangle"},
    {"colour": "blue", "shape": "circle"},
    {"shape": "square", "motion": "grow"},
)


@dataclass(frozen=True)
class WorldConfig:
    """Size of the videos and the held-out attribute combinations."""

    height: int = 32
    width: int = 32
    frames: int = 16
    two_object_prob: float = 0.5
    heldout: tuple[dict[str, str], ...] = DEFAULT_HELDOUT

    def __post_init__(self) -> None:
        for name, minimum in (("height", 16), ("width", 16), ("frames", 2)):  # stored as int: numpy ints overflow
            object.__setattr__(self, name, check_int(f"WorldConfig.{name}", getattr(self, name), minimum))
        if self.frames * self.height * self.width > MAX_VIDEO_PIXELS:
            raise ValueError(f"WorldConfig {self.frames}x{self.height}x{self.width} (frames x height x width) has more "
                             f"than {MAX_VIDEO_PIXELS} pixels per video, too many to render in memory")  # fmt: skip
        too_big = _object_too_big(self.height, self.width)
        if too_big is not None:  # else sampling scenes fails mid-run
            fits = next(n for n in itertools.count(min(self.height, self.width) + 1)
                        if _object_too_big(max(self.height, n), max(self.width, n)) is None)  # fmt: skip
            raise ValueError(f"WorldConfig {self.height}x{self.width} (height x width): a {too_big} object does not "
                             f"fit the frame; every object fits {max(self.height, fits)}x{max(self.width, fits)}")
        p = self.two_object_prob
        if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0 <= p <= 1:  # NaN fails the range too
            raise ValueError(f"WorldConfig.two_object_prob must be a probability in [0, 1], got {p!r}")
        if not isinstance(self.heldout, (tuple, list)) or not all(isinstance(c, Mapping) and c for c in self.heldout):
            raise TypeError(f"WorldConfig.heldout must be a sequence of non-empty dicts like "
                            f"{DEFAULT_HELDOUT[0]}, got {self.heldout!r:.200}")  # fmt: skip
        for combo in self.heldout:
            for key, value in combo.items():
                if key not in ATTRIBUTES or value not in _VALUES[key]:
                    raise ValueError(f"held-out combination {combo} names unknown {key}={value!r}")
        object.__setattr__(self, "heldout", tuple(dict(c) for c in self.heldout))


_VALUES: dict[str, Sequence[Any]] = {
    "colour": tuple(OBJECT_COLOURS),
    "shape": SHAPES,
    "size": SIZES,
    "motion": MOTIONS,
    "speed": SPEEDS + (None,),
    "position": POSITIONS,
}


@dataclass(frozen=True)
class WorldObject:
    colour: str
    shape: str
    size: str
    motion: str
    speed: str | None
    position: str
    x: float  # start centre, pixels
    y: float

    def attributes(self) -> dict[str, str | None]:
        return {key: getattr(self, key) for key in ATTRIBUTES}


@dataclass(frozen=True)
class Scene:
    """One world sample: background, objects (the first is the main one) and caption style."""

    background: str
    objects: tuple[WorldObject, ...]
    style: tuple[int, ...] = field(default=(0, 0, 0, 0))  # phrasing variants, drawn with the scene

    def attributes(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [o.attributes() for o in self.objects]}

    @property
    def prompt(self) -> str:
        """Short prompt: the main object and its motion, e.g. "a red circle moves right"."""
        main = self.objects[0]
        return f"a {main.colour} {main.shape} {_short_motion(main.motion)}"

    @property
    def caption(self) -> str:
        """Detailed caption naming every attribute of every object and the background."""
        object_style, motion_style, background_style, order = self.style
        sentences = [
            _object_sentence(obj, (object_style + k) % 3, (motion_style + k) % 3)
            for k, obj in enumerate(self.objects)
        ]
        background = _BACKGROUND_SENTENCES[background_style].format(bg=self.background)
        sentences = [background] + sentences if order else sentences + [background]
        return " ".join(sentences)


def _short_motion(motion: str) -> str:
    if motion == "grow":
        return "grows"
    if motion == "still":
        return "stays still"
    return f"moves {motion}"


_BACKGROUND_SENTENCES = (
    "the background is {bg}.",
    "everything is on a {bg} background.",
    "the scene has a {bg} background.",
)
_ADVERB = {"slow": "slowly", "fast": "quickly"}


def _motion_phrase(obj: WorldObject, style: int) -> str:
    if obj.motion == "still":
        return ("stays still", "does not move", "stays in place")[style]
    adverb = _ADVERB[obj.speed]
    verb = "grows" if obj.motion == "grow" else f"moves {obj.motion}"
    if style == 1:
        return f"{adverb} {verb}"
    if style == 2:
        verb = "gets bigger" if obj.motion == "grow" else f"slides {obj.motion}"
    return f"{verb} {adverb}"


def _object_sentence(obj: WorldObject, style: int, motion_style: int) -> str:
    noun = f"a {obj.size} {obj.colour} {obj.shape}"
    motion = _motion_phrase(obj, motion_style)
    moving = obj.motion in _DIRECTION
    where = f"{'from' if moving else 'at'} the {obj.position}"
    if style == 0:
        return f"{noun} {motion} {where}."
    if style == 1:
        return f"{where}, {noun} {motion}."
    return f"there is {noun} {'starting at' if moving else 'in'} the {obj.position} that {motion}."


def vocabulary() -> list[str]:
    """Every word and punctuation mark the prompts and captions can contain."""
    words = set(OBJECT_COLOURS) | set(BACKGROUNDS) | set(SHAPES) | set(SIZES) | set(MOTIONS)
    words |= {w for p in POSITIONS for w in p.split()}
    for template in (
        *_BACKGROUND_SENTENCES,
        "a moves grows stays still does not move in place slowly quickly slides gets bigger",
        "from at the there is starting that , .",
    ):
        words |= set(tokenize_caption(template.replace("{bg}", "")))
    return sorted(words)


# ---------------------------------------------------------------------------------------
# Sampling scenes
# ---------------------------------------------------------------------------------------


class World:
    """Samples scenes deterministically and renders them in batches.

    >>> world = World(WorldConfig())
    >>> scenes = world.scenes("train", range(4), seed=0)
    >>> videos = world.render(scenes)  # uint8 [4, 16, 32, 32, 3]
    """

    def __init__(self, config: WorldConfig | None = None) -> None:
        if config is not None and not isinstance(config, WorldConfig):
            raise TypeError(f"World takes a WorldConfig (or None for the default), got {type(config).__name__} "
                            f"{config!r:.80}")  # fmt: skip
        self.config = config or WorldConfig()

    @classmethod
    def sized_like(cls, config: Any) -> "World":
        """The world at the video size of `config` (anything with frames, height, width: a PipelineConfig)."""
        return cls(WorldConfig(height=config.height, width=config.width, frames=config.frames))

    def is_heldout(self, obj: dict[str, Any] | WorldObject) -> bool:
        """True for an object (or its attributes) that matches one of the held-out attribute combinations."""
        attrs = obj.attributes() if isinstance(obj, WorldObject) else obj
        return any(all(attrs.get(k) == v for k, v in c.items()) for c in self.config.heldout)

    def scene(self, split: str, index: int, seed: int = 0) -> Scene:
        """Scene `index` of `split` ("train", "val", "test", "heldout"): the same for the same (split, index, seed)."""
        if not isinstance(split, str) or split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
        if split == "heldout" and not self.config.heldout:
            raise ValueError("the heldout split needs held-out combinations; this world's config has none")
        # One independent stream per (seed, split, index): splits never share randomness.
        rng = np.random.default_rng([check_int("seed", seed, 0), SPLITS[split], check_int("index", index, 0)])
        return self._sample_scene(rng, heldout=split == "heldout")

    def scenes(self, split: str, indices: Iterable[int], seed: int = 0) -> list[Scene]:
        """`scene` for each index."""
        return [self.scene(split, i, seed) for i in indices]

    def render(self, scenes: Sequence[Scene]) -> np.ndarray:
        """Render scenes to uint8 videos `[N, T, H, W, 3]`."""
        return render_videos(scenes, self.config)

    def _sample_scene(self, rng: np.random.Generator, heldout: bool) -> Scene:
        cfg = self.config
        background = _pick(rng, tuple(BACKGROUNDS))
        n_objects = 2 if rng.random() < cfg.two_object_prob else 1
        while True:
            objects: list[WorldObject] = []
            for k in range(n_objects):
                used = {o.colour for o in objects}
                obj = self._sample_object(rng, used, objects, main_heldout=heldout and k == 0)
                if obj is None:
                    break
                objects.append(obj)
            else:
                style = tuple(int(v) for v in rng.integers(0, 3, size=3)) + (int(rng.integers(2)),)
                return Scene(background, tuple(objects), style)

    def _sample_object(
        self,
        rng: np.random.Generator,
        used_colours: set[str],
        others: list[WorldObject],
        main_heldout: bool,
    ) -> WorldObject | None:
        cfg = self.config
        other_boxes = [_swept_box(o.attributes(), cfg) + np.array([o.x, o.x, o.y, o.y]) for o in others]
        for _ in range(50):
            attrs = {
                "colour": _pick(rng, [c for c in OBJECT_COLOURS if c not in used_colours]),
                "shape": _pick(rng, SHAPES),
                "size": _pick(rng, SIZES),
                "motion": _pick(rng, MOTIONS),
            }
            if main_heldout:
                combo = cfg.heldout[int(rng.integers(len(cfg.heldout)))]
                if combo.get("colour") in used_colours:
                    continue
                attrs.update(combo)
            attrs["speed"] = None if attrs["motion"] == "still" else _pick(rng, SPEEDS)
            # Held-out combinations only ever appear as the main object of the heldout split.
            if not main_heldout and self.is_heldout(attrs):
                continue
            start = self._sample_start(rng, attrs, other_boxes)
            if start is not None:
                x, y = start
                return WorldObject(position=self.region(x, y), x=x, y=y, **attrs)
        return None

    def _sample_start(
        self, rng: np.random.Generator, attrs: dict[str, Any], other_boxes: list[np.ndarray]
    ) -> tuple[float, float] | None:
        cfg = self.config
        H, W = cfg.height, cfg.width
        left, right, top, bottom = _swept_box(attrs, cfg)  # around the start centre
        x_lo, x_hi, y_lo, y_hi = _MARGIN - left, W - _MARGIN - right, _MARGIN - top, H - _MARGIN - bottom
        if x_lo > x_hi or y_lo > y_hi:
            raise ValueError(f"a {attrs} object does not fit a {H}x{W} frame")
        # Draw candidates at once and keep the first valid one: vectorised rejection.
        xs, ys = rng.uniform(x_lo, x_hi, 64), rng.uniform(y_lo, y_hi, 64)
        # Start positions stay clear of the 3x3 grid lines, so the region is unambiguous.
        ok = ~(_near_grid_line(xs, W) | _near_grid_line(ys, H))
        for o_left, o_right, o_top, o_bottom in other_boxes:
            # Objects never cross paths: the boxes they sweep over the clip stay apart.
            ok &= ((xs + right + _GAP <= o_left) | (xs + left >= o_right + _GAP)
                   | (ys + bottom + _GAP <= o_top) | (ys + top >= o_bottom + _GAP))  # fmt: skip
        hits = np.flatnonzero(ok)
        return (float(xs[hits[0]]), float(ys[hits[0]])) if len(hits) else None

    def region(self, x: float, y: float) -> str:
        """Name of the 3x3 grid cell that contains the point (x, y) in pixels."""
        col = min(int(3 * x / self.config.width), 2)
        row = min(int(3 * y / self.config.height), 2)
        return POSITIONS[3 * row + col]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _extent(shape: str) -> tuple[float, float, float, float]:
    """Half-extents (left, right, top, bottom) of a shape around its centre, in radii."""
    if shape == "square":
        return (SQUARE_HALF,) * 4
    if shape == "triangle":
        return 1.0, 1.0, TRIANGLE_TOP, TRIANGLE_BOTTOM
    return 1.0, 1.0, 1.0, 1.0


def _displacement(motion: str, speed: str | None, H: int, W: int) -> tuple[float, float]:
    if motion not in _DIRECTION:
        return 0.0, 0.0
    ux, uy = _DIRECTION[motion]
    return ux * TRAVEL[speed] * W, uy * TRAVEL[speed] * H


def _near_grid_line(v: np.ndarray, side: int, clearance: float = 0.04) -> np.ndarray:
    return (np.abs(v - side / 3) < clearance * side) | (np.abs(v - 2 * side / 3) < clearance * side)


@functools.lru_cache(maxsize=8)
def _clip_times(frames: int) -> np.ndarray:
    """Frame times in [0, 1], `[T]`."""
    return np.linspace(0.0, 1.0, frames)


def _tracks(attrs: dict[str, Any], x: float, y: float, cfg: WorldConfig):
    """Centre and radius per frame: three arrays `[T]`."""
    f = _clip_times(cfg.frames)
    dx, dy = _displacement(attrs["motion"], attrs["speed"], cfg.height, cfg.width)
    radius = SIZE_RADIUS[attrs["size"]] * min(cfg.height, cfg.width)
    growth = GROWTH[attrs["speed"]] if attrs["motion"] == "grow" else 1.0
    return x + dx * f, y + dy * f, radius * (1 + (growth - 1) * f)


def _object_too_big(height: int, width: int) -> dict[str, Any] | None:
    """The first object (shape, size, motion, speed) that cannot sweep its clip inside a frame of this size, or None:
    objects scale with the frame, but the margin and the pixel grid do not."""
    frame = types.SimpleNamespace(height=height, width=width, frames=2)  # the sweep's extremes: first and last frame
    for shape, size, motion in itertools.product(SHAPES, SIZES, MOTIONS):
        for speed in (None,) if motion == "still" else SPEEDS:
            attrs = {"shape": shape, "size": size, "motion": motion, "speed": speed}
            left, right, top, bottom = _swept_box(attrs, frame)
            if right - left > width - 2 * _MARGIN or bottom - top > height - 2 * _MARGIN:
                return attrs
    return None


def _swept_box(attrs: dict[str, Any], cfg: WorldConfig) -> np.ndarray:
    """Box (left, right, top, bottom) an object covers over the clip, relative to its start centre."""
    cx, cy, r = _tracks(attrs, 0.0, 0.0, cfg)
    left, right, top, bottom = _extent(attrs["shape"])
    return np.array([(cx - left * r).min(), (cx + right * r).max(),
                     (cy - top * r).min(), (cy + bottom * r).max()])  # fmt: skip


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------


def render_videos(scenes: Sequence[Scene], config: WorldConfig | None = None) -> np.ndarray:
    """Render scenes to uint8 videos `[N, T, H, W, 3]`, vectorised over the batch.

    The array is a channel-first view (`[N, 3, T, H, W]` in memory, the layout models take);
    use `np.ascontiguousarray` where a channel-last buffer is needed.
    """
    cfg = config or WorldConfig()
    N, T, H, W = len(scenes), cfg.frames, cfg.height, cfg.width
    masks = np.zeros((2, N, T, H, W), dtype=bool)  # one per object slot; objects never overlap
    palette = np.zeros((N, 3, 3), dtype=np.uint8)  # background, object 1, object 2
    xs = np.arange(W, dtype=np.float32) + 0.5  # pixel centres
    ys = np.arange(H, dtype=np.float32) + 0.5
    for n, scene in enumerate(scenes):
        palette[n, 0] = BACKGROUNDS[scene.background]
        for k, obj in enumerate(scene.objects):
            palette[n, k + 1] = OBJECT_COLOURS[obj.colour]
    for k in range(2):
        for shape in SHAPES:
            idx = [n for n, s in enumerate(scenes) if len(s.objects) > k and s.objects[k].shape == shape]
            if not idx:
                continue
            objs = [scenes[n].objects[k] for n in idx]
            tracks = [_tracks(o.attributes(), o.x, o.y, cfg) for o in objs]
            cx, cy, r = (np.asarray(a, dtype=np.float32)[:, :, None, None] for a in zip(*tracks))
            dx = xs[None, None, None, :] - cx  # [n, T, 1, W]
            dy = ys[None, None, :, None] - cy  # [n, T, H, 1]
            # Each test compares a row term with a column term, so only one op is full-size.
            if shape == "circle":
                masks[k, idx] = dx * dx <= r * r - dy * dy
            elif shape == "square":
                masks[k, idx] = (np.abs(dx) <= SQUARE_HALF * r) & (np.abs(dy) <= SQUARE_HALF * r)
            else:  # apex up: the half-width grows linearly from 0 at the apex to r at the base
                reach = np.where(dy <= TRIANGLE_BOTTOM * r, dy + TRIANGLE_TOP * r, -np.inf)
                masks[k, idx] = np.abs(dx) * (TRIANGLE_TOP + TRIANGLE_BOTTOM) <= reach
    # Colour by uint8 arithmetic, channel-first so the broadcasts run over contiguous pixels:
    # background + mask1 * (colour1 - background) + mask2 * (colour2 - background), mod 256.
    background = palette[:, 0].reshape(N, 3, 1, 1, 1)
    delta = (palette[:, 1:] - palette[:, :1]).reshape(N, 2, 3, 1, 1, 1)
    video = masks[0].view(np.uint8)[:, None] * delta[:, 0]
    video += masks[1].view(np.uint8)[:, None] * delta[:, 1]
    video += background
    return video.transpose(0, 2, 3, 4, 1)  # [N, T, H, W, 3], channel-first in memory


def degrade(
    videos: np.ndarray, noise_std: float = 0.0, blur: int = 0, seed: int = 0
) -> np.ndarray:
    """Blur (box filter of size `blur` in space) then add Gaussian noise (std in 0..1 units).

    videos: uint8 `[..., T, H, W, 3]`; returns uint8 of the same shape.
    """
    from scipy.ndimage import uniform_filter

    x = videos.astype(np.float32) / 255.0
    if blur > 1:
        size = [1] * (x.ndim - 3) + [blur, blur, 1]
        x = uniform_filter(x, size=size, mode="nearest")
    if noise_std > 0:
        x = x + np.random.default_rng(seed).normal(0.0, noise_std, x.shape).astype(np.float32)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Parsing captions back into attributes
# ---------------------------------------------------------------------------------------

_POSITION_WORDS = {"top", "middle", "bottom", "left", "center", "right"}
_MOTION_VERBS = {"moves", "slides", "goes", "drifts"}
_SPEED_WORDS = {"slowly": "slow", "slow": "slow", "quickly": "fast", "fast": "fast"}


def tokenize_caption(text: str) -> list[str]:
    """A caption's words and punctuation (lower case), as the parser reads it and the caption scores compare it."""
    return re.findall(r"[a-z]+|[.,]", text.lower())


def parse_caption(text: str) -> dict[str, Any]:
    """Turn a (possibly generated, possibly garbled) caption back into attributes.

    Tolerant: unknown words are ignored; an attribute the text does not state is None (and
    so counts as wrong). Objects are anchored on shape words; colour and size are read before
    the shape, motion, speed and position in the rest of the clause.
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__} {text!r:.80}")
    words = tokenize_caption(text)
    background = None
    for i, word in enumerate(words):
        if word == "background":
            window = [w for w in words[max(0, i - 2) : i + 3] if w in BACKGROUNDS]
            if window:
                background = window[0]
                break
    objects = []
    sentence_start = 0
    for end in [i for i, w in enumerate(words) if w == "."] + [len(words)]:
        sentence = words[sentence_start:end]
        sentence_start = end + 1
        anchors = [i for i, w in enumerate(sentence) if w in SHAPES]
        for j, anchor in enumerate(anchors):
            start = anchors[j - 1] + 1 if j else 0
            stop = anchors[j + 1] if j + 1 < len(anchors) else len(sentence)
            objects.append(_parse_object(sentence, start, anchor, stop))
    return {"background": background, "objects": objects}


def _parse_object(words: list[str], start: int, anchor: int, stop: int) -> dict[str, Any]:
    before, after = words[start:anchor], words[anchor + 1 : stop]
    clause = before + after
    obj: dict[str, Any] = {key: None for key in ATTRIBUTES}
    obj["shape"] = words[anchor]
    obj["colour"] = next((w for w in reversed(before) if w in OBJECT_COLOURS), None)
    obj["size"] = next((w for w in reversed(before) if w in SIZES), None)
    for i, word in enumerate(clause):
        prev = clause[i - 1] if i else ""
        if word in ("grows", "bigger"):
            obj["motion"] = "grow"
        elif word == "still" or (word == "place" and prev == "in") or (word == "move" and prev == "not"):
            obj["motion"] = "still"
        elif word in _DIRECTION and (prev in _MOTION_VERBS or word in ("up", "down")):
            obj["motion"] = word
        elif word in _SPEED_WORDS:
            obj["speed"] = _SPEED_WORDS[word]
        elif word == "the":
            span = []
            for nxt in clause[i + 1 :]:
                if nxt not in _POSITION_WORDS:
                    break
                span.append(nxt)
            if " ".join(span) in POSITIONS:
                obj["position"] = " ".join(span)
    return obj


def attribute_matches(true: dict[str, Any], pred: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Per-attribute (correct, total) of `pred` against `true` scene attributes.

    Objects are matched by colour (unique within a scene); a true object with no predicted
    object of its colour gets every attribute wrong. The object count is an attribute too,
    so hallucinated objects cost accuracy.
    """
    scores = {"background": (int(pred.get("background") == true["background"]), 1)}
    scores["count"] = (int(len(pred.get("objects", [])) == len(true["objects"])), 1)
    for key in ATTRIBUTES:
        scores[key] = (0, 0)
    for obj in true["objects"]:
        match = next((p for p in pred.get("objects", []) if p.get("colour") == obj["colour"]), None)
        for key in ATTRIBUTES:
            right = match is not None and match.get(key) == obj[key]
            correct, total = scores[key]
            scores[key] = (correct + int(right), total + 1)
    return scores


def accuracy(scores: Iterable[dict[str, tuple[int, int]]]) -> dict[str, float]:
    """Aggregate `attribute_matches` results: accuracy per attribute and overall ("all")."""
    totals: dict[str, list[int]] = {}
    for score in scores:
        for key, (correct, total) in score.items():
            acc = totals.setdefault(key, [0, 0])
            acc[0] += correct
            acc[1] += total
    if not totals:  # 0% of nothing would read as a measured failure
        raise ValueError("accuracy() got no scores: pass at least one attribute_matches result")
    out = {k: c / t for k, (c, t) in totals.items() if t}
    out["all"] = sum(c for c, _ in totals.values()) / max(1, sum(t for _, t in totals.values()))
    return out
