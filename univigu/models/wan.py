"""Wan2.1's frozen components from a local diffusers-format folder: the VAE and the umT5 prompt encoder.

A Wan2.1-T2V-Diffusers folder holds `transformer/`, `vae/`, `text_encoder/`, `tokenizer/` (and
`scheduler/`). The unified transformer is built from `transformer/` by `UniViGUTransformer.from_wan`;
this module wraps the rest behind the two interfaces the pipeline and the trainer already use:

- `WanVAECodec` is a video codec (`encode` uint8 videos [B, T, H, W, 3] -> normalised latents
  [B, 16, T', H', W'], `decode` back, `latent_shape`), with latents normalised by the VAE config's
  latents_mean / latents_std exactly as diffusers' WanPipeline does;
- `UMT5PromptEncoder` is a prompt encoder (`forward(ids, mask)` -> states [B, S, 4096], padded
  positions zeroed, as WanPipeline zeroes them; the canvas pads to 512 tokens).

`WanComponents` bundles them with the tokenizer; `enable_model_cpu_offload` keeps a component on the CPU
except while it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "WanVAECodec", "UMT5PromptEncoder", "WanComponents", "check_video_size", "is_wan_folder", "load_wan_transformer",
    "set_rope_theta",
]  # fmt: skip

WAN_PROMPT_LENGTH = 512  # WanPipeline's max_sequence_length


def set_rope_theta(wan: nn.Module, theta: float) -> nn.Module:
    """Give a diffusers `WanTransformer3DModel` another video RoPE base (diffusers fixes it at 1e4) and record it
    in its config as `rope_theta`, so `save_pretrained` keeps it and `from_pretrained` + this call restore it.

    Why: with theta 1e4, an axis of 8 patches (the toy world's) turns only the first 3 of its 8 frequency pairs
    by more than a radian, so attention hardly sees where a patch is; a small theta spreads all of them over it.
    """
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    old = wan.rope
    wan.rope = WanRotaryPosEmbed(old.attention_head_dim, old.patch_size, old.max_seq_len, theta=theta).to(
        old.freqs_cos.device
    )
    wan.register_to_config(rope_theta=theta)
    return wan


def load_wan_transformer(path: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> nn.Module:
    """diffusers' `WanTransformer3DModel.from_pretrained` (local files only), with the `rope_theta` its config
    may carry (written by `set_rope_theta`; diffusers' own constructor has no such argument) put back. Strict, as
    `UniViGUTransformer.from_pretrained`: weights that do not match the config are an error naming the keys."""
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging

    from univigu.models.loading import check_checkpoint

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # diffusers warns that `rope_theta` is not a constructor argument
    try:
        check_checkpoint(WanTransformer3DModel, Path(path))
        wan = WanTransformer3DModel.from_pretrained(path, torch_dtype=torch_dtype, local_files_only=True)
    finally:
        logging.set_verbosity(level)
    theta = wan.config.get("rope_theta")
    return set_rope_theta(wan, theta) if theta is not None else wan


def is_wan_folder(path: str | os.PathLike) -> bool:
    """True for a diffusers Wan text-to-video folder (transformer/, vae/, text_encoder/, tokenizer/)."""
    path = Path(path)
    return all((path / sub).is_dir() for sub in ("transformer", "vae", "text_encoder", "tokenizer"))


def check_video_size(frames: int, height: int, width: int, temporal: int, spatial: int,
                     patch: tuple[int, int, int] = (1, 2, 2)) -> None:  # fmt: skip
    """Raise ValueError naming the nearest valid size unless frames = temporal*k + 1 and height, width are
    multiples of spatial * patch (so that the latent grid divides into patches)."""
    problems = []
    if frames < 1 or (frames - 1) % temporal:
        near = max(0, round((frames - 1) / temporal)) * temporal + 1
        problems.append(f"frames must be {temporal}k+1 for the Wan VAE, got {frames} (nearest valid: {near})")
    for name, value, p in (("height", height, patch[1]), ("width", width, patch[2])):
        step = spatial * p
        if value < step or value % step:
            near = max(step, round(value / step) * step)
            problems.append(f"{name} must be a multiple of {step} (VAE x{spatial}, patch {p}), got {value} "
                            f"(nearest valid: {near})")  # fmt: skip
    if (frames - 1) // temporal + 1 < patch[0] or ((frames - 1) // temporal + 1) % patch[0]:
        problems.append(f"latent frames {(frames - 1) // temporal + 1} are not a multiple of the time patch {patch[0]}")
    if problems:
        raise ValueError("; ".join(problems))


@contextlib.contextmanager
def _placed(module: nn.Module, device: torch.device | None) -> Iterator[None]:
    """With `device` set (CPU offload): the module on `device` inside the block, back on the CPU after."""
    if device is None:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def vae_factors(vae_config: Any) -> tuple[int, int]:
    """(temporal, spatial) downsampling of a Wan VAE, from its config (an object or the config.json dict)."""
    downsample = vae_config["temperal_downsample"] if isinstance(vae_config, dict) else vae_config.temperal_downsample
    return 2 ** sum(downsample), 2 ** len(downsample)


class WanVAECodec:
    """uint8 videos [B, T, H, W, 3] <-> normalised Wan VAE latents [B, z_dim, (T-1)/4+1, H/8, W/8].

    Encoding takes the posterior mode (deterministic, so a latent cache is reproducible); latents are
    (z - latents_mean) / latents_std, the space Wan's transformer was trained in.
    """

    def __init__(self, vae: nn.Module, patch_size: tuple[int, int, int] = (1, 2, 2)) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.patch_size = tuple(patch_size)
        cfg = vae.config
        self.channels = cfg.z_dim
        self.temporal, self.spatial = vae_factors(cfg)
        self.offload_device: torch.device | None = None  # set by enable_model_cpu_offload

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32,
                        patch_size: tuple[int, int, int] = (1, 2, 2)) -> "WanVAECodec":  # fmt: skip
        from diffusers import AutoencoderKLWan

        return cls(AutoencoderKLWan.from_pretrained(path, torch_dtype=torch_dtype, local_files_only=True), patch_size)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.vae.save_pretrained(path)

    def latent_space(self) -> dict[str, Any]:
        """What a latent means: the VAE's channels and the per-channel normalisation (a latent cache records it, so
        that a stage does not train on latents of another VAE)."""
        cfg = self.vae.config
        return {"z_dim": cfg.z_dim, "latents_mean": list(cfg.latents_mean), "latents_std": list(cfg.latents_std)}

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, self.channels, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, device=like.device, dtype=torch.float32).view(shape)
        std = torch.tensor(self.vae.config.latents_std, device=like.device, dtype=torch.float32).view(shape)
        return mean, std

    def check_size(self, frames: int, height: int, width: int) -> None:
        """ValueError naming the nearest valid size for a video the VAE + patching cannot take."""
        check_video_size(frames, height, width, self.temporal, self.spatial, self.patch_size)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """`(C, T', H', W')` of the latent of a video of this size."""
        self.check_size(frames, height, width)
        return (self.channels, (frames - 1) // self.temporal + 1, height // self.spatial, width // self.spatial)

    @property
    def _device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """uint8 [B, T, H, W, 3] -> float32 normalised latents [B, C, T', H', W'] (on the video's device)."""
        if video.dtype != torch.uint8 or video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"expected uint8 videos [B, T, H, W, 3], got {video.dtype} {tuple(video.shape)}")
        self.check_size(*video.shape[1:4])
        with _placed(self.vae, self.offload_device):
            device, dtype = self._device, self.vae.dtype
            x = video.to(device).permute(0, 4, 1, 2, 3).to(dtype) / 127.5 - 1.0
            z = self.vae.encode(x).latent_dist.mode().float()
        mean, std = self._stats(z)
        return ((z - mean) / std).to(video.device)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, C, T', H', W'] -> uint8 videos [B, T, H, W, 3] (on the latents' device)."""
        mean, std = self._stats(latents)
        z = latents.float() * std + mean
        with _placed(self.vae, self.offload_device):
            x = self.vae.decode(z.to(self._device, self.vae.dtype), return_dict=False)[0]
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 4, 1).contiguous().to(latents.device)


