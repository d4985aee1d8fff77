"""Wan scale on CPU: a tiny random Wan2.1-Diffusers-like folder through `from_wan` and the three tasks."""

import json

import numpy as np
import pytest
import torch

from wan_fixture import FRAMES, HEIGHT, WIDTH, build_wan_folder


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return build_wan_folder(tmp_path_factory.mktemp("wan") / "Wan2.1-tiny")


@pytest.fixture(scope="module")
def pipe(wan_dir):
    from univigu import UniViGUPipeline

    return UniViGUPipeline.from_wan(wan_dir, frames=FRAMES, height=HEIGHT, width=WIDTH, text_length=8, num_steps=2)


def test_components_match_diffusers_wan_conventions(wan_dir):
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    from univigu.models.wan import WanComponents

    wan = WanComponents.from_folder(wan_dir)
    video = torch.randint(0, 256, (2, FRAMES, HEIGHT, WIDTH, 3), dtype=torch.uint8)
    latents = wan.encode_video(video)
    assert latents.shape == (2, 4, 2, 4, 4)
    # WanPipeline's normalisation: (z - latents_mean) / latents_std, with z the posterior mode
    vae = AutoencoderKLWan.from_pretrained(wan_dir / "vae")
    z = vae.encode(video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(latents, (z - mean) / std)
    assert wan.decode_latents(latents).shape == video.shape and wan.decode_latents(latents).dtype == torch.uint8

    # WanPipeline's prompt states: tokenizer padded to 512 with the end token, umT5, padded positions zeroed
    states, mask = wan.encode_prompts(["a red  cat runs", "blue dog"])
    tokenizer = AutoTokenizer.from_pretrained(wan_dir / "tokenizer")
    ids = tokenizer(["a red cat runs</s>", "blue dog</s>"], padding="max_length", max_length=512,
                    add_special_tokens=False, return_tensors="pt")  # fmt: skip
    ref = UMT5EncoderModel.from_pretrained(wan_dir / "text_encoder")(ids.input_ids, ids.attention_mask).last_hidden_state
    assert states.shape == (2, 512, 32) and mask.sum(1).tolist() == [5, 3]
    torch.testing.assert_close(states, ref * ids.attention_mask[..., None])
    assert states[1, 3:].abs().max() == 0


@pytest.mark.parametrize("size, message", [((6, 16, 16), "nearest valid: 5"), ((5, 20, 16), "nearest valid: 16"),
                                           ((5, 16, 28), "multiple of 8")])  # fmt: skip
def test_bad_sizes_name_the_nearest_valid_one(wan_dir, size, message):
    from univigu import UniViGUPipeline

    frames, height, width = size
    with pytest.raises(ValueError, match=message):
        UniViGUPipeline.from_wan(wan_dir, frames=frames, height=height, width=width)


def test_from_wan_runs_the_three_tasks(pipe, wan_dir, tmp_path):
    from univigu import UniViGUPipeline, UniViGUTransformer

    assert isinstance(pipe.transformer, UniViGUTransformer)
    assert pipe.transformer.config.text_vocab_size == len(pipe.tokenizer) and pipe.config.shift == 3.0
    assert pipe.config.prompt_length == 512
    out = pipe.text_to_video(["a red circle moves left"], seed=0, progress=False)
    assert out.videos.shape == (1, FRAMES, HEIGHT, WIDTH, 3) and out.videos.dtype == np.uint8
    again = pipe.text_to_video(["a red circle moves left"], seed=0, progress=False)
    np.testing.assert_array_equal(out.videos, again.videos)
    texts = pipe.video_to_text(out.videos, seed=0, progress=False).texts
    assert len(texts) == 1 and isinstance(texts[0], str)
    joint = pipe.generate(["a dog runs", "the cat jumps"], seed=1, progress=False)
    assert joint.videos.shape == (2, FRAMES, HEIGHT, WIDTH, 3) and len(joint.texts) == 2

    # saved with its VAE and umT5, it loads back and samples the same
    folder = pipe.save_pretrained(tmp_path / "pipe")
    assert json.loads((folder / "model_index.json").read_text())["vae"][1] == "AutoencoderKLWan"
    loaded = UniViGUPipeline.from_pretrained(folder)
    np.testing.assert_array_equal(loaded.text_to_video(["a red circle moves left"], seed=0, progress=False).videos,
                                  out.videos)  # fmt: skip
    # a Wan folder given to from_pretrained goes through from_wan, with its sizes
    sized = UniViGUPipeline.from_pretrained(wan_dir, frames=FRAMES, height=HEIGHT, width=WIDTH)
    assert isinstance(sized.transformer, UniViGUTransformer)
    assert (sized.config.frames, sized.config.height, sized.config.width) == (FRAMES, HEIGHT, WIDTH)


def test_from_wan_as_its_own_generator(pipe, wan_dir):
    """unified=False: Wan2.1's generator with the folder's VAE and umT5, text to video only (what a recall stage
    builds its unified model from)."""
    from diffusers import WanTransformer3DModel

    from univigu import UniViGUPipeline

    base = UniViGUPipeline.from_wan(wan_dir, unified=False, frames=FRAMES, height=HEIGHT, width=WIDTH, num_steps=2)
    assert type(base.transformer) is WanTransformer3DModel and not base.unified
    videos = base.text_to_video(["a red circle moves left"], seed=0, progress=False).videos
    assert videos.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    with pytest.raises(ValueError, match="unified"):
        base.video_to_text(videos, progress=False)
    with pytest.raises(ValueError, match="takes no transformer"):
        UniViGUPipeline.from_wan(wan_dir, unified=False, transformer=pipe.transformer)


def test_from_wan_is_reproducible_and_runs_in_bfloat16(pipe, wan_dir):
    from univigu import UniViGUPipeline

    sizes = dict(frames=FRAMES, height=HEIGHT, width=WIDTH, text_length=8, num_steps=2)
    again = UniViGUPipeline.from_wan(wan_dir, **sizes)  # the new token embedding is seeded: the same model twice
    torch.testing.assert_close(again.transformer.text_embedding.weight, pipe.transformer.text_embedding.weight)
    other = UniViGUPipeline.from_wan(wan_dir, seed=1, **sizes).transformer.text_embedding.weight
    assert not torch.equal(other, pipe.transformer.text_embedding.weight)

    half = UniViGUPipeline.from_wan(wan_dir, torch_dtype=torch.bfloat16, **sizes)
    assert half.transformer.patch_embedding.weight.dtype == torch.bfloat16
    videos = half.text_to_video(["a red circle moves left"], seed=0, progress=False).videos
    assert videos.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    assert len(half.video_to_text(videos, seed=0, progress=False).texts) == 1
    assert len(half.generate(["a dog runs"], seed=0, progress=False).texts) == 1


def test_an_offloaded_pipeline_samples_as_the_plain_one(pipe, wan_dir):
    from univigu import UniViGUPipeline

    offloaded = UniViGUPipeline.from_wan(wan_dir, frames=FRAMES, height=HEIGHT, width=WIDTH, text_length=8,
                                         num_steps=2).enable_model_cpu_offload("cpu")  # fmt: skip
    want = pipe.generate(["a red circle moves left"], seed=0, progress=False)
    got = offloaded.generate(["a red circle moves left"], seed=0, progress=False)
    np.testing.assert_array_equal(got.videos, want.videos)
    assert got.texts == want.texts


def test_cpu_offload_moves_components_only_while_they_run(wan_dir):
    from univigu.models.wan import WanComponents

    wan = WanComponents.from_folder(wan_dir)
    moves = []
    for name, part in (("vae", wan.codec.vae), ("umt5", wan.prompt_encoder.encoder)):
        # record the moves instead of making them: this machine has no GPU
        part.to = lambda device, name=name, part=part: (moves.append((name, str(device))), part)[1]
    wan.enable_model_cpu_offload("cuda")
    assert moves == [("vae", "cpu"), ("umt5", "cpu")]
    moves.clear()
    wan.encode_prompts(["a cat"])
    assert moves == [("umt5", "cuda"), ("umt5", "cpu")]
    moves.clear()
    wan.decode_latents(wan.encode_video(torch.zeros(1, FRAMES, HEIGHT, WIDTH, 3, dtype=torch.uint8)))
    assert moves == [("vae", "cuda"), ("vae", "cpu")] * 2


def test_pipeline_to_and_cpu_offload_move_each_component(wan_dir, monkeypatch):
    from univigu import UniViGUPipeline

    pipe = UniViGUPipeline.from_wan(wan_dir, frames=FRAMES, height=HEIGHT, width=WIDTH, text_length=8)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no CUDA device; the pipeline is left where it is"):
            pipe.enable_model_cpu_offload("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine: the moves are only recorded
    moves = []
    for name, part in (("transformer", pipe.transformer), ("vae", pipe.codec.vae),
                       ("umt5", pipe.prompt_encoder.encoder)):  # fmt: skip
        part.to = lambda device, name=name, part=part: (moves.append((name, str(device))), part)[1]  # no GPU here
    assert pipe.enable_model_cpu_offload("cuda") is pipe
    assert moves == [("transformer", "cuda"), ("vae", "cpu"), ("umt5", "cpu")]
    moves.clear()  # .to moves all three (the prompt encoder as a whole)
    pipe.prompt_encoder.to = lambda device: (moves.append(("prompt_encoder", str(device))), pipe.prompt_encoder)[1]
    assert pipe.to("cuda") is pipe
    assert moves == [("transformer", "cuda"), ("prompt_encoder", "cuda"), ("vae", "cuda")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_a_dtype_casts_as_loading_in_it_does(wan_dir, dtype):
    """pipe.to(dtype) (diffusers' call) gives each weight the dtype from_pretrained(torch_dtype=dtype) loads it in:
    diffusers' float32-kept modules at any dtype, umT5's only at float16; the VAE stays float32."""
    import univigu
    from univigu import UniViGUPipeline

    sizes = dict(frames=FRAMES, height=HEIGHT, width=WIDTH, text_length=8)
    loads = {"wan": lambda **k: UniViGUPipeline.from_wan(wan_dir, **sizes, **k),
             "toy": lambda **k: UniViGUPipeline.from_pretrained(univigu.DEFAULT_MODEL, **k)}  # fmt: skip
    for name, load in loads.items():
        loaded, cast = load(torch_dtype=dtype), load().to("cpu", dtype)
        for part in ("transformer", "prompt_encoder"):
            want = {k: v.dtype for k, v in getattr(loaded, part).state_dict().items()}
            assert {k: v.dtype for k, v in getattr(cast, part).state_dict().items()} == want, (name, part)
        assert cast.dtype == loaded.dtype == dtype
    assert {v.dtype for v in cast.transformer.state_dict().values()} == {dtype, torch.float32}  # norms kept
    wan = loads["wan"]().to(dtype=dtype)
    assert {v.dtype for v in wan.codec.vae.state_dict().values()} == {torch.float32}
    assert wan.to(torch.float32).dtype == torch.float32
    assert {v.dtype for v in wan.prompt_encoder.state_dict().values()} == {torch.float32}


def test_accelerate_fsdp_configs_wrap_our_block():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    from univigu.models import transformer

    files = sorted((Path(__file__).parents[1] / "configs" / "accelerate").glob("*.yaml"))
    assert [f.stem for f in files] == ["fsdp_1gpu", "fsdp_8gpu", "fsdp_multinode"]
    for f in files:
        cfg = load_config_from_file(str(f))
        assert cfg.distributed_type == "FSDP" and cfg.mixed_precision == "bf16"
        assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.fsdp_config["fsdp_reshard_after_forward"]  # fully sharded
        assert hasattr(transformer, cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
    assert [load_config_from_file(str(f)).num_machines for f in files] == [1, 1, 2]


def test_decode_undoes_the_latent_normalisation_and_rounds(wan_dir):
    """decode: z = latents * latents_std + latents_mean (WanPipeline's inverse), the VAE decode, then [-1, 1] to
    uint8 rounded to the nearest level."""
    from univigu.models.wan import WanVAECodec

    codec = WanVAECodec.from_pretrained(wan_dir / "vae")
    latents = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    vae = codec.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        x = vae.decode(latents * std + mean, return_dict=False)[0]
    want = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    got = codec.decode(latents)
    assert got.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    assert torch.equal(got, want)


def test_prompts_longer_than_the_canvas_are_truncated_to_512(wan_dir):
    """WanPipeline truncates a prompt at 512 tokens: so does encode_prompts (no error), the end token last."""
    from univigu.models.wan import WanComponents

    wan = WanComponents.from_folder(wan_dir)
    states, mask = wan.encode_prompts(["a red cat runs " * 200, "a dog"])
    assert states.shape == (2, 512, 32) and mask.sum(1).tolist() == [512, 3]
    assert states[1, 3:].abs().max() == 0 and states[0, -1].abs().max() > 0


def test_vae_factors_come_from_its_downsampling_config():
    """Time factor 2**(number of temporal downsamplings), space 2**(number of stages): Wan2.1's VAE has
    temperal_downsample [False, True, True], x4 in time and x8 in space. A VAE with [False, True] is x2 / x4, and
    the codec's latent_shape is the shape its encode returns."""
    from diffusers import AutoencoderKLWan

    from univigu.models.wan import WanVAECodec

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4)  # fmt: skip
    codec = WanVAECodec(vae)
    assert (codec.temporal, codec.spatial) == (2, 4)
    assert codec.latent_shape(5, 16, 24) == (4, 3, 4, 6)
    video = torch.randint(0, 256, (1, 5, 16, 24, 3), dtype=torch.uint8)
    assert codec.encode(video).shape == (1, *codec.latent_shape(5, 16, 24))
    with pytest.raises(ValueError, match="frames must be 2k\\+1 .* got 4 \\(nearest valid: 5\\)"):
        codec.check_size(4, 16, 24)


def test_from_wan_keeps_a_shift_it_is_given(wan_dir):
    """The folder's scheduler flow_shift (3.0) is the default; a shift passed to from_wan wins."""
    from univigu import UniViGUPipeline

    pipe = UniViGUPipeline.from_wan(wan_dir, frames=FRAMES, height=HEIGHT, width=WIDTH, text_length=8, shift=5.0)
    assert pipe.config.shift == 5.0


def test_a_wan_folder_missing_a_part_is_named_so(wan_dir, pipe, tmp_path):
    """An incomplete download (no transformer/) read as a broken univigu folder ("lacks ['transformer', ...]"),
    and `univigu train --init_from` of it ended in a traceback."""
    import shutil

    from univigu import UniViGUPipeline
    from univigu.training.config import load_config

    partial = tmp_path / "Wan-partial"
    shutil.copytree(wan_dir, partial, ignore=lambda folder, names: ["transformer"] if folder == str(wan_dir) else [])
    with pytest.raises(FileNotFoundError, match=r"is a WanPipeline folder, not a univigu pipeline; as a "
                                                r"Wan2.1 diffusers folder it lacks \['transformer'\]"):  # fmt: skip
        UniViGUPipeline.from_pretrained(partial)
    cfg = load_config(None, ["stage=recall", f"init_from={partial}", "pipeline={text_length: 8}"])
    with pytest.raises(FileNotFoundError, match=r"init_from: .* is a WanPipeline folder, not a univigu pipeline"):
        cfg.check_inputs()
    # a pipeline saved by a subclass of ours loads (its index names the subclass)

    class MyPipeline(UniViGUPipeline):
        pass

    MyPipeline(pipe.transformer, pipe.prompt_encoder, pipe.tokenizer, pipe.config, pipe.codec).save_pretrained(
        tmp_path / "sub")  # fmt: skip
    assert json.loads((tmp_path / "sub" / "model_index.json").read_text())["_class_name"] == "MyPipeline"
    assert MyPipeline.from_pretrained(tmp_path / "sub").unified


def test_folder_fingerprint_sees_names_sizes_and_file_ends_not_hidden_files(tmp_path):
    from univigu.models.wan import folder_fingerprint

    (tmp_path / "config.json").write_text('{"latents_std": [1.0]}')
    (tmp_path / "weights.bin").write_bytes(bytes(3 << 20))
    first = folder_fingerprint(tmp_path)
    (tmp_path / ".cache").mkdir()  # a download tool's records
    (tmp_path / ".cache" / "weights.bin.metadata").write_text("fetched at 12:00")
    assert folder_fingerprint(tmp_path) == first
    (tmp_path / "weights.bin").write_bytes(bytes((3 << 20) - 1) + b"\x01")  # the last byte of a big file
    assert folder_fingerprint(tmp_path) != first
    (tmp_path / "weights.bin").write_bytes(bytes(3 << 20))
    (tmp_path / "config.json").write_text('{"latents_std": [2.0]}')
    assert folder_fingerprint(tmp_path) != first
