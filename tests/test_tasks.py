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
