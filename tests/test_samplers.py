"""Samplers: a perfect denoiser is reproduced exactly, timestep conventions, CFG, seeds, callbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from univigu.flow import Guidance, TextFlow, sample_t2v, sample_t2vt, sample_v2t

V, L, B, PAD, END = 9, 6, 5, 8, 7


class Oracle:
    """The perfect denoiser for fixed targets: v = (x_s - x0) / s, logits certain of the clean tokens.

    Records every call's timesteps and inputs.
    """

    def __init__(self, x0: torch.Tensor, tokens: torch.Tensor, num_logits: int):
        self.x0, self.logits = x0, F.one_hot(tokens, num_logits).float() * 1e4 - 5e3
        self.calls: list[dict] = []

    def __call__(self, video, text, t_video, t_text, prompt_states, text_mask, prompt_mask):
        self.calls.append(dict(t_video=t_video.clone(), t_text=t_text.clone(), text=text.clone(), b=video.shape[0]))
        s = (t_video / 1000).reshape(-1, *[1] * (video.dim() - 1))
        v = torch.where(s > 0, (video - self.x0) / s.clamp_min(1e-12), torch.zeros_like(video))
        return v, self.logits


def _targets(num_logits: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 3, 2, 4, 4, generator=g)  # any trailing shape: a small "video"
    tokens = torch.randint(0, V - 2, (B, L), generator=g)
    tokens[:, 3], tokens[:, 4:] = END, PAD  # caption, end, pad
    return x0, tokens


PROMPT = torch.randn(B, 4, 8)


@pytest.mark.parametrize("source", ["uniform", "mask"])
def test_perfect_denoiser_v2t_and_joint(source):
    flow = TextFlow(V, source)
    x0, tokens = _targets(flow.num_logits)
    text_mask = torch.ones(B, L, dtype=torch.bool)
    text_mask[0, 4:] = False  # a row whose padding is not generated
    tokens[0, 4:] = 0  # ... and which therefore must hold pad_id, whatever the prediction
    expected = tokens.clone()
    expected[0, 4:] = PAD

    model = Oracle(x0, tokens, flow.num_logits)
    out = sample_v2t(model, x0, PROMPT, flow, L, text_mask=text_mask, pad_id=PAD, num_steps=8, generator=0)
    assert torch.equal(out.text, expected) and torch.equal(out.video, x0)
    for c in model.calls:  # never any mask id or pad change fed back
        assert (c["text"][0, 4:] == PAD).all()

    for update in ("ctmc", "linear-resample"):
        model = Oracle(x0, tokens, flow.num_logits)
        out = sample_t2vt(
            model, PROMPT, flow, x0.shape, L, text_mask=text_mask, pad_id=PAD, num_steps=8, generator=1,
            text_update=update,
        )  # fmt: skip
        assert (out.video - x0).abs().max() < 1e-4, update
        assert torch.equal(out.text, expected), update


def test_perfect_denoiser_t2v():
    x0, tokens = _targets(V)
    model = Oracle(x0, tokens, V)
    out = sample_t2v(model, tokens, PROMPT, x0.shape, num_steps=8, generator=0)
    assert (out.video - x0).abs().max() < 1e-4
    assert torch.equal(out.text, tokens)
    assert all(torch.equal(c["text"], tokens) for c in model.calls)  # the prompt stream is never touched


def test_timestep_conventions_in_the_loops():
    flow = TextFlow(V, "mask")
    x0, tokens = _targets(flow.num_logits)
    n = 6

    model = Oracle(x0, tokens, V)
    sample_t2v(model, tokens, PROMPT, x0.shape, num_steps=n, generator=0)
    tv = torch.stack([c["t_video"] for c in model.calls])
    assert len(model.calls) == n and (tv[0] == 1000).all() and (tv.diff(dim=0) < 0).all() and (tv[-1] > 0).all()
    assert all((c["t_text"] == 0).all() for c in model.calls)  # clean prompt tokens

    model = Oracle(x0, tokens, flow.num_logits)
    sample_v2t(model, x0, PROMPT, flow, L, num_steps=n, generator=0)
    tt = torch.stack([c["t_text"] for c in model.calls])
    assert (tt[0] == 1000).all() and (tt.diff(dim=0) < 0).all() and (tt[-1] > 0).all()
    assert all((c["t_video"] == 0).all() for c in model.calls)  # clean video
    assert (model.calls[0]["text"] == flow.mask_id).all()  # starts from the source

    model = Oracle(x0, tokens, flow.num_logits)
    sample_t2vt(model, PROMPT, flow, x0.shape, L, num_steps=n, shift=3.0, generator=0)
    for c in model.calls:  # both streams at the same noise level
        assert (c["t_video"] - c["t_text"]).abs().max() <= 0.5
    assert (model.calls[0]["t_video"] == 1000).all() and (model.calls[0]["t_text"] == 1000).all()

    model = Oracle(x0, tokens, flow.num_logits)
    sample_t2vt(model, PROMPT, flow, x0.shape, L, num_steps=n, generator=0, text_update="linear-resample")
    assert len(model.calls) == n + 1  # the released rule's final clean pass
    assert (model.calls[-1]["t_video"] == 0).all() and (model.calls[-1]["t_text"] == 0).all()

    # ... belongs to the last step: trajectories and callbacks end on the text returned (an unsure model: the
    # last step's sampled tokens are not the final pass's argmax)
    unsure, seen = Oracle(x0, tokens, flow.num_logits), []
    unsure.logits = unsure.logits.sign()
    out = sample_t2vt(unsure, PROMPT, flow, x0.shape, L, num_steps=n, generator=0, text_update="linear-resample",
                      return_trajectory=True, callback=lambda i, s, v, t: seen.append(t.clone()))  # fmt: skip
    assert len(seen) == len(out.text_trajectory) == len(out.times) == n
    assert torch.equal(seen[-1], out.text) and torch.equal(out.text_trajectory[-1], out.text)


def test_seeds_callbacks_and_trajectory():
    flow = TextFlow(V, "uniform")
    x0, tokens = _targets(V)
    seen = []

    def callback(step, t, video_estimate, text_tokens):
        seen.append((step, t, video_estimate.clone(), text_tokens.clone()))

    run = lambda seed, cb=None: sample_t2vt(  # noqa: E731
        Oracle(x0, tokens, V), PROMPT, flow, x0.shape, L, num_steps=5, generator=seed, callback=cb,
        return_trajectory=True, progress=False,
    )  # fmt: skip
    a = run(3, callback)
    assert [s[0] for s in seen] == list(range(5))
    ts = [s[1] for s in seen]
    assert isinstance(ts[0], float) and ts[0] == pytest.approx(1.0) and all(x > y for x, y in zip(ts, ts[1:]))
    assert all((s[2] - x0).abs().max() < 1e-4 for s in seen)  # the oracle's estimate is x0 at every step
    assert a.video_trajectory.shape == (5, *x0.shape) and a.text_trajectory.shape == (5, B, L)
    assert torch.equal(a.text_trajectory[-1], a.text) and torch.allclose(a.times, torch.tensor(ts))
    assert torch.equal(a.text_trajectory[2], seen[2][3])

    # same seed, same run (also with a Generator); another seed, other intermediate tokens
    b = run(3)
    assert torch.equal(a.text_trajectory, b.text_trajectory) and torch.equal(a.video, b.video)
    c = run(torch.Generator().manual_seed(3))
    assert torch.equal(a.text_trajectory, c.text_trajectory)
    d = run(4)
    assert not torch.equal(a.text_trajectory, d.text_trajectory)


class ConstantVelocity:
    """velocity = the first prompt feature (so conditional and null passes differ); counts calls."""

    def __init__(self):
        self.calls, self.batch_sizes = 0, []

    def __call__(self, video, text, t_video, t_text, prompt_states, text_mask, prompt_mask):
        self.calls += 1
        self.batch_sizes.append(video.shape[0])
        v = prompt_states[:, 0, 0].reshape(-1, *[1] * (video.dim() - 1)).expand_as(video)
        return v, torch.zeros(*text.shape, V)


def test_classifier_free_guidance():
    tokens = torch.zeros(B, L, dtype=torch.long)
    shape, n = (B, 3, 4), 4
    cond = torch.full((B, 4, 8), 2.0)
    null = torch.full((1, 4, 8), -1.0)
    # a zero velocity leaves the initial noise
    noise = sample_t2v(ConstantVelocity(), tokens, torch.zeros(B, 4, 8), shape, num_steps=n, generator=7).video
    for batched in (True, False):
        model = ConstantVelocity()
        out = sample_t2v(
            model, tokens, cond, shape, guidance=Guidance(null, scale=5.0, batched=batched), num_steps=n, generator=7
        )
        # a constant velocity integrates exactly from s = 1 to 0: x = e - v, v = v_null + w (v_cond - v_null)
        assert torch.allclose(out.video, noise - (-1.0 + 5.0 * (2.0 + 1.0)), atol=1e-5)
        assert model.batch_sizes == ([2 * B] * n if batched else [B] * (2 * n))
    # a null prompt of another length (padded for the batched pass), and scale 1 skips the null pass
    model = ConstantVelocity()
    out = sample_t2vt(
        model, cond, TextFlow(V), shape, L, guidance=Guidance(torch.full((1, 2, 8), -1.0), scale=3.0),
        num_steps=n, generator=7,
    )  # fmt: skip
    assert torch.allclose(out.video, noise - (-1.0 + 3.0 * 3.0), atol=1e-5)
    model = ConstantVelocity()
    sample_t2v(model, tokens, cond, shape, guidance=Guidance(null, scale=1.0), num_steps=n, generator=7)
    assert model.calls == n
    # batched=None (the default) on a CPU: one pass of 2B, also when the halves stack only with a mask
    model = ConstantVelocity()
    sample_t2v(model, tokens, cond, shape, guidance=Guidance(torch.full((1, 2, 8), -1.0), scale=3.0), num_steps=n)
    assert model.batch_sizes == [2 * B] * n


def test_guidance_takes_two_passes_for_a_long_masked_video_on_cuda():
    """batched=None: two passes only where one would need a mask, the video is long and runs on CUDA (a masked
    attention leaves the flash kernels); the CUDA tensor is faked, its size is an expanded view."""
    from univigu.flow.samplers import LONG_VIDEO, _one_guided_pass

    class OnCuda:
        is_cuda = True

        def __init__(self, values: int):
            self.row = torch.empty(1).expand(values)

        def __getitem__(self, i):
            return self.row

    long, short = OnCuda(LONG_VIDEO), OnCuda(LONG_VIDEO - 1)
    assert not _one_guided_pass(long, adds_mask=True)
    assert _one_guided_pass(long, adds_mask=False) and _one_guided_pass(short, adds_mask=True)
    assert _one_guided_pass(torch.empty(1).expand(2, LONG_VIDEO), adds_mask=True)  # on the CPU


def test_any_integer_seeds_the_samplers_and_other_seeds_are_refused():
    tokens, states, shape = torch.zeros(B, L, dtype=torch.long), torch.zeros(B, 4, 8), (B, 3, 4)
    seeded = sample_t2v(ConstantVelocity(), tokens, states, shape, num_steps=2, generator=3).video
    for seed in (np.int64(3), np.uint8(3)):  # the pipeline accepts numpy ints: a raw torch.randn TypeError here
        assert torch.equal(sample_t2v(ConstantVelocity(), tokens, states, shape, num_steps=2, generator=seed).video,
                           seeded)  # fmt: skip
    for seed in (3.0, "3", True):
        with pytest.raises(TypeError, match="generator must be a torch.Generator, an int seed or None"):
            sample_t2v(ConstantVelocity(), tokens, states, shape, num_steps=2, generator=seed)


class RecordsText:
    """Returns zero velocity and remembers the text stream and its mask of every call."""

    def __init__(self):
        self.texts, self.masks = [], []

    def __call__(self, video, text, t_video, t_text, prompt_states, text_mask=None, prompt_mask=None):
        self.texts.append(text.clone())
        self.masks.append(None if text_mask is None else text_mask.clone())
        return torch.zeros_like(video), torch.zeros(*text.shape, V)


@pytest.mark.parametrize("batched", [True, False])
def test_guidance_null_pass_can_take_the_empty_prompt_text(batched):
    tokens = torch.full((B, L), 5, dtype=torch.long)
    mask = torch.ones(B, L, dtype=torch.bool)
    null_text = torch.tensor([[1] + [0] * (L - 1)])
    null_mask = torch.arange(L)[None] < 1
    model = RecordsText()
    guidance = Guidance(torch.zeros(1, 4, 8), scale=4.0, batched=batched, null_text=null_text, null_text_mask=null_mask)
    sample_t2v(model, tokens, torch.ones(B, 4, 8), (B, 3), text_mask=mask, guidance=guidance, num_steps=2, generator=0)
    # what each row reads (the positions its mask keeps): the prompt, or the null pass's one token
    read = [row[m].tolist() for text, mask in zip(model.texts, model.masks)
            for row, m in zip(text, torch.ones_like(text, dtype=torch.bool) if mask is None else mask)]  # fmt: skip
    assert len(read) == 2 * 2 * B
    assert read.count([5] * L) == 2 * B and read.count([1]) == 2 * B


def test_guided_logits_are_the_prompts_length_either_way():
    """A null text longer than the prompt's pads the batched pass; the logits returned are the prompt's, as the two
    passes give."""
    from univigu.flow.samplers import _forward

    text, null_text = torch.full((B, 3), 5, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)
    shapes = []
    for batched in (True, False):
        guidance = Guidance(torch.zeros(1, 4, 8), scale=4.0, batched=batched, null_text=null_text)
        _, logits = _forward(RecordsText(), torch.zeros(B, 3), text, torch.ones(B), torch.zeros(B),
                             torch.ones(B, 4, 8), None, None, guidance)  # fmt: skip
        shapes.append(tuple(logits.shape))
    assert shapes == [(B, 3, V)] * 2


def test_t2v_drops_the_padding_no_row_holds():
    """T2V's text stream loses the trailing positions that are padding in every row, and its mask once no padding
    is left: fewer tokens and (one unguided prompt) no mask; that the velocity is the same without them is
    test_with_the_real_transformer's."""
    tokens = torch.full((2, L), 5, dtype=torch.long)
    mask = torch.arange(L)[None] < torch.tensor([[2], [3]])  # 2 and 3 real tokens of L
    seen = RecordsText()
    sample_t2v(seen, tokens, torch.ones(2, 4, 8), (2, 3), text_mask=mask, num_steps=2, generator=0)
    assert [t.shape[1] for t in seen.texts] == [3, 3] and torch.equal(seen.masks[0], mask[:, :3])
    seen = RecordsText()
    sample_t2v(seen, tokens[:1], torch.ones(1, 4, 8), (1, 3), text_mask=mask[:1], num_steps=2, generator=0)
    assert [t.shape[1] for t in seen.texts] == [2, 2] and seen.masks == [None, None]
    # guided: the null text trimmed on its own, the two stacked with a mask only where one is shorter
    seen = RecordsText()
    guidance = Guidance(torch.zeros(1, 4, 8), scale=4.0, null_text=tokens[:1], null_text_mask=torch.arange(L)[None] < 1)
    sample_t2v(seen, tokens[:1], torch.ones(1, 4, 8), (1, 3), text_mask=mask[:1], guidance=guidance, num_steps=1,
               generator=0)  # fmt: skip
    assert seen.texts[0].shape == (2, 2) and seen.masks[0].tolist() == [[True, True], [True, False]]


