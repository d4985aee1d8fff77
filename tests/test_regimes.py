"""Training regimes: per-sample T2V / V2T / joint inputs, targets, masks, prompt dropout, the loss."""

from __future__ import annotations

import pytest
import torch

from univigu.flow import (
    JOINT, T2V, V2T, RegimeMix, TextFlow, VideoFlow, make_training_batch, select_prompt, unified_loss,
)  # fmt: skip

V, L = 11, 8


def _batch(b: int = 4000, mix: RegimeMix | None = None, seed: int = 0, source: str = "mask"):
    g = torch.Generator().manual_seed(100)
    x0 = torch.randn(b, 2, 3, generator=g)
    target = torch.randint(0, V, (b, L), generator=g)
    target_mask = torch.arange(L) < torch.randint(2, L + 1, (b, 1), generator=g)
    prompt = torch.randint(0, V, (b, L), generator=g)
    prompt_mask = torch.arange(L) < torch.randint(1, L + 1, (b, 1), generator=g)
    flow = TextFlow(V, source)
    batch = make_training_batch(
        x0, target, target_mask, prompt, prompt_mask, mix=mix or RegimeMix(1.0, 1.0, 2.0, cond_dropout=0.2),
        video_flow=VideoFlow(shift=3.0), text_flow=flow, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    return batch, x0, target, target_mask, prompt, prompt_mask, flow


def test_regime_frequencies_and_condition_dropout():
    batch, *_ = _batch()
    freq = torch.bincount(batch.regime, minlength=3).float() / len(batch.regime)
    assert (freq - torch.tensor([0.25, 0.25, 0.5])).abs().max() < 0.03
    keep = batch.keep_prompt_condition
    assert not keep[batch.regime == V2T].any()  # the prompt would leak the answer
    dropped = (~keep[batch.regime != V2T]).float().mean().item()
    assert abs(dropped - 0.2) < 0.03
    only_t2v, *_ = _batch(500, RegimeMix(1.0, 0.0, 0.0, cond_dropout=0.0))
    assert (only_t2v.regime == T2V).all() and only_t2v.keep_prompt_condition.all()
    with pytest.raises(ValueError):
        RegimeMix(0.0, 0.0, 0.0).probs()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"t2v": -1}, ValueError, "regime weights"),  # failed only when first drawn
    ({"joint": float("nan")}, ValueError, "joint"),
    ({"v2t": "1"}, TypeError, "v2t"),
    ({"t2v": 0, "v2t": 0, "joint": 0}, ValueError, "positive sum"),
    ({"cond_dropout": 2.0}, ValueError, "cond_dropout"),  # was accepted: every prompt dropped
    ({"cond_dropout": -0.1}, ValueError, "cond_dropout"),
    ({"cond_dropout": float("nan")}, ValueError, "cond_dropout"),
    ({"cond_dropout": None}, TypeError, "cond_dropout"),
])  # fmt: skip
def test_bad_mix_is_rejected_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        RegimeMix(**kwargs)


def test_per_regime_inputs_targets_and_masks():
    batch, x0, target, target_mask, prompt, prompt_mask, flow = _batch()
    t2v, v2t, joint = (batch.regime == r for r in (T2V, V2T, JOINT))
    s = batch.video_time
    # the velocity target and the noised video are one rectified-flow path: x_s = x0 + s (e - x0)
    assert torch.allclose(batch.video, x0 + s[:, None, None] * batch.velocity_target, atol=1e-5)
    assert torch.allclose(batch.t_video, 1000 * s)

    # T2V: video noised, the text stream is the clean prompt with its mask, video loss only
    assert (s[t2v] > 0).all()
    assert torch.equal(batch.text[t2v], prompt[t2v]) and torch.equal(batch.text_mask[t2v], prompt_mask[t2v])
    assert (batch.t_text[t2v] == 0).all() and not batch.text_loss_mask[t2v].any()
    assert (batch.video_weight[t2v] == 1).all() and (batch.text_weight[t2v] == 0).all()

    # V2T: video clean, text noised, text loss only
    assert torch.equal(batch.video[v2t], x0[v2t]) and (batch.t_video[v2t] == 0).all()
    assert (batch.t_text[v2t] > 0).all()
    assert (batch.video_weight[v2t] == 0).all() and (batch.text_weight[v2t] == 1).all()

    # joint: both noised at one noise level
    assert torch.allclose(batch.text_time[joint], 1 - s[joint])
    assert (batch.t_video[joint] - batch.t_text[joint]).abs().max() <= 0.5
    assert (batch.video_weight[joint] == 1).all() and (batch.text_weight[joint] == 1).all()

    gen = v2t | joint
    assert torch.equal(batch.text_mask[gen], target_mask[gen])
    assert torch.equal(batch.text_loss_mask[gen], target_mask[gen])
    assert torch.equal(batch.text_target, target)
    outside = gen[:, None] & ~target_mask
    assert torch.equal(batch.text[outside], target[outside])  # never noised
    noised = batch.text[gen[:, None] & target_mask] == flow.mask_id
    kappa = batch.text_time[:, None].expand(-1, L)[gen[:, None] & target_mask]
    assert abs(noised.float().mean().item() - (1 - kappa).mean().item()) < 0.02


