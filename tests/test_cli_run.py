import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from univigu import PipelineConfig, UniViGUPipeline, World, write_video
from univigu.cli import app
from univigu.data.video_io import read_video
from cli_text import said

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoints(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    p = tiny_parts
    config = PipelineConfig(num_steps=2, caption_steps=3)
    UniViGUPipeline(p["unified"], p["prompt_encoder"], p["tokenizer"], config).save_pretrained(root / "unified")
    UniViGUPipeline(p["wan"], p["prompt_encoder"], p["tokenizer"], config).save_pretrained(root / "base")
    return root


def test_generate_writes_video_and_sidecar(checkpoints, tmp_path):
    result = runner.invoke(app, ["generate", "a red circle moves right", "--model", str(checkpoints / "unified"),
                                 "--out", str(tmp_path), "--seed", "4", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    sidecar = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert sidecar["prompt"] == "a red circle moves right" and sidecar["seed"] == 4 and sidecar["steps"] == 2
    assert {"gif", "mp4"} <= set(sidecar["files"])
    assert all(path in result.output for path in sidecar["files"].values())  # says where everything went


def test_sampling_options_reach_the_sampler(checkpoints, tmp_path):
    """--steps, --guidance, --text-update and --instruction as given (not the model's defaults) run, and the
    sidecars say so."""
    model = ["--model", str(checkpoints / "unified"), "--seed", "3"]
    result = runner.invoke(app, ["joint", "a red circle", *model, "--out", str(tmp_path / "j"), "--steps", "3",
                                 "--guidance", "2.5", "--text-update", "linear-resample"])  # fmt: skip
    assert result.exit_code == 0, result.output
    sidecar = json.loads(next((tmp_path / "j").glob("*.json")).read_text())
    assert (sidecar["steps"], sidecar["guidance_scale"], sidecar["text_update"], sidecar["seed"]) == (
        3, 2.5, "linear-resample", 3)
    video = np.ascontiguousarray(World().render(World().scenes("test", [0]))[0])
    path = write_video(tmp_path / "clip.mp4", video)
    asked = runner.invoke(app, ["caption", str(path), *model, "--out", str(tmp_path / "c"), "--steps", "2",
                                "--instruction", "what moves"])  # fmt: skip
    assert asked.exit_code == 0, asked.output
    sidecar = json.loads(next((tmp_path / "c").glob("*.json")).read_text())
    assert sidecar["instruction"] == "what moves" and sidecar["steps"] == 2


def test_video_size_options(checkpoints, tmp_path):
    """--frames / --height / --width replace the model's video size (generate, joint); one the model cannot take
    is a usage error naming the nearest size it can."""
    model = ["--model", str(checkpoints / "unified"), "--out", str(tmp_path)]
    for command in (["generate", "a red circle"], ["joint", "a red circle"]):
        result = runner.invoke(app, [*command, *model, "--frames", "8", "--height", "16", "--width", "24"])
        assert result.exit_code == 0, result.output
        gif = next(p for p in tmp_path.glob("*.gif") if command[0] != "joint" or "_joint_" in p.name)
        frames, h, w, _ = read_video(gif).shape  # written scaled up by a whole factor
        assert frames == 8 and h % 16 == 0 and w == h // 16 * 24, (h, w)
        sidecar = json.loads(gif.with_suffix(".json").read_text())
        assert (sidecar["frames"], sidecar["height"], sidecar["width"]) == (8, 16, 24)  # to sample it again
        for p in tmp_path.glob("*"):
            p.unlink()
    bad = runner.invoke(app, ["generate", "a red circle", *model, "--height", "30"])
    assert bad.exit_code == 2 and "--height" in said(bad) and "got 30 (nearest valid: 32)" in said(bad), bad.output


def test_generate_in_bfloat16(checkpoints, tmp_path):
    model = ["--model", str(checkpoints / "unified"), "--out", str(tmp_path)]
    result = runner.invoke(app, ["generate", "a red circle moves right", *model, "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert json.loads(next(tmp_path.glob("*.json")).read_text())["dtype"] == "bfloat16"
    offload = runner.invoke(app, ["joint", "a red circle", *model, "--offload", "--device", "cpu"])
    assert offload.exit_code == 2 and "CPU offload is for pipelines built from Wan" in said(offload)


def test_caption_reads_files_and_reports_bad_ones(checkpoints, tmp_path):
    world = World()
    video = np.ascontiguousarray(world.render(world.scenes("test", [0]))[0])
    path = write_video(tmp_path / "clip.mp4", video)
    result = runner.invoke(app, ["caption", str(path), "--model", str(checkpoints / "unified"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    sidecar = json.loads(next(tmp_path.glob("clip--*_caption_seed0_0.json")).read_text())
    assert sidecar["steps"] == 3  # the caption_steps it ran, not num_steps
    pipe = UniViGUPipeline.from_pretrained(checkpoints / "unified")
    assert sidecar["caption"] == pipe.video_to_text(pipe.load_video(path), seed=0, progress=False).texts[0]
    assert f"clip.mp4: {sidecar['caption']}" in result.output
    (tmp_path / "bad.mp4").write_bytes(b"junk" * 50)
    bad = runner.invoke(app, ["caption", str(tmp_path / "bad.mp4"), "--model", str(checkpoints / "unified")])
    assert bad.exit_code != 0 and "cannot decode" in bad.output


def test_a_prompt_too_long_is_a_usage_error(checkpoints, tmp_path):
    model = ["--model", str(checkpoints / "unified"), "--out", str(tmp_path)]
    long = " ".join(["red"] * 40)
    for command in (["generate", "a red circle", long], ["joint", long]):
        result = runner.invoke(app, [*command, *model])
        assert result.exit_code == 2 and "40 tokens long" in result.output, result.output
        assert "PROMPTS" in result.output and "Traceback" not in result.output
    video = World().render(World().scenes("test", [0]))[0]
    path = write_video(tmp_path / "clip.mp4", np.ascontiguousarray(video))
    result = runner.invoke(app, ["caption", str(path), "--instruction", long, *model])
    assert result.exit_code == 2 and "--instruction" in result.output and "the instruction is 40 tokens long" in \
        said(result), result.output  # fmt: skip
    assert not list(tmp_path.glob("*.gif")) and not list(tmp_path.glob("*.json"))  # nothing half-written


def test_joint_writes_video_and_caption(checkpoints, tmp_path):
    result = runner.invoke(app, ["joint", "a blue square grows", "--model", str(checkpoints / "unified"),
                                 "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "a-blue-square-grows_joint_seed0_0.json").read_text())
    expected = UniViGUPipeline.from_pretrained(checkpoints / "unified").generate("a blue square grows", seed=0,
                                                                                progress=False)  # fmt: skip
    assert sidecar["task"] == "joint" and sidecar["caption"] == expected.texts[0]
    assert f"caption: {expected.texts[0]}" in result.output
    gif = read_video(tmp_path / "a-blue-square-grows_joint_seed0_0.gif").numpy()
    # written 4x; the palette rounds by about 8 on average (another video: about 110)
    assert np.abs(gif[:, ::4, ::4].astype(int) - expected.videos[0]).mean() < 15


def test_eval_reports_every_number(checkpoints, tmp_path):
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(checkpoints / "unified"), "--n", "4", "--batch-size", "2",
                                 "--base", str(checkpoints / "base"), "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for key in ("t2v", "t2v_base", "v2t", "joint"):
        assert key in data
    assert 0 <= data["v2t"]["all"] <= 1 and "bleu4" in data["v2t"] and "cider" in data["v2t"]
    assert "T2V prompt-attribute accuracy" in result.output
    assert data["caption_steps"] != data["num_steps"]  # the model's caption_steps: said beside the video's
    assert f"n=4, {data['num_steps']} steps ({data['caption_steps']} for captions)" in result.output


def test_eval_refuses_a_base_of_another_size_before_sampling(checkpoints, tmp_path):
    """One oracle reads both models' videos: a base of another size was found only after the model's sampling."""
    other = tmp_path / "base8"
    UniViGUPipeline.from_pretrained(checkpoints / "base", frames=8).save_pretrained(other)
    result = runner.invoke(app, ["eval", str(checkpoints / "unified"), "--n", "2", "--batch-size", "2", "--base",
                                 str(other), "--json", str(tmp_path / "eval.json")])  # fmt: skip
    assert result.exit_code == 2 and "the base makes videos of 8x32x32 (frames x height x width) and the pipeline " \
        "of 16x32x32" in said(result), result.output  # fmt: skip
    assert not (tmp_path / "eval.json").exists()
    captions = runner.invoke(app, ["eval", str(checkpoints / "unified"), "--n", "1", "--batch-size", "1", "--tasks",
                                   "v2t", "--steps", "1", "--base", str(other)])  # fmt: skip
    assert captions.exit_code == 0, captions.output  # the base serves T2V only: its size does not matter


def test_eval_of_a_base_generator_leaves_out_what_it_cannot_do(checkpoints, tmp_path):
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(checkpoints / "base"), "--n", "2", "--batch-size", "2", "--split",
                                 "heldout", "--steps", "2", "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "v2t, joint left out" in said(result)
    data = json.loads(out.read_text())
    assert "t2v" in data and "v2t" not in data and data["split"] == "heldout" and data["num_steps"] == 2


def test_missing_model_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["generate", "a red circle moves right", "--model", str(tmp_path)])
    assert result.exit_code != 0 and "model_index.json" in result.output and "training run" not in said(result)
    (tmp_path / "final").mkdir()  # a training run's folder: its pipeline is named
    (tmp_path / "final" / "model_index.json").write_text("{}")
    result = runner.invoke(app, ["generate", "a red circle moves right", "--model", str(tmp_path)])
    assert result.exit_code == 2 and f"it holds a training run, whose pipeline is {tmp_path / 'final'}" in said(result)
    import univigu  # a part of a pipeline folder: the folder is named

    part = Path(univigu.DEFAULT_MODEL) / "transformer"
    result = runner.invoke(app, ["generate", "a red circle moves right", "--model", str(part)])
    assert result.exit_code == 2 and f"it is a part of the pipeline folder {part.parent}: load that" in said(result)


def test_demo_writes_the_three_tasks(checkpoints, tmp_path):
    result = runner.invoke(app, ["demo", "--model", str(checkpoints / "unified"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for stem in ("text_to_video", "video_to_text", "joint"):
        assert (tmp_path / f"{stem}.gif").exists() and (tmp_path / f"{stem}.mp4").exists()
        assert json.loads((tmp_path / f"{stem}.json").read_text())["task"] == stem
    sidecar = json.loads((tmp_path / "video_to_text.json").read_text())
    assert sidecar["true_caption"] in result.output and sidecar["caption"] in result.output
    base = runner.invoke(app, ["demo", "--model", str(checkpoints / "base"), "--out", str(tmp_path / "b")])
    assert base.exit_code == 2 and "needs a unified model" in said(base)


def test_export_half_precision(checkpoints, tmp_path):
    result = runner.invoke(app, ["export", str(checkpoints / "unified"), str(tmp_path / "half")])
    assert result.exit_code == 0, result.output
    loaded = UniViGUPipeline.from_pretrained(tmp_path / "half")
    original = UniViGUPipeline.from_pretrained(checkpoints / "unified")
    a, b = original.transformer.state_dict(), loaded.transformer.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-2, rtol=1e-3) for k in a)
    bad = runner.invoke(app, ["export", str(checkpoints / "unified"), str(tmp_path / "x"), "--dtype", "int8"])
    assert bad.exit_code == 2 and "dtype must be" in bad.output


def test_export_never_clobbers_a_folder_unasked(checkpoints, tmp_path):
    source, other = tmp_path / "source", tmp_path / "other"
    assert runner.invoke(app, ["export", str(checkpoints / "unified"), str(source), "--dtype", "float32"]).exit_code == 0
    weights = source / "transformer" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    itself = runner.invoke(app, ["export", str(source), str(source), "--overwrite"])
    assert itself.exit_code == 2 and "SOURCE itself" in said(itself) and weights.read_bytes() == before
    other.mkdir()
    (other / "README.md").write_text("another model's card")
    taken = runner.invoke(app, ["export", str(source), str(other)])
    assert taken.exit_code == 2 and "pass --overwrite" in said(taken) and (other / "README.md").exists()
    assert runner.invoke(app, ["export", str(source), str(other), "--overwrite"]).exit_code == 0
    assert not (other / "README.md").exists()  # replaced whole: no stale card beside the new weights
    assert (other / "model_index.json").exists() and not list(tmp_path.glob(".*export-tmp"))



def test_bad_options_fail_before_any_work(checkpoints, tmp_path):
    """Each is a usage error (exit 2) found before the model is loaded or a sample drawn; nothing is written."""
    model = ["--model", str(checkpoints / "unified")]
    (tmp_path / "a_file").write_text("")
    cases = [
        (["generate", "a red circle", *model, "--out", str(tmp_path / "a_file")], "cannot make the folder"),
        (["generate", "a red circle", *model, "--trajectory", str(tmp_path)], "is a folder; give a file name"),
        (["generate", "a red circle", *model, "--steps", "0"], "greater than or equal to 1"),
        (["generate", "a red circle", *model, "--guidance", "nan"], "must be a finite number"),
        (["generate", "a red circle", *model, "--device", "banana"], "'banana' is not a device"),
        (["joint", "a red circle", *model, "--text-update", "bogus"], "must be one of ['ctmc', 'linear-resample']"),
        (["joint", "a red circle", "--model", str(checkpoints / "base")], "joint generation needs a unified model"),
        (["caption", "x.mp4", "--model", str(checkpoints / "base")], "captioning needs a unified model"),
        (["demo", *model, "--prompt", " ".join(["red"] * 40)], "40 tokens long"),
        (["eval", str(checkpoints / "unified"), "--tasks", "bogus"], "subset of t2v, v2t, joint"),
        (["eval", str(checkpoints / "unified"), "--split", "bogus"], "one of ['train', 'val', 'test', 'heldout']"),
        (["eval", str(checkpoints / "base"), "--tasks", "v2t"], "it has only t2v"),
        (["eval", str(tmp_path / "none")], "Invalid value for CHECKPOINT"),
        (["eval", str(checkpoints / "unified"), "--json", str(tmp_path / "a_file" / "x.json")], "cannot make"),
        (["model", "prompt-probe", str(tmp_path / "none")], "Invalid value for CHECKPOINT"),
        (["model", "bench", "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "is not a device"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in said(result), (args, result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_caption_keeps_every_sidecar_of_same_named_files(checkpoints, tmp_path):
    """Two folders' clip.mp4, clip.mp4 and clip.gif, one clip asked with and without an instruction, each in a call
    of its own (the sample's position in the call is 0 for all): no sidecar replaces another; a rerun replaces its
    own."""
    video = np.ascontiguousarray(World().render(World().scenes("test", [0]))[0])
    paths = [write_video(tmp_path / d / "clip.mp4", video) for d in ("d1", "d2") if (tmp_path / d).mkdir() is None]
    paths.append(write_video(tmp_path / "d1" / "clip.gif", video))
    out, model = tmp_path / "out", ["--model", str(checkpoints / "unified"), "--out", str(tmp_path / "out")]
    calls = [[str(p)] for p in paths] + [[str(paths[0]), "--instruction", "the red circle"], [str(paths[0])]]
    for args in calls:
        result = runner.invoke(app, ["caption", *args, *model, "--steps", "1"])
        assert result.exit_code == 0, result.output
    sidecars = sorted(out.glob("*.json"))
    assert len(sidecars) == 4 and all(p.name.startswith("clip--") for p in sidecars)
    records = [json.loads(p.read_text()) for p in sidecars]
    asked = sorted((r["video"], r["instruction"] or "") for r in records)
    assert asked == sorted([(str(p), "") for p in paths] + [(str(paths[0]), "the red circle")])


def test_the_command_line_shows_warnings_as_messages(monkeypatch):
    """`univigu` (main) prints a warning as `warning: message`, not Python's file:line and source line."""
    import sys
    import warnings

    from univigu import cli

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # put back after the test
    monkeypatch.setattr(sys, "argv", ["univigu", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert warnings.formatwarning("clip.webm looks truncated", UserWarning, "run.py", 170) == \
        "warning: clip.webm looks truncated\n"  # fmt: skip
    assert warnings.formatwarning("old", DeprecationWarning, "x.py", 1) == "DeprecationWarning: old\n"


def test_file_names_and_sidecar_records(tmp_path):
    """slug: lower-case words joined by '-', at most 48 characters, "sample" when nothing is left, and '--' and a
    hash of the prompt after them when they lost anything; save_sample scales a small video up to about 128 pixels;
    run_record's seconds are per sample, its fps the model's."""
    from types import SimpleNamespace

    from PIL import Image

    from univigu.outputs import run_record, save_sample, slug

    assert slug("a red circle moving right") == "a-red-circle-moving-right"
    assert slug("A red circle, moving RIGHT!") == "a-red-circle-moving-right--3442b54b"
    assert slug("word " * 30) == ("word-" * 10)[:48].rstrip("-") + "--" + slug("word " * 30)[-8:]
    assert slug("")[:8] == slug("?!")[:8] == "sample--" and slug("") != slug("?!")
    video = np.zeros((2, 32, 32, 3), np.uint8)
    video[1] = 255
    files = save_sample(tmp_path, "clip", video, {"fps": 4, "files": {"trajectory": "t.html"}})
    with Image.open(files["gif"]) as gif:
        assert gif.size == (128, 128) and gif.info["duration"] == 250
    assert json.loads((tmp_path / "clip.json").read_text())["files"] == {**{k: files[k] for k in ("gif", "mp4")},
                                                                          "trajectory": "t.html"}  # fmt: skip
    pipe = SimpleNamespace(dtype=torch.bfloat16, config=SimpleNamespace(fps=16, frames=8, height=16, width=24))
    record = run_record(pipe, "m", seed=3, steps=5, load_s=1.234, sample_s=3.0, n=4)
    assert record == {"seed": 3, "steps": 5, "model": "m", "dtype": "bfloat16", "frames": 8, "height": 16,
                      "width": 24, "load_seconds": 1.23, "seconds": 0.75, "fps": 16}  # fmt: skip


def test_seed_guidance_negative_prompt_and_text_update_reach_the_sampler_itself(checkpoints, tmp_path, monkeypatch):
    """Not only the sidecar: the sample is drawn with the options given."""
    import importlib

    module = importlib.import_module("univigu.cli.run")
    calls = []

    def recording(pipe, method, inputs, **kwargs):
        calls.append((method, kwargs))
        return real(pipe, method, inputs, **kwargs)

    real = module.timed_sample
    monkeypatch.setattr(module, "timed_sample", recording)
    model = ["--model", str(checkpoints / "unified"), "--seed", "4", "--steps", "1", "--guidance", "2.5",
             "--negative-prompt", "a blue square"]  # fmt: skip
    result = runner.invoke(app, ["generate", "a red circle", *model, "--out", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    joint = runner.invoke(app, ["joint", "a red circle", *model, "--text-update", "linear-resample",
                                "--out", str(tmp_path / "j")])  # fmt: skip
    assert joint.exit_code == 0, joint.output
    (_, g), (_, j) = calls
    assert (g["seed"], g["num_steps"], g["guidance_scale"], g["negative_prompt"]) == (4, 1, 2.5, "a blue square")
    assert (j["seed"], j["num_steps"], j["guidance_scale"], j["negative_prompt"], j["text_update"]) == (
        4, 1, 2.5, "a blue square", "linear-resample")  # fmt: skip
    for out in ("g", "j"):
        (sidecar,) = (tmp_path / out).glob("*.json")
        assert json.loads(sidecar.read_text())["negative_prompt"] == "a blue square"
    for command in ("generate", "joint"):  # no guidance: the negative prompt is not used, and not recorded
        unguided = runner.invoke(app, [command, "a red circle", *model, "--guidance", "1", "--out",
                                       str(tmp_path / f"{command}-1")])  # fmt: skip
        assert unguided.exit_code == 0, unguided.output
        (sidecar,) = (tmp_path / f"{command}-1").glob("*.json")
        assert json.loads(sidecar.read_text())["negative_prompt"] == ""
    long = runner.invoke(app, ["generate", "a red circle", *model, "--negative-prompt", " ".join(["red"] * 40),
                               "--out", str(tmp_path / "g")])  # fmt: skip
    assert long.exit_code == 2 and "--negative-prompt: the negative prompt is 40 tokens long" in said(long)


def test_eval_options_reach_evaluate(checkpoints, tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module("univigu.evaluation.evaluate")
    seen = {}

    def fake(pipe, **kwargs):
        seen.update(kwargs)
        return {"split": kwargs["split"]}

    monkeypatch.setattr(module, "evaluate", fake)
    monkeypatch.setattr(module, "summary_table", lambda results: "table")
    result = runner.invoke(app, ["eval", str(checkpoints / "unified"), "--n", "3", "--seed", "5", "--steps", "2",
                                 "--batch-size", "7", "--split", "heldout", "--tasks", "v2t"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert {k: seen[k] for k in ("split", "n", "seed", "num_steps", "batch_size", "tasks")} == {
        "split": "heldout", "n": 3, "seed": 5, "num_steps": 2, "batch_size": 7, "tasks": ("v2t",)}


def test_demo_captions_the_test_scene_its_seed_names(checkpoints, tmp_path):
    result = runner.invoke(app, ["demo", "--model", str(checkpoints / "unified"), "--out", str(tmp_path),
                                 "--seed", "3"])  # fmt: skip
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "video_to_text.json").read_text())
    assert sidecar["true_caption"] == World().scenes("test", [3])[0].caption and sidecar["seed"] == 3


def _captured_frames(monkeypatch):
    """Patch the run module's sampler call to record the frames a caption run passes; returns the record."""
    import importlib

    module = importlib.import_module("univigu.cli.run")
    seen, real = [], module.timed_sample

    def recording(pipe, method, inputs, **kwargs):
        seen.append(np.asarray(inputs))
        return real(pipe, method, inputs, **kwargs)

    monkeypatch.setattr(module, "timed_sample", recording)
    return seen


def test_caption_reads_a_clip_as_training_clips_are_made(checkpoints, tmp_path, monkeypatch):
    """The first `frames` frames at the model's fps, scaled to cover and centre-cropped (load_clip, as cache-latents
    makes training clips), not frames spread over the whole clip and stretched; a clip too short is a usage error."""
    from univigu.data.video_folder import load_clip

    seen = _captured_frames(monkeypatch)
    tall = np.random.default_rng(0).integers(0, 255, (48, 64, 32, 3), np.uint8)  # 6 s at 8 fps, portrait
    path = write_video(tmp_path / "tall.gif", tall)
    model = ["--model", str(checkpoints / "unified"), "--out", str(tmp_path / "c"), "--steps", "1"]
    result = runner.invoke(app, ["caption", str(path), *model])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(seen[0][0], load_clip(path, 16, 32, 32, fps=8, min_side=1).numpy())
    short = runner.invoke(app, ["caption", str(write_video(tmp_path / "short.gif", tall[:8])), *model])
    assert short.exit_code == 2 and "video is too short" in said(short)


def _read_only(folder, monkeypatch):
    """`folder` made read-only; as root (whom file modes do not stop) its writes are made to fail as well."""
    import os
    import tempfile

    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and os.path.realpath(dir) == os.path.realpath(folder):
                raise PermissionError(13, "Permission denied")
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return folder


def test_an_output_folder_that_cannot_be_written_fails_before_any_work(checkpoints, tmp_path, monkeypatch):
    """A read-only output folder is a usage error when the command line is read, not an OSError after sampling."""
    import importlib

    module = importlib.import_module("univigu.cli.run")
    monkeypatch.setattr(module, "_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    ro = _read_only(tmp_path / "ro", monkeypatch)
    try:
        for args in (["generate", "a red circle", "--out", str(ro)], ["joint", "a red circle", "--out", str(ro)],
                     ["caption", "x.mp4", "--out", str(ro)], ["demo", "--out", str(ro)],
                     ["generate", "a red circle", "--trajectory", str(ro / "t.html")],
                     ["eval", str(checkpoints / "unified"), "--json", str(ro / "r.json")]):  # fmt: skip
            result = runner.invoke(app, args)
            assert result.exit_code == 2 and f"cannot write in the folder {ro}" in said(result), (args, result.output)
        assert not list(ro.iterdir())
    finally:
        ro.chmod(0o755)


def test_different_prompts_get_different_names():
    """A prompt whose slug loses nothing keeps its plain name (a rerun replaces its own files); one whose slug
    lost case, punctuation, other characters or its end gets '--' and a short hash of the exact prompt."""
    from univigu.outputs import slug

    assert slug("a red circle moves right") == "a-red-circle-moves-right"
    assert slug("🎉") != slug("🔴") and slug("🎉").startswith("sample--") and slug("🎉") == slug("🎉")
    assert slug("A red circle!") != slug("a red circle") == "a-red-circle"
    assert slug("A red circle!").startswith("a-red-circle--") and slug("a-red-circle") != "a-red-circle"
    # the hash follows '--', which a plain prompt's name cannot hold: a prompt ending in those hex digits differs
    assert slug("A red circle!") != slug("a red circle " + slug("A red circle!")[-8:])
    long = "a red circle moves right and a blue square grows slowly "
    assert slug(long + "left") != slug(long + "right") and len(slug(long + "left")) <= 60


def test_export_refuses_a_target_holding_its_source(checkpoints, tmp_path):
    """--overwrite replaces TARGET whole: a target that contains SOURCE (or lies inside it) would delete it."""
    parent = tmp_path / "parent"
    source = parent / "model"
    copied = runner.invoke(app, ["export", str(checkpoints / "unified"), str(source), "--dtype", "float32"])
    assert copied.exit_code == 0, copied.output
    (parent / "notes.txt").write_text("mine")
    for target, message in ((parent, f"{parent} contains SOURCE ({source}), which replacing it would delete"),
                            (source / "half", f"{source / 'half'} is inside SOURCE ({source}); name a folder outside")):
        result = runner.invoke(app, ["export", str(source), str(target), "--overwrite"])
        squeezed = "".join(said(result).split())  # long paths may wrap anywhere
        assert result.exit_code == 2 and "".join(message.split()) in squeezed, result.output
    assert (source / "model_index.json").exists() and (parent / "notes.txt").read_text() == "mine"
    assert not (source / "half").exists()


def test_seeds_and_video_paths_are_checked_on_the_command_line(checkpoints, tmp_path, monkeypatch):
    """A seed the samplers cannot take (negative, or over 64 bits) and a folder given as a video are usage errors,
    the seed's before the model loads."""
    import importlib

    model = ["--model", str(checkpoints / "unified"), "--out", str(tmp_path / "o")]
    module = importlib.import_module("univigu.cli.run")
    real = module._pipeline
    monkeypatch.setattr(module, "_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    for seed in ("99999999999999999999", "-1"):
        for command in (["generate", "a red circle"], ["caption", "x.mp4"], ["joint", "a red circle"], ["demo"]):
            result = runner.invoke(app, [*command, *model, "--seed", seed])
            assert result.exit_code == 2 and "Invalid value for '--seed'" in said(result), (
                command, result.output)
    monkeypatch.setattr(module, "_pipeline", real)
    result = runner.invoke(app, ["eval", str(checkpoints / "unified"), "--seed", str(2**64 - 1), "--n", "2"])
    assert result.exit_code == 2 and "--seed" in said(result), result.output
    (tmp_path / "clips").mkdir()
    result = runner.invoke(app, ["caption", str(tmp_path / "clips"), *model])
    assert result.exit_code == 2 and "is a folder, not a video file" in said(result), result.output
