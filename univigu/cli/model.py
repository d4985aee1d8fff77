"""`univigu model ...`: inspect and benchmark the unified transformer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import typer

from univigu.cli.run import _pipeline, out_file, resolve_device
from univigu.evaluation.timing import interleaved_medians, synchronizer

app = typer.Typer(help="Inspect and benchmark the unified transformer.", no_args_is_help=True)

# the probes' shared arguments
PROBE_CHECKPOINT_HELP = "A pipeline folder (default: the shipped model)."
PROBE_N_HELP = "Test-split world videos."
NOISE_HELP = "Comma-separated noise levels s in [0, 1]."
JSON_HELP = "Also write the result as JSON here."


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(int(n))


def _write_json(path: Path | None, data: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        typer.echo(f"wrote {path}")


@app.command()
def params(
    preset: str = typer.Option("tiny", help="Preset name: tiny, wan2.1-t2v-1.3b."),
    json_path: Path | None = typer.Option(None, "--json", callback=out_file,
                                          help="Also write the counts as JSON here."),
) -> None:
    """Parameter count per part: shared with Wan (base), added for text, total. Built on the meta device."""
    import torch

    from univigu.models import PRESETS, build_model, parameter_breakdown

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}", param_hint="--preset")
    with torch.device("meta"):  # shapes only, nothing allocated
        model = build_model(preset)
    counts = parameter_breakdown(model)
    typer.echo(f"preset {preset}")
    typer.echo(f"{'part':<42}{'parameters':>16}{'':>10}")
    for part, n in counts.items():
        if part in ("base", "text"):
            continue
        if part == "total":
            typer.echo("-" * 68)
            typer.echo(f"{'base (shared with Wan)':<42}{counts['base']:>16,}{_human(counts['base']):>10}")
            typer.echo(f"{'added (text parts)':<42}{counts['text']:>16,}{_human(counts['text']):>10}")
        typer.echo(f"{part:<42}{n:>16,}{_human(n):>10}")
    _write_json(json_path, {"preset": preset, "counts": counts})


def _torch_dtype(dtype: str):
    """The torch dtype a bench runs in; a clear error for any but float32 / bfloat16."""
    import torch

    if dtype not in ("float32", "bfloat16"):
        raise typer.BadParameter(f"dtype must be float32 or bfloat16, got {dtype!r}", param_hint="--dtype")
    return getattr(torch, dtype)


def _check_patch(sizes: list[tuple[str, int]], patch: list[int], model: str = "the model's") -> None:
    """A usage error naming the option whose size the `model`'s patch (T, H, W) does not divide: the transformer
    takes whole patches. `sizes`: (option, size) in the patch's order."""
    for (name, size), p in zip(sizes, patch):
        if size % p:
            raise typer.BadParameter(f"must be a multiple of {model} patch {list(patch)}, got {size}",
                                     param_hint=name)  # fmt: skip


