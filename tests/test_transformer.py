"""UniViGUTransformer: parity with diffusers' Wan, the text stream, masks, gradients, loading."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from univigu.models import UniViGUTransformer, build_model
from univigu.models.transformer import keep_attention_checkpointing

WAN_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=64,
)  # fmt: skip
VOCAB = 50


@pytest.fixture(scope="module")
def wan() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**WAN_CONFIG).eval()


@pytest.fixture()
def model(wan) -> UniViGUTransformer:
    torch.manual_seed(1)
    return UniViGUTransformer.from_wan(wan, text_vocab_size=VOCAB).eval()


def _inputs(b: int, seed: int = 0, prompt_len: int = 7):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(b, 4, 2, 8, 8, generator=g)
    t = torch.rand(b, generator=g) * 1000
    prompt = torch.randn(b, prompt_len, WAN_CONFIG["text_dim"], generator=g)
    return video, t, prompt


def _randomise_text_head(model: UniViGUTransformer) -> None:
    with torch.no_grad():
        model.text_proj_out.weight.normal_(std=0.1)
        model.text_proj_out.bias.normal_(std=0.1)


@pytest.mark.parametrize("batch", [1, 3])
def test_parity_with_diffusers_wan(wan, model, batch):
    video, t, prompt = _inputs(batch)
    with torch.no_grad():
        ref = wan(video, t, prompt, return_dict=False)[0]
        velocity, logits = model(video, None, t, None, prompt)
        velocity0, logits0 = model(video, torch.zeros(batch, 0, dtype=torch.long), t, t, prompt)
    assert velocity.shape == ref.shape == video.shape
    assert logits.shape == logits0.shape == (batch, 0, VOCAB)
    assert (velocity - ref).abs().max().item() <= 1e-5
    assert (velocity0 - ref).abs().max().item() <= 1e-5


def test_from_wan_folder_and_key_names(wan, tmp_path):
    wan.save_pretrained(tmp_path / "wan")
    model = UniViGUTransformer.from_wan(str(tmp_path / "wan"), text_vocab_size=VOCAB, text_mask_row=True).eval()
    video, t, prompt = _inputs(2)
    with torch.no_grad():
        ref = wan(video, t, prompt, return_dict=False)[0]
        velocity, logits = model(video, None, t, None, prompt)
    assert (velocity - ref).abs().max().item() <= 1e-5
    assert logits.shape[-1] == VOCAB + 1 and model.mask_token_id == VOCAB

    ours = {k: v.shape for k, v in model.state_dict().items()}
    shared = {k: s for k, s in ours.items() if not model.is_text_parameter(k)}
    assert shared == {k: v.shape for k, v in wan.state_dict().items()}
    text = set(ours) - set(shared)
    assert {k.split(".")[0] for k in text} == {
        "text_embedding", "time_embedder_t", "time_proj_t", "blocks", "scale_shift_table_t", "text_proj_out"
    }  # fmt: skip
    assert all(".ffn_t." in k for k in text if k.startswith("blocks."))


def test_rope_theta_travels_from_the_base_through_save_load_into_the_unified_model(tmp_path):
    from univigu.models.wan import load_wan_transformer, set_rope_theta

    torch.manual_seed(0)
    base = WanTransformer3DModel(**WAN_CONFIG).eval()
    video, t, prompt = _inputs(2)
    with torch.no_grad():
        wan_theta = base(video, t, prompt, return_dict=False)[0]
        set_rope_theta(base, 10.0)
        small_theta = base(video, t, prompt, return_dict=False)[0]
    assert (small_theta - wan_theta).abs().max() > 1e-3  # the base sees positions differently
    base.save_pretrained(tmp_path / "base")
    reloaded = load_wan_transformer(tmp_path / "base").eval()
    assert reloaded.config.rope_theta == 10.0
    for source in (base, reloaded, str(tmp_path / "base")):
        model = UniViGUTransformer.from_wan(source, text_vocab_size=VOCAB).eval()
        assert model.config.rope_theta == 10.0
        with torch.no_grad():
            assert (model(video, None, t, None, prompt)[0] - small_theta).abs().max() <= 1e-5
    # a real Wan config has no rope_theta: Wan's 1e4, and loading leaves the model as diffusers builds it
    wan = WanTransformer3DModel(**WAN_CONFIG)
    wan.save_pretrained(tmp_path / "wan")
    assert "rope_theta" not in load_wan_transformer(tmp_path / "wan").config
    assert UniViGUTransformer.from_wan(wan, text_vocab_size=VOCAB).config.rope_theta == 10000.0


def test_text_init_copies_wan_parts(model):
    for block in model.blocks:
        for (n, a), (_, b) in zip(block.ffn.named_parameters(), block.ffn_t.named_parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), n
    assert torch.equal(model.scale_shift_table_t, model.scale_shift_table)
    assert torch.equal(model.time_proj_t.weight, model.condition_embedder.time_proj.weight)
    assert torch.equal(model.time_embedder_t.linear_1.weight, model.condition_embedder.time_embedder.linear_1.weight)


def test_text_tokens_change_video_and_logits_start_uniform(model):
    video, t, prompt = _inputs(2)
    tokens = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        plain, _ = model(video, None, t, None, prompt)
        velocity, logits = model(video, tokens, t, torch.zeros(2), prompt)
    assert (velocity - plain).abs().max().item() > 1e-4
    assert logits.shape == (2, 6, VOCAB)
    probs = logits.softmax(-1)
    assert torch.equal(probs, torch.full_like(probs, 1.0 / VOCAB))


def test_batched_masks_equal_single_items(model):
    _randomise_text_head(model)
    text_lens, prompt_lens = [5, 2, 7], [7, 3, 5]
    video, t, prompt = _inputs(3, seed=2)
    t_text = torch.tensor([0.0, 500.0, 1000.0])
    tokens = torch.randint(0, VOCAB, (3, 7))
    text_mask = torch.arange(7)[None] < torch.tensor(text_lens)[:, None]
    prompt_mask = torch.arange(7)[None] < torch.tensor(prompt_lens)[:, None]
    with torch.no_grad():
        velocity, logits = model(video, tokens, t, t_text, prompt, text_mask, prompt_mask)
        for i, (n, s) in enumerate(zip(text_lens, prompt_lens)):
            one = slice(i, i + 1)
            v_i, l_i = model(video[one], tokens[one, :n], t[one], t_text[one], prompt[one, :s])
            assert (velocity[i] - v_i[0]).abs().max().item() <= 1e-5
            assert (logits[i, :n] - l_i[0]).abs().max().item() <= 1e-5


def test_prompt_less_sample_ignores_prompt(model):
    video, t, prompt = _inputs(2)
    tokens = torch.randint(0, VOCAB, (2, 4))
    no_prompt = torch.tensor([[True] * 7, [False] * 7])
    with torch.no_grad():
        v1, _ = model(video, tokens, t, t, prompt, None, no_prompt)
        v2, _ = model(video, tokens, t, t, prompt * 3 + 1, None, no_prompt)
    assert torch.isfinite(v1).all()
    assert (v1[1] - v2[1]).abs().max().item() == 0.0  # sample 1 does not see the prompt
    assert (v1[0] - v2[0]).abs().max().item() > 1e-4  # sample 0 does


def _loss(model, batch=2):
    video, t, prompt = _inputs(batch)
    tokens = torch.randint(0, VOCAB, (batch, 5), generator=torch.Generator().manual_seed(3))
    velocity, logits = model(video, tokens, t, torch.full((batch,), 700.0), prompt)
    return velocity.square().mean() + torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())


def test_gradients_reach_every_text_parameter(model):
    _randomise_text_head(model)  # with the zero head no gradient flows back through the logits
    model.train()
    _loss(model).backward()
    for name, p in model.named_parameters():
        if model.is_text_parameter(name):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_text_only_freeze(model):
    _randomise_text_head(model)
    model.set_trainable("text")
    _loss(model).backward()
    shared = list(model.shared_parameters())
    assert shared and all(p.grad is None for p in shared)
    both = {id(p) for p in shared} | {id(p) for p in model.text_parameters()}
    assert both == {id(p) for p in model.parameters()} and len(both) == len(shared) + len(list(model.text_parameters()))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text_parameters())
    model.set_trainable("all")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError):
        model.set_trainable("video")


class _CountAttention(TorchDispatchMode):
    """Counts the SDPA forward kernels run while active (the dispatcher sees recomputation too)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        self.calls += name.startswith("aten::_scaled_dot_product") and not name.endswith("_backward")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("keep_attention", [False, True])
