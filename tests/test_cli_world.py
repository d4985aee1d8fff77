import json
import re

from typer.testing import CliRunner

from univigu.cli import app
from cli_text import said
from univigu.data.video_io import read_video
from univigu.data.world import parse_caption

runner = CliRunner()


def test_world_render_writes_videos_jsonl_and_sheet(tmp_path):
    result = runner.invoke(app, ["world", "render", "--n", "3", "--split", "heldout", "--seed", "2",
                                 "--out", str(tmp_path), "--scale", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert parse_caption(r["caption"]) == r["attributes"]
        mp4 = read_video(r["files"]["mp4"])
        assert mp4.shape == (16, 32, 32, 3)
        gif = read_video(r["files"]["gif"], num_frames=16)
        assert (gif.float() - mp4.float()).abs().mean() < 6
    from PIL import Image

    assert Image.open(tmp_path / "contact_sheet.png").size[1] > 3 * 32


def test_world_render_bad_split_is_clear(tmp_path):
    result = runner.invoke(app, ["world", "render", "--split", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "Invalid value for --split: one of ['train', 'val', 'test', 'heldout'], got " \
        "'nope'" in said(result)  # fmt: skip


def test_world_render_sizes_and_formats(tmp_path):
    out = tmp_path / "ok"
    args = ["world", "render", "--n", "2", "--out", str(out), "--scale", "1", "--height", "48", "--width", "40",
            "--frames", "8", "--format", "webm"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    files = [json.loads(line)["files"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [list(f) for f in files] == [["webm"], ["webm"]]
    assert read_video(files[0]["webm"]).shape == (8, 48, 40, 3)
    for bad, message in ((["--format", "png"], "subset of gif, mp4, webm"), (["--height", "8"], "height must be")):
        result = runner.invoke(app, ["world", "render", "--out", str(tmp_path / "bad"), *bad])
        assert result.exit_code == 2 and message in said(result), result.output
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_check_oracle_prints_and_writes_json(tmp_path):
    out = tmp_path / "oracle.json"
    result = runner.invoke(app, ["world", "check-oracle", "--n", "40", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())["results"]
    assert data["clean"]["all"] >= 0.99 and "noise 0.1 + blur 3x3" in data
    assert "noise 0.1 + blur 3x3" in result.output and "2x2 blocks" in result.output
    assert data["2x2 blocks"]["colour"] >= 0.95  # the videos a pixel_downsample 2 pipeline decodes to
    plain = runner.invoke(app, ["world", "check-oracle", "--n", "4", "--downsample", "1", "--json", str(out)])
    assert plain.exit_code == 0 and "blocks" not in json.loads(out.read_text())["results"]
    bad = runner.invoke(app, ["world", "check-oracle", "--n", "4", "--downsample", "3"])
    assert bad.exit_code == 2 and "must divide the world's 32x32 frames" in bad.output


def test_bench_reports_throughput(monkeypatch):
    """It renders n videos of the asked size in batches (after one warm-up batch) and reports their rate."""
    from univigu.data.world import World

    rendered = []
    render = World.render
    monkeypatch.setattr(World, "render", lambda self, scenes: rendered.append(render(self, scenes).shape))
    result = runner.invoke(app, ["world", "bench", "--n", "80", "--batch", "32", "--height", "24", "--frames", "4"])
    assert result.exit_code == 0, result.output
    assert [shape[0] for shape in rendered] == [32, 32, 32, 16] and {s[1:] for s in rendered} == {(4, 24, 32, 3)}
    rate = re.search(r"80 videos of 4x24x32 in [\d.]+s on one thread: (\d+) videos/s", result.output)
    assert rate and int(rate[1]) > 0


def test_tokenizer_command(tmp_path):
    from univigu.data.tokenizer import build_world_tokenizer, load_tokenizer

    result = runner.invoke(app, ["world", "tokenizer", str(tmp_path / "tok")])
    assert result.exit_code == 0, result.output
    saved, built = load_tokenizer(tmp_path / "tok"), build_world_tokenizer()
    assert saved.get_vocab() == built.get_vocab() and f"wrote a {len(built)}-token world tokenizer" in result.output

