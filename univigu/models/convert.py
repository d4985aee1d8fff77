"""Convert a released Uni-ViGU checkpoint (the official `WanUnifiedTransformer` state dict) to ours.

The official model (github.com/Fr0zenCrane/Uni-ViGU, model/transformer.py) wraps diffusers' Wan modules
under its own top-level names; below those names the keys are diffusers' Wan keys, which are also ours:

    official                                    ours
    vocab_embed.*                               text_embedding.*
    patch_embedding.*                           patch_embedding.*
    cond_text_embedder.*                        condition_embedder.text_embedder.*
    time_embedding_v.{time_embedder,time_proj}  condition_embedder.{time_embedder,time_proj}
    time_embedding_t.{time_embedder,time_proj}  time_embedder_t, time_proj_t
    scale_shift_table_v / scale_shift_table_t   scale_shift_table / scale_shift_table_t
    blocks.N.{attn1,attn2,norm2,ffn,ffn_t,scale_shift_table}.*   the same
    video_head.proj_out.*                       proj_out.*
    text_head.linear.*                          text_proj_out.*
    text_head.norm_final.weight                 text_norm.weight

Decisions and assumptions:
- Two things the released code does differently from Wan's video conventions, which our text stream
  otherwise mirrors, are switched on in the converted model's config: its text head multiplies the LayerNorm
  output by a learned `norm_final.weight` (torch's LayerNorm eps, 1e-5; `text_norm_weight`), and its 1D text
  RoPE rotates channel i with channel i + head_dim/2 (flash-attn's non-interleaved layout; `text_rope_halves`)
  where Wan's 3D RoPE rotates consecutive pairs. Neither can be folded into the other weights.
- Buffers the official model recomputes (`rotary_emb_*`: RoPE tables, `timesteps_proj`) carry no learned
  values; they are dropped and listed in the report.
- Keys may be prefixed by FSDP / torch.compile wrappers (`_fsdp_wrapped_module.`, `_orig_mod.`,
  `module.`) and the dict may sit under a `model` (or `state_dict`) key; both are undone first.
- The Wan config is read from the shapes (attention_head_dim is not in the shapes: 128, Wan's, unless
  given); the vocabulary size and the mask row from `vocab_embed` (rows = vocab + 1 with a mask token).
Every other key is an error: `ConversionError` lists all unmapped and missing keys at once.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from univigu.models.transformer import UniViGUTransformer

__all__ = ["ConversionError", "ConversionReport", "convert_official_state_dict", "load_official_state_dict"]

_WRAPPERS = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.", "module.")

# official prefix -> our prefix (first match wins; a prefix ends at a "." boundary)
_RENAMES = (
    ("vocab_embed.", "text_embedding."),
    ("patch_embedding.", "patch_embedding."),
    ("cond_text_embedder.", "condition_embedder.text_embedder."),
    ("time_embedding_v.time_embedder.", "condition_embedder.time_embedder."),
    ("time_embedding_v.time_proj.", "condition_embedder.time_proj."),
    ("time_embedding_t.time_embedder.", "time_embedder_t."),
    ("time_embedding_t.time_proj.", "time_proj_t."),
    ("scale_shift_table_v", "scale_shift_table"),
    ("scale_shift_table_t", "scale_shift_table_t"),
    ("video_head.proj_out.", "proj_out."),
    ("text_head.linear.", "text_proj_out."),
    ("text_head.norm_final.", "text_norm."),
)
_BLOCK = re.compile(r"^blocks\.(\d+)\.(attn1|attn2|norm2|ffn|ffn_t)\.|^blocks\.(\d+)\.scale_shift_table$")
_DERIVED = re.compile(r"^(rotary_emb_text|rotary_emb_video|time_embedding_[vt]\.timesteps_proj)\.")


class ConversionError(ValueError):
    """The checkpoint does not map onto our model; the message lists every offending key."""


@dataclass
class ConversionReport:
    mapped: dict[str, str] = field(default_factory=dict)  # official key -> our key
    dropped: list[str] = field(default_factory=list)  # derived buffers (RoPE tables, timestep sinusoids)
    config: dict = field(default_factory=dict)  # the UniViGUTransformer config built


def strip_wrappers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Undo FSDP / compile / DDP key prefixes anywhere in a key (FSDP nests them per wrapped module)."""
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPERS:
            key = key.replace(prefix, "")
        out[key] = value
    return out


