import copy
import dataclasses
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

import univigu
from univigu import PipelineConfig, PromptError, UniViGUPipeline, World


@pytest.fixture(scope="module")
def pipe(tiny_parts):
    p = tiny_parts
    return UniViGUPipeline(p["unified"], p["prompt_encoder"], p["tokenizer"], PipelineConfig(num_steps=3))


@pytest.fixture(scope="module")
def videos():
    world = World()
    return world.render(world.scenes("test", range(2)))


def test_text_to_video_is_seeded_and_batched(pipe):
    prompts = ["a red circle moves right", "a blue square grows"]
    a = pipe.text_to_video(prompts, seed=0, progress=False)
    assert a.videos.shape == (2, 16, 32, 32, 3) and a.videos.dtype == np.uint8 and a.texts is None
    assert np.array_equal(a.videos, pipe.text_to_video(prompts, seed=0, progress=False).videos)
    assert not np.array_equal(a.videos, pipe.text_to_video(prompts, seed=1, progress=False).videos)
    alone = pipe.text_to_video(prompts[1:], seed=0, progress=False).videos
    assert alone.shape == (1, 16, 32, 32, 3)


def test_video_to_text_with_trajectory_and_instruction(pipe, videos, monkeypatch):
    seen, decoded = [], []
    decode = pipe.codec.decode
    monkeypatch.setattr(pipe.codec, "decode", lambda x: decoded.append(x) or decode(x))
    out = pipe.video_to_text(videos, seed=0, progress=False, return_trajectory=True,
                             callback=lambda i, s, v, t: seen.append((i, s)))  # fmt: skip
    assert not decoded  # the text trajectory only: the input video is never decoded (Wan's VAE is costly)
    assert out.video_trajectory is None
    assert len(out.texts) == 2 and all(isinstance(t, str) for t in out.texts)
    assert [i for i, _ in seen] == [0, 1, 2] and seen[0][1] == 1.0
    assert out.token_trajectory.shape == (3, 2, pipe.config.text_length)
    assert len(out.text_trajectory) == 3
    asked = pipe.video_to_text(videos, seed=0, progress=False, instruction="what moves")
    assert len(asked.texts) == 2


def test_generate_returns_video_and_text(pipe):
    out = pipe.generate(["a red circle moves right"], seed=3, progress=False, return_trajectory=True)
    assert out.videos.shape == (1, 16, 32, 32, 3) and len(out.texts) == 1
    assert out.video_trajectory.shape == (3, 1, 16, 32, 32, 3)
    heuristic = pipe.generate(["a red circle moves right"], seed=3, progress=False, text_update="linear-resample")
    assert heuristic.videos.shape == out.videos.shape


def test_calling_the_pipeline_runs_the_task_its_arguments_name_in_diffusers_names(pipe, videos):
    prompt = "a red circle moves right"
    generator = torch.Generator().manual_seed(5)
    t2v = pipe(prompt, num_inference_steps=2, generator=generator, progress=False)
    want = pipe.text_to_video(prompt, num_steps=2, seed=torch.Generator().manual_seed(5), progress=False)
    assert np.array_equal(t2v.videos, want.videos) and t2v.texts is None
    assert not np.array_equal(t2v.videos, pipe(prompt, num_inference_steps=3, generator=5, progress=False).videos)
    joint = pipe(prompt, joint=True, generator=4, progress=False)
    want = pipe.generate(prompt, seed=4, progress=False)
    assert np.array_equal(joint.videos, want.videos) and joint.texts == want.texts
    v2t = pipe(video=videos, generator=1, progress=False)
    assert v2t.texts == pipe.video_to_text(videos, seed=1, progress=False).texts and v2t.videos is None
    asked = pipe(video=videos, instruction="the red circle", generator=1, progress=False)
    assert asked.texts == pipe.video_to_text(videos, seed=1, instruction="the red circle", progress=False).texts
    for call, message in [(lambda: pipe(), "pass a prompt"),
                          (lambda: pipe(video=videos, joint=True), "with a video, pass no prompt"),
                          (lambda: pipe(prompt, generator=1, seed=1), "seed= or generator="),
                          (lambda: pipe(prompt, num_inference_steps=2, num_steps=2), "num_steps= or num_inference_steps="),
                          (lambda: pipe(prompt, videos), "a question about the video is instruction=")]:  # fmt: skip
        with pytest.raises(TypeError, match=message):
            call()
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1, got 0"):
        pipe(prompt, num_inference_steps=0)
    with pytest.raises(TypeError, match="generator must be an int or a torch.Generator, got str"):
        pipe(prompt, generator="0")


