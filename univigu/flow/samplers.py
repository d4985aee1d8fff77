"""Samplers for the three tasks, all one loop over a shared grid of noise levels s (1 -> 0).

The model is anything callable as
    model(video, text_tokens, t_video, t_text, prompt_states, text_mask, prompt_mask) -> (velocity, logits)
with video [B, ...], text_tokens [B, L] long, t_video / t_text [B] on the network scale (1000 = noise),
prompt_states [B, S, D], text_mask [B, L] / prompt_mask [B, S] bool or None; velocity like video,
logits [B, L, V'] of the clean token.

At grid step i (s = grid[i] -> s_next = grid[i + 1]) a generated video takes an Euler step and a
generated text takes a CTMC step from t = 1 - s to t = 1 - s_next, so both network timesteps are
~1000 s: the two modalities are denoised in lockstep. Classifier-free guidance acts on the video
velocity only; the text logits come from the conditional pass.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from univigu.flow.regimes import pad_prompt
from univigu.flow.text import TextFlow, normal_draw, text_timestep, uniform_draw
from univigu.flow.video import clean_estimate, euler_step, guide, time_grid, video_timestep

Model = Callable[..., tuple[Tensor, Tensor]]
# callback(step, s, video_estimate [B, ...], text_tokens [B, L]): s is the noise level the step
# started from (1 = noise; network timestep 1000 s); both tensors are the state after the step.
Callback = Callable[[int, float, Tensor, Tensor], None]
TEXT_UPDATES = ("ctmc", "linear-resample")  # the joint sampler's text rules (see `sample_t2vt`)


@dataclass
class SampleOutput:
    video: Tensor  # [B, ...] final video latent (the input video for V2T)
    text: Tensor  # [B, L] long final tokens (T2V: the prompt tokens, less the padding no row holds)
    times: Tensor  # [N] noise level s at which each step started
    video_trajectory: Tensor | None = None  # [N, B, ...] clean-video estimate after each step (on CPU)
    text_trajectory: Tensor | None = None  # [N, B, L] tokens after each step (on CPU)


# latent values per row from which guidance on CUDA takes two passes rather than one masked pass of 2B: Wan's
# 480x832x81 latent has 2.1M (two passes: 0.80x the time, H200), a 64-token model's 3K (1.7x); the toy world's is
# 12K. Where between them the two cross was not measured.
LONG_VIDEO = 2**20


@dataclass
class Guidance:
    """Classifier-free guidance with the null prompt condition. `batched`: one forward of 2B (True), two of B
    (False), or None: one of 2B, unless stacking puts a text-stream mask on a half that had none (the null pass's
    empty prompt is shorter than the prompt) and a long video runs on CUDA. There a masked attention leaves the flash
    kernels: a guided step at Wan scale (480x832x81) took 1601 ms as one masked pass and 1289 ms as two on an H200;
    at the toy world's size one pass is quicker (benchmarks/README.md)."""

    null_states: Tensor  # [1 or B, S', D]
    null_mask: Tensor | None = None  # [1 or B, S'] bool
    scale: float = 5.0
    batched: bool | None = None
    # T2V: the text stream of the null pass (the empty prompt's tokens [1 or B, L] and mask), so that
    # the prompt reaches neither the cross-attention nor the text stream; None keeps the text stream.
    null_text: Tensor | None = None
    null_text_mask: Tensor | None = None


def make_generator(generator: torch.Generator | int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator from an integer seed (on `device`; numpy ints too), or the given generator / None unchanged."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    # a bool is an int to Python but no seed; anything else would fail inside torch.randn
    if not isinstance(generator, numbers.Integral) or isinstance(generator, bool):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__} "
                        f"{generator!r:.80}")  # fmt: skip
    return torch.Generator(device=device).manual_seed(int(generator))


def _expand(x: Tensor | None, b: int) -> Tensor | None:
    return None if x is None else x.expand(b, *x.shape[1:])


