"""Stage configs: the YAML that describes a training stage, checked field by field when it is loaded (a wrong
name, type or size is an error naming the key, before any model is built).

A stage is `base`, `recall` or `refine` (see `stages`); `load_config(path, overrides)` reads one, with
`key.sub=value` overrides as the CLI passes them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from univigu.data.dataset import WorldDataset, collate
from univigu.data.latent_cache import LatentCacheDataset, collate_latents
from univigu.data.tokenizer import build_world_tokenizer
from univigu.data.world import OBJECT_COLOURS, MOTIONS, SHAPES, Scene, WorldConfig, WorldObject
from univigu.flow.regimes import RegimeMix
from univigu.flow.text import TextFlow
from univigu.flow.video import PREDICTIONS, VideoFlow
from univigu.models.transformer import ATTENTION_LAYOUTS
from univigu.pipelines.pipeline import PipelineConfig, check_pipeline_folder, is_wan_release
from univigu.training.trainer import TrainerConfig

__all__ = ["STAGES", "FlowConfig", "StageConfig", "load_config"]

STAGES = ("base", "recall", "refine")
# the base generator's sizes a config must give: WanTransformer3DModel's defaults for them are Wan2.1-14B's
_BASE_SIZES = ("attention_head_dim", "ffn_dim", "num_attention_heads", "num_layers", "text_dim")


@dataclass
class FlowConfig:
    time_sampling: str = "uniform"  # video noise levels: "uniform" or "logit-normal"
    train_shift: float = 1.0  # shift applied to the sampled training noise levels
    # the discrete text flow: "uniform" or "mask" source, kappa(t) = t^exponent; None: the previous stage's
    # pipeline's (a generator's: uniform, 1), so a refine stage keeps the source its recall trained with
    text_source: str | None = None
    text_exponent: float | None = None
    text_loss: str = "ce"  # "ce" or "gkl"
    video_loss: str = "velocity"  # where the video error is measured: "velocity", "sample" (x0) or "edm"

    def __post_init__(self) -> None:
        # checked with the config: each name otherwise fails only once the model is built, with a traceback
        names = {"time_sampling": (_choices(VideoFlow, "time_sampling"), False),
                 "text_source": (_choices(TextFlow, "source"), True),
                 "text_loss": (_choices(TextFlow.loss, "kind"), False), "video_loss": (PREDICTIONS, False)}  # fmt: skip
        for name, (valid, inherits) in names.items():
            value = getattr(self, name)
            if not (value in valid or (inherits and value is None)):
                either = " or null (the previous stage's)" if inherits else ""
                raise ValueError(f"{name} must be one of {valid}{either}, got {value!r}")
        if self.train_shift <= 0:  # VideoFlow's own check comes only once the model is built
            raise ValueError(f"train_shift must be > 0, got {self.train_shift!r}")
        if self.text_exponent is not None and self.text_exponent <= 0:
            raise ValueError(f"text_exponent must be > 0 or null (the previous stage's), got {self.text_exponent!r}")


def _choices(owner: Any, name: str) -> tuple[str, ...]:
    """The values of the `Literal[...]` annotation of `owner`'s field or argument `name`."""
    return typing.get_args(typing.get_type_hints(owner)[name])