def _our_key(key: str) -> str | None:
    if _BLOCK.match(key):
        return key
    for old, new in _RENAMES:
        if key == old or key.startswith(old) and old.endswith("."):
            return new + key[len(old):]
    return None


def _infer_config(state: dict[str, Tensor], head_dim: int, vocab_size: int | None) -> dict:
    patch = state["patch_embedding.weight"]
    dim = patch.shape[0]
    if dim % head_dim:
        raise ConversionError(f"hidden size {dim} is not a multiple of attention_head_dim {head_dim}: give the "
                              "checkpoint's head size (not readable from its weights; Wan2.1's is 128), "
                              "`--attention-head-dim` on the command line")  # fmt: skip
    rows = state["vocab_embed.weight"].shape[0]
    vocab_size = rows if vocab_size is None else vocab_size
    if rows - vocab_size not in (0, 1):
        raise ConversionError(f"vocab_embed has {rows} rows; with a vocabulary of {vocab_size} it must have "
                              f"{vocab_size} or {vocab_size + 1} (mask token)")  # fmt: skip
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    return dict(
        patch_size=tuple(patch.shape[2:]),
        num_attention_heads=dim // head_dim,
        attention_head_dim=head_dim,
        in_channels=patch.shape[1],
        out_channels=state["video_head.proj_out.weight"].shape[0] // patch.shape[2:].numel(),
        text_dim=state["cond_text_embedder.linear_1.weight"].shape[1],
        freq_dim=state["time_embedding_v.time_embedder.linear_1.weight"].shape[1],
        ffn_dim=state["blocks.0.ffn.net.0.proj.weight"].shape[0],
        num_layers=max(blocks) + 1,
        cross_attn_norm="blocks.0.norm2.weight" in state,
        text_vocab_size=vocab_size,
        text_mask_row=rows == vocab_size + 1,
        text_rope_halves=True,
        text_norm_weight=True,
    )


def convert_official_state_dict(
    state: dict[str, Tensor], attention_head_dim: int = 128, text_vocab_size: int | None = None
) -> tuple[UniViGUTransformer, ConversionReport]:
    """Our `UniViGUTransformer` holding the official weights (dtypes kept), and what was mapped or dropped.

    Raises ConversionError naming every unmapped official key and every parameter of ours left unfilled.
    """
    state = strip_wrappers(state)
    report = ConversionReport()
    ours: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state.items():
        if _DERIVED.match(key):
            report.dropped.append(key)
        elif (new := _our_key(key)) is not None:
            ours[new] = value
            report.mapped[key] = new
        else:
            unmapped.append(key)
    required = ("patch_embedding.weight", "vocab_embed.weight", "video_head.proj_out.weight",
                "cond_text_embedder.linear_1.weight", "time_embedding_v.time_embedder.linear_1.weight",
                "blocks.0.ffn.net.0.proj.weight")  # fmt: skip
    absent = [k for k in required if k not in state]
    if unmapped or absent:
        raise ConversionError(f"unmapped official keys: {sorted(unmapped)}; keys needed to read the config that are "
                              f"missing: {absent}")  # fmt: skip
    report.config = _infer_config(state, attention_head_dim, text_vocab_size)
    with torch.device("meta"):
        model = UniViGUTransformer(**report.config)
    missing, unexpected = model.load_state_dict(ours, strict=False, assign=True)
    if missing or unexpected:
        raise ConversionError(f"after renaming: our parameters not filled {sorted(missing)}; renamed keys we do not "
                              f"have {sorted(unexpected)}")  # fmt: skip
    return model, report


def load_official_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A released `.pth` / `.pt` (torch.load, weights only) or `.safetensors`; unwraps a `model` /
    `state_dict` entry."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        with open(path, "rb") as f:
            pickled = f.read(1) == b"\x80"  # a pickle's protocol mark: torch.save's legacy format
        if not pickled and not zipfile.is_zipfile(path):
            raise ConversionError(f"{path} is not a torch checkpoint (neither torch.save's zip archive nor its "
                                  "legacy pickle)")  # fmt: skip
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # torch.save's legacy (non-zip) format cannot be memory-mapped
            if "mmap can only be used" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ConversionError:
        raise
    except Exception as error:  # torch and safetensors raise many kinds (unpickling, header, zip errors)
        why = f"{type(error).__name__}: {error}"[:300]
        raise ConversionError(f"{path} cannot be read as a checkpoint ({why})") from error
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors (or one under 'model')")
    return state
