"""`univigu convert-official`: the released Uni-ViGU key names, FSDP prefixes, and exact forward parity."""

import pytest
import torch
from typer.testing import CliRunner

from univigu import UniViGUTransformer
from univigu.cli import app
from cli_text import said
from univigu.models.convert import ConversionError, convert_official_state_dict

runner = CliRunner()
CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
              text_dim=24, freq_dim=32, ffn_dim=40, num_layers=2, text_vocab_size=50, text_mask_row=True)  # fmt: skip
# our name -> the official WanUnifiedTransformer name (module names of github.com/Fr0zenCrane/Uni-ViGU)
TO_OFFICIAL = [
    ("text_embedding.", "vocab_embed."),
    ("condition_embedder.text_embedder.", "cond_text_embedder."),
    ("condition_embedder.time_embedder.", "time_embedding_v.time_embedder."),
    ("condition_embedder.time_proj.", "time_embedding_v.time_proj."),
    ("time_embedder_t.", "time_embedding_t.time_embedder."),
    ("time_proj_t.", "time_embedding_t.time_proj."),
    ("scale_shift_table_t", "scale_shift_table_t"),
    ("scale_shift_table", "scale_shift_table_v"),
    ("proj_out.", "video_head.proj_out."),
    ("text_proj_out.", "text_head.linear."),
    ("text_norm.", "text_head.norm_final."),
]


def official_state_dict(model: UniViGUTransformer) -> dict[str, torch.Tensor]:
    """Our weights under every official key name, FSDP-wrapped as a sharded run saves them."""
    out = {}
    for key, value in model.state_dict().items():
        new = key
        if not key.startswith("blocks."):
            new = next((o + key[len(ours):] for ours, o in TO_OFFICIAL if key.startswith(ours)), key)
        else:  # blocks.N.x -> blocks.N._fsdp_wrapped_module.x (one FSDP unit per block)
            n, rest = key.split(".", 2)[1:]
            new = f"blocks.{n}._fsdp_wrapped_module.{rest}"
        out[f"_fsdp_wrapped_module._orig_mod.{new}"] = value.clone()
    out["_fsdp_wrapped_module._orig_mod.rotary_emb_text.inv_freq"] = torch.rand(8)  # a recomputed buffer
    return out


@pytest.fixture(scope="module")
def model():
    """Ours with the released code's text layout (its text RoPE and text-head norm weight), as converted."""
    torch.manual_seed(0)
    model = UniViGUTransformer(**CONFIG, text_rope_halves=True, text_norm_weight=True)
    with torch.no_grad():
        for p in model.text_parameters():  # not the copies init_text_parts makes: a mix-up must show
            p.normal_(std=0.1)
        model.text_norm.weight.add_(1)
    return model.eval()


