import pytest
import torch

from univigu import WorldDataset
from univigu.data.dataset import collate
from univigu.data.tokenizer import TextCanvas
from univigu.flow.regimes import RegimeMix
from univigu.flow.text import TextFlow
from univigu.flow.video import VideoFlow
from univigu.training.tasks import GeneratorTask, UnifiedTask


def _batch(n=4):
    ds = WorldDataset("train", 16)
    return collate(ds.__getitems__(list(range(n))))


def test_generator_task_trains_video_and_prompt_encoder(tiny_parts):
    p = tiny_parts
    task = GeneratorTask(p["wan"], p["prompt_encoder"], TextCanvas(p["tokenizer"], 16), VideoFlow())
    out = task(_batch(), generator=torch.Generator().manual_seed(0))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    task.zero_grad()
    out["loss"].backward()
    assert p["prompt_encoder"].token_embedding.weight.grad.abs().sum() > 0
    again = task(_batch(), generator=torch.Generator().manual_seed(0))["loss"]
    assert torch.equal(again, out["loss"].detach())  # the generator decides all randomness
    task.zero_grad()


def test_unified_task_regimes_and_frozen_prompt_encoder(tiny_parts):
    p = tiny_parts
    tok = p["tokenizer"]
    canvas = TextCanvas(tok, 48)
    task = UnifiedTask(p["unified"], p["prompt_encoder"], TextCanvas(tok, 16), canvas, VideoFlow(),
                       TextFlow(canvas.vocab_size), RegimeMix(), text_target="caption")  # fmt: skip
    out = task(_batch(8), generator=torch.Generator().manual_seed(1))
    assert set(out) == {"loss", "video", "text"}
    # zero-initialised head: the first text loss is exactly that of uniform logits
    text_sum, text_weight = out["text"]  # logged as (sum, weight) over the samples with a text term
    assert abs(text_sum.item() / text_weight.item() - torch.log(torch.tensor(float(canvas.vocab_size))).item()) < 1e-4
    out["loss"].backward()
    assert all(prm.grad is None for prm in p["prompt_encoder"].parameters())
    assert p["unified"].text_proj_out.weight.grad.abs().sum() > 0
    p["unified"].zero_grad()
    task.train()
    assert not task.prompt_encoder.training


class _Spy:
    """Records the positional and keyword arguments of every forward of a module (a forward pre-hook)."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append((args, kwargs))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _unified_task(p, mix, text_target="prompt", **kwargs):
    tok = p["tokenizer"]
    canvas = TextCanvas(tok, 48)
    return UnifiedTask(p["unified"], p["prompt_encoder"], TextCanvas(tok, 16), canvas, VideoFlow(),
                       TextFlow(canvas.vocab_size), mix, text_target=text_target, **kwargs)  # fmt: skip


def test_unified_task_gives_v2t_rows_the_null_prompt_and_t2v_rows_the_prompt(tiny_parts):
    """V2T rows see the empty prompt's states (the prompt would leak the answer); T2V rows without dropout see
    their own prompt's states."""
    p = tiny_parts
    batch = _batch(4)
    for mix, expect_null in ((RegimeMix(t2v=0, v2t=1, joint=0, cond_dropout=0.0), True),
                             (RegimeMix(t2v=1, v2t=0, joint=0, cond_dropout=0.0), False)):  # fmt: skip
        task = _unified_task(p, mix)
        prompt_states = task.encode_prompts(batch["prompt"])
        null_states = task.encode_prompts([""]).expand_as(prompt_states)
        assert not torch.allclose(prompt_states, null_states)
        with _Spy(p["unified"]) as spy, torch.no_grad():
            task(batch, generator=torch.Generator().manual_seed(0))
        (args, _), = spy.calls
        states = args[4]
        assert torch.allclose(states, null_states if expect_null else prompt_states), mix


def test_the_text_mask_reaches_the_model_only_where_a_row_has_padding(tiny_parts):
    """V2T and joint rows generate every text position: no mask is passed (the fastest attention kernels take
    none), and the loss is the one an all-True mask gives; a T2V row's prompt padding is masked."""
    p = tiny_parts
    batch = _batch(4)
    for mix, masked in ((RegimeMix(t2v=0, v2t=1, joint=1, cond_dropout=0.0), False),
                        (RegimeMix(t2v=1, v2t=0, joint=0, cond_dropout=0.0), True)):  # fmt: skip
        task = _unified_task(p, mix)
        with _Spy(p["unified"]) as spy, torch.no_grad():
            loss = task(batch, generator=torch.Generator().manual_seed(0))["loss"]
        (args, _), = spy.calls
        assert (args[5] is not None) == masked, mix
        if masked:
            assert not args[5].all()  # the prompts are shorter than the canvas
        else:
            with torch.no_grad():
                with_mask = p["unified"](*args[:5], torch.ones_like(args[1], dtype=torch.bool), None)
                without = p["unified"](*args[:5], None, None)
            assert torch.allclose(with_mask[0], without[0], atol=1e-6) and torch.isfinite(loss)


