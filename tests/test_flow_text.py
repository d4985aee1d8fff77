"""Text flow: timestep convention, mixture path noising, CTMC jump rule, masks, losses, length policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flow_matching.loss import MixturePathGeneralizedKL
from flow_matching.path import MixtureDiscreteProbPath
from flow_matching.path.scheduler import PolynomialConvexScheduler

from univigu.flow import TextFlow, cut_at_end, text_timestep

V = 7


def test_network_timestep_ends():
    assert text_timestep(torch.tensor(0.0)).item() == 1000.0  # source: pure noise
    assert text_timestep(torch.tensor(1.0)).item() == 0.0  # data: clean
    assert text_timestep(torch.tensor([0.2504, 0.9996])).tolist() == [750.0, 0.0]  # rounded


def test_num_logits_and_mask_id():
    assert TextFlow(V).num_logits == V
    assert TextFlow(V, "mask").mask_id == V and TextFlow(V, "mask").num_logits == V + 1
    assert TextFlow(V, "mask", mask_id=3).num_logits == V  # a mask token inside the vocabulary
    with pytest.raises(ValueError):
        TextFlow(V, "gaussian")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"vocab_size": 0}, ValueError, "vocab_size"),  # drew source ids of -1
    ({"vocab_size": 2.0}, TypeError, "vocab_size"),
    ({"vocab_size": True}, TypeError, "vocab_size"),
    ({"vocab_size": V, "exponent": 0}, ValueError, "exponent"),  # a bare AssertionError from flow_matching
    ({"vocab_size": V, "exponent": -1.0}, ValueError, "exponent"),
    ({"vocab_size": V, "exponent": float("inf")}, ValueError, "exponent"),
    ({"vocab_size": V, "exponent": "2"}, TypeError, "exponent"),
])  # fmt: skip
def test_bad_vocab_size_or_exponent_is_a_named_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        TextFlow(**kwargs)


def test_numpy_vocab_size_is_stored_as_int():
    flow = TextFlow(np.int64(V))
    assert type(flow.vocab_size) is int and flow.num_logits == V


@pytest.mark.parametrize("source", ["uniform", "mask"])
def test_source_and_noising_frequencies(source):
    flow = TextFlow(V, source)
    g = torch.Generator().manual_seed(0)
    x1 = torch.zeros(50, 2000, dtype=torch.long)  # data token 0 everywhere
    src = flow.sample_source(tuple(x1.shape), g)
    if source == "mask":
        assert (src == V).all()
    else:
        freq = torch.bincount(src.flatten(), minlength=V).float() / src.numel()
        assert freq.shape == (V,) and (freq - 1 / V).abs().max() < 0.01
    t = torch.linspace(0, 0.99, 50)
    x_t = flow.add_noise(x1, t, g)
    # P(data token) = kappa + (1 - kappa) P(source == 0)
    p_src0 = 0.0 if source == "mask" else 1 / V
    expected = t + (1 - t) * p_src0
    assert ((x_t == 0).float().mean(1) - expected).abs().max() < 0.04
    assert torch.equal(flow.add_noise(x1, torch.ones(50), g), x1)  # t = 1 is the data


def test_noising_respects_text_mask():
    flow = TextFlow(V, "mask")
    x1 = torch.randint(0, V, (4, 10))
    mask = torch.arange(10) < torch.tensor([[3], [10], [0], [6]])
    x_t = flow.add_noise(x1, torch.zeros(4), torch.Generator().manual_seed(0), mask)
    assert torch.equal(x_t[~mask], x1[~mask])  # never noised
    assert (x_t[mask] == V).all()  # t = 0: all noise


@pytest.mark.parametrize("n,t,h", [(1.0, 0.3, 0.1), (1.0, 0.7, 0.05), (2.0, 0.5, 0.1)])
def test_ctmc_jump_frequency(n, t, h):
    flow = TextFlow(V, "uniform", exponent=n)
    expected = 1 - math.exp(-h * n * t ** (n - 1) / (1 - t**n))  # by hand, independent of the library
    assert flow.jump_probability(torch.tensor(t), h).item() == pytest.approx(expected, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randint(0, V, (100, 1000), generator=g)  # 100,000 positions
    # the prediction is surely a different token, so a jump is a change
    logits = F.one_hot((x_t + 1) % V, V).float() * 100
    out = flow.step(x_t, logits, t, h, g)
    freq = (out != x_t).float().mean().item()
    assert abs(freq - expected) < 0.01, (freq, expected)
    assert torch.equal(out[out != x_t], ((x_t + 1) % V)[out != x_t])  # jumps go to the prediction


def test_step_time_per_sample_and_mask():
    flow = TextFlow(V, "mask")
    g = torch.Generator().manual_seed(0)
    x_t = torch.full((2, 5000), V)
    logits = torch.randn(2, 5000, V + 1)
    out = flow.step(x_t, logits, torch.tensor([0.0, 0.9]), 0.05, g)  # per-sample times
    p = flow.jump_probability(torch.tensor([0.0, 0.9]), 0.05)
    assert ((out != V).float().mean(1) - p).abs().max() < 0.02
    mask = torch.zeros(2, 5000, dtype=torch.bool)
    mask[:, :100] = True
    out = flow.step(x_t, logits, 0.99, 1.0, g, mask)
    assert (out[:, 100:] == V).all() and (out[:, :100] != V).all()  # p ~ 1 inside, never outside


def test_sampling_never_produces_mask_or_extra_ids():
    g = torch.Generator().manual_seed(0)
    masked = TextFlow(V, "mask")
    logits = torch.zeros(8, 100, V + 1)
    logits[..., V] = 50.0  # the network loves the mask id
    out = masked.sample_clean(logits, g)
    assert (out < V).all()
    uniform = TextFlow(V, "uniform")
    logits = torch.zeros(8, 100, V + 2)
    logits[..., V:] = 50.0  # extra columns beyond the vocabulary
    assert (uniform.sample_clean(logits, g) < V).all()
    assert (uniform.predict(torch.zeros(8, 100, dtype=torch.long), logits, g, greedy=True) < V).all()


def test_sample_clean_matches_softmax():
    flow = TextFlow(V)
    logits = torch.randn(V)
    out = flow.sample_clean(logits.expand(200, 500, V), torch.Generator().manual_seed(0))
    freq = torch.bincount(out.flatten(), minlength=V).float() / out.numel()
    assert (freq - logits.softmax(0)).abs().max() < 0.01


def test_predict_takes_prediction_inside_mask():
    flow = TextFlow(V, "mask")
    x_t = torch.full((3, 6), V)
    target = torch.randint(0, V, (3, 6))
    logits = F.one_hot(target, V + 1).float() * 100
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    out = flow.predict(x_t, logits, torch.Generator().manual_seed(0), mask)
    assert torch.equal(out[mask], target[mask]) and (out[~mask] == V).all()
    assert torch.equal(flow.predict(x_t, logits, greedy=True), target)


def test_losses():
    g = torch.Generator().manual_seed(0)
    flow = TextFlow(V, "mask")
    x1 = torch.randint(0, V, (4, 9), generator=g)
    t = torch.tensor([0.1, 0.5, 0.9, 1.0])
    x_t = flow.add_noise(x1, t, g)
    logits = torch.randn(4, 9, V + 1, generator=g)
    ce = flow.loss(logits, x1, x_t, t, kind="ce")
    assert torch.allclose(ce, F.cross_entropy(logits.transpose(1, 2), x1, reduction="none").mean(1))
    gkl = flow.loss(logits, x1, x_t, t, kind="gkl")
    assert torch.isfinite(gkl).all()  # t = 1 clamped
    lib = MixturePathGeneralizedKL(MixtureDiscreteProbPath(PolynomialConvexScheduler(1.0)), reduction="none")
    assert torch.allclose(gkl[:3], lib(logits[:3], x1[:3], x_t[:3], t[:3]).mean(1))
    # masked mean: unscored positions do not matter; an empty row gives 0
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[:, 5:] = False
    mask[3] = False
    noisy = logits.clone()
    noisy[:, 5:] = torch.randn(4, 4, V + 1) * 10
    for kind in ("ce", "gkl"):
        a = flow.loss(logits, x1, x_t, t, mask, kind)
        b = flow.loss(noisy, x1, x_t, t, mask, kind)
        assert torch.allclose(a, b) and a[3] == 0
    # a perfect prediction has ~zero loss
    perfect = F.one_hot(x1, V + 1).float() * 50
    assert flow.loss(perfect, x1, x_t, t, kind="ce").max() < 1e-6
    with pytest.raises(ValueError):
        flow.loss(logits, x1, x_t, t, kind="mse")


def test_cut_at_end():
    end = 4
    tokens = torch.tensor([[1, 2, end, 5, 5], [end, 0, 0, 0, 0], [3, 3, 3, 3, 3], [1, end, 2, end, 5]])
    assert cut_at_end(tokens, end) == [[1, 2], [], [3, 3, 3, 3, 3], [1]]


def test_mask_id_inside_the_vocabulary_is_never_sampled():
    flow = TextFlow(V, "mask", mask_id=3)
    logits = torch.zeros(4, 200, V)
    logits[..., 3] = 50.0
    out = flow.sample_clean(logits, torch.Generator().manual_seed(0))
    assert not (out == 3).any() and (out < V).all()
    assert (flow.sample_source((2, 5)) == 3).all()


@pytest.mark.parametrize("kind", ["ce", "gkl"])
def test_masked_loss_is_the_mean_over_scored_positions_only(kind):
    """A partial loss_mask: each row's loss is the mean of its per-position losses over the scored positions
    (divided by their count, not by L); a row with no scored position gets 0."""
    g = torch.Generator().manual_seed(1)
    flow = TextFlow(V, "mask")
    x1 = torch.randint(0, V, (3, 8), generator=g)
    t = torch.tensor([0.2, 0.6, 0.4])
    x_t = flow.add_noise(x1, t, g)
    logits = torch.randn(3, 8, V + 1, generator=g)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, :3] = True  # 3 of 8 scored
    mask[1, [1, 4, 5, 7]] = True  # 4 of 8, not a prefix
    per_pos = torch.stack([flow.loss(logits[:, j : j + 1], x1[:, j : j + 1], x_t[:, j : j + 1], t, kind=kind)
                           for j in range(8)], dim=1)  # fmt: skip
    got = flow.loss(logits, x1, x_t, t, loss_mask=mask, kind=kind)
    assert torch.allclose(got[0], per_pos[0, :3].mean())
    assert torch.allclose(got[1], per_pos[1, [1, 4, 5, 7]].mean())
    assert got[2].item() == 0.0
    assert not torch.allclose(got[:2], (per_pos * mask).sum(1)[:2] / 8)  # what dividing by L would give