def test_gradient_checkpointing_gives_same_gradients(model, keep_attention):
    _randomise_text_head(model)
    _loss(model).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.enable_gradient_checkpointing(keep_attention_checkpointing if keep_attention else None)
    assert model.gradient_checkpointing
    loss = _loss(model)
    with _CountAttention() as counter:
        loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-6), n
    # full checkpointing recomputes both attentions of both blocks; keep_attention none of them
    assert counter.calls == (0 if keep_attention else 2 * WAN_CONFIG["num_layers"])


def test_attention_backend_choice(model):
    video, t, prompt = _inputs(2)
    tokens = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        ref = model(video, tokens, t, t, prompt)
        model.set_attention_backend("_native_math")
        assert all(m.sdpa_backend is not None for m in model.modules() if hasattr(m, "sdpa_backend"))
        math = model(video, tokens, t, t, prompt)
        model.reset_attention_backend()
        assert all(m.sdpa_backend is None for m in model.modules() if hasattr(m, "sdpa_backend"))
    assert torch.allclose(math.velocity, ref.velocity, atol=1e-5)
    assert torch.allclose(math.logits, ref.logits, atol=1e-5)
    model.set_attention_backend("_native_cudnn")  # no cuDNN kernel on CPU: torch refuses, nothing silent
    with pytest.raises(RuntimeError):
        model(video, tokens, t, t, prompt)
    with pytest.raises(ValueError, match="_native_cudnn"):
        model.set_attention_backend("flash-3")


