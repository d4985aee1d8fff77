"""`UniViGUPipeline`: text to video, video to text, and both at once, from one checkpoint folder.

Folder layout (diffusers-style): `model_index.json` (the pipeline config and component
classes), `transformer/`, `prompt_encoder/`, `tokenizer/`, and `vae/` for latent models. The
transformer is the unified model, or a plain diffusers `WanTransformer3DModel` (a base generator:
text to video only). `from_wan` builds a latent pipeline from a Wan2.1 diffusers folder (Wan VAE,
umT5 prompt encoder and tokenizer, see `univigu.models.wan`); `from_pretrained` also accepts one.
"""

from __future__ import annotations

import json
import numbers
import os
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from univigu.checks import check_finite, check_int, check_positive
from univigu.data.codec import PixelCodec
from univigu.data.tokenizer import TextCanvas, load_tokenizer, unknown_words
from univigu.flow.regimes import CAPTION_CONDITIONS, GUIDANCE_TEXTS
from univigu.flow.samplers import TEXT_UPDATES, Guidance, sample_t2v, sample_t2vt, sample_v2t
from univigu.flow.text import TextFlow
from univigu.flow.video import NUM_TRAIN_TIMESTEPS, PREDICTIONS, velocity_from_output
from univigu.models.prompt_encoder import PromptEncoder
from univigu.models.transformer import UniViGUTransformer
from univigu.models.wan import (
    WAN_PROMPT_LENGTH,
    UMT5PromptEncoder,
    WanComponents,
    WanVAECodec,
    is_wan_folder,
    load_wan_transformer,
)


@dataclass
class PipelineConfig:
    """Everything needed to sample besides the weights."""

    frames: int = 16
    height: int = 32
    width: int = 32
    prompt_length: int = 16  # prompt-encoder canvas
    text_length: int = 48  # text-stream canvas (caption, end token, padding)
    text_source: str = "uniform"  # discrete-flow source: "uniform" or "mask"
    text_exponent: float = 1.0  # kappa(t) = t^n
    shift: float = 3.0  # video schedule shift k
    video_prediction: str = "velocity"  # what the transformer outputs: "velocity" (Wan), "sample" (x0) or "edm"
    video_sigma_data: float = 0.5  # the data std of the "edm" parameterization
    text_shift: float = 1.0  # grid shift for video-to-text
    num_steps: int = 50
    caption_steps: int | None = None  # video-to-text steps (None: num_steps); text keeps improving past video
    text_update: str = "ctmc"  # joint generation's text rule: "ctmc" or the released "linear-resample"
    # video-to-text's condition without an instruction: the empty prompt's states (ours, as trained), or all
    # zeros (the released script's; converted official checkpoints)
    caption_condition: str = "empty_prompt"
    # text to video's guidance (unified models): the null pass's text stream holds the empty prompt (ours, as the
    # dropped-condition rows are trained) or keeps the prompt (the released script's; converted official checkpoints)
    guidance_text: str = "empty_prompt"
    guidance_scale: float = 5.0
    fps: int = 8
    pixel_downsample: int = 1  # the toy codec's d x d pixel averaging (PixelCodec); unused with a VAE
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: stage, steps, ...

    def __post_init__(self) -> None:
        # a bad value would otherwise load fine and fail deep inside the first sampling call (or sample garbage)
        for name in ("frames", "height", "width", "prompt_length", "text_length", "num_steps", "fps",
                     "pixel_downsample"):  # fmt: skip
            check_int(name, getattr(self, name), 1)
        if self.caption_steps is not None:
            check_int("caption_steps", self.caption_steps, 1)
        for name in ("text_exponent", "shift", "video_sigma_data", "text_shift"):
            check_positive(name, getattr(self, name))
        check_finite("guidance_scale", self.guidance_scale)
        for name, valid in (("text_source", ("uniform", "mask")), ("video_prediction", PREDICTIONS),
                            ("text_update", TEXT_UPDATES),
                            ("caption_condition", CAPTION_CONDITIONS), ("guidance_text", GUIDANCE_TEXTS)):  # fmt: skip
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> "PipelineConfig":
        """The config from `values` (a model_index.json's "config"); ValueError naming `source` for an unknown
        key (listing the known ones) or a bad value."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown config keys {unknown}; valid keys: {', '.join(known)}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from error

    def steps_for(self, method: str, num_steps: int | None = None) -> int:
        """The sampling steps a pipeline method ("text_to_video", "video_to_text", "generate") runs: `num_steps`
        when given (an int >= 1), else caption_steps for video to text, else num_steps."""
        if num_steps is not None:
            return check_int("num_steps", num_steps, 1)
        if method == "video_to_text" and self.caption_steps is not None:
            return self.caption_steps
        return self.num_steps


def _seed(seed: Any, name: str = "seed") -> int | torch.Generator:
    """An int seed, or a torch.Generator (the samplers take either); TypeError for anything else, naming the
    argument `name`."""
    if isinstance(seed, torch.Generator):
        return seed
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"{name} must be an int or a torch.Generator, got {type(seed).__name__} {seed!r}")
    if not -(2**63) <= seed < 2**64:  # what torch's generators take (else "Overflow when unpacking long long")
        raise ValueError(f"{name} must fit in 64 bits, got {seed}")
    return int(seed)


def _prompt_list(prompts: Any) -> list[Any]:
    """A str as a batch of one; any other iterable as a list (its items are checked by `check_prompts`)."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)):  # iterable, but as ints
        raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}; decode them first "
                        "(.decode('utf-8'))")  # fmt: skip
    if not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
    return list(prompts)


# model_index.json's class names, as save_pretrained writes them; a name not here is an error, not a guess
TRANSFORMER_CLASSES = ("UniViGUTransformer", "WanTransformer3DModel")
PROMPT_ENCODER_CLASSES = ("PromptEncoder", "UMT5PromptEncoder")


