"""What one training batch costs, for each stage (METHOD.md section 5).

A task is an `nn.Module` called as `task(batch, generator=g) -> {"loss": tensor, **logs}` with
a batch of {"video": uint8 [B, T, H, W, 3], "prompt": [str], "caption": [str]}; the trainer
knows nothing else about it.

- `GeneratorTask` (stage `base`): a plain Wan text-to-video generator (diffusers'
  `WanTransformer3DModel`) and the prompt encoder, trained together with the video flow.
- `UnifiedTask` (stages `recall` and `refine`): the unified model on the regime mix T2V /
  V2T / joint; the text target is the prompt (Knowledge Recall) or the detailed caption
  (Capability Refinement). The prompt encoder is frozen, as umT5 is.
- `CachedLatentTask`: `UnifiedTask` on a latent cache (VAE latents and prompt states made by
  `univigu cache-latents`), for Wan-scale training.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from univigu.data.codec import PixelCodec
from univigu.data.latent_cache import LatentCodec
from univigu.data.tokenizer import TextCanvas
from univigu.flow.regimes import (
    CAPTION_CONDITIONS, GUIDANCE_TEXTS, V2T, RegimeMix, TrainingBatch, make_training_batch, select_prompt, unified_loss,
)
from univigu.flow.text import TextFlow, normal_draw, uniform_draw
from univigu.flow.video import VideoFlow, video_timestep


def per_sample(draw: Callable[[torch.Generator, slice], Any], seeds: list[int], device: torch.device) -> list[Any]:
    """Run `draw(generator, rows)` once per sample, each with a generator seeded by its own seed.

    Noise keyed by sample (the trainer's `sample_seeds`, one per global position in the run)
    does not depend on how a global batch is split over processes.
    """
    return [draw(torch.Generator(device=device).manual_seed(seed), slice(i, i + 1)) for i, seed in enumerate(seeds)]


class GeneratorTask(nn.Module):
    """Text-to-video flow matching for a plain Wan generator; `cond_dropout` of the prompts are
    replaced by the empty prompt so that classifier-free guidance works."""

    def __init__(self, transformer: nn.Module, prompt_encoder: nn.Module, prompt_canvas: TextCanvas,
                 video_flow: VideoFlow, cond_dropout: float = 0.1, codec: Any = None) -> None:  # fmt: skip
        super().__init__()
        self.transformer, self.prompt_encoder = transformer, prompt_encoder
        self.prompt_canvas, self.video_flow, self.cond_dropout = prompt_canvas, video_flow, cond_dropout
        self.codec = codec or PixelCodec()

    def _draw(self, generator: torch.Generator | None, shape: tuple[int, ...], device) -> tuple[Tensor, ...]:
        """Condition dropout [B], noise levels [B] and noise `shape` for shape[0] samples."""
        dropped = uniform_draw(shape[:1], generator, device) < self.cond_dropout
        s = self.video_flow.sample_time(shape[0], generator, device)
        return dropped, s, normal_draw(shape, generator, device)

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                sample_seeds: list[int] | None = None) -> dict[str, Tensor]:  # fmt: skip
        device = self.transformer.device
        x0 = self.codec.encode(batch["video"].to(device))
        if sample_seeds is None:
            dropped, s, noise = self._draw(generator, tuple(x0.shape), device)
        else:
            parts = per_sample(lambda g, rows: self._draw(g, tuple(x0[rows].shape), device), sample_seeds, device)
            dropped, s, noise = (torch.cat(p) for p in zip(*parts))
        prompts = ["" if d else p for p, d in zip(batch["prompt"], dropped.tolist())]
        ids, mask = self.prompt_canvas.encode(prompts)
        states = self.prompt_encoder(ids.to(device), mask.to(device))
        x_s = VideoFlow.add_noise(x0, s, noise)
        output = self.transformer(hidden_states=x_s, timestep=video_timestep(s), encoder_hidden_states=states,
                                  return_dict=False)[0]  # fmt: skip
        velocity = self.video_flow.velocity(output, x_s, s)
        loss = self.video_flow.training_loss(velocity, VideoFlow.velocity_target(x0, noise), s).mean()
        return {"loss": loss, "video": loss.detach()}


class UnifiedTask(nn.Module):
    """The unified model on a per-sample regime mix; losses L = w_v L_video + w_t L_text."""

    def __init__(
        self,
        transformer: nn.Module,
        prompt_encoder: nn.Module,
        prompt_canvas: TextCanvas,
        text_canvas: TextCanvas,
        video_flow: VideoFlow,
        text_flow: TextFlow,
        mix: RegimeMix,
        text_target: Literal["prompt", "caption"] = "prompt",
        video_weight: float = 1.0,
        text_weight: float = 1.0,
        text_loss: Literal["ce", "gkl"] = "ce",
        codec: Any = None,
        caption_condition: Literal["empty_prompt", "zeros"] = "empty_prompt",
        guidance_text: Literal["empty_prompt", "prompt"] = "empty_prompt",
    ) -> None:
        super().__init__()
        if text_target not in ("prompt", "caption"):
            raise ValueError(f"text_target must be 'prompt' or 'caption', got {text_target!r}")
        for name, value, valid in (("caption_condition", caption_condition, CAPTION_CONDITIONS),
                                   ("guidance_text", guidance_text, GUIDANCE_TEXTS)):  # fmt: skip
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        self.transformer, self.prompt_encoder = transformer, prompt_encoder.requires_grad_(False).eval()
        self.prompt_canvas, self.text_canvas = prompt_canvas, text_canvas
        self.video_flow, self.text_flow, self.mix = video_flow, text_flow, mix
        self.text_target, self.video_weight, self.text_weight, self.text_loss = (
            text_target, video_weight, text_weight, text_loss)  # fmt: skip
        self.codec = codec or PixelCodec()
        # trained as the pipeline samples: V2T rows' condition, and the text stream of dropped-condition T2V rows
        # (guidance's null pass: the empty prompt's tokens, or with "prompt" the prompt's own)
        self.caption_condition, self.guidance_text = caption_condition, guidance_text

    def train(self, mode: bool = True) -> "UnifiedTask":
        super().train(mode)
        self.prompt_encoder.eval()  # frozen, as umT5 is
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Prompt states `[B, S, D]` from the frozen prompt encoder."""
        ids, mask = self.prompt_canvas.encode(prompts)
        device = self.transformer.device
        return self.prompt_encoder(ids.to(device), mask.to(device))

    def prompt_conditions(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The batch's prompt states `[B, S, D]` and the empty prompt's `[1, S, D]` (the null condition)."""
        return self.encode_prompts(batch["prompt"]), self.encode_prompts([""])

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                sample_seeds: list[int] | None = None) -> dict[str, Tensor]:  # fmt: skip
        device = self.transformer.device
        x0 = self.codec.encode(batch["video"].to(device))
        target, _ = self.text_canvas.encode(batch[self.text_target])  # caption, end, padding: all scored
        prompt_tokens, prompt_mask = self.text_canvas.encode(batch["prompt"])
        null_text, null_mask = self.text_canvas.encode([""])
        if self.guidance_text == "prompt":
            null_text = null_mask = None
        else:
            null_text, null_mask = null_text.to(device), null_mask.to(device)
        target, prompt_tokens, prompt_mask = target.to(device), prompt_tokens.to(device), prompt_mask.to(device)

        def draw(g: torch.Generator | None, rows: slice) -> TrainingBatch:
            return make_training_batch(
                x0[rows], target[rows], None, prompt_tokens[rows], prompt_mask[rows], null_text, null_mask,
                mix=self.mix, video_flow=self.video_flow, text_flow=self.text_flow, generator=g,
            )  # fmt: skip

        if sample_seeds is None:
            tb = draw(generator, slice(None))
        else:
            parts = per_sample(draw, sample_seeds, device)
            tb = TrainingBatch(**{f.name: torch.cat([getattr(p, f.name) for p in parts])
                                  for f in dataclasses.fields(TrainingBatch)})  # fmt: skip
        states, null = self.prompt_conditions(batch)
        states, _ = select_prompt(tb.keep_prompt_condition, states, null)
        if self.caption_condition == "zeros":  # dropped-condition T2V rows keep the empty prompt: guidance's null
            states = torch.where((tb.regime == V2T)[:, None, None], 0.0, states)
        # no padded text (V2T and joint rows generate every position): no mask, so attention can take the fastest
        # kernels (flash, cuDNN), which take none; one host sync per step
        text_mask = None if bool(tb.text_mask.all()) else tb.text_mask
        output, logits = self.transformer(tb.video, tb.text, tb.t_video, tb.t_text, states, text_mask, None)
        velocity = self.video_flow.velocity(output, tb.video, tb.video_time)
        loss, logs = unified_loss(
            velocity, logits, tb, self.text_flow, self.video_weight, self.text_weight, self.text_loss, self.video_flow
        )
        return {"loss": loss, **logs}


class CachedLatentTask(UnifiedTask):
    """`UnifiedTask` on a latent cache: the batch holds the VAE latents ("video") and the prompt states
    ("prompt_states"), so neither the VAE nor the prompt encoder runs (the encoder is not even held)."""

    def __init__(self, transformer, prompt_encoder, *args, null_states: torch.Tensor, **kwargs) -> None:
        super().__init__(transformer, torch.nn.Identity(), *args, codec=LatentCodec(), **kwargs)
        self.register_buffer("null_states", null_states, persistent=False)  # [1, S, D]: the empty prompt

    def prompt_conditions(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's cached prompt states `[B, S, D]` and the cache's empty-prompt states `[1, S, D]`."""
        return batch["prompt_states"].to(self.null_states.device), self.null_states