def _forward(
    model: Model,
    video: Tensor,
    text: Tensor,
    t_video: Tensor,
    t_text: Tensor,
    prompt_states: Tensor,
    text_mask: Tensor | None,
    prompt_mask: Tensor | None,
    guidance: Guidance | None,
) -> tuple[Tensor, Tensor]:
    """(velocity, logits), the velocity guided when `guidance` is set (scale 1 skips the null pass)."""
    if guidance is None or guidance.scale == 1.0:
        return tuple(model(video, text, t_video, t_text, prompt_states, text_mask, prompt_mask))[:2]
    b = video.shape[0]
    null_states = _expand(guidance.null_states, b).to(prompt_states.dtype)
    null_mask = _expand(guidance.null_mask, b)
    null_text = text if guidance.null_text is None else _expand(guidance.null_text, b).to(text.device)
    null_text_mask = text_mask if guidance.null_text is None else _expand(guidance.null_text_mask, b)
    batched = guidance.batched
    if batched is None:  # prompt states' masks only touch the cross-attention's few keys: not weighed
        adds_mask = _needs_mask(text, text_mask, null_text, null_text_mask) and (text_mask is None or
                                                                                 null_text_mask is None)
        batched = _one_guided_pass(video, adds_mask)
    if not batched:
        v_cond, logits = tuple(model(video, text, t_video, t_text, prompt_states, text_mask, prompt_mask))[:2]
        v_null = tuple(model(video, null_text, t_video, t_text, null_states, null_text_mask, null_mask))[0]
        return guide(v_cond, v_null, guidance.scale), logits
    states, masks = _stack(prompt_states, prompt_mask, null_states, null_mask)
    texts, text_masks = _stack(text, text_mask, null_text, null_text_mask)
    two = lambda x: None if x is None else torch.cat([x, x])  # noqa: E731
    velocity, logits = tuple(model(two(video), texts, two(t_video), two(t_text), states, text_masks, masks))[:2]
    v_cond, v_null = velocity.chunk(2)
    return guide(v_cond, v_null, guidance.scale), logits[:b, : text.shape[1]]  # not the null text's padding