@dataclass
class StageConfig:
    stage: str = "base"
    init_from: str | None = None  # pipeline folder of the previous stage (recall, refine)
    dataset_size: int = 1_000_000  # world samples the sampler cycles through
    data_seed: int = 0
    # training data: {} or {kind: world} (the toy world, rendered on the fly), or {kind: latent_cache,
    # path: DIR, bucket: "HxW" (needed when the cache has several)}: a `univigu cache-latents` folder (recall /
    # refine stages)
    data: dict[str, Any] = field(default_factory=dict)
    world: dict[str, Any] = field(default_factory=dict)  # WorldConfig fields
    model: dict[str, Any] = field(default_factory=dict)  # base: WanTransformer3DModel config
    prompt_encoder: dict[str, Any] = field(default_factory=dict)  # base: PromptEncoder config
    pipeline: dict[str, Any] = field(default_factory=dict)  # PipelineConfig fields (sampling defaults)
    flow: FlowConfig = field(default_factory=FlowConfig)
    mix: dict[str, float] = field(default_factory=dict)  # RegimeMix fields
    text_target: str = "prompt"  # recall: "prompt"; refine: "caption"
    trainable: str = "all"  # "all" or "text" (shared Wan weights frozen)
    # recall from a base generator: "generator" (its weights) or "scratch" (its architecture, fresh weights)
    init: str = "generator"
    text_ffn: str = "expert"  # recall from a base generator: "expert" (MoE) or "shared" (the video FFN)
    # "full" or "video_prefix" (clean video ignores the text: cached V2T); None: "full" from a generator,
    # else the previous stage's
    attention_layout: str | None = None
    video_weight: float = 1.0
    text_weight: float = 1.0
    train: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.stage != "base" and not self.init_from:
            raise ValueError(f"stage {self.stage!r} needs init_from: the previous stage's pipeline folder")
        if self.trainable not in ("all", "text"):
            raise ValueError(f"trainable must be 'all' or 'text', got {self.trainable!r}")
        if self.init not in ("generator", "scratch"):
            raise ValueError(f"init must be 'generator' or 'scratch', got {self.init!r}")
        if self.attention_layout not in (None, *ATTENTION_LAYOUTS):
            raise ValueError(f"attention_layout must be one of {ATTENTION_LAYOUTS}, got {self.attention_layout!r}")
        world = _build(WorldConfig, self.world, "world.")
        self.model = _model_config(self.model)
        pipeline = _build(PipelineConfig, self.pipeline, "pipeline.")
        self.pipeline = {key: getattr(pipeline, key) for key in self.pipeline}  # "1e-3" read as a number
        if self.stage == "base":  # later stages take their sizes from init_from's pipeline
            missing = [f"model.{key}" for key in _BASE_SIZES if key not in self.model]
            if missing:  # diffusers' defaults are Wan2.1-14B's: built on the toy world, killed for memory unexplained
                raise ValueError(f"model: the base generator's sizes are missing ({', '.join(missing)}), and "
                                 "diffusers' defaults are Wan2.1-14B's (14.3B parameters); give them, or start from "
                                 "univigu/configs/toy/base.yaml")  # fmt: skip
            _check_base_sizes(world, self.model, pipeline)
        mix = _build(RegimeMix, self.mix, "mix.")
        self.mix = {key: getattr(mix, key) for key in self.mix}  # "1e-1" read as a number
        kind = self.data.get("kind", "world")
        if kind not in ("world", "latent_cache"):
            raise ValueError(f"data.kind must be 'world' or 'latent_cache', got {kind!r}")
        _reject_unknown(self.data, ["kind", "path", "bucket"] if kind == "latent_cache" else ["kind"], "data.")
        if kind == "latent_cache" and (self.stage == "base" or "path" not in self.data):
            raise ValueError("data.kind latent_cache needs data.path and a recall/refine stage (init_from: a Wan2.1 "
                             "diffusers folder or a unified pipeline)")  # fmt: skip

    def check_inputs(self) -> None:
        """Raise FileNotFoundError when what the stage reads is not on disk: `init_from` (a pipeline folder or a
        Wan2.1 diffusers folder, each with a model_index.json) and a latent cache (its index.json). Separate from
        validation, so that a config can be loaded before the stage it starts from has run (train-all)."""
        if self.init_from is not None and not (Path(self.init_from) / "model_index.json").is_file():
            raise FileNotFoundError(f"init_from {self.init_from}: no model_index.json there (the previous stage's "
                                    "`final` folder, or a Wan2.1 diffusers folder)")  # fmt: skip
        if self.init_from is not None and not is_wan_release(self.init_from):
            try:
                check_pipeline_folder(Path(self.init_from))
            except (FileNotFoundError, ValueError) as error:
                raise type(error)(f"init_from: {error}") from None
        self.check_data()
        if self.data.get("kind") != "latent_cache" and self.stage != "base" and self.init_from is not None:
            self._check_world_fits(Path(self.init_from) / "model_index.json")

    def check_data(self) -> None:
        """The part of `check_inputs` that needs no `init_from` (train-all checks every stage's before the first
        trains): an unfinished latent cache or a bucket it lacks (`CacheError` naming the buckets), or fewer videos
        than one step takes."""
        if self.data.get("kind") == "latent_cache":
            try:
                cache = self.dataset()[0]
            except FileNotFoundError as error:
                raise FileNotFoundError(f"data.path: {error}") from None
            self._check_holds_a_batch(len(cache), f"bucket {cache.bucket!r} of {self.data['path']}")
        else:
            self._check_holds_a_batch(self.dataset_size, "dataset_size")

    def _check_holds_a_batch(self, videos: int, what: str) -> None:
        """Each step takes train.batch_size videos on every process (WORLD_SIZE, set by the launcher)."""
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if videos < self.train.batch_size * processes:
            raise ValueError(f"{what} holds {videos} videos, fewer than one step takes (train.batch_size "
                             f"{self.train.batch_size} x {processes} processes): lower train.batch_size, or "
                             "train on more videos")  # fmt: skip

    def dataset(self) -> tuple[Any, Any]:
        """(dataset, collate_fn) of the stage's data source: the toy world rendered on the fly, or a latent cache."""
        if self.data.get("kind") == "latent_cache":
            prompt_length = self.pipeline.get("prompt_length", 512)
            return LatentCacheDataset(self.data["path"], self.data.get("bucket"), prompt_length), collate_latents
        return (WorldDataset("train", size=self.dataset_size, seed=self.data_seed, config=WorldConfig(**self.world)),
                collate)  # fmt: skip

    def _check_world_fits(self, index_file: Path) -> None:
        """Toy-world data for a stage that starts from a pipeline: the world's videos have the pipeline's size (the
        model would train on one size and export another), and its prompts fit the prompt and text canvases (both
        otherwise fail mid-run)."""
        made = json.loads(index_file.read_text()).get("config")
        if made is None:  # a Wan2.1 folder: its VAE and umT5 are not the toy world's codec and prompt encoder
            raise ValueError(f"init_from {self.init_from} is a Wan2.1 folder, and the stage trains on the toy world "
                             "(data.kind world): cache your videos with `univigu cache-latents` and train on them "
                             "(data: {kind: latent_cache, path: CACHE}; univigu/configs/wan/)")  # fmt: skip
        differ = self.world_size_mismatch(made)
        if differ:
            sizes = "; ".join(f"world.{k} {ours} vs {theirs}" for k, (ours, theirs) in differ.items())
            raise ValueError(f"the world's videos are not the size of {self.init_from}'s pipeline ({sizes}): set "
                             "world.frames / height / width to the pipeline's")  # fmt: skip
        merged = {**made, **self.pipeline}
        for key in ("prompt_length", "text_length"):
            if key in merged:
                _check_holds_world_prompts(f"pipeline.{key}", merged[key])

    def world_size_mismatch(self, made: dict[str, Any]) -> dict[str, tuple[int, int]]:
        """{size key: (the world's, the pipeline's)} for each of frames / height / width where this stage's world
        makes videos of another size than the pipeline it trains: `made` (the config of the pipeline it starts
        from) with this stage's pipeline.* on top."""
        merged, world = {**made, **self.pipeline}, WorldConfig(**self.world)
        return {k: (getattr(world, k), merged[k]) for k in ("frames", "height", "width")
                if k in merged and merged[k] != getattr(world, k)}  # fmt: skip


