"""The Uni-ViGU transformer: Wan2.1's diffusion transformer with a modality-driven mixture of experts.

One network, two token streams, one forward pass (METHOD.md sections 2-3):

    video [B, C, T, H, W] -> patch Conv3d -> tokens, 3D RoPE  -+
                                                               +-> N x block -> velocity [B, C, T, H, W]
    text  [B, L] token ids -> embedding  -> tokens, 1D RoPE  -+              -> logits   [B, L, V']

In every block the two streams share the self-attention (over the concatenation of both), the
cross-attention to the prompt and the adaLN table; each stream has its own FFN and is modulated by its
own timestep. There is no learned router: a token's modality decides its expert.

The shared part has exactly the parameter names and shapes of diffusers' `WanTransformer3DModel`, so a
Wan checkpoint in diffusers format loads without renaming, and with an empty text stream the forward
pass *is* Wan's (same operations, same order, same dtypes). The text-only parameters are

    text_embedding, time_embedder_t, time_proj_t, blocks.N.ffn_t, scale_shift_table_t, text_proj_out
    (and text_norm, the released code's learned text-head norm weight, with `text_norm_weight`)

Decision (text positions): 1D RoPE over the *full* head dim, positions 0..L-1, theta `text_rope_theta`
(default 1e4, Wan's), with Wan's rotate-consecutive-pairs convention; `text_rope_halves` rotates channel i
with channel i + head_dim/2 instead, as the released Uni-ViGU code does (its checkpoints need it). Text and
video positions live in separate coordinate systems (text position 0 and the first video patch turn alike).
"""

from __future__ import annotations

import math
import os
from typing import Iterator, Literal, NamedTuple

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding, get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from univigu.models.loading import StrictLoading

__all__ = [
    "ATTENTION_BACKENDS",
    "ATTENTION_LAYOUTS",
    "UniViGUOutput",
    "VideoCache",
    "UniViGUTransformer",
    "UniViGUBlock",
    "keep_attention_checkpointing",
    "parameter_breakdown",
]

# Config keys that describe the shared (Wan) network; `from_wan` copies exactly these.
WAN_CONFIG_KEYS = (
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
    "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps",
    "rope_max_seq_len",
)  # fmt: skip
WAN_ROPE_THETA = 10000.0  # Wan's video RoPE base; a Wan config may name another as `rope_theta` (see rope_theta_of)

# "full": every token attends to every token. "video_prefix": where the video is clean (t_video == 0, the V2T
# regime; per sample) video queries attend to video keys only, so the clean video's states do not depend on the
# text and V2T runs the video once and then only the text tokens per step (`encode_video`, `forward_text`).
ATTENTION_LAYOUTS = ("full", "video_prefix")

# `set_attention_backend` names (diffusers' names for torch's SDPA kernels): "native" lets torch choose; the others
# force one kernel (to compare kernels, or where torch's choice is not the fastest; torch 2.11 on an H100 already
# picks cuDNN's).
ATTENTION_BACKENDS = {
    "native": None,
    "_native_flash": SDPBackend.FLASH_ATTENTION,
    "_native_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "_native_cudnn": SDPBackend.CUDNN_ATTENTION,
    "_native_math": SDPBackend.MATH,
}


# ----------------------------------------------------------------------------------------------------
# Small pieces (Wan's numerics, our names)
# ----------------------------------------------------------------------------------------------------


def rope_theta_of(wan: nn.Module) -> float:
    """The video RoPE base a diffusers Wan transformer was built with (its config's `rope_theta`, else Wan's)."""
    return float(wan.config.get("rope_theta", WAN_ROPE_THETA))


def _rope_angles(length: int, dim: int, theta: float, device: torch.device) -> Tensor:
    """Rotation angles [length, dim/2] for positions 0..length-1, in float64 like diffusers so cos/sin match."""
    dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype, device=device) / dim))
    return torch.outer(torch.arange(length, dtype=dtype, device=device), inv_freq)


