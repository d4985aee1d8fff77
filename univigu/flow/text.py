"""Text flow: discrete flow matching on a mixture path (Gat et al. 2024, facebookresearch/flow_matching).

Time t in [0, 1]: t = 0 is the source (noise), t = 1 the data. Each position independently holds the
data token with probability kappa(t) = t^n, else a source token (uniform over the vocabulary, or the
mask id: absorbing). The network sees the timestep round((1 - t) * 1000), so 1000 is pure noise for
text as for video. It predicts logits of the clean token at every position.

From flow_matching we use the scheduler (kappa, kappa'), the path and the generalized-KL loss. Written
here is only what it lacks: its path sampling and its Euler solver draw from the global RNG (no
generator) and the solver owns the loop, whereas the joint sampler needs one synchronised CTMC step it
can call inside its own loop; and positions outside `text_mask` must never be noised nor updated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from flow_matching.loss import MixturePathGeneralizedKL
from flow_matching.path import MixtureDiscreteProbPath
from flow_matching.path.scheduler import PolynomialConvexScheduler
from torch import Tensor

from univigu.checks import check_int, check_positive
from univigu.flow.video import NUM_TRAIN_TIMESTEPS

_T_MAX_GKL = 1.0 - 1e-3  # the GKL weight kappa'/(1 - kappa) is infinite at t = 1


def text_timestep(t: Tensor) -> Tensor:
    """Text flow time t [B] -> network timestep round((1 - t) * 1000) (1000 = pure noise, 0 = clean)."""
    return torch.round((1.0 - t) * NUM_TRAIN_TIMESTEPS)


def cut_at_end(tokens: Tensor, end_id: int) -> list[list[int]]:
    """Text-length policy: each row of tokens [B, L] cut before its first end id (whole row if none)."""
    rows = []
    for row in tokens.tolist():
        rows.append(row[: row.index(end_id)] if end_id in row else row)
    return rows


def _as_time(t: float | Tensor, batch: int, device) -> Tensor:
    """A float or [B] time -> float32 [B] on device."""
    return torch.as_tensor(t, dtype=torch.float32, device=device).expand(batch)


def uniform_draw(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    """U[0, 1) drawn on the generator's device (so a CPU generator also seeds GPU runs), moved to device."""
    gdev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gdev).to(device)


def normal_draw(shape: tuple[int, ...], generator: torch.Generator | None, device,
                dtype: torch.dtype = torch.float32) -> Tensor:  # fmt: skip
    """N(0, 1) in `dtype`, drawn on the generator's device as `uniform_draw` is, moved to device."""
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev, dtype=dtype).to(device)


