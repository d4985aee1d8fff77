"""Video flow: rectified flow (continuous flow matching) in the Wan convention.

Noise level s in [0, 1]: s = 0 is the clean latent, s = 1 pure Gaussian noise.
    x_s = (1 - s) x0 + s e,   e ~ N(0, I),   target velocity v = e - x0,   loss = MSE.
The network sees the timestep 1000 s. Sampling integrates dx/ds = v with Euler from s = 1 to 0
on a grid warped by Wan's shift k: s' = k s / (1 + (k - 1) s) (k > 1 spends more steps at high noise).

What the network outputs is the parameterization: "velocity" (Wan's, v directly), "sample" (the
clean video x0_hat, turned into v = (x_s - x0_hat) / s) or "edm" (Karras et al. 2022's preconditioning:
x0_hat = c_skip(s) x_s + c_out(s) F, so the network F never has to copy its input). The loss and the
samplers always see v.
Sample prediction is for pixel-space models whose patches are about as wide as the model (the toy
world first used 4x4x4x3 = 192 values per token in 192 channels): there a velocity network must carry
the full-rank noise through every block and learns slowly, while the clean video is low-dimensional (Li & He 2025,
"Back to Basics: Let Denoising Generative Models Denoise"). A sample network must copy its input at low
noise instead, which a small Wan (LayerNorm before the output head) does badly; "edm" leaves both copies
to the skip term and gives the network a unit-variance target at every noise level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from univigu.checks import check_finite, check_positive

NUM_TRAIN_TIMESTEPS = 1000  # the network's timestep scale, shared by both modalities
PREDICTIONS = ("velocity", "sample", "edm")  # also the loss spaces: the error of that parameterization
MIN_SAMPLE_NOISE = 0.05  # sample / edm prediction in training: 1 / s is capped at 20 near the clean end


def shift_time(s: Tensor, shift: float) -> Tensor:
    """Wan's timestep shift s' = k s / (1 + (k - 1) s); fixes 0 and 1, k = 1 is the identity."""
    return shift * s / (1 + (shift - 1) * s)


def video_timestep(s: Tensor) -> Tensor:
    """Noise level s [B] -> network timestep 1000 s (1000 = pure noise, 0 = clean)."""
    return s * NUM_TRAIN_TIMESTEPS


def time_grid(num_steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> Tensor:
    """The sampling grid of noise levels, [num_steps + 1], from 1 (noise) down to 0 (clean), shifted."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_time(torch.linspace(1.0, 0.0, num_steps + 1, device=device, dtype=torch.float64), shift).float()


def euler_step(x: Tensor, velocity: Tensor, s: float | Tensor, s_next: float | Tensor) -> Tensor:
    """One Euler step of dx/ds = v from s to s_next (< s)."""
    return x + (s_next - s) * velocity.to(x.dtype)


def clean_estimate(x: Tensor, velocity: Tensor, s: float | Tensor) -> Tensor:
    """x0_hat = x_s - s v: the clean latent the velocity points to."""
    return x - s * velocity.to(x.dtype)


def edm_coefficients(s: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) [B] of x0_hat = c_skip x_s + c_out F for x_s = (1 - s) x0 + s e: c_skip x_s is the best
    linear guess of x0 (data of std sigma_data), c_out the std of what is left, so F's target has unit variance."""
    s = s.double()
    norm = ((1 - s) * sigma_data) ** 2 + s**2
    return ((1 - s) * sigma_data**2 / norm).float(), (s * sigma_data / norm.sqrt()).float()


def velocity_from_output(
    output: Tensor, x_s: Tensor, s: Tensor, prediction: str = "velocity", sigma_data: float = 0.5,
    min_noise: float = MIN_SAMPLE_NOISE,
) -> Tensor:
    """The velocity a network output stands for. output, x_s [B, ...]; s [B] noise levels; sigma_data: the
    data std of the "edm" parameterization. A clean-video output x0_hat stands for (x_s - x0_hat) / s with s
    capped below at `min_noise` (training: the loss keeps finite weights near s = 0; the trainer's target is
    capped alike). Samplers pass 0: exact Euler steps to the clean end, and 0 where s = 0 (a clean input)."""
    if prediction == "velocity":
        return output
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    x_s = x_s.to(output.dtype)
    if prediction == "edm":
        c_skip, c_out = edm_coefficients(s, sigma_data)
        output = _bcast(c_skip, x_s) * x_s + _bcast(c_out, x_s) * output
    if min_noise > 0:
        return (x_s - output) / _bcast(s.clamp_min(min_noise), x_s)
    s = _bcast(s, x_s)
    return torch.where(s > 0, (x_s - output) / s.clamp_min(torch.finfo(s.dtype).tiny), 0.0)


