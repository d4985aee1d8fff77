"""Video folders: captions, decoding to clips, and the latent cache over broken files (all skipped, listed)."""

import json
import os
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from univigu.cli import app
from cli_text import said
from univigu.data.video_folder import VideoReadError, load_clip, read_captions
from univigu.data.video_io import write_video
from fsdp_on_cpu import launch
from wan_fixture import FRAMES, HEIGHT, WIDTH, build_wan_folder

runner = CliRunner()
WAN_CONFIGS = Path(__file__).resolve().parents[1] / "univigu" / "configs" / "wan"


def _moving(frames: int, height: int, width: int) -> np.ndarray:
    """A bright bar moving right: frame i has its bar at column i (so the frame index is readable)."""
    video = np.zeros((frames, height, width, 3), dtype=np.uint8)
    for i in range(frames):
        video[i, :, (2 * i) % width] = 255
    return video


def _write_gray(path, frames: int, size: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "gray"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size), 20 * i, dtype=np.uint8), format="gray")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """Two good wide clips, one tall clip, and five bad files, with a JSONL of captions."""
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "good0.mp4", _moving(12, 24, 32), fps=8)
    write_video(root / "good1.mp4", _moving(12, 24, 40), fps=8)
    write_video(root / "tall.mp4", _moving(12, 40, 24), fps=8)
    _write_gray(root / "gray.mkv", 12, 24)
    (root / "corrupt.mp4").write_bytes(b"this is not a video at all" * 10)
    whole = (root / "good0.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    write_video(root / "short.mp4", _moving(2, 24, 32), fps=8)  # 2 frames: too few for 5
    from PIL import Image

    Image.new("RGB", (1, 1), (255, 0, 0)).save(root / "dot.gif", save_all=True,
                                               append_images=[Image.new("RGB", (1, 1))] * 6, duration=125)  # fmt: skip
    rows = [("good0.mp4", "a bar moves right", "a white bar moves right on black"), ("good1.mp4", "a bar", ""),
            ("tall.mp4", "", "a tall clip"), ("gray.mkv", "a gray clip", "it gets brighter"),
            ("corrupt.mp4", "x", "x"), ("truncated.mp4", "x", "x"), ("short.mp4", "x", "x"), ("dot.gif", "x", "x")]  # fmt: skip
    (root / "captions.jsonl").write_text("".join(json.dumps({"video": v, "prompt": p, "caption": c}) + "\n"
                                                 for v, p, c in rows))  # fmt: skip
    return root


def test_captions_and_clips(video_dir):
    records = read_captions(video_dir)
    assert [r.path.name for r in records][:3] == ["good0.mp4", "good1.mp4", "tall.mp4"]
    assert records[1].caption == "a bar" and records[2].prompt == "a tall clip"  # a missing text takes the other
    clip = load_clip(video_dir / "good0.mp4", frames=5, height=16, width=16, fps=4)
    assert clip.shape == (5, 16, 16, 3) and clip.dtype == torch.uint8
    # 4 fps from an 8 fps file: every other frame; the bar of frame i sits at column 2i of 32, cropped 4..28
    bars = [int(f[..., 0].float().mean(0).argmax()) for f in load_clip(video_dir / "good0.mp4", 5, 24, 32, fps=4)]
    assert bars == [0, 4, 8, 12, 16]
    gray = load_clip(video_dir / "gray.mkv", 5, 16, 16, fps=None)
    assert gray.shape == (5, 16, 16, 3) and torch.equal(gray[..., 0], gray[..., 2])


@pytest.mark.parametrize("name, message", [("corrupt.mp4", "cannot decode|corrupt"), ("truncated.mp4", "trunc|corrupt"),
                                           ("short.mp4", "too short"), ("dot.gif", "1x1 pixels"),
                                           ("missing.mp4", "not found")])  # fmt: skip
def test_bad_videos_say_why(video_dir, name, message):
    with pytest.raises(VideoReadError, match=message):
        load_clip(video_dir / name, frames=5, height=16, width=16, fps=4)


def test_bad_captions_file(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"video": "a.mp4"}) + "\n")
    with pytest.raises(ValueError, match=r"needs a video path \(field video, path or file\) and a prompt or caption"):
        read_captions(tmp_path)
    (tmp_path / "c.jsonl").unlink()
    (tmp_path / "c.csv").write_text("filename,prompt\na.mp4,a red bar\n")  # a header naming no video field
    with pytest.raises(ValueError, match=r"record 1 needs a video path \(field video, path or file\)"):
        read_captions(tmp_path)


def test_captions_with_a_byte_order_mark_read(tmp_path):
    """Excel writes CSV (and some editors JSONL) as UTF-8 with a byte-order mark: it is not part of the first name."""
    (tmp_path / "c.csv").write_bytes("video,prompt,caption\na.mp4,a café,\n".encode("utf-8-sig"))
    assert [(r.path.name, r.prompt, r.caption) for r in read_captions(tmp_path)] == [("a.mp4", "a café", "a café")]
    (tmp_path / "c.csv").unlink()
    (tmp_path / "c.jsonl").write_bytes((json.dumps({"video": "b.mp4", "prompt": "a dog"}) + "\n").encode("utf-8-sig"))
    assert [r.prompt for r in read_captions(tmp_path)] == ["a dog"]