def test_config_sets_caption_steps_and_joint_text_update(tiny_parts, videos):
    p = tiny_parts
    cfg = PipelineConfig(num_steps=2, caption_steps=4, text_update="linear-resample")
    pipe = UniViGUPipeline(p["unified"], p["prompt_encoder"], p["tokenizer"], cfg)
    seen = []
    pipe.video_to_text(videos[:1], progress=False, callback=lambda i, s, v, t: seen.append(i))
    assert seen == [0, 1, 2, 3]  # caption_steps, not num_steps
    assert [cfg.steps_for(m) for m in ("text_to_video", "video_to_text", "generate")] == [2, 4, 2]
    assert cfg.steps_for("video_to_text", 7) == 7
    by_config = pipe.generate(["a red circle moves right"], seed=3, progress=False).texts
    named = pipe.generate(["a red circle moves right"], seed=3, progress=False, text_update="linear-resample").texts
    ctmc = pipe.generate(["a red circle moves right"], seed=3, progress=False, text_update="ctmc").texts
    assert by_config == named
    assert len(ctmc) == 1
    with pytest.raises(ValueError, match="text_update"):
        pipe.generate(["a red circle moves right"], progress=False, text_update="greedy")


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = UniViGUPipeline.from_pretrained(tmp_path)
    assert loaded.config == pipe.config
    a = pipe.text_to_video(["a green triangle moves up"], seed=5, progress=False).videos
    b = loaded.text_to_video(["a green triangle moves up"], seed=5, progress=False).videos
    assert np.array_equal(a, b)


def test_base_generator_pipeline_is_text_to_video_only(tiny_parts, tmp_path, videos):
    p = tiny_parts
    base = UniViGUPipeline(p["wan"], p["prompt_encoder"], p["tokenizer"], PipelineConfig(num_steps=2))
    base.save_pretrained(tmp_path)
    loaded = UniViGUPipeline.from_pretrained(tmp_path)
    assert loaded.text_to_video("a red circle moves right", progress=False).videos.shape == (1, 16, 32, 32, 3)
    with pytest.raises(ValueError, match="plain Wan generator"):
        loaded.video_to_text(videos, progress=False)


