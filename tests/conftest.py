import pytest
import torch


@pytest.fixture(scope="session")
def tiny_parts():
    """A tiny random Wan generator, unified model, prompt encoder and world tokenizer."""
    from diffusers import WanTransformer3DModel

    from univigu import PromptEncoder, UniViGUTransformer
    from univigu.data.tokenizer import build_world_tokenizer

    torch.manual_seed(0)
    tokenizer = build_world_tokenizer()
    wan = WanTransformer3DModel(
        patch_size=(4, 4, 4), num_attention_heads=2, attention_head_dim=24, in_channels=3, out_channels=3,
        text_dim=32, freq_dim=64, ffn_dim=96, num_layers=2, rope_max_seq_len=64,
    )  # fmt: skip
    prompt_encoder = PromptEncoder(vocab_size=len(tokenizer), dim=32, num_layers=1, num_heads=2, max_length=16)
    unified = UniViGUTransformer.from_wan(wan, text_vocab_size=len(tokenizer))
    return {"wan": wan, "unified": unified, "prompt_encoder": prompt_encoder, "tokenizer": tokenizer}