@pytest.mark.parametrize("value", [5, ["a dog"], {"text": "a dog"}, True])
@pytest.mark.parametrize("field", ["prompt", "caption", "video"])
def test_a_caption_field_that_is_not_text_names_file_line_and_field(tmp_path, field, value):
    """A JSONL value that is not a string is an error naming the file, its line (blank lines counted) and the
    field, as other bad records are; null stands for a missing value, as an empty CSV cell does."""
    rows = [{"video": "a.mp4", "prompt": "a cat", "caption": None}, {"video": "b.mp4", "prompt": "a dog"}]
    rows[1][field] = value
    (tmp_path / "c.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=rf"c\.jsonl line 3: {field} is {type(value).__name__}, expected text"):
        read_captions(tmp_path)


def test_a_jsonl_line_that_is_not_a_record_says_where(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"video": "a.mp4", "prompt": "a cat"}) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"c\.jsonl line 2: expected a JSON object"):
        read_captions(tmp_path)
    (tmp_path / "c.jsonl").write_text('{"video": "a.mp4", "prompt": "a cat"\n')
    with pytest.raises(ValueError, match=r"c\.jsonl line 1 is not valid JSON"):
        read_captions(tmp_path)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return build_wan_folder(tmp_path_factory.mktemp("wan") / "Wan2.1-tiny")


