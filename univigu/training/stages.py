"""The three training stages as YAML configs, and `train_all` which chains them.

    base    a plain Wan text-to-video generator and its prompt encoder (the toy world's
            stand-in for "a pretrained Wan2.1")
    recall  Knowledge Recall: the unified model built from the base with `from_wan`, trained
            on the regime mix with the prompt as the text target
    refine  Capability Refinement: the same, with the detailed caption as the text target

Each stage ends by exporting a pipeline folder (`OUTPUT_DIR/final`, EMA weights when EMA is on)
that the next stage's `init_from` names.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import shutil
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from univigu.data.codec import PixelCodec
from univigu.data.dataset import WorldDataset, collate
from univigu.data.latent_cache import CacheError, LatentCacheDataset, LatentCodec, collate_latents
from univigu.data.tokenizer import TextCanvas, build_world_tokenizer
from univigu.data.world import OBJECT_COLOURS, MOTIONS, SHAPES, Scene, WorldConfig, WorldObject
from univigu.flow.regimes import RegimeMix
from univigu.flow.text import TextFlow
from univigu.flow.video import PREDICTIONS, VideoFlow
from univigu.models.prompt_encoder import PromptEncoder
from univigu.models.transformer import ATTENTION_LAYOUTS, UniViGUTransformer
from univigu.models.wan import set_rope_theta
from univigu.pipelines.pipeline import PipelineConfig, UniViGUPipeline, is_wan_release
from univigu.training import checkpoint as ckpt
from univigu.training.tasks import GeneratorTask, UnifiedTask
from univigu.training.trainer import Trainer, TrainerConfig

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
        if self.data.get("kind") == "latent_cache":
            if not (Path(self.data["path"]) / "index.json").is_file():
                raise FileNotFoundError(f"data.path {self.data['path']}: no index.json there (see univigu "
                                        "cache-latents)")  # fmt: skip
            _dataset(self)  # the bucket: CacheError naming the cache's buckets
        elif self.stage != "base" and self.init_from is not None:
            self._check_world_fits(Path(self.init_from) / "model_index.json")

    def _check_world_fits(self, index_file: Path) -> None:
        """Toy-world data for a stage that starts from a pipeline: the world's videos have the pipeline's size (the
        model would train on one size and export another), and its prompts fit the prompt and text canvases (both
        otherwise fail mid-run)."""
        made = json.loads(index_file.read_text()).get("config")
        if made is None:  # a Wan2.1 folder: its VAE and umT5 are not the toy world's codec and prompt encoder
            raise ValueError(f"init_from {self.init_from} is a Wan2.1 folder, and the stage trains on the toy world "
                             "(data.kind world): cache your videos with `univigu cache-latents` and train on them "
                             "(data: {kind: latent_cache, path: CACHE}; univigu/configs/wan/)")  # fmt: skip
        merged, world = {**made, **self.pipeline}, WorldConfig(**self.world)
        differ = [f"world.{k} {getattr(world, k)} vs {merged[k]}" for k in ("frames", "height", "width")
                  if k in merged and merged[k] != getattr(world, k)]  # fmt: skip
        if differ:
            raise ValueError(f"the world's videos are not the size of {self.init_from}'s pipeline "
                             f"({'; '.join(differ)}): set world.frames / height / width to the pipeline's")  # fmt: skip
        for key in ("prompt_length", "text_length"):
            if key in merged:
                _check_holds_world_prompts(f"pipeline.{key}", merged[key])


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


def build_task(cfg: StageConfig) -> tuple[torch.nn.Module, Any, PipelineConfig]:
    """(task, tokenizer, pipeline config) for a stage; `init_from` is loaded for recall/refine."""
    flow = cfg.flow
    if cfg.stage == "base":
        from diffusers import WanTransformer3DModel

        tokenizer = build_world_tokenizer()
        world = WorldConfig(**cfg.world)
        pipe_cfg = PipelineConfig(frames=world.frames, height=world.height, width=world.width, **cfg.pipeline)
        video_flow = _video_flow(cfg, pipe_cfg)
        model_cfg = dict(cfg.model)
        theta = model_cfg.pop("rope_theta", None)  # not a diffusers argument: set on the built model
        wan = WanTransformer3DModel(in_channels=3, out_channels=3, **model_cfg)
        if theta is not None:
            set_rope_theta(wan, theta)
        prompt_encoder = PromptEncoder(vocab_size=len(tokenizer), max_length=pipe_cfg.prompt_length,
                                       **{"dim": wan.config.text_dim, **cfg.prompt_encoder})  # fmt: skip
        task = GeneratorTask(wan, prompt_encoder, TextCanvas(tokenizer, pipe_cfg.prompt_length), video_flow,
                             cond_dropout=RegimeMix(**cfg.mix).cond_dropout,
                             codec=PixelCodec(pipe_cfg.pixel_downsample))  # fmt: skip
        return task, tokenizer, pipe_cfg

    # A Wan2.1 folder loads as its own generator, so that Knowledge Recall builds the unified model from it
    # below with this stage's options (text_ffn, init, the mask row), as from a toy base generator.
    previous = (UniViGUPipeline.from_wan(cfg.init_from, unified=False) if is_wan_release(cfg.init_from)
                else UniViGUPipeline.from_pretrained(cfg.init_from))  # fmt: skip
    tokenizer = previous.tokenizer
    source = flow.text_source or previous.config.text_source
    exponent = previous.config.text_exponent if flow.text_exponent is None else flow.text_exponent
    pipe_cfg = dataclasses.replace(previous.config, **{**cfg.pipeline, "text_source": source,
                                                       "text_exponent": exponent})  # fmt: skip
    text_canvas = TextCanvas(tokenizer, pipe_cfg.text_length)
    video_flow = _video_flow(cfg, pipe_cfg)  # the parameterization the base was trained with
    needs_row = source == "mask" and tokenizer.mask_token_id is None
    if previous.unified:
        transformer = previous.transformer
        if needs_row and not transformer.config.text_mask_row:
            raise ValueError(f"flow.text_source mask needs a mask token, and neither {cfg.init_from}'s tokenizer nor "
                             "its transformer has one (a mask row is added when Knowledge Recall starts from a "
                             "generator): keep its source, uniform")  # fmt: skip
    else:  # Knowledge Recall starts from the generator, as Uni-ViGU starts from Wan2.1
        wan = previous.transformer
        if cfg.init == "scratch":  # the fresh weights the base stage starts from (the ablation of the prior)
            wan = type(wan).from_config(wan.config)
        transformer = UniViGUTransformer.from_wan(wan, text_vocab_size=len(tokenizer), text_mask_row=needs_row,
                                                  text_ffn=cfg.text_ffn)  # fmt: skip
    if cfg.attention_layout is not None:  # a config switch, no weights: saved with the transformer's config
        transformer.register_to_config(attention_layout=cfg.attention_layout)
    transformer.train()
    transformer.set_trainable(cfg.trainable)
    text_flow = TextFlow(len(tokenizer), source=source, mask_id=text_canvas.mask_id, exponent=exponent)
    task_cls, extra = UnifiedTask, {"codec": previous.codec}  # the video space the previous stage learned
    if cfg.data.get("kind") == "latent_cache":
        cache = _dataset(cfg)[0]
        cache.check_texts(text_canvas)
        made_by, ours = cache.index.get("latent_space"), getattr(previous.codec, "latent_space", None)
        if made_by is not None and ours is not None and made_by != ours():  # caches before it was recorded: trusted
            raise CacheError(f"{cfg.data['path']} holds latents of another VAE than {cfg.init_from}'s (channels or "
                             "normalisation differ): cache the videos again with init_from's Wan folder")  # fmt: skip
        pipe_cfg = dataclasses.replace(pipe_cfg, **dict(zip(("frames", "height", "width"), cache.frame_size)))
        if cache.index["settings"].get("fps"):  # the rate its clips were sampled at: videos play at their speed
            pipe_cfg = dataclasses.replace(pipe_cfg, fps=round(cache.index["settings"]["fps"]))
        task_cls, extra = CachedLatentTask, {"null_states": cache.null_prompt_states()}
    task = task_cls(
        transformer, previous.prompt_encoder, TextCanvas(tokenizer, pipe_cfg.prompt_length), text_canvas,
        video_flow, text_flow, RegimeMix(**cfg.mix), text_target=cfg.text_target,
        video_weight=cfg.video_weight, text_weight=cfg.text_weight, text_loss=flow.text_loss,
        caption_condition=pipe_cfg.caption_condition, guidance_text=pipe_cfg.guidance_text, **extra,
    )  # fmt: skip
    task.export_parts = (previous.prompt_encoder, previous.codec)  # a tuple: not submodules of the task
    return task, tokenizer, pipe_cfg


class CachedLatentTask(UnifiedTask):
    """`UnifiedTask` on a latent cache: the batch holds the VAE latents ("video") and the prompt states
    ("prompt_states"), so neither the VAE nor the prompt encoder runs (the encoder is not even held)."""

    def __init__(self, transformer, prompt_encoder, *args, null_states: torch.Tensor, **kwargs) -> None:
        super().__init__(transformer, torch.nn.Identity(), *args, codec=LatentCodec(), **kwargs)
        self.register_buffer("null_states", null_states, persistent=False)  # [1, S, D]: the empty prompt

    def prompt_conditions(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's cached prompt states `[B, S, D]` and the cache's empty-prompt states `[1, S, D]`."""
        return batch["prompt_states"].to(self.null_states.device), self.null_states


