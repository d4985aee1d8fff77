"""A tiny random Wan2.1-T2V-Diffusers-like folder, built offline (no downloads) for the Wan-scale tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = "a the red blue green circle square moves left right up down cat dog runs jumps slowly . ,".split()
# frames, height, width the tiny VAE (x4 in time and space) and the patch (1, 2, 2) accept
FRAMES, HEIGHT, WIDTH = 5, 16, 16


def build_wan_folder(path: str | Path) -> Path:
    """transformer/ (WanTransformer3DModel), vae/ (AutoencoderKLWan), text_encoder/ (UMT5EncoderModel),
    tokenizer/ (a T5-style unigram tokenizer made with `tokenizers`), scheduler/, model_index.json."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    path = Path(path)
    torch.manual_seed(0)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0 - i / 100) for i, w in enumerate(WORDS)]
    core = Tokenizer(models.Unigram(vocab, unk_id=2))
    core.pre_tokenizer, core.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(path / "tokenizer")
    UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                relative_attention_num_buckets=8)).save_pretrained(path / "text_encoder")  # fmt: skip
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
                     latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0], scale_factor_temporal=4,
                     scale_factor_spatial=4).save_pretrained(path / "vae")  # fmt: skip
    WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                          out_channels=4, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2,
                          rope_max_seq_len=64).save_pretrained(path / "transformer")  # fmt: skip
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"flow_shift": 3.0}))
    (path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return path