def _build(cls, data: dict[str, Any], where: str):
    """A dataclass from a dict, its values checked against the field types, rejecting unknown keys by name."""
    _reject_unknown(data, [f.name for f in dataclasses.fields(cls)], where)
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(value, hints[key], f"{where}{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as error:  # a section's own checks name the field, not the section
        if not where:
            raise
        raise ValueError(f"{where}{error}") from None


def _reject_unknown(data: dict[str, Any], valid: list[str], where: str) -> None:
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"unknown config keys {[f'{where}{k}' for k in unknown]}; valid: {sorted(valid)}")


_NO = object()  # `_as`: the value is not of that type
_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), type(None): ("null", "nulls")}  # fmt: skip


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` as the field type `hint`, else a ValueError naming the field and what it takes. Strict: a bool is
    not an int (`batch_size: true`), a float not an int; YAML 1.1 leaves numbers like "1e-3" strings, so a
    numeric string is read as the number."""
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for kind in kinds:
        result = _as(value, kind, name)
        if result is not _NO:
            return result
    raise ValueError(f"{name} must be {' or '.join(_describe(k) for k in kinds)}, got {value!r}")


def _as(value: Any, kind: Any, name: str) -> Any:
    """`value` as the type `kind`, or `_NO`."""
    origin = typing.get_origin(kind)
    if kind in (bool, str, type(None)):
        return value if type(value) is kind else _NO
    if kind in (int, float):
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                return _NO
        numeric = type(value) is int or (kind is float and type(value) is float)
        return kind(value) if numeric else _NO
    if origin is tuple:
        args = typing.get_args(kind)
        if not isinstance(value, (list, tuple)):
            return _NO
        item_kinds = [args[0]] * len(value) if args[-1] is Ellipsis else args
        items = [_as(v, k, name) for v, k in zip(value, item_kinds)]
        return _NO if len(item_kinds) != len(value) or any(i is _NO for i in items) else tuple(items)
    if kind is dict or origin is dict:
        return value if isinstance(value, dict) else _NO
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, f"{name}.") if isinstance(value, dict) else _NO
    return value  # Any


def _describe(kind: Any) -> str:
    if kind in _NAMES:
        return _NAMES[kind][0]
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        count = "" if args[-1] is Ellipsis else f"{len(args)} "
        return f"a list of {count}{_NAMES.get(args[0], ('', 'values'))[1]}"
    return "a mapping"


def _model_config(model: dict[str, Any]) -> dict[str, Any]:
    """The `model` section checked against WanTransformer3DModel's arguments (the stage sets in/out channels)
    and rope_theta; every number in it is a size, count or scale, so > 0."""
    from diffusers import WanTransformer3DModel

    hints = typing.get_type_hints(WanTransformer3DModel.__init__)
    hints = {k: v for k, v in hints.items() if k not in ("return", "in_channels", "out_channels")}
    hints["rope_theta"] = float
    _reject_unknown(model, list(hints), "model.")
    checked = {key: _coerce(value, hints[key], f"model.{key}") for key, value in model.items()}
    if len(checked.get("patch_size", (1, 1, 1))) != 3:
        raise ValueError(f"model.patch_size must be 3 integers (frames, height, width), got {model['patch_size']!r}")
    for key, value in checked.items():
        numbers = value if isinstance(value, tuple) else (value,)
        if any(type(n) in (int, float) and n <= 0 for n in numbers):
            raise ValueError(f"model.{key} must be > 0, got {value!r}")
    return checked


@functools.cache
def _longest_world_prompt() -> int:
    """Tokens in the world's longest short prompt (every colour, shape and motion)."""
    prompts = [Scene("black", (WorldObject(c, s, "small", m, None, "center", 0.0, 0.0),)).prompt
               for c in OBJECT_COLOURS for s in SHAPES for m in MOTIONS]  # fmt: skip
    return max(len(ids) for ids in build_world_tokenizer()(prompts, add_special_tokens=False)["input_ids"])


def _check_holds_world_prompts(name: str, length: int) -> None:
    """A text canvas of `length` tokens holds the world's longest prompt and its end token: a shorter one fails
    mid-run."""
    longest = _longest_world_prompt()
    if length <= longest:
        raise ValueError(f"{name} {length} is too short for the world's prompts: the longest has {longest} tokens, "
                         f"so it must be >= {longest + 1} (an end token)")  # fmt: skip


def _check_base_sizes(world: WorldConfig, model: dict[str, Any], pipeline: PipelineConfig) -> None:
    """The base model's video patches tile the world's (downsampled) videos, and the prompt canvas holds the
    world's longest prompt (both otherwise fail mid-run)."""
    from diffusers import WanTransformer3DModel

    patch = model.get("patch_size", inspect.signature(WanTransformer3DModel.__init__).parameters["patch_size"].default)
    d = pipeline.pixel_downsample
    sizes = (("world.frames", world.frames, 1), ("world.height", world.height, d), ("world.width", world.width, d))
    for (name, size, down), p in zip(sizes, patch):
        if size % (down * p):
            by = f" x pipeline.pixel_downsample {down}" if down > 1 else ""
            raise ValueError(f"{name} {size} must be a multiple of {down * p} (the model's patch: model.patch_size "
                             f"{list(patch)}{by})")  # fmt: skip
    _check_holds_world_prompts("pipeline.prompt_length", pipeline.prompt_length)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> StageConfig:
    """A stage config from YAML, with `key.sub=value` overrides (values parsed as YAML). `stage` must be given:
    the defaults alone would train a full-size Wan model."""
    # a single string would otherwise be split into one-character overrides
    if not isinstance(overrides, (list, tuple)) or not all(isinstance(item, str) for item in overrides):
        raise TypeError(f'overrides must be a list of "key=value" strings, got {overrides!r:.200}')
    data = _read_yaml(Path(path)) if path else {}
    for item in overrides:
        key, sep, raw = item.lstrip("-").partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        node = data
        *parents, leaf = key.replace("-", "_").split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parents[: depth + 1])} is {node!r}, not a section")
        node[leaf] = _parse_yaml(raw, f"override {item!r}")
    if "stage" not in data:
        raise ValueError(f"{'CONFIG ' + str(path) if path else 'the config'} gives no stage ({', '.join(STAGES)}); "
                         f"start from univigu/configs/toy/{'base' if not data else '<stage>'}.yaml")  # fmt: skip
    return _build(StageConfig, data, "")


def _read_yaml(path: Path) -> dict[str, Any]:
    with open(path) as stream:  # a stream, so that YAML's error marks name the file
        data = _parse_yaml(stream, f"CONFIG {path}")
    if data is None:
        raise ValueError(f"CONFIG {path} is empty; start from univigu/configs/toy/base.yaml")
    if not isinstance(data, dict):
        raise ValueError(f"CONFIG {path} must be a mapping of config keys, got a {type(data).__name__}")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged by PyYAML, may repeat keys
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):  # PyYAML's own error for it
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)  # fmt: skip
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str | typing.TextIO, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:  # a ValueError: the CLI's usage error
        raise ValueError(f"{source} is not valid YAML: {error}") from None
