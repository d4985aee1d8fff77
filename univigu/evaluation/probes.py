"""Probes of what a trained transformer has learned, beyond task accuracies."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

from univigu.data.world import BACKGROUNDS, MOTIONS, OBJECT_COLOURS, SHAPES, SIZES, Scene, World
from univigu.flow.text import text_timestep
from univigu.flow.video import clean_estimate

# what a prompt names, so what a swap can change
SWAPPABLE_VALUES = {"colour": tuple(OBJECT_COLOURS), "shape": SHAPES, "motion": MOTIONS}
CAPTION_ROLES = ("background", "colour", "shape", "size", "speed", "direction", "position")
_ROLE_OF_WORD = {**dict.fromkeys(BACKGROUNDS, "background"), **dict.fromkeys(OBJECT_COLOURS, "colour"),
                 **dict.fromkeys(SHAPES, "shape"), **dict.fromkeys(SIZES, "size"), "slowly": "speed",
                 "quickly": "speed", **dict.fromkeys(("top", "middle", "bottom", "center"), "position")}  # fmt: skip


@torch.no_grad()
def position_sensitivity(
    pipeline: Any, n: int = 16, noise_levels: Sequence[float] = (0.0, 0.5, 0.9), seed: int = 0
) -> dict[str, Any]:
    """How much the video output depends on where patches are, not only on what they hold.

    Test-split world videos, noised to each level s (x_s = (1 - s) x0 + s e), go through the
    transformer as they are and with their columns of patches shuffled (one random permutation).
    A network that ignores positions is permutation-equivariant: its output on the shuffled input is
    the shuffled output. Returns, per level, `mean |f(P x) - P f(x)| / mean |f(x)|`: near 0 means the
    positions are unused; shapes, places and motions need them.
    """
    cfg = pipeline.config
    world = World.sized_like(cfg)
    scenes = world.scenes("test", range(n), seed)
    device = pipeline.device
    x0 = pipeline.codec.encode(torch.as_tensor(world.render(scenes)).to(device))  # [B, C, T, H, W]
    states = pipeline.encode_prompts([s.prompt for s in scenes])
    patch_w = pipeline.transformer.config.patch_size[2]
    columns = x0.shape[-1] // patch_w
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(columns, generator=g)
    if torch.equal(perm, torch.arange(columns)):
        perm = perm.roll(1)  # a shuffle that moves something

    def shuffle(z: torch.Tensor) -> torch.Tensor:
        return z.unflatten(-1, (columns, -1))[..., perm, :].flatten(-2)

    text = torch.zeros(n, 0, dtype=torch.long, device=device)

    def video_output(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # unified model or plain Wan base
        if pipeline.unified:
            return pipeline.transformer(x, text, t, t, states)[0]
        return pipeline.transformer(hidden_states=x, timestep=t, encoder_hidden_states=states, return_dict=False)[0]

    result: dict[str, Any] = {"n": n, "seed": seed, "columns": columns, "relative_error": {}}
    for s in noise_levels:
        noise = torch.randn(x0.shape, generator=g).to(device, x0.dtype)
        x_s = (1 - s) * x0 + s * noise
        t = torch.full((n,), s * 1000.0, device=device)
        out, out_shuffled = video_output(x_s, t), video_output(shuffle(x_s), t)
        error = (out_shuffled - shuffle(out)).abs().mean() / out.abs().mean()
        result["relative_error"][f"{s:g}"] = float(error)
    return result


def _swapped(scene: Scene, attribute: str, rng: np.random.Generator) -> Scene:
    """The scene with its main object's `attribute` changed to another value (a moving object keeps a speed)."""
    main = scene.objects[0]
    new = rng.choice([v for v in SWAPPABLE_VALUES[attribute] if v != getattr(main, attribute)])
    changes = {attribute: str(new)}
    if attribute == "motion":
        changes["speed"] = None if new == "still" else main.speed or "slow"
    return dataclasses.replace(scene, objects=(dataclasses.replace(main, **changes), *scene.objects[1:]))