def guide(v_cond: Tensor, v_null: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on the velocity: v_null + w (v_cond - v_null)."""
    return v_null + scale * (v_cond - v_null)


def _bcast(s: Tensor, like: Tensor) -> Tensor:
    """s [B] -> [B, 1, ..., 1] to broadcast against like [B, ...]."""
    return s.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@dataclass
class VideoFlow:
    """Training side of the video flow: timestep sampling, noising, target and loss.

    time_sampling: "uniform" (s ~ U[0, 1)) or "logit-normal" (s = sigmoid(N(logit_mean, logit_std)));
    either is then warped by `shift` (1.0 = no warp).
    """

    shift: float = 1.0
    time_sampling: Literal["uniform", "logit-normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    prediction: Literal["velocity", "sample", "edm"] = "velocity"
    loss_space: Literal["velocity", "sample", "edm"] = "velocity"
    sigma_data: float = 0.5  # the "edm" parameterization's data std

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.loss_space not in PREDICTIONS:
            raise ValueError(f"loss_space must be one of {PREDICTIONS}, got {self.loss_space!r}")
        if self.time_sampling not in ("uniform", "logit-normal"):
            raise ValueError(f"time_sampling must be 'uniform' or 'logit-normal', got {self.time_sampling!r}")
        # shift <= 0 warps s outside [0, 1) and a zero std / sigma_data divides by zero: caught here, not in training
        for name in ("shift", "logit_std", "sigma_data"):
            check_positive(name, getattr(self, name))
        check_finite("logit_mean", self.logit_mean)

    def sample_time(self, batch: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Noise levels s [batch] in [0, 1)."""
        gdev = generator.device if generator is not None else device
        if self.time_sampling == "uniform":
            s = torch.rand(batch, generator=generator, device=gdev)
        else:
            z = torch.randn(batch, generator=generator, device=gdev)
            s = torch.sigmoid(self.logit_mean + self.logit_std * z)
        return shift_time(s, self.shift).to(device)

    def velocity(self, output: Tensor, x_s: Tensor, s: Tensor) -> Tensor:
        """The velocity the network's output stands for (x_s the network's input at noise levels s [B])."""
        return velocity_from_output(output, x_s, s, self.prediction, self.sigma_data)

    @staticmethod
    def add_noise(x0: Tensor, s: Tensor, noise: Tensor) -> Tensor:
        """x_s = (1 - s) x0 + s e; x0, noise [B, ...], s [B]."""
        s = _bcast(s, x0)
        return (1 - s) * x0 + s * noise

    @staticmethod
    def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
        """v = e - x0 (dx_s/ds)."""
        return noise - x0

    def training_loss(self, velocity: Tensor, target: Tensor, s: Tensor) -> Tensor:
        """Per-sample loss [B] at noise levels s [B]: the velocity MSE, or with loss_space "sample" the
        clean-video MSE s^2 |v_hat - v|^2 = |x0_hat - x0|^2, which weighs high noise (where a video's
        layout is decided) far more than the velocity MSE does; with "edm" the MSE of the network's own
        output, |x0_hat - x0|^2 / c_out^2 (EDM's weighting: every noise level counts alike).
        `velocity` from `self.velocity`, `target` e - x0: for sample / edm predictions, whose velocity caps
        1 / s, the target is capped alike, so a perfect clean video costs nothing at every noise level."""
        s_min = s.float().clamp_min(MIN_SAMPLE_NOISE)
        if self.prediction != "velocity":
            target = target * _bcast(s.float() / s_min, target)  # (x_s - x0) / s_min; = e - x0 from s = 0.05
        mse = self.loss(velocity, target)
        if self.loss_space == "velocity":
            return mse
        if self.loss_space == "sample":
            return mse * s_min.square()
        return mse * (s_min / edm_coefficients(s_min, self.sigma_data)[1]).square()

    @staticmethod
    def loss(velocity: Tensor, target: Tensor) -> Tensor:
        """Per-sample MSE [B] (mean over all non-batch dims), computed in float32."""
        return (velocity.float() - target.float()).pow(2).flatten(1).mean(1)
