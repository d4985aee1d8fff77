"""attention_layout "video_prefix": clean video ignores the text, so V2T caches it exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from univigu import PipelineConfig, UniViGUPipeline, World
from univigu.cli import app
from univigu.flow import TextFlow, sample_v2t
from univigu.models.transformer import UniViGUTransformer
from cli_text import said

CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2, text_vocab_size=30,
)  # fmt: skip
B, L, S = 3, 10, 6


def _model(layout: str = "video_prefix", seed: int = 0, **config) -> UniViGUTransformer:
    torch.manual_seed(seed)
    model = UniViGUTransformer(**CONFIG, attention_layout=layout, **config).eval()
    with torch.no_grad():  # a non-zero text head: logits that depend on everything upstream
        model.text_proj_out.weight.normal_(std=0.5)
    return model


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(B, 4, 2, 8, 8, generator=g)
    # an instruction per sample, ragged; the last row has none (the null condition)
    prompt = torch.randn(B, S, CONFIG["text_dim"], generator=g)
    prompt_mask = torch.arange(S)[None] < torch.tensor([[4], [6], [0]])
    text_mask = torch.arange(L)[None] < torch.tensor([[10], [4], [7]])  # ragged text canvases
    return video, prompt, prompt_mask, text_mask


class Spy:
    """The model behind the sampler, recording the logits of every step (cached or not)."""

    def __init__(self, model: UniViGUTransformer) -> None:
        self.model, self.logits = model, []
        self.caches_clean_video, self.dtype = model.caches_clean_video, model.dtype

    def __call__(self, *args):
        out = self.model(*args)
        self.logits.append(out.logits)
        return out

    def encode_video(self, *args):
        return self.model.encode_video(*args)

    def forward_text(self, *args):
        self.logits.append(self.model.forward_text(*args))
        return self.logits[-1]


@pytest.mark.parametrize("released_text_layout", [False, True])
def test_cached_v2t_equals_uncached_at_every_step(released_text_layout):
    model = _model(text_rope_halves=released_text_layout, text_norm_weight=released_text_layout)
    video, prompt, prompt_mask, text_mask = _inputs()
    flow = TextFlow(CONFIG["text_vocab_size"])
    runs = {}
    for use_cache in (False, True):
        spy, seen = Spy(model), []
        out = sample_v2t(spy, video, prompt, flow, L, text_mask=text_mask, prompt_mask=prompt_mask, pad_id=0,
                         num_steps=6, generator=0, use_cache=use_cache, return_trajectory=True,
                         callback=lambda i, s, v, t: seen.append(i))  # fmt: skip
        runs[use_cache] = spy.logits, out, seen
    (uncached, out_u, seen_u), (cached, out_c, seen_c) = runs[False], runs[True]
    assert len(uncached) == len(cached) == 6 and seen_u == seen_c == list(range(6))
    for a, b in zip(uncached, cached):
        assert a.shape == b.shape == (B, L, CONFIG["text_vocab_size"])
        assert (a - b).abs().max().item() <= 1e-5
    assert torch.equal(out_u.text, out_c.text) and torch.equal(out_u.text_trajectory, out_c.text_trajectory)
    assert (out_c.text[1, 4:] == 0).all()  # outside the text mask: pad, untouched
    assert out_c.text.unique().numel() > 2  # the logits were not uniform: a real test of the text path


def test_one_cache_serves_text_canvases_of_any_length():
    model = _model()
    video, prompt, prompt_mask, _ = _inputs()
    t_clean, t_text = torch.zeros(B), torch.full((B,), 400.0)
    with torch.no_grad():
        cache = model.encode_video(video, prompt, prompt_mask)
        for length in (L, 4, L):  # the key/value buffers are resized, the video part kept
            tokens = torch.randint(0, 30, (B, length), generator=torch.Generator().manual_seed(length))
            full = model(video, tokens, t_clean, t_text, prompt, None, prompt_mask).logits
            assert (model.forward_text(tokens, t_text, cache) - full).abs().max() < 1e-5
            assert cache.kv[0][0].shape[2] == cache.num_video + length


def test_clean_video_rows_ignore_the_text_in_a_mixed_batch():
    model, (video, prompt, prompt_mask, text_mask) = _model(), _inputs()
    t_video = torch.tensor([0.0, 600.0, 0.0])  # rows 0 and 2: V2T (clean video); row 1: T2V / joint
    t_text = torch.tensor([300.0, 0.0, 900.0])
    text_a = torch.randint(0, 30, (B, L), generator=torch.Generator().manual_seed(1))
    text_b = torch.randint(0, 30, (B, L), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        v_a, _ = model(video, text_a, t_video, t_text, prompt, text_mask, prompt_mask)
        v_b, _ = model(video, text_b, t_video, t_text, prompt, text_mask, prompt_mask)
        full = _model("full")
        f_a, _ = full(video, text_a, t_video, t_text, prompt, text_mask, prompt_mask)
        f_b, _ = full(video, text_b, t_video, t_text, prompt, text_mask, prompt_mask)
    diff = (v_a - v_b).flatten(1).abs().amax(1)
    assert diff[0] == 0 and diff[2] == 0 and diff[1] > 1e-4  # clean rows blind to the text, others not
    assert (f_a - f_b).flatten(1).abs().amax(1)[0] > 1e-4  # with "full" the clean video sees the text
    # Same weights: the row that is not clean gets the full layout's output (T2V and joint are unchanged).
    assert torch.allclose(v_a[1], f_a[1], atol=1e-5)
    with torch.no_grad():  # no clean row at all: exactly the full layout
        noisy = torch.tensor([100.0, 600.0, 900.0])
        args = (video, text_a, noisy, t_text, prompt, text_mask, prompt_mask)
        assert all(torch.equal(a, b) for a, b in zip(model(*args), full(*args)))


def test_training_forward_with_gradient_checkpointing():
    """The video_prefix layout (clean and noisy rows in one batch) gives the same gradients recomputed."""
    model, (video, prompt, prompt_mask, text_mask) = _model(), _inputs()
    model.train()
    text = torch.randint(0, 30, (B, L))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        velocity, logits = model(video, text, torch.tensor([0.0, 500.0, 0.0]), torch.tensor([100.0, 0.0, 700.0]),
                                 prompt, text_mask, prompt_mask)  # fmt: skip
        (velocity.square().mean() + logits.logsumexp(-1).mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = gradients()
    model.enable_gradient_checkpointing()
    recomputed = gradients()
    assert plain.keys() == recomputed.keys() and all(g.abs().sum() > 0 for g in plain.values())
    for name, grad in plain.items():
        assert torch.allclose(recomputed[name], grad, atol=1e-6), name


def test_layout_errors_are_clear():
    with pytest.raises(ValueError, match="attention_layout must be one of"):
        UniViGUTransformer(**CONFIG, attention_layout="causal")
    full, (video, prompt, prompt_mask, _) = _model("full"), _inputs()
    with pytest.raises(ValueError, match="encode_video needs attention_layout='video_prefix'"):
        full.encode_video(video, prompt, prompt_mask)
    with pytest.raises(ValueError, match="use_cache=True needs"):
        sample_v2t(full, video, prompt, TextFlow(30), L, num_steps=2, use_cache=True)


def test_layout_is_saved_and_loaded(tmp_path):
    _model().save_pretrained(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "config.json").read_text())["attention_layout"] == "video_prefix"
    assert UniViGUTransformer.from_pretrained(tmp_path / "t").caches_clean_video


def test_pipeline_video_to_text_uses_the_cache(tiny_parts):
    p = tiny_parts
    unified = UniViGUTransformer.from_config({**p["unified"].config, "attention_layout": "video_prefix"})
    unified.load_state_dict(p["unified"].state_dict())
    with torch.no_grad():
        unified.text_proj_out.weight.normal_(std=0.5)
    pipe = UniViGUPipeline(unified, p["prompt_encoder"], p["tokenizer"], PipelineConfig(num_steps=3))
    world = World()
    videos = world.render(world.scenes("test", range(2)))
    seen = []
    out = pipe.video_to_text(videos, seed=0, progress=False, instruction="what moves", return_trajectory=True,
                             callback=lambda i, s, v, t: seen.append(i))  # fmt: skip
    assert seen == [0, 1, 2] and out.token_trajectory.shape == (3, 2, pipe.config.text_length)
    # the uncached reference, by hand
    x = pipe.codec.encode(torch.as_tensor(np.asarray(videos)))
    ref = sample_v2t(pipe.velocity_model, x, pipe.encode_prompts(["what moves"] * 2), pipe.text_flow,
                     pipe.config.text_length, pad_id=pipe.text_canvas.pad_id, num_steps=3,
                     shift=pipe.config.text_shift, generator=0, use_cache=False)  # fmt: skip
    assert out.texts == pipe.text_canvas.decode(ref.text)


def test_stage_config_carries_the_layout(tmp_path):
    from univigu.training.config import load_config
    from univigu.training.stages import build_task

    cfg = load_config("univigu/configs/toy/recall.yaml", ["--init_from=univigu/assets/toy-base",
                                                          "--attention_layout=video_prefix"])  # fmt: skip
    task, _, _ = build_task(cfg)
    assert task.transformer.caches_clean_video
    task.transformer.save_pretrained(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "config.json").read_text())["attention_layout"] == "video_prefix"
    assert not build_task(load_config("univigu/configs/toy/recall.yaml", ["--init_from=univigu/assets/toy-base"])
                          )[0].transformer.caches_clean_video  # fmt: skip
    with pytest.raises(ValueError, match="attention_layout must be one of"):
        load_config("univigu/configs/toy/recall.yaml", ["--attention_layout=causal"])


def test_bench_v2t_cli(tmp_path):
    out = tmp_path / "bench.json"
    args = ["model", "bench-v2t", "--preset", "tiny", "--steps", "3", "--repeats", "1", "--frames", "2",
            "--height", "16", "--width", "16", "--text-len", "8", "--batch", "2", "--json", str(out),
            "--attention-backend", "_native_math"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "cost of V2T in full forward passes" in result.output
    data = json.loads(out.read_text())
    assert data["video_tokens"] == 2 * 4 * 4 and data["steps"] == 3
    assert data["max_abs_logit_diff_cached_vs_uncached"] <= 1e-5 and data["same_texts_cached_vs_uncached"]
    assert data["speedup_cached"] > 0 and data["v2t_cached_in_forward_passes"] > 0
    assert data["attention_backend"] == "_native_math" and not data["cuda_graph"]  # no CUDA here
    bad = CliRunner().invoke(app, ["model", "bench-v2t", "--preset", "nope"])
    assert bad.exit_code == 2 and "neither a preset" in bad.output
    # a pipeline folder's architecture (the README's row on the shipped model), in bf16
    from univigu import DEFAULT_MODEL

    folder = ["--preset", str(DEFAULT_MODEL), *args[4:-2], "--dtype", "bfloat16"]
    unpatched = CliRunner().invoke(app, ["model", "bench-v2t", *folder])  # 2 frames: its patch takes 4
    assert unpatched.exit_code == 2 and "multiple of the model's patch [4, 2, 2]" in said(unpatched)
    result = CliRunner().invoke(app, ["model", "bench-v2t", *folder, "--frames", "4"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["preset"] == str(DEFAULT_MODEL) and data["dtype"] == "bfloat16" and data["steps"] == 3
    bad = CliRunner().invoke(app, args[:-1] + ["flash3"])
    assert bad.exit_code == 2 and "attention backend must be one of" in bad.output


def test_cuda_graph_needs_the_cache_and_cuda():
    model, (video, prompt, _, _) = _model(), _inputs()
    flow = TextFlow(model.config.text_vocab_size)
    for use_cache in (True, False):  # on CPU, and without the cache there is no text step to capture
        with pytest.raises(ValueError, match="cuda_graph=True needs"):
            sample_v2t(model, video, prompt, flow, 4, num_steps=2, use_cache=use_cache, cuda_graph=True)