def test_bad_inputs_are_clear_errors(pipe, tiny_parts, videos, tmp_path):
    with pytest.raises(ValueError, match=r"expected uint8 videos \[B, 16, 32, 32, 3\]"):
        pipe.video_to_text(videos[:, :8], progress=False)
    limit = pipe.config.prompt_length - 1
    with pytest.raises(PromptError, match=f"prompt 1 is 40 tokens long; this model reads at most {limit}"):
        pipe.text_to_video(["a red circle", " ".join(["red"] * 40)], progress=False)
    with pytest.raises(PromptError, match="the instruction is 40 tokens long"):  # named, not as "prompt 0"
        pipe.video_to_text(videos, instruction=" ".join(["what"] * 40), progress=False)
    with pytest.raises(TypeError, match="instruction must be a str, got int"):
        pipe.video_to_text(videos, instruction=3, progress=False)
    # a model univigu's stages taught to caption never saw an instruction: said (the pipe above has no provenance)
    taught = UniViGUPipeline(pipe.transformer, pipe.prompt_encoder, pipe.tokenizer,
                             dataclasses.replace(pipe.config, extra={"refine": {"steps": 1}}))  # fmt: skip
    with pytest.warns(UserWarning, match="learned to caption in univigu's refine stage, .* the instruction is one it "
                                         "never saw"):  # fmt: skip
        taught.video_to_text(videos[:1], instruction="what moves", num_steps=1, progress=False)
    p = tiny_parts  # T2V's prompt is also its text stream: the shorter canvas is the limit
    short_text = UniViGUPipeline(p["unified"], p["prompt_encoder"], p["tokenizer"],
                                 PipelineConfig(num_steps=1, prompt_length=16, text_length=6))  # fmt: skip
    with pytest.raises(PromptError, match="is 7 tokens long; this model reads at most 5"):
        short_text.text_to_video("a large red circle quickly moves right", progress=False)
    assert short_text.generate("a large red circle quickly moves right", progress=False).videos.shape[0] == 1
    with pytest.warns(UserWarning, match=r"does not know \(read as \[UNK\]\): 'dog', 'beach'"):
        pipe.check_prompts(["a dog on a beach", "a dog moves"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.check_prompts(["a red circle moves right", ""], warn_empty=False)  # the world's words: no warning
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        UniViGUPipeline.from_pretrained(tmp_path / "nothing")
    floats = videos.astype(np.float32) / 255  # frames in [0, 1]: say how to make uint8 frames of them
    with pytest.raises(ValueError, match=r"got float32 array \(2, 16, 32, 32, 3\); frames are uint8 in \[0, 255\]"):
        pipe.video_to_text(floats, progress=False)
    with pytest.raises(TypeError, match="prompt 0 is ndarray, expected str; to caption videos pass them as video="):
        pipe(videos)  # a video where the prompt goes
    with pytest.raises(TypeError, match=r"pipe\(\) names it prompt= \(the methods: prompts=\)"):
        pipe(prompts=["a red circle moves right"])


def test_empty_batches_and_bad_call_arguments_are_clear_errors(pipe, videos):
    prompt = "a red circle moves right"
    for method in (pipe.text_to_video, pipe.generate):  # were IndexErrors inside transformers
        with pytest.raises(PromptError, match="no prompts: the batch is empty"):
            method([], progress=False)
        for bad, name in ((None, "NoneType"), (3, "int")):  # were transformers' "pretokenized" message
            with pytest.raises(TypeError, match=f"^prompt 1 is {name}, expected str$"):
                method([prompt, bad], progress=False)
    with pytest.raises(ValueError, match=r"no videos: the batch is empty \(0, 16, 32, 32, 3\)"):
        pipe.video_to_text(videos[:0], progress=False)
    with pytest.raises(ValueError, match="num_steps must be an int >= 1, got 0"):  # 0 ran the config's steps
        pipe.text_to_video(prompt, num_steps=0, progress=False)
    with pytest.raises(TypeError, match="num_steps must be an int >= 1, got float 2.5"):
        pipe.generate(prompt, num_steps=2.5, progress=False)
    for scale in (float("nan"), float("inf")):  # NaN sampled an all-black video and an empty caption
        with pytest.raises(ValueError, match=f"guidance_scale must be a finite number, got {scale}"):
            pipe.generate(prompt, guidance_scale=scale, progress=False)
    assert pipe.resolve_guidance_scale(None) == pipe.config.guidance_scale != 0.5  # what the CLI records
    assert pipe.resolve_guidance_scale(0.5) == 0.5
    for seed in ("1", 1.5):  # were AttributeErrors in the samplers
        with pytest.raises(TypeError, match=f"seed must be an int or a torch.Generator, got {type(seed).__name__}"):
            pipe.text_to_video(prompt, seed=seed, progress=False)
    by_generator = pipe.text_to_video(prompt, seed=torch.Generator().manual_seed(4), num_steps=1, progress=False)
    assert np.array_equal(by_generator.videos, pipe.text_to_video(prompt, seed=4, num_steps=1, progress=False).videos)


def test_videos_that_are_not_one_uint8_array_are_clear_errors(pipe, videos):
    with pytest.raises(TypeError, match=r"pass frames, not a path \('clip.mp4'\); read a file with pipe.load_video"):
        pipe.video_to_text("clip.mp4", progress=False)
    with pytest.raises(ValueError, match=r"\[B, 16, 32, 32, 3\], got a list whose items do not stack"):
        pipe.video_to_text([videos[0], videos[1, :8]], progress=False)
    with pytest.raises(ValueError, match=r"\[B, 16, 32, 32, 3\], got NoneType; read a file with"):
        pipe.video_to_text(None, progress=False)
    # one video [T, H, W, 3] is a batch of one, as one str is one prompt
    one = pipe.video_to_text(videos[1], seed=2, num_steps=2, progress=False).texts
    assert one == pipe.video_to_text(videos[1:2], seed=2, num_steps=2, progress=False).texts


def test_config_values_are_checked_with_the_field_and_the_valid_values():
    with pytest.raises(ValueError, match="caption_steps must be an int >= 1, got 0"):  # 0 ran num_steps
        PipelineConfig(caption_steps=0)
    with pytest.raises(TypeError, match="frames must be an int >= 1, got str '16'"):
        PipelineConfig(frames="16")
    with pytest.raises(ValueError, match=r"video_prediction must be one of \('velocity', 'sample', 'edm'\), got 'x'"):
        PipelineConfig(video_prediction="x")
    with pytest.raises(ValueError, match="shift must be > 0, got 0"):
        PipelineConfig(shift=0)
    with pytest.raises(ValueError, match="num_steps must be an int >= 1, got 0"):
        PipelineConfig().steps_for("generate", 0)


@pytest.fixture()
def model_copy(tmp_path):
    """A copy of the shipped model and a function that rewrites its model_index.json."""
    folder = shutil.copytree(univigu.DEFAULT_MODEL, tmp_path / "model")
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())

    def write(text: str | None = None, drop: str | None = None, **config) -> None:
        changed = {**index, "config": {**index["config"], **config}}
        changed.pop(drop, None)
        index_file.write_text(text if text is not None else json.dumps(changed))

    return folder, write


def test_a_broken_model_index_names_the_file_and_the_problem(model_copy):
    folder, write = model_copy
    index_file = str(folder / "model_index.json")
    cases = [
        (dict(text="{"), "is not valid JSON"),  # was a bare JSONDecodeError
        (dict(drop="config"), r"lacks \['config'\]"),  # was KeyError 'config'
        (dict(frame=16), r": unknown config keys \['frame'\]; valid keys: frames, height, width, "),
        (dict(frames="16"), ": frames must be an int >= 1, got str '16'"),
        (dict(video_prediction="bogus"), ": video_prediction must be one of"),
        # the rest loaded and failed on first use, deep inside (or with a misleading message)
        (dict(prompt_length=20), r": prompt_length 20 is longer than the prompt encoder reads \(max_length 8\)"),
        (dict(frames=15), r": frames must be a multiple of 4 for this model .* got 15 \(nearest valid: 16\)"),
        (dict(height=30), r": height must be a multiple of 4 for this model .* got 30 \(nearest valid: 32\)"),
    ]
    for change, message in cases:
        write(**change)
        with pytest.raises(ValueError, match=f"^{index_file}.*{message}"):
            UniViGUPipeline.from_pretrained(folder)


class _FixedClean(torch.nn.Module):
    """Predicts the same clean video whatever it sees: Euler on x-prediction must land exactly on it."""

    def __init__(self, clean):
        super().__init__()
        self.clean = torch.nn.Parameter(clean, requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:  # the compute dtype, as a diffusers model has it
        return self.clean.dtype

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        return (self.clean.expand_as(hidden_states).clone(),)


def test_sample_prediction_pipeline_lands_on_the_predicted_video(tiny_parts):
    p = tiny_parts
    clean = -torch.ones(1, 3, 16, 32, 32)
    clean[:, 0] = 1.0  # red everywhere
    config = PipelineConfig(num_steps=4, shift=3.0, video_prediction="sample", guidance_scale=1.0)
    pipe = UniViGUPipeline(_FixedClean(clean), p["prompt_encoder"], p["tokenizer"], config)
    video = pipe.text_to_video(["a red circle moves right"], seed=0, progress=False).videos
    assert (video[..., 0] == 255).all() and (video[..., 1:] == 0).all()


def test_half_precision_export_loads_back_in_float32(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "fp32")
    pipe.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    assert next(pipe.transformer.parameters()).dtype == torch.float32  # the pipeline itself is untouched
    size = lambda d: sum(f.stat().st_size for f in (tmp_path / d).rglob("*.safetensors"))  # noqa: E731
    assert size("fp16") < 0.6 * size("fp32")
    loaded = UniViGUPipeline.from_pretrained(tmp_path / "fp16")
    assert next(loaded.transformer.parameters()).dtype == torch.float32
    for (name, a), b in zip(pipe.transformer.state_dict().items(), loaded.transformer.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-2, rtol=1e-3), name
    # a dtype by name, as from_pretrained(torch_dtype=) takes it; a dtype that is no float is refused before
    # anything is written (int8 weights loaded back as noise)
    pipe.save_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert UniViGUPipeline.from_pretrained(tmp_path / "bf16", torch_dtype="bfloat16").transformer.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float16', 'float32'\].*torch.int8"):
        pipe.save_pretrained(tmp_path / "int8", dtype=torch.int8)
    assert not (tmp_path / "int8").exists()


def test_to_takes_a_dtype_by_name(tiny_parts):
    p = tiny_parts
    pipe = UniViGUPipeline(copy.deepcopy(p["unified"]), copy.deepcopy(p["prompt_encoder"]), p["tokenizer"],
                           PipelineConfig(num_steps=1))  # fmt: skip
    assert pipe.to("cpu", "bfloat16") is pipe and pipe.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        pipe.to(dtype=torch.int8)
    if not torch.cuda.is_available():  # refused before the cast: the pipeline is left as it was
        with pytest.raises(RuntimeError, match="'cuda': this torch .* sees no CUDA device; the pipeline is left"):
            pipe.to("cuda", torch.float32)
        assert pipe.dtype == torch.bfloat16 and pipe.transformer.device.type == "cpu"


def test_caption_condition_zeros_captions_with_an_all_zero_condition(pipe, videos):
    """`caption_condition: zeros` (converted official checkpoints: the released script's V2T condition) gives the
    transformer all-zero prompt states when no instruction is given, and the empty prompt's otherwise."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[4].clone()))
    try:
        pipe.video_to_text(videos[:1], num_steps=1, progress=False)
        zeros = dataclasses.replace(pipe.config, caption_condition="zeros")
        UniViGUPipeline(pipe.transformer, pipe.prompt_encoder, pipe.tokenizer, zeros).video_to_text(
            videos[:1], num_steps=1, progress=False)
    finally:
        hook.remove()
    assert len(seen) == 2 and seen[0].abs().sum() > 0 and torch.equal(seen[1], torch.zeros_like(seen[1]))
    with pytest.raises(ValueError, match=r"caption_condition must be one of \('empty_prompt', 'zeros'\)"):
        PipelineConfig(caption_condition="null")


def test_set_progress_bar_config_hides_the_bar_of_calls_that_do_not_say(pipe, capsys):
    prompt = "a red circle moves right"
    pipe.text_to_video(prompt, num_steps=2)
    assert "sampling" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe.text_to_video(prompt, num_steps=2)
        assert "sampling" not in capsys.readouterr().err
        pipe.text_to_video(prompt, num_steps=2, progress=True)  # a call that says wins
        assert "sampling" in capsys.readouterr().err
    finally:
        pipe.set_progress_bar_config(disable=False)


def _guided_t2v_calls(pipe, prompts, method="text_to_video", **kwargs):
    """The transformer's arguments in each call of a one-step guided T2V (or another task)."""
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(args))
    try:
        getattr(pipe, method)(prompts, seed=0, num_steps=1, guidance_scale=2.0, progress=False, **kwargs)
    finally:
        hook.remove()
    return calls


def test_unified_guidance_null_pass_reads_the_empty_prompt_in_both_streams(pipe):
    """Guided T2V on the unified model: the null half of the batched pass has the empty prompt's tokens in the
    text stream and its states in the cross-attention; the conditional half has the prompt's."""
    prompts = ["a red circle moves right", "a blue square grows"]
    tokens, mask = pipe.text_canvas.encode(prompts)
    null_tokens, null_mask = pipe.text_canvas.encode([""] * 2)
    states, null_states = pipe._prompt_states(prompts), pipe._prompt_states([""] * 2)
    assert not torch.equal(tokens, null_tokens)
    (video, text, _, _, prompt_states, text_mask, _), = _guided_t2v_calls(pipe, prompts)
    assert video.shape[0] == text.shape[0] == 4  # one batched pass: conditional, then null
    n = text.shape[1]  # the canvas less the padding no row holds
    assert n == mask.sum(1).max() < mask.shape[1] and not mask[:, n:].any()
    assert torch.equal(text[:2], tokens[:, :n]) and torch.equal(text_mask[:2], mask[:, :n])
    assert torch.equal(text[2:], null_tokens[:, :n]) and torch.equal(text_mask[2:], null_mask[:, :n])
    assert torch.allclose(prompt_states[:2, : states.shape[1]], states)
    assert torch.allclose(prompt_states[2:, : null_states.shape[1]], null_states)


def test_negative_prompt_is_the_null_pass_condition(pipe):
    """negative_prompt: the null half of guided T2V reads it in the cross-attention and the text stream (joint:
    the cross-attention); it is checked as a prompt is, with a message naming it."""
    prompts = ["a red circle moves right", "a blue square grows"]
    negative = "a green triangle"
    neg_tokens, neg_mask = pipe.text_canvas.encode([negative] * 2)
    neg_states = pipe._prompt_states([negative] * 2)
    assert not torch.allclose(neg_states, pipe._prompt_states([""] * 2))
    (_, text, _, _, prompt_states, text_mask, _), = _guided_t2v_calls(pipe, prompts, negative_prompt=negative)
    n = text.shape[1]
    assert torch.equal(text[2:], neg_tokens[:, :n]) and torch.equal(text_mask[2:], neg_mask[:, :n])
    assert torch.allclose(prompt_states[2:, : neg_states.shape[1]], neg_states)
    (_, _, _, _, joint_states, _, _), = _guided_t2v_calls(pipe, prompts, "generate", negative_prompt=negative)
    assert torch.allclose(joint_states[2:, : neg_states.shape[1]], neg_states)
    long = " ".join(["red"] * pipe.config.prompt_length)
    for method in ("text_to_video", "generate"):
        n = pipe.config.prompt_length
        message = f"^the negative prompt is {n} tokens long; this model reads at most {n - 1}"
        with pytest.raises(PromptError, match=message) as error:
            getattr(pipe, method)(prompts, num_steps=1, negative_prompt=long, progress=False)
        assert error.value.argument == "negative_prompt"
        with pytest.raises(TypeError, match="negative_prompt must be a str, got list"):
            getattr(pipe, method)(prompts, num_steps=1, negative_prompt=["a", "b"], progress=False)


def test_a_negative_prompt_without_guidance_warns(pipe):
    """At guidance scale 1 there is no null pass: a negative prompt would be ignored silently, so it warns."""
    import warnings

    for method in ("text_to_video", "generate"):
        with pytest.warns(UserWarning, match="negative_prompt has no effect without guidance") as record:
            getattr(pipe, method)(["a red circle"], num_steps=1, guidance_scale=1, negative_prompt="a blue square",
                                  progress=False)  # fmt: skip
        assert record[0].filename == __file__  # the caller's line
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            getattr(pipe, method)(["a red circle"], num_steps=1, guidance_scale=1, progress=False)


def test_prompt_limits_are_exact(pipe, tiny_parts):
    """check_prompts: a prompt of prompt_length - 1 tokens (the end token fills the canvas) passes, one more does
    not; a prompt canvas longer than the prompt encoder's max_length, by even one, is refused."""
    limit = pipe.config.prompt_length - 1
    pipe.check_prompts([" ".join(["red"] * limit)])
    with pytest.raises(PromptError, match=f"is {limit + 1} tokens long; this model reads at most {limit}"):
        pipe.check_prompts([" ".join(["red"] * (limit + 1))])
    p = tiny_parts
    longest = p["prompt_encoder"].config.max_length
    UniViGUPipeline(p["unified"], p["prompt_encoder"], p["tokenizer"], PipelineConfig(prompt_length=longest))
    with pytest.raises(ValueError, match=f"prompt_length {longest + 1} is longer than the prompt encoder reads"):
        UniViGUPipeline(p["unified"], p["prompt_encoder"], p["tokenizer"], PipelineConfig(prompt_length=longest + 1))


def test_from_pretrained_casts_the_transformer_and_the_prompt_encoder_to_torch_dtype(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = UniViGUPipeline.from_pretrained(tmp_path, torch_dtype="bfloat16")
    assert loaded.transformer.dtype == torch.bfloat16  # (diffusers keeps a few modules in float32)
    assert {p.dtype for p in loaded.prompt_encoder.parameters()} == {torch.bfloat16}


def test_from_pretrained_takes_config_overrides(tmp_path):
    """PipelineConfig fields given to from_pretrained replace the folder's (checked as the folder's are)."""
    pipe = UniViGUPipeline.from_pretrained(univigu.DEFAULT_MODEL, num_steps=3, guidance_scale=2.0)
    assert (pipe.config.num_steps, pipe.config.guidance_scale) == (3, 2.0)
    assert UniViGUPipeline.from_pretrained(univigu.DEFAULT_MODEL).config.num_steps == 20  # the folder's
    with pytest.raises(ValueError, match=r"\(with \['num_step'\]\): unknown config keys \['num_step'\]"):
        UniViGUPipeline.from_pretrained(univigu.DEFAULT_MODEL, num_step=3)
    with pytest.raises(ValueError, match=r"\(with \['height'\]\): height must be a multiple of 4"):
        UniViGUPipeline.from_pretrained(univigu.DEFAULT_MODEL, height=30)


def test_guidance_text_prompt_keeps_the_prompt_in_the_null_pass(pipe):
    """`guidance_text: prompt` (converted official checkpoints, as the released script guides): the null half of
    guided T2V keeps the prompt's tokens in the text stream; only the cross-attention condition is emptied."""
    prompts = ["a red circle moves right", "a blue square grows"]
    tokens, _ = pipe.text_canvas.encode(prompts)
    config = dataclasses.replace(pipe.config, guidance_text="prompt")
    released = UniViGUPipeline(pipe.transformer, pipe.prompt_encoder, pipe.tokenizer, config)
    (_, text, _, _, prompt_states, _, _), = _guided_t2v_calls(released, prompts)
    n = text.shape[1]
    assert torch.equal(text[:2], tokens[:, :n]) and torch.equal(text[2:], tokens[:, :n])
    null_states = pipe._prompt_states([""] * 2)
    assert torch.allclose(prompt_states[2:, : null_states.shape[1]], null_states)
    with pytest.raises(ValueError, match=r"guidance_text must be one of \('empty_prompt', 'prompt'\)"):
        PipelineConfig(guidance_text="none")


@pytest.fixture()
def offline(monkeypatch):
    """Every attempt to reach the network (a name lookup or a connection) recorded and refused."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_a_missing_component_is_a_clear_error_that_never_reaches_the_network(tmp_path, offline):
    """A pipeline folder without transformer/ (or its config.json), prompt_encoder/ or tokenizer/: was six requests
    to huggingface.co, then an OSError from diffusers; now a FileNotFoundError (a usage error on the command line)
    naming what is missing, and no network use."""
    cases = [("transformer", "transformer does not exist"), ("prompt_encoder", "prompt_encoder does not exist"),
             ("tokenizer", "tokenizer does not exist"), ("transformer/config.json", "no config.json in .*transformer"),
             ("prompt_encoder/config.json", "no config.json in .*prompt_encoder")]  # fmt: skip
    for i, (removed, message) in enumerate(cases):
        folder = shutil.copytree(univigu.DEFAULT_MODEL, tmp_path / str(i))
        target = folder / removed
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        with pytest.raises(FileNotFoundError, match=message):
            UniViGUPipeline.from_pretrained(folder)
    assert offline == []
    UniViGUPipeline.from_pretrained(univigu.DEFAULT_MODEL)  # the whole folder loads offline
    assert offline == []


def _maskless_tokenizer():
    """The world's words without a mask token (as umT5's tokenizer has none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from univigu.data.world import vocabulary

    words = ["[PAD]", "[END]", "[UNK]"] + sorted(set(vocabulary()))
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", eos_token="[END]", unk_token="[UNK]")


def test_components_that_do_not_fit_together_are_refused_when_the_pipeline_is_built(tiny_parts):
    """Were IndexErrors / shape errors in the middle of the first sampling call."""
    from transformers import UMT5Config, UMT5EncoderModel

    from univigu import PromptEncoder, UniViGUTransformer
    from univigu.data.tokenizer import build_world_tokenizer
    from univigu.data.world import vocabulary
    from univigu.models.wan import UMT5PromptEncoder

    p = tiny_parts
    n = len(p["tokenizer"])
    encoder = {"num_layers": 1, "num_heads": 2, "max_length": 16}
    wide = PromptEncoder(vocab_size=n, dim=64, **encoder)
    for transformer in (p["unified"], p["wan"]):  # a base generator reads prompt states too
        with pytest.raises(ValueError, match=r"prompt encoder \(PromptEncoder\) gives states 64 wide; the transformer "
                                             r"\(\w+\) reads 32 \(text_dim\)"):
            UniViGUPipeline(transformer, wide, p["tokenizer"], PipelineConfig(num_steps=1))
    umt5 = UMT5PromptEncoder(UMT5EncoderModel(UMT5Config(vocab_size=n, d_model=48, d_kv=8, d_ff=64, num_layers=1,
                                                         num_heads=2, relative_attention_num_buckets=8)))  # fmt: skip
    with pytest.raises(ValueError, match=r"\(UMT5PromptEncoder\) gives states 48 wide; .* reads 32"):
        UniViGUPipeline(p["unified"], umt5, p["tokenizer"], PipelineConfig(num_steps=1))
    small = PromptEncoder(vocab_size=n - 6, dim=32, **encoder)
    with pytest.raises(ValueError, match=f"the tokenizer has {n} tokens; the prompt encoder \\(PromptEncoder\\) "
                                         f"embeds {n - 6} \\(vocab_size\\)"):
        UniViGUPipeline(p["unified"], small, p["tokenizer"], PipelineConfig(num_steps=1))
    bigger = build_world_tokenizer([*vocabulary(), "dog", "cat", "beach"])  # 59 tokens
    reads_it = PromptEncoder(vocab_size=len(bigger), dim=32, **encoder)
    with pytest.raises(ValueError, match=f"the tokenizer has {n + 3} tokens; the transformer \\(UniViGUTransformer\\) "
                                         f"reads {n} text tokens \\(text_vocab_size\\)"):
        UniViGUPipeline(p["unified"], reads_it, bigger, PipelineConfig(num_steps=1))
    UniViGUPipeline(p["wan"], reads_it, bigger, PipelineConfig(num_steps=1))  # no text stream: no text vocabulary
    maskless = _maskless_tokenizer()
    plain = UniViGUTransformer.from_wan(p["wan"], text_vocab_size=len(maskless))
    encoder_m = PromptEncoder(vocab_size=len(maskless), dim=32, **encoder)
    UniViGUPipeline(plain, encoder_m, maskless, PipelineConfig(num_steps=1))
    with pytest.raises(ValueError, match=f"text_source 'mask' starts the text from id {len(maskless)}.*no mask row"):
        UniViGUPipeline(plain, encoder_m, maskless, PipelineConfig(num_steps=1, text_source="mask"))
    with_row = UniViGUTransformer.from_wan(p["wan"], text_vocab_size=len(maskless), text_mask_row=True)
    UniViGUPipeline(with_row, encoder_m, maskless, PipelineConfig(num_steps=1, text_source="mask"))


def test_a_folder_whose_tokenizer_does_not_fit_the_transformer_fails_to_load(model_copy, tiny_parts):
    """The reported case: a 59-token tokenizer next to a transformer of text_vocab_size 56 loaded, then `univigu
    joint` ended in an IndexError."""
    from univigu.data.tokenizer import build_world_tokenizer
    from univigu.data.world import vocabulary

    folder, _ = model_copy
    shutil.rmtree(folder / "tokenizer")
    build_world_tokenizer([*vocabulary(), "dog", "cat", "beach"]).save_pretrained(str(folder / "tokenizer"))
    with pytest.raises(ValueError, match=f"^{folder / 'model_index.json'}: the tokenizer has 59 tokens; the prompt "
                                         "encoder .* embeds 56"):
        UniViGUPipeline.from_pretrained(folder)


def test_a_broken_component_names_the_file_and_the_problem(model_copy):
    """Were raw TypeErrors (naming no file), a misleading 'does not match WanTransformer3DModel', and a bare JSON
    error from the tokenizer."""
    folder, write = model_copy
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    write(text=json.dumps({**index, "config": None}))
    with pytest.raises(ValueError, match=f"^{index_file}: config must be a JSON object, got null"):
        UniViGUPipeline.from_pretrained(folder)
    write(text=json.dumps({**index, "transformer": ["univigu", "UniViGUTransformr"]}))
    with pytest.raises(ValueError, match=f"^{index_file}: unknown transformer class 'UniViGUTransformr'; known: "
                                         "UniViGUTransformer, WanTransformer3DModel"):
        UniViGUPipeline.from_pretrained(folder)
    write(text=json.dumps({**index, "prompt_encoder": ["univigu", "PromptEncodr"]}))
    with pytest.raises(ValueError, match="unknown prompt_encoder class 'PromptEncodr'; known: PromptEncoder, "
                                         "UMT5PromptEncoder"):
        UniViGUPipeline.from_pretrained(folder)
    write(text=json.dumps({**index, "transformer": "UniViGUTransformer"}))
    with pytest.raises(ValueError, match=r'transformer must be \[library, class name\], got "UniViGUTransformer"'):
        UniViGUPipeline.from_pretrained(folder)
    write()
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "num_layers": "four"}))
    with pytest.raises(ValueError, match=f"^{config_file} does not describe a UniViGUTransformer: .*integer"):
        UniViGUPipeline.from_pretrained(folder)
    config_file.write_text(json.dumps(config))
    tokenizer_file = folder / "tokenizer" / "tokenizer.json"
    text = tokenizer_file.read_text()
    tokenizer_file.write_text(text[:25] + "\x01" + text[25:])
    with pytest.raises(ValueError, match=f"^{tokenizer_file} is not valid JSON: "):
        UniViGUPipeline.from_pretrained(folder)


