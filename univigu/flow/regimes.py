"""Training regimes: each sample of a batch is trained as T2V, V2T or joint (T2VT).

| regime | video stream          | text stream                      | losses | prompt condition      |
|--------|-----------------------|----------------------------------|--------|-----------------------|
| T2V    | noised (s ~ video)    | clean prompt tokens (t_text = 0) | video  | kept (dropout for CFG)|
| V2T    | clean (t_video = 0)   | noised target (t ~ U[0, 1))      | text   | dropped (it leaks)    |
| joint  | noised, level s       | noised target, t = 1 - s         | both   | kept (dropout for CFG)|

In the joint regime both streams share one noise level, so both network timesteps are ~1000 s, as
in the joint sampler. The caller swaps the prompt states for the null condition where
`keep_prompt_condition` is False (`select_prompt` does it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from univigu.checks import check_finite
from univigu.flow.text import TextFlow, normal_draw, text_timestep, uniform_draw
from univigu.flow.video import VideoFlow, video_timestep

T2V, V2T, JOINT = 0, 1, 2
REGIME_NAMES = ("t2v", "v2t", "joint")
# V2T's prompt condition: the empty prompt's states (ours) or all zeros (the released script's)
CAPTION_CONDITIONS = ("empty_prompt", "zeros")
# the text stream of T2V's guidance null pass: the empty prompt's tokens (ours) or the prompt's (the released script's)
GUIDANCE_TEXTS = ("empty_prompt", "prompt")


@dataclass
class RegimeMix:
    """Relative probabilities of the regimes (normalised when drawn) and the CFG condition dropout."""

    t2v: float = 1.0
    v2t: float = 1.0
    joint: float = 1.0
    cond_dropout: float = 0.1

    def __post_init__(self) -> None:
        # checked here, not when first drawn: a bad weight otherwise surfaces mid-training, a bad dropout never
        weights = [check_finite(name, getattr(self, name)) for name in REGIME_NAMES]
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"regime weights {REGIME_NAMES} must be >= 0 with a positive sum, got {weights}")
        if not 0 <= check_finite("cond_dropout", self.cond_dropout) <= 1:
            raise ValueError(f"cond_dropout must be a probability in [0, 1], got {self.cond_dropout}")

    def probs(self) -> Tensor:
        """The regimes' probabilities `[3]` (t2v, v2t, joint), the weights normalised."""
        p = torch.tensor([self.t2v, self.v2t, self.joint], dtype=torch.float64)
        return p / p.sum()


@dataclass
class TrainingBatch:
    """One batch ready for `model(video, text, t_video, t_text, prompt_states, text_mask, prompt_mask)`."""

    video: Tensor  # [B, ...] noised video (clean for V2T rows)
    text: Tensor  # [B, L] long: text-stream input (clean prompt for T2V rows, noised target otherwise)
    text_mask: Tensor  # [B, L] bool: key-padding mask of the text stream
    t_video: Tensor  # [B] network timestep 1000 s
    t_text: Tensor  # [B] network timestep round((1 - t) * 1000)
    video_time: Tensor  # [B] noise level s in [0, 1]
    text_time: Tensor  # [B] text flow time t in [0, 1] (1 = clean)
    velocity_target: Tensor  # [B, ...] e - x0
    text_target: Tensor  # [B, L] long: clean target tokens
    text_loss_mask: Tensor  # [B, L] bool: positions scored by the text loss (none on T2V rows)
    video_weight: Tensor  # [B] 1.0 where the video loss applies (T2V, joint)
    text_weight: Tensor  # [B] 1.0 where the text loss applies (V2T, joint)
    keep_prompt_condition: Tensor  # [B] bool: False -> use the null prompt condition
    regime: Tensor  # [B] long: T2V, V2T or JOINT


