"""A small prompt encoder: the toy world's stand-in for umT5.

It maps prompt token ids to the states the transformer cross-attends to, with padded
positions zeroed as diffusers' WanPipeline zeroes umT5's. Trained jointly with the base
generator (no pretrained text encoder exists for the toy world), then frozen, as umT5 is.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from univigu.models.loading import StrictLoading


class PromptEncoder(StrictLoading, ModelMixin, ConfigMixin):
    """Token embedding + learned positions + a pre-norm transformer encoder. `from_pretrained` is strict (a config
    that does not match the weights is an error naming the keys), as the transformer's.

    forward(ids [B, S], mask [B, S] bool) -> states [B, S, dim], zero where mask is False.
    """

    @register_to_config
    def __init__(self, vocab_size: int, dim: int = 128, num_layers: int = 2, num_heads: int = 4,
                 max_length: int = 32) -> None:  # fmt: skip
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.randn(1, max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        if ids.shape[1] > self.config.max_length:
            raise ValueError(f"prompt has {ids.shape[1]} tokens, the encoder takes at most {self.config.max_length}")
        x = self.token_embedding(ids) + self.position_embedding[:, : ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=~mask.bool())
        return self.norm(x) * mask[..., None].to(x.dtype)