@torch.no_grad()
def prompt_sensitivity(
    pipeline: Any, n: int = 64, noise_levels: Sequence[float] = (0.5, 0.7, 0.9), seed: int = 0
) -> dict[str, Any]:
    """Does the video denoiser read each word of the prompt?

    Test-split world videos x0 are noised to each level s and denoised once (the network's clean-video
    estimate, as in T2V: the prompt as condition and, for a unified model, as clean text tokens) with
    their true prompt, with the prompt's colour, shape or motion swapped for another value, and with the
    empty prompt. Returns, per level, the estimate's mean squared error with the true prompt (`error`) and,
    per swap, the relative increase of that error (`error(swapped) / error(true) - 1`): 0 means the word
    is not used at that noise level; a generator that renders what it is told has it clearly above 0.
    """
    world = World.sized_like(pipeline.config)
    scenes = world.scenes("test", range(n), seed)
    rng = np.random.default_rng(seed)
    prompts = {"true": [s.prompt for s in scenes], "empty": [""] * n}
    prompts.update({a: [_swapped(s, a, rng).prompt for s in scenes] for a in SWAPPABLE_VALUES})
    device = pipeline.device
    x0 = pipeline.codec.encode(torch.as_tensor(world.render(scenes)).to(device))  # [B, C, T, H, W]
    conditions = {}
    for name, texts in prompts.items():
        tokens, mask = pipeline.text_canvas.encode(texts)
        conditions[name] = (tokens.to(device), pipeline.encode_prompts(texts), mask.to(device))
    g = torch.Generator().manual_seed(seed)
    result: dict[str, Any] = {"n": n, "seed": seed, "levels": {}}
    for s in noise_levels:
        x_s = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g).to(device, x0.dtype)
        t_video, t_text = torch.full((n,), s * 1000.0, device=device), torch.zeros(n, device=device)
        errors = {}
        for name, (tokens, states, mask) in conditions.items():
            # the pipeline's parameterization (velocity, whatever the transformer predicts)
            velocity = pipeline.velocity_model(x_s, tokens, t_video, t_text, states, mask)[0]
            errors[name] = float((clean_estimate(x_s, velocity, s) - x0).square().mean())
        level = {"error": errors["true"]}
        level.update({name: errors[name] / errors["true"] - 1 for name in (*SWAPPABLE_VALUES, "empty")})
        result["levels"][f"{s:g}"] = level
    return result


def caption_word_roles(words: Sequence[str]) -> list[str | None]:
    """The attribute each word of a world caption names (one of `CAPTION_ROLES`), None for the others.
    "left"/"right" after "top"/"middle"/"bottom" name a position, otherwise (and "up"/"down") a direction."""
    roles = []
    for i, word in enumerate(words):
        role = _ROLE_OF_WORD.get(word)
        if word in ("left", "right", "up", "down"):
            role = "position" if i and words[i - 1] in ("top", "middle", "bottom") else "direction"
        roles.append(role)
    return roles


@torch.no_grad()
def caption_word_accuracy(pipeline: Any, n: int = 128, text_time: float = 0.9, seed: int = 0) -> dict[str, Any]:
    """Can the model see what a caption says? Teacher-forced V2T on test-split world videos.

    The clean video (the empty prompt as condition, as in V2T) and its true detailed caption go in, with every
    word that names an attribute (`caption_word_roles`) replaced by a source token of the text flow (random
    or the mask) at text time `text_time`, all else given. Returns, per role, how often the most likely token
    at those places is the true word. The rest of the caption fixes which object and which kind of word a
    place wants, so a role at chance means the model does not see that attribute in the video.
    """
    if not pipeline.unified:
        raise ValueError("caption_word_accuracy needs a unified model (a plain Wan generator has no text stream)")
    world = World.sized_like(pipeline.config)
    scenes = world.scenes("test", range(n), seed)
    device = pipeline.device
    dtype = pipeline.transformer.dtype
    x0 = pipeline.codec.encode(torch.as_tensor(world.render(scenes)).to(device)).to(dtype)
    tokens, mask = pipeline.text_canvas.encode([s.caption for s in scenes])
    roles = [caption_word_roles(pipeline.tokenizer.convert_ids_to_tokens(row)) for row in tokens.tolist()]
    role_ids = torch.tensor([[CAPTION_ROLES.index(r) if r else -1 for r in row] for row in roles])
    g = torch.Generator().manual_seed(seed)
    source = pipeline.text_flow.sample_source(tuple(tokens.shape), g)
    noised = torch.where(role_ids >= 0, source, tokens)
    states = pipeline.encode_prompts([""] * n).to(dtype)
    t_text = text_timestep(torch.full((n,), float(text_time)))
    logits = pipeline.transformer(x0, noised.to(device), torch.zeros(n, device=device), t_text.to(device), states,
                                  mask.to(device))[1]  # fmt: skip
    correct = pipeline.text_flow.allowed_logits(logits).argmax(-1).cpu() == tokens
    places = {role: role_ids == k for k, role in enumerate(CAPTION_ROLES)}
    accuracy = {role: float(correct[where].float().mean()) for role, where in places.items() if where.any()}
    return {"n": n, "seed": seed, "text_time": text_time, "accuracy": accuracy,
            "words": {role: int(where.sum()) for role, where in places.items()}}
