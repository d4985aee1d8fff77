"""Video flow: rectified-flow path, target, loss, timestep sampling and shift, grid, Euler, guidance."""

from __future__ import annotations

import pytest
import torch

from univigu.flow import (
    VideoFlow,
    clean_estimate,
    edm_coefficients,
    euler_step,
    guide,
    shift_time,
    time_grid,
    video_timestep,
)


def test_network_timestep_ends():
    assert video_timestep(torch.tensor(1.0)).item() == 1000.0  # pure noise
    assert video_timestep(torch.tensor(0.0)).item() == 0.0  # clean


@pytest.mark.parametrize("k", [1.0, 3.0, 5.0])
def test_shift_fixes_ends_and_is_monotone(k):
    s = torch.linspace(0, 1, 101)
    out = shift_time(s, k)
    assert out[0] == 0 and torch.isclose(out[-1], torch.tensor(1.0))
    assert (out.diff() > 0).all()
    if k == 1.0:
        assert torch.allclose(out, s)
    else:
        assert (out[1:-1] > s[1:-1]).all()  # k > 1 moves every level towards noise
        assert torch.allclose(out, k * s / (1 + (k - 1) * s))


def test_time_grid_runs_from_noise_to_clean():
    grid = time_grid(10, shift=3.0)
    assert grid.shape == (11,)
    assert grid[0].item() == pytest.approx(1.0) and grid[-1].item() == 0.0
    assert (grid.diff() < 0).all()
    assert grid[1] > 0.9  # shifted: the first step is smaller than 1/10
    assert torch.allclose(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError):
        time_grid(0)


def test_path_ends_target_and_estimate():
    g = torch.Generator().manual_seed(0)
    x0, e = torch.randn(3, 4, 2, 5, generator=g), torch.randn(3, 4, 2, 5, generator=g)
    flow = VideoFlow()
    assert torch.equal(flow.add_noise(x0, torch.zeros(3), e), x0)
    assert torch.equal(flow.add_noise(x0, torch.ones(3), e), e)
    s = torch.tensor([0.2, 0.5, 0.9])
    x_s = flow.add_noise(x0, s, e)
    v = flow.velocity_target(x0, e)
    d = 1e-2  # the target is the derivative of the path in s
    assert torch.allclose((flow.add_noise(x0, s + d, e) - x_s) / d, v, atol=1e-3)
    for i in range(3):
        assert torch.allclose(clean_estimate(x_s[i], v[i], s[i]), x0[i], atol=1e-6)
    # an exact velocity makes Euler exact: from s to s' the path value at s'
    stepped = euler_step(x_s[1], v[1], 0.5, 0.1)
    assert torch.allclose(stepped, flow.add_noise(x0[1:2], torch.tensor([0.1]), e[1:2])[0], atol=1e-6)


def test_loss_is_per_sample_mse():
    v, target = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    target[1] *= 2
    assert torch.allclose(VideoFlow.loss(v, target), torch.tensor([1.0, 4.0]))
    assert VideoFlow.loss(target, target).abs().max() == 0


@pytest.mark.parametrize("kind", ["uniform", "logit-normal"])
def test_time_sampling_range_seed_and_shift(kind):
    n = 20000
    s = VideoFlow(time_sampling=kind).sample_time(n, torch.Generator().manual_seed(0))
    assert s.shape == (n,) and (s >= 0).all() and (s < 1).all()
    assert abs(s.median().item() - 0.5) < 0.02  # both are symmetric about 1/2 without shift
    if kind == "logit-normal":
        assert (s - 0.5).abs().mean() < 0.22  # concentrated in the middle (uniform gives 0.25)
    again = VideoFlow(time_sampling=kind).sample_time(n, torch.Generator().manual_seed(0))
    assert torch.equal(s, again)
    shifted = VideoFlow(shift=3.0, time_sampling=kind).sample_time(n, torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, shift_time(s, 3.0))
    assert shifted.mean() > s.mean() + 0.1
    with pytest.raises(ValueError):
        VideoFlow(time_sampling="beta")


@pytest.mark.parametrize("name, value, error", [
    ("shift", -1.0, ValueError),  # warps s outside [0, 1)
    ("shift", 0, ValueError),
    ("shift", float("inf"), ValueError),
    ("shift", "3", TypeError),
    ("logit_std", 0.0, ValueError),
    ("logit_std", float("nan"), ValueError),
    ("sigma_data", -0.5, ValueError),
    ("sigma_data", 0, ValueError),
    ("logit_mean", float("nan"), ValueError),
])  # fmt: skip
def test_bad_flow_parameters_are_named_errors(name, value, error):
    with pytest.raises(error, match=name):
        VideoFlow(**{name: value})


def test_guidance():
    c, u = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(guide(c, u, 1.0), c)
    assert torch.allclose(guide(c, u, 0.0), u)
    assert torch.allclose(guide(c, u, 5.0), u + 5.0 * (c - u))


def test_sample_prediction_stands_for_the_velocity_of_its_clean_estimate():
    g = torch.Generator().manual_seed(0)
    x0, e = torch.randn(4, 3, 2, 4, 4, generator=g), torch.randn(4, 3, 2, 4, 4, generator=g)
    s = torch.tensor([1.0, 0.7, 0.3, 0.05])
    x_s = VideoFlow.add_noise(x0, s, e)
    flow = VideoFlow(prediction="sample")
    # a perfect clean estimate gives the exact target velocity down to the cap on 1 / s
    assert torch.allclose(flow.velocity(x0, x_s, s), VideoFlow.velocity_target(x0, e), atol=1e-5)
    assert torch.equal(VideoFlow().velocity(x0, x_s, s), x0)  # velocity prediction is the output itself
    near_clean = flow.velocity(x0, x_s, torch.full((4,), 0.001))
    assert torch.isfinite(near_clean).all()
    with pytest.raises(ValueError, match="prediction"):
        VideoFlow(prediction="epsilon")