def test_prompts_that_are_not_text_are_clear_errors_and_empty_ones_a_warning(pipe):
    with pytest.raises(PromptError, match=r"prompt 1 is not valid text: character 6 \('\\udcff'\) cannot be encoded "
                                          "as UTF-8"):  # was a TypeError inside tokenizers
        pipe.text_to_video(["a red circle", "a red \udcff circle"], progress=False)
    with pytest.raises(PromptError, match="the negative prompt is not valid text"):
        pipe.generate("a red circle", negative_prompt="\udcff", progress=False)
    with pytest.raises(TypeError, match=r"prompts must be a str or a list of str, got bytes; decode them"):
        pipe.text_to_video(b"a red circle", progress=False)  # was "prompt 0 is int" (the bytes were iterated)
    with pytest.raises(TypeError, match=r"^prompt 0 is bytes, expected str; decode it"):
        pipe.generate([b"a red circle"], progress=False)
    for method in (pipe.text_to_video, pipe.generate):
        with pytest.warns(UserWarning, match=r"prompts 1, 2 are empty: .* unconditional sample"):
            method(["a red circle", "", " \n"], num_steps=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the empty negative prompt and instruction are the defaults: no warning
        pipe.generate("a red circle", num_steps=1, progress=False)
        pipe.video_to_text(np.zeros((1, 16, 32, 32, 3), np.uint8), num_steps=1, progress=False)


def test_the_unknown_word_warning_is_short_whatever_the_prompt(pipe):
    with pytest.warns(UserWarning) as caught:
        pipe.check_prompts(["x" * 100_000])  # was a 100 KB warning
    message = str(caught[0].message)
    assert len(message) < 200 and "'" + "x" * 40 + "...'" in message
    words = [f"word{i}" for i in range(30)]
    with pytest.warns(UserWarning) as caught:
        pipe.check_prompts([" ".join(words[i : i + 10]) for i in (0, 10, 20)])
    message = str(caught[0].message)
    assert message.endswith("'word0', 'word1', 'word2', 'word3', 'word4', 'word5', 'word6', 'word7', 'word8', "
                            "'word9' ... and 20 more")  # fmt: skip


def test_load_video_reads_a_file_as_the_models_input(pipe, videos, tmp_path):
    """pipe.load_video: the config's frames at its fps, at its size (a larger file is scaled down), uint8; a clip
    too short for the model is a VideoReadError naming why."""
    from univigu import VideoReadError, write_video

    c = pipe.config
    write_video(tmp_path / "world.gif", videos[0], fps=c.fps)
    frames = pipe.load_video(tmp_path / "world.gif")
    assert frames.dtype == np.uint8 and frames.shape == (c.frames, c.height, c.width, 3)
    assert np.abs(frames.astype(int) - videos[0].astype(int)).mean() < 2  # a GIF's palette, nothing else
    big = videos[0].repeat(2, axis=1).repeat(2, axis=2)  # 64 x 64: scaled to cover, then cropped
    write_video(tmp_path / "big.gif", big, fps=c.fps)
    assert pipe.load_video(tmp_path / "big.gif").shape == (c.frames, c.height, c.width, 3)
    write_video(tmp_path / "short.gif", videos[0][: c.frames // 2], fps=c.fps)
    with pytest.raises(VideoReadError, match="too short"):
        pipe.load_video(tmp_path / "short.gif")
    assert pipe.video_to_text(frames, num_steps=1, progress=False).texts  # what it returns is what captions take


def test_a_non_finite_sample_warns_rather_than_passing_for_a_video(pipe):
    """A guidance scale that overflows float32 (finite itself, so accepted) samples NaN, which decodes black: the
    call warns, naming the videos; a sane scale does not."""
    with pytest.warns(UserWarning, match=r"videos \[0, 1\] came out non-finite .* guidance scale overflows"):
        pipe.text_to_video(["a red circle", "a blue square"], num_steps=1, guidance_scale=1e300, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.text_to_video(["a red circle"], num_steps=1, guidance_scale=3.0, progress=False)