def _dataset(cfg: StageConfig):
    """(dataset, collate_fn) of a stage's data source."""
    if cfg.data.get("kind") == "latent_cache":
        prompt_length = cfg.pipeline.get("prompt_length", 512)
        return LatentCacheDataset(cfg.data["path"], cfg.data.get("bucket"), prompt_length), collate_latents
    return WorldDataset("train", size=cfg.dataset_size, seed=cfg.data_seed, config=WorldConfig(**cfg.world)), collate


def _video_flow(cfg: StageConfig, pipe_cfg: PipelineConfig) -> VideoFlow:
    flow = cfg.flow
    return VideoFlow(shift=flow.train_shift, time_sampling=flow.time_sampling, prediction=pipe_cfg.video_prediction,
                     loss_space=flow.video_loss, sigma_data=pipe_cfg.video_sigma_data)  # fmt: skip


def run_stage(cfg: StageConfig, resume: bool | str = False) -> Path:
    """Train one stage and export its pipeline folder (`output_dir/final`); returns that folder."""
    cfg.check_inputs()
    out = Path(cfg.train.output_dir)
    if (out / "final").exists():  # a finished run: continued from its checkpoints, never trained over
        if not ckpt.list_checkpoints(out / "checkpoints"):  # deleted to free the disk, say: --resume would restart
            raise FileExistsError(f"{out} holds a finished run ({out / 'final'}) and no checkpoint to continue it "
                                  "from: use a fresh output_dir (or move final/ away to train again here)")  # fmt: skip
        if resume is False:
            raise FileExistsError(f"{out} holds a finished run ({out / 'final'}): pass --resume to continue it, or "
                                  "use a fresh output_dir")  # fmt: skip
    torch.manual_seed(cfg.train.seed)  # new weights (base, MoE text layers) start the same on every process and run
    task, tokenizer, pipe_cfg = build_task(cfg)
    dataset, collate_fn = _dataset(cfg)
    trainer = Trainer(task, dataset, cfg.train, collate_fn=collate_fn,
                      run_config=_run_config(cfg, dataset, pipe_cfg))  # fmt: skip

    def record() -> None:  # once the run is checked: a refused one leaves the folder's record as it was
        if trainer.accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            (out / "stage_config.yaml").write_text(yaml.safe_dump(_plain(asdict(cfg)), sort_keys=False))

    trainer.train(resume=resume, on_start=record)
    state = trainer.final_state_dict()  # EMA weights where on; FSDP shards gathered on the main process
    final = out / "final"
    if trainer.accelerator.is_main_process:
        if trainer.fsdp:
            task = build_task(cfg)[0]  # FSDP wrapped the task's blocks in place: a fresh copy takes the weights
        task.load_state_dict(state)
        # minutes of training in all (a resumed run's earlier part included), not of this call
        pipe_cfg.extra = {**pipe_cfg.extra, cfg.stage: {"steps": cfg.train.max_steps, "minutes": round(
            trainer.elapsed / 60, 1), "init_from": cfg.init_from}}  # fmt: skip
        prompt_encoder, codec = getattr(task, "export_parts", (task.prompt_encoder, None))
        # written aside and swapped in whole: a kill mid-export must not leave a mixed folder that reads as done
        staging = out / ".final.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        UniViGUPipeline(task.transformer, prompt_encoder, tokenizer, pipe_cfg, codec=codec).save_pretrained(staging)
        ckpt.replace_dir(staging, final)
    trainer.accelerator.wait_for_everyone()  # no process leaves (and tears down the process group) mid-export
    return final


def _run_config(cfg: StageConfig, dataset: Any, pipe_cfg: PipelineConfig) -> dict[str, Any]:
    """What a resumed stage must share with its checkpoints besides the trainer's config: the rest of the stage
    config as it takes effect (defaults and inherited values filled in), but its paths (a run moved to another disk,
    with its inputs, resumes; the weights are the checkpoint's), and a latent cache's rows (its shards and counts:
    the data itself)."""
    run = _plain({k: v for k, v in asdict(cfg).items() if k not in ("train", "init_from")})
    run["data"].pop("path", None)
    run["data"]["kind"] = cfg.data.get("kind", "world")
    if cfg.stage != "base":  # the text flow the task was built with (unset: the previous stage's)
        run["flow"].update(text_source=pipe_cfg.text_source, text_exponent=pipe_cfg.text_exponent)
    if isinstance(dataset, LatentCacheDataset):
        run["data"]["bucket"] = dataset.bucket  # the same shards, in the same order: the same samples per step
        run["cache_rows"] = dataset.index["buckets"][dataset.bucket]
    return run


def _plain(value: Any) -> Any:
    """Tuples to lists, for YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