def test_caption_condition_zeros_trains_v2t_rows_on_the_all_zero_condition(tiny_parts):
    """caption_condition "zeros" (a converted official checkpoint captions so): V2T rows are trained on all-zero
    states, while T2V rows whose condition is dropped keep the empty prompt's (guidance's null pass)."""
    p = tiny_parts
    batch = _batch(4)
    null_states = _unified_task(p, RegimeMix()).encode_prompts([""]).expand(4, -1, -1)
    assert null_states.abs().sum() > 0
    for mix, expected in ((RegimeMix(t2v=0, v2t=1, joint=0, cond_dropout=0.0), torch.zeros_like(null_states)),
                          (RegimeMix(t2v=1, v2t=0, joint=0, cond_dropout=1.0), null_states)):  # fmt: skip
        task = _unified_task(p, mix, caption_condition="zeros")
        with _Spy(p["unified"]) as spy, torch.no_grad():
            task(batch, generator=torch.Generator().manual_seed(0))
        (args, _), = spy.calls
        assert torch.equal(args[4], expected), mix
    with pytest.raises(ValueError, match=r"caption_condition must be one of \('empty_prompt', 'zeros'\)"):
        _unified_task(p, RegimeMix(), caption_condition="null")


def test_guidance_text_prompt_keeps_the_prompt_in_dropped_rows_text_stream(tiny_parts):
    """guidance_text "prompt" (a converted official checkpoint guides so): T2V rows whose condition is dropped keep
    the prompt's tokens in the text stream (the default puts the empty prompt's there); their states are the
    empty prompt's either way."""
    p = tiny_parts
    batch = _batch(4)
    dropped = RegimeMix(t2v=1, v2t=0, joint=0, cond_dropout=1.0)
    for guidance_text in ("prompt", "empty_prompt"):
        task = _unified_task(p, dropped, guidance_text=guidance_text)
        tokens, _ = task.text_canvas.encode(batch["prompt"] if guidance_text == "prompt" else [""] * 4)
        with _Spy(p["unified"]) as spy, torch.no_grad():
            task(batch, generator=torch.Generator().manual_seed(0))
        (args, _), = spy.calls
        assert torch.equal(args[1], tokens), guidance_text
        assert torch.allclose(args[4], task.encode_prompts([""]).expand(4, -1, -1))
    with pytest.raises(ValueError, match=r"guidance_text must be one of \('empty_prompt', 'prompt'\)"):
        _unified_task(p, RegimeMix(), guidance_text="none")


def test_generator_task_condition_dropout_feeds_the_empty_prompt(tiny_parts):
    """cond_dropout 1: every prompt state the generator gets is the empty prompt's; 0: the batch's prompts'."""
    p = tiny_parts
    canvas = TextCanvas(p["tokenizer"], 16)
    batch = _batch(4)
    with torch.no_grad():
        ids, mask = canvas.encode(batch["prompt"])
        prompt_states = p["prompt_encoder"](ids, mask)
        ids, mask = canvas.encode([""] * 4)
        null_states = p["prompt_encoder"](ids, mask)
    assert not torch.allclose(prompt_states, null_states)
    for dropout, expected in ((1.0, null_states), (0.0, prompt_states)):
        task = GeneratorTask(p["wan"], p["prompt_encoder"], canvas, VideoFlow(), cond_dropout=dropout)
        with _Spy(p["wan"]) as spy, torch.no_grad():
            task(batch, generator=torch.Generator().manual_seed(0))
        (_, kwargs), = spy.calls
        assert torch.allclose(kwargs["encoder_hidden_states"], expected), dropout


def test_unified_task_trains_the_text_on_the_caption_when_asked(tiny_parts, monkeypatch):
    """text_target="caption": the text tokens the model learns to generate (V2T rows) are the caption's, while
    T2V rows still read the clean prompt in the text stream."""
    from univigu.training import tasks

    p = tiny_parts
    batch = _batch(4)
    assert batch["prompt"] != batch["caption"]
    built, make = [], tasks.make_training_batch

    def spy(*args, **kwargs):
        built.append(make(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(tasks, "make_training_batch", spy)
    task = _unified_task(p, RegimeMix(t2v=0, v2t=1, joint=0, cond_dropout=0.0), text_target="caption")
    caption, _ = task.text_canvas.encode(batch["caption"])
    prompt, _ = task.text_canvas.encode(batch["prompt"])
    assert not torch.equal(caption, prompt)
    with torch.no_grad():
        task(batch, generator=torch.Generator().manual_seed(0))
    tb = built[-1]
    assert (tb.regime == 1).all()  # V2T
    assert torch.equal(tb.text_target, caption)
    # the scored positions are where the noised text stream is generated towards the caption
    assert tb.text_loss_mask.any()
    # T2V rows: the text stream is the clean prompt, not the caption
    task = _unified_task(p, RegimeMix(t2v=1, v2t=0, joint=0, cond_dropout=0.0), text_target="caption")
    with _Spy(p["unified"]) as model_spy, torch.no_grad():
        task(batch, generator=torch.Generator().manual_seed(0))
    (args, _), = model_spy.calls
    assert torch.equal(args[1], prompt) and torch.equal(built[-1].text_target, caption)
