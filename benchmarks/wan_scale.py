"""Wan-scale speed of the unified model with random weights: per-step latency of T2V (vs diffusers' Wan at the
same size), V2T and joint sampling, and one training step (time, peak memory, model-FLOPs utilisation).

    python benchmarks/wan_scale.py --device cuda --out results/        # 1.3B, 480x832x81 (21x60x104 latents)
    python benchmarks/wan_scale.py --layers 2 --latent 3 16 16 --text-len 32 --prompt-len 64   # CPU-sized

Per-step latency is one transformer forward at the state of a sampling step (no guidance): T2V = noisy video +
clean prompt tokens, V2T = clean video (t=0) + noisy text, joint = both noisy; and one guided T2V sampling step
(the null pass with the empty prompt's one token in the text stream), as one masked forward of twice the batch and
as two forwards. The training step is forward + backward (velocity MSE + text cross-entropy)
+ AdamW, weights in float32 under bf16 autocast (the trainer's `mixed_precision: bf16`), with gradient
checkpointing. Model FLOPs are counted by torch.utils.flop_counter on one forward (matmuls, convolutions,
attention) x 3 for forward + backward, recomputation not counted; MFU = those FLOPs / step time / peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from univigu.evaluation.timing import interleaved_medians
from univigu.flow.samplers import Guidance, sample_t2v
from univigu.models import build_model, preset_config
from univigu.models.transformer import ATTENTION_BACKENDS, WAN_CONFIG_KEYS, keep_attention_checkpointing
from univigu.training.cuda_memory import ALLOCATOR_VARIABLES, prefer_growable_segments

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM
_START = time.perf_counter()


def _progress(message: str) -> None:
    """A timestamped line on stderr as each phase ends: a run killed at a time limit still says how far it got
    and what took the time (compiling the blocks can take minutes)."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def _peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# kernel / operator name fragments -> where a training step's time goes (first match wins; lower case)
_CATEGORIES = {
    "attention": ("flash", "fmha", "attention", "sdpa", "scaled_dot_product"),
    "matmul": ("gemm", "nvjet", "xmma", "cutlass", "triton_tem", "matmul", "aten::mm", "aten::addmm", "aten::bmm",
               "mkldnn"),
    "optimizer": ("adam", "multi_tensor"),
}