def test_sample_loss_space_is_the_clean_video_error():
    g = torch.Generator().manual_seed(1)
    x0, e, x0_hat = (torch.randn(3, 3, 2, 4, 4, generator=g) for _ in range(3))
    s = torch.tensor([0.9, 0.4, 0.01])
    x_s = VideoFlow.add_noise(x0, s, e)
    flow = VideoFlow(prediction="sample", loss_space="sample")
    loss = flow.training_loss(flow.velocity(x0_hat, x_s, s), VideoFlow.velocity_target(x0, e), s)
    clean_error = (x0_hat - x0).pow(2).flatten(1).mean(1)
    assert torch.allclose(loss, clean_error, rtol=1e-4)  # exactly the x0 MSE, below the 1 / s cap too
    velocity_space = VideoFlow(prediction="sample").training_loss(flow.velocity(x0_hat, x_s, s),
                                                                  VideoFlow.velocity_target(x0, e), s)  # fmt: skip
    assert torch.allclose(velocity_space[:2] * s[:2] ** 2, loss[:2], rtol=1e-4)
    with pytest.raises(ValueError, match="loss_space"):
        VideoFlow(loss_space="noise")


def test_edm_preconditioning_copies_at_low_noise_and_predicts_at_high_noise():
    s = torch.tensor([0.0, 0.5, 1.0])
    c_skip, c_out = edm_coefficients(s, sigma_data=0.35)
    assert torch.allclose(c_skip[[0, 2]], torch.tensor([1.0, 0.0])) and c_out[0] == 0
    assert torch.isclose(c_out[2], torch.tensor(0.35))  # pure noise: F is x0 in units of the data std
    # c_skip x_s is the best linear guess of x0: its error has exactly the variance c_out^2 that F has to explain
    g = torch.Generator().manual_seed(2)
    x0, e = 0.35 * torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    x_s = VideoFlow.add_noise(x0, torch.tensor(0.5), e)
    assert abs((x0 - c_skip[1] * x_s).var() - c_out[1] ** 2) < 2e-3


def test_edm_prediction_stands_for_the_velocity_and_its_loss_is_the_network_error():
    g = torch.Generator().manual_seed(3)
    x0, e, f = (torch.randn(4, 3, 2, 4, 4, generator=g) for _ in range(3))
    s = torch.tensor([1.0, 0.7, 0.3, 0.05])
    x_s = VideoFlow.add_noise(x0, s, e)
    flow = VideoFlow(prediction="edm", loss_space="edm", sigma_data=0.5)
    c_skip, c_out = (c.view(-1, 1, 1, 1, 1) for c in edm_coefficients(s, 0.5))
    perfect = (x0 - c_skip * x_s) / c_out
    target = VideoFlow.velocity_target(x0, e)
    assert torch.allclose(flow.velocity(perfect, x_s, s), target, atol=1e-4)
    loss = flow.training_loss(flow.velocity(f, x_s, s), target, s)
    assert torch.allclose(loss, (f - perfect).pow(2).flatten(1).mean(1), rtol=1e-3)
    sample_space = VideoFlow(prediction="edm", loss_space="sample", sigma_data=0.5)
    x0_hat = c_skip * x_s + c_out * f
    assert torch.allclose(sample_space.training_loss(flow.velocity(f, x_s, s), target, s),
                          (x0_hat - x0).pow(2).flatten(1).mean(1), rtol=1e-3)  # fmt: skip


@pytest.mark.parametrize("prediction", ["sample", "edm"])
def test_a_perfect_clean_video_costs_nothing_at_any_noise_and_samples_exactly(prediction):
    """Below the 1 / s cap (s < 0.05) the training target is capped as the velocity is (a perfect prediction
    cost 0.0013 / 0.97 at s = 0.01 before), and samplers step exactly (min_noise 0) to the clean end."""
    from univigu.flow.video import edm_coefficients, velocity_from_output

    g = torch.Generator().manual_seed(4)
    x0, e = torch.randn(4, 3, 2, 4, 4, generator=g), torch.randn(4, 3, 2, 4, 4, generator=g)
    s = torch.tensor([0.003, 0.01, 0.03, 0.5])
    x_s = VideoFlow.add_noise(x0, s, e)
    perfect = x0
    if prediction == "edm":
        c_skip, c_out = (c.view(-1, 1, 1, 1, 1) for c in edm_coefficients(s, 0.5))
        perfect = (x0 - c_skip * x_s) / c_out
    for loss_space in ("velocity", "sample", "edm"):
        flow = VideoFlow(prediction=prediction, loss_space=loss_space)
        loss = flow.training_loss(flow.velocity(perfect, x_s, s), VideoFlow.velocity_target(x0, e), s)
        assert loss.max() < 1e-8, (loss_space, loss)
    exact = velocity_from_output(perfect, x_s, s, prediction, min_noise=0.0)
    assert torch.allclose(euler_step(x_s, exact, s.view(-1, 1, 1, 1, 1), 0.0), x0, atol=1e-4)
    clean = velocity_from_output(perfect, x0, torch.zeros(4), prediction, min_noise=0.0)
    assert torch.equal(clean, torch.zeros_like(clean))  # s = 0: a clean input, no velocity (not a 0 / 0)
