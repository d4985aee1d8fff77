"""`univigu cache-latents` and `univigu convert-official`: the Wan-scale data and checkpoint commands."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from univigu.cli.run import out_dir as make_dir
from univigu.cli.run import refuse_existing, resolve_device


def cache_latents(
    wan: Path = typer.Argument(..., help="Wan2.1 diffusers folder (transformer/, vae/, text_encoder/, tokenizer/)."),
    videos: Path = typer.Argument(..., help="Folder of videos with one captions file (*.jsonl or *.csv)."),
    out: Path = typer.Argument(..., help="Cache folder to write (a rerun resumes: finished shards are skipped)."),
    captions: Path | None = typer.Option(None, help="Captions file (default: the one *.jsonl / *.csv in VIDEOS)."),
    frames: int = typer.Option(81, min=1, help="Frames per clip (4k+1 for the Wan VAE)."),
    fps: float = typer.Option(16.0, min=0.0, help="Resample to this frame rate (0: the file's own)."),
    size: list[str] = typer.Option(["480x832"], help="Bucket size HxW; repeat for several buckets."),
    shard_size: int = typer.Option(64, min=1, help="Videos per shard."),
    batch_size: int = typer.Option(4, min=1, help="Videos per VAE call."),
    dtype: str = typer.Option("bfloat16", help="Stored dtype: bfloat16, float16 or float32."),
    text_length: int = typer.Option(256, min=2, help="The text stream's length (the stages' pipeline.text_length): "
                                    "videos whose prompt or caption is longer are skipped."),  # fmt: skip
    device: str = typer.Option("cpu", callback=resolve_device, help="Where the VAE and umT5 run, e.g. cuda."),
) -> None:
    """Encode a video folder to Wan VAE latents and umT5 prompt states, sharded on disk for training."""
    import torch

    from univigu.data.latent_cache import CacheSettings, build_latent_cache
    from univigu.data.video_folder import read_captions
    from univigu.models.wan import WanComponents, check_video_size, vae_factors

    if dtype not in ("bfloat16", "float16", "float32"):
        raise typer.BadParameter(f"dtype must be bfloat16, float16 or float32, got {dtype!r}", param_hint="--dtype")
    try:
        buckets = tuple(tuple(int(v) for v in s.lower().split("x")) for s in size)
        if any(len(b) != 2 for b in buckets):
            raise ValueError
    except ValueError:
        raise typer.BadParameter(f"sizes must look like 480x832, got {size}", param_hint="--size") from None
    settings = CacheSettings(frames=frames, fps=fps or None, buckets=buckets, shard_size=shard_size,
                             batch_size=batch_size, dtype=dtype, text_length=text_length)  # fmt: skip
    try:
        vae_config = wan / "vae" / "config.json"
        if vae_config.is_file():  # sizes checked from the config: loading the VAE and umT5 takes a while at Wan scale
            factors = vae_factors(json.loads(vae_config.read_text()))
            for h, w in buckets:
                check_video_size(frames, h, w, *factors)
        records = read_captions(videos, captions)
        components = WanComponents.from_folder(wan, torch_dtype=torch.bfloat16 if device != "cpu" else torch.float32)
        components.codec.vae.to(device)
        components.prompt_encoder.to(device)
        index = build_latent_cache(records, out, components, settings, videos=videos)
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error)) from None
    except KeyboardInterrupt:  # finished chunks are on disk and kept: nothing is lost
        typer.echo(f"interrupted: the chunks finished are kept in {out}; run the same command to go on", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"wrote {out / 'index.json'} ({index['num_videos']} videos, {index['num_skipped']} skipped)")
    if index["num_videos"] == 0:
        typer.echo(f"error: no video could be cached; the reasons are in {out / 'skipped.jsonl'} (too short: lower "
                   "--frames or --fps; too long a text: raise --text-length)", err=True)  # fmt: skip
        raise typer.Exit(1)


def convert_official(
    checkpoint: Path = typer.Argument(..., help="Released Uni-ViGU checkpoint (.pth / .pt / .safetensors)."),
    out_dir: Path = typer.Argument(..., help="Where to write our transformer folder (config.json + safetensors), "
                                   "or with --wan a whole pipeline folder (absent or empty, unless --overwrite)."),  # fmt: skip
    attention_head_dim: int | None = typer.Option(None, min=6, help="Head size (not readable from the shapes; "
                                                  "default: the --wan transformer's, else Wan2.1's 128)."),
    vocab_size: int | None = typer.Option(None, help="Text vocabulary size (default: the --wan tokenizer's, else "
                                          "vocab_embed rows; one more row means a mask token)."),  # fmt: skip
    wan: Path | None = typer.Option(None, help="Wan2.1 diffusers folder: write a pipeline folder with its VAE, umT5 "
                                    "and tokenizer, ready for `univigu generate --model OUT_DIR` and init_from."),  # fmt: skip
    overwrite: bool = typer.Option(False, help="Replace OUT_DIR if it exists (it is replaced whole, only once the "
                                   "conversion is written)."),  # fmt: skip
) -> None:
    """Map an official Uni-ViGU state dict to a UniViGUTransformer folder (with --wan: a whole pipeline folder);
    any unmapped key is an error."""
    from univigu.models.convert import ConversionError, convert_official_state_dict, load_official_state_dict
    from univigu.models.wan import is_wan_folder

    if not checkpoint.is_file():
        raise typer.BadParameter(f"no such file: {checkpoint}", param_hint="CHECKPOINT")
    if wan is not None and not is_wan_folder(wan):
        raise typer.BadParameter(f"{wan} is not a Wan2.1 diffusers folder (transformer/, vae/, text_encoder/, "
                                 "tokenizer/)", param_hint="--wan")  # fmt: skip
    # --overwrite replaces OUT_DIR whole (as `export` refuses for its SOURCE): OUT_DIR may not be an input, hold one,
    # or lie inside the --wan folder
    out = out_dir.resolve()
    for what, path in (("CHECKPOINT", checkpoint), *([("the --wan folder", wan)] if wan is not None else [])):
        if out == path.resolve():
            raise typer.BadParameter(f"is {what} itself: it would be replaced", param_hint="OUT_DIR")
        if out in path.resolve().parents:
            raise typer.BadParameter(f"{out_dir} contains {what} ({path}), which replacing it would delete; name a "
                                     "folder outside it", param_hint="OUT_DIR")  # fmt: skip
    if wan is not None and wan.resolve() in out.parents:
        raise typer.BadParameter(f"{out_dir} is inside the --wan folder ({wan}); name a folder outside it",
                                 param_hint="OUT_DIR")  # fmt: skip
    refuse_existing(out_dir, overwrite, "OUT_DIR")
    if wan is not None and vocab_size is None:
        from univigu.data.tokenizer import load_tokenizer

        vocab_size = len(load_tokenizer(wan / "tokenizer"))
    if attention_head_dim is None and wan is not None:  # a default: the checkpoint's transformer replaces Wan's
        try:
            attention_head_dim = json.loads((wan / "transformer" / "config.json").read_text()).get("attention_head_dim")
        except (OSError, ValueError) as error:
            raise typer.BadParameter(f"cannot read its transformer/config.json: {error}", param_hint="--wan") from error
    attention_head_dim = attention_head_dim or 128
    guessed_vocabulary = vocab_size is None
    try:
        model, report = convert_official_state_dict(load_official_state_dict(checkpoint), attention_head_dim,
                                                    vocab_size)  # fmt: skip
    except ConversionError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"mapped {len(report.mapped)} tensors; dropped {len(report.dropped)} (recomputed buffers): "
               f"{report.dropped}")  # fmt: skip
    typer.echo(f"config: {report.config}")
    if guessed_vocabulary:  # the embedding's rows are the vocabulary, or the vocabulary and a mask token
        n = report.config["text_vocab_size"]
        typer.echo(f"warning: the text vocabulary was read as vocab_embed's {n} rows, with no mask row; if the "
                   f"model's tokenizer has {n - 1} tokens (the last row a mask token), convert with --vocab-size "
                   f"{n - 1}, or with --wan (its tokenizer settles it)", err=True)  # fmt: skip
    # nothing of an older folder (a pipeline's transformer/, VAE) stays beside the new weights to be loaded
    from univigu.training.checkpoint import write_replacing

    save = model.save_pretrained
    if wan is not None:
        from univigu.pipelines import UniViGUPipeline

        # as the released script samples: captions with an all-zero condition, T2V guidance keeps the prompt tokens,
        # joint generation re-samples the text by its linear rule (docs/METHOD.md section 4)
        try:
            save = UniViGUPipeline.from_wan(wan, transformer=model, caption_condition="zeros", guidance_text="prompt",
                                            text_update="linear-resample").save_pretrained  # fmt: skip
        except ValueError as error:  # the checkpoint's sizes against the folder's VAE and umT5: nothing written
            typer.echo(f"error: {checkpoint} does not fit the --wan folder {wan}: {error}", err=True)
            raise typer.Exit(1) from None
    make_dir(out_dir.parent)
    write_replacing(out_dir, save, "convert")
    typer.echo(f"wrote {out_dir}")