class UMT5PromptEncoder(nn.Module):
    """umT5 encoder behind the prompt-encoder call: forward(ids [B, S], mask [B, S] bool) -> states
    [B, S, D], zero where mask is False (WanPipeline's `prompt_embeds` after its zero padding)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.offload_device: torch.device | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32) -> "UMT5PromptEncoder":
        from transformers import UMT5EncoderModel

        return cls(UMT5EncoderModel.from_pretrained(path, dtype=torch_dtype, local_files_only=True))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.encoder.save_pretrained(path)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        with _placed(self.encoder, self.offload_device):
            device = next(self.encoder.parameters()).device
            states = self.encoder(ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        return (states * mask.to(states.device)[..., None].to(states.dtype)).to(ids.device)


def folder_fingerprint(folder: Path, edge: int = 1 << 20) -> str:
    """16 hex digits that change when a model folder's files do: each file's name, size, and its first and last
    `edge` bytes (all of a small file). Reads a few MiB, not gigabytes of weights; independent of where the
    folder is and of the dtype it is loaded in. Hidden files (a download tool's records) are left out."""
    digest = hashlib.sha256()
    files = (p for p in folder.rglob("*") if p.is_file())
    for path in sorted(p for p in files if not any(part.startswith(".") for part in p.relative_to(folder).parts)):
        digest.update(f"{path.relative_to(folder).as_posix()}:{path.stat().st_size}:".encode())
        hash_edges(digest, path, edge)
    return digest.hexdigest()[:16]


def hash_edges(digest: "hashlib._Hash", path: Path, edge: int = 1 << 20) -> None:
    """Feed a file's first and last `edge` bytes (all of a small file) to `digest`: tells files of one size apart
    (weights, videos) without reading them whole."""
    with open(path, "rb") as f:
        digest.update(f.read(edge))
        if path.stat().st_size > 2 * edge:
            f.seek(-edge, os.SEEK_END)
        digest.update(f.read(edge))


@dataclass
class WanComponents:
    """The VAE codec, the umT5 prompt encoder and the tokenizer of a Wan2.1 diffusers folder."""

    codec: WanVAECodec
    prompt_encoder: UMT5PromptEncoder
    tokenizer: object  # a transformers T5 tokenizer (pad, eos; no mask token)
    flow_shift: float | None = None  # the folder's scheduler flow_shift, when it has one
    folder: Path | None = None  # the Wan folder loaded from (None: built from modules in memory)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32,
                    patch_size: tuple[int, int, int] = (1, 2, 2)) -> "WanComponents":  # fmt: skip
        """Load from a local folder only (never the network). umT5 in `torch_dtype`; the VAE always in
        float32, as WanPipeline runs it."""
        from transformers import AutoTokenizer

        path = Path(path)
        if not is_wan_folder(path):
            missing = [s for s in ("transformer", "vae", "text_encoder", "tokenizer") if not (path / s).is_dir()]
            raise FileNotFoundError(f"{path} is not a Wan2.1 diffusers folder: missing {missing}")
        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
        scheduler = path / "scheduler" / "scheduler_config.json"
        shift = json.loads(scheduler.read_text()).get("flow_shift") if scheduler.exists() else None
        return cls(
            codec=WanVAECodec.from_pretrained(path / "vae", torch.float32, patch_size),
            prompt_encoder=UMT5PromptEncoder.from_pretrained(path / "text_encoder", torch_dtype),
            tokenizer=tokenizer,
            flow_shift=shift,
            folder=path,
        )

    def fingerprint(self) -> dict[str, str] | None:
        """vae / text_encoder / tokenizer -> `folder_fingerprint` of the folder loaded from (None without one): what
        a latent cache records of the encoders that made it. Read on demand: loading a pipeline needs none."""
        if self.folder is None:
            return None
        return {part: folder_fingerprint(self.folder / part) for part in ("vae", "text_encoder", "tokenizer")}

    def enable_model_cpu_offload(self, device: str | torch.device = "cuda") -> None:
        """Keep the VAE and umT5 on the CPU, moving each to `device` only while it runs."""
        device = torch.device(device)
        for part in (self.codec.vae, self.prompt_encoder.encoder):
            part.to("cpu")
        self.codec.offload_device = self.prompt_encoder.offload_device = device

    def encode_video(self, video: Tensor) -> Tensor:
        """uint8 [B, T, H, W, 3] -> normalised latents [B, C, T', H', W']."""
        return self.codec.encode(video)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, C, T', H', W'] -> uint8 [B, T, H, W, 3]."""
        return self.codec.decode(latents)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], length: int = WAN_PROMPT_LENGTH) -> tuple[Tensor, Tensor]:
        """Prompt states [B, length, D] (padded positions zero) and their mask [B, length] bool; prompts longer
        than the canvas are truncated, as WanPipeline truncates them."""
        from univigu.data.tokenizer import TextCanvas

        ids, mask = TextCanvas(self.tokenizer, length).encode([" ".join(p.split()) for p in prompts], truncate=True)
        return self.prompt_encoder(ids, mask), mask
