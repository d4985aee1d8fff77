"""The trajectory viewer: token states, the --trajectory option of the run commands, and the page
itself driven in headless Chromium (installed by scripts/test-setup.sh)."""

import json
import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from univigu import PipelineConfig, TextCanvas, Trajectory, UniViGUPipeline, World, write_trajectory, write_video
from univigu.cli import app
from univigu.data.tokenizer import build_world_tokenizer
from univigu.viewer import render_html, token_rows

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tiny_parts, tmp_path_factory):
    p = tiny_parts
    path = tmp_path_factory.mktemp("ckpt") / "unified"
    pipe = UniViGUPipeline(p["unified"], p["prompt_encoder"], p["tokenizer"], PipelineConfig(num_steps=4))
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def joint_page(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("joint")
    result = runner.invoke(app, ["joint", "a red circle moves right", "--model", str(checkpoint), "--seed", "3",
                                 "--out", str(out), "--trajectory", str(out / "page.html")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"(trajectory: {out / 'page.html'})" in result.output  # said where, as generate does
    return out


def test_token_states_changed_noisy_pad_mask():
    canvas = TextCanvas(build_world_tokenizer(), 6)
    final, _ = canvas.encode(["a red circle"])  # a red circle <end> <pad> <pad>
    red, mask, pad = final[0, 1].item(), canvas.mask_id, canvas.pad_id
    steps = np.stack([
        [mask, red, mask, mask, red, pad],  # position 4 holds a word where the final text is padding
        [*final[0, :3].tolist(), mask, pad, pad],
        final[0].tolist(),
    ])  # fmt: skip
    rows = token_rows(steps, canvas)
    assert [w for w, _ in rows[0]][:2] == ["▒", "red"]
    assert rows[0][0][1] == "noisy" and rows[0][1][1] == "" and rows[0][4][1] == "noisy"  # no changes at step 0
    assert rows[1][0][1] == "changed" and rows[1][3][1] == "noisy" and rows[1][4][1] == "pad changed"
    assert rows[2][3] == ("⏎", "changed") and rows[2][5][1] == "pad"
    assert all("noisy" not in c for _, c in rows[2])


def test_page_needs_steps_and_escapes_text(tmp_path):
    video = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="no steps"):
        render_html(Trajectory("t", {}, video))
    page = write_trajectory(tmp_path / "sub" / "p.html", Trajectory("<b>x</b>", {"prompt": "</script>"}, video,
                                                                    frames=video[None])).read_text()  # fmt: skip
    assert "<b>x</b>" not in page and "&lt;/script&gt;" in page and 'id="video-strip"' in page


def test_joint_trajectory_page_is_self_contained(joint_page):
    page = (joint_page / "page.html").read_text()
    sidecar = json.loads(next(joint_page.glob("a-red-circle-moves-right_joint_seed3_0.json")).read_text())
    assert sidecar["files"]["trajectory"].endswith("page.html") and sidecar["seed"] == 3
    assert sidecar["steps"] == 4 and sidecar["load_seconds"] >= 0 and sidecar["seconds"] > 0
    data = json.loads(re.search(r'id="data">(.*?)</script>', page, re.S).group(1))
    assert len(data["steps"]) == 4 and all(s["strip"].startswith("data:image/png;base64,") for s in data["steps"])
    assert len(data["steps"][0]["tokens"]) == 48 and data["steps"][0]["time"] == 1.0
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "url(http" not in page  # nothing fetched


def test_generate_and_caption_trajectories(checkpoint, tmp_path):
    result = runner.invoke(app, ["generate", "a blue square grows", "a red circle moves up", "--model", str(checkpoint),
                                 "--out", str(tmp_path), "--trajectory", str(tmp_path / "t.html")])  # fmt: skip
    assert result.exit_code == 0, result.output
    for i in (0, 1):  # one page per prompt; the text stream holds the prompt
        data = json.loads(re.search(r'id="data">(.*?)</script>', (tmp_path / f"t_{i}.html").read_text()).group(1))
        assert data["steps"][-1]["text"] == ["a blue square grows", "a red circle moves up"][i]
    world = World()
    clip = write_video(tmp_path / "clip.mp4", np.ascontiguousarray(world.render(world.scenes("test", [0]))[0]))
    result = runner.invoke(app, ["caption", str(clip), "--model", str(checkpoint), "--out", str(tmp_path),
                                 "--trajectory", str(tmp_path / "c.html")])  # fmt: skip
    assert result.exit_code == 0, result.output
    page = (tmp_path / "c.html").read_text()
    assert 'id="final-video"' in page and 'id="video-strip"' not in page  # the input video; no estimates
    sidecar = next(tmp_path.glob("clip--*_caption_seed0_0.json"))
    assert json.loads(sidecar.read_text())["files"]["trajectory"].endswith("c.html")
    assert f"-> {sidecar} (trajectory: {tmp_path / 'c.html'})" in result.output  # where both went


def _chromium():
    """Headless Chromium on a closed network: every host name fails to resolve but loopback, and
    Selenium gets explicit binaries (its manager must not download any)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium / chromedriver missing: run scripts/test-setup.sh")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,800",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--proxy-server=127.0.0.1:9",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def test_slider_moves_text_and_frames_in_chromium(joint_page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = _chromium()
    try:
        driver.get((joint_page / "page.html").as_uri())

        def state():
            find = lambda key: driver.find_element(By.ID, key)  # noqa: E731
            return {"label": find("step-label").text, "strip": find("video-strip").get_attribute("src"),
                    "tokens": [s.text for s in find("tokens").find_elements(By.TAG_NAME, "span")],
                    "noisy": len(driver.find_elements(By.CSS_SELECTOR, "#tokens .noisy")),
                    "anim": find("video-anim").value_of_css_property("background-image")}  # fmt: skip

        last = state()  # the page opens on the last step
        driver.find_element(By.ID, "step").send_keys(Keys.HOME)  # a user dragging the slider to the start
        first = state()
        assert last["label"].startswith("step 4 / 4")
        assert first["label"].startswith("step 1 / 4, from noise level s = 1.000")
        assert first["strip"] != last["strip"] and first["anim"] != last["anim"] and "data:image/png" in first["anim"]
        assert first["tokens"] != last["tokens"] and first["noisy"] > 0 and last["noisy"] == 0
        driver.find_element(By.ID, "step").send_keys(Keys.END)
        assert state() == last
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[1] == 1100 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # a drawn page


def test_trajectory_option_needs_nothing_else(checkpoint, tmp_path):
    """Without --trajectory no page is written and nothing is recorded."""
    result = runner.invoke(app, ["joint", "a", "--model", str(checkpoint), "--out", str(tmp_path)])
    assert result.exit_code == 0 and not list(tmp_path.glob("*.html"))
    assert "trajectory" not in json.loads(next(tmp_path.glob("*.json")).read_text())["files"]


def test_from_output_takes_the_asked_sample_and_the_page_plays_at_its_fps():
    """Sample 1 of a batch of two: its own trajectory frames, tokens, final video and text; the page's GIF plays at
    the trajectory's fps, and its settings line leaves out the caption (shown as the text)."""
    import base64
    import io

    import torch
    from PIL import Image

    from univigu.pipelines.pipeline import UniViGUPipelineOutput
    from univigu.viewer import from_output

    canvas = TextCanvas(build_world_tokenizer(), 6)
    tokens = torch.stack([canvas.encode(["a red circle", "a blue square"])[0]] * 2)  # [steps, B, L]
    videos = np.stack([np.full((2, 4, 4, 3), v, np.uint8) for v in (10, 200)])
    videos[:, 1] += 1  # the frames of each video differ: the GIF keeps both
    out = UniViGUPipelineOutput(videos=videos, texts=["a red circle", "a blue square"], token_trajectory=tokens,
                                video_trajectory=np.stack([videos, videos // 2]))  # fmt: skip
    t = from_output(out, 1, "title", {"caption": "a blue square", "seed": 5}, [1.0, 0.5], fps=4)
    np.testing.assert_array_equal(t.video, videos[1])
    np.testing.assert_array_equal(t.frames, np.stack([videos[1], videos[1] // 2]))
    assert t.tokens.tolist() == tokens[:, 1].tolist() and t.text == "a blue square" and t.fps == 4
    page = render_html(t, canvas)
    data = json.loads(re.search(r'id="data">(.*?)</script>', page, re.S).group(1))
    assert [s["text"] for s in data["steps"]] == ["a blue square"] * 2 and [s["time"] for s in data["steps"]] == [1.0, 0.5]
    settings = re.search(r'<p id="settings">(.*?)</p>', page).group(1)
    assert "seed" in settings and "caption" not in settings
    gif = re.search(r'id="final-video"[^>]*src="data:image/gif;base64,([^"]+)"', page).group(1)
    with Image.open(io.BytesIO(base64.b64decode(gif))) as image:
        assert image.info["duration"] == 250 and image.n_frames == 2
        assert int(np.asarray(image.convert("RGB")).mean()) == 200


def test_joint_page_settings_line_names_the_run_not_its_files_or_fps(joint_page):
    settings = re.search(r'<p id="settings">(.*?)</p>', (joint_page / "page.html").read_text()).group(1)
    assert "<b>seed</b> 3" in settings and "<b>steps</b> 4" in settings
    assert "<b>fps</b>" not in settings and "<b>files</b>" not in settings


def test_the_pages_gifs_last_as_long_as_the_clip():
    """The page's GIFs play at the model's fps: whole-centisecond delays adding up to frames / fps (81 frames at 16
    fps: 5.06 s, where 6 cs each made 4.86 s)."""
    import base64
    import io

    from PIL import Image, ImageSequence

    from univigu.data.video_io import gif_delays
    from univigu.viewer import gif_uri

    assert sum(gif_delays(81, 16)) == 5060 and set(gif_delays(81, 16)) == {60, 70}
    assert gif_delays(16, 8) == [130, 120] * 8
    frames = np.stack([np.full((4, 4, 3), 3 * i, np.uint8) for i in range(81)])  # distinct: nothing merged
    gif = Image.open(io.BytesIO(base64.b64decode(gif_uri(frames, fps=16).split(",", 1)[1])))
    assert sum(frame.info["duration"] for frame in ImageSequence.Iterator(gif)) == 5060