def make_training_batch(
    x0: Tensor,
    text_target: Tensor,
    text_target_mask: Tensor | None,
    prompt_tokens: Tensor | None = None,
    prompt_mask: Tensor | None = None,
    null_text: Tensor | None = None,
    null_text_mask: Tensor | None = None,
    *,
    mix: RegimeMix,
    video_flow: VideoFlow,
    text_flow: TextFlow,
    generator: torch.Generator | None = None,
) -> TrainingBatch:
    """Draw a regime per sample and build the noised inputs, targets and loss masks.

    x0 [B, ...] clean video latents. text_target [B, L] the text canvas to generate (caption, end, pad)
    and text_target_mask [B, L] the positions generated and scored (None = all L: pad is a real target).
    prompt_tokens / prompt_mask [B, L]: the clean prompt for the text stream of T2V rows (None: the
    target itself, as in Knowledge Recall where the target is the prompt; mask None = all real).
    null_text / null_text_mask [1, L]: the empty prompt's tokens; T2V rows whose condition is dropped
    get them in the text stream too, so the unconditional branch of guidance never sees the prompt.
    """
    b, device = x0.shape[0], x0.device
    if text_target_mask is None:
        text_target_mask = torch.ones_like(text_target, dtype=torch.bool)
    if prompt_tokens is None:
        prompt_tokens, prompt_mask = text_target, text_target_mask
    elif prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_tokens, dtype=torch.bool)
    if prompt_tokens.shape != text_target.shape:
        raise ValueError(f"prompt tokens {tuple(prompt_tokens.shape)} != text target {tuple(text_target.shape)}")

    gdev = generator.device if generator is not None else device
    regime = torch.multinomial(mix.probs().float().to(gdev), b, replacement=True, generator=generator).to(device)
    is_t2v, is_v2t = regime == T2V, regime == V2T

    # video: one noise level per sample, clean (s = 0) for V2T
    s = torch.where(is_v2t, 0.0, video_flow.sample_time(b, generator, device))
    noise = normal_draw(tuple(x0.shape), generator, device).to(x0.dtype)
    video = video_flow.add_noise(x0, s, noise)
    velocity_target = video_flow.velocity_target(x0, noise)

    # text: t = 1 - s in the joint regime (same noise level), t ~ U[0, 1) for V2T, clean (t = 1) for T2V
    t = torch.where(regime == JOINT, 1.0 - s, text_flow.sample_time(b, generator, device))
    t = torch.where(is_t2v, 1.0, t)
    noised = text_flow.add_noise(text_target, t, generator, text_target_mask)
    rows = is_t2v.unsqueeze(1)
    text = torch.where(rows, prompt_tokens, noised)
    text_mask = torch.where(rows, prompt_mask, text_target_mask)

    dropped = uniform_draw((b,), generator, device) < mix.cond_dropout
    if null_text is not None:
        unconditional = (is_t2v & dropped).unsqueeze(1)
        if null_text_mask is None:
            null_text_mask = torch.ones_like(null_text, dtype=torch.bool)
        text = torch.where(unconditional, null_text.expand_as(text), text)
        text_mask = torch.where(unconditional, null_text_mask.expand_as(text_mask), text_mask)
    return TrainingBatch(
        video=video,
        text=text,
        text_mask=text_mask,
        t_video=video_timestep(s),
        t_text=text_timestep(t),
        video_time=s,
        text_time=t,
        velocity_target=velocity_target,
        text_target=text_target,
        text_loss_mask=text_target_mask & ~rows,
        video_weight=(~is_v2t).float(),
        text_weight=(~is_t2v).float(),
        keep_prompt_condition=~is_v2t & ~dropped,
        regime=regime,
    )


def pad_prompt(states: Tensor, mask: Tensor | None, length: int) -> tuple[Tensor, Tensor]:
    """Pad prompt states [B, S, D] or tokens [B, S] (and mask [B, S], None = all real) with masked zeros to
    S = length."""
    b, s = states.shape[:2]
    if mask is None:
        mask = torch.ones(b, s, dtype=torch.bool, device=states.device)
    if length > s:
        states = torch.cat([states, states.new_zeros(b, length - s, *states.shape[2:])], 1)
        mask = torch.cat([mask, mask.new_zeros(b, length - s)], 1)
    return states, mask


def select_prompt(
    keep: Tensor,
    prompt_states: Tensor,
    null_states: Tensor,
    prompt_mask: Tensor | None = None,
    null_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per sample, the prompt condition where keep [B] is True, else the null condition.

    prompt_states [B, S, D], null_states [1 or B, S', D]; masks [.., S] bool or None (all real).
    Returns (states [B, max(S, S'), D], mask or None when both masks are None and S == S').
    """
    b = prompt_states.shape[0]
    null_states = null_states.expand(b, *null_states.shape[1:])
    if null_mask is not None:
        null_mask = null_mask.expand(b, -1)
    if prompt_mask is None and null_mask is None and prompt_states.shape == null_states.shape:
        return torch.where(keep[:, None, None], prompt_states, null_states.to(prompt_states.dtype)), None
    length = max(prompt_states.shape[1], null_states.shape[1])
    ps, pm = pad_prompt(prompt_states, prompt_mask, length)
    ns, nm = pad_prompt(null_states.to(prompt_states.dtype), null_mask, length)
    return torch.where(keep[:, None, None], ps, ns), torch.where(keep[:, None], pm, nm)


def unified_loss(
    velocity: Tensor,
    logits: Tensor,
    batch: TrainingBatch,
    text_flow: TextFlow,
    video_weight: float = 1.0,
    text_weight: float = 1.0,
    text_loss: Literal["ce", "gkl"] = "ce",
    video_flow: VideoFlow | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = mean over samples of (w_v L_video,i + w_t L_text,i), each term only where the regime has it.

    velocity [B, ...], logits [B, L, V'] from the model on `batch`. A plain per-sample mean makes the
    loss (and its gradient) the same however a global batch is split over processes or micro-batches.
    Returns (loss, logs): "video" and "text" are (sum, weight) of each term over the samples that carry it
    (detached, for logging): their ratio is the term's mean, and sums and weights add up across processes and
    micro-batches where means of means would not (a process whose samples carry no text term).
    """
    per_video = (video_flow or VideoFlow()).training_loss(velocity, batch.velocity_target, batch.video_time)
    per_text = text_flow.loss(logits, batch.text_target, batch.text, batch.text_time, batch.text_loss_mask, text_loss)
    # where (not multiply): unscored rows may hold non-finite values (e.g. GKL at t = 1 before clamping)
    video_terms = torch.where(batch.video_weight > 0, per_video * batch.video_weight, 0.0)
    text_terms = torch.where(batch.text_weight > 0, per_text * batch.text_weight, 0.0)
    loss = (video_weight * video_terms + text_weight * text_terms).mean()
    return loss, {"video": (video_terms.detach().sum(), batch.video_weight.sum()),
                  "text": (text_terms.detach().sum(), batch.text_weight.sum())}  # fmt: skip
