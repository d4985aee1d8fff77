"""`univigu model params`, `bench` and the probes, run for real through typer's CliRunner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from univigu.cli import app
from univigu.evaluation.ablation import SHIPPED_BASE

runner = CliRunner()


def test_params_wan_1_3b(tmp_path):
    out = tmp_path / "params.json"
    result = runner.invoke(app, ["model", "params", "--preset", "wan2.1-t2v-1.3b", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "base (shared with Wan)" in result.output and "text: ffn_t" in result.output
    counts = json.loads(out.read_text())["counts"]
    assert 1.2e9 <= counts["base"] <= 1.5e9
    assert 1.5e9 <= counts["text"] <= 1.7e9  # "about 1.6B", mostly the 256k-row embedding and head
    assert counts["total"] == counts["base"] + counts["text"]
    assert counts["text: token embedding"] == 256384 * 1536
    assert f"{counts['total']:,}" in result.output


def test_params_unknown_preset_fails():
    result = runner.invoke(app, ["model", "params", "--preset", "nope"])
    assert result.exit_code == 2 and "unknown preset 'nope'" in result.output


def test_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    args = ["model", "bench", "--preset", "tiny", "--batch", "1", "--steps", "1", "--warmup", "0",
            "--frames", "2", "--size", "16", "--text-len", "4", "--json", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "unified T2V / plain Wan latency" in result.output
    data = json.loads(out.read_text())
    assert data["video_tokens"] == 2 * 4 * 4
    assert data["parity_max_abs_diff"] <= 1e-5
    assert set(data["rows"]) == {"wan (diffusers)", "unified, no text", "unified T2V, 4 text tokens"}
    for row in data["rows"].values():
        assert row["forward_ms"] > 0 and row["samples_per_s"] > 0
    assert data["t2v_over_wan_forward"] > 0


def test_bench_bfloat16_and_bad_dtype(tmp_path):
    out = tmp_path / "bench.json"
    args = ["model", "bench", "--preset", "tiny", "--batch", "1", "--steps", "1", "--warmup", "0", "--frames", "2",
            "--size", "16", "--text-len", "4", "--device", "cpu", "--dtype", "bfloat16", "--json", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["dtype"] == "bfloat16" and data["device"] == "cpu"
    assert 0 < data["parity_max_abs_diff"] < 0.1  # bf16 rounding, not a different model
    bad = runner.invoke(app, ["model", "bench", "--dtype", "float8"])
    assert bad.exit_code == 2 and "dtype must be" in bad.output
    uneven = runner.invoke(app, ["model", "bench", "--preset", "tiny", "--size", "30"])  # the patch is 4: was cropped
    assert uneven.exit_code == 2 and "must be a multiple of the tiny patch [1, 4, 4], got 30" in " ".join(
        uneven.output.replace("│", " ").split())  # fmt: skip


def test_position_probe_on_the_shipped_model_reads_zero_without_rope(tmp_path, monkeypatch):
    import univigu
    from univigu.evaluation.probes import position_sensitivity
    from univigu.models import transformer as module

    out = tmp_path / "probe.json"
    result = runner.invoke(app, ["model", "position-probe", "--n", "2", "--noise", "0,0.9", "--json", str(out)])
    assert result.exit_code == 0, result.output
    errors = json.loads(out.read_text())["relative_error"]
    assert set(errors) == {"0", "0.9"} and all(0 < e < 1 for e in errors.values())
    # the same weights with the video RoPE switched off are exactly equivariant: the probe must read ~0
    pipe = univigu.UniViGUPipeline.from_pretrained(univigu.DEFAULT_MODEL)
    with_rope = position_sensitivity(pipe, n=2, noise_levels=(0.5,))["relative_error"]["0.5"]
    rope = module.video_rope
    monkeypatch.setattr(module, "video_rope", lambda *args: (rope(*args)[0] * 0 + 1, rope(*args)[1] * 0))
    without_rope = position_sensitivity(pipe, n=2, noise_levels=(0.5,))["relative_error"]["0.5"]
    assert without_rope < 1e-5 < with_rope
    bad = runner.invoke(app, ["model", "position-probe", "--noise", "1.5"])
    assert bad.exit_code != 0 and "[0, 1]" in bad.output


def test_prompt_probe_reads_the_colour_and_exactly_zero_for_an_ignored_prompt(tmp_path):
    import torch

    import univigu
    from univigu.evaluation.probes import prompt_sensitivity

    out = tmp_path / "prompt.json"
    result = runner.invoke(app, ["model", "prompt-probe", "--n", "4", "--noise", "0.7", "--json", str(out)])
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())["levels"]["0.7"]
    assert set(row) == {"error", "colour", "shape", "motion", "empty"} and row["error"] > 0
    assert row["colour"] > 0.01  # the shipped model paints the prompt's colour: a wrong one costs
    # a generator whose prompt states are the same for every prompt (the plain base reads no text stream)
    pipe = univigu.UniViGUPipeline.from_pretrained(SHIPPED_BASE)
    pipe.encode_prompts = lambda texts: torch.zeros(len(texts), pipe.config.prompt_length, 128)
    flat = prompt_sensitivity(pipe, n=2, noise_levels=(0.5,))["levels"]["0.5"]
    assert flat["colour"] == flat["shape"] == flat["motion"] == flat["empty"] == 0.0
    bad = runner.invoke(app, ["model", "prompt-probe", "--noise", "x"])
    assert bad.exit_code != 0 and "must be numbers" in bad.output


def test_caption_probe_and_word_roles(tmp_path):
    from univigu.evaluation.probes import CAPTION_ROLES, caption_word_roles

    words = "from the top left , a small red circle slides left slowly . the background is gray .".split()
    roles = dict(zip(range(len(words)), caption_word_roles(words)))
    assert [roles[i] for i in (2, 3, 6, 7, 8, 10, 11, 16)] == [
        "position", "position", "size", "colour", "shape", "direction", "speed", "background"]  # fmt: skip
    assert roles[0] is None and roles[9] is None
    out = tmp_path / "caption.json"
    result = runner.invoke(app, ["model", "caption-probe", "--n", "8", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["accuracy"]) <= set(CAPTION_ROLES) and data["words"]["background"] == 8
    assert data["accuracy"]["background"] >= 0.75  # the shipped model names backgrounds (99% at n = 128)
    assert all(0 <= a <= 1 for a in data["accuracy"].values())
    base = runner.invoke(app, ["model", "caption-probe", str(SHIPPED_BASE), "--n", "2"])
    assert base.exit_code == 2 and "needs a unified model" in base.output


def test_probe_options_reach_the_probes(tmp_path):
    for command, extra in (("position-probe", ["--noise", "0.5"]), ("prompt-probe", ["--noise", "0.5"])):
        out = tmp_path / f"{command}.json"
        result = runner.invoke(app, ["model", command, "--n", "1", "--seed", "3", *extra, "--json", str(out)])
        assert result.exit_code == 0, result.output
        data = json.loads(out.read_text())
        assert (data["n"], data["seed"]) == (1, 3)


def test_caption_probe_hides_exactly_the_attribute_words():
    """The teacher-forced text the probe feeds holds the true caption except at attribute words, which hold the
    text flow's source tokens (were the true words fed there, every role would read as seen)."""
    import torch

    import univigu
    from univigu.data.world import World
    from univigu.evaluation.probes import caption_word_accuracy, caption_word_roles

    pipe = univigu.UniViGUPipeline.from_pretrained(univigu.DEFAULT_MODEL)
    fed = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: fed.append(args[1].cpu()))
    try:
        caption_word_accuracy(pipe, n=4, seed=3)
    finally:
        hook.remove()
    world = World.sized_like(pipe.config)
    tokens, _ = pipe.text_canvas.encode([s.caption for s in world.scenes("test", range(4), 3)])
    hidden = torch.tensor([[role is not None for role in caption_word_roles(pipe.tokenizer.convert_ids_to_tokens(row))]
                           for row in tokens.tolist()])  # fmt: skip
    (text,) = fed
    assert hidden.sum() >= 4 * 5 and torch.equal(text[~hidden], tokens[~hidden])
    assert (text[hidden] != tokens[hidden]).float().mean() > 0.9  # source tokens (uniform: rarely the true word)
