import json

import pytest
import torch

from univigu import PromptEncoder
from univigu.data.tokenizer import TextCanvas, build_world_tokenizer


def test_states_zero_at_padding_and_independent_of_it(tmp_path):
    canvas = TextCanvas(build_world_tokenizer(), length=12)
    enc = PromptEncoder(vocab_size=canvas.vocab_size, dim=32, num_layers=1, num_heads=2, max_length=12).eval()
    ids, mask = canvas.encode(["a red circle moves right", "a blue square grows"])
    states = enc(ids, mask)
    assert states.shape == (2, 12, 32)
    assert (states[~mask] == 0).all() and (states[mask].abs().sum(-1) > 0).all()
    alone = enc(ids[1:], mask[1:])
    assert torch.allclose(alone, states[1:], atol=1e-5)
    other_pad = ids.clone()
    other_pad[~mask] = canvas.mask_id  # what sits at padded positions must not matter
    assert torch.allclose(enc(other_pad, mask), states, atol=1e-5)
    enc.save_pretrained(tmp_path)
    assert torch.allclose(PromptEncoder.from_pretrained(tmp_path)(ids, mask), states, atol=1e-6)


def test_over_long_prompt_is_a_clear_error():
    enc = PromptEncoder(vocab_size=10, dim=16, num_layers=1, num_heads=2, max_length=4)
    with pytest.raises(ValueError, match="at most 4"):
        enc(torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.bool))


def test_config_that_does_not_match_the_weights_names_the_keys(tmp_path):
    PromptEncoder(vocab_size=10, dim=16, num_layers=1, num_heads=2, max_length=4).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "dim": 8}))
    with pytest.raises(ValueError, match=r"PromptEncoder its config describes:\n  mismatched shapes .*\n    "
                                         r"encoder\.layers\.0\.linear1\.bias: checkpoint \(64,\) vs model \(32,\)"):
        PromptEncoder.from_pretrained(tmp_path)  # was diffusers' advice to pass ignore_mismatched_sizes=True


def test_a_missing_folder_is_a_file_not_found_error_without_the_network(tmp_path, monkeypatch):
    """Was a hub lookup of the path (huggingface.co), then diffusers' OSError."""
    import socket

    attempts = []
    monkeypatch.setattr(socket.socket, "connect", lambda *args: attempts.append(args) or 1 / 0)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: attempts.append(args) or 1 / 0)
    with pytest.raises(FileNotFoundError, match="prompt_encoder does not exist"):
        PromptEncoder.from_pretrained(tmp_path / "prompt_encoder")
    assert attempts == []