def test_bf16_autocast(model):
    _randomise_text_head(model)
    video, t, prompt = _inputs(2)
    tokens = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        ref_v, ref_l = model(video, tokens, t, t, prompt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        velocity, logits = model(video, tokens, t, t, prompt)
    assert velocity.dtype == torch.bfloat16
    assert torch.isfinite(velocity).all() and torch.isfinite(logits).all()
    (velocity.float().square().mean() + logits.float().square().mean()).backward()
    assert model.text_proj_out.weight.grad is not None
    assert (velocity.float() - ref_v).abs().max() < 0.1 * ref_v.abs().max()


def test_pixel_preset_forward():
    """The tiny (pixel-space) preset: shapes, its mask row in the logits, and each row of a batch as it is alone."""
    torch.manual_seed(0)
    model = build_model("tiny", num_layers=1, text_vocab_size=20, text_mask_row=True).eval()
    with torch.no_grad():  # the zero-initialised output layers would give all-zero outputs
        model.proj_out.weight.normal_(std=0.1)
        model.text_proj_out.weight.normal_(std=0.1)
    args = (torch.randn(2, 3, 2, 16, 16), torch.randint(0, 21, (2, 3)), torch.tensor([10.0, 900.0]), torch.zeros(2),
            torch.randn(2, 4, 128))  # fmt: skip
    with torch.no_grad():
        velocity, logits = model(*args)[:2]
        alone = [model(*(a[i : i + 1] for a in args))[:2] for i in range(2)]
    assert velocity.shape == args[0].shape and logits.shape == (2, 3, 21)
    assert velocity.abs().sum() > 0 and logits.abs().sum() > 0
    for i, (v, l) in enumerate(alone):
        assert torch.allclose(velocity[i : i + 1], v, atol=1e-5) and torch.allclose(logits[i : i + 1], l, atol=1e-5)


def test_save_load_roundtrip_sharded(model, tmp_path):
    _randomise_text_head(model)
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    assert (tmp_path / "m" / "config.json").exists()
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 1  # sharded
    loaded = UniViGUTransformer.from_pretrained(tmp_path / "m").eval()
    public = lambda cfg: {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if not k.startswith("_")}
    assert public(loaded.config) == public(model.config)
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    video, t, prompt = _inputs(1)
    tokens = torch.randint(0, VOCAB, (1, 3))
    with torch.no_grad():
        outs = zip(model(video, tokens, t, t, prompt), loaded(video, tokens, t, t, prompt))
    # Weights are bit-equal; loaded ones are unaligned views of the file, so kernels may round differently.
    assert all((a - b).abs().max().item() <= 1e-6 for a, b in outs)


def test_loading_another_config_names_the_mismatch(model, wan, tmp_path):
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"text_embedding\.weight: checkpoint \(50, 32\) vs model \(60, 32\)"):
        UniViGUTransformer.from_pretrained(tmp_path / "m", text_vocab_size=60)
    n_block = sum(k.startswith("blocks.1.") for k in model.state_dict())
    with pytest.raises(ValueError, match=rf"unexpected keys \({n_block}\): blocks\.1\.\*: {n_block}$"):
        UniViGUTransformer.from_pretrained(tmp_path / "m", num_layers=1)  # a whole block, summed up
    wan.save_pretrained(tmp_path / "wan")  # a plain Wan folder lacks the text parts: use from_wan
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): blocks\.0\.\*: 4, blocks\.1\.\*: 4, "):
        UniViGUTransformer.from_pretrained(tmp_path / "wan")  # ffn_t's 4 weights per block, the text head, ...
    weights = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["text_embedding.weight"]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"missing keys \(1\): text_embedding\.weight$"):  # a few: by name
        UniViGUTransformer.from_pretrained(tmp_path / "m")