@app.command()
def bench(
    preset: str = typer.Option("tiny", help="Preset name (the tiny one is meant for this CPU)."),
    batch: int = typer.Option(2, min=1, help="Videos per step."),
    steps: int = typer.Option(3, min=1, help="Timed steps (the median is reported)."),
    warmup: int = typer.Option(1, min=0, help="Untimed steps first."),
    frames: int = typer.Option(16, min=1, help="Video frames (pixel/latent frames, not patches)."),
    size: int = typer.Option(32, min=1, help="Height and width of the transformer's input (square): pixels for "
                             "the toy presets, VAE latents for the Wan ones (480p: 60x104)."),  # fmt: skip
    text_len: int = typer.Option(64, min=1, help="Text tokens in the text stream (T2V: the clean prompt)."),
    prompt_len: int = typer.Option(16, min=1, help="Prompt states the cross-attention sees."),
    device: str = typer.Option("cpu", callback=resolve_device, help="torch device, e.g. cuda."),
    dtype: str = typer.Option("float32", help="Weights and activations: float32 or bfloat16."),
    json_path: Path | None = typer.Option(None, "--json", callback=out_file,
                                          help="Also write the results as JSON here."),
) -> None:
    """Forward and forward+backward time of the unified model, and its overhead over plain Wan.

    Three rows at the same video size: diffusers' WanTransformer3DModel with the shared config and the
    same weights; the unified model with an empty text stream (must equal Wan); the unified model in T2V
    mode (clean prompt tokens in the text stream, t_text = 0; its backward includes the text loss).
    """
    import torch
    import torch.nn.functional as F
    from diffusers import WanTransformer3DModel

    from univigu.models import PRESETS, build_model
    from univigu.models.presets import preset_config
    from univigu.models.transformer import WAN_CONFIG_KEYS

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}", param_hint="--preset")
    torch_dtype = _torch_dtype(dtype)
    sizes = [("--frames", frames), ("--size", size), ("--size", size)]  # square frames
    _check_patch(sizes, preset_config(preset)["patch_size"], f"the {preset}")
    torch.manual_seed(0)
    model = build_model(preset)
    with torch.no_grad():  # a non-zero text head, so the text loss has gradients everywhere, as in training
        model.text_proj_out.weight.normal_(std=0.02)
    cfg = model.config
    wan = WanTransformer3DModel(**{k: cfg[k] for k in WAN_CONFIG_KEYS})
    wan.load_state_dict({k: v for k, v in model.state_dict().items() if not model.is_text_parameter(k)})
    for module in (model, wan):
        module.to(device)
        if torch_dtype != torch.float32:  # diffusers warns about any cast to a dtype, float32 included
            module.to(torch_dtype)

    g = torch.Generator().manual_seed(0)
    video = torch.randn(batch, cfg.in_channels, frames, size, size, generator=g).to(device, torch_dtype)
    t_video = (torch.rand(batch, generator=g) * 1000).to(device)
    prompt = torch.randn(batch, prompt_len, cfg.text_dim, generator=g).to(device, torch_dtype)
    tokens = torch.randint(0, cfg.text_vocab_size, (batch, text_len), generator=g).to(device)
    t_clean = torch.zeros(batch, device=device)
    sync = synchronizer(device)

    runs = {
        "wan (diffusers)": lambda: (wan(video, t_video, prompt, return_dict=False)[0], None),
        "unified, no text": lambda: model(video, None, t_video, None, prompt),
        f"unified T2V, {text_len} text tokens": lambda: model(video, tokens, t_video, t_clean, prompt),
    }

    def train_step(run: Callable) -> None:
        velocity, logits = run()
        loss = velocity.square().mean()
        if logits is not None and logits.shape[1]:
            loss = loss + F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        wan.zero_grad(set_to_none=True)

    with torch.no_grad():
        parity = (runs["wan (diffusers)"]()[0] - runs["unified, no text"]()[0]).abs().max().item()
    with torch.no_grad():
        fwd = interleaved_medians(runs, steps, warmup, sync)
    fwd_bwd = interleaved_medians({k: (lambda run=run: train_step(run)) for k, run in runs.items()}, steps, warmup,
                                   sync)  # fmt: skip
    rows = {
        name: {"forward_ms": 1e3 * fwd[name], "forward_backward_ms": 1e3 * fwd_bwd[name],
               "samples_per_s": batch / fwd_bwd[name]}
        for name in runs
    }  # fmt: skip

    wan_row, t2v_row = rows["wan (diffusers)"], rows[f"unified T2V, {text_len} text tokens"]
    ratio_fwd = t2v_row["forward_ms"] / wan_row["forward_ms"]
    ratio_fwd_bwd = t2v_row["forward_backward_ms"] / wan_row["forward_backward_ms"]
    n_video = (frames // cfg.patch_size[0]) * (size // cfg.patch_size[1]) * (size // cfg.patch_size[2])

    typer.echo(
        f"preset {preset}: batch {batch}, video {cfg.in_channels}x{frames}x{size}x{size} ({n_video} tokens), "
        f"text {text_len} tokens, prompt {prompt_len}; {device} {dtype}, {torch.get_num_threads()} threads; "
        f"median of {steps}"
    )
    typer.echo(f"{'model':<34}{'fwd ms':>10}{'fwd+bwd ms':>12}{'samples/s':>11}")
    for name, r in rows.items():
        typer.echo(f"{name:<34}{r['forward_ms']:>10.1f}{r['forward_backward_ms']:>12.1f}{r['samples_per_s']:>11.2f}")
    typer.echo(f"unified T2V / plain Wan latency: forward {ratio_fwd:.3f}x, forward+backward {ratio_fwd_bwd:.3f}x")
    typer.echo(f"max |velocity difference| unified (no text) vs Wan: {parity:.2e}")
    _write_json(
        json_path,
        {
            "preset": preset, "device": device, "dtype": dtype, "batch": batch, "frames": frames, "size": size,
            "video_tokens": n_video,
            "text_len": text_len, "prompt_len": prompt_len, "steps": steps, "threads": torch.get_num_threads(),
            "rows": rows, "t2v_over_wan_forward": ratio_fwd, "t2v_over_wan_forward_backward": ratio_fwd_bwd,
            "parity_max_abs_diff": parity,
        },
    )  # fmt: skip


@app.command("bench-v2t")
def bench_v2t(
    preset: str = typer.Option("tiny", help="Preset name, or a pipeline folder (its transformer's architecture)."),
    batch: int = typer.Option(1, min=1, help="Videos captioned at once."),
    steps: int = typer.Option(50, min=1, help="Text denoising steps of one V2T run."),
    repeats: int = typer.Option(3, min=1, help="Timed runs (the median is reported)."),
    frames: int = typer.Option(16, min=1, help="Transformer input frames (latent frames for Wan)."),
    height: int = typer.Option(32, min=1, help="Transformer input height (latent for Wan: 60 at 480p)."),
    width: int = typer.Option(32, min=1, help="Transformer input width (latent for Wan: 104 at 832)."),
    text_len: int = typer.Option(64, min=1, help="Text canvas length."),
    prompt_len: int = typer.Option(16, min=1, help="Prompt states (the V2T condition: null or an instruction)."),
    device: str = typer.Option("cpu", callback=resolve_device, help="torch device, e.g. cuda."),
    dtype: str = typer.Option("float32", help="Weights and activations: float32 or bfloat16."),
    attention_backend: str = typer.Option("native", help="SDPA kernel: native (torch chooses), _native_flash, "
                                          "_native_cudnn, _native_efficient or _native_math."),
    json_path: Path | None = typer.Option(None, "--json", callback=out_file,
                                          help="Also write the results as JSON here."),
) -> None:
    """Video to text with attention_layout video_prefix: the clean video cached (run once, then only the text
    per step) vs uncached (the whole network every step), and both in units of one full forward pass (T2V:
    noised video and clean text). Also the text stream's share of a T2V forward (what caching clean prompt
    tokens in T2V could save at most). Random weights: speed only."""
    import torch

    from univigu.flow.samplers import sample_v2t
    from univigu.flow.text import TextFlow
    from univigu.models import PRESETS
    from univigu.models.presets import preset_config
    from univigu.models.transformer import UniViGUTransformer

    if preset in PRESETS:
        config = preset_config(preset)
    elif (Path(preset) / "transformer" / "config.json").exists():
        config = UniViGUTransformer.load_config(Path(preset) / "transformer")
    else:
        raise typer.BadParameter(f"{preset!r} is neither a preset {sorted(PRESETS)} nor a pipeline folder",
                                 param_hint="--preset")  # fmt: skip
    torch_dtype = _torch_dtype(dtype)
    _check_patch([("--frames", frames), ("--height", height), ("--width", width)], config["patch_size"])
    torch.manual_seed(0)
    with torch.device(device):  # weights initialised where they run (1.3B on the CPU is slow)
        model = UniViGUTransformer.from_config({**config, "attention_layout": "video_prefix"}).eval()
        if torch_dtype != torch.float32:
            model.to(torch_dtype)
        model.text_proj_out.weight.data.normal_(std=0.02)  # non-uniform logits, as a trained head gives
    try:
        model.set_attention_backend(attention_backend)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--attention-backend") from None
    cfg = model.config
    vocab = cfg.text_vocab_size

    g = torch.Generator().manual_seed(0)
    video = torch.randn(batch, cfg.in_channels, frames, height, width, generator=g).to(device, torch_dtype)
    prompt = torch.randn(batch, prompt_len, cfg.text_dim, generator=g).to(device, torch_dtype)
    prompt_mask = None  # as the pipeline samples: all prompt states attended to
    tokens = torch.randint(0, vocab, (batch, text_len), generator=g).to(device)
    t_noised, t_clean = torch.full((batch,), 500.0, device=device), torch.zeros(batch, device=device)
    text_flow = TextFlow(vocab)
    sync = synchronizer(device)

    texts = {}

    graphs = device.startswith("cuda")  # the cached text step replayed as a CUDA graph (sample_v2t's default there)

    def v2t(use_cache: bool, num_steps: int = steps, cuda_graph: bool | None = None) -> None:
        texts[use_cache, cuda_graph] = sample_v2t(model, video, prompt, text_flow, text_len, prompt_mask=prompt_mask,
                                                  num_steps=num_steps, generator=0, use_cache=use_cache,
                                                  cuda_graph=cuda_graph).text  # fmt: skip

    with torch.no_grad():
        t_text = torch.full((batch,), 500.0, device=device)
        full = model(video, tokens, t_clean, t_text, prompt, None, prompt_mask).logits
        cached = model.forward_text(tokens, t_text, model.encode_video(video, prompt, prompt_mask))
        logit_diff = (full.float() - cached.float()).abs().max().item()
        for use_cache in (False, True):  # warm up kernels and allocator on short runs
            v2t(use_cache, 2)
        runs = {
            "full forward (T2V)": lambda: model(video, tokens, t_noised, t_clean, prompt, None, prompt_mask),
            "forward, no text": lambda: model(video, None, t_noised, None, prompt, None, prompt_mask),
            f"V2T {steps} steps, uncached": lambda: v2t(False),
            f"V2T {steps} steps, cached": lambda: v2t(True),
        }
        if graphs:
            v2t(True, 2, cuda_graph=False)
            runs[f"V2T {steps} steps, cached, no CUDA graph"] = lambda: v2t(True, cuda_graph=False)
        times = interleaved_medians(runs, repeats, 0, sync)
    cached_texts_equal = bool(torch.equal(texts[True, None], texts[False, None]))
    forward, no_text, uncached, cached = (times[name] for name in list(runs)[:4])
    n_video = math.prod(n // p for n, p in zip((frames, height, width), cfg.patch_size))
    result = {
        "preset": preset, "device": device, "dtype": dtype, "batch": batch, "steps": steps, "repeats": repeats,
        "video_tokens": n_video, "text_len": text_len, "prompt_len": prompt_len, "threads": torch.get_num_threads(),
        "ms": {name: 1e3 * t for name, t in times.items()},
        "speedup_cached": uncached / cached,
        "v2t_cached_in_forward_passes": cached / forward,
        "v2t_uncached_in_forward_passes": uncached / forward,
        "t2v_text_stream_share": 1 - no_text / forward,
        "max_abs_logit_diff_cached_vs_uncached": logit_diff,
        "same_texts_cached_vs_uncached": cached_texts_equal,
        "cuda_graph": graphs, "attention_backend": attention_backend,
    }  # fmt: skip
    if graphs:
        result["speedup_cuda_graph"] = times[f"V2T {steps} steps, cached, no CUDA graph"] / cached
        result["same_texts_cuda_graph_vs_eager"] = bool(torch.equal(texts[True, None], texts[True, False]))
    typer.echo(f"preset {preset}: batch {batch}, video {cfg.in_channels}x{frames}x{height}x{width} ({n_video} "
               f"tokens), text {text_len}, prompt {prompt_len}; {device} {dtype}, {torch.get_num_threads()} "
               f"threads; median of {repeats}")  # fmt: skip
    for name, t in times.items():
        typer.echo(f"{name:<34}{1e3 * t:>12.1f} ms")
    typer.echo(f"V2T {steps} steps: cached is {result['speedup_cached']:.1f}x faster than uncached")
    typer.echo(f"cost of V2T in full forward passes: cached {result['v2t_cached_in_forward_passes']:.2f}, "
               f"uncached {result['v2t_uncached_in_forward_passes']:.2f}")  # fmt: skip
    typer.echo(f"text stream share of a T2V forward ({text_len} of {n_video + text_len} tokens): "
               f"{100 * result['t2v_text_stream_share']:.1f}%")  # fmt: skip
    typer.echo(f"max |logit difference| cached vs uncached, one step: {logit_diff:.2e}; "
               f"same texts after {steps} steps: {cached_texts_equal}")  # fmt: skip
    if graphs:
        typer.echo(f"CUDA graph replay of the cached text step: {result['speedup_cuda_graph']:.2f}x, same texts as "
                   f"eager: {result['same_texts_cuda_graph_vs_eager']}")  # fmt: skip
    _write_json(json_path, result)


@app.command("position-probe")
def position_probe(
    checkpoint: Path = typer.Argument(None, help=PROBE_CHECKPOINT_HELP),
    n: int = typer.Option(16, "--n", min=1, help=PROBE_N_HELP),
    noise: str = typer.Option("0,0.5,0.9", help=NOISE_HELP),
    seed: int = typer.Option(0),
    json_path: Path | None = typer.Option(None, "--json", callback=out_file, help=JSON_HELP),
) -> None:
    """Does the transformer use where patches are? Relative change of its video output when the input's
    patch columns are shuffled, against the shuffled output (0: positions unused)."""
    from univigu.evaluation.probes import position_sensitivity

    levels = _noise_levels(noise)
    pipe = _probed(checkpoint)
    result = position_sensitivity(pipe, n=n, noise_levels=levels, seed=seed)
    for level, error in result["relative_error"].items():
        typer.echo(f"noise {level:>4}: |f(shuffled) - shuffled f| / |f| = {error:.2%}")
    _write_json(json_path, result)


@app.command("prompt-probe")
def prompt_probe(
    checkpoint: Path = typer.Argument(None, help=PROBE_CHECKPOINT_HELP),
    n: int = typer.Option(64, "--n", min=1, help=PROBE_N_HELP),
    noise: str = typer.Option("0.5,0.7,0.9", help=NOISE_HELP),
    seed: int = typer.Option(0),
    json_path: Path | None = typer.Option(None, "--json", callback=out_file, help=JSON_HELP),
) -> None:
    """Does the video denoiser read each prompt word? Relative increase of its clean-video error when the
    prompt's colour, shape or motion is swapped, or the prompt is empty (0: the word is unused)."""
    from univigu.evaluation.probes import SWAPPABLE_VALUES, prompt_sensitivity

    levels = _noise_levels(noise)
    pipe = _probed(checkpoint)
    result = prompt_sensitivity(pipe, n=n, noise_levels=levels, seed=seed)
    names = (*SWAPPABLE_VALUES, "empty")
    typer.echo("noise  error    " + "  ".join(f"{name:>8}" for name in names))
    for level, row in result["levels"].items():
        typer.echo(f"{level:>5}  {row['error']:.4f}  " + "  ".join(f"{row[name]:>+8.1%}" for name in names))
    _write_json(json_path, result)


@app.command("caption-probe")
def caption_probe(
    checkpoint: Path = typer.Argument(None, help=PROBE_CHECKPOINT_HELP),
    n: int = typer.Option(128, "--n", min=1, help=PROBE_N_HELP),
    text_time: float = typer.Option(0.9, min=0.0, max=1.0, help="Text flow time of the caption (1 = clean)."),
    seed: int = typer.Option(0),
    json_path: Path | None = typer.Option(None, "--json", callback=out_file, help=JSON_HELP),
) -> None:
    """Does the model see what a caption names? Teacher-forced V2T: the true caption with its attribute words
    noised, all else given; accuracy of the most likely token at those places, per attribute."""
    from univigu.evaluation.probes import caption_word_accuracy

    pipe = _probed(checkpoint)
    try:
        result = caption_word_accuracy(pipe, n=n, text_time=text_time, seed=seed)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="checkpoint") from error
    for role, accuracy in result["accuracy"].items():
        typer.echo(f"{role:>10}: {accuracy:6.1%}  ({result['words'][role]} words)")
    _write_json(json_path, result)


def _probed(checkpoint: Path | None):
    """The pipeline a probe looks at: `checkpoint`, else the shipped model."""
    return _pipeline(checkpoint, "cpu", param_hint="CHECKPOINT")[0]


def _noise_levels(noise: str) -> list[float]:
    """--noise "0,0.5,0.9" -> [0.0, 0.5, 0.9], each in [0, 1]."""
    try:
        levels = [float(v) for v in noise.split(",") if v.strip()]
    except ValueError as error:
        raise typer.BadParameter(f"noise levels must be numbers, got {noise!r}", param_hint="--noise") from error
    if not levels or any(not 0 <= s <= 1 for s in levels):
        raise typer.BadParameter(f"noise levels must lie in [0, 1], got {noise!r}", param_hint="--noise")
    return levels