def test_cache_latents_skips_bad_videos_resumes_and_trains(video_dir, wan, tmp_path):
    out = tmp_path / "cache"
    args = ["cache-latents", str(wan), str(video_dir), str(out), "--frames", str(FRAMES), "--fps", "4",
            "--size", f"{HEIGHT}x{WIDTH}", "--size", "24x16", "--shard-size", "3", "--dtype", "float32"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    assert index["num_videos"] == 4 and index["num_skipped"] == 4
    assert {b: sum(v["counts"]) for b, v in index["buckets"].items()} == {"16x16": 3, "24x16": 1}  # tall -> 24x16
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(s["video"].rsplit("/", 1)[1] for s in skipped) == ["corrupt.mp4", "dot.gif", "short.mp4",
                                                                      "truncated.mp4"]  # fmt: skip
    assert result.output.count("skipped:") == 4 and "1x1 pixels" in result.output
    notes = [(n["video"].rsplit("/", 1)[1], n["note"]) for n in index["notes"]]
    assert [video for video, note in notes if note.startswith("grayscale")] == ["gray.mkv"]
    assert "gray.mkv: grayscale (gray" in result.output  # printed too, as README says
    # words umT5's vocabulary (the fixture's, tiny) lacks: cached as <unk>, and said so for each video cached
    unknown = dict((video, note) for video, note in notes if note.startswith("words its tokenizer does not know"))
    assert sorted(unknown) == ["good0.mp4", "good1.mp4", "gray.mkv", "tall.mp4"]
    assert unknown["good1.mp4"] == "words its tokenizer does not know, read as <unk>: 'bar'"  # once, not per use

    from univigu.data.latent_cache import LatentCacheDataset
    from univigu.models.wan import WanComponents

    with pytest.raises(ValueError, match="holds several buckets: name one"):
        LatentCacheDataset(out)
    data = LatentCacheDataset(out, "16x16")
    item = data[0]
    assert item["video"].shape == (4, 2, 4, 4) and item["prompt_states"].shape == (512, 32)
    assert item["prompt"] == "a bar moves right" and item["caption"] == "a white bar moves right on black"
    components = WanComponents.from_folder(wan)
    clip = load_clip(video_dir / "good0.mp4", FRAMES, HEIGHT, WIDTH, fps=4)
    torch.testing.assert_close(item["video"], components.encode_video(clip[None])[0])
    states, _ = components.encode_prompts([item["prompt"]])
    torch.testing.assert_close(item["prompt_states"], states[0])

    # a rerun skips finished chunks: delete one shard's done marker, only that chunk is redone
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")}
    (out / "shards" / "chunk_00001.done.json").unlink()
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0 and "2 of 3 chunks were cached by an earlier run" in said(rerun), rerun.output
    again = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")}
    assert [n for n in stamps if again[n] != stamps[n]] == [n for n in stamps if n.startswith("chunk_00001")]
    assert json.loads((out / "index.json").read_text())["num_videos"] == 4

    # the same trainer trains the unified model on the cache: 3 steps, a pipeline with the VAE comes out
    from univigu import UniViGUPipeline
    from univigu.training.config import load_config
    from univigu.training.stages import run_stage

    stage = [
        "stage=recall", f"init_from={wan}", f"data={{kind: latent_cache, path: '{out}', bucket: 16x16}}",
        "pipeline={text_length: 8}", "text_target=caption", "train.max_steps=3", "train.batch_size=2",
        "train.log_every=1", "train.save_every=3", "train.gradient_checkpointing=true",
    ]  # fmt: skip
    with pytest.warns(UserWarning, match="1 of the 3 cached videos have their prompt as their caption"):  # good1
        final = run_stage(load_config(None, [*stage, f"train.output_dir={tmp_path / 'run'}"]))
    losses = (tmp_path / "run" / "losses.csv").read_text().splitlines()
    assert len(losses) == 4 and all(np.isfinite(float(v)) for v in losses[-1].split(",")[1:3])
    pipe = UniViGUPipeline.from_pretrained(final)
    assert (pipe.config.frames, pipe.config.height, pipe.config.width) == (FRAMES, HEIGHT, WIDTH)
    assert pipe.config.fps == 4  # the cache's --fps (from_wan's is 16): generated videos play at the trained speed
    assert pipe.text_to_video(["a bar"], num_steps=1, progress=False).videos.shape == (1, FRAMES, HEIGHT, WIDTH, 3)

    # the Wan-scale multi-GPU path: FSDP (the shipped config) on 2 processes x batch 1 trains as above
    from safetensors.torch import load_file

    (tmp_path / "stage.yaml").write_text("stage: recall\n")  # the rest as command-line overrides
    launch(["train", str(tmp_path / "stage.yaml"), *(f"--{a}" for a in stage), "--train.batch_size=1",
            f"--train.output_dir={tmp_path / 'fsdp'}"], tmp_path, mixed_precision="no")  # fmt: skip
    assert (tmp_path / "fsdp" / "checkpoints" / "step_000003" / "pytorch_model_fsdp_0").is_dir()
    weights = "transformer/diffusion_pytorch_model.safetensors"
    got, want = load_file(tmp_path / "fsdp" / "final" / weights), load_file(final / weights)
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5

    # the cache records what its latents mean; a stage from a Wan folder whose VAE differs is refused before step 1
    from univigu.data.latent_cache import CacheError
    from univigu.training.stages import build_task

    assert index["latent_space"] == components.codec.latent_space()
    other = tmp_path / "other_vae_cache"
    shutil.copytree(out, other)
    tampered = json.loads((other / "index.json").read_text())
    tampered["latent_space"]["latents_std"][0] *= 2
    (other / "index.json").write_text(json.dumps(tampered))
    moved = [a.replace(str(out), str(other)) for a in stage]
    with pytest.raises(CacheError, match="holds latents of another VAE than .*cache the videos again"):
        build_task(load_config(None, [*moved, f"train.output_dir={tmp_path / 'other_run'}"]))



def _captions(folder, rows) -> None:
    (folder / "captions.jsonl").write_text("".join(json.dumps({"video": v, "prompt": p, "caption": c}) + "\n"
                                                   for v, p, c in rows))  # fmt: skip


def test_cache_reruns_and_texts_the_text_stream_cannot_hold(video_dir, wan, tmp_path):
    """A rerun with other settings is refused (the shards would mix them); an edited captions file redoes only
    its chunk; a text longer than the text stream is skipped at cache time, and a stage with a shorter text
    stream than the cache was made for, or a bucket the cache lacks, is a usage error before any step."""
    videos, out = tmp_path / "videos", tmp_path / "cache"
    videos.mkdir()
    for name in ("good0.mp4", "good1.mp4", "tall.mp4"):
        shutil.copy(video_dir / name, videos / name)
    rows = [("good0.mp4", "a bar moves right", "a bar"), ("good1.mp4", "a bar", "a bar " * 6),
            ("tall.mp4", "a bar", "a bar")]  # fmt: skip
    _captions(videos, rows)
    args = ["cache-latents", str(wan), str(videos), str(out), "--frames", str(FRAMES), "--fps", "4", "--size",
            f"{HEIGHT}x{WIDTH}", "--shard-size", "1", "--dtype", "float32", "--text-length", "8"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    assert index["num_videos"] == 2 and "good1.mp4: caption is 12 tokens long; the text stream holds 7" in said(result)

    settings = (out / "settings.json").read_text()
    other = runner.invoke(app, [*args[:-8], "--fps", "2", *args[-6:]])
    assert other.exit_code == 2 and "fps 4.0 -> 2.0" in said(other) and "Use a new folder" in said(other)
    assert (out / "settings.json").read_text() == settings and json.loads((out / "index.json").read_text()) == index
    # the same settings with another Wan folder's VAE (another latent normalisation): the shards would mix two
    # VAEs' latents, so refused; the same folder copied elsewhere is the same VAE and resumes
    other_wan = tmp_path / "other_wan"
    shutil.copytree(wan, other_wan)
    assert runner.invoke(app, [args[0], str(other_wan), *args[2:]]).exit_code == 0  # a copy: nothing to redo
    vae_config = json.loads((other_wan / "vae" / "config.json").read_text())
    vae_config["latents_std"] = [2 * v for v in vae_config["latents_std"]]
    (other_wan / "vae" / "config.json").write_text(json.dumps(vae_config))
    mixed = runner.invoke(app, [args[0], str(other_wan), *args[2:]])
    assert mixed.exit_code == 2 and "another Wan folder's vae (its files differ" in said(mixed), said(mixed)
    assert json.loads((out / "index.json").read_text()) == index

    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")}
    _captions(videos, [("good0.mp4", "a bar moves left", "a bar"), *rows[1:]])
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "chunk 0: its records changed" in result.output
    again = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")}
    assert [n for n in stamps if again[n] != stamps[n]] == ["chunk_00000_16x16.safetensors"]
    from univigu.data.latent_cache import LatentCacheDataset

    assert LatentCacheDataset(out)[0]["prompt"] == "a bar moves left"

    (tmp_path / "stage.yaml").write_text(f"stage: recall\ninit_from: {wan}\ntext_target: caption\n"
                                         f"data: {{kind: latent_cache, path: '{out}'}}\n")  # fmt: skip
    train = ["train", str(tmp_path / "stage.yaml"), "--train.max_steps=1", f"--train.output_dir={tmp_path / 'run'}",
             "--train.batch_size=2"]  # fmt: skip
    result = runner.invoke(app, [*train, "--pipeline.text_length=4"])
    assert result.exit_code == 2 and "Raise pipeline.text_length" in said(result), result.output
    result = runner.invoke(app, [*train, "--data.bucket=32x32"])
    assert result.exit_code == 2 and "has no bucket '32x32'" in said(result), result.output
    result = runner.invoke(app, [*train, "--train.batch_size=3"])  # a step would take more videos than it has
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"bucket '16x16' of {out} holds 2 videos, fewer than one step takes (train.batch_size 3 x 1" in said(result)
    assert not (tmp_path / "run").exists()  # nothing written

    # the shipped Wan-scale stage configs, pointed at this cache and tiny folder: recall, then refine
    from univigu import UniViGUPipeline

    for stage, init in (("recall", wan), ("refine", tmp_path / "recall" / "final")):
        result = runner.invoke(app, ["train", str(WAN_CONFIGS / f"{stage}.yaml"), f"--init_from={init}",
                                     f"--data.path={out}", "--data.bucket=16x16", "--pipeline.text_length=8",
                                     "--train.max_steps=1", "--train.grad_accum=1",
                                     f"--train.output_dir={tmp_path / stage}"])  # fmt: skip
        assert result.exit_code == 0, result.output
    assert UniViGUPipeline.from_pretrained(tmp_path / "refine" / "final").config.caption_steps == 50

    # Knowledge Recall from the Wan folder builds the unified model with the stage's options (they were ignored:
    # the folder loaded as an already-unified pipeline, without the mask row its text source needs)
    from univigu.data.tokenizer import load_tokenizer
    from univigu.models.wan import load_wan_transformer
    from univigu.training.config import load_config
    from univigu.training.stages import build_task

    recall = ["stage=recall", f"init_from={wan}", f"data={{kind: latent_cache, path: '{out}'}}",
              "pipeline={text_length: 8}"]  # fmt: skip
    wan_q = load_wan_transformer(wan / "transformer").blocks[0].attn1.to_q.weight
    model = build_task(load_config(None, [*recall, "text_ffn=shared", "flow.text_source=mask"]))[0].transformer
    assert model.config.text_ffn == "shared" and model.blocks[0].ffn_t is None
    assert model.config.text_mask_row and model.text_embedding.num_embeddings == len(load_tokenizer(wan / "tokenizer")) + 1
    torch.testing.assert_close(model.blocks[0].attn1.to_q.weight, wan_q)
    model = build_task(load_config(None, [*recall, "init=scratch"]))[0].transformer
    assert model.blocks[0].ffn_t is not None and not torch.equal(model.blocks[0].attn1.to_q.weight, wan_q)

    nothing = runner.invoke(app, [*args[:3], str(tmp_path / "empty"), *args[4:-1], "2"])
    assert nothing.exit_code == 1 and "no video could be cached" in said(nothing)
    # a captions file elsewhere (--captions; CSV), its paths read in VIDEOS
    (tmp_path / "captions.csv").write_text("video,prompt,caption\ngood0.mp4,a bar,a bar moves\n")
    from_csv = runner.invoke(app, [*args[:3], str(tmp_path / "csv"), "--captions", str(tmp_path / "captions.csv"),
                                   *args[4:], "--batch-size", "1"])  # fmt: skip
    assert from_csv.exit_code == 0, from_csv.output
    assert LatentCacheDataset(tmp_path / "csv")[0]["caption"] == "a bar moves"

    # a folder with no finished chunk (a run stopped before its first) takes other settings
    shutil.rmtree(tmp_path / "empty" / "shards")
    assert runner.invoke(app, [*args[:3], str(tmp_path / "empty"), *args[4:]]).exit_code == 0


def test_read_captions_of_a_missing_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="video folder does not exist.*nowhere"):
        read_captions(tmp_path / "nowhere")


@pytest.mark.parametrize("height, width", [(16, 48), (48, 16)])
def test_load_clip_crops_the_centre(tmp_path, height, width):
    """A wide (tall) clip loaded square keeps its middle columns (rows): a mark at source index 24 of 48 lands
    at index 8 of 16 (crop offset 16), not at 24 (cropped away when the crop starts at 0)."""
    video = np.zeros((2, height, width, 3), dtype=np.uint8)
    if width > height:
        video[:, :, 24] = 255
    else:
        video[:, 24, :] = 255
    video[1, 0, 0] = 128  # frames differ: the GIF writer keeps both
    path = write_video(tmp_path / "mark.gif", video, fps=8)
    clip = load_clip(path, 2, 16, 16).numpy().astype(int)  # no resize needed: 16 already covers
    assert clip.shape == (2, 16, 16, 3)
    lines = clip[0].mean(axis=(0, 2)) if width > height else clip[0].mean(axis=(1, 2))  # per column / per row
    assert lines.argmax() == 8 and lines[8] > 200 and np.delete(lines, 8).max() < 20


def test_cache_edge_cases_text_limit_batch_size_captions_and_stale_shards(video_dir, wan, tmp_path):
    """A caption of exactly text_length - 1 tokens is cached, one token more is skipped (listed once, also after a
    rerun); --batch-size is not a content setting (a rerun with another one resumes); a chunk whose caption alone
    changed is encoded again; a chunk redone with nothing left to cache leaves no stale shard behind."""
    from univigu.data.latent_cache import LatentCacheDataset

    videos, out = tmp_path / "videos", tmp_path / "cache"
    videos.mkdir()
    for name in ("good0.mp4", "good1.mp4"):
        shutil.copy(video_dir / name, videos / name)
    seven, eight = "a red cat runs left right up", "a red cat runs left right up down"
    _captions(videos, [("good0.mp4", "a red cat", seven), ("good1.mp4", "a dog", eight)])
    args = ["cache-latents", str(wan), str(videos), str(out), "--frames", str(FRAMES), "--fps", "4", "--size",
            f"{HEIGHT}x{WIDTH}", "--shard-size", "1", "--dtype", "float32", "--text-length", "8"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "good1.mp4: caption is 8 tokens long; the text stream holds 7" in said(result)
    index = json.loads((out / "index.json").read_text())
    assert (index["num_videos"], index["num_skipped"]) == (1, 1)
    assert LatentCacheDataset(out)[0]["caption"] == seven
    # a stage training no caption (recall) checks only the prompts against its text stream
    from univigu.data.latent_cache import CacheError
    from univigu.data.tokenizer import TextCanvas, load_tokenizer

    canvas = TextCanvas(load_tokenizer(wan / "tokenizer"), 5)  # holds the 3-token prompt, not the 7-token caption
    LatentCacheDataset(out).check_texts(canvas, ("prompt",))
    with pytest.raises(CacheError, match="caption is 7 tokens long; the text stream holds 4"):
        LatentCacheDataset(out).check_texts(canvas)

    again = runner.invoke(app, [*args, "--batch-size", "2"])
    assert again.exit_code == 0 and "records changed" not in again.output, again.output
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 1

    _captions(videos, [("good0.mp4", "a red cat", "a blue dog"), ("good1.mp4", "a dog", "a dog runs")])
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "chunk 0: its records changed" in result.output, result.output
    data = LatentCacheDataset(out)
    assert [data[i]["caption"] for i in range(len(data))] == ["a blue dog", "a dog runs"]
    assert (out / "shards" / "chunk_00000_16x16.safetensors").exists()

    _captions(videos, [("good0.mp4", "a red cat", eight), ("good1.mp4", "a dog", "a dog runs")])
    assert runner.invoke(app, args).exit_code == 0
    assert not (out / "shards" / "chunk_00000_16x16.safetensors").exists()
    assert [LatentCacheDataset(out)[0]["caption"]] == ["a dog runs"]
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 1


def test_a_prompt_longer_than_umt5_reads_is_skipped_not_truncated(video_dir, wan, tmp_path):
    """umT5 reads 512 tokens (end token included): a longer prompt is skipped and listed, as `generate` refuses it,
    though the text stream (--text-length) would hold it; one of exactly 511 tokens is cached whole."""
    from univigu.data.latent_cache import LatentCacheDataset

    videos, out = tmp_path / "videos", tmp_path / "cache"
    videos.mkdir()
    for name in ("good0.mp4", "good1.mp4"):
        shutil.copy(video_dir / name, videos / name)
    fits, too_long = " ".join(["a", "dog"] * 255 + ["a"]), "a dog " * 256  # 511 and 512 tokens
    _captions(videos, [("good0.mp4", fits, "a dog"), ("good1.mp4", too_long, "a cat")])
    result = runner.invoke(app, ["cache-latents", str(wan), str(videos), str(out), "--frames", str(FRAMES), "--fps",
                                 "4", "--size", f"{HEIGHT}x{WIDTH}", "--dtype", "float32", "--text-length", "600"])
    assert result.exit_code == 0, result.output
    assert "good1.mp4: prompt is 512 tokens long; umT5 reads 511 (prompt length 512, end token included)" in said(result)
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [Path(s["video"]).name for s in skipped] == ["good1.mp4"] and "umT5 reads 511" in skipped[0]["reason"]
    data = LatentCacheDataset(out)
    assert len(data) == 1 and data[0]["prompt"] == fits
    assert int((data[0]["prompt_states"].abs().sum(-1) > 0).sum()) == 512  # the whole prompt and its end token


def test_a_rerun_naming_the_videos_folder_otherwise_resumes(video_dir, wan, tmp_path, monkeypatch):
    """A chunk's digest holds each video's path in the videos folder, not the folder as typed: a rerun naming it
    absolute after relative, or the same folder moved, re-encodes nothing. A chunk cached before (its digest of the
    paths as typed then) still resumes when the folder is named as then, and says why it is encoded again when not."""
    import hashlib

    monkeypatch.chdir(tmp_path)
    videos = tmp_path / "videos"
    videos.mkdir()
    rows = [("good0.mp4", "a red cat", "a red cat runs"), ("good1.mp4", "a dog", "a dog runs")]
    for name, *_ in rows:
        shutil.copy(video_dir / name, videos / name)
    _captions(videos, rows)
    shards = tmp_path / "cache" / "shards"

    def cache(folder):
        result = runner.invoke(app, ["cache-latents", str(wan), str(folder), "cache", "--frames", str(FRAMES), "--fps",
                                     "4", "--size", f"{HEIGHT}x{WIDTH}", "--shard-size", "1", "--dtype", "float32"])
        assert result.exit_code == 0, result.output
        return result.output, {p.name: p.stat().st_mtime_ns for p in shards.glob("*.safetensors")}

    _, stamps = cache("videos")
    assert len(stamps) == 2
    from univigu.data.latent_cache import _EarlierLatents

    read, rows_of = [], _EarlierLatents._rows  # shard headers read (for reuse): none while every chunk is kept
    monkeypatch.setattr(_EarlierLatents, "_rows", staticmethod(lambda file: read.append(file) or rows_of(file)))
    for folder in (videos, Path("videos/../videos")):
        output, again = cache(folder)
        assert "records changed" not in output and again == stamps and read == []
    shutil.move(videos, tmp_path / "moved")
    output, again = cache(tmp_path / "moved")
    assert "records changed" not in output and again == stamps

    for chunk, (name, prompt, caption) in enumerate(rows):  # done files as written before: the paths as typed
        done = json.loads((shards / f"chunk_{chunk:05d}.done.json").read_text())
        text = json.dumps([[str(Path("moved") / name), prompt, caption]])
        done = {k: v for k, v in done.items() if k in ("shards", "skipped", "notes")}
        done["records"] = hashlib.sha256(text.encode()).hexdigest()[:16]
        (shards / f"chunk_{chunk:05d}.done.json").write_text(json.dumps(done))
    legacy = {n: (shards / n).read_text() for n in ("chunk_00000.done.json", "chunk_00001.done.json")}
    output, again = cache("moved")
    assert "records changed" not in output and again == stamps
    output, again = cache(tmp_path / "moved")  # resumed chunks keep the new digest: any naming from now on
    assert "records changed" not in output and again == stamps
    (shards / "chunk_00001.done.json").write_text(legacy["chunk_00001.done.json"])
    output, again = cache(tmp_path / "moved")
    assert "chunk 1: its records changed since it was cached (or the videos folder is named otherwise" in output
    assert [n for n in stamps if again[n] != stamps[n]] == ["chunk_00001_16x16.safetensors"]
    # a video replaced under the same name (another size) is encoded again, and only its chunk
    stamps = again
    shutil.copy(video_dir / "good1.mp4", tmp_path / "moved" / "good0.mp4")
    output, again = cache(tmp_path / "moved")
    assert "chunk 0: its records changed" in output
    assert [n for n in stamps if again[n] != stamps[n]] == ["chunk_00000_16x16.safetensors"]


def test_a_chunk_whose_shards_are_gone_or_whose_redo_was_cut_is_encoded_again(video_dir, wan, tmp_path, monkeypatch):
    """A chunk is trusted only while its shard files are there; a chunk being encoded again loses its done record
    and the index first, so a run cut mid-redo (then the change undone) encodes it again instead of indexing a
    deleted shard, and training meanwhile is told the cache is unfinished."""
    from univigu.data import latent_cache
    from univigu.data.latent_cache import LatentCacheDataset

    videos, out = tmp_path / "videos", tmp_path / "cache"
    videos.mkdir()
    rows = [("good0.mp4", "a red cat", "a red cat runs"), ("good1.mp4", "a dog", "a dog runs")]
    for name, *_ in rows:
        shutil.copy(video_dir / name, videos / name)
    _captions(videos, rows)
    args = ["cache-latents", str(wan), str(videos), str(out), "--frames", str(FRAMES), "--fps", "4", "--size",
            f"{HEIGHT}x{WIDTH}", "--shard-size", "1", "--dtype", "float32"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    shard = out / "shards" / "chunk_00001_16x16.safetensors"
    reference = shard.read_bytes()

    shard.unlink()
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "chunk 1: its shard files ['chunk_00001_16x16.safetensors'] are gone" in \
        result.output, result.output  # fmt: skip
    assert shard.read_bytes() == reference and len(LatentCacheDataset(out)) == 2

    def cut(tensors, path, metadata):  # the run killed as it writes the chunk's new shard
        raise KeyboardInterrupt

    _captions(videos, [rows[0], ("good1.mp4", "a dog", "a dog runs fast")])
    _as_written_by_an_older_univigu(shard)
    monkeypatch.setattr(latent_cache, "_atomic_save", cut)
    interrupted = runner.invoke(app, args)
    assert interrupted.exit_code == 130 and "run the same command to go on" in said(interrupted), interrupted.output
    monkeypatch.undo()
    assert not (out / "shards" / "chunk_00001.done.json").exists() and not shard.exists()
    with pytest.raises(FileNotFoundError, match="run has not finished"):
        LatentCacheDataset(out)
    _captions(videos, rows)  # the change undone: the chunk is not trusted on its old record
    redone = runner.invoke(app, args)  # the shard the cut run moved aside was an older univigu's: said so
    assert redone.exit_code == 0 and "1 video(s) in the shards replaced were cached by an older univigu" in \
        said(redone), redone.output  # fmt: skip
    data = LatentCacheDataset(out)
    assert shard.read_bytes() == reference and [data[i]["caption"] for i in range(2)] == [r[2] for r in rows]


def _as_written_by_an_older_univigu(shard: Path) -> None:
    """Strip a shard's records to what univigu wrote before latents were reused (video, prompt, caption)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(shard, "pt") as f:
        records = [{k: r[k] for k in ("video", "prompt", "caption")} for r in json.loads(f.metadata()["records"])]
    save_file(load_file(shard), shard, metadata={"records": json.dumps(records)})


@pytest.fixture
def encoded(monkeypatch) -> list[int]:
    """The batch sizes the Wan VAE encodes (each call appends one)."""
    from univigu.models.wan import WanComponents

    calls, encode = [], WanComponents.encode_video
    monkeypatch.setattr(WanComponents, "encode_video", lambda self, video: calls.append(len(video)) or
                        encode(self, video))  # fmt: skip
    return calls


def test_a_row_inserted_above_redoes_the_chunks_below_without_the_vae(video_dir, wan, encoded, tmp_path, monkeypatch):
    """Chunks are cut by row order, so a row inserted at the top shifts every chunk: they are written again, but
    each video encoded before takes its latents from the earlier shards (the VAE runs for the new video alone); a
    video replaced under its name, or a cache begun afresh with other settings, is encoded again."""
    from univigu.data.latent_cache import LatentCacheDataset

    videos, out = tmp_path / "videos", tmp_path / "cache"
    videos.mkdir()
    rows = [("good0.mp4", "a red cat", "a red cat runs"), ("good1.mp4", "a dog", "a dog runs"),
            ("tall.mp4", "a bar", "a tall bar")]  # fmt: skip
    for name, *_ in rows:
        shutil.copy(video_dir / name, videos / name)
    _captions(videos, rows[1:])
    args = ["cache-latents", str(wan), str(videos), str(out), "--frames", str(FRAMES), "--fps", "4", "--size",
            f"{HEIGHT}x{WIDTH}", "--shard-size", "1", "--dtype", "bfloat16"]  # fmt: skip

    def latents() -> dict[str, torch.Tensor]:
        data = LatentCacheDataset(out)
        return {record.path.name: data[i]["video"] for i, record in enumerate(data.records())}

    first = runner.invoke(app, args)
    assert first.exit_code == 0 and sum(encoded) == 2, first.output
    before = latents()
    _captions(videos, rows)  # good0 inserted above: both chunks change
    encoded.clear()
    from univigu.data import latent_cache

    save, stale = latent_cache._atomic_save, []  # the replaced shards kept aside as each new shard is written
    monkeypatch.setattr(latent_cache, "_atomic_save", lambda tensors, path, metadata: stale.append(
        len(list((out / "shards" / "stale").glob("*")))) or save(tensors, path, metadata))  # fmt: skip
    monkeypatch.setattr(latent_cache, "REDO_LINES", 1)  # each reason said once, the rest counted at the end
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and sum(encoded) == 1, result.output
    assert stale == [1, 2, 1]  # old chunk 0 (good1) deleted once no row still to come names good1
    assert "2 video(s) of the chunks encoded again were encoded by an earlier run" in said(result)
    assert "chunk 0: its records changed since it was cached; encoding it again" in said(result)
    assert "chunk 1 and further chunks encoded again because their records changed: counted at the end" in said(result)
    assert "1 more chunk(s) encoded again because their records changed (2 in all)" in said(result)
    assert "older univigu" not in said(result)
    after = latents()
    assert list(after) == ["good0.mp4", "good1.mp4", "tall.mp4"] and not (out / "shards" / "stale").exists()
    for name in before:
        assert torch.equal(after[name], before[name])
    # good1 replaced by another clip under its name: its size differs, it is encoded again
    shutil.copy(video_dir / "good0.mp4", videos / "good1.mp4")
    _captions(videos, [rows[0], rows[2], rows[1]])
    encoded.clear()
    assert runner.invoke(app, args).exit_code == 0 and sum(encoded) == 1
    assert torch.equal(latents()["good1.mp4"], after["good0.mp4"])
    # a shard damaged on disk: its video is encoded again, the run goes on
    _captions(videos, rows[1:])
    (out / "shards" / "chunk_00002_16x16.safetensors").write_bytes(b"not a shard")  # good1's, now row 0's
    encoded.clear()
    assert runner.invoke(app, args).exit_code == 0 and sum(encoded) == 1
    # a shard an older univigu wrote (no records to reuse by): its video is encoded again, and the run says why
    _as_written_by_an_older_univigu(out / "shards" / "chunk_00000_16x16.safetensors")  # good1's
    _captions(videos, [rows[2], rows[1]])  # both chunks change: tall's latents are reused, good1's cannot be
    encoded.clear()
    older = runner.invoke(app, args)
    assert older.exit_code == 0 and sum(encoded) == 1, older.output
    assert "1 video(s) in the shards replaced were cached by an older univigu" in said(older), older.output
    # begun afresh (no finished chunk) with other settings: the shards left behind are not taken
    for done in (out / "shards").glob("*.done.json"):
        done.unlink()
    encoded.clear()
    assert runner.invoke(app, [*args, "--dtype", "float32"]).exit_code == 0 and sum(encoded) == 2


def test_shards_a_cut_run_left_aside_are_freed_from_the_first_chunk(tmp_path):
    """Headers are read lazily, but a stale shard no row still needs goes before the first chunk is written."""
    from collections import Counter

    from safetensors.torch import save_file

    from univigu.data.latent_cache import _EarlierLatents

    shards = tmp_path / "shards"
    (shards / "stale").mkdir(parents=True)
    stale = shards / "stale" / "123_chunk_00000_16x16.safetensors"
    save_file({"latents": torch.zeros(1, 4, 2, 2, 2)}, stale,
              {"records": json.dumps([{"key": ["gone.mp4", 1], "sample": "s", "made_with": "m"}])})  # fmt: skip
    _EarlierLatents(shards, "m").free(Counter({json.dumps(["other.mp4", 1]): 1}))
    assert not stale.exists()


def _write_raw(path: Path, seed: int) -> None:
    """Uncompressed AVI (24 x 40, 12 frames of noise): every such file has the same size in bytes."""
    frames = np.random.default_rng(seed).integers(0, 255, (12, 24, 40, 3), dtype=np.uint8)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("rawvideo", rate=8)
        stream.width, stream.height, stream.pix_fmt = 40, 24, "rgb24"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_a_video_replaced_by_one_of_the_same_size_is_encoded_again(wan, encoded, tmp_path):
    """Latents are reused by path, size and a digest of the file's first and last MiB: another video of the same
    size under the same name (its row edited, so its chunk is redone) is not taken for the old one; a shard
    replaced during the run is gone from shards/stale/ once no row still to come names one of its videos."""
    from univigu.data.latent_cache import LatentCacheDataset

    videos, out = tmp_path / "videos", tmp_path / "cache"
    videos.mkdir()
    _write_raw(videos / "a.avi", seed=0)
    _captions(videos, [("a.avi", "a thing", "a thing moves")])
    args = ["cache-latents", str(wan), str(videos), str(out), "--frames", str(FRAMES), "--fps", "4", "--size",
            f"{HEIGHT}x{WIDTH}", "--dtype", "float32"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0 and sum(encoded) == 1
    before = LatentCacheDataset(out)[0]["video"]
    size = (videos / "a.avi").stat().st_size
    _write_raw(videos / "a.avi", seed=1)
    assert (videos / "a.avi").stat().st_size == size
    _captions(videos, [("a.avi", "a thing", "another thing")])
    encoded.clear()
    assert runner.invoke(app, args).exit_code == 0 and sum(encoded) == 1
    assert not torch.equal(LatentCacheDataset(out)[0]["video"], before)
    assert not (out / "shards" / "stale").exists() and not (out / "run.lock").exists()
    # another run writing the folder (its lock names a live process): refused, nothing touched
    (out / "run.lock").write_text(str(os.getppid()))
    busy = runner.invoke(app, args)
    assert busy.exit_code == 2 and "in use by another univigu cache-latents" in said(busy), busy.output


def test_videos_go_to_the_bucket_nearest_in_log_aspect_ratio():
    """log ratio: 2:1 is nearer 3.5:1 (x1.75) than 1:1 (x2), though nearer 1:1 by the difference of ratios."""
    from univigu.data.latent_cache import nearest_bucket

    assert nearest_bucket(100, 200, ((100, 100), (100, 350))) == (100, 350)
    assert nearest_bucket(200, 100, ((100, 100), (350, 100))) == (350, 100)
    assert nearest_bucket(480, 832, ((480, 832), (832, 480), (624, 624))) == (480, 832)


def test_cache_sizes_the_vae_cannot_take_fail_before_the_models_load(video_dir, wan, tmp_path, monkeypatch):
    """--frames / --size are checked against the folder's VAE config first (loading the VAE and umT5 takes minutes
    at Wan scale): a usage error naming the nearest valid size, and nothing loaded or written."""
    from univigu.models import wan as wan_module

    def no_load(*args, **kwargs):
        raise AssertionError("the models were loaded before the sizes were checked")

    monkeypatch.setattr(wan_module.WanComponents, "from_folder", no_load)
    out = tmp_path / "cache"
    for option, message in ((["--frames", "6"], "frames must be 4k+1 for the Wan VAE, got 6 (nearest valid: 5)"),
                            (["--size", "20x16"], "height must be a multiple of 8 (VAE x4, patch 2), got 20 "
                                                  "(nearest valid: 16)")):  # fmt: skip
        result = runner.invoke(app, ["cache-latents", str(wan), str(video_dir), str(out), *option])
        assert result.exit_code == 2 and message in said(result), result.output
    assert not out.exists()


def test_toy_world_data_on_a_wan_folder_is_refused_before_training(wan):
    """A toy-world stage config with a Wan2.1 init_from would fail at its first step (16-frame world videos, Wan's
    4k+1 VAE); it is refused when the inputs are checked, pointing at the latent cache."""
    from univigu.cli.train import CONFIG_DIR
    from univigu.training.config import load_config

    cfg = load_config(CONFIG_DIR / "recall.yaml", [f"init_from={wan}"])
    with pytest.raises(ValueError, match="is a Wan2.1 folder, and the stage trains on the toy world"):
        cfg.check_inputs()
    result = runner.invoke(app, ["train", str(CONFIG_DIR / "recall.yaml"), f"--init_from={wan}",
                                 "--train.output_dir=unused"])  # fmt: skip
    assert result.exit_code == 2 and "cache your videos with `univigu cache-latents`" in said(result), result.output


def test_a_variable_frame_rate_mp4_with_b_frames_is_long_enough(tmp_path):
    """Decoding stops at the first frame starting after the last target time, so the clip is long enough; with
    B-frames the stored frame durations are unreliable (a frame ends when the next starts; only the file's last
    frame's stored duration counts). Too short says the threshold it applies."""
    from fractions import Fraction

    times = [0, 0.05, 0.3, 0.35, 0.6, 0.9, 1.0, 1.1, 1.3, 1.5, 1.55, 1.6, 1.8, 2.0, 2.1, 2.2, 2.5]
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=100, options={"bf": "3"})
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for k, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 20 + 12 * k, np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    for frames in (16, 21):  # 21: the last target (2.5 s) is the last frame's start
        clip = load_clip(path, frames, 16, 16, fps=8, min_side=1)
        want = [max(k for k, t in enumerate(times) if t <= i / 8 + 1e-9) for i in range(frames)]
        assert [round((level - 20) / 12) for level in clip.float().mean((1, 2, 3)).tolist()] == want
    with pytest.raises(VideoReadError, match=r"too short: 2\.51 s decoded, 22 frames at 8 fps need more than 2\.61"):
        load_clip(path, 22, 16, 16, fps=8, min_side=1)


def test_a_text_given_once_is_named_once_when_too_long(wan):
    """A captions row with one text uses it as prompt and caption: a skip names it once, not as two texts."""
    from univigu.data.latent_cache import _too_long
    from univigu.data.tokenizer import load_tokenizer
    from univigu.data.video_folder import VideoRecord

    records = [VideoRecord(Path("one.mp4"), "a red cat runs", "a red cat runs"),
               VideoRecord(Path("two.mp4"), "a red cat runs", "a red cat runs left")]  # fmt: skip
    why = _too_long(records, load_tokenizer(wan / "tokenizer"), 4)
    assert why[0].startswith("one.mp4: prompt (also its caption) is 4 tokens long; the text stream holds 3")
    assert why[1].startswith("two.mp4: prompt is 4 tokens and caption is 5 tokens long")


def test_a_rerun_naming_the_sizes_in_another_order_says_so(tmp_path):
    """Buckets of one aspect ratio tie, and the first listed takes the video: another order is other shards."""
    from univigu.data.latent_cache import CacheError, CacheSettings, _check_settings

    (tmp_path / "shards").mkdir()
    _check_settings(tmp_path, CacheSettings(buckets=((16, 16), (16, 32))), {"vae": "a"})
    (tmp_path / "shards" / "chunk_00000.done.json").write_text("{}")  # a finished chunk: settings now bind
    _check_settings(tmp_path, CacheSettings(buckets=((16, 16), (16, 32))), {"vae": "a"})
    with pytest.raises(CacheError, match=r"buckets in another order .*: give --size in the order of the run"):
        _check_settings(tmp_path, CacheSettings(buckets=((16, 32), (16, 16))), {"vae": "a"})
    with pytest.raises(CacheError, match=r"buckets \[\[16, 16\], \[16, 32\]\] -> \[\[16, 32\]\]"):
        _check_settings(tmp_path, CacheSettings(buckets=((16, 32),)), {"vae": "a"})
    with pytest.raises(CacheError, match="another Wan folder's vae"):
        _check_settings(tmp_path, CacheSettings(buckets=((16, 16), (16, 32))), {"vae": "b"})