def test_the_released_text_layout_is_the_released_code_s():
    """text_rope_halves and text_norm_weight compute what the released code computes, written here independently:
    RoPE as flash-attn's non-interleaved `x * [cos, cos] + rotate_half(x) * [sin, sin]` on the text rows (video
    rows keep Wan's pairs), and the text head's `F.layer_norm(x) * weight` (eps 1e-5)."""
    from univigu.models.transformer import apply_rope, text_rope, video_rope

    g = torch.Generator().manual_seed(0)
    n_v, n_t, head_dim = 12, 5, 16
    x = torch.randn(2, n_v + n_t, 3, head_dim, generator=g)
    cos_v, sin_v = video_rope((3, 2, 2), head_dim, x.device)
    cos_t, sin_t = text_rope(n_t, head_dim, 1e4, x.device)
    got = apply_rope(x, torch.cat([cos_v, cos_t]), torch.cat([sin_v, sin_t]), n_v)
    torch.testing.assert_close(got[:, :n_v], apply_rope(x[:, :n_v], cos_v, sin_v))
    xt = x[:, n_v:]
    rotate_half = torch.cat([-xt[..., head_dim // 2:], xt[..., : head_dim // 2]], dim=-1)
    cos, sin = torch.cat([cos_t, cos_t], -1)[:, None], torch.cat([sin_t, sin_t], -1)[:, None]
    torch.testing.assert_close(got[:, n_v:], xt * cos + rotate_half * sin)
    assert not torch.allclose(got[:, n_v:], apply_rope(xt, cos_t, sin_t))  # the two layouts do differ

    model = UniViGUTransformer(**CONFIG, text_norm_weight=True).eval()
    with torch.no_grad():
        model.text_norm.weight.uniform_(0.5, 1.5, generator=g)
    h = torch.randn(2, 5, 32, generator=g)
    torch.testing.assert_close(model.text_norm(h), torch.nn.functional.layer_norm(h, (32,)) * model.text_norm.weight)


def test_every_official_name_maps_and_the_forward_is_the_same(model, tmp_path):
    official = official_state_dict(model)
    names = {k.replace("_fsdp_wrapped_module.", "").replace("_orig_mod.", "").split(".")[0] for k in official}
    assert names == {"vocab_embed", "blocks", "time_embedding_v", "time_embedding_t", "cond_text_embedder",
                     "scale_shift_table_v", "scale_shift_table_t", "patch_embedding", "video_head", "text_head",
                     "rotary_emb_text"}  # fmt: skip
    block_parts = {k.split("._fsdp_wrapped_module.")[-1].split(".")[0] for k in official if ".blocks." in k}
    assert block_parts == {"attn1", "attn2", "norm2", "ffn", "ffn_t", "scale_shift_table"}
    ckpt = tmp_path / "unified.pth"
    torch.save({"model": official, "step": torch.tensor(1000)}, ckpt)

    result = runner.invoke(app, ["convert-official", str(ckpt), str(tmp_path / "ours"), "--attention-head-dim", "16",
                                 "--vocab-size", "50"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"mapped {len(official) - 1} tensors" in result.output
    converted = UniViGUTransformer.from_pretrained(tmp_path / "ours").eval()
    assert {k: v for k, v in converted.config.items() if k in CONFIG} == {**CONFIG, "patch_size": [1, 2, 2]}

    g = torch.Generator().manual_seed(1)
    video, prompt = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 7, 24, generator=g)
    tokens = torch.randint(0, 51, (2, 6), generator=g)
    t_v, t_t = torch.tensor([300.0, 900.0]), torch.tensor([0.0, 500.0])
    with torch.no_grad():
        want, got = model(video, tokens, t_v, t_t, prompt), converted(video, tokens, t_v, t_t, prompt)
    assert torch.equal(want.velocity, got.velocity) and torch.equal(want.logits, got.logits)


def test_unmapped_keys_are_an_error_naming_them(model, tmp_path):
    official = official_state_dict(model)
    official["_fsdp_wrapped_module.blocks.0.adapter.weight"] = torch.zeros(2)
    official["mystery_head.bias"] = torch.zeros(2)
    with pytest.raises(ConversionError, match=r"unmapped official keys: \['blocks.0.adapter.weight', 'mystery_head"):
        convert_official_state_dict(official, attention_head_dim=16)
    torch.save(official, tmp_path / "bad.pth")
    result = runner.invoke(app, ["convert-official", str(tmp_path / "bad.pth"), str(tmp_path / "out"),
                                 "--attention-head-dim", "16"])  # fmt: skip
    assert result.exit_code == 1 and "mystery_head.bias" in result.output and not (tmp_path / "out").exists()


def test_missing_and_untranslatable_weights_are_errors(model):
    official = official_state_dict(model)
    del official["_fsdp_wrapped_module._orig_mod.blocks.1._fsdp_wrapped_module.ffn_t.net.2.bias"]
    with pytest.raises(ConversionError, match=r"not filled \['blocks.1.ffn_t.net.2.bias'\]"):
        convert_official_state_dict(official, attention_head_dim=16)
    official = official_state_dict(model)
    del official["_fsdp_wrapped_module._orig_mod.text_head.norm_final.weight"]
    with pytest.raises(ConversionError, match=r"not filled \['text_norm.weight'\]"):
        convert_official_state_dict(official, attention_head_dim=16)
    with pytest.raises(ConversionError, match="not a multiple of attention_head_dim 128: .*--attention-head-dim"):
        convert_official_state_dict(official_state_dict(model))  # the default head size, Wan's, does not fit 24


def test_with_a_wan_folder_the_output_is_a_pipeline(tmp_path):
    """`--wan`: the converted transformer with the folder's VAE, umT5 and tokenizer, as a pipeline folder the CLI and
    `init_from` take; the checkpoint's extra vocabulary row (a mask token) sets the mask text source."""
    from univigu import UniViGUPipeline
    from univigu.data.tokenizer import load_tokenizer
    from wan_fixture import build_wan_folder

    wan = build_wan_folder(tmp_path / "wan")
    vocab = len(load_tokenizer(wan / "tokenizer"))
    model = UniViGUTransformer.from_wan(wan / "transformer", text_vocab_size=vocab, text_mask_row=True,
                                        text_rope_halves=True, text_norm_weight=True)  # fmt: skip
    torch.save(official_state_dict(model), tmp_path / "unified.pth")
    args = ["convert-official", str(tmp_path / "unified.pth"), str(tmp_path / "pipe"), "--attention-head-dim", "12"]
    result = runner.invoke(app, [*args[:3], "--wan", str(wan)])  # the head size read from its transformer
    assert result.exit_code == 0, result.output
    assert "'attention_head_dim': 12" in result.output and "warning" not in result.output
    pipe = UniViGUPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.unified and pipe.config.text_source == "mask" and (tmp_path / "pipe" / "vae").is_dir()
    assert pipe.config.caption_condition == "zeros"  # the released script's V2T condition
    assert pipe.config.guidance_text == "prompt"  # and its T2V guidance
    assert pipe.config.text_update == "linear-resample"  # and its joint generation's text rule (docs/METHOD.md 4)
    got = pipe.transformer.state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    not_wan = runner.invoke(app, [*args, "--wan", str(tmp_path)])
    assert not_wan.exit_code == 2 and "not a Wan2.1 diffusers folder" in said(not_wan)

    # converting again into the pipeline folder, without --wan: refused, then with --overwrite the folder is the
    # transformer folder alone (its old transformer/ and VAE were left beside the new weights, and loaded)
    torch.manual_seed(1)
    other = UniViGUTransformer.from_wan(wan / "transformer", text_vocab_size=vocab, text_mask_row=True,
                                        text_rope_halves=True, text_norm_weight=True)  # fmt: skip
    torch.save(official_state_dict(other), tmp_path / "unified.pth")
    refused = runner.invoke(app, [*args, "--vocab-size", str(vocab)])
    assert refused.exit_code == 2 and "pass --overwrite" in said(refused), refused.output
    result = runner.invoke(app, [*args, "--overwrite"])  # no tokenizer: the vocabulary is a guess, and says so
    assert result.exit_code == 0, result.output
    assert f"'text_vocab_size': {vocab + 1}, 'text_mask_row': False" in result.output
    assert f"convert with --vocab-size {vocab}, or with --wan" in said(result)
    result = runner.invoke(app, [*args, "--vocab-size", str(vocab), "--overwrite"])
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    assert not (tmp_path / "pipe" / "transformer").exists() and not (tmp_path / "pipe" / "vae").exists()
    got = UniViGUTransformer.from_pretrained(tmp_path / "pipe").state_dict()
    assert all(torch.equal(got[k], v) for k, v in other.state_dict().items())
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left behind
    with pytest.raises(FileNotFoundError, match=r"holds a UniViGUTransformer alone \(convert-official without "
                                                r"--wan\): convert with --wan"):  # fmt: skip
        UniViGUPipeline.from_pretrained(tmp_path / "pipe")

    # a checkpoint whose prompt width is not the folder's umT5's: an error before anything is written (a traceback
    # after the conversion was printed)
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    wide = UniViGUTransformer(**{**config, "text_dim": 2 * config["text_dim"]})
    torch.save(official_state_dict(wide), tmp_path / "wide.pth")
    result = runner.invoke(app, ["convert-official", str(tmp_path / "wide.pth"), str(tmp_path / "wide"), "--wan",
                                 str(wan)])  # fmt: skip
    assert result.exit_code == 1 and "does not fit the --wan folder" in said(result), result.output
    assert "Traceback" not in result.output and not (tmp_path / "wide").exists()


def test_an_existing_output_folder_needs_overwrite(model, tmp_path):
    """A non-empty OUT_DIR is a usage error before the checkpoint is read (a junk one is not reached); an empty one
    is written into; with --overwrite it is replaced whole (nothing of the old folder is left), as `export` does;
    OUT_DIR may not be the checkpoint itself."""
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint" * 8)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    args = ["--attention-head-dim", "16", "--vocab-size", "50"]
    result = runner.invoke(app, ["convert-official", str(tmp_path / "junk.pth"), str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and "exists; pass --overwrite" in said(result), result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    torch.save(official_state_dict(model), tmp_path / "unified.pth")
    result = runner.invoke(app, ["convert-official", str(tmp_path / "unified.pth"), str(tmp_path / "out"), *args,
                                 "--overwrite"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out" / "old.txt").exists()
    assert UniViGUTransformer.from_pretrained(tmp_path / "out").config.text_vocab_size == 50
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["convert-official", str(tmp_path / "unified.pth"), str(tmp_path / "empty"), *args])
    assert result.exit_code == 0 and (tmp_path / "empty" / "config.json").exists(), result.output
    result = runner.invoke(app, ["convert-official", str(tmp_path / "unified.pth"), str(tmp_path / "unified.pth"),
                                 *args, "--overwrite"])  # fmt: skip
    assert result.exit_code == 2 and "is CHECKPOINT itself" in said(result) and (tmp_path / "unified.pth").is_file()


def test_a_safetensors_checkpoint_and_unreadable_ones(model, tmp_path):
    from safetensors.torch import save_file

    official = official_state_dict(model)
    save_file({k: v.contiguous() for k, v in official.items()}, tmp_path / "unified.safetensors")
    args = ["--attention-head-dim", "16", "--vocab-size", "50"]
    result = runner.invoke(app, ["convert-official", str(tmp_path / "unified.safetensors"), str(tmp_path / "ours"),
                                 *args])  # fmt: skip
    assert result.exit_code == 0, result.output
    converted = UniViGUTransformer.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in model.state_dict().items())
    # torch.save's legacy (pre-1.6, non-zip) format cannot be memory-mapped: read without (was refused)
    torch.save({"model": official}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    result = runner.invoke(app, ["convert-official", str(tmp_path / "legacy.pth"), str(tmp_path / "legacy"), *args])
    assert result.exit_code == 0, result.output
    assert torch.equal(UniViGUTransformer.from_pretrained(tmp_path / "legacy").state_dict()["text_proj_out.weight"],
                       model.state_dict()["text_proj_out.weight"])  # fmt: skip
    torch.save([1, 2], tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint" * 8)
    for name, message in (("list.pth", "does not hold a state dict"),
                          ("junk.pth", "is not a torch checkpoint (neither torch.save's zip archive")):  # fmt: skip
        result = runner.invoke(app, ["convert-official", str(tmp_path / name), str(tmp_path / name[:4]), *args])
        assert result.exit_code == 1 and message in said(result) and not (tmp_path / name[:4]).exists()


def test_ddp_and_checkpoint_wrapper_prefixes_and_derived_buffers(model):
    """A DDP `module.` prefix and activation checkpointing's `_checkpoint_wrapped_module.` are undone like FSDP's;
    every recomputed buffer (video and text RoPE tables, the timestep sinusoids) is dropped, not an error."""
    from univigu.models.convert import strip_wrappers

    assert strip_wrappers({"module.blocks.0._checkpoint_wrapped_module.ffn.net.2.bias": 1}) == {"blocks.0.ffn.net.2.bias": 1}
    official = {k.replace("_fsdp_wrapped_module._orig_mod.", "module.").replace("_fsdp_wrapped_module.",
                                                                                 "_checkpoint_wrapped_module."): v
                for k, v in official_state_dict(model).items()}  # fmt: skip
    derived = ["module.rotary_emb_video.freqs", "module.time_embedding_v.timesteps_proj.weights",
               "module.time_embedding_t.timesteps_proj.weights"]  # fmt: skip
    official.update({k: torch.zeros(3) for k in derived})
    converted, report = convert_official_state_dict(official, attention_head_dim=16, text_vocab_size=50)
    assert sorted(report.dropped) == sorted(k.removeprefix("module.") for k in [*derived, "module.rotary_emb_text.inv_freq"])
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_checkpoint_without_cross_attention_norm_converts_without_it():
    """cross_attn_norm is read from the weights: no blocks.N.norm2 -> a model without it (not an error)."""
    torch.manual_seed(0)
    plain = UniViGUTransformer(**{**CONFIG, "cross_attn_norm": False}, text_rope_halves=True, text_norm_weight=True)
    converted, report = convert_official_state_dict(official_state_dict(plain), attention_head_dim=16, text_vocab_size=50)
    assert report.config["cross_attn_norm"] is False and converted.config.cross_attn_norm is False


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "module"])
def test_a_state_dict_under_a_wrapper_key_loads(model, tmp_path, wrapper):
    from univigu.models.convert import load_official_state_dict

    official = official_state_dict(model)
    torch.save({wrapper: official, "step": 1000}, tmp_path / "ckpt.pth")
    loaded = load_official_state_dict(tmp_path / "ckpt.pth")
    assert loaded.keys() == official.keys()


def test_out_dir_may_not_hold_its_inputs_nor_lie_inside_the_wan_folder(tmp_path):
    """--overwrite replaces OUT_DIR whole: an OUT_DIR holding CHECKPOINT or the --wan folder, or inside --wan, would
    delete an input; refused as a usage error before anything is read (the checkpoint here is junk)."""
    parent = tmp_path / "parent"
    wan = parent / "wan"
    for sub in ("transformer", "vae", "text_encoder", "tokenizer"):
        (wan / sub).mkdir(parents=True)
    ckpt = parent / "ckpts" / "unified.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"not a checkpoint" * 8)
    args = ["--attention-head-dim", "16", "--vocab-size", "50", "--overwrite"]
    cases = [(parent, [], "contains CHECKPOINT"), (ckpt.parent, [], "contains CHECKPOINT"),
             (parent, ["--wan", str(wan)], "contains CHECKPOINT"), (tmp_path, ["--wan", str(wan)], "contains"),
             (wan / "out", ["--wan", str(wan)], "is inside the --wan folder"),
             (wan, ["--wan", str(wan)], "is the --wan folder itself")]  # fmt: skip
    other = tmp_path / "elsewhere.pth"
    other.write_bytes(b"junk")
    for out, extra, message in cases:
        result = runner.invoke(app, ["convert-official", str(ckpt), str(out), *args, *extra])
        assert result.exit_code == 2 and message in said(result), (out, result.output)
    # the --wan folder alone inside OUT_DIR (the checkpoint elsewhere)
    result = runner.invoke(app, ["convert-official", str(other), str(parent), *args, "--wan", str(wan)])
    assert result.exit_code == 2 and "contains the --wan folder" in said(result), result.output
    assert ckpt.is_file() and all((wan / sub).is_dir() for sub in ("transformer", "vae", "text_encoder", "tokenizer"))