def test_linear_resample_keeps_source_at_first_step():
    """The released rule takes nothing at step 0 (fraction 0/(N-1)); the CTMC already jumps some positions."""
    flow = TextFlow(V, "mask")
    x0, tokens = _targets(flow.num_logits)
    tokens = tokens.repeat(1, 40)
    kwargs = dict(num_steps=10, generator=0, return_trajectory=True)
    lin = sample_t2vt(
        Oracle(x0, tokens, V + 1), PROMPT, flow, x0.shape, 40 * L, text_update="linear-resample", **kwargs
    )
    ctmc = sample_t2vt(Oracle(x0, tokens, V + 1), PROMPT, flow, x0.shape, 40 * L, text_update="ctmc", **kwargs)
    assert (lin.text_trajectory[0] == flow.mask_id).all()
    revealed = (ctmc.text_trajectory[0] != flow.mask_id).float().mean().item()
    assert 0.02 < revealed < 0.2  # p = 1 - exp(-h) with h = 0.1
    with pytest.raises(ValueError):
        sample_t2vt(Oracle(x0, tokens, V + 1), PROMPT, flow, x0.shape, 40 * L, text_update="greedy", num_steps=2)


def test_with_the_real_transformer():
    """A tiny UniViGUTransformer plugs into the regimes, the loss and the samplers; batched CFG with prompts
    of different lengths and masks equals two forwards."""
    from univigu.flow import RegimeMix, VideoFlow, make_training_batch, select_prompt, unified_loss
    from univigu.models import UniViGUTransformer

    torch.manual_seed(0)
    vocab = 20
    model = UniViGUTransformer(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=12, freq_dim=32, ffn_dim=32, num_layers=2, text_vocab_size=vocab, text_mask_row=True,
    ).eval()  # fmt: skip
    with torch.no_grad():
        model.text_proj_out.weight.normal_(std=0.1)  # the zero-initialised head would give uniform logits
    flow = TextFlow(vocab, "mask")
    b, shape = 2, (2, 4, 2, 4, 4)
    prompt = torch.randn(b, 5, 12)
    prompt_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    null = torch.zeros(1, 3, 12)

    runs = [
        sample_t2vt(
            model, prompt, flow, shape, 6, prompt_mask=prompt_mask, guidance=Guidance(null, scale=4.0, batched=batched),
            num_steps=3, generator=0,
        )  # fmt: skip
        for batched in (True, False)
    ]
    assert torch.allclose(runs[0].video, runs[1].video, atol=1e-4)
    assert torch.equal(runs[0].text, runs[1].text)
    assert (runs[0].text < vocab).all()

    # what T2V's trimming relies on: padding is no key, so the velocity is the same without it (and without a
    # mask once no row has padding left)
    tokens, video, zero = torch.randint(0, vocab, (b, 6)), torch.randn(shape), torch.zeros(b)
    text_mask = torch.arange(6)[None] < torch.tensor([[2], [4]])
    with torch.no_grad():
        padded = model(video, tokens, zero + 500, zero, prompt, text_mask, prompt_mask)[0]
        trimmed = model(video, tokens[:, :4], zero + 500, zero, prompt, text_mask[:, :4], prompt_mask)[0]
        one = model(video[:1], tokens[:1, :2], zero[:1] + 500, zero[:1], prompt[:1], None, prompt_mask[:1])[0]
    assert torch.allclose(padded, trimmed, atol=1e-5) and torch.allclose(padded[:1], one, atol=1e-5)

    g = torch.Generator().manual_seed(0)
    x0, target = torch.randn(shape, generator=g), torch.randint(0, vocab, (b, 6), generator=g)
    batch = make_training_batch(
        x0, target, None, mix=RegimeMix(t2v=0.0), video_flow=VideoFlow(shift=3.0), text_flow=flow, generator=g
    )
    states, mask = select_prompt(batch.keep_prompt_condition, prompt, null, prompt_mask)
    model.train()
    velocity, logits = model(batch.video, batch.text, batch.t_video, batch.t_text, states, batch.text_mask, mask)
    loss, _ = unified_loss(velocity, logits, batch, flow, text_loss="gkl")
    loss.backward()
    assert torch.isfinite(loss) and model.text_proj_out.weight.grad.abs().sum() > 0


def test_linear_resample_takes_the_fraction_i_over_n_minus_1():
    """At step i of N the released rule resamples each position with probability i / (N - 1) (not i / N):
    among the positions still at the mask source after step i - 1, about that fraction leaves it at step i.
    The last step adds the final argmax pass, so every position ends revealed."""
    flow = TextFlow(V, "mask")
    x0, tokens = _targets(flow.num_logits)
    reps, n = 80, 5
    tokens = tokens.repeat(1, reps)
    out = sample_t2vt(Oracle(x0, tokens, V + 1), PROMPT, flow, x0.shape, reps * L, text_update="linear-resample",
                      num_steps=n, generator=0, return_trajectory=True)  # fmt: skip
    masked = (out.text_trajectory == flow.mask_id).float()  # [N, B, L']
    assert masked[0].all()  # fraction 0 at step 0
    for i in range(1, n - 1):
        still = masked[i - 1].bool()
        left = 1.0 - masked[i][still].mean().item()
        assert abs(left - i / (n - 1)) < 0.05, (i, left)  # i / N would be 0.2, 0.4, 0.6
    assert not masked[-1].any()
    assert (out.text == tokens).all()