def _stack(x: Tensor, mask: Tensor | None, null_x: Tensor, null_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The conditional and null inputs (tokens [B, L] or states [B, S, D]) as one batch [2B, ...] with its
    mask (None when neither has one and their lengths agree): the shorter padded with masked zeros."""
    if not _needs_mask(x, mask, null_x, null_mask):
        return torch.cat([x, null_x]), None
    n = max(x.shape[1], null_x.shape[1])
    (x, mask), (null_x, null_mask) = pad_prompt(x, mask, n), pad_prompt(null_x, null_mask, n)
    return torch.cat([x, null_x]), torch.cat([mask, null_mask])


def _one_guided_pass(video: Tensor, adds_mask: bool) -> bool:
    """Guidance's choice for `batched=None`: one pass of 2B unless stacking adds a text-stream mask and the video
    [B, ...] is long on CUDA (see Guidance)."""
    return not adds_mask or not (video.is_cuda and video[0].numel() >= LONG_VIDEO)


def _needs_mask(x: Tensor, mask: Tensor | None, null_x: Tensor, null_mask: Tensor | None) -> bool:
    """Whether the conditional and null inputs stack into one batch only with a mask."""
    return mask is not None or null_mask is not None or x.shape[1] != null_x.shape[1]


def _trim_padding(tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Tokens [B, L] and mask without the trailing positions no row holds (and without the mask when no position
    left is padding). Exact: padding is a key no query sees, and T2V reads no text output."""
    if mask is None:
        return tokens, None
    held = mask.any(0).nonzero()
    n = int(held.max()) + 1 if len(held) else mask.shape[1]
    tokens, mask = tokens[:, :n], mask[:, :n]
    return tokens, None if mask.all() else mask


def _sample(
    model: Model,
    video: Tensor,
    text: Tensor,
    *,
    generate_video: bool,
    generate_text: bool,
    prompt_states: Tensor,
    prompt_mask: Tensor | None,
    text_mask: Tensor | None,
    text_flow: TextFlow | None,
    text_update: Literal["ctmc", "linear-resample"],
    guidance: Guidance | None,
    num_steps: int,
    shift: float,
    generator: torch.Generator | None,
    callback: Callback | None,
    progress: bool,
    return_trajectory: bool,
) -> SampleOutput:
    """The one loop behind the three samplers."""
    if text_update not in TEXT_UPDATES:
        raise ValueError(f"text_update must be one of {TEXT_UPDATES}, got {text_update!r}")
    b, device = video.shape[0], video.device
    grid = time_grid(num_steps, shift).tolist()  # python floats: s_0 = 1 > ... > s_N = 0
    zeros = torch.zeros(b, device=device)
    video_traj, text_traj = [], []
    logits = None
    for i in tqdm(range(num_steps), disable=not progress, desc="sampling"):
        s, s_next = grid[i], grid[i + 1]
        s_b = torch.full((b,), s, device=device)
        t_video = video_timestep(s_b) if generate_video else zeros
        t_text = text_timestep(1.0 - s_b) if generate_text else zeros
        velocity, logits = _forward(
            model, video, text, t_video, t_text, prompt_states, text_mask, prompt_mask,
            guidance if generate_video else None,
        )  # fmt: skip
        if generate_video:
            video_estimate = clean_estimate(video, velocity, s)
            video = euler_step(video, velocity, s, s_next)
        else:
            video_estimate = video
        if generate_text:
            if text_update == "ctmc":
                if i == num_steps - 1:  # last step: take the prediction
                    text = text_flow.predict(text, logits, generator, text_mask)
                else:
                    text = text_flow.step(text, logits, 1.0 - s, s - s_next, generator, text_mask)
            else:
                text = _linear_resample(text_flow, text, logits, i, num_steps, generator, text_mask)
                if i == num_steps - 1:
                    # the released script ends with one more pass at timesteps 0 (video and text taken as
                    # clean) and keeps its argmax: part of the last step, so trajectories end on the result
                    _, logits = _forward(model, video, text, zeros, zeros, prompt_states, text_mask, prompt_mask, None)
                    text = text_flow.predict(text, logits, generator, text_mask, greedy=True)
        if callback is not None:
            callback(i, s, video_estimate, text)
        if return_trajectory:
            video_traj.append(video_estimate.detach().cpu())
            text_traj.append(text.detach().cpu())
    return SampleOutput(
        video=video,
        text=text,
        times=torch.tensor(grid[:-1]),
        video_trajectory=torch.stack(video_traj) if return_trajectory else None,
        text_trajectory=torch.stack(text_traj) if return_trajectory else None,
    )


def _linear_resample(
    text_flow: TextFlow,
    text: Tensor,
    logits: Tensor,
    step: int,
    num_steps: int,
    generator: torch.Generator | None,
    text_mask: Tensor | None,
) -> Tensor:
    """The released Uni-ViGU joint rule (inference_unified_wan.py, T2VT): at step i of N each position
    takes a token sampled from the prediction with probability i / (N - 1), else keeps its current token
    (no re-noising); it ignores kappa and the step size."""
    frac = step / (num_steps - 1) if num_steps > 1 else 1.0
    sampled = text_flow.sample_clean(logits, generator)
    take = uniform_draw(tuple(text.shape), generator, text.device) < frac
    if text_mask is not None:
        take = take & text_mask
    return torch.where(take, sampled, text)


def _init_text(
    text_flow: TextFlow, b: int, length: int, text_mask: Tensor | None, pad_id: int, generator, device
) -> Tensor:
    """Source tokens [B, L]; positions outside text_mask hold pad_id and are never touched."""
    text = text_flow.sample_source((b, length), generator, device)
    return text if text_mask is None else torch.where(text_mask, text, pad_id)


class _TextSteps:
    """A V2T model that ran the clean video once (`encode_video`) and runs only the text tokens per step.

    cuda_graph: capture the text step once and replay it. Shapes are fixed within a run, and at Wan size a text
    step is about 1,800 small kernels whose launch cost on the host exceeds their time on the GPU. Exact: the
    replay runs the captured kernels on the same buffers."""

    def __init__(self, model: Model, video: Tensor, prompt_states: Tensor, prompt_mask: Tensor | None,
                 cuda_graph: bool = False) -> None:  # fmt: skip
        dtype = model.dtype  # the sampler's state may be float32 for a half-precision model
        self.model, self.cache = model, model.encode_video(video.to(dtype), prompt_states.to(dtype), prompt_mask)
        self.cuda_graph = cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, video, text, t_video, t_text, prompt_states, text_mask=None, prompt_mask=None):
        if not self.cuda_graph:
            return None, self.model.forward_text(text, t_text, self.cache, text_mask)  # V2T needs no velocity
        t_text = torch.as_tensor(t_text, device=text.device, dtype=torch.float32).expand(text.shape[0])
        if self._graph is None:
            self._capture(text, t_text, text_mask)
        for static, value in zip(self._inputs, (text, t_text, text_mask)):
            if static is not None:
                static.copy_(value)
        self._graph.replay()
        return None, self._logits.clone()  # the next replay overwrites the graph's output

    def _capture(self, text: Tensor, t_text: Tensor, text_mask: Tensor | None) -> None:
        self.cache.make_room(text.shape[1])  # allocates: not inside the graph
        self._inputs = (text.clone(), t_text.clone(), None if text_mask is None else text_mask.clone())
        tokens, times, mask = self._inputs

        def step() -> Tensor:
            return self.model.forward_text(tokens, times, self.cache, mask)

        side = torch.cuda.Stream(text.device)
        side.wait_stream(torch.cuda.current_stream(text.device))
        with torch.cuda.stream(side):
            step()  # warm-up outside the graph (kernel choice, workspaces), as CUDA graphs require
        torch.cuda.current_stream(text.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = step()


@torch.no_grad()
def sample_t2v(
    model: Model,
    prompt_tokens: Tensor,
    prompt_states: Tensor,
    video_shape: tuple[int, ...],
    *,
    text_mask: Tensor | None = None,
    prompt_mask: Tensor | None = None,
    guidance: Guidance | None = None,
    num_steps: int = 50,
    shift: float = 3.0,
    generator: torch.Generator | int | None = None,
    noise: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    callback: Callback | None = None,
    progress: bool = False,
    return_trajectory: bool = False,
) -> SampleOutput:
    """Text to video: the text stream holds the clean prompt tokens (t_text = 0), the video goes from
    noise to clean with Euler on the shifted grid, guided by `guidance` (null prompt condition).

    prompt_tokens [B, L] long with text_mask [B, L] (the positions no row holds are dropped, as is the mask when
    nothing is left padded: exact, and unmasked attention can take the flash kernels); prompt_states [B, S, D]
    with prompt_mask [B, S]; video_shape the full [B, ...] latent shape (or pass `noise` [B, ...]).
    """
    device = prompt_states.device
    g = make_generator(generator, device)
    video = noise.to(device, dtype) if noise is not None else normal_draw(tuple(video_shape), g, device, dtype)
    prompt_tokens, text_mask = _trim_padding(prompt_tokens.to(device), text_mask)
    if guidance is not None and guidance.null_text is not None:
        null_text, null_text_mask = _trim_padding(guidance.null_text, guidance.null_text_mask)
        guidance = replace(guidance, null_text=null_text, null_text_mask=null_text_mask)
    return _sample(
        model, video, prompt_tokens, generate_video=True, generate_text=False,
        prompt_states=prompt_states, prompt_mask=prompt_mask, text_mask=text_mask, text_flow=None,
        text_update="ctmc", guidance=guidance, num_steps=num_steps, shift=shift, generator=g,
        callback=callback, progress=progress, return_trajectory=return_trajectory,
    )  # fmt: skip


@torch.no_grad()
def sample_v2t(
    model: Model,
    video: Tensor,
    prompt_states: Tensor,
    text_flow: TextFlow,
    text_length: int,
    *,
    text_mask: Tensor | None = None,
    prompt_mask: Tensor | None = None,
    pad_id: int = 0,
    num_steps: int = 50,
    shift: float = 1.0,
    generator: torch.Generator | int | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    return_trajectory: bool = False,
    use_cache: bool | None = None,
    cuda_graph: bool | None = None,
) -> SampleOutput:
    """Video to text: the clean video (t_video = 0) conditions a CTMC from source tokens to text.

    video [B, ...] clean latent; prompt_states [B, S, D]: the null condition, or an instruction's states.
    text_mask [B, text_length] (None = all positions generated; outside it: pad_id, never updated).
    shift = 1 gives the uniform text grid t = i / N (as the released V2T solver).
    use_cache: run the video through the network once and only the text per step (exact; needs a model
    with `encode_video` / `forward_text`, i.e. attention_layout "video_prefix"); None = whenever it can.
    cuda_graph: with the cache, replay each text step as a CUDA graph (exact; saves the kernel launches that
    dominate a text step at Wan size); None = whenever the cache is used on a CUDA device.
    """
    can_cache = getattr(model, "caches_clean_video", False)
    use_cache = can_cache if use_cache is None else use_cache
    if use_cache and not can_cache:
        raise ValueError("use_cache=True needs a UniViGUTransformer with attention_layout='video_prefix'")
    g = make_generator(generator, video.device)
    text = _init_text(text_flow, video.shape[0], text_length, text_mask, pad_id, g, video.device)
    can_graph = use_cache and video.device.type == "cuda"
    cuda_graph = can_graph if cuda_graph is None else cuda_graph
    if cuda_graph and not can_graph:
        raise ValueError("cuda_graph=True needs the video cache (use_cache) and a CUDA device")
    if use_cache:
        model = _TextSteps(model, video, prompt_states, prompt_mask, cuda_graph)
    return _sample(
        model, video, text, generate_video=False, generate_text=True,
        prompt_states=prompt_states, prompt_mask=prompt_mask, text_mask=text_mask, text_flow=text_flow,
        text_update="ctmc", guidance=None, num_steps=num_steps, shift=shift, generator=g,
        callback=callback, progress=progress, return_trajectory=return_trajectory,
    )  # fmt: skip


@torch.no_grad()
def sample_t2vt(
    model: Model,
    prompt_states: Tensor,
    text_flow: TextFlow,
    video_shape: tuple[int, ...],
    text_length: int,
    *,
    text_mask: Tensor | None = None,
    prompt_mask: Tensor | None = None,
    pad_id: int = 0,
    guidance: Guidance | None = None,
    text_update: Literal["ctmc", "linear-resample"] = "ctmc",
    num_steps: int = 50,
    shift: float = 3.0,
    generator: torch.Generator | int | None = None,
    noise: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    callback: Callback | None = None,
    progress: bool = False,
    return_trajectory: bool = False,
) -> SampleOutput:
    """Joint text to video + text: both streams start from noise and are denoised together, one forward
    per step (two, or one of 2B, with guidance, which steers the video velocity only).

    text_update "ctmc": the text CTMC Euler step on the shared grid (text t = 1 - s).
    text_update "linear-resample": the released script's heuristic (see `_linear_resample`), plus its
    final argmax pass at timesteps 0 (the shipped toy model's rule).
    """
    device = prompt_states.device
    g = make_generator(generator, device)
    video = noise.to(device, dtype) if noise is not None else normal_draw(tuple(video_shape), g, device, dtype)
    text = _init_text(text_flow, video.shape[0], text_length, text_mask, pad_id, g, device)
    return _sample(
        model, video, text, generate_video=True, generate_text=True,
        prompt_states=prompt_states, prompt_mask=prompt_mask, text_mask=text_mask, text_flow=text_flow,
        text_update=text_update, guidance=guidance, num_steps=num_steps, shift=shift, generator=g,
        callback=callback, progress=progress, return_trajectory=return_trajectory,
    )  # fmt: skip