def test_seeded_and_default_prompt():
    a, *_ = _batch(300, seed=5)
    b, *_ = _batch(300, seed=5)
    c, *_ = _batch(300, seed=6)
    assert torch.equal(a.video, b.video) and torch.equal(a.text, b.text) and torch.equal(a.regime, b.regime)
    assert not torch.equal(a.regime, c.regime)
    # without prompt tokens the T2V text stream is the (clean) target: Knowledge Recall
    x0, target = torch.randn(200, 2), torch.randint(0, V, (200, L))
    batch = make_training_batch(
        x0, target, None, mix=RegimeMix(1, 0, 0), video_flow=VideoFlow(), text_flow=TextFlow(V),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert torch.equal(batch.text, target) and batch.text_mask.all()


@pytest.mark.parametrize("kind", ["ce", "gkl"])
def test_unified_loss_uses_only_the_regime_terms(kind):
    batch, *_, flow = _batch(600)
    g = torch.Generator().manual_seed(1)
    velocity = torch.randn(batch.video.shape, generator=g, requires_grad=True)
    logits = torch.randn(600, L, flow.num_logits, generator=g, requires_grad=True)
    loss, parts = unified_loss(velocity, logits, batch, flow, 2.0, 0.5, kind)
    assert torch.isfinite(loss)
    # a per-sample mean: the logged (sum, weight) of each term over the samples carrying it
    assert parts["video"][1] == batch.video_weight.sum() and parts["text"][1] == batch.text_weight.sum()
    expected = (2.0 * parts["video"][0].item() + 0.5 * parts["text"][0].item()) / 600
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the same rows split in two halves (as two processes would) average to the same loss; the logs add up
    halves = [unified_loss(velocity[rows], logits[rows], _rows(batch, rows), flow, 2.0, 0.5, kind)
              for rows in (slice(0, 300), slice(300, 600))]  # fmt: skip
    assert (halves[0][0] + halves[1][0]).item() / 2 == pytest.approx(loss.item(), rel=1e-5)
    for term in ("video", "text"):
        total = halves[0][1][term][0] + halves[1][1][term][0]
        assert total.item() == pytest.approx(parts[term][0].item(), rel=1e-5)
    loss.backward()
    v2t, t2v = batch.regime == V2T, batch.regime == T2V
    assert (velocity.grad[v2t] == 0).all() and (velocity.grad[~v2t].abs().sum() > 0)
    assert (logits.grad[t2v] == 0).all() and (logits.grad[~t2v].abs().sum() > 0)
    # unscored positions do not move the loss
    off = ~batch.text_loss_mask
    with torch.no_grad():
        logits2 = logits.clone()
        logits2[off] = torch.randn(int(off.sum()), flow.num_logits) * 10
        velocity2 = velocity.clone()
        velocity2[v2t] += 100
    loss2, _ = unified_loss(velocity2, logits2, batch, flow, 2.0, 0.5, kind)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-5)
    # the exact targets give a zero video term and a ~zero cross-entropy
    perfect = torch.nn.functional.one_hot(batch.text_target, flow.num_logits).float() * 50
    _, parts = unified_loss(batch.velocity_target, perfect, batch, flow, text_loss=kind)
    assert parts["video"][0] == 0 and abs(parts["text"][0].item()) / parts["text"][1].item() < 1e-4


def _rows(batch, rows):
    import dataclasses

    return type(batch)(**{f.name: getattr(batch, f.name)[rows] for f in dataclasses.fields(batch)})


def test_select_prompt():
    keep = torch.tensor([True, False, True])
    prompt, null = torch.ones(3, 4, 2), torch.zeros(1, 4, 2)
    states, mask = select_prompt(keep, prompt, null)
    assert mask is None and torch.equal(states[:, 0, 0], torch.tensor([1.0, 0.0, 1.0]))
    pmask = torch.tensor([[1, 1, 1, 0]] * 3, dtype=torch.bool)
    states, mask = select_prompt(keep, prompt, torch.full((1, 6, 2), -1.0), pmask, None)
    assert states.shape == (3, 6, 2)
    assert mask[1].all() and torch.equal(mask[0], torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool))
    assert (states[1] == -1).all() and (states[0, 4:] == 0).all()


def test_dropped_t2v_rows_get_the_empty_prompt_in_the_text_stream():
    b = 2000
    g = torch.Generator().manual_seed(3)
    x0, target = torch.randn(b, 2), torch.randint(0, V, (b, L), generator=g)
    prompt = torch.randint(2, V, (b, L), generator=g)
    null_text = torch.tensor([[1] + [0] * (L - 1)])  # end token, then padding
    null_mask = torch.arange(L)[None] < 1
    batch = make_training_batch(
        x0, target, None, prompt, None, null_text, null_mask, mix=RegimeMix(1.0, 1.0, 1.0, cond_dropout=0.3),
        video_flow=VideoFlow(), text_flow=TextFlow(V), generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    t2v = batch.regime == T2V
    dropped = t2v & ~batch.keep_prompt_condition
    kept = t2v & batch.keep_prompt_condition
    assert dropped.sum() > 50 and kept.sum() > 50
    assert (batch.text[dropped] == null_text).all() and (batch.text_mask[dropped] == null_mask).all()
    assert torch.equal(batch.text[kept], prompt[kept])
    joint_dropped = (batch.regime == JOINT) & ~batch.keep_prompt_condition
    assert not (batch.text[joint_dropped] == null_text).all(dim=1).any()  # joint text is the noised target
