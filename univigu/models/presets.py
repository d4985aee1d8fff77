"""Named model sizes: the CPU-sized toy model and the released Wan2.1-T2V-1.3B shape."""

from __future__ import annotations

from typing import Any

from univigu.models.transformer import UniViGUTransformer

PRESETS: dict[str, dict[str, Any]] = {
    # A CPU-sized model at the toy world's 32x32x16 RGB size, for `univigu model params / bench`: (1, 4, 4)
    # patches give 16*8*8 = 1024 video tokens; about 4.3M parameters (2.8M shared, 1.5M text). The shipped toy
    # model is built from univigu/configs/toy/base.yaml instead. The text vocabulary is a placeholder: override
    # it with the tokenizer's size.
    "tiny": dict(
        patch_size=(1, 4, 4),
        num_attention_heads=4,
        attention_head_dim=48,
        in_channels=3,
        out_channels=3,
        text_dim=128,
        freq_dim=256,
        ffn_dim=768,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
        text_vocab_size=128,
        text_mask_row=False,
    ),
    # Wan2.1-T2V-1.3B (diffusers config) with the umT5 vocabulary, as in the released Uni-ViGU model.
    "wan2.1-t2v-1.3b": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=30,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
        text_vocab_size=256384,
        text_mask_row=False,
    ),
}


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The config dict of a preset, with overrides applied (unknown keys are an error)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    unknown = set(overrides) - set(PRESETS[name]) - {"text_rope_theta"}
    if unknown:
        raise KeyError(f"unknown config keys {sorted(unknown)}")
    return {**PRESETS[name], **overrides}


def build_model(name: str, **overrides: Any) -> UniViGUTransformer:
    """A freshly initialised model of a preset. Wrap in `with torch.device("meta"):` to count without allocating."""
    return UniViGUTransformer(**preset_config(name, **overrides))