def _component_class(index: dict[str, Any], index_file: Path, part: str) -> str:
    """The class name model_index.json gives `part` ("transformer", "prompt_encoder"): `[library, class name]`,
    a class this package loads; else a ValueError naming the file."""
    entry, known = index[part], TRANSFORMER_CLASSES if part == "transformer" else PROMPT_ENCODER_CLASSES
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
        raise ValueError(f"{index_file}: {part} must be [library, class name], got {json.dumps(entry)}")
    if entry[1] not in known:
        raise ValueError(f"{index_file}: unknown {part} class {entry[1]!r}; known: {', '.join(known)}")
    return entry[1]


def _require_config(folder: Path, name: str) -> None:
    """FileNotFoundError unless `folder` holds a config.json (else the loaders' OSError, or a hub lookup)."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}: not a saved {name} (write pipeline folders with "
                                "save_pretrained)")  # fmt: skip


def _load_tokenizer(folder: Path) -> Any:
    """`load_tokenizer`, with a corrupt file (a JSON or tokenizers error that names none) a ValueError naming it."""
    try:
        return load_tokenizer(folder)
    except FileNotFoundError:
        raise
    except Exception as error:  # tokenizers raises plain Exceptions
        for file in sorted(folder.glob("*.json")):
            try:
                json.loads(file.read_text())
            except (ValueError, UnicodeDecodeError) as bad:
                raise ValueError(f"{file} is not valid JSON: {bad}") from error
        raise ValueError(f"{folder}: the tokenizer does not load ({type(error).__name__}: {error}); write it with "
                         "save_pretrained") from error  # fmt: skip


def _load_part(name: str, folder: Path, torch_dtype: torch.dtype) -> nn.Module:
    """Load the component class `name` from `folder` (local files only); a TypeError from a config the class cannot
    take (raised deep inside it, naming no file) becomes a ValueError naming the folder."""
    loaders = {"UniViGUTransformer": lambda: UniViGUTransformer.from_pretrained(folder, torch_dtype=torch_dtype,
                                                                               local_files_only=True),
               "PromptEncoder": lambda: PromptEncoder.from_pretrained(folder, torch_dtype=torch_dtype,
                                                                     local_files_only=True),
               # these two read local files only themselves
               "WanTransformer3DModel": lambda: load_wan_transformer(folder, torch_dtype=torch_dtype),
               "UMT5PromptEncoder": lambda: UMT5PromptEncoder.from_pretrained(folder, torch_dtype=torch_dtype)}
    _require_config(folder, name)
    try:
        return loaders[name]()
    except TypeError as error:
        raise ValueError(f"{folder}: the {name} does not load from it: {error}") from error


def _cast_as_loaded(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast `module`'s floating weights to `dtype` in place, as its models' from_pretrained(torch_dtype=dtype) loads
    them: diffusers keeps the name parts a model lists in `_keep_in_fp32_modules` in float32 at any dtype,
    transformers only at float16 (its `_keep_in_fp32_modules_strict` at bfloat16 too)."""
    from transformers import PreTrainedModel

    keep = set()
    for owner in module.modules():
        if isinstance(owner, PreTrainedModel):
            keep |= set(owner._keep_in_fp32_modules or ()) if dtype == torch.float16 else set()
            strict = getattr(owner, "_keep_in_fp32_modules_strict", None)  # transformers >= 4.56
            keep |= set(strict or ()) if dtype != torch.float32 else set()
        else:
            keep |= set(getattr(owner, "_keep_in_fp32_modules", None) or ())
    for path, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if keep.intersection(path.split(".")) else dtype)


class PromptError(ValueError):
    """A prompt (or V2T instruction, or negative prompt) longer than the model reads, or no prompts at all;
    `argument`: "negative_prompt" when it is the negative prompt, else "prompts"."""

    def __init__(self, message: str, argument: str = "prompts") -> None:
        super().__init__(message)
        self.argument = argument


def _read_index(index_file: Path) -> dict[str, Any]:
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{index_file} is not valid JSON: {error}") from error
    if not isinstance(index, dict):
        raise ValueError(f"{index_file} holds a {type(index).__name__}, not a JSON object")
    return index


def check_pipeline_folder(path: Path) -> dict[str, Any]:
    """The model_index.json of a univigu pipeline folder, read before any weight is: FileNotFoundError without
    one (naming a training run's `final/` inside), for a Wan2.1 diffusers folder that lacks a part (an incomplete
    download), ValueError for an index without the pipeline's keys. (A whole Wan folder: `is_wan_release`.)"""
    index_file = path / "model_index.json"
    if not index_file.exists():
        final = path / "final"  # a training run's folder holds its pipeline there
        inside = f"; it holds a training run, whose pipeline is {final}" if (final / "model_index.json").is_file() \
            else ""  # fmt: skip
        if (path.parent / "model_index.json").is_file():  # a part of a pipeline folder: its transformer/, ...
            inside = f"; it is a part of the pipeline folder {path.parent}: load that"
        elif (path / "config.json").is_file() and '"UniViGUTransformer"' in (path / "config.json").read_text():
            inside = ("; it holds a UniViGUTransformer alone (convert-official without --wan): convert with --wan "
                      "WAN_FOLDER for a pipeline")  # fmt: skip
        raise FileNotFoundError(f"{path} is not a univigu pipeline folder (no model_index.json){inside}")
    index = _read_index(index_file)
    wan_parts = ("transformer", "vae", "text_encoder", "tokenizer")
    if not {"config", "prompt_encoder"} & set(index) and any((path / part).is_dir() for part in wan_parts):
        # a diffusers folder (Wan's parts), not one of ours (a subclass's too holds config and prompt_encoder)
        gone = [part for part in wan_parts if not (path / part).is_dir()]
        raise FileNotFoundError(f"{path} is a {index.get('_class_name')} folder, not a univigu pipeline; as a "
                                f"Wan2.1 diffusers folder it lacks {gone} (an incomplete download or "
                                "copy?)")  # fmt: skip
    missing = [key for key in ("transformer", "prompt_encoder", "config") if key not in index]
    if missing:
        raise ValueError(f"{index_file} lacks {missing} (write pipeline folders with save_pretrained)")
    return index


FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_device(device: str | torch.device) -> None:
    """A CUDA device on a machine without one is refused in words (torch's own error said less), the pipeline
    left where it is."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{device!r}: this torch ({torch.__version__}) sees no CUDA device; the pipeline is left "
                           "where it is")  # fmt: skip


def _float_dtype(torch_dtype: Any, name: str = "torch_dtype") -> torch.dtype:
    """A floating torch dtype, given as one or by name ("bfloat16"); anything else is an error naming the argument
    `name` (diffusers' loaders turn a name into float32 with only a log line)."""
    dtype = FLOAT_DTYPES.get(torch_dtype, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    if dtype not in FLOAT_DTYPES.values():
        raise ValueError(f"{name} must be one of {sorted(FLOAT_DTYPES)} (or the torch dtype), got {torch_dtype!r}")
    return dtype


def is_wan_release(path: str | Path) -> bool:
    """True for a Wan2.1 diffusers folder (transformer/, vae/, text_encoder/, tokenizer/) that is not a univigu
    pipeline folder written into it."""
    path = Path(path)
    if not is_wan_folder(path):
        return False
    index_file = path / "model_index.json"
    return not index_file.exists() or _read_index(index_file).get("_class_name") != UniViGUPipeline.__name__


@dataclass
class UniViGUPipelineOutput:
    """What a pipeline call returns (diffusers' output class): videos uint8 [B, T, H, W, 3] (text to video, joint),
    texts [B] (video to text, joint) and, with return_trajectory=True, each step's estimates: video_trajectory
    uint8 [steps, B, T, H, W, 3], text_trajectory [steps][B] texts, token_trajectory [steps, B, L] token ids."""

    videos: np.ndarray | None = None  # uint8 [B, T, H, W, 3]
    texts: list[str] | None = None
    video_trajectory: np.ndarray | None = None  # uint8 [steps, B, T, H, W, 3] clean-video estimates
    text_trajectory: list[list[str]] | None = None  # [steps][B] decoded text estimates
    token_trajectory: Tensor | None = None  # [steps, B, L] token ids


class _WanAsUnified(nn.Module):
    """A plain Wan generator behind the unified call signature (its text stream is empty)."""

    def __init__(self, wan: nn.Module, vocab_out: int) -> None:
        super().__init__()
        self.wan, self.vocab_out = wan, vocab_out

    def forward(self, video, text, t_video, t_text, prompt_states, text_mask=None, prompt_mask=None):
        velocity = self.wan(hidden_states=video, timestep=t_video, encoder_hidden_states=prompt_states,
                            return_dict=False)[0]  # fmt: skip
        return velocity, video.new_zeros(video.shape[0], text.shape[1], self.vocab_out)

    @property
    def dtype(self) -> torch.dtype:
        return self.wan.dtype


class _AsVelocity(nn.Module):
    """A sample- or edm-predicting transformer behind the velocity interface the samplers use."""

    def __init__(self, model: nn.Module, prediction: str, sigma_data: float) -> None:
        super().__init__()
        self.model, self.prediction, self.sigma_data = model, prediction, sigma_data

    def forward(self, video, text, t_video, t_text, prompt_states, text_mask=None, prompt_mask=None):
        # samplers keep the state in float32; a bf16 model runs in bf16. Not the first parameter's dtype: diffusers
        # keeps some modules in float32 (`_keep_in_fp32_modules`), and ModelMixin.dtype skips them
        dtype = self.model.dtype
        output, logits = tuple(self.model(video.to(dtype), text, t_video, t_text, prompt_states.to(dtype), text_mask,
                                          prompt_mask))[:2]  # fmt: skip
        return velocity_from_output(output.float(), video, t_video / NUM_TRAIN_TIMESTEPS, self.prediction,
                                    self.sigma_data, min_noise=0.0), logits  # exact steps to the clean end


class UniViGUPipeline:
    """Text to video, video to text, and joint generation with one Uni-ViGU model.

    >>> pipe = UniViGUPipeline.from_pretrained(univigu.DEFAULT_MODEL)
    >>> pipe.text_to_video(["a red circle moves right"], seed=0).videos  # uint8 [1, T, H, W, 3]
    >>> pipe.video_to_text(videos, seed=0).texts
    >>> out = pipe.generate(["a blue square grows"], seed=0)  # out.videos and out.texts
    >>> pipe("a red circle moves right", num_inference_steps=20, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, transformer: nn.Module, prompt_encoder: PromptEncoder, tokenizer: Any,
                 config: PipelineConfig | None = None, codec: Any = None) -> None:  # fmt: skip
        # eval(): sampling must not depend on train-mode code paths (dropout, fused kernels)
        self.transformer, self.prompt_encoder = transformer.eval(), prompt_encoder.eval()
        self.tokenizer = tokenizer
        self.config = config or PipelineConfig()
        self.codec = codec or PixelCodec(self.config.pixel_downsample)
        self.prompt_canvas = TextCanvas(tokenizer, self.config.prompt_length)
        self.text_canvas = TextCanvas(tokenizer, self.config.text_length)
        self.text_flow = TextFlow(self.text_canvas.vocab_size, source=self.config.text_source,
                                  mask_id=self.text_canvas.mask_id, exponent=self.config.text_exponent)  # fmt: skip
        self.unified = isinstance(transformer, UniViGUTransformer)
        self._progress_disabled = False
        model = transformer if self.unified else _WanAsUnified(transformer, self.text_canvas.vocab_size)
        # the samplers' model: (video, text, ...) -> (velocity, logits), whatever the transformer predicts
        self.velocity_model = _AsVelocity(model, self.config.video_prediction, self.config.video_sigma_data)
        self._check_fit(transformer)

    # ---- loading and saving ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        torch_dtype: torch.dtype | str = torch.float32, **config: Any) -> "UniViGUPipeline":  # fmt: skip
        """Load a pipeline folder (or a Wan2.1 diffusers folder, through `from_wan`); weights stored in half
        precision are cast to `torch_dtype` (a torch dtype or its name). `config`: PipelineConfig fields that
        replace the folder's (`num_steps=30`; for a Wan folder its sizes, `frames=33, height=256, width=448`)."""
        path, torch_dtype = Path(path), _float_dtype(torch_dtype)
        index_file = path / "model_index.json"
        if is_wan_release(path):
            return cls.from_wan(path, device=device, torch_dtype=torch_dtype, **config)
        index = check_pipeline_folder(path)
        if not isinstance(index["config"], dict):
            raise ValueError(f"{index_file}: config must be a JSON object, got {json.dumps(index['config'])}")
        source = f"{index_file} (with {sorted(config)})" if config else str(index_file)
        config = PipelineConfig.from_dict({**index["config"], **config}, source)  # before the weights: fails fast
        transformer_class = _component_class(index, index_file, "transformer")
        encoder_class = _component_class(index, index_file, "prompt_encoder")
        parts = ["transformer", "prompt_encoder", "tokenizer", *(["vae"] if "vae" in index else [])]
        absent = [path / part for part in parts if not (path / part).is_dir()]
        if absent:
            raise FileNotFoundError(f"{', '.join(map(str, absent))} {'does' if len(absent) == 1 else 'do'} not exist: "
                                    f"{index_file} needs the folders {parts} next to it (copy the whole pipeline "
                                    "folder)")  # fmt: skip
        # every load reads local files only (never the network); a config a class cannot take names its file
        transformer = _load_part(transformer_class, path / "transformer", torch_dtype)
        prompt_encoder = _load_part(encoder_class, path / "prompt_encoder", torch_dtype)
        tokenizer = _load_tokenizer(path / "tokenizer")
        codec = None
        if "vae" in index:
            _require_config(path / "vae", "Wan VAE")
            codec = WanVAECodec.from_pretrained(path / "vae", patch_size=transformer.config.patch_size)
        try:
            pipe = cls(transformer, prompt_encoder, tokenizer, config, codec=codec)
        except ValueError as error:  # the config does not fit the weights
            raise ValueError(f"{source}: {error}") from error
        return pipe.to(device)

    @classmethod
    def from_wan(cls, path: str | Path, device: str | torch.device = "cpu",
                 torch_dtype: torch.dtype | str = torch.float32, seed: int = 0,
                 transformer: UniViGUTransformer | None = None, unified: bool = True,
                 **config: Any) -> "UniViGUPipeline":  # fmt: skip
        """The unified model built from a local Wan2.1 diffusers folder (transformer/, vae/, text_encoder/,
        tokenizer/; nothing is downloaded): `UniViGUTransformer.from_wan` on transformer/ with the umT5 vocabulary
        for the text stream, the Wan VAE as the codec (float32), umT5 as the prompt encoder (prompts padded to
        512). `config`: PipelineConfig fields; by default 81 frames at 480x832, 256 text tokens, the folder's
        flow_shift. Sizes are checked against the VAE (4k+1 frames, height/width multiples of VAE x patch).
        `seed` draws the new token embedding, so two loads of one folder sample alike. `transformer`: a unified
        model to use instead (e.g. a converted official checkpoint) with this folder's VAE, umT5 and tokenizer.
        `unified=False`: Wan2.1's own generator in place of the unified model (text to video only), the
        base-generator pipeline that a Knowledge Recall stage builds its unified model from."""
        path, torch_dtype = Path(path), _float_dtype(torch_dtype)
        defaults = dict(frames=81, height=480, width=832, prompt_length=WAN_PROMPT_LENGTH, text_length=256, fps=16)
        pipe_config = PipelineConfig.from_dict({**defaults, **config}, "from_wan")  # before the weights: fails fast
        wan = WanComponents.from_folder(path, torch_dtype=torch_dtype)
        if wan.flow_shift is not None and "shift" not in config:
            pipe_config = replace(pipe_config, shift=wan.flow_shift)
        if transformer is None:
            transformer = load_wan_transformer(path / "transformer", torch_dtype=torch_dtype)
            if unified:
                transformer = UniViGUTransformer.from_wan(transformer, torch.Generator().manual_seed(seed),
                                                          text_vocab_size=len(wan.tokenizer),
                                                          text_mask_row=pipe_config.text_source == "mask")  # fmt: skip
        elif not unified:
            raise ValueError("unified=False loads Wan2.1's own generator; it takes no transformer")
        else:
            if transformer.config.text_vocab_size != len(wan.tokenizer):
                raise ValueError(f"the transformer reads {transformer.config.text_vocab_size} text tokens, {path}'s "
                                 f"tokenizer has {len(wan.tokenizer)}")  # fmt: skip
            if transformer.config.text_mask_row and "text_source" not in config:  # its extra row: the mask source
                pipe_config = replace(pipe_config, text_source="mask")
        wan.codec.patch_size = tuple(transformer.config.patch_size)
        return cls(transformer, wan.prompt_encoder, wan.tokenizer, pipe_config, codec=wan.codec).to(device)

    def enable_model_cpu_offload(self, device: str | torch.device = "cuda") -> "UniViGUPipeline":
        """Keep the VAE and the prompt encoder on the CPU, each moved to `device` only while it runs; the
        transformer lives on `device`."""
        if not isinstance(self.codec, WanVAECodec) or not isinstance(self.prompt_encoder, UMT5PromptEncoder):
            raise ValueError("CPU offload is for pipelines built from Wan (VAE + umT5): this one's codec and prompt "
                             "encoder are small, keep them with the transformer (pipe.to(device); on the command "
                             "line: leave out --offload)")  # fmt: skip
        _check_device(device)
        self.transformer.to(device)
        WanComponents(self.codec, self.prompt_encoder, self.tokenizer).enable_model_cpu_offload(device)
        return self

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | str | None = None) -> Path:
        """Write the pipeline folder; `dtype` (torch.float16, torch.bfloat16 or its name) stores the weights cast,
        leaving this pipeline's own weights as they are."""
        if dtype is not None:  # before anything is written
            dtype = _float_dtype(dtype, "dtype")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        parts = {"transformer": self.transformer, "prompt_encoder": self.prompt_encoder}
        if hasattr(self.codec, "save_pretrained"):  # a latent pipeline's VAE
            parts["vae"] = self.codec
        for name, part in parts.items():
            part.save_pretrained(path / name)
            if dtype is not None:  # cast the written shards rather than the weights in memory
                for shard in (path / name).glob("*.safetensors"):
                    tensors = load_file(shard)
                    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, shard,
                              metadata={"format": "pt"})  # fmt: skip
        self.tokenizer.save_pretrained(str(path / "tokenizer"))
        library = "univigu" if self.unified else "diffusers"
        index = {
            "_class_name": type(self).__name__,
            "transformer": [library, type(self.transformer).__name__],
            "prompt_encoder": ["univigu", type(self.prompt_encoder).__name__],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "config": asdict(self.config),
        }
        if "vae" in parts:
            index["vae"] = ["diffusers", type(self.codec.vae).__name__]
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
        return path

    def to(self, *args: str | torch.device | torch.dtype, device: str | torch.device | None = None,
           dtype: torch.dtype | str | None = None) -> "UniViGUPipeline":  # fmt: skip
        """Move the transformer, the prompt encoder and a VAE to a device and / or cast the first two to a dtype, as
        diffusers' pipelines take them (`pipe.to("cuda")`, `pipe.to(torch.bfloat16)`, `pipe.to("cuda",
        torch.bfloat16)`). A cast gives what `from_pretrained(torch_dtype=dtype)` loads: the modules a class keeps in
        float32 (its `_keep_in_fp32_modules`: norms, time embeddings) stay so, as does a VAE. A dtype may be given by
        name (`pipe.to("bfloat16")`). Returns the pipeline."""
        for arg in args:
            if isinstance(arg, torch.dtype) or arg in FLOAT_DTYPES:
                dtype = arg
            else:
                device = arg
        if device is not None:
            _check_device(device)  # before anything is cast
        if dtype is not None:
            dtype = _float_dtype(dtype, "dtype")
            for part in (self.transformer, self.prompt_encoder):
                _cast_as_loaded(part, dtype)
        if device is not None:
            self.transformer.to(device)
            self.prompt_encoder.to(device)
            if hasattr(self.codec, "vae"):
                self.codec.vae.to(device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's compute dtype (diffusers' `ModelMixin.dtype`: float32-kept modules aside)."""
        return self.transformer.dtype

    def set_progress_bar_config(self, disable: bool = False) -> None:
        """Show (or, `disable=True`, hide) the sampling progress bar of calls that do not say (diffusers' name)."""
        self._progress_disabled = bool(disable)

    def _progress(self, progress: bool | None) -> bool:
        return not self._progress_disabled if progress is None else progress

    @property
    def device(self) -> torch.device:
        """The device the transformer is on (where sampling runs)."""
        return next(self.transformer.parameters()).device

    # ---- the three tasks ---------------------------------------------------------------------------

    def check_prompts(self, prompts: list[str], text_stream: bool = False, warn_empty: bool = True) -> None:
        """Raise `PromptError` for no prompts, a prompt that is not valid text (a lone surrogate: not encodable as
        UTF-8) or one longer than the model reads (`config.prompt_length` tokens, the end token included; with
        `text_stream`, T2V's, also `config.text_length`: the prompt is the text stream there), TypeError for one that
        is not a str; warn about words the tokenizer does not know (they reach the model as one unknown token: the
        toy model knows only its world's words) and, with `warn_empty`, about empty prompts (an unconditional
        sample; the negative prompt and the V2T instruction are empty by default, and are checked without)."""
        if not prompts:
            raise PromptError("no prompts: the batch is empty; pass at least one prompt")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                hint = "; decode it first (.decode('utf-8'))" if isinstance(prompt, (bytes, bytearray)) else ""
                if isinstance(prompt, (np.ndarray, Tensor)):
                    hint = "; to caption videos pass them as video= (pipe(video=videos)) or to video_to_text"
                raise TypeError(f"prompt {i} is {type(prompt).__name__}, expected str{hint}")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as error:  # else a TypeError from inside tokenizers ("TextEncodeInput must be")
                raise PromptError(f"prompt {i} is not valid text: character {error.start} "
                                  f"({prompt[error.start]!r}) cannot be encoded as UTF-8 (a lone surrogate; on the "
                                  "command line, bytes that are not UTF-8); pass UTF-8 text") from None  # fmt: skip
        empty = [i for i, prompt in enumerate(prompts) if not prompt.strip()]
        if empty and warn_empty:
            listed = ", ".join(map(str, empty[:10])) + (f" ... and {len(empty) - 10} more" if len(empty) > 10 else "")
            which = f"prompt {listed} is" if len(empty) == 1 else f"prompts {listed} are"
            warnings.warn(f"{which} empty: an unconditional sample (the empty prompt is no condition, as in "
                          "classifier-free training); pass a description to condition on it", stacklevel=2)  # fmt: skip
        tokenizer, limit = self.prompt_canvas.tokenizer, self.prompt_canvas.length - 1
        if text_stream:
            limit = min(limit, self.text_canvas.length - 1)
        encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        for i, (prompt, ids) in enumerate(zip(prompts, encoded)):
            if len(ids) > limit:
                raise PromptError(f"prompt {i} is {len(ids)} tokens long; this model reads at most {limit}: "
                                  f"{prompt[:80]!r}{'...' if len(prompt) > 80 else ''}")  # fmt: skip
        unknown = [word for words in unknown_words(tokenizer, prompts) for word in words]
        if unknown:  # a few, each cut short: a 100,000-character word must not become a 100 KB warning
            distinct = list(dict.fromkeys(unknown))
            shown = [repr(w if len(w) <= 40 else w[:40] + "...") for w in distinct[:10]]
            words = ", ".join(shown) + (f" ... and {len(distinct) - 10} more" if len(distinct) > 10 else "")
            warnings.warn(f"words this model's tokenizer does not know (read as {tokenizer.unk_token}): {words}",
                          stacklevel=2)  # fmt: skip

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Prompt states `[B, S, D]` (the empty prompt's: the null condition). Raises `PromptError` for a prompt
        longer than the model reads."""
        self.check_prompts(prompts, warn_empty=False)
        return self._prompt_states(prompts)

    @torch.no_grad()
    def _prompt_states(self, prompts: list[str]) -> Tensor:
        ids, mask = self.prompt_canvas.encode(prompts)
        return self.prompt_encoder(ids.to(self.device), mask.to(self.device))

    @property
    def _null_text_stream(self) -> bool:
        """Whether T2V guidance's null pass puts the empty prompt in the text stream (a unified model's)."""
        return self.unified and self.config.guidance_text == "empty_prompt"

    def _guidance(self, scale: float, negative_prompt: str, null_text: bool = False) -> Guidance | None:
        """Guidance away from `negative_prompt` (the empty prompt: plain classifier-free guidance); with
        `null_text` (T2V) it is also the null pass's text stream. At scale 1 there is no null pass: a negative
        prompt then warns that it is not used."""
        if scale == 1.0:
            if negative_prompt:
                warnings.warn("negative_prompt has no effect without guidance (guidance scale 1); it is not used",
                              stacklevel=4)  # fmt: skip
            return None
        tokens, mask = self.text_canvas.encode([negative_prompt]) if null_text else (None, None)
        return Guidance(null_states=self._prompt_states([negative_prompt]), scale=scale,
                        null_text=None if tokens is None else tokens.to(self.device),
                        null_text_mask=None if mask is None else mask.to(self.device))  # fmt: skip

    def _recorder(self, video: bool, text: bool, callback: Callable | None):
        """A sampler callback that keeps the video and / or text trajectory and forwards to `callback`."""
        frames: list[Tensor] = []
        tokens: list[Tensor] = []

        def step(i: int, s: float, estimate: Tensor, stream: Tensor) -> None:
            if video:  # not for captions: their video is the input, and decoding it (Wan's VAE) is costly
                frames.append(self.codec.decode(estimate).cpu())
            if text:
                tokens.append(stream.cpu())
            if callback is not None:
                callback(i, s, estimate, stream)

        return step, frames, tokens

    def _output(self, video: Tensor | None, text: Tensor | None, frames, tokens) -> UniViGUPipelineOutput:
        if video is not None and not torch.isfinite(video).all():  # it would decode to a flat black video
            bad = [i for i, row in enumerate(video) if not torch.isfinite(row).all()]
            warnings.warn(f"videos {bad} came out non-finite (NaN / inf) and decode black: too large a guidance "
                          "scale overflows, as can float16 weights", stacklevel=3)  # fmt: skip
        return UniViGUPipelineOutput(
            videos=None if video is None else self.codec.decode(video).cpu().numpy(),
            texts=None if text is None else self.text_canvas.decode(text.cpu()),
            video_trajectory=torch.stack(frames).numpy() if frames else None,
            text_trajectory=[self.text_canvas.decode(t) for t in tokens] if tokens else None,
            token_trajectory=torch.stack(tokens) if tokens else None,
        )

    def _video_shape(self, b: int) -> tuple[int, ...]:
        c = self.config
        return (b, *self.codec.latent_shape(c.frames, c.height, c.width))

    @torch.no_grad()
    def text_to_video(self, prompts: list[str] | str, seed: int | torch.Generator = 0, num_steps: int | None = None,
                      guidance_scale: float | None = None, negative_prompt: str = "", progress: bool | None = None,
                      return_trajectory: bool = False, callback: Callable | None = None) -> UniViGUPipelineOutput:  # fmt: skip
        """Videos for prompts: uint8 `[B, T, H, W, 3]` in `.videos`.

        prompts: a str or a list of str (at most `config.prompt_length` - 1 and `config.text_length` - 1 tokens:
            the prompt is also the clean text stream). seed: an int or a torch.Generator; one seed gives one
            result, on a given device and batch. num_steps: video denoising steps (None: `config.num_steps`).
            guidance_scale: classifier-free guidance (None: the config's; 1: none; the null pass's text stream:
            `config.guidance_text`). negative_prompt: the null pass's prompt, what guidance steers away from
            (default: the empty prompt; the same limits as a prompt).
        progress: a tqdm bar (None: unless `set_progress_bar_config(disable=True)`). return_trajectory:
            `.video_trajectory` uint8 `[steps, B, T, H, W, 3]`, the clean-video estimate after each step.
        callback(i, s, video, text): after step i (from noise level s), with that estimate in the codec's space
            `[B, C, T', H', W']` and the text tokens `[B, L]`.
        """
        prompts = _prompt_list(prompts)
        self.check_prompts(prompts, text_stream=True)
        null_text = self._null_text_stream
        self._check_negative_prompt(negative_prompt, text_stream=null_text)
        seed, steps = _seed(seed), self.config.steps_for("text_to_video", num_steps)
        scale = self.resolve_guidance_scale(guidance_scale)
        states = self._prompt_states(prompts)
        tokens, mask = self.text_canvas.encode(prompts)
        step, frames, _ = self._recorder(video=return_trajectory, text=False, callback=callback)
        out = sample_t2v(
            self.velocity_model, tokens.to(self.device), states, self._video_shape(len(prompts)),
            text_mask=mask.to(self.device), guidance=self._guidance(scale, negative_prompt, null_text=null_text),
            num_steps=steps, shift=self.config.shift, generator=seed,
            callback=step, progress=self._progress(progress),
        )  # fmt: skip
        return self._output(out.video, None, frames, [])

    def load_video(self, path: str | Path) -> np.ndarray:
        """A video file as this model's input: uint8 `[frames, height, width, 3]` of the config's size, read as
        training clips are made (`univigu cache-latents`): its first `config.frames` frames at `config.fps`,
        scaled to cover the frame and centre-cropped, whatever its frame size (cache-latents' 16-pixel minimum
        filters training data). Raises VideoReadError (a ValueError) for a file that cannot give one (unreadable, or
        too short)."""
        from univigu.data.video_folder import load_clip

        c = self.config
        return load_clip(path, c.frames, c.height, c.width, fps=c.fps, min_side=1).numpy()

    @torch.no_grad()
    def video_to_text(self, videos: np.ndarray | Tensor, seed: int | torch.Generator = 0, num_steps: int | None = None,
                      instruction: str | None = None, progress: bool | None = None,
                      return_trajectory: bool = False, callback: Callable | None = None) -> UniViGUPipelineOutput:  # fmt: skip
        """Captions for uint8 videos `[B, T, H, W, 3]` (or one `[T, H, W, 3]`) of the config's size in `.texts`
        (`pipe.load_video(path)` reads a file so).

        seed: an int or a torch.Generator. num_steps: text denoising steps (None: `config.caption_steps`, else
        `config.num_steps`). instruction: a question or an instruction as the prompt condition; without it the
        condition is the empty prompt (as in training; all zeros with `config.caption_condition` "zeros").
        progress, return_trajectory (`.text_trajectory` [steps][B] texts, `.token_trajectory` `[steps, B, L]`),
        callback(i, s, video, text): as `text_to_video`.
        """
        self._require_unified("video_to_text")
        videos = self._video_tensor(videos)
        seed, steps = _seed(seed), self.config.steps_for("video_to_text", num_steps)
        self._check_one_text(instruction or "", "the instruction", "instruction")
        taught = [stage for stage in ("recall", "refine") if stage in self.config.extra]  # univigu's V2T stages
        if instruction and taught:
            warnings.warn(f"this model learned to caption in univigu's {' and '.join(taught)} stage, whose "
                          "video-to-text rows have no prompt condition: the instruction is one it never saw, and "
                          "the caption may not answer it", stacklevel=2)  # fmt: skip
        x = self.codec.encode(videos.to(self.device))
        states = self._prompt_states([instruction or ""] * len(x))
        if not instruction and self.config.caption_condition == "zeros":
            states = torch.zeros_like(states)
        step, _, toks = self._recorder(video=False, text=return_trajectory, callback=callback)
        # a video_prefix model runs the clean video once, then only the text per step (exact)
        model = self.transformer if self.transformer.caches_clean_video else self.velocity_model
        out = sample_v2t(
            model, x, states, self.text_flow, self.config.text_length, pad_id=self.text_canvas.pad_id,
            num_steps=steps, shift=self.config.text_shift,
            generator=seed, callback=step, progress=self._progress(progress),
        )  # fmt: skip
        return self._output(None, out.text, [], toks)

    @torch.no_grad()
    def generate(self, prompts: list[str] | str, seed: int | torch.Generator = 0, num_steps: int | None = None,
                 guidance_scale: float | None = None, negative_prompt: str = "", text_update: str | None = None,
                 progress: bool | None = None, return_trajectory: bool = False,
                 callback: Callable | None = None) -> UniViGUPipelineOutput:  # fmt: skip
        """Joint generation: a video and its caption per prompt (`.videos` and `.texts`), denoised together.

        prompts: a str or a list of str (at most `config.prompt_length` - 1 tokens; the text stream is generated).
        seed, num_steps (shared by video and text), guidance_scale and negative_prompt (on the video), progress,
        return_trajectory (both trajectories), callback: as `text_to_video`. text_update: the text rule, "ctmc" or
        "linear-resample" (the released script's; None: `config.text_update`).
        """
        self._require_unified("generate")
        prompts = _prompt_list(prompts)
        self.check_prompts(prompts)
        self._check_negative_prompt(negative_prompt)
        seed, steps = _seed(seed), self.config.steps_for("generate", num_steps)
        scale = self.resolve_guidance_scale(guidance_scale)
        states = self._prompt_states(prompts)
        step, frames, toks = self._recorder(video=return_trajectory, text=return_trajectory, callback=callback)
        out = sample_t2vt(
            self.velocity_model, states, self.text_flow, self._video_shape(len(prompts)), self.config.text_length,
            pad_id=self.text_canvas.pad_id, guidance=self._guidance(scale, negative_prompt),
            text_update=text_update or self.config.text_update, num_steps=steps,
            shift=self.config.shift, generator=seed, callback=step, progress=self._progress(progress),
        )  # fmt: skip
        return self._output(out.video, out.text, frames, toks)

    def __call__(self, prompt: list[str] | str | None = None, video: np.ndarray | Tensor | None = None, *,
                 joint: bool = False, num_inference_steps: int | None = None,
                 generator: int | torch.Generator | None = None, **kwargs: Any) -> UniViGUPipelineOutput:  # fmt: skip
        """diffusers' calling convention over the three tasks: `pipe(prompt)` is `text_to_video`,
        `pipe(prompt, joint=True)` is `generate` (a video and its caption), `pipe(video=videos)` is
        `video_to_text` (a question with it: instruction=). num_inference_steps and generator are
        diffusers' names for num_steps and seed (either name, not both); other keywords go to the method."""
        if num_inference_steps is not None:  # checked here, so that an error names the argument given
            num_inference_steps = check_int("num_inference_steps", num_inference_steps, 1)
        if generator is not None:
            generator = _seed(generator, "generator")
        for ours, theirs, value in (("num_steps", "num_inference_steps", num_inference_steps),
                                    ("seed", "generator", generator)):  # fmt: skip
            if value is not None:
                if ours in kwargs:
                    raise TypeError(f"pass {ours}= or {theirs}=, not both")
                kwargs[ours] = value
        if video is not None:
            if joint or prompt is not None:  # a prompt does not describe a video to caption: no silent reading of it
                raise TypeError("with a video, pass no prompt (nor joint=True): a question about the video is "
                                "instruction=")  # fmt: skip
            return self.video_to_text(video, **kwargs)
        if prompt is None:
            named = "; pipe() names it prompt= (the methods: prompts=)" if "prompts" in kwargs else ""
            raise TypeError(f"pass a prompt (text to video; joint=True: with its caption) or video= (video to "
                            f"text){named}")  # fmt: skip
        return (self.generate if joint else self.text_to_video)(prompt, **kwargs)

    # ---- checks ------------------------------------------------------------------------------------

    def resolve_guidance_scale(self, guidance_scale: float | None) -> float:
        """The guidance scale a call runs with: any finite number (0: unconditional, 1: no guidance, < 0 pushes
        away from the prompt), else the config's."""
        if guidance_scale is None:
            return self.config.guidance_scale
        return check_finite("guidance_scale", guidance_scale)

    def _check_negative_prompt(self, negative_prompt: Any, text_stream: bool = False) -> None:
        # one for the batch, as the null pass has one condition
        self._check_one_text(negative_prompt, "the negative prompt", "negative_prompt", text_stream)

    def _check_one_text(self, text: Any, what: str, argument: str, text_stream: bool = False) -> None:
        """A text given once for the whole batch (a negative prompt, a V2T instruction): its errors name it."""
        if not isinstance(text, str):
            raise TypeError(f"{argument} must be a str, got {type(text).__name__}")
        try:
            self.check_prompts([text], text_stream=text_stream, warn_empty=False)
        except PromptError as error:
            message = str(error).replace("prompt 0", what, 1)  # the only prompt there is
            raise PromptError(message, argument=argument) from None

    def _check_components(self, transformer: nn.Module) -> None:
        """ValueError, naming both numbers, for components that would fail in the first sampling call: prompt
        states of another width than the transformer reads (text_dim); tokenizer ids the prompt encoder has no
        embedding for; and, for a unified model, a text stream (the tokenizer's ids, and the mask source's id) that
        the transformer's text vocabulary (text_vocab_size, plus its mask row) does not cover. A module without a
        config (a test double) is not checked."""
        n = len(self.tokenizer)
        encoder = self.prompt_encoder
        name = f"the prompt encoder ({type(encoder).__name__})"
        if isinstance(encoder, UMT5PromptEncoder):  # transformers' T5 config: d_model, vocab_size
            width, vocab = encoder.encoder.config.d_model, encoder.encoder.get_input_embeddings().num_embeddings
        else:
            config = getattr(encoder, "config", None)
            width, vocab = getattr(config, "dim", None), getattr(config, "vocab_size", None)
        config = getattr(transformer, "config", None)
        text_dim = getattr(config, "text_dim", None)
        what = f"the transformer ({type(transformer).__name__})"
        if width is not None and text_dim is not None and width != text_dim:
            raise ValueError(f"{name} gives states {width} wide; {what} reads {text_dim} (text_dim): use the prompt "
                             "encoder the transformer was trained with")  # fmt: skip
        if vocab is not None and n > vocab:
            raise ValueError(f"the tokenizer has {n} tokens; {name} embeds {vocab} (vocab_size): use the tokenizer "
                             "the prompt encoder was trained with")  # fmt: skip
        if not self.unified:  # a base generator has no text stream
            return
        rows, size = transformer.text_vocab_out, transformer.config.text_vocab_size
        if n > rows:
            row = " plus its mask row" if transformer.config.text_mask_row else ""
            raise ValueError(f"the tokenizer has {n} tokens; {what} reads {size} text tokens (text_vocab_size){row}: "
                             "use the tokenizer the transformer was trained with")  # fmt: skip
        mask_id = self.text_canvas.mask_id
        if self.config.text_source == "mask" and mask_id >= rows:
            raise ValueError(f"text_source 'mask' starts the text from id {mask_id} (the tokenizer has no mask token: "
                             f"the id after its {n}), and {what} has no mask row (text_vocab_size {size}, "
                             "text_mask_row false): use text_source 'uniform'")  # fmt: skip

    def _require_unified(self, what: str) -> None:
        if not self.unified:
            raise ValueError(f"{what} needs a unified model; this checkpoint is a plain Wan generator (text to video only)")

    def _video_tensor(self, videos: Any) -> Tensor:
        """`videos` as a uint8 tensor `[B, T, H, W, 3]` of the config's size, B >= 1 (one video `[T, H, W, 3]` is a
        batch of one); else an error saying what came instead (a path, a ragged list, another shape)."""
        c = self.config
        hint = "read a file with pipe.load_video(path)"
        if isinstance(videos, (str, os.PathLike)):
            raise TypeError(f"pass frames, not a path ({str(videos)!r}); {hint}")
        want = (c.frames, c.height, c.width, 3)
        expected = f"expected uint8 videos [B, {', '.join(map(str, want))}]"
        try:
            tensor = videos if isinstance(videos, Tensor) else torch.as_tensor(np.asarray(videos))
        except (TypeError, ValueError):  # numpy / torch cannot make one array of it
            got = f"a {type(videos).__name__} whose items do not stack into one array (videos of different sizes?)" \
                if isinstance(videos, (list, tuple)) else type(videos).__name__  # fmt: skip
            raise ValueError(f"{expected}, got {got}; {hint}") from None
        if tensor.ndim == 4 and tuple(tensor.shape) == want:  # one video, as one str is one prompt
            tensor = tensor[None]
        if tensor.dtype != torch.uint8 or tensor.ndim != 5 or tuple(tensor.shape[1:]) != want:
            kind = f"{videos.dtype} array" if isinstance(videos, np.ndarray) else str(tensor.dtype)
            if tensor.is_floating_point() and tensor.shape[-1:] == (3,):
                hint = "frames are uint8 in [0, 255]: (video * 255).round() cast to uint8 for floats in [0, 1]"
                if tuple(tensor.shape[-4:]) != want:
                    hint += f", of the model's size ({want[0]} frames of {want[1]}x{want[2]}: pipe.load_video(path))"
            raise ValueError(f"{expected}, got {kind} {tuple(tensor.shape)}; {hint}")
        if len(tensor) == 0:
            raise ValueError(f"no videos: the batch is empty {tuple(tensor.shape)}; pass at least one")
        return tensor

    def _check_fit(self, transformer: nn.Module) -> None:
        """ValueError, naming the config field, for a config the models cannot run: a prompt canvas longer than
        the prompt encoder's positions, a video size the codec or the transformer's patches do not divide; and,
        naming both numbers, for components that do not fit together (`_check_components`)."""
        self._check_components(transformer)
        c = self.config
        if isinstance(self.prompt_encoder, PromptEncoder) and c.prompt_length > self.prompt_encoder.config.max_length:
            raise ValueError(f"prompt_length {c.prompt_length} is longer than the prompt encoder reads "
                             f"(max_length {self.prompt_encoder.config.max_length}); use at most that")  # fmt: skip
        latent = self.codec.latent_shape(c.frames, c.height, c.width)[1:]  # the codec's own size check
        patch = getattr(getattr(transformer, "config", None), "patch_size", None)  # None: a bare nn.Module
        for name, value, cells, p in zip(("frames", "height", "width"), (c.frames, c.height, c.width), latent,
                                         patch or ()):  # fmt: skip
            if cells % p:
                step = value // cells * p  # pixels (frames) per latent cell x cells per patch
                raise ValueError(f"{name} must be a multiple of {step} for this model (patch_size {tuple(patch)}), "
                                 f"got {value} (nearest valid: {max(step, round(value / step) * step)})")
