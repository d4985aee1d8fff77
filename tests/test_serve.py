"""`univigu serve`: the demo app started for real on a loopback port, each tab called with gradio_client."""

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from univigu.cli import app

pytest.importorskip("gradio", reason="the app extra: pip install -e '.[app]'")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The shipped model served on a free port; yields (client, output folder)."""
    from gradio_client import Client

    out, port = tmp_path_factory.mktemp("serve"), _free_port()
    log = open(out.parent / "serve.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "univigu", "serve", "--port", str(port), "--out", str(out),
                                "--device", "cpu"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = Client(url, verbose=False, download_files=str(out / "downloads"))
                break
            except Exception:  # not up yet
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {(out.parent / 'serve.log').read_text()}")
                time.sleep(1)
        yield client, out
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _frames(path: str) -> int:
    import av

    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


def test_each_tab_returns_a_playable_video_or_a_caption(server):
    client, out = server
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/text_to_video", "/world_sample", "/video_to_text", "/joint"}  # fmt: skip

    video, sidecar, page = client.predict("a red circle moves right", 5, 3, 3.0, api_name="/text_to_video")
    assert video.endswith(".mp4") and _frames(video) == 16 and page.endswith(".html")
    record = json.loads(Path(sidecar).read_text())
    assert record["prompt"] == "a red circle moves right" and record["seed"] == 5 and record["steps"] == 3
    assert record["model"].endswith("toy-model") and record["seconds"] > 0
    assert (out / "a-red-circle-moves-right_seed5.mp4").exists()  # named from the prompt and the seed

    from gradio_client import handle_file

    clip = client.predict(1, api_name="/world_sample")
    caption, sidecar, page = client.predict(handle_file(clip), 0, 3, "", api_name="/video_to_text")
    assert caption.strip() and json.loads(Path(sidecar).read_text())["caption"] == caption

    video, caption, sidecar, page = client.predict("a blue square grows", 0, 3, 3.0, api_name="/joint")
    assert _frames(video) == 16 and caption.strip() and "noise level" in Path(page).read_text()


def test_bad_input_is_a_clear_message(server):
    from gradio_client.exceptions import AppError

    client, _ = server
    with pytest.raises(AppError, match="write a prompt first"):
        client.predict("  ", 0, 2, 3.0, api_name="/joint")


def test_serve_errors_before_starting(tmp_path, monkeypatch):
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path)])
    message = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())  # the error box unwrapped
    assert result.exit_code == 2 and "is not a univigu pipeline folder" in message
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the app extra were not installed
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 1 and "pip install 'univigu[app]'" in result.output
    helped = CliRunner().invoke(app, ["serve", "--help"])  # rich markup would eat a bare [app]
    assert "univigu[app]" in " ".join(re.sub(r"[│╭╮╰╯─]", " ", helped.output).split())


def test_messages_and_step_defaults_of_the_app():
    """Errors and warnings of a task reach the page (gr.Error, gr.Warning), and each tab's steps slider starts at
    what its task runs by default (captions: caption_steps, 50 for the shipped model, not num_steps)."""
    import gradio as gr

    from univigu import app as app_module

    demo = app_module.Demo(None, "cpu", Path("unused"))
    notices = []

    class Fake:
        Error = gr.Error
        Warning = notices.append

    out = app_module.shown(Fake, demo.pipe.check_prompts, ["a pink dog jumps"])
    assert out is None and notices and "'pink', 'dog', 'jumps'" in notices[0]
    with pytest.raises(gr.Error, match="1 tokens long|tokens long"):
        app_module.shown(Fake, demo.pipe.check_prompts, [" ".join(["red"] * 40)])
    with pytest.raises(gr.Error, match="seed must fit in 64 bits"):
        app_module.shown(Fake, demo.pipe.text_to_video, ["a red circle"], seed=2**70)
    blocks = app_module.build_app(demo)
    steps = [b.value for b in blocks.blocks.values() if getattr(b, "label", None) == "sampling steps"]
    c = demo.pipe.config
    assert steps == [c.num_steps, c.caption_steps, c.num_steps] and c.caption_steps != c.num_steps
    # the seed widgets take what the seed check takes (0 to 2**64 - 1), as the CLI does
    seeds = [b for b in blocks.blocks.values() if getattr(b, "label", None) == "seed"]
    assert seeds and all((b.minimum, b.maximum) == (0, 2**64 - 1) for b in seeds)
    assert app_module._seed_steps(2**64 - 1, None) == (2**64 - 1, None)


def test_demo_methods_draw_samples_with_the_asked_seed_steps_and_guidance(tiny_parts, tmp_path, monkeypatch):
    """The app's tasks (called directly on a tiny pipeline) pass seed, steps and guidance to the sampler, and
    their records and files say so."""
    from univigu import PipelineConfig, UniViGUPipeline, outputs
    from univigu import app as app_module

    p = tiny_parts
    demo = app_module.Demo.__new__(app_module.Demo)
    demo.pipe = UniViGUPipeline(p["unified"], p["prompt_encoder"], p["tokenizer"], PipelineConfig(num_steps=2))
    demo.model, demo.load_s, demo.out = tmp_path / "model", 0.0, tmp_path / "out"
    calls, real = [], outputs.timed_sample

    def recording(pipe, method, inputs, **kwargs):
        calls.append((method, kwargs))
        return real(pipe, method, inputs, **kwargs)

    monkeypatch.setattr(outputs, "timed_sample", recording)
    mp4, sidecar, page = demo.text_to_video(" a red circle ", seed=5, steps=1, guidance=2.5)
    record = json.loads(Path(sidecar).read_text())
    assert (record["seed"], record["steps"], record["guidance_scale"]) == (5, 1, 2.5)
    assert Path(mp4).name == "a-red-circle_seed5.mp4" and Path(page).exists()
    mp4, caption, sidecar, page = demo.joint("a blue square", seed=6, steps=1, guidance=3.5)
    record = json.loads(Path(sidecar).read_text())
    assert record["caption"] == caption and (record["seed"], record["guidance_scale"]) == (6, 3.5)
    (m1, k1), (m2, k2) = calls
    assert (m1, k1["seed"], k1["num_steps"], k1["guidance_scale"]) == ("text_to_video", 5, 1, 2.5)
    assert (m2, k2["seed"], k2["num_steps"], k2["guidance_scale"]) == ("generate", 6, 1, 3.5)


def test_the_app_captions_as_training_reads_and_checks_seed_and_steps(tiny_parts, tmp_path, monkeypatch):
    """The caption tab reads a video as training clips are made (load_clip: the first frames at the model's fps,
    scaled to cover and cropped); a clip too short, no seed, a seed that is not a whole number and steps=0 are
    messages, not a silent default."""
    import gradio as gr
    import numpy as np

    from univigu import PipelineConfig, UniViGUPipeline, outputs, write_video
    from univigu import app as app_module
    from univigu.data.video_folder import load_clip

    p = tiny_parts
    demo = app_module.Demo.__new__(app_module.Demo)
    demo.pipe = UniViGUPipeline(p["unified"], p["prompt_encoder"], p["tokenizer"], PipelineConfig(num_steps=2))
    demo.model, demo.load_s, demo.out = tmp_path / "model", 0.0, tmp_path / "out"
    seen, real = [], outputs.timed_sample
    monkeypatch.setattr(outputs, "timed_sample", lambda pipe, method, inputs, **kwargs: seen.append(inputs) or real(
        pipe, method, inputs, **kwargs))  # fmt: skip
    tall = np.random.default_rng(0).integers(0, 255, (48, 64, 32, 3), np.uint8)  # 6 s at 8 fps, portrait
    path = write_video(tmp_path / "tall.gif", tall)
    demo.video_to_text(str(path), seed=0, steps=1)
    np.testing.assert_array_equal(seen[0][0], load_clip(path, 16, 32, 32, fps=8, min_side=1).numpy())

    class Fake:
        Error = gr.Error
        Warning = print

    short = str(write_video(tmp_path / "short.gif", tall[:8]))
    with pytest.raises(gr.Error, match="video is too short"):
        app_module.shown(Fake, demo.video_to_text, short, seed=0, steps=1)
    for task, args in ((demo.text_to_video, ("a red circle",)), (demo.video_to_text, (str(path),)),
                       (demo.joint, ("a red circle",))):  # fmt: skip
        with pytest.raises(gr.Error, match="steps must be a whole number from 1, got 0"):
            app_module.shown(Fake, task, *args, seed=0, steps=0)
        with pytest.raises(gr.Error, match="a seed is needed"):
            app_module.shown(Fake, task, *args, seed=None, steps=1)
        with pytest.raises(gr.Error, match="seed must be a whole number from 0 to 2\\*\\*64 - 1, got 1.7"):
            app_module.shown(Fake, task, *args, seed=1.7, steps=1)
    assert len(seen) == 1