def _profile(step, device: torch.device, sync) -> dict:
    """One call of `step` under torch.profiler: seconds per category (device kernels on CUDA, operators' self
    time on CPU) and the ten costliest kernels, to see where a step's time goes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        step()
        sync()
    # leaves only, or time is counted twice: the kernels on CUDA (operators also report their kernels' time),
    # the aten operators' self time on CPU
    leaf = (lambda e: e.device_type == DeviceType.CUDA) if cuda else (lambda e: e.key.startswith("aten::"))
    events = [e for e in prof.key_averages() if leaf(e)]
    events = [e for e in events if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    seconds = {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6 for e in events}
    by_category = dict.fromkeys([*_CATEGORIES, "other"], 0.0)
    for name, sec in seconds.items():
        low = name.lower()
        by_category[next((c for c, keys in _CATEGORIES.items() if any(k in low for k in keys)), "other")] += sec
    top = sorted(seconds.items(), key=lambda kv: -kv[1])[:10]
    return {"seconds": by_category, "total_s": sum(seconds.values()), "top": [[k[:120], v] for k, v in top]}


def _latency(model, video, prompt, tokens, text_mask, t_noisy, t_clean, args, dtype,
             sync) -> tuple[dict, float]:  # fmt: skip
    """Median per-step forward seconds of Wan and the unified model's regimes, and the no-text parity."""
    from diffusers import WanTransformer3DModel

    cfg, device = model.config, video.device
    with torch.device(device):
        wan = WanTransformer3DModel(**{k: cfg[k] for k in WAN_CONFIG_KEYS})
    wan.load_state_dict({k: v for k, v in model.state_dict().items() if not model.is_text_parameter(k)})
    model.to(dtype)
    wan.to(dtype)
    v, p = video.to(dtype), prompt.to(dtype)
    runs = {
        "wan (diffusers)": lambda: wan(v, t_noisy, p, return_dict=False),
        "unified, no text": lambda: model(v, None, t_noisy, None, p),
        "unified T2V step": lambda: model(v, tokens, t_noisy, t_clean, p),
        "unified V2T step": lambda: model(v, tokens, t_clean, t_noisy, p),
        "unified joint step": lambda: model(v, tokens, t_noisy, t_noisy, p),
    }
    if text_mask is not None:  # the pipeline's T2V batching prompts of several lengths (guidance's null pass too)
        runs["unified T2V step, padded prompt"] = lambda: model(v, tokens, t_noisy, t_clean, p, text_mask)
    # one guided sampling step as the pipeline takes it: the null pass has the empty prompt (one token) in the text
    # stream, so stacking it with the prompt's pass needs a mask; Guidance(batched=None) picks for the device
    null = Guidance(torch.zeros_like(p[:1]), scale=5.0, null_text=tokens[:1, :1])
    for name, batched in (("one pass of 2B, masked", True), ("two passes", False)):
        guided = dataclasses.replace(null, batched=batched)
        runs[f"unified guided T2V step, {name}"] = lambda guided=guided: sample_t2v(
            model, tokens, p, v.shape, guidance=guided, num_steps=1, dtype=dtype, generator=0)
    with torch.no_grad():
        latency = interleaved_medians(runs, args.steps, args.warmup, sync)
        parity = (runs["wan (diffusers)"]()[0].float() - runs["unified, no text"]()[0].float()).abs().max().item()
    del wan
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return latency, parity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument("--layers", type=int, default=None, help="override num_layers (smaller runs)")
    parser.add_argument("--latent", type=int, nargs=3, default=(21, 60, 104), metavar=("T", "H", "W"))
    parser.add_argument("--text-len", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--checkpointing", default="full", choices=["full", "keep_attention", "none"],
                        help="training step: recompute every block, all but attention, or nothing")
    parser.add_argument("--attention-backend", default="native", choices=sorted(ATTENTION_BACKENDS),
                        help="SDPA kernel (diffusers' names); native lets torch choose")
    parser.add_argument("--compile", action="store_true", help="training step: torch.compile each block "
                        "(diffusers' compile_repeated_blocks), compile time excluded from the step time")
    parser.add_argument("--memory-budget", type=float, default=None, help="with --compile: the fraction of the "
                        "activations the compiled backward may keep (torch._functorch activation_memory_budget)")
    parser.add_argument("--text-padding", type=int, default=0, help="mask this many text positions as padding: in "
                        "the training step (training passes a mask whenever a batch holds a T2V row with a short "
                        "prompt; V2T and joint rows have none) and in one more T2V latency row (the pipeline's T2V when a "
                        "batch holds prompts of several lengths, as guidance's batched null pass does)")
    parser.add_argument("--skip-latency", action="store_true", help="only the training step")
    parser.add_argument("--profile", action="store_true", help="profile one more training step: time per kernel "
                        "category (attention, matmul, optimizer, other) and the costliest kernels")
    parser.add_argument("--out", type=Path, default=None, help="directory for result.json and result.md")
    args = parser.parse_args()
    if not 0 <= args.text_padding < args.text_len:
        parser.error(f"--text-padding must be in [0, --text-len), got {args.text_padding}")

    overrides = {} if args.layers is None else {"num_layers": args.layers}
    patch = preset_config(args.preset, **overrides)["patch_size"]  # checked before building: seconds on a GPU
    if any(size % p for size, p in zip(args.latent, patch)):
        parser.error(f"--latent {' '.join(map(str, args.latent))}: each must be a multiple of the patch {list(patch)}")
    prefer_growable_segments()  # before CUDA allocates: the step without recomputation needs them (README)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(args.preset, **overrides)
    model.set_attention_backend(args.attention_backend)
    _progress(f"model built on {device}")
    cfg = model.config
    b, (t, h, w) = args.batch, args.latent
    n_video = (t // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    g = torch.Generator(device).manual_seed(0)
    video = torch.randn(b, cfg.in_channels, t, h, w, generator=g, device=device)
    prompt = torch.randn(b, args.prompt_len, cfg.text_dim, generator=g, device=device)
    tokens = torch.randint(0, cfg.text_vocab_size, (b, args.text_len), generator=g, device=device)
    t_noisy, t_clean = torch.full((b,), 700.0, device=device), torch.zeros(b, device=device)
    text_mask = None  # the last --text-padding text positions are padding (a prompt shorter than the text stream)
    if args.text_padding:
        text_mask = torch.arange(args.text_len, device=device).expand(b, -1) < args.text_len - args.text_padding

    # ---- per-step latency, weights and activations in `dtype` ----
    latency, parity = {}, None
    if not args.skip_latency:
        latency, parity = _latency(model, video, prompt, tokens, text_mask, t_noisy, t_clean, args, dtype, sync)
        _progress("per-step latencies timed")

    # ---- one training step: float32 weights, bf16 autocast, checkpointing, AdamW ----
    model.float().train()
    if args.checkpointing != "none":
        model.enable_gradient_checkpointing(keep_attention_checkpointing if args.checkpointing == "keep_attention" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def loss_fn():
        with autocast:
            velocity, logits = model(video, tokens, t_noisy, t_noisy, prompt, text_mask)
            return velocity.float().square().mean() + F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())

    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loss_fn()
    forward_flops = counter.get_total_flops()
    _progress(f"model FLOPs counted: {forward_flops / 1e12:.3g} TFLOP a forward")
    if args.compile:  # after counting: the counter sees eager operations
        if args.memory_budget is not None:
            torch._functorch.config.activation_memory_budget = args.memory_budget
        model.compile_repeated_blocks()

    def train_step():
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    try:
        for _ in range(1 if args.train_steps > 1 or args.compile else 0):
            train_step()  # warmup: optimizer state allocated, blocks compiled
            _progress(f"warmup training step done{' (blocks compiled)' if args.compile else ''}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.train_steps):
            sync()
            start = time.perf_counter()
            train_step()
            sync()
            times.append(time.perf_counter() - start)
            _progress(f"training step {len(times)}: {times[-1]:.3f} s")
    except torch.OutOfMemoryError:
        raise SystemExit(f"training step out of memory (checkpointing {args.checkpointing}, compile {args.compile}, "
                         f"memory budget {args.memory_budget})") from None
    step_s = statistics.median(times)
    profiled = None
    if args.profile:
        profiled = _profile(train_step, device, sync)
        _progress("profiled step done")
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    machine, peak_tflops = _peak(device)
    train_flops = 3 * forward_flops
    achieved = train_flops / step_s / 1e12

    result = {
        "date": datetime.date.today().isoformat(), "machine": machine, "device": str(device), "dtype": args.dtype,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "preset": args.preset,
        "num_layers": cfg.num_layers, "latent": [t, h, w], "batch": b, "video_tokens": n_video,
        "text_tokens": args.text_len, "prompt_tokens": args.prompt_len,
        "latency_ms": {k: 1e3 * s for k, s in latency.items()},
        "t2v_over_wan": latency["unified T2V step"] / latency["wan (diffusers)"] if latency else None,
        "no_text_over_wan": latency["unified, no text"] / latency["wan (diffusers)"] if latency else None,
        "t2v_padded_over_wan": (latency["unified T2V step, padded prompt"] / latency["wan (diffusers)"]
                                if "unified T2V step, padded prompt" in latency else None),
        "guided_two_passes_over_one": (latency["unified guided T2V step, two passes"]
                                       / latency["unified guided T2V step, one pass of 2B, masked"]
                                       if latency else None),
        "parity_max_abs_diff": parity,
        "train_step_s": step_s, "train_forward_tflop": forward_flops / 1e12, "train_tflops_achieved": achieved,
        "peak_tflops": peak_tflops, "mfu": achieved / peak_tflops if peak_tflops else None,
        "peak_memory_gib": peak_mem, "allocator": {name: os.environ.get(name) for name in ALLOCATOR_VARIABLES},
        "gradient_checkpointing": args.checkpointing,
        "attention_backend": args.attention_backend, "compile": args.compile, "memory_budget": args.memory_budget,
        "text_padding": args.text_padding, "profile": profiled,
    }  # fmt: skip
    lines = [
        f"{machine}, {device} {args.dtype}, torch {torch.__version__}, {result['date']}; preset {args.preset}, "
        f"{cfg.num_layers} layers, latent {t}x{h}x{w} ({n_video} video tokens) + {args.text_len} text tokens, "
        f"{args.prompt_len} prompt tokens, batch {b}, attention backend {args.attention_backend}",
        "",
    ]
    if latency:
        lines += [
            "| per-step forward | ms |",
            "|---|---|",
            *[f"| {k} | {1e3 * s:.1f} |" for k, s in latency.items()],
            "",
            f"unified T2V / Wan: {result['t2v_over_wan']:.3f}x; unified without text / Wan: "
            f"{result['no_text_over_wan']:.3f}x; max |velocity diff| no-text vs Wan: {parity:.2e}; guided T2V "
            f"step, two passes / one masked pass of 2B: {result['guided_two_passes_over_one']:.3f}x",
            "",
        ]
    lines += [
        f"training step (fp32 weights, {'bf16 autocast' if args.dtype == 'bfloat16' else 'float32'}, checkpointing "
        f"{args.checkpointing}, {'compiled blocks, ' if args.compile else ''}"
        f"{f'{args.text_padding} text positions masked, ' if args.text_padding else ''}AdamW): {step_s:.3f} s, {achieved:.3g} TFLOP/s model FLOPs "
        f"({3 * forward_flops / 1e12:.3g} TFLOP per step)"
        + (f", MFU {100 * result['mfu']:.1f}% of {peak_tflops:.0f}" if peak_tflops else "")
        + (f", peak memory {peak_mem:.1f} GiB" if peak_mem is not None else ""),
    ]  # fmt: skip
    if profiled is not None:
        total = profiled["total_s"]
        lines += ["", f"one profiled training step, {'kernel' if device.type == 'cuda' else 'operator'} time "
                  f"{total:.3f} s:", "", "| category | s | share |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {c} | {sec:.3f} | {100 * sec / total:.1f}% |" for c, sec in profiled["seconds"].items()]
        lines += ["", "| costliest | s |", "|---|---|", *[f"| `{k}` | {v:.3f} |" for k, v in profiled["top"]]]
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "result.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}/result.json and result.md")


if __name__ == "__main__":
    main()