@dataclass
class TextFlow:
    """Mixture-path discrete flow over a vocabulary of `vocab_size` ids (0 .. V-1).

    source: "uniform" (random ids in [0, V)) or "mask" (every position starts as `mask_id`; default
    mask_id = V, an extra embedding row, and then the logits have V + 1 columns). Sampling never
    produces the mask id nor any id >= V.
    exponent: n in kappa(t) = t^n.
    """

    vocab_size: int
    source: Literal["uniform", "mask"] = "uniform"
    mask_id: int | None = None
    exponent: float = 1.0
    scheduler: PolynomialConvexScheduler = field(init=False, repr=False)
    path: MixtureDiscreteProbPath = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.source not in ("uniform", "mask"):
            raise ValueError(f"source must be 'uniform' or 'mask', got {self.source!r}")
        # checked here: vocab_size 0 drew ids of -1, and flow_matching rejects exponent <= 0 with a bare assert
        self.vocab_size = check_int("vocab_size", self.vocab_size, 1)
        check_positive("exponent", self.exponent)
        if self.mask_id is None:
            self.mask_id = self.vocab_size
        self.scheduler = PolynomialConvexScheduler(n=self.exponent)
        self.path = MixtureDiscreteProbPath(self.scheduler)
        self._gkl = MixturePathGeneralizedKL(self.path, reduction="none")

    @property
    def num_logits(self) -> int:
        """Columns the network's logits need: V, or V + 1 when the mask source uses the extra id V."""
        return self.vocab_size + int(self.source == "mask" and self.mask_id >= self.vocab_size)

    # ---- schedule ------------------------------------------------------------------------------------

    def kappa(self, t: Tensor) -> Tensor:
        """kappa(t) = t^exponent: the probability that a position holds its clean token at time t."""
        return self.scheduler(t).alpha_t

    def jump_rate(self, t: Tensor) -> Tensor:
        """kappa'(t) / (1 - kappa(t)): the rate at which a not-yet-data position jumps to the data."""
        out = self.scheduler(t)
        return out.d_alpha_t / (1 - out.alpha_t).clamp_min(1e-12)

    def jump_probability(self, t: Tensor, h: float | Tensor) -> Tensor:
        """1 - exp(-h kappa'(t) / (1 - kappa(t))): probability of a jump in an Euler step of size h."""
        return 1 - torch.exp(-h * self.jump_rate(t))

    # ---- training ------------------------------------------------------------------------------------

    def sample_source(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> Tensor:
        """Source tokens (long) of the given shape."""
        if self.source == "mask":
            return torch.full(shape, self.mask_id, dtype=torch.long, device=device)
        u = uniform_draw(shape, generator, device)
        return (u * self.vocab_size).long().clamp_max(self.vocab_size - 1)

    def sample_time(self, batch: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Text times t [batch] ~ U[0, 1) (never exactly the data end)."""
        return uniform_draw((batch,), generator, device)

    def add_noise(
        self, x1: Tensor, t: Tensor, generator: torch.Generator | None = None, text_mask: Tensor | None = None
    ) -> Tensor:
        """x_t [B, L]: each position keeps x1 with probability kappa(t), else a source token.

        x1 [B, L] long, t [B]; positions where text_mask [B, L] is False are left as x1.
        """
        source = self.sample_source(tuple(x1.shape), generator, x1.device)
        keep = uniform_draw(tuple(x1.shape), generator, x1.device) < self.kappa(t.float()).unsqueeze(1)
        if text_mask is not None:
            keep = keep | ~text_mask
        return torch.where(keep, x1, source)

    def loss(
        self,
        logits: Tensor,
        x1: Tensor,
        x_t: Tensor,
        t: Tensor,
        loss_mask: Tensor | None = None,
        kind: Literal["ce", "gkl"] = "ce",
    ) -> Tensor:
        """Per-sample text loss [B]: the mean over positions in loss_mask [B, L] (all if None).

        logits [B, L, V'], x1 clean [B, L], x_t noised [B, L], t [B] text time.
        "ce": cross-entropy of the clean token. "gkl": the mixture path's generalized KL (flow_matching).
        A row without any position in the mask gets 0.
        """
        logits = logits.float()
        if kind == "ce":
            per_pos = F.cross_entropy(logits.transpose(1, 2), x1, reduction="none")
        elif kind == "gkl":
            per_pos = self._gkl(logits, x1, x_t, t.float().clamp(max=_T_MAX_GKL))
        else:
            raise ValueError(f"kind must be 'ce' or 'gkl', got {kind!r}")
        if loss_mask is None:
            return per_pos.mean(1)
        m = loss_mask.to(per_pos.dtype)
        # where (not multiply) so that a non-finite value at an unscored position cannot leak in
        return torch.where(loss_mask, per_pos, 0.0).sum(1) / m.sum(1).clamp_min(1.0)

    # ---- sampling ------------------------------------------------------------------------------------

    def allowed_logits(self, logits: Tensor) -> Tensor:
        """float32 logits with the mask id (mask source) and ids >= V set to -inf: never sampled."""
        logits = logits.float()
        forbid = torch.arange(logits.shape[-1], device=logits.device) >= self.vocab_size
        if self.source == "mask":
            forbid[self.mask_id] = True
        return logits.masked_fill(forbid, float("-inf"))

    def sample_clean(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x1_hat [B, L] ~ softmax(logits [B, L, V']), never a forbidden id.

        Inverse-CDF sampling: one uniform per position (cheap for a 256k vocabulary, works with a
        generator on any device). right=True makes zero-probability ids unreachable.
        """
        probs = torch.softmax(self.allowed_logits(logits), dim=-1)
        cdf = probs.cumsum(-1)
        u = uniform_draw(tuple(logits.shape[:-1]) + (1,), generator, logits.device)
        idx = torch.searchsorted(cdf, u * cdf[..., -1:], right=True)
        return idx.squeeze(-1).clamp_max(logits.shape[-1] - 1)

    def step(
        self,
        x_t: Tensor,
        logits: Tensor,
        t: float | Tensor,
        h: float | Tensor,
        generator: torch.Generator | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        """One CTMC Euler step from t to t + h: x_{t+h} [B, L].

        Each position draws x1_hat from the predicted clean distribution and jumps to it with probability
        1 - exp(-h kappa'(t) / (1 - kappa(t))) (the library solver's rule without its divergence-free
        term). Positions where text_mask is False never change.
        """
        b = x_t.shape[0]
        x1_hat = self.sample_clean(logits, generator)
        p_jump = self.jump_probability(_as_time(t, b, x_t.device), torch.as_tensor(h, device=x_t.device))
        jump = uniform_draw(tuple(x_t.shape), generator, x_t.device) < p_jump.unsqueeze(1)
        if text_mask is not None:
            jump = jump & text_mask
        return torch.where(jump, x1_hat, x_t)

    def predict(
        self,
        x_t: Tensor,
        logits: Tensor,
        generator: torch.Generator | None = None,
        text_mask: Tensor | None = None,
        greedy: bool = False,
    ) -> Tensor:
        """The last step: every position in text_mask takes the prediction (a sample, or argmax if greedy)."""
        x1_hat = self.allowed_logits(logits).argmax(-1) if greedy else self.sample_clean(logits, generator)
        return x1_hat if text_mask is None else torch.where(text_mask, x1_hat, x_t)
