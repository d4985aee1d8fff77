"""The local demo app (`univigu serve`, extra `univigu[app]`): text to video, video to text and joint
generation in three Gradio tabs, each writing its outputs (video, sidecar JSON, trajectory viewer page)
under one folder, named like the command line's."""

from __future__ import annotations

import math
import numbers
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

MISSING = "the demo app needs Gradio: pip install 'univigu[app]'"


def require_gradio():
    """Gradio, imported on first use so that the core package never needs it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app phones nobody
    try:
        import gradio
    except ImportError as error:
        raise ImportError(MISSING) from error
    return gradio


class Demo:
    """The app's three tasks on one loaded pipeline; each returns the paths it wrote."""

    def __init__(self, model: str | Path | None = None, device: str | None = None,
                 out: str | Path = "outputs/serve") -> None:  # fmt: skip
        import torch

        from univigu import DEFAULT_MODEL
        from univigu.pipelines import UniViGUPipeline

        self.model = Path(model or DEFAULT_MODEL)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        start = time.perf_counter()
        self.pipe = UniViGUPipeline.from_pretrained(self.model, device=device)
        self.load_s = time.perf_counter() - start
        self.out = Path(out)

    def _sample(self, method: str, *args: Any, progress: Any = None, **kwargs: Any):
        from univigu.outputs import timed_sample

        steps = self.pipe.config.steps_for(method, kwargs.get("num_steps"))
        on_step = (lambda i: progress((i + 1) / steps, desc=f"step {i + 1} / {steps}")) if progress else None
        return timed_sample(self.pipe, method, *args, trajectory=True, on_step=on_step, progress=False, **kwargs)

    def _record(self, seed: int, steps: int, seconds: float) -> dict[str, Any]:
        from univigu.outputs import run_record

        return run_record(self.pipe, self.model, seed, steps, self.load_s, seconds)

    def text_to_video(self, prompt: str, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                      progress: Any = None) -> tuple[str, str, str]:  # fmt: skip
        """A video for `prompt`: (mp4, sidecar JSON, trajectory page)."""
        from univigu.outputs import save_sample, save_trajectory, slug

        prompt, (seed, steps) = _prompt(prompt), _seed_steps(seed, steps)  # named and recorded as sampled
        result, seconds, times = self._sample("text_to_video", [prompt], seed=seed, num_steps=steps,
                                              guidance_scale=guidance, progress=progress)  # fmt: skip
        stem = f"{slug(prompt)}_seed{seed}"
        record = {"task": "text_to_video", "prompt": prompt, "guidance_scale": self.pipe.resolve_guidance_scale(guidance),
                  **self._record(seed, len(times), seconds)}  # fmt: skip
        record["files"] = save_trajectory(self.out / f"{stem}.html", self.pipe, result, 0,
                                          f"text to video: {prompt}", record, times)  # fmt: skip
        files = save_sample(self.out, stem, result.videos[0], record)
        return files["mp4"], files["json"], files["trajectory"]

    def video_to_text(self, video: str, seed: int = 0, steps: int | None = None, instruction: str = "",
                      progress: Any = None) -> tuple[str, str, str]:  # fmt: skip
        """A caption for the video file at `video`: (caption, sidecar JSON, trajectory page)."""
        from univigu.outputs import caption_stem, save_sample, save_trajectory

        if not video:
            raise ValueError("upload a video, or render a world sample first")
        seed, steps = _seed_steps(seed, steps)
        frames = self.pipe.load_video(video)  # as training clips are made; too short: a message
        result, seconds, times = self._sample("video_to_text", frames[None], seed=seed, num_steps=steps,
                                              instruction=instruction or None, progress=progress)  # fmt: skip
        stem = caption_stem(video, seed, instruction or None)
        record = {"task": "video_to_text", "video": Path(video).name, "caption": result.texts[0],
                  "instruction": instruction or None, **self._record(seed, len(times), seconds)}  # fmt: skip
        record["files"] = save_trajectory(self.out / f"{stem}.html", self.pipe, result, 0,
                                          f"video to text: {Path(video).name}", record, times,
                                          video=frames)  # fmt: skip
        files = save_sample(self.out, stem, None, record)
        return result.texts[0], files["json"], files["trajectory"]

    def joint(self, prompt: str, seed: int = 0, steps: int | None = None, guidance: float | None = None,
              progress: Any = None) -> tuple[str, str, str, str]:  # fmt: skip
        """A video and its caption for `prompt`, denoised together: (mp4, caption, sidecar JSON, trajectory)."""
        from univigu.outputs import save_sample, save_trajectory, slug

        prompt, (seed, steps) = _prompt(prompt), _seed_steps(seed, steps)  # named and recorded as sampled
        result, seconds, times = self._sample("generate", [prompt], seed=seed, num_steps=steps,
                                              guidance_scale=guidance, progress=progress)  # fmt: skip
        stem = f"{slug(prompt)}_joint_seed{seed}"
        record = {"task": "joint", "prompt": prompt, "caption": result.texts[0],
                  "guidance_scale": self.pipe.resolve_guidance_scale(guidance), **self._record(seed, len(times), seconds)}  # fmt: skip
        record["files"] = save_trajectory(self.out / f"{stem}.html", self.pipe, result, 0,
                                          f"joint generation: {prompt}", record, times)  # fmt: skip
        files = save_sample(self.out, stem, result.videos[0], record)
        return files["mp4"], result.texts[0], files["json"], files["trajectory"]

    def world_sample(self, index: int = 0, split: str = "test") -> str:
        """Render sample `index` of a world split (not trained on for test) to an mp4; returns its path."""
        from univigu.data.video_io import write_video
        from univigu.data.world import World

        c = self.pipe.config
        world = World.sized_like(c)
        video = world.render(world.scenes(split, [int(index)]))[0]
        scale = max(1, 128 // max(c.height, c.width))
        return str(write_video(self.out / f"world-{split}-{int(index)}.mp4", video, fps=c.fps, scale=scale))


def _whole(value: Any) -> int | None:
    """`value` as an int when it is a whole number (gradio's Number and Slider may send 3.0), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    return int(value) if math.isfinite(value) and float(value).is_integer() else None


def _seed_steps(seed: Any, steps: Any) -> tuple[int, int | None]:
    """The seed and steps of a task as the samplers take them (steps None: the model's); ValueError for a missing
    seed, or a seed or steps that is not a whole number in range (not rounded, nor 0 steps run as the default)."""
    if seed is None:
        raise ValueError("a seed is needed: a whole number from 0 to 2**64 - 1")
    number = _whole(seed)
    if number is None or not 0 <= number < 2**64:
        raise ValueError(f"seed must be a whole number from 0 to 2**64 - 1, got {seed!r:.80}")
    if steps is None:
        return number, None
    count = _whole(steps)
    if count is None or count < 1:
        raise ValueError(f"steps must be a whole number from 1, got {steps!r:.80}")
    return number, count


def _prompt(prompt: str) -> str:
    if not prompt or not prompt.strip():
        raise ValueError("write a prompt first")
    return prompt.strip()


def shown(gr: Any, task: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`task(*args, **kwargs)` for the app: bad input shows as a message (`gr.Error`) rather than a stack trace,
    and warnings (words the model does not know) as notices (`gr.Warning`) rather than lines in the server's log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            result = task(*args, **kwargs)
        except (ValueError, TypeError) as error:
            raise gr.Error(str(error)) from error
    for warning in caught:
        gr.Warning(str(warning.message))
    return result


def build_app(demo: Demo):
    """The Gradio Blocks of the app. API names: /text_to_video, /world_sample, /video_to_text, /joint."""
    gr = require_gradio()
    c = demo.pipe.config

    def run(task, *args, progress):
        return shown(gr, task, *args, progress=progress)

    # gradio finds its progress tracker by a parameter's default, so each task gets an explicit signature
    def text_to_video(prompt, seed, steps, guidance, progress=gr.Progress()):
        return run(demo.text_to_video, prompt, seed, steps, guidance, progress=progress)

    def video_to_text(video, seed, steps, instruction, progress=gr.Progress()):
        return run(demo.video_to_text, video, seed, steps, instruction, progress=progress)

    def joint(prompt, seed, steps, guidance, progress=gr.Progress()):
        return run(demo.joint, prompt, seed, steps, guidance, progress=progress)

    def controls(method: str, guidance: bool = True) -> list:
        with gr.Row():
            seed = gr.Number(value=0, precision=0, label="seed", minimum=0, maximum=2**64 - 1)
            steps = gr.Slider(1, 100, value=c.steps_for(method), step=1, label="sampling steps")  # captions: 50
            scale = gr.Slider(1.0, 10.0, value=c.guidance_scale, step=0.5, label="guidance scale", visible=guidance)
        return [seed, steps, scale] if guidance else [seed, steps]

    with gr.Blocks(title="Uni-ViGU") as app:
        gr.Markdown(f"# Uni-ViGU\nOne diffusion transformer: text to video, video to text, and both at once. "
                    f"Model: `{demo.model}` ({c.frames} frames of {c.height}x{c.width}).")  # fmt: skip
        with gr.Tab("Text to video"):
            prompt = gr.Textbox("a red circle moves right", label="prompt")
            settings = controls("text_to_video")
            go = gr.Button("Generate", variant="primary")
            video = gr.Video(label="video", height=320)
            sidecar, page = gr.File(label="sidecar JSON"), gr.File(label="trajectory")
            go.click(text_to_video, [prompt] + settings, [video, sidecar, page], api_name="text_to_video")
        with gr.Tab("Video to text"):
            with gr.Row():
                source = gr.Video(label="video (upload, or render a world sample)", height=320)
                with gr.Column():
                    index = gr.Number(value=0, precision=0, minimum=0, label="world test sample")
                    render = gr.Button("Render a world sample")
            instruction = gr.Textbox("", label="instruction (optional)")
            settings = controls("video_to_text", guidance=False)
            go = gr.Button("Caption", variant="primary")
            text = gr.Textbox(label="caption")
            sidecar, page = gr.File(label="sidecar JSON"), gr.File(label="trajectory")
            render.click(demo.world_sample, [index], [source], api_name="world_sample")
            go.click(video_to_text, [source] + settings + [instruction], [text, sidecar, page],
                     api_name="video_to_text")
        with gr.Tab("Joint"):
            prompt = gr.Textbox("a blue square grows", label="prompt")
            settings = controls("generate")
            go = gr.Button("Generate both", variant="primary")
            with gr.Row():
                video, text = gr.Video(label="video", height=320), gr.Textbox(label="caption")
            sidecar, page = gr.File(label="sidecar JSON"), gr.File(label="trajectory")
            go.click(joint, [prompt] + settings, [video, text, sidecar, page], api_name="joint")
    return app


def serve(demo: Demo, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve the app on a loaded `Demo` until interrupted."""
    gr = require_gradio()
    demo.out.mkdir(parents=True, exist_ok=True)
    build_app(demo).queue().launch(server_name=host, server_port=port, share=False, show_error=True,
                                   allowed_paths=[str(demo.out.resolve())], theme=gr.themes.Default())  # fmt: skip