def video_rope(
    grid: tuple[int, int, int], head_dim: int, device: torch.device, theta: float = WAN_ROPE_THETA
) -> tuple[Tensor, Tensor]:
    """cos, sin [F*H*W, head_dim/2] for patches in (f, h, w) raster order.

    The head dim is split as Wan splits it: h and w get 2*(head_dim//6) channels each, t the rest
    (44/42/42 at head_dim 128); theta 1e4 in Wan.
    """
    f, h, w = grid
    d_hw = 2 * (head_dim // 6)
    d_t = head_dim - 2 * d_hw
    a_t = _rope_angles(f, d_t, theta, device)[:, None, None].expand(f, h, w, -1)
    a_h = _rope_angles(h, d_hw, theta, device)[None, :, None].expand(f, h, w, -1)
    a_w = _rope_angles(w, d_hw, theta, device)[None, None, :].expand(f, h, w, -1)
    angles = torch.cat([a_t, a_h, a_w], dim=-1).reshape(f * h * w, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def text_rope(length: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin [L, head_dim/2]: 1D RoPE over the full head dim, positions 0..L-1."""
    angles = _rope_angles(length, head_dim, theta, device)
    return angles.cos().float(), angles.sin().float()


# cos, sin [N, head_dim/2], and optionally the first row that rotates halves (see apply_rope)
RoPE = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, int | None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, halves_from: int | None = None) -> Tensor:
    """Rotate consecutive channel pairs (Wan's convention); rows from `halves_from` on rotate channel i with
    channel i + head_dim/2 instead (the released Uni-ViGU code's text RoPE). x [B, N, heads, head_dim],
    cos/sin [N, head_dim/2]."""
    if halves_from is not None:
        pairs = apply_rope(x[:, :halves_from], cos[:halves_from], sin[:halves_from])
        x1, x2 = x[:, halves_from:].chunk(2, dim=-1)
        cos, sin = cos[halves_from:, None], sin[halves_from:, None]
        return torch.cat([pairs, torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)], dim=1)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Wan attention: q/k RMSNorm across heads, optional RoPE, torch SDPA. Cross-attention when `context` is given."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # a list only for Wan's key name `to_out.0`
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.sdpa_backend: SDPBackend | None = None  # None: torch chooses (see ATTENTION_BACKENDS)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        rope: RoPE | None = None,
    ) -> Tensor:
        """x [B, N, D], context [B, S, D] (None: self-attention), mask [B, 1, 1, S] bool (True = attend)."""
        return self.attend(*self.qkv(x, context, rope), mask)

    def qkv(
        self, x: Tensor, context: Tensor | None = None, rope: RoPE | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Normed, rotated q [B, heads, N, head_dim] and k, v [B, heads, S, head_dim]."""
        context = x if context is None else context
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.heads, -1))
        k = self.norm_k(self.to_k(context)).unflatten(2, (self.heads, -1))
        v = self.to_v(context).unflatten(2, (self.heads, -1))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """SDPA and the output projection: q [B, heads, N, head_dim], k/v [B, heads, S, head_dim] -> [B, N, D]."""
        if self.sdpa_backend is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            with sdpa_kernel(self.sdpa_backend):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).flatten(2).type_as(q))


class ConditionEmbedder(nn.Module):
    """Wan's condition embedder: video timestep MLP, its projection to 6 modulation vectors, prompt projection;
    diffusers' modules, built as its WanTimeTextImageEmbedding builds them (Wan's keys). The sinusoid and the
    SiLU before `time_proj` are in `UniViGUTransformer._embed_timestep`, which the text timestep shares."""

    def __init__(self, dim: int, freq_dim: int, prompt_dim: int):
        super().__init__()
        self.time_embedder = TimestepEmbedding(in_channels=freq_dim, time_embed_dim=dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = PixArtAlphaTextProjection(prompt_dim, dim, act_fn="gelu_tanh")


def _modulate(x_normed: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x_normed * (1 + scale) + shift


# SDPA's kernels as the dispatcher sees them (the math backend decomposes into matmuls and is not among them).
_ATTENTION_OPS = {
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def keep_attention_checkpointing(function, *args, **kwargs):
    """Gradient checkpointing that keeps each attention kernel's output: backward recomputes a block's norms,
    projections and FFNs but not its attention, which is most of a block's FLOPs at long sequences (at 32k video
    tokens, about 70%). Costs one [B, heads, N, head_dim] output (+ softmax statistics) per attention per block.
    Use as `model.enable_gradient_checkpointing(keep_attention_checkpointing)`."""
    return checkpoint(function, *args, use_reentrant=False,
                      context_fn=lambda: create_selective_checkpoint_contexts(_keep_attention_policy), **kwargs)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The block
# ----------------------------------------------------------------------------------------------------


class UniViGUBlock(nn.Module):
    """One Wan block shared by both streams, plus the text expert `ffn_t`."""

    def __init__(self, dim: int, ffn_dim: int, heads: int, cross_attn_norm: bool, eps: float,
                 text_expert: bool = True):  # fmt: skip
        super().__init__()
        # Norms computed in float32 whatever the input dtype, returned in the input dtype (as Wan does).
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = Attention(dim, heads, eps)
        self.attn2 = Attention(dim, heads, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        # Linear -> GELU(tanh) -> Linear, built as Wan builds it (keys `net.0.proj`, `net.2`; net.1 is Dropout(0))
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        # text expert, initialised as a copy of `ffn`; None: text goes through `ffn` (the no-MoE ablation)
        self.ffn_t = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate") if text_expert else None
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    @property
    def text_ffn(self) -> nn.Module:
        """The FFN text tokens go through: the expert, or the video FFN when there is none."""
        return self.ffn if self.ffn_t is None else self.ffn_t

    def _modulation(self, mod: Tensor) -> tuple[Tensor, ...]:
        """One table, a stream's timestep: shift/scale/gate [B, 1, D] for attention (msa) and FFN (c_)."""
        return (self.scale_shift_table + mod.float()).chunk(6, 1)

    def _pre_attention(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return _modulate(self.norm1(x.float()), shift, scale).type_as(x)

    def _cross_attention(self, x: Tensor, context: Tensor, cross_mask: Tensor | None,
                         cross_keep: Tensor | None) -> Tensor:  # fmt: skip
        """Ungated residual cross-attention to the prompt; per query, so one call serves both streams."""
        a = self.attn2(self.norm2(x.float()).type_as(x), context, mask=cross_mask)
        if cross_keep is not None:
            a = a * cross_keep  # a sample without any prompt token gets no cross-attention at all
        return x + a

    def _feed_forward(self, ffn: nn.Module, x: Tensor, shift: Tensor, scale: Tensor, gate: Tensor) -> Tensor:
        h = _modulate(self.norm3(x.float()), shift, scale).type_as(x)
        return (x.float() + ffn(h).float() * gate).type_as(x)

    def forward(
        self,
        x_v: Tensor,
        x_t: Tensor,
        context: Tensor,
        mod_v: Tensor,
        mod_t: Tensor,
        rope: RoPE,
        self_mask: Tensor | None,
        cross_mask: Tensor | None,
        cross_keep: Tensor | None,
        video_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """x_v [B, N, D], x_t [B, L, D], context [B, S, D], mod_* [B, 6, D] projected timesteps,
        rope cos/sin [N+L, head_dim/2], self_mask [B, 1, 1, N+L], cross_mask [B, 1, 1, S], cross_keep [B, 1, 1],
        video_mask [B, 1, 1, N+L]: the keys video queries see, when they differ from self_mask (video_prefix)."""
        n_v, n_t = x_v.shape[1], x_t.shape[1]
        shift_v, scale_v, gate_v, c_shift_v, c_scale_v, c_gate_v = self._modulation(mod_v)
        shift_t, scale_t, gate_t, c_shift_t, c_scale_t, c_gate_t = self._modulation(mod_t)

        # 1. Joint self-attention over video and text tokens, gated per modality.
        h = torch.cat([self._pre_attention(x_v, shift_v, scale_v), self._pre_attention(x_t, shift_t, scale_t)], dim=1)
        if video_mask is None:
            a = self.attn1(h, mask=self_mask, rope=rope)
        else:  # video and text queries see different keys: one SDPA each
            q, k, v = self.attn1.qkv(h, rope=rope)
            a = torch.cat([self.attn1.attend(q[:, :, :n_v], k, v, video_mask),
                           self.attn1.attend(q[:, :, n_v:], k, v, self_mask)], dim=1)  # fmt: skip
        a_v, a_t = a.split([n_v, n_t], dim=1)
        x_v = (x_v.float() + a_v * gate_v).type_as(x_v)
        x_t = (x_t.float() + a_t * gate_t).type_as(x_t)

        # 2. Cross-attention to the prompt.
        x_v, x_t = self._cross_attention(torch.cat([x_v, x_t], dim=1), context, cross_mask, cross_keep).split(
            [n_v, n_t], dim=1
        )

        # 3. Each modality through its own FFN, with its own modulation.
        x_v = self._feed_forward(self.ffn, x_v, c_shift_v, c_scale_v, c_gate_v)
        x_t = self._feed_forward(self.text_ffn, x_t, c_shift_t, c_scale_t, c_gate_t)
        return x_v, x_t

    def encode_video(
        self,
        x_v: Tensor,
        context: Tensor,
        mod_v: Tensor,
        rope: RoPE,
        cross_mask: Tensor | None,
        cross_keep: Tensor | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The video stream alone (video_prefix: clean video queries see video keys only).
        x_v [B, N, D] -> (x_v [B, N, D], its self-attention keys and values [B, heads, N, head_dim])."""
        shift, scale, gate, c_shift, c_scale, c_gate = self._modulation(mod_v)
        q, k, v = self.attn1.qkv(self._pre_attention(x_v, shift, scale), rope=rope)
        x_v = (x_v.float() + self.attn1.attend(q, k, v) * gate).type_as(x_v)
        x_v = self._cross_attention(x_v, context, cross_mask, cross_keep)
        return self._feed_forward(self.ffn, x_v, c_shift, c_scale, c_gate), (k, v)

    def step_text(
        self,
        x_t: Tensor,
        video_kv: tuple[Tensor, Tensor],
        context: Tensor,
        mod_t: Tensor,
        rope: RoPE,
        self_mask: Tensor | None,
        cross_mask: Tensor | None,
        cross_keep: Tensor | None,
    ) -> Tensor:
        """The text stream alone, attending to the cached keys/values of the clean video and to itself.
        x_t [B, L, D], video_kv: buffers [B, heads, N + L, head_dim] holding the video's (`VideoCache`), whose last
        L slots this step overwrites; rope cos/sin [L, head_dim/2], self_mask [B, 1, 1, N+L]."""
        shift, scale, gate, c_shift, c_scale, c_gate = self._modulation(mod_t)
        q, k, v = self.attn1.qkv(self._pre_attention(x_t, shift, scale), rope=rope)
        keys, values = video_kv
        n_v = keys.shape[2] - k.shape[2]
        keys[:, :, n_v:], values[:, :, n_v:] = k, v  # the text's slots after the cached video
        x_t = (x_t.float() + self.attn1.attend(q, keys, values, self_mask) * gate).type_as(x_t)
        x_t = self._cross_attention(x_t, context, cross_mask, cross_keep)
        return self._feed_forward(self.text_ffn, x_t, c_shift, c_scale, c_gate)


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


class VideoCache(NamedTuple):
    """What the text steps of V2T need from a clean video and its prompt condition (`encode_video`)."""

    # Per block: self-attention keys, values [B, heads, N + L, head_dim]: the clean video's N first, then room for
    # the L text keys that `forward_text` writes in place at every step (no copy of the video's per step).
    kv: list[tuple[Tensor, Tensor]]
    context: Tensor  # [B, S, D] projected prompt states
    cross_mask: Tensor | None  # [B, 1, 1, S]
    cross_keep: Tensor | None  # [B, 1, 1]
    num_video: int  # N

    def make_room(self, text_length: int) -> None:
        """Size every block's key/value buffers for `text_length` text tokens (a copy only when it changes)."""
        if self.kv[0][0].shape[2] == self.num_video + text_length:
            return
        n_v = self.num_video
        for i, (k, v) in enumerate(self.kv):
            room = (*k.shape[:2], n_v + text_length, k.shape[3])
            k_new, v_new = k.new_empty(room), v.new_empty(room)
            k_new[:, :, :n_v], v_new[:, :, :n_v] = k[:, :, :n_v], v[:, :, :n_v]
            self.kv[i] = (k_new, v_new)


class UniViGUOutput(NamedTuple):
    """Unpacks as `velocity, logits = model(...)`."""

    velocity: Tensor  # [B, C, T, H, W]
    logits: Tensor  # [B, L, V'], V' = text_vocab_size (+1 with text_mask_row)


# Which part of the model each top-level parameter name belongs to; "text: ..." parts are text-only.
_PARTS = {
    "patch_embedding": "base: patch embedding",
    "condition_embedder": "base: timestep + prompt embedders",
    "blocks": "base: blocks (attention, FFN, adaLN)",
    "scale_shift_table": "base: video head",
    "proj_out": "base: video head",
    "text_embedding": "text: token embedding",
    "time_embedder_t": "text: timestep embedder",
    "time_proj_t": "text: timestep embedder",
    "scale_shift_table_t": "text: head",
    "text_proj_out": "text: head",
    "text_norm": "text: head",
}


def _part_of(name: str) -> str:
    return "text: ffn_t (in blocks)" if ".ffn_t." in name else _PARTS[name.split(".")[0]]


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameter count per part (`base: ...` shared with Wan, `text: ...` added), plus `base`, `text`, `total`.

    Works on a model built on the meta device (counts shapes, allocates nothing).
    """
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts[_part_of(name)] = parts.get(_part_of(name), 0) + p.numel()
    base = sum(n for k, n in parts.items() if k.startswith("base"))
    text = sum(n for k, n in parts.items() if k.startswith("text"))
    return {**dict(sorted(parts.items())), "base": base, "text": text, "total": base + text}


class UniViGUTransformer(StrictLoading, ModelMixin, ConfigMixin):
    """Wan2.1 DiT + text stream (modality-driven MoE). Defaults are Wan2.1-T2V-1.3B with the umT5 vocabulary.

    Args (shared, Wan's config names): patch_size, num_attention_heads, attention_head_dim, in_channels,
        out_channels (default 16, Wan's, whatever in_channels is; None: in_channels), text_dim (prompt-encoder
        width), freq_dim, ffn_dim, num_layers, cross_attn_norm, qk_norm (only "rms_norm_across_heads", the Wan2.1
        one), eps, rope_max_seq_len (kept for Wan config compatibility only: RoPE is computed for the actual grid,
        no table is stored), rope_theta (the video RoPE base, Wan's 1e4; the toy world's 8-patch axes use a small
        one, see `rope_theta_of`).
    Args (text): text_vocab_size V; text_mask_row adds one row (id V) used as the mask/source token for
        tokenizers that have none, so V' = V + 1; text_rope_theta for the 1D text RoPE; text_ffn "expert"
        (the MoE: a text FFN per block) or "shared" (text tokens through the video FFN; an ablation).
        text_rope_halves and text_norm_weight (a learned weight on the text head's LayerNorm, eps 1e-5): the
        released Uni-ViGU code's text RoPE layout and text head, which its checkpoints need (`convert-official`
        sets both); off, the text stream mirrors Wan's video conventions.
    Args (attention): attention_layout "full" (Wan's, the default) or "video_prefix" (see ATTENTION_LAYOUTS;
        the same weights, a different model: train with the layout you sample with).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["UniViGUBlock"]
    _repeated_blocks = ["UniViGUBlock"]  # diffusers' compile_repeated_blocks() compiles these (regional compilation)
    # As Wan (plus the text copies): kept in float32 when loaded in half precision. Matched per name component.
    _keep_in_fp32_modules = [
        "time_embedder", "time_embedder_t", "scale_shift_table", "scale_shift_table_t", "norm1", "norm2", "norm3",
        "text_norm",
    ]  # fmt: skip

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        num_attention_heads: int = 12,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int | None = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 8960,
        num_layers: int = 30,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        rope_max_seq_len: int = 1024,
        rope_theta: float = WAN_ROPE_THETA,
        text_vocab_size: int = 256384,
        text_mask_row: bool = False,
        text_rope_theta: float = 10000.0,
        text_ffn: str = "expert",
        attention_layout: str = "full",
        text_rope_halves: bool = False,
        text_norm_weight: bool = False,
    ):
        super().__init__()
        if attention_layout not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention_layout must be one of {ATTENTION_LAYOUTS}, got {attention_layout!r}")
        if qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm={qk_norm!r} is not supported; Wan2.1 uses 'rms_norm_across_heads'")
        if attention_head_dim % 2 or attention_head_dim < 6:
            raise ValueError(f"attention_head_dim must be even and >= 6 for 3D RoPE, got {attention_head_dim}")
        if text_ffn not in ("expert", "shared"):
            raise ValueError(f"text_ffn must be 'expert' or 'shared', got {text_ffn!r}")
        dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels

        # Shared with Wan (same names and shapes as diffusers' WanTransformer3DModel).
        self.patch_embedding = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.condition_embedder = ConditionEmbedder(dim, freq_dim, text_dim)
        self.blocks = nn.ModuleList(
            [UniViGUBlock(dim, ffn_dim, num_attention_heads, cross_attn_norm, eps, text_ffn == "expert")
             for _ in range(num_layers)]  # fmt: skip
        )
        self.norm_out = FP32LayerNorm(dim, eps, elementwise_affine=False)  # no parameters: serves both heads
        self.proj_out = nn.Linear(dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

        # Text-only parts (values set by `init_text_parts`).
        self.text_embedding = nn.Embedding(self.text_vocab_out, dim)
        self.time_embedder_t = TimestepEmbedding(in_channels=freq_dim, time_embed_dim=dim)
        self.time_proj_t = nn.Linear(dim, 6 * dim)
        self.scale_shift_table_t = nn.Parameter(torch.empty(1, 2, dim))
        self.text_proj_out = nn.Linear(dim, self.text_vocab_out)
        # The released code's text head norm: LayerNorm (torch's default eps) times a learned weight, no bias.
        self.text_norm = FP32LayerNorm(dim, 1e-5, bias=False) if text_norm_weight else None

        self.gradient_checkpointing = False
        self.init_text_parts()

    @property
    def text_vocab_out(self) -> int:
        """V': rows of the token embedding and width of the logits."""
        return self.config.text_vocab_size + int(self.config.text_mask_row)

    @property
    def mask_token_id(self) -> int | None:
        """The id of the extra mask row (= text_vocab_size), or None without `text_mask_row`."""
        return self.config.text_vocab_size if self.config.text_mask_row else None

    @property
    def caches_clean_video(self) -> bool:
        """True when V2T can run the clean video once and then only the text (attention_layout video_prefix)."""
        return self.config.attention_layout == "video_prefix"

    # ---- attention kernels --------------------------------------------------------------------------

    def set_attention_backend(self, backend: str) -> None:
        """Run every attention through one of torch's SDPA kernels (diffusers' method and names; see
        ATTENTION_BACKENDS). "native" lets torch choose again. Not saved with the model."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {sorted(ATTENTION_BACKENDS)}, got {backend!r}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.sdpa_backend = ATTENTION_BACKENDS[backend]

    def reset_attention_backend(self) -> None:
        """Let torch choose the SDPA kernel again."""
        self.set_attention_backend("native")

    # ---- initialisation and loading ------------------------------------------------------------------

    @torch.no_grad()
    def init_text_parts(self, embedding_std: float = 1.0, generator: torch.Generator | None = None) -> None:
        """(Re-)initialise the text parts as METHOD.md section 3 says: ffn_t, the text timestep embedder and the
        text output table become copies of their video counterparts; the token embedding is drawn fresh
        (N(0, embedding_std^2), from `generator` or else torch's global generator; every block LayerNorms it
        anyway); the logit head is zero, so the first logits are exactly uniform; a text-head norm weight
        (`text_norm_weight`) is ones.

        Parameters are replaced (not written in place), so this also works on a meta-device model whose
        shared part was just loaded; build optimizers after calling it.
        """

        def copy_into(dst: nn.Module, src: nn.Module) -> None:
            dst.load_state_dict({k: v.detach().clone() for k, v in src.state_dict().items()}, assign=True)

        for block in self.blocks:
            if block.ffn_t is not None:
                copy_into(block.ffn_t, block.ffn)
        copy_into(self.time_embedder_t, self.condition_embedder.time_embedder)
        copy_into(self.time_proj_t, self.condition_embedder.time_proj)
        self.scale_shift_table_t = nn.Parameter(self.scale_shift_table.detach().clone())
        like = self.proj_out.weight  # device/dtype of the ordinary (not fp32-kept) weights
        v, d = self.text_vocab_out, like.shape[1]
        draw_on = generator.device if generator is not None else like.device
        self.text_embedding.weight = nn.Parameter(
            torch.randn(v, d, generator=generator, device=draw_on, dtype=like.dtype).to(like.device) * embedding_std
        )
        self.text_proj_out.weight = nn.Parameter(torch.zeros(v, d, device=like.device, dtype=like.dtype))
        self.text_proj_out.bias = nn.Parameter(torch.zeros(v, device=like.device, dtype=like.dtype))
        if self.text_norm is not None:
            self.text_norm.weight = nn.Parameter(torch.ones(d, device=like.device, dtype=torch.float32))

    @classmethod
    def from_wan(cls, wan: nn.Module | str | os.PathLike, generator: torch.Generator | None = None,
                 **text_config) -> "UniViGUTransformer":  # fmt: skip
        """Build the unified model from a diffusers `WanTransformer3DModel` (in memory, or a local folder loaded
        with diffusers' `from_pretrained`, no network). All Wan weights are copied (dtypes kept); the text
        parts are initialised from them (`init_text_parts`; its token embedding is drawn from `generator`).
        `text_config`: text_vocab_size, text_mask_row, text_rope_theta, text_ffn, attention_layout,
        text_rope_halves, text_norm_weight.
        """
        if isinstance(wan, (str, os.PathLike)):
            from univigu.models.wan import load_wan_transformer

            wan = load_wan_transformer(wan)
        unsupported = {k: wan.config.get(k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")}
        if any(v is not None for v in unsupported.values()):
            raise ValueError(f"only text-to-video Wan models are supported, this one has {unsupported}")
        bad = set(text_config) - {"text_vocab_size", "text_mask_row", "text_rope_theta", "text_ffn",
                                "attention_layout", "text_rope_halves", "text_norm_weight"}
        if bad:
            raise TypeError(f"from_wan() got unexpected text config keys {sorted(bad)}")

        # Build on the meta device (no allocation, no random init of billions of weights), then take
        # cloned Wan tensors as the parameters and derive the text parts from them.
        with torch.device("meta"):
            model = cls(**{k: wan.config[k] for k in WAN_CONFIG_KEYS}, rope_theta=rope_theta_of(wan), **text_config)
        state = {k: v.detach().clone() for k, v in wan.state_dict().items()}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        not_text = [k for k in missing if not model.is_text_parameter(k)]
        if not_text or unexpected:
            raise ValueError(f"Wan state dict does not match: missing {not_text}, unexpected {unexpected}")
        model.init_text_parts(generator=generator)
        return model

    # ---- which parameters train --------------------------------------------------------------------

    @staticmethod
    def is_text_parameter(name: str) -> bool:
        """True for parameters that only the text stream has (see the module docstring)."""
        return _part_of(name).startswith("text")

    def text_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters only the text stream has (`is_text_parameter`)."""
        return (p for n, p in self.named_parameters() if self.is_text_parameter(n))

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters Wan has: shared by both streams."""
        return (p for n, p in self.named_parameters() if not self.is_text_parameter(n))

    def set_trainable(self, which: Literal["text", "all"]) -> None:
        """"text": only text-specific parameters require grad (shared Wan weights frozen); "all": everything."""
        if which not in ("text", "all"):
            raise ValueError(f"which must be 'text' or 'all', got {which!r}")
        for name, p in self.named_parameters():
            p.requires_grad_(which == "all" or self.is_text_parameter(name))

    # ---- forward -------------------------------------------------------------------------------------

    def _embed_timestep(self, t: Tensor, embedder: TimestepEmbedding, proj: nn.Linear, dtype: torch.dtype):
        """t [B] on the [0, 1000] scale -> temb [B, D] (heads) and modulation [B, 6, D] (blocks)."""
        # Wan's Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0): float32 features, cos half first
        freqs = get_timestep_embedding(t, self.config.freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        freqs = freqs.to(embedder.linear_1.weight.dtype)
        temb = embedder(freqs).to(dtype)
        return temb, proj(F.silu(temb)).unflatten(1, (6, -1))

    def forward(
        self,
        video: Tensor,
        text_tokens: Tensor | None,
        t_video: Tensor,
        t_text: Tensor | None,
        prompt_states: Tensor,
        text_mask: Tensor | None = None,
        prompt_mask: Tensor | None = None,
    ) -> UniViGUOutput:
        """One pass over both modalities.

        video [B, C, T, H, W] (T, H, W divisible by the patch), text_tokens [B, L] int ids (L may be 0, or
        None: the plain Wan forward), t_video / t_text [B] (or scalars) on the network scale [0, 1000],
        prompt_states [B, S, text_dim], text_mask [B, L] bool (True = real token; padded tokens are not
        attended to), prompt_mask [B, S] bool (True = real prompt token; None = attend to all, as Wan does;
        a row without any real token skips cross-attention).
        Returns (velocity [B, C_out, T, H, W], logits [B, L, V']).
        """
        b = video.shape[0]
        x_v, grid = self._embed_video(video)
        if text_tokens is None:
            text_tokens = torch.zeros(b, 0, dtype=torch.long, device=video.device)
        if text_tokens.ndim != 2 or text_tokens.shape[0] != b:
            raise ValueError(f"text_tokens must be [B, L] ids with the video's batch B={b}, got "
                             f"{list(text_tokens.shape)}")  # fmt: skip
        n_v, n_t = math.prod(grid), text_tokens.shape[1]
        head_dim = self.config.attention_head_dim
        x_t = self.text_embedding(text_tokens).to(x_v.dtype)  # [B, L, D]

        t_video = torch.as_tensor(t_video, device=video.device).expand(b)
        temb_v, mod_v = self._embed_timestep(
            t_video, self.condition_embedder.time_embedder, self.condition_embedder.time_proj, prompt_states.dtype
        )
        if n_t:
            t_text = torch.as_tensor(t_text, device=video.device).expand(b)
            temb_t, mod_t = self._embed_timestep(t_text, self.time_embedder_t, self.time_proj_t, prompt_states.dtype)
        else:
            temb_t, mod_t = temb_v, mod_v  # unused by an empty stream
        context, cross_mask, cross_keep = self._prompt_condition(prompt_states, prompt_mask, x_v.dtype)

        cos_v, sin_v = video_rope(grid, head_dim, video.device, self.config.rope_theta)
        cos_t, sin_t = text_rope(n_t, head_dim, self.config.text_rope_theta, video.device)
        rope = (torch.cat([cos_v, cos_t]), torch.cat([sin_v, sin_t]), n_v if self.config.text_rope_halves else None)

        self_mask = _key_mask(text_mask, b, n_v, n_t, video.device)
        video_mask = None
        clean = (t_video == 0)[:, None, None, None] if self.caches_clean_video and n_t else None
        if clean is not None and clean.any():  # else every row attends fully: one SDPA, as with "full"
            # Clean-video rows: their video queries do not see the text keys.
            is_text = torch.arange(n_v + n_t, device=video.device) >= n_v
            keys = self_mask if self_mask is not None else torch.ones(b, 1, 1, n_v + n_t, dtype=torch.bool,
                                                                      device=video.device)  # fmt: skip
            video_mask = keys & ~(clean & is_text)

        args = (context, mod_v, mod_t, rope, self_mask, cross_mask, cross_keep, video_mask)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x_v, x_t = self._gradient_checkpointing_func(block, x_v, x_t, *args)
            else:
                x_v, x_t = block(x_v, x_t, *args)

        # Video head: LayerNorm, adaLN from Wan's (1, 2, D) table and the video timestep, Linear, unpatchify.
        shift, scale = (self.scale_shift_table + temb_v[:, None]).chunk(2, dim=1)
        x_v = self.proj_out(_modulate(self.norm_out(x_v.float()), shift, scale).type_as(x_v))
        x_v = x_v.reshape(b, *grid, *self.config.patch_size, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        velocity = x_v.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # [B, C, T, H, W]

        return UniViGUOutput(velocity, self._text_head(x_t, temb_t))

    def _embed_video(self, video: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """Patchify: video [B, C, T, H, W] -> tokens [B, N, D] in (f, h, w) raster order, and the patch grid."""
        channels = self.config.in_channels
        if video.ndim != 5 or video.shape[1] != channels:
            raise ValueError(f"video must be [B, {channels}, T, H, W], got {list(video.shape)}")
        _, _, frames, height, width = video.shape
        patch = tuple(self.config.patch_size)
        uneven = [f"{name} = {size}" for name, size, p in zip("THW", video.shape[2:], patch) if size % p]
        if uneven:  # the patch convolution would drop the remainder silently
            raise ValueError(f"video's {', '.join(uneven)} not divisible by the patch size {patch} (T, H, W)")
        grid = (frames // patch[0], height // patch[1], width // patch[2])
        return self.patch_embedding(video).flatten(2).transpose(1, 2).contiguous(), grid

    def _prompt_condition(self, prompt_states: Tensor, prompt_mask: Tensor | None, dtype: torch.dtype):
        """context [B, S, D], cross_mask [B, 1, 1, S] and cross_keep [B, 1, 1] (None without prompt_mask)."""
        if prompt_states.ndim != 3 or prompt_states.shape[-1] != self.config.text_dim:
            raise ValueError(f"prompt_states must be [B, S, text_dim={self.config.text_dim}], got "
                             f"{list(prompt_states.shape)}")  # fmt: skip
        context = self.condition_embedder.text_embedder(prompt_states)
        if prompt_mask is None:
            return context, None, None
        prompt_mask = prompt_mask.bool()
        has_prompt = prompt_mask.any(dim=1)
        # Unmask the rows of prompt-less samples (an all-masked softmax is NaN); their output is zeroed.
        cross_mask = (prompt_mask | ~has_prompt[:, None])[:, None, None, :]
        return context, cross_mask, has_prompt[:, None, None].to(dtype)

    def _text_head(self, x_t: Tensor, temb_t: Tensor) -> Tensor:
        """LayerNorm, adaLN from the text table and timestep, Linear: x_t [B, L, D] -> logits [B, L, V']."""
        shift, scale = (self.scale_shift_table_t + temb_t[:, None]).chunk(2, dim=1)
        norm = self.norm_out if self.text_norm is None else self.text_norm
        return self.text_proj_out(_modulate(norm(x_t.float()), shift, scale).type_as(x_t))

    # ---- V2T with a cached clean video (attention_layout "video_prefix") ----------------------------

    def encode_video(self, video: Tensor, prompt_states: Tensor, prompt_mask: Tensor | None = None) -> VideoCache:
        """Run a clean video (t_video = 0) and its prompt condition through every block once, keeping each
        block's self-attention keys and values. video [B, C, T, H, W], prompt_states [B, S, text_dim],
        prompt_mask [B, S] bool. Then `forward_text` gives, per text step, exactly the logits of `forward`."""
        if not self.caches_clean_video:
            raise ValueError("encode_video needs attention_layout='video_prefix'; with 'full' the video attends to "
                             "the text, so its states change at every text step")  # fmt: skip
        x_v, grid = self._embed_video(video)
        zeros = torch.zeros(video.shape[0], device=video.device)
        _, mod_v = self._embed_timestep(
            zeros, self.condition_embedder.time_embedder, self.condition_embedder.time_proj, prompt_states.dtype
        )
        context, cross_mask, cross_keep = self._prompt_condition(prompt_states, prompt_mask, x_v.dtype)
        rope = video_rope(grid, self.config.attention_head_dim, video.device, self.config.rope_theta)
        kv = []
        for block in self.blocks:
            x_v, block_kv = block.encode_video(x_v, context, mod_v, rope, cross_mask, cross_keep)
            kv.append(block_kv)
        return VideoCache(kv, context, cross_mask, cross_keep, x_v.shape[1])

    def forward_text(
        self, text_tokens: Tensor, t_text: Tensor, cache: VideoCache, text_mask: Tensor | None = None
    ) -> Tensor:
        """One V2T step on the text tokens only: text_tokens [B, L] ids, t_text [B] (or a scalar) on [0, 1000],
        cache from `encode_video`, text_mask [B, L] bool (True = real token). Returns logits [B, L, V']."""
        b, n_t = text_tokens.shape
        n_v = cache.num_video
        cache.make_room(n_t)
        x_t = self.text_embedding(text_tokens).to(cache.context.dtype)
        t_text = torch.as_tensor(t_text, device=text_tokens.device).expand(b)
        temb_t, mod_t = self._embed_timestep(t_text, self.time_embedder_t, self.time_proj_t, cache.context.dtype)
        rope = (*text_rope(n_t, self.config.attention_head_dim, self.config.text_rope_theta, text_tokens.device),
                0 if self.config.text_rope_halves else None)  # fmt: skip
        self_mask = _key_mask(text_mask, b, n_v, n_t, text_tokens.device)
        for block, kv in zip(self.blocks, cache.kv):
            x_t = block.step_text(x_t, kv, cache.context, mod_t, rope, self_mask, cache.cross_mask, cache.cross_keep)
        return self._text_head(x_t, temb_t)


def _key_mask(text_mask: Tensor | None, b: int, n_v: int, n_t: int, device: torch.device) -> Tensor | None:
    """The keys every query may see, [B, 1, 1, N+L] bool (video always, text where text_mask), or None."""
    if text_mask is None or not n_t:
        return None
    keep = torch.cat([torch.ones(b, n_v, dtype=torch.bool, device=device), text_mask.bool()], dim=1)
    return keep[:, None, None, :]  # broadcast over heads and queries