def test_half_precision_loading_keeps_wan_dtypes(model, wan, tmp_path):
    wan.save_pretrained(tmp_path / "wan")
    wan_bf16 = WanTransformer3DModel.from_pretrained(tmp_path / "wan", torch_dtype=torch.bfloat16).eval()
    from_wan = UniViGUTransformer.from_wan(wan_bf16, text_vocab_size=VOCAB).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = UniViGUTransformer.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16).eval()
    wan_dtypes = {k: v.dtype for k, v in wan_bf16.state_dict().items()}
    assert torch.float32 in wan_dtypes.values() and torch.bfloat16 in wan_dtypes.values()
    for m in (from_wan, loaded):
        dtypes = {k: v.dtype for k, v in m.state_dict().items()}
        assert {k: dtypes[k] for k in wan_dtypes} == wan_dtypes
        # each text copy keeps its source's precision (fp32 timestep MLP and table, bf16 FFN)
        assert dtypes["time_embedder_t.linear_1.weight"] == dtypes["condition_embedder.time_embedder.linear_1.weight"]
        assert dtypes["scale_shift_table_t"] == torch.float32
        assert dtypes["blocks.0.ffn_t.net.2.weight"] == torch.bfloat16
    video, t, prompt = _inputs(2)
    with torch.no_grad():
        ref = wan_bf16(video.bfloat16(), t, prompt.bfloat16(), return_dict=False)[0]
        velocity, logits = from_wan(video.bfloat16(), torch.randint(0, VOCAB, (2, 3)), t, t, prompt.bfloat16())
        velocity0, _ = from_wan(video.bfloat16(), None, t, None, prompt.bfloat16())
    assert velocity.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (velocity0.float() - ref.float()).abs().max().item() <= 1e-5


