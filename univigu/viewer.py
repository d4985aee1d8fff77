"""The denoising-trajectory viewer: one self-contained HTML page per sample.

A step slider shows, at each sampling step, the clean-video estimate (an animated GIF and a frame
strip, inlined as data URIs) and the text stream, token by token. Token classes:

- `changed`: differs from the token after the previous step (highlighted). The sampler does not
  hand out its source draw, so step 0 highlights nothing.
- `noisy`: differs from the final token, or is the mask token (greyed). With the uniform source a
  noisy position holds a random word; it turns black once it has settled on its final word.
- `pad`: padding both now and at the end (hidden; the canvas is mostly padding).

No network, no template engine: the page is an f-string with a little vanilla JavaScript.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from univigu.data.video_io import gif_delays

if TYPE_CHECKING:
    from univigu.data.tokenizer import TextCanvas


@dataclass
class Trajectory:
    """One sample's denoising trajectory, as the pipeline records it.

    frames: uint8 `[N, T, H, W, 3]` clean-video estimate after each step, or None (video to text:
    the video is the input and stays as it is). tokens: `[N, L]` text-stream ids after each step, or
    None (text to video: the text stream holds the prompt). times: noise level s (1 = noise) at which
    each step started.
    """

    title: str
    settings: dict[str, Any]
    video: np.ndarray  # uint8 [T, H, W, 3]: the final (or, for captioning, the input) video
    text: str = ""
    frames: np.ndarray | None = None
    tokens: np.ndarray | None = None
    times: list[float] = field(default_factory=list)
    fps: int = 8


def _data_uri(image: Image.Image, **save: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, **save)
    fmt = save["format"].lower()
    return f"data:image/{fmt};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def gif_uri(video: np.ndarray, fps: int = 8) -> str:
    """An animated GIF data URI of uint8 frames `[T, H, W, 3]` at their own size (the page scales it up,
    pixelated: a quarter of the bytes of a scaled GIF, none of the blur)."""
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in video]
    return _data_uri(images[0], format="GIF", save_all=True, append_images=images[1:],
                     duration=gif_delays(len(images), fps), loop=0)  # fmt: skip


def strip_uri(video: np.ndarray) -> str:
    """A PNG data URI of frames `[T, H, W, 3]` side by side."""
    return _data_uri(Image.fromarray(np.ascontiguousarray(np.concatenate(list(video), axis=1))), format="PNG")


def token_rows(tokens: np.ndarray, canvas: TextCanvas) -> list[list[tuple[str, str]]]:
    """Per step, `(token, classes)` for every canvas position, classes as described in the module
    docstring. tokens: `[N, L]` ids; canvas: the pipeline's `TextCanvas` (tokenizer, pad, end, mask)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or len(tokens) == 0:
        raise ValueError(f"expected token ids [N, L] with N > 0, got shape {tokens.shape}")
    final = tokens[-1]
    vocab = canvas.vocab_size
    words = {}
    for i in np.unique(tokens).tolist():
        if i == canvas.mask_id or i >= vocab:
            words[i] = "▒"
        elif i == canvas.end_id:
            words[i] = "⏎"
        else:
            words[i] = canvas.tokenizer.convert_ids_to_tokens(i).replace("▁", "")
    rows = []
    for n, step in enumerate(tokens):
        row = []
        for pos, i in enumerate(step.tolist()):
            classes = []
            if i == canvas.pad_id and final[pos] == canvas.pad_id:
                classes.append("pad")
            if i != final[pos] or i == canvas.mask_id:
                classes.append("noisy")
            if n > 0 and i != tokens[n - 1, pos]:
                classes.append("changed")
            row.append((words[i], " ".join(classes)))
        rows.append(row)
    return rows


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:70em;color:#222}
h1{font-size:1.3em} #settings{color:#444;font-size:.9em} #settings b{color:#777;font-weight:normal}
img,#video-anim{image-rendering:pixelated;border:1px solid #ccc}
.row{display:flex;gap:2em;align-items:flex-start;flex-wrap:wrap}
#controls{margin:1em 0;display:flex;gap:1em;align-items:center} #step{width:30em}
#tokens span{display:inline-block;margin:.1em .15em;padding:0 .2em;border-radius:3px}
#tokens .noisy{color:#aaa} #tokens .changed{background:#ffe27a} #tokens .pad{display:none}
#text{font-size:1.1em;margin:.5em 0} .legend span{padding:0 .3em;border-radius:3px}
"""

# the page may load nothing: images are data URIs, style and script inline
_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

_SCRIPT = """
const S = JSON.parse(document.getElementById('data').textContent);
const slider = document.getElementById('step');
function show(n) {
  const s = S.steps[n];
  document.getElementById('step-label').textContent =
    `step ${n + 1} / ${S.steps.length}` + (s.time === null ? '' : `, from noise level s = ${s.time.toFixed(3)}`);
  if (s.strip) {
    document.getElementById('video-strip').src = s.strip;
    document.getElementById('video-anim').style.backgroundImage = `url(${s.strip})`;
  }
  document.getElementById('text').textContent = s.text;
  const box = document.getElementById('tokens');
  box.replaceChildren(...s.tokens.map(([word, cls]) => {
    const span = document.createElement('span'); span.textContent = word; span.className = cls; return span; }));
}
slider.addEventListener('input', () => show(+slider.value));
let timer = null;
document.getElementById('play').addEventListener('click', () => {
  if (timer) { clearInterval(timer); timer = null; return; }
  timer = setInterval(() => { slider.value = (+slider.value + 1) % S.steps.length; show(+slider.value); }, 400);
});
show(+slider.value);
"""


def render_html(trajectory: Trajectory, canvas: TextCanvas | None = None) -> str:
    """The whole page as a string. `canvas` (the pipeline's `TextCanvas`) is needed when the
    trajectory has tokens."""
    t = trajectory
    n = len(t.frames) if t.frames is not None else len(t.tokens) if t.tokens is not None else 0
    if n == 0:
        raise ValueError("the trajectory holds no steps: sample with return_trajectory=True")
    rows = token_rows(t.tokens, canvas) if t.tokens is not None else None
    texts = canvas.decode(np.asarray(t.tokens)) if rows is not None else None
    steps = []
    for i in range(n):
        steps.append({
            "time": t.times[i] if i < len(t.times) else None,
            "strip": strip_uri(t.frames[i]) if t.frames is not None else None,
            "text": texts[i] if texts is not None else t.text,
            "tokens": rows[i] if rows is not None else [],
        })  # fmt: skip
    data = json.dumps({"steps": steps}).replace("</", "<\\/")  # a token must not close the script tag
    settings = " · ".join(f"<b>{html.escape(str(k))}</b> {html.escape(str(v))}" for k, v in t.settings.items()
                          if v is not None and k != "caption")  # fmt: skip
    frames, height, width = t.video.shape[:3]
    zoom = max(1, 160 // max(height, width))  # the toy world's 32 x 32 pixels shown 5 x 5
    big = f'width="{width * zoom}" height="{height * zoom}"'
    small = f'width="{frames * width * zoom // 3}" height="{height * zoom // 3}"'
    # the estimate plays by sliding its frame strip behind a one-frame window (a CSS sprite): one image per step
    play = (f"#video-anim{{width:{width * zoom}px;height:{height * zoom}px;background-size:{frames * width * zoom}px "
            f"{height * zoom}px;animation:play {frames / t.fps:.3f}s steps({frames}) infinite}}"
            f"@keyframes play{{to{{background-position:-{frames * width * zoom}px 0}}}}")  # fmt: skip
    estimate = ('<div><h3>video estimate at this step</h3><div id="video-anim"></div></div>'
                if t.frames is not None else "")
    strip = f'<img id="video-strip" {small} alt="frames of the estimate">' if t.frames is not None else ""
    final_label = "final video" if t.frames is not None else "input video"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(t.title)}</title>
<meta http-equiv="Content-Security-Policy" content="{_POLICY}">
<style>{_STYLE}{play if t.frames is not None else ""}</style></head><body>
<h1>{html.escape(t.title)}</h1>
<p id="settings">{settings}</p>
<div id="controls"><button id="play">play / pause</button>
<input type="range" id="step" min="0" max="{n - 1}" value="{n - 1}"><span id="step-label"></span></div>
<div class="row">{estimate}
<div><h3>{final_label}</h3><img id="final-video" {big} src="{gif_uri(t.video, t.fps)}" alt="{final_label}"></div></div>
{strip}
<h3>text at this step</h3><div id="text"></div><div id="tokens"></div>
<p class="legend"><span style="background:#ffe27a">changed at this step</span>
<span style="color:#aaa">still noisy (differs from the final token, or masked)</span> settled</p>
<script type="application/json" id="data">{data}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_trajectory(path: str | Path, trajectory: Trajectory, canvas: TextCanvas | None = None) -> Path:
    """Write the viewer page for one trajectory (see `render_html`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(trajectory, canvas), encoding="utf-8")
    return path


def from_output(output: Any, index: int, title: str, settings: dict[str, Any], times: list[float] | None = None,
                video: np.ndarray | None = None, fps: int = 8) -> Trajectory:  # fmt: skip
    """Sample `index` of a `UniViGUPipelineOutput` sampled with `return_trajectory=True`. `video`: the
    input video `[T, H, W, 3]` for captioning (the output then holds no video)."""
    if output.video_trajectory is None and output.token_trajectory is None:
        raise ValueError("the output holds no trajectory: sample with return_trajectory=True")
    frames = output.video_trajectory[:, index] if output.video_trajectory is not None else None
    tokens = output.token_trajectory[:, index].numpy() if output.token_trajectory is not None else None
    text = output.texts[index] if output.texts is not None else str(settings.get("prompt", ""))
    return Trajectory(title=title, settings=settings, video=output.videos[index] if video is None else video,
                      text=text, frames=frames, tokens=tokens, times=list(times or []), fps=fps)  # fmt: skip
