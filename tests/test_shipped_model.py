"""The shipped toy-world model: small, loadable in float32, and what README command 1 runs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import univigu
from univigu.cli import app


def test_shipped_model_is_small_and_loads_in_float32():
    root = Path(univigu.DEFAULT_MODEL)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"{size / 2**20:.1f} MiB"
    assert (root / "README.md").exists()  # the card: command, steps, time, evaluation numbers
    pipe = univigu.UniViGUPipeline.from_pretrained(root)
    assert pipe.unified and next(pipe.transformer.parameters()).dtype == torch.float32
    stages = pipe.config.extra  # provenance: the stages of `univigu train-all` (toy default: base, refine)
    assert list(stages) == ["base", "refine"] and stages["refine"]["init_from"].endswith("base/final")
    assert sum(stage["minutes"] for stage in stages.values()) <= 60  # trained on a 2-core CPU within the hour


def test_demo_on_the_shipped_model(tmp_path):
    """README command 1: the demo on the default model writes the three tasks' outputs."""
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for stem in ("text_to_video", "video_to_text", "joint"):
        assert (tmp_path / f"{stem}.gif").stat().st_size > 0 and (tmp_path / f"{stem}.mp4").stat().st_size > 0
    caption = json.loads((tmp_path / "video_to_text.json").read_text())["caption"]
    assert caption and caption in result.output


def test_shipped_model_samples_in_bfloat16():
    """A bf16 pipeline keeps diffusers' float32 modules (time embedders, norms) in float32, so the dtype the
    transformer computes in is not its first parameter's; the three tasks run and T2V follows float32."""
    prompts = ["a red circle moves right", "a blue square grows"]
    pipe = univigu.UniViGUPipeline.from_pretrained(univigu.DEFAULT_MODEL, torch_dtype=torch.bfloat16)
    dtypes = {p.dtype for p in pipe.transformer.parameters()}
    assert dtypes == {torch.float32, torch.bfloat16}
    videos = pipe.text_to_video(prompts, seed=0, num_steps=4, progress=False).videos
    reference = univigu.UniViGUPipeline.from_pretrained(univigu.DEFAULT_MODEL)
    reference = reference.text_to_video(prompts, seed=0, num_steps=4, progress=False).videos
    assert abs(videos.astype(float) - reference).mean() < 4  # of 255
    assert len(pipe.video_to_text(videos, seed=0, num_steps=4, progress=False).texts) == 2
    out = pipe.generate(prompts, seed=0, num_steps=4, progress=False)
    assert out.videos.shape == videos.shape and len(out.texts) == 2

    # by name, as diffusers' loaders take it (a name loaded float32 before, with only a log line)
    named = univigu.UniViGUPipeline.from_pretrained(univigu.DEFAULT_MODEL, torch_dtype="bfloat16")
    assert named.transformer.proj_out.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"torch_dtype must be one of \['bfloat16', 'float16', 'float32'\]"):
        univigu.UniViGUPipeline.from_pretrained(univigu.DEFAULT_MODEL, torch_dtype="auto")


def test_readme_table_is_the_shipped_evaluation():
    """The README's table of the shipped model is its card's eval_test.json (`univigu eval`'s output), figure for
    figure, so a retrained model cannot ship with the old numbers."""
    result = json.loads((Path(univigu.DEFAULT_MODEL) / "eval_test.json").read_text())

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    row = (f"| {pct(result['t2v']['all'])} | {pct(result['t2v_base']['all'])} | {pct(result['v2t']['all'])} | "
           f"{result['v2t']['bleu4']:.3f} | {result['v2t']['cider']:.3f} | {pct(result['joint']['consistency'])} |")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert row in readme, row


def test_the_readme_python_block_runs(tmp_path, monkeypatch):
    """README's first Python block ("Use it"), run as written in a scratch folder with a world clip as its
    clip.mp4; the pipeline loaded with 2 sampling steps to keep it quick."""
    from univigu import World, write_video

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    world = World()
    write_video(tmp_path / "clip.mp4", world.render(world.scenes("test", range(1)))[0])
    load = univigu.UniViGUPipeline.from_pretrained.__func__
    monkeypatch.setattr(univigu.UniViGUPipeline, "from_pretrained",
                        classmethod(lambda cls, path, **config: load(cls, path, **{"num_steps": 2, "caption_steps": 2,
                                                                                   **config})))  # fmt: skip
    scope = {}
    exec(block, scope)
    assert scope["videos"].shape == (1, 16, 32, 32, 3) and scope["videos"].dtype == np.uint8
    assert len(scope["texts"]) == 1 and scope["out"].videos.shape == (1, 16, 32, 32, 3)