def test_unreadable_or_missing_weights_name_the_file(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    for broken in (data[: len(data) // 2], b"\x00" * 64, b""):  # truncated, random, empty
        weights.write_bytes(broken)
        with pytest.raises(ValueError, match=rf"{weights} is not a readable safetensors file \(truncated or corrupt"):
            UniViGUTransformer.from_pretrained(tmp_path / "m")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=f"no diffusion_pytorch_model.safetensors in {tmp_path / 'm'}$"):
        UniViGUTransformer.from_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("")  # emptied by a kill (diffusers: an OSError from deep inside)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'm' / 'config.json'} is not readable"):
        UniViGUTransformer.from_pretrained(tmp_path / "m")


def test_wan_loading_is_strict(wan, tmp_path):
    from univigu.models.wan import load_wan_transformer

    wan.save_pretrained(tmp_path / "wan")
    config = json.loads((tmp_path / "wan" / "config.json").read_text())
    (tmp_path / "wan" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    mismatch = r"the WanTransformer3DModel its config describes:\n  missing keys \(\d+\): blocks\.2"
    with pytest.raises(ValueError, match=mismatch):  # was diffusers' "Cannot copy out of meta tensor"
        load_wan_transformer(tmp_path / "wan")


def test_text_rope_positions_start_at_zero():
    """text_rope(L, d, theta): cos/sin of p * theta^(-2i/d) for p = 0..L-1, so row 0 is the identity rotation.
    (Relative attention cannot see an offset of all positions; the formula can.)"""
    from univigu.models.transformer import text_rope

    length, dim, theta = 6, 8, 10000.0
    cos, sin = text_rope(length, dim, theta, torch.device("cpu"))
    assert cos.shape == sin.shape == (length, dim // 2)
    p = torch.arange(length, dtype=torch.float64)[:, None]
    angles = p * theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)[None]
    assert torch.allclose(cos, angles.cos().float(), atol=1e-6) and torch.allclose(sin, angles.sin().float(), atol=1e-6)
    assert (cos[0] == 1).all() and (sin[0] == 0).all()


def test_loading_a_missing_or_bad_folder_is_a_clear_error_and_never_uses_the_network(model, tmp_path, monkeypatch):
    """A folder that is not there was a hub id (requests to huggingface.co, then an OSError); a config value of the
    wrong type a bare TypeError naming neither the file nor the key."""
    import socket

    attempts = []
    monkeypatch.setattr(socket.socket, "connect", lambda *args: attempts.append(args) or 1 / 0)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: attempts.append(args) or 1 / 0)
    with pytest.raises(FileNotFoundError, match="absent does not exist"):
        UniViGUTransformer.from_pretrained(tmp_path / "absent")
    model.save_pretrained(tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "num_layers": "two"}))
    with pytest.raises(ValueError, match=f"^{config_file} does not describe a UniViGUTransformer: .*integer "
                                         r"\(of another type than the defaults: num_layers='two'\)"):
        UniViGUTransformer.from_pretrained(tmp_path / "m")
    # a typo'd key: diffusers drops it and builds the default size; the mismatch names the key it dropped
    typo = {**{k: v for k, v in config.items() if k != "num_layers"}, "num_layer": config["num_layers"]}
    config_file.write_text(json.dumps(typo))
    with pytest.raises(ValueError, match=r"config.json keys UniViGUTransformer does not take \(typos\?\): "
                                         r"\['num_layer'\]"):
        UniViGUTransformer.from_pretrained(tmp_path / "m")
    config_file.unlink()
    with pytest.raises(FileNotFoundError, match=f"no config.json in {tmp_path / 'm'}"):
        UniViGUTransformer.from_pretrained(tmp_path / "m")
    assert attempts == []


def test_the_typo_hint_skips_config_keys_our_loaders_handle(wan, tmp_path):
    """A Wan transformer folder whose weights do not match its config: the hint names the typo'd key, not the
    `rope_theta` that set_rope_theta records and load_wan_transformer puts back."""
    from diffusers import WanTransformer3DModel

    from univigu.models.loading import check_checkpoint
    from univigu.models.wan import set_rope_theta

    set_rope_theta(wan, 10.0).save_pretrained(tmp_path / "w")
    config_file = tmp_path / "w" / "config.json"
    config = json.loads(config_file.read_text())
    assert config["rope_theta"] == 10.0
    config_file.write_text(json.dumps({**{k: v for k, v in config.items() if k != "num_layers"}, "num_layer": 1}))
    with pytest.raises(ValueError, match=r"does not take \(typos\?\): \['num_layer'\]$"):
        check_checkpoint(WanTransformer3DModel, tmp_path / "w")


def test_inputs_of_the_wrong_shape_are_clear_errors(model, tmp_path):
    """A size the patch does not divide was cropped silently by the patch convolution; a prompt of another width
    or a token batch of another size failed deep inside with a matmul's shapes."""
    video, t, prompt = _inputs(2)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"video's H = 7 not divisible by the patch size \(1, 2, 2\)"):
        model(video[..., :7, :], tokens, t, t, prompt)
    with pytest.raises(ValueError, match=r"video must be \[B, 4, T, H, W\], got \[2, 3, 2, 8, 8\]"):
        model(video[:, :3], tokens, t, t, prompt)
    with pytest.raises(ValueError, match=r"prompt_states must be \[B, S, text_dim=24\], got \[2, 7, 23\]"):
        model(video, tokens, t, t, prompt[..., :23])
    with pytest.raises(ValueError, match=r"text_tokens must be \[B, L\] ids with the video's batch B=2, got \[1, 3\]"):
        model(video, tokens[:1], t, t, prompt)
    assert model(video, tokens, t, t, prompt).velocity.shape == video.shape  # the same inputs, whole
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"a pipeline folder: load its UniViGUTransformer with "
                                                r"subfolder='transformer'"):  # fmt: skip
        UniViGUTransformer.from_pretrained(tmp_path / "pipe")
    loaded = UniViGUTransformer.from_pretrained(tmp_path / "pipe", subfolder="transformer")
    assert torch.equal(loaded.text_proj_out.weight, model.text_proj_out.weight)
